"""Fused LSTM kernels for PyTorch, and drop-in replacements for torch.nn.LSTM / LSTMCell."""

import torch as _torch

from ._library import load_library as _load_library

_load_library()

from . import ops  # noqa: E402  (registers fake and autograd rules on the loaded ops)
from .nn import LSTM, Dropout, LSTMCell, initialize_gates  # noqa: E402
from .quantized import QuantizedLSTM, QuantizedLSTMCell, quantize_dynamic  # noqa: E402

# A whole model saved with torch.save loads with torch.load's default weights_only=True once
# its classes are allow-listed; ours are, as soon as lstm_ext is imported, so that a program
# which allow-lists nn.LSTM for this keeps working with ours swapped in. Unpickling them needs
# no other global (tested).
_torch.serialization.add_safe_globals([LSTM, LSTMCell, QuantizedLSTM, QuantizedLSTMCell])

__all__ = ["Dropout", "LSTM", "LSTMCell", "QuantizedLSTM", "QuantizedLSTMCell", "initialize_gates",
           "ops", "quantize_dynamic"]
__version__ = "0.1.0"
