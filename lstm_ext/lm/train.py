"""Training, evaluation and generation for the language model, with checkpoints that survive a
crash mid-write and runs that resume exactly where they stopped."""

import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from . import data as lm_data
from .checks import check_device, check_positive
from .model import LanguageModel, detach_state, sample_next

CHECKPOINT_FORMAT = "lstm_ext.lm/1"
# bf16 runs under autocast with fp32 weights; fp64 (weights and math) is for exact comparisons.
PRECISIONS = ("fp32", "bf16", "fp64")


@dataclass
class TrainConfig:
    data: str = None
    level: str = "char"
    clean: bool = True
    impl: str = "ext"
    layers: int = 2
    hidden: int = 512
    emb: int = 64
    dropout: float = 0.1
    proj_size: int = 0
    tied: bool = False
    bptt: int = 128
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 4e-3
    weight_decay: float = 0.01
    warmup: int = 20
    clip: float = 1.0
    epochs: int = 0             # 0: as many as --max-steps needs, else 1
    max_steps: int = 0          # 0: no limit
    time_budget: float = 0.0    # minutes; 0: no limit
    precision: str = "fp32"
    device: str = "cpu"
    seed: int = 1234
    out: str = "runs/lm"
    eval_every: int = 50
    eval_batch_size: int = 16
    progress: bool = True


