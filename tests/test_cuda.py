"""What only CUDA has, for lora_linear, merge_/unmerge_ and the exact merge: the CUDA kernels
against the CPU kernels (dropout masks identical to the CPU's for the same seed, forward and
backward pieces, a training step, the exact merge's bits and codes used across devices), CUDA
graphs, weight views of any strides, the exact merge's list overflow, a model moved between
devices, error messages and devices (mixed devices, a second GPU). What every device does is
written once, parametrised by device, in test_lora_linear_op.py, test_merge.py and
test_exact_merge.py. Skipped without a GPU."""

import warnings

import pytest
import torch

from lora_ext import ops
from reference import (
    EXACT_CASES,
    EXACT_IDS,
    GRAD_TOL,
    keep_mask_numpy,
    make_inputs,
    noncontiguous,
    on,
    ref_lora_linear,
    ref_merge_exact_codes,
    tol,
    ubits,
    wide_adapter,
    wide_weight,
)
from test_lora_linear_op import _Layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DEV = "cuda"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ADAPTER = [(d, d) for d in DTYPES] + [
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float16, torch.bfloat16),
]
IDS = lambda v: str(v).replace("torch.", "")  # noqa: E731


def _seed(v=987654321):
    return torch.tensor(v, dtype=torch.long)  # a 0-dim CPU tensor, as the autograd kernel draws it


