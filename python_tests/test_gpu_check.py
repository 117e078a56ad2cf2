"""benchmarks/gpu_check.sh and what it relies on, checked without a GPU: the dry run, the stage
switches, the summary and rerun line, the files it returns, the benchmark's per-row reports and
baseline kernels, the smoke stage, the planted overrun and the toolchain it builds with."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lstm_ext
from conftest import load_benchmark_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["build", "smoke", "tests", "plants", "bench", "memcheck"]


def run_script(tmp_path, **env):
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True,
                            text=True, timeout=300)
    return result, out, time.monotonic() - start


def summary_lines(out):
    return (out / "summary.txt").read_text().splitlines()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_without_a_gpu_every_stage_says_no_gpu_within_seconds(tmp_path):
    result, out, seconds = run_script(tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert seconds < 20
    lines = summary_lines(out)
    assert [line for line in lines if line.endswith(": no GPU")] == [
        f"{stage}: no GPU" for stage in STAGES]
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]
    # The summary ends the output, where the device tool's returned tail shows it.
    assert result.stdout.rstrip().endswith("memcheck: no GPU")

    result, out, _ = run_script(tmp_path, GPU_CHECK_STAGES="smoke,bench")
    assert [line for line in summary_lines(out) if line.endswith("no GPU")] == [
        "smoke: no GPU", "bench: no GPU"]


def test_an_unknown_stage_is_refused_naming_the_stages(tmp_path):
    result, _, _ = run_script(tmp_path, GPU_CHECK_STAGES="smoke,tset")
    assert result.returncode == 2
    assert "unknown stage 'tset'" in result.stderr and (
        "build smoke tests plants bench memcheck" in result.stderr)


def test_the_summary_names_failed_tests_and_how_to_rerun_them(tmp_path):
    """The stages' logic on the CPU: a test that fails, one that breaks the CUDA context (the
    tests after it must not run, or they would fail elsewhere), the benchmark's report per
    configuration, and the rerun line for exactly the failed tests."""
    tests = tmp_path / "test_planted.py"
    tests.write_text(
        "def test_passes(): pass\n"
        "def test_wrong(): assert 1 == 2\n"
        "def test_fault(): raise RuntimeError("
        "'CUDA error: an illegal memory access was encountered')\n"
        "def test_after_the_fault(): pass\n")
    result, out, _ = run_script(
        tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_STAGES="smoke,tests,bench",
        GPU_CHECK_TESTS=f"{tests} -p cuda_faults -p no:cacheprovider",
        # (no empty entry: that would put the current folder, the sources, on the path)
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "python_tests"),
                                                 os.environ.get("PYTHONPATH")])))
    assert result.returncode == 1, result.stdout + result.stderr
    text = (out / "summary.txt").read_text()
    assert "smoke: ok" in text, (out / "build.log").read_text()
    assert re.search(r"^smoke: ok \(smoke: ok in .* on the CPU\)$", text, re.M)
    assert re.search(r"^tests: FAILED \(exit 2: 2 failed, 1 passed in", text, re.M), text
    assert re.search(r"^  FAILED \S*test_planted.py::test_wrong", text, re.M)
    assert re.search(r"CUDA context broken by \S*test_planted.py::test_fault", text), text
    rerun = [line for line in text.splitlines() if line.startswith("rerun: ")]
    assert len(rerun) == 1 and "GPU_CHECK_STAGES=tests" in rerun[0]
    assert re.search(r"GPU_CHECK_TESTS='\S*test_planted.py::test_fault \S*test_planted.py::"
                     r"test_wrong'", rerun[0])
    # Both passes of the tests, the second with the persistent recurrence asked for.
    assert re.search(r"^tests persistent: FAILED \(exit 2: 2 failed, 1 passed in", text, re.M)
    log = (out / "tests.log").read_text()
    assert "== tests (LSTM_EXT_CUDA_PERSISTENT=unset)" in log
    assert "== tests persistent (LSTM_EXT_CUDA_PERSISTENT=1)" in log
    for name in ("gpu-tf32-off", "gpu-persistent", "gpu-tf32-on"):
        assert re.search(rf"^bench {name}: ok: 4 of 4 rows; torch ran oneDNN", text, re.M), text
        report = json.loads((out / f"{name}.json").read_text())
        assert report["complete"] and len(report["rows"]) == 4
    assert not (out / "memcheck.log").exists() and "memcheck" not in text
    result, out, _ = run_script(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_STAGES="plants")
    assert "plants: not run (GPU_CHECK_DEVICE=cpu)" in (out / "summary.txt").read_text()


def test_the_script_returns_no_more_files_than_the_device_tool_brings_back():
    """The device tool returns at most 8 files from $OUT; the script's header lists the ones it
    writes, and those are all it writes."""
    text = SCRIPT.read_text()
    listed = set(text.split("writes exactly these 8:\n#", 1)[1].split("\nset ", 1)[0]
                 .replace("#", " ").split())
    written = set(re.findall(r'\$OUT/([\w.-]+)"', text))
    written |= {f"{name}.json" for name in re.findall(r"^  (?:\w+=\S+ )?bench (\S+) ", text, re.M)}
    assert written == listed
    assert len(listed) <= 8


def test_a_benchmark_stopped_by_its_time_limit_keeps_the_rows_it_measured(tmp_path):
    report = tmp_path / "run.json"
    markdown = tmp_path / "run.md"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "bench_lstm.py"), "--quick", "--repeats", "1",
         "--json", str(report), "--markdown", str(markdown)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith("| inference"):  # the first row is done
                break
        process.send_signal(signal.SIGTERM)  # what `timeout` sends
        process.wait(timeout=60)
    finally:
        process.kill()
    saved = json.loads(report.read_text())
    assert not saved["complete"] and saved["rows_planned"] == 4
    assert saved["rows"][0]["name"] == "inference H256 B16 T25 float32"
    assert saved["rows"][0]["results"]["ours_ms"] > 0
    assert "Incomplete:" in markdown.read_text()
    # A saved run can be described and rendered again without measuring anything.
    bench = load_benchmark_script("bench_lstm")
    rows, loaded = bench.load_report(report)
    assert bench.describe(rows, loaded).startswith(f"{len(rows)} of 4 rows")


def test_each_row_records_which_kernel_the_baseline_ran():
    """nn.LSTM on the CPU runs oneDNN for fp32 but ATen's own loop for fp64: the report must
    tell them apart (on CUDA the same check tells cuDNN from a native fallback)."""
    bench = load_benchmark_script("bench_lstm")
    kernels = {}
    for dtype in ("float32", "float64"):
        row = bench.Row("training", 16, 2, 3, dtype=dtype)
        kernels[dtype] = bench.measure(row, torch.device("cpu"), repeats=1,
                                       warmup=0)["baseline_kernel"]
    assert kernels == {"float32": "oneDNN", "float64": "native ATen"}
    row = bench.Row("training", 16, 2, 3)
    row.results = {"ours_ms": 1.0, "torch_ms": 1.0, "ratio": 1.0, "ours_gflops": 1.0,
                   "roof_fraction": 0.5, "baseline_kernel": "native ATen"}
    machine = {"device": "NVIDIA H200", "gpu": True, "torch": "2.11.0", "threads": 16,
               "python": "3.12.3", "cuda": "13.0", "cudnn": 91900, "tf32": False,
               "date": "2026-11-30 12:00 UTC"}
    assert "torch ran native ATen |" in bench.table([row], [], machine, "cmd")
    assert bench.baseline_counts([row, row]) == {"native ATen": 2}


def test_the_smoke_stage_passes_on_correct_kernels_and_fails_on_a_wrong_answer(monkeypatch):
    smoke = load_benchmark_script("gpu_smoke")
    for dtype in (torch.float32, torch.bfloat16):
        for packed in (True, False):
            error, _ = smoke.check(torch.device("cpu"), dtype, packed)
            assert error < smoke.TOLERANCE[dtype]
    # A layer whose output is off by 0.1 % must fail the stage.
    original = lstm_ext.LSTM.forward

    def off_by_a_little(self, *args, **kwargs):
        output, state = original(self, *args, **kwargs)
        return output._replace(data=output.data * (1 + 1e-3)), state

    monkeypatch.setattr(lstm_ext.LSTM, "forward", off_by_a_little)
    with pytest.raises(AssertionError, match="off by"):
        smoke.check(torch.device("cpu"), torch.float32, True)


def test_the_planted_overrun_runs_only_when_asked_for_and_only_past_a_whole_allocation(
        monkeypatch):
    target = torch.empty(100)
    with pytest.raises(RuntimeError, match="LSTM_EXT_TEST_OVERRUN=1"):
        torch.ops.lstm_ext._test_overrun(target)
    monkeypatch.setenv("LSTM_EXT_TEST_OVERRUN", "1")
    # A view's "one past the end" is inside its base's memory: no checker would see it.
    with pytest.raises(RuntimeError, match="owns its whole storage"):
        torch.ops.lstm_ext._test_overrun(target[:50])


def running_under_asan():
    with open("/proc/self/maps") as maps:
        return "libasan" in maps.read()


@pytest.mark.skipif(not running_under_asan() and os.environ.get("LSTM_EXT_EXPECT_ASAN") != "1",
                    reason="needs the AddressSanitizer build (.ci/run)")
def test_the_planted_overrun_is_reported_by_a_memory_checker():
    """On the CPU, AddressSanitizer stands in for compute-sanitizer: the overrun gpu_check.sh
    plants before trusting memcheck is a real write past an allocation."""
    assert running_under_asan(), "LSTM_EXT_EXPECT_ASAN=1, but AddressSanitizer is not loaded"
    result = subprocess.run(
        [sys.executable, "-c", "import torch, lstm_ext\n"
         "torch.ops.lstm_ext._test_overrun(torch.empty(1000))"],
        env={**os.environ, "LSTM_EXT_TEST_OVERRUN": "1"}, capture_output=True, text=True,
        timeout=120)
    assert result.returncode != 0
    assert "heap-buffer-overflow" in result.stderr and "WRITE of size 1" in result.stderr


def test_the_toolkit_headers_come_first_and_wheel_headers_only_fill_gaps(tmp_path):
    toolchain = load_toolchain()
    toolkit = tmp_path / "cuda"
    for header in ("cuda_runtime.h", "cuda_fp16.h"):
        (toolkit / "include" / header).parent.mkdir(parents=True, exist_ok=True)
        (toolkit / "include" / header).write_text("")
    site = tmp_path / "site"
    for wheel, headers in (("runtime", ["cuda_runtime.h"]),
                           ("cublas", ["cuda_runtime.h", "cublas_v2.h", "sub/lt.h"])):
        for header in headers:
            (site / "nvidia" / wheel / "include" / header).parent.mkdir(parents=True,
                                                                        exist_ok=True)
            (site / "nvidia" / wheel / "include" / header).write_text("")
    assert toolchain.wheel_include_dirs(toolkit / "include", [site]) == [
        (str(site / "nvidia" / "cublas" / "include"), ["cublas_v2.h", "sub/lt.h"])]
    assert toolchain.cuda_include_dirs(toolkit, [site]) == [
        str(toolkit / "include"), str(site / "nvidia" / "cublas" / "include")]


def test_the_toolchain_report_names_compiler_headers_and_runtime():
    result = subprocess.run([sys.executable, str(ROOT / "lstm_ext" / "_toolchain.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("nvcc on PATH: ") and lines[1].startswith("CUDA_HOME")
    if torch.version.cuda:
        assert any(line.startswith("libcudart loaded by torch: /") for line in lines)
    if load_toolchain().find_cuda_home():
        heads = [line.split(" (")[0].split(":")[0] for line in lines]
        assert heads.index("toolkit headers") < min(
            [i for i, h in enumerate(heads) if h.startswith("wheel headers")], default=99)


def load_toolchain():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_toolchain",
                                                  ROOT / "lstm_ext" / "_toolchain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
