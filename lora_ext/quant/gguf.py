"""Build a LLaMA causal LM straight from a GGUF file with its weights kept quantized (issue 15).

``load_gguf_llama(path)`` returns a ``transformers`` ``LlamaForCausalLM`` whose projections are
:class:`~lora_ext.quant.layers.QuantLinear` layers holding the file's q8_0/q4_0/q4_1 blocks byte for byte, whose
token embedding is a :class:`~lora_ext.quant.layers.QuantEmbedding` (shared with a tied ``lm_head``), and whose
norms are the file's float tensors. Nothing is dequantized whole: ``inject_adapter`` wraps the projections in
``LoraQuantLinear`` and training runs on the blocks. It is the model transformers' own GGUF loader builds,
without that loader's expansion to float: llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for
its rotary layout and the same inverse permutation is applied here, to whole rows of blocks (exact).

Needs ``transformers`` and ``gguf`` (``pip install gguf``); the config comes from the file's metadata through
``transformers.AutoConfig``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .._utils.modules import replace_submodule
from .formats import QuantizedWeight, from_gguf
from .layers import QuantEmbedding, QuantLinear

__all__ = ["load_gguf_llama"]

_PROJ = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _unpermute_rows(q: QuantizedWeight, heads: int) -> QuantizedWeight:
    """transformers' reverse of llama.cpp's q/k row permutation, on whole rows (blocks stay intact)."""
    rows = q.qdata
    half = rows.shape[0] // heads // 2
    rows = rows.reshape(heads, half, 2, rows.shape[1]).transpose(1, 2).reshape(q.qdata.shape).contiguous()
    scale = q.qscale
    if scale is not None:
        scale = scale.reshape(heads, half, 2, -1).transpose(1, 2).reshape(q.qscale.shape).contiguous()
    return dataclasses.replace(q, qdata=rows, qscale=scale)


def _float_tensor(tensors: dict, name: str, dtype: torch.dtype) -> nn.Parameter:
    t = tensors.get(name)
    if t is None:
        raise ValueError(f"load_gguf_llama: the file has no tensor {name!r}")
    kind = getattr(t.tensor_type, "name", str(t.tensor_type))
    if kind not in ("F32", "F16", "BF16"):
        raise ValueError(f"load_gguf_llama: expected {name} as F32/F16, got {kind}")
    return nn.Parameter(torch.from_numpy(t.data.copy()).to(dtype).reshape(-1), requires_grad=False)


def load_gguf_llama(path: Union[str, Path], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``LlamaForCausalLM`` whose linear layers and token embedding hold the GGUF file's quantized blocks.

    ``dtype`` is the norms' and the embedding output's dtype (the activations'). Raises ``ValueError`` for a
    file that is not a LLaMA, or whose projections are in a type other than q8_0/q4_0/q4_1."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type != "llama":
        raise ValueError(f"load_gguf_llama: expected a llama GGUF, got model_type {config.model_type!r}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def quantized(name: str) -> QuantizedWeight:
        if name not in tensors:
            raise ValueError(f"load_gguf_llama: the file has no tensor {name!r}")
        return from_gguf(tensors[name])

    inner = model.model
    embed = quantized("token_embd.weight")
    inner.embed_tokens = QuantEmbedding(embed, dtype)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for i, block in enumerate(inner.layers):
        for attr, key in _PROJ.items():
            q = quantized(f"blk.{i}.{key}.weight")
            if key in heads:
                q = _unpermute_rows(q, heads[key])
            replace_submodule(block, attr, QuantLinear(q))
        for attr, key in _NORMS.items():
            getattr(block, attr).weight = _float_tensor(tensors, f"blk.{i}.{key}.weight", dtype)
    inner.norm.weight = _float_tensor(tensors, "output_norm.weight", dtype)
    head = quantized("output.weight") if "output.weight" in tensors else embed  # tied: the same bytes
    model.lm_head = QuantLinear(head)
    inner.rotary_emb = type(inner.rotary_emb)(config=config)  # its buffers were made on the meta device
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"load_gguf_llama: the GGUF file does not provide {left[:5]}")
    model.eval()
    return model