class Distributed:
    """The process's place in a torchrun job (WORLD_SIZE > 1): gloo on the CPU, nccl on CUDA.
    Each rank trains on its own shard of the training stream; rank 0 alone writes checkpoints
    and logs."""

    def __init__(self, config):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world_size > 1
        if self.active and not torch.distributed.is_initialized():
            cuda = str(config.device).startswith("cuda")
            if cuda:
                config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                torch.cuda.set_device(config.device)
            torch.distributed.init_process_group("nccl" if cuda else "gloo")

    @property
    def is_main(self):
        return self.rank == 0

    def shard(self, ids):
        """This rank's equal-length slice of the token stream (equal, so every rank runs the
        same number of steps and the gradient all-reduces pair up)."""
        length = ids.numel() // self.world_size
        return ids[self.rank * length:(self.rank + 1) * length]

    def gather(self, value):
        """Every rank's `value` (plain Python values and CPU tensors), in rank order, on every
        rank; a one-element list outside torchrun."""
        if not self.active:
            return [value]
        values = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def any(self, flag, device):
        """Whether `flag` holds on any rank: decisions that end the loop (the time budget) must
        be the same everywhere, or the ranks that go on wait forever in the gradient
        all-reduce."""
        if not self.active:
            return bool(flag)
        value = torch.tensor([int(bool(flag))], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def close(self, finished):
        if self.active and torch.distributed.is_initialized():
            if finished:  # after a failure the other ranks may never reach a barrier
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def config_from_dict(values):
    """A TrainConfig from a dict with possibly more keys (argparse's namespace, a checkpoint)."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


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


def build_model(config, vocabulary_size):
    torch.manual_seed(config.seed)
    model = LanguageModel(vocabulary_size, config.emb, config.hidden, config.layers,
                          config.dropout, config.proj_size, config.tied, config.impl)
    return model.to(torch.float64) if config.precision == "fp64" else model


def build_optimizer(config, model, total_steps):
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
        # The classic schedule: divide the rate by 4 whenever validation loss stops improving.
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.25,
                                                               patience=0)
        return optimizer, scheduler
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)

    def warmup_cosine(step):
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = min(1.0, (step - config.warmup) / max(1, total_steps - config.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)


def autocast(config):
    device_type = torch.device(config.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


@torch.no_grad()
def evaluate(model, ids, config, batch_size=None):
    """Mean cross-entropy (nats per token) over a split, state carried across windows."""
    model.eval()
    columns = lm_data.batchify(ids, batch_size or config.eval_batch_size).to(config.device)
    state, total, count = None, 0.0, 0
    for inputs, targets in lm_data.bptt_windows(columns, config.bptt):
        with autocast(config):
            logits, state = model(inputs, state)
        total += nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return total / count


def quality(loss, level):
    """Perplexity for words, bits per character for characters."""
    return {"valid_bpc": loss / math.log(2)} if level == "char" else {"valid_ppl": math.exp(loss)}


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


class Run:
    """One training run: its output folder, metrics log and checkpoints."""

    def __init__(self, config, corpus, distributed):
        self.config, self.corpus, self.distributed = config, corpus, distributed
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        train_ids = distributed.shard(corpus.train)
        self.columns = lm_data.batchify(train_ids, config.batch_size).to(config.device)
        self.windows_per_epoch = math.ceil((self.columns.size(0) - 1) / config.bptt)
        # --max-steps alone runs as many epochs as it takes; --epochs alone, whole epochs.
        self.epochs = config.epochs or (
            math.ceil(config.max_steps / self.windows_per_epoch) if config.max_steps else 1)
        total = self.epochs * self.windows_per_epoch
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.model = build_model(config, len(corpus.vocabulary)).to(config.device)
        # What the training step calls: the model itself, or its DistributedDataParallel wrapper.
        self.trained = self.model
        if distributed.active:
            self.trained = nn.parallel.DistributedDataParallel(self.model)
            torch.manual_seed(config.seed + distributed.rank)  # own dropout masks per rank
        self.optimizer, self.scheduler = build_optimizer(config, self.model, self.total_steps)
        self.step = self.epoch = self.window = 0
        self.state = None
        self.best_loss = math.inf
        self.elapsed = 0.0
        self.history = []

    def rank_state(self):
        """What differs between ranks and must come back per rank on resume: the generators
        (each rank draws its own dropout masks) and the LSTM state carried across windows of
        its own shard."""
        return {"rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": (torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                                 else [])},
                "state": None if self.state is None else [s.cpu() for s in self.state]}

    def checkpoint(self, ranks):
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "vocabulary": self.corpus.vocabulary.state_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "world_size": self.distributed.world_size,
            "ranks": ranks,
            "position": {"step": self.step, "epoch": self.epoch, "window": self.window},
            "best_loss": self.best_loss,
            "elapsed": self.elapsed,
            "history": self.history,
        }

    def restore(self, payload):
        # Checkpoints from before per-rank state hold one rank's "rng" and "state" at the top.
        ranks = payload.get("ranks") or [{"rng": payload["rng"], "state": payload["state"]}]
        saved_world = payload.get("world_size", len(ranks))
        if saved_world != self.distributed.world_size:
            raise ValueError(
                f"--resume: the run was trained by {saved_world} process(es) and this job has "
                f"{self.distributed.world_size}; resume it with the same number (torchrun "
                f"--nproc-per-node {saved_world}), since each rank's data shard, generator "
                f"and carried state belong to that layout")
        mine = ranks[self.distributed.rank]
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(mine["rng"]["torch"])
        random.setstate(mine["rng"]["python"])
        if mine["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
        position = payload["position"]
        self.step, self.epoch, self.window = position["step"], position["epoch"], position["window"]
        self.state = None if mine["state"] is None else tuple(
            s.to(self.config.device) for s in mine["state"])
        self.best_loss, self.elapsed = payload["best_loss"], payload["elapsed"]
        self.history = payload["history"]

    def evaluate_and_save(self, train_loss, tokens_per_s):
        valid_loss = evaluate(self.model, self.corpus.valid, self.config)
        self.model.train()
        record = {"step": self.step, "epoch": self.epoch, "train_loss": train_loss,
                  "valid_loss": valid_loss, **quality(valid_loss, self.corpus.level),
                  "tokens_per_s": tokens_per_s * self.distributed.world_size,
                  "elapsed_s": self.elapsed, "world_size": self.distributed.world_size}
        self.history.append(record)
        # Every rank evaluates the same split, so the plateau schedule stays the same everywhere.
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(valid_loss)
        improved = valid_loss < self.best_loss
        self.best_loss = min(self.best_loss, valid_loss)
        ranks = self.distributed.gather(self.rank_state())  # a collective: every rank calls it
        if self.distributed.is_main:
            with open(self.out / "metrics.jsonl", "a") as file:
                file.write(json.dumps(record) + "\n")
            payload = self.checkpoint(ranks)
            save_atomically(payload, self.out / "last.pt")
            if improved:
                save_atomically(payload, self.out / "best.pt")
        return record

    def has_work(self):
        """Whether a step is left: within the planned steps and epochs and the time budget."""
        in_time = not self.config.time_budget or self.elapsed < 60 * self.config.time_budget
        return self.epoch < self.epochs and self.step < self.total_steps and in_time

    def train(self):
        config = self.config
        windows = list(lm_data.bptt_windows(self.columns, config.bptt))
        bar = None
        if config.progress and self.distributed.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        criterion = nn.CrossEntropyLoss()
        self.model.train()
        losses, tokens, started = [], 0, time.perf_counter()
        base_elapsed = self.elapsed
        record = None
        while self.epoch < self.epochs and self.step < self.total_steps:
            while self.window < len(windows) and self.step < self.total_steps:
                inputs, targets = windows[self.window]
                with autocast(config):
                    logits, state = self.trained(inputs, self.state)
                    loss = criterion(logits.float().reshape(-1, logits.size(-1)),
                                     targets.reshape(-1))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), config.clip)
                self.optimizer.step()
                if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.scheduler.step()
                self.state = detach_state(state)
                self.step += 1
                self.window += 1
                losses.append(loss.item())
                tokens += targets.numel()
                self.elapsed = base_elapsed + time.perf_counter() - started
                rate = tokens / max(1e-9, time.perf_counter() - started)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}")
                out_of_time = bool(config.time_budget) and self.distributed.any(
                    self.elapsed >= 60 * config.time_budget, config.device)
                if self.step % config.eval_every == 0 or out_of_time:
                    record = self.evaluate_and_save(sum(losses) / len(losses), rate)
                    losses = []
                if out_of_time:
                    self.total_steps = self.step
            if self.window >= len(windows):
                self.epoch, self.window, self.state = self.epoch + 1, 0, None
        if losses:
            record = self.evaluate_and_save(sum(losses) / len(losses),
                                            tokens / max(1e-9, time.perf_counter() - started))
        if bar is not None:
            bar.close()
        if self.distributed.is_main:
            plot_losses(self.history, self.out / "loss.png")
        return record


def plot_losses(history, path):
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    minutes = [r["elapsed_s"] / 60 for r in history]
    axes.plot(minutes, [r["train_loss"] for r in history], label="train")
    axes.plot(minutes, [r["valid_loss"] for r in history], label="valid")
    axes.set_xlabel("minutes")
    axes.set_ylabel("loss (nats per token)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


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


def train(config, resume=None, changes=None):
    """Trains (or resumes from a run folder, with the `changes` CHANGEABLE_ON_RESUME allows)
    and returns the last metrics record."""
    if resume:
        payload = load_checkpoint(Path(resume) / "last.pt")
        config = resumed_config(payload, resume, changes)
    check_config(config)
    corpus = lm_data.load_corpus(config.data, config.level, config.clean)
    distributed = Distributed(config)
    finished = False
    try:
        run = Run(config, corpus, distributed)
        if resume:
            run.restore(payload)
            if not run.has_work():
                raise ValueError(
                    f"--resume {resume}: the run already finished, at step {run.step} "
                    f"(epoch {run.epoch}); to train it longer, pass a larger --max-steps or "
                    f"--epochs (or --time-budget, if its budget ended it)")
        record = run.train()
        finished = True
        return record
    finally:
        distributed.close(finished)


@torch.no_grad()
def generate(model, vocabulary, level, prompt, tokens, temperature=1.0, top_k=0, seed=None,
             device="cpu"):
    """Yields the text of each generated token, carrying the LSTM state one step at a time."""
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    prompt_tokens = lm_data.tokenize(prompt, level) if prompt else []
    ids = vocabulary.encode(prompt_tokens or [lm_data.EOS if level == "word" else "\n"])
    logits, state = model(ids.to(device).view(-1, 1))
    unknown = vocabulary.stoi[lm_data.UNK]
    for _ in range(tokens):
        # The unknown token stands for what training never saw: never emit it.
        logits[-1, :, unknown] = float("-inf")
        next_id = sample_next(logits[-1], temperature, top_k, generator)
        token = vocabulary.itos[int(next_id)]
        if level == "char":
            yield token
        else:
            yield "\n" if token == lm_data.EOS else " " + token
        logits, state = model(next_id.view(1, 1), state)
