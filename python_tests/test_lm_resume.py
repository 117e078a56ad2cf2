"""Resume across processes: a training run killed with SIGKILL and resumed by a new process
(`lstm-ext train --resume`) must log exactly the metrics of the run that was never interrupted,
alone and under torchrun with 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lstm_ext.lm.checkpoint import load_checkpoint

# A projection sends the layer through the step loop (and its per-step GEMM set-up), dropout
# makes every step draw from the generator: any draw the library made on its own, or any state
# not restored, would change the losses after the resume.
FLAGS = ["--layers", "2", "--hidden", "16", "--emb", "8", "--proj-size", "8",
         "--dropout", "0.2", "--bptt", "8", "--batch-size", "4", "--eval-every", "25",
         "--no-progress"]
STEPS = 150
# What may differ between two runs: timings.
TIMINGS = {"tokens_per_s", "elapsed_s"}


def command(corpus_file, out, ranks, *extra):
    launcher = [sys.executable, "-m", "lstm_ext"]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(ranks), "-m", "lstm_ext"]
    return [*launcher, "train", "--data", str(corpus_file), "--out", str(out), *FLAGS, *extra]


def environment():
    # One thread per process: two torchrun ranks on two cores, and the same arithmetic in
    # every run.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def failure(result):
    """A failed run's report: every line that names an error (a rank's traceback, or a C++
    abort's "terminate called ...", can sit far above the launcher's summary), then the end of
    stderr."""
    lines = result.stderr.splitlines()
    markers = ("Error", "error", "Traceback", "terminate", "what()", "Abort")
    errors = [line for line in lines if any(marker in line for marker in markers)]
    return "\n".join(errors[:40] + ["..."] + lines[-40:])


def kill_every_process_of(marker):
    """SIGKILL to every process whose command line holds `marker` (torchrun starts its workers
    in sessions of their own, so killing the launcher's process group would leave them
    running)."""
    for entry in Path("/proc").iterdir():
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and marker.encode() in arguments:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def records(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("ranks", [1, 2], ids=["one process", "torchrun 2 processes"])
def test_a_run_killed_and_resumed_in_new_processes_logs_what_the_whole_run_logs(
        corpus_file, tmp_path, ranks):
    whole = tmp_path / "whole"
    result = subprocess.run(command(corpus_file, whole, ranks, "--max-steps", str(STEPS)),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=environment())
    assert result.returncode == 0, failure(result)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(corpus_file, killed, ranks, "--max-steps", str(STEPS)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
                               env=environment())
    try:
        # Killed after its second checkpoint, somewhere inside the window that follows.
        deadline = time.monotonic() + 240
        log = killed / "metrics.jsonl"
        while not (log.exists() and len(log.read_text().splitlines()) >= 2):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert process.poll() is None, "the run ended before it could be killed"
        kill_every_process_of(str(killed))  # every rank and the launcher, no clean-up
        process.wait(timeout=60)
    finally:
        kill_every_process_of(str(killed))
        process.stderr.close()
    time.sleep(0.5)  # nothing may write after the kill: the log must not grow
    logged = log.read_text()
    time.sleep(0.5)
    assert log.read_text() == logged
    # The second record is logged just before its checkpoint is written: a kill between the
    # two leaves the first checkpoint.
    stopped_at = load_checkpoint(killed / "last.pt")["position"]["step"]
    assert 25 <= stopped_at < STEPS

    result = subprocess.run(command(corpus_file, killed, ranks, "--resume", str(killed)),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=environment())
    assert result.returncode == 0, failure(result)
    # The records up to the kill were logged twice at most (a record written after the last
    # checkpoint is logged again on resume): compare step by step, by step number.
    resumed = {record["step"]: record for record in records(killed)}
    uninterrupted = {record["step"]: record for record in records(whole)}
    assert resumed == uninterrupted
    assert sorted(uninterrupted) == list(range(25, STEPS + 1, 25))
    final = {name: load_checkpoint(out / "last.pt")["model"] for name, out in
             (("whole", whole), ("resumed", killed))}
    for name, tensor in final["whole"].items():
        assert torch.equal(tensor, final["resumed"][name]), name


def train_cli(corpus_file, out, *extra):
    from lstm_ext.lm import cli

    return cli.main(["train", "--data", str(corpus_file), "--out", str(out), *FLAGS, *extra])


def test_resume_with_a_larger_max_steps_trains_a_finished_run_on(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(corpus_file, out, "--max-steps", "50") == 0
    capsys.readouterr()
    assert train_cli(corpus_file, out, "--resume", str(out), "--max-steps", "75") == 0
    printed = capsys.readouterr().out
    assert json.loads(printed)["step"] == 75 and "null" not in printed
    assert [r["step"] for r in records(out)] == [25, 50, 75]
    payload = load_checkpoint(out / "last.pt")
    assert payload["config"]["max_steps"] == 75 and payload["position"]["step"] == 75


def test_resume_of_a_finished_run_says_how_to_train_longer(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(corpus_file, out, "--max-steps", "25") == 0
    capsys.readouterr()
    for extra in ([], ["--max-steps", "25"]):
        assert train_cli(corpus_file, out, "--resume", str(out), *extra) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "already finished, at step 25" in captured.err and "--max-steps" in captured.err


def test_resume_refuses_a_setting_that_would_make_another_run(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(corpus_file, out, "--max-steps", "25") == 0
    capsys.readouterr()
    assert train_cli(corpus_file, out, "--resume", str(out), "--max-steps", "50",
                     "--hidden", "32", "--lr", "0.1") == 2
    error = capsys.readouterr().err
    assert "--hidden 32 (the run has 16)" in error and "--lr 0.1" in error
    assert "cannot change on resume" in error
    assert load_checkpoint(out / "last.pt")["position"]["step"] == 25  # untouched
    # The same value as the run's own is no change, and is accepted.
    assert train_cli(corpus_file, out, "--resume", str(out), "--max-steps", "50",
                     "--hidden", "16") == 0


def test_a_two_process_run_resumes_only_with_two_processes(corpus_file, tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(command(corpus_file, out, 2, "--max-steps", "25"),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=environment())
    assert result.returncode == 0, failure(result)
    result = subprocess.run(command(corpus_file, out, 1, "--resume", str(out), "--max-steps",
                                    "50"), capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=environment())
    assert result.returncode == 2
    assert "trained by 2 process(es) and this job has 1" in result.stderr
    assert "--nproc-per-node 2" in result.stderr


def test_ranks_agree_when_the_time_budget_ends_the_run(corpus_file, tmp_path):
    """Rank 1's clock runs 20 times fast, so it alone would find the budget spent first; if it
    stopped on its own, rank 0 would wait for it in the next gradient all-reduce for ever."""
    launcher = tmp_path / "fast_clock_on_rank_1.py"
    launcher.write_text(
        "import os, sys, time\n"
        "if os.environ.get('RANK') == '1':\n"
        "    real, start = time.perf_counter, time.perf_counter()\n"
        "    time.perf_counter = lambda: start + 20 * (real() - start)\n"
        "from lstm_ext.lm import cli\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    out = tmp_path / "budget"
    arguments = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2", str(launcher), "train", "--data", str(corpus_file),
                 "--out", str(out), *FLAGS, "--max-steps", "100000", "--time-budget", "0.02"]
    try:
        result = subprocess.run(arguments, capture_output=True, text=True, timeout=60,
                                cwd=tmp_path, env=environment())
    finally:
        kill_every_process_of(str(out))
    assert result.returncode == 0, failure(result)
    last = records(out)[-1]
    # Rank 1 saw the budget spent after 1.2 s / 20 of training: the run ended well before
    # rank 0's own clock said so.
    assert 0 < last["step"] < 100000
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == last["step"]


def test_a_checkpoint_from_before_per_rank_state_still_resumes(corpus_file, tmp_path, capsys):
    """Checkpoints written before the per-rank layout hold one 'rng' and 'state' at the top
    (and no world size): they resume as the one-process runs they came from."""
    out = tmp_path / "run"
    assert train_cli(corpus_file, out, "--max-steps", "25") == 0
    payload = load_checkpoint(out / "last.pt")
    rank = payload.pop("ranks")[0]
    del payload["world_size"]
    torch.save({**payload, "rng": rank["rng"], "state": rank["state"]}, out / "last.pt")
    capsys.readouterr()
    assert train_cli(corpus_file, out, "--resume", str(out), "--max-steps", "50") == 0
    assert json.loads(capsys.readouterr().out)["step"] == 50


def test_resume_reads_the_data_with_the_runs_vocabulary_and_refuses_changed_data(
        corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(corpus_file, out, "--max-steps", "25") == 0
    original = corpus_file.read_text()
    # Changed data: a character the run never saw, in every split.
    corpus_file.write_text(original.replace("cat", "c@t"))
    capsys.readouterr()
    assert train_cli(corpus_file, out, "--resume", str(out), "--max-steps", "50") == 2
    error = capsys.readouterr().err
    assert "is not what the run was trained on" in error and "start a new run" in error
    # The same data again resumes, and the vocabulary is the run's own.
    corpus_file.write_text(original)
    assert train_cli(corpus_file, out, "--resume", str(out), "--max-steps", "50") == 0
    assert (load_checkpoint(out / "last.pt")["vocabulary"]
            == load_checkpoint(out / "best.pt")["vocabulary"])