# ---------------------------------------------------------------------------
# lora_linear forward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,adtype", ADAPTER, ids=IDS)
@pytest.mark.parametrize(
    "shape", [((33,), 4097, 40, 1), ((17, 3), 96, 80, 128), ((5,), 64, 48, 256), ((9,), 40, 24, 300)], ids=str
)
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_forward_pieces_match_cpu_kernels(dtype, adtype, shape, p):
    """_lora_linear_forward on CUDA and CPU with the same seed tensor: same mask, same (y, h)."""
    lead, i, o, r = shape
    x, w, b, a, bb = make_inputs(lead, i, o, r, dtype, adtype)
    seed = _seed() if p > 0 else None
    y_cpu, h_cpu = torch.ops.lora_ext._lora_linear_forward(x, w, b, a, bb, 0.6, p, seed)
    y_gpu, h_gpu = torch.ops.lora_ext._lora_linear_forward(*on(DEV, x, w, b, a, bb), 0.6, p, seed)
    assert h_gpu.dtype == h_cpu.dtype and h_gpu.shape == h_cpu.shape and y_gpu.dtype == y_cpu.dtype
    hdt = h_cpu.dtype
    atol, rtol = tol(hdt, i, DEV)
    torch.testing.assert_close(h_gpu.cpu(), h_cpu, atol=atol * 10, rtol=rtol * 10)
    atol, rtol = tol(dtype, i, DEV)
    torch.testing.assert_close(y_gpu.cpu().double(), y_cpu.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "dtype,adtype",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ],
    ids=IDS,
)
@pytest.mark.parametrize("n,d", [(37, 16), (8, 4097), (3, 300)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_identical_to_cpu(dtype, adtype, n, d, p):
    """With A = I the intermediate h is dropout(x) itself: CUDA's mask must be the CPU's, bit for bit."""
    x = torch.randn(n, d, dtype=torch.float64).to(dtype)
    w = torch.zeros(3, d, dtype=dtype)
    a = torch.eye(d, dtype=adtype)
    bb = torch.zeros(3, d, dtype=adtype)
    seed = _seed(123456789 + n)
    _, h_cpu = torch.ops.lora_ext._lora_linear_forward(x, w, None, a, bb, 1.0, p, seed)
    _, h_gpu = torch.ops.lora_ext._lora_linear_forward(*on(DEV, x, w, None, a, bb), 1.0, p, seed)
    assert torch.equal(h_gpu.cpu() == 0, h_cpu == 0)
    assert torch.equal(h_gpu.cpu(), h_cpu)  # x * float(1 / (1 - p)), rounded identically
    frac = (h_cpu == 0).double().mean().item()
    assert abs(frac - p) < max(0.05, 4 * (p * (1 - p) / (n * d)) ** 0.5)
    # another seed, another mask
    _, h2 = torch.ops.lora_ext._lora_linear_forward(*on(DEV, x, w, None, a, bb), 1.0, p, _seed(42))
    assert not torch.equal(h2.cpu(), h_cpu)


def test_dropout_mask_past_2_32_elements():
    """Flat element indices beyond 2^32 (the upper index bits enter the hash): x of
    4100 x (2^20 + 1) crosses 2^32 inside row 4095. Checked against the numpy mask."""
    import numpy as np

    if torch.cuda.get_device_properties(0).total_memory < 48 * (1 << 30):
        pytest.skip("needs a GPU with >= 48 GB")
    in_f, n, p, sd = (1 << 20) + 1, 4100, 0.5, 7
    rows = [0, 4095, 4096, 4099]
    want = {row: keep_mask_numpy(sd, p, np.arange(row * in_f, (row + 1) * in_f, dtype=np.uint64)) for row in rows}
    assert (4095 * in_f) < (1 << 32) < (4096 * in_f)
    # backward: grad_x = mask / (1 - p) * (grad_h A) with grad_h = A = 1, grad_y = W = 0
    gx = torch.ops.lora_ext._lora_linear_backward_input(
        torch.zeros(n, 1, device=DEV),
        torch.zeros(1, in_f, device=DEV),
        torch.ones(1, in_f, device=DEV),
        torch.ones(n, 1, device=DEV),
        p,
        _seed(sd),
    )
    for row in rows:
        assert torch.equal(gx[row].cpu() != 0, torch.from_numpy(want[row])), row
    del gx
    # forward shrink kernel: h = dropout(x) A^T with x = A = 1 counts the kept elements
    x = torch.ones(n, in_f, dtype=torch.bfloat16, device=DEV)
    _, h = torch.ops.lora_ext._lora_linear_forward(
        x,
        torch.zeros(1, in_f, dtype=torch.bfloat16, device=DEV),
        None,
        torch.ones(1, in_f, device=DEV),
        torch.zeros(1, 1, device=DEV),
        1.0,
        p,
        _seed(sd),
    )
    for row in rows:
        assert h[row, 0].item() == 2.0 * int(want[row].sum()), row


# ---------------------------------------------------------------------------
# backward pieces and autograd
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,adtype", ADAPTER, ids=IDS)
@pytest.mark.parametrize("shape", [((6, 5), 20, 14, 3), ((130,), 4097, 48, 1), ((40,), 64, 96, 128)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_pieces_match_cpu_kernels(dtype, adtype, shape, p):
    lead, i, o, r = shape
    x, w, b, a, bb = make_inputs(lead, i, o, r, dtype, adtype)
    seed = _seed() if p > 0 else None
    _, h = torch.ops.lora_ext._lora_linear_forward(x, w, b, a, bb, 0.9, p, seed)
    g = torch.randn(*lead, o, dtype=torch.float64).to(dtype)
    cpu = torch.ops.lora_ext._lora_linear_backward_lora(g, x, a, bb, h, 0.9, p, seed)
    gpu = torch.ops.lora_ext._lora_linear_backward_lora(*on(DEV, g, x, a, bb, h), 0.9, p, seed)
    atol, rtol = tol(dtype, i, DEV, GRAD_TOL)
    for name, u, v in zip(("grad_A", "grad_B", "grad_h"), gpu, cpu):
        assert u.dtype == v.dtype and u.shape == v.shape, name
        scale = max(1.0, v.abs().amax().item())
        torch.testing.assert_close(
            u.cpu().double(), v.double(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}"
        )
    gh = cpu[2]
    gx_cpu = torch.ops.lora_ext._lora_linear_backward_input(g, w, a, gh, p, seed)
    gx_gpu = torch.ops.lora_ext._lora_linear_backward_input(*on(DEV, g, w, a, gh), p, seed)
    assert gx_gpu.dtype == gx_cpu.dtype and gx_gpu.shape == gx_cpu.shape
    scale = max(1.0, gx_cpu.abs().amax().item())
    torch.testing.assert_close(gx_gpu.cpu().double(), gx_cpu.double(), atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize(
    "dtype,adtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ],
    ids=IDS,
)
def test_dropout_training_matches_cpu(dtype, adtype):
    """The seed is drawn on the CPU generator: under the same torch.manual_seed, a training
    step on CUDA uses the CPU's mask, so outputs and all gradients agree."""
    x, w, b, a, bb = make_inputs((4, 25), 96, 72, 8, dtype, adtype)
    g = torch.randn(4, 25, 72, dtype=torch.float64).to(dtype)
    res = {}
    for dev in ("cpu", DEV):
        leaves = [t.detach().to(dev).requires_grad_(True) for t in (x, a, bb)]
        torch.manual_seed(11)
        y = ops.lora_linear(leaves[0], w.to(dev), b.to(dev), leaves[1], leaves[2], 0.5, 0.35, True)
        y.backward(g.to(dev))
        res[dev] = [y.detach().cpu()] + [t.grad.cpu() for t in leaves]
    atol, rtol = GRAD_TOL[dtype]
    for name, u, v in zip(("y", "x", "A", "B"), res[DEV], res["cpu"]):
        scale = max(1.0, v.abs().amax().item())
        torch.testing.assert_close(u.double(), v.double(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,adtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)], ids=IDS)
def test_cuda_graph_capture_forward(dtype, adtype):
    layer = _Layer(dtype, adtype, in_f=4097, out_f=96, r=16, device=DEV).eval()
    static_x = torch.randn(33, 4097, device=DEV).to(dtype)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm up (cuBLAS workspaces, allocator) outside the capture
                layer(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(2):
            new_x = torch.randn(33, 4097, device=DEV).to(dtype)
            static_x.copy_(new_x)
            graph.replay()
            torch.cuda.synchronize()
            atol, rtol = tol(dtype, 4097, DEV)
            torch.testing.assert_close(static_y, layer(new_x), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------
# merge_ / unmerge_
# ---------------------------------------------------------------------------


def _merge_ref(w, a, b, s):
    return w.cpu().double() + s * b.cpu().double() @ a.cpu().double()


def _assert_merged(got, want, dtype, w=None, a=None, b=None, s=None):
    """``got`` against the float64 ``want``. For half/bf16 weights, Delta W is accumulated in float32
    and rounded once: elements may differ from the correctly rounded value by one ulp, plus the float32
    accumulation's error, which is bounded by the size of the terms, not of the result (where W and
    Delta W cancel, the result is small and the terms are not)."""
    got = got.cpu()
    if dtype in (torch.float32, torch.float64):
        eps = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got.double(), want, atol=eps, rtol=eps)
        return
    rounded = want.to(dtype)
    differ = got != rounded
    if got.numel() >= 10_000:  # rare: ties and cancellations only
        assert differ.double().mean().item() < 1e-3
    if differ.any():
        fi = torch.finfo(dtype)
        bound = want.abs() * fi.eps + fi.smallest_normal
        if w is not None:
            terms = w.cpu().double().abs() + abs(s) * (b.cpu().double().abs() @ a.cpu().double().abs())
            bound = bound + (a.shape[0] + 2) * 2.0**-24 * terms
        assert ((got.double() - rounded.double()).abs() <= bound).all()


@pytest.mark.parametrize(
    "dtype,adtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),
        (torch.float16, torch.float32),
    ],
    ids=IDS,
)
@pytest.mark.parametrize("shape", [(40, 48, 4), (300, 4097, 16), (33, 1, 1)], ids=str)
def test_merge_transposed_weight_view(dtype, adtype, shape):
    # GPT-2 Conv1D stores [in, out]: merge through the transposed [out, in] view
    out, in_, r = shape
    _, w, _, a, b = make_inputs((1,), in_, out, r, dtype, adtype)
    storage = w.T.contiguous().to(DEV)
    view = storage.T
    assert not view.is_contiguous() or min(out, in_) == 1
    want = _merge_ref(w, a, b, 0.3)
    ops.merge_(view, noncontiguous(a.to(DEV)), noncontiguous(b.to(DEV)), 0.3)
    _assert_merged(storage.T, want, dtype, w, a, b, 0.3)
    ops.unmerge_(view, a.to(DEV), b.to(DEV), 0.3)
    eps = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(storage.T.cpu().float(), w.float(), atol=eps, rtol=eps)


def test_merge_strided_slice_of_weight():
    # a column slice (row stride > cols) and a row-strided view
    _, w, _, a, b = make_inputs((1,), 50, 30, 6, torch.bfloat16, torch.float32)
    big = torch.zeros(30, 120, dtype=torch.bfloat16, device=DEV)
    view = big[:, 10:110:2]
    view.copy_(w)
    ops.merge_(view, a.to(DEV), b.to(DEV), 0.9)
    _assert_merged(view, _merge_ref(w, a, b, 0.9), torch.bfloat16, w, a, b, 0.9)
    untouched = big.clone()
    untouched[:, 10:110:2] = 0
    assert (untouched == 0).all()


# ---------------------------------------------------------------------------
# exact merge: the same bits as the CPU kernels, so codes cross devices
# ---------------------------------------------------------------------------


def _exact_all(w, a, b, s):
    """(codes, merged weight) of the exact merge of w, on w's device."""
    codes = ops.merge_exact_codes(w, a, b, s)
    merged = w.clone()
    ops.merge_exact_(merged, a, b, s)
    return codes, merged


@pytest.mark.parametrize("wdtype,adtype", EXACT_CASES, ids=EXACT_IDS)
@pytest.mark.parametrize("transposed", [False, True])
def test_exact_merge_same_bits_as_cpu(wdtype, adtype, transposed):
    w = wide_weight(37, 53, wdtype, transposed=transposed)
    a, b = wide_adapter(53, 37, 5, adtype)
    codes, merged = _exact_all(w, a, b, 0.75)
    wc = w.to(DEV)
    if transposed:
        wc = w.T.contiguous().to(DEV).T
    gcodes, gmerged = _exact_all(wc, a.to(DEV), b.to(DEV), 0.75)
    ref = ref_merge_exact_codes(w, a, b, 0.75)
    assert torch.equal(gcodes.codes.cpu(), ref[0]) and torch.equal(gcodes.exc_index.cpu(), ref[1])
    assert torch.equal(ubits(gcodes.exc_value.cpu()), ubits(ref[2]))
    assert torch.equal(ubits(gmerged.cpu()), ubits(merged))  # NaN payloads included
    # unmerge on the GPU with its own codes, and with the CPU's
    for c in (gcodes, codes.to(DEV)):
        back = gmerged.clone()
        ops.unmerge_exact_(back, c, a.to(DEV), b.to(DEV), 0.75)
        assert torch.equal(ubits(back.cpu()), ubits(w))
    back = merged.clone()  # and on the CPU with the GPU's
    ops.unmerge_exact_(back, gcodes.to("cpu"), a, b, 0.75)
    assert torch.equal(ubits(back), ubits(w))


@pytest.mark.parametrize("shape", [(70, 4097, 1), (33, 300, 128), (1024, 4097, 16)], ids=str)
@pytest.mark.parametrize("wide", [False, True], ids=["trained-like", "wide-range"])
def test_exact_merge_odd_sizes_and_list_overflow(shape, wide):
    """Odd sizes, r = 1 and r = 128; the wide-range weights need far more list entries than the
    kernel's first buffer holds (n / 256), which exercises its exact-size rerun."""
    out_f, in_f, r = shape
    if wide:
        w = wide_weight(out_f, in_f, torch.bfloat16).to(DEV)
    else:
        w = (torch.randn(out_f, in_f) * 0.02).to(torch.bfloat16).to(DEV)
    a, b = wide_adapter(in_f, out_f, r, torch.float32)
    a, b = a.to(DEV), (b / r).to(DEV)
    codes, merged = _exact_all(w, a, b, 2.0)
    ref = ref_merge_exact_codes(w, a, b, 2.0)
    assert torch.equal(codes.codes.cpu(), ref[0]) and torch.equal(codes.exc_index.cpu(), ref[1])
    if wide:
        assert codes.exc_index.numel() > w.numel() // 256
    ops.unmerge_exact_(merged, codes, a, b, 2.0)
    assert torch.equal(ubits(merged), ubits(w))


def test_exact_merge_errors():
    w, a, b = (torch.randn(6, 8) * 0.1).to(DEV), torch.randn(2, 8, device=DEV), torch.randn(6, 2, device=DEV)
    codes = ops.merge_exact_codes(w, a, b, 1.0)
    with pytest.raises(RuntimeError, match="lora_ext::unmerge_exact_: expected codes on device cuda"):
        ops.unmerge_exact_(w, codes.to("cpu"), a, b, 1.0)
    bad = ops.ExactMergeCodes(codes.codes, torch.tensor([1000], device=DEV), torch.zeros(1, device=DEV))
    before = w.clone()
    with pytest.raises(RuntimeError, match="exc_index holds 1000, outside"):
        ops.unmerge_exact_(w, bad, a, b, 1.0)
    assert torch.equal(w, before)  # nothing written
    with pytest.raises(RuntimeError, match="lora_ext::merge_exact_codes: expected a float32, bfloat16 or float16"):
        ops.merge_exact_codes(w.double(), a.double(), b.double(), 1.0)
    with pytest.raises(RuntimeError, match="lora_ext::merge_exact_: expected lora_A on device"):
        ops.merge_exact_(w, a.cpu(), b, 1.0)


def test_module_exact_merge_survives_a_device_move():
    """merge(exact=True) on the GPU, model.cpu() while merged, unmerge on the CPU: bit for bit."""
    import lora_ext
    from models import LLAMA_TARGETS, tiny_llama

    model = tiny_llama().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    model.to(DEV)
    layer = next(layer for _, layer in lora_ext.lora_layers(model))
    w_unmerged = layer.base_layer.weight.detach().clone()
    lora_ext.merge(model, exact=True)
    assert layer.base_layer.weight.is_cuda and not torch.equal(layer.base_layer.weight, w_unmerged)
    model.cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the inexact unmerge
        lora_ext.unmerge(model)
    after = lora_ext.unload(model).state_dict()
    for k, v in before.items():
        assert torch.equal(v.view(torch.int16), after[k].view(torch.int16)), k


# ---------------------------------------------------------------------------
# validation and devices
# ---------------------------------------------------------------------------


def _message(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e).split("\n")[0]
    return None


def test_errors_match_cpu_messages():
    x, w, b, a, bb = make_inputs((4,), 8, 6, 2, torch.float32)
    cases = [
        lambda d: ops.lora_linear(x.to(d), w.to(d), b.to(d), a[:, :5].to(d), bb.to(d), 1.0),
        lambda d: ops.lora_linear(x.to(d), w.to(d), b.to(d), a.to(d), bb.double().to(d), 1.0),
        lambda d: ops.lora_linear(x.to(d), w.to(d), b.to(d), a.to(d), bb.to(d), float("nan")),
        lambda d: ops.lora_linear(x.to(d), w.to(d), b.to(d), a.to(d), bb.to(d), 1.0, 1.5, True),
        lambda d: ops.merge_(w.to(d), a.to(d), bb[:5].to(d), 1.0),
        lambda d: torch.ops.lora_ext._lora_linear_forward(x.to(d), w.to(d), b.to(d), a.to(d), bb.to(d), 1.0, 0.3, None),
    ]
    for i, case in enumerate(cases):
        cpu, gpu = _message(lambda: case("cpu")), _message(lambda: case(DEV))
        assert cpu is not None and gpu is not None, i
        assert cpu[0] == gpu[0] and cpu[1].replace("cpu", DEV) == gpu[1].replace("cuda:0", DEV), (i, cpu, gpu)


def test_mixed_devices_rejected():
    x, w, b, a, bb = make_inputs((4,), 8, 6, 2, torch.float32)
    with pytest.raises(RuntimeError, match="expected lora_A on device"):
        ops.lora_linear(x.to(DEV), w.to(DEV), b.to(DEV), a, bb.to(DEV), 1.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    dev = torch.device("cuda", 1)
    x, w, b, a, bb = make_inputs((9,), 40, 24, 4, torch.bfloat16, torch.float32)
    xs = [t.to(dev) for t in (x, w, b, a, bb)]
    y = ops.lora_linear(*xs, 0.5, 0.2, False)
    assert y.device == dev
    torch.testing.assert_close(y.cpu().double(), ref_lora_linear(x, w, b, a, bb, 0.5), atol=3e-2, rtol=2e-2)
    wv = xs[1].clone()
    ops.merge_(wv, xs[3], xs[4], 0.5)
    _assert_merged(wv, _merge_ref(w, a, b, 0.5), torch.bfloat16, w, a, b, 0.5)
