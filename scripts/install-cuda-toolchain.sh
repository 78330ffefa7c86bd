#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler from PyPI into .cuda-toolchain/ (gitignored)
# when no nvcc is found. Pinned because a newer nvcc emits PTX that our GPU machines'
# CUDA 13.0 driver rejects, and because unpinned nvidia-nvvm / nvidia-cuda-crt pull
# 13.5 versions that the 13.0 ptxas rejects.
# Prints the nvcc path on its last line.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cuda-toolchain"

if [ -z "${M3_FORCE_PIP_NVCC:-}" ]; then
  for cand in "${NVCC:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" "$(command -v nvcc || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then
      echo "nvcc already present: $cand" >&2
      echo "$cand"
      exit 0
    fi
  done
fi

nvcc="$dest/nvidia/cu13/bin/nvcc"
if [ ! -x "$nvcc" ]; then
  echo "installing the pinned CUDA 13.0 toolchain from PyPI into $dest" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$dest" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 >&2
fi
[ -x "$nvcc" ] || { echo "error: nvcc not found at $nvcc after install" >&2; exit 1; }
echo "$nvcc"
