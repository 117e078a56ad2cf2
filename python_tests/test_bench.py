"""benchmarks/bench_lstm.py: the rows it times, the groups and targets of its summary, and its
report (the CUDA side is checked on the CPU with a GPU machine description)."""

import statistics

import pytest
import torch

import lstm_ext

from conftest import load_benchmark_script


@pytest.fixture(scope="module")
def bench():
    return load_benchmark_script("bench_lstm")


def test_gpu_suites_time_every_deepbench_shape_the_lm_shape_and_decode(bench):
    """The CUDA issue's rows: forward and forward+backward of every DeepBench shape, the LM
    shape (2 x 512, B 64, T 128) and 2-layer decode steps at B <= 8, in each dtype."""
    for suite, dtypes in (("gpu-fp32", {"float32"}), ("gpu-half", {"bfloat16", "float16"})):
        rows = bench.SUITES[suite]
        deepbench = [r for r in rows if r.layers == 1]
        shapes = {(r.hidden, r.batch, r.steps) for r in deepbench}
        assert shapes == {(h, b, t) for h in (256, 512, 1024) for b in (16, 64) for t in (25, 150)}
        assert {(r.hidden, r.batch, r.steps, r.mode, r.dtype) for r in deepbench} == {
            (*shape, mode, dtype) for shape in shapes for mode in ("forward", "training")
            for dtype in dtypes}
        others = {(r.mode, r.hidden, r.batch, r.steps, r.layers, r.dtype)
                  for r in rows if r.layers != 1}
        for dtype in dtypes:
            assert ("training", 512, 64, 128, 2, dtype) in others
            assert any(mode == "decode" and batch <= 8 and steps == 1 and layers == 2 and d == dtype
                       for mode, _, batch, steps, layers, d in others)
        assert len(others) == len(rows) - len(deepbench)


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
    results = bench.measure(row, torch.device("cpu"), repeats=3, warmup=1)
    times = results["times_ms"]
    assert results["ours_ms"] > 0 and results["torch_ms"] > 0
    assert results["ours_ms"] == pytest.approx(statistics.median(times["ours"]), 1e-3)
    assert results["torch_ms"] == pytest.approx(statistics.median(times["torch"]), 1e-3)
    # The ratio pairs the two runs of each iteration.
    paired = statistics.median(t / o for t, o in zip(times["torch"], times["ours"]))
    assert results["ratio"] == pytest.approx(paired, 1e-3)


def test_a_cpu_row_is_placed_against_the_faster_roof_timed_right_before_and_after_it(
        bench, monkeypatch):
    """A VM's speed moves within a run: each CPU row also reports its GFLOP/s over the roof
    product's, timed right before and right after the row (the faster of the two)."""
    rates = iter([150.0, 200.0])
    asked = []

    def roof_now(dtype, device):
        asked.append(dtype)
        return next(rates)

    monkeypatch.setattr(bench, "roof_now", roof_now)
    row = bench.Row("forward", 16, 8, 3, dtype="float64")  # a batch above the floor's
    results = bench.measure(row, torch.device("cpu"), repeats=2, warmup=1)
    assert "bound_fraction" not in results and asked == [torch.float64, torch.float64]
    assert results["roof_around_gflops"] == 200.0
    assert results["roof_around_fraction"] == pytest.approx(results["ours_gflops"] / 200.0)
    results["roof_fraction"] = results["ours_gflops"] / 400.0
    assert bench.limit_text(results) == (
        f"{100 * results['ours_gflops'] / 400:.0f} % of roof "
        f"({100 * results['ours_gflops'] / 200:.0f} % of the roof timed around it)")


def test_short_rows_get_more_iterations_up_to_the_cap(bench, monkeypatch):
    """Without --repeats a row runs at least MIN_TIMED_S in all, sized by its last warm-up
    iteration, and at most MAX_REPEATS iterations; a row already long enough keeps its count."""
    monkeypatch.setattr(bench, "MAX_REPEATS", 7)
    row = bench.Row("forward", 16, 2, 3)
    cpu = torch.device("cpu")
    for min_timed_s, expected in ((0.0, 3), (1e-9, 3), (60.0, 7)):
        results = bench.measure(row, cpu, repeats=3, warmup=1, min_timed_s=min_timed_s)
        assert [len(t) for t in results["times_ms"].values()] == [expected, expected]


