"""The LoRA linear op on a quantized frozen base (issue 15): lora_linear_quantized, linear_quantized and their
autograd pieces, against a float64 reference built from the dequantized weight, for every format; the dense
lora_linear on that dequantized weight (dropout masks included); opcheck, gradcheck; bad inputs; the bound on
scratch memory (the weight is never dequantized whole)."""

from __future__ import annotations

import pytest
import torch

from lora_ext import ops, quant
from reference import GRAD_TOL, TOL, noncontiguous, peak_extra_cpu_bytes, ref_lora_linear

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

QL = torch.ops.lora_ext.lora_linear_quantized.default
LQ = torch.ops.lora_ext.linear_quantized.default
CASES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
]


def qweight(qtype, out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quant.quantize(torch.randn(out_f, in_f, generator=g) / in_f**0.5, qtype)


def inputs(lead, qw, r, dtype, adtype, bias=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    in_f, out_f = qw.in_features, qw.out_features
    x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(out_f, generator=g, dtype=torch.float64).to(dtype) if bias else None
    a = (torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f**0.5).to(adtype)
    bb = (torch.randn(out_f, r, generator=g, dtype=torch.float64) / r**0.5).to(adtype)
    return x, b, a, bb


def grads(y, g, tensors):
    ts = [t for t in tensors if t is not None]
    return torch.autograd.grad(y, ts, g)


@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("dtype,adtype", CASES)
@pytest.mark.parametrize(
    "lead,r,bias",
    [((5,), 4, True), ((2, 3), 1, False), ((0,), 2, True), ((1,), 3, True), ((2, 2), 2, False), ((3,), 1, True)],
)
def test_matches_float64_reference(qtype, dtype, adtype, lead, r, bias):
    qw = qweight(qtype, 7, 128)
    x, b, a, bb = inputs(lead, qw, r, dtype, adtype, bias)
    w = qw.dequantize()
    for t in (x, b, a, bb):
        if t is not None:
            t.requires_grad_(True)
    y = ops.lora_linear_quantized(x, qw, b, a, bb, 0.7)
    assert y.dtype == dtype and y.shape == (*lead, 7)
    x64, b64, a64, bb64 = (None if t is None else t.detach().double().requires_grad_(True) for t in (x, b, a, bb))
    ref = ref_lora_linear(x64, w, b64, a64, bb64, 0.7)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    g = torch.randn(y.shape, dtype=torch.float64)
    got = grads(y, g.to(dtype), (x, b, a, bb))
    want = grads(ref, g, (x64, b64, a64, bb64))
    gatol, grtol = GRAD_TOL[dtype]
    for gg, ww, t in zip(got, want, [t for t in (x, b, a, bb) if t is not None]):
        assert gg.dtype == t.dtype and gg.shape == t.shape
        torch.testing.assert_close(gg.double(), ww, atol=gatol, rtol=grtol)


@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_equals_dense_op_on_dequantized_weight(qtype, p):
    """Same seed, same dropout mask: the quantized op is lora_linear on the dequantized weight, several weight
    tiles (out = 150 rows of in = 16384: 64-row tiles of 4 MiB), non-contiguous x."""
    qw = qweight(qtype, 150, 16384)
    w = qw.dequantize()
    x, b, a, bb = inputs((2, 3), qw, 3, torch.float32, torch.float32)
    x = noncontiguous(x.reshape(6, -1)).reshape(2, 3, -1)
    outs = []
    for fn in (
        lambda *t: ops.lora_linear_quantized(t[0], qw, *t[1:], 0.5, p, True),
        lambda *t: ops.lora_linear(t[0], w, *t[1:], 0.5, p, True),
    ):
        ts = [t.detach().clone().requires_grad_(True) for t in (x, b, a, bb)]
        torch.manual_seed(7)
        y = fn(*ts)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), *[t.grad for t in ts]))
    for q, d in zip(*outs):
        torch.testing.assert_close(q, d, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_quantized(qtype, dtype):
    qw = qweight(qtype, 9, 64 * 3)
    x, b, _, _ = inputs((4, 2), qw, 1, dtype, torch.float32)
    x.requires_grad_(True)
    b.requires_grad_(True)
    y = ops.linear_quantized(x, qw, b)
    x64, b64 = (t.detach().double().requires_grad_(True) for t in (x, b))
    ref = x64 @ qw.dequantize().double().T + b64
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    g = torch.randn(y.shape, dtype=torch.float64)
    for got, want in zip(grads(y, g.to(dtype), (x, b)), grads(ref, g, (x64, b64))):
        torch.testing.assert_close(got.double(), want, atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])
    assert ops.linear_quantized(x[:0], qw).shape == (0, 2, 9)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("qtype", ["int8", "q4_1", "nf4"])
