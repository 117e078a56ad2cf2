#!/usr/bin/env bash
# The GPU check, in one call of the device machine (one H200, no network). Stages, in order:
#
#   build     build for sm_90 with every core (skipped when the built library matches the sources)
#   smoke     seconds of packed + projection forward/backward, fp32 and bf16, launch-blocking;
#             if it fails, nothing else runs and its traceback ends the output (in build.log)
#   tests     python_tests/test_cuda.py (a kernel fault fails its own test, not the rest), then
#             again with the persistent recurrence wherever it applies
#             (LSTM_EXT_CUDA_PERSISTENT=1; the first pass has the default, where measured faster)
#   plants    bugs planted in the CUDA code (LSTM_EXT_TEST_PLANT): each must fail its tests
#   bench     the CUDA benchmark against cuDNN: fp32 TF32 off, bf16/fp16; the same with the
#             persistent recurrence wherever it applies; then fp32 TF32 on
#   memcheck  compute-sanitizer on a planted overrun (it must be reported, or the verdict is
#             void), then on the smoke run and a few tests, with PyTorch's caching allocator off
#
# then a summary: one verdict per stage, the failed test ids, the line that reruns them, and
# the exit status (0: every stage that ran passed; 1: something failed; 3: no GPU here).
#
#   bash benchmarks/gpu_check.sh                              # everything, ~440 s budget
#   GPU_CHECK_STAGES=tests GPU_CHECK_TESTS='python_tests/test_cuda.py::test_x' \
#     GPU_CHECK_BUDGET_S=120 bash benchmarks/gpu_check.sh     # a targeted rerun
#   GPU_CHECK_STAGES=bench PYTEST_ARGS=... GPU_CHECK_REBUILD=1 ...   (see the variables below)
#
# Variables: GPU_CHECK_STAGES (comma-separated, default all five; build also runs whenever the
# library is missing or stale), GPU_CHECK_BUDGET_S (a deadline the stages share, default 440),
# GPU_CHECK_TESTS (what pytest runs, default python_tests/test_cuda.py), PYTEST_ARGS (added to
# the pytest line, e.g. "-k packed"), GPU_CHECK_REBUILD=1 (build even if up to date), OUT
# (default benchmarks/out). A session has 15 minutes of device time, machine starts included:
# give the first call ~480 s (on the H200: build 115 s, each test pass 40 s, the benchmarks
# 130 s, memcheck 40 s), which leaves a targeted rerun little room. The device tool returns at
# most 8 files from $OUT; this script writes exactly these 8:
#   summary.txt build.log tests.log bench.log gpu-tf32-off.json gpu-persistent.json
#   gpu-tf32-on.json memcheck.log
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" LSTM_EXT_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-440}"
STAGES="${GPU_CHECK_STAGES:-build,smoke,tests,plants,bench,memcheck}"
TESTS="${GPU_CHECK_TESTS:-python_tests/test_cuda.py}"
# GPU_CHECK_DEVICE=cpu (for the script's own tests): run the stages' logic on the CPU, against
# the lstm_ext already importable, with the CUDA tests' CPU mode, the quick benchmark and no
# build or memcheck.
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
py=("$PYTHON")
ALL_STAGES=(build smoke tests plants bench memcheck)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0
rerun=""

