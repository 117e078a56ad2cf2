"""benchmarks/compare_runs.py: the table of two LM runs (speed ratio, time to a target loss)."""

import json

import pytest

from conftest import load_benchmark_script


@pytest.fixture(scope="module")
def compare_runs():
    return load_benchmark_script("compare_runs")


def write_run(folder, records):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def records(speed, seconds_per_eval, losses):
    return [{"step": 10 * (i + 1), "valid_loss": loss, "train_loss": loss + 0.1,
             "tokens_per_s": speed * (0.5 if i == 0 else 1.0),  # first window pays start-up
             "elapsed_s": seconds_per_eval * (i + 1)} for i, loss in enumerate(losses)]


def test_ratios_and_time_to_target(compare_runs, tmp_path, capsys):
    fast = write_run(tmp_path / "ext", records(1500.0, 60.0, [2.0, 1.6, 1.45, 1.40]))
    slow = write_run(tmp_path / "torch", records(1000.0, 90.0, [2.0, 1.6, 1.46, 1.41]))
    markdown, png = tmp_path / "table.md", tmp_path / "curve.png"
    assert compare_runs.main([str(fast), str(slow), "--target-loss", "1.5",
                              "--markdown", str(markdown), "--png", str(png)]) == 0
    rows = [line for line in markdown.read_text().splitlines() if line.startswith("| ")][1:]
    ext, torch_row = ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)
    # run, steps, minutes, final, best, tokens/s, tokens/s ratio, time to target, time ratio
    assert ext[1:8] == ["40", "4.0", "1.4000", "1.4000", "1500", "1.00", "3.0 min"]
    assert torch_row[1:9] == ["40", "6.0", "1.4100", "1.4100", "1000", "1.50", "4.5 min", "1.50"]
    assert png.stat().st_size > 0
    assert "tokens/s ratio" in capsys.readouterr().out


def test_a_run_that_never_reaches_the_target(compare_runs, tmp_path):
    history = records(1000.0, 60.0, [2.0, 1.8])
    assert compare_runs.time_to_reach(history, 1.5) is None
    assert compare_runs.time_to_reach(history, 1.8) == 120.0
    row = compare_runs.summarize("run", history, 1.5)
    assert "never" in compare_runs.markdown([row], 1.5)


def test_missing_metrics_is_a_clear_error(compare_runs, tmp_path, capsys):
    assert compare_runs.main([str(tmp_path)]) == 2
    assert "no metrics" in capsys.readouterr().err
