#!/usr/bin/env bash
# The slow packaging checks (CI runs this after scripts/run.sh and scripts/cuda_compile_check.sh, whose virtual
# envs it reuses: .venv with torch 2.13.0 CPU, .venv-cuda with torch 2.14.1 CUDA 13.0; tests/test_packaging.py
# has the fast ones):
#
#   bash scripts/packaging_check.sh
#
#   1. one build tree per torch: rebuild for the CPU torch, the CUDA torch, the CPU torch again, in this source
#      tree without deleting anything (each is incremental in its own build/torch-*/ tree);
#   2. `pip wheel --no-build-isolation .`: the wheel pins the torch it was compiled against; `twine check`;
#   3. that wheel (torch 2.13.0, CPU) imported under torch 2.14.1 (CUDA): the import guard's ImportError, not an
#      undefined symbol;
#   4. `python -m build --sdist`: what is in it; installed with `pip install --no-build-isolation <sdist>` into a
#      fresh venv (torch 2.13.0 and the build tools first) and smoke-tested there;
#   5. configure-time messages: no C++ compiler, a build tree reused for another torch, a CUDA torch without nvcc
#      (needs `unshare`, i.e. root), and the CUDA configure with Debian 12's cmake 3.25 when /usr/bin/cmake is one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORA_EXT_VENV:-$ROOT/.venv}"
CUDA_VENV="${LORA_EXT_CUDA_VENV:-$ROOT/.venv-cuda}"
PY="${PYTHON:-python3}"
cd "$ROOT"
for v in "$VENV" "$CUDA_VENV"; do
  if [ ! -x "$v/bin/python" ]; then
    echo "[packaging] FAILED: $v is missing: run scripts/run.sh and scripts/cuda_compile_check.sh first" >&2
    exit 1
  fi
done
VPY="$VENV/bin/python"
CPY="$CUDA_VENV/bin/python"
WORK="$(mktemp -d /tmp/lora_ext_packaging.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # as cuda_compile_check.sh, so its tree is reused
t0=$(date +%s)
step() { echo "[packaging] $* ($(( $(date +%s) - t0 )) s)" >&2; }
fail() { echo "[packaging] FAILED: $*" >&2; exit 1; }
expect_in() {  # expect_in FILE TEXT WHAT (CMake wraps its messages: compared with whitespace runs as one space)
  tr -s ' \n' '  ' < "$1" | grep -qF -- "$2" || { tail -40 "$1" >&2; fail "$3: expected '$2'"; }
}
if ! "$VPY" -c "import build, twine" >/dev/null 2>&1; then
  "$VPY" -m pip install -q build twine
fi

# 1 ------------------------------------------------------------------------------------------------------------
step "1. one build tree per torch: CPU -> CUDA -> CPU rebuilds in $ROOT, nothing deleted"
"$VPY" -m pip install -q --no-build-isolation --no-deps "$ROOT"
"$CPY" -m pip install -q --no-build-isolation --no-deps "$ROOT"
"$VPY" -m pip install -q --no-build-isolation --no-deps "$ROOT"
(cd "$WORK" && "$VPY" -P -c "import lora_ext; i = lora_ext.build_info(); assert not i['with_cuda'], i" \
            && "$CPY" -P -c "import lora_ext; i = lora_ext.build_info(); assert i['with_cuda'], i")
