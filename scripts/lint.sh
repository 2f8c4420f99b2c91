#!/usr/bin/env bash
# Style checks (CI runs this first; it fails on any violation):
#   ruff check + ruff format --check   over the Python (configuration: [tool.ruff] in pyproject.toml)
#   clang-format --dry-run -Werror     over the C++/CUDA of csrc/, tests/cpp, tests/fuzz, examples/cpp (.clang-format)
#
#   bash scripts/lint.sh          # check
#   bash scripts/lint.sh --fix    # rewrite the files instead (then review the diff)
#
# Tools come from .venv (or $LORA_EXT_VENV), installed there at pinned versions when missing, so every machine
# formats the same way; .pre-commit-config.yaml runs the same tools at the same versions.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORA_EXT_VENV:-$ROOT/.venv}"
RUFF_VERSION=0.17.6
CLANG_FORMAT_VERSION=23.1.5
cd "$ROOT"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ "$("$VENV/bin/ruff" --version 2>/dev/null)" != "ruff $RUFF_VERSION" ] ||
   ! "$VENV/bin/clang-format" --version 2>/dev/null | grep -q "version $CLANG_FORMAT_VERSION"; then
  "$VENV/bin/python" -m pip install -q "ruff==$RUFF_VERSION" "clang-format==$CLANG_FORMAT_VERSION"
fi
mapfile -t CXX < <(git ls-files 'csrc/*' 'tests/cpp/*' 'tests/fuzz/*' 'examples/cpp/*' | grep -E '\.(cpp|h|cu|cuh)$')
status=0
if [ "${1:-}" = "--fix" ]; then
  "$VENV/bin/ruff" check --fix . || status=1
  "$VENV/bin/ruff" format .
  "$VENV/bin/clang-format" -i --style=file "${CXX[@]}"
else
  "$VENV/bin/ruff" check . || status=1
  "$VENV/bin/ruff" format --check . || status=1
  "$VENV/bin/clang-format" --dry-run -Werror --style=file "${CXX[@]}" || status=1
fi
[ $status -eq 0 ] && echo "[lint] clean" >&2 || echo "[lint] FAILED: run bash scripts/lint.sh --fix" >&2
exit $status