for stage in ${STAGES//,/ }; do
  if [[ ! " ${ALL_STAGES[*]} " =~ " $stage " ]]; then
    echo "GPU_CHECK_STAGES: unknown stage '$stage'; the stages are ${ALL_STAGES[*]}" >&2
    exit 2
  fi
done
wanted() { [[ ",$STAGES," == *",$1,"* ]]; }

# A stage's verdict: one line in the summary, and on the output as it happens.
verdict() {
  echo "$1: $2" | tee -a "$SUMMARY"
}

# Seconds for a stage: its cap, or what is left of the budget after keeping `reserve` seconds
# for the stages after it, whichever is smaller (at least 10).
limit() {
  local cap=$1 reserve=$2
  local left=$((BUDGET_S - SECONDS - reserve))
  ((left < cap)) && cap=$left
  ((cap < 10)) && cap=10
  echo "$cap"
}

finish() {
  {
    echo
    echo "== gpu_check: stages '$STAGES', ${SECONDS} s of a ${BUDGET_S} s budget"
    cat "$SUMMARY"
    [ -n "$rerun" ] && echo "rerun: $rerun bash benchmarks/gpu_check.sh"
  } > "$SUMMARY.tmp"
  mv "$SUMMARY.tmp" "$SUMMARY"
  echo
  cat "$SUMMARY"
  exit "$1"
}

# Without a GPU there is nothing to check: every stage says so, in seconds.
if [ "$DEVICE" = cpu ]; then
  export LSTM_EXT_TEST_DEVICE=cpu
  py=("$PYTHON" -P)  # the installed lstm_ext, not the source folder
  verdict build "not run (GPU_CHECK_DEVICE=cpu)"
elif ! nvidia-smi -L > /dev/null 2>&1 || ! "$PYTHON" -c 'import sys, torch
sys.exit(not torch.cuda.is_available())' 2> /dev/null; then
  for stage in ${STAGES//,/ }; do verdict "$stage" "no GPU"; done
  finish 3
fi

# -- build ------------------------------------------------------------------------------------
# The library is reused when it was built by this script from the same sources, torch and
# architectures (a warm machine keeps it between calls).
stamp() {
  { "$PYTHON" -c 'import torch; print(torch.__version__)'; echo "$TORCH_CUDA_ARCH_LIST"
    find csrc setup.py lstm_ext/_toolchain.py -type f | sort | xargs sha256sum; } | sha256sum
}
stamp_file=build/gpu_check.stamp
library_current() {
  ls lstm_ext/_C*.so > /dev/null 2>&1 && [ -f "$stamp_file" ] &&
    [ "$(cat "$stamp_file")" = "$(stamp)" ]
}
# Every other stage needs the library, so this one runs whichever stages were asked for.
if [ "$DEVICE" = cuda ]; then
  if [ "${GPU_CHECK_REBUILD:-0}" != 1 ] && library_current; then
    verdict build "reused (library built from these sources)"
  else
    start=$SECONDS
    {
      echo "== toolchain"
      "$PYTHON" lstm_ext/_toolchain.py
      nvcc --version | tail -n 2
      nvidia-smi
      "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "cuDNN",
        torch.backends.cudnn.version(), torch.cuda.get_device_name())'
      echo "== build, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"
      # In place, against the machine's own torch (no network, so no build isolation).
      timeout "$(limit 180 120)" "$PYTHON" setup.py build_ext --inplace
    } > "$OUT/build.log" 2>&1
    status=$?
    if [ $status -eq 0 ]; then
      mkdir -p build && stamp > "$stamp_file"
      verdict build "ok in $((SECONDS - start)) s"
    else
      verdict build "FAILED (exit $status; the end of build.log follows)"
      tail -n 40 "$OUT/build.log"
      finish 1
    fi
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# -- smoke ------------------------------------------------------------------------------------
if wanted smoke; then
  echo "== smoke" >> "$OUT/build.log"
  smoke_start=$(wc -l < "$OUT/build.log")
  CUDA_LAUNCH_BLOCKING=1 timeout "$(limit 60 60)" "${py[@]}" benchmarks/gpu_smoke.py --device "$DEVICE" \
    >> "$OUT/build.log" 2>&1
  status=$?
  if [ $status -eq 0 ]; then
    verdict smoke "ok ($(tail -n 1 "$OUT/build.log"))"
  else
    verdict smoke "FAILED (exit $status; nothing after it ran; its output follows)"
    tail -n "+$((smoke_start + 1))" "$OUT/build.log" | tail -n 60
    rerun="GPU_CHECK_STAGES=smoke"
    finish 1
  fi
fi

# -- tests ------------------------------------------------------------------------------------
# One pass of the tests, its log appended to tests.log. $1: the verdict's name; $2: the value of
# LSTM_EXT_CUDA_PERSISTENT for the pass (empty: unset, the default); $3, $4: the time limit's
# cap and reserve.
run_tests() {
  local name=$1 persistent=$2 part
  part="$(mktemp)"
  # shellcheck disable=SC2086  # TESTS and PYTEST_ARGS are word lists
  LSTM_EXT_CUDA_PERSISTENT=$persistent timeout "$(limit "$3" "$4")" "${py[@]}" -m pytest $TESTS \
    "${workers[@]}" -rfEs --durations=15 ${PYTEST_ARGS:-} > "$part" 2>&1
  local status=$?
  { echo "== $name (LSTM_EXT_CUDA_PERSISTENT=${persistent:-unset})"; cat "$part"; } >> "$OUT/tests.log"
  local counts failed_ids
  counts="$(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$part" |
    tail -n 1 | tr -d '=' | xargs)"
  failed_ids="$(grep -E '^(FAILED|ERROR) ' "$part" | cut -d ' ' -f 2 | sort -u)"
  if [ $status -eq 0 ]; then
    verdict "$name" "ok (${counts})"
  else
    failed=1
    verdict "$name" "FAILED (exit $status${counts:+: $counts})"
    grep -E '^(FAILED|ERROR) |CUDA context broken' "$part" | head -n 30 |
      sed 's/^/  /' | tee -a "$SUMMARY"
    [ $status -eq 124 ] && echo "  (stopped by its time limit)" | tee -a "$SUMMARY"
    failed_tests="$failed_tests $failed_ids"
  fi
  rm -f "$part"
}
if wanted tests; then
  # pytest-xdist, where installed, spreads the tests over 4 processes; a worker whose CUDA
  # context a fault broke is replaced (python_tests/cuda_faults.py).
  workers=()
  "$PYTHON" -c 'import xdist' 2> /dev/null && workers=(-n "${GPU_CHECK_WORKERS:-4}")
  : > "$OUT/tests.log"
  failed_tests=""
  run_tests tests "" 150 150
  run_tests "tests persistent" 1 120 110
  failed_tests="$(echo $failed_tests | tr ' ' '\n' | sort -u | xargs)"
  [ -n "$failed_tests" ] &&
    rerun="GPU_CHECK_STAGES=tests GPU_CHECK_BUDGET_S=150 GPU_CHECK_TESTS='$failed_tests'"
