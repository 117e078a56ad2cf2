"""The README's drop-in example runs as written, its driver commands parse, and its set-up
and torchrun command lines run (reduced to a few steps)."""

import json
import re
import shlex
from pathlib import Path

from lstm_ext.lm import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def test_drop_in_example_runs():
    text = README.read_text()
    section = text[text.index("## Drop-in use"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["output"].shape == (8, 50, 256)
    assert namespace["h_n"].shape == namespace["c_n"].shape == (2, 8, 256)


def documented_driver_commands():
    """Every `lstm-ext ...` command in the fenced shell blocks of the README and the results
    notes, continuation lines joined, `&&` chains split, comments dropped."""
    commands = []
    results = README.parent / "benchmarks" / "results"
    for path in (README, results / "lm-shakespeare" / "README.md",
                 results / "lm-variants-shakespeare" / "README.md"):
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
                for part in line.split("&&"):
                    words = shlex.split(part)
                    if words and words[0] == "lstm-ext":
                        commands.append(words[1:])
    return commands


def test_documented_driver_commands_parse():
    commands = documented_driver_commands()
    assert {words[0] for words in commands} >= {"train", "eval", "generate"}
    parser = cli.build_parser()
    for words in commands:
        try:
            parser.parse_args(words)
        except SystemExit:
            raise AssertionError(f"README command does not parse: lstm-ext {' '.join(words)}")


def run_documented(words, cwd, timeout=600):
    """A documented `lstm-ext`/`torchrun` command line, run with this Python (the console
    scripts are the same entry points)."""
    import os
    import subprocess
    import sys

    if words[0] == "lstm-ext":
        words = [sys.executable, "-m", "lstm_ext", *words[1:]]
    elif words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", "--standalone", *words[1:]]
    # torchrun's two ranks share the two cores: one thread each.
    environment = {**os.environ, "OMP_NUM_THREADS": "1"} if "torch.distributed.run" in words \
        else None
    return subprocess.run(words, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=environment)


def test_the_set_up_main_job_runs_as_documented_for_a_few_steps(tmp_path):
    """Set-up command 1's `lstm-ext train && lstm-ext generate ...`, as written, with only
    --max-steps 2 added (and no progress bar): the default corpus, model and flags."""
    text = README.read_text()
    block = re.search(r"## Set-up.*?```bash\n(.*?)```", text, re.S).group(1)
    line = next(line for line in block.splitlines() if "lstm-ext train" in line)
    commands = [shlex.split(part) for part in line.split("&&")]
    documented = [words for words in commands if words[0] == "lstm-ext"]
    assert [words[1] for words in documented] == ["train", "generate"]
    train = run_documented([*documented[0], "--max-steps", "2", "--no-progress"], tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]
    assert json.loads(train.stdout.strip().splitlines()[-1])["step"] == 2
    generate = run_documented(documented[1], tmp_path)
    assert generate.returncode == 0, generate.stderr[-2000:]
    prompt = documented[1][documented[1].index("--prompt") + 1]
    assert generate.stdout.startswith(prompt) and len(generate.stdout) > len(prompt) + 150


def test_the_documented_torchrun_line_runs(corpus_file, tmp_path):
    """The README's `torchrun --nproc-per-node N -m lstm_ext train ...` with N = 2 and a tiny
    model on a tiny corpus in place of the '...'."""
    match = re.search(r"`(torchrun --nproc-per-node N -m lstm_ext train) \.\.\.`",
                      README.read_text())
    assert match, "the README's torchrun line changed: update this test with it"
    words = shlex.split(match.group(1).replace(" N ", " 2 ")) + [
        "--data", str(corpus_file), "--layers", "1", "--hidden", "16", "--emb", "8",
        "--bptt", "8", "--batch-size", "4", "--max-steps", "4", "--eval-every", "2",
        "--no-progress", "--out", str(tmp_path / "ddp")]
    result = run_documented(words, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["world_size"] == 2
