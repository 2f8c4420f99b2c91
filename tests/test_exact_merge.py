"""Exact merge: unmerge restores the original weight bit for bit, with 2 bits per element of
side information plus a sparse list of rare exceptions. The round trips are written once for
every device (``device``: the CUDA cases run where a GPU is); the CUDA kernels' own cases (the
CPU's bits, codes used across devices, list overflow) are in test_cuda.py."""

import pytest
import torch

import lora_ext
from lora_ext import LoraConfig, ops
from models import LLAMA_TARGETS, llama_inputs, logits, tiny_llama
from reference import (
    DEVICES,
    EXACT_CASES,
    EXACT_IDS,
    on,
    ref_merge_exact,
    ref_merge_exact_codes,
    ubits,
    wide_adapter,
    wide_weight,
)

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets


def _bits(w):
    return w.view({torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[w.dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adtype", [torch.float32, torch.bfloat16])
def test_thousand_cycles_restore_bit_exactly(device, wdtype, adtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 160, generator=g) * 0.02).to(wdtype).to(device)
    w0 = w.clone()
    a = (torch.randn(8, 160, generator=g) / 40).to(adtype).to(device)
    b = (torch.randn(96, 8, generator=g) / 10).to(adtype).to(device)
    side_max = 0
    for cycle in range(1000):
        codes = ops.merge_exact_codes(w, a, b, 1.5)
        ops.merge_exact_(w, a, b, 1.5)
        if cycle == 0:
            assert (w != w0).float().mean() > 0.5  # the merge really changes the weight
        ops.unmerge_exact_(w, codes, a, b, 1.5)
        side_max = max(side_max, codes.nbytes())
        if cycle % 250 == 0:
            assert torch.equal(_bits(w), _bits(w0)), f"cycle {cycle}"
    assert torch.equal(_bits(w), _bits(w0))
    wbytes = w.numel() * w.element_size()
    assert codes.codes.numel() * 8 == wbytes  # 2 bits per element = 1/8 of a 16-bit weight
    print(
        f"{wdtype}/{adtype}: side information {side_max} B for a {wbytes} B weight "
        f"({codes.exc_index.numel()} sparse exceptions)"
    )
    # the inexact path drifts: plain merge_/unmerge_ round trips do not restore the bits
    plain = w0.clone()
    for _ in range(20):
        ops.merge_(plain, a, b, 1.5)
        ops.unmerge_(plain, a, b, 1.5)
    assert not torch.equal(_bits(plain), _bits(w0))


def test_exact_float32_noncontiguous_and_special_values():
    w = torch.randn(40, 24) * 0.1
    w[0, 0], w[1, 1], w[2, 2], w[3, 3] = float("inf"), float("-inf"), 0.0, -0.0
    w[4, 4] = 1e-30  # far below the update's ulp: needs the sparse list
    storage = w.T.contiguous()
    view = storage.T  # e.g. GPT-2 Conv1D's transposed weight
    w0 = storage.clone()
    a, b = torch.randn(3, 24), torch.randn(40, 3)
    codes = ops.merge_exact_codes(view, a, b, 0.5)
    ops.merge_exact_(view, a, b, 0.5)
    assert codes.exc_index.numel() >= 1
    ops.unmerge_exact_(view, codes, a, b, 0.5)
    assert torch.equal(storage.view(torch.int32), w0.view(torch.int32))


@pytest.mark.parametrize("wdtype,adtype", EXACT_CASES, ids=EXACT_IDS)
@pytest.mark.parametrize("transposed", [False, True])
def test_exact_ops_match_the_bit_reference(wdtype, adtype, transposed):
    """Merged bits, codes and the sparse list equal a plain-PyTorch bit-for-bit reference
    (the same rule the CUDA kernels must follow), over the dtype's whole range."""
    w = wide_weight(37, 53, wdtype, transposed=transposed)
    a, b = wide_adapter(53, 37, 5, adtype)
    w0 = w.clone()
    codes = ops.merge_exact_codes(w, a, b, 0.75)
    ref = ref_merge_exact_codes(w, a, b, 0.75)
    assert torch.equal(codes.codes, ref[0])
    assert torch.equal(codes.exc_index, ref[1])
    assert torch.equal(ubits(codes.exc_value), ubits(ref[2]))
    # at least the NaNs; the weights far below the update's ulp are lost in the merge and listed
    assert 3 <= ref[1].numel() < w.numel() // 2
    ops.merge_exact_(w, a, b, 0.75)
    merged = ref_merge_exact(w0, a, b, 0.75)
    same = ubits(w) == ubits(merged)
    # NaN results may differ in payload from torch's conversion; they must still be NaN
    assert (same | (torch.isnan(w) & torch.isnan(merged))).all()
    assert (~torch.isnan(w0)).sum() > 0 and same.float().mean() > 0.99
    ops.unmerge_exact_(w, codes, a, b, 0.75)
    assert torch.equal(ubits(w), ubits(w0))


@pytest.mark.parametrize("device", DEVICES)
def test_exact_merge_empty_weight(device):
    w, a, b = on(device, torch.empty(0, 8, dtype=torch.bfloat16), torch.randn(2, 8), torch.randn(0, 2))
    codes = ops.merge_exact_codes(w, a, b, 1.0)
    assert codes.codes.numel() == 0 and codes.exc_index.numel() == 0 and codes.exc_index.device.type == device
    ops.merge_exact_(w, a, b, 1.0)
    ops.unmerge_exact_(w, codes, a, b, 1.0)


def test_exact_merge_errors():
    w, a, b = (
        torch.randn(6, 8, dtype=torch.float64),
        torch.randn(2, 8, dtype=torch.float64),
        torch.randn(6, 2, dtype=torch.float64),
    )
    with pytest.raises(
        RuntimeError, match="lora_ext::merge_exact_codes: expected a float32, bfloat16 or float16 weight"
    ):
        ops.merge_exact_codes(w, a, b, 1.0)
    w, a, b = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    codes = ops.merge_exact_codes(w, a, b, 1.0)
    bad = ops.ExactMergeCodes(codes.codes[:-1], codes.exc_index, codes.exc_value)
    with pytest.raises(RuntimeError, match="lora_ext::unmerge_exact_: expected codes"):
        ops.unmerge_exact_(w, bad, a, b, 1.0)
    bad = ops.ExactMergeCodes(codes.codes, torch.tensor([1000]), torch.zeros(1))
    with pytest.raises(RuntimeError, match="outside"):
        ops.unmerge_exact_(w, bad, a, b, 1.0)
    bad = ops.ExactMergeCodes(codes.codes.int(), codes.exc_index, codes.exc_value)  # not uint8
    with pytest.raises(RuntimeError, match="lora_ext::unmerge_exact_: expected codes as a contiguous uint8 tensor"):
        ops.unmerge_exact_(w, bad, a, b, 1.0)
    bad = ops.ExactMergeCodes(codes.codes, torch.zeros(2, dtype=torch.long), torch.zeros(1))  # lengths differ
    with pytest.raises(
        RuntimeError,
        match=r"lora_ext::unmerge_exact_: expected exc_index \(int64 \[n\]\) and "
        r"exc_value \(Float \[n\]\) of the same length, got Long \[2\]",
    ):
        ops.unmerge_exact_(w, bad, a, b, 1.0)
    with pytest.raises(RuntimeError, match="lora_ext::merge_exact_: expected lora_A of shape"):
        ops.merge_exact_(w, torch.randn(2, 7), b, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_exact_ops(device, dtype):
    w, a, b = on(device, torch.randn(6, 8).to(dtype), torch.randn(2, 8), torch.randn(6, 2))
    torch.library.opcheck(torch.ops.lora_ext.merge_exact_.default, (w.clone(), a, b, 0.5))
    codes = ops.merge_exact_codes(w, a, b, 0.5)
    merged = w.clone()
    ops.merge_exact_(merged, a, b, 0.5)
    torch.library.opcheck(torch.ops.lora_ext.unmerge_exact_.default, (merged.clone(), *codes, a, b, 0.5))
    torch.library.opcheck(
        torch.ops.lora_ext.merge_exact_codes.default, (w, a, b, 0.5), test_utils=("test_schema", "test_faketensor")
    )


def test_model_level_exact_merge_bf16():
    model = tiny_llama().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_ext.inject_adapter(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    with torch.no_grad():  # a trained-adapter-like update: |dW| about 1% of |W|
        for _, layer in lora_ext.lora_layers(model):
            w = layer.base_layer.weight.float()
            a, b = layer.adapter_weights("default")
            d = layer.scaling["default"] * (b @ a)
            b.mul_(0.01 * w.std() / d.std())
    ids = llama_inputs()
    y = logits(model, ids)
    lora_ext.merge(model, exact=True)
    side = sum(layer.exact_merge_nbytes() for _, layer in lora_ext.lora_layers(model))
    wbytes = sum(layer.base_layer.weight.numel() * 2 for _, layer in lora_ext.lora_layers(model))
    assert wbytes / 8 <= side < wbytes / 4
    torch.testing.assert_close(logits(model, ids).float(), y.float(), atol=0.1, rtol=0.05)
    lora_ext.unmerge(model)
    after = lora_ext.unload(model).state_dict()
    for k, v in before.items():
        assert torch.equal(v.view(torch.int16), after[k].view(torch.int16)), k
