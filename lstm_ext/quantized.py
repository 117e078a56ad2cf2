"""int8 weights for CPU serving: lstm_ext.quantize_dynamic(model) turns every LSTM (and
LSTMCell) of a model into a QuantizedLSTM (QuantizedLSTMCell), whose weights are int8 with one
fp32 scale per output row (symmetric, per output channel) while the input, the state and the
gate math stay fp32.

Small-batch inference (a decode step, short sequences of a few rows) reads the weights once
per step, so a quarter of the bytes is most of the time saved: there the CPU kernel multiplies
the int8 rows in place, in integers, by each step's h and x rows rounded to int16 on the scale
of the row's largest magnitude (at most 1/65534 of it off; the weights' own rounding is 1/254).
Larger batches dequantize W_hh into the recurrence's packed panels, and
layers with a projection (W_hr int8 too) run the fp32 step loop on the dequantized weights. The
module is for inference: no gradients flow through it.
"""

import contextlib
import copy
import warnings

import torch
from torch import nn

from . import ops
from .nn import LSTM, LSTMCell, _capturing, _exporting_onnx

_INT8_MAX = 127


def quantize_weight(weight):
    """(int8 rows, fp32 scale per row) with weight ~= int8 * scale[:, None]: each row scaled so
    that its largest magnitude maps to 127, rounded to nearest."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / _INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    values = torch.round(weight / scale[:, None]).clamp(-_INT8_MAX, _INT8_MAX)
    return values.to(torch.int8), scale


def dequantize_weight(values, scale):
    return values.float() * scale[:, None]


class _Int8Weights:
    """What the int8 modules share: their float parameters become int8 weight buffers with
    `<name>_scale` beside them (biases stay fp32 buffers), filled from a float module, and a
    state_dict with float weights is refused rather than rounded silently."""

    def _weight_names(self):
        raise NotImplementedError

    def _make_int8_buffers(self):
        for name in self._weight_names():
            value = self._parameters.pop(name)
            if value is None:  # no bias: the attribute stays, as None
                self.register_buffer(name, None)
                continue
            value = value.detach()
            if name.startswith("weight"):
                values, scale = quantize_weight(value)
                self.register_buffer(name, values)
                self.register_buffer(name + "_scale", scale)
            else:
                self.register_buffer(name, value.float())

    def _quantize_from(self, module):
        with torch.no_grad():
            for name in self._weight_names():
                value = getattr(module, name)
                if value is None:
                    continue
                if name.startswith("weight"):
                    values, scale = quantize_weight(value)
                    getattr(self, name).copy_(values)
                    getattr(self, name + "_scale").copy_(scale)
                else:
                    getattr(self, name).copy_(value)
        return self.train(module.training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._weight_names():
            value = state_dict.get(prefix + name)
            if name.startswith("weight") and value is not None and value.dtype != torch.int8:
                raise RuntimeError(
                    f"{prefix}{name} is {value.dtype}, but a {type(self).__name__} holds int8 "
                    f"weights: load the float state_dict into the float module and convert it "
                    f"with lstm_ext.quantize_dynamic")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _scale(self, name):
        return self._buffers[name + "_scale"]


def _why_not_convertible(module):
    """Why a float LSTM or LSTMCell cannot have int8 weights, or None."""
    weight = next(module.parameters())
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return (f"int8 weights are for float32 modules on the CPU; this one is {weight.dtype} "
                f"on {weight.device}: move it with .float().cpu() first")
    if any(getattr(module, "zoneout", ())):
        return (f"its zoneout={module.zoneout} changes the eval-mode update, which the int8 "
                f"LSTM does not have")
    if getattr(module, "layer_norm", False):
        return "it normalises its gates and cell (layer_norm=True), which the int8 LSTM does not"
    if getattr(module, "return_cell_sequence", False):
        return "it returns the cell sequence, which the int8 LSTM does not"
    return None


def _check_float_cpu(module, kinds):
    if not isinstance(module, kinds):
        raise TypeError(f"from_float takes one of {[k.__name__ for k in kinds]}, got "
                        f"{type(module).__name__}")
    reason = _why_not_convertible(module)
    if reason:
        raise ValueError(reason)


def _refuse_transforms(module):
    """The int8 ops run without gradients, so under a torch.func transform or forward-mode AD
    their derivative would come out as zeros: refused instead."""
    if ops.under_transform():
        raise RuntimeError(
            f"{type(module).__name__} is for inference only (int8 weights, no derivative): "
            f"torch.func transforms and forward-mode AD cannot differentiate or batch it; apply "
            f"them to the float model it was made from")


class QuantizedLSTM(_Int8Weights, LSTM):
    """An LSTM with int8 weights for inference on the CPU (see the module docstring); built from
    a float LSTM by :meth:`from_float` or :func:`quantize_dynamic`. Inputs, outputs, states and
    their errors are those of the LSTM it came from. Its state_dict holds each weight as int8
    beside ``<name>_scale``, and the biases in fp32."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._make_int8_buffers()
        self._init_flat_weights()

    def _weight_names(self):
        return self._flat_weights_names

    @classmethod
    def from_float(cls, module, use_precomputed_fake_quant=False):
        """The int8 version of a float32 lstm_ext.LSTM or nn.LSTM on the CPU (configuration,
        train/eval mode; weights quantized per output row). The second argument is what
        torch.ao.quantization passes; it changes nothing here."""
        _check_float_cpu(module, (LSTM, nn.LSTM))
        return cls(module.input_size, module.hidden_size, module.num_layers, module.bias,
                   module.batch_first, module.dropout, module.bidirectional,
                   proj_size=module.proj_size)._quantize_from(module)

    def check_input(self, input, batch_sizes):
        # nn.LSTM's checks, but the input must be float32 rather than the weights' dtype.
        if input.dtype != torch.float32:
            raise ValueError(f"QuantizedLSTM input dtype ({input.dtype}) must be torch.float32 "
                             f"(its weights are int8, its math fp32): convert the input with "
                             f"input.float()")
        expected_input_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_input_dim:
            raise RuntimeError(
                f"input must have {expected_input_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.size(-1)}")

    def _current_weights(self):
        return [self._buffers[name] for name in self._flat_weights_names]

    def extra_repr(self):
        return super().extra_repr() + ", int8 weights"

    def _run_layers(self, data, batch_sizes, weights, h0, c0):
        if _exporting_onnx():
            raise NotImplementedError("torch.onnx.export of a QuantizedLSTM is not supported: "
                                      "export the float model")
        _refuse_transforms(self)
        num_directions = 2 if self.bidirectional else 1
        per_direction = len(weights) // (self.num_layers * num_directions)
        names = self._flat_weights_names
        if not (self.training and self.dropout > 0 and self.num_layers > 1) and not _capturing():
            # Every layer in one call (lstm_layers), each weight matrix with its scale.
            scales = [self._scale(name) for name in names if name.startswith("weight")]
            with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
                return ops.layers_forward(data, h0, c0, weights, self.bias, self.num_layers,
                                          self.bidirectional, batch_sizes, scales)
        h_n, c_n = [], []
        layer_input = data
        h0, c0 = h0.unbind(0), c0.unbind(0)
        # Inference only: the int8 op has no backward.
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            for layer in range(self.num_layers):
                if layer > 0 and self.training and self.dropout > 0:
                    layer_input = nn.functional.dropout(layer_input, self.dropout, training=True)
                outputs = []
                for direction in range(num_directions):
                    index = layer * num_directions + direction
                    first = index * per_direction
                    w = weights[first:first + per_direction]
                    b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
                    w_hr, w_hr_scale = None, None
                    if self.proj_size > 0:
                        w_hr = w[-1]
                        w_hr_scale = self._scale(names[first + per_direction - 1])
                    output, h, c = torch.ops.lstm_ext.lstm_int8_layer_forward(
                        layer_input, h0[index], c0[index],
                        w[0], self._scale(names[first]), w[1], self._scale(names[first + 1]),
                        b_ih, b_hh, w_hr, w_hr_scale, batch_sizes, direction == 1)
                    outputs.append(output)
                    h_n.append(h)
                    c_n.append(c)
                layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=-1)
        return layer_input, torch.stack(h_n), torch.stack(c_n)


