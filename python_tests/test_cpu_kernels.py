"""The CPU kernels themselves: each instruction-set variant (forced with LSTM_EXT_CPU_ISA)
against an fp64 nn.LSTM, the fused recurrence against the step-by-step path, and the parallel
recurrence with every thread count giving the same bits."""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lstm_ext
from conftest import (Case, compare, load_benchmark_script, rel_error, relayout,
                      separate_products, values_for)

OPS = torch.ops.lstm_ext
ISAS = ["amx", "avx512_bf16", "avx512", "avx2", "baseline"]

# Shapes that reach every edge of the recurrence's blocking: H = 1, H not a multiple of any
# vector width, H a multiple of the backward block (W_hh read in place), rows more than one
# micro-kernel tile, packed sequences of unequal length, both directions; and a projection
# (projected_recurrence.cpp) of more than one block of projected units in every variant (70
# of them: blocks of 16 to 64), the last block partial, as is the last of 100 hidden units.
CONFIGS = [
    dict(input_size=3, hidden_size=1, num_layers=1, bidirectional=False),
    dict(input_size=5, hidden_size=17, num_layers=2, bidirectional=True),
    dict(input_size=7, hidden_size=64, num_layers=1, bidirectional=True),
    dict(input_size=9, hidden_size=130, num_layers=1, bidirectional=False),
    dict(input_size=6, hidden_size=100, num_layers=2, bidirectional=True, proj_size=70),
]
# Batches above 4 rows run the panel micro-kernel, up to 4 the dot products on W_hh in place.
KINDS = [("padded", 13), ("packed_unsorted", 11), ("padded", 1), ("packed_unsorted", 4)]
# And where H is whole AMX tile products (H 64): 37 rows of unequal length, more than one
# 16-row tile in some steps and fewer in others. (At H 1, bf16 sums over this many rows cancel
# to where 2e-2 no longer holds, in every variant.)
WIDE_KINDS = [("packed_unsorted", 37)]
# bf16 against fp64 on the same bf16-rounded inputs and weights: the kernels keep gate math and
# the cell in fp32, leaving bf16 rounding of h, the gates and the outputs (3e-3 to 1.5e-2 here).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}

VARIANT_SCRIPT = r"""
import json, sys
import torch
from torch import nn
import lstm_ext
sys.path.insert(0, sys.argv[1])
from conftest import Case, rel_error
from test_cpu_kernels import CONFIGS, KINDS, WIDE_KINDS

try:
    isa = torch.ops.lstm_ext.cpu_isa()
except RuntimeError as error:
    print(json.dumps({"error": str(error)}))
    sys.exit(0)
torch.manual_seed(0)
errors = {}
for index, config in enumerate(CONFIGS):
    for kind, batch in KINDS + (WIDE_KINDS if config["hidden_size"] >= 64 else []):
        reference = nn.LSTM(**config, dtype=torch.float64)
        case = Case(reference, kind, steps=6, batch=batch)
        expected = case.run(reference)
        for dtype in (torch.float64, torch.float32):
            ours = lstm_ext.LSTM.from_torch(reference).to(dtype)
            actual = case.run(ours, dtype)
            worst = max(rel_error(actual[k], expected[k]) for k in expected)
            errors[f"{index} {kind} {batch} {dtype}"] = worst
        # bf16: the reference runs on the same bf16-rounded weights, inputs and states.
        with torch.no_grad():
            for parameter in reference.parameters():
                parameter.copy_(parameter.to(torch.bfloat16))
        case.leaves = [t.to(torch.bfloat16).double() for t in case.leaves]
        case.state = [t.to(torch.bfloat16).double() for t in case.state]
        expected = case.run(reference)
        ours = lstm_ext.LSTM.from_torch(reference).to(torch.bfloat16)
        actual = case.run(ours, torch.bfloat16)
        worst = max(rel_error(actual[k], expected[k]) for k in expected)
        errors[f"{index} {kind} {batch} {torch.bfloat16}"] = worst
print(json.dumps({"isa": isa, "errors": errors}))
"""


def dtype_of(name):
    return next(d for d in TOLERANCE if str(d) in name.split()[-1:])


def run_variant(isa, extra_env=None):
    env = dict(os.environ, LSTM_EXT_CPU_ISA=isa, **(extra_env or {}))
    # Run from the tests' folder, so that `import lstm_ext` finds the installed package (as the
    # suite does), not a source folder without the compiled library.
    here = os.path.dirname(os.path.abspath(__file__))
    completed = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT, here], env=env, cwd=here,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_reported_isa_is_a_known_one():
    forced = os.environ.get("LSTM_EXT_CPU_ISA")
    assert OPS.cpu_isa() == (forced or OPS.cpu_isa())
    assert OPS.cpu_isa() in ISAS


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_variant_matches_fp64_nn_lstm(isa):
    result = run_variant(isa)
    if "error" in result:
        assert "lacks" in result["error"], result["error"]
        pytest.skip(f"this CPU cannot run {isa}: {result['error']}")
    assert result["isa"] == isa
    for name, error in result["errors"].items():
        assert error <= TOLERANCE[dtype_of(name)], (isa, name, error)


def test_unknown_isa_name_is_refused_with_the_choices():
    result = run_variant("sse9")
    assert "amx, avx512_bf16, avx512, avx2 or" in result["error"]


