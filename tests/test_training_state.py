"""Resumable LoRA training (issue 13): ``training_state`` / ``save_training_state`` /
``load_training_state`` and ``broadcast_adapters`` in ``lora_ext.distributed``.

The check that matters: 2 AdamW steps, save, a fresh model and optimizer built the same way, load,
2 more steps ends bitwise where 4 uninterrupted steps end (``torch.equal`` on every adapter tensor),
with ``lora_dropout > 0`` so that the RNG restore matters; in one process and under DDP with 2 gloo
ranks (each rank restores its own RNG stream; rank 0 writes, all ranks read). Bad input is refused
before anything changes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lora_ext
from lora_ext import LoraConfig
from lora_ext.distributed import (
    broadcast_adapters,
    load_training_state,
    read_training_state,
    save_training_state,
    training_state,
)
from lora_ext.io.adapter import adapter_state_dict
from lora_ext_dev.dist_harness import timed_world

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

WORLD = 2
D, ROWS, TOKENS = 32, 8, 3
STEPS, SPLIT = 4, 2  # uninterrupted steps; the checkpoint is taken after SPLIT of them
RNG_SEED = 1000  # + rank: the dropout stream


def _build(seed=0):
    """The model and its adapters, the same way every time (``seed`` sets the fresh adapters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 4))
    torch.manual_seed(seed)
    lora_ext.inject_adapter(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["0", "2"],
            lora_dropout=0.25,
            init_lora_weights=False,
            modules_to_save=["4"],
            bias="lora_only",
        ),
    )
    lora_ext.add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["2"], init_lora_weights=False), "other")
    return model.train()


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def _train(model, opt, steps, rows=slice(0, ROWS)):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(ROWS, TOKENS, D, generator=g), torch.randn(ROWS, TOKENS, 4, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()


def _adapters(model):
    inner = lora_ext.distributed.unwrap(model)
    return {
        n: {k: v.clone() for k, v in adapter_state_dict(inner, n).items()}
        for n in lora_ext.model.adapter_configs(inner)
    }


def _equal(a, b):
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a
    )


def _run(path=None, in_memory=False, restore_rng=True, rows=slice(0, ROWS), wrap=lambda m: m, seed=0):
    """Train STEPS steps, or SPLIT + checkpoint + a fresh model and optimizer + the rest."""
    model = wrap(_build(seed))
    opt = _optimizer(model)
    torch.manual_seed(RNG_SEED + (torch.distributed.get_rank() if torch.distributed.is_initialized() else 0))
    if path is None and not in_memory:
        _train(model, opt, range(STEPS), rows)
        return _adapters(model)
    _train(model, opt, range(SPLIT), rows)
    state = training_state(model, opt) if in_memory else save_training_state(path, model, opt)
    model, opt = wrap(_build(seed)), None
    opt = _optimizer(model)
    torch.manual_seed(12345)  # another stream: the checkpoint's must come back
    load_training_state(model, opt, state)
    if not restore_rng:
        torch.manual_seed(12345)
    _train(model, opt, range(SPLIT, STEPS), rows)
    return _adapters(model)


# -- one process ------------------------------------------------------------------------------
def test_save_load_resume_equals_uninterrupted_training(tmp_path):
    reference = _run()
    assert _equal(_run(str(tmp_path / "state.pt")), reference)
    assert _equal(_run(in_memory=True), reference)
    # the RNG restore matters: dropout draws other masks without it
    assert not _equal(_run(in_memory=True, restore_rng=False), reference)


def test_saved_file_is_plain_data_loadable_with_weights_only(tmp_path):
    model = _build()
    opt = _optimizer(model)
    _train(model, opt, range(1))
    path = save_training_state(str(tmp_path / "state.pt"), model, opt, adapter_names=["default"])
    state = torch.load(path, weights_only=True)
    assert state["format"] == "lora_ext.training_state" and state["version"] == 1
    assert list(state["adapters"]) == ["default"] and len(state["rng_by_rank"]) == 1
    assert state["adapters"]["default"]["config"] == lora_ext.model.adapter_configs(model)["default"].to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left


