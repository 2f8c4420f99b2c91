"""merge_/unmerge_: in-place W +- scale * B @ A against a float64 reference, round
trips, dtypes, layouts, memory and autograd interaction. Written once for every device
(``device``: the CUDA cases run where a GPU is); the CUDA kernel's own cases (weight
views of any strides, a second GPU) are in test_cuda.py."""

import pytest
import torch

from lora_ext import ops
from reference import DEVICES, make_inputs, noncontiguous, on, peak_extra_cpu_bytes

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

ADAPTER = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float16, torch.bfloat16),
]


def _ref(w, a, b, s):
    return w.cpu().double() + s * b.cpu().double() @ a.cpu().double()


MERGE_SHAPES = [(12, 16, 4), (70, 33, 1), (300, 129, 8), (0, 8, 2), (300, 4097, 128), (257, 129, 40), (5, 0, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,adtype", ADAPTER, ids=str)
@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=str)
def test_merge_matches_reference(device, dtype, adtype, shape):
    out, in_, r = shape
    _, w, _, a, b = make_inputs((1,), in_, out, r, dtype, adtype)
    want = _ref(w, a, b, 1.7)
    got = w.clone().to(device)
    ops.merge_(got, *on(device, a, b), 1.7)
    assert got.device.type == device
    got = got.cpu()
    if dtype in (torch.float32, torch.float64):
        tol = 1e-12 if dtype == torch.float64 else 1e-6 if device == "cpu" else 1e-5
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
        return
    # Delta W accumulated in float32 and rounded once into W: the correctly rounded result except where
    # float32 accumulation lands on the other side of a tie (rare: at most one element in 1000; on CUDA
    # counted on large weights only), by at most one ulp plus the float32 accumulation's error, which is
    # bounded by the size of the terms, not of the result (where W and Delta W cancel, the result is small
    # and the terms are not)
    rounded = want.to(dtype)
    differ = got != rounded
    if got.numel() and (device == "cpu" or got.numel() >= 10_000):
        assert differ.double().mean().item() < 1e-3
    if differ.any():
        fi = torch.finfo(dtype)
        terms = w.double().abs() + 1.7 * (b.double().abs() @ a.double().abs())
        bound = want.abs() * fi.eps + fi.smallest_normal + (r + 2) * 2.0**-24 * terms
        assert ((got.double() - rounded.double()).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_unmerge_inverts_merge_and_fp32_round_trip(device, dtype):
    adtype = torch.float32 if dtype == torch.bfloat16 else dtype
    _, w, _, a, b = on(device, *make_inputs((1,), 64, 96, 8, dtype, adtype))
    w0 = w.clone()
    ops.merge_(w, a, b, 0.5)
    assert not torch.equal(w, w0)
    ops.unmerge_(w, a, b, 0.5)
    if dtype == torch.float32:
        rel = ((w - w0).abs() / w0.abs().clamp_min(1e-30)).max().item()
        assert (w - w0).abs().max().item() <= 1e-6 * w0.abs().max().item(), rel
    elif dtype == torch.float64:
        torch.testing.assert_close(w, w0, atol=1e-13, rtol=0)
    else:
        torch.testing.assert_close(w.float(), w0.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_merged_forward_equals_unmerged(device):
    x, w, bias, a, b = on(device, *make_inputs((5, 7), 40, 24, 4, torch.float64))
    y = ops.lora_linear(x, w, bias, a, b, 0.8)
    ops.merge_(w, a, b, 0.8)
    torch.testing.assert_close(torch.nn.functional.linear(x, w, bias), y, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype,adtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_noncontiguous_weight_and_adapter(dtype, adtype):
    # e.g. GPT-2 Conv1D stores [in, out]: merge through a transposed view
    _, w, _, a, b = make_inputs((1,), 48, 40, 4, dtype, adtype)
    storage = w.T.contiguous()
    view = storage.T
    assert not view.is_contiguous()
    want = _ref(w, a, b, 0.3)
    ops.merge_(view, noncontiguous(a), noncontiguous(b), 0.3)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(storage.T.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_peak_extra_memory_under_one_percent(dtype):
    out, in_, r = 11008, 4096, 16  # a 4096 x 11008 projection
    w = torch.randn(out, in_).to(dtype)
    a = torch.randn(r, in_) / in_**0.5
    b = torch.randn(out, r) / r**0.5
    wbytes = w.numel() * w.element_size()
    peak = peak_extra_cpu_bytes(lambda: ops.merge_(w, a, b, 0.5))
    assert peak < 0.01 * wbytes, f"peak extra {peak} bytes = {100 * peak / wbytes:.2f}% of the weight"
    # the same measurement sees a naive merge's weight-sized temporary
    naive = peak_extra_cpu_bytes(lambda: w.add_((b @ a).to(dtype)))
    assert naive >= wbytes


@pytest.mark.parametrize("device", DEVICES)
def test_grad_mode_rules_and_version_counter(device):
    w = torch.nn.Parameter(torch.randn(6, 5, device=device))
    a, b = torch.randn(2, 5, device=device), torch.randn(6, 2, device=device)
    with pytest.raises(RuntimeError, match="merge_.*no_grad"):
        ops.merge_(w, a, b, 1.0)
    v = w._version
    with torch.no_grad():
        ops.merge_(w, a, b, 1.0)
        ops.unmerge_(w, a, b, 1.0)
    assert w._version == v + 2
    # a tensor saved for backward and then merged into is detected
    x = torch.randn(3, 5, device=device, requires_grad=True)
    ww = torch.randn(6, 5, device=device, requires_grad=True)
    z = (x @ ww.T).sum()  # saves ww for x's gradient
    with torch.no_grad():
        ops.merge_(ww, a, b, 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["merge_", "unmerge_"])
@pytest.mark.parametrize(
    "dtype,adtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]
)
def test_opcheck_merge(device, op, dtype, adtype):
    _, w, _, a, b = on(device, *make_inputs((1,), 9, 7, 3, dtype, adtype))
    torch.library.opcheck(getattr(torch.ops.lora_ext, op).default, (w, a, b, 0.25))
