"""Benchmark multi-adapter (mixed-batch) LoRA: lora_ext's ``lora_linear_multi`` vs PEFT vs a bare ``nn.Linear``.

Run it with the project's virtual env, with ``-P`` (or from another directory) so the
source folder ``lora_ext/`` does not shadow the installed package::

    .venv/bin/python -P benchmarks/bench_multi.py            # full run, several minutes on 2 cores
    .venv/bin/python -P benchmarks/bench_multi.py --quick    # smoke test: small shapes, few rounds
    .venv/bin/python -P benchmarks/bench_multi.py --cases a,b --rounds 10

Everything runs in fp32 on the CPU with ``torch.set_num_threads(2)`` (``--threads``), eval
mode, under ``torch.no_grad()``. Progress goes to stderr, the report (markdown) to stdout.
Nothing is asserted: the numbers are for reading.

One frozen ``nn.Linear(4096, 4096)`` with bias and n LoRA adapters of rank r = 16
(``lora_alpha = 32``, so every adapter's scale is 2). Each sequence of the batch picks one
adapter; all tokens of a sequence use it. Cases (``--cases``, default all):

  a. prefill: 64 sequences x 32 tokens, n = 8 and n = 32 adapters, adapter per sequence drawn
     uniform and Zipf(1.1) over adapter ranks (``p_k ~ k^-1.1``), fixed seed;
  b. decode: 64 sequences x 1 token, n = 32, uniform;
  c. many adapters: 256 sequences x 1 token, n = 256, uniform.

``--quick`` keeps the same cases with smaller sizes (hidden 1024, fewer sequences/adapters).

Variants, per case:

1. ``linear``: ``F.linear(x, W, b)``.
2. ``single``: ``lora_ext.ops.lora_linear(x, W, b, A0, B0, scale)``, one adapter for all rows
   (the cost to beat: a mixed batch should cost no more than a single-adapter batch).
3. ``multi``: ``torch.ops.lora_ext.lora_linear_multi(x, W, b, A_stack, B_stack, scales,
   adapter_ids, 0.0, False, order, offsets)`` with ``A_stack [n, r, in]`` contiguous,
   ``B_stack = Bt_stack.transpose(1, 2)`` for a contiguous ``Bt_stack [n, r, out]`` (the layout
   the kernel reads without a copy), ``adapter_ids [N]`` int64 per row of x, and the grouping
   ``order, offsets = lora_group_rows(adapter_ids, n)`` computed once per case outside the
   timed region (by design it is computed once per batch and shared by all layers).
4. ``multi+group``: the same, with ``lora_group_rows`` inside the timed region.
5. ``peft``: PEFT's mixed batch, ``model(x, adapter_names=[one name per sequence])`` on
   ``get_peft_model`` of a module holding the same linear, with the n adapters copied from
   the same stacks (PEFT reads ``adapter_names`` per first-dim row of x, i.e. per sequence).

The variants run INTERLEAVED in one process: every round runs each variant once, in an order
that rotates from round to round, after a warm-up. Times are medians over rounds; a ratio is
the median over rounds of ``t_variant / t_other`` measured in the same round, which is robust
to load drifting over the run.

Correctness guard (reported, not asserted): before timing, ``max|multi-peft|`` over the whole
output and ``max|multi-f64|`` against a float64 per-row reference on a few rows.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import lora_ext  # registers torch.ops.lora_ext.*
from lora_ext_dev.timing import Budget, Timings, Variant, fmt_ms, machine_info, md_table, run_interleaved  # noqa: E402

try:
    import peft
    from peft import LoraConfig, get_peft_model

    HAVE_PEFT = True
except Exception:  # pragma: no cover - PEFT is optional
    peft = None
    HAVE_PEFT = False

LINEAR, SINGLE, MULTI, MULTI_G, PEFT = "linear", "single", "multi", "multi+group", "peft"
R = 16
LORA_ALPHA = 32
ZIPF_S = 1.1
SEED = 1234
N_REF_ROWS = 8  # rows checked against the float64 reference


# ----------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    group: str  # "a", "b" or "c"
    label: str  # "prefill", "decode", "many"
    seqs: int
    tokens: int  # per sequence
    n_adapters: int
    dist: str  # "uniform" or "zipf"
    hidden: int

    @property
    def rows(self) -> int:
        return self.seqs * self.tokens


def make_cases(quick: bool, groups: list[str]) -> list[Case]:
    if quick:
        h, pre_s, pre_t, pre_n, dec_s, dec_n, many = 1024, 16, 16, (4, 16), 16, 16, 64
    else:
        h, pre_s, pre_t, pre_n, dec_s, dec_n, many = 4096, 64, 32, (8, 32), 64, 32, 256
    out: list[Case] = []
    if "a" in groups:
        for n in pre_n:
            for dist in ("uniform", "zipf"):
                out.append(Case("a", "prefill", pre_s, pre_t, n, dist, h))
    if "b" in groups:
        out.append(Case("b", "decode", dec_s, 1, dec_n, "uniform", h))
    if "c" in groups:
        out.append(Case("c", "many", many, 1, many, "uniform", h))
    return out


def draw_ids(case: Case, gen: torch.Generator) -> torch.Tensor:
    """Adapter id per sequence, int64 [seqs]."""
    if case.dist == "uniform":
        return torch.randint(case.n_adapters, (case.seqs,), generator=gen, dtype=torch.int64)
    if case.dist == "zipf":
        ranks = torch.arange(1, case.n_adapters + 1, dtype=torch.float64)
        p = ranks.pow(-ZIPF_S)
        return torch.multinomial(p / p.sum(), case.seqs, replacement=True, generator=gen).to(torch.int64)
    raise ValueError(case.dist)


@dataclass
class Setup:
    x: torch.Tensor  # [S, T, in]
    lin: nn.Linear
    W: torch.Tensor
    b: torch.Tensor
    A_stack: torch.Tensor  # [n, r, in] contiguous
    Bt_stack: torch.Tensor  # [n, r, out] contiguous
    B_stack: torch.Tensor  # [n, out, r] = Bt_stack.transpose(1, 2)
    scales: torch.Tensor  # float32 [n]
    ids_seq: torch.Tensor  # int64 [S]
    adapter_ids: torch.Tensor  # int64 [S * T]
    order: torch.Tensor
    offsets: torch.Tensor
    A0: torch.Tensor  # [r, in]
    B0: torch.Tensor  # [out, r] contiguous
    scale: float
    peft_model: Optional[nn.Module]
    names: list[str]  # adapter name per sequence (PEFT)


def build(case: Case) -> Setup:
    gen = torch.Generator().manual_seed(SEED + case.n_adapters + 1000 * case.seqs + (7 if case.dist == "zipf" else 0))
    h, n = case.hidden, case.n_adapters
    lin = nn.Linear(h, h, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(h, h, generator=gen) / math.sqrt(h))
        lin.bias.copy_(torch.randn(h, generator=gen) * 0.1)
    lin.requires_grad_(False)
    W, b = lin.weight.detach(), lin.bias.detach()

    A_stack = (torch.randn(n, R, h, generator=gen) / math.sqrt(h)).contiguous()
    Bt_stack = (torch.randn(n, R, h, generator=gen) / math.sqrt(R)).contiguous()
    B_stack = Bt_stack.transpose(1, 2)
    scale = LORA_ALPHA / R
    scales = torch.full((n,), scale, dtype=torch.float32)

    ids_seq = draw_ids(case, gen)
    adapter_ids = ids_seq.repeat_interleave(case.tokens)
    order, offsets = torch.ops.lora_ext.lora_group_rows(adapter_ids, n)

    x = torch.randn(case.seqs, case.tokens, h, generator=gen)

    peft_model, names = None, [f"a{i}" for i in ids_seq.tolist()]
    if HAVE_PEFT:
        holder = nn.Sequential(OrderedDict(lin=lin))

        def cfg():
            return LoraConfig(r=R, lora_alpha=LORA_ALPHA, target_modules=["lin"], init_lora_weights=False)

        peft_model = get_peft_model(holder, cfg(), adapter_name="a0")
        for i in range(1, n):
            peft_model.add_adapter(f"a{i}", cfg())
        layer = peft_model.base_model.model.lin
        with torch.no_grad():
            for i in range(n):
                layer.lora_A[f"a{i}"].weight.copy_(A_stack[i])
                layer.lora_B[f"a{i}"].weight.copy_(B_stack[i])
                assert layer.scaling[f"a{i}"] == scale
        assert layer.base_layer is lin  # PEFT wraps (shares) the same base linear
        peft_model.eval()

    return Setup(
        x,
        lin,
        W,
        b,
        A_stack,
        Bt_stack,
        B_stack,
        scales,
        ids_seq,
        adapter_ids,
        order,
        offsets,
        A_stack[0].contiguous(),
        B_stack[0].contiguous(),
        scale,
        peft_model,
        names,
    )


# ----------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------
def multi_op(s: Setup, order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch.ops.lora_ext.lora_linear_multi.default(
        s.x, s.W, s.b, s.A_stack, s.B_stack, s.scales, s.adapter_ids, 0.0, False, order, offsets
    )


def reference_rows(s: Setup, rows: torch.Tensor) -> torch.Tensor:
    """float64 ``x W^T + b + s_a B_a (A_a x)`` for the given flat rows; [len(rows), out]."""
    xf = s.x.reshape(-1, s.x.shape[-1])[rows].double()
    out = []
    for i, row in enumerate(rows.tolist()):
        a = int(s.adapter_ids[row])
        xr = xf[i]
        y = s.W.double() @ xr + s.b.double()
        y = y + float(s.scales[a]) * (s.B_stack[a].double() @ (s.A_stack[a].double() @ xr))
        out.append(y)
    return torch.stack(out)


@dataclass
class Result:
    case: Case
    used: int  # distinct adapters in the batch
    timings: Timings
    diff_peft: float
    diff_ref: float


def bench_case(case: Case, budget: Budget) -> Result:
    s = build(case)
    with torch.no_grad():
        y_multi = multi_op(s, s.order, s.offsets)
        y_peft = s.peft_model(s.x, adapter_names=s.names) if s.peft_model is not None else None
        diff_peft = (y_multi - y_peft).abs().max().item() if y_peft is not None else float("nan")
        gen = torch.Generator().manual_seed(SEED)
        rows = torch.randperm(case.rows, generator=gen)[: min(N_REF_ROWS, case.rows)]
        y_flat = y_multi.reshape(-1, y_multi.shape[-1])[rows].double()
        diff_ref = (y_flat - reference_rows(s, rows)).abs().max().item()
        del y_multi, y_peft

        n = case.n_adapters

        def step_multi_group() -> None:
            order, offsets = torch.ops.lora_ext.lora_group_rows(s.adapter_ids, n)
            multi_op(s, order, offsets)

        variants = [
            Variant(LINEAR, lambda: F.linear(s.x, s.W, s.b)),
            Variant(SINGLE, lambda: lora_ext.ops.lora_linear(s.x, s.W, s.b, s.A0, s.B0, s.scale)),
            Variant(MULTI, lambda: multi_op(s, s.order, s.offsets)),
            Variant(MULTI_G, step_multi_group),
        ]
        if s.peft_model is not None:
            variants.append(Variant(PEFT, lambda: s.peft_model(s.x, adapter_names=s.names)))
        timings = run_interleaved(variants, budget)
    return Result(case, int(s.ids_seq.unique().numel()), timings, diff_peft, diff_ref)


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
HEADERS = [
    "case",
    "n_adapters",
    "distribution",
    "tokens",
    "rounds",
    "linear ms",
    "single ms",
    "multi ms",
    "multi+group ms",
    "peft ms",
    "multi/linear",
    "single/linear",
    "multi/single",
    "peft/linear",
    "max|multi-peft|",
    "max|multi-f64|",
]


def result_row(res: Result) -> list[str]:
    c, t = res.case, res.timings
    peft_ms = fmt_ms(t.median_ms(PEFT)) if t.has(PEFT) else "-"
    peft_ratio = f"{t.ratio(PEFT, LINEAR):.3f}" if t.has(PEFT) else "-"
    return [
        f"{c.group} {c.label}",
        str(c.n_adapters),
        f"{c.dist} ({res.used} used)",
        f"{c.seqs}x{c.tokens}",
        str(t.rounds),
        fmt_ms(t.median_ms(LINEAR)),
        fmt_ms(t.median_ms(SINGLE)),
        fmt_ms(t.median_ms(MULTI)),
        fmt_ms(t.median_ms(MULTI_G)),
        peft_ms,
        f"{t.ratio(MULTI, LINEAR):.3f}",
        f"{t.ratio(SINGLE, LINEAR):.3f}",
        f"{t.ratio(MULTI, SINGLE):.3f}",
        peft_ratio,
        f"{res.diff_peft:.1e}",
        f"{res.diff_ref:.1e}",
    ]


TARGET_LINEAR = {"a": 1.03, "b": 1.05, "c": 1.05}
TARGET_SINGLE = {"a": 1.02}


def target_lines(results: list[Result]) -> list[str]:
    out = []
    for res in results:
        c, t = res.case, res.timings
        name = f"{c.group} {c.label} n={c.n_adapters} {c.dist}"
        ml = t.ratio(MULTI, LINEAR)
        lim = TARGET_LINEAR[c.group]
        checks = [f"multi/linear {ml:.3f} <= {lim:.2f}: {'ok' if ml <= lim else 'MISSED'}"]
        if c.group in TARGET_SINGLE:
            ms = t.ratio(MULTI, SINGLE)
            lim = TARGET_SINGLE[c.group]
            checks.append(f"multi/single {ms:.3f} <= {lim:.2f}: {'ok' if ms <= lim else 'MISSED'}")
        out.append(f"- {name}: " + "; ".join(checks))
    return out


# ----------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bench_multi {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_cases(text: str) -> list[str]:
    groups = [g.strip().lower() for g in text.split(",") if g.strip()]
    bad = [g for g in groups if g not in ("a", "b", "c")]
    if bad or not groups:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of a,b,c, got {text!r}")
    return groups


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: small sizes, few rounds (< 1 min)")
    ap.add_argument(
        "--cases", type=parse_cases, default=["a", "b", "c"], metavar="a,b,c", help="which cases to run (default a,b,c)"
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="exactly this many measured rounds per case (default: time budget)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument(
        "--budget", type=float, default=None, help="measuring seconds per case after warm-up (default 30; --quick 0.5)"
    )
    return ap.parse_args(argv)


def make_budget(args: argparse.Namespace) -> Budget:
    if args.quick:
        b = Budget(0.5 if args.budget is None else args.budget, 3, 5, warmup_s=0.0, max_warmup=1)
    else:
        b = Budget(30.0 if args.budget is None else args.budget, 10, 60)
    if args.rounds is not None:
        if args.rounds < 1:
            raise SystemExit("--rounds must be >= 1")
        b = Budget(0.0, args.rounds, args.rounds, b.warmup_s, b.max_warmup)
    return b


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    budget = make_budget(args)
    cases = make_cases(args.quick, args.cases)
    if not HAVE_PEFT:
        log("peft is not importable: PEFT columns are '-'")
    t_start = time.perf_counter()

    results: list[Result] = []
    for case in cases:
        t0 = time.perf_counter()
        res = bench_case(case, budget)
        results.append(res)
        log(
            f"{case.group} {case.label} n={case.n_adapters} {case.dist} {case.seqs}x{case.tokens}: "
            f"{res.timings.rounds} rounds, {time.perf_counter() - t0:.1f} s"
        )
        gc.collect()

    h = cases[0].hidden if cases else 0
    print("# lora_ext multi-adapter benchmark" + (" (--quick)" if args.quick else ""))
    print()
    print(md_table(["", ""], machine_info(args.threads)))
    print()
    print(
        f"fp32, CPU, eval, torch.no_grad(); nn.Linear({h}, {h}) with bias, r={R}, lora_alpha={LORA_ALPHA}, "
        f"one adapter per sequence (uniform, or Zipf({ZIPF_S}) over adapter ranks). Times are medians over "
        "interleaved rounds; `a/b` is the median of per-round time ratios (< 1: a is faster). "
        "`multi` gets the grouping (lora_group_rows) precomputed once per batch; `multi+group` computes it "
        "inside the timed call. `tokens` is sequences x tokens per sequence. `max|multi-f64|` is against a "
        f"float64 per-row reference on {N_REF_ROWS} rows."
    )
    print()
    print(md_table(HEADERS, [result_row(r) for r in results]))
    print()
    print(
        "Targets: multi <= 1.03x linear in (a), <= 1.05x linear in (b) and (c); "
        "multi not slower than single by more than 2% in (a)."
    )
    print()
    for line in target_lines(results):
        print(line)
    log(f"done in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
