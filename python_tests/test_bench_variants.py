"""benchmarks/bench_variants.py: its pure-PyTorch cell loop computes what the variant does (so
the speedup compares like with like), and a quick run reports every column."""

import json
import statistics

import pytest
import torch

import lstm_ext
from conftest import load_benchmark_script, rel_error


@pytest.fixture(scope="module")
def bench():
    return load_benchmark_script("bench_variants")


def test_each_variants_cell_loop_is_the_variant(bench):
    for name, (options, weights_for) in bench.VARIANTS.items():
        module = lstm_ext.LSTM(6, 8, dtype=torch.float64, **options)
        x = torch.randn(7, 3, 6, dtype=torch.float64)
        torch.manual_seed(5)
        expected, (h, c) = module(x)
        torch.manual_seed(5)
        actual, (loop_h, loop_c) = bench.cell_loop(module, weights_for)(x)
        for a, e in ((actual, expected), (loop_h, h[0]), (loop_c, c[0])):
            assert rel_error(a, e) < 1e-12, name


def test_a_quick_run_reports_cost_and_speedup_of_every_variant(bench, tmp_path, capsys):
    report = tmp_path / "variants.json"
    assert bench.main(["--quick", "--no-compile", "--repeats", "3", "--json", str(report)]) == 0
    saved = json.loads(report.read_text())
    assert [row["variant"] for row in saved["rows"]] == list(bench.VARIANTS)
    for row in saved["rows"]:
        results, times = row["results"], row["results"]["times_ms"]
        assert all(len(values) == 3 for values in times.values())
        for name in ("plain", "variant", "loop"):
            assert results[name + "_ms"] == pytest.approx(statistics.median(times[name]), 1e-3)
        # Each ratio pairs the runs of one iteration.
        for ratio, over, under in (("cost", "variant", "plain"), ("speedup", "loop", "variant")):
            paired = statistics.median(a / b for a, b in zip(times[over], times[under]))
            assert results[ratio] == pytest.approx(paired, 1e-3)
    assert saved["machine"]["kernel_isa"] == torch.ops.lstm_ext.cpu_isa()
    assert "| weight_drop=0.3 |" in capsys.readouterr().out
