"""Benchmark one LoRA linear layer: lora_ext vs PEFT vs a bare frozen ``nn.Linear``.

Run it with the project's virtual env, with ``-P`` (or from another directory) so the
source folder ``lora_ext/`` does not shadow the installed package::

    .venv/bin/python -P benchmarks/bench_layer.py            # full run, ~5-10 min on 2 cores
    .venv/bin/python -P benchmarks/bench_layer.py --quick    # smoke test: small shapes, few rounds
    .venv/bin/python -P benchmarks/bench_layer.py --shapes 2048x1024x1024x8 8x4096x4096x16

Shapes are ``TOKENSxINxOUTxR``. Everything runs in fp32 on the CPU with
``torch.set_num_threads(2)`` (``--threads``). Progress goes to stderr, the report (markdown
tables) to stdout. Nothing is asserted: the numbers are for reading.

What it measures, per shape (base ``nn.Linear(in, out, bias=False)``, frozen; LoRA rank r,
``lora_alpha = 2r``, random A and B so the low-rank work is real; PEFT's adapter is copied
into lora_ext's so both compute the same function):

1. Forward, eval mode under ``torch.no_grad()``.
2. Forward + backward, train mode, LoRA dropout 0 and 0.1. ``x`` requires grad (grad_x is
   computed, as in a middle layer); backward is ``y.backward(g)`` with a fixed random ``g``.
   Gradients are reset (set to None) outside the timed region.
3. Bytes autograd saves for backward (train mode), via ``torch.autograd.graph.saved_tensors_hooks``,
   counting unique storages. "new" is what is saved beyond ``x`` and the layer's parameters,
   i.e. memory that autograd alone keeps alive until backward (for PEFT with dropout this
   includes the dropped copy of ``x`` and its mask).

The variants run INTERLEAVED in one process: every round runs each variant once, in an order
that rotates from round to round, after a warm-up. Rounds continue until a per-case time
budget is spent (within ``[min_rounds, max_rounds]``). Times are medians over rounds; a ratio
is the median over rounds of ``t_variant / t_linear`` measured in the same round, which is
robust to load drifting over the run.

4. Merge / unmerge of an r=16 fp32 adapter into a ``[11008, 4096]`` weight (in=4096,
   out=11008), fp32 and bf16 base: ``LoraLinear.merge()``/``unmerge()`` (``ops.merge_``) vs
   PEFT's ``merge()``/``unmerge()`` vs a reference in-place ``W.addmm_(B, A, alpha=s)`` (fp32
   only). Each variant owns its copy of the weight. Peak extra memory is measured with
   ``torch.profiler`` (``profile_memory=True``): the running sum of the chronologically
   ordered allocation events during one call, reported in MB and as % of the weight's bytes.

   Note on torch 2.13: the ``"[memory]"`` entries of ``prof.events()`` are only the
   allocations and frees that happen *outside* any op; those made inside an op (e.g. the
   weight-sized ``B @ A`` temporary of ``aten::mm``) are folded into that op's
   ``cpu_memory_usage``. A walk over ``"[memory]"`` events alone therefore misses them, so
   this script reads every allocation event from the profiler's event tree
   (``prof.profiler.kineto_results.experimental_event_tree()``), sorted by start time, and
   falls back to the ``"[memory]"`` events (with a warning) if that API is unavailable.
   Only allocations through PyTorch's CPU allocator are seen (not BLAS-internal buffers).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

import lora_ext
from lora_ext_dev.timing import Budget, Timings, Variant, fmt_ms, machine_info, md_table, run_interleaved  # noqa: E402

try:
    import peft
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    HAVE_PEFT = True
except Exception:  # pragma: no cover - PEFT is optional
    peft = None
    HAVE_PEFT = False

DEFAULT_SHAPES = [(2048, 4096, 4096, 16), (2048, 1024, 1024, 8), (8, 4096, 4096, 16), (2048, 4096, 11008, 64)]
QUICK_SHAPES = [(2048, 1024, 1024, 8), (8, 4096, 4096, 16)]
TRAIN_DROPOUTS = (0.0, 0.1)
MERGE_SHAPE = (4096, 11008, 16)  # in, out, r  ->  W is [out, in]
MB = 1024 * 1024

LINEAR, PEFT, EXT, REF = "linear", "peft", "lora_ext", "addmm_"


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
@dataclass
class PairVariant(Variant):
    """Two steps run back to back and timed separately (merge, then unmerge to restore)."""

    second: Callable[[], None] = lambda: None
    labels: tuple[str, str] = ("merge", "unmerge")

    def run(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.step()
        t1 = time.perf_counter()
        self.second()
        t2 = time.perf_counter()
        return {f"{self.name}.{self.labels[0]}": t1 - t0, f"{self.name}.{self.labels[1]}": t2 - t1}


# ----------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    tokens: int
    in_features: int
    out_features: int
    r: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        try:
            n, i, o, r = (int(p) for p in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected TOKENSxINxOUTxR, e.g. 2048x4096x4096x16, got {text!r}"
            ) from None
        return cls(n, i, o, r)

    def __str__(self) -> str:
        return f"{self.tokens}x{self.in_features}x{self.out_features} r{self.r}"

    def cells(self) -> list[str]:
        return [str(self.tokens), str(self.in_features), str(self.out_features), str(self.r)]


SHAPE_HEADERS = ["tokens", "in", "out", "r"]


def frozen_linear(in_features: int, out_features: int, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A bias-free ``nn.Linear`` with a random frozen weight."""
    lin = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features) / math.sqrt(in_features))
    lin.weight.requires_grad_(False)
    return lin


