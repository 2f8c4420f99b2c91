"""DDP training of LoRA adapters (issue 13, first part): 2 gloo ranks on localhost, fp32.

Every mode trains under ``DDP(model)`` (default ``find_unused_parameters=False``), each rank on its
half of the batch, for 3 SGD and 3 AdamW steps, and must end where single-process training on the
concatenated batch (mean loss) ends, within rtol 1e-5 / atol 1e-6 plus AdamW's rounding drift
(``numerics.py``), with both ranks bitwise equal.
Dropout: each rank draws its own masks, so the reference runs the two halves with the two ranks'
seeds. The all-reduced bytes are measured with a comm hook: exactly the trainable bytes every step.
Frozen parameters never get a ``.grad``. One process world serves every check (``_world``).
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import lora_ext
from lora_ext import LoraConfig
from lora_ext_dev.dist_harness import ADAMW_LR, file_hashes, sgd_then_adamw, timed_world, value_error
from models import LLAMA_TARGETS, Block, tiny_llama
from models import BlockNet as Net
from numerics import GradRecorder, assert_close_after_adamw

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

WORLD = 2
D = 64
ROWS, TOKENS, SEQ = 8, 3, 7  # the concatenated batch: 8 rows, 4 per rank
SGD_STEPS, ADAMW_STEPS = 3, 3
DROPOUT_SEED = 1000  # + rank
LORA = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
LORA_B = dict(r=2, lora_alpha=4, target_modules=["fc2"], init_lora_weights=False)
# adapter_batch: rank 0 gets rows of a, b and the base; rank 1 only rows of b (no row of a anywhere)
BATCH_NAMES = ["a", "b", "__base__", "a", "b", "b", "b", "b"]


def _net(*adapters, active=None):
    torch.manual_seed(0)
    model = Net()
    for i, (name, cfg) in enumerate(adapters):
        (lora_ext.inject_adapter if i == 0 else lora_ext.add_adapter)(model, LoraConfig(**cfg), name)
    if active is not None:
        lora_ext.set_adapter(model, active)
    return model.train()


def _llama():
    model = tiny_llama()
    lora_ext.inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    return model.train()


MODES = {
    "lora": lambda: _net(("default", LORA)),
    "modules_to_save+lora_only": lambda: _net(("default", dict(LORA, modules_to_save=["head"], bias="lora_only"))),
    "several adapters": lambda: _net(("a", LORA), ("b", LORA_B), ("c", dict(LORA, r=3, modules_to_save=["head"]))),
    "adapter_batch": lambda: _net(("a", LORA), ("b", LORA_B), active=["a", "b"]),
    "llama": _llama,
    "no_sync": lambda: _net(("default", LORA)),
    "dropout": lambda: _net(("default", dict(LORA, lora_dropout=0.25))),
}


def _batches(mode):
    """One batch per step, the same on every rank (each takes its rows)."""
    g = torch.Generator().manual_seed(7)
    steps = SGD_STEPS + ADAMW_STEPS
    if mode == "llama":
        return [torch.randint(0, 128, (ROWS, SEQ), generator=g) for _ in range(steps)]
    return [
        (torch.randn(ROWS, TOKENS, D, generator=g), torch.randn(ROWS, TOKENS, 4, generator=g)) for _ in range(steps)
    ]


def _loss(mode, model, batch, rows):
    if mode == "llama":
        return model(input_ids=batch[rows], labels=batch[rows]).loss
    x, y = batch[0][rows], batch[1][rows]
    if mode == "adapter_batch":
        with lora_ext.adapter_batch(model, BATCH_NAMES[rows]):
            return nn.functional.mse_loss(model(x), y)
    return nn.functional.mse_loss(model(x), y)


def _optimizer(step, params, opt):
    return sgd_then_adamw(step, params, opt, SGD_STEPS)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _nbytes(params):
    return sum(p.numel() * p.element_size() for p in params)


# -- the ranks ----------------------------------------------------------------------------------
def _count_and_allreduce(state, bucket):
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return allreduce_hook(None, bucket)


def _train_ddp(rank, mode):
    model = MODES[mode]()
    ddp = DDP(model)
    comm = {"bytes": 0}
    ddp.register_comm_hook(comm, _count_and_allreduce)
    params = [p for p in ddp.parameters() if p.requires_grad]
    per = ROWS // WORLD
    rows = slice(rank * per, (rank + 1) * per)
    if mode == "dropout":
        torch.manual_seed(DROPOUT_SEED + rank)
    opt, bytes_per_step = None, []
    for step, batch in enumerate(_batches(mode)):
        opt = _optimizer(step, params, opt)
        opt.zero_grad()
        before = comm["bytes"]
        if mode == "no_sync":  # two micro-batches, gradients accumulated locally, one all-reduce
            half = per // 2
            with ddp.no_sync():
                (_loss(mode, ddp, batch, slice(rows.start, rows.start + half)) / 2).backward()
            (_loss(mode, ddp, batch, slice(rows.start + half, rows.stop)) / 2).backward()
        else:
            _loss(mode, ddp, batch, rows).backward()
        bytes_per_step.append(comm["bytes"] - before)
        opt.step()
    named = list(model.named_parameters())
    return dict(
        trained=_trainable(model),
        bytes_per_step=bytes_per_step,
        trainable_bytes=_nbytes(p for _, p in named if p.requires_grad),
        total_bytes=_nbytes(p for _, p in named),
        frozen_with_grad=[n for n, p in named if not p.requires_grad and p.grad is not None],
        trainable_without_grad=[n for n, p in named if p.requires_grad and p.grad is None],
    )


def _dropout_outputs(rank):
    model = MODES["dropout"]()
    reference = copy.deepcopy(model)
    ddp = DDP(model)
    x = _batches("dropout")[0][0]  # the same input on every rank
    with torch.no_grad():
        torch.manual_seed(DROPOUT_SEED + rank)
        y = ddp(x)
        torch.manual_seed(DROPOUT_SEED + rank)
        y_ref = reference(x)
        y_eval = ddp.eval()(x)
    return dict(y=y, y_ref=y_ref, y_eval=y_eval)


def _state(model):
    return list(lora_ext.model.adapter_configs(model)), sorted(_trainable(model)), repr(model)


def _guards(rank, tmp):
    out = {}
    tmp = os.path.join(tmp, f"rank{rank}")
    model = MODES["several adapters"]()
    lora_ext.save_adapter(model, os.path.join(tmp, "plain"), "a")
    lora_ext.save_adapter(model, os.path.join(tmp, "plain"), "c")  # modules_to_save, in plain/c
    before = _state(model)
    ddp = DDP(model)
    calls = {
        "set_adapter": lambda: lora_ext.set_adapter(ddp, "b"),
        "delete_adapter": lambda: lora_ext.delete_adapter(ddp, "b"),
        "merge_and_unload": lambda: lora_ext.merge_and_unload(ddp),
        "unload": lambda: lora_ext.unload(ddp),
        "inject_adapter": lambda: lora_ext.inject_adapter(ddp, LoraConfig(**LORA_B), "new"),
        "add_adapter": lambda: lora_ext.add_adapter(ddp, LoraConfig(**LORA_B), "new"),
        "load_adapter": lambda: lora_ext.load_adapter(ddp, os.path.join(tmp, "plain", "a"), "new"),
        "add_weighted_adapter": lambda: lora_ext.add_weighted_adapter(ddp, ["a"], [1.0], "new"),
        "inject into a model holding DDP": lambda: lora_ext.inject_adapter(
            nn.ModuleDict({"ddp": ddp}), LoraConfig(**LORA_B), "new"
        ),
    }
    out["errors"] = {k: value_error(f) for k, f in calls.items()}
    out["unchanged"] = before == _state(model)
    for name, wrapped in (("ddp", ddp), ("ddp(compile)", DDP(torch.compile(model)))):
        lora_ext.save_adapter(wrapped, os.path.join(tmp, name), "a")
        lora_ext.save_adapter(wrapped, os.path.join(tmp, name), "c")
    out["files"] = {k: file_hashes(os.path.join(tmp, k)) for k in ("plain", "ddp", "ddp(compile)")}
    # FSDP2 and tensor parallel hold their parameters as DTensors
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    sharded = MODES["lora"]()
    fully_shard(sharded, mesh=mesh)
    out["errors"]["fully_shard"] = value_error(lambda: lora_ext.add_adapter(sharded, LoraConfig(**LORA_B), "new"))
    tp = Net()
    tp.head.weight = nn.Parameter(distribute_tensor(tp.head.weight.detach(), mesh, [Replicate()]))
    out["errors"]["DTensor parameter"] = value_error(lambda: lora_ext.inject_adapter(tp, LoraConfig(**LORA)))
    # FSDP1, with nested units (LoRA mixes frozen and trainable parameters: use_orig_params=True)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    lora_ext.save_adapter(MODES["modules_to_save+lora_only"](), os.path.join(tmp, "plain lora_only"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's note that some parameters are frozen
        fsdp1 = FSDP(
            MODES["modules_to_save+lora_only"](),
            device_id=torch.device("cpu"),
            use_orig_params=True,
            auto_wrap_policy=ModuleWrapPolicy({Block}),
        )
    out["errors"]["FSDP1"] = value_error(lambda: lora_ext.add_adapter(fsdp1, LoraConfig(**LORA_B), "new"))
    with FSDP.summon_full_params(fsdp1, writeback=False):
        lora_ext.save_adapter(fsdp1, os.path.join(tmp, "fsdp1"))
    out["files"] |= {k: file_hashes(os.path.join(tmp, k)) for k in ("plain lora_only", "fsdp1")}
    out["is_wrapped"] = [lora_ext.distributed.is_wrapped(m) for m in (model, ddp, sharded, tp, fsdp1)]
    return out


def _world(rank, world_size, tmp):
    assert world_size == WORLD
    out = {mode: _train_ddp(rank, mode) for mode in MODES}
    out["dropout outputs"] = _dropout_outputs(rank)
    out["guards"] = _guards(rank, tmp)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return timed_world(_world, WORLD, tmp_path_factory, "ddp", timeout=150)


# -- the single-process reference ---------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _reference(mode):
    """Single-process training on the concatenated batch; with dropout, each half runs with its
    rank's RNG stream (the masks are per rank)."""
    model = MODES[mode]()
    params = [p for p in model.parameters() if p.requires_grad]
    streams = []
    for rank in range(WORLD):
        torch.manual_seed(DROPOUT_SEED + rank)
        streams.append(torch.get_rng_state())
    per, opt, adamw_grads = ROWS // WORLD, None, GradRecorder()
    for step, batch in enumerate(_batches(mode)):
        opt = _optimizer(step, params, opt)
        opt.zero_grad()
        if mode == "dropout":
            losses = []
            for rank in range(WORLD):
                torch.set_rng_state(streams[rank])
                losses.append(_loss(mode, model, batch, slice(rank * per, (rank + 1) * per)))
                streams[rank] = torch.get_rng_state()
            loss = sum(losses) / WORLD
        else:
            loss = _loss(mode, model, batch, slice(0, ROWS))
        loss.backward()
        if step >= SGD_STEPS:
            adamw_grads.record(model)
        opt.step()
    return _trainable(model), _nbytes(params), _nbytes(model.parameters()), adamw_grads.grads


