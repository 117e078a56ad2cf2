"""The ops themselves: torch.library.opcheck on every op, gradcheck and gradgradcheck in fp64,
and the errors of the raw ops."""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

from conftest import poisoned_allocations
from lstm_ext import ops

OPS = torch.ops.lstm_ext


def layer_args(steps=4, batch=3, input_size=5, hidden=6, proj=0, bias=True, packed=False,
               reverse=False, training=True, dtype=torch.float64, requires_grad=True,
               device="cpu"):
    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=requires_grad)

    state = proj or hidden
    if packed:
        lengths = [steps, max(1, steps - 1), 1][:batch]
        sequences = [torch.randn(n, input_size, dtype=dtype, device=device) for n in lengths]
        packed_seq = pack_sequence(sequences)
        x = packed_seq.data.clone().requires_grad_(requires_grad)
        batch_sizes = packed_seq.batch_sizes
        batch = len(lengths)
    else:
        x, batch_sizes = rand(steps, batch, input_size), None
    return [
        x, rand(batch, state), rand(batch, hidden), rand(4 * hidden, input_size),
        rand(4 * hidden, state), rand(4 * hidden) if bias else None,
        rand(4 * hidden) if bias else None, rand(proj, hidden) if proj else None, batch_sizes,
        reverse, training,
    ]


