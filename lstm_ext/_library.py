"""Finds and loads the compiled op library, refusing one built for another torch."""

import importlib.machinery
from pathlib import Path

import torch

REBUILD = (
    "Rebuild it for this torch: `pip install --no-build-isolation .` in the lstm_ext source "
    "folder (or `pip install .` in a fresh virtual environment)."
)


def library_path():
    package = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package / f"_C{suffix}"
        if candidate.exists():
            return candidate
    return None


def load_library():
    path = library_path()
    try:
        from . import _build_info
    except ImportError:
        _build_info = None
    if path is None or _build_info is None:
        raise ImportError(
            f"lstm_ext's compiled library is missing from {Path(__file__).parent}: the build "
            f"failed or never ran. {REBUILD}"
        )
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"lstm_ext was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is imported; the compiled library only works with the torch it "
            f"was built against. {REBUILD}"
        )
    try:
        torch.ops.load_library(str(path))
    except OSError as error:
        raise ImportError(f"lstm_ext's compiled library {path} failed to load: {error}. {REBUILD}") from error