@pytest.mark.parametrize("mode", list(MODES))
def test_ddp_training_matches_single_process_training(world, mode):
    want, _, _, adamw_grads = _reference(mode)
    initial = _trainable(MODES[mode]())
    for rank in range(WORLD):
        got = world[rank][mode]["trained"]
        assert got.keys() == want.keys(), (rank, got.keys() ^ want.keys())
        for name in want:
            # AdamW may move an element whose gradient sat within rounding noise by ~lr in one run only
            assert_close_after_adamw(got[name], want[name], adamw_grads[name], ADAMW_LR, name)
            assert not torch.equal(got[name], initial[name]), f"{name} did not train"
    for name in want:  # DDP keeps the replicas identical
        assert torch.equal(world[0][mode]["trained"][name], world[1][mode]["trained"][name]), name


@pytest.mark.parametrize("mode", list(MODES))
def test_allreduced_bytes_are_the_trainable_bytes(world, mode):
    _, trainable_bytes, total_bytes, _ = _reference(mode)
    for rank in range(WORLD):
        r = world[rank][mode]
        assert (r["trainable_bytes"], r["total_bytes"]) == (trainable_bytes, total_bytes)
        assert r["bytes_per_step"] == [trainable_bytes] * (SGD_STEPS + ADAMW_STEPS), (rank, trainable_bytes)
    assert trainable_bytes < total_bytes / 4
    print(f"\n{mode}: all-reduced {trainable_bytes} B per step = trainable {trainable_bytes} B; total {total_bytes} B")


