"""Argument checks shared by the driver's commands: each names the flag and what to change."""

import torch


def check_device(device):
    device_type = str(device).split(":")[0]
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")


def check_positive(config, names):
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got "
                             f"{getattr(config, name)}")
