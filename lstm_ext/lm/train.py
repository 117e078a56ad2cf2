"""Training and evaluation of the language model: the optimiser and schedule, the training
loop with its checkpoints, and runs that resume exactly where they stopped."""

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import data as lm_data
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_atomically
from .config import check_config, resumed_config
from .distributed import Distributed
from .model import build_model, detach_state

# Steps between updates of the progress bar's loss (each reads a value from the device).
PROGRESS_EVERY = 10

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


def for_loss(logits):
    """Logits in the loss's dtype: at least fp32 (bf16 logits under autocast are widened), and
    fp64 left as it is, so that an fp64 run is fp64 throughout."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@torch.no_grad()
def evaluate(model, ids, config, batch_size=None):
    """Mean cross-entropy (nats per token) over a split, state carried across windows."""
    model.eval()
    columns = lm_data.batchify(ids, batch_size or config.eval_batch_size).to(config.device)
    # Summed on the device in fp64 (the same sum as adding Python floats), read once at the end:
    # a .item() per window would wait for the device every window.
    state, total, count = None, torch.zeros((), dtype=torch.float64, device=config.device), 0
    for inputs, targets in lm_data.bptt_windows(columns, config.bptt):
        with autocast(config):
            logits, state = model(inputs, state)
        total += nn.functional.cross_entropy(
            for_loss(logits).reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        ).double()
        count += targets.numel()
    return total.item() / count


def quality(loss, level):
    """Perplexity for words, bits per character for characters."""
    return {"valid_bpc": loss / math.log(2)} if level == "char" else {"valid_ppl": math.exp(loss)}


class Run:
    """One training run: its output folder, metrics log and checkpoints."""

    def __init__(self, config, corpus, distributed):
        self.config, self.corpus, self.distributed = config, corpus, distributed
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.corpus_fingerprint = lm_data.fingerprint(corpus)
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
            "corpus": self.corpus_fingerprint,
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
        # The window's losses are summed on the device (fp64: the same sum as adding Python
        # floats) and read only where they are logged, so a step never waits for the device.
        loss_sum, losses, tokens, started = 0.0, 0, 0, time.perf_counter()
        base_elapsed = self.elapsed
        record = None
        while self.epoch < self.epochs and self.step < self.total_steps:
            while self.window < len(windows) and self.step < self.total_steps:
                inputs, targets = windows[self.window]
                with autocast(config):
                    logits, state = self.trained(inputs, self.state)
                    loss = criterion(for_loss(logits).reshape(-1, logits.size(-1)),
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
                loss_sum = loss_sum + loss.detach().double()
                losses += 1
                tokens += targets.numel()
                self.elapsed = base_elapsed + time.perf_counter() - started
                rate = tokens / max(1e-9, time.perf_counter() - started)
                if bar is not None:
                    bar.update(1)
                    if self.step % PROGRESS_EVERY == 0:
                        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}")
                out_of_time = bool(config.time_budget) and self.distributed.any(
                    self.elapsed >= 60 * config.time_budget, config.device)
                if self.step % config.eval_every == 0 or out_of_time:
                    record = self.evaluate_and_save(float(loss_sum) / losses, rate)
                    loss_sum, losses = 0.0, 0
                if out_of_time:
                    self.total_steps = self.step
            if self.window >= len(windows):
                self.epoch, self.window, self.state = self.epoch + 1, 0, None
        if losses:
            record = self.evaluate_and_save(float(loss_sum) / losses,
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


def train(config, resume=None, changes=None):
    """Trains (or resumes from a run folder, with the `changes` CHANGEABLE_ON_RESUME allows)
    and returns the last metrics record."""
    if resume:
        payload = load_checkpoint(Path(resume) / "last.pt")
        config = resumed_config(payload, resume, changes)
    check_config(config)
    # A resumed run reads its data with the vocabulary it was trained with, and must find the
    # same data.
    vocabulary = lm_data.Vocabulary.from_state_dict(payload["vocabulary"]) if resume else None
    corpus = lm_data.load_corpus(config.data, config.level, config.clean, vocabulary)
    if resume and payload.get("corpus") not in (None, lm_data.fingerprint(corpus)):
        raise ValueError(
            f"--resume {resume}: the data ({corpus.source}) is not what the run was trained "
            f"on (it changed, or the default corpus differs in this Python version); resume "
            f"with the run's own data, or start a new run")
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