def test_frozen_parameters_get_no_grad_on_any_rank(world):
    for rank in range(WORLD):
        for mode in MODES:
            assert world[rank][mode]["frozen_with_grad"] == [], (rank, mode)
            assert world[rank][mode]["trainable_without_grad"] == [], (rank, mode)


def test_dropout_masks_differ_between_ranks_and_match_a_seeded_reference(world):
    outs = [world[rank]["dropout outputs"] for rank in range(WORLD)]
    for rank, o in enumerate(outs):
        assert torch.equal(o["y"], o["y_ref"]), rank  # DDP consumes no RNG: the same masks as the plain model
        assert not torch.allclose(o["y"], o["y_eval"]), rank  # dropout is on
    torch.testing.assert_close(outs[0]["y_eval"], outs[1]["y_eval"], rtol=0, atol=0)
    assert not torch.allclose(outs[0]["y"], outs[1]["y"])  # same input, different masks


def test_ddp_guards_refuse_what_would_break_the_buckets(world):
    """Each refused call raised a ValueError (``value_error`` returned its message; None: no error)."""
    for rank in range(WORLD):
        g = world[rank]["guards"]
        e = g["errors"]
        for call in ("set_adapter", "delete_adapter", "merge_and_unload", "unload"):
            assert e[call] is not None and e[call].startswith(f"lora_ext.{call}: "), (rank, call, e[call])
            assert "DDP fixed its gradient buckets" in e[call] and "adapter_batch" in e[call], e[call]
        for call in ("inject_adapter", "add_adapter", "load_adapter", "add_weighted_adapter"):
            assert e[call] is not None and e[call].startswith(
                f"lora_ext.{call}: inject adapters before fully_shard/DDP"
            ), (rank, call, e[call])
            assert "DistributedDataParallel at '<root>'" in e[call], e[call]
        assert "DistributedDataParallel at 'ddp'" in e["inject into a model holding DDP"]
        assert "FSDP2 (fully_shard) at '<root>'" in e["fully_shard"] and "DTensor parameters" in e["fully_shard"]
        assert "DTensor parameters ('head.weight')" in e["DTensor parameter"], e["DTensor parameter"]
        assert "FSDP (FullyShardedDataParallel) at '<root>'" in e["FSDP1"], e["FSDP1"]
        assert g["unchanged"], rank
        assert g["is_wrapped"] == [False, True, True, True, True]