VARIANTS = [
    {},
    {"reverse": True},
    {"proj": 2},
    {"bias": False},
    {"packed": True},
    {"packed": True, "reverse": True, "proj": 2},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_opcheck_layer_forward(variant):
    torch.library.opcheck(OPS.lstm_layer_forward, layer_args(**variant))
    torch.library.opcheck(OPS.lstm_layer_forward, layer_args(training=False, **variant),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_opcheck_layer_backward(variant):
    args = layer_args(requires_grad=False, **variant)
    output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, _ = OPS.lstm_layer_forward(*args)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, _ = args
    for input_grad, weight_grads in [(True, True), (False, True), (True, False)]:
        backward_args = [
            torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x, w_ih,
            w_hh, w_hr, batch_sizes, gates, cell_prev, hidden_prev, hidden_raw, reverse,
            b_ih is not None, input_grad, weight_grads,
        ]
        torch.library.opcheck(OPS.lstm_layer_backward, backward_args)


def layers_args(layers=2, bidirectional=True, proj=0, bias=True, packed=False):
    """lstm_layers' arguments for an fp64 LSTM of input 5, hidden 6 over 4 steps of 3
    sequences: nn.LSTM's flat weights, fresh random states."""
    torch.manual_seed(layers + 2 * bidirectional + 4 * proj + 8 * bias + 16 * packed)
    reference = torch.nn.LSTM(5, 6, layers, bias=bias, bidirectional=bidirectional,
                              proj_size=proj, dtype=torch.float64)
    x, _, _, *_, batch_sizes, _, _ = layer_args(packed=packed, requires_grad=False)
    states = layers * (2 if bidirectional else 1)
    h0 = torch.randn(states, 3, proj or 6, dtype=torch.float64)
    c0 = torch.randn(states, 3, 6, dtype=torch.float64)
    weights = [w.detach() for w in reference._flat_weights]
    return reference, [x, h0, c0, weights, bias, layers, bidirectional, batch_sizes, []]


LAYERS_VARIANTS = [
    {},
    {"layers": 1, "bidirectional": False},
    {"layers": 3, "proj": 2},
    {"bias": False, "packed": True},
    {"layers": 2, "proj": 3, "packed": True, "bias": False},
]


@pytest.mark.parametrize("variant", LAYERS_VARIANTS, ids=str)
def test_lstm_layers_is_nn_lstm_in_inference(variant):
    """lstm_layers (every layer and direction in one call) against fp64 nn.LSTM on the same
    weights, and through opcheck (its shapes under FakeTensor come from the layer ops it is
    made of)."""
    reference, args = layers_args(**variant)
    x, h0, c0, *_, batch_sizes, _ = args
    with torch.no_grad():
        if batch_sizes is not None:
            expected, (h_ref, c_ref) = reference(PackedSequence(x, batch_sizes), (h0, c0))
            expected = expected.data
        else:
            expected, (h_ref, c_ref) = reference(x, (h0, c0))
    output, h_n, c_n = OPS.lstm_layers(*args)
    for actual, wanted in ((output, expected), (h_n, h_ref), (c_n, c_ref)):
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-12)
    torch.library.opcheck(OPS.lstm_layers, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("change,message", [
    (lambda a: a.__setitem__(3, a[3][:-1]), "weights per layer and direction"),
    (lambda a: a.__setitem__(5, 0), "num_layers must be at least 1"),
    (lambda a: a.__setitem__(4, False), "2 weights per layer"),
    (lambda a: a.__setitem__(1, a[1][:3]), r"h0 of shape \(num_layers \* directions = 4"),
    (lambda a: a.__setitem__(2, a[2][0]), "c0 of shape"),
])
def test_lstm_layers_errors(change, message):
    _, args = layers_args()
    change(args)
    with pytest.raises(RuntimeError, match=message):
        OPS.lstm_layers(*args)


def variant_args(args, eval_zoneout=False):
    """The LSTM variants' op arguments for layer_args' call: a recurrent-dropout mask, zoneout
    weights (per row in training, one row of expectations in eval) and return_cells."""
    x, h0, c0, batch_sizes = args[0], args[1], args[2], args[8]
    rows = x.shape[0] if batch_sizes is not None else x.shape[0] * x.shape[1]
    mask = (torch.rand(h0.shape, dtype=h0.dtype) >= 0.3).to(h0.dtype) / 0.7
    if eval_zoneout:
        zoneout = [torch.full((1, t.shape[1]), 0.2, dtype=t.dtype) for t in (c0, h0)]
    else:
        zoneout = [(torch.rand(rows, t.shape[1], dtype=t.dtype) < 0.3).to(t.dtype)
                   for t in (c0, h0)]
    return [mask, *zoneout, True]


@pytest.mark.parametrize("variant", [{}, {"packed": True, "reverse": True, "proj": 2}], ids=str)
def test_opcheck_of_the_layer_ops_with_the_lstm_variants(variant):
    for eval_zoneout in (False, True):
        args = layer_args(**variant)
        args += variant_args(args, eval_zoneout)
        torch.library.opcheck(OPS.lstm_layer_forward, args)
    args = layer_args(requires_grad=False, **variant)
    extra = variant_args(args)
    output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, cells = OPS.lstm_layer_forward(
        *args, *extra)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, _ = args
    torch.library.opcheck(OPS.lstm_layer_backward, [
        torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x, w_ih, w_hh,
        w_hr, batch_sizes, gates, cell_prev, hidden_prev, hidden_raw, reverse, True, True, True,
        *extra[:3], torch.randn_like(cells)])


def check_every_output_element_written(variant, device, dtype):
    """The layer ops' outputs, saved tensors and gradients with every allocation poisoned:
    forward with and without training, backward with and without grad_output."""
    with poisoned_allocations(device):
        args = layer_args(device=device, dtype=dtype, requires_grad=False, **variant)
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, _ = args
        names = ["output", "h_n", "c_n", "gates", "cell_prev", "hidden_prev", "hidden_raw"]
        forward = OPS.lstm_layer_forward(*args)
        results = dict(zip(names, forward))
        results.update(zip([f"eval {name}" for name in names[:3]],
                           OPS.lstm_layer_forward(*args[:-1], False)))
        output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, _ = forward
        grad_names = ["grad_input", "grad_h0", "grad_c0", "grad_w_ih", "grad_w_hh", "grad_bias",
                      "grad_w_hr"]
        for grad_output in (torch.randn_like(output), None):
            grads = OPS.lstm_layer_backward(
                grad_output, torch.randn_like(h_n), torch.randn_like(c_n), x, w_ih, w_hh, w_hr,
                batch_sizes, gates, cell_prev, hidden_prev, hidden_raw, reverse,
                b_ih is not None, True, True)
            suffix = "" if grad_output is not None else " (no grad_output)"
            results.update((name + suffix, grad) for name, grad in zip(grad_names, grads))
    for name, tensor in results.items():
        unwritten = tensor.isnan().sum().item()
        assert unwritten == 0, f"{name}: {unwritten} of {tensor.numel()} elements never written"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_every_output_element_is_written(variant, dtype):
    check_every_output_element_written(variant, "cpu", dtype)


def relaid(matrix, layout):
    """The same values as `matrix` in another memory layout."""
    rows, cols = matrix.shape
    def blank(*shape):
        return torch.full(shape, float("nan"), dtype=matrix.dtype, device=matrix.device)

    views = {
        "contiguous": lambda: blank(rows, cols),
        "padded rows": lambda: blank(rows, cols + 3)[:, :cols],
        "column-major": lambda: blank(cols, rows).t(),
        "padded column-major": lambda: blank(cols, rows + 3)[:, :rows].t(),
        "every other column": lambda: blank(rows, 2 * cols)[:, ::2],
    }
    return views[layout]().copy_(matrix)


WEIGHT_LAYOUTS = ["padded rows", "column-major", "padded column-major", "every other column"]


def check_weights_of_any_layout(layout, device, dtype, tolerance):
    """Forward and backward of the layer op with w_ih, w_hh and w_hr in `layout` match the
    contiguous weights. B >= 4 and T > 1 reach the CPU's packed per-step GEMM."""
    for proj in (0, 3):
        args = layer_args(steps=5, batch=6, hidden=8, proj=proj, device=device, dtype=dtype,
                          requires_grad=False)
        relaid_args = list(args)
        for index in (3, 4, 7):
            if args[index] is not None:
                relaid_args[index] = relaid(args[index], layout)
        expected = OPS.lstm_layer_forward(*args)
        actual = OPS.lstm_layer_forward(*relaid_args)
        for name, a, b in zip(["output", "h_n", "c_n", "gates"], actual, expected):
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)
        output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, _ = expected
        grads = [torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n)]

        def backward(call):
            x, _, _, w_ih, w_hh, _, _, w_hr, batch_sizes, reverse, _ = call
            return OPS.lstm_layer_backward(*grads, x, w_ih, w_hh, w_hr, batch_sizes, gates,
                                           cell_prev, hidden_prev, hidden_raw, reverse, True,
                                           True, True)

        for a, b in zip(backward(relaid_args), backward(args)):
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("layout", WEIGHT_LAYOUTS)
def test_layer_op_takes_weights_of_any_layout(layout, dtype, tolerance):
    check_weights_of_any_layout(layout, "cpu", dtype, tolerance)


