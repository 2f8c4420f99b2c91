"""lora_ext.compress_saved_inputs: the input a LoRA layer keeps for the A gradient, saved as bf16 or int8.

Only grad_A may change, and by no more than |grad_h|^T |x - x_saved| / (1 - p) (plus float32 rounding)
against a float64 reference; grad_x, grad_B and the output are bit for bit the uncompressed ones. Layers
reading one input share one compressed copy; outer saved-tensor hooks see the compressed copy; checkpointing,
other threads and torch.compile are left alone."""

from __future__ import annotations

import functools
import threading

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lora_ext
from models import LLAMA_TARGETS, llama_inputs, tiny_llama

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

MODES = ["bf16", "int8"]


def layer(in_f=24, out_f=16, r=4, p=0.0, seed=0) -> lora_ext.LoraLinear:
    torch.manual_seed(seed)
    lin = lora_ext.LoraLinear(nn.Linear(in_f, out_f), r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False)
    return lin.train()


def grads(lin, x, g, mode=None, seed=5):
    """(y, grad_x, grad_A, grad_B) of sum(y * g) from torch.manual_seed(seed) (the dropout seed)."""
    x = x.detach().requires_grad_(True)
    for p in lin.parameters():
        p.grad = None
    torch.manual_seed(seed)
    if mode is None:
        y = lin(x)
    else:
        with lora_ext.compress_saved_inputs(mode):
            y = lin(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, lin.lora_A["default"].weight.grad, lin.lora_B["default"].weight.grad


def saved_error(x: torch.Tensor, mode: str) -> torch.Tensor:
    """|x - x_saved| elementwise, or its bound for int8 (amax(|row|) / 254)."""
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    if mode == "bf16":
        return (rows - rows.float().bfloat16().double()).abs()
    return (rows.abs().amax(dim=1, keepdim=True) / 254).expand_as(rows)


def check_grad_a(lin, x, g, mode, p):
    ref = grads(lin, x, g)
    got = grads(lin, x, g, mode)
    for a, b in zip(ref[:2] + ref[3:], got[:2] + got[3:]):  # y, grad_x, grad_B: bit for bit
        assert torch.equal(a, b)
    # grad_A = grad_h^T dropout(x), grad_h = s * g B: float64 bound on what the saved copy may change.
    s = lin.scaling["default"]
    gh = (s * g.reshape(-1, g.shape[-1]).double() @ lin.lora_B["default"].weight.double()).abs()
    bound = gh.t() @ saved_error(x, mode) / (1 - p)
    slack = 1e-5 * (gh.t() @ x.detach().reshape(-1, x.shape[-1]).double().abs()) / (1 - p) + 1e-30
    diff = (got[2].double() - ref[2].double()).abs()
    assert (diff <= bound + slack).all(), (diff - bound - slack).max()
    return diff, bound


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape,r", [((7, 24), 4), ((2, 5, 24), 1), ((0, 24), 4), ((24,), 2)])
def test_only_grad_a_changes_within_its_bound(mode, p, shape, r):
    lin = layer(r=r, p=p)
    g0 = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g0) * torch.logspace(-2, 2, 24)  # rows of very different magnitudes
    g = torch.randn(*shape[:-1], 16, generator=g0)
    diff, bound = check_grad_a(lin, x, g, mode, p)
    if x.numel():
        assert diff.max() > 0  # the copy really was compressed


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_input_and_float64_weights(mode):
    lin = layer(p=0.2).double()
    x = torch.randn(24, 9, dtype=torch.float64).t()  # [9, 24], transposed
    assert not x.is_contiguous()
    check_grad_a(lin, x, torch.randn(9, 16, dtype=torch.float64), mode, 0.2)


def test_bf16_leaves_16_bit_inputs_alone_and_int8_compresses_them():
    lin = layer().to(torch.bfloat16)
    x = torch.randn(6, 24).to(torch.bfloat16)
    g = torch.randn(6, 16).to(torch.bfloat16)
    ref = grads(lin, x, g)
    assert all(torch.equal(a, b) for a, b in zip(ref, grads(lin, x, g, "bf16")))
    assert not torch.equal(ref[2], grads(lin, x, g, "int8")[2])


