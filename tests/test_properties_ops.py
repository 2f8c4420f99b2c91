"""Property-based tests (Hypothesis) of the compiled ops and LoraLinear against the float64 references
of tests/reference.py: random shapes (empty batches, in or out = 0, ranks above min(in, out)), every
dtype pair, layouts whose unused storage is NaN, scales including 0 and negative, dropout with the
op's own mask, gradients, and merge / exact-merge round trips. Examples per test: strategies.examples."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torch import nn

import lora_ext
from lora_ext import ops
from reference import (
    EXACT_CASES,
    GRAD_TOL,
    TOL,
    make_inputs,
    op_dropout_mask,
    ref_lora_linear,
    ref_merge_exact,
    ref_merge_exact_codes,
    ref_multi,
    ubits,
    wide_adapter,
    wide_weight,
)
from strategies import DTYPE_PAIRS, LAYOUTS, bits, dropout_ps, examples, outside_unchanged, place, randn, scales, seeds

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets


@st.composite
def leading_dims(draw, max_rows):
    """1 to 3 leading dims of x (zeros allowed) with at most ``max_rows`` rows in all."""
    dims = []
    for _ in range(draw(st.integers(1, 3))):
        dims.append(draw(st.integers(0, max(0, max_rows // max(1, math.prod(dims))))))
    return tuple(dims)


@st.composite
def problems(draw, max_rows=40, max_f=32, pairs=DTYPE_PAIRS):
    """(lead, in, out, r, dtype, adapter dtype): ranks from 1 to min(in, out) + 4."""
    dtype, adtype = draw(st.sampled_from(pairs))
    lead = draw(leading_dims(max_rows))
    i, o = draw(st.integers(0, max_f)), draw(st.integers(0, max_f))
    return lead, i, o, draw(st.integers(1, min(i, o) + 4)), dtype, adtype


def _x_layout(x, layout):
    if layout == "expanded" and x.dim() >= 2 and x.shape[-2] > 0:  # stride 0 over the last leading dim
        return x.narrow(-2, 0, 1).expand(x.shape)
    return place(x, "permuted" if layout == "expanded" else layout)


def _assert_close(got, want, tol, spread=1.0, what=""):
    atol, rtol = tol
    torch.testing.assert_close(got.double(), want, atol=atol * spread, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _grad_close(got, want, dtype, what):
    scale = max(1.0, want.abs().amax().item() if want.numel() else 1.0)
    _assert_close(got, want, GRAD_TOL[dtype], scale, what)


def _mask(train, p, torch_seed, x):
    """The op's keep mask for x ([..., in]) in training mode, else None; re-seeds for the op call."""
    if not (train and p > 0):
        return None
    mask = op_dropout_mask(torch_seed, p, math.prod(x.shape[:-1]), x.shape[-1]).reshape(x.shape)
    torch.manual_seed(torch_seed)
    return mask


# ---- lora_linear ---------------------------------------------------------------------------------


@settings(max_examples=examples(60))
@given(
    pb=problems(),
    bias=st.booleans(),
    lay=st.lists(st.sampled_from(LAYOUTS), min_size=4, max_size=4),
    x_lay=st.sampled_from(LAYOUTS + ["expanded"]),
    scale=scales(),
    p=dropout_ps(),
    train=st.booleans(),
    seed=seeds(),
)
def test_lora_linear_matches_reference(pb, bias, lay, x_lay, scale, p, train, seed):
    lead, i, o, r, dtype, adtype = pb
    x, w, b, a, bb = make_inputs(lead, i, o, r, dtype, adtype, bias=bias, seed=seed)
    x = _x_layout(x, x_lay)
    w, a, bb = place(w, lay[0]), place(a, lay[1]), place(bb, lay[2])
    b = None if b is None else place(b, lay[3])
    mask = _mask(train, p, seed, x)
    y = ops.lora_linear(x, w, b, a, bb, scale, p, train)
    assert y.shape == (*lead, o) and y.dtype == dtype
    want = ref_lora_linear(x, w, b, a, bb, scale, mask, p)
    _assert_close(y, want, TOL[dtype], max(1.0, abs(scale) / (1 - p)), "y")


