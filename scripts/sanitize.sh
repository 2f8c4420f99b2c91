#!/usr/bin/env bash
# ASan + UBSan run: builds lora_ext with -DLORA_EXT_SANITIZE=address,undefined (gcc) into its own
# venv (.venv-asan, build folder build/asan; the normal .venv is untouched), builds the libtorch-only
# C++ test program (tests/cpp) with the same sanitizers and runs it, then runs the op / reader /
# model Python tests with the ASan runtime preloaded. Any report stops the run (halt_on_error) and
# the script exits non-zero.
#
#   bash scripts/sanitize.sh                 # the default test files
#   bash scripts/sanitize.sh tests/test_merge.py -k bf16     # other pytest arguments
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export LORA_EXT_VENV="${LORA_EXT_VENV:-$ROOT/.venv-asan}"
SAN="${LORA_EXT_SANITIZE:-address,undefined}"
VPY="$LORA_EXT_VENV/bin/python"
start=$(date +%s)

echo "[sanitize] building lora_ext with -fsanitize=$SAN into $LORA_EXT_VENV" >&2
PIP_ARGS=(-C "cmake.define.LORA_EXT_SANITIZE=$SAN" -C build-dir=build/asan -C install.strip=false
  -C cmake.build-type=RelWithDebInfo)
LORA_EXT_PIP_ARGS="${PIP_ARGS[*]}" nice -n 10 bash scripts/run.sh -c "pass"
export PATH="$LORA_EXT_VENV/bin:$PATH"  # cmake, ninja

LIBASAN="$(gcc -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || { echo "[sanitize] gcc's libasan.so not found" >&2; exit 2; }
# libstdc++ preloaded too: python does not link it, and ASan's __cxa_throw interceptor must find the
# real one when it starts ("CHECK failed: ... real___cxa_throw != 0" on the first C++ throw otherwise)
PRELOAD="$LIBASAN $(gcc -print-file-name=libstdc++.so.6)"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

echo "[sanitize] C++ test program (tests/cpp) under ASan + UBSan" >&2
PREFIX="$(LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 "$VPY" -P -c \
  'import torch, lora_ext; print(torch.utils.cmake_prefix_path + ";" + lora_ext.cmake_prefix_path)')"
CPP_BUILD="$ROOT/build/asan-cpp"
cmake -S tests/cpp -B "$CPP_BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_PREFIX_PATH="$PREFIX" \
  -DCMAKE_CXX_FLAGS="-fsanitize=$SAN -fno-omit-frame-pointer" >"$CPP_BUILD.log" 2>&1 ||
  { cat "$CPP_BUILD.log" >&2; exit 2; }
nice -n 10 cmake --build "$CPP_BUILD" -j2 >>"$CPP_BUILD.log" 2>&1 || { tail -40 "$CPP_BUILD.log" >&2; exit 2; }
ASAN_OPTIONS="detect_leaks=1:halt_on_error=1" "$CPP_BUILD/test_ops"

echo "[sanitize] Python tests with $PRELOAD preloaded" >&2
TESTS=("$@")
[ ${#TESTS[@]} -gt 0 ] || TESTS=(tests/test_lora_linear_op.py tests/test_lora_linear_multi_op.py tests/test_merge.py
  tests/test_exact_merge.py tests/test_cpp_reader.py tests/test_cpp_apply.py tests/test_model_api.py
  tests/test_errors.py)
# detect_leaks=0: CPython keeps objects alive until exit by design. --capture=sys: pytest captures
# only Python's sys.stdout/stderr, so a report that halts the process reaches the terminal.
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS="detect_leaks=0:halt_on_error=1" nice -n 10 \
  "$VPY" -P -m pytest -q -p no:cacheprovider --capture=sys "${TESTS[@]}"
echo "[sanitize] clean in $(( $(date +%s) - start ))s" >&2
