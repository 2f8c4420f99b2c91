"""The greedy generation that examples/cpp/generate's C++ program runs, in Python: the models it is tried on (a
tiny random Llama, or SmolLM2-135M), the prefix-recomputing greedy loop and the last position's logits. Shared by
examples/cpp/generate/make_data.py, python_bench.py and tests/test_aoti.py."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    return LlamaForCausalLM(cfg).eval()


PROMPT = "The with statement is used to"


def load_model(name: str, prompt: str = PROMPT):
    """``(model, input_ids [1, T])`` for ``--model``: the tiny Llama with a fixed random prompt, or SmolLM2."""
    if name == "tiny":
        return tiny_llama(), torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    from .smollm2 import load_smollm2

    model, tok = load_smollm2()
    return model, tok(prompt, return_tensors="pt").input_ids


def greedy(fn, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The C++ program's loop: the whole prefix at every step, argmax of the last position."""
    new = []
    for _ in range(steps):
        nxt = fn(ids).argmax(-1, keepdim=True)
        new.append(nxt)
        ids = torch.cat([ids, nxt], 1)
    return torch.cat(new, 1)


def last_logits(model):
    return lambda ids: model(input_ids=ids, use_cache=False).logits[:, -1]
