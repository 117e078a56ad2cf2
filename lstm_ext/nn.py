"""Drop-in replacements for torch.nn.LSTM and torch.nn.LSTMCell running the fused lstm_ext ops.

Construction, parameters (names, shapes, order, initialisation), input handling and errors are
torch.nn's own: both classes build on the same torch.nn base classes (RNNBase, RNNCellBase) and
reuse nn.LSTM's argument checks, so a state_dict moves between the two implementations as is.
They are not subclasses of nn.LSTM on purpose: torch.compile refuses nn.LSTM instances.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import _onnx, ops

_ZERO_LENGTH = "Expected sequence length to be larger than 0 in RNN"


def _needs_saved_state(tensors):
    """Whether the ops must keep what backward needs. Under torch.jit.trace always: the flag
    becomes a constant of the traced graph, which must not depend on whether a call records
    gradients (trace checks its graph again without them), and a traced module must be able
    to train."""
    if torch.jit.is_tracing():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _without_autograd_dispatch():
    """Where no gradient can be recorded (under torch.no_grad) in plain eager code, the ops are
    called below the autograd dispatch keys, as torch.inference_mode does: their autograd
    kernels, registered from Python, would otherwise cost a trip into Python per call (5 us a
    layer, a few % of a decode step). Tracing and compiling keep the full dispatch."""
    if (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()):
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowADInplaceOrView()


def _capturing():
    """Whether torch.compile, torch.export or torch.jit.trace is capturing the call: they keep
    the per-layer ops (what their graphs, shape functions and exporters know), not lstm_layers,
    which composes them in C++."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.jit.is_tracing())


def _check_state_dtype_and_device(input, states, names):
    for state, name in zip(states, names):
        if state.dtype == input.dtype and state.device == input.device:
            continue
        if torch.is_autocast_enabled(input.device.type):
            return  # autocast casts every floating input of the op to its own dtype
        if state.dtype != input.dtype:
            raise RuntimeError(
                f"{name} has dtype {state.dtype} but input has dtype {input.dtype}; "
                f"pass {name}.to({input.dtype})"
            )
        if state.device != input.device:
            raise RuntimeError(
                f"{name} is on {state.device} but input is on {input.device}; "
                f"pass {name}.to({str(input.device)!r})"
            )


def _module_tensors(module, names):
    """The module's tensors of these names, read from _parameters, where attribute access would
    find them at ten times the cost (1-2 us a step), except the names that a parametrization
    (weight_norm, spectral_norm) or pruning has taken out of it: those as attributes, which
    compute them."""
    parameters = module._parameters
    return [parameters[name] if name in parameters else getattr(module, name) for name in names]


def _refuse_script(module):
    raise RuntimeError(
        f"torch.jit.script cannot compile lstm_ext.{type(module).__name__}: its forward calls "
        f"lstm_ext's own ops from Python that TorchScript does not parse (and TorchScript is "
        f"deprecated upstream). Use torch.jit.trace(model, example_inputs), torch.export.export"
        f" (also for AOTInductor) or torch.compile instead; or script a copy made with "
        f"module.to_torch(), which is a torch.nn.{type(module).__name__}.")


def _exporting_onnx():
    """Inside torch.onnx.export (dynamo=True), which traces the model as torch.export does;
    asked cheaply first, since the answer is wanted on every call (a decode step is ~100 us)."""
    return torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export()


def _check_device(input, weight):
    if input.device != weight.device:
        raise RuntimeError(
            f"Input and parameter tensors are not at the same device, found input tensor at "
            f"{input.device} and parameter tensors at {weight.device}; move the input with "
            f".to({str(weight.device)!r}) or the module with .to({str(input.device)!r})"
        )


GATE_INITS = ("default", "chrono")


def _check_gate_init(bias, forget_bias, init, chrono_max_len):
    if init not in GATE_INITS:
        raise ValueError(f"init must be one of {GATE_INITS}, got {init!r}")
    if init == "chrono" and not (isinstance(chrono_max_len, int) and chrono_max_len >= 2):
        raise ValueError(f"init='chrono' needs chrono_max_len, the longest dependency in steps "
                         f"(an int of at least 2), got {chrono_max_len!r}")
    if init != "chrono" and chrono_max_len is not None:
        raise ValueError("chrono_max_len is used by init='chrono' only")
    if not bias and (forget_bias != 0 or init != "default"):
        raise ValueError("forget_bias and init='chrono' set gate biases: they need bias=True")