ls -d build/torch-*/* >&2

# 2 ------------------------------------------------------------------------------------------------------------
step "2. wheel: pip wheel --no-build-isolation, its torch pin, twine check"
"$VPY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/wheel" "$ROOT"
WHEEL="$(ls "$WORK"/wheel/lora_ext-*.whl)"
TORCH_PUBLIC="$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")"
unzip -p "$WHEEL" '*.dist-info/METADATA' > "$WORK/METADATA"
expect_in "$WORK/METADATA" "Requires-Dist: torch==$TORCH_PUBLIC" "wheel METADATA"
unzip -l "$WHEEL" > "$WORK/wheel.txt"
for f in lora_ext/_build_info.py lora_ext/lib/liblora_ext.so lora_ext/include/lora_ext/lora_ext.h \
         lora_ext/share/cmake/LoraExt/LoraExtConfig.cmake; do
  expect_in "$WORK/wheel.txt" "$f" "wheel contents"
done
grep -qE '\.dist-info/(licenses/)?LICENSE$' "$WORK/wheel.txt" || fail "the wheel has no LICENSE"
"$VPY" -m twine --no-color check --strict "$WHEEL"
grep '^Requires-Dist: torch' "$WORK/METADATA" >&2

# 3 ------------------------------------------------------------------------------------------------------------
step "3. the torch $TORCH_PUBLIC wheel imported under $("$CPY" -c 'import torch; print(torch.__version__)')"
"$CPY" -m pip install -q --no-deps --target "$WORK/mismatch" "$WHEEL"
set +e
(cd "$WORK" && PYTHONPATH="$WORK/mismatch" "$CPY" -P -c "import lora_ext") > "$WORK/mismatch.txt" 2>&1
rc=$?
set -e
[ $rc -ne 0 ] || fail "importing the torch $TORCH_PUBLIC build under the CUDA torch succeeded"
expect_in "$WORK/mismatch.txt" "ImportError: lora_ext 0.1.0 was built against torch $TORCH_PUBLIC" "mismatch message"
expect_in "$WORK/mismatch.txt" "-m pip install --no-build-isolation --no-deps --force-reinstall" "mismatch message"
if grep -q "undefined symbol" "$WORK/mismatch.txt"; then fail "undefined symbol instead of the guard's message"; fi
tail -n 2 "$WORK/mismatch.txt" >&2
# what the guard prevents: loading that _C directly
(cd "$WORK" && "$CPY" -P -c "
import importlib.util, glob, torch
path = glob.glob('$WORK/mismatch/lora_ext/_C*.so')[0]
spec = importlib.util.spec_from_file_location('lora_ext._C', path)
try:
    spec.loader.create_module(spec); print('without the guard: loads')
except ImportError as e:
    print('without the guard:', str(e)[:160])
") >&2 || true

# 4 ------------------------------------------------------------------------------------------------------------
step "4. sdist: build, contents, install into a fresh venv, smoke test"
"$VPY" -m build -q --sdist --no-isolation -o "$WORK/sdist" "$ROOT" > /dev/null
SDIST="$(ls "$WORK"/sdist/lora_ext-*.tar.gz)"
tar tzf "$SDIST" | sed 's|^[^/]*/||' > "$WORK/sdist.txt"
for f in pyproject.toml CMakeLists.txt LICENSE README.md PKG-INFO build_backend/lora_ext_backend.py \
         cmake/LoraExtConfig.cmake cmake/_build_info.py.in csrc/include/lora_ext/lora_ext.h csrc/python/module.cpp \
         csrc/ops/registration.cpp csrc/ops/cuda/merge_cuda.cu lora_ext/__init__.py lora_ext/_torch_check.py; do
  grep -qx -- "$f" "$WORK/sdist.txt" || fail "sdist lacks $f"
done
if grep -E '^(build|dist|\.venv[^/]*|\.ci|\.git)/|\.so$|__pycache__|\.egg-info' "$WORK/sdist.txt"; then
  fail "sdist holds build output, a venv, CI files or compiled files (above)"
fi
tar xzf "$SDIST" -O --wildcards '*/PKG-INFO' | grep '^Requires-Dist: torch' >&2
"$VPY" -m twine --no-color check --strict "$SDIST"
"$PY" -m venv "$WORK/fresh"
FPY="$WORK/fresh/bin/python"
"$FPY" -m pip install -q --upgrade pip
"$FPY" -m pip install -q "torch==$TORCH_PUBLIC" "scikit-build-core>=0.10" "pybind11>=2.12" "nlohmann-json>=3.11" ninja "cmake>=3.25"
s=$(date +%s)
(cd "$WORK" && "$FPY" -m pip install --no-cache-dir --no-build-isolation "$SDIST")  # no cached wheel: compile
echo "[packaging] sdist built and installed in $(( $(date +%s) - s )) s" >&2
(cd "$WORK" && "$FPY" -P - <<'PY')
import torch
import lora_ext

