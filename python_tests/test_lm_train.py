"""The language-model driver end to end on tiny corpora: training lowers the loss, ext and
torch agree step for step, kill-and-resume equals uninterrupted, checkpoints are safe, eval and
generate work from a checkpoint, bad arguments give clear errors."""

import json
import math

import pytest
import torch

from lstm_ext.lm import checkpoint as lm_checkpoint, cli, data as lm_data, train as lm_train
from lstm_ext.lm.config import TrainConfig
from lstm_ext.lm.distributed import Distributed
from lstm_ext.lm.generate import generate


def tiny_config(corpus_file, out, **changes):
    settings = dict(data=str(corpus_file), level="char", layers=2, hidden=24, emb=12,
                    dropout=0.1, bptt=16, batch_size=8, lr=1e-2, warmup=5, max_steps=40,
                    eval_every=10, eval_batch_size=4, out=str(out), progress=False)
    settings.update(changes)
    return TrainConfig(**settings)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_validation_loss(corpus_file, tmp_path):
    lm_train.train(tiny_config(corpus_file, tmp_path / "run", epochs=5, max_steps=150,
                               eval_every=50, lr=2e-2))
    records = metrics(tmp_path / "run")
    vocabulary = len(lm_checkpoint.load_checkpoint(tmp_path / "run")["vocabulary"]["itos"])
    assert [r["step"] for r in records] == [50, 100, 150]
    # uniform guessing costs ln(vocabulary) nats; training must do clearly better, and improve
    assert records[-1]["valid_loss"] < torch.log(torch.tensor(float(vocabulary))) - 0.7
    assert records[-1]["valid_loss"] < records[0]["valid_loss"] - 0.1
    assert {"step", "epoch", "train_loss", "valid_loss", "valid_bpc", "tokens_per_s",
            "elapsed_s"} <= records[0].keys()
    for name in ("best.pt", "last.pt", "loss.png"):
        assert (tmp_path / "run" / name).is_file()


@pytest.mark.parametrize("precision,tolerance", [("fp64", 1e-10), ("fp32", 1e-4)])
def test_ext_and_torch_give_the_same_losses(corpus_file, tmp_path, precision, tolerance):
    runs = {}
    for impl in ("ext", "torch"):
        lm_train.train(tiny_config(corpus_file, tmp_path / impl, impl=impl, dropout=0.0,
                                   precision=precision, max_steps=12, eval_every=1))
        runs[impl] = metrics(tmp_path / impl)
    assert len(runs["ext"]) == 12
    for ours, theirs in zip(runs["ext"], runs["torch"]):
        for key in ("train_loss", "valid_loss"):
            assert abs(ours[key] - theirs[key]) <= tolerance * abs(theirs[key]), (ours, theirs)


def test_kill_and_resume_equals_uninterrupted(corpus_file, tmp_path, monkeypatch):
    config = tiny_config(corpus_file, tmp_path / "whole")
    lm_train.train(config)
    uninterrupted = metrics(tmp_path / "whole")

    original = lm_train.Run.evaluate_and_save

    def crash_after_step_20(self, *args):
        record = original(self, *args)
        if self.step == 20:
            raise KeyboardInterrupt("killed")
        return record

    monkeypatch.setattr(lm_train.Run, "evaluate_and_save", crash_after_step_20)
    with pytest.raises(KeyboardInterrupt):
        lm_train.train(tiny_config(corpus_file, tmp_path / "killed"))
    monkeypatch.setattr(lm_train.Run, "evaluate_and_save", original)
    lm_train.train(TrainConfig(progress=False), resume=tmp_path / "killed")
    resumed = metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == [10, 20, 30, 40]
    for a, b in zip(resumed, uninterrupted):
        assert a["train_loss"] == b["train_loss"] and a["valid_loss"] == b["valid_loss"]


