"""CUDA: the parity checks of the CPU suite, on the GPU (skipped without one)."""

import contextlib
import copy
import os

import pytest
import torch
from torch import nn

import lstm_ext
from lstm_ext.lm import train as lm_train
from conftest import Case, compare, poisoned_allocations, rel_error, requires_cuda
from test_module_parity import GRID, KINDS, make_pair
from test_lm_train import metrics, tiny_config
from test_ops import (OPS, VARIANTS, WEIGHT_LAYOUTS, check_every_output_element_written,
                      check_weights_of_any_layout, layer_args)

# Every test here runs on this device. LSTM_EXT_TEST_DEVICE=cpu runs them on the CPU instead
# (all but the CUDA-only features: streams, graphs, TF32, CUDA autocast), which .ci/run does so
# that their own logic is checked on every run, GPU or not.
DEVICE = os.environ.get("LSTM_EXT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda] + ([requires_cuda] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers,bias,batch_first,bidirectional,proj_size,with_state", GRID)
def test_parity_grid_against_nn_lstm_on_gpu(layers, bias, batch_first, bidirectional, proj_size,
                                             with_state, kind):
    """The Core parity grid against nn.LSTM (cuDNN) on the GPU, in fp64. cuDNN runs backward
    only in training mode, so dropout is off and both modules train."""
    reference, ours = make_pair(layers, bias, batch_first, bidirectional, proj_size)
    case = Case(reference, kind, with_state=with_state).to(DEVICE)
    for module in (reference, ours):
        module.dropout = 0.0
        module.train()
    reference, ours = reference.to(DEVICE), ours.to(DEVICE)
    compare(case.run(ours), case.run(reference), 1e-9)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_opcheck_layer_ops_on_gpu(variant):
    args = layer_args(device=DEVICE, **variant)
    torch.library.opcheck(OPS.lstm_layer_forward, args)
    no_grad_args = layer_args(device=DEVICE, requires_grad=False, **variant)
    output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, _ = OPS.lstm_layer_forward(
        *no_grad_args)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, _ = no_grad_args
    torch.library.opcheck(OPS.lstm_layer_backward, [
        torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x, w_ih, w_hh,
        w_hr, batch_sizes, gates, cell_prev, hidden_prev, hidden_raw, reverse,
        b_ih is not None, True, True,
    ])


@pytest.mark.parametrize("kind", ["padded", "unbatched", "packed_sorted", "packed_unsorted"])
@pytest.mark.parametrize("layers,bidirectional,proj_size,bias",
                         [(1, False, 0, True), (2, True, 4, True), (3, False, 4, False)])
def test_fp64_on_gpu_matches_cpu_reference(layers, bidirectional, proj_size, bias, kind):
    torch.manual_seed(0)
    reference = nn.LSTM(5, 7, layers, bias=bias, bidirectional=bidirectional,
                        proj_size=proj_size, dtype=torch.float64)
    ours = lstm_ext.LSTM.from_torch(reference).to(DEVICE)
    case = Case(reference, kind)
    expected = case.run(reference)
    actual = case.to(DEVICE).run(ours)
    compare({k: v.cpu() for k, v in actual.items()}, expected, 1e-10)


def test_gradcheck_on_gpu():
    module = lstm_ext.LSTM(3, 4, 2, bidirectional=True).double().to(DEVICE)
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: module(x)[0], (x,))


@requires_cuda
def test_every_kernel_runs_on_the_callers_stream():
    """The default stream is kept busy (a sleep kernel of about a second) and the side stream
    never waits for it. Forward and backward on the side stream must be complete once the side
    stream is: a kernel of ours queued on the default stream would not have run yet, and its
    output would still hold the NaN every fresh allocation is poisoned with."""
    module = lstm_ext.LSTM(16, 32, 2).cuda()
    x = torch.randn(10, 4, 16, device="cuda", requires_grad=True)
    expected = module(x)[0]
    expected_grad = torch.autograd.grad(expected.square().sum(), x)[0]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with poisoned_allocations("cuda"):
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # on the default stream
        with torch.cuda.stream(side):
            output = module(x)[0]
            grad = torch.autograd.grad(output.square().sum(), x)[0]
            results = [t.to("cpu", non_blocking=True) for t in (output, grad)]
        side.synchronize()
        torch.testing.assert_close(results[0], expected.cpu())
        torch.testing.assert_close(results[1], expected_grad.cpu())
        torch.cuda.synchronize()