@pytest.mark.parametrize("input_grad", [False, True])
def test_training_rows_ask_for_the_input_gradient_only_where_the_row_says(bench, input_grad):
    row = bench.Row("training", 8, 2, 3, input_grad=input_grad)
    baseline, ours, make_input, _ = bench.build(row, torch.device("cpu"), torch.Generator())
    for module in (ours, baseline):
        run = bench.step_function(row, module, make_input, torch.device("cpu"))
        run()
        assert (make_input().grad is not None) == input_grad
    assert bench.group_of(row) == ("training fp32, input requires grad" if input_grad
                                   else "training fp32")


def test_batched_inference_rows_are_summarised_apart_from_b1_and_b4(bench):
    suite = bench.SUITES["inference-batched"]
    assert suite and all(row.mode == "inference" and row.batch >= 16 for row in suite)
    assert {bench.group_of(row) for row in suite} == {"inference fp32, B >= 16"}
    assert {bench.group_of(row) for row in bench.SUITES["inference"]} == {"inference fp32"}
    # Each group is held to the speed issue's inference target on its own.
    rows = [bench.Row("inference", 256, b, 25) for b in (1, 4, 16, 32)]
    for row, ratio in zip(rows, (1.4, 1.6, 0.9, 1.1)):
        row.results = {"ratio": ratio}
    summary = {entry["group"]: entry for entry in bench.summarize(rows, "cpu")}
    assert summary["inference fp32"]["median_ratio"] == pytest.approx(1.5)
    assert summary["inference fp32"]["target"] == bench.TARGETS["inference fp32"]
    assert summary["inference fp32, B >= 16"]["median_ratio"] == pytest.approx(1.0)
    assert summary["inference fp32, B >= 16"]["target"] == bench.TARGETS["inference fp32"]


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


def test_a_row_above_the_roof_has_the_roof_measured_again_for_every_row_of_its_dtype(bench):
    rows = [bench.Row("training", 8, 2, 3), bench.Row("training", 8, 2, 3, dtype="float64"),
            bench.Row("forward", 8, 2, 3)]
    gflops = {"float32": iter([2.0, 4.0]), "float64": iter([1.0])}
    measured = []

    def measure_roof(dtype):
        measured.append(dtype)
        return {torch.float32: [3.0, 5.0, 9.0], torch.float64: [2.0]}[dtype][
            measured.count(dtype) - 1]

    bench.run_rows(rows, lambda row: {"ours_ms": 1.0, "torch_ms": 1.0, "ratio": 1.0,
                                      "ours_gflops": next(gflops[row.dtype])},
                   bench.roof_keeper(measure_roof, {}))
    # The second fp32 row (4) beat the first roof (3): measured again (5), and the first row's
    # fraction follows; the fp64 roof (2) was measured once.
    assert measured == [torch.float32, torch.float64, torch.float32]
    assert [row.results["roof_fraction"] for row in rows] == [0.4, 0.5, 0.8]
    assert rows[0].results["roof_gflops"] == 5.0


CPUINFO_ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni

processor\t: 1
vendor_id\t: AuthenticAMD
"""

CPUINFO_SAPPHIRE = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 fma avx512f avx512_bf16 avx512_fp16 amx_tile amx_bf16
"""