fi

# -- plants -----------------------------------------------------------------------------------
# Each planted bug (csrc/cuda/lstm_cuda.cu) against the tests that must catch it: their pytest
# exits 1 (tests failed), or the bug went unseen. Logged at the end of tests.log.
if wanted plants && [ "$DEVICE" = cpu ]; then
  verdict plants "not run (GPU_CHECK_DEVICE=cpu)"
elif wanted plants; then
  caught=() missed=()
  for plant in "default_stream:callers_stream" \
               "cell:lstmcell_on_the_device or fp32_outputs_and_gradients"; do
    name=${plant%%:*}
    echo "== plants: LSTM_EXT_TEST_PLANT=$name, -k '${plant#*:}' (must fail)" >> "$OUT/tests.log"
    LSTM_EXT_TEST_PLANT=$name timeout "$(limit 60 60)" "${py[@]}" -m pytest -q -p no:cacheprovider \
      python_tests/test_cuda.py -k "${plant#*:}" >> "$OUT/tests.log" 2>&1
    status=$?
    if [ $status -eq 1 ]; then caught+=("$name"); else missed+=("$name (exit $status)"); fi
  done
  if [ ${#missed[@]} -eq 0 ]; then
    verdict plants "ok (caught: ${caught[*]})"
  else
    failed=1
    verdict plants "FAILED (not caught: ${missed[*]}; caught: ${caught[*]:-none})"
  fi
fi

# -- bench ------------------------------------------------------------------------------------
bench() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  echo "== $name" >> "$OUT/bench.log"
  # The JSON is rewritten after every row, so a run stopped by its limit keeps its rows.
  local what=(--device cuda --repeats 7 "$@")
  [ "$DEVICE" = cpu ] && what=(--quick --repeats 1)
  timeout "$(limit "$cap" "$reserve")" "${py[@]}" benchmarks/bench_lstm.py "${what[@]}" --json "$OUT/$name.json" >> "$OUT/bench.log" 2>&1
  local status=$?
  local rows
  rows="$("${py[@]}" benchmarks/bench_lstm.py --report "$OUT/$name.json" 2> /dev/null)"
  if [ $status -eq 0 ]; then
    verdict "bench $name" "ok: ${rows:-no report}"
  else
    failed=1
    verdict "bench $name" "FAILED (exit $status${rows:+; $rows})"
  fi
}
if wanted bench; then
  : > "$OUT/bench.log"
  bench gpu-tf32-off 90 100 --suite gpu-fp32 --suite gpu-half
  LSTM_EXT_CUDA_PERSISTENT=1 bench gpu-persistent 90 40 --suite gpu-fp32 --suite gpu-half
  bench gpu-tf32-on 60 0 --suite gpu-fp32 --tf32
fi

# -- memcheck ---------------------------------------------------------------------------------
# With the caching allocator on, an overrun past a tensor's end lands in memory the allocator
# owns, which is valid to the checker; off, every tensor is its own cudaMalloc. A planted
# one-byte overrun runs first: if the checker does not report it, it cannot be trusted here.
if wanted memcheck && [ "$DEVICE" = cpu ]; then
  verdict memcheck "not run (GPU_CHECK_DEVICE=cpu)"
elif wanted memcheck; then
  sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -n 1)"
  if [ -z "$sanitizer" ]; then
    verdict memcheck "not run (compute-sanitizer not found)"
  elif ((BUDGET_S - SECONDS < 30)); then
    verdict memcheck "not run (only $((BUDGET_S - SECONDS)) s of the budget left)"
  else
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    memcheck() {
      timeout "$(limit "$1" 0)" "$sanitizer" --tool memcheck --error-exitcode 1 --print-limit 20 \
        "${@:2}" >> "$OUT/memcheck.log" 2>&1
    }
    echo "== planted overrun (must be reported)" > "$OUT/memcheck.log"
    LSTM_EXT_TEST_OVERRUN=1 memcheck 30 "$PYTHON" -c 'import torch, lstm_ext