def _state_and_fresh():
    model = _build()
    opt = _optimizer(model)
    _train(model, opt, range(1))
    state = training_state(model, opt)
    fresh = _build(seed=5)
    return state, fresh, _optimizer(fresh)


def _unchanged(model, opt, fn):
    """Run ``fn`` (which must raise ValueError); the model, optimizer and RNG must not change."""
    before, rng = _adapters(model), torch.get_rng_state()
    with pytest.raises(ValueError) as info:
        fn()
    assert _equal(_adapters(model), before) and not opt.state and torch.equal(torch.get_rng_state(), rng)
    return str(info.value)


def test_load_refuses_a_missing_adapter_and_changes_nothing():
    state, fresh, opt = _state_and_fresh()
    state["adapters"]["ghost"] = state["adapters"].pop("other")
    msg = _unchanged(fresh, opt, lambda: load_training_state(fresh, opt, state))
    assert msg.startswith("lora_ext.distributed.load_training_state: the training state does not fit")
    assert (
        "adapter 'ghost': expected one of the model's adapters ['default', 'other'], got a name the model "
        "does not have" in msg
    )


def test_load_refuses_wrong_shapes_dtypes_keys_and_configs():
    state, fresh, opt = _state_and_fresh()
    tensors = state["adapters"]["default"]["tensors"]
    key_a = next(k for k in tensors if k.endswith("0.lora_A.weight"))
    key_b = next(k for k in tensors if k.endswith("2.lora_B.weight"))
    tensors[key_a] = torch.zeros(3, D)
    tensors[key_b] = tensors[key_b].double()
    tensors["base_model.model.9.lora_A.weight"] = torch.zeros(4, D)
    state["adapters"]["other"]["config"]["lora_alpha"] = 99
    msg = _unchanged(fresh, opt, lambda: load_training_state(fresh, opt, state))
    assert f"{key_a}: expected (4, 32) torch.float32, got (3, 32) torch.float32" in msg and D == 32
    assert f"{key_b}: expected ({D}, 4) torch.float32, got ({D}, 4) torch.float64" in msg
    assert "unexpected key base_model.model.9.lora_A.weight" in msg
    assert (
        "adapter 'other': config differs in ['lora_alpha']: expected {'lora_alpha': 4}, got {'lora_alpha': 99}" in msg
    )


def test_load_refuses_an_optimizer_of_another_shape():
    state, fresh, _ = _state_and_fresh()
    params = [p for p in fresh.parameters() if p.requires_grad]
    two_groups = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}])
    msg = _unchanged(fresh, two_groups, lambda: load_training_state(fresh, two_groups, state))
    assert "optimizer: expected 2 param groups, got 1" in msg
    fewer = torch.optim.AdamW(params[1:])
    msg = _unchanged(fresh, fewer, lambda: load_training_state(fresh, fewer, state))
    assert f"optimizer: param group 0: expected {len(params) - 1} parameters, got {len(params)}" in msg


def test_load_refuses_a_file_of_another_world_size_or_version(tmp_path):
    state, fresh, opt = _state_and_fresh()
    rng = state.pop("rng")
    state["rng_by_rank"] = [rng, rng]
    msg = _unchanged(fresh, opt, lambda: load_training_state(fresh, opt, state))
    assert "rng_by_rank: expected the RNG states of 1 rank(s) (the world size), got 2" in msg
    state["version"] = 2
    msg = _unchanged(fresh, opt, lambda: load_training_state(fresh, opt, state))
    assert "load_training_state: expected format version 1, got 2" in msg


class _Payload:  # an object that torch.load(weights_only=True) must refuse to build
    pass


