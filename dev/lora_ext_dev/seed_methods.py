"""The methods, measurements and computed table of ``benchmarks/seed_table.py``.

- :func:`setup` turns a loaded ``LlamaForCausalLM`` into one of :data:`METHODS` (full fine-tuning, AdapterHub
  ``seq_bn`` bottleneck adapters, PEFT prompt tuning, PEFT LoRA, lora_ext LoRA on all linear layers or on q,v)
  and says what trains, what to hash, how to save and how to merge;
- :func:`forgetting_kl`: mean per-token KL(base || tuned) on fixed sequences;
- :class:`PeakRSS`: the peak resident set size of this process, sampled by a thread;
- :func:`computed_table`: parameters and bytes of weights + gradients + AdamW state per method for larger
  LLaMA shapes, with every method really set up on a model built on the meta device (nothing allocated).
"""

from __future__ import annotations

import os
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import lora_ext  # noqa: E402

from . import smollm2

METHODS = ("full", "adapters", "prompt", "peft_lora", "lora_ext_all", "lora_ext_qv")
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05)
LORA_TARGETS = {"peft_lora": "all-linear", "lora_ext_all": "all-linear", "lora_ext_qv": ["q_proj", "v_proj"]}
NUM_VIRTUAL_TOKENS = 20
PROMPT_INIT_TEXT = "The Python language reference manual, one section of it:\n\n"
SEQ_BN_REDUCTION = 16
SEQ_BN_PARAMS_135M = 30 * (576 * 36 + 36 + 36 * 576 + 576)  # 1,262,520: AdapterHub seq_bn on SmolLM2-135M


# -- adapter layers: AdapterHub's seq_bn ---------------------------------------------------------------------