def test_fused_recurrence_matches_the_step_loop():
    """LSTM_EXT_CPU_RECURRENCE=0 runs the old per-step GEMM path; both against fp64."""
    fused = run_variant(OPS.cpu_isa())
    stepwise = run_variant(OPS.cpu_isa(), {"LSTM_EXT_CPU_RECURRENCE": "0"})
    assert fused["errors"].keys() == stepwise["errors"].keys()
    for name in fused["errors"]:
        assert fused["errors"][name] <= TOLERANCE[dtype_of(name)]
        assert stepwise["errors"][name] <= TOLERANCE[dtype_of(name)]


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_whole_sequence_products_through_either_library(onednn):
    """The input projection, dx and dW go through torch's oneDNN or ATen (MKL) depending on the
    CPU's vendor (and with it whether the backward recurrence writes the gate gradients'
    transposed copy for dW, which only oneDNN's fp32 route wants); both routes, forced, against
    fp64, whatever this machine would pick. Forced, neither leaves dx or dW to the panel
    products that take them off Intel otherwise (the variant tests above run those)."""
    result = run_variant(OPS.cpu_isa(), {"LSTM_EXT_ONEDNN_LINEAR": onednn})
    for name, error in result["errors"].items():
        assert error <= TOLERANCE[dtype_of(name)], (onednn, name, error)


def layer_call(dtype, hidden=130, batch=37, steps=6, input_size=11, reverse=False, proj=0):
    generator = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    batch_sizes = torch.tensor([int((lengths > t).sum()) for t in range(steps)])
    rows = int(batch_sizes.sum())
    state = proj or hidden
    return [rand(rows, input_size), rand(batch, state), rand(batch, hidden),
            rand(4 * hidden, input_size) / 3, rand(4 * hidden, state) / 10, rand(4 * hidden),
            rand(4 * hidden), rand(proj, hidden) / 10 if proj else None, batch_sizes, reverse,
            True]


def forward_and_backward(args):
    forward = OPS.lstm_layer_forward(*args)
    output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, _ = forward
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, _ = args
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype)
             for t in (output, h_n, c_n)]
    backward = OPS.lstm_layer_backward(*grads, x, w_ih, w_hh, w_hr, batch_sizes, gates,
                                       cell_prev, hidden_prev, hidden_raw, reverse, True, True,
                                       True)
    return forward[:6] + backward[:6]


def check_same_bits_on_any_thread_count(args, dtype, exact=(0, 1, 2, 3, 4, 5, 7, 8)):
    """The layer ops on `args` with 1, 2, 3 and 5 threads: the per-step results (output, h_n,
    c_n, gates, cell_prev, hidden_prev; grad_h0, grad_c0) bit-identical, and every result near
    fp64 (dW and dx come from whole-sequence GEMMs whose own blocking may follow the thread
    count, so those are only compared with fp64)."""
    previous = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results[threads] = forward_and_backward(args)
    finally:
        torch.set_num_threads(previous)
    for threads in (2, 3, 5):
        for index in exact:
            assert torch.equal(results[threads][index], results[1][index]), (threads, index)
    reference = forward_and_backward([a.double() if isinstance(a, torch.Tensor) and
                                      a.is_floating_point() else a for a in args])
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for index in range(11):
        assert rel_error(results[1][index], reference[index]) <= tolerance, index


@pytest.mark.parametrize("hidden", [130, 128])
@pytest.mark.parametrize("batch", [37, 3])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_thread_count_gives_the_same_bits(dtype, reverse, batch, hidden):
    """The recurrence splits the hidden units over threads; each unit is computed by one
    thread with the same code whatever the split, so the recurrence's outputs (h, c, the saved
    gates and the gate gradients) are bit-identical for 1, 2, 3 and 5 threads, and near fp64
    (H 128 is whole AMX tile products, H 130 is not)."""
    args = layer_call(dtype, reverse=reverse, batch=batch, hidden=hidden)
    check_same_bits_on_any_thread_count(args, dtype)


