"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` with
the adapter name stripped. A non-default adapter lives in ``<path>/<adapter_name>``, as PEFT
saves it. Loads validate everything before touching the model.

A save replaces the folder's adapter as a whole, even across a crash (``kill -9``, power loss):
each file is written atomically (``atomic.py``), the weights first, and the weights carry the
exact config they were saved with in their safetensors metadata (``lora_ext.adapter_config``).
A crash between the two renames leaves new weights next to the old config; the reader sees
that the two disagree and uses the weights' own config, so it always gets exactly the old or
exactly the new adapter. Files written by PEFT (no such metadata) are read as they are.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from torch import nn

from .._utils import dtensors
from .._utils.names import check_adapter_name
from .._utils.wrappers import check_not_wrapped, path_cleaner, reshard_fsdp, unwrap
from ..config import LoraConfig
from ..layers.base import LoraLayer
from ..model.core import active_adapters, adapter_configs, inject_adapter, lora_layers, saved_modules, set_adapter
from ..model.modules_to_save import ModulesToSave, find_modules_to_save
from ..model.registry import LAYER_TYPES, layer_type_for
from ..model.targeting import candidate_modules, layer_r_alpha
from .atomic import atomic_write_bytes, remove_stale_temporaries

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
CONFIG_METADATA_KEY = "lora_ext.adapter_config"  # the config, in the weights file's metadata
# file-key suffix -> which matrix ("A"/"B"); longest first so that suffixes never shadow each other
_SUFFIXES = dict(
    sorted(((suf, ab) for cls in LAYER_TYPES for suf, ab in zip(cls.file_suffixes, "AB")), key=lambda kv: -len(kv[0]))
)


def _adapter_dir(path: str, adapter_name: str, where: str) -> str:
    check_adapter_name(adapter_name, where)  # a name becomes a folder: it must stay inside `path`
    return path if adapter_name == "default" else os.path.join(path, adapter_name)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys, whatever wraps the model (DDP, torch.compile,
    activation checkpointing, FSDP1: their ``module.`` / ``_orig_mod.`` / ... never get in)."""
    model = unwrap(model)
    out = {}
    config = adapter_configs(model).get(adapter_name)
    for path, layer in lora_layers(model):
        if layer.has_adapter(adapter_name):
            for suffix, w in zip(layer.file_suffixes, layer.adapter_weights(adapter_name)):
                out[f"{PREFIX}{path}{suffix}"] = w.detach()
            if (
                config is not None
                and config.bias == "lora_only"
                and getattr(layer.base_layer, "bias", None) is not None
            ):
                out[f"{PREFIX}{path}.base_layer.bias"] = layer.base_layer.bias.detach()
    for path, wrapper in saved_modules(model):
        if wrapper.has_adapter(adapter_name):
            for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
                out[f"{PREFIX}{path}.{pname}"] = p.detach()
    if config is not None and config.bias == "all":
        wrapped = [p for p, _ in saved_modules(model)]
        for name, p in model.named_parameters():
            if name.endswith("bias") and "lora_" not in name and not any(name.startswith(w + ".") for w in wrapped):
                out[f"{PREFIX}{name}"] = p.detach()
    clean = path_cleaner(model)
    return {PREFIX + clean(k[len(PREFIX) :]): v for k, v in out.items()}


def save_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> str:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's format) into
    ``path`` (a non-default adapter: ``path/<adapter_name>``); returns the folder.

    Replacing an existing adapter is atomic as a whole (see the module docstring); files get
    the permissions ``open()`` would give them (``0666 & ~umask``).

    When the adapter's tensors are DTensors (FSDP2, tensor parallel) the save is **collective**:
    every rank calls it, only the adapter's tensors are gathered (never the base weights), rank 0
    of the default process group writes, and all ranks wait for the write (a barrier). The files
    are byte for byte those a single process holding the same values writes.
    """
    out_dir = _adapter_dir(path, adapter_name, "lora_ext.save_adapter")
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"lora_ext.save_adapter: unknown adapter {adapter_name!r}; have {list(configs)}")
    cfg = json.dumps(configs[adapter_name].to_dict(), indent=2, sort_keys=True)
    reshard_fsdp(unwrap(model))  # FSDP2 after a forward without resharding: save from the sharded parameters
    tensors = adapter_state_dict(model, adapter_name)
    if not dtensors.any_dtensor(tensors.values()):
        _write_adapter(out_dir, tensors, cfg)
        return out_dir
    import torch.distributed as dist

    tensors = dtensors.gathered(tensors)  # every rank, the same keys in the same order
    failure = None
    if dist.get_rank() == 0:
        try:
            _write_adapter(out_dir, tensors, cfg)
        except Exception as e:  # every rank must learn it: the others would think the adapter saved
            failure = e
    status = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(status, src=0)  # also the barrier: the files exist when this returns
    if failure is not None:
        raise failure
    if status[0] is not None:
        raise OSError(f"lora_ext.save_adapter: rank 0 failed to write {out_dir!r}: {status[0]}")
    return out_dir