@requires_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-4),
                                             (torch.float16, 1e-2), (torch.bfloat16, 4e-2)],
                         ids=str)
@pytest.mark.parametrize("hidden,batch", [(16, 1), (301, 7), (512, 16), (256, 64)])
def test_persistent_recurrence_on_gpu(monkeypatch, dtype, tolerance, hidden, batch):
    """LSTM_EXT_CUDA_PERSISTENT=1: the one-launch recurrence runs forward and backward (its
    kernels show in the profiler) and matches fp64 nn.LSTM in the outputs and every gradient,
    both directions, with hidden sizes that leave the last block fewer units."""
    monkeypatch.setenv("LSTM_EXT_CUDA_PERSISTENT", "1")
    torch.manual_seed(hidden + batch)
    reference = nn.LSTM(24, hidden, bidirectional=True, dtype=torch.float64)
    ours = lstm_ext.LSTM.from_torch(reference).to(device=DEVICE, dtype=dtype)
    reference.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    # Drawn in fp64 and rounded to dtype, so both see the same values.
    draw = lambda *shape: torch.randn(*shape, dtype=torch.float64).to(dtype).double()
    x, h0, c0 = draw(9, batch, 24), draw(2, batch, hidden), draw(2, batch, hidden)
    grads = [draw(9, batch, 2 * hidden), draw(2, batch, hidden), draw(2, batch, hidden)]

    def run(module, device, run_dtype):
        leaves = [t.to(device=device, dtype=run_dtype).requires_grad_() for t in (x, h0, c0)]
        y, (h, c) = module(leaves[0], (leaves[1], leaves[2]))
        torch.autograd.backward([y, h, c], [g.to(device=device, dtype=run_dtype) for g in grads])
        return [y, h, c, *(t.grad for t in leaves), *(p.grad for p in module.parameters())]

    if os.environ.get("LSTM_EXT_TEST_NO_PROFILER") == "1":  # under compute-sanitizer
        got = run(ours, DEVICE, dtype)
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            got = run(ours, DEVICE, dtype)
            torch.cuda.synchronize()
        kernels = " ".join(event.key for event in prof.key_averages())
        assert "persistent_forward_kernel" in kernels and "persistent_backward_kernel" in kernels
    want = run(reference, "cpu", torch.float64)
    for index, (g, w) in enumerate(zip(got, want)):
        assert rel_error(g.cpu(), w) <= tolerance, index


@requires_cuda
def test_persistent_recurrence_default_and_switch(monkeypatch):
    """Unset, LSTM_EXT_CUDA_PERSISTENT picks the persistent kernels where an H200 measured them
    faster (sm_90; B <= 16; forward to H 512, backward to H 256); 0 turns them off, 1 on;
    any other value is refused with what to set."""
    def kernels(hidden, batch, value):
        if value is None:
            monkeypatch.delenv("LSTM_EXT_CUDA_PERSISTENT", raising=False)
        else:
            monkeypatch.setenv("LSTM_EXT_CUDA_PERSISTENT", value)
        module = lstm_ext.LSTM(8, hidden).to(DEVICE)
        x = torch.randn(3, batch, 8, device=DEVICE)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            module(x)[0].sum().backward()
            torch.cuda.synchronize()
        names = " ".join(event.key for event in prof.key_averages())
        return "persistent_forward_kernel" in names, "persistent_backward_kernel" in names

    if torch.cuda.get_device_capability() == (9, 0):
        assert kernels(256, 16, None) == (True, True)
        assert kernels(512, 16, None) == (True, False)
        assert kernels(256, 17, None) == (False, False)
    else:
        assert kernels(256, 16, None) == (False, False)
    assert kernels(256, 16, "0") == (False, False)
    assert kernels(1024, 64, "1") == (True, True)
    with pytest.raises(RuntimeError, match="LSTM_EXT_CUDA_PERSISTENT must be 0"):
        kernels(256, 16, "yes")