def cell_args(bias=True, training=True, requires_grad=True):
    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)

    return [rand(3, 5), rand(3, 6), rand(3, 6), rand(24, 5), rand(24, 6),
            rand(24) if bias else None, rand(24) if bias else None, training]


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cell(bias):
    torch.library.opcheck(OPS.lstm_cell_forward, cell_args(bias))
    args = cell_args(bias, requires_grad=False)
    h, c, gates, cell_prev = OPS.lstm_cell_forward(*args)
    x, hx, cx, w_ih, w_hh, b_ih, _, _ = args
    torch.library.opcheck(OPS.lstm_cell_backward, [
        torch.randn_like(h), torch.randn_like(c), x, hx, w_ih, w_hh, gates, cell_prev, bias,
        True, True,
    ])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_drop_connect(dtype):
    """The forward draws afresh each call, so its check leaves out the comparisons of two
    calls' values (its values are test_variants.py's); the backward is checked in full."""
    weight = torch.randn(40, 9, dtype=dtype, requires_grad=True)
    torch.library.opcheck(OPS.drop_connect, [weight, 0.3],
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    _, kept = OPS.drop_connect(weight.detach(), 0.3)
    torch.library.opcheck(OPS.drop_connect_backward,
                          [torch.randn(40, 9, dtype=dtype), kept, 0.3])


def differentiable_layer(*variant_args, **variant):
    args = layer_args(**variant)
    tensors = [a for a in args[:8] if a is not None]
    positions = [i for i, a in enumerate(args[:8]) if a is not None]

    def function(*inputs):
        call = list(args)
        for position, value in zip(positions, inputs):
            call[position] = value
        return ops.layer_forward(*call)

    return function, tensors


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_gradcheck_layer(variant):
    function, inputs = differentiable_layer(**variant)
    assert torch.autograd.gradcheck(function, inputs)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_gradgradcheck_layer(variant):
    function, inputs = differentiable_layer(steps=3, batch=3, hidden=3, input_size=2, **variant)
    assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_and_gradgradcheck_cell(bias):
    inputs = [a for a in cell_args(bias)[:7] if a is not None]

    def function(*tensors):
        x, hx, cx, w_ih, w_hh, *biases = tensors
        b_ih, b_hh = biases if biases else (None, None)
        return ops.cell_forward(x, hx, cx, w_ih, w_hh, b_ih, b_hh)

    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("outputs", ["all", "output", "h_n and c_n", "cells"])
def test_layer_gradients_with_create_graph_are_the_kernels(variant, outputs):
    """backward with create_graph=True (the differentiable path) gives the gradients the fused
    backward gives, whichever outputs carry a gradient, the cell sequence's included."""
    torch.manual_seed(len(str(variant)) + len(outputs))
    args = layer_args(**variant)
    args[1].requires_grad_(False)  # h0: no gradient, and none returned
    wanted = [a for a in args[:8] if a is not None and a.requires_grad]
    sample = ops.layer_forward(*args, return_cells=True)
    weights = [torch.randn_like(t) for t in sample]

    def gradients(create_graph):
        output, h_n, c_n, cells = ops.layer_forward(*args, return_cells=True)
        chosen = {"all": [0, 1, 2, 3], "output": [0], "h_n and c_n": [1, 2], "cells": [3]}
        picked = [(output, h_n, c_n, cells)[i] for i in chosen[outputs]]
        return torch.autograd.grad(picked, wanted, [weights[i] for i in chosen[outputs]],
                                   create_graph=create_graph)

    plain, graph = gradients(False), gradients(True)
    assert len(plain) == len(wanted) >= 4
    for a, b in zip(plain, graph):
        assert b.requires_grad and not a.requires_grad
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("outputs", ["h and c", "h", "c"])
def test_cell_gradients_with_create_graph_are_the_kernels(bias, outputs):
    """backward with create_graph=True (the differentiable path) gives the gradients the fused
    backward gives, for gradients of h', of c' or of both, and some need none."""
    args = cell_args(bias)
    args[3].requires_grad_(False)  # w_ih: no gradient, and none returned
    wanted = [a for a in args[:7] if a is not None and a.requires_grad]
    grad_h, grad_c = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)

    def gradients(create_graph):
        h, c = ops.cell_forward(*args[:7])
        chosen = {"h and c": ([h, c], [grad_h, grad_c]), "h": ([h], [grad_h]),
                  "c": ([c], [grad_c])}[outputs]
        return torch.autograd.grad(chosen[0], wanted, chosen[1], create_graph=create_graph)

    plain, graph = gradients(False), gradients(True)
    assert len(plain) == len(wanted) == (5 if bias else 3) + 1
    for a, b in zip(plain, graph):
        assert b.requires_grad and not a.requires_grad
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_reference_matches_kernel():
    """The differentiable reference (double backward's path) agrees with the fused kernel."""
    for variant in VARIANTS:
        args = layer_args(requires_grad=False, **variant)
        fused = ops.layer_forward(*args)
        reference = ops.reference_layer_forward(*args[:10])
        for a, b in zip(fused, reference):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_backward_without_saved_state_is_refused():
    args = layer_args(requires_grad=False, training=False)
    output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, _ = OPS.lstm_layer_forward(*args)
    x, h0, c0, w_ih, w_hh, *_ = args
    with pytest.raises(RuntimeError, match="training=True"):
        OPS.lstm_layer_backward(output, h_n, c_n, x, w_ih, w_hh, None, None, gates, cell_prev,
                                hidden_prev, hidden_raw, False, True, True, True)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.__setitem__(0, a[0][:, :, :4]), "w_ih"),
    (lambda a: a.__setitem__(1, a[1][:2]), "h0"),
    (lambda a: a.__setitem__(2, a[2][:, :5]), "c0"),
    (lambda a: a.__setitem__(1, a[1].float()), "dtype"),
    (lambda a: a.__setitem__(5, a[5][:7]), "b_ih"),
    (lambda a: a.__setitem__(0, a[0][:0]), "larger than 0"),
    (lambda a: a.__setitem__(0, a[0][0]), "input of shape"),
    (lambda a: a.__setitem__(0, a[0].long()), "floating point"),
])
def test_layer_op_errors(change, message):
    args = layer_args(requires_grad=False)
    change(args)
    with pytest.raises(RuntimeError, match=message):
        OPS.lstm_layer_forward(*args)


