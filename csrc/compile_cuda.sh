#!/usr/bin/env bash
# Compile the CUDA kernel of csrc/ for sm_80 and sm_90 (A100, H100/H200). No GPU is needed:
# this checks that the sources build against the installed torch and CUDA toolkit, and leaves
# the library in fastalpha's build cache for later use. Extra arguments go to
# `python -m fastalpha.cpp_build` (e.g. --rebuild to compile even when the cache is current).
#
#   bash csrc/compile_cuda.sh                 # CUDA_HOME defaults to /usr/local/cuda-13.0 if present
#
# Where torch is not a CUDA build or no CUDA toolkit is found it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda-13.0
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
if ! python -c "import sys, torch; from fastalpha.cpp_build import find_cuda_home; sys.exit(torch.version.cuda is None or find_cuda_home() is None)"; then
  echo "compile_cuda: skipped (torch is not a CUDA build, or no CUDA toolkit: set CUDA_HOME)"
  exit 0
fi
echo "compile_cuda: CUDA_HOME=${CUDA_HOME:-auto} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}"
exec python -m fastalpha.cpp_build cuda "$@"
