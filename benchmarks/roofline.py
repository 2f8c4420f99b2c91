"""How far a LoRA layer's forward+backward is from what this machine allows (issue 14, "layer misses").

    bash scripts/run.sh benchmarks/roofline.py            # ~2 min on the idle 2-core VM
    bash scripts/run.sh benchmarks/roofline.py --rounds 5 --shapes 2048x1024x1024x8

One process, fp32, 2 threads, interleaved rounds (the order rotates), medians. Per shape
(TOKENSxINxOUTxR) it measures:

- the machine: copy bandwidth (``dst.copy_(src)``, 64 MiB, read + write counted) and the bare frozen
  linear's forward+backward (``x`` requires grad), which is two [N, in] x [in, out]-sized GEMMs: the floor;
- ``lora_ext.LoraLinear``'s forward+backward (dropout 0 and 0.1) in the same rounds;
- each extra operation LoRA adds, alone, with plain torch ops in the form lora_ext's CPU kernels use:
  ``h = x A^T``, ``y += s h B^T``, ``grad_h = s grad_y B``, ``grad_B^T = s h^T grad_y``, ``grad_A = grad_h^T x``,
  ``grad_x += grad_h A``; and what a dropout mask costs eager PyTorch (``bernoulli_`` on [N, in]: PEFT pays it,
  lora_ext hashes the mask from a seed inside its kernels instead);

and prints, against the floor, the ratio an implementation that is not fused into the base GEMMs cannot
beat: it must stream x twice (for h and for grad_A), read grad_y once (for grad_h and grad_B together), and
read and write y and grad_x once each to add the low-rank terms, at the measured copy bandwidth (its
flops, 4 x 2*N*r*(in or out), are negligible next to the GEMMs). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import lora_ext


def _time(fn, reps: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def measure(n: int, d_in: int, d_out: int, r: int, rounds: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    layers = {
        p: lora_ext.LoraLinear(base, r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False).train()
        for p in (0.0, 0.1)
    }
    x = torch.randn(n, d_in)
    g = torch.randn(n, d_out)
    A, B = torch.randn(r, d_in), torch.randn(d_out, r)
    h, gh, y, gx = torch.randn(n, r), torch.randn(n, r), torch.randn(n, d_out), torch.randn(n, d_in)
    src, dst = torch.randn(16 * 2**20), torch.empty(16 * 2**20)
    mask = torch.empty(n, d_in)

    def fwd_bwd(mod):
        xi = x.detach().requires_grad_(True)
        mod(xi).backward(g)
        for prm in mod.parameters():
            prm.grad = None

    cases = {
        "copy 64 MiB": lambda: dst.copy_(src),
        "linear fwd+bwd": lambda: fwd_bwd(base),
        "lora_ext fwd+bwd p=0": lambda: fwd_bwd(layers[0.0]),
        "lora_ext fwd+bwd p=0.1": lambda: fwd_bwd(layers[0.1]),
        "h = x A^T": lambda: torch.mm(x, A.t()),
        "y += s h B^T": lambda: y.addmm_(h, B.t(), alpha=2.0),
        "grad_h = s grad_y B": lambda: torch.mm(g, B).mul_(2.0),
        "grad_B^T = s h^T grad_y": lambda: torch.mm(h.t(), g).mul_(2.0),
        "grad_A = grad_h^T x": lambda: torch.mm(gh.t(), x),
        "grad_x += grad_h A": lambda: gx.addmm_(gh, A),
        "bernoulli_ mask": lambda: mask.bernoulli_(0.9),
    }
    for fn in cases.values():  # warm-up
        fn()
    times = {k: [] for k in cases}
    names = list(cases)
    for i in range(rounds):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            times[k].append(_time(cases[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        p: statistics.median(a / b for a, b in zip(times[f"lora_ext fwd+bwd p={p}"], times["linear fwd+bwd"]))
        for p in (0, 0.1)
    }
    bw = 2 * src.numel() * 4 / med["copy 64 MiB"]
    extra_bytes = 4 * (2 * n * d_in + n * d_out + 2 * n * d_out + 2 * n * d_in)  # x twice, grad_y, y and grad_x RMW
    return dict(med=med, ratios=ratios, bw=bw, extra_bytes=extra_bytes, shape=(n, d_in, d_out, r))


def report(m: dict) -> None:
    n, d_in, d_out, r = m["shape"]
    med, bw = m["med"], m["bw"]
    lin = med["linear fwd+bwd"]
    bound = m["extra_bytes"] / bw
    gemm_flops = 2 * 2 * n * d_in * d_out
    pieces = [k for k in med if k not in ("copy 64 MiB", "linear fwd+bwd") and not k.startswith("lora_ext")]
    print(f"\n### {n} tokens x {d_in} -> {d_out}, r={r}\n")
    print(
        f"- copy bandwidth {bw / 1e9:.1f} GB/s; linear forward+backward {lin * 1e3:.2f} ms "
        f"({gemm_flops / lin / 1e9:.0f} GFLOP/s over its two GEMMs)"
    )
    print(
        f"- LoRA's unavoidable extra traffic without fusing into the GEMMs: {m['extra_bytes'] / 2**20:.0f} MiB "
        f"-> {bound * 1e3:.2f} ms at that bandwidth: **lower bound {1 + bound / lin:.3f}x** the linear"
    )
    print(f"- lora_ext measured: {m['ratios'][0]:.3f}x (dropout 0), {m['ratios'][0.1]:.3f}x (dropout 0.1)\n")
    print("| extra operation (plain torch) | ms | GB/s of its operands | % of the linear |")
    print("|---|---|---|---|")
    sizes = {
        "h = x A^T": n * d_in,
        "y += s h B^T": 2 * n * d_out,
        "grad_h = s grad_y B": n * d_out,
        "grad_B^T = s h^T grad_y": n * d_out,
        "grad_A = grad_h^T x": n * d_in,
        "grad_x += grad_h A": 2 * n * d_in,
        "bernoulli_ mask": n * d_in,
    }
    for k in pieces:
        print(f"| {k} | {med[k] * 1e3:.2f} | {4 * sizes[k] / med[k] / 1e9:.1f} | {100 * med[k] / lin:.1f}% |")
    total = sum(med[k] for k in pieces if k != "bernoulli_ mask")
    print(f"| sum without the mask | {total * 1e3:.2f} | | {100 * total / lin:.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["2048x1024x1024x8", "2048x4096x4096x16"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"roofline: torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds, medians")
    for s in args.shapes:
        n, d_in, d_out, r = (int(v) for v in s.split("x"))
        report(measure(n, d_in, d_out, r, args.rounds))


if __name__ == "__main__":
    main()
