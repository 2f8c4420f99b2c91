"""Plain-PyTorch float64 references and test helpers (no lora_ext code here)."""

from __future__ import annotations

import pytest
import torch

# The devices of a test written once for every backend (parametrize "device" with it): the CUDA cases
# run where a GPU is and are skipped elsewhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

# (atol, rtol) for comparing an op's output against the float64 reference, with data
# scaled so outputs are O(1).
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}
# gradients accumulate over N rows: a little looser
GRAD_TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (8e-2, 3e-2),
    torch.float16: (1e-2, 1e-2),
}


def tol(dtype, in_f, device="cpu", table=TOL):
    """(atol, rtol) from ``table`` for an op on ``device`` reducing over ``in_f``: 3x for long half-precision
    reductions on CUDA (cuBLAS may reduce in reduced precision)."""
    atol, rtol = table[dtype]
    if device == "cuda" and dtype in (torch.bfloat16, torch.float16) and in_f > 1000:
        atol, rtol = 3 * atol, 3 * rtol
    return atol, rtol


def on(device, *ts):
    """The tensors moved to ``device`` (None stays None)."""
    return [None if t is None else t.to(device) for t in ts]


def ref_lora_linear(x, weight, bias, lora_A, lora_B, scale, mask=None, p=0.0):
    """float64 y = x W^T + b + scale * (dropout(x) A^T) B^T; ``mask`` is the keep mask."""
    x64 = x.double()
    xd = x64 if mask is None else x64 * mask.double() / (1.0 - p)
    y = x64 @ weight.double().T + scale * (xd @ lora_A.double().T) @ lora_B.double().T
    if bias is not None:
        y = y + bias.double()
    return y


def ref_multi(x, w, b, A, B, scales, ids, ranks=None, mask=None, p=0.0):
    """float64 lora_linear_multi, row by row, with each adapter at its own (unpadded) rank;
    ``mask`` ``[N, in]`` is the keep mask of the rows (all leading dims of x flattened)."""
    i = x.shape[-1]
    x2 = x.reshape(len(ids), i)  # not (-1, i): that is ambiguous for in = 0
    rows = []
    for k in range(x2.shape[0]):
        a = int(ids[k])
        if a < 0:
            y = x2[k : k + 1].double() @ w.double().T + (0 if b is None else b.double())
        else:
            r = A.shape[1] if ranks is None else ranks[a]
            m = None if mask is None else mask[k : k + 1]
            y = ref_lora_linear(x2[k : k + 1], w, b, A[a, :r], B[a, :, :r], float(scales[a]), m, p)
        rows.append(y)
    out = torch.cat(rows) if rows else torch.zeros(0, w.shape[0], dtype=torch.float64)
    return out.reshape(*x.shape[:-1], w.shape[0])