target = torch.empty(1000, device="cuda")
torch.ops.lstm_ext._test_overrun(target)
torch.cuda.synchronize()'
    if ! grep -q "Invalid __global__ write" "$OUT/memcheck.log"; then
      verdict memcheck "VOID: compute-sanitizer did not report the planted overrun ($(grep -m 1 -iE 'error|not supported' "$OUT/memcheck.log" | cut -c 1-150))"
    else
      echo "== smoke and tests under memcheck" >> "$OUT/memcheck.log"
      marker=$(wc -l < "$OUT/memcheck.log")
      memcheck 90 "$PYTHON" benchmarks/gpu_smoke.py &&
        # (The profiler cannot run beside compute-sanitizer.)
        LSTM_EXT_CUDA_PERSISTENT=1 LSTM_EXT_TEST_NO_PROFILER=1 memcheck 90 "$PYTHON" -m pytest -q -x -p no:cacheprovider \
          python_tests/test_cuda.py -k "float32 and (every_op_output or any_layout or persistent)"
      status=$?
      errors="$(tail -n "+$marker" "$OUT/memcheck.log" | grep -m 1 -E 'ERROR SUMMARY: [1-9]' |
        grep -oE '[0-9]+ error' || true)"
      if [ $status -eq 0 ]; then
        verdict memcheck "clean (and the planted overrun was reported)"
      else
        failed=1
        verdict memcheck "FAILED (exit $status${errors:+, $errors}; see memcheck.log)"
      fi
    fi
  fi
fi

finish $failed