def _write_adapter(out_dir: str, tensors: dict[str, torch.Tensor], cfg: str) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = _sorted_metadata(save(tensors, metadata={"format": "pt", CONFIG_METADATA_KEY: cfg}))
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temporaries(out_dir)
    atomic_write_bytes(os.path.join(out_dir, WEIGHTS_NAME), data)  # weights first: they carry their config
    atomic_write_bytes(os.path.join(out_dir, CONFIG_NAME), cfg.encode())


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` with the safetensors header's metadata in sorted key order. The safetensors library
    writes the metadata from a hash map, in an order that changes from call to call; sorted, the
    same adapter always gives the same bytes (whatever wraps the model). Same header length: the
    tensors' offsets do not move."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if not header.get("__metadata__"):
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # not the library's JSON conventions: keep its bytes
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


def _load_json(text, where: str) -> dict:
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"lora_ext.load_adapter: {where} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"lora_ext.load_adapter: {where}: expected a JSON object, got {type(d).__name__}")
    return d


def _read_safetensors(st_path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one safetensors file, read in one go (one version of the file)."""
    from safetensors.torch import load

    with open(st_path, "rb") as f:
        data = f.read()
    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except Exception as e:  # the safetensors library's own error types: a malformed file
        raise ValueError(f"lora_ext.load_adapter: {st_path} is not a valid safetensors file: {e}") from e
    return tensors, metadata


def read_adapter(path: str, allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter folder (config + tensors) without touching any model."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    st_path = os.path.join(path, WEIGHTS_NAME)
    bin_path = os.path.join(path, PICKLE_WEIGHTS_NAME)
    cfg_dict = None
    if os.path.isfile(cfg_path):  # the config first: a save that runs meanwhile replaces the weights first
        with open(cfg_path, "rb") as f:
            cfg_dict = _load_json(f.read(), cfg_path)
    if os.path.isfile(st_path):
        tensors, metadata = _read_safetensors(st_path)
        embedded = metadata.get(CONFIG_METADATA_KEY)
        if embedded is not None:
            own = _load_json(embedded, f"{st_path}'s {CONFIG_METADATA_KEY} metadata")
            if cfg_dict != own:
                warnings.warn(
                    f"lora_ext.load_adapter: {cfg_path} does not match the config saved with the weights "
                    "(an interrupted save, or the file was edited); using the weights' own config",
                    stacklevel=3,
                )
                cfg_dict = own
    elif os.path.isfile(bin_path):
        if not allow_pickle:
            raise ValueError(
                f"lora_ext.load_adapter: {path!r} holds only {PICKLE_WEIGHTS_NAME} (a pickle); pass "
                "allow_pickle=True to read it with torch.load(weights_only=True)"
            )
        tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"lora_ext.load_adapter: no {WEIGHTS_NAME} in {path!r}")
    if cfg_dict is None:
        raise FileNotFoundError(f"lora_ext.load_adapter: no {CONFIG_NAME} in {path!r}")
    try:
        config = LoraConfig.from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise ValueError(f"lora_ext.load_adapter: {cfg_path}: {e}") from e
    return config, tensors


def _nonfinite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())


def _param_by_name(params: dict[str, torch.Tensor], name: str):
    """A parameter (from ``dict(model.named_parameters())``) by its name in an injected
    (``...base_layer.bias``, ``...original_module.bias``) or plain model."""
    for candidate in (name, name.replace(".base_layer.", "."), name.replace(".original_module.", ".")):
        if candidate in params:
            return params[candidate]
    return None


def _plan(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], adapter_name: str):
    """Validate the file against the model. Returns ``(lora, saved, biases)``: {module path: (A, B)},
    {module path: {param name: tensor}} for modules_to_save, {parameter name: tensor}. Raises a
    ``ValueError`` listing every problem."""
    cands = candidate_modules(model)
    save_paths = find_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    problems: list[str] = []
    found: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {p: {} for p in save_paths}
    biases: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())

    def take_bias(name: str, key: str, t: torch.Tensor) -> None:
        want = _param_by_name(params, name)
        if want is None or tuple(want.shape) != tuple(t.shape):
            problems.append(f"unexpected bias key {key!r}")
        else:
            biases[name] = t

    for key, t in tensors.items():
        if not t.is_floating_point():
            problems.append(f"{key!r} has dtype {t.dtype}, expected a floating dtype")
            continue
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else None
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if name is not None and suffix is None:
            owner = next((p for p in save_paths if name.startswith(p + ".")), None)
            if owner is not None:
                module = model.get_submodule(owner)
                orig = module.original_module if isinstance(module, ModulesToSave) else module
                pname = name[len(owner) + 1 :]
                if config.bias == "all" and pname.startswith("original_module."):
                    take_bias(name, key, t)  # PEFT's bias="all" also saves the original module's biases
                    continue
                if pname.startswith("modules_to_save."):  # PEFT's bias="all" duplicate of the copy's bias
                    pname = pname[len("modules_to_save.") :]
                want = dict(orig.named_parameters()).get(pname)
                if want is None or tuple(want.shape) != tuple(t.shape):
                    problems.append(
                        f"{key!r} does not match a parameter of the module to save {owner!r}"
                        + ("" if want is None else f" (expected shape {tuple(want.shape)})")
                    )
                else:
                    saved[owner][pname] = t
                continue
            if config.bias != "none" and name.endswith("bias"):
                take_bias(name, key, t)
                continue
        if name is None or suffix is None:
            problems.append(f"unexpected key {key!r}")
            continue
        path = name[: -len(suffix)]
        if path not in cands:
            problems.append(f"unexpected key {key!r}: the model has no LoRA-capable module {path!r}")
            continue
        cls = layer_type_for(cands[path])
        if suffix not in cls.file_suffixes:
            problems.append(
                f"unexpected key {key!r}: module {path!r} is a {type(cands[path]).__name__}, "
                f"whose keys end in {cls.file_suffixes}"
            )
            continue
        found.setdefault(path, {})[_SUFFIXES[suffix]] = t
    for owner, params in saved.items():
        module = model.get_submodule(owner)
        orig = module.original_module if isinstance(module, ModulesToSave) else module
        for pname, _ in orig.named_parameters():
            if pname not in params:
                problems.append(f"missing key {PREFIX}{owner}.{pname} (module to save)")
    plan = {}
    for path, ab in found.items():
        cls = layer_type_for(cands[path])
        if set(ab) != {"A", "B"}:
            missing = cls.file_suffixes[1] if "A" in ab else cls.file_suffixes[0]
            problems.append(f"missing key {PREFIX}{path}{missing}")
            continue
        module = cands[path]
        if isinstance(module, LoraLayer) and module.has_adapter(adapter_name):
            problems.append(f"module {path!r} already has an adapter named {adapter_name!r}")
            continue
        base = module.base_layer if isinstance(module, LoraLayer) else module
        r, _ = layer_r_alpha(config, path)
        if r > cls.max_rank(base):
            problems.append(f"rank too large at {path!r}: expected r <= min(in, out) = {cls.max_rank(base)}, got r={r}")
            continue
        want_a, want_b = cls.adapter_shapes(base, r)
        a, b = ab["A"], ab["B"]
        if tuple(a.shape) != tuple(want_a) or tuple(b.shape) != tuple(want_b):
            problems.append(
                f"shape mismatch at {path!r}: expected A {tuple(want_a)} and B {tuple(want_b)} "
                f"(r from the config), got {tuple(a.shape)} and {tuple(b.shape)}"
            )
            continue
        plan[path] = (a, b)
    if not plan and not problems:
        problems.append("the file holds no LoRA weights")
    if problems:
        raise ValueError("lora_ext.load_adapter: the adapter does not fit the model:\n  " + "\n  ".join(problems))
    return plan, saved, biases


def load_adapter(
    model: nn.Module,
    path: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Load a PEFT/lora_ext adapter folder into ``model`` (injecting LoRA layers as needed).

    Every key is mapped exactly (``base_model.model.<path>.lora_A.weight`` -> module ``<path>``);
    missing or unexpected keys, shape or dtype problems, a rank above ``min(in, out)``, and NaN/Inf
    values (unless ``allow_nonfinite``) raise a ``ValueError`` listing them, before the model is
    changed. As in PEFT, the adapter becomes active only if the model had none; it is frozen
    unless ``is_trainable`` (a first adapter loaded frozen puts the model in inference mode: see
    ``set_adapter``). ``adapter_model.bin`` (pickle) is read only with ``allow_pickle=True``.
    Load before wrapping the model in DDP or sharding it, as :func:`inject_adapter`.
    """
    check_not_wrapped(model, "lora_ext.load_adapter")
    given, model = model, unwrap(model)
    check_adapter_name(adapter_name, "lora_ext.load_adapter")
    if adapter_name in adapter_configs(model):
        raise ValueError(f"lora_ext.load_adapter: adapter {adapter_name!r} already exists in the model")
    config, tensors = read_adapter(path, allow_pickle=allow_pickle)
    plan, saved, biases = _plan(model, config, tensors, adapter_name)
    if not allow_nonfinite:
        bad = _nonfinite_keys(tensors)
        if bad:
            raise ValueError(
                f"lora_ext.load_adapter: {path!r} holds NaN/Inf values in {bad}; the model was not "
                "changed (pass allow_nonfinite=True to load it anyway)"
            )
    was_active = active_adapters(model)
    inject_adapter(model, config.replace(init_lora_weights=True), adapter_name, target_names=sorted(plan))
    adapter_configs(model)[adapter_name] = config
    with torch.no_grad():
        for p, (a, b) in plan.items():
            wa, wb = model.get_submodule(p).adapter_weights(adapter_name)
            wa.copy_(a)
            wb.copy_(b)
        for owner, owned in saved.items():
            copy_ = dict(model.get_submodule(owner).modules_to_save[adapter_name].named_parameters())
            for pname, t in owned.items():
                copy_[pname].copy_(t)
        params = dict(model.named_parameters())
        for name, t in biases.items():
            _param_by_name(params, name).copy_(t)
    if not was_active:  # the loaded adapter is the active one: trainable, or inference mode
        set_adapter(model, adapter_name, inference_mode=not is_trainable)
    return given
