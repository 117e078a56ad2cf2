"""What DistributedDataParallel training must do, checked against a single-process reference:
ranks read different shards, the update is the average of their gradients, and each rank draws
its own dropout masks."""

import copy
import os
import subprocess
import sys

import torch
from torch import nn

from lstm_ext.lm import data as lm_data
from lstm_ext.lm.checkpoint import load_checkpoint
from lstm_ext.lm.config import TrainConfig
from lstm_ext.lm.model import build_model

FLAGS = ["--layers", "1", "--hidden", "12", "--emb", "8", "--bptt", "6", "--batch-size", "3",
         "--precision", "fp64", "--optimizer", "sgd", "--lr", "0.5", "--clip", "0",
         "--eval-every", "1", "--no-progress"]


def torchrun(corpus_file, out, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "-m", "lstm_ext", "train", "--data", str(corpus_file), "--out", str(out),
               *FLAGS, *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180,
                            cwd=out.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return load_checkpoint(out / "last.pt")


def test_one_ddp_step_is_the_average_of_each_shards_gradient(corpus_file, tmp_path):
    """One SGD step of 2 ranks without dropout equals, to fp64 rounding, one step of a single
    process that averages the gradients of rank 0's and rank 1's first windows; had both ranks
    read the same shard, or the gradients not been averaged, the weights would differ."""
    payload = torchrun(corpus_file, tmp_path / "ddp", "--dropout", "0", "--max-steps", "1")
    config = TrainConfig(**{**payload["config"], "progress": False})
    corpus = lm_data.load_corpus(str(corpus_file), config.level, config.clean,
                                 lm_data.Vocabulary.from_state_dict(payload["vocabulary"]))
    model = build_model(config, len(corpus.vocabulary))
    length = corpus.train.numel() // 2
    shards = [corpus.train[:length], corpus.train[length:2 * length]]
    assert not torch.equal(shards[0][:100], shards[1][:100])
    gradients = []
    for shard in shards:
        replica = copy.deepcopy(model)
        inputs, targets = next(lm_data.bptt_windows(lm_data.batchify(shard, config.batch_size),
                                                    config.bptt))
        logits, _ = replica(inputs)
        nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                    targets.reshape(-1)).backward()
        gradients.append({name: p.grad for name, p in replica.named_parameters()})
    expected = {name: p.detach() - config.lr * (gradients[0][name] + gradients[1][name]) / 2
                for name, p in model.named_parameters()}
    one_shard = {name: p.detach() - config.lr * gradients[0][name]
                 for name, p in model.named_parameters()}
    trained = payload["model"]
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(trained[name], one_shard[name], rtol=1e-6)
               for name in one_shard)


def test_each_rank_draws_its_own_dropout_masks(corpus_file, tmp_path):
    """Both ranks draw the same number of masks; their generators end apart only if each was
    seeded apart (with one seed for all, every rank would drop the same units)."""
    payload = torchrun(corpus_file, tmp_path / "ddp", "--dropout", "0.3", "--max-steps", "2")
    first, second = (rank["rng"]["torch"] for rank in payload["ranks"])
    assert not torch.equal(first, second)