def test_tampered_or_unsafe_files_are_refused(tmp_path):
    model = _build()
    opt = _optimizer(model)
    path = save_training_state(str(tmp_path / "state.pt"), model, opt)
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="read_training_state: .*truncated.pt' is not a valid training state file"):
        read_training_state(str(tmp_path / "truncated.pt"))
    with pytest.raises(ValueError, match="is not a valid training state file"):
        load_training_state(model, opt, str(tmp_path / "truncated.pt"))
    state = torch.load(path, weights_only=True)
    state["payload"] = _Payload()
    torch.save(state, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match=r"is not a valid training state file \(torch.load\(weights_only=True\)"):
        read_training_state(str(tmp_path / "pickle.pt"))
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected a dict with format 'lora_ext.training_state', got 'something else'"):
        read_training_state(str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError, match="read_training_state: no training state file at"):
        read_training_state(str(tmp_path / "missing.pt"))
    # a file re-saved with a tensor of another shape: refused by the checks, nothing changes
    state = torch.load(path, weights_only=True)
    key = next(iter(state["adapters"]["default"]["tensors"]))
    state["adapters"]["default"]["tensors"][key] = torch.zeros(1)
    torch.save(state, tmp_path / "shape.pt")
    fresh = _build()
    fresh_opt = _optimizer(fresh)
    msg = _unchanged(fresh, fresh_opt, lambda: load_training_state(fresh, fresh_opt, str(tmp_path / "shape.pt")))
    assert f"{key}: expected" in msg and "got (1,) torch.float32" in msg


def test_save_refuses_what_weights_only_cannot_load(tmp_path):
    model = _build()
    opt = _optimizer(model)
    opt.param_groups[0]["schedule"] = _Payload()
    with pytest.raises(
        ValueError,
        match=r"save_training_state: expected only dicts, lists, strings, numbers and "
        r"tensors .* got a _Payload at state\['optimizer'\]",
    ):
        save_training_state(str(tmp_path / "state.pt"), model, opt)
    assert not list(tmp_path.iterdir())


def test_unknown_adapter_names_and_no_process_group_are_refused():
    model = _build()
    with pytest.raises(
        ValueError,
        match=r"training_state: expected names of adapters the model has "
        r"\(\['default', 'other'\]\), got \['nope'\]",
    ):
        training_state(model, _optimizer(model), adapter_names=["nope"])
    with pytest.raises(ValueError, match=r"broadcast_adapters: expected an initialized process group"):
        broadcast_adapters(model)


# -- DDP, 2 ranks -----------------------------------------------------------------------------
def _ranks(rank, world_size, tmp):
    out = {}
    # broadcast: differently seeded adapters become rank 0's, on a plain and on a DDP-wrapped model
    model = _build(seed=100 + rank)
    out["before broadcast"] = _adapters(model)
    broadcast_adapters(model)
    out["after broadcast"] = _adapters(model)
    ddp = DDP(model)
    if rank == 1:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    broadcast_adapters(ddp, adapter_names=["other"])
    out["after partial broadcast"] = _adapters(model)
    # resume under DDP, each rank on its half of the batch with its own dropout stream
    rows = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
    out["uninterrupted"] = _run(rows=rows, wrap=DDP)
    out["resumed"] = _run(f"{tmp}/state.pt", rows=rows, wrap=DDP)
    out["file ranks"] = [r["torch"] for r in read_training_state(f"{tmp}/state.pt")["rng_by_rank"]]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return timed_world(_ranks, WORLD, tmp_path_factory, "training-state", timeout=120)


def test_broadcast_adapters_makes_ranks_equal_to_rank_0(world):
    assert not _equal(world[0]["before broadcast"], world[1]["before broadcast"])
    assert _equal(world[0]["after broadcast"], world[0]["before broadcast"])
    assert _equal(world[1]["after broadcast"], world[0]["before broadcast"])
    # through DDP, only the named adapter: 'other' is rank 0's again, 'default' keeps rank 1's change
    r0, r1 = world[0]["after partial broadcast"], world[1]["after partial broadcast"]
    assert _equal({"other": r1["other"]}, {"other": r0["other"]})
    assert all(torch.equal(r1["default"][k], r0["default"][k] + 1) for k in r0["default"])


def test_ddp_resume_equals_uninterrupted_training_on_every_rank(world):
    for rank in range(WORLD):
        assert _equal(world[rank]["resumed"], world[rank]["uninterrupted"]), rank
    assert _equal(world[0]["resumed"], world[1]["resumed"])
    first, second = world[0]["file ranks"], world[1]["file ranks"]
    assert len(first) == WORLD and all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])  # each rank's own stream is in the file
