"""torch.autocast with the LoRA layer ops (issue 25, part 1).

The ops' Autocast kernels (``csrc/ops/autocast/``) follow PyTorch's rule for ``linear``: x, the base weight and
the bias run in the autocast dtype, the adapters keep theirs (float32: the LoRA branch accumulates in float32).
So every op under autocast must equal the same op called on explicitly cast inputs, bit for bit, forward and
backward (gradients come back in each tensor's own dtype), and the float64 reference within the dtype's
tolerance. A model under autocast must match PEFT under the same autocast (PEFT runs its LoRA branch through
autocast's bf16 linears, lora_ext in float32: within the dtype's tolerance, not bit for bit), over a 20-step
loss curve too. Written once, parametrised by device: the CUDA cases run where a GPU is.
"""

from __future__ import annotations

import copy

import peft  # noqa: E402  (a test dependency, installed by scripts/run.sh)
import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoraConfig, ops, quant
from models import LLAMA_TARGETS, llama_inputs, tiny_llama
from reference import DEVICES, GRAD_TOL, TOL, ref_lora_linear

pytestmark = pytest.mark.numerics

DTYPES = [torch.bfloat16, torch.float16]
SHAPES = {  # lead dims of x, in, out, r
    "3-D x": ((3, 5), 48, 40, 8),
    "empty batch": ((0,), 48, 40, 8),
    "rank 1": ((7,), 16, 24, 1),
    "non-contiguous x": ((6,), 32, 20, 4),
}


