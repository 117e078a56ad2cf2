"""Many Python threads on one module at once, and thousands of training steps in one process:
the kernels' per-thread scratch and the parallel regions must neither mix callers' data nor
grow memory."""

import threading

import torch
from torch.nn.utils.rnn import pack_sequence

import lstm_ext

THREADS = 4


def forward_backward(module, x, state):
    """Output, final state and every gradient, without touching the module's .grad (threads
    share the parameters)."""
    output, (h_n, c_n) = module(x, state)
    data = output.data if hasattr(output, "batch_sizes") else output
    loss = (data * data.detach().sin()).sum() + h_n.sum() + c_n.cos().sum()
    inputs = [x.data if hasattr(x, "batch_sizes") else x, *state, *module.parameters()]
    grads = torch.autograd.grad(loss, inputs)
    return [data.detach(), h_n.detach(), c_n.detach(), *grads]


def test_threads_running_one_module_at_once_get_the_serial_results():
    torch.manual_seed(0)
    # One module through the fused recurrence, one through the step loop (projection); each
    # thread has its own inputs and lengths.
    modules = [lstm_ext.LSTM(12, 48, num_layers=2, bidirectional=True),
               lstm_ext.LSTM(12, 48, num_layers=2, proj_size=16)]
    cases = []
    for index in range(THREADS):
        module = modules[index % 2]
        lengths = torch.randint(1, 30, (6,)).tolist()
        sequences = [torch.randn(n, 12, requires_grad=True) for n in lengths]
        x = (pack_sequence(sequences, enforce_sorted=False) if index % 2
             else torch.randn(25, 6, 12, requires_grad=True))
        directions = 2 if module.bidirectional else 1
        state = (torch.randn(2 * directions, 6, module.proj_size or 48, requires_grad=True),
                 torch.randn(2 * directions, 6, 48, requires_grad=True))
        cases.append((module, x, state))
    serial = [forward_backward(*case) for case in cases]

    results = [[] for _ in range(THREADS)]
    errors = []
    start = threading.Barrier(THREADS)

    def work(index):
        try:
            start.wait()
            for _ in range(8):
                results[index].append(forward_backward(*cases[index]))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index in range(THREADS):
        for round_ in results[index]:
            for got, expected in zip(round_, serial[index]):
                assert torch.equal(got, expected), f"thread {index} differs from the serial run"


def resident_megabytes():
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * 4096 / 2**20


def test_thousands_of_training_steps_keep_memory_flat():
    torch.manual_seed(0)
    model = lstm_ext.LSTM(16, 32, num_layers=2)
    projected = lstm_ext.LSTM(16, 32, proj_size=8)
    optimizer = torch.optim.SGD([*model.parameters(), *projected.parameters()], lr=1e-3)
    x = torch.randn(12, 4, 16)
    packed = pack_sequence([torch.randn(n, 16) for n in (12, 9, 5, 2)])

    def step():
        optimizer.zero_grad(set_to_none=True)
        output, _ = model(x)
        packed_output, _ = projected(packed)
        (output.square().mean() + packed_output.data.square().mean()).backward()
        optimizer.step()

    for _ in range(300):  # warm-up: allocator caches, per-thread scratch
        step()
    before = resident_megabytes()
    for _ in range(3000):
        step()
    grown = resident_megabytes() - before
    assert grown < 20, f"resident memory grew {grown:.1f} MB over 3000 steps"
