#!/usr/bin/env bash
# One command for a machine with a GPU (torch, cmake, ninja, pybind11, scikit-build-core installed; no
# internet needed): build lora_ext for this GPU, run the CUDA tests, then the GPU benchmark table.
#
#   bash scripts/gpu_check.sh            # uses `python3`; PYTHON=/path/to/python to choose
#   GPU_CHECK_JUNIT=report.xml GPU_CHECK_WORKERS=8 bash scripts/gpu_check.sh --quick
#
# Finishes in a few minutes (the build is most of it). Prints the table benchmarks/RESULTS.md keeps.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
ARCH="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
echo "[gpu-check] building for TORCH_CUDA_ARCH_LIST=$ARCH" >&2
start=$(date +%s)
TORCH_CUDA_ARCH_LIST="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$PY" -m pip install -q --no-build-isolation --no-deps -C build-dir=build/gpu-{wheel_tag} "$ROOT"
echo "[gpu-check] built in $(( $(date +%s) - start )) s" >&2
"$PY" -m pip install -q --no-build-isolation --no-deps -e "$ROOT/dev"  # lora_ext_dev: the tests' shared helpers
"$PY" -P -c "import lora_ext; info = lora_ext.build_info(); assert info['with_cuda'], info; print(info)"
echo "[gpu-check] CUDA tests" >&2
# Every failure is reported (no -x): a GPU is lent rarely, and one run should show all that is wrong.
# pytest-xdist, when installed, runs the tests in several processes sharing the one GPU.
PYTEST_ARGS=(-q -p no:cacheprovider -rfE --durations=10)
if "$PY" -c "import xdist" >/dev/null 2>&1; then PYTEST_ARGS+=(-n "${GPU_CHECK_WORKERS:-8}"); fi
if [ -n "${GPU_CHECK_JUNIT:-}" ]; then PYTEST_ARGS+=(--junitxml "$GPU_CHECK_JUNIT"); fi
start=$(date +%s)
# test_cuda*.py: what only CUDA has; the others are written once, parametrised by device (their CPU cases
# run too).
"$PY" -P -m pytest tests/test_cuda.py tests/test_cuda_multi.py tests/test_lora_linear_op.py \
  tests/test_lora_linear_multi_op.py tests/test_merge.py tests/test_exact_merge.py tests/test_dropout.py \
  tests/test_lora_linear_module.py tests/test_quant.py tests/test_autocast.py "${PYTEST_ARGS[@]}" \
  || { echo "[gpu-check] CUDA tests FAILED" >&2; FAILED=1; }
echo "[gpu-check] tests took $(( $(date +%s) - start )) s" >&2
echo "[gpu-check] benchmark" >&2
"$PY" -P benchmarks/bench_gpu.py "$@" || { echo "[gpu-check] benchmark FAILED" >&2; FAILED=1; }
exit "${FAILED:-0}"