@torch.no_grad()
def initialize_gates(module, forget_bias=0.0, init="default", chrono_max_len=None):
    """Forget-gate initialisations for any LSTM or LSTMCell (lstm_ext's or torch.nn's), applied
    to its biases after the default initialisation; the other weights stay as drawn.

    - ``forget_bias=b`` adds b to the forget gate's input bias b_if, so that
      f = σ(W_if x + b_if + W_hf h + b_hf) starts near σ(b): the cells keep their content from
      the first step (Gers, Schmidhuber & Cummins 2000; Keras's ``unit_forget_bias`` is b = 1).
    - ``init="chrono"`` (Tallec & Ollivier 2018, "Can recurrent neural networks warp time?"):
      b_f = log(u), u ~ U(1, T_max − 1) per unit, and b_i = −b_f, with T_max =
      ``chrono_max_len`` the longest dependency expected; the recurrent biases b_hf and b_hi
      are zeroed so that these are the gates' whole biases. ``forget_bias`` is added after.
    """
    _check_gate_init(module.bias, forget_bias, init, chrono_max_len)
    hidden = module.hidden_size
    for name, bias in module.named_parameters():
        if not name.startswith("bias_"):
            continue
        input_gate, forget_gate = bias[:hidden], bias[hidden:2 * hidden]
        if init == "chrono":
            if name.startswith("bias_ih"):
                u = torch.empty(hidden, dtype=torch.float64).uniform_(1, chrono_max_len - 1)
                forget_gate.copy_(u.log())
                input_gate.copy_(-u.log())
            else:
                input_gate.zero_()
                forget_gate.zero_()
        if forget_bias and name.startswith("bias_ih"):
            forget_gate.add_(forget_bias)


def dropout(input, p, training=True, inplace=False):
    """torch.nn.functional.dropout's function (zero each entry with probability p, scale the
    rest by 1 / (1 - p), in training only), with the mask from the library's bernoulli_mask on
    the CPU: on two Zen 4 cores F.dropout took 29 ms for a (128, 64, 256) fp32 tensor, and this
    1.4 ms. Other devices and dtypes go to F.dropout. The masks follow torch.manual_seed."""
    if (not training or not 0 < p <= 1 or input.device.type != "cpu"
            or not input.is_floating_point()):
        return F.dropout(input, p, training, inplace)  # its result, or its error for a bad p
    mask = ops.dropout_mask(input.shape, p, input)
    if inplace:
        return input.mul_(mask)
    return (input * mask).to(input.dtype)


class Dropout(nn.Dropout):
    """torch.nn.Dropout, the same constructor, state and behaviour, drawing its mask as
    :func:`lstm_ext.nn.dropout` does (on the CPU about 20x faster than torch's own)."""

    def forward(self, input):
        return dropout(input, self.p, self.training, self.inplace)


def _recurrent_mask(batch, size, p, like):
    """Gal & Ghahramani's mask for one batch of sequences of one layer-direction: (batch,
    size), in the math dtype of `like`, as the layer op takes it."""
    return ops.dropout_mask((batch, size), p, like)


def _zoneout_weights(rows, size, z, like, training):
    """Zoneout's d for one layer-direction: in training (rows, size), 1 with probability z (the
    unit keeps its previous value at that step), else 0; in eval one row of z (the
    expectation), used at every step. None where z is 0."""
    if not z:
        return None
    dtype = ops.math_dtype(like.dtype)
    if not training:
        return torch.full((1, size), z, dtype=dtype, device=like.device)
    return ops.bernoulli_mask((rows, size), z, 1.0, dtype, like.device)


def _check_zoneout(zoneout):
    pair = zoneout if isinstance(zoneout, (tuple, list)) else (zoneout, zoneout)
    if len(pair) != 2 or any(isinstance(z, bool) or not isinstance(z, (int, float))
                             or not 0 <= z <= 1 for z in pair):
        raise ValueError(f"zoneout is the probability that a unit keeps its previous c and h, "
                         f"one number or a pair (z_c, z_h) between 0 and 1, but got {zoneout!r}")
    return float(pair[0]), float(pair[1])


