#!/usr/bin/env bash
# One prepared GPU check: install carried wheels, run the GPU tests and the benchmarks, write results.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu_results)
#
# Wheels: liger-kernel and cut-cross-entropy (pure Python) are carried in .whl/ (see README, "GPU checks");
# missing ones only drop those peers from the benchmark. The repo is put on PYTHONPATH with kernels/
# exposed as `clo_kernels` (no install step, no network needed). Each step has its own time limit, and a
# failing step does not stop the next: the summary at the end says what passed.
set -u
OUT_DIR=${1:-${OUT:-gpu_results}}
mkdir -p "$OUT_DIR"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p /tmp/clo_pkgs && ln -sfn "$ROOT/kernels" /tmp/clo_pkgs/clo_kernels
export PYTHONPATH=/tmp/clo_pkgs:$ROOT${PYTHONPATH:+:$PYTHONPATH}
cd "$ROOT"

status=()
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date -u +%T))"
  if timeout "$secs" "$@" 2>&1 | tee "$OUT_DIR/$name.log"; then status+=("$name: ok"); else status+=("$name: FAILED (${PIPESTATUS[0]})"); fi
}
set -o pipefail
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv | tee "$OUT_DIR/nvidia_smi.csv"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_ops.py tests/test_loss.py
step bench_head 200 python3 benchmarks/bench_head.py --out "$OUT_DIR/bench_head_gpu.json"
if [ -f benchmarks/bench_step.py ] && [ "${SKIP_STEP:-0}" != 1 ]; then
  step bench_step 90 python3 benchmarks/bench_step.py --gpu --out "$OUT_DIR/bench_step_gpu.json"
fi
echo "=== summary"; printf '%s\n' "${status[@]}" | tee "$OUT_DIR/summary.txt"
