"""The Python side of the torch.ops.lstm_ext ops: shape functions for FakeTensor (torch.compile,
export) and the differentiable reference behind double backward. The schemas, the kernels and
the autograd formulas live in csrc/."""

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor

_ops = torch.ops.lstm_ext
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels do gate math and keep the cell in (fp32 for bf16/fp16 storage)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def under_transform():
    """Whether a torch.func transform (grad, vjp, jacrev, jvp, vmap, ...) or forward-mode AD
    (torch.autograd.forward_ad.dual_level) is active. Their tensors cannot pass through the ops'
    C++ autograd formulas (which have no forward-mode rule either), so the layers then run as
    the differentiable reference below (reference_layer_forward): the same math in torch ops,
    step by step, which the transforms differentiate and batch as they do any torch code."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def _by_reference(reference, input, tensors, *args, **kwargs):
    """reference(*tensors, *args, **kwargs) in the math dtype (fp32 for bf16 and fp16 storage,
    as the kernels' gate math and cell), its tensors returned in input's dtype."""
    dtype = math_dtype(input.dtype)

    def up(t):
        if isinstance(t, (list, tuple)):
            return [up(item) for item in t]
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
    if dtype != input.dtype:
        tensors = [up(t) for t in tensors]
    return tuple(t.to(input.dtype) for t in reference(*tensors, *args, **kwargs))


def layer_forward(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None,
                  reverse=False, training=True, recurrent_mask=None, zoneout_cell=None,
                  zoneout_hidden=None, return_cells=False):
    """One LSTM layer in one direction over a whole sequence; see csrc/ops.cpp for the layout.
    The variants' tensors, in math_dtype(input.dtype): recurrent_mask (B, R) multiplies h
    before every W_hh product; zoneout_cell (N or 1, H) and zoneout_hidden (N or 1, R) weigh
    the previous state, c = d c_prev + (1 - d) c~ (h likewise). Returns (output, h_n, c_n),
    and with return_cells the c of every step, shaped like output with H features."""
    if under_transform():
        return _by_reference(
            reference_layer_forward, input,
            (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, recurrent_mask,
             zoneout_cell, zoneout_hidden), return_cells=return_cells)
    output, h_n, c_n, _, _, _, _, cells = _ops.lstm_layer_forward(
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, training,
        recurrent_mask, zoneout_cell, zoneout_hidden, return_cells
    )
    return (output, h_n, c_n, cells) if return_cells else (output, h_n, c_n)


def layers_forward(input, h0, c0, weights, has_biases, num_layers, bidirectional,
                   batch_sizes=None, scales=()):
    """Every layer and direction of a plain LSTM for inference, in one call (layer_forward per
    layer and direction, composed in C++: csrc/ops.cpp). weights as nn.LSTM's _flat_weights;
    int8 weights come with `scales`, one per weight matrix in the same order. Returns
    (output, h_n, c_n)."""
    return _ops.lstm_layers.default(input, h0, c0, weights, has_biases, num_layers,
                                    bidirectional, batch_sizes, scales)


def layer_norm_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                       training, norms, recurrent_mask=None, return_cells=False,
                       zoneout_cell=None, zoneout_hidden=None):
    """One LayerNorm-LSTM layer in one direction (csrc/layer_norm_lstm.cpp); `norms` are the
    gains and biases of the norms of W_ih x, W_hh h (4H each) and c (H); zoneout's weights as
    for layer_forward. Returns (output, h_n, c_n), and with return_cells the c after every
    step (after zoneout), laid out as the output: the op's saved cell sequence (kept for that
    even without training), whose gradient backward takes."""
    if under_transform():
        output, h_n, c_n, *cells = _by_reference(
            reference_layer_norm_forward, input,
            (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, norms,
             recurrent_mask), return_cells=return_cells, zoneout_cell=zoneout_cell,
            zoneout_hidden=zoneout_hidden)
        if cells and batch_sizes is None:
            cells = [cells[0].view(input.shape[0], input.shape[1], cells[0].shape[-1])]
        return output, h_n, c_n, *cells
    output, h_n, c_n, _, _, cell, *_ = _ops.lstm_layer_norm_forward(
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
        training or return_cells, *norms, recurrent_mask, zoneout_cell, zoneout_hidden)
    if not return_cells:
        return output, h_n, c_n
    cells = cell.to(input.dtype)
    if batch_sizes is None:
        cells = cells.view(input.shape[0], input.shape[1], cells.shape[-1])
    return output, h_n, c_n, cells


def bernoulli_mask(size, probability, value, dtype, device):
    """A new tensor of `size`, each entry `value` with probability `probability`, else 0, drawn
    from torch's generator for `device`: on the CPU by the library's Philox kernel
    (csrc/cpu/random_mask.h; several times faster than torch.rand there), elsewhere as
    torch.rand(size) < probability."""
    if torch.device(device).type == "cpu":
        return _ops.bernoulli_mask(list(size), probability, value, dtype)
    mask = (torch.rand(size, dtype=dtype, device=device) < probability).to(dtype)
    return mask if value == 1 else mask * value


def dropout_mask(shape, p, like):
    """Entries 1 / (1 - p) with probability 1 - p, else 0, in the math dtype of `like` (fp32
    for bf16/fp16, so that the scale is not rounded to 8 bits), on its device."""
    dtype = math_dtype(like.dtype)
    if p >= 1:
        return torch.zeros(shape, dtype=dtype, device=like.device)
    return bernoulli_mask(shape, 1 - p, 1 / (1 - p), dtype, like.device)


def drop_connect(weight, p):
    """DropConnect (Wan et al. 2013): weight * M, M with entries 1 / (1 - p) with probability
    1 - p, else 0, fresh per call, in the math dtype of `weight` and back. On the CPU in fp32 and
    fp64 one op (csrc/cpu/random_mask.h) writes the product into memory kept across calls and
    keeps M as bits for the backward (the mask bernoulli_mask would draw in its place); at B 1
    the mask, the product and the gradient's product each in fresh pages cost more than the
    masking itself."""
    if (0 < p < 1 and weight.device.type == "cpu" and weight.layout == torch.strided
            and weight.dtype in (torch.float32, torch.float64) and not under_transform()):
        return _ops.drop_connect(weight, p)[0]
    return (weight * dropout_mask(weight.shape, p, weight)).to(weight.dtype)


def cell_forward(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, training=True):
    """One LSTMCell step. Returns (h, c)."""
    if under_transform():
        return _by_reference(_reference_cell_forward, input,
                             (input, hx, cx, w_ih, w_hh, b_ih, b_hh))
    h, c, *_ = _ops.lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, training)
    return h, c


# ---------------------------------------------------------------------------------------------
# Shape functions


@torch.library.register_fake("lstm_ext::bernoulli_mask")
def _bernoulli_mask_fake(size, probability, value, dtype):
    return torch.empty(size, dtype=dtype)


# drop_connect's kept bits: 16 bytes per 128 entries (csrc/cpu/random_mask.cpp).
def _kept_bytes(numel):
    return (numel + 127) // 128 * 16


@torch.library.register_fake("lstm_ext::drop_connect")
def _drop_connect_fake(weight, p):
    return (torch.empty(weight.shape, dtype=weight.dtype),
            torch.empty(_kept_bytes(weight.numel()), dtype=torch.uint8))


@torch.library.register_fake("lstm_ext::drop_connect_backward")
def _drop_connect_backward_fake(grad, kept, p):
    return torch.empty(grad.shape, dtype=grad.dtype)


@torch.library.register_fake("lstm_ext::lstm_layer_forward")
def _layer_forward_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                        training, recurrent_mask=None, zoneout_cell=None, zoneout_hidden=None,
                        return_cells=False):
    hidden_size = w_hh.shape[0] // 4
    output_size = w_hh.shape[1]
    torch._check(input.dim() == (2 if batch_sizes is not None else 3),
                 lambda: f"lstm_layer_forward: unexpected input of shape {tuple(input.shape)}")
    torch._check(input.shape[-1] == w_ih.shape[1],
                 lambda: f"lstm_layer_forward: input has {input.shape[-1]} features, w_ih expects "
                         f"{w_ih.shape[1]}")
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    saved_rows = rows if training else 0
    output = input.new_empty((*input.shape[:-1], output_size))
    h_n = input.new_empty(h0.shape)
    c_n = input.new_empty(c0.shape)
    gates = input.new_empty((saved_rows, 4 * hidden_size))
    cell_prev = input.new_empty((saved_rows, hidden_size), dtype=math_dtype(input.dtype))
    hidden_prev = input.new_empty((saved_rows, output_size))
    hidden_raw = input.new_empty((saved_rows if w_hr is not None else 0, hidden_size))
    cells = (input.new_empty((*input.shape[:-1], hidden_size)) if return_cells
             else input.new_empty((0, hidden_size)))
    return output, h_n, c_n, gates, cell_prev, hidden_prev, hidden_raw, cells


@torch.library.register_fake("lstm_ext::lstm_layer_norm_forward")
def _layer_norm_forward_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                             training, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                             ln_cell_weight, ln_cell_bias, recurrent_mask=None,
                             zoneout_cell=None, zoneout_hidden=None):
    hidden_size, output_size = w_hh.shape[0] // 4, w_hh.shape[1]
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    saved = rows if training else 0
    math = math_dtype(input.dtype)

    def acc(*shape):
        return input.new_empty(shape, dtype=math)

    return (input.new_empty((*input.shape[:-1], output_size)), input.new_empty(h0.shape),
            input.new_empty(c0.shape), acc(saved, 4 * hidden_size), acc(saved, hidden_size),
            acc(saved, hidden_size), acc(saved, 4 * hidden_size), acc(saved, 4 * hidden_size),
            acc(saved, 6),
            acc(saved, output_size),
            acc(saved if w_hr is not None else 0, hidden_size))


@torch.library.register_fake("lstm_ext::lstm_layer_norm_backward")
def _layer_norm_backward_fake(grad_output, grad_h_n, grad_c_n, input, w_ih, w_hh, w_hr,
                              batch_sizes, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias,
                              ln_cell_weight, ln_cell_bias, gates, cell_prev, cell, products,
                              input_products, stats, hidden_prev, hidden_raw, reverse, has_bias,
                              recurrent_mask=None, input_grad=True, grad_cells=None,
                              zoneout_cell=None, zoneout_hidden=None):
    like = [grad_h_n, grad_c_n, w_ih, w_hh]
    bias = input.new_empty((w_hh.shape[0],) if has_bias else (0,))
    projection = input.new_empty(w_hr.shape if w_hr is not None else (0,))
    norms = [ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias]
    return (_grad_like(input, input, input_grad), *(input.new_empty(t.shape) for t in like),
            bias, projection, *(input.new_empty(t.shape) for t in norms))


@torch.library.register_fake("lstm_ext::lstm_int8_layer_forward")
def _int8_layer_forward_fake(input, h0, c0, w_ih, w_ih_scale, w_hh, w_hh_scale, b_ih, b_hh,
                             w_hr, w_hr_scale, batch_sizes, reverse):
    output = input.new_empty((*input.shape[:-1], w_hh.shape[1]))
    return output, input.new_empty(h0.shape), input.new_empty(c0.shape)


def _grad_like(input, tensor, wanted):
    """A gradient shaped like `tensor`, or the empty tensor the ops return when not asked."""
    return input.new_empty(tensor.shape if wanted else (0,))


@torch.library.register_fake("lstm_ext::lstm_layer_backward")
def _layer_backward_fake(grad_output, grad_h_n, grad_c_n, input, w_ih, w_hh, w_hr, batch_sizes,
                         gates, cell_prev, hidden_prev, hidden_raw, reverse, has_bias, input_grad,
                         weight_grads, recurrent_mask=None, zoneout_cell=None,
                         zoneout_hidden=None, grad_cells=None):
    hidden_size = w_hh.shape[0] // 4
    bias_shape = (4 * hidden_size,) if has_bias and weight_grads else (0,)
    return (
        _grad_like(input, input, input_grad),
        input.new_empty(grad_h_n.shape),
        input.new_empty(grad_c_n.shape),
        _grad_like(input, w_ih, weight_grads),
        _grad_like(input, w_hh, weight_grads),
        input.new_empty(bias_shape),
        _grad_like(input, w_hr, weight_grads) if w_hr is not None else input.new_empty((0,)),
    )


@torch.library.register_fake("lstm_ext::lstm_cell_forward")
def _cell_forward_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, training):
    hidden_size = w_hh.shape[1]
    saved_rows = input.shape[0] if training else 0
    return (
        input.new_empty(hx.shape),
        input.new_empty(cx.shape),
        input.new_empty((saved_rows, 4 * hidden_size)),
        input.new_empty((saved_rows, hidden_size), dtype=math_dtype(input.dtype)),
    )


@torch.library.register_fake("lstm_ext::lstm_cell_backward")
def _cell_backward_fake(grad_h, grad_c, input, hx, w_ih, w_hh, gates, cell_prev, has_bias,
                        input_grad, weight_grads):
    bias_shape = (w_hh.shape[0],) if has_bias and weight_grads else (0,)
    return (
        _grad_like(input, input, input_grad),
        input.new_empty(hx.shape),
        input.new_empty(hx.shape),
        _grad_like(input, w_ih, weight_grads),
        _grad_like(input, w_hh, weight_grads),
        input.new_empty(bias_shape),
    )


# ---------------------------------------------------------------------------------------------
# Autograd


def cell_update(gates, c, w_hr=None, cell_norm=None):
    """One LSTM step in torch ops from the pre-activations (rows, 4H) in the gate order i, f,
    g, o: returns (h, c'), h projected by w_hr where given; with cell_norm (gain, bias), the
    LayerNorm LSTM's h = o tanh(LN(c'))."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    normed = c if cell_norm is None else F.layer_norm(c, c.shape[-1:], *cell_norm)
    h = torch.sigmoid(o) * torch.tanh(normed)
    return (h if w_hr is None else h @ w_hr.t()), c


