"""Loading the compiled library: a library built for another torch, or none at all, gives an
ImportError that says so and how to rebuild."""

import platform

import pytest
import torch

import lstm_ext
from lstm_ext import _build_info, _library


def test_built_against_this_torch():
    assert _build_info.TORCH_VERSION == torch.__version__
    assert _library.library_path() is not None
    assert hasattr(torch.ops.lstm_ext, "lstm_layer_forward")


def test_other_torch_version_refused(monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "1.0.0")
    with pytest.raises(ImportError, match=r"built against torch 1.0.0 but torch .* is imported") as error:
        _library.load_library()
    assert "pip install --no-build-isolation ." in str(error.value)


def test_missing_library_refused(monkeypatch):
    monkeypatch.setattr(_library, "library_path", lambda: None)
    with pytest.raises(ImportError, match="compiled library is missing"):
        _library.load_library()


def test_unloadable_library_refused(monkeypatch, tmp_path):
    broken = tmp_path / "_C.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(_library, "library_path", lambda: broken)
    with pytest.raises(ImportError, match="failed to load"):
        _library.load_library()


def test_public_api():
    assert {"LSTM", "LSTMCell", "ops"} <= set(lstm_ext.__all__)


def test_every_op_has_a_kernel_for_each_built_device():
    keys = ["CPU"] + (["CUDA"] if _build_info.WITH_CUDA else [])
    for op in ("lstm_layer_forward", "lstm_layer_backward"):
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_ext::{op}", key), (op, key)
    for op in ("lstm_cell_forward", "lstm_cell_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"lstm_ext::{op}", "CompositeExplicitAutograd")



def test_packed_gemm_switch(monkeypatch):
    """LSTM_EXT_PACKED_GEMM=0 turns the MKL packed path off; where this torch exports MKL's
    packed GEMM (x86-64 wheels do) it is on by default."""
    monkeypatch.setenv("LSTM_EXT_PACKED_GEMM", "0")
    assert not torch.ops.lstm_ext.cpu_packed_gemm_enabled()
    monkeypatch.delenv("LSTM_EXT_PACKED_GEMM")
    if torch.backends.mkl.is_available() and platform.machine() == "x86_64":
        assert torch.ops.lstm_ext.cpu_packed_gemm_enabled()
