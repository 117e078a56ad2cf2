"""Checkpoints of the language model: written atomically, loaded without running code."""

import os
import tempfile
from pathlib import Path

import torch

from . import data as lm_data
from .config import config_from_dict
from .model import build_model

CHECKPOINT_FORMAT = "lstm_ext.lm/1"


def save_atomically(payload, path):
    """Write to a temporary file in the same folder, flush it to disk, then rename over the
    target: a crash at any point leaves the previous file whole."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path):
    """A checkpoint file, or a run folder (its best checkpoint). Refuses anything that is not a
    whole lstm_ext checkpoint with a message that says so."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such checkpoint")
    # weights_only: a checkpoint holds tensors and plain Python values only, and unpickling
    # anything else (a class, a function to call) is refused instead of run.
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"--checkpoint {path} is corrupted or truncated, or holds objects "
                         f"other than tensors and plain values, refused because loading them "
                         f"could run code ({error}); use another checkpoint (last.pt or best.pt "
                         f"of the run)") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--checkpoint {path} is not an lstm_ext language-model checkpoint")
    return payload


def model_from_checkpoint(payload, device="cpu"):
    config = config_from_dict(payload["config"])
    config.device = device
    vocabulary = lm_data.Vocabulary.from_state_dict(payload["vocabulary"])
    model = build_model(config, len(vocabulary))
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), vocabulary, config