def test_cpu_is_named_by_vendor_model_microarchitecture_and_flags(bench):
    amd = bench.cpu_details(CPUINFO_ZEN5)
    assert (amd["vendor"], amd["family"], amd["model"], amd["microarchitecture"]) == (
        "AuthenticAMD", 26, 2, "zen5")
    assert amd["isa_flags"] == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    intel = bench.cpu_details(CPUINFO_SAPPHIRE)
    assert intel["microarchitecture"] == "sapphire-rapids" and "amx_bf16" in intel["isa_flags"]
    # Results are kept per CPU, under a file name made from these.
    assert bench.result_name(amd) == "cpu-amd-epyc-zen5"
    assert bench.result_name(intel) == "cpu-intel-xeon-platinum-8480+-sapphire-rapids".replace(
        "+", "-")
    unknown = bench.cpu_details("vendor_id : Other\ncpu family : 3\nmodel : 9\n")
    assert unknown["microarchitecture"] == "family3-model9"


def test_weight_read_floor_counts_w_hh_per_step_and_w_ih_once(bench):
    """H = 4, one layer, no bias: W_ih and W_hh are 16 x 4 fp32 (256 bytes each). T = 10
    steps of B = 2 read W_hh ten times and W_ih once; a decode step reads everything once."""
    module = torch.nn.LSTM(4, 4, bias=False)
    row = bench.Row("inference", 4, 2, 10)
    assert bench.bytes_read(row, module, rows_of_data=20) == (256 + 10 * 256, 512)
    decode = bench.Row("decode", 4, 1, 1)
    assert bench.bytes_read(decode, module, rows_of_data=1) == (512, 512)
    projected = torch.nn.LSTM(4, 4, proj_size=2, bias=False)  # W_hh 16x2, W_hr 2x4
    assert bench.bytes_read(row, projected, rows_of_data=20) == (256 + 10 * (128 + 32), 416)


def test_a_floor_row_measures_its_read_bandwidth_in_every_iteration_and_pairs_the_two(
        bench, monkeypatch):
    """The weight-read floor's bandwidth is measured in every iteration of the row, and the
    row's share of its floor pairs each iteration's floor with its time, as the ratio does:
    here 1 MB of weights from a 2 MB working set read at 10 or 30 GB/s in turn."""
    monkeypatch.setattr(bench, "bytes_read", lambda row, module, rows_of_data: (10**6, 2 * 10**6))
    rates = iter([10.0, 30.0] * 20)
    asked = []

    def read_bandwidth(nbytes, device, repeats=20):
        asked.append(nbytes)
        return next(rates)

    monkeypatch.setattr(bench, "read_bandwidth", read_bandwidth)
    row = bench.Row("inference", 16, 2, 3)
    results = bench.measure(row, torch.device("cpu"), repeats=4, warmup=1)
    assert asked == [2 * 10**6] * 4 and results["read_gbps_each"] == [10.0, 30.0] * 2
    assert results["read_gbps"] == 20.0 and results["bound_ms"] == pytest.approx(0.05)
    # (times_ms keeps a few digits)
    paired = statistics.median(1e6 / (gbps * 1e9) / (ms / 1e3) for gbps, ms
                               in zip([10.0, 30.0] * 2, results["times_ms"]["ours"]))
    assert results["bound_fraction"] == pytest.approx(paired, rel=1e-3)


def test_int8_rows_count_int8_bytes_and_time_our_fp32_too(bench):
    """An int8 module's weights are buffers: W_ih and W_hh 16 x 4 int8 (64 bytes each) plus a
    4-byte scale per row (64 bytes each). The int8 rows also time our fp32 on the same
    weights and report how much faster int8 is."""
    import lstm_ext

    module = lstm_ext.quantize_dynamic(lstm_ext.LSTM(4, 4, bias=False))
    row = bench.Row("inference", 4, 2, 10, int8=True)
    assert bench.bytes_read(row, module, rows_of_data=20) == (128 + 10 * 128, 256)
    result = bench.measure(bench.Row("decode", 32, 1, 1, layers=2, int8=True),
                           torch.device("cpu"), repeats=1, warmup=0)
    assert result["speedup_over_fp32"] == pytest.approx(result["ours_fp32_ms"]
                                                        / result["ours_ms"])
    assert bench.group_of(row) == "int8 inference"