@pytest.mark.parametrize("tf32", [False, True], ids=["tf32 off", "tf32 on"])
def test_fp32_outputs_and_gradients_against_fp64(tf32):
    """fp32 on the device against fp64 nn.LSTM, packed, bidirectional, with a projection:
    outputs and every gradient. TF32 (10-bit mantissa products) gets its own bound."""
    if tf32 and DEVICE != "cuda":
        pytest.skip("TF32 is a CUDA setting")
    reference64, _ = make_pair(2, True, False, True, 8, hidden_size=32, input_size=16)
    ours = lstm_ext.LSTM.from_torch(reference64).float().to(DEVICE)
    case = Case(reference64, "packed_unsorted", steps=20, batch=6)
    exact = case.run(reference64)
    with matmul_tf32(tf32) if DEVICE == "cuda" else contextlib.nullcontext():
        result = case.to(DEVICE).run(ours, dtype=torch.float32)
    compare({k: v.cpu() for k, v in result.items()}, exact, 1e-2 if tf32 else 1e-4)


def test_lstmcell_on_the_device_matches_nn_lstmcell_fp64():
    torch.manual_seed(7)
    reference = nn.LSTMCell(8, 16, dtype=torch.float64)
    ours = lstm_ext.LSTMCell.from_torch(reference).to(DEVICE)
    x = torch.randn(5, 8, dtype=torch.float64)
    state = (torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64))
    results = []
    for module, device in ((reference, "cpu"), (ours, DEVICE)):
        # Fresh leaves each time: requires_grad_ on x itself would make the device copy a
        # non-leaf (no .grad), and on the CPU would share one .grad between both runs.
        leaves = [t.detach().clone().to(device).requires_grad_() for t in (x, *state)]
        h, c = module(leaves[0], tuple(leaves[1:]))
        (h.sin().sum() + c.cos().sum()).backward()
        results.append([h, c, *(t.grad for t in leaves),
                        *(p.grad for p in module.parameters())])
        module.zero_grad(set_to_none=True)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)


