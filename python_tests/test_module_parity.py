"""lstm_ext.LSTM against torch.nn.LSTM over the constructor grid: outputs, both final states and
every gradient (input, states, each parameter)."""

import copy
import itertools

import pytest
import torch
from torch import nn

import lstm_ext
from conftest import Case, compare, rel_error

GRID = list(itertools.product(
    [1, 2, 3],        # num_layers
    [True, False],    # bias
    [False, True],    # batch_first
    [False, True],    # bidirectional
    [0, 4],           # proj_size
    [True, False],    # with_state (given or default h0, c0)
))
KINDS = ["padded", "unbatched", "packed_sorted", "packed_unsorted"]


def make_pair(layers, bias, batch_first, bidirectional, proj_size, dtype=torch.float64,
              input_size=5, hidden_size=7):
    torch.manual_seed(layers * 100 + proj_size)
    reference = nn.LSTM(
        input_size, hidden_size, layers, bias=bias, batch_first=batch_first,
        dropout=0.3 if layers > 1 else 0.0, bidirectional=bidirectional, proj_size=proj_size,
        dtype=dtype,
    )
    reference.eval()  # dropout is a no-op in eval; gradients are still taken (eval backward)
    ours = lstm_ext.LSTM.from_torch(reference)
    return reference, ours


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers,bias,batch_first,bidirectional,proj_size,with_state", GRID)
def test_fp64_matches_nn_lstm(layers, bias, batch_first, bidirectional, proj_size, with_state,
                              kind):
    reference, ours = make_pair(layers, bias, batch_first, bidirectional, proj_size)
    case = Case(reference, kind, with_state=with_state)
    compare(case.run(ours), case.run(reference), 1e-10)


@pytest.mark.parametrize("packed_gemm", ["1", "0"], ids=["mkl-packed-gemm", "aten-gemm"])
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("layers,bidirectional,proj_size", [(1, False, 0), (2, True, 4), (3, False, 4)])
def test_fp32_against_fp64_reference(layers, bidirectional, proj_size, kind, packed_gemm,
                                     monkeypatch):
    """fp32 within 1e-4 of an fp64 reference, and no less accurate than nn.LSTM in fp32, with
    the CPU's per-step GEMMs on MKL's packed weights and on plain ATen GEMMs."""
    monkeypatch.setenv("LSTM_EXT_PACKED_GEMM", packed_gemm)
    reference64, _ = make_pair(layers, True, False, bidirectional, proj_size, hidden_size=32,
                               input_size=16)
    torch_fp32 = nn.LSTM(16, 32, layers, bidirectional=bidirectional, proj_size=proj_size)
    torch_fp32.load_state_dict(reference64.state_dict())
    torch_fp32.eval()
    ours = lstm_ext.LSTM.from_torch(torch_fp32)
    case = Case(reference64, kind, steps=20, batch=6)
    exact = case.run(reference64)
    ours_errors = compare(case.run(ours, dtype=torch.float32), exact, 1e-4)
    torch_result = case.run(torch_fp32, dtype=torch.float32)
    for key, error in ours_errors.items():
        torch_error = rel_error(torch_result[key], exact[key])
        # Both sit at fp32 rounding level; allow a small factor for the different op order.
        assert error <= 4 * torch_error + 1e-6, (key, error, torch_error)


def unit_roundoff(dtype):
    """u: the largest relative error of one rounding to `dtype` (2^-8 for bf16, 2^-11 for fp16)."""
    return torch.finfo(dtype).eps / 2