def _inputs(device, lead, in_f, out_f, r, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g)
    if noncontiguous:
        x = torch.randn(in_f, *lead, generator=g).movedim(0, -1)
        assert not x.is_contiguous()
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g)
    a = torch.randn(r, in_f, generator=g) / in_f**0.5
    bb = torch.randn(out_f, r, generator=g) / r**0.5
    return [t.to(device) for t in (x, w, b, a, bb)]


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _run_and_grads(fn, leaves, grad_seed=5):
    y = fn(*leaves)
    g = torch.Generator().manual_seed(grad_seed)
    gy = torch.randn(y.shape, generator=g).to(device=y.device, dtype=y.dtype)
    y.backward(gy)
    return y.detach(), [t.grad for t in leaves], gy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_linear_under_autocast_is_the_op_on_cast_inputs(device, dtype, shape, dropout):
    lead, in_f, out_f, r = SHAPES[shape]
    x, w, b, a, bb = _inputs(device, lead, in_f, out_f, r, noncontiguous=shape == "non-contiguous x")
    scale = 1.5

    def under_autocast(x, a, bb):
        with torch.autocast(device, dtype=dtype):
            return ops.lora_linear(x, w, b, a, bb, scale, dropout, True)

    def cast_by_hand(x, a, bb):
        return ops.lora_linear(x.to(dtype), w.to(dtype), b.to(dtype), a, bb, scale, dropout, True)

    torch.manual_seed(3)
    y, grads, gy = _run_and_grads(under_autocast, _leaves(x, a, bb))
    torch.manual_seed(3)
    y_ref, grads_ref, _ = _run_and_grads(cast_by_hand, _leaves(x, a, bb))
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    assert [g.dtype for g in grads] == [torch.float32] * 3  # each leaf's own dtype
    assert torch.equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.equal(g, g_ref)
    if dropout == 0.0:  # against float64, with the inputs as autocast rounds them
        want = ref_lora_linear(x.to(dtype), w.to(dtype), b.to(dtype), a, bb, scale)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol)
        if x.numel():
            x64, a64, b64, w64 = (t.to(dtype).double() if t is x or t is w else t.double() for t in (x, a, bb, w))
            gy64 = gy.double().reshape(-1, out_f)
            x2 = x64.reshape(-1, in_f)
            want_ga = scale * (gy64 @ b64).T @ x2
            want_gx = (gy64 @ w64 + scale * (gy64 @ b64) @ a64).reshape(x.shape)
            atol, rtol = GRAD_TOL[dtype]
            torch.testing.assert_close(grads[1].double(), want_ga, atol=atol, rtol=rtol)
            torch.testing.assert_close(grads[0].double(), want_gx, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_multi_under_autocast_is_the_op_on_cast_inputs(device, dtype):
    x, w, b, _, _ = _inputs(device, (9,), 32, 24, 4)
    g = torch.Generator().manual_seed(2)
    A = (torch.randn(3, 4, 32, generator=g) / 6).to(device)
    B = torch.randn(3, 24, 4, generator=g).to(device)
    scales = torch.tensor([0.5, 1.0, 2.0], device=device)
    ids = torch.tensor([0, 2, -1, 1, 1, 0, 2, -1, 0], device=device)

    def under_autocast(x, A, B):
        with torch.autocast(device, dtype=dtype):
            return ops.lora_linear_multi(x, w, b, A, B, scales, ids, 0.1, True)

    def cast_by_hand(x, A, B):
        return ops.lora_linear_multi(x.to(dtype), w.to(dtype), b.to(dtype), A, B, scales, ids, 0.1, True)

    torch.manual_seed(4)
    y, grads, _ = _run_and_grads(under_autocast, _leaves(x, A, B))
    torch.manual_seed(4)
    y_ref, grads_ref, _ = _run_and_grads(cast_by_hand, _leaves(x, A, B))
    assert y.dtype == dtype and torch.equal(y, y_ref)
    assert all(torch.equal(g, h) and g.dtype == torch.float32 for g, h in zip(grads, grads_ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qtype", ["int8", "q4_1", "nf4"])
def test_quantized_ops_under_autocast_cast_x_and_bias_only(device, dtype, qtype):
    x, w, b, a, bb = _inputs(device, (2, 5), 64, 24, 4)
    q = quant.quantize(w.cpu(), qtype)
    qw = quant.QuantizedWeight(
        q.qdata.to(device), None if q.qscale is None else q.qscale.to(device), q.qtype, q.out_features, q.in_features
    )
    qdata_before = qw.qdata.clone()

    def under_autocast(x, a, bb):
        with torch.autocast(device, dtype=dtype):
            return ops.lora_linear_quantized(x, qw, b, a, bb, 2.0, 0.0, True)

    def cast_by_hand(x, a, bb):
        return ops.lora_linear_quantized(x.to(dtype), qw, b.to(dtype), a, bb, 2.0, 0.0, True)

    y, grads, _ = _run_and_grads(under_autocast, _leaves(x, a, bb))
    y_ref, grads_ref, _ = _run_and_grads(cast_by_hand, _leaves(x, a, bb))
    assert y.dtype == dtype and torch.equal(y, y_ref)
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_ref))
    assert torch.equal(qw.qdata, qdata_before)
    with torch.autocast(device, dtype=dtype):
        base = ops.linear_quantized(x, qw, b)
    assert base.dtype == dtype and torch.equal(base, ops.linear_quantized(x.to(dtype), qw, b.to(dtype)))
    # per-row adapters on the quantized base: the same rule (x and bias cast, adapters and bytes as they are)
    ids = torch.tensor([1, -1, 0, 1, 0, -1, 1, 0, 0, 1], device=device)
    sa, sb = torch.stack([a, 0.5 * a]), torch.stack([bb, -bb])
    s = torch.tensor([2.0, 0.5], device=device)

    def multi_under_autocast(x, sa, sb):
        with torch.autocast(device, dtype=dtype):
            return ops.lora_linear_multi_quantized(x, qw, b, sa, sb, s, ids, 0.0, True)

    def multi_by_hand(x, sa, sb):
        return ops.lora_linear_multi_quantized(x.to(dtype), qw, b.to(dtype), sa, sb, s, ids, 0.0, True)

    y, grads, _ = _run_and_grads(multi_under_autocast, _leaves(x, sa, sb))
    y_ref, grads_ref, _ = _run_and_grads(multi_by_hand, _leaves(x, sa, sb))
    assert y.dtype == dtype and torch.equal(y, y_ref)
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_ref))