@requires_cuda
@pytest.mark.parametrize("module_type", ["LSTM", "LSTMCell"])
def test_tensors_on_different_devices_are_refused_like_nn(module_type):
    torch.manual_seed(0)
    reference = getattr(nn, module_type)(4, 6).cuda()
    ours = getattr(lstm_ext, module_type).from_torch(reference)
    shape = (3, 2, 4) if module_type == "LSTM" else (2, 4)
    state_shape = (1, 2, 6) if module_type == "LSTM" else (2, 6)
    calls = {
        "input on the CPU": lambda m: m(torch.randn(*shape)),
        "state on the CPU": lambda m: m(torch.randn(*shape, device="cuda"),
                                        (torch.randn(*state_shape), torch.randn(*state_shape))),
    }
    for name, call in calls.items():
        with pytest.raises(Exception) as theirs:
            call(reference)
        with pytest.raises(Exception) as mine:
            call(ours)
        assert type(mine.value) is type(theirs.value), (name, mine.value, theirs.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_on_gpu_against_fp64(dtype):
    """fp32 math and fp32 cell state for bf16/fp16 storage: within 2e-2 of fp64 on the same
    rounded values."""
    torch.manual_seed(1)
    reference = nn.LSTM(16, 32, 2, bidirectional=True, dtype=torch.float64)
    low = lstm_ext.LSTM.from_torch(reference).to(device=DEVICE, dtype=dtype)
    reference.load_state_dict({k: v.double().cpu() for k, v in low.state_dict().items()})
    case = Case(reference, "padded", steps=20, batch=6)
    case.leaves = [t.to(dtype).double() for t in case.leaves]
    case.state = [t.to(dtype).double() for t in case.state]
    result = case.to(DEVICE).run(low, dtype=dtype)
    compare({k: v.cpu() for k, v in result.items()}, case.run(reference), 2e-2)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cuda_runs_in_the_requested_dtype(dtype):
    module = lstm_ext.LSTM(16, 32).to(DEVICE)
    x = torch.randn(5, 3, 16, device=DEVICE, requires_grad=True)
    reference = module.to_torch()
    with torch.autocast("cuda", dtype=dtype):
        output, (h, c) = module(x)
        expected, (expected_h, expected_c) = reference(x)
    # Ours runs in the dtype asked for. nn.LSTM on cuDNN (torch 2.11, H200) returns fp16 under
    # bf16 autocast, so its dtype is not compared; its values are, to bf16's rounding.
    assert output.dtype == h.dtype == c.dtype == dtype
    assert expected.dtype in (dtype, torch.float16)
    for got, want in ((output, expected), (h, expected_h), (c, expected_c)):
        assert rel_error(got, want) <= 2e-2
    output.float().sum().backward()
    assert x.grad.dtype == torch.float32 and module.weight_ih_l0.grad.dtype == torch.float32


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lstmcell_under_cuda_autocast_runs_in_the_requested_dtype_like_nn_lstmcell(dtype):
    """aten::lstm_cell is on CUDA autocast's list: nn.LSTMCell returns the autocast dtype there,
    and so does ours (on the CPU both stay fp32, test_cell.py)."""
    reference = nn.LSTMCell(16, 32).to(DEVICE)
    ours = lstm_ext.LSTMCell.from_torch(reference)
    x = torch.randn(3, 16, device=DEVICE)
    with torch.autocast("cuda", dtype=dtype):
        theirs, mine = reference(x), ours(x)
    assert [t.dtype for t in mine] == [t.dtype for t in theirs] == [dtype, dtype]
    torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2)


@contextlib.contextmanager
def matmul_tf32(enabled):
    """torch.backends.cuda.matmul.allow_tf32 set for a block. (pytest's monkeypatch cannot undo
    this setting: it lives behind the module's __getattr__/__setattr__.)"""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@requires_cuda
def test_fp32_honours_allow_tf32():
    """TF32 off: fp32 accuracy. On: the matmuls really run in TF32 (10-bit mantissa), which
    shows as a much larger error, as nn.LSTM's own matmuls would."""
    torch.manual_seed(2)
    reference = nn.LSTM(256, 256, dtype=torch.float64)
    ours = lstm_ext.LSTM.from_torch(reference).float().cuda()
    x = torch.randn(30, 8, 256, dtype=torch.float64)
    expected = reference(x)[0]
    errors = {}
    for tf32 in (False, True):
        with matmul_tf32(tf32):
            errors[tf32] = rel_error(ours(x.float().cuda())[0].cpu(), expected)
    assert errors[False] <= 1e-5
    assert errors[True] <= 5e-3
    assert errors[True] > 4 * errors[False], f"TF32 setting ignored: errors {errors}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_every_op_output_element_is_written(variant, dtype):
    check_every_output_element_written(variant, DEVICE, dtype)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("layout", WEIGHT_LAYOUTS)
def test_layer_op_takes_weights_of_any_layout_on_gpu(layout, dtype, tolerance):
    """Sliced and transposed weights: at::mm takes them, copied once if cuBLAS cannot."""
    with matmul_tf32(False):
        check_weights_of_any_layout(layout, DEVICE, dtype, tolerance)


