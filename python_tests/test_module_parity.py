"""lstm_ext.LSTM against torch.nn.LSTM over the constructor grid: outputs, both final states and
every gradient (input, states, each parameter)."""

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


@pytest.mark.parametrize("proj_size", [0, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_fp64(dtype, proj_size):
    """bf16/fp16 storage with fp32 gate math: within 2e-2 of fp64 on the same rounded values."""
    reference64, _ = make_pair(2, True, False, True, proj_size, hidden_size=32, input_size=16)
    low = lstm_ext.LSTM.from_torch(reference64).to(dtype)
    # The reference uses exactly the values the low-precision module holds.
    reference64.load_state_dict({k: v.double() for k, v in low.state_dict().items()})
    case = Case(reference64, "padded", steps=20, batch=6)
    case.leaves = [t.to(dtype).double() for t in case.leaves]
    case.state = [t.to(dtype).double() for t in case.state]
    result = case.run(low, dtype=dtype)
    assert all(t.dtype == dtype for t in result.values())
    compare(result, case.run(reference64), 2e-2)


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


def test_default_state_is_zero():
    reference, ours = make_pair(2, True, False, True, 0)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    layers = 4
    zeros = (torch.zeros(layers, 3, 7, dtype=torch.float64),) * 2
    assert torch.equal(ours(x)[0], ours(x, zeros)[0])
