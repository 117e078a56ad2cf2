"""Every tensor argument of every public op in any memory layout: transposed, sliced with a
step, inside wider rows, expanded (zero stride), at an offset into its storage. The answer must
equal the contiguous call's; a layout an op cannot take would have to be refused with an error,
never read as if it were contiguous (the ops are public, and torch.compile hands them whatever
strides the fake functions allow)."""

import pytest
import torch
from hypothesis import given, settings
from torch.nn.utils.rnn import pack_padded_sequence
from hypothesis import strategies as st

import lstm_ext
from conftest import LAYOUTS, relayout, values_for
from test_ops import layer_args

OPS = torch.ops.lstm_ext
# Another layout may take another route through the GEMMs (and another rounding order); a
# tensor read in the wrong layout is off by O(1).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}
DTYPES = st.sampled_from([torch.float64, torch.float64, torch.float32, torch.bfloat16])


def assert_same(actual, expected, what):
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}: output {index} has shape {a.shape}, not {e.shape}"
        if e.numel():
            a, e = a.double(), e.double()
            error = ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()
            bound = TOLERANCE[actual[0].dtype if actual[0].is_floating_point() else a.dtype]
            assert error < bound, f"{what}: output {index} differs by {error:.2e} relative"


def call_in_layouts(op, args, layouts):
    """The op on `args` in the given layouts, against the op on the same values contiguous."""
    reference_args, odd_args = [], []
    for arg, layout in zip(args, layouts):
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            reference_args.append(values_for(arg, layout))
            odd_args.append(relayout(values_for(arg, layout), layout))
        else:
            reference_args.append(arg)
            odd_args.append(arg)
    what = f"{op} with layouts {[l for l, a in zip(layouts, args) if isinstance(a, torch.Tensor)]}"
    assert_same(op(*odd_args), op(*reference_args), what)


variants = st.fixed_dictionaries({
    "steps": st.integers(1, 5), "batch": st.integers(1, 6), "input_size": st.integers(1, 5),
    "hidden": st.integers(1, 7), "proj": st.sampled_from([0, 0, 1, 3]),
    "bias": st.booleans(), "packed": st.booleans(), "reverse": st.booleans(),
})


# The ops on tensors this small take microseconds: five times the profile's examples.
more_examples = settings(max_examples=5 * settings.default.max_examples)


def fix_proj(variant):
    variant["proj"] = min(variant["proj"], variant["hidden"] - 1) if variant["proj"] else 0
    if variant["packed"]:
        variant["batch"] = min(variant["batch"], 3)
    return variant


@more_examples
@given(variant=variants, training=st.booleans(), layouts=st.lists(
    st.sampled_from(LAYOUTS), min_size=11, max_size=11), dtype=DTYPES,
    seed=st.integers(0, 2**31 - 1))
def test_layer_forward_reads_every_argument_in_any_layout(variant, training, layouts, dtype,
                                                          seed):
    torch.manual_seed(seed)
    args = layer_args(requires_grad=False, training=training, dtype=dtype, **fix_proj(variant))
    call_in_layouts(OPS.lstm_layer_forward, args, layouts)


@more_examples
@given(variant=variants, layouts=st.lists(st.sampled_from(LAYOUTS), min_size=16, max_size=16),
       input_grad=st.booleans(), weight_grads=st.booleans(), dtype=DTYPES,
       seed=st.integers(0, 2**31 - 1))
def test_layer_backward_reads_every_argument_in_any_layout(variant, layouts, input_grad,
                                                           weight_grads, dtype, seed):
    torch.manual_seed(seed)
    args = layer_args(requires_grad=False, dtype=dtype, **fix_proj(variant))
    output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, _ = OPS.lstm_layer_forward(*args)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, _ = args
    backward_args = [
        torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x, w_ih, w_hh,
        w_hr, batch_sizes, gates, cell_prev, hidden_prev, hidden_raw, reverse,
        b_ih is not None, input_grad, weight_grads,
    ]
    # Saved tensors keep their values: an expanded one would no longer be what forward saved,
    # which is fine for this check (the op must read what it is given, in any layout).
    call_in_layouts(OPS.lstm_layer_backward, backward_args, layouts)


@more_examples
@given(batch=st.integers(1, 4), input_size=st.integers(1, 5), hidden=st.integers(1, 6),
       bias=st.booleans(), layouts=st.lists(st.sampled_from(LAYOUTS), min_size=11, max_size=11),
       seed=st.integers(0, 2**31 - 1))
def test_cell_ops_read_every_argument_in_any_layout(batch, input_size, hidden, bias, layouts,
                                                    seed):
    torch.manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64)

    x, hx, cx = rand(batch, input_size), rand(batch, hidden), rand(batch, hidden)
    w_ih, w_hh = rand(4 * hidden, input_size), rand(4 * hidden, hidden)
    b_ih, b_hh = (rand(4 * hidden), rand(4 * hidden)) if bias else (None, None)
    forward_args = [x, hx, cx, w_ih, w_hh, b_ih, b_hh, True]
    call_in_layouts(OPS.lstm_cell_forward, forward_args, layouts[:8])
    h, c, gates, cell_prev = OPS.lstm_cell_forward(*forward_args)
    backward_args = [torch.randn_like(h), torch.randn_like(c), x, hx, w_ih, w_hh, gates,
                     cell_prev, bias, True, True]
    call_in_layouts(OPS.lstm_cell_backward, backward_args, layouts)


@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_broadcast_output_gradients_match_their_copies(proj_size, packed, dtype):
    """The gradient of a sum or mean of the output reaches the op broadcast over its rows, and
    the CPU kernels read its one row for all of them: the gradients must equal those from the
    same values materialized, row by row, for a value, a row and a mean broadcast."""
    torch.manual_seed(0)
    lstm = lstm_ext.LSTM(5, 8, num_layers=2, proj_size=proj_size, bidirectional=True)
    lstm = lstm.to(dtype)
    x = torch.randn(6, 4, 5, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([6, 5, 3, 2])
    row = torch.randn(lstm.proj_size or lstm.hidden_size, dtype=dtype).repeat(2)

    def gradients(loss_of):
        lstm.zero_grad(set_to_none=True)
        x.grad = None
        data = pack_padded_sequence(x, lengths) if packed else x
        output, _ = lstm(data)
        loss_of(output.data if packed else output).backward()
        return [x.grad.clone()] + [p.grad.clone() for p in lstm.parameters()]

    for broadcast, copied in [
        (lambda y: y.sum(), lambda y: (y * torch.ones_like(y)).sum()),
        (lambda y: y.mean(), lambda y: (y * torch.full_like(y, 1 / y.numel())).sum()),
        (lambda y: (y.sum(dim=tuple(range(y.dim() - 1))) * row).sum(),
         lambda y: (y * row.expand_as(y).contiguous()).sum()),
    ]:
        for got, expected in zip(gradients(broadcast), gradients(copied)):
            torch.testing.assert_close(got, expected, rtol=1e-12 if dtype == torch.float64
                                       else 1e-5, atol=0)