@pytest.mark.parametrize("packed", [False, True])
def test_every_module_output_element_is_written(packed):
    module = lstm_ext.LSTM(16, 32, 2, bidirectional=True, proj_size=8).to(DEVICE)
    with poisoned_allocations(DEVICE):
        if packed:
            leaves = [torch.randn(n, 16, device=DEVICE, requires_grad=True) for n in (12, 9, 4)]
            output, (h, c) = module(torch.nn.utils.rnn.pack_sequence(leaves))
            output = output.data
        else:
            leaves = [torch.randn(12, 5, 16, device=DEVICE, requires_grad=True)]
            output, (h, c) = module(leaves[0])
        (output.sum() + h.sum() + c.sum()).backward()
    grads = [x.grad for x in leaves] + [p.grad for p in module.parameters()]
    for tensor in [output, h, c, *grads]:
        assert not tensor.isnan().any()


@requires_cuda
def test_cuda_graph_capture_and_replay():
    module = lstm_ext.LSTM(16, 32, 2).cuda().eval()
    static_x = torch.randn(10, 4, 16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            module(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_output, _ = module(static_x)
    fresh = torch.randn_like(static_x)
    static_x.copy_(fresh)
    graph.replay()
    with torch.no_grad():
        expected, _ = module(fresh)
    torch.testing.assert_close(static_output, expected)


@requires_cuda
def test_cuda_graph_capture_of_a_training_step():
    """Forward and backward captured with make_graphed_callables and replayed on a fresh input
    give eager's outputs and gradients."""
    torch.manual_seed(3)
    module = lstm_ext.LSTM(16, 32, 2).to(DEVICE)
    eager = copy.deepcopy(module)
    sample = torch.randn(10, 4, 16, device=DEVICE, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(module, (sample,))
    x = torch.randn(10, 4, 16, device=DEVICE)
    results = []
    for run, parameters in ((graphed, module.parameters), (eager, eager.parameters)):
        leaf = x.clone().requires_grad_()
        output, (h, c) = run(leaf)
        (output.square().sum() + h.sum() + c.sum()).backward()
        results.append([output, h, c, leaf.grad, *(p.grad for p in parameters())])
    for graphed_result, eager_result in zip(*results):
        torch.testing.assert_close(graphed_result, eager_result)


def test_compile_on_gpu():
    module = lstm_ext.LSTM(16, 32, 2, dropout=0.2).to(DEVICE).eval()
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(10, 4, 16, device=DEVICE)
    torch.testing.assert_close(compiled(x)[0], module(x)[0], rtol=1e-5, atol=1e-5)


def test_eval_mode_backward_and_double_backward_on_gpu():
    """cuDNN refuses both; ours gives them."""
    module = lstm_ext.LSTM(3, 4, 2).double().to(DEVICE).eval()
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: module(x)[0], (x,))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_gpu():
    module = lstm_ext.LSTM(8, 16).double().to("cuda:1")
    reference = module.to_torch().cpu()
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(module(x.to("cuda:1"))[0].cpu(), reference(x)[0])


def test_language_model_driver_on_gpu(corpus_file, tmp_path):
    """The lstm-ext driver trains on the GPU: in fp64 without dropout, ext and torch (cuDNN)
    give the same losses step for step; under bf16 autocast ext trains to finite losses."""
    runs = {}
    for impl in ("ext", "torch"):
        lm_train.train(tiny_config(corpus_file, tmp_path / impl, impl=impl, dropout=0.0,
                                   precision="fp64", max_steps=12, eval_every=1, device=DEVICE))
        runs[impl] = metrics(tmp_path / impl)
    assert len(runs["ext"]) == 12
    for ours, theirs in zip(runs["ext"], runs["torch"]):
        for key in ("train_loss", "valid_loss"):
            assert abs(ours[key] - theirs[key]) <= 1e-10 * abs(theirs[key]), (ours, theirs)
    lm_train.train(tiny_config(corpus_file, tmp_path / "bf16", precision="bf16", max_steps=20,
                               eval_every=10, device=DEVICE))
    records = metrics(tmp_path / "bf16")
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["valid_loss"]))
                                     for r in records)
