"""Tensor parallel LoRA (issue 13): ``LoraColwiseParallel`` / ``LoraRowwiseParallel`` on gloo ranks, fp32.

A small model (2 blocks of attention-like q/k/v (colwise) + o (rowwise), an MLP up (colwise) + down
(rowwise), d=64, hidden 100, r=4, random B) is trained under tensor parallel, every rank on the same
batch, for 3 SGD and 3 AdamW steps, and must end where single-process training ends (rtol 1e-5 /
atol 1e-6 plus AdamW's rounding drift, ``numerics.py``; the forward outputs before training too, and
at every SGD step). World 2, and
world 3 where no split divides (64 and 100 % 3 != 0) with rank-1 adapters.
Collectives are counted with a dispatch mode below DTensor (every c10d op): the LoRA branch adds none
to the forward and none to the backward beyond the base layer's own, and ``reduce_replicated_grads``
all-reduces r*in (colwise) / out*r (rowwise) elements per layer. One process world per world size.
"""

from __future__ import annotations

import functools
import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_ext
from lora_ext import LoraConfig
from lora_ext_dev.dist_harness import file_hashes, timed_world
from numerics import GradRecorder, assert_close_after_adamw

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

D, HIDDEN, R = 64, 100, 4
ROWS, SEQ = 4, 5
N = ROWS * SEQ  # rows of x as the op sees them
SGD_STEPS, ADAMW_STEPS = 3, 3
ADAMW_LR = 1e-3
DROPOUT_SEED = 1234
COLWISE, ROWWISE = ("q", "k", "v", "up"), ("o", "down")
LORA = dict(r=R, lora_alpha=R, target_modules=list(COLWISE + ROWWISE), init_lora_weights=False)
LATER = dict(r=2, lora_alpha=2, target_modules=list(COLWISE + ROWWISE), init_lora_weights=False)
MODES = {  # name -> (world sizes, config)
    "lora": ((2,), LORA),
    "bias lora_only": ((2,), dict(LORA, bias="lora_only")),
    "colwise dropout": ((2,), dict(LORA, target_modules=list(COLWISE), lora_dropout=0.25)),
    "added later": ((2,), LORA),  # trains adapter "later", added after parallelize_module
    "uneven, rank 1": ((3,), dict(LORA, rank_pattern={"o": 1, "up": 1}, alpha_pattern={"o": 1, "up": 1})),
}


class Attention(nn.Module):
    """Attention per feature channel: every op is local to a column shard, so the model runs the same
    on local shards (any split) as on whole tensors."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        # [rows, t, s, features]; tanh: k's bias must matter (softmax over s ignores a shift of q * k by q * b_k)
        p = torch.softmax(q.unsqueeze(2) * torch.tanh(k).unsqueeze(1), dim=2)
        return self.o((p * v.unsqueeze(1)).sum(2))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = Attention(), MLP()

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _net(config=None):
    torch.manual_seed(0)
    model = Net()
    if config is not None:
        lora_ext.inject_adapter(model, LoraConfig(**config))
    return model.train()


def _add_later(model):
    lora_ext.add_adapter(model, LoraConfig(**LATER), "later")
    lora_ext.set_adapter(model, "later")


def _plan(lora: bool) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from lora_ext.distributed.tensor_parallel import LoraColwiseParallel, LoraRowwiseParallel

    # torch's RowwiseParallel takes a local input as an even shard (in % k == 0): with torch's styles the
    # colwise outputs stay DTensors (their ops run on DTensors, without communication)
    col, row = (
        (LoraColwiseParallel(), LoraRowwiseParallel())
        if lora
        else (ColwiseParallel(use_local_output=False), RowwiseParallel())
    )
    where = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "up": "mlp", "down": "mlp"}
    return {f"blocks.*.{where[n]}.{n}": (col if n in COLWISE else row) for n in COLWISE + ROWWISE}


def _batches():
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(ROWS, SEQ, D, generator=g), torch.randn(ROWS, SEQ, D, generator=g))
        for _ in range(SGD_STEPS + ADAMW_STEPS)
    ]


def _optimizer(step, params, opt):
    if step == 0:
        return torch.optim.SGD(params, lr=0.02)
    if step == SGD_STEPS:
        return torch.optim.AdamW(params, lr=ADAMW_LR)  # torch's default
    return opt


def _whole(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()


def _trainable(model):
    return {n: _whole(p) for n, p in model.named_parameters() if p.requires_grad}


class Collectives(TorchDispatchMode):
    """Every c10d collective run under it, as ``(name, elements)``: DTensor turns its redistributions
    into functional collectives below its own dispatch, where this mode sees them."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run first; its collectives come back here
        if func.namespace in ("_c10d_functional", "c10d_functional", "c10d") and not func.__name__.startswith(
            ("wait", "_wrap")
        ):
            first = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]
            self.log.append((func.__name__.split(".")[0].strip("_"), first.numel()))
        return func(*args, **(kwargs or {}))

    def take(self):
        out, self.log = self.log, []
        return out


