"""Tiny transformers models built from configs with random weights (no downloads)."""

import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TinyNet(torch.nn.Module):
    """Embedding + two linears: LoRA on every layer type lora_ext reads, and scriptable (TorchScript)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.l1 = torch.nn.Linear(16, 32)
        self.l2 = torch.nn.Linear(32, 8)

    def forward(self, ids):
        return self.l2(torch.relu(self.l1(self.emb(ids))))


class Block(torch.nn.Module):
    """A residual MLP block (the distributed tests' transformer-block stand-in)."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, d)
        self.fc2 = torch.nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class BlockNet(torch.nn.Module):
    """Two :class:`Block` s in ``blocks`` (a ``ModuleList``: FSDP2's per-block rule finds them) and a head."""

    def __init__(self, d: int = 64, out: int = 4):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(d), Block(d)])
        self.head = torch.nn.Linear(d, out)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
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


def llama_inputs(batch: int = 2, seq: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, seq), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0
    )
    return T5ForConditionalGeneration(cfg).eval()


def _kwargs(model, ids):
    kwargs = {"input_ids": ids}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids[:, :3]
    return kwargs


def run(model, ids):
    """The model's main output for token ids (logits or last hidden state)."""
    kwargs = _kwargs(model, ids)
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def train_steps(model, ids, steps=3, lr=1e-2):
    """A few SGD steps on a simple objective (sum of squares of the main output)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    kwargs = _kwargs(model, ids)
    for _ in range(steps):
        out = model(**kwargs)
        y = out.logits if hasattr(out, "logits") else out.last_hidden_state
        loss = y.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