def test_nan_rows_stay_nan():
    lin = layer()
    x = torch.randn(5, 24)
    x[2, 3] = float("nan")
    x[4, 0] = float("inf")
    g = torch.randn(5, 16)
    ref, got = grads(lin, x, g), grads(lin, x, g, "int8")
    assert not torch.isfinite(ref[2]).all()
    assert torch.isnan(got[2][~torch.isfinite(ref[2])]).all()  # never silently finite where it was not


class Counter:
    """Outer saved-tensor hooks that record what reaches them (like save_on_cpu would see it)."""

    def __init__(self):
        self.seen = []

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    def pack(self, t):
        self.seen.append(t)
        return t

    def storages(self, dtype):
        return {t.untyped_storage().data_ptr() for t in self.seen if t.dtype == dtype}


def test_layers_reading_one_input_share_one_copy_and_outer_hooks_see_it():
    torch.manual_seed(0)
    q, k, v = (lora_ext.LoraLinear(nn.Linear(24, 24), r=4, init_lora_weights=False).train() for _ in range(3))
    x = torch.randn(6, 24, requires_grad=True)
    with Counter() as c, lora_ext.compress_saved_inputs("int8"):
        y = q(x) + k(x) + v(x)
        z = q(x * 2)  # another tensor: its own copy
    assert len(c.storages(torch.int8)) == 2
    assert not any(t is x for t in c.seen)  # x itself is not kept
    (y.sum() + z.sum()).backward()  # outside the block
    assert x.grad is not None and q.lora_A["default"].weight.grad is not None


def test_save_on_cpu_composes():
    lin = layer(p=0.1)
    x, g = torch.randn(8, 24), torch.randn(8, 16)
    ref = grads(lin, x, g, "int8")
    x = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    with torch.autograd.graph.save_on_cpu(), lora_ext.compress_saved_inputs("int8"):
        y = lin(x)
    (y * g).sum().backward()
    assert torch.equal(lin.lora_A["default"].weight.grad, ref[2])


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_keeps_nothing_and_stays_exact(reentrant):
    """Under checkpointing nothing is compressed: gradients equal the uncompressed ones bit for bit."""
    model = tiny_llama()
    lora_ext.inject_adapter(
        model, lora_ext.LoraConfig(r=4, lora_dropout=0.2, init_lora_weights=False, target_modules=LLAMA_TARGETS)
    )
    model.train()
    block = model.model.layers[0]
    x = torch.randn(2, 5, 32)
    pe = model.model.rotary_emb(x, torch.arange(5)[None].expand(2, 5))

    def run(ckpt: bool, mode):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        xi = x.clone().requires_grad_(True)
        with lora_ext.compress_saved_inputs(mode) if mode else torch.enable_grad():
            fn = functools.partial(block, position_embeddings=pe)
            out = checkpoint(fn, xi, use_reentrant=reentrant) if ckpt else fn(xi)
        out = out[0] if isinstance(out, tuple) else out
        out.pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}

    ref = run(False, None)
    got = run(True, "int8")
    assert ref.keys() == got.keys() and all(torch.equal(ref[n], got[n]) for n in ref)


def test_whole_model_training_loss_follows_the_uncompressed_one():
    def train(mode):
        model = tiny_llama()
        lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=4, init_lora_weights=False, target_modules=LLAMA_TARGETS))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = llama_inputs(batch=3, seq=8)
        losses = []
        for _ in range(4):
            with lora_ext.compress_saved_inputs(mode) if mode else torch.enable_grad():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    ref = train(None)
    for mode in MODES:
        got = train(mode)
        assert got[0] == ref[0]  # the first forward is unchanged
        assert all(abs(a - b) <= 2e-3 * abs(b) for a, b in zip(got, ref)), (mode, got, ref)


def test_the_setting_is_per_thread():
    lin = layer()
    x, g = torch.randn(6, 24), torch.randn(6, 16)
    ref = grads(lin, x, g)
    inside, out = threading.Event(), {}

    def other():
        inside.wait()
        out["grads"] = grads(layer(), x, g)  # a fresh, identical layer; this thread has no block open

    t = threading.Thread(target=other)
    t.start()
    with lora_ext.compress_saved_inputs("int8"):
        inside.set()
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(ref, out["grads"]))