def test_gradcheck_float64(p, qtype):
    qw = qweight(qtype, 5, 64)
    x, b, a, bb = inputs((3,), qw, 2, torch.float64, torch.float64)
    ts = tuple(t.requires_grad_(True) for t in (x, b, a, bb))

    def fn(x, b, a, bb):
        torch.manual_seed(1234)
        return ops.lora_linear_quantized(x, qw, b, a, bb, 0.8, p, True)

    assert torch.autograd.gradcheck(fn, ts)
    assert torch.autograd.gradcheck(lambda x, b: ops.linear_quantized(x, qw, b), ts[:2])


def _args(qw, x, b, a, bb, *rest):
    return (x, qw.qdata, qw.qscale, qw.qtype, qw.out_features, qw.in_features, b, a, bb, *rest)


@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("dtype,adtype", CASES)
def test_opcheck(qtype, dtype, adtype):
    qw = qweight(qtype, 6, 64)
    for lead, rg in [((4,), True), ((0,), False)]:
        x, b, a, bb = inputs(lead, qw, 3, dtype, adtype)
        if rg and dtype in (torch.float32, torch.float64):
            for t in (x, a, bb):
                t.requires_grad_(True)
        torch.library.opcheck(QL, _args(qw, x, b, a, bb, 0.5, 0.0, False))
        torch.library.opcheck(LQ, _args(qw, x, b, a, bb)[:7])


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,adtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_opcheck_pieces(p, dtype, adtype):
    qw = qweight("nf4", 6, 128)
    x, b, a, bb = inputs((2, 3), qw, 3, dtype, adtype)
    seed = torch.tensor([987654321], dtype=torch.long) if p > 0 else None
    fwd = torch.ops.lora_ext._lora_linear_quantized_forward.default
    y, h = fwd(*_args(qw, x, b, a, bb, 0.5, p, seed))
    torch.library.opcheck(fwd, _args(qw, x, b, a, bb, 0.5, p, seed))
    g = torch.randn_like(y)
    _, _, gh = torch.ops.lora_ext._lora_linear_backward_lora(g, x, a, bb, h, 0.5, p, seed)
    bwd = torch.ops.lora_ext._lora_linear_quantized_backward_input.default
    base = (qw.qdata, qw.qscale, qw.qtype, 6, 128)
    torch.library.opcheck(bwd, (g, *base, a, gh, p, seed))
    torch.library.opcheck(bwd, (g, *base, None, None, 0.0, None))


def test_scratch_is_bounded():
    """A 1024 x 4096 weight would be 16 MiB in float32; forward and backward allocate at most one 4 MiB tile
    (plus the small activations), never the whole weight."""
    qw = qweight("q4_1", 1024, 4096)
    x, b, a, bb = inputs((4,), qw, 8, torch.float32, torch.float32)
    a.requires_grad_(True)
    x.requires_grad_(True)

    def step():
        y = ops.lora_linear_quantized(x, qw, b, a, bb, 0.5)
        y.sum().backward()

    dense = 1024 * 4096 * 4
    assert peak_extra_cpu_bytes(step) < dense // 3


