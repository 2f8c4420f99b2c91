"""GPU benchmark for scripts/gpu_check.sh: one table of times, ratios and achieved bandwidths.

    python -P benchmarks/bench_gpu.py [--quick]

bf16 on the current CUDA device, CUDA-event timing (median of repeated calls after warm-up):
  - forward: bare linear vs PEFT's LoRA layer (when installed) vs lora_ext.LoraLinear, 8192 tokens,
    4096x4096 r16 and 4096->11008 r64; targets: lora_ext <= 1.05x the bare linear at 4096^2 r16;
  - merge_: bf16 W 11008x4096 with an fp32 r16 adapter, achieved bandwidth (read + write of W) against
    the device's copy bandwidth measured in the same run (target >= 80%);
  - exact merge: a merge_exact_codes + merge_exact_ + unmerge_exact_ round trip on that weight, whether
    it restored the bits, and the side information's size;
  - multi-adapter decode: 64 tokens, 32 adapters r16 (lora_linear_multi) vs one adapter for all rows
    (lora_linear) (target <= 1.10x), and the shrink/expand bandwidth (adapter bytes read / LoRA time).
Ops without a CUDA kernel are reported as such, not skipped silently.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import lora_ext


def cuda_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def try_ms(fn, iters):
    try:
        return cuda_ms(fn, iters)
    except (RuntimeError, NotImplementedError) as e:  # an op without a CUDA kernel
        return str(e).splitlines()[0][:60]


def fmt(v, unit=""):
    return f"{v:.3f}{unit}" if isinstance(v, float) else f"n/a ({v})"


def forward_rows(tokens, shapes, iters):
    rows = []
    for in_f, out_f, r in shapes:
        torch.manual_seed(0)
        base = nn.Linear(in_f, out_f, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
        ext = lora_ext.LoraLinear(base, r=r, lora_alpha=2 * r, init_lora_weights=False).eval()
        t_lin = cuda_ms(lambda: F.linear(x, base.weight, base.bias), iters)
        with torch.no_grad():
            t_ext = try_ms(lambda: ext(x), iters)
        t_peft = "PEFT not installed"
        try:
            import peft

            pm = peft.get_peft_model(
                nn.Sequential(base),
                peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False),
            ).eval()
            with torch.no_grad():
                t_peft = cuda_ms(lambda: pm(x), iters)
        except ImportError:
            pass
        ratio = t_ext / t_lin if isinstance(t_ext, float) else None
        rows.append(
            [
                f"forward bf16 {tokens}x{in_f}->{out_f} r{r}",
                fmt(t_lin, " ms"),
                fmt(t_ext, " ms"),
                fmt(t_peft, " ms"),
                f"{ratio:.3f}x linear" if ratio else "-",
                f"PEFT {t_peft / t_lin:.3f}x" if isinstance(t_peft, float) else "-",
            ]
        )
    return rows


def copy_bandwidth(iters):
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / (ms * 1e-3) / 1e9  # GB/s, read + write


def merge_row(iters, copy_gbs):
    torch.manual_seed(0)
    W = torch.randn(11008, 4096, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(16, 4096, device="cuda") / 64
    B = torch.randn(11008, 16, device="cuda") / 4
    ms = try_ms(lambda: lora_ext.ops.merge_(W, A, B, 0.5), iters)
    if not isinstance(ms, float):
        return ["merge_ bf16 11008x4096 r16", fmt(ms), "-", "-", "-", "-"]
    gbs = 2 * W.numel() * W.element_size() / (ms * 1e-3) / 1e9
    return [
        "merge_ bf16 11008x4096 r16",
        fmt(ms, " ms"),
        f"{gbs:.0f} GB/s",
        f"copy {copy_gbs:.0f} GB/s",
        f"{100 * gbs / copy_gbs:.0f}% of copy",
        "target >= 80%",
    ]


def exact_merge_row(iters, copy_gbs):
    """merge_exact_codes + merge_exact_ + unmerge_exact_ on the same weight as merge_: the time of
    one round trip, the bandwidth of merge_exact_ alone, and whether the round trips kept the bits."""
    torch.manual_seed(0)
    W = torch.randn(11008, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    W0 = W.clone()
    A = torch.randn(16, 4096, device="cuda") / 64
    B = torch.randn(11008, 16, device="cuda") / 400
    ops = lora_ext.ops

    def cycle():
        codes = ops.merge_exact_codes(W, A, B, 0.5)
        ops.merge_exact_(W, A, B, 0.5)
        ops.unmerge_exact_(W, codes, A, B, 0.5)

    name = "exact merge round trip bf16 11008x4096 r16"
    ms = try_ms(cycle, max(3, iters // 5))
    if not isinstance(ms, float):
        return [name, fmt(ms), "-", "-", "-", "-"]
    exact = torch.equal(W.view(torch.int16), W0.view(torch.int16))
    side = ops.merge_exact_codes(W0, A, B, 0.5).nbytes()
    ms_merge = cuda_ms(lambda: ops.merge_exact_(W, A, B, 0.5), max(3, iters // 5))  # (W drifts: timing only)
    gbs = 2 * W.numel() * W.element_size() / (ms_merge * 1e-3) / 1e9  # read + write of W
    return [
        name,
        fmt(ms, " ms"),
        f"merge_exact_ {gbs:.0f} GB/s",
        f"copy {copy_gbs:.0f} GB/s",
        f"bit-exact after round trips: {'yes' if exact else 'NO'}",
        f"side info {side / 2**20:.1f} MiB ({100 * side / (W.numel() * 2):.1f}% of W)",
    ]


def multi_rows(iters, copy_gbs, n=32, tokens=64, d=4096, r=16):
    torch.manual_seed(0)
    W = torch.randn(d, d, device="cuda", dtype=torch.bfloat16) / 64
    b = torch.randn(d, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(n, r, d, device="cuda") / 64
    Bt = torch.randn(n, r, d, device="cuda") / 4
    scales = torch.full((n,), 2.0, device="cuda")
    ids = torch.randint(0, n, (tokens,), device="cuda")
    t_lin = cuda_ms(lambda: F.linear(x, W, b), iters)
    t_single = try_ms(lambda: lora_ext.ops.lora_linear(x, W, b, A[0], Bt[0].t(), 2.0), iters)
    try:
        order, offsets = lora_ext.ops.lora_group_rows(ids, n)
        t_multi = cuda_ms(
            lambda: lora_ext.ops.lora_linear_multi(
                x, W, b, A, Bt.transpose(1, 2), scales, ids, 0.0, False, order, offsets
            ),
            iters,
        )
    except (RuntimeError, NotImplementedError) as e:
        t_multi = str(e).splitlines()[0][:60]
    row = [
        f"multi decode bf16 {tokens} tok, {n} adapters r{r}",
        fmt(t_lin, " ms"),
        fmt(t_single, " ms"),
        fmt(t_multi, " ms"),
    ]
    if isinstance(t_multi, float) and isinstance(t_single, float):
        used = ids.unique().numel()
        lora_bytes = used * 2 * r * d * 4
        extra_ms = max(t_multi - t_lin, 1e-6)
        row += [
            f"{t_multi / t_single:.3f}x single (target <= 1.10)",
            f"shrink+expand {lora_bytes / (extra_ms * 1e-3) / 1e9:.0f} GB/s ({100 * lora_bytes / (extra_ms * 1e-3) / 1e9 / copy_gbs:.0f}% of copy)",
        ]
    else:
        row += ["-", "-"]
    return [row]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device")
    iters = 5 if args.quick else 50
    tokens = 1024 if args.quick else 8192
    print(
        f"# lora_ext GPU benchmark: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"lora_ext {lora_ext.__version__}, build {lora_ext.build_info()['cuda_arch_list']}"
    )
    copy_gbs = copy_bandwidth(iters)
    rows = forward_rows(tokens, [(4096, 4096, 16), (4096, 11008, 64)], iters)
    rows.append(merge_row(iters, copy_gbs))
    rows.append(exact_merge_row(iters, copy_gbs))
    rows += multi_rows(iters, copy_gbs)
    headers = ["case", "baseline", "lora_ext", "other", "ratio", "note"]
    widths = [max(len(str(r[i])) for r in rows + [headers]) for i in range(len(headers))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print(
        "forward: baseline = bare linear, other = PEFT; merge: baseline = merge time; "
        "multi: baseline = bare linear, lora_ext = single adapter, other = lora_linear_multi"
    )


if __name__ == "__main__":
    main()