# -- the ranks ----------------------------------------------------------------------------------
def _train(mode, mesh):
    """Train under tensor parallel; collectives of the first step, by phase."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_ext.distributed.tensor_parallel import reduce_replicated_grads

    model = parallelize_module(_net(MODES[mode][1]), mesh, _plan(lora=True))
    if mode == "added later":
        _add_later(model)
    params = [p for p in model.parameters() if p.requires_grad]
    placements = {n: p.placements for n, p in model.named_parameters() if isinstance(p, DTensor)}
    torch.manual_seed(DROPOUT_SEED)  # the same on every rank: colwise dropout masks must agree
    comm, phases, outputs, opt = Collectives(), {}, [], None
    for step, (x, y) in enumerate(_batches()):
        opt = _optimizer(step, params, opt)
        opt.zero_grad()
        with comm:
            out = model(x)
            phases.setdefault("forward", comm.take())
            nn.functional.mse_loss(out, y).backward()
            phases.setdefault("backward", comm.take())
            reduced = reduce_replicated_grads(model)
            phases.setdefault("reduce", comm.take())
            opt.step()
            phases.setdefault("step", comm.take())
        outputs.append(out.detach())
    named = list(model.named_parameters())
    return dict(
        trained=_trainable(model),
        outputs=outputs,
        phases=phases,
        reduced=reduced,
        kept_placements={n: p.placements for n, p in named if isinstance(p, DTensor)} == placements,
        placements={n: tuple(map(repr, p.placements)) for n, p in named if isinstance(p, DTensor)},
        frozen_with_grad=[n for n, p in named if not p.requires_grad and p.grad is not None],
        trainable_without_grad=[n for n, p in named if p.requires_grad and p.grad is None],
        local_shapes={n: tuple(p.to_local().shape) for n, p in named if isinstance(p, DTensor)},
        model=model,
    )


def _save_and_merge(model, folder):
    """A collective save, then merges into the tensor-parallel weights: exact (and its unmerge), then plain."""
    from torch.distributed.tensor import DTensor

    files = file_hashes(lora_ext.save_adapter(model, folder))
    base = {n: p for n, p in model.named_parameters() if n.endswith("base_layer.weight") and isinstance(p, DTensor)}
    local = {n: p.to_local().clone() for n, p in base.items()}
    out = dict(files=files, base={n: _whole(p) for n, p in base.items()})
    lora_ext.merge(model, exact=True)
    out["exact_merged"] = {n: _whole(p) for n, p in base.items()}
    lora_ext.unmerge(model)
    out["restored"] = all(torch.equal(p.to_local(), local[n]) for n, p in base.items())
    lora_ext.merge(model)
    out["merged"] = {n: _whole(p) for n, p in base.items()}
    lora_ext.unmerge(model)
    return out


def _plain_tp_phases(mesh):
    """The same model without LoRA under torch's own ColwiseParallel/RowwiseParallel: the base's collectives."""
    from torch.distributed.tensor.parallel import parallelize_module

    model = parallelize_module(_net(), mesh, _plan(lora=False))
    for name, p in model.named_parameters():  # as LoRA's A and B: something to train in every layer
        p.requires_grad_(name.endswith("bias"))
    x, y = _batches()[0]
    comm = Collectives()
    with comm:
        out = model(x)
        fwd = comm.take()
        nn.functional.mse_loss(out, y).backward()
        return dict(forward=fwd, backward=comm.take())


def _layer_comms(mesh):
    """Collectives of one layer (input requiring grad, as inside a network) under LoRA's styles and,
    for the plain nn.Linear, under torch's; and of optimizer steps on gradients left Partial."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lora_ext.distributed.tensor_parallel import LoraColwiseParallel, LoraRowwiseParallel, reduce_replicated_grads

    out, comm = {}, Collectives()
    k, rank = mesh.size(), mesh.get_local_rank()
    for kind, lora_style, torch_style in (
        ("colwise", LoraColwiseParallel, ColwiseParallel),
        ("rowwise", LoraRowwiseParallel, RowwiseParallel),
    ):
        for lora in (False, True):
            torch.manual_seed(0)
            layer = nn.Linear(D, HIDDEN)
            if lora:
                layer = lora_ext.LoraLinear(layer, r=R, init_lora_weights=False)
            layer = parallelize_module(layer, mesh, (lora_style if lora else torch_style)())
            x = torch.randn(ROWS, SEQ, D)
            if kind == "rowwise":
                x = x.chunk(k, dim=-1)[rank]
            x.requires_grad_()
            with comm:
                y = layer(x)
                fwd = comm.take()
                (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
                bwd = comm.take()
                reduced = reduce_replicated_grads(layer)
                red = comm.take()
            out[kind, lora] = dict(forward=fwd, backward=bwd, reduce=red, reduced=reduced)
            if lora:  # optimizer steps on the Partial gradient: DTensor reduces it at every use
                layer.zero_grad()
                for name, make in (
                    ("SGD", lambda p: torch.optim.SGD(p, lr=0.1)),
                    ("AdamW", lambda p: torch.optim.AdamW(p, lr=0.01)),
                ):
                    y = layer(x)
                    (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
                    opt = make([p for p in layer.parameters() if p.requires_grad])
                    with comm:
                        opt.step()
                    out[kind, name] = comm.take()
                    layer.zero_grad()
    # output options as torch's: a colwise layer that hands back the whole output as a DTensor
    torch.manual_seed(0)
    layer = lora_ext.LoraLinear(nn.Linear(D, HIDDEN), r=R, init_lora_weights=False)
    layer = parallelize_module(layer, mesh, LoraColwiseParallel(output_layouts=Replicate(), use_local_output=False))
    x = torch.randn(ROWS, SEQ, D)
    with comm:
        y = layer(x)
    out["replicated output"] = dict(y=y.to_local(), placements=tuple(map(repr, y.placements)), comm=comm.take())
    return out


def _dropout_outputs(mesh, tmp):
    """Colwise dropout with a rank-shared seed: each rank's output vs the seeded single-process run;
    the warnings meanwhile: Python's, and what went to the stderr file descriptor (C++ warnings)."""
    from torch.distributed.tensor.parallel import parallelize_module

    model = parallelize_module(_net(MODES["colwise dropout"][1]), mesh, _plan(lora=True))
    x = _batches()[0][0]
    torch.manual_seed(DROPOUT_SEED)
    path = os.path.join(tmp, f"stderr{mesh.get_local_rank()}")
    saved = os.dup(2)
    with open(path, "wb") as f, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.dup2(f.fileno(), 2)
        try:
            y = model(x)
            y.sum().backward()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    with open(path) as f:
        said = f.read() + "".join(str(w.message) for w in caught)
    return dict(y=y.detach(), y_eval=model.eval()(x).detach(), said=said)


def _two_adapters():
    model = _net(LORA)
    lora_ext.add_adapter(model, LoraConfig(**LATER), "later")
    return model


def _other_forwards(mesh):
    """No-grad forward (the op itself), disabled adapters, and two active adapters with their gradients."""
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_ext.distributed.tensor_parallel import reduce_replicated_grads

    model = parallelize_module(_two_adapters(), mesh, _plan(lora=True))
    x, target = _batches()[0]
    out = {}
    with torch.no_grad():
        out["no grad"] = model(x)
    with lora_ext.disable_adapters(model):
        out["disabled"] = model(x).detach()
    lora_ext.set_adapter(model, ["default", "later"])
    y = model(x)
    nn.functional.mse_loss(y, target).backward()
    reduce_replicated_grads(model)
    out["two active"] = y.detach()
    out["two active grads"] = {n: _whole(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    return out


def _error(fn, kinds=(ValueError,)):
    try:
        fn()
    except kinds as e:
        return f"{type(e).__name__}: {e}"
    return None


def _guards(mesh):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from lora_ext.distributed.tensor_parallel import LoraColwiseParallel, LoraRowwiseParallel, tensor_parallel_layout

    out = {}
    k, rank = mesh.size(), mesh.get_local_rank()
    # torch's own ColwiseParallel on a LoRA layer
    out["torch ColwiseParallel"] = _error(
        lambda: parallelize_module(_net(LORA), mesh, {"blocks.0.attn.q": ColwiseParallel()}),
        (NotImplementedError, ValueError, TypeError, RuntimeError),
    )
    model = parallelize_module(_net(LORA), mesh, _plan(lora=True))
    q, o = model.blocks[0].attn.q, model.blocks[0].attn.o
    out["layouts"] = (tensor_parallel_layout(q), tensor_parallel_layout(o), tensor_parallel_layout(_net(LORA)))
    # rowwise dropout: refused in training, fine in eval
    x = _batches()[0][0]
    o.lora_dropout["default"] = 0.1
    out["rowwise dropout"] = _error(lambda: model(x))
    out["rowwise dropout, eval"] = model.eval()(x).detach()
    model.train()
    o.lora_dropout["default"] = 0.0
    # the op itself, called on rowwise-placed DTensors with dropout
    xs = distribute_tensor(torch.randn(N, D), mesh, [Shard(1)])
    a, b = o.adapter_weights("default")
    with torch.no_grad():  # lora_linear itself
        out["op rowwise dropout"] = _error(
            lambda: lora_ext.ops.lora_linear(xs, o.base_layer.weight, None, a, b, 2.0, 0.1, True)
        )
    # through the autograd: _lora_linear_forward
    out["op rowwise dropout, grad"] = _error(
        lambda: lora_ext.ops.lora_linear(xs, o.base_layer.weight, None, a, b, 2.0, 0.1, True)
    )
    # adapters added later: lora_ext.add_adapter on the model and LoraLayer.add_adapter on one layer
    q.add_adapter("direct", r=2, init_lora_weights=False)
    out["direct placements"] = {n: tuple(map(repr, p.placements)) for n, p in q.named_parameters()}
    # a target whose DTensors no LoRA style placed (torch's ColwiseParallel on a plain nn.Linear)
    mixed = _net(dict(LORA, target_modules=["q"]))
    parallelize_module(mixed, mesh, {"blocks.*.attn.q": LoraColwiseParallel(), "blocks.*.attn.k": ColwiseParallel()})
    before = sorted(n for n, _ in mixed.named_parameters())
    out["plain TP target"] = _error(
        lambda: lora_ext.add_adapter(mixed, LoraConfig(**dict(LATER, target_modules=["k"])), "new")
    )
    out["plain TP target unchanged"] = before == sorted(n for n, _ in mixed.named_parameters())
    # a model with DTensors but no LoRA style (as before: refused up front)
    plain = parallelize_module(_net(), mesh, {"blocks.*.attn.q": ColwiseParallel()})
    out["no LoRA style"] = _error(lambda: lora_ext.inject_adapter(plain, LoraConfig(**LORA)))
    # layers the styles refuse
    merged = _net(LORA)
    merged.blocks[0].attn.q.merge()
    out["merged"] = _error(lambda: parallelize_module(merged, mesh, {"blocks.0.attn.q": LoraColwiseParallel()}))
    out["twice"] = _error(lambda: parallelize_module(model, mesh, {"blocks.0.attn.q": LoraColwiseParallel()}))
    emb = lora_ext.inject_adapter(nn.ModuleDict({"e": nn.Embedding(10, D)}), LoraConfig(r=2, target_modules=["e"]))
    out["embedding"] = _error(lambda: parallelize_module(emb, mesh, {"e": LoraRowwiseParallel()}), (TypeError,))
    out["all DTensors"] = all(isinstance(p, DTensor) for p in q.parameters())
    out["adapter_batch"] = _error(
        lambda: lora_ext.adapter_batch(model, ["default"] * ROWS).__enter__(), (NotImplementedError,)
    )
    out["rank"], out["k"] = rank, k
    return out


def _world(rank, world_size, tmp):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    out = {mode: _train(mode, mesh) for mode, (worlds, _) in MODES.items() if world_size in worlds}
    for mode in list(out):
        model = out[mode].pop("model")
        if mode in ("lora", "uneven, rank 1"):
            out[mode]["save and merge"] = _save_and_merge(model, os.path.join(tmp, mode.replace(" ", "_")))
    out["plain phases"] = _plain_tp_phases(mesh)
    if world_size == 2:
        out["layer comms"] = _layer_comms(mesh)
        out["dropout"] = _dropout_outputs(mesh, tmp)
        out["other forwards"] = _other_forwards(mesh)
        out["guards"] = _guards(mesh)
    return out


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return timed_world(_world, 2, tmp_path_factory, "tp2", timeout=150)


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    return timed_world(_world, 3, tmp_path_factory, "tp3", timeout=150)


def _ranks(world2, world3, mode):
    return world2 if 2 in MODES[mode][0] else world3


# -- the single-process reference ---------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _reference(mode):
    model = _net(MODES[mode][1])
    if mode == "added later":
        _add_later(model)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(DROPOUT_SEED)
    outputs, opt, adamw_grads = [], None, GradRecorder()
    for step, (x, y) in enumerate(_batches()):
        opt = _optimizer(step, params, opt)
        opt.zero_grad()
        out = model(x)
        nn.functional.mse_loss(out, y).backward()
        if step >= SGD_STEPS:
            adamw_grads.record(model)
        opt.step()
        outputs.append(out.detach())
    return _trainable(model), outputs, adamw_grads.grads


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_tp_training_matches_single_process_training(world2, world3, mode):
    ranks = _ranks(world2, world3, mode)
    want, want_outputs, adamw_grads = _reference(mode)
    initial = _net(MODES[mode][1])
    if mode == "added later":
        _add_later(initial)
    initial = _trainable(initial)
    assert initial.keys() == want.keys()
    for rank, r in enumerate(ranks):
        got = r[mode]["trained"]
        assert got.keys() == want.keys(), (rank, got.keys() ^ want.keys())
        for name in want:
            # AdamW may move an element whose gradient sat within rounding noise by ~lr in one run only
            assert_close_after_adamw(got[name], want[name], adamw_grads[name], ADAMW_LR, f"rank {rank} {name}")
            assert not torch.equal(got[name], initial[name]), f"{name} did not train"
        _close(r[mode]["outputs"][0], want_outputs[0], f"rank {rank} forward output before training")
        # outputs of size ~1-3, a few near 0; the forward of AdamW step k runs on parameters after k - 1 AdamW
        # steps, which the bound above covers for the parameters, not for the outputs: SGD steps only
        for step, (o, w) in enumerate(zip(r[mode]["outputs"][: SGD_STEPS + 1], want_outputs[: SGD_STEPS + 1])):
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"rank {rank} step {step}: {m}")
        assert r[mode]["kept_placements"], rank
        assert r[mode]["frozen_with_grad"] == [] and r[mode]["trainable_without_grad"] == [], (rank, mode)
    if mode == "added later":
        assert all(".later." in n for n in want) and len(want) == 2 * 2 * len(LORA["target_modules"])


def test_placements_of_colwise_and_rowwise_layers_and_uneven_shards(world2, world3):
    p = world2[0]["lora"]["placements"]
    for block in range(2):
        for n in COLWISE + ROWWISE:
            path = f"blocks.{block}.{'mlp' if n in ('up', 'down') else 'attn'}.{n}"
            col = n in COLWISE
            assert p[f"{path}.base_layer.weight"] == ("Shard(dim=0)" if col else "Shard(dim=1)",)
            assert p[f"{path}.base_layer.bias"] == ("Shard(dim=0)" if col else "Replicate()",)
            assert p[f"{path}.lora_A.default.weight"] == ("Replicate()" if col else "Shard(dim=1)",)
            assert p[f"{path}.lora_B.default.weight"] == ("Shard(dim=0)" if col else "Replicate()",)
    later = world2[0]["added later"]["placements"]
    assert {k.replace(".later.", ".default."): v for k, v in later.items() if ".later." in k} == {
        k: v for k, v in p.items() if ".default." in k
    }
    shapes = [r["uneven, rank 1"]["local_shapes"] for r in world3]
    assert [s["blocks.0.mlp.up.lora_B.default.weight"] for s in shapes] == [(34, 1), (34, 1), (32, 1)]
    assert [s["blocks.0.attn.o.lora_A.default.weight"] for s in shapes] == [(1, 22), (1, 22), (1, 20)]
    assert [s["blocks.0.attn.q.lora_B.default.weight"] for s in shapes] == [(22, 4), (22, 4), (20, 4)]
    assert [s["blocks.0.mlp.down.base_layer.weight"] for s in shapes] == [(64, 34), (64, 34), (64, 32)]


def _reductions(rank1: bool):
    """reduce_replicated_grads' all-reduces in one step: per layer, in forward order."""
    out = []
    for _ in range(2):
        for n in ("q", "k", "v", "o", "up", "down"):
            r = 1 if rank1 and n in ("o", "up") else R
            out.append(("all_reduce", r * D if n in ("q", "k", "v", "up") else D * r))
    return out


def test_lora_adds_no_collective_beyond_the_base_layers_and_one_reduction_per_layer(world2, world3):
    for ranks, mode in ((world2, "lora"), (world2, "bias lora_only"), (world3, "uneven, rank 1")):
        for rank, r in enumerate(ranks):
            phases, plain = r[mode]["phases"], r["plain phases"]
            assert phases["forward"] == plain["forward"], (mode, rank)
            assert phases["backward"] == plain["backward"], (mode, rank)
            assert phases["reduce"] == _reductions(mode == "uneven, rank 1"), (mode, rank)
            assert r[mode]["reduced"] == 12 and phases["step"] == [], (mode, rank)
    plain = world2[0]["plain phases"]
    # torch's own: rowwise o/down all-reduce their output; colwise layers all-reduce their input's gradient,
    # except the first block's q/k/v, whose input (the batch) needs none
    assert plain["forward"] == [("all_reduce", N * D)] * 4
    assert plain["backward"] == [("all_reduce", N * D)] * 5
    print(
        f"\nper step: forward {plain['forward']}, backward {plain['backward']} (the base's, with or "
        f"without LoRA); LoRA adds {world2[0]['lora']['phases']['reduce']}"
    )


def test_collectives_of_one_layer(world2):
    for rank, r in enumerate(world2):
        c = r["layer comms"]
        assert c["colwise", True]["forward"] == c["colwise", False]["forward"] == [], rank
        assert c["colwise", True]["backward"] == c["colwise", False]["backward"] == [("all_reduce", N * D)], rank
        assert c["colwise", True]["reduce"] == [("all_reduce", R * D)] and c["colwise", True]["reduced"] == 1
        assert c["rowwise", True]["forward"] == c["rowwise", False]["forward"] == [("all_reduce", N * HIDDEN)]
        assert c["rowwise", True]["backward"] == c["rowwise", False]["backward"] == [], rank
        assert c["rowwise", True]["reduce"] == [("all_reduce", HIDDEN * R)] and c["rowwise", True]["reduced"] == 1
        assert c["colwise", False]["reduce"] == c["rowwise", False]["reduce"] == []
        # without reduce_replicated_grads DTensor all-reduces the Partial gradient at every use
        assert c["colwise", "SGD"] == [("all_reduce", R * D)] and c["rowwise", "SGD"] == [("all_reduce", HIDDEN * R)]
        assert c["colwise", "AdamW"] == [("all_reduce", R * D)] * 3, c["colwise", "AdamW"]
        assert c["rowwise", "AdamW"] == [("all_reduce", HIDDEN * R)] * 3, c["rowwise", "AdamW"]
        rep = c["replicated output"]
        assert rep["placements"] == ("Replicate()",) and rep["comm"] == [("all_gather_into_tensor", N * HIDDEN // 2)]
    torch.manual_seed(0)
    layer = lora_ext.LoraLinear(nn.Linear(D, HIDDEN), r=R, init_lora_weights=False)
    _close(world2[0]["layer comms"]["replicated output"]["y"], layer(torch.randn(ROWS, SEQ, D)), "replicated output")
    print(
        f"\nper layer (fp32, N={N}): colwise forward 0, backward 1 all-reduce of N*in = {N * D * 4} B (the base's), "
        f"LoRA's A: r*in = {R * D * 4} B; rowwise forward 1 all-reduce of N*out = {N * HIDDEN * 4} B (the base's), "
        f"backward 0, LoRA's B: out*r = {HIDDEN * R * 4} B"
    )


def test_colwise_dropout_with_a_shared_seed_equals_the_seeded_reference(world2):
    model = _net(MODES["colwise dropout"][1])
    x = _batches()[0][0]
    torch.manual_seed(DROPOUT_SEED)
    want = model(x).detach()
    torch.manual_seed(DROPOUT_SEED + 1)
    other = model(x).detach()
    for rank, r in enumerate(world2):
        _close(r["dropout"]["y"], want, f"rank {rank}")
        assert not torch.allclose(r["dropout"]["y"], other), rank  # the mask depends on the seed
        assert not torch.allclose(r["dropout"]["y"], r["dropout"]["y_eval"]), rank  # dropout is on
        _close(r["dropout"]["y_eval"], model.eval()(x).detach(), f"rank {rank} eval")
        # the plain seed reaches DTensor as a replicated DTensor: no "Found a non-scalar tensor" warning
        assert "non-scalar tensor" not in r["dropout"]["said"], r["dropout"]["said"][:500]


def test_no_grad_disabled_and_two_active_adapters(world2):
    model = _two_adapters()
    x, target = _batches()[0]
    with torch.no_grad():
        want_no_grad = model(x)
    with lora_ext.disable_adapters(model):
        want_disabled = model(x).detach()
    lora_ext.set_adapter(model, ["default", "later"])
    y = model(x)
    nn.functional.mse_loss(y, target).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * 2 * 2 * len(LORA["target_modules"])
    for rank, r in enumerate(world2):
        o = r["other forwards"]
        _close(o["no grad"], want_no_grad, f"rank {rank} no grad")
        _close(o["disabled"], want_disabled, f"rank {rank} disabled")
        _close(o["two active"], y.detach(), f"rank {rank} two active adapters")
        assert o["two active grads"].keys() == grads.keys(), rank
        for n, g in grads.items():
            _close(o["two active grads"][n], g, f"rank {rank} grad of {n}")


def test_rowwise_dropout_is_refused(world2):
    for r in world2:
        g = r["guards"]
        e = g["rowwise dropout"]
        assert e.startswith("ValueError: LoraRowwiseParallel: expected lora_dropout == 0 for the active adapters"), e
        assert "got {'default': 0.1}" in e, e
        for key, op in (("op rowwise dropout", "lora_linear"), ("op rowwise dropout, grad", "_lora_linear_forward")):
            e = g[key]
            assert e.startswith(f"ValueError: lora_ext::{op} (tensor parallel): expected lora_dropout == 0"), e
            assert "got dropout on" in e and "Shard(dim=1)" in e, e
    _close(world2[0]["guards"]["rowwise dropout, eval"], _net(LORA).eval()(_batches()[0][0]), "eval with dropout set")


def test_guards_and_what_torch_colwise_parallel_does_with_a_lora_layer(world2):
    for r in world2:
        g = r["guards"]
        assert (
            g["torch ColwiseParallel"]
            == "NotImplementedError: ColwiseParallel currently only support nn.Linear and nn.Embedding!"
        )
        assert g["layouts"] == ("colwise", "rowwise", None)
        assert g["direct placements"]["lora_A.direct.weight"] == ("Replicate()",)
        assert g["direct placements"]["lora_B.direct.weight"] == ("Shard(dim=0)",) and g["all DTensors"]
        e = g["plain TP target"]
        assert e.startswith("ValueError: lora_ext.inject_adapter: the model was not changed"), e
        assert "'blocks.0.attn.k': expected a LoRA layer that LoraColwiseParallel/LoraRowwiseParallel" in e, e
        assert g["plain TP target unchanged"]
        assert "inject adapters before fully_shard/DDP" in g["no LoRA style"], g["no LoRA style"]
        assert "DTensor parameters ('blocks.0.attn.q.weight'" in g["no LoRA style"]
        assert g["merged"].startswith("ValueError: LoraColwiseParallel: expected an unmerged LoraLinear"), g["merged"]
        assert g["twice"].startswith(
            "ValueError: LoraColwiseParallel: expected a LoraLinear that is not parallelized yet"
        ), g["twice"]
        assert g["embedding"].startswith("TypeError: LoraRowwiseParallel: expected a LoraLinear"), g["embedding"]
        assert g["adapter_batch"].startswith(
            "NotImplementedError: adapter_batch: per-row adapters are not implemented for tensor-parallel layers"
        ), g["adapter_batch"]


@pytest.mark.parametrize("mode", ["lora", "uneven, rank 1"])
def test_save_and_merge_of_a_tensor_parallel_model_match_a_single_process(world2, world3, mode, tmp_path):
    """A collective save_adapter writes the single-process file (sha256); merging into the colwise/rowwise
    sharded weights is the single-process merge bit for bit, and the exact merge's unmerge restores every
    shard bit for bit."""
    for out in _ranks(world2, world3, mode):
        got = out[mode]["save and merge"]
        model = _net(MODES[mode][1])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in out[mode]["trained"]:
                    p.copy_(out[mode]["trained"][name])
        assert got["files"] == file_hashes(lora_ext.save_adapter(model, str(tmp_path / "single")))
        weights = {n: p for n, p in model.named_parameters() if n in got["base"]}
        assert weights and all(torch.equal(p, got["base"][n]) for n, p in weights.items())
        lora_ext.merge(model, exact=True)
        for name, p in weights.items():
            assert torch.equal(p, got["exact_merged"][name]), name
        lora_ext.unmerge(model)
        lora_ext.merge(model)
        for name, p in weights.items():
            assert torch.equal(p, got["merged"][name]), name
        assert got["restored"]
