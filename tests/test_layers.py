"""LoraEmbedding, LoraConv and LoraGPT2Conv1D: PEFT parity of forward and state-dict names,
merge == unmerged forward through the compiled merge kernels, unmerge restores."""

import copy

import peft
import pytest
import torch
from peft.tuners.lora import layer as peft_layer
from torch import nn

from lora_ext.layers.conv import LoraConv
from lora_ext.layers.embedding import LoraEmbedding
from lora_ext.layers.gpt2_conv1d import LoraGPT2Conv1D

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets


def _gpt2_conv1d(nx, nf):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


CASES = {
    "embedding": (
        lambda: nn.Embedding(50, 12, padding_idx=3),
        LoraEmbedding,
        peft_layer.Embedding,
        lambda: torch.randint(0, 50, (4, 9)),
    ),
    "conv1d": (
        lambda: nn.Conv1d(6, 10, 3, stride=2, padding=1),
        LoraConv,
        peft_layer.Conv1d,
        lambda: torch.randn(2, 6, 17),
    ),
    "conv2d": (
        lambda: nn.Conv2d(5, 8, (3, 2), padding=(1, 0)),
        LoraConv,
        peft_layer.Conv2d,
        lambda: torch.randn(2, 5, 7, 6),
    ),
    "gpt2_conv1d": (lambda: _gpt2_conv1d(16, 24), LoraGPT2Conv1D, peft_layer.Linear, lambda: torch.randn(3, 5, 16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_peft_layer_and_merges(name):
    torch.manual_seed(0)
    make, ours_cls, peft_cls, inputs = CASES[name]
    base = make()
    x = inputs()
    ours = ours_cls(copy.deepcopy(base), r=3, lora_alpha=6, init_lora_weights=False)
    kw = {"fan_in_fan_out": True} if name == "gpt2_conv1d" else {}
    cfg = peft.LoraConfig(r=3, lora_alpha=6, **kw)
    theirs = peft_cls(copy.deepcopy(base), "default", config=cfg, r=3, lora_alpha=6, **kw)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "default" in k], (missing, unexpected)
    with torch.no_grad():
        y = ours(x)
        torch.testing.assert_close(y, theirs(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(y, base(x))
        w0 = ours.base_layer.weight.detach().clone()
        ours.merge()
        torch.testing.assert_close(ours(x), y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.base_layer(x), y, atol=1e-5, rtol=1e-5)
        theirs.merge()
        torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, atol=1e-6, rtol=1e-5)
        ours.unmerge()
        torch.testing.assert_close(ours.base_layer.weight, w0, atol=1e-6, rtol=1e-6)


def test_embedding_init_is_peft_s():
    layer = LoraEmbedding(nn.Embedding(20, 8), r=4)
    a, b = layer.adapter_weights("default")
    assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) > 0  # PEFT: A = 0, B ~ N(0, 1)
    assert list(layer.state_dict()) == ["base_layer.weight", "lora_embedding_A.default", "lora_embedding_B.default"]


def test_unsupported_convs_are_refused():
    with pytest.raises(NotImplementedError, match="grouped"):
        LoraConv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(NotImplementedError, match="dilation"):
        LoraConv(nn.Conv1d(4, 4, 3, dilation=2))
    with pytest.raises(
        NotImplementedError,
        match="LoraConv: grouped, dilated or non-zero-padded convolutions are not "
        "supported, got .*padding_mode='reflect'",
    ):
        LoraConv(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="LoraEmbedding: expected a base layer of type Embedding"):
        LoraEmbedding(nn.Linear(3, 3))


def test_conv_training_and_bf16_merge():
    torch.manual_seed(0)
    layer = LoraConv(nn.Conv2d(3, 4, 3, padding=1).to(torch.bfloat16), r=2, init_lora_weights=False)
    assert layer.adapter_weights("default")[0].dtype == torch.float32
    x = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16)
    y = layer(x)
    y.float().pow(2).mean().backward()
    assert all(w.grad is not None for w in layer.adapter_weights("default"))
    with torch.no_grad():
        layer.merge()
        torch.testing.assert_close(layer(x).float(), y.detach().float(), atol=0.1, rtol=0.05)