class QuantizedLSTMCell(_Int8Weights, LSTMCell):
    """An LSTMCell with int8 weights for inference on the CPU: one step is a decode step of the
    int8 layer (x multiplied by int8 W_ih in the same pass as W_hh); inputs, outputs and errors
    are the float cell's. Built by :meth:`from_float` or :func:`quantize_dynamic`."""

    def __init__(self, input_size, hidden_size, bias=True):
        super().__init__(input_size, hidden_size, bias)
        self._make_int8_buffers()

    def _weight_names(self):
        return ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]

    @classmethod
    def from_float(cls, module, use_precomputed_fake_quant=False):
        """The int8 version of a float32 lstm_ext.LSTMCell or nn.LSTMCell on the CPU."""
        _check_float_cpu(module, (LSTMCell, nn.LSTMCell))
        return cls(module.input_size, module.hidden_size, module.bias)._quantize_from(module)

    def extra_repr(self):
        return super().extra_repr() + ", int8 weights"

    def _weights(self):
        return tuple(self._buffers[name] for name in self._weight_names())

    def _check_input_dtype(self, input, weight):
        if input.dtype != torch.float32:
            raise RuntimeError(f"QuantizedLSTMCell input dtype ({input.dtype}) must be "
                               f"torch.float32 (its weights are int8, its math fp32): convert "
                               f"the input with input.float()")

    def _step(self, input, hx, weights):
        if _exporting_onnx():
            raise NotImplementedError("torch.onnx.export of a QuantizedLSTMCell is not "
                                      "supported: export the float model")
        _refuse_transforms(self)
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            _, h, c = torch.ops.lstm_ext.lstm_int8_layer_forward(
                input.unsqueeze(0), hx[0], hx[1], weights[0], self._scale("weight_ih"),
                weights[1], self._scale("weight_hh"), weights[2], weights[3], None, None,
                None, False)
        return h, c