def make_peft(base: nn.Linear, r: int, alpha: float, dropout: float) -> nn.Module:
    """PEFT's LoRA ``Linear`` on ``base`` with random A and B, adapter kept in fp32.

    PEFT casts a layer's adapter to the base dtype; its model-level default
    (``autocast_adapter_dtype=True``) brings bf16/fp16 adapters back to fp32, which is what
    we do here by hand.
    """
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=False)
    layer = PeftLoraLinear(base, "default", config=cfg, r=r, lora_alpha=alpha)
    layer.lora_A.float()
    layer.lora_B.float()
    return layer


def make_ext(base: nn.Linear, r: int, alpha: float, dropout: float, like: Optional[nn.Module] = None) -> nn.Module:
    """``lora_ext.LoraLinear`` on ``base``; copies the adapter of the PEFT layer ``like`` if given."""
    layer = lora_ext.LoraLinear(base, r=r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=False)
    if like is not None:
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(like.lora_A["default"].weight)
            layer.lora_B["default"].weight.copy_(like.lora_B["default"].weight)
    return layer


def build_layers(base: nn.Linear, r: int, dropout: float) -> dict[str, nn.Module]:
    """The variants sharing one frozen base layer: bare linear, PEFT (if installed), lora_ext."""
    alpha = 2 * r
    layers: dict[str, nn.Module] = {LINEAR: base}
    peft_layer = make_peft(base, r, alpha, dropout) if HAVE_PEFT else None
    if peft_layer is not None:
        layers[PEFT] = peft_layer
    layers[EXT] = make_ext(base, r, alpha, dropout, like=peft_layer)
    return layers


def lora_names() -> list[str]:
    return [PEFT, EXT] if HAVE_PEFT else [EXT]


# ----------------------------------------------------------------------------------------
# sections 1-3: forward, forward+backward, saved tensors
# ----------------------------------------------------------------------------------------
def bench_forward(shape: Shape, budget: Budget) -> tuple[Timings, float]:
    """Eval-mode forward under no_grad. Returns timings and max |y_ext - y_peft| (nan without PEFT)."""
    base = frozen_linear(shape.in_features, shape.out_features)
    layers = build_layers(base, shape.r, dropout=0.0)
    for m in layers.values():
        m.eval()
    x = torch.randn(shape.tokens, shape.in_features)

    def step(m: nn.Module) -> Callable[[], None]:
        def f() -> None:
            with torch.no_grad():
                m(x)

        return f

    with torch.no_grad():
        diff = (layers[EXT](x) - layers[PEFT](x)).abs().max().item() if HAVE_PEFT else float("nan")
    timings = run_interleaved([Variant(n, step(m)) for n, m in layers.items()], budget)
    return timings, diff