def test_non_finite_block_scale_names_the_row():
    qw = qweight("q8_0", 4, 64)
    raw = qw.qdata.clone()
    raw[2, 34:36] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # fp16 +inf scale, second block of row 2
    bad = quant.QuantizedWeight(raw, None, "q8_0", 4, 64)
    x, b, a, bb = inputs((3,), bad, 2, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="non-finite scale in row 2"):
        ops.lora_linear_quantized(x, bad, b, a, bb, 0.5)


def _bad(qw, **kw):
    x, b, a, bb = inputs((3,), qw, 2, torch.float32, torch.float32)
    args = dict(
        x=x,
        qdata=qw.qdata,
        qscale=qw.qscale,
        qtype=qw.qtype,
        out=qw.out_features,
        inn=qw.in_features,
        b=b,
        a=a,
        bb=bb,
        scale=0.5,
        p=0.0,
    )
    args.update(kw)
    return QL(
        args["x"],
        args["qdata"],
        args["qscale"],
        args["qtype"],
        args["out"],
        args["inn"],
        args["b"],
        args["a"],
        args["bb"],
        args["scale"],
        args["p"],
        False,
    )


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(qtype="q6_k"), ValueError, "expected qtype 'int8', 'q8_0', 'q4_0', 'q4_1' or 'nf4', got 'q6_k'"),
        (dict(inn=48), ValueError, "expected in_features divisible by 32, got 48"),
        (dict(qscale=torch.ones(3)), ValueError, "keeps its scales inside its blocks: expected qscale None"),
        (dict(x=torch.randn(3, 32)), RuntimeError, "expected x of shape \\[..., in\\] with in = 64"),
        (dict(b=torch.zeros(4, dtype=torch.float64)), RuntimeError, "expected bias of dtype Float"),
        (dict(b=torch.zeros(5)), RuntimeError, "expected bias of shape \\[4\\]"),
        (dict(a=torch.randn(2, 32)), RuntimeError, "expected lora_A of shape \\[r, in\\] with in = 64"),
        (dict(bb=torch.randn(4, 3)), RuntimeError, "expected lora_B of shape \\[out, r\\] with r = 2"),
        (dict(p=1.0), ValueError, "expected 0 <= dropout_p < 1, got 1"),
        (dict(scale=float("nan")), ValueError, "expected a finite scale"),
        (dict(out=5), RuntimeError, "expected q8_0 qdata of shape \\[5, 68\\]"),
        (dict(qdata=torch.zeros(4, 68, dtype=torch.int8)), RuntimeError, "expected q8_0 qdata of dtype uint8"),
    ],
)
def test_bad_inputs(change, exc, match):
    with pytest.raises(exc, match=match):
        _bad(qweight("q8_0", 4, 64), **change)


def test_bad_scales_and_pieces():
    qw = qweight("nf4", 4, 128)
    with pytest.raises(RuntimeError, match="expected nf4 qscale of shape \\[4, 2\\]"):
        _bad(qw, qscale=torch.ones(4, 3))
    with pytest.raises(ValueError, match="expected a float32 qscale for nf4, got None"):
        _bad(qw, qscale=None)
    g = torch.randn(3, 4)
    bwd = torch.ops.lora_ext._lora_linear_quantized_backward_input
    with pytest.raises(RuntimeError, match="expected lora_A and grad_h given together"):
        bwd(g, qw.qdata, qw.qscale, "nf4", 4, 128, torch.randn(2, 128), None, 0.0, None)
    with pytest.raises(RuntimeError, match="expected grad_y of shape \\[..., 4\\]"):
        bwd(torch.randn(3, 5), qw.qdata, qw.qscale, "nf4", 4, 128, None, None, 0.0, None)
    with pytest.raises(RuntimeError, match="expected grad_h of shape \\[N, r\\] = \\[3, 2\\]"):
        bwd(g, qw.qdata, qw.qscale, "nf4", 4, 128, torch.randn(2, 128), torch.randn(3, 5), 0.0, None)
