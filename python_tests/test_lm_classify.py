"""`lstm-ext classify`: the temporal-order data is what it claims to be, the stacked-LSTM
classifier learns it far above chance on held-out sequences, ext and torch start identical,
and bad arguments give clear errors."""

import json

import pytest
import torch

from lstm_ext.lm import cli
from lstm_ext.lm.classify import (DISTRACTORS, ClassifyConfig, SequenceClassifier, TemporalOrder,
                                  classify)


def test_each_sequence_holds_x_and_y_once_in_their_windows_and_the_label_is_their_order():
    task = TemporalOrder(features=100, length=100, noise=0.5, seed=3)
    symbols, labels = task.symbols(4096, torch.Generator().manual_seed(4))
    x, y = DISTRACTORS, DISTRACTORS + 1
    assert symbols.shape == (4096, 100) and labels.shape == (4096,)
    assert ((symbols == x).sum(1) == 1).all() and ((symbols == y).sum(1) == 1).all()
    x_at = (symbols == x).float().argmax(1)
    y_at = (symbols == y).float().argmax(1)
    first, second = torch.minimum(x_at, y_at), torch.maximum(x_at, y_at)
    assert first.min() >= 10 and first.max() < 20    # the paper's t1 in [10, 20)
    assert second.min() >= 50 and second.max() < 60  # and t2 in [50, 60)
    assert torch.equal(labels, (x_at < y_at).float())
    assert 0.45 < labels.mean().item() < 0.55
    # every distractor shows up everywhere else
    assert set(symbols[:, 0].tolist()) == set(range(DISTRACTORS))


def test_features_are_noisy_symbol_vectors():
    task = TemporalOrder(features=100, length=30, noise=0.5, seed=3)
    generator = torch.Generator().manual_seed(5)
    inputs, labels = task.sample(64, generator)
    assert inputs.shape == (64, 30, 100) and inputs.dtype == torch.float32
    symbols, again = task.symbols(64, torch.Generator().manual_seed(5))
    assert torch.equal(labels, again)
    residual = inputs - task.prototypes[symbols]
    assert 0.45 < residual.std().item() < 0.55       # the noise is there, at its level
    assert not torch.equal(*task.sample(2, generator)[0])  # no two sequences repeat


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_classifier_learns_temporal_order_far_above_chance(impl, tmp_path):
    config = ClassifyConfig(impl=impl, length=40, steps=200, eval_every=100, test_size=1024,
                            progress=False, out=str(tmp_path / impl))
    record = classify(config)
    assert record["step"] == 200
    assert record["test_accuracy"] >= 0.95, record
    assert record["test_loss"] < 0.2
    records = [json.loads(line) for line in
               (tmp_path / impl / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [100, 200]
    saved = torch.load(tmp_path / impl / "model.pt", weights_only=True)
    model = SequenceClassifier(impl=impl)
    model.load_state_dict(saved["model"])
    assert saved["record"] == record


def test_ext_and_torch_classifiers_start_from_the_same_weights():
    torch.manual_seed(7)
    ours = SequenceClassifier(impl="ext")
    torch.manual_seed(7)
    theirs = SequenceClassifier(impl="torch")
    for (name, a), (other, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert name == other and torch.equal(a, b)
    inputs = torch.randn(8, 25, 100, dtype=torch.float64)
    ours, theirs = ours.double(), theirs.double()
    torch.testing.assert_close(ours(inputs), theirs(inputs), rtol=1e-10, atol=1e-12)
    # the forget-gate bias is raised, the other gates' biases are not
    bias = ours.lstm.bias_ih_l0
    assert bias[128:256].mean() > 2.9 and bias[:128].abs().max() < 0.1


def test_cli_prints_the_held_out_accuracy(capsys, tmp_path):
    """The printed accuracy is the saved model's on the held-out set, recomputed here from the
    task's own held-out draw."""
    assert cli.main(["classify", "--length", "20", "--steps", "20", "--eval-every", "10",
                     "--test-size", "64", "--hidden", "16", "--no-progress",
                     "--out", str(tmp_path)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["step"] == 20 and record["chance"] == 0.5
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    config = ClassifyConfig(**saved["config"])
    model = SequenceClassifier(config.features, config.hidden, config.layers,
                               config.forget_bias, config.impl)
    model.load_state_dict(saved["model"])
    task = TemporalOrder(config.features, config.length, config.noise, config.seed)
    inputs, labels = task.sample(config.test_size, torch.Generator().manual_seed(config.seed + 1))
    with torch.no_grad():
        predictions = (model.eval()(inputs) > 0).float()
    assert record["test_accuracy"] == (predictions == labels).float().mean().item()


@pytest.mark.parametrize("argv,message", [
    (["--length", "5"], "--length must be at least 10"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--steps", "0"], "--steps must be positive"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--noise", "-0.1"], "--noise must be non-negative"),
])
def test_bad_arguments_give_clear_errors(argv, message, capsys):
    assert cli.main(["classify", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