def bench_train(shape: Shape, dropout: float, budget: Budget) -> Timings:
    """Train-mode forward + backward with grad_x and the adapters' grads."""
    base = frozen_linear(shape.in_features, shape.out_features)
    layers = build_layers(base, shape.r, dropout)
    for m in layers.values():
        m.train()
    x = torch.randn(shape.tokens, shape.in_features, requires_grad=True)
    g = torch.randn(shape.tokens, shape.out_features)

    def step(m: nn.Module) -> Callable[[], None]:
        def f() -> None:
            m(x).backward(g)

        return f

    def reset(m: nn.Module) -> Callable[[], None]:
        def f() -> None:
            x.grad = None
            m.zero_grad(set_to_none=True)

        return f

    return run_interleaved([Variant(n, step(m), reset(m)) for n, m in layers.items()], budget)


@dataclass
class SavedBytes:
    total: int  # unique storages saved for backward
    new: int  # of which not x and not a parameter of the layer


def saved_for_backward(module: nn.Module, x: torch.Tensor) -> SavedBytes:
    """Bytes of the unique storages autograd saves in ``module(x)``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)  # keeps the graph, hence the saved storages, alive while we count
    known = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in module.parameters()}
    result = SavedBytes(
        total=sum(storages.values()),
        new=sum(n for ptr, n in storages.items() if ptr not in known),
    )
    del y
    return result


def measure_saved(shape: Shape, dropout: float) -> dict[str, SavedBytes]:
    base = frozen_linear(shape.in_features, shape.out_features)
    layers = build_layers(base, shape.r, dropout)
    x = torch.randn(shape.tokens, shape.in_features, requires_grad=True)
    out = {}
    for name, m in layers.items():
        m.train()
        out[name] = saved_for_backward(m, x)
    return out


# ----------------------------------------------------------------------------------------
# section 4: merge
# ----------------------------------------------------------------------------------------
def _allocation_deltas(prof) -> list[tuple[float, int]]:
    """(time, +bytes alloc / -bytes free) of every CPU allocator event in the profile."""
    try:
        from torch._C._profiler import _EventType

        tree = prof.profiler.kineto_results.experimental_event_tree()
    except Exception:  # pragma: no cover - older/newer torch without the event tree
        print(
            "warning: profiler event tree unavailable; using '[memory]' events only "
            "(misses allocations made inside ops)",
            file=sys.stderr,
        )
        evs = [e for e in prof.events() if e.name == "[memory]"]
        return [(e.time_range.start, e.cpu_memory_usage) for e in evs]

    out, stack = [], list(tree)
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            out.append((e.start_time_ns, e.extra_fields.alloc_size))
    return out


def peak_extra_bytes(fn: Callable[[], None]) -> int:
    """Peak of the running sum of CPU allocations minus frees while ``fn()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for _, delta in sorted(_allocation_deltas(prof), key=lambda td: td[0]):
        running += delta
        peak = max(peak, running)
    return peak


def merge_variants(dtype: torch.dtype) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """name -> (merge, unmerge); each variant owns a copy of the same weight and adapter."""
    d_in, d_out, r = MERGE_SHAPE
    alpha = 2 * r
    w0 = torch.randn(d_out, d_in).div_(math.sqrt(d_in)).to(dtype)

    def base() -> nn.Linear:
        lin = nn.utils.skip_init(nn.Linear, d_in, d_out, bias=False, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w0)
        lin.weight.requires_grad_(False)
        return lin

    out: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
    peft_layer = make_peft(base(), r, alpha, 0.0) if HAVE_PEFT else None
    ext_layer = make_ext(base(), r, alpha, 0.0, like=peft_layer)
    a = ext_layer.lora_A["default"].weight.detach()
    b = ext_layer.lora_B["default"].weight.detach()
    s = ext_layer.scaling["default"]
    if dtype == torch.float32:
        w = w0.clone()
        out[REF] = (lambda: w.addmm_(b, a, alpha=s), lambda: w.addmm_(b, a, alpha=-s))
    if peft_layer is not None:
        out[PEFT] = (peft_layer.merge, peft_layer.unmerge)
    out[EXT] = (ext_layer.merge, ext_layer.unmerge)
    return out


@dataclass
class MergeResult:
    dtype: torch.dtype
    weight_bytes: int
    variants: list[str]
    timings: Timings  # keys "<variant>.merge" and "<variant>.unmerge"
    peak_merge: dict[str, int]
    peak_unmerge: dict[str, int]