class Bottleneck(nn.Module):
    """``h + up(relu(down(h)))``: a Pfeiffer bottleneck. ``down`` as AdapterHub's default "bert" init
    (normal, std 0.02, bias 0); ``up`` zero (weight and bias), so the model starts as the base model."""

    def __init__(self, hidden: int, reduction: int = SEQ_BN_REDUCTION):
        super().__init__()
        self.down = nn.Linear(hidden, hidden // reduction)
        self.up = nn.Linear(hidden // reduction, hidden)
        with torch.no_grad():
            self.down.weight.normal_(0.0, 0.02)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.relu(self.down(h)))


def seq_bn_parameters(hidden: int, layers: int, reduction: int = SEQ_BN_REDUCTION) -> int:
    """AdapterHub ``seq_bn``'s parameter count: one bottleneck (two biased linears) per layer."""
    b = hidden // reduction
    return layers * (hidden * b + b + b * hidden + hidden)


class SeqBnAdapters(nn.Module):
    """One :class:`Bottleneck` on each decoder layer's output (residual + MLP output), attached with forward
    hooks; the blocks live here, outside the model's module tree, so the model's state dict and
    ``smollm2.base_weights_hash`` see only the base weights.

    This is AdapterHub's ``seq_bn`` (``SeqBnConfig``: reduction_factor 16, ReLU, residual_before_ln,
    original_ln_before/after) on a LLaMA, where the output adapter gets no layer norm: its pre_forward adds
    the residual to the MLP output, the adapter adds its own output to that sum (residual = MLP output, plus
    the layer residual added in post_forward), i.e. ``h = h + up(relu(down(h)))`` on the layer output."""

    def __init__(self, model: nn.Module, reduction: int = SEQ_BN_REDUCTION):
        super().__init__()
        layers = list(model.model.layers)
        dtype = next(model.parameters()).dtype
        self.blocks = nn.ModuleList(Bottleneck(model.config.hidden_size, reduction).to(dtype) for _ in layers)
        self.handles = [layer.register_forward_hook(self._hook(block)) for layer, block in zip(layers, self.blocks)]

    @staticmethod
    def _hook(block: Bottleneck):
        def hook(module, args, output):
            if isinstance(output, tuple):  # decoder layers of older transformers return (hidden, ...)
                return (block(output[0]),) + tuple(output[1:])
            return block(output)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# -- prompt tuning -------------------------------------------------------------------------------------------


class DropVirtualTokens(nn.Module):
    """A PEFT prompt-tuning model whose logits cover only the input's positions (PEFT returns the virtual
    tokens' positions first)."""

    def __init__(self, peft_model: nn.Module, n_virtual: int):
        super().__init__()
        self.peft_model = peft_model
        self.n_virtual = n_virtual

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return SimpleNamespace(logits=self.peft_model(input_ids=input_ids, **kwargs).logits[:, self.n_virtual :])


# -- the methods ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """One method set up on a model: ``net(input_ids=...).logits`` covers the input's positions; ``params``
    train; ``base`` holds the base weights (for ``smollm2.base_weights_hash``); ``save(folder)`` writes the
    method's checkpoint; ``merge()`` returns a plain merged model (LoRA only, else ``merge`` is None);
    ``adapter_name``: lora_ext's adapter, for ``llm_train.perplexity``'s per-row batches (else None)."""

    net: nn.Module
    params: list
    base: nn.Module
    save: Callable[[Path], None]
    merge: Optional[Callable[[], nn.Module]] = None
    adapter_name: Optional[str] = None
    extra: Optional[nn.Module] = None  # modules outside ``net`` that hold trainable parameters (the adapters)


def _save_full(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"))  # tied lm_head/embed_tokens stored once


def _save_tensors(module: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "adapters.safetensors"))


def setup(method: str, model: nn.Module, prompt_init: str = "TEXT", tokenizer_dir: Optional[str] = None) -> Setup:
    """Set ``model`` up for ``method`` (in place). ``prompt_init``: PEFT's ``prompt_tuning_init`` ("TEXT":
    the embeddings of :data:`PROMPT_INIT_TEXT`, tokenized from ``tokenizer_dir``, default the model cache)."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Setup(model, [p for p in model.parameters()], model, lambda d: _save_full(model, d))
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "adapters":
        adapters = SeqBnAdapters(model)
        return Setup(model, list(adapters.parameters()), model, lambda d: _save_tensors(adapters, d), extra=adapters)
    if method == "prompt":
        from peft import PromptTuningConfig, get_peft_model

        kw = {}
        if prompt_init == "TEXT":
            kw = dict(
                prompt_tuning_init_text=PROMPT_INIT_TEXT,
                tokenizer_name_or_path=str(tokenizer_dir or smollm2.cache_dir()),
            )
        cfg = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS, prompt_tuning_init=prompt_init, **kw
        )
        pm = get_peft_model(model, cfg)
        net = DropVirtualTokens(pm, NUM_VIRTUAL_TOKENS)
        return Setup(net, [p for p in pm.parameters() if p.requires_grad], model, lambda d: pm.save_pretrained(str(d)))
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=LORA_TARGETS[method], **LORA))
        return Setup(
            pm,
            [p for p in pm.parameters() if p.requires_grad],
            pm.get_base_model(),
            lambda d: pm.save_pretrained(str(d)),
            merge=lambda: pm.merge_and_unload(),
        )
    if method in ("lora_ext_all", "lora_ext_qv"):
        lora_ext.inject_adapter(model, lora_ext.LoraConfig(target_modules=LORA_TARGETS[method], **LORA))
        return Setup(
            model,
            [p for p in model.parameters() if p.requires_grad],
            model,
            lambda d: lora_ext.save_adapter(model, str(d)),
            merge=lambda: lora_ext.merge_and_unload(model),
            adapter_name="default",
        )
    raise ValueError(f"seed_methods.setup: expected a method in {METHODS}, got {method!r}")


def unique_parameters(module: nn.Module) -> int:
    """Parameters, tied ones once."""
    return sum(p.numel() for p in module.parameters())


# -- forgetting ----------------------------------------------------------------------------------------------


def kl_per_position(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base || tuned) of the next-token distributions at each position (float64, ``logits.shape[:-1]``)."""
    lp = F.log_softmax(base_logits.double(), -1)
    lq = F.log_softmax(logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def forgetting_kl(net: nn.Module, sequences: list, base_logits: list) -> float:
    """Mean per-token KL(base || tuned) over every position of ``sequences`` (each ``[rows, T]``), against the
    base model's logits on the same sequences; ``net`` in eval mode, no grad."""
    total, count = 0.0, 0
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for ids, base in zip(sequences, base_logits):
                for row in range(ids.shape[0]):  # a row at a time: float64 over the vocabulary is large
                    kl = kl_per_position(base[row], net(input_ids=ids[row : row + 1]).logits[0])
                    total += kl.sum().item()
                    count += kl.numel()
    finally:
        net.train(was_training)
    return total / count


# -- forgetting set, inference time, checkpoint size ----------------------------------------------------


