"""lora_linear_multi and lora_group_rows against a per-row float64 reference: dtypes, ranks,
padding, base rows, empty batches, layouts, gradients, dropout, opcheck, gradcheck,
torch.compile (no recompilation when the ids change) and bad input. The forward, gradcheck,
opcheck and torch.compile tests are written once for every device (``device``: the CUDA cases
run where a GPU is); what only CUDA has is in test_cuda_multi.py."""

import pytest
import torch

from lora_ext import ops
from reference import DEVICES, GRAD_TOL, TOL, on, ref_multi

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

multi = torch.ops.lora_ext.lora_linear_multi
group = torch.ops.lora_ext.lora_group_rows

DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]


def make_multi(lead, i, o, ranks, dtype, adtype, bias=True, seed=0, p_base=0.25):
    """Random inputs: adapters of different ranks zero-padded to r_max, random ids with some -1 rows."""
    g = torch.Generator().manual_seed(seed)
    n, r_max = len(ranks), max(ranks)
    x = torch.randn(*lead, i, generator=g, dtype=torch.float64)
    w = torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5
    b = torch.randn(o, generator=g, dtype=torch.float64) if bias else None
    A = torch.zeros(n, r_max, i, dtype=torch.float64)
    B = torch.zeros(n, o, r_max, dtype=torch.float64)
    for a, r in enumerate(ranks):
        A[a, :r] = torch.randn(r, i, generator=g, dtype=torch.float64) / i**0.5
        B[a, :, :r] = torch.randn(o, r, generator=g, dtype=torch.float64) / r**0.5
    scales = torch.rand(n, generator=g) + 0.25
    N = 1
    for d in lead:
        N *= d
    ids = torch.randint(0, n, (N,), generator=g)
    ids[torch.rand(N, generator=g) < p_base] = -1
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), A.to(adtype), B.to(adtype), scales, ids