def bench_merge(dtype: torch.dtype, budget: Budget) -> MergeResult:
    """Time merge/unmerge of every variant (interleaved) and profile the peak extra memory of each."""
    fns = merge_variants(dtype)
    d_in, d_out, _ = MERGE_SHAPE
    weight_bytes = d_in * d_out * torch.empty((), dtype=dtype).element_size()
    peak_m, peak_u = {}, {}
    with torch.no_grad():
        for name, (merge, unmerge) in fns.items():
            merge()  # first touch and thread-pool start-up stay out of the profile
            unmerge()
            peak_m[name] = peak_extra_bytes(merge)
            peak_u[name] = peak_extra_bytes(unmerge)
        variants = [PairVariant(name, merge, second=unmerge) for name, (merge, unmerge) in fns.items()]
        timings = run_interleaved(variants, budget)
    return MergeResult(dtype, weight_bytes, list(fns), timings, peak_m, peak_u)


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def fmt_bytes(n: int) -> str:
    if n >= MB:
        return f"{n / MB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def forward_table(results: list[tuple[Shape, Timings, float]]) -> str:
    names = lora_names()
    headers = SHAPE_HEADERS + ["rounds", "linear ms"] + [f"{n} ms" for n in names] + [f"{n} / linear" for n in names]
    if HAVE_PEFT:
        headers += [f"{EXT} / {PEFT}", f"max abs diff {EXT} vs {PEFT}"]
    rows = []
    for shape, t, diff in results:
        row = shape.cells() + [str(t.rounds), fmt_ms(t.median_ms(LINEAR))]
        row += [fmt_ms(t.median_ms(n)) for n in names] + [f"{t.ratio(n, LINEAR):.3f}" for n in names]
        if HAVE_PEFT:
            row += [f"{t.ratio(EXT, PEFT):.3f}", f"{diff:.1e}"]
        rows.append(row)
    return md_table(headers, rows)


def train_table(results: list[tuple[Shape, float, Timings]]) -> str:
    names = lora_names()
    headers = SHAPE_HEADERS + ["dropout", "rounds", "linear ms"] + [f"{n} ms" for n in names]
    headers += [f"{n} / linear" for n in names] + ([f"{EXT} / {PEFT}"] if HAVE_PEFT else [])
    rows = []
    for shape, p, t in results:
        row = shape.cells() + [f"{p:g}", str(t.rounds), fmt_ms(t.median_ms(LINEAR))]
        row += [fmt_ms(t.median_ms(n)) for n in names] + [f"{t.ratio(n, LINEAR):.3f}" for n in names]
        row += [f"{t.ratio(EXT, PEFT):.3f}"] if HAVE_PEFT else []
        rows.append(row)
    return md_table(headers, rows)


def saved_table(results: list[tuple[Shape, float, dict[str, SavedBytes]]]) -> str:
    names = [LINEAR] + lora_names()
    headers = SHAPE_HEADERS + ["dropout", "x"]
    for n in names:
        headers += [f"{n} saved", f"{n} new", f"{n} new / x"]
    rows = []
    for shape, p, saved in results:
        x_bytes = shape.tokens * shape.in_features * 4
        row = shape.cells() + [f"{p:g}", fmt_bytes(x_bytes)]
        for n in names:
            row += [fmt_bytes(saved[n].total), fmt_bytes(saved[n].new), f"{100 * saved[n].new / x_bytes:.1f}%"]
        rows.append(row)
    return md_table(headers, rows)


def merge_table(results: list[MergeResult]) -> str:
    headers = [
        "base dtype",
        "variant",
        "rounds",
        "merge ms",
        "unmerge ms",
        f"merge / fp32 {REF}",
        "merge peak extra",
        "% of W",
        "unmerge peak extra",
        "% of W",
    ]
    ref_ms = next((r.timings.median_ms(f"{REF}.merge") for r in results if REF in r.variants), None)
    rows = []
    for res in results:
        t = res.timings
        for n in res.variants:
            m_ms = t.median_ms(f"{n}.merge")
            rows.append(
                [
                    str(res.dtype).replace("torch.", ""),
                    n,
                    str(t.rounds),
                    fmt_ms(m_ms),
                    fmt_ms(t.median_ms(f"{n}.unmerge")),
                    f"{m_ms / ref_ms:.2f}" if ref_ms else "-",
                    f"{res.peak_merge[n] / MB:.1f} MB",
                    f"{100 * res.peak_merge[n] / res.weight_bytes:.1f}%",
                    f"{res.peak_unmerge[n] / MB:.1f} MB",
                    f"{100 * res.peak_unmerge[n] / res.weight_bytes:.1f}%",
                ]
            )
    return md_table(headers, rows)


