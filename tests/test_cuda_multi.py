"""What only CUDA has for lora_linear_multi / lora_group_rows: the CUDA kernels against the CPU
kernels with the same seed, CUDA's own check of the adapter ids, CUDA graphs, and the validation
cache of groupings and scales (skipped without a CUDA device; scripts/gpu_check.sh runs them on a
GPU machine). The forward, gradcheck, opcheck and torch.compile tests are written once for every
device in test_lora_linear_multi_op.py."""

import pytest
import torch

from reference import GRAD_TOL
from test_lora_linear_multi_op import make_multi

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

multi = torch.ops.lora_ext.lora_linear_multi
group = torch.ops.lora_ext.lora_group_rows
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
]


def cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.mark.parametrize("dtype,adtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_pieces_match_cpu_kernels_with_the_same_seed(dtype, adtype, p):
    x, w, b, A, B, s, ids = make_multi((6, 11), 40, 24, [3, 1, 4], dtype, adtype)
    Bn = B.transpose(1, 2).contiguous().transpose(1, 2)  # the module's layout
    order, offsets = group(ids, 3)
    seed = torch.tensor([1234567], dtype=torch.long) if p > 0 else None  # a host tensor, as autograd makes it
    ref = torch.ops.lora_ext._lora_linear_multi_forward(x, w, b, A, Bn, s, ids, order, offsets, p, seed)
    got = torch.ops.lora_ext._lora_linear_multi_forward(*cuda(x, w, b, A, Bn, s, ids, order, offsets), p, seed)
    atol, rtol = GRAD_TOL[dtype]
    for a_, b_ in zip(got, ref):
        torch.testing.assert_close(a_.cpu().double(), b_.double(), atol=atol, rtol=rtol)
    g = torch.randn_like(ref[0])
    ref_l = torch.ops.lora_ext._lora_linear_multi_backward_lora(g, x, A, Bn, s, order, offsets, ref[1], p, seed)
    got_l = torch.ops.lora_ext._lora_linear_multi_backward_lora(*cuda(g, x, A, Bn, s, order, offsets, ref[1]), p, seed)
    for a_, b_ in zip(got_l, ref_l):
        torch.testing.assert_close(a_.cpu().double(), b_.double(), atol=atol, rtol=rtol)
    ref_i = torch.ops.lora_ext._lora_linear_multi_backward_input(g, w, A, ref_l[2], order, offsets, p, seed)
    got_i = torch.ops.lora_ext._lora_linear_multi_backward_input(*cuda(g, w, A, ref_l[2], order, offsets), p, seed)
    torch.testing.assert_close(got_i.cpu().double(), ref_i.double(), atol=atol, rtol=rtol)


def test_bad_ids_are_named():
    """CUDA checks the ids' range on the device (one sync) and names the values found."""
    x, w, b, A, B, s, ids = cuda(*make_multi((10,), 8, 6, [2, 2, 2], torch.float32, torch.float32))
    with pytest.raises(IndexError, match=r"lora_ext::lora_group_rows: expected adapter ids in \[-1, 3\)"):
        multi(x, w, b, A, B, s, ids + 5)


def test_cuda_graph_capture_of_forward_with_precomputed_grouping():
    x, w, b, A, B, s, ids = cuda(*make_multi((64,), 96, 80, [16, 4, 8], torch.float32, torch.float32))
    order, offsets = group(ids, 3)
    fn = lambda: multi(x, w, b, A, B, s, ids, 0.0, False, order, offsets)  # noqa: E731
    want = fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    x.copy_(x * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, multi(x, w, b, A, B, s, ids, 0.0, False, order, offsets), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, want)


def test_validation_runs_once_per_grouping_and_again_after_a_change():
    """A grouping (and scales tensor) is checked once on CUDA, not on every call; an in-place
    change bumps its version and is checked again; a new tensor is always checked."""
    x, w, b, A, B, s, ids = cuda(*make_multi((12,), 16, 8, [2, 3], torch.float32, torch.float32))
    order, offsets = group(ids, 2)
    y = multi(x, w, b, A, B, s, ids, 0.0, False, order, offsets)
    y2 = multi(x, w, b, A, B, s, ids, 0.0, False, order, offsets)  # the cached check
    assert torch.equal(y, y2)
    order.copy_(order.flip(0))  # in place (a new version): still a permutation, no longer the grouping
    with pytest.raises(ValueError, match="group_order\\[0\\] = .* is in the group of .* but adapter_ids"):
        multi(x, w, b, A, B, s, ids, 0.0, False, order, offsets)
    with pytest.raises(ValueError, match="permutation"):
        multi(x, w, b, A, B, s, ids, 0.0, False, torch.zeros_like(order), offsets)  # a new tensor
    order, offsets = group(ids, 2)
    multi(x, w, b, A, B, s, ids, 0.0, False, order, offsets)
    s.fill_(float("nan"))
    with pytest.raises(ValueError, match="finite scales"):
        multi(x, w, b, A, B, s, ids, 0.0, False, order, offsets)


def test_corrupted_grouping_in_inference_mode_stays_in_bounds():
    """Inference tensors have no version counter, so an in-place change after the first check is
    not seen; the kernels still never index outside their tensors (rows are bounds-checked)."""
    with torch.inference_mode():
        x, w, b, A, B, s, ids = cuda(*make_multi((64,), 32, 16, [4, 4], torch.float32, torch.float32))
        order, offsets = group(ids, 2)
        multi(x, w, b, A, B, s, ids, 0.0, False, order, offsets)
        order[:8] = 10**9
        offsets[1] = -5
        y = multi(x, w, b, A, B, s, ids, 0.0, False, order, offsets)
        torch.cuda.synchronize()  # an out-of-bounds access would surface here
        assert y.shape == (64, 16)
