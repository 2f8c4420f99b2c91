"""Exact unmerge: side memory and bit-exactness vs a plain merge/unmerge round trip.

Run:  bash scripts/run.sh benchmarks/bench_exact_merge.py

For a bf16 (and fp16) weight [11008, 4096] ~ N(0, 0.02^2) and an r=16 fp32 adapter scaled so that
|dW| is a given fraction of |W|, it prints: the share of elements a plain merge + unmerge round trip
(what PEFT does: W += dW; W -= dW in the weight's dtype) leaves changed, the same after exact merge +
unmerge (must be 0), the number of sparse exceptions, and the side memory (codes + sparse list) as a
share of the weight's bytes. Nothing is asserted: the numbers are for reading.
"""

import time

import torch

from lora_ext import ops


def main():
    torch.manual_seed(0)
    out, inp, r = 11008, 4096, 16
    print(
        "| weight | adapter | dW/W | plain round trip: elements changed | exact: elements changed | "
        "exceptions | side memory | % of weight | codes+merge ms | unmerge ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for wdtype in (torch.bfloat16, torch.float16):
        w0 = (torch.randn(out, inp) * 0.02).to(wdtype)
        for rel in (0.01, 0.05, 0.2, 1.0):
            a = torch.randn(r, inp)
            b = torch.randn(out, r)
            s = float(rel * 0.02 / (b @ a).std())
            plain = w0.clone()
            ops.merge_(plain, a, b, s)
            ops.unmerge_(plain, a, b, s)
            changed_plain = (plain != w0).float().mean().item()
            w = w0.clone()
            t0 = time.perf_counter()
            codes = ops.merge_exact_codes(w, a, b, s)
            ops.merge_exact_(w, a, b, s)
            t1 = time.perf_counter()
            ops.unmerge_exact_(w, codes, a, b, s)
            t2 = time.perf_counter()
            changed_exact = (w.view(torch.int16) != w0.view(torch.int16)).float().mean().item()
            wbytes = w0.numel() * w0.element_size()
            print(
                f"| {str(wdtype)[6:]} | float32 r={r} | {rel:g} | {100 * changed_plain:.1f}% | "
                f"{100 * changed_exact:.1f}% | {codes.exc_index.numel()} ({100 * codes.exc_index.numel() / w0.numel():.3f}%) | "
                f"{codes.nbytes() / 2**20:.1f} MiB | {100 * codes.nbytes() / wbytes:.1f}% | "
                f"{1e3 * (t1 - t0):.0f} | {1e3 * (t2 - t1):.0f} |"
            )


if __name__ == "__main__":
    main()
