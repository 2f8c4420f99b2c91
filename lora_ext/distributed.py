"""``lora_ext.distributed``: training LoRA adapters on several processes.

**DDP** (``torch.nn.parallel.DistributedDataParallel``) works as it is on a model with adapters::

    lora_ext.inject_adapter(model, cfg)              # inject / add / load every adapter first
    ddp = DDP(model)                                 # default find_unused_parameters=False
    ... train ddp as usual ...
    lora_ext.save_adapter(ddp, "out/")               # the same file as saving `model`

Only the trainable parameters (the active adapters, ``modules_to_save`` copies, ``bias`` per the
config) are in DDP's buckets, so each step all-reduces exactly their bytes. Per-row training of
several adapters (``lora_ext.adapter_batch``) works too when a rank's batch has no row of some
adapter: every adapter of a layer takes part in the stacked per-row op, so each gets a gradient
(zero for an adapter without rows). What would break a wrapped model is refused with a
``ValueError`` (see ``wrappers.py``): adding adapters to a model DDP/FSDP/tensor parallel
already holds, and ``set_adapter`` / ``delete_adapter`` on a DDP model (DDP fixed its buckets).

:func:`broadcast_adapters` copies rank ``src``'s adapters to every rank (differently seeded ranks,
FSDP2, or adapters added before a later re-wrap). :func:`training_state` / :func:`save_training_state`
/ :func:`load_training_state` checkpoint LoRA training (adapters, optimizer, each rank's RNG) so that
a resumed run continues bitwise as the uninterrupted one.

**FSDP2**: :func:`shard_lora_model` (``fsdp.py``) applies ``fully_shard`` per transformer block, then
to the root; each step then reduce-scatters only the adapters' gradients. ``save_adapter`` on a
sharded model is collective (only the adapter is gathered; rank 0 writes the file one process would
write), ``lora_ext.merge`` / ``unmerge`` work on the sharded weights (``dtensors.py``: local merges
plus one all-gather of the small factor, bit for bit the single-process result), and per-row
batches never serve stale stacked adapters (FSDP2 refills parameters without moving their version
counters). :func:`load_adapter_values` puts a saved adapter's values into the matching adapter of a
model that is already sharded or wrapped.

This module may import the model-level API (``model.py`` and ``adapter_io.py`` import only
``wrappers.py`` and ``dtensors.py``).

Importing this module does not import ``torch.distributed``: it works, and ``is_wrapped`` is
False for every model, where ``torch.distributed.is_available()`` is False.
"""
from __future__ import annotations

import hashlib
import io
import os

import torch
from torch import nn

from . import dtensors
from .adapter_io import adapter_state_dict, read_adapter
from .atomic import atomic_write_bytes, remove_stale_temporaries
from .model import adapter_configs
from .fsdp import shard_lora_model, transformer_blocks
from .wrappers import is_wrapped, unwrap, wrapped_by

__all__ = ["unwrap", "is_wrapped", "wrapped_by", "broadcast_adapters", "training_state", "save_training_state",
           "read_training_state", "load_training_state", "shard_lora_model", "transformer_blocks", "load_adapter_values"]
# Also LoraColwiseParallel, LoraRowwiseParallel and reduce_replicated_grads (tensor_parallel.py, which imports
# torch.distributed.tensor): loaded on first use, so this module imports where torch.distributed is missing.
_TENSOR_PARALLEL = ("LoraColwiseParallel", "LoraRowwiseParallel", "reduce_replicated_grads")


def __getattr__(name: str):
    if name in _TENSOR_PARALLEL:
        from . import tensor_parallel

        return getattr(tensor_parallel, name)
    raise AttributeError(f"module 'lora_ext.distributed' has no attribute {name!r}")

FORMAT = "lora_ext.training_state"
FORMAT_VERSION = 1
_SAFE_TYPES = (str, int, float, bool, type(None), torch.Tensor)