@pytest.mark.parametrize("batch", [37, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_a_single_step_gives_the_same_bits_on_any_thread_count(dtype, batch):
    """A single step (an LSTMCell call) reads the weights in place, forward and backward, with
    the hidden units split over threads as in a sequence: the same bits for 1, 2, 3 and 5
    threads, near fp64. H 160: the backward's last block of units partly filled."""
    args = layer_call(dtype, batch=batch, hidden=160, steps=1)
    check_same_bits_on_any_thread_count(args, dtype)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_every_thread_count_gives_the_same_bits_with_a_projection(dtype, reverse):
    """With a projection the recurrence splits the hidden units over threads for the cells and
    the projected units for the products with W_hr (and, backward, with W_hh); each value is
    still one thread's, made by the same code whatever the split: 1, 2, 3 and 5 threads give
    the same bits, near fp64. 150 projected units are several blocks of them, the last
    partial."""
    args = layer_call(dtype, reverse=reverse, batch=37, hidden=200, proj=150)
    check_same_bits_on_any_thread_count(args, torch.float32)


@pytest.mark.parametrize("hidden", [128, 130])
@pytest.mark.parametrize("lengths", [[5] * 32, [5] * 16 + [3] * 16], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_weight_gradients_from_the_streamed_transposed_gradients_match_fp64(dtype, lengths,
                                                                             hidden):
    """Where the gate gradients' transposed copy is whole aligned cache lines (N rows a
    multiple of 16, 16 or more rows a step for fp32, 32 for two-byte types, whole blocks of
    units: 128 units are all whole blocks, 130 leave a partial one), the backward streams it
    around the caches (recurrence.h's transpose_columns; bf16 and fp16 as pairs of rows, the
    packed case's 16-row steps one value at a time); the weight and bias gradients are products
    of it. bf16 and fp16 against fp64 on the same rounded values, within 2u as in
    test_module_parity.py's low-precision test."""
    torch.manual_seed(11)
    reference = nn.LSTM(7, hidden, dtype=torch.float64)
    ours = lstm_ext.LSTM.from_torch(reference).to(dtype)
    reference.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    leaves = [torch.randn(n, 7, dtype=torch.float64).to(dtype).double() for n in lengths]
    outputs = []
    for module, cast in ((reference, torch.float64), (ours, dtype)):
        packed = nn.utils.rnn.pack_sequence([t.to(cast) for t in leaves], enforce_sorted=False)
        output, (h_n, c_n) = module(packed)
        weights = torch.randn_like(output.data, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(2))
        ((output.data.double() * weights).sum() + h_n.double().sum() + c_n.double().sum()
         ).backward()
        outputs.append([p.grad for p in module.parameters()])
    low_precision = dtype in (torch.bfloat16, torch.float16)
    bound = torch.finfo(dtype).eps if low_precision else TOLERANCE[dtype]  # eps = 2u
    for wanted, actual in zip(*outputs):
        assert rel_error(actual.double(), wanted) <= bound


def test_results_do_not_share_the_kept_scratch_memory():
    """The backward keeps its large temporaries across calls (csrc/cpu/workspace.h); nothing it
    returns may live there, or the next call would overwrite the previous call's gradients."""
    first_args = layer_call(torch.float32)
    first = forward_and_backward(first_args)
    kept = [t.clone() for t in first]
    second_args = layer_call(torch.float32, batch=29, hidden=130)
    second_args[0] = second_args[0] * 3  # other data, same sizes as far as they can be
    forward_and_backward(second_args)
    for index, (now, before) in enumerate(zip(first, kept)):
        assert torch.equal(now, before), index


def test_inference_results_do_not_share_the_kept_scratch_memory():
    """An inference forward writes its input projection into kept memory (workspace.h): a
    second call, of other sizes and data, leaves the first call's outputs as they were, and
    each is right (two layers and both directions ask for that memory four times a call)."""
    torch.manual_seed(3)
    reference = nn.LSTM(9, 24, num_layers=2, bidirectional=True, dtype=torch.float64).eval()
    ours = lstm_ext.LSTM.from_torch(reference).eval()
    first_input = torch.randn(7, 5, 9, dtype=torch.float64)
    second_input = torch.randn(11, 3, 9, dtype=torch.float64) * 3
    with torch.no_grad():
        first = ours(first_input)
        kept = (first[0].clone(), first[1][0].clone(), first[1][1].clone())
        second = ours(second_input)
        for now, before in zip((first[0], *first[1]), kept):
            assert torch.equal(now, before)
        for inputs, result in ((first_input, first), (second_input, second)):
            expected, (h_ref, c_ref) = reference(inputs)
            for actual, wanted in ((result[0], expected), (result[1][0], h_ref),
                                   (result[1][1], c_ref)):
                assert rel_error(actual, wanted) <= 1e-10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_forward_does_not_fault_in_fresh_pages_for_its_input_projection(training):
    """A fresh allocation of 64 MB comes as pages the OS zeroes on first touch (workspace.h).
    The input projection (T B x 4H: here 64 MB in fp64, over glibc's largest mmap threshold, so
    never recycled by malloc) is kept memory instead: a workspace slot under no_grad, and in
    training the saved buffer that becomes the gates saved for the backward, which the next
    forward gets again once the last one's graph is gone (the output is kept memory too: see
    the next test). fp64, whose product always writes into given memory (fp32 on a non-Intel
    CPU goes through oneDNN, which allocates its own)."""
    import resource

    torch.manual_seed(5 if training else 4)
    model = lstm_ext.LSTM(16, 256, dtype=torch.float64).train(training)
    inputs = torch.randn(128, 64, 16, dtype=torch.float64)
    pages = 128 * 64 * 4 * 256 * 8 // 4096
    with torch.set_grad_enabled(training):
        for _ in range(2):
            model(inputs)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            output, _ = model(inputs)
            assert output.requires_grad == training
            del output
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    assert faults < pages / 2, (faults, pages)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
def test_training_step_results_come_in_kept_memory():
    """A training loop drops each step's output and gradients by the next step, so the layer
    hands them out in kept memory (workspace.h's saved buffers): the output (40 MB here, over
    glibc's largest mmap threshold, so never recycled by malloc), dx and dW fault in no fresh
    pages once the loop runs, and each step's values are still right (fp64 against nn.LSTM;
    fp64, whose products write into given memory on any CPU)."""
    import resource

    torch.manual_seed(6)
    steps, batch, inputs, hidden = 80, 256, 16, 256
    reference = nn.LSTM(inputs, hidden, dtype=torch.float64)
    model = lstm_ext.LSTM.from_torch(reference)
    output_pages = steps * batch * hidden * 8 // 4096

    def step(module, x, weights):
        module.zero_grad(set_to_none=True)
        x.grad = None
        output, _ = module(x)
        output.backward(weights)  # a held gradient, so the loss allocates nothing itself
        return output.detach(), x.grad, [p.grad for p in module.parameters()]

    data = [(torch.randn(steps, batch, inputs, dtype=torch.float64, requires_grad=True),
             torch.randn(steps, batch, hidden, dtype=torch.float64)) for _ in range(2)]
    for x, weights in data:
        step(model, x, weights)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        for x, weights in data:
            results = step(model, x, weights)
            del results
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6
    assert faults < output_pages / 8, (faults, output_pages)
    for x, weights in data:
        ours = step(model, x, weights)
        expected = step(reference, x, weights)
        for actual, wanted in zip((ours[0], ours[1], *ours[2]),
                                  (expected[0], expected[1], *expected[2])):
            assert rel_error(actual, wanted) <= 1e-10


@pytest.mark.parametrize("config", CONFIGS,
                         ids=lambda c: f"H{c['hidden_size']}P{c.get('proj_size', 0)}")
@pytest.mark.parametrize("kind,batch", KINDS)
def test_inference_without_grad_matches_fp64_nn_lstm(config, kind, batch):
    """Under no_grad the recurrence saves nothing for backward (its own branch, and for small
    batches the dot-product form); its outputs and final states against fp64 nn.LSTM."""
    torch.manual_seed(1)
    reference = nn.LSTM(**config, dtype=torch.float64).eval()
    case = Case(reference, kind, steps=6, batch=batch)
    with torch.no_grad():
        input, state, _ = case.inputs()
        expected, (h_ref, c_ref) = reference(input, tuple(state))
        for dtype in (torch.float64, torch.float32):
            ours = lstm_ext.LSTM.from_torch(reference).to(dtype).eval()
            input, state, _ = case.inputs(dtype)
            output, (h_n, c_n) = ours(input, tuple(state))
            for actual, wanted in ((output, expected), (h_n, h_ref), (c_n, c_ref)):
                actual = actual.data if hasattr(actual, "batch_sizes") else actual
                wanted = wanted.data if hasattr(wanted, "batch_sizes") else wanted
                assert rel_error(actual, wanted) <= TOLERANCE[dtype], (dtype, kind)


# Even input sizes, as bf16 inference needs to multiply x in the recurrence's pair panels
# (avx512_bf16): H 18 ends in a partial block, H 64 is whole blocks, H 130 both; two layers
# feed the second one the first's output, both directions read x backwards too.
EVEN_CONFIGS = [
    dict(input_size=6, hidden_size=18, num_layers=2, bidirectional=True),
    dict(input_size=8, hidden_size=64, num_layers=1, bidirectional=True),
    dict(input_size=10, hidden_size=130, num_layers=1, bidirectional=False),
]


def rounded_to_bf16(reference, kind, batch):
    """A case of 6 steps for the fp64 `reference` with its weights, inputs and states rounded
    to bf16 (kept in fp64), and our bf16 copy of the reference."""
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(torch.bfloat16))
    case = Case(reference, kind, steps=6, batch=batch)
    case.leaves = [t.to(torch.bfloat16).double() for t in case.leaves]
    case.state = [t.to(torch.bfloat16).double() for t in case.state]
    return case, lstm_ext.LSTM.from_torch(reference).to(torch.bfloat16)


def bf16_inference(reference, kind, batch):
    """(ours, expected) outputs and final states of a bf16 inference forward, against fp64
    nn.LSTM on the same bf16-rounded weights, inputs and states."""
    case, ours = rounded_to_bf16(reference, kind, batch)
    ours.eval()
    with torch.no_grad():
        input, state, _ = case.inputs()
        expected, (h_ref, c_ref) = reference(input, tuple(state))
        input, state, _ = case.inputs(torch.bfloat16)
        output, (h_n, c_n) = ours(input, tuple(state))
    unpack = lambda t: t.data if hasattr(t, "batch_sizes") else t  # noqa: E731
    return [unpack(t) for t in (output, h_n, c_n)], [unpack(t) for t in (expected, h_ref, c_ref)]


@pytest.mark.parametrize("config", EVEN_CONFIGS, ids=lambda c: f"H{c['hidden_size']}")
@pytest.mark.parametrize("kind,batch", KINDS + WIDE_KINDS)
def test_bf16_inference_with_the_input_projection_fused_matches_fp64(config, kind, batch):
    """bf16 inference multiplies x by W_ih inside the recurrence, in the same tiles as h by
    W_hh, with the biases added in the gate math (under avx512_bf16; the separate projection
    elsewhere): outputs and final states against fp64 nn.LSTM, in every layout."""
    torch.manual_seed(5)
    reference = nn.LSTM(**config, dtype=torch.float64).eval()
    actual, expected = bf16_inference(reference, kind, batch)
    for got, wanted in zip(actual, expected):
        assert rel_error(got, wanted) <= TOLERANCE[torch.bfloat16], (kind, batch)


@pytest.mark.parametrize("config", EVEN_CONFIGS, ids=lambda c: f"H{c['hidden_size']}")
@pytest.mark.parametrize("kind,batch", KINDS + WIDE_KINDS)
def test_bf16_training_with_the_input_projection_fused_matches_fp64(config, kind, batch):
    """bf16 training multiplies x by W_ih inside the recurrence too (under avx512_bf16), and
    the activations it saves for the backward are written there, never read: outputs, final
    states and every gradient against fp64 nn.LSTM, in every layout."""
    torch.manual_seed(8)
    reference = nn.LSTM(**config, dtype=torch.float64)
    case, ours = rounded_to_bf16(reference, kind, batch)
    expected = case.run(reference)
    actual = case.run(ours, torch.bfloat16)
    for name in expected:
        assert rel_error(actual[name], expected[name]) <= TOLERANCE[torch.bfloat16], name


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_inference_gives_the_same_bits_on_any_thread_count(bias):
    """Each hidden unit of the fused bf16 inference is one thread's, computed by the same code
    whatever the split: bit-identical outputs for 1, 2, 3 and 5 threads."""
    torch.manual_seed(6)
    reference = nn.LSTM(32, 130, bias=bias, bidirectional=True, dtype=torch.float64).eval()
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            torch.manual_seed(7)
            results.append(bf16_inference(reference, "packed_unsorted", 37)[0])
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            assert torch.equal(got, first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_loops_elementwise_tasks_give_the_same_bits_on_any_thread_count(dtype,
                                                                                monkeypatch):
    """In the step loop (forced here; bf16 with a projection takes it anyway) the elementwise
    passes split each step's rows into tasks of 16384 / H rows (csrc/cpu/lstm_cpu.cpp): at H
    256 that is 64 rows, so a batch of 200 makes 4 tasks per step, run by 1, 2, 3 or 5
    threads. Every row is one task's own,
    so the answers must be bit-identical, and near fp64. In bf16 only the forward's: the
    backward's per-step products with W_hh go through torch's bf16 GEMM, which on AMX splits
    their sums by thread count, and every gradient of the state flows through them."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "0")
    args = layer_call(dtype, hidden=256, batch=200, steps=5, input_size=16)
    generator = torch.Generator().manual_seed(11)
    args[1] = torch.randn(200, 64, generator=generator, dtype=torch.float64).to(dtype)
    args[4] = (torch.randn(4 * 256, 64, generator=generator, dtype=torch.float64) / 8).to(dtype)
    args[7] = (torch.randn(64, 256, generator=generator, dtype=torch.float64) / 16).to(dtype)
    exact = (0, 1, 2, 3, 4, 5, 7, 8) if dtype == torch.float32 else (0, 1, 2, 3, 4, 5)
    check_same_bits_on_any_thread_count(args, dtype, exact)



@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3, 4, 5, 8, 13, 32, 40, 64, 65])
@pytest.mark.parametrize("hidden", [20, 64, 256])
def test_decode_steps_match_fp64_nn_lstm(hidden, batch, bias):
    """One step at a time in inference with the state carried (generation): up to 64 rows the
    recurrence reads the weights in place and multiplies x by W_ih itself in the same pass as
    W_hh (no separate input projection), up to 4 rows by dot products and above that (under
    AVX-512) by broadcasts into columns of the rows: two values of k per row in a vector up to
    8 rows, then one to four vectors of rows (fp64: up to 32 rows, dot products above); from 65
    rows it packs panels and the projection comes first. Both against fp64 nn.LSTM, over steps
    whose inputs are slices of one larger tensor (rows not contiguous with each other). At H 256
    (over 1 MB of weights) the step runs on two threads, below on one."""
    generator = torch.Generator().manual_seed(5)
    reference = nn.LSTM(7, hidden, 2, bias=bias, dtype=torch.float64).eval()
    inputs = torch.randn(6, batch, 9, generator=generator, dtype=torch.float64)[..., 1:8]
    state = tuple(torch.randn(2, batch, hidden, generator=generator, dtype=torch.float64)
                  for _ in range(2))
    with torch.no_grad():
        for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            ours = lstm_ext.LSTM.from_torch(reference).to(dtype).eval()
            expected_state, actual_state = state, tuple(s.to(dtype) for s in state)
            for t in range(inputs.shape[0]):
                x = inputs[t:t + 1]
                expected, expected_state = reference(x, expected_state)
                actual, actual_state = ours(x.to(dtype), actual_state)
                for a, e in ((actual, expected), *zip(actual_state, expected_state)):
                    assert rel_error(a, e) <= tolerance, (dtype, t)


@pytest.mark.parametrize("batch", [5, 32, 64, 65])
@pytest.mark.parametrize("hidden", [40, 256])
def test_single_training_steps_match_fp64_nn_lstm_cell(hidden, batch):
    """One step with gradients (an LSTMCell call): up to 64 rows the forward reads the weights
    in place and the backward's product is the step loop's, from 65 rows both pack panels.
    Outputs and every gradient against fp64 nn.LSTMCell, in fp64 and fp32."""
    generator = torch.Generator().manual_seed(6)
    reference = nn.LSTMCell(7, hidden, dtype=torch.float64)
    x, h, c, grad_h, grad_c = (
        torch.randn(batch, size, generator=generator, dtype=torch.float64)
        for size in (7, hidden, hidden, hidden, hidden))

    def run(cell, dtype):
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (x, h, c)]
        outputs = cell(inputs[0], (inputs[1], inputs[2]))
        torch.autograd.backward(outputs, [grad_h.to(dtype), grad_c.to(dtype)])
        return [*outputs, *(t.grad for t in inputs), *(p.grad for p in cell.parameters())]

    expected = run(reference, torch.float64)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        ours = lstm_ext.LSTMCell(7, hidden, dtype=dtype)
        ours.load_state_dict(reference.state_dict())
        for index, (a, e) in enumerate(zip(run(ours, dtype), expected)):
            assert rel_error(a, e) <= tolerance, (dtype, index)


@pytest.mark.parametrize("layout", ["padded rows", "column-major"])
def test_decode_step_takes_weights_and_inputs_of_any_layout(layout):
    """A decode step through the layer op with W_ih and W_hh in another layout (W_hh's rows
    not contiguous: the recurrence declines the fused input projection and the projection is
    made first) and x with strided columns, against contiguous arguments."""
    from test_ops import relaid

    args = layer_call(torch.float64, hidden=21, batch=3, steps=1, input_size=5)
    args[8], args[10] = None, False
    args[0] = args[0].view(1, 3, 5)
    expected = OPS.lstm_layer_forward(*args)
    relaid_args = list(args)
    relaid_args[3] = relaid(args[3], layout)
    relaid_args[4] = relaid(args[4], layout)
    x_strided = torch.full((1, 3, 10), float("nan"), dtype=torch.float64)[..., ::2]
    relaid_args[0] = x_strided.copy_(args[0])
    actual = OPS.lstm_layer_forward(*relaid_args)
    for name, a, e in zip(["output", "h_n", "c_n"], actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_bias_gradient_is_summed_in_fp32(dtype):
    """The bias gradient sums the gate gradients of all N rows; summed in bf16/fp16 it would
    stop growing once the sum dwarfs each term (at N = 4000, a bf16 sum of ones stalls at
    256). Against fp64 nn.LSTM on the same rounded values."""
    torch.manual_seed(2)
    reference = nn.LSTM(6, 16, dtype=torch.float64)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(dtype))
    x = torch.randn(200, 20, 6, dtype=torch.float64).to(dtype)
    ours = lstm_ext.LSTM.from_torch(reference).to(dtype)
    # An output gradient of the same sign everywhere makes the bias gradients large sums.
    ours(x)[0].float().sum().backward()
    reference(x.double())[0].sum().backward()
    for name in ("bias_ih_l0", "bias_hh_l0"):
        actual, expected = getattr(ours, name).grad, getattr(reference, name).grad
        assert rel_error(actual, expected) <= 2e-2, (name, rel_error(actual, expected))


@pytest.mark.parametrize("batch", [3, 8])
def test_the_profiler_records_only_the_recurrence_calls_taken(batch):
    """The layer first offers the recurrence its input projection (taken by bf16 on
    avx512_bf16 and by decode steps), and a declined offer is not recorded: a profile shows one
    lstm_ext::recurrence per layer forward, in training and in inference."""
    torch.manual_seed(9)
    model = lstm_ext.LSTM(8, 16, num_layers=2)
    x = torch.randn(5, batch, 8)
    for training in (True, False):
        with torch.set_grad_enabled(training), torch.profiler.profile() as profile:
            model(x)
        recorded = sum(event.count for event in profile.key_averages()
                       if event.key == "lstm_ext::recurrence")
        assert recorded == 2, training


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
@pytest.mark.parametrize("hidden", [64, 512])
def test_input_projection_fused_into_fp32_panels_where_the_cpu_streams_them_fast(hidden):
    """fp32 panels take the input projection into the recurrence (no separate product in a
    profile) up to 12 MB of W_ih and W_hh, except on Intel, whose L3 feeds a core too slowly to
    stream both panels every step: there only while a thread's share of both fits in half its
    L2 (recurrence.cpp). B 8 T 60: the panel form, not the dot products of small batches."""
    torch.manual_seed(10)
    model = lstm_ext.LSTM(hidden, hidden).eval()
    x = torch.randn(60, 8, hidden)
    with torch.no_grad(), torch.profiler.profile() as profile:
        model(x)
    products = separate_products(profile)
    fused = input_fits_panels(hidden)
    assert products == (0 if fused else 1), (products, fused)


def intel_cpu():
    with open("/proc/cpuinfo") as info:
        return load_benchmark_script("bench_lstm").cpu_details(info.read())["vendor"] == \
            "GenuineIntel"


@functools.cache
def l2_bytes():
    """A core's L2 as the recurrence reads it, glibc's sysconf(_SC_LEVEL2_CACHE_SIZE) (a machine
    that does not say: 1 MB). Python's os.sysconf does not know that name, and getconf asks
    glibc the same question."""
    try:
        answer = subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True,
                                text=True, check=True).stdout.strip()
        l2 = int(answer)
    except (OSError, subprocess.CalledProcessError, ValueError):
        l2 = 0
    return l2 if l2 > 0 else 1 << 20


def panels_streamed(hidden):
    """Whether, on Intel, fp32 panels of W_hh of a thread's half of the units, (H / 2) * 4 gates
    * H rows * 4 bytes, outgrow half its L2 and would come from L3 every step."""
    return intel_cpu() and 2 * (hidden // 2 * 4 * hidden * 4) > l2_bytes()


def input_fits_panels(hidden):
    """Whether fp32 panels take the input projection of a layer of input size = hidden."""
    weight_bytes = 4 * hidden * 2 * hidden * 4  # both divide evenly among 2 threads here
    if intel_cpu():
        return 2 * weight_bytes // torch.get_num_threads() <= l2_bytes()
    return weight_bytes <= 12 << 20


def case_results(case, module, dtype, training):
    """The module on the case's inputs in dtype: in training outputs and every gradient
    (Case.run), otherwise the outputs under no_grad."""
    if training:
        return case.run(module, dtype)
    with torch.no_grad():
        x, state, _ = case.inputs(dtype, input_grad=False)
        output, (h_n, c_n) = module(x, tuple(state))
    return {"output": output, "h_n": h_n, "c_n": c_n}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
@pytest.mark.parametrize("batch,steps", [(4, 20), (3, 12), (4, 11), (2, 30), (4, 50)])
@pytest.mark.parametrize("training", [False, True])
def test_small_batches_read_weights_in_place_or_pack_them_as_the_sequence_repays(
        batch, steps, training):
    """Up to 4 rows the recurrence reads W_hh in place by dot products while a sequence is too
    short to repay packing panels: below 50 steps, except where the panels also take the input
    projection, there from 12 steps of 3 or more rows (recurrence.cpp's packing_pays_from; the
    next test has the exception's exception, for larger weights). The profile shows which form
    ran (the dot products leave a separate input product), and both match fp64 nn.LSTM in fp32
    and fp64, forward and, in training, every gradient."""
    torch.manual_seed(11)
    hidden = 64
    reference = nn.LSTM(hidden, hidden, dtype=torch.float64)
    case = Case(reference, "padded", steps=steps, batch=batch)
    packs = steps >= 50 or (input_fits_panels(hidden) and batch >= 3 and steps >= 12)

    expected = case_results(case, reference, torch.float64, training)
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        ours = lstm_ext.LSTM.from_torch(reference).to(dtype)
        compare(case_results(case, ours, dtype, training), expected, tolerance)
        x, state, _ = case.inputs(dtype, input_grad=False)
        with torch.set_grad_enabled(training), torch.profiler.profile() as profile:
            ours(x, tuple(state))
        products = separate_products(profile)
        assert (products == 0) == packs, (dtype, products, packs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
@pytest.mark.parametrize("steps", [49, 60])
@pytest.mark.parametrize("training", [False, True])
def test_one_row_packs_w_hh_alone_over_a_long_sequence_except_on_intel(steps, training):
    """One row reads W_hh in place below 50 steps, and on Intel at any length; elsewhere from
    50 steps it packs panels of W_hh alone, W_ih's product kept separate (recurrence.cpp).
    H 80 leaves the last block of units part-filled. Both forms match fp64 nn.LSTM in fp32
    and fp64, forward and, in training, every gradient."""
    torch.manual_seed(13)
    hidden = 80
    reference = nn.LSTM(hidden, hidden, dtype=torch.float64)
    case = Case(reference, "padded", steps=steps, batch=1)
    form = "panels" if steps >= 50 and not intel_cpu() else "direct"
    expected = case_results(case, reference, torch.float64, training)
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        assert forward_form(1, steps, hidden, training, dtype) == form
        ours = lstm_ext.LSTM.from_torch(reference).to(dtype)
        compare(case_results(case, ours, dtype, training), expected, tolerance)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
@pytest.mark.parametrize("steps,batch", [(5, 1), (25, 1), (48, 1), (49, 1), (20, 2)])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "expanded", "transposed", "stepped"])
@pytest.mark.parametrize("training", [False, True])
def test_short_sequences_of_few_rows_project_their_input_by_dot_products_off_intel(
        steps, batch, layout, training):
    """Where the recurrence leaves the input projection to a product of its own (one or two
    rows, read by the direct form), off Intel up to 48 rows of x (T B) are dot products on
    W_ih's rows in place (linear.cpp's small_linear: lstm_ext::small_linear in a profile; on
    Intel up to 4 rows), and more rows go to the library. x's rows may lie anywhere (padded,
    repeated by expand, or transposed with two rows, which the layer's reshape copies), but
    each must be contiguous (stepped, or transposed with one row, which the reshape leaves a
    strided view, go to the library). Input size 37 leaves a partial vector of k. fp32 and
    fp64 match fp64 nn.LSTM, forward and, in training, every gradient."""
    torch.manual_seed(17)
    reference = nn.LSTM(37, 24, dtype=torch.float64)
    values = torch.randn(steps, batch, 37, dtype=torch.float64)
    state = tuple(torch.randn(1, batch, 24, dtype=torch.float64) for _ in range(2))
    weights = torch.randn(steps, batch, 24, dtype=torch.float64)

    def run(module, x, dtype):
        with torch.set_grad_enabled(training):
            output, (h_n, c_n) = module(x, tuple(s.to(dtype) for s in state))
        result = {"output": output, "h_n": h_n, "c_n": c_n}
        if training:
            ((output * weights.to(dtype)).sum() + h_n.sum() + c_n.sum()).backward()
            result.update({name: p.grad for name, p in module.named_parameters()})
        return result

    expected = run(reference, values_for(values, layout), torch.float64)
    rows = steps * batch
    strided = layout == "stepped" or (layout == "transposed" and batch == 1)
    takes = rows <= (4 if intel_cpu() else 48) and not strided
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        ours = lstm_ext.LSTM.from_torch(reference).to(dtype).train(training)
        with torch.profiler.profile() as profile:
            result = run(ours, relayout(values.to(dtype), layout), dtype)
        counts = {event.key: event.count for event in profile.key_averages()}
        assert counts.get("lstm_ext::small_linear", 0) == int(takes), (dtype, counts)
        assert separate_products(profile) >= 1
        compare(result, expected, tolerance)


def forward_form(batch, steps, hidden, training, dtype=torch.float32):
    """The form the fused forward takes for a layer of input size = hidden, as the layer calls
    it: first offering the input projection, then, where that is declined, without it."""
    plan = OPS._cpu_forward_plan(batch, steps, hidden, hidden, dtype, True, training)
    if plan == "declined":
        plan = OPS._cpu_forward_plan(batch, steps, hidden, hidden, dtype, False, training)
    return plan


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
@pytest.mark.parametrize("hidden", [64, 1024])
@pytest.mark.parametrize("batch", [1, 2, 4, 5])
@pytest.mark.parametrize("training", [False, True])
def test_small_batches_read_weights_in_place_where_intel_would_stream_the_panels(
        training, batch, hidden):
    """On Intel, panels of W_hh beyond half a thread's L2 come from L3 every step, slower than
    reading W_hh's rows in place: up to 4 rows then take the direct form at any length
    (recurrence.cpp's direct_form). Elsewhere, and with more rows, 150 steps repay packing;
    one row is direct on Intel and elsewhere packs W_hh alone (W_ih's product stays separate).
    At H 1024 both forms leave the same single separate product in a profile, so the plan
    itself is asked; the direct form at that size matches fp64."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        form = forward_form(batch, 150, hidden, training)
        streamed = panels_streamed(hidden)
        direct = (batch == 1 and intel_cpu()) or (streamed and batch <= 4)
        fused = not direct and batch > 1 and input_fits_panels(hidden)
        assert form == ("direct" if direct else "panels with input" if fused else "panels"), \
            (form, streamed)
        if direct and hidden == 1024 and batch == 4:
            torch.manual_seed(12)
            reference = nn.LSTM(hidden, hidden, dtype=torch.float64)
            case = Case(reference, "padded", steps=60, batch=batch)
            assert forward_form(batch, 60, hidden, training) == "direct"
            ours = lstm_ext.LSTM.from_torch(reference).float()
            compare(case_results(case, ours, torch.float32, training),
                    case_results(case, reference, torch.float64, training), 1e-5)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
@pytest.mark.parametrize("training", [False, True])
def test_a_few_rows_pack_larger_panels_with_the_input_over_a_longer_sequence(training):
    """Where a few rows' panels would carry W_ih too, packing pays from 12 steps, but elsewhere
    than on Intel only with at most 2 MB of W_ih and W_hh (H 256 in fp32); with more (H 512)
    from 25 steps in inference and 50 in training (recurrence.cpp's packing_pays_from). Two
    rows, or panels that take no input, wait for 50 steps. On Intel, up to 4 rows whose W_hh
    panels would outgrow half a core's L2 stay direct at any length (the test before). The
    previous test runs both forms against fp64."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for hidden, batch, steps in [(256, 4, 11), (256, 4, 12), (256, 3, 12), (256, 2, 25),
                                     (512, 4, 12), (512, 4, 24), (512, 4, 25), (512, 4, 49),
                                     (512, 4, 50)]:
            fused = input_fits_panels(hidden) and batch >= 3
            pays_from = (50 if not fused else 12 if intel_cpu() or hidden <= 256
                         else 50 if training else 25)
            streamed = panels_streamed(hidden)
            expected = ("direct" if steps < pays_from or streamed
                        else "panels with input" if fused else "panels")
            assert forward_form(batch, steps, hidden, training) == expected, \
                (hidden, batch, steps)
    finally:
        torch.set_num_threads(previous)


def test_forward_plan_refuses_sizes_that_are_not_positive():
    with pytest.raises(RuntimeError, match="must be positive"):
        OPS._cpu_forward_plan(0, 10, 64, 64, torch.float32, True, False)


def cell_steps_and_gradients(cell, xs, state, dtype):
    """Three steps of `cell` in dtype from `state`, then the gradients of a weighted sum of
    every h and the last c: dx of each step, dh0, dc0 and the parameters'."""
    xs = [x.detach().to(dtype).requires_grad_() for x in xs]
    h, c = (s.detach().to(dtype).requires_grad_() for s in state)
    leaves = [*xs, h, c]
    generator = torch.Generator().manual_seed(9)
    loss = 0
    for x in xs:
        h, c = cell(x, (h, c))
        loss = loss + (h * torch.randn(h.shape, generator=generator,
                                       dtype=torch.float64).to(dtype)).sum()
    cell.zero_grad(set_to_none=True)
    (loss + c.sum()).backward()
    return [t.grad for t in leaves] + [p.grad for p in cell.parameters()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
@pytest.mark.parametrize("batch", [1, 3, 13])
@pytest.mark.parametrize("input_size,hidden", [(1, 32), (33, 64), (70, 16)])
def test_backward_products_in_panel_tiles_match_fp64_on_any_thread_count(batch, input_size,
                                                                         hidden):
    """Off Intel, a step's dW_ih, dW_hh and dx are linear.cpp's panel products: rows of the gate
    gradients times panels of 4V columns of the transposed x, h or W_ih. Their edges: a sum over
    1, 3 or 13 rows of data (dW) or over 4H (dx); 4H rows not whole tiles of 6 (AVX-512) or 3;
    N (the input or hidden size) less than a vector, whole panels (64 fp32 values, 16 fp64), or
    a partial last panel. fp32 and fp64 against fp64 nn.LSTMCell over three steps, and each
    value is one tile's sum over k in order wherever the threads split the rows, so 1, 2 and 3
    threads give the same bits (H whole vectors: the backward recurrence's own dh W_hh, not the
    step loop's product)."""
    torch.manual_seed(13)
    reference = nn.LSTMCell(input_size, hidden, dtype=torch.float64)
    xs = [torch.randn(batch, input_size, dtype=torch.float64) for _ in range(3)]
    state = [torch.randn(batch, hidden, dtype=torch.float64) for _ in range(2)]
    expected = cell_steps_and_gradients(reference, xs, state, torch.float64)
    previous = torch.get_num_threads()
    try:
        for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            ours = lstm_ext.LSTMCell.from_torch(reference).to(dtype)
            results = {}
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                with torch.profiler.profile() as profile:
                    results[threads] = cell_steps_and_gradients(ours, xs, state, dtype)
                panel_products = sum(event.count for event in profile.key_averages()
                                     if event.key == "lstm_ext::panel_product")
                # dx where W_ih's rows are contiguous (input size 1) is small_linear's dot
                # products on W_ih in place instead, off Intel up to 48 rows (linear.cpp).
                per_step = 2 if batch <= 48 and input_size == 1 else 3
                assert panel_products == (0 if intel_cpu() else 3 * per_step), panel_products
            for actual, wanted in zip(results[1], expected):
                assert rel_error(actual, wanted) <= tolerance, (dtype, rel_error(actual, wanted))
            if not intel_cpu():
                for threads in (2, 3):
                    for actual, wanted in zip(results[threads], results[1]):
                        assert torch.equal(actual, wanted), (dtype, threads)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
@pytest.mark.parametrize("input_size", [512, 520])
def test_panel_products_stop_where_their_panels_outgrow_8_mb(input_size):
    """dx of an LSTMCell step at H 1024 sums over 4H = 4096 rows of W_ih: 512 input columns are
    8 MB of fp32 panels, still a panel product; 520 (whole panels: 576 columns) are 9.4 MB,
    which go to oneDNN instead (16 MB of panels lost 10 % to it on a Zen 4). dW stays in panels;
    all of it matches fp64 nn.LSTMCell."""
    torch.manual_seed(14)
    hidden = 1024
    reference = nn.LSTMCell(input_size, hidden, dtype=torch.float64)
    xs = [torch.randn(2, input_size, dtype=torch.float64)]
    state = [torch.randn(2, hidden, dtype=torch.float64) for _ in range(2)]
    ours = lstm_ext.LSTMCell.from_torch(reference).float()
    with torch.profiler.profile() as profile:
        actual = cell_steps_and_gradients(ours, xs, state, torch.float32)
    counts = {event.key: event.count for event in profile.key_averages()}
    in_panels = 0 if intel_cpu() else 3 if input_size == 512 else 2
    assert counts.get("lstm_ext::panel_product", 0) == in_panels, counts
    assert separate_products(profile) == 3
    expected = cell_steps_and_gradients(reference, xs, state, torch.float64)
    for got, wanted in zip(actual, expected):
        assert rel_error(got, wanted) <= 1e-5