def _check_probability(name, value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} is the probability of dropping each {what}, between 0 and 1, "
                         f"but got {value!r}")
    return float(value)


def _check_layer_norm(layer_norm):
    if not isinstance(layer_norm, bool):
        raise ValueError(f"layer_norm is True or False, got {layer_norm!r}")
    return layer_norm


def _layer_norm_names(suffix=""):
    """The six LayerNorm parameters of one layer-direction (or of a cell, suffix ""): gain
    ("weight") and bias of the norms of W_ih x, W_hh h (4H each) and c (H)."""
    return [f"layer_norm_{part}_{kind}{suffix}"
            for part in ("ih", "hh", "cell") for kind in ("weight", "bias")]


def _make_layer_norms(module, suffixes):
    """Registers the LayerNorm parameters for each suffix, gains 1 and biases 0."""
    weight = next(module.parameters())
    for suffix in suffixes:
        for name in _layer_norm_names(suffix):
            size = module.hidden_size * (1 if "_cell_" in name else 4)
            module.register_parameter(name, nn.Parameter(
                torch.empty(size, dtype=weight.dtype, device=weight.device)))
    _reset_layer_norms(module)


@torch.no_grad()
def _reset_layer_norms(module):
    for name, parameter in module.named_parameters():
        if name.startswith("layer_norm_"):
            parameter.fill_(1.0 if "_weight" in name else 0.0)  # gains 1, biases 0


class _GateInit:
    """The gate initialisation options of LSTM and LSTMCell (off by default, so that a module
    built without them draws exactly nn.LSTM's initial weights)."""

    forget_bias = 0.0
    init = "default"
    chrono_max_len = None

    def _set_gate_init(self, forget_bias, init, chrono_max_len):
        _check_gate_init(self.bias, forget_bias, init, chrono_max_len)
        if (forget_bias, init, chrono_max_len) != (0.0, "default", None):
            self.forget_bias, self.init, self.chrono_max_len = forget_bias, init, chrono_max_len
            initialize_gates(self, forget_bias, init, chrono_max_len)

    def reset_parameters(self):
        super().reset_parameters()
        if (self.forget_bias, self.init) != (0.0, "default"):
            initialize_gates(self, self.forget_bias, self.init, self.chrono_max_len)

    def _gate_init_repr(self):
        parts = [f"forget_bias={self.forget_bias}"] * bool(self.forget_bias)
        if self.init != "default":
            parts.append(f"init={self.init!r}, chrono_max_len={self.chrono_max_len}")
        return "".join(", " + part for part in parts)


