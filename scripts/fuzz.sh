#!/usr/bin/env bash
# Builds the libFuzzer harnesses of tests/fuzz (clang, ASan + UBSan + coverage) and runs each for
# SECONDS (default 60) on a scratch copy of its committed corpus (tests/fuzz/corpus/<harness>/,
# which is never grown). Exits non-zero on any crash, leak, UB or property report; the input that
# caused it is saved under build/fuzz/artifacts/.
#
#   bash scripts/fuzz.sh            # 60 s per harness (CI)
#   bash scripts/fuzz.sh 600 fuzz_load_apply     # one harness, longer
#
# Installs clang + libFuzzer from Debian (apt-get) when missing, and the project's venv (.venv,
# through scripts/run.sh) for torch when missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_EACH="${1:-60}"
shift || true
HARNESSES=("$@")
[ ${#HARNESSES[@]} -gt 0 ] || HARNESSES=(fuzz_safetensors fuzz_adapter_config fuzz_load_apply)
BUILD="$ROOT/build/fuzz"
VENV="${LORA_EXT_VENV:-$ROOT/.venv}"
cd "$ROOT"

have_libfuzzer() {
  command -v clang++ >/dev/null 2>&1 &&
    echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }' |
      clang++ -x c++ -fsanitize=fuzzer,address,undefined -o /dev/null - >/dev/null 2>&1
}
if ! have_libfuzzer; then
  echo "[fuzz] installing clang and libFuzzer (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends clang libclang-rt-dev >/dev/null
  have_libfuzzer || { echo "[fuzz] clang cannot link -fsanitize=fuzzer" >&2; exit 2; }
fi

if ! "$VENV/bin/python" -c "import torch, nlohmann_json, cmake, ninja" >/dev/null 2>&1; then
  bash scripts/run.sh -c "import torch"   # creates the venv (torch, build tools) and builds lora_ext
fi
TORCH_PREFIX="$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
NLOHMANN="$("$VENV/bin/python" -c 'import nlohmann_json, os; print(os.path.join(os.path.dirname(nlohmann_json.__file__), "include"))')"
CMAKE="$VENV/bin/cmake"
export PATH="$VENV/bin:$PATH"  # ninja

echo "[fuzz] building the harnesses in $BUILD" >&2
mkdir -p "$BUILD"
"$CMAKE" -S tests/fuzz -B "$BUILD" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=None \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DLORA_EXT_NLOHMANN_INCLUDE="$NLOHMANN" >"$BUILD.configure.log" 2>&1 ||
  { cat "$BUILD.configure.log" >&2; exit 2; }
nice -n 10 "$CMAKE" --build "$BUILD" -j2 -- ${HARNESSES[@]} >"$BUILD.build.log" 2>&1 ||
  { tail -50 "$BUILD.build.log" >&2; exit 2; }

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
SCRATCH="$(mktemp -d)"
# the files the harnesses write for the readers: in memory, and removed even after a crash
export LORA_EXT_FUZZ_TMP="$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)"
trap 'rm -rf "$SCRATCH" "$LORA_EXT_FUZZ_TMP"' EXIT
mkdir -p "$BUILD/artifacts"
failed=()
for h in "${HARNESSES[@]}"; do
  name="${h#fuzz_}"
  cp -r "tests/fuzz/corpus/$name" "$SCRATCH/$name"
  log="$BUILD/$h.log"
  echo "[fuzz] $h: ${SECONDS_EACH}s on $(ls "$SCRATCH/$name" | wc -l) corpus files (log: $log)" >&2
  start=$(date +%s)
  rc=0
  nice -n 10 "$BUILD/$h" "$SCRATCH/$name" -dict=tests/fuzz/fuzz.dict \
    -max_total_time="$SECONDS_EACH" -timeout=30 -rss_limit_mb=4096 -max_len=8192 -print_final_stats=1 \
    -artifact_prefix="$BUILD/artifacts/$h-" >"$log" 2>&1 || rc=$?
  execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
  echo "[fuzz] $h: exit $rc, $execs executions in $(( $(date +%s) - start ))s" >&2
  if [ "$rc" -ne 0 ]; then
    failed+=("$h")
    grep -E 'ERROR|SUMMARY|runtime error|property violated|Test unit written' "$log" | head -20 >&2 || true
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[fuzz] FAILED: ${failed[*]} (inputs under $BUILD/artifacts/)" >&2
  exit 1
fi
echo "[fuzz] all harnesses clean" >&2