# Float module classes and their int8 versions.
_INT8_VERSIONS = {LSTM: QuantizedLSTM, nn.LSTM: QuantizedLSTM, LSTMCell: QuantizedLSTMCell,
                  nn.LSTMCell: QuantizedLSTMCell}


def quantize_dynamic(model, inplace=False):
    """The model with each float32 CPU lstm_ext.LSTM or nn.LSTM (the model itself, or any
    submodule) replaced by a :class:`QuantizedLSTM`, and each LSTMCell (ours or torch's) by a
    :class:`QuantizedLSTMCell`; a copy unless ``inplace``. A module that cannot be converted
    (another dtype or device) stays as it is, with a warning naming it and why."""
    if not inplace:
        model = copy.deepcopy(model)
    if _convertible(model, "the model"):
        return _INT8_VERSIONS[type(model)].from_float(model)
    for name, child in list(model.named_modules()):
        for child_name, module in list(child.named_children()):
            full_name = f"{name}.{child_name}" if name else child_name
            if _convertible(module, full_name):
                setattr(child, child_name, _INT8_VERSIONS[type(module)].from_float(module))
    return model


def _convertible(module, name):
    if type(module) not in _INT8_VERSIONS:
        return False
    reason = _why_not_convertible(module)
    if reason:
        warnings.warn(f"lstm_ext.quantize_dynamic left {name} in float: {reason}", stacklevel=3)
        return False
    return True


def _register_with_torch_quantization():
    """torch.ao.quantization.quantize_dynamic(model, {lstm_ext.LSTM, lstm_ext.LSTMCell})
    converts ours to their int8 versions, as it converts nn.LSTM to its own dynamic int8 LSTM."""
    try:
        from torch.ao.quantization import quantization_mappings
    except ImportError:  # a torch without the (deprecated) eager-mode quantization
        return
    for float_class in (LSTM, LSTMCell):
        quantization_mappings.DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS.setdefault(
            float_class, _INT8_VERSIONS[float_class])


_register_with_torch_quantization()