def layer_norm_input_part(x, w_ih, b_ih, b_hh, norm):
    """The LayerNorm LSTM's input part of every step at once: LN(x W_ih^T) + b_ih + b_hh."""
    gates_x = F.layer_norm(x @ w_ih.t(), (w_ih.shape[0],), *norm)
    for bias in (b_ih, b_hh):
        if bias is not None:
            gates_x = gates_x + bias
    return gates_x


def reference_layer_forward(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None,
                            batch_sizes=None, reverse=False, recurrent_mask=None,
                            zoneout_cell=None, zoneout_hidden=None, return_cells=False):
    """The layer op written with plain differentiable torch ops, step by step. Too slow for
    ordinary use; it serves double backward, whose graph autograd builds through these ops."""
    if batch_sizes is None:
        steps, batch = input.shape[0], input.shape[1]
        sizes = [batch] * steps
        x = input.reshape(steps * batch, input.shape[-1])
    else:
        sizes = batch_sizes.tolist()
        steps, x = len(sizes), input
    offsets = [sum(sizes[:t]) for t in range(steps)]
    gates_x = x @ w_ih.t()
    for bias in (b_ih, b_hh):
        if bias is not None:
            gates_x = gates_x + bias
    h, c = h0, c0
    outputs, cells = [None] * steps, [None] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        n = sizes[t]
        h_in = h[:n] if recurrent_mask is None else (h[:n] * recurrent_mask[:n]).to(h.dtype)
        h_new, c_new = cell_update(gates_x[offsets[t]:offsets[t] + n] + h_in @ w_hh.t(),
                                   c[:n], w_hr)
        for d, new, old in ((zoneout_cell, "c", c), (zoneout_hidden, "h", h)):
            if d is not None:
                d = d[offsets[t]:offsets[t] + n] if d.shape[0] > 1 else d
                value = d * old[:n] + (1 - d) * (c_new if new == "c" else h_new)
                if new == "c":
                    c_new = value.to(c.dtype)
                else:
                    h_new = value.to(h.dtype)
        outputs[t], cells[t] = h_new, c_new
        h = torch.cat([h_new, h[n:]])
        c = torch.cat([c_new, c[n:]])
    output, cell_sequence = torch.cat(outputs), torch.cat(cells)
    if batch_sizes is None:
        output = output.view(steps, sizes[0], -1)
        cell_sequence = cell_sequence.view(steps, sizes[0], -1)
    return (output, h, c, cell_sequence) if return_cells else (output, h, c)


