"""Per-row adapters on a quantized frozen base (issue 26): lora_linear_multi_quantized and its autograd pieces,
against a float64 reference built from the dequantized weight for every format, and against lora_linear_multi on
that dequantized weight (same seed, same dropout masks); opcheck; bad inputs naming the op."""

from __future__ import annotations

import pytest
import torch

from lora_ext import ops, quant
from reference import GRAD_TOL, TOL, noncontiguous, ref_multi

pytestmark = pytest.mark.numerics

QM = torch.ops.lora_ext.lora_linear_multi_quantized.default
CASES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
]


def qweight(qtype, out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quant.quantize(torch.randn(out_f, in_f, generator=g) / in_f**0.5, qtype)


def inputs(lead, qw, n, r, dtype, adtype, bias=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    in_f, out_f = qw.in_features, qw.out_features
    x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(out_f, generator=g, dtype=torch.float64).to(dtype) if bias else None
    a = (torch.randn(n, r, in_f, generator=g, dtype=torch.float64) / in_f**0.5).to(adtype)
    bb = (torch.randn(n, out_f, r, generator=g, dtype=torch.float64) / r**0.5).to(adtype)
    scales = torch.tensor([0.7, -1.3, 0.4][:n], dtype=torch.float32)
    return x, b, a, bb, scales


def row_ids(N, n, seed=2):
    """Every adapter and the base (-1) among N rows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, n, (N,), generator=g)


def grads(y, g, tensors):
    return torch.autograd.grad(y, [t for t in tensors if t is not None], g)


@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("dtype,adtype", CASES)
@pytest.mark.parametrize("lead,n,r,bias", [((7,), 3, 4, True), ((2, 3), 2, 1, False), ((0,), 2, 2, True)])
def test_matches_float64_reference(qtype, dtype, adtype, lead, n, r, bias):
    qw = qweight(qtype, 9, 128)
    x, b, a, bb, s = inputs(lead, qw, n, r, dtype, adtype, bias)
    N = x.numel() // x.shape[-1]
    ids = row_ids(N, n)
    w = qw.dequantize()
    for t in (x, b, a, bb):
        if t is not None:
            t.requires_grad_(True)
    y = ops.lora_linear_multi_quantized(x, qw, b, a, bb, s, ids)
    assert y.dtype == dtype and y.shape == (*lead, 9)
    if N == 0:
        return
    x64, b64, a64, bb64 = (None if t is None else t.detach().double().requires_grad_(True) for t in (x, b, a, bb))
    ref = ref_multi(x64, w, b64, a64, bb64, s, ids)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    g = torch.randn(y.shape, dtype=torch.float64)
    got = grads(y, g.to(dtype), (x, b, a, bb))
    want = grads(ref, g, (x64, b64, a64, bb64))
    gatol, grtol = GRAD_TOL[dtype]
    for gg, ww, t in zip(got, want, [t for t in (x, b, a, bb) if t is not None]):
        assert gg.dtype == t.dtype and gg.shape == t.shape
        torch.testing.assert_close(gg.double(), ww, atol=gatol, rtol=grtol)


def test_base_rows_and_empty_batch():
    qw = qweight("q4_0", 5, 64)
    x, b, a, bb, s = inputs((4,), qw, 2, 3, torch.float32, torch.float32)
    ids = torch.full((4,), -1)
    torch.testing.assert_close(ops.lora_linear_multi_quantized(x, qw, b, a, bb, s, ids), ops.linear_quantized(x, qw, b))
    x0 = x[:0].requires_grad_(True)
    a.requires_grad_(True)
    y0 = ops.lora_linear_multi_quantized(x0, qw, b, a, bb, s, ids[:0], 0.2, True)
    assert y0.shape == (0, 5)
    y0.sum().backward()
    assert x0.grad.shape == (0, 64) and a.grad.abs().sum() == 0


@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_equals_multi_op_on_dequantized_weight(qtype, p):
    """Same seed, same dropout masks: the op is lora_linear_multi on the dequantized weight, over several weight
    tiles (out = 150 rows of in = 16384: 64-row tiles of 4 MiB on the CPU), non-contiguous x."""
    qw = qweight(qtype, 150, 16384)
    w = qw.dequantize()
    x, b, a, bb, s = inputs((2, 3), qw, 3, 2, torch.float32, torch.float32)
    x = noncontiguous(x.reshape(6, -1)).reshape(2, 3, -1)
    ids = torch.tensor([0, -1, 2, 0, 1, 2])
    order, offsets = ops.lora_group_rows(ids, 3)
    outs = []
    for fn in (
        lambda x, b, a, bb: ops.lora_linear_multi_quantized(x, qw, b, a, bb, s, ids, p, True, order, offsets),
        lambda x, b, a, bb: ops.lora_linear_multi(x, w, b, a, bb, s, ids, p, True, order, offsets),
    ):
        ts = [t.detach().clone().requires_grad_(True) for t in (x, b, a, bb)]
        torch.manual_seed(7)
        y = fn(*ts)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), *[t.grad for t in ts]))
    for q, d in zip(*outs):
        torch.testing.assert_close(q, d, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", ["int8", "q4_1", "nf4"])
def test_gradcheck_float64(qtype):
    qw = qweight(qtype, 5, 64)
    x, b, a, bb, s = inputs((4,), qw, 2, 2, torch.float64, torch.float64)
    ids = torch.tensor([1, -1, 0, 1])
    ts = tuple(t.requires_grad_(True) for t in (x, b, a, bb))

    def fn(x, b, a, bb):
        torch.manual_seed(1234)
        return ops.lora_linear_multi_quantized(x, qw, b, a, bb, s, ids, 0.25, True)

    assert torch.autograd.gradcheck(fn, ts)


def _args(qw, x, b, a, bb, *rest):
    return (x, qw.qdata, qw.qscale, qw.qtype, qw.out_features, qw.in_features, b, a, bb, *rest)


@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("dtype,adtype", [CASES[0], CASES[2]])
def test_opcheck(qtype, dtype, adtype):
    qw = qweight(qtype, 6, 64)
    for lead, rg in [((5,), True), ((0,), False)]:
        x, b, a, bb, s = inputs(lead, qw, 2, 3, dtype, adtype)
        ids = row_ids(lead[0], 2)
        if rg and dtype == torch.float32:
            for t in (x, b, a, bb):
                t.requires_grad_(True)
        torch.library.opcheck(QM, _args(qw, x, b, a, bb, s, ids, 0.0, False, None, None))
        order, offsets = ops.lora_group_rows(ids, 2)
        torch.library.opcheck(QM, _args(qw, x, b, a, bb, s, ids, 0.0, False, order, offsets))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck_pieces(p):
    qw = qweight("q8_0", 6, 64)
    x, b, a, bb, s = inputs((5,), qw, 2, 3, torch.float32, torch.float32)
    ids = torch.tensor([1, -1, 0, 1, 0])
    order, offsets = ops.lora_group_rows(ids, 2)
    seed = torch.tensor([42], dtype=torch.long) if p > 0 else None
    fwd = torch.ops.lora_ext._lora_linear_multi_quantized_forward.default
    torch.library.opcheck(fwd, _args(qw, x, b, a, bb, s, ids, order, offsets, p, seed))
    _, h = fwd(*_args(qw, x, b, a, bb, s, ids, order, offsets, p, seed))
    g = torch.randn(5, 6)
    gh = torch.randn_like(h)
    bwd = torch.ops.lora_ext._lora_linear_multi_quantized_backward_input.default
    torch.library.opcheck(bwd, (g, qw.qdata, qw.qscale, qw.qtype, 6, 64, a, gh, order, offsets, p, seed))


def _bad(change):
    qw = qweight("nf4", 4, 128)
    x, b, a, bb, s = inputs((3,), qw, 2, 2, torch.float32, torch.float32)
    args = dict(
        x=x,
        qdata=qw.qdata,
        qscale=qw.qscale,
        qtype="nf4",
        out=4,
        in_=128,
        bias=b,
        a=a,
        bb=bb,
        s=s,
        ids=torch.tensor([0, 1, -1]),
    )
    args.update(change(args))
    return args


BAD = {
    "qtype": (lambda d: {"qtype": "q5_k"}, ValueError, "lora_linear_multi_quantized: expected qtype 'int8'"),
    "qdata shape": (
        lambda d: {"qdata": d["qdata"][:3]},
        RuntimeError,
        "lora_linear_multi_quantized: expected nf4 qdata of shape \\[4, 64\\]",
    ),
    "x in": (
        lambda d: {"x": d["x"][:, :64]},
        RuntimeError,
        "lora_linear_multi_quantized: expected x of shape \\[..., in\\] with in = 128",
    ),
    "A in": (
        lambda d: {"a": d["a"][:, :, :64]},
        RuntimeError,
        "lora_linear_multi_quantized: expected lora_A of shape \\[n_adapters, r_max, in\\] with in = 128",
    ),
    "B out": (
        lambda d: {"bb": d["bb"][:, :3]},
        RuntimeError,
        "lora_linear_multi_quantized: expected lora_B of shape \\[n_adapters, out, r_max\\] = \\[2, 4, 2\\]",
    ),
    "ids rows": (
        lambda d: {"ids": torch.tensor([0, 1])},
        RuntimeError,
        "lora_linear_multi_quantized: expected adapter_ids of shape \\[N\\] with N = 3",
    ),
    "id range": (lambda d: {"ids": torch.tensor([0, 2, -1])}, IndexError, "expected adapter ids in \\[-1, 2\\)"),
    "dropout": (lambda d: {"p": 1.0}, ValueError, "lora_linear_multi_quantized: expected 0 <= dropout_p < 1"),
}


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "autograd"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case, grad):
    change, exc, match = BAD[case]
    d = _bad(change)
    if grad:
        d["a"].requires_grad_(True)
    with pytest.raises(exc, match=match):
        QM(
            d["x"], d["qdata"], d["qscale"], d["qtype"], d["out"], d["in_"], d["bias"], d["a"], d["bb"], d["s"],
            d["ids"], d.get("p", 0.0), True,
        )  # fmt: skip


def test_bad_backward_input_piece():
    qw = qweight("q8_0", 4, 64)
    _, _, a, _, _ = inputs((3,), qw, 2, 2, torch.float32, torch.float32)
    order, offsets = ops.lora_group_rows(torch.tensor([0, 1, -1]), 2)
    bwd = torch.ops.lora_ext._lora_linear_multi_quantized_backward_input.default
    base = (qw.qdata, qw.qscale, qw.qtype, 4, 64)
    with pytest.raises(RuntimeError, match="_lora_linear_multi_quantized_backward_input: expected grad_y of shape"):
        bwd(torch.randn(3, 5), *base, a, torch.zeros(3, 2), order, offsets, 0.0, None)
    with pytest.raises(RuntimeError, match="expected grad_h of shape \\[N, r_max\\] = \\[3, 2\\]"):
        bwd(torch.randn(3, 4), *base, a, torch.zeros(3, 3), order, offsets, 0.0, None)