@settings(max_examples=examples(60))
@given(
    pb=problems(max_rows=12, max_f=12),
    lay=st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3),
    scale=scales(),
    p=dropout_ps(),
    seed=seeds(),
    grad_base=st.booleans(),
)
def test_lora_linear_gradients_match_reference(pb, lay, scale, p, seed, grad_base):
    lead, i, o, r, dtype, adtype = pb
    x, w, b, a, bb = make_inputs(lead, i, o, r, dtype, adtype, seed=seed)
    leaves = [place(t, lay_).requires_grad_(True) for t, lay_ in zip((x, a, bb), lay)]
    base = [t.clone().requires_grad_(grad_base) for t in (w, b)]
    mask = _mask(True, p, seed, x)
    y = ops.lora_linear(leaves[0], base[0], base[1], leaves[1], leaves[2], scale, p, True)
    g = randn(torch.Generator().manual_seed(seed + 1), *y.shape)
    y.backward(g.to(dtype))
    refs = [t.detach().double().requires_grad_(True) for t in (x, w, b, a, bb)]
    ref_lora_linear(*refs, scale, mask, p).backward(g)
    got = {"x": leaves[0].grad, "A": leaves[1].grad, "B": leaves[2].grad}
    want = {"x": refs[0].grad, "A": refs[3].grad, "B": refs[4].grad}
    if grad_base:
        got.update(W=base[0].grad, b=base[1].grad)
        want.update(W=refs[1].grad, b=refs[2].grad)
    for k in got:
        assert got[k] is not None and got[k].dtype == (adtype if k in "AB" else dtype), k
        _grad_close(got[k], want[k], dtype, k)


# ---- merge_ / unmerge_ ---------------------------------------------------------------------------


def _assert_rounded_once(got, want, dtype, scale):
    """float32/float64: close to the float64 result; half types: computed in float32 and rounded once,
    so within one rounding step of the correctly rounded float64 result."""
    if dtype in (torch.float32, torch.float64):
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        _assert_close(got, want, (tol, tol), max(1.0, abs(scale)), "weight")
        return
    fi = torch.finfo(dtype)
    err = (got.double() - want.to(dtype).double()).abs()
    assert (err <= want.abs() * fi.eps + fi.smallest_normal).all(), err.max()


@settings(max_examples=examples(80))
@given(
    pb=problems(max_rows=1, max_f=40),
    lay=st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3),
    scale=scales(),
    seed=seeds(),
)
def test_merge_and_unmerge_match_reference(pb, lay, scale, seed):
    _, i, o, r, dtype, adtype = pb
    _, w0, _, a, b = make_inputs((1,), i, o, r, dtype, adtype, seed=seed)
    w, a, b = place(w0, lay[0]), place(a, lay[1]), place(b, lay[2])
    buffer = None if w._base is None else w._base.clone()
    delta = scale * b.double() @ a.double()
    ops.merge_(w, a, b, scale)
    _assert_rounded_once(w, w0.double() + delta, dtype, scale)
    merged = w.clone()
    ops.unmerge_(w, a, b, scale)
    _assert_rounded_once(w, merged.double() - delta, dtype, scale)
    if dtype in (torch.float32, torch.float64):
        _assert_close(w, w0.double(), (1e-6, 1e-6) if dtype == torch.float32 else (1e-12, 1e-12), max(1, abs(scale)))
    if buffer is not None:  # nothing written outside the view
        assert outside_unchanged(w, buffer)