def test_flops_and_limit_columns_are_the_hand_computed_ones(bench):
    # One layer, H = 3, I = 5: 2 * N * 4H * (I + H) = 2 * 7 * 12 * 8 forward, 3x for training.
    # The input does not require grad: no 2 * 7 * 12 * 5 for its gradient; with it, 3x.
    row = bench.Row("training", 3, 7, 1, input_size=5)
    assert bench.flops(row, rows_of_data=7) == 3 * 2 * 7 * 12 * 8 - 2 * 7 * 12 * 5
    row = bench.Row("training", 3, 7, 1, input_size=5, input_grad=True)
    assert bench.flops(row, rows_of_data=7) == 3 * 2 * 7 * 12 * 8
    # Two layers, bidirectional: only the first layer's two directions skip their input's.
    row = bench.Row("training", 3, 7, 1, input_size=5, layers=2, bidirectional=True)
    forward = 2 * (2 * 7 * 12 * (5 + 3)) + 2 * (2 * 7 * 12 * (6 + 3))
    assert bench.flops(row, rows_of_data=7) == 3 * forward - 2 * (2 * 7 * 12 * 5)
    projected = bench.Row("inference", 4, 1, 1, input_size=2, proj_size=3, layers=2)
    # layer 0: 2*1*16*(2+3) + 2*1*4*3; layer 1 takes the projected 3 as input.
    assert bench.flops(projected, rows_of_data=1) == (160 + 24) + (2 * 16 * (3 + 3) + 24)
    assert bench.limit_text({"roof_fraction": 0.5}) == "50 % of roof"
    assert bench.limit_text({"roof_fraction": 0.2, "bound_fraction": 0.25}) == "25 % of floor"
    # A small batch bound by the multiply-adds rather than the reads: the roof binds.
    assert bench.limit_text({"roof_fraction": 0.75, "bound_fraction": 0.25}) == "75 % of roof"
    assert (bench.limit_text({"roof_fraction": 0.5, "roof_around_fraction": 0.8})
            == "50 % of roof (80 % of the roof timed around it)")


def test_roof_is_the_better_of_torch_mm_and_onednn(bench, monkeypatch):
    if bench.onednn_product(torch.ones(2, 2), torch.ones(2, 2)) is None:
        pytest.skip("this torch has no oneDNN linear")
    times = iter([4.0, 1.0])  # torch.mm is timed first, then oneDNN
    monkeypatch.setattr(bench, "best_time", lambda run, device, repeats: next(times))
    roof = bench.gemm_roof(torch.float32, torch.device("cpu"), size=8, repeats=1)
    assert roof == pytest.approx(2 * 8**3 / 1.0 / 1e9)


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_cell_rows_step_each_cell_over_the_sequence(bench, mode):
    """A cell row steps nn.LSTMCell and lstm_ext.LSTMCell (the same weights) over all T steps
    of its input, carrying the state, as nn.LSTM runs the sequence; it is timed and reported
    in its own group."""
    row = bench.Row(mode, 12, 3, 5, cell=True)
    assert row.name == f"{mode} H12 B3 T5 float32 cell"
    assert bench.group_of(row) == f"cell {mode}"
    baseline, ours, make_input, rows_of_data = bench.build(row, torch.device("cpu"),
                                                           torch.Generator().manual_seed(0))
    assert type(baseline) is torch.nn.LSTMCell and type(ours) is lstm_ext.LSTMCell
    assert rows_of_data == 15
    layer = torch.nn.LSTM(12, 12)
    layer.load_state_dict({f"{name}_l0": value for name, value in baseline.state_dict().items()})
    with torch.no_grad():
        expected, (h_n, c_n) = layer(make_input())
        for module in (baseline, ours):
            outputs, (h, c) = bench.cell_steps(module, make_input())
            torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c, c_n[0], rtol=1e-5, atol=1e-6)
    results = bench.measure(row, torch.device("cpu"), repeats=2, warmup=1)
    assert results["ours_ms"] > 0 and results["torch_ms"] > 0
