"""The language model's training settings: what `lstm-ext train` takes, what a checkpoint
keeps, and what a resumed run may change."""

from dataclasses import dataclass, fields
from pathlib import Path

from .checks import check_device, check_positive

# bf16 runs under autocast with fp32 weights; fp64 (weights and math) is for exact comparisons.
PRECISIONS = ("fp32", "bf16", "fp64")


@dataclass
class TrainConfig:
    # The README's main job is these defaults with --layer-norm --max-steps 560: a 2 x 256
    # character model, about 2.8 passes over the default corpus in under 5 minutes on 2 cores
    # of the slower of our CPUs, valid about 1.76 bits/char, samples of Python with real
    # identifiers. The LayerNorm leaves the early plateau at once: the plain model at the same
    # rate sat there for hundreds of steps under some seeds (valid 2.5 after 1000 steps with
    # --seed 1, 1.8 with the default).
    # The rate is high because the runs are short: at 4e-3 the plain 1000 steps ended at 2.16.
    data: str = None
    level: str = "char"
    clean: bool = True
    impl: str = "ext"
    layers: int = 2
    hidden: int = 256
    emb: int = 64
    dropout: float = 0.1
    proj_size: int = 0
    tied: bool = False
    forget_bias: float = 0.0    # added to the forget gates' bias at initialisation
    weight_drop: float = 0.0    # DropConnect rate on the LSTM's recurrent weights (ext only)
    recurrent_dropout: float = 0.0  # Gal & Ghahramani's dropout on h_{t-1} (ext only)
    zoneout: tuple = (0.0, 0.0)  # (z_c, z_h), Krueger et al.'s zoneout (ext only)
    layer_norm: bool = False    # the LayerNorm LSTM (ext only)
    bptt: int = 128
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 8e-3
    weight_decay: float = 0.01
    warmup: int = 20
    clip: float = 1.0
    epochs: int = 0             # 0: as many as --max-steps needs, else 1
    max_steps: int = 1000       # 0: no limit
    time_budget: float = 0.0    # minutes; 0: no limit
    precision: str = "fp32"
    device: str = "cpu"
    seed: int = 1234
    out: str = "runs/lm"
    eval_every: int = 250
    eval_batch_size: int = 16
    progress: bool = True


def config_from_dict(values):
    """A TrainConfig from a dict with possibly more keys (argparse's namespace, a checkpoint)."""
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in values.items() if k in names}
    if "zoneout" in values:  # a list once saved as JSON
        values["zoneout"] = tuple(values["zoneout"])
    return TrainConfig(**values)


def check_config(config):
    if config.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"--optimizer must be sgd or adamw, got {config.optimizer!r}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {config.precision!r}")
    check_device(config.device)
    check_positive(config, ("layers", "hidden", "emb", "bptt", "batch_size", "eval_every"))
    for name in ("epochs", "max_steps", "time_budget"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative")


# What a resumed run may change: how long it trains, how often it reports. Everything else
# (model, data, batching, optimiser, seed) defines the run, and a different value would train
# a different one from the middle on.
CHANGEABLE_ON_RESUME = ("max_steps", "epochs", "time_budget", "eval_every", "progress")


def resumed_config(payload, resume, changes):
    """The saved run's settings with the `changes` a resume may make; any other setting given
    with a different value is refused, naming it."""
    saved = payload["config"]
    changes = {"out": str(resume), **(changes or {})}
    fixed = sorted(name for name, value in changes.items()
                   if name not in CHANGEABLE_ON_RESUME and name in saved
                   and value != saved[name] and not (name == "out" and Path(value) == Path(
                       resume)))
    if fixed:
        given = ", ".join(f"--{name.replace('_', '-')} {changes[name]!r} (the run has "
                          f"{saved[name]!r})" for name in fixed)
        allowed = ", ".join(f"--{name.replace('_', '-')}" for name in CHANGEABLE_ON_RESUME)
        raise ValueError(f"--resume {resume}: {given} cannot change on resume, since the run "
                         f"would not be the same one; only {allowed} can. Drop the flag, or "
                         f"start a new run with --out")
    return config_from_dict({**saved, **{k: v for k, v in changes.items()
                                         if k in CHANGEABLE_ON_RESUME}, "out": str(resume)})
