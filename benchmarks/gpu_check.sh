#!/usr/bin/env bash
# The GPU check, in one call of the device machine (one H200, no network): build for sm_90 with
# every core, run the CUDA tests, then the CUDA benchmark against cuDNN (fp32 with TF32 off and
# on, bf16 and fp16; forward and forward+backward of the DeepBench shapes), then a few tests
# under compute-sanitizer. Everything lands under $OUT, which the session copies to
# benchmarks/results/ with the GPU named.
#
#   run: bash benchmarks/gpu_check.sh        (OUT defaults to benchmarks/out here)
#
# A session has 15 minutes of device time, machine start and a rerun included, so the stages
# share a deadline (GPU_CHECK_BUDGET_S, default 360 s; give the call ~450 s) and each gets a
# time limit from what is left; whatever ran is summarised at the end, in the last lines the
# call returns. A rerun on the still-warm machine rebuilds incrementally. $OUT keeps at most 8
# files (the device tool's limit): this script writes 8. Estimates for an H200, never measured
# yet: build ~1.5 min, tests ~1.5 min (20 s for the same tests on a 2-core CPU), benchmarks
# ~1 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" LSTM_EXT_CUDA=1
export MAX_JOBS="$(nproc)"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-360}"

# Seconds for a stage: its cap, or what is left of the budget after keeping `reserve` seconds
# for the stages after it, whichever is smaller (at least 10).
limit() {
  local cap=$1 reserve=$2
  local left=$((BUDGET_S - SECONDS - reserve))
  ((left < cap)) && cap=$left
  ((cap < 10)) && cap=10
  echo "$cap"
}

{
  nvidia-smi
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch",
    torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(),
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible")'
  nvcc --version | tail -n 2
  # In place, against the machine's own torch (no network, so no build isolation).
  echo "build: $(date -u +%T)"
  timeout "$(limit 180 170)" "$PYTHON" setup.py build_ext --inplace
} > "$OUT/build.log" 2>&1
build_status=$?
echo "build: exit $build_status after ${SECONDS} s"
if [ $build_status -ne 0 ]; then
  tail -n 40 "$OUT/build.log"
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

timeout "$(limit 180 90)" "$PYTHON" -m pytest python_tests/test_cuda.py -v -rs \
  --durations=15 -p no:cacheprovider > "$OUT/pytest_cuda.log" 2>&1
cuda_status=$?
echo "tests: exit $cuda_status after ${SECONDS} s"

bench() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  echo "== $name" >> "$OUT/bench.log"
  timeout "$(limit "$cap" "$reserve")" "$PYTHON" benchmarks/bench_lstm.py --device cuda \
    --repeats 7 "$@" --json "$OUT/$name.json" --markdown "$OUT/$name.md" >> "$OUT/bench.log" 2>&1
  echo "$name: exit $? after ${SECONDS} s"
}
bench cuda_tf32_off 90 40 --suite gpu-fp32 --suite gpu-half
bench cuda_tf32_on 60 0 --suite gpu-fp32 --tf32

# Last, with what time is left: a few CUDA tests under compute-sanitizer's memcheck, which
# reports any out-of-bounds or misaligned device access the results alone would not show.
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
if [ -n "$sanitizer" ] && ((BUDGET_S - SECONDS > 30)); then
  timeout "$(limit 90 0)" "$sanitizer" --tool memcheck --error-exitcode 1 --print-limit 20 \
    "$PYTHON" -m pytest -q -x -p no:cacheprovider python_tests/test_cuda.py \
    -k "float32 and (every_op_output or any_layout)" > "$OUT/memcheck.log" 2>&1
  echo "memcheck: exit $? after ${SECONDS} s"
else
  echo "memcheck: skipped (compute-sanitizer ${sanitizer:-not found}, $((BUDGET_S - SECONDS)) s left)"
fi

echo
grep -E '^(FAILED|ERROR)' "$OUT/pytest_cuda.log" | head -n 20
tail -n 1 "$OUT/pytest_cuda.log"
grep -E '^(==|gpu )' "$OUT/bench.log"
exit $cuda_status