def test_checkpoints_survive_a_crash_mid_write_and_corruption_is_reported(corpus_file, tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "run"
    lm_train.train(tiny_config(corpus_file, out, max_steps=10))
    good = (out / "last.pt").read_bytes()

    def crash_mid_write(payload, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lm_checkpoint.torch, "save", crash_mid_write)
    with pytest.raises(OSError):
        lm_checkpoint.save_atomically({"x": 1}, out / "last.pt")
    assert (out / "last.pt").read_bytes() == good
    assert not [p for p in out.iterdir() if p.name.startswith(".last.pt.")]
    monkeypatch.undo()

    (out / "broken.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        lm_checkpoint.load_checkpoint(out / "broken.pt")
    assert lm_checkpoint.load_checkpoint(out)["position"]["step"] == 10


class _RunsCodeWhenUnpickled:
    """A pickle payload that, loaded with pickle's defaults, would call os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": lm_checkpoint.CHECKPOINT_FORMAT, "model": _RunsCodeWhenUnpickled(marker)},
               path)
    with pytest.raises(ValueError, match="could run code"):
        lm_checkpoint.load_checkpoint(path)
    assert not marker.exists()


def test_eval_and_generate_from_a_checkpoint(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    lm_train.train(tiny_config(corpus_file, out, max_steps=20))
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    # The test split's loss, computed here in one forward pass over the split's columns (the
    # state carried across windows makes the driver's windows one sequence): not the valid's.
    payload = lm_checkpoint.load_checkpoint(out)
    model, vocabulary, config = lm_checkpoint.model_from_checkpoint(payload)
    corpus = lm_data.load_corpus(config.data, config.level, config.clean, vocabulary)
    losses = {}
    for split in ("valid", "test"):
        columns = lm_data.batchify(getattr(corpus, split), config.eval_batch_size)
        with torch.no_grad():
            logits, _ = model(columns[:-1])
        losses[split] = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), columns[1:].reshape(-1)).item()
    assert result["split"] == "test"
    assert result["loss"] == pytest.approx(losses["test"], rel=1e-5)
    assert abs(losses["test"] - losses["valid"]) > 1e-3
    assert result["bpc"] == pytest.approx(result["loss"] / math.log(2), rel=1e-12)
    assert cli.main(["generate", "--checkpoint", str(out / "best.pt"), "--prompt", "the ",
                     "--tokens", "30", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the ") and len(text.rstrip("\n")) == 34


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "/nonexistent/corpus.txt"], "no such file"),
    (["train", "--device", "tpu"], "--device"),
    (["eval", "--checkpoint", "/nonexistent/run"], "no such checkpoint"),
])
def test_bad_arguments_give_clear_errors(argv, message, capsys):
    assert cli.main(argv + ["--no-progress"] if argv[0] == "train" else argv) == 2
    assert message in capsys.readouterr().err


def test_empty_corpus_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli.main(["train", "--data", str(empty), "--no-progress"]) == 2
    assert "tokens" in capsys.readouterr().err


def test_module_entry_point_lists_the_commands(tmp_path):
    import subprocess
    import sys

    # Run outside the source folder, so the installed package (with its library) is imported.
    result = subprocess.run([sys.executable, "-m", "lstm_ext", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0
    for command in ("train", "eval", "generate"):
        assert command in result.stdout


def test_two_process_torchrun(corpus_file, tmp_path):
    """torchrun with 2 CPU processes (gloo): each trains on its own shard, rank 0 alone writes
    the log and checkpoints, and the job ends cleanly."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    # --standalone: a rendezvous on a free local port, so parallel runs cannot collide
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "-m", "lstm_ext", "train", "--data", str(corpus_file),
               "--layers", "1", "--hidden", "16", "--emb", "8", "--bptt", "8",
               "--batch-size", "4", "--max-steps", "6", "--eval-every", "3", "--out", str(out),
               "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path,
                            env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    records = metrics(out)
    assert [r["step"] for r in records] == [3, 6]
    assert all(r["world_size"] == 2 for r in records)
    assert result.stdout.count('"world_size": 2') == 1  # one summary line, from rank 0
    assert lm_checkpoint.load_checkpoint(out)["position"]["step"] == 6


def test_word_level_generation(corpus_file, tmp_path):
    out = tmp_path / "words"
    lm_train.train(tiny_config(corpus_file, out, level="word", max_steps=5, eval_every=5,
                               bptt=4, batch_size=4))
    model, vocabulary, config = lm_checkpoint.model_from_checkpoint(lm_checkpoint.load_checkpoint(out))
    text = "".join(generate(model, vocabulary, "word", "the cat", 25, seed=0))
    words = text.split()
    assert words and set(words) <= set(vocabulary.itos) - {"<unk>", "<eos>"}


def test_max_steps_alone_runs_past_the_first_epoch(corpus_file, tmp_path):
    out = tmp_path / "run"
    windows_per_epoch = lm_train.Run(tiny_config(corpus_file, out), lm_data.load_corpus(
        str(corpus_file), "char", True), Distributed(TrainConfig())).windows_per_epoch
    steps = windows_per_epoch + 5
    lm_train.train(tiny_config(corpus_file, out, max_steps=steps, eval_every=steps))
    assert [(r["step"], r["epoch"]) for r in metrics(out)] == [(steps, 1)]
    # and --epochs alone gives whole epochs
    lm_train.train(tiny_config(corpus_file, tmp_path / "epochs", max_steps=0, epochs=2,
                               eval_every=10_000))
    assert metrics(tmp_path / "epochs")[-1]["step"] == 2 * windows_per_epoch


def test_sgd_divides_the_rate_by_4_whenever_validation_stops_improving(corpus_file, tmp_path,
                                                                        monkeypatch):
    """--optimizer sgd: the plateau schedule sees each evaluation's loss; here validation
    improves, then worsens twice, so the rate ends at lr / 16."""
    losses = iter([3.0, 2.5, 2.6, 2.7])
    monkeypatch.setattr(lm_train, "evaluate", lambda *args, **kwargs: next(losses))
    config = tiny_config(corpus_file, tmp_path / "sgd", optimizer="sgd", lr=0.5, max_steps=8,
                         eval_every=2)
    lm_train.train(config)
    payload = lm_checkpoint.load_checkpoint(tmp_path / "sgd" / "last.pt")
    assert [group["lr"] for group in payload["optimizer"]["param_groups"]] == [0.5 / 16]
    assert [r["valid_loss"] for r in metrics(tmp_path / "sgd")] == [3.0, 2.5, 2.6, 2.7]


def test_the_time_budget_ends_training_with_a_last_evaluation(corpus_file, tmp_path):
    # 0.6 s of a run that would take about 10 s without the budget.
    config = tiny_config(corpus_file, tmp_path / "budget", max_steps=3000, eval_every=1000,
                         time_budget=0.01)
    record = lm_train.train(config)
    assert 0 < record["step"] < 3000
    assert 0.6 <= record["elapsed_s"] < 5
    assert metrics(tmp_path / "budget")[-1]["step"] == record["step"]
    assert lm_checkpoint.load_checkpoint(tmp_path / "budget" / "last.pt")["position"][
        "step"] == record["step"]


def test_tied_weights_with_a_projection_train(corpus_file, tmp_path):
    """--tied needs the LSTM's output (its projection) as wide as the embedding: the decoder
    then is the embedding, through training and a checkpoint, and the loss goes down."""
    out = tmp_path / "tied"
    lm_train.train(tiny_config(corpus_file, out, tied=True, proj_size=12, emb=12, max_steps=60,
                               eval_every=20, lr=2e-2))
    records = metrics(out)
    assert records[-1]["valid_loss"] < records[0]["valid_loss"]
    model, _, _ = lm_checkpoint.model_from_checkpoint(lm_checkpoint.load_checkpoint(out))
    assert model.decoder.weight is model.embedding.weight
    assert model.lstm.weight_hr_l0.shape == (12, 24)


@pytest.mark.parametrize("option, value, kept", [
    ("weight_drop", "0.3", 0.3), ("recurrent_dropout", "0.3", 0.3),
    ("zoneout", "0.1,0.05", (0.1, 0.05)), ("layer_norm", None, True)])
def test_an_lstm_variant_trains_is_kept_in_the_checkpoint_and_is_refused_for_torch(
        corpus_file, tmp_path, capsys, option, value, kept):
    flag = ["--" + option.replace("_", "-")] + ([value] if value else [])
    out = tmp_path / "variant"
    assert cli.main(["train", "--data", str(corpus_file), "--layers", "1", "--hidden", "24",
                     "--emb", "12", "--bptt", "16", "--batch-size", "8", "--lr", "2e-2",
                     "--max-steps", "40", "--eval-every", "20", *flag,
                     "--out", str(out), "--no-progress"]) == 0
    records = metrics(out)
    assert records[-1]["valid_loss"] < records[0]["valid_loss"]
    payload = lm_checkpoint.load_checkpoint(out)
    assert payload["config"][option] == kept
    model, _, _ = lm_checkpoint.model_from_checkpoint(payload)
    assert getattr(model.lstm, option) == kept
    # Resuming with the same setting given again is the same run.
    assert cli.main(["train", "--resume", str(out), "--max-steps", "45", *flag,
                     "--no-progress"]) == 0
    assert cli.main(["train", "--data", str(corpus_file), "--impl", "torch", *flag,
                     "--out", str(tmp_path / "torch"), "--no-progress"]) == 2
    assert f"{flag[0]} needs --impl ext" in capsys.readouterr().err


def test_a_bad_zoneout_flag_says_what_it_expects(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--zoneout", "0.1,2"])
    assert "expected Z_C,Z_H" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["onnx", "aoti"])
def test_export_writes_a_model_that_generates_like_the_checkpoint(corpus_file, tmp_path,
                                                                  capsys, fmt):
    """lstm-ext export, then the exported file run on a prompt and on one more token with the
    state carried, against the checkpoint's model in PyTorch."""
    if fmt == "onnx":
        pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
        ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    out = tmp_path / "run"
    lm_train.train(tiny_config(corpus_file, out, max_steps=10))
    target = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt2")
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(out), "--format", fmt,
                     "--out", str(target)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == fmt
    model, _, _ = lm_checkpoint.model_from_checkpoint(lm_checkpoint.load_checkpoint(out))
    if fmt == "onnx":
        session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        run = lambda *args: [torch.from_numpy(a) for a in  # noqa: E731
                             session.run(None, dict(zip(names, (t.numpy() for t in args))))]
    else:
        run = torch._inductor.aoti_load_package(str(target))
    prompt = torch.randint(0, 10, (5, 3))
    state = (torch.zeros(2, 3, 24), torch.zeros(2, 3, 24))
    logits, h, c = run(prompt, *state)
    with torch.no_grad():
        expected, (expected_h, expected_c) = model(prompt, state)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        next_token = expected[-1].argmax(-1, keepdim=True).t()  # (1, batch)
        logits, _, _ = run(next_token, h, c)
        torch.testing.assert_close(logits, model(next_token, (expected_h, expected_c))[0],
                                   rtol=1e-5, atol=1e-5)