@settings(max_examples=examples(150))
@given(
    pair=st.sampled_from(EXACT_CASES),
    o=st.integers(0, 24),
    i=st.integers(0, 24),
    extra_r=st.integers(0, 4),
    lay=st.sampled_from(LAYOUTS),
    wide=st.booleans(),
    scale=scales(),
    seed=seeds(),
)
def test_exact_merge_codes_bits_and_round_trip(pair, o, i, extra_r, lay, wide, scale, seed):
    dtype, adtype = pair
    r = 1 + extra_r + (min(i, o) if seed % 2 else 0)
    if wide and o * i >= 16:  # the dtype's whole range: subnormals, NaNs with payloads, +-Inf, +-0
        w0 = wide_weight(o, i, dtype, seed=seed)
    else:
        w0 = (randn(torch.Generator().manual_seed(seed), o, i) * 0.02).to(dtype)
    a, b = wide_adapter(i, o, r, adtype, seed=seed + 1)
    w = place(w0, lay)
    buffer = None if w._base is None else w._base.clone()
    codes = ops.merge_exact_codes(w, a, b, scale)
    ref = ref_merge_exact_codes(w0, a, b, scale)
    assert torch.equal(codes.codes, ref[0]) and torch.equal(codes.exc_index, ref[1])
    assert torch.equal(ubits(codes.exc_value), ubits(ref[2]))
    assert torch.equal(bits(w), bits(w0)), "merge_exact_codes changed the weight"
    ops.merge_exact_(w, a, b, scale)
    want = ref_merge_exact(w0, a, b, scale)
    assert ((ubits(w) == ubits(want)) | (torch.isnan(w) & torch.isnan(want))).all()
    ops.unmerge_exact_(w, codes, a, b, scale)
    assert torch.equal(ubits(w), ubits(w0)), "unmerge_exact_ did not restore the weight bit for bit"
    if buffer is not None:
        assert outside_unchanged(w, buffer)


# ---- lora_group_rows / lora_linear_multi ---------------------------------------------------------


@st.composite
def multi_problems(draw, max_rows=40, max_f=24, max_rank=6):
    """(lead, in, out, ranks, r_max, ids, dtype, adapter dtype): 0 to 4 adapters zero-padded to r_max."""
    lead, i, o, _, dtype, adtype = draw(problems(max_rows, max_f))
    ranks = draw(st.lists(st.integers(1, max_rank), max_size=4))
    r_max = max(ranks, default=1) + draw(st.integers(0, 2))
    ids = draw(st.lists(st.integers(-1, len(ranks) - 1), min_size=math.prod(lead), max_size=math.prod(lead)))
    return lead, i, o, ranks, r_max, torch.tensor(ids, dtype=torch.long), dtype, adtype


