"""Fused LSTM kernels for PyTorch, and drop-in replacements for torch.nn.LSTM / LSTMCell."""

from ._library import load_library as _load_library

_load_library()

from . import ops  # noqa: E402  (registers fake and autograd rules on the loaded ops)
from .nn import LSTM, LSTMCell  # noqa: E402

__all__ = ["LSTM", "LSTMCell", "ops"]
__version__ = "0.1.0"
