"""Produces everything examples/cpp/lora_infer needs, and what it must print.

    python make_example.py OUT_DIR [--steps N]

writes into OUT_DIR:
  model.pt                 a small causal transformer LM (TinyLM below), TorchScript, random "pre-trained" weights
  inputs.safetensors       "input_ids" [batch, seq] int64
  adapter_lora_ext/        a LoRA adapter trained with lora_ext (r=8, alpha=16, rank/alpha patterns)
  adapter_peft/            a LoRA adapter trained with HuggingFace PEFT (r=4, rsLoRA, MLP and lm_head)
  expected.safetensors     Python's logits: "base", "<adapter>.python" (the adapter applied unmerged in Python:
                           lora_ext's LoraLinear for the first, PEFT's own model for the second)

Both adapter folders are plain PEFT format (adapter_config.json + adapter_model.safetensors).
The C++ program mirrors TinyLM with torch::nn modules (examples/cpp/tiny_lm.h); the parameter
names are the contract between the two.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import lora_ext

VOCAB, D, HEADS, LAYERS, FF, MAX_LEN = 512, 128, 4, 2, 512, 64
BATCH, SEQ = 4, 32


class Attention(nn.Module):
    n_heads: int

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads
        q = self.q_proj(x).view(b, t, h, d // h).transpose(1, 2)
        k = self.k_proj(x).view(b, t, h, d // h).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h, d // h).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(a.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.up_proj = nn.Linear(d, ff)
        self.down_proj = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, ff: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Pre-norm GPT-style decoder: token + learned position embeddings, LAYERS blocks, tied-free head."""

    n_heads: int

    def __init__(self, vocab=VOCAB, d=D, n_heads=HEADS, n_layers=LAYERS, ff=FF, max_len=MAX_LEN):
        super().__init__()
        self.n_heads = n_heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList([Block(d, n_heads, ff) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def make_base(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM()
    with torch.no_grad():  # make LayerNorms non-trivial, like a trained model's
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def task_batch(g: torch.Generator, n: int):
    """A toy task the base model cannot do: predict (token * 3 + 7) % VOCAB of the previous token."""
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return ids, (ids * 3 + 7) % VOCAB


def train(model: nn.Module, steps: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    losses = []
    for _ in range(steps):
        ids, target = task_batch(g, 16)
        logits = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    base = make_base()
    scripted = torch.jit.script(make_base())
    scripted.save(os.path.join(args.out_dir, "model.pt"))
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    expected = {"input_ids": ids}
    with torch.no_grad():
        expected["base"] = base(ids)
        torch.testing.assert_close(scripted(ids), expected["base"], rtol=0, atol=0)

    # 1. an adapter trained with lora_ext: attention and MLP, per-layer rank and alpha
    model = make_base()
    cfg = lora_ext.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        rank_pattern={r"blocks\.1\.mlp\.down_proj": 4},
        alpha_pattern={"o_proj": 32},
    )
    lora_ext.inject_adapter(model, cfg)
    losses = train(model, args.steps, seed=2)
    lora_ext.save_adapter(model, os.path.join(args.out_dir, "adapter_lora_ext"))
    with torch.no_grad():
        expected["lora_ext.python"] = model(ids)
    print(f"lora_ext adapter: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps")

    # 2. an adapter trained with PEFT: rsLoRA on the MLPs and the output head
    import peft

    model = peft.get_peft_model(
        make_base(),
        peft.LoraConfig(
            r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.0, target_modules=["up_proj", "down_proj", "lm_head"]
        ),
    )
    losses = train(model, args.steps, seed=3)
    model.save_pretrained(os.path.join(args.out_dir, "adapter_peft"), save_embedding_layers=False)
    with torch.no_grad():
        expected["peft.python"] = model(ids)
    print(f"PEFT adapter: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps")

    from safetensors.torch import save_file

    save_file({"input_ids": ids}, os.path.join(args.out_dir, "inputs.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in expected.items() if k != "input_ids"},
        os.path.join(args.out_dir, "expected.safetensors"),
    )
    for name in ("lora_ext.python", "peft.python"):
        print(f"{name}: max |adapter - base| logits = {(expected[name] - expected['base']).abs().max().item():.3f}")
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