def _multi_inputs(lead, i, o, ranks, r_max, dtype, adtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x, w = randn(g, *lead, i), randn(g, o, i, scale=1 / max(1, i) ** 0.5)
    b = randn(g, o) if bias else None
    A = torch.zeros(len(ranks), r_max, i, dtype=torch.float64)
    B = torch.zeros(len(ranks), o, r_max, dtype=torch.float64)
    for k, r in enumerate(ranks):
        A[k, :r], B[k, :, :r] = randn(g, r, i, scale=1 / max(1, i) ** 0.5), randn(g, o, r, scale=r**-0.5)
    b = None if b is None else b.to(dtype)
    return x.to(dtype), w.to(dtype), b, A.to(adtype), B.to(adtype)


@settings(max_examples=examples(100))
@given(ids=st.lists(st.integers(-1, 5), max_size=50), extra=st.integers(0, 2), int32=st.booleans())
def test_group_rows_is_a_stable_counting_sort(ids, extra, int32):
    n = max(ids, default=-1) + 1 + extra
    order, offsets = ops.lora_group_rows(torch.tensor(ids, dtype=torch.int32 if int32 else torch.long), n)
    key = [a if a >= 0 else n for a in ids]  # base rows (-1) last
    assert order.tolist() == sorted(range(len(ids)), key=lambda k: key[k])
    assert offsets.tolist() == [sum(k < g for k in key) for g in range(n + 2)]


@settings(max_examples=examples(50))
@given(
    mp=multi_problems(),
    bias=st.booleans(),
    lay=st.lists(st.sampled_from(LAYOUTS), min_size=6, max_size=6),
    b_lay=st.sampled_from(LAYOUTS + ["stack"]),
    scale_list=st.lists(scales(), min_size=4, max_size=4),
    p=dropout_ps(),
    train=st.booleans(),
    int32=st.booleans(),
    s64=st.booleans(),
    seed=seeds(),
)
def test_lora_linear_multi_matches_per_row_reference(mp, bias, lay, b_lay, scale_list, p, train, int32, s64, seed):
    lead, i, o, ranks, r_max, ids, dtype, adtype = mp
    x, w, b, A, B = _multi_inputs(lead, i, o, ranks, r_max, dtype, adtype, seed, bias)
    s = torch.tensor(scale_list[: len(ranks)], dtype=torch.float64 if s64 else torch.float32)
    ids_in = place(ids.int() if int32 else ids, lay[5])  # unused storage: the dtype's max, an invalid id
    xv, wv, Av, bv, sv = (
        place(x, lay[0]),
        place(w, lay[1]),
        place(A, lay[2]),
        b if b is None else place(b, lay[3]),
        place(s, lay[4]),
    )
    Bv = B.transpose(1, 2).contiguous().transpose(1, 2) if b_lay == "stack" else place(B, b_lay)
    mask = _mask(train, p, seed, x)
    y = ops.lora_linear_multi(xv, wv, bv, Av, Bv, sv, ids_in, p, train)
    assert y.shape == (*lead, o) and y.dtype == dtype
    want = ref_multi(x, w, b, A, B, s, ids, ranks, None if mask is None else mask.reshape(len(ids), i), p)
    spread = max([1.0] + [abs(v) / (1 - p) for v in scale_list[: len(ranks)]])
    _assert_close(y, want, TOL[dtype], spread, "y")
    # an explicit grouping gives the same bits (and the same dropout mask)
    order, offsets = ops.lora_group_rows(ids_in, len(ranks))
    _mask(train, p, seed, x)
    y2 = ops.lora_linear_multi(xv, wv, bv, Av, Bv, sv, ids_in, p, train, order, offsets)
    assert torch.equal(bits(y2), bits(y))


@settings(max_examples=examples(50))
@given(
    mp=multi_problems(max_rows=12, max_f=10, max_rank=4),
    scale_list=st.lists(scales(), min_size=4, max_size=4),
    p=dropout_ps(),
    seed=seeds(),
    grad_base=st.booleans(),
)
def test_lora_linear_multi_gradients_match_reference(mp, scale_list, p, seed, grad_base):
    lead, i, o, ranks, r_max, ids, dtype, adtype = mp
    x, w, b, A, B = _multi_inputs(lead, i, o, ranks, r_max, dtype, adtype, seed)
    s = torch.tensor(scale_list[: len(ranks)], dtype=torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
    base = [t.clone().requires_grad_(grad_base) for t in (w, b)]
    mask = _mask(True, p, seed, x)
    y = ops.lora_linear_multi(leaves[0], base[0], base[1], leaves[1], leaves[2], s, ids, p, True)
    g = randn(torch.Generator().manual_seed(seed + 1), *y.shape)
    y.backward(g.to(dtype))
    refs = [t.detach().double().requires_grad_(True) for t in (x, w, b, A, B)]
    want = ref_multi(*refs, s, ids, None, None if mask is None else mask.reshape(len(ids), i), p)
    (want + sum(0 * t.sum() for t in refs)).backward(g)  # connected to every input (zero grads) even without rows
    names = ["x", "W", "b", "A", "B"]
    for k, got, want in zip(names, [leaves[0], *base, *leaves[1:]], refs):
        if k in "Wb" and not grad_base:
            assert got.grad is None, k
            continue
        assert got.grad is not None and got.grad.dtype == got.dtype, k
        _grad_close(got.grad, want.grad, dtype, k)


# ---- LoraLinear ----------------------------------------------------------------------------------


@st.composite
def adapter_specs(draw, i, o):
    """1 to 3 adapters: (r, alpha, rsLoRA), r up to min(in, out) + 2, alpha possibly <= 0."""
    spec = st.tuples(
        st.integers(1, min(i, o) + 2), st.sampled_from([8.0, 1.0, 0.0, -4.0]) | st.floats(-16, 16), st.booleans()
    )
    return draw(st.lists(spec, min_size=1, max_size=3))


def _make_layer(base, specs):
    """LoraLinear with adapters a0, a1, ... (random A and B), or None where it refuses a documented
    case (rank above min(in, out), alpha <= 0) with a ValueError."""
    layer = None
    for k, (r, alpha, rs) in enumerate(specs):
        try:
            if layer is None:
                layer = lora_ext.LoraLinear(base, r, alpha, 0.0, rs, init_lora_weights=False, adapter_name="a0")
            else:
                layer.add_adapter(f"a{k}", r, alpha, 0.0, rs, init_lora_weights=False)
        except ValueError as e:
            assert r > min(base.weight.shape) or alpha <= 0, f"refused a valid adapter: {e}"
            return None
        name = f"a{k}"
        assert layer.scaling[name] == (alpha / math.sqrt(r) if rs else alpha / r)
    return layer


@settings(max_examples=examples(60))
@given(
    dims=st.tuples(st.integers(1, 16), st.integers(1, 16)).flatmap(
        lambda io: st.tuples(st.just(io), adapter_specs(*io))
    ),
    lead=leading_dims(12),
    dtype=st.sampled_from([p[0] for p in DTYPE_PAIRS[:4]]),
    bias=st.booleans(),
    n_active=st.integers(1, 3),
    exact=st.booleans(),
    seed=seeds(),
)
def test_lora_linear_layer_forward_and_merge_round_trip(dims, lead, dtype, bias, n_active, exact, seed):
    (i, o), specs = dims
    exact = exact and dtype != torch.float64  # the exact merge takes float32/bfloat16/float16 weights
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(i, o, bias=bias).to(dtype)
    with torch.no_grad():
        base.weight.copy_(randn(g, o, i, scale=i**-0.5))
        if bias:
            base.bias.copy_(randn(g, o))
    w0 = base.weight.detach().clone()
    layer = _make_layer(base, specs)
    if layer is None:
        return
    active = layer.adapter_names[:n_active]
    layer.set_adapter(active)
    layer.eval()
    x = randn(g, *lead, i).to(dtype)
    want = x.double() @ w0.double().T + (base.bias.double() if bias else 0)
    for n in active:
        a, b = layer.adapter_weights(n)
        want = want + layer.scaling[n] * (x.double() @ a.double().T) @ b.double().T
    with torch.no_grad():
        spread = max([1.0] + [abs(layer.scaling[n]) for n in active])
        _assert_close(layer(x), want, TOL[dtype], spread, "forward")
        layer.merge(exact=exact)
        note(f"merged {layer.merged_adapters}")
        _assert_close(layer(x), want, TOL[dtype], 2 * spread, "merged forward")
        layer.unmerge()
    if exact:
        assert torch.equal(bits(base.weight.detach()), bits(w0))
    elif dtype in (torch.float32, torch.float64):
        _assert_close(base.weight, w0.double(), (1e-5, 1e-5), spread, "unmerged weight")
    # training with dropout (the first active adapter goes through lora_linear's own mask)
    layer.set_adapter(active[0])
    layer.lora_dropout[active[0]] = 0.5
    layer.train()
    mask = _mask(True, 0.5, seed, x)
    a, b = layer.adapter_weights(active[0])
    with torch.no_grad():
        _assert_close(
            layer(x),
            ref_lora_linear(x, base.weight, base.bias, a, b, layer.scaling[active[0]], mask, 0.5),
            TOL[dtype],
            2 * max(1.0, abs(layer.scaling[active[0]])),
            "dropout forward",
        )