def _dist():
    """``torch.distributed`` when a process group is initialized, else None (imported lazily)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - a torch built without it
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_and_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def _names(model: nn.Module, adapter_names, where: str) -> list[str]:
    configs = adapter_configs(model)
    if adapter_names is None:
        names = list(configs)
    else:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    missing = [n for n in names if n not in configs]
    if missing or not names:
        raise ValueError(f"{where}: expected names of adapters the model has ({list(configs)}), got "
                         f"{missing if missing else names}")
    return names


def broadcast_adapters(model: nn.Module, src: int = 0, adapter_names=None) -> nn.Module:
    """Copy every (or each named) adapter's tensors from rank ``src`` to all ranks, in place:
    lora_A/lora_B, ``modules_to_save`` copies and the biases the config trains (``bias``).

    A collective: every rank of the initialized default process group calls it. Freshly initialised
    adapters differ between ranks whose seeds differ; FSDP2 does not broadcast parameters, and DDP
    broadcasts only when it is built. ``model`` may be wrapped (DDP, ...). The ranks first check that
    they hold the same tensors (names, shapes, dtypes): a mismatch raises the same ``ValueError`` on
    every rank instead of a hang or a silent mix-up."""
    where = "lora_ext.distributed.broadcast_adapters"
    dist = _dist()
    if dist is None:
        raise ValueError(f"{where}: expected an initialized process group (torch.distributed.init_process_group), "
                         "got none")
    model = unwrap(model)
    names = _names(model, adapter_names, where)
    tensors = [(f"{name}:{key}", t) for name in names for key, t in adapter_state_dict(model, name).items()]
    signature = "\n".join(f"{k} {tuple(t.shape)} {t.dtype}" for k, t in tensors)
    digest = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:7], "little")
    device = tensors[0][1].device if tensors and dist.get_backend() != "gloo" else torch.device("cpu")
    check = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(check, op=dist.ReduceOp.MAX)
    if int(check[0]) != digest or int(check[1]) != -digest:
        raise ValueError(f"{where}: expected every rank to hold the same adapter tensors (names, shapes, dtypes), "
                         f"got ranks that differ; this rank ({dist.get_rank()}) has {len(tensors)} tensors of "
                         f"adapters {names}")
    with torch.no_grad():
        for _, t in tensors:
            buf = t if t.is_contiguous() else t.contiguous()
            dist.broadcast(buf, src=src)
            if buf is not t:
                t.copy_(buf)
    return model


_COMPUTE_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias", "modules_to_save")


def load_adapter_values(model: nn.Module, path: str, adapter_name: str = "default", allow_pickle: bool = False,
                        allow_nonfinite: bool = False) -> nn.Module:
    """Copy the adapter saved in ``path`` into the model's existing adapter ``adapter_name``, on a plain,
    DDP, FSDP2 or tensor-parallel model (DTensor parameters: each rank keeps its own shard of the
    file's values; no communication). Every rank reads the file.

    Everything is checked before anything changes, and every problem is listed in one ``ValueError``:
    the file's keys must be exactly the adapter's keys, each shape the (global) shape, the config's
    fields that decide what the adapter computes (r, alpha, rsLoRA, rank/alpha patterns, bias,
    modules_to_save) equal, and the values finite (unless ``allow_nonfinite``). Values are cast to
    the parameters' dtypes. Use it to resume or reset an adapter after the model was wrapped or
    sharded, where ``lora_ext.load_adapter`` (which adds a new adapter) is refused."""
    where = "lora_ext.distributed.load_adapter_values"
    inner = unwrap(model)
    configs = adapter_configs(inner)
    if adapter_name not in configs:
        raise ValueError(f"{where}: expected the name of an adapter the model has ({list(configs)}), got "
                         f"{adapter_name!r}")
    config, tensors = read_adapter(path, allow_pickle=allow_pickle)
    targets = adapter_state_dict(inner, adapter_name)
    problems = []
    have, want = configs[adapter_name].to_dict(), config.to_dict()
    differ = [f for f in _COMPUTE_FIELDS if have.get(f) != want.get(f)]
    if differ:
        problems.append("the config differs in " + ", ".join(f"{f} (model {have.get(f)!r}, file {want.get(f)!r})"
                                                             for f in differ))
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing:
        problems.append(f"{len(missing)} of the adapter's tensors are not in the file: {missing[:5]}")
    if unexpected:
        problems.append(f"the file has {len(unexpected)} tensors the adapter lacks: {unexpected[:5]}")
    for key in sorted(set(targets) & set(tensors)):
        t, value = targets[key], tensors[key]
        if tuple(value.shape) != tuple(t.shape):
            problems.append(f"{key}: expected shape {tuple(t.shape)}, got {tuple(value.shape)}")
        elif not value.is_floating_point():
            problems.append(f"{key}: expected a floating-point tensor, got {value.dtype}")
        elif not allow_nonfinite and not torch.isfinite(value).all():
            problems.append(f"{key}: holds NaN/Inf values (allow_nonfinite=True loads them anyway)")
    if problems:
        raise ValueError(f"{where}: {path!r} does not fit adapter {adapter_name!r}; nothing was changed:\n  "
                         + "\n  ".join(problems))
    with torch.no_grad():
        for key, t in targets.items():
            value = tensors[key].to(t.dtype)
            if dtensors.is_dtensor(t):
                t.to_local().copy_(dtensors.distributed_like(t, value).to_local())
            else:
                t.copy_(value.to(t.device))
    return model


# -- training state ---------------------------------------------------------------------------
def _rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": list(cuda)}


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, adapter_names=None) -> dict:
    """A resumable snapshot of LoRA training in this process: the adapters' tensors (PEFT keys, as
    :func:`lora_ext.adapter_io.adapter_state_dict`, cloned) and configs, ``optimizer.state_dict()``,
    and the RNG state (torch CPU, and every CUDA device when CUDA is available), with a format
    version. Only plain data (dicts, lists, strings, numbers, tensors). The frozen base weights are
    not in it: rebuild the model the same way, then :func:`load_training_state`."""
    where = "lora_ext.distributed.training_state"
    model = unwrap(model)
    configs = adapter_configs(model)
    adapters = {}
    for name in _names(model, adapter_names, where):
        adapters[name] = {"config": configs[name].to_dict(),
                          "tensors": {k: v.detach().clone() for k, v in adapter_state_dict(model, name).items()}}
    return {"format": FORMAT, "version": FORMAT_VERSION, "adapters": adapters,
            "optimizer": optimizer.state_dict(), "rng": _rng_state()}


def _check_plain(obj, path: str, where: str) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where}: expected str or int keys, got {type(k).__name__} key at {path}")
            _check_plain(v, f"{path}[{k!r}]", where)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{path}[{i}]", where)
    elif not isinstance(obj, _SAFE_TYPES):
        raise ValueError(f"{where}: expected only dicts, lists, strings, numbers and tensors (loadable with "
                         f"torch.load(weights_only=True)), got a {type(obj).__name__} at {path}")


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_training_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, adapter_names=None) -> str:
    """Write :func:`training_state` to the file ``path`` atomically (``torch.save`` of plain data
    only, so that it loads with ``torch.load(weights_only=True)``; anything else is refused).

    Under an initialized process group this is a collective: every rank calls it, each rank's RNG
    state is gathered (a resumed run restores each rank's own stream), rank 0 writes the file and
    every rank returns once it is complete (barrier). Returns ``path``."""
    where = "lora_ext.distributed.save_training_state"
    state = training_state(model, optimizer, adapter_names)
    rng = _to_cpu(state.pop("rng"))
    dist = _dist()
    if dist is not None:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, rng)
    else:
        ranks = [rng]
    state["rng_by_rank"] = ranks
    state = _to_cpu(state)
    _check_plain(state, "state", where)
    if dist is None or dist.get_rank() == 0:
        buf = io.BytesIO()
        torch.save(state, buf)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        atomic_write_bytes(path, buf.getvalue())
    if dist is not None:
        dist.barrier()
    return path


def read_training_state(path: str) -> dict:
    """The dict :func:`save_training_state` wrote, read with ``torch.load(weights_only=True)``."""
    where = "lora_ext.distributed.read_training_state"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no training state file at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or tampered zip, or a pickle with objects weights_only refuses
        raise ValueError(f"{where}: {path!r} is not a valid training state file "
                         f"(torch.load(weights_only=True) failed): {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{where}: {path!r}: expected a dict with format {FORMAT!r}, got "
                         f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}")
    return state


def _check_rng(rng, where: str) -> list[str]:
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) \
            or not isinstance(rng.get("cuda"), (list, tuple)):
        return ["rng: expected {'torch': tensor, 'cuda': [tensors]}, got " + repr(type(rng).__name__)]
    problems = []
    if rng["torch"].dtype != torch.uint8 or rng["torch"].shape != torch.get_rng_state().shape:
        problems.append(f"rng: expected a torch RNG state of shape {tuple(torch.get_rng_state().shape)} uint8, "
                        f"got {tuple(rng['torch'].shape)} {rng['torch'].dtype}")
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) != torch.cuda.device_count():
        problems.append(f"rng: expected CUDA RNG states of {torch.cuda.device_count()} devices, "
                        f"got {len(rng['cuda'])}")
    return problems


def _check_optimizer(optimizer, sd, problems: list[str]) -> None:
    if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list) or not isinstance(sd.get("state"), dict):
        problems.append(f"optimizer: expected a state_dict with 'state' and 'param_groups', got {type(sd).__name__}")
        return
    groups, saved = optimizer.param_groups, sd["param_groups"]
    if len(groups) != len(saved):
        problems.append(f"optimizer: expected {len(groups)} param groups, got {len(saved)}")
        return
    params = []
    for i, (g, s) in enumerate(zip(groups, saved)):
        ids = s.get("params") if isinstance(s, dict) else None
        if not isinstance(ids, list) or len(ids) != len(g["params"]):
            problems.append(f"optimizer: param group {i}: expected {len(g['params'])} parameters, "
                            f"got {len(ids) if isinstance(ids, list) else ids!r}")
            return
        params += list(zip(ids, g["params"]))
    by_id = dict(params)
    for pid, st in sd["state"].items():
        if pid not in by_id:
            problems.append(f"optimizer: state for parameter {pid!r}, which no param group lists")
            continue
        for k, v in (st.items() if isinstance(st, dict) else ()):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != by_id[pid].shape:
                problems.append(f"optimizer: state[{pid}][{k!r}]: expected shape {tuple(by_id[pid].shape)}, "
                                f"got {tuple(v.shape)}")


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, state) -> nn.Module:
    """Restore what :func:`training_state` / :func:`save_training_state` captured (``state``: that
    dict, or the file's path) into a model and optimizer built the same way: adapter tensors,
    optimizer state, and this process's RNG state (under a process group, this rank's). Everything
    is checked first (format version, adapter names, configs, keys, shapes, dtypes, param groups,
    RNG, the world size of a saved file); on any problem a ``ValueError`` lists them all and
    nothing is changed."""
    where = "lora_ext.distributed.load_training_state"
    if isinstance(state, (str, os.PathLike)):
        state = read_training_state(os.fspath(state))
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{where}: expected a dict with format {FORMAT!r}, got "
                         f"{type(state).__name__ if not isinstance(state, dict) else state.get('format')!r}")
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"{where}: expected format version {FORMAT_VERSION}, got {state.get('version')!r}")
    model = unwrap(model)
    configs = adapter_configs(model)
    problems: list[str] = []
    copies = []  # (destination, source)
    adapters = state.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        problems.append(f"adapters: expected a non-empty dict, got {adapters!r}")
        adapters = {}
    for name, saved in adapters.items():
        if name not in configs:
            problems.append(f"adapter {name!r}: expected one of the model's adapters {list(configs)}, "
                            "got a name the model does not have")
            continue
        if not isinstance(saved, dict) or not isinstance(saved.get("tensors"), dict):
            problems.append(f"adapter {name!r}: expected {{'config': ..., 'tensors': ...}}, got {type(saved).__name__}")
            continue
        want_cfg = configs[name].to_dict()
        if saved.get("config") != want_cfg:
            got = saved.get("config") if isinstance(saved.get("config"), dict) else {}
            diff = sorted(k for k in set(want_cfg) | set(got) if want_cfg.get(k) != got.get(k))
            problems.append(f"adapter {name!r}: config differs in {diff}: expected "
                            f"{ {k: want_cfg.get(k) for k in diff} }, got { {k: got.get(k) for k in diff} }")
        have = adapter_state_dict(model, name)
        tensors = saved["tensors"]
        for key in sorted(set(have) - set(tensors)):
            problems.append(f"adapter {name!r}: missing key {key}")
        for key in sorted(set(tensors) - set(have)):
            problems.append(f"adapter {name!r}: unexpected key {key}")
        for key in sorted(set(have) & set(tensors)):
            want, got = have[key], tensors[key]
            if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
                what = (f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__)
                problems.append(f"adapter {name!r}: {key}: expected {tuple(want.shape)} {want.dtype}, got {what}")
            else:
                copies.append((want, got))
    _check_optimizer(optimizer, state.get("optimizer"), problems)
    rank, world = _rank_and_world()
    if "rng_by_rank" in state:
        ranks = state["rng_by_rank"]
        if not isinstance(ranks, (list, tuple)) or len(ranks) != world:
            problems.append(f"rng_by_rank: expected the RNG states of {world} rank(s) (the world size), got "
                            f"{len(ranks) if isinstance(ranks, (list, tuple)) else type(ranks).__name__}")
            rng = None
        else:
            rng = ranks[rank]
    else:
        rng = state.get("rng")
    if rng is not None or "rng_by_rank" not in state:
        problems += _check_rng(rng, where)
    if problems:
        raise ValueError(f"{where}: the training state does not fit the model and optimizer; nothing was changed:"
                         "\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for dst, src in copies:
            dst.copy_(src)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return model
