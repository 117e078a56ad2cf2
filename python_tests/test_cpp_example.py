"""examples/serve_cpp: a trained language model exported with `lstm-ext export --format aoti`
and served by the C++ program, which must print exactly what `lstm-ext generate
--temperature 0` prints for the same checkpoint. The program is built by CMake (.ci/run builds
it and points LSTM_EXT_CPP_EXAMPLE at it); without a build the test is skipped, unless that
variable names a program that is missing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lstm_ext.lm import train as lm_train
from lstm_ext.lm.checkpoint import load_checkpoint, model_from_checkpoint
from test_lm_train import tiny_config

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = os.environ.get("LSTM_EXT_CPP_EXAMPLE",
                         str(ROOT / "cmake-build" / "examples" / "serve_cpp" / "lm_generate"))


@torch.no_grad()
def greedy_scores(model, vocabulary, prompt, count, drop_cell_state=False):
    """The logit of each greedy character after `prompt`, with the state carried (or, as a
    server that lost it would, its cell zeroed each step)."""
    logits, (h, c) = model(vocabulary.encode(list(prompt)).view(-1, 1))
    scores = []
    for _ in range(count):
        last = logits[-1, 0].clone()
        last[0] = float("-inf")  # the unknown token is never emitted
        token = int(last.argmax())
        scores.append(float(last[token]))
        logits, (h, c) = model(torch.tensor([[token]]),
                               (h, torch.zeros_like(c) if drop_cell_state else c))
    return torch.tensor(scores)


def test_the_cpp_server_generates_what_python_generates(corpus_file, tmp_path):
    if not Path(PROGRAM).is_file():
        if "LSTM_EXT_CPP_EXAMPLE" in os.environ:
            pytest.fail(f"LSTM_EXT_CPP_EXAMPLE={PROGRAM}: no such program")
        pytest.skip("examples/serve_cpp is not built (the CMake build in .ci/run builds it)")
    run = tmp_path / "run"
    lm_train.train(tiny_config(corpus_file, run, max_steps=60, eval_every=30, lr=2e-2))
    model, vocabulary, _ = model_from_checkpoint(load_checkpoint(run))
    package = tmp_path / "lm.pt2"
    lstm_ext = [sys.executable, "-m", "lstm_ext"]
    # cwd: away from the source folder, which `python -m` would import instead of the
    # installed package.
    subprocess.run([*lstm_ext, "export", "--checkpoint", str(run), "--format", "aoti",
                    "--out", str(package)], check=True, capture_output=True, timeout=600,
                   cwd=tmp_path)
    for prompt in ("the cat ", "ñ dog"):  # the second has a character training never saw
        python = subprocess.run([*lstm_ext, "generate", "--checkpoint", str(run), "--prompt",
                                 prompt, "--tokens", "60", "--temperature", "0"],
                                capture_output=True, text=True, timeout=300, check=True,
                                cwd=tmp_path)
        cpp = subprocess.run([PROGRAM, str(package), f"{package}.vocab", prompt, "60",
                              "--scores"], capture_output=True, text=True, timeout=300)
        assert cpp.returncode == 0, cpp.stderr[-2000:]
        assert cpp.stdout == python.stdout
        assert len(cpp.stdout) > len(prompt) + 50
        # Step by step, the chosen logits are Python's with the state carried, and tell apart
        # a server that loses it (greedy text alone may loop and not show it).
        scores = torch.tensor([float(line) for line in cpp.stderr.split()])
        expected = greedy_scores(model, vocabulary, prompt, 60)
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
        stateless = greedy_scores(model, vocabulary, prompt, 60, drop_cell_state=True)
        assert (stateless - expected).abs().max() > 1e-2
