"""The Python side of examples/cpp/generate: export the model twice with AOTInductor, write the prompt's token ids
and Python's greedy tokens (transformers + lora_ext) for the C++ program to match.

    python make_data.py DATA [--model smollm2|tiny] [--adapters DIR DIR] [--steps N] [--bench]

DATA/ gets base.pt2 (form a: the plain base, adapters merged from C++), slots.pt2 (form b: two adapter slots of
rank --max-rank on every linear layer but the head), adapters/<name>/ (PEFT folders), prompt.safetensors
(input_ids [1, T]; metadata: the adapter names, the step count) and expected.safetensors (Python's tokens:
base, merged.<name>, unmerged.<name>, per_row). --model tiny builds a 2-layer Llama from a config with two random
adapters (the tests' setup); --model smollm2 loads SmolLM2-135M (dev/lora_ext_dev/smollm2.py) with the main job's
adapters (runs/finetune_llm/adapters/{docs,code} by default). python_bench.py DATA measures Python (eager and
torch.compile) with the same prefix-recomputing greedy loop as the C++ program.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import torch
from safetensors.torch import save_file

import lora_ext
from lora_ext.export import export_causal_lm
from lora_ext_dev.generate import PROMPT, greedy, last_logits, load_model

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent


def random_adapters(model, folder: pathlib.Path, names=("docs", "code"), r: int = 4) -> list[pathlib.Path]:
    """Two adapters with random A and B (B large enough to change the greedy tokens), saved in PEFT's format."""
    out = []
    for i, name in enumerate(names):
        m = lora_ext.inject_adapter(
            model,
            lora_ext.LoraConfig(
                r=r,
                lora_alpha=2 * r,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
            name,
        )
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, layer in lora_ext.lora_layers(m):
                a, b = layer.adapter_weights(name)
                a.copy_(torch.randn(a.shape, generator=g) * 0.3)
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
        out.append(pathlib.Path(lora_ext.save_adapter(m, str(folder), name)))
        model = lora_ext.unload(m)
    return out


def python_tokens(model, adapters: dict, prompt: torch.Tensor, steps: int) -> dict:
    names = list(adapters)
    out = {"base": greedy(last_logits(model), prompt, steps)}
    for name, path in adapters.items():
        lora_ext.load_adapter(model, str(path), name)
    for name in names:
        lora_ext.set_adapter(model, name)
        out[f"unmerged.{name}"] = greedy(last_logits(model), prompt, steps)
        lora_ext.merge(model, [name])
        out[f"merged.{name}"] = greedy(last_logits(model), prompt, steps)
        lora_ext.unmerge(model)
    with lora_ext.adapter_batch(model, names):
        out["per_row"] = greedy(last_logits(model), prompt.repeat(len(names), 1), steps)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--adapters", nargs=2, default=None, help="two PEFT adapter folders (default: the main job's)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--max-rank", type=int, default=8)
    p.add_argument("--max-seq", type=int, default=256)
    p.add_argument("--prompt", default=PROMPT, help="the prompt's text (smollm2)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = pathlib.Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    model, prompt = load_model(args.model, args.prompt)
    if args.model == "tiny":
        paths = args.adapters or random_adapters(model, data / "adapters_src")
    else:
        paths = args.adapters or [REPO / "runs" / "finetune_llm" / "adapters" / n for n in ("docs", "code")]
    adapters = {}
    for path in map(pathlib.Path, paths):
        dst = data / "adapters" / path.name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(path, dst)
        adapters[path.name] = dst
    report = {"model": args.model, "steps": args.steps, "adapters": list(adapters)}
    for name, slots in (("base", 0), ("slots", len(adapters))):
        r = export_causal_lm(
            model, data / f"{name}.pt2", adapter_slots=slots, max_rank=args.max_rank, max_seq=args.max_seq, max_batch=16
        )
        report[name] = {k: r[k] for k in ("export_s", "compile_s", "bytes")}
        print(
            f"exported {name}.pt2: export {r['export_s']:.1f} s, AOTInductor compile {r['compile_s']:.1f} s, "
            f"{r['bytes'] / 2**20:.1f} MiB",
            flush=True,
        )
    save_file(
        {"input_ids": prompt.contiguous()},
        str(data / "prompt.safetensors"),
        metadata={"adapters": ",".join(adapters), "steps": str(args.steps)},
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        want = python_tokens(model, adapters, prompt, args.steps)
    print(f"Python tokens in {time.perf_counter() - t0:.1f} s", flush=True)
    save_file({k: v.contiguous() for k, v in want.items()}, str(data / "expected.safetensors"))
    (data / "export.json").write_text(json.dumps(report, indent=1))
    for k, v in want.items():
        print(f"python {k:>16}: {' | '.join(' '.join(map(str, row)) for row in v.tolist())}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
