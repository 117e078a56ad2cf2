#!/usr/bin/env bash
# The GPU check, in one call of the device machine (one H200, no network): build for sm_90 with
# every core, run the CUDA tests, then the CUDA benchmark against cuDNN (fp32 with TF32 off and
# on, bf16 and fp16). Everything it produces lands under $OUT (logs, JSON, markdown), which the
# session then copies to benchmarks/results/ with the GPU named.
#
#   run: bash benchmarks/gpu_check.sh        (OUT defaults to benchmarks/out here)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" LSTM_EXT_CUDA=1
export MAX_JOBS="$(nproc)"
PYTHON="${PYTHON:-python3}"

{ nvidia-smi; "$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; } \
  > "$OUT/machine.txt" 2>&1

# In place, against the machine's own torch (no network, so no build isolation).
if ! "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" -m pytest python_tests/test_cuda.py -v -rs > "$OUT/pytest_cuda.log" 2>&1
cuda_status=$?
tail -n 5 "$OUT/pytest_cuda.log"

bench() {
  local name=$1
  shift
  timeout 240 "$PYTHON" benchmarks/bench_lstm.py --device cuda --repeats 5 "$@" \
    --json "$OUT/$name.json" --markdown "$OUT/$name.md" > "$OUT/$name.log" 2>&1
  tail -n 6 "$OUT/$name.log"
}
bench cuda_tf32_off --suite gpu-fp32 --suite gpu-half
bench cuda_tf32_on --suite gpu-fp32 --tf32
exit $cuda_status
