"""What lstm_ext.LSTM becomes under torch.onnx.export(..., dynamo=True): one standard ONNX
`LSTM` node per layer (both directions in one node), so that onnxruntime and every other ONNX
backend run it with their own LSTM kernels and no custom op. A layer with a projection, which
the ONNX operator lacks, becomes an ONNX `Scan` over time per direction (the cell in plain
ONNX ops), so length and batch stay dynamic there too.

ONNX's LSTM orders the gates i, o, f, c where PyTorch has i, f, g, o, keeps the input and
recurrent biases as one [Wb, Rb] row, stacks the directions first, and returns Y as
(T, directions, B, H); the weights are rearranged here, in the exported graph, so the model's
parameters stay PyTorch's.
"""

import torch
import torch.nn.functional as F

from . import ops

# The ONNX LSTM operator's version whose definition this follows (unchanged since opset 14).
LSTM_OPSET = 14


def _onnx_gate_order(tensor):
    """Rows of PyTorch's gate order (i, f, g, o) in ONNX's (i, o, f, c)."""
    i, f, g, o = tensor.chunk(4, 0)
    return torch.cat([i, o, f, g], 0)


def lstm_layer(layer_input, h0, c0, directions, hidden_size, has_bias):
    """One layer, every direction, as an ONNX LSTM node.

    layer_input: (T, B, I); h0, c0: (directions, B, H); `directions`: per direction its
    (w_ih, w_hh, b_ih, b_hh) (biases None without bias). Returns the layer's output
    (T, B, directions * H) and its final h and c (directions, B, H)."""
    steps, batch = layer_input.shape[0], layer_input.shape[1]
    count = len(directions)
    w = torch.stack([_onnx_gate_order(d[0]) for d in directions])
    r = torch.stack([_onnx_gate_order(d[1]) for d in directions])
    b = (torch.stack([torch.cat([_onnx_gate_order(d[2]), _onnx_gate_order(d[3])])
                      for d in directions]) if has_bias else None)
    y, y_h, y_c = torch.onnx.ops.symbolic_multi_out(
        "::LSTM",
        [layer_input, w, r, b, None, h0, c0],
        {"hidden_size": hidden_size, "direction": "bidirectional" if count == 2 else "forward"},
        dtypes=(layer_input.dtype,) * 3,
        shapes=[(steps, count, batch, hidden_size), (count, batch, hidden_size),
                (count, batch, hidden_size)],
        version=LSTM_OPSET,
    )
    output = y.transpose(1, 2).reshape(steps, batch, count * hidden_size)
    return output, y_h, y_c


def lstm_layer_scan(layer_input, h0, c0, directions, zoneout=(0.0, 0.0), return_cells=False,
                    norms=None):
    """One layer, each direction an ONNX Scan over time (for a projection, zoneout, the cell
    sequence or the LayerNorm LSTM, which the ONNX LSTM operator lacks); `norms`: per
    direction the six norm parameters of lstm_ext.LSTM(layer_norm=True), or None.

    layer_input: (T, B, I); h0: (directions, B, P), c0: (directions, B, H); `directions`:
    per direction its (w_ih, w_hh, b_ih, b_hh, w_hr) (biases None and w_hr None where
    absent); zoneout: (z_c, z_h), applied as its eval-mode expectation. Returns the layer's
    output (T, B, directions * P), its final h and c, and with return_cells the c of every
    step (T, B, directions * H)."""
    z_c, z_h = zoneout
    from torch._higher_order_ops.scan import scan  # torch.scan's home, a prototype upstream

    outputs, cells, h_n, c_n = [], [], [], []
    for index, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(directions):
        norm = norms[index] if norms is not None else None
        if norm is not None:
            gates_x = ops.layer_norm_input_part(layer_input, w_ih, b_ih, b_hh, norm[0:2])
        else:
            gates_x = layer_input @ w_ih.t()
            if b_ih is not None:
                gates_x = gates_x + (b_ih + b_hh)

        def step(carry, gates, w_hh=w_hh, w_hr=w_hr, norm=norm):
            product = carry[0] @ w_hh.t()
            if norm is not None:
                product = F.layer_norm(product, product.shape[-1:], *norm[2:4])
            h, c = ops.cell_update(gates + product, carry[1], w_hr,
                                   None if norm is None else norm[4:6])
            if z_c:
                c = z_c * carry[1] + (1 - z_c) * c
            if z_h:
                h = z_h * carry[0] + (1 - z_h) * h
            return (h, c), (h.clone(), c.clone())  # a scan output may not alias its carry

        (h, c), (output, cell) = scan(step, (h0[index], c0[index]), gates_x,
                                      reverse=index == 1)
        outputs.append(output)
        cells.append(cell)
        h_n.append(h)
        c_n.append(c)
    output = torch.cat(outputs, dim=-1)
    extra = [torch.cat(cells, dim=-1)] if return_cells else []
    return output, torch.stack(h_n), torch.stack(c_n), *extra


def check_exportable(module, packed):
    if packed:
        raise NotImplementedError(
            "torch.onnx.export of lstm_ext.LSTM with a PackedSequence input is not supported "
            "yet: export a model that takes the padded batch (and applies lengths after the "
            "LSTM), or use torch.export / AOTInductor, which support packed input")