@pytest.mark.parametrize("device", DEVICES)
def test_float64_and_autocast_disabled_are_left_alone(device):
    x, w, b, a, bb = (t.double() for t in _inputs(device, (4,), 16, 8, 2))
    with torch.autocast(device, dtype=torch.bfloat16):
        y64 = ops.lora_linear(x, w, b, a, bb, 0.5)
        with torch.autocast(device, enabled=False):
            x32, w32, b32, a32, bb32 = (t.float() for t in (x, w, b, a, bb))
            y32 = ops.lora_linear(x32, w32, b32, a32, bb32, 0.5)
    assert y64.dtype == torch.float64 and torch.equal(y64, ops.lora_linear(x, w, b, a, bb, 0.5))
    assert y32.dtype == torch.float32 and torch.equal(y32, ops.lora_linear(x32, w32, b32, a32, bb32, 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_under_autocast_is_still_named(device):
    x, w, b, a, bb = _inputs(device, (4,), 16, 8, 2)
    with (
        torch.autocast(device, dtype=torch.bfloat16),
        pytest.raises(
            RuntimeError,
            match=(r"lora_ext::lora_linear: expected lora_A of shape \[r, in\] with in = 16, got \[2, 15\]"),
        ),
    ):
        ops.lora_linear(x, w, b, a[:, :15], bb, 0.5)
    with (
        torch.autocast(device, dtype=torch.bfloat16),
        pytest.raises(
            RuntimeError,
            match=(
                r"lora_ext::lora_linear: expected lora_A/lora_B of dtype BFloat16 \(the x/weight's dtype\), float32, "
                r"bfloat16 or float16, got Double"
            ),
        ),
    ):
        ops.lora_linear(x, w, b, a.double(), bb.double(), 0.5)


def _same_init_models(tmp_path, device):
    """A tiny Llama with lora_ext's LoRA (random B) and the same adapter loaded by PEFT, both trainable."""
    base = tiny_llama().to(device)
    ours = lora_ext.inject_adapter(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    )
    lora_ext.save_adapter(ours, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    return ours, theirs


def _lora_grads(model):
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            key = (
                n.replace("base_model.model.", "")
                .replace(".weight", "")
                .replace("lora_A.default", "A")
                .replace("lora_B.default", "B")
                .replace("lora_A", "A")
                .replace("lora_B", "B")
            )
            out[key] = p.grad
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_model_under_autocast_matches_peft_under_autocast(device, dtype, tmp_path):
    ours, theirs = _same_init_models(tmp_path, device)
    ids = llama_inputs(batch=3, seq=9).to(device)
    for m in (ours, theirs):
        m.train()
        with torch.autocast(device, dtype=dtype):
            out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        m._out = out
    assert ours._out.logits.dtype == theirs._out.logits.dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(ours._out.logits.float(), theirs._out.logits.float(), atol=4 * atol, rtol=4 * rtol)
    torch.testing.assert_close(ours._out.loss, theirs._out.loss, atol=atol, rtol=rtol)
    g_ours, g_theirs = _lora_grads(ours), _lora_grads(theirs)
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) == 2 * len(LLAMA_TARGETS) * 2
    for k in g_ours:
        assert g_ours[k].dtype == torch.float32 == g_theirs[k].dtype
        scale = g_theirs[k].abs().max().item()
        torch.testing.assert_close(g_ours[k], g_theirs[k], atol=0.05 * scale, rtol=0.1, msg=k)  # bf16/fp16 grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_20_step_layer_loss_curve_under_autocast_matches_peft(device, dtype, tmp_path):
    """One LoRA layer learning a low-rank change of its base (AdamW, 20 steps on a fixed batch) under autocast:
    lora_ext and PEFT, from the same adapter, follow the same loss curve within the dtype's rounding."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48)).to(device)
    ours = lora_ext.inject_adapter(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False)
    )
    lora_ext.save_adapter(ours, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g).to(device)
    delta = (torch.randn(48, 4, generator=g) @ torch.randn(4, 64, generator=g) / 8).to(device)
    with torch.no_grad():
        target = base(x) + x @ delta.T
    curves = []
    for m in (ours, theirs):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2)
        curve = []
        for _ in range(20):
            with torch.autocast(device, dtype=dtype):
                loss = nn.functional.mse_loss(m(x).float(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    ours_c, theirs_c = curves
    assert ours_c[-1] < 0.5 * ours_c[0], ours_c  # it learns
    # measured: bf16 within 0.2% at every step, fp16 0.03%; one ulp of the dtype allows either
    torch.testing.assert_close(ours_c, theirs_c, atol=1e-4 * ours_c[0].item(), rtol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_adapters_under_autocast(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).to(device)
    cfg = LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    lora_ext.inject_adapter(model, cfg, "a")
    lora_ext.add_adapter(model, cfg, "b")
    x = torch.randn(4, 16, device=device)
    names = ["a", "b", lora_ext.BASE, "a"]
    with torch.autocast(device, dtype=torch.bfloat16), lora_ext.adapter_batch(model, names):
        y = model(x)
    assert y.dtype == torch.bfloat16
    for i, name in enumerate(names):
        with torch.autocast(device, dtype=torch.bfloat16):
            if name == lora_ext.BASE:
                with lora_ext.disable_adapters(model):
                    want = model(x[i : i + 1])
            else:
                lora_ext.set_adapter(model, name)
                want = model(x[i : i + 1])
        torch.testing.assert_close(y[i : i + 1].float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_under_autocast_equals_eager(device):
    torch.manual_seed(0)
    layer = lora_ext.LoraLinear(nn.Linear(32, 16), r=4, init_lora_weights=False).to(device)
    x = torch.randn(5, 32, device=device)

    def step(x):
        with torch.autocast(device, dtype=torch.bfloat16):
            return layer(x)

    compiled = torch.compile(step, fullgraph=True)
    y_eager = step(x)
    y_compiled = compiled(x)
    assert y_compiled.dtype == torch.bfloat16 and torch.equal(y_compiled, y_eager)
    y_compiled.float().sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    layer.zero_grad()
    y_eager.float().sum().backward()
    assert all(
        torch.equal(g, p.grad) for g, p in zip(grads, (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    )


def _lora_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accelerate_bf16_mixed_precision_trains_a_lora_ext_model():
    """The issue's report: accelerate's ``mixed_precision="bf16"`` raised on the first forward."""
    from accelerate import Accelerator

    model = lora_ext.inject_adapter(
        tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    ).train()
    before = _lora_values(model)
    acc = Accelerator(mixed_precision="bf16", cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = acc.prepare(model, opt)
    ids = llama_inputs()
    for _ in range(2):
        out = model(input_ids=ids, labels=ids)
        acc.backward(out.loss)
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(out.loss)
    after = _lora_values(acc.unwrap_model(model))
    assert after.keys() == before.keys() and all(not torch.equal(after[k], before[k]) for k in after)
    assert all(v.dtype == torch.float32 for v in after.values())


def test_trainer_with_bf16_on_trains_a_lora_ext_model(tmp_path):
    """The issue's report: ``Trainer(bf16=True)`` raised on its first step."""
    from transformers import Trainer, TrainingArguments

    model = lora_ext.inject_adapter(
        tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    )
    before = _lora_values(model)
    ids = llama_inputs(batch=4)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        bf16=True,
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    after = _lora_values(model)
    assert all(not torch.equal(after[k], before[k]) for k in after)


@pytest.mark.parametrize("kind", ["native", "peft backend"])
def test_accelerate_bf16_save_state_and_load_state_resume_bit_identically(kind, tmp_path):
    """accelerate's training loop with mixed_precision="bf16" and dropout: 2 steps, save_state, 2 steps, against
    a fresh model and optimizer that load_state and run the same 2 steps."""
    from accelerate import Accelerator

    from lora_ext import peft_backend

    def fresh():
        torch.manual_seed(0)
        if kind == "native":
            model = lora_ext.inject_adapter(
                tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=0.1, init_lora_weights=False)
            )
        else:
            peft_backend.use_lora_ext()
            try:
                model = peft.get_peft_model(
                    tiny_llama(),
                    peft.LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=0.1, init_lora_weights=False),
                )
            finally:
                peft_backend.use_lora_ext(False)
        acc = Accelerator(mixed_precision="bf16", cpu=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model, opt = acc.prepare(model.train(), opt)
        return acc, model, opt

    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 128, (2, 9), generator=g) for _ in range(4)]

    def steps(acc, model, opt, todo):
        for ids in todo:
            acc.backward(model(input_ids=ids, labels=ids).loss)
            opt.step()
            opt.zero_grad()

    acc, model, opt = fresh()
    steps(acc, model, opt, batches[:2])
    acc.save_state(str(tmp_path / "state"))
    steps(acc, model, opt, batches[2:])
    straight = _lora_values(acc.unwrap_model(model))
    acc, model, opt = fresh()
    acc.load_state(str(tmp_path / "state"))
    steps(acc, model, opt, batches[2:])
    resumed = _lora_values(acc.unwrap_model(model))
    assert straight.keys() == resumed.keys() and straight
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    torch.manual_seed(0)
    assert not all(torch.equal(straight[k], v) for k, v in _lora_values(fresh()[1]).items())  # it trained
