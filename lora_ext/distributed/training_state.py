"""Resumable LoRA training checkpoints (``lora_ext.distributed.training_state`` and friends): the
adapters, the optimizer state and each rank's RNG stream, as plain data that ``torch.load(weights_only=True)``
reads. See ``lora_ext/distributed/__init__.py`` for the distributed story these belong to."""

from __future__ import annotations

import io
import os

import torch
from torch import nn

from .._utils import dtensors
from .._utils.wrappers import unwrap
from ..io.adapter import adapter_state_dict
from ..io.atomic import atomic_write_bytes, remove_stale_temporaries
from ..model.core import adapter_configs

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
        raise ValueError(
            f"{where}: expected names of adapters the model has ({list(configs)}), got {missing if missing else names}"
        )
    return names


# -- training state ---------------------------------------------------------------------------
def _rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": list(cuda)}


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, adapter_names=None) -> dict:
    """A resumable snapshot of LoRA training in this process: the adapters' tensors (PEFT keys, as
    :func:`lora_ext.io.adapter.adapter_state_dict`, cloned) and configs, ``optimizer.state_dict()``,
    and the RNG state (torch CPU, and every CUDA device when CUDA is available), with a format
    version. Only plain data (dicts, lists, strings, numbers, tensors). The frozen base weights are
    not in it: rebuild the model the same way, then :func:`load_training_state`. With DTensor
    adapters (FSDP2, tensor parallel) it is a collective: adapters and optimizer state are gathered
    into full tensors (a resumed run may shard them again, over any world size)."""
    where = "lora_ext.distributed.training_state"
    model = unwrap(model)
    configs = adapter_configs(model)
    adapters = {}
    for name in _names(model, adapter_names, where):
        adapters[name] = {
            "config": configs[name].to_dict(),
            "tensors": {k: v.detach().clone() for k, v in dtensors.gathered(adapter_state_dict(model, name)).items()},
        }
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "adapters": adapters,
        "optimizer": dtensors.full_tensors(optimizer.state_dict()),
        "rng": _rng_state(),
    }


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
        raise ValueError(
            f"{where}: expected only dicts, lists, strings, numbers and tensors (loadable with "
            f"torch.load(weights_only=True)), got a {type(obj).__name__} at {path}"
        )


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
        raise ValueError(
            f"{where}: {path!r} is not a valid training state file (torch.load(weights_only=True) failed): {e}"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{where}: {path!r}: expected a dict with format {FORMAT!r}, got "
            f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}"
        )
    return state


def _check_rng(rng, where: str) -> list[str]:
    if (
        not isinstance(rng, dict)
        or not isinstance(rng.get("torch"), torch.Tensor)
        or not isinstance(rng.get("cuda"), (list, tuple))
    ):
        return ["rng: expected {'torch': tensor, 'cuda': [tensors]}, got " + repr(type(rng).__name__)]
    problems = []
    if rng["torch"].dtype != torch.uint8 or rng["torch"].shape != torch.get_rng_state().shape:
        problems.append(
            f"rng: expected a torch RNG state of shape {tuple(torch.get_rng_state().shape)} uint8, "
            f"got {tuple(rng['torch'].shape)} {rng['torch'].dtype}"
        )
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) != torch.cuda.device_count():
        problems.append(f"rng: expected CUDA RNG states of {torch.cuda.device_count()} devices, got {len(rng['cuda'])}")
    return problems


def _check_optimizer(optimizer, sd, problems: list[str]) -> None:
    if (
        not isinstance(sd, dict)
        or not isinstance(sd.get("param_groups"), list)
        or not isinstance(sd.get("state"), dict)
    ):
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
            problems.append(
                f"optimizer: param group {i}: expected {len(g['params'])} parameters, "
                f"got {len(ids) if isinstance(ids, list) else ids!r}"
            )
            return
        params += list(zip(ids, g["params"]))
    by_id = dict(params)
    for pid, st in sd["state"].items():
        if pid not in by_id:
            problems.append(f"optimizer: state for parameter {pid!r}, which no param group lists")
            continue
        for k, v in st.items() if isinstance(st, dict) else ():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != by_id[pid].shape:
                problems.append(
                    f"optimizer: state[{pid}][{k!r}]: expected shape {tuple(by_id[pid].shape)}, got {tuple(v.shape)}"
                )


