"""Soak test: many cycles of the adapter life cycle and of per-row batches on one model; RSS
must stop growing after warm-up and nothing may pile up (the caches are bounded by
construction: one adapter stack per layer, exact-merge codes per merged adapter, row
groupings per adapter_batch).

    bash scripts/run.sh scripts/soak.py                  # 10,000 cycles of each loop (minutes)
    bash scripts/run.sh scripts/soak.py --cycles 300     # the short version (tests/test_soak.py runs it)

Loop 1: load_adapter -> set_adapter -> merge (plain / exact, alternating) -> forward -> unmerge ->
delete_adapter, on a tiny Llama with two adapter folders. Loop 2: adapter_batch with a random
mix of 8 adapters and a random batch size, forward. RSS is read from /proc/self/statm after a
warm-up of 10% of the cycles and at the end; prints one line per loop and exits 1 if RSS grew
by more than --max-growth percent or state was left behind.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import sys
import tempfile
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def leftovers(model) -> dict[str, int]:
    """State that must not pile up across cycles (each count must be 0)."""
    import lora_ext
    from lora_ext import multi

    layers = [layer for _, layer in lora_ext.lora_layers(model)]
    configs = lora_ext.model.adapter_configs(model)
    return {
        "exact-merge codes of unmerged adapters": sum(
            len(set(layer._exact_codes) - set(layer.merged_adapters)) for layer in layers
        ),
        "adapters left in layers after delete": sum(len(set(layer.r) - set(configs)) for layer in layers),
        "adapter_batch contexts still open": multi._open_contexts + (multi._CURRENT.get() is not None),
    }


def run_loop(name, cycles, step, max_growth, check) -> bool:
    warm = max(1, cycles // 10)
    t0 = time.perf_counter()
    for i in range(warm):
        step(i)
    gc.collect()
    start = rss_bytes()
    for i in range(warm, cycles):
        step(i)
    gc.collect()
    end = rss_bytes()
    growth = 100.0 * (end - start) / start
    bad = {k: v for k, v in check().items() if v != 0}
    ok = growth < max_growth and not bad
    print(
        f"{name}: {cycles} cycles in {time.perf_counter() - t0:.1f} s; RSS after warm-up {start / 2**20:.1f} MiB, "
        f"at the end {end / 2**20:.1f} MiB ({growth:+.2f}%, limit {max_growth}%); leftover state: {bad or 'none'}"
        f" -> {'ok' if ok else 'FAIL'}"
    )
    return ok


def main(argv=None) -> int:
    import lora_ext
    from lora_ext import LoraConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=10_000)
    ap.add_argument("--max-growth", type=float, default=2.0, help="allowed RSS growth after warm-up, percent")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = tiny_llama()
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(1))

    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for k, r in enumerate((4, 2)):
            m = lora_ext.inject_adapter(
                copy.deepcopy(base), LoraConfig(r=r, target_modules=targets[k:], init_lora_weights=False), f"s{k}"
            )
            folders.append(lora_ext.save_adapter(m, tmp, f"s{k}"))
        model = copy.deepcopy(base)
        lora_ext.load_adapter(model, folders[0], adapter_name="keep")  # one adapter stays all along

        def life_cycle(i):
            name = f"x{i % 3}"
            lora_ext.load_adapter(model, folders[i % 2], adapter_name=name)
            lora_ext.set_adapter(model, name)
            lora_ext.merge(model, exact=i % 2 == 0)
            with torch.no_grad():
                model(input_ids=ids[:, : 1 + i % 8])
            lora_ext.unmerge(model)
            lora_ext.set_adapter(model, "keep")
            lora_ext.delete_adapter(model, name)

        ok = run_loop(
            "load/set/merge/unmerge/delete", args.cycles, life_cycle, args.max_growth, lambda: leftovers(model)
        )

    served = copy.deepcopy(base)
    for k in range(8):
        lora_ext.inject_adapter(
            served, LoraConfig(r=1 + k % 4, target_modules=targets[k % 3 :], init_lora_weights=False), f"a{k}"
        )
    pool = [f"a{k}" for k in range(8)] + [lora_ext.BASE]

    def batch(i):
        n = rng.randint(1, 6)
        names = [rng.choice(pool) for _ in range(n)]
        x = torch.randint(0, 128, (n, rng.randint(1, 8)))
        with torch.no_grad(), lora_ext.adapter_batch(served, names):
            served(input_ids=x)

    ok &= run_loop(
        "adapter_batch (random mixes and sizes)", args.cycles, batch, args.max_growth, lambda: leftovers(served)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