torch.manual_seed(0)
base = torch.nn.Linear(32, 16)
layer = lora_ext.LoraLinear(base, r=4, lora_alpha=8)
torch.nn.init.normal_(layer.lora_B["default"].weight)
x = torch.randn(5, 32, requires_grad=True)
y = layer(x)
a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
ref = base(x) + 2.0 * (x @ a.T) @ b.T
torch.testing.assert_close(y, ref)
y.sum().backward()
assert a.grad is not None and b.grad is not None and x.grad is not None
info = lora_ext.build_info()
print(f"[packaging] sdist install OK: lora_ext {lora_ext.__version__}, torch {info['torch_version']}, "
      f"with_cuda={info['with_cuda']}")
PY
"$FPY" -m pip check

# 5 ------------------------------------------------------------------------------------------------------------
step "5. configure-time messages"
CMAKE="$VENV/bin/cmake"
# (a) no C++ compiler: PATH holds only the venv (cmake, ninja, python)
set +e
env -u CXX PATH="$VENV/bin" "$CMAKE" -S "$ROOT" -B "$WORK/nocxx" -G Ninja -DPython_EXECUTABLE="$VPY" > "$WORK/nocxx.txt" 2>&1
set -e
expect_in "$WORK/nocxx.txt" "lora_ext: no C++ compiler found" "no-compiler message"
grep "lora_ext: no C++" "$WORK/nocxx.txt" >&2
# (b) a build tree configured for the CPU torch, then for the CUDA torch
"$CMAKE" -S "$ROOT" -B "$WORK/tree" -G Ninja -DPython_EXECUTABLE="$VPY" > "$WORK/tree0.txt" 2>&1 \
  || { tail -30 "$WORK/tree0.txt" >&2; fail "CPU configure"; }
set +e
"$CMAKE" -S "$ROOT" -B "$WORK/tree" -G Ninja -DPython_EXECUTABLE="$CPY" > "$WORK/tree.txt" 2>&1
set -e
expect_in "$WORK/tree.txt" "was configured for torch" "reused-tree message"
grep "lora_ext: the build directory" "$WORK/tree.txt" >&2
# (c) a CUDA torch and no nvcc: /usr/local/cuda and the folder of the nvcc on PATH hidden (empty tmpfs
#     mounts) in a private mount namespace, which needs root
hide="/usr/local/cuda"
nvcc_dir="$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")"
case "$nvcc_dir" in /usr/local/cuda*) ;; /usr/bin|/bin) hide="" ;; *) hide="$hide $nvcc_dir" ;; esac
if [ -z "$hide" ]; then
  echo "[packaging] (c) skipped: nvcc is in $nvcc_dir, which cannot be hidden" >&2
elif unshare -m --propagation private true 2>/dev/null; then
  mounts=""
  for d in $hide; do [ -e "$d" ] && mounts="$mounts mount -t tmpfs none '$d' &&"; done
  set +e
  env -u CUDACXX -u CUDA_HOME -u CUDA_PATH unshare -m --propagation private sh -c "$mounts \
      '$CMAKE' -S '$ROOT' -B '$WORK/nonvcc' -G Ninja -DPython_EXECUTABLE='$CPY'" > "$WORK/nonvcc.txt" 2>&1
  set -e
  expect_in "$WORK/nonvcc.txt" "but nvcc was not found" "no-nvcc message"
  grep "lora_ext: torch" "$WORK/nonvcc.txt" >&2
else
  echo "[packaging] (c) skipped: unshare -m is not permitted here (not root)" >&2
fi
# (d) the CUDA configure with /usr/bin/cmake when that is Debian 12's 3.25
if [ -x /usr/bin/cmake ] && /usr/bin/cmake --version | grep -q "version 3\.25\."; then
  /usr/bin/cmake -S "$ROOT" -B "$WORK/cmake325" -G Ninja -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
    -DPython_EXECUTABLE="$CPY" > "$WORK/cmake325.txt" 2>&1 || { tail -30 "$WORK/cmake325.txt" >&2; fail "cmake 3.25 CUDA configure"; }
  expect_in "$WORK/cmake325.txt" "CUDA kernels: ON" "cmake 3.25 CUDA configure"
  echo "[packaging] cmake 3.25 configures the CUDA build" >&2
else
  echo "[packaging] (d) skipped: /usr/bin/cmake is not cmake 3.25" >&2
fi
step "OK"
