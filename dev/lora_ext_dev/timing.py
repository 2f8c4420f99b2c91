"""Timing and reporting helpers shared by the benchmark scripts (interleaved rounds in one
process, medians of per-round ratios, markdown tables)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import lora_ext


@dataclass(frozen=True)
class Budget:
    """How long one case (one shape, one mode) is measured."""

    seconds: float  # measuring time per case, after warm-up
    min_rounds: int
    max_rounds: int
    warmup_s: float = 1.0  # warm up for at least one round and this many seconds ...
    max_warmup: int = 3  # ... but at most this many rounds


@dataclass
class Variant:
    """One thing to time: ``step`` is timed, ``reset`` (optional) runs untimed before it."""

    name: str
    step: Callable[[], None]
    reset: Optional[Callable[[], None]] = None

    def run(self) -> dict[str, float]:
        """Run once; returns seconds by measurement name."""
        if self.reset is not None:
            self.reset()
        t0 = time.perf_counter()
        self.step()
        return {self.name: time.perf_counter() - t0}


@dataclass
class Timings:
    """Per-variant lists of seconds, one entry per round (same index = same round)."""

    times: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return min((len(v) for v in self.times.values()), default=0)

    def has(self, name: str) -> bool:
        return name in self.times

    def median_ms(self, name: str) -> float:
        return 1e3 * statistics.median(self.times[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of ``t[name] / t[baseline]`` from the same round."""
        return statistics.median(a / b for a, b in zip(self.times[name], self.times[baseline]))


def run_interleaved(variants: list[Variant], budget: Budget) -> Timings:
    """Warm up, then run rounds of every variant once (rotating order) until the budget is spent."""
    start = time.perf_counter()
    warm = 0
    while warm < budget.max_warmup and (warm == 0 or time.perf_counter() - start < budget.warmup_s):
        for v in variants:
            v.run()
        warm += 1

    out = Timings()
    start = time.perf_counter()
    r = 0
    while r < budget.max_rounds and (r < budget.min_rounds or time.perf_counter() - start < budget.seconds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            for key, seconds in v.run().items():
                out.times.setdefault(key, []).append(seconds)
        r += 1
    return out


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def machine_info(threads: int) -> list[list[str]]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = lora_ext.build_info()
    return [
        ["torch", torch.__version__],
        ["lora_ext", f"{info['version']} ({info.get('build_type', '?')}, {info.get('compiler', '?')})"],
        ["peft", peft_version()],
        [
            "threads",
            f"{threads} (torch.get_num_threads() = {torch.get_num_threads()}, os.cpu_count() = {os.cpu_count()})",
        ],
        ["cpu", cpu],
        ["python", platform.python_version()],
    ]


def peft_version() -> str:
    try:
        import peft

        return peft.__version__
    except ImportError:
        return "not installed"


def run_child(script: str, args: list[str], what: str) -> dict:
    """Run ``python -P script args`` (one benchmark variant in its own process); its last stdout line, as JSON."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-P", script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