def test_trainable_base_weight_or_no_grad_saves_the_exact_input():
    lin = layer()
    lin.base_layer.weight.requires_grad_(True)
    x, g = torch.randn(6, 24), torch.randn(6, 16)
    ref = grads(lin, x, g)
    w_ref = lin.base_layer.weight.grad.clone()
    lin.base_layer.weight.grad = None
    got = grads(lin, x, g, "int8")
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert torch.equal(lin.base_layer.weight.grad, w_ref)
    with torch.no_grad(), lora_ext.compress_saved_inputs("bf16"):
        assert torch.equal(lin(x), lin(x))


def test_nested_none_turns_it_off():
    lin = layer()
    x, g = torch.randn(6, 24), torch.randn(6, 16)
    ref = grads(lin, x, g)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    with lora_ext.compress_saved_inputs("int8"), lora_ext.compress_saved_inputs(None):
        y = lin(x)
    (y * g).sum().backward()
    assert torch.equal(lin.lora_A["default"].weight.grad, ref[2])


@pytest.mark.parametrize("mode", ["fp8", "BF16", 8, ""])
def test_bad_mode_is_a_value_error(mode):
    with pytest.raises(ValueError, match=r"compress_saved_inputs: expected mode in \('bf16', 'int8'\)"):
        with lora_ext.compress_saved_inputs(mode):
            pass


def test_compiled_forward_with_the_block_open_has_no_graph_break():
    import torch._dynamo as dynamo

    model = tiny_llama()
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=4, init_lora_weights=False, target_modules=LLAMA_TARGETS))
    model.train()
    ids = llama_inputs(batch=2, seq=5)
    with lora_ext.compress_saved_inputs("int8"):
        explained = dynamo.explain(model)(input_ids=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_the_full_precision_input_is_freed():
    """Autograd keeps the pack hook with every saved tensor: the hook must not keep x alive."""
    import gc
    import weakref

    lin = layer()
    x = torch.randn(6, 24, requires_grad=True)
    with lora_ext.compress_saved_inputs("int8"):
        h = x * 2  # an intermediate only the LoRA layer reads
        y = lin(h)
    ref = weakref.ref(h)
    del h
    gc.collect()
    assert ref() is None
    y.sum().backward()
    assert x.grad is not None


def test_as_a_decorator_of_forward():
    """What a transformers.Trainer user does: wrap the model's forward once."""
    lin = layer(p=0.1)
    x, g = torch.randn(6, 24), torch.randn(6, 16)
    full, ref = grads(lin, x, g), grads(lin, x, g, "int8")
    assert not torch.equal(full[2], ref[2])
    lin.forward = lora_ext.compress_saved_inputs("int8")(lin.forward)
    got = grads(lin, x, g)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_per_row_adapters_compress_too():
    """adapter_batch training: one compressed copy per input, grad_B of each adapter bit for bit, grad_A close."""
    torch.manual_seed(0)
    lin = lora_ext.LoraLinear(nn.Linear(24, 16), r=4, lora_dropout=0.2, init_lora_weights=False)
    lin.add_adapter("b", r=2, lora_alpha=4, lora_dropout=0.2, init_lora_weights=False)
    lin.set_adapter(["default", "b"])
    lin.train()
    x, g = torch.randn(3, 5, 24), torch.randn(3, 5, 16)

    def run(mode):
        lin.zero_grad(set_to_none=True)
        torch.manual_seed(9)
        with lora_ext.adapter_batch(lin, ["default", lora_ext.BASE, "b"]), lora_ext.compress_saved_inputs(mode):
            with Counter() as c:
                y = lin(x)
        (y * g).sum().backward()
        return c, {n: p.grad.clone() for n, p in lin.named_parameters() if p.grad is not None}

    _, ref = run(None)
    c, got = run("int8")
    assert len(c.storages(torch.int8)) == 1 and not any(t.dtype == torch.float32 and t.shape == x.shape for t in c.seen)
    assert ref.keys() == got.keys()
    for n in ref:
        if "lora_B" in n:
            assert torch.equal(ref[n], got[n]), n
        else:
            assert not torch.equal(ref[n], got[n]) and torch.allclose(ref[n], got[n], rtol=0.05, atol=0.05), n
