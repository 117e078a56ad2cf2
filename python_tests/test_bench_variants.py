"""benchmarks/bench_variants.py: its pure-PyTorch cell loop computes what the variant does (so
the speedup compares like with like), and a quick run reports every column."""

import json

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
    assert bench.main(["--quick", "--no-compile", "--repeats", "1", "--json", str(report)]) == 0
    saved = json.loads(report.read_text())
    assert [row["variant"] for row in saved["rows"]] == list(bench.VARIANTS)
    for row in saved["rows"]:
        results = row["results"]
        assert results["cost"] == pytest.approx(results["variant_ms"] / results["plain_ms"])
        assert results["speedup"] == pytest.approx(results["loop_ms"] / results["variant_ms"])
    assert saved["machine"]["kernel_isa"] == torch.ops.lstm_ext.cpu_isa()
    assert "| weight_drop=0.3 |" in capsys.readouterr().out