class LSTM(_GateInit, nn.RNNBase):
    """Applies a multi-layer LSTM to an input sequence, exactly like :class:`torch.nn.LSTM`
    (same constructor, parameters, inputs, outputs and errors) but through lstm_ext's fused
    kernels. Beyond nn.LSTM: it compiles with ``torch.compile(fullgraph=True)`` (inter-layer
    dropout included), gives gradients in eval mode and supports double backward.

    Keyword-only extras, off by default:

    - ``forget_bias`` and ``init="chrono"`` (with ``chrono_max_len``), the forget-gate
      initialisations of :func:`initialize_gates`.
    - ``weight_drop=p``: DropConnect on the recurrent weights (Wan et al. 2013), as AWD-LSTM
      regularises them (Merity, Keskar & Socher 2017). In training, every forward of every
      layer and direction draws one mask ``M`` with entries 1 with probability 1 - p, else 0,
      and runs with ``W_hh' = W_hh * M / (1 - p)`` at every step:
      ``i, f, g, o = W_ih x_t + b_ih + W_hh' h_{t-1} + b_hh``; gradients reach ``W_hh``
      through the mask. In eval mode ``W_hh`` is used as is (its expectation). The masks come
      from torch's generator (``torch.manual_seed`` repeats them); ``W_hr`` and ``W_ih`` are
      not dropped; the parameters and state_dict are nn.LSTM's.
    - ``recurrent_dropout=p``: variational dropout on the recurrent connection (Gal &
      Ghahramani 2016, "A Theoretically Grounded Application of Dropout in Recurrent Neural
      Networks"; Keras's ``recurrent_dropout``). In training, every forward of every layer and
      direction draws one mask ``m`` per sequence, shape (batch, proj_size or hidden_size),
      entries ``1 / (1 - p)`` with probability 1 - p, else 0, and uses it at every step:
      ``i, f, g, o = W_ih x_t + b_ih + W_hh (m * h_{t-1}) + b_hh`` (h_0 included); the
      outputs and h_n are the unmasked h. Applied inside the fused kernels, forward and
      backward. In eval mode no mask (its expectation). Inter-layer ``dropout`` is unchanged
      and combines with it.
    - ``zoneout=(z_c, z_h)`` (or one number for both): zoneout (Krueger et al. 2016, "Zoneout:
      Regularizing RNNs by Randomly Preserving Hidden Activations"). In training each unit of
      each sequence keeps its previous value at each step with probability z:
      ``c_t = d^c_t * c_{t-1} + (1 - d^c_t) * (f_t * c_{t-1} + i_t * g_t)`` and
      ``h_t = d^h_t * h_{t-1} + (1 - d^h_t) * (o_t * tanh(f_t * c_{t-1} + i_t * g_t))``
      (projected by ``W_hr`` first where ``proj_size`` is set), the masks d 1 with probability
      z, else 0, fresh for every step, sequence, unit, layer and direction. In eval mode d is
      its expectation z: ``c_t = z_c c_{t-1} + (1 - z_c) c~_t``, and h likewise. The outputs
      are the zoned-out h; inside the fused kernels, forward and backward. Unlike the dropout
      options this changes the eval-mode function: ONNX export writes it as a Scan (the
      ONNX LSTM operator lacks it), and ``to_torch()`` and the int8 conversion refuse such a
      module.
    - ``return_cell_sequence=True``: forward returns ``output, (h_n, c_n), cells``, cells being
      the last layer's c_t of every step laid out as ``output`` is (padded, ``batch_first``,
      unbatched or a PackedSequence; both directions concatenated), with ``hidden_size``
      features per direction; gradients flow through it. nn.LSTM gives only c_n.
    - ``layer_norm=True``: the LayerNorm LSTM (Ba, Kiros & Hinton 2016, "Layer Normalization",
      as in Haste): ``i, f, g, o = LN(W_ih x_t) + b_ih + b_hh + LN(W_hh h_{t-1})``,
      ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(LN(c_t))``, each LN over its whole row (4H,
      4H, H; eps 1e-5) with its own learned gain and bias, parameters
      ``layer_norm_{ih,hh,cell}_{weight,bias}_l{k}[_reverse]`` (gains 1, biases 0 at
      initialisation) beside nn.LSTM's, whose names and initial values are unchanged. On the
      CPU fused into the recurrence (with a projection, and on other devices, a C++ step
      loop; no Python per step), forward and backward; combines with weight_drop,
      recurrent_dropout, zoneout (fused as well) and return_cell_sequence (the
      cells are c_t before its norm, after zoneout); double backward differentiates
      ops.reference_layer_norm_forward."""

    weight_drop = 0.0  # modules pickled before the options existed
    recurrent_dropout = 0.0
    zoneout = (0.0, 0.0)
    return_cell_sequence = False
    layer_norm = False

    def __init__(self, *args, forget_bias=0.0, init="default", chrono_max_len=None,
                 weight_drop=0.0, recurrent_dropout=0.0, zoneout=0.0,
                 return_cell_sequence=False, layer_norm=False, **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        self.weight_drop = _check_probability("weight_drop", weight_drop, "recurrent weight")
        self.recurrent_dropout = _check_probability(
            "recurrent_dropout", recurrent_dropout, "unit of h entering the recurrence")
        self.zoneout = _check_zoneout(zoneout)
        if not isinstance(return_cell_sequence, bool):
            raise ValueError(f"return_cell_sequence is True or False, got "
                             f"{return_cell_sequence!r}")
        self.return_cell_sequence = return_cell_sequence
        self.layer_norm = _check_layer_norm(layer_norm)
        if layer_norm:
            directions = ["", "_reverse"] if self.bidirectional else [""]
            _make_layer_norms(self, [f"_l{layer}{direction}"
                                     for layer in range(self.num_layers)
                                     for direction in directions])
        self._set_gate_init(forget_bias, init, chrono_max_len)

    def _layer_norm_names(self, layer, suffix):
        return _layer_norm_names(f"_l{layer}{suffix}")

    def reset_parameters(self):
        super().reset_parameters()
        if self.layer_norm:
            _reset_layer_norms(self)

    def extra_repr(self):
        extras = "".join(f", {name}={getattr(self, name)}"
                         for name in ("weight_drop", "recurrent_dropout", "layer_norm")
                         if getattr(self, name))
        if any(self.zoneout):
            extras += f", zoneout={self.zoneout}"
        if self.return_cell_sequence:
            extras += ", return_cell_sequence=True"
        return super().extra_repr() + self._gate_init_repr() + extras

    # torch.jit.script calls this on every module it meets before compiling it.
    __prepare_scriptable__ = _refuse_script

    # nn.LSTM's own argument checks and state permutation, so errors match it word for word.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    @classmethod
    def from_torch(cls, module: nn.LSTM) -> "LSTM":
        """A copy of a torch.nn.LSTM (configuration, weights, device, dtype, train/eval)."""
        return _convert(module, cls)

    def to_torch(self) -> nn.LSTM:
        """A torch.nn.LSTM copy of this module (configuration, weights, device, dtype, mode).
        Refused with zoneout, whose eval-mode update nn.LSTM lacks (the dropout options have
        none in eval mode and are left behind)."""
        if any(self.zoneout):
            raise ValueError(
                f"to_torch(): torch.nn.LSTM has no zoneout, and zoneout={self.zoneout} changes "
                f"this module's eval-mode output (c_t = z c_(t-1) + (1 - z) c~_t), so the copy "
                f"would compute something else; copy the weights by state_dict if that is meant")
        if self.layer_norm:
            raise ValueError(
                "to_torch(): torch.nn.LSTM has no layer normalisation (layer_norm=True), so "
                "the copy would compute something else")
        if self.return_cell_sequence:
            raise ValueError(
                "to_torch(): torch.nn.LSTM cannot return the cell sequence "
                "(return_cell_sequence=True), so the copy would return something else; copy the "
                "weights by state_dict if that is meant")
        return _convert(self, nn.LSTM)

    def forward(self, input, hx=None):
        num_directions = 2 if self.bidirectional else 1
        state_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        is_batched = True
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead"
                )
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
            batch = input.size(batch_dim)
            if input.size(1 - batch_dim) == 0:
                raise RuntimeError(_ZERO_LENGTH)
        if hx is None:
            shape = (self.num_layers * num_directions, batch)
            hx = (
                torch.zeros(*shape, state_size, dtype=data.dtype, device=data.device),
                torch.zeros(*shape, self.hidden_size, dtype=data.dtype, device=data.device),
            )
        elif not packed:
            if is_batched and (hx[0].dim() != 3 or hx[1].dim() != 3):
                raise RuntimeError(
                    "For batched 3-D input, hx and cx should also be 3-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            if not is_batched:
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise RuntimeError(
                        "For unbatched 2-D input, hx and cx should also be 2-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                    )
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if len(hx) != 2:  # nn.LSTM's op refuses it so, after the checks above
            raise RuntimeError("lstm expects two hidden states")
        weights = self._current_weights()
        self.check_forward_args(data, hx, batch_sizes)
        _check_device(data, weights[0])
        _check_state_dtype_and_device(data, hx, ("hx[0]", "hx[1]"))
        hx = self.permute_hidden(hx, sorted_indices)

        if not packed and self.batch_first:
            data = data.transpose(0, 1)
        with _without_autograd_dispatch():
            output, h_n, c_n, *cells = self._run_layers(data, batch_sizes, weights, *hx)

        # The cell sequence, where asked for, is laid out as the output.
        if packed:
            sequences = [PackedSequence(t, batch_sizes, sorted_indices, unsorted_indices)
                         for t in (output, *cells)]
            return sequences[0], self.permute_hidden((h_n, c_n), unsorted_indices), *sequences[1:]
        if self.batch_first:
            output, *cells = (t.transpose(0, 1) for t in (output, *cells))
        if not is_batched:
            output, *cells = (t.squeeze(batch_dim) for t in (output, *cells))
            return output, (h_n.squeeze(1), c_n.squeeze(1)), *cells
        return output, (h_n, c_n), *cells

    def _current_weights(self):
        # Read on every call: always current (assignment, load_state_dict with assign=True,
        # torch.func.functional_call), and much cheaper than RNNBase's weakref bookkeeping
        # (_update_flat_weights), which costs ~20 us per call.
        return _module_tensors(self, self._flat_weights_names)

    def _plain_in_inference(self):
        """Whether a call that keeps nothing for backward is plain layers, one after another,
        which lstm_layers runs in one call: no variant that acts in this mode, no dropout
        between layers, no cell sequence, nothing capturing the call (_capturing)."""
        if self.training and (self.dropout > 0 or self.recurrent_dropout > 0
                              or self.weight_drop > 0):
            return False
        return not (self.layer_norm or any(self.zoneout) or self.return_cell_sequence
                    or _capturing())

    def _run_layers(self, data, batch_sizes, weights, h0, c0):
        """All layers and directions over time-major (T, B, I) or packed (N, I) data."""
        num_directions = 2 if self.bidirectional else 1
        per_direction = len(weights) // (self.num_layers * num_directions)
        training = _needs_saved_state([data, h0, c0, *weights])
        exporting = _exporting_onnx()
        if exporting:
            _onnx.check_exportable(self, batch_sizes is not None)
        elif not training and self._plain_in_inference() and not ops.under_transform():
            return ops.layers_forward(data, h0, c0, weights, self.bias, self.num_layers,
                                      self.bidirectional, batch_sizes)
        h_n, c_n = [], []
        layer_input = data
        for layer in range(self.num_layers):
            if layer > 0 and self.training and self.dropout > 0:
                layer_input = dropout(layer_input, self.dropout)
            if exporting:
                first = layer * num_directions
                directions = []
                for index in range(first, first + num_directions):
                    w = weights[index * per_direction:(index + 1) * per_direction]
                    biases = (w[2], w[3]) if self.bias else (None, None)
                    w_hr = w[-1] if self.proj_size > 0 else None
                    directions.append((w[0], w[1], *biases, w_hr))
                h0_layer = h0[first:first + num_directions]
                c0_layer = c0[first:first + num_directions]
                return_cells = self.return_cell_sequence and layer == self.num_layers - 1
                cell_sequences = []
                norms = None
                if self.layer_norm:
                    norms = [_module_tensors(self, self._layer_norm_names(
                        layer, "_reverse" if direction else ""))
                        for direction in range(num_directions)]
                if self.proj_size > 0 or any(self.zoneout) or return_cells or norms:
                    layer_input, h, c, *cell_sequences = _onnx.lstm_layer_scan(
                        layer_input, h0_layer, c0_layer, directions, self.zoneout,
                        return_cells, norms)
                else:
                    layer_input, h, c = _onnx.lstm_layer(
                        layer_input, h0_layer, c0_layer, directions, self.hidden_size, self.bias)
                h_n += list(h)
                c_n += list(c)
                continue
            outputs, cell_sequences = [], []
            for direction in range(num_directions):
                index = layer * num_directions + direction
                w = weights[index * per_direction:(index + 1) * per_direction]
                b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
                w_hr = w[-1] if self.proj_size > 0 else None
                w_hh = w[1]
                if self.training and self.weight_drop > 0:
                    w_hh = ops.drop_connect(w_hh, self.weight_drop)
                mask = None
                if self.training and self.recurrent_dropout > 0:
                    mask = _recurrent_mask(h0.shape[1], h0.shape[2], self.recurrent_dropout,
                                           layer_input)
                return_cells = self.return_cell_sequence and layer == self.num_layers - 1
                zoneout_cell = zoneout_hidden = None
                if any(self.zoneout):
                    rows = layer_input.shape[0] * (1 if batch_sizes is not None
                                                   else h0.shape[1])
                    zoneout_cell, zoneout_hidden = (
                        _zoneout_weights(rows, size, z, layer_input, self.training)
                        for z, size in zip(self.zoneout, (c0.shape[2], h0.shape[2])))
                if self.layer_norm:
                    suffix = "_reverse" if direction else ""
                    norms = _module_tensors(self, self._layer_norm_names(layer, suffix))
                    output, h, c, *cells = ops.layer_norm_forward(
                        layer_input, h0[index], c0[index], w[0], w_hh, b_ih, b_hh, w_hr,
                        batch_sizes, direction == 1, training or _needs_saved_state(norms),
                        norms, mask, return_cells, zoneout_cell, zoneout_hidden)
                else:
                    output, h, c, *cells = ops.layer_forward(
                        layer_input, h0[index], c0[index], w[0], w_hh, b_ih, b_hh, w_hr,
                        batch_sizes, direction == 1, training, mask, zoneout_cell,
                        zoneout_hidden, return_cells,
                    )
                outputs.append(output)
                cell_sequences += cells
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=-1)
        cells = [torch.cat(cell_sequences, dim=-1)] if cell_sequences else []
        return layer_input, torch.stack(h_n), torch.stack(c_n), *cells


class LSTMCell(_GateInit, nn.RNNCellBase):
    """One LSTM step, exactly like :class:`torch.nn.LSTMCell` but through lstm_ext's fused
    kernels (gradients in eval mode and double backward included).

    Keyword-only extras, off by default, :class:`LSTM`'s that apply to one step:

    - ``forget_bias`` and ``init="chrono"`` (with ``chrono_max_len``), as LSTM's.
    - ``zoneout=(z_c, z_h)`` (or one number for both; Krueger et al. 2016): in training each
      unit of each row keeps its previous value with probability z at this step,
      ``c' = d^c c + (1 - d^c) (f c + i g)``, ``h' = d^h h + (1 - d^h) o tanh(f c + i g)``,
      the masks d drawn afresh on every call; in eval mode d is z.
    - ``layer_norm=True`` (Ba, Kiros & Hinton 2016): ``i, f, g, o = LN(W_ih x) + b_ih + b_hh
      + LN(W_hh h)``, ``c' = f c + i g``, ``h' = o tanh(LN(c'))``, parameters
      ``layer_norm_{ih,hh,cell}_{weight,bias}`` (gains 1, biases 0 at initialisation); with
      zoneout too, h' then made from ``tanh(LN(f c + i g))``.

    Each runs as a one-step sequence through LSTM's layer ops (the same kernels, forward and
    backward). LSTM's ``recurrent_dropout`` and ``weight_drop`` draw one mask per sequence,
    which a cell, called once per step, cannot know the start of: draw the mask once per
    sequence yourself and multiply ``hx[0]`` (or the weight) by it."""

    zoneout = (0.0, 0.0)  # modules pickled before the options existed
    layer_norm = False

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *,
                 forget_bias=0.0, init="default", chrono_max_len=None, zoneout=0.0,
                 layer_norm=False):
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)
        self.zoneout = _check_zoneout(zoneout)
        self.layer_norm = _check_layer_norm(layer_norm)
        if layer_norm:
            _make_layer_norms(self, [""])
        self._set_gate_init(forget_bias, init, chrono_max_len)

    def reset_parameters(self):
        super().reset_parameters()
        if self.layer_norm:
            _reset_layer_norms(self)

    def extra_repr(self):
        extras = ", layer_norm=True" if self.layer_norm else ""
        if any(self.zoneout):
            extras += f", zoneout={self.zoneout}"
        return super().extra_repr() + self._gate_init_repr() + extras

    __prepare_scriptable__ = _refuse_script

    @classmethod
    def from_torch(cls, module: nn.LSTMCell) -> "LSTMCell":
        """A copy of a torch.nn.LSTMCell (configuration, weights, device, dtype, mode)."""
        return _convert(module, cls)

    def to_torch(self) -> nn.LSTMCell:
        """A torch.nn.LSTMCell copy of this module (configuration, weights, device, dtype, mode).
        Refused with zoneout or layer_norm, which nn.LSTMCell lacks."""
        if any(self.zoneout) or self.layer_norm:
            option = "layer_norm=True" if self.layer_norm else f"zoneout={self.zoneout}"
            raise ValueError(
                f"to_torch(): torch.nn.LSTMCell has no {option.split('=')[0]}, and {option} "
                f"changes this cell's output, so the copy would compute something else; copy "
                f"the weights by state_dict if that is meant")
        return _convert(self, nn.LSTMCell)

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for index, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(
                        f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {value.dim()}D instead"
                    )
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(
                input.size(0), self.hidden_size, dtype=input.dtype, device=input.device
            )
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if isinstance(hx, torch.Tensor):  # its rows would pass for h and c below
            raise TypeError("lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, "
                            "not Tensor")
        if len(hx) != 2:  # as nn.LSTMCell's op, where unbatched hx was not cut to two above
            raise RuntimeError("lstm_cell expects two hidden states")
        weights = self._weights()
        self._check_forward_args(input, hx, weights[0])
        with _without_autograd_dispatch():
            h, c = self._step(input, hx, weights)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c

    def _weights(self):
        """(weight_ih, weight_hh, bias_ih, bias_hh)."""
        return tuple(_module_tensors(self, ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))

    def _step(self, input, hx, weights):
        """(h', c') for batched input and state that passed the checks."""
        norms = _module_tensors(self, _layer_norm_names()) if self.layer_norm else None
        variant = self.layer_norm or any(self.zoneout)
        if _exporting_onnx():  # one step of an ONNX LSTM node, or of a Scan for the variants
            if variant:
                _, h, c = _onnx.lstm_layer_scan(
                    input.unsqueeze(0), hx[0].unsqueeze(0), hx[1].unsqueeze(0),
                    [(*weights, None)], self.zoneout, False, norms and [norms])
            else:
                _, h, c = _onnx.lstm_layer(
                    input.unsqueeze(0), hx[0].unsqueeze(0), hx[1].unsqueeze(0), [weights],
                    self.hidden_size, self.bias)
            return h[0], c[0]
        # The cell's parameters are these (self.parameters() costs a few us a step).
        training = _needs_saved_state((input, *hx, *weights, *(norms or ())))
        if not variant:
            return ops.cell_forward(input, hx[0], hx[1], *weights, training)
        zoneout_cell, zoneout_hidden = (
            _zoneout_weights(input.shape[0], self.hidden_size, z, input, self.training)
            for z in self.zoneout)
        if self.layer_norm:
            _, h, c = ops.layer_norm_forward(input.unsqueeze(0), hx[0], hx[1], *weights, None,
                                             None, False, training, norms,
                                             zoneout_cell=zoneout_cell,
                                             zoneout_hidden=zoneout_hidden)
            return h, c
        # Under CPU autocast a cell runs in its inputs' dtype, as nn.LSTMCell does (lstm_cell
        # is not on that list); the layer op alone would be cast.
        with torch.autocast("cpu", enabled=False) if input.device.type == "cpu" else \
                contextlib.nullcontext():
            _, h, c = ops.layer_forward(input.unsqueeze(0), hx[0], hx[1], *weights, None, None,
                                        False, training, zoneout_cell=zoneout_cell,
                                        zoneout_hidden=zoneout_hidden)
        return h, c

    def _check_forward_args(self, input, hx, weight):
        # The messages of ATen's lstm_cell checks, raised before any kernel runs.
        batch, features = input.shape[0], input.shape[1]
        if features != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {features} expected {self.input_size}"
            )
        for index, state in enumerate(hx):
            rows = state.size(0)
            if rows != batch:
                raise RuntimeError(
                    f"Input batch size {batch} doesn't match hidden{index} batch size {rows}"
                )
            if state.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{index} has inconsistent hidden_size: got {state.size(1)}, expected "
                    f"{self.hidden_size}"
                )
        self._check_input_dtype(input, weight)
        _check_device(input, weight)
        _check_state_dtype_and_device(input, hx, ("hx[0]", "hx[1]"))

    def _check_input_dtype(self, input, weight):
        if input.dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type):
            raise RuntimeError(
                f"LSTMCell input dtype ({input.dtype}) does not match weight dtype "
                f"({weight.dtype}); convert the input with input.to({weight.dtype}) "
                f"or the module with .to({input.dtype})"
            )


def _convert(module, target_class):
    """The same configuration, weights, device, dtype and train/eval mode in another class."""
    weight = next(module.parameters())
    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(module, nn.RNNCellBase):
        new = target_class(module.input_size, module.hidden_size, module.bias, **factory)
    else:
        new = target_class(
            module.input_size, module.hidden_size, module.num_layers, module.bias,
            module.batch_first, module.dropout, module.bidirectional, module.proj_size, **factory,
        )
    new.load_state_dict(module.state_dict())
    return new.train(module.training)