def reference_layer_norm_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                                 reverse, norms, recurrent_mask=None, return_cells=False,
                                 zoneout_cell=None, zoneout_hidden=None):
    """The LayerNorm-LSTM layer op in plain differentiable torch ops, step by step: for double
    backward, as reference_layer_forward is for the plain layer. With return_cells also c
    after every step, (N, H) as the op saves it."""
    ih_weight, ih_bias, hh_weight, hh_bias, cell_weight, cell_bias = norms
    if batch_sizes is None:
        steps, batch = input.shape[0], input.shape[1]
        sizes, x = [batch] * steps, input.reshape(steps * batch, input.shape[-1])
    else:
        sizes, x = batch_sizes.tolist(), input
        steps = len(sizes)
    offsets = [sum(sizes[:t]) for t in range(steps)]
    gates_x = layer_norm_input_part(x, w_ih, b_ih, b_hh, (ih_weight, ih_bias))
    h, c = h0, c0
    outputs, cells = [None] * steps, [None] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        n = sizes[t]
        h_in = h[:n] if recurrent_mask is None else (h[:n] * recurrent_mask[:n]).to(h.dtype)
        product = F.layer_norm(h_in @ w_hh.t(), (w_hh.shape[0],), hh_weight, hh_bias)
        h_new, c_new = cell_update(gates_x[offsets[t]:offsets[t] + n] + product, c[:n], w_hr,
                                   (cell_weight, cell_bias))
        for d, old in ((zoneout_cell, c), (zoneout_hidden, h)):
            if d is not None:
                d = d[offsets[t]:offsets[t] + n] if d.shape[0] > 1 else d
                if old is c:
                    c_new = (d * c[:n] + (1 - d) * c_new).to(c.dtype)
                else:
                    h_new = (d * h[:n] + (1 - d) * h_new).to(h.dtype)
        outputs[t], cells[t] = h_new, c_new
        h, c = torch.cat([h_new, h[n:]]), torch.cat([c_new, c[n:]])
    output = torch.cat(outputs)
    if batch_sizes is None:
        output = output.view(steps, sizes[0], -1)
    return (output, h, c, torch.cat(cells)) if return_cells else (output, h, c)


