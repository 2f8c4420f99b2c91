"""Python's figures next to the C++ program's: the same prefix-recomputing greedy loop (lora_ext_dev.generate.greedy) with
transformers + lora_ext, eager and under torch.compile, at batch 1 and 8.

    python python_bench.py DATA [--rounds 3] [--no-compile]

DATA is make_data.py's folder (its model choice is read from DATA/export.json). Variants: the base, the first
adapter merged (lora_ext.merge), unmerged (set_adapter) and per-row (adapter_batch alternating the two adapters),
and, eager only, the base through transformers' generate with its KV cache (what recomputing the prefix costs);
rounds are interleaved with alternating order. Prints tokens/s ranges and the process's RSS after each mode.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch
from safetensors.torch import load_file

import lora_ext
from lora_ext_dev.generate import greedy, last_logits, load_model

HERE = pathlib.Path(__file__).resolve().parent


def rss_mib(key: str = "VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench(data: pathlib.Path, rounds: int, compile_too: bool, eager_too: bool = True) -> dict:
    meta = json.loads((data / "export.json").read_text())
    model, _ = load_model(meta["model"])
    prompt = load_file(str(data / "prompt.safetensors"))["input_ids"]
    steps = meta["steps"]
    names = meta["adapters"]
    for n in names:
        lora_ext.load_adapter(model, str(data / "adapters" / n), n)
    lora_ext.set_adapter(model, names[0])
    fn = {"eager": last_logits(model)}
    result = {"steps": steps, "prompt_tokens": prompt.shape[1], "threads": torch.get_num_threads()}

    def variants(mode):
        f = fn[mode]

        def base(b):
            with lora_ext.disable_adapters(model):
                greedy(f, prompt.repeat(b, 1), steps)

        def merged(b):
            lora_ext.merge(model, [names[0]])
            try:
                t = time.perf_counter()
                greedy(f, prompt.repeat(b, 1), steps)
                return time.perf_counter() - t
            finally:
                lora_ext.unmerge(model)

        def per_row(b):
            with lora_ext.adapter_batch(model, [names[i % len(names)] for i in range(b)]):
                greedy(f, prompt.repeat(b, 1), steps)

        def kv_cache(b):  # what the prefix recomputation costs: transformers' generate with its KV cache
            with lora_ext.disable_adapters(model):
                model.generate(
                    prompt.repeat(b, 1),
                    attention_mask=torch.ones_like(prompt.repeat(b, 1)),
                    max_new_tokens=steps,
                    min_new_tokens=steps,
                    do_sample=False,
                    pad_token_id=0,
                )

        def unmerged(b):
            greedy(f, prompt.repeat(b, 1), steps)

        out = {"base": base, "merged": merged, "unmerged": unmerged, "per-row": per_row}
        if mode == "eager":
            out["base, KV cache"] = kv_cache
        return out

    modes = ["eager"] if eager_too else []
    if compile_too:
        # one graph per variant and batch size (merged, adapters on/off and per-row change the guards): never fall
        # back to eager for hitting the default limit of 8
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.accumulated_recompile_limit = 512
        t0 = time.perf_counter()
        compiled = torch.compile(model, dynamic=True)
        fn["compile"] = last_logits(compiled)
        with torch.no_grad():
            for v in variants("compile").values():  # compile every graph once, outside the timing
                v(1)
                v(8)
        result["compile_warmup_s"] = time.perf_counter() - t0
        modes.append("compile")
    with torch.no_grad():
        for mode in modes:
            vs = variants(mode)
            tps = {(k, b): [] for k in vs for b in (1, 8)}
            for r in range(rounds):
                order = list(vs) if r % 2 == 0 else list(vs)[::-1]
                for k in order:
                    for b in (1, 8):
                        t = time.perf_counter()
                        inner = vs[k](b)  # merged: the time without the merge
                        dt = inner if isinstance(inner, float) else time.perf_counter() - t
                        tps[(k, b)].append(b * steps / dt)
            result[mode] = {f"{k} b{b}": [round(min(v), 2), round(max(v), 2)] for (k, b), v in tps.items()}
            result[f"{mode}_rss_mib"] = round(rss_mib())
            result[f"{mode}_rss_anon_mib"] = round(rss_mib("RssAnon"))
    result["peak_rss_mib"] = round(rss_mib("VmHWM"))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--compile-only", action="store_true", help="torch.compile only (its RSS without eager's runs)")
    args = p.parse_args(argv)
    res = bench(pathlib.Path(args.data), args.rounds, not args.no_compile, not args.compile_only)
    print(
        f"{res['steps']} new tokens from a {res['prompt_tokens']}-token prompt, {res['threads']} threads, "
        f"{args.rounds} rounds (the prefix recomputed per token)"
    )
    for mode in ("eager", "compile"):
        if mode not in res:
            continue
        print(f"Python {mode} tokens/s (range)     batch 1          batch 8")
        for k in ("base", "merged", "unmerged", "per-row", "base, KV cache"):
            if f"{k} b1" not in res[mode]:
                continue
            b1, b8 = res[mode][f"{k} b1"], res[mode][f"{k} b8"]
            print(f"  {k:<24} {b1[0]:>7.1f}-{b1[1]:<7.1f} {b8[0]:>7.1f}-{b8[1]:<7.1f}")
        print(f"  RSS after {mode}: {res[f'{mode}_rss_mib']} MiB (anonymous {res[f'{mode}_rss_anon_mib']} MiB)")
    if "compile_warmup_s" in res:
        print(f"torch.compile warm-up (every variant's graphs): {res['compile_warmup_s']:.0f} s")
    print(f"peak RSS {res['peak_rss_mib']} MiB")
    (pathlib.Path(args.data) / "python_bench.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
