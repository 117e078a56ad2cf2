"""lstm_ext.LSTMCell against torch.nn.LSTMCell: outputs and every gradient."""

import pytest
import torch
from torch import nn

import lstm_ext
from conftest import compare, separate_products


def run(cell, x, state):
    x = x.detach().requires_grad_()
    state = None if state is None else tuple(s.detach().requires_grad_() for s in state)
    h, c = cell(x, state)
    generator = torch.Generator().manual_seed(5)
    loss = (h * torch.randn(h.shape, generator=generator, dtype=torch.float64).to(h)).sum() + (
        c * torch.randn(c.shape, generator=generator, dtype=torch.float64).to(c)).sum()
    cell.zero_grad(set_to_none=True)
    loss.backward()
    result = {"h": h, "c": c, "grad_x": x.grad}
    if state is not None:
        result["grad_h0"], result["grad_c0"] = state[0].grad, state[1].grad
    result.update({f"grad_{n}": p.grad for n, p in cell.named_parameters()})
    return result


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_cell_matches_nn_lstmcell_fp64(bias, batched, with_state):
    torch.manual_seed(3)
    reference = nn.LSTMCell(5, 7, bias=bias, dtype=torch.float64)
    ours = lstm_ext.LSTMCell.from_torch(reference)
    batch = (4,) if batched else ()
    x = torch.randn(*batch, 5, dtype=torch.float64)
    state = None
    if with_state:
        state = (torch.randn(*batch, 7, dtype=torch.float64), torch.randn(*batch, 7, dtype=torch.float64))
    compare(run(ours, x, state), run(reference, x, state), 1e-10)


def test_cell_fp32_and_bf16_against_fp64():
    torch.manual_seed(4)
    reference = nn.LSTMCell(16, 32, dtype=torch.float64)
    x = torch.randn(8, 16, dtype=torch.float64)
    state = (torch.randn(8, 32, dtype=torch.float64), torch.randn(8, 32, dtype=torch.float64))
    # fp32: a few roundings of 2^-24; bf16 and fp16: 2u, as for the layer (test_module_parity).
    for dtype, tolerance in [(torch.float32, 1e-5), (torch.bfloat16, 2 * 2**-8),
                             (torch.float16, 2 * 2**-11)]:
        low = lstm_ext.LSTMCell.from_torch(reference).to(dtype)
        rounded = nn.LSTMCell(16, 32, dtype=torch.float64)
        rounded.load_state_dict({k: v.double() for k, v in low.state_dict().items()})
        xs, ss = x.to(dtype), tuple(s.to(dtype) for s in state)
        compare(run(low, xs, ss), run(rounded, xs.double(), tuple(s.double() for s in ss)),
                tolerance)


def test_cell_under_cpu_autocast_runs_like_nn_lstmcell():
    """aten::lstm_cell is not on CPU autocast's lists, so nn.LSTMCell under CPU autocast
    returns fp32 (only the products inside it run in bf16): ours returns fp32 too, computed in
    fp32 throughout, the same values as without autocast (an LSTM layer, whose aten::lstm is on
    the list, runs in bf16 there; see test_module_parity)."""
    torch.manual_seed(3)
    reference = nn.LSTMCell(8, 16)
    ours = lstm_ext.LSTMCell.from_torch(reference)
    x, state = torch.randn(4, 8), (torch.randn(4, 16), torch.randn(4, 16))
    expected = run(ours, x, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = run(reference, x, state)
        result = run(ours, x, state)
    assert result["h"].dtype == theirs["h"].dtype == torch.float32
    for key, value in expected.items():
        assert torch.equal(result[key], value), key
    compare(result, theirs, 2 * 2**-8)  # nn.LSTMCell's bf16 products: within 2u of ours


def test_cell_loop_equals_lstm_layer():
    """Stepping LSTMCell over a sequence gives the LSTM layer's output."""
    torch.manual_seed(6)
    layer = lstm_ext.LSTM(5, 7).double()
    cell = lstm_ext.LSTMCell(5, 7).double()
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    expected, (h_n, c_n) = layer(x)
    h = c = torch.zeros(3, 7, dtype=torch.float64)
    for t in range(6):
        h, c = cell(x[t], (h, c))
        torch.testing.assert_close(h, expected[t], rtol=0, atol=1e-14)
    torch.testing.assert_close(c, c_n[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("batch", [1, 5, 64, 65])
@pytest.mark.parametrize("hidden", [160, 7])
def test_cell_training_step_makes_its_products_in_the_recurrence(batch, hidden):
    """A training step makes x W_ih^T in the forward's dot products and dh W_hh in the backward
    kernel, W_hh's rows read in place up to 64 rows (recurrence.h's kSingleStepDirectRows) and
    packed beyond: forward and backward leave only the three products of dx, dW_ih and dW_hh in
    a profile. Where a row of W_hh is not whole vectors long (H 7), a step of up to 64 rows
    makes dh W_hh as a product of its own. H 160: more than one chunk of the backward's 4H-long
    sums, and a last block of units partly filled. fp32 and fp64 against fp64 nn.LSTMCell."""
    torch.manual_seed(7)
    reference = nn.LSTMCell(24, hidden, dtype=torch.float64)
    x = torch.randn(batch, 24, dtype=torch.float64)
    state = (torch.randn(batch, hidden, dtype=torch.float64),
             torch.randn(batch, hidden, dtype=torch.float64))
    expected = run(reference, x, state)
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        ours = lstm_ext.LSTMCell.from_torch(reference).to(dtype)
        with torch.profiler.profile() as profile:
            result = run(ours, x.to(dtype), tuple(s.to(dtype) for s in state))
        compare(result, expected, tolerance)
        products = separate_products(profile)
        assert (products == 3) == (hidden == 160 or batch > 64), (dtype, products)


class _Halved(nn.Module):
    def forward(self, weight):
        return 0.5 * weight


def test_cell_weights_by_parametrization_weight_norm_and_functional_call():
    """The cell reads its weights where torch puts them: a parametrization, weight_norm,
    torch.func.functional_call. Each against nn.LSTMCell treated the same way, outputs and
    every gradient."""
    torch.manual_seed(6)
    reference = nn.LSTMCell(5, 7, dtype=torch.float64)
    ours = lstm_ext.LSTMCell.from_torch(reference)
    x = torch.randn(3, 5, dtype=torch.float64)
    state = (torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64))
    for cell in (reference, ours):
        nn.utils.parametrize.register_parametrization(cell, "weight_hh", _Halved())
    compare(run(ours, x, state), run(reference, x, state), 1e-10)
    for cell in (reference, ours):
        nn.utils.parametrize.remove_parametrizations(cell, "weight_hh")
        nn.utils.parametrizations.weight_norm(cell, "weight_ih")
    compare(run(ours, x, state), run(reference, x, state), 1e-10)
    for cell in (reference, ours):
        nn.utils.parametrize.remove_parametrizations(cell, "weight_ih")

    weights = {name: 1.5 * p.detach() for name, p in reference.named_parameters()}
    outputs = [torch.func.functional_call(cell, weights, (x, state)) for cell in (ours, reference)]
    compare(dict(zip("hc", outputs[0])), dict(zip("hc", outputs[1])), 1e-10)