SHAPES = [
    ((37,), 40, 24, [5, 2, 3]),
    ((4, 9), 33, 17, [1]),
    ((0,), 16, 12, [4, 2]),
    ((3, 0, 2), 8, 6, [2, 2]),
    ((5,), 0, 6, [2, 1]),
    ((4,), 7, 0, [3]),
    ((0,), 0, 0, [1]),  # in or out = 0
    ((300,), 64, 70, [16, 8, 1, 4, 12, 3, 7, 16]),
    ((20,), 9, 300, [3, 1]),
    ((4, 9), 4097, 17, [1]),
    ((64,), 64, 300, [128, 8, 1]),
    ((20,), 9, 33, [16, 1, 3, 7]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,adtype", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_per_row_reference(device, dtype, adtype, shape, bias):
    lead, i, o, ranks = shape
    args = make_multi(lead, i, o, ranks, dtype, adtype, bias=bias)
    x, w, b, A, B, s, ids = on(device, *args)
    y = multi(x, w, b, A, B, s, ids)
    assert y.device.type == device and y.shape == (*lead, o) and y.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.cpu().double(), ref_multi(*args, ranks), atol=atol, rtol=rtol)
    # int32 ids and an explicit grouping give the same result; the grouping is the CPU kernel's
    order, offsets = group(ids.int(), len(ranks))
    o_cpu, off_cpu = group(args[-1], len(ranks))
    assert torch.equal(order.cpu(), o_cpu) and torch.equal(offsets.cpu(), off_cpu)
    torch.testing.assert_close(multi(x, w, b, A, B, s, ids.int(), 0.0, False, order, offsets), y, atol=0, rtol=0)


def test_all_base_rows_and_single_adapter_equal_lora_linear():
    x, w, b, A, B, s, ids = make_multi((50,), 32, 20, [4, 4], torch.float32, torch.float32)
    base = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(multi(x, w, b, A, B, s, torch.full((50,), -1)), base, atol=1e-5, rtol=1e-5)
    one = multi(x, w, b, A, B, s, torch.ones(50, dtype=torch.long))
    torch.testing.assert_close(one, ops.lora_linear(x, w, b, A[1], B[1], float(s[1])), atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_results():
    # garbage-free padding is the caller's job, but padded zeros must be exact no-ops
    x, w, b, A, B, s, ids = make_multi((40,), 24, 16, [3, 5], torch.float32, torch.float32, p_base=0)
    y = multi(x, w, b, A, B, s, ids)
    Ap = torch.cat([A, torch.zeros(2, 11, 24)], 1)
    Bp = torch.cat([B, torch.zeros(2, 16, 11)], 2)
    torch.testing.assert_close(multi(x, w, b, Ap, Bp, s, ids), y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_noncontiguous_inputs_and_transposed_B_layout(dtype):
    adt = torch.float32 if dtype == torch.bfloat16 else dtype
    x, w, b, A, B, s, ids = make_multi((6, 7), 24, 20, [6, 3, 2], dtype, adt)
    want = ref_multi(x, w, b, A, B, s, ids)
    xs = torch.empty(7, 6, 24, dtype=dtype).transpose(0, 1)
    xs.copy_(x)
    Bt = B.transpose(1, 2).contiguous()  # [n, r, out]: the module's storage layout
    args = [
        xs,
        w.t().contiguous().t(),
        b,
        A.transpose(1, 2).contiguous().transpose(1, 2),
        Bt.transpose(1, 2),
        s[::1],
        ids.view(6, 7).t().contiguous().t().reshape(-1),
    ]
    assert not args[0].is_contiguous() and not args[1].is_contiguous() and not args[3].is_contiguous()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(multi(*args).double(), want, atol=atol, rtol=rtol)
    xv = torch.randn(42, 48, dtype=dtype)[:, ::2]  # strided rows
    torch.testing.assert_close(
        multi(xv, w, b, A, B, s, ids).double(), ref_multi(xv, w, b, A, B, s, ids), atol=atol, rtol=rtol
    )


def test_group_rows_is_a_stable_counting_sort():
    ids = torch.tensor([2, -1, 0, 2, 2, -1, 1, 0])
    order, offsets = group(ids, 4)
    assert order.tolist() == [2, 7, 6, 0, 3, 4, 1, 5]
    assert offsets.tolist() == [0, 2, 3, 6, 6, 8]  # adapter 3 has no rows; base rows last
    order, offsets = group(torch.empty(0, dtype=torch.int32), 3)
    assert order.shape == (0,) and offsets.tolist() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize("dtype,adtype", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("grad_base", [False, True])
def test_gradients_match_reference(dtype, adtype, grad_base):
    ranks = [3, 1, 4]
    x, w, b, A, B, s, ids = make_multi((6, 11), 20, 14, ranks, dtype, adtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
    base = [t.clone().requires_grad_(grad_base) for t in (w, b)]
    y = multi(leaves[0], base[0], base[1], leaves[1], leaves[2], s, ids)
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g.to(dtype))
    refs = [t.detach().double().requires_grad_(True) for t in (x, w, b, A, B)]
    ref_multi(*refs, s, ids).backward(g)
    got = {"x": leaves[0].grad, "A": leaves[1].grad, "B": leaves[2].grad}
    want = {"x": refs[0].grad, "A": refs[3].grad, "B": refs[4].grad}
    if grad_base:
        got.update(W=base[0].grad, b=base[1].grad)
        want.update(W=refs[1].grad, b=refs[2].grad)
    else:
        assert base[0].grad is None and base[1].grad is None
    for k in got:
        assert got[k].dtype == (adtype if k in ("A", "B") else dtype), k
        atol, rtol = GRAD_TOL[dtype]
        torch.testing.assert_close(got[k].double(), want[k], atol=atol, rtol=rtol, msg=k)
    # adapters without rows get exactly zero gradient; padded rank slots stay zero for B's columns
    unused = set(range(3)) - set(ids.tolist())
    for a in unused:
        assert leaves[1].grad[a].abs().max() == 0


def test_gradient_equals_training_each_adapter_on_its_rows():
    x, w, b, A, B, s, ids = make_multi((64,), 16, 12, [4, 4, 4], torch.float64, torch.float64)
    Am, Bm = A.clone().requires_grad_(), B.clone().requires_grad_()
    multi(x, w, b, Am, Bm, s, ids).square().sum().backward()
    for a in range(3):
        rows = ids == a
        Aa, Ba = A[a].clone().requires_grad_(), B[a].clone().requires_grad_()
        ops.lora_linear(x[rows], w, b, Aa, Ba, float(s[a])).square().sum().backward()
        torch.testing.assert_close(Am.grad[a], Aa.grad, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(Bm.grad[a], Ba.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("p", [0.3])
def test_dropout_mask_is_the_single_op_mask(p):
    # with one adapter on every row, the multi op draws the same seed and mask as lora_linear
    x, w, b, A, B, s, _ = make_multi((40,), 24, 10, [4], torch.float32, torch.float32)
    ids = torch.zeros(40, dtype=torch.long)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    Aa, Ab = A.clone().requires_grad_(), A[0].clone().requires_grad_()
    torch.manual_seed(7)
    y1 = multi(xa, w, b, Aa, B, s, ids, p, True)
    torch.manual_seed(7)
    y2 = ops.lora_linear(xb, w, b, Ab, B[0], float(s[0]), p, True)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y1, multi(x, w, b, A, B, s, ids)), "dropout had no effect"
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Aa.grad[0], Ab.grad, atol=1e-5, rtol=1e-5)
    # eval mode: no dropout
    torch.testing.assert_close(multi(x, w, b, A, B, s, ids, p, False), multi(x, w, b, A, B, s, ids), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_float64(device, dropout):
    x, w, b, A, B, s, ids = on(device, *make_multi((3, 4), 7, 5, [3, 2], torch.float64, torch.float64))
    for t in (x, w, b, A, B):
        t.requires_grad_(True)

    def fn(x, w, b, A, B):
        torch.manual_seed(1234)
        return multi(x, w, b, A, B, s, ids, dropout, True)

    assert torch.autograd.gradcheck(fn, (x, w, b, A, B))


def _opcheck_samples(device):
    out = []
    for dtype, adtype in [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ]:
        for lead, rg, grouped in [((9,), True, False), ((2, 5), False, True), ((0,), True, False)]:
            x, w, b, A, B, s, ids = on(device, *make_multi(lead, 12, 10, [3, 1, 2], dtype, adtype))
            if rg and dtype in (torch.float32, torch.float64):
                for t in (x, A, B):
                    t.requires_grad_(True)
            grouping = tuple(group(ids, 3)) if grouped else (None, None)
            out.append((x, w, b, A, B, s, ids, 0.0, False, *grouping))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", range(12))
def test_opcheck_lora_linear_multi(device, sample):
    torch.library.opcheck(multi.default, _opcheck_samples(device)[sample])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,adtype", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_internal_pieces(device, dtype, adtype, p):
    x, w, b, A, B, s, ids = on(device, *make_multi((3, 5), 12, 10, [3, 2], dtype, adtype))
    order, offsets = group(ids, 2)
    # a host tensor either way; with CUDA tensors a 0-dim one, as the autograd kernel draws it (FakeTensor
    # takes CPU scalars next to CUDA tensors), on the CPU also the one-element 1-D form
    seed = None if p == 0 else torch.tensor(987654321) if device == "cuda" else torch.tensor([987654321])
    torch.library.opcheck(group.default, (ids, 2))
    fwd = (x, w, b, A, B, s, ids, order, offsets, p, seed)
    torch.library.opcheck(torch.ops.lora_ext._lora_linear_multi_forward.default, fwd)
    y, h = torch.ops.lora_ext._lora_linear_multi_forward(*fwd)
    g = torch.randn_like(y)
    bl = (g, x, A, B, s, order, offsets, h, p, seed)
    torch.library.opcheck(torch.ops.lora_ext._lora_linear_multi_backward_lora.default, bl)
    _, _, gh = torch.ops.lora_ext._lora_linear_multi_backward_lora(*bl)
    torch.library.opcheck(
        torch.ops.lora_ext._lora_linear_multi_backward_input.default, (g, w, A, gh, order, offsets, p, seed)
    )


class _Multi(torch.nn.Module):
    def __init__(self, device):
        super().__init__()
        x, w, b, A, B, s, _ = on(device, *make_multi((1,), 16, 12, [4, 2, 3], torch.float32, torch.float32))
        self.w, self.b = torch.nn.Parameter(w, requires_grad=False), torch.nn.Parameter(b, requires_grad=False)
        self.A, self.B = torch.nn.Parameter(A), torch.nn.Parameter(B)
        self.register_buffer("s", s)

    def forward(self, x, ids):
        order, offsets = group(ids, 3)
        return multi(x, self.w, self.b, self.A, self.B, self.s, ids, 0.0, False, order, offsets)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_no_recompile_when_ids_change(device):
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounter

    m = _Multi(device)
    counter = CompileCounter()
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    inductor = torch.compile(m, fullgraph=True)
    plain = torch.compile(lambda x, ids: multi(x, m.w, m.b, m.A, m.B, m.s, ids), fullgraph=True)  # grouped inside
    x = torch.randn(24, 16, device=device, requires_grad=True)
    for seed in range(3):
        ids = torch.randint(-1, 3, (24,), generator=torch.Generator().manual_seed(seed)).to(device)
        y = m(x, ids)
        torch.testing.assert_close(compiled(x, ids), y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain(x, ids), y, atol=1e-5, rtol=1e-5)
        yc = inductor(x, ids)
        torch.testing.assert_close(yc, y, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(y)
        ref = torch.autograd.grad(y, (x, m.A, m.B), g)
        got = torch.autograd.grad(yc, (x, m.A, m.B), g)
        for a, b_ in zip(got, ref):
            torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1, f"recompiled {counter.frame_count} times as ids changed"


BAD = {
    "id too large": (
        dict(ids=lambda ids: torch.full_like(ids, 3)),
        IndexError,
        r"lora_group_rows: expected adapter ids in \[-1, 3\)",
    ),
    "id below -1": (dict(ids=lambda ids: torch.full_like(ids, -2)), IndexError, "got adapter_ids"),
    "float ids": (dict(ids=lambda ids: ids.float()), RuntimeError, "adapter_ids of dtype int32 or int64"),
    "ids wrong length": (dict(ids=lambda ids: ids[:-1]), RuntimeError, "adapter_ids of shape"),
    "scales wrong length": (dict(s=lambda s: s[:2]), RuntimeError, "scales of shape"),
    "scales int": (dict(s=lambda s: s.long()), RuntimeError, "scales of dtype float32"),
    "B stack mismatch": (dict(B=lambda B: B[:2]), RuntimeError, "lora_B of shape"),
    "A 2-D": (dict(A=lambda A: A[0]), RuntimeError, "lora_A to have 3 dims"),
    "A wrong in": (dict(A=lambda A: A[:, :, :-1]), RuntimeError, "lora_A of shape"),
    "adapter dtype": (dict(A=lambda A: A.double(), B=lambda B: B.double()), RuntimeError, "lora_A/lora_B of dtype"),
    "nan scale": (dict(s=lambda s: torch.tensor([1.0, float("nan"), 1.0])), ValueError, "finite scales"),
    "ids 2-D": (dict(ids=lambda ids: ids.view(2, 5)), RuntimeError, r"expected adapter_ids to have 1 dims \[N\]"),
    "r_max 0": (dict(A=lambda A: A[:, :0], B=lambda B: B[:, :, :0]), ValueError, r"expected r_max >= 1"),
    "x/weight dtype": (dict(w=lambda w: w.double()), RuntimeError, r"expected weight of dtype Float \(x's dtype\)"),
    "dropout 1": (dict(p=lambda p: 1.0), ValueError, r"expected 0 <= dropout_p < 1, got 1"),
    "dropout negative": (dict(p=lambda p: -0.5), ValueError, r"expected 0 <= dropout_p < 1, got -0.5"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_input_raises_clear_errors(case):
    changes, exc, match = BAD[case]
    x, w, b, A, B, s, ids = make_multi((10,), 8, 6, [2, 2, 2], torch.float32, torch.float32)
    args = dict(x=x, w=w, b=b, A=A, B=B, s=s, ids=ids, p=0.0)
    for k, f in changes.items():
        args[k] = f(args[k])
    with pytest.raises(exc, match=f"lora_ext::.*{match}"):
        multi(args["x"], args["w"], args["b"], args["A"], args["B"], args["s"], args["ids"], args["p"])


def test_bad_grouping_is_refused():
    x, w, b, A, B, s, ids = make_multi((10,), 8, 6, [2, 2], torch.float32, torch.float32)
    order, offsets = group(ids, 2)
    with pytest.raises(RuntimeError, match="group_order and group_offsets together"):
        multi(x, w, b, A, B, s, ids, 0.0, False, order, None)
    other = ids.clone()
    other[ids == 0], other[ids == 1] = 1, 0
    if (ids >= 0).any():
        with pytest.raises(ValueError, match="lora_ext::lora_linear_multi: group_order.* but adapter_ids"):
            multi(x, w, b, A, B, s, other, 0.0, False, order, offsets)
    dup = order.clone()
    dup[1] = dup[0]
    with pytest.raises(ValueError, match="permutation"):
        multi(x, w, b, A, B, s, ids, 0.0, False, dup, offsets)
    with pytest.raises(RuntimeError, match="group_offsets of shape"):
        multi(x, w, b, A, B, s, ids, 0.0, False, order, offsets[:-1])
    with pytest.raises(ValueError, match="group_offsets"):
        multi(x, w, b, A, B, s, ids, 0.0, False, order, offsets.flip(0))
    with pytest.raises(
        RuntimeError,
        match=r"expected group_order and group_offsets of dtype int64 \(from "
        r"lora_group_rows\), got Int and Int",
    ):
        multi(x, w, b, A, B, s, ids, 0.0, False, order.int(), offsets.int())


def test_group_rows_bad_input():
    with pytest.raises(ValueError, match="lora_ext::lora_group_rows: expected n_adapters >= 0, got -1"):
        group(torch.tensor([0, -1]), -1)
    with pytest.raises(
        RuntimeError,
        match=r"lora_ext::lora_group_rows: expected adapter_ids of shape \[N\], got "
        r"\[2, 2\]",
    ):
        group(torch.zeros(2, 2, dtype=torch.long), 3)
    with pytest.raises(RuntimeError, match="lora_ext::lora_group_rows: expected adapter_ids of dtype int32 or int64"):
        group(torch.zeros(4), 3)
    with pytest.raises(
        IndexError,
        match=r"lora_ext::lora_group_rows: expected adapter ids in \[-1, 3\) .* got "
        r"adapter_ids\[1\] = 5",
    ):
        group(torch.tensor([0, 5]), 3)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["runs", "scattered"])
def test_large_outputs_take_the_run_and_fused_paths(bias, layout):
    # N * out >= 2^22 with long same-adapter runs takes the BLAS run path; scattered ids the fused one
    N, i, o, ranks = 1024, 24, 4096, [16, 3, 7, 16]
    x, w, b, A, B, s, _ = make_multi((N,), i, o, ranks, torch.float32, torch.float32, bias=bias)
    g = torch.Generator().manual_seed(3)
    if layout == "runs":
        ids = torch.randint(-1, 4, (N // 16,), generator=g).repeat_interleave(16)
    else:
        ids = torch.randint(-1, 4, (N,), generator=g)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    for a in range(4):
        m = ids == a
        want[m] += float(s[a]) * (x[m].double() @ A[a].double().T) @ B[a].double().T
    for Bv in (B, B.transpose(1, 2).contiguous().transpose(1, 2)):
        torch.testing.assert_close(multi(x, w, b, A, Bv, s, ids).double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("i,o", [(0, 6), (7, 0)])
def test_gradients_with_in_or_out_zero(i, o):
    # reshape({-1, in}) of an empty x (in = 0) or grad_y (out = 0) used to fail
    x, w, b, A, B, s, ids = make_multi((5,), i, o, [2, 1], torch.float64, torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, A, B)]
    y = multi(leaves[0], leaves[1], b, leaves[2], leaves[3], s, ids, 0.3, True)
    torch.testing.assert_close(y.detach(), b.expand(5, o) if i == 0 else torch.zeros(5, 0, dtype=torch.float64))
    y.sum().backward()
    for t in leaves:
        assert t.grad.shape == t.shape and not t.grad.abs().gt(0).any()