# ----------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bench_layer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: small shapes only, few rounds")
    ap.add_argument(
        "--shapes",
        nargs="+",
        type=Shape.parse,
        metavar="NxINxOUTxR",
        help="shapes to run (default: the four standard ones; --quick: the two small ones)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument(
        "--budget", type=float, default=None, help="measuring seconds per case after warm-up (default 20; --quick 1)"
    )
    ap.add_argument("--no-merge", action="store_true", help="skip the merge section")
    return ap.parse_args(argv)


def budgets(args: argparse.Namespace) -> tuple[Budget, Budget]:
    """(per layer case, per merge dtype)."""
    if args.quick:
        secs = 1.0 if args.budget is None else args.budget
        return Budget(secs, 3, 5, warmup_s=0.0, max_warmup=1), Budget(secs, 2, 3, warmup_s=0.0, max_warmup=1)
    secs = 20.0 if args.budget is None else args.budget
    return Budget(secs, 5, 50), Budget(0.75 * secs, 5, 30)


def run_layer_sections(shapes: list[Shape], budget: Budget) -> tuple[list, list, list]:
    fwd, train, saved = [], [], []
    for shape in shapes:
        t0 = time.perf_counter()
        timings, diff = bench_forward(shape, budget)
        fwd.append((shape, timings, diff))
        log(f"forward {shape}: {timings.rounds} rounds, {time.perf_counter() - t0:.1f} s")
        gc.collect()
        for p in TRAIN_DROPOUTS:
            t0 = time.perf_counter()
            train.append((shape, p, bench_train(shape, p, budget)))
            log(f"train {shape} dropout {p:g}: {train[-1][2].rounds} rounds, {time.perf_counter() - t0:.1f} s")
            gc.collect()
            saved.append((shape, p, measure_saved(shape, p)))
            gc.collect()
    return fwd, train, saved


def run_merge_section(budget: Budget) -> list[MergeResult]:
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        t0 = time.perf_counter()
        out.append(bench_merge(dtype, budget))
        log(f"merge {dtype}: {out[-1].timings.rounds} rounds, {time.perf_counter() - t0:.1f} s")
        gc.collect()
    return out


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = args.shapes or [Shape(*s) for s in (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)]
    layer_budget, merge_budget = budgets(args)
    if not HAVE_PEFT:
        log("peft is not importable: comparing lora_ext with the bare linear only")
    t_start = time.perf_counter()

    fwd, train, saved = run_layer_sections(shapes, layer_budget)
    merges = [] if args.no_merge else run_merge_section(merge_budget)

    d_in, d_out, r = MERGE_SHAPE
    print("# lora_ext layer benchmark" + (" (--quick)" if args.quick else ""))
    print()
    print(md_table(["", ""], machine_info(args.threads)))
    print()
    print(
        "fp32, CPU, bias-free frozen base, lora_alpha = 2r, random A and B. Times are medians over "
        "interleaved rounds; `a / b` is the median of per-round time ratios (< 1: a is faster)."
    )
    print()
    print("## 1. Forward, eval mode, torch.no_grad()")
    print()
    print(forward_table(fwd))
    print()
    print("## 2. Forward + backward, train mode (x requires grad; grad_x, grad_A, grad_B)")
    print()
    print(train_table(train))
    print()
    print("## 3. Saved for backward per layer (unique storages; new = beyond x and the layer's parameters)")
    print()
    print(saved_table(saved))
    if merges:
        print()
        print(f"## 4. Merge / unmerge: W [{d_out}, {d_in}] (in={d_in}, out={d_out}), r={r} fp32 adapter")
        print()
        print(merge_table(merges))
        print()
        print(
            f"`{REF}` is the in-place reference `W.addmm_(B, A, alpha=±s)` (fp32 only). Peak extra memory is "
            "the peak of allocations minus frees seen by the torch profiler during one call."
        )
    log(f"done in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
