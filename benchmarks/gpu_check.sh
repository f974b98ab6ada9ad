#!/usr/bin/env bash
# The one prepared GPU check (benchmarks/gpu_check.py says the steps, their order and the 420 s budget).
#
#   bash ../shared/tools/gpu_wheels.sh .whl        # here, once: the wheels the GPU machine lacks (carry .whl)
#   bash benchmarks/gpu_check.sh [OUT_DIR]         # there (OUT_DIR defaults to $OUT, else ./gpu_results)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/dry   # here: the same steps on CPU, tiny shapes
#
# This wrapper installs the carried wheels (no index, no network), puts the repo and kernels/ (which holds
# `clo_kernels`) on PYTHONPATH (the GPU image has no index to pip-install the project from), and starts the clock the budget counts from.
set -u
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}
OUT_DIR=${1:-${OUT:-gpu_results}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1
if [ "${GPU_CHECK_DRY_RUN:-0}" != "1" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  SITE=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl \
    && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
fi
export PYTHONPATH=$ROOT/kernels:$ROOT${PYTHONPATH:+:$PYTHONPATH}
cd "$ROOT"
python3 benchmarks/gpu_check.py "$OUT_DIR"