@pytest.mark.parametrize("proj_size", [0, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_fp64(dtype, proj_size):
    """bf16/fp16 storage with fp32 gate math, against fp64 on the same rounded values: every
    output and gradient within 2u (u the dtype's unit roundoff). Each stored tensor carries
    one rounding, the input projection another; the largest error here is 1.3-1.35u, in
    the weight gradients (sums over all steps of stored values). nn.LSTM run in the storage
    dtype reaches 2.6u on the same case."""
    reference64, _ = make_pair(2, True, False, True, proj_size, hidden_size=32, input_size=16)
    low = lstm_ext.LSTM.from_torch(reference64).to(dtype)
    # The reference uses exactly the values the low-precision module holds.
    reference64.load_state_dict({k: v.double() for k, v in low.state_dict().items()})
    case = Case(reference64, "padded", steps=20, batch=6)
    case.leaves = [t.to(dtype).double() for t in case.leaves]
    case.state = [t.to(dtype).double() for t in case.state]
    result = case.run(low, dtype=dtype)
    assert all(t.dtype == dtype for t in result.values())
    compare(result, case.run(reference64), 2 * unit_roundoff(dtype))


def lstm_loop(x, weight_ih, weight_hh, bias, h, c, dtype, cell_in_storage_dtype):
    """The plain cell loop with fp32 gate math, keeping c in fp32 or (the planted bug) in the
    storage dtype."""
    for t in range(x.shape[0]):
        gates = x[t].float() @ weight_ih.float().t() + h.float() @ weight_hh.float().t() + bias
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if cell_in_storage_dtype:
            c = c.to(dtype).float()
        h = (torch.sigmoid(o) * torch.tanh(c)).to(dtype)
    return h, c.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_the_cell_state_in_fp32(dtype):
    """With the forget gate near 1 the cell integrates its input over many steps, and a cell
    state rounded to the storage dtype every step loses what each step adds. Against fp64 on
    the same rounded values, over 50 steps: ours stays within 1.3u (it measures 0.9-1.0u: the
    rounding of h, the input projection and c_n itself); the same loop with c kept in the
    storage dtype reaches 1.8-1.9u, and fails the bound (checked here, so the bound is known
    to catch that bug)."""
    torch.manual_seed(0)
    reference = nn.LSTM(16, 32, dtype=torch.float64)
    with torch.no_grad():
        reference.bias_hh_l0[32:64] += 4.0  # forget gate about 0.98
    low = lstm_ext.LSTM.from_torch(reference).to(dtype)
    reference.load_state_dict({k: v.double() for k, v in low.state_dict().items()})
    x = torch.randn(50, 6, 16).to(dtype)
    h0, c0 = torch.randn(1, 6, 32).to(dtype), torch.randn(1, 6, 32).to(dtype)
    with torch.no_grad():
        _, (h_exact, c_exact) = reference(x.double(), (h0.double(), c0.double()))
        _, (h_ours, c_ours) = low(x, (h0, c0))
        bias = low.bias_ih_l0.float() + low.bias_hh_l0.float()
        planted = lstm_loop(x, low.weight_ih_l0, low.weight_hh_l0, bias, h0[0], c0[0].float(),
                            dtype, cell_in_storage_dtype=True)
    bound = 1.3 * unit_roundoff(dtype)
    assert rel_error(c_ours, c_exact) <= bound and rel_error(h_ours, h_exact) <= bound
    assert rel_error(planted[1], c_exact[0]) > bound


def test_autocast_cpu_bf16_like_nn_lstm():
    """Under CPU autocast both run in bf16 and return bf16; gradients reach fp32 parameters."""
    reference, _ = make_pair(2, True, False, False, 0, dtype=torch.float32, hidden_size=32,
                             input_size=16)
    ours = lstm_ext.LSTM.from_torch(reference)
    reference64 = lstm_ext.LSTM.from_torch(reference).double()
    case = Case(reference, "padded", steps=10, batch=4, dtype=torch.float32)
    ours_result = case.run(ours, autocast=True)
    torch_result = case.run(reference, autocast=True)
    assert ours_result["output"].dtype == torch_result["output"].dtype == torch.bfloat16
    assert ours_result["grad_weight_ih_l0"].dtype == torch.float32
    exact = case.run(reference64, dtype=torch.float64)
    compare(ours_result, exact, 3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_inference_is_the_low_precision_module_call_after_call(dtype):
    """Inference under CPU autocast casts into memory kept across calls: the same bits as the
    module converted to the autocast dtype, for two models of different sizes called in turn
    (each call's casts overwrite the last one's), with every earlier output left as it was."""
    torch.manual_seed(6)
    models = [lstm_ext.LSTM(12, 24, num_layers=2).eval(),
              lstm_ext.LSTM(8, 40, bidirectional=True, batch_first=True).eval()]
    converted = [copy.deepcopy(m).to(dtype) for m in models]
    kept = []
    with torch.no_grad():
        for call in range(3):
            for model, low in zip(models, converted):
                x = torch.randn(7, 3, model.input_size)
                with torch.autocast("cpu", dtype=dtype):
                    output, (h_n, c_n) = model(x)
                expected, (h_ref, c_ref) = low(x.to(dtype))
                for got, want in ((output, expected), (h_n, h_ref), (c_n, c_ref)):
                    assert got.dtype == dtype and torch.equal(got, want), call
                kept.append((output, output.clone()))
    for output, copy_of_it in kept:
        assert torch.equal(output, copy_of_it)


@pytest.mark.parametrize("proj_size", [0, 4])
def test_backward_inside_autocast_keeps_the_forwards_dtype(proj_size):
    """A forward run outside autocast and its backward run inside it (the engine carries the
    caller's autocast state into the backward): the backward's products stay in fp32, bit for
    bit as outside, whichever library takes them (with a projection, ATen's at::mm on any
    CPU)."""
    torch.manual_seed(5)
    module = lstm_ext.LSTM(8, 16, proj_size=proj_size)
    x = torch.randn(5, 3, 8, requires_grad=True)
    output, _ = module(x)
    grad = torch.randn_like(output)
    leaves = [x, *module.parameters()]
    expected = torch.autograd.grad(output, leaves, grad, retain_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = torch.autograd.grad(output, leaves, grad)
    for got, want in zip(result, expected):
        assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("module_type", [lstm_ext.LSTM, lstm_ext.LSTMCell])
def test_autocast_leaves_fp64_alone_like_nn_lstm(module_type):
    """Autocast casts fp32 only: an fp64 module with fp64 input runs in fp64, bit for bit as
    without autocast, as nn.LSTM and nn.LSTMCell do."""
    torch.manual_seed(2)
    module = module_type(8, 16).double()
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    x = x if module_type is lstm_ext.LSTM else x[0]
    expected = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = module(x)
    flat = lambda out: [out[0], *out[1]] if module_type is lstm_ext.LSTM else list(out)  # noqa: E731
    for got, want in zip(flat(result), flat(expected)):
        assert got.dtype == torch.float64 and torch.equal(got, want)


def test_default_state_is_zero():
    reference, ours = make_pair(2, True, False, True, 0)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    layers = 4
    zeros = (torch.zeros(layers, 3, 7, dtype=torch.float64),) * 2
    assert torch.equal(ours(x)[0], ours(x, zeros)[0])