def keep_mask_numpy(seed, p, elements):
    """The keep mask of ops/common/dropout_rng.h for flat element indices (numpy uint64)."""
    import numpy as np

    m64 = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15) & m64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
    key = z ^ (z >> 31)
    klo, khi = np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32)

    def fmix32(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))

    e = np.asarray(elements, dtype=np.uint64)
    lo, hi = (e & np.uint64(0xFFFFFFFF)).astype(np.uint32), (e >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        h = (lo ^ klo) * np.uint32(0x9E3779B1)
        h = h ^ (hi * np.uint32(0x85EBCA77) + khi)
        u = fmix32(fmix32(h) + klo)
    t = round(p * 4294967296.0)
    return u >= np.uint32(min(t, 0xFFFFFFFF))


def op_dropout_mask(torch_seed, p, rows, in_f):
    """The keep mask ``[rows, in]`` (bool tensor) that lora_linear / lora_linear_multi use in training
    mode when called right after ``torch.manual_seed(torch_seed)``: they draw their 8-byte mask seed
    with ``randint(2**63 - 1, [1])`` from the default generator (ops/common/op_utils.h)."""
    import numpy as np

    torch.manual_seed(torch_seed)
    seed = int(torch.randint(2**63 - 1, (1,)).item())
    return torch.from_numpy(keep_mask_numpy(seed, p, np.arange(rows * in_f, dtype=np.uint64)).reshape(rows, in_f))


def make_inputs(n_shape, in_f, out_f, r, dtype, adapter_dtype=None, bias=True, seed=0):
    """Random (never zero) inputs with O(1) outputs."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*n_shape, in_f, generator=g, dtype=torch.float64)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    b = torch.randn(out_f, generator=g, dtype=torch.float64) if bias else None
    a = torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    bb = torch.randn(out_f, r, generator=g, dtype=torch.float64) / r**0.5
    return (
        x.to(dtype),
        w.to(dtype),
        None if b is None else b.to(dtype),
        a.to(adapter_dtype),
        bb.to(adapter_dtype),
    )


def noncontiguous(t):
    """Same values, non-contiguous layout (a transposed copy viewed back)."""
    if t is None or t.dim() < 2:
        return t
    nc = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not nc.is_contiguous() or t.shape[-1] == 1 or t.shape[-2] == 1
    return nc


def peak_extra_cpu_bytes(fn) -> int:
    """Peak of the running sum of CPU allocations minus frees while ``fn`` runs,
    from the profiler's allocation events (so only memory ``fn`` itself adds)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node):
        events.append(node)
        for c in node.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    allocs = sorted((e for e in events if "Allocation" in str(e.tag)), key=lambda e: e.start_time_ns)
    cur = peak = 0
    for e in allocs:
        cur += e.extra_fields.alloc_size
        peak = max(peak, cur)
    return peak


# ---- the exact merge, bit for bit (ops/common/exact_merge.h) ----------------------------
_UINT = {torch.float32: (torch.int32, 32), torch.bfloat16: (torch.int16, 16), torch.float16: (torch.int16, 16)}


def ubits(t):
    """The unsigned bit patterns of a float32/bfloat16/float16 tensor, as int64."""
    ity, nbits = _UINT[t.dtype]
    return t.contiguous().view(ity).to(torch.int64) & ((1 << nbits) - 1)


def ref_exact_delta(lora_A, lora_B, scale):
    """float32 scale * B @ A summed in k order with a rounded multiply and a rounded add."""
    a, b = lora_A.cpu().float(), lora_B.cpu().float()
    d = torch.zeros(b.shape[0], a.shape[1])
    for k in range(a.shape[0]):
        d = d + b[:, k : k + 1] * a[k : k + 1, :]
    return d * torch.tensor(scale, dtype=torch.float32)


def ref_merge_exact(weight, lora_A, lora_B, scale):
    w = weight.cpu()
    return (w.float() + ref_exact_delta(lora_A, lora_B, scale)).to(w.dtype)


def _step(u, nbits, up):
    sign = 1 << (nbits - 1)
    neg = (u & sign) != 0
    if up:
        return torch.where(u == sign, 0, torch.where(neg, u - 1, u + 1))
    return torch.where(u == 0, sign, torch.where(neg, u + 1, u - 1))


def ref_merge_exact_codes(weight, lora_A, lora_B, scale):
    """(codes, exc_index, exc_value) of merge_exact_codes, on the CPU."""
    w = weight.cpu()
    d = ref_exact_delta(lora_A, lora_B, scale)
    c0 = ((w.float() + d).to(w.dtype).float() - d).to(w.dtype)
    nbits = _UINT[w.dtype][1]
    u0, uc = ubits(w), ubits(c0)
    code = torch.full(w.shape, 3, dtype=torch.int64)
    code = torch.where(u0 == _step(uc, nbits, False), 2, code)
    code = torch.where(u0 == _step(uc, nbits, True), 1, code)
    code = torch.where(u0 == uc, 0, code)
    code = torch.where(torch.isnan(w), 3, code).flatten()
    flat = torch.nn.functional.pad(code, (0, (-code.numel()) % 4)).view(-1, 4)
    codes = (flat[:, 0] | flat[:, 1] << 2 | flat[:, 2] << 4 | flat[:, 3] << 6).to(torch.uint8)
    idx = (code == 3).nonzero().flatten()
    return codes, idx, w.flatten()[idx]


def wide_weight(out_f, in_f, dtype, seed=0, transposed=False):
    """Random magnitudes over the dtype's whole range (subnormals included) and special values:
    NaNs with payloads and either sign, +-Inf, +-0, the largest finite value."""
    g = torch.Generator().manual_seed(seed)
    top = {torch.float16: 4.8, torch.bfloat16: 38.0, torch.float32: 38.0}[dtype]
    low = {torch.float16: -8.0, torch.bfloat16: -40.0, torch.float32: -44.0}[dtype]
    mag = 10 ** (low + (top - low) * torch.rand(out_f, in_f, generator=g, dtype=torch.float64))
    w = (torch.randn(out_f, in_f, generator=g, dtype=torch.float64).sign() * mag).to(dtype)
    near = torch.rand(out_f, in_f, generator=g) < 0.5  # half of them near the update's size
    w = torch.where(near, (torch.randn(out_f, in_f, generator=g) * 0.02).to(dtype), w)
    flat = w.view(-1)
    ity = torch.int32 if dtype == torch.float32 else torch.int16
    nans = {
        torch.float32: [0x7FC00001, -0x00400001, 0x7F800001],
        torch.bfloat16: [0x7FC1, -0x003F, 0x7F81],
        torch.float16: [0x7E01, -0x0101, 0x7C01],
    }[dtype]  # payloads, both signs, a signalling one
    fi = torch.finfo(dtype)
    others = [float("inf"), float("-inf"), 0.0, -0.0, fi.max, -fi.max, fi.smallest_normal, fi.tiny / 2]
    pos = torch.randperm(flat.numel(), generator=g)[: len(nans) + len(others)]
    flat[pos[: len(nans)]] = torch.tensor(nans, dtype=ity).view(dtype)
    flat[pos[len(nans) :]] = torch.tensor(others, dtype=dtype)
    if transposed:  # a transposed view of a [in, out] storage (GPT-2 Conv1D)
        return w.T.contiguous().T
    return w


def wide_adapter(in_f, out_f, r, adtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, in_f, generator=g) / 8).to(adtype), (torch.randn(out_f, r, generator=g) / 16).to(adtype)


# (weight dtype, adapter dtype) pairs of the exact merge
EXACT_CASES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
]
EXACT_IDS = [f"{str(w)[6:]}-{str(a)[6:]}" for w, a in EXACT_CASES]
