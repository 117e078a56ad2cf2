"""benchmarks/bench_lstm.py: the rows it times, the groups and targets of its summary, and its
report (the CUDA side is checked on the CPU with a GPU machine description)."""

import pytest
import torch

from conftest import load_benchmark_script


@pytest.fixture(scope="module")
def bench():
    return load_benchmark_script("bench_lstm")


def test_gpu_suites_time_forward_and_forward_backward_of_every_deepbench_shape(bench):
    for suite, dtypes in (("gpu-fp32", {"float32"}), ("gpu-half", {"bfloat16", "float16"})):
        rows = bench.SUITES[suite]
        shapes = {(r.hidden, r.batch, r.steps) for r in rows}
        assert shapes == {(h, b, t) for h in (256, 512, 1024) for b in (16, 64) for t in (25, 150)}
        assert {(r.hidden, r.batch, r.steps, r.mode, r.dtype) for r in rows} == {
            (*shape, mode, dtype) for shape in shapes for mode in ("forward", "training")
            for dtype in dtypes}


def test_cuda_summary_has_the_issue_targets(bench):
    rows = [bench.Row(mode, 256, batch, 25) for mode in ("forward", "training")
            for batch in (16, 64)]
    for row, ratio in zip(rows, (0.5, 0.7, 1.2, 0.8)):
        row.results = {"ratio": ratio}
    summary = {entry["group"]: entry for entry in bench.summarize(rows, "cuda")}
    assert summary["gpu fwd+bwd float32"]["median_ratio"] == pytest.approx(1.0)
    assert summary["gpu fwd+bwd float32"]["target"] == 1.0
    assert summary["gpu fwd+bwd float32 B<=16"]["rows"] == 1
    assert summary["gpu fwd+bwd float32 B<=16"]["median_ratio"] == pytest.approx(1.2)
    assert summary["gpu forward float32"]["target"] is None
    # On the CPU the same rows keep the CPU issue's groups and targets.
    cpu = {entry["group"]: entry for entry in bench.summarize(rows, "cpu")}
    assert cpu["training fp32"]["target"] == bench.TARGETS["training fp32"]


def test_forward_rows_time_both_implementations(bench):
    row = bench.Row("forward", 16, 2, 3)
    results = bench.measure(row, torch.device("cpu"), repeats=2, warmup=1)
    assert results["ours_ms"] > 0 and results["torch_ms"] > 0
    assert results["ratio"] == pytest.approx(results["torch_ms"] / results["ours_ms"])


def test_gpu_report_names_the_software_and_tf32(bench):
    row = bench.Row("training", 256, 16, 25)
    row.results = {"ours_ms": 1.0, "torch_ms": 2.0, "ratio": 2.0, "ours_gflops": 10.0,
                   "roof_fraction": 0.01}
    machine = {"device": "NVIDIA H200", "gpu": True, "torch": "2.11.0", "threads": 16,
               "python": "3.12.3", "cuda": "13.0", "cudnn": 91900, "tf32": True,
               "date": "2026-11-28 18:00 UTC"}
    text = bench.table([row], bench.summarize([row], "cuda"), machine, "cmd")
    assert "NVIDIA H200" in text and "cuDNN 91900" in text and "TF32 on" in text
    assert "| gpu fwd+bwd float32 B<=16 | 1 | 2.00 | 1.0 | yes |" in text


def test_a_failing_row_is_recorded_and_the_run_goes_on(bench, capsys):
    rows = [bench.Row("training", 8, 2, 3), bench.Row("training", 8, 2, 3, dtype="bfloat16"),
            bench.Row("forward", 8, 2, 3)]

    def measure_row(row):
        if row.dtype == "bfloat16":
            raise RuntimeError("\"_thnn_fused_lstm_cell_cuda\" not implemented for 'BFloat16'\n"
                               "more detail")
        return {"ours_ms": 1.0, "torch_ms": 1.5, "ratio": 1.5, "ours_gflops": 2.0}

    bench.run_rows(rows, measure_row, roof_of=lambda row: 4.0)
    assert rows[1].results == {
        "error": "RuntimeError: \"_thnn_fused_lstm_cell_cuda\" not implemented for 'BFloat16'"}
    assert rows[2].results["roof_fraction"] == 0.5
    printed = capsys.readouterr().out
    assert "not implemented for 'BFloat16'" in printed and "forward H8 B2 T3" in printed
    summary = {entry["group"]: entry for entry in bench.summarize(rows, "cuda")}
    assert summary["gpu fwd+bwd float32"]["rows"] == 1 and "gpu fwd+bwd bfloat16" not in summary
    machine = {"device": "cpu", "torch": "x", "threads": 1, "python": "3", "date": "d"}
    assert "| training H8 B2 T3 bfloat16 | | | | | | RuntimeError" in bench.table(
        rows, bench.summarize(rows, "cuda"), machine, "cmd")