def unrelated_text() -> tuple[str, str]:
    """CPython's LICENSE.txt (the stdlib folder's copy), or IDLE's CREDITS.txt where a distribution drops it."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in (stdlib / "LICENSE.txt", stdlib / "idlelib" / "CREDITS.txt"):
        if path.is_file():
            return str(path), path.read_text(encoding="utf-8", errors="replace")
    raise FileNotFoundError(f"seed_methods: neither LICENSE.txt nor idlelib/CREDITS.txt in {stdlib}")


def chat_sequences(model, tokenizer, prompts, new_tokens: int) -> tuple[list, list]:
    """Each prompt in the chat template (generation prompt added) + the base model's greedy answer."""
    seqs, answers = [], []
    with torch.no_grad():
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
            seqs.append(out)
            answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return seqs, answers


def time_forward(net, ids: torch.Tensor, reps: int) -> tuple[list[float], torch.Tensor]:
    """Seconds of ``reps`` no-grad eval forwards after one warm-up, and the logits."""
    net.eval()
    times = []
    with torch.no_grad():
        logits = net(input_ids=ids).logits
        for _ in range(reps):
            t = time.perf_counter()
            net(input_ids=ids)
            times.append(time.perf_counter() - t)
    return times, logits


def folder_bytes(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


# -- peak memory ---------------------------------------------------------------------------------------------


class PeakRSS:
    """The maximum resident set size of this process, read from ``/proc/self/statm`` every ``interval`` s by a
    thread between :meth:`start` and :meth:`stop`. ``before``: RSS at start; :meth:`stop` returns the peak
    increase in bytes."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._stop = threading.Event()
        self.samples = 0

    def rss(self) -> int:
        return int(os.pread(self.fd, 256, 0).split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())
            self.samples += 1

    def start(self) -> "PeakRSS":
        self.before = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        os.close(self.fd)
        return self.peak - self.before


def grad_and_optimizer_bytes(params: list, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes of the parameters' gradients and of the optimizer's state tensors (now)."""
    grads = sum(p.grad.nbytes for p in params if p.grad is not None)
    state = sum(t.nbytes for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))
    return grads, state


# -- computed table for larger shapes ------------------------------------------------------------------------

SHAPES = {  # LlamaConfig fields; SmolLM2-135M is the real model's config (tests/test_seed_table.py checks it)
    "SmolLM2-135M": dict(
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "SmolLM2-1.7B": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "Llama-3-8B": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "Llama-3-70B": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
PRECISION = (
    "bf16 weights; full fine-tuning: bf16 gradients + fp32 master weights + fp32 AdamW moments "
    "(2 + 2 + 4 + 8 = 16 bytes per parameter); the other methods: frozen base in bf16 (2 bytes per "
    "parameter), trainable parameters in fp32 with fp32 gradients and fp32 AdamW moments (4 + 4 + 8 = "
    "16 bytes per trainable parameter); activations not counted"
)


def meta_model(shape: dict) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` on the meta device (no memory, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**shape))


def computed_counts(shape: dict, method: str) -> dict:
    """``{"base", "trainable", "total"}`` parameter counts of ``method`` set up on a meta model of ``shape``
    (prompt tuning with RANDOM init: TEXT init needs a tokenizer; the count is the same)."""
    model = meta_model(shape)
    base = unique_parameters(model)
    with torch.device("meta"):
        s = setup(method, model, prompt_init="RANDOM")
    trainable = sum(p.numel() for p in s.params)
    return {"base": base, "trainable": trainable, "total": base if method == "full" else base + trainable}


def computed_bytes(counts: dict, method: str) -> dict:
    """Weights, gradients and AdamW state in bytes under :data:`PRECISION`."""
    n, t = counts["base"], counts["trainable"]
    if method == "full":
        out = {"weights": 2 * n, "gradients": 2 * n, "optimizer": 12 * n}  # fp32 master + two fp32 moments
    else:
        out = {"weights": 2 * n + 4 * t, "gradients": 4 * t, "optimizer": 8 * t}
    out["total"] = sum(out.values())
    return out


def computed_table(shapes: Optional[dict] = None) -> list[dict]:
    """One row per (shape, method): counts, trainable %, bytes (computed, not measured)."""
    rows = []
    for name, shape in (shapes or SHAPES).items():
        for method in METHODS:
            c = computed_counts(shape, method)
            rows.append(
                {
                    "model": name,
                    "method": method,
                    **c,
                    "trainable_percent": 100 * c["trainable"] / c["base"],
                    "bytes": computed_bytes(c, method),
                }
            )
    return rows
