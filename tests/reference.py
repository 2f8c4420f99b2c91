"""Plain-PyTorch float64 references and test helpers (no lora_ext code here)."""
from __future__ import annotations

import torch

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


def ref_lora_linear(x, weight, bias, lora_A, lora_B, scale, mask=None, p=0.0):
    """float64 y = x W^T + b + scale * (dropout(x) A^T) B^T; ``mask`` is the keep mask."""
    x64 = x.double()
    xd = x64 if mask is None else x64 * mask.double() / (1.0 - p)
    y = x64 @ weight.double().T + scale * (xd @ lora_A.double().T) @ lora_B.double().T
    if bias is not None:
        y = y + bias.double()
    return y


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
