#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (for machines without a GPU; CI runs it after the CPU tests).
#
#   bash scripts/cuda_compile_check.sh
#
# Creates or reuses a second virtual env, .venv-cuda (or $LORA_EXT_CUDA_VENV), with torch==2.14.1 (a
# CUDA 13.0 build), builds lora_ext there with TORCH_CUDA_ARCH_LIST (default 9.0) (pip's default build dir is
# already one per torch: build/torch-2.14.1-cu130-<hash>/, next to the CPU build's),
# then checks that every __global__ kernel of csrc/ops/cuda/*.cu is registered by liblora_ext.so, that the CUDA
# dispatch key has a kernel for every op of the schema, and that `import lora_ext` works on a
# machine without a GPU (CUDA then reports itself unavailable; nothing crashes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORA_EXT_CUDA_VENV:-$ROOT/.venv-cuda}"
PY="${PYTHON:-python3}"
cd "$ROOT"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[cuda-check] creating virtual env $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
  echo "[cuda-check] installing torch==2.14.1 (CUDA 13.0 build, ~5.5 GB)" >&2
  "$VPY" -m pip install -q torch==2.14.1
fi
if ! "$VPY" -c "import scikit_build_core, pybind11, nlohmann_json, ninja, cmake" >/dev/null 2>&1; then
  "$VPY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "nlohmann-json>=3.11" ninja "cmake>=3.25"
fi
if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "[cuda-check] FAILED: no nvcc (neither on PATH nor /usr/local/cuda/bin/nvcc)" >&2
  exit 1
fi

echo "[cuda-check] building lora_ext with CUDA for TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}" >&2
start=$(date +%s)
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  "$VPY" -m pip install -q --no-build-isolation --no-deps "$ROOT"
echo "[cuda-check] built in $(( $(date +%s) - start )) s" >&2

cd /tmp  # import the installed package, not the source folder
"$VPY" - "$ROOT" <<'PY'
import glob
import os
import re
import sys

import torch

import lora_ext

root = sys.argv[1]
info = lora_ext.build_info()
assert info["with_cuda"], f"lora_ext was built without CUDA: {info}"
lib = os.path.join(os.path.dirname(lora_ext._C.__file__), "lib", "liblora_ext.so")
binary = open(lib, "rb").read()  # the installed library is stripped: look for the names the CUDA runtime registers
kernels = set()
for path in glob.glob(os.path.join(root, "csrc", "ops", "cuda", "*.cu")):
    src = open(path).read()
    kernels |= set(re.findall(r"__global__\s+(?:__launch_bounds__\([^)]*\)\s+)?void\s+"
                              r"(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", src))
assert kernels, "no __global__ kernels found in csrc/ops/cuda/*.cu"
missing = sorted(k for k in kernels if f"{len(k)}{k}".encode() not in binary)  # as in the mangled names
assert not missing, f"kernels not in {lib}: {missing}"
has = torch._C._dispatch_has_kernel_for_dispatch_key
# every op of the schema (registration.cpp) must have a CUDA kernel
expected = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lora_ext::"))
assert len(expected) >= 14, expected
cuda_ops = [op for op in expected if has(f"lora_ext::{op}", "CUDA")]
lacking = [op for op in expected if op not in cuda_ops]
assert not lacking, f"ops without a CUDA kernel: {lacking}"
print(f"[cuda-check] {len(kernels)} kernels in the library: {', '.join(sorted(kernels))}")
print(f"[cuda-check] ops with a CUDA kernel: {', '.join(cuda_ops)}")
print(f"[cuda-check] torch {torch.__version__}, CUDA available here: {torch.cuda.is_available()}; "
      f"build: with_cuda={info['with_cuda']}, arch={info['cuda_arch_list']}")
PY
echo "[cuda-check] OK" >&2