def test_save_of_a_ddp_compiled_or_fsdp1_model_is_byte_identical(world):
    for rank in range(WORLD):
        files = world[rank]["guards"]["files"]
        assert len(files["plain"]) == 4, files["plain"]  # config + weights of a, and of c
        assert files["ddp"] == files["plain"] and files["ddp(compile)"] == files["plain"], rank
        assert len(files["plain lora_only"]) == 2 and files["fsdp1"] == files["plain lora_only"], rank
    assert world[0]["guards"]["files"] == world[1]["guards"]["files"]  # saves are reproducible


def test_save_through_checkpoint_and_compile_wrappers_is_byte_identical(tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = MODES["modules_to_save+lora_only"]()
    lora_ext.save_adapter(model, str(tmp_path / "plain"))
    wrapped = copy.deepcopy(model)
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, Block))
    compiled_blocks = copy.deepcopy(model)
    compiled_blocks.blocks[1] = torch.compile(compiled_blocks.blocks[1])
    cases = {"checkpointed blocks": wrapped, "compiled": torch.compile(wrapped), "compiled block": compiled_blocks}
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    for name, m in cases.items():
        lora_ext.save_adapter(m, str(tmp_path / name))
        assert file_hashes(tmp_path / name) == file_hashes(tmp_path / "plain"), name
    keys = load_file(str(tmp_path / "plain" / "adapter_model.safetensors")).keys()
    assert "base_model.model.blocks.0.fc1.lora_A.weight" in keys and "base_model.model.head.weight" in keys
    # the model-level API looks through a torch.compile wrapper: the state lives on the model inside
    torch.manual_seed(0)
    inner = Net()
    compiled = torch.compile(inner)
    assert lora_ext.inject_adapter(compiled, LoraConfig(**LORA)) is compiled
    assert list(lora_ext.model.adapter_configs(inner)) == ["default"] and "lora_ext_configs" not in vars(compiled)
    lora_ext.save_adapter(compiled, str(tmp_path / "compiled model"))
    lora_ext.save_adapter(inner, str(tmp_path / "inner model"))
    assert file_hashes(tmp_path / "compiled model") == file_hashes(tmp_path / "inner model")
    assert lora_ext.merge_and_unload(compiled) is compiled and not lora_ext.model.adapter_configs(inner)
    assert not any(isinstance(m, lora_ext.LoraLayer) for m in inner.modules())


def test_distributed_module_imports_without_torch_distributed():
    """With torch.distributed unavailable (its submodules blocked), lora_ext.distributed imports and
    the model-level API still works."""
    code = """
import sys, torch
torch.distributed.is_available = lambda: False
for name in ("torch.distributed.fsdp", "torch.distributed.tensor", "torch.distributed.algorithms",
             "torch.distributed.device_mesh", "torch._dynamo"):
    sys.modules[name] = None  # any import of them raises ImportError
import lora_ext, lora_ext.distributed
from lora_ext import LoraConfig
m = torch.nn.Sequential(torch.nn.Linear(8, 8))
lora_ext.inject_adapter(m, LoraConfig(r=2, target_modules=["0"]))
lora_ext.set_adapter(m, "default")
assert not lora_ext.distributed.is_wrapped(m) and lora_ext.distributed.unwrap(m) is m
print("ok")
"""
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
