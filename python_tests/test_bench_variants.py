"""benchmarks/bench_variants.py: its pure-PyTorch cell loop computes what the variant does (so
the speedup compares like with like), and a quick run reports every column."""

import json
import statistics
import time

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
    roof = saved["roof_gflops"]
    assert roof > 0
    for row in saved["rows"]:
        results = row["results"]
        # (64, 8, 10): 40 N H^2 FLOPs (see the test below), N = 80 rows.
        at_roof_ms = 40 * 80 * 64**2 / (roof * 1e9) * 1e3
        assert results["roof_fraction"] == pytest.approx(at_roof_ms / results["variant_ms"])
        assert results["loop_ceiling"] == pytest.approx(results["loop_ms"] / at_roof_ms)
    out = capsys.readouterr().out
    assert "| weight_drop=0.3 |" in out and "have a ceiling of at least 10x" in out


def test_roof_limits_are_the_hand_computed_ones(bench):
    """Forward 2 N 4H (I + H), backward twice that less the input's gradient 2 N 4H I: with
    I = H, 8 N H (2 + 4 - 1) H = 40 N H^2 FLOPs per forward + backward."""
    assert bench.training_flops((256, 4, 50)) == 40 * 200 * 256**2  # 524 MFLOP
    # At 200 GFLOP/s those take 2.62 ms: a 5.24 ms variant runs at half the roof, and a
    # 26.2 ms loop can be beaten by 10x at most.
    limits = bench.roof_limits({"variant_ms": 5.24288, "loop_ms": 26.2144}, (256, 4, 50), 200)
    assert limits["roof_fraction"] == pytest.approx(0.5)
    assert limits["loop_ceiling"] == pytest.approx(10.0)


def test_each_timed_call_follows_one_of_its_own_in_a_shuffled_order(bench):
    """In a fixed order the contender after the loop ran slower than in its own place, which
    biased the ratios: every call is now made twice (the second timed), in an order that
    changes between iterations and puts every contender first some time."""
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench.measure(contenders, repeats=12, warmup=1)
    assert all(len(values) == 12 for values in times.values())
    assert len(calls) == 2 * 3 * 13
    pairs = [calls[i:i + 2] for i in range(0, len(calls), 2)]
    assert all(first == second for first, second in pairs)
    orders = ["".join(pair[0] for pair in pairs[i:i + 3]) for i in range(0, len(pairs), 3)]
    assert all(sorted(order) == ["a", "b", "c"] for order in orders)
    assert {order[0] for order in orders} == {"a", "b", "c"}


def test_short_rows_get_more_iterations_up_to_the_cap(bench, monkeypatch):
    """Without --repeats a row runs at least MIN_TIMED_S in all, sized by its last warm-up
    iteration, and at most bench_lstm.MAX_REPEATS iterations; a row already long enough keeps
    its count."""
    monkeypatch.setattr(bench.bench_lstm, "MAX_REPEATS", 7)
    contenders = {name: (lambda: time.sleep(1e-4)) for name in "ab"}
    for min_timed_s, expected in ((0.0, 3), (1e-9, 3), (60.0, 7)):
        times = bench.measure(contenders, repeats=3, warmup=1, min_timed_s=min_timed_s)
        assert [len(values) for values in times.values()] == [expected, expected]