def _differentiable_grads(forward, inputs, grad_outputs):
    """Gradients that are themselves differentiable (backward with create_graph=True): rerun
    the forward through reference_layer_forward and let autograd build the graph."""
    with torch.enable_grad():
        outputs = forward(*inputs)
        wanted = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
            create_graph=True, allow_unused=True,
        )
    result = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return result


# The ops' autograd formulas are C++'s (ops.cpp); their backward with create_graph=True comes
# here, for the differentiable reference.
_LIBRARY = torch.library.Library("lstm_ext", "IMPL")


def _every_gradient(grads, inputs):
    """The differentiable gradients as the op returns them: one per input, empty for an
    absent input or one that needs none, zeros for one the outputs do not depend on."""
    return [grad if grad is not None
            else torch.zeros_like(t) if t is not None and t.requires_grad
            else inputs[0].new_empty(0) for grad, t in zip(grads, inputs)]


def _layer_differentiable_backward(grad_output, grad_h_n, grad_c_n, grad_cells, input, h0, c0,
                                   w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                                   recurrent_mask, zoneout_cell, zoneout_hidden):
    inputs = (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    grads = _differentiable_grads(
        lambda *args: reference_layer_forward(*args, batch_sizes, reverse, recurrent_mask,
                                              zoneout_cell, zoneout_hidden,
                                              return_cells=grad_cells is not None),
        inputs, (grad_output, grad_h_n, grad_c_n, grad_cells))
    return _every_gradient(grads, inputs)


_LIBRARY.impl("lstm_layer_differentiable_backward", _layer_differentiable_backward,
              "CompositeImplicitAutograd")


def _reference_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    output, h, c = reference_layer_forward(input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh)
    return h, c


def _cell_differentiable_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    inputs = (input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    grads = _differentiable_grads(_reference_cell_forward, inputs, (grad_h, grad_c))
    return _every_gradient(grads, inputs)


_LIBRARY.impl("lstm_cell_differentiable_backward", _cell_differentiable_backward,
              "CompositeImplicitAutograd")


def _layer_norm_differentiable_backward(grad_output, grad_h_n, grad_c_n, grad_cells, input, h0,
                                        c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                                        norms, recurrent_mask, zoneout_cell, zoneout_hidden):
    inputs = (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *norms)
    grads = _differentiable_grads(
        lambda *args: reference_layer_norm_forward(
            *args[:8], batch_sizes, reverse, args[8:], recurrent_mask,
            return_cells=grad_cells is not None, zoneout_cell=zoneout_cell,
            zoneout_hidden=zoneout_hidden),
        inputs, (grad_output, grad_h_n, grad_c_n, grad_cells))
    return _every_gradient(grads, inputs)


_LIBRARY.impl("lstm_layer_norm_differentiable_backward", _layer_norm_differentiable_backward,
              "CompositeImplicitAutograd")