@pytest.mark.parametrize("sizes,message", [
    ([3, 2, 0], "positive and non-increasing"),
    ([1, 2, 3], "positive and non-increasing"),
    ([3, 3, 1], "rows but batch_sizes sum"),
])
def test_layer_op_rejects_bad_batch_sizes(sizes, message):
    args = layer_args(requires_grad=False, packed=True)
    args[8] = torch.tensor(sizes)
    with pytest.raises(RuntimeError, match=message):
        OPS.lstm_layer_forward(*args)
    args[8] = torch.tensor([3, 2, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="int64 CPU"):
        OPS.lstm_layer_forward(*args)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 3e-7), (torch.float64, 1e-15)])
def test_gate_activations_over_the_whole_range(dtype, tolerance):
    """The saved gate activations are sigmoid/tanh of the pre-activations: with W_ih = I and
    W_hh = 0 the pre-activations are the input itself, swept from -100 to 100 (zero, tiny and
    huge values included), and compared with fp64 math."""
    grid = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([0.0, 1e-30, -1e-30, 1e-7, 88.5, -88.5])]).double()
    hidden = 64
    pre = torch.cat([grid, grid[torch.randperm(len(grid))][: (-len(grid)) % (4 * hidden)]])
    x = pre.view(1, -1, 4 * hidden).to(dtype)
    batch = x.shape[1]
    eye = torch.eye(4 * hidden, dtype=dtype)
    zeros = torch.zeros(batch, hidden, dtype=dtype)
    _, _, c_n, gates, *_ = OPS.lstm_layer_forward(
        x, zeros, zeros, eye, torch.zeros(4 * hidden, hidden, dtype=dtype), None, None, None,
        None, False, True)
    exact_pre = x.double().view(batch, 4 * hidden)
    i, f, g, o = exact_pre.chunk(4, dim=1)
    expected = torch.cat([torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)], 1)
    error = (gates.double() - expected).abs() / expected.abs().clamp_min(1.0)
    assert error.max().item() <= tolerance
    torch.testing.assert_close(c_n.double(), torch.sigmoid(i) * torch.tanh(g), rtol=tolerance * 4,
                               atol=tolerance * 4)
    nan_input = x.clone()
    nan_input[0, 0, 0] = float("nan")
    _, _, _, nan_gates, *_ = OPS.lstm_layer_forward(
        nan_input, zeros, zeros, eye, torch.zeros(4 * hidden, hidden, dtype=dtype), None, None,
        None, None, False, True)
    assert torch.isnan(nan_gates[0, 0])


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("batch,steps", [(1, 6), (3, 6), (3, 60), (9, 6)],
                         ids=["one row", "few rows", "few rows, long", "panels"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("biases", ["both", "b_ih", "b_hh"])
def test_the_recurrence_adds_either_bias_to_the_products(biases, training, batch, steps, dtype,
                                                         tolerance):
    """The CPU recurrence adds b_ih and b_hh to the input projection as it reads it (the
    product leaves them out): each bias alone, and both, in every form of the kernel (dot
    products at one row or a few over a short sequence, panels otherwise), against the
    differentiable reference in fp64."""
    torch.manual_seed(batch * 100 + steps)
    args = layer_args(steps=steps, batch=batch, input_size=19, hidden=37, training=training,
                      dtype=dtype, requires_grad=False)
    args[5:7] = [args[5] if biases != "b_hh" else None, args[6] if biases != "b_ih" else None]
    output, h_n, c_n = ops.layer_forward(*args)
    expected = ops.reference_layer_forward(*[a.double() if isinstance(a, torch.Tensor) else a
                                             for a in args[:10]])
    for actual, reference in zip((output, h_n, c_n), expected):
        error = ((actual.double() - reference).abs().max() / reference.abs().max()).item()
        assert error < tolerance, f"{error:.2e}"