def _sharded_like_params(optimizer, sd: dict) -> dict:
    """``sd`` with each full state tensor of a DTensor parameter (exp_avg, ...) laid out like it."""
    params = {}
    for g, s in zip(optimizer.param_groups, sd["param_groups"]):
        params.update(zip(s["params"], g["params"]))
    state = {}
    for pid, st in sd["state"].items():
        p = params[pid]
        state[pid] = {
            k: (
                dtensors.distributed_like(p, v)
                if isinstance(v, torch.Tensor) and dtensors.is_dtensor(p) and v.dim() > 0 and v.shape == p.shape
                else v
            )
            for k, v in st.items()
        }
    return {**sd, "state": state}


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
        raise ValueError(
            f"{where}: expected a dict with format {FORMAT!r}, got "
            f"{type(state).__name__ if not isinstance(state, dict) else state.get('format')!r}"
        )
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
            problems.append(
                f"adapter {name!r}: expected one of the model's adapters {list(configs)}, "
                "got a name the model does not have"
            )
            continue
        if not isinstance(saved, dict) or not isinstance(saved.get("tensors"), dict):
            problems.append(f"adapter {name!r}: expected {{'config': ..., 'tensors': ...}}, got {type(saved).__name__}")
            continue
        want_cfg = configs[name].to_dict()
        if saved.get("config") != want_cfg:
            got = saved.get("config") if isinstance(saved.get("config"), dict) else {}
            diff = sorted(k for k in set(want_cfg) | set(got) if want_cfg.get(k) != got.get(k))
            problems.append(
                f"adapter {name!r}: config differs in {diff}: expected "
                f"{ {k: want_cfg.get(k) for k in diff} }, got { {k: got.get(k) for k in diff} }"
            )
        have = adapter_state_dict(model, name)
        tensors = saved["tensors"]
        for key in sorted(set(have) - set(tensors)):
            problems.append(f"adapter {name!r}: missing key {key}")
        for key in sorted(set(tensors) - set(have)):
            problems.append(f"adapter {name!r}: unexpected key {key}")
        for key in sorted(set(have) & set(tensors)):
            want, got = have[key], tensors[key]
            if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
                what = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__
                problems.append(f"adapter {name!r}: {key}: expected {tuple(want.shape)} {want.dtype}, got {what}")
            else:
                copies.append((want, got))
    _check_optimizer(optimizer, state.get("optimizer"), problems)
    rank, world = _rank_and_world()
    if "rng_by_rank" in state:
        ranks = state["rng_by_rank"]
        if not isinstance(ranks, (list, tuple)) or len(ranks) != world:
            problems.append(
                f"rng_by_rank: expected the RNG states of {world} rank(s) (the world size), got "
                f"{len(ranks) if isinstance(ranks, (list, tuple)) else type(ranks).__name__}"
            )
            rng = None
        else:
            rng = ranks[rank]
    else:
        rng = state.get("rng")
    if rng is not None or "rng_by_rank" not in state:
        problems += _check_rng(rng, where)
    if problems:
        raise ValueError(
            f"{where}: the training state does not fit the model and optimizer; nothing was changed:"
            "\n  " + "\n  ".join(problems)
        )
    with torch.no_grad():
        for dst, src in copies:  # a DTensor keeps its own shard of the full value
            dst_local = dst.to_local() if dtensors.is_dtensor(dst) else dst
            dst_local.copy_(dtensors.distributed_like(dst, src).to_local() if dtensors.is_dtensor(dst) else src)
    optimizer.load_state_dict(_sharded_like_params(optimizer, state["optimizer"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return model
