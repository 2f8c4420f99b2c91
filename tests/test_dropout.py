"""Dropout on the LoRA branch: the mask is ops/common/dropout_rng.h's (a numpy reference), the
backward mask is the forward mask, masks are reproducible under torch.manual_seed, and nothing
x-sized besides x is saved."""

import pytest
import torch

from lora_ext import ops
from reference import DEVICES, keep_mask_numpy

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets


def _identity_setup(n, d, p, dtype=torch.float64):
    """A = B = I and scale 1, so y - x W^T - b is exactly dropout(x): the mask is observable."""
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = torch.randn(d, d, dtype=dtype) / d**0.5
    b = torch.randn(d, dtype=dtype)
    a = torch.eye(d, dtype=dtype, requires_grad=True)
    bb = torch.eye(d, dtype=dtype, requires_grad=True)
    return x, w, b, a, bb


@pytest.mark.parametrize("device", DEVICES)
def test_mask_is_the_numpy_reference(device):
    """With A = I the intermediate h is dropout(x) itself: its zeros are the reference's dropped elements."""
    x = torch.ones(7, 33, dtype=torch.float64, device=device)
    eye = torch.eye(33, dtype=torch.float64, device=device)
    zeros = torch.zeros(2, 33, dtype=torch.float64, device=device)
    seed = torch.tensor(99, dtype=torch.long)  # a 0-dim host tensor, as the autograd kernel draws it
    _, h = torch.ops.lora_ext._lora_linear_forward(x, zeros, None, eye, zeros, 1.0, 0.4, seed)
    want = keep_mask_numpy(99, 0.4, range(7 * 33)).reshape(7, 33)
    assert torch.equal(h.cpu() != 0, torch.from_numpy(want))


@pytest.mark.parametrize("shape", [(37, 16), (8, 33), (1, 5)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_backward_uses_forward_mask(shape, p):
    n, d = shape
    x, w, b, a, bb = _identity_setup(n, d, p)
    y = ops.lora_linear(x, w, b, a, bb, 1.0, p, True)
    dropped = (y - x @ w.T - b).detach()
    keep = dropped.abs() > 1e-9
    torch.testing.assert_close(dropped, torch.where(keep, x.detach() / (1 - p), torch.zeros_like(dropped)))
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w + g * keep / (1 - p))
    torch.testing.assert_close(a.grad, g.T @ dropped)  # scale * (g B)^T dropout(x)
    # and grad_B = g^T h with h = dropout(x) A^T = dropout(x)
    torch.testing.assert_close(bb.grad, g.T @ dropped)


def test_mask_statistics_and_eval_mode():
    x = torch.randn(400, 256, dtype=torch.float64)
    w = torch.zeros(256, 256, dtype=torch.float64)
    eye = torch.eye(256, dtype=torch.float64)
    for p in (0.1, 0.3, 0.7):
        y = ops.lora_linear(x, w, None, eye, eye, 1.0, p, True)
        frac = (y == 0).double().mean().item()
        assert abs(frac - p) < 0.01, (p, frac)
        kept = y != 0
        torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    # training=False: no dropout at all
    torch.testing.assert_close(ops.lora_linear(x, w, None, eye, eye, 1.0, 0.7, False), x)


def test_reproducible_under_manual_seed():
    def run(seed):
        torch.manual_seed(seed)
        x, w, b, a, bb = _identity_setup(50, 24, 0.3)
        y = ops.lora_linear(x, w, b, a, bb, 0.5, 0.3, True)
        y.sum().backward()
        return y.detach(), x.grad, a.grad

    r1, r2, r3 = run(7), run(7), run(8)
    for u, v in zip(r1, r2):
        assert torch.equal(u, v)
    assert not torch.equal(r1[0], r3[0])


def test_no_grad_path_matches_mask_distribution():
    x = torch.randn(300, 64)
    eye = torch.eye(64)
    with torch.no_grad():
        y = ops.lora_linear(x, torch.zeros(64, 64), None, eye, eye, 1.0, 0.25, True)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.02


@pytest.mark.parametrize(
    "dtype,adtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]
)
def test_saved_for_backward_holds_nothing_x_sized_but_x(dtype, adtype):
    n, i, o, r = 512, 256, 192, 8
    x = torch.randn(4, n // 4, i, dtype=dtype, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(o, i, dtype=dtype), requires_grad=False)
    b = torch.nn.Parameter(torch.randn(o, dtype=dtype), requires_grad=False)
    a = torch.nn.Parameter(torch.randn(r, i, dtype=adtype))
    bb = torch.nn.Parameter(torch.randn(o, r, dtype=adtype))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.lora_linear(x, w, b, a, bb, 0.5, 0.1, True)
    params = {w.data_ptr(), a.data_ptr(), bb.data_ptr()}
    new_bytes = 0
    for t in saved:
        if t.data_ptr() == x.data_ptr() or t.data_ptr() in params:
            continue
        assert t.numel() < n * i, f"an x-sized tensor {tuple(t.shape)} was saved for backward"
        assert t.numel() < n * o, f"an output-sized tensor {tuple(t.shape)} was saved for backward"
        new_bytes += t.numel() * t.element_size()
    h_bytes = n * r * 4  # the [N, r] intermediate (float32 for half/bf16 inputs)
    assert new_bytes <= h_bytes + 64, new_bytes  # + the 8-byte seed
    y.sum().backward()  # still differentiable after the hooks
    assert a.grad is not None and x.grad is not None
