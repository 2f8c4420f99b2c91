"""lora_linear against a float64 reference: dtypes, shapes, layouts, gradients,
opcheck, gradcheck, torch.compile and torch.export. Written once for every device
(``device``: the CUDA cases run where a GPU is); what only CUDA has (CUDA graphs,
masks identical to the CPU's, several GPUs) is in test_cuda.py."""

import pytest
import torch

from lora_ext import ops
from reference import DEVICES, GRAD_TOL, TOL, make_inputs, noncontiguous, on, ref_lora_linear, tol

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (leading shape of x, in, out, r)
SHAPES = [
    ((7,), 16, 12, 4),
    ((2, 3), 33, 17, 1),  # 3-D x, rank 1, odd sizes
    ((0,), 16, 12, 4),  # empty batch
    ((2, 0, 5), 8, 6, 2),  # empty leading dim, 4-D x
    ((65,), 40, 70, 8),
    ((300,), 300, 257, 16),  # enough rows to span several internal chunks in half precision
    ((3,), 0, 5, 2),  # in = 0: y = bias
    ((0, 2), 0, 0, 1),  # in = out = 0 with an empty batch (x [0, 2, 0] once failed to reshape to [-1, 0])
    ((4,), 6, 0, 3),  # out = 0
    ((65,), 4097, 70, 128),  # in beyond the CUDA kernels' chunk width, r = 128
    ((9,), 40, 24, 300),  # r beyond one 256-wide tile of the CUDA shrink kernel
]
ADAPTER = [(d, d) for d in DTYPES] + [
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float16, torch.bfloat16),
]


def _run(x, w, b, a, bb, scale, **kw):
    return ops.lora_linear(x, w, b, a, bb, scale, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,adtype", ADAPTER, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(device, dtype, adtype, shape, bias):
    lead, i, o, r = shape
    x, w, b, a, bb = make_inputs(lead, i, o, r, dtype, adtype, bias=bias)
    y = _run(*on(device, x, w, b, a, bb), 0.7)
    assert y.device.type == device and y.shape == (*lead, o) and y.dtype == dtype
    atol, rtol = tol(dtype, i, device)
    torch.testing.assert_close(y.cpu().double(), ref_lora_linear(x, w, b, a, bb, 0.7), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_inputs(device, dtype):
    x, w, b, a, bb = make_inputs((9, 5), 24, 20, 6, dtype)
    xs = torch.randn(5, 9, 24, dtype=dtype, device=device).transpose(0, 1)  # non-contiguous x with real values
    xs.copy_(x)
    args = [xs, *(noncontiguous(t) for t in on(device, w, b, a, bb))]
    assert not any(t.is_contiguous() for t in args if t is not None and t.dim() == 2) and not xs.is_contiguous()
    atol, rtol = TOL[dtype]
    for p, training in [(0.0, False), (0.3, False)]:  # dropout_p without training: no dropout
        y = _run(*args, 1.3, dropout_p=p, training=training)
        torch.testing.assert_close(y.cpu().double(), ref_lora_linear(x, w, b, a, bb, 1.3), atol=atol, rtol=rtol)
    # a strided slice of a bigger tensor as x, next to contiguous and non-contiguous parameters
    big = torch.randn(9, 48, dtype=dtype)
    xv = big.to(device)[:, ::2]
    for params in (on(device, w, b, a, bb), args[1:]):
        y2 = _run(xv, *params, 1.3)
        torch.testing.assert_close(
            y2.cpu().double(), ref_lora_linear(big[:, ::2], w, b, a, bb, 1.3), atol=atol, rtol=rtol
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,adtype", ADAPTER, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize(
    "shape",
    [
        ((6, 5), 20, 14, 3),
        ((130,), 64, 48, 1),
        ((0,), 8, 4, 2),
        ((4,), 0, 6, 2),
        ((3,), 5, 0, 1),
        ((130,), 4097, 48, 1),
    ],
    ids=str,
)
@pytest.mark.parametrize("grad_base", [False, True])
def test_gradients_match_reference(device, dtype, adtype, shape, grad_base):
    lead, i, o, r = shape
    x, w, b, a, bb = make_inputs(lead, i, o, r, dtype, adtype)
    leaves = [t.clone().to(device).requires_grad_(True) for t in (x, a, bb)]
    base = [t.clone().to(device).requires_grad_(grad_base) for t in (w, b)]
    y = _run(leaves[0], base[0], base[1], leaves[1], leaves[2], 0.9)
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g.to(dtype).to(device))
    refs = [t.detach().double().requires_grad_(True) for t in (x, w, b, a, bb)]
    ref_lora_linear(*refs, 0.9).backward(g)
    got = {"x": leaves[0].grad, "A": leaves[1].grad, "B": leaves[2].grad}
    want = {"x": refs[0].grad, "A": refs[3].grad, "B": refs[4].grad}
    if grad_base:
        got.update(W=base[0].grad, b=base[1].grad)
        want.update(W=refs[1].grad, b=refs[2].grad)
    else:
        assert base[0].grad is None and base[1].grad is None  # frozen weight: never computed
    atol, rtol = tol(dtype, i, device, GRAD_TOL)
    for k in got:
        assert got[k] is not None and got[k].device.type == device, k
        tdt = adtype if k in ("A", "B") else dtype
        assert got[k].dtype == tdt, k
        scale = max(1.0, want[k].abs().amax().item() if want[k].numel() else 1.0)
        torch.testing.assert_close(
            got[k].cpu().double(), want[k], atol=atol * scale, rtol=rtol, msg=lambda m: f"{k}: {m}"
        )


def test_only_needed_gradients():
    x, w, b, a, bb = make_inputs((4,), 8, 6, 2, torch.float64)
    a.requires_grad_(True)
    y = _run(x, w, b, a, bb, 1.0)
    y.sum().backward()
    assert a.grad is not None and bb.grad is None and x.grad is None and w.grad is None


def test_no_grad_and_inference_mode():
    x, w, b, a, bb = make_inputs((5,), 8, 6, 2, torch.float32)
    a.requires_grad_(True)
    with torch.no_grad():
        y1 = _run(x, w, b, a, bb, 0.5)
    with torch.inference_mode():
        y2 = _run(x, w, b, a, bb, 0.5)
    assert not y1.requires_grad and not y2.requires_grad
    torch.testing.assert_close(y1, y2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(device, dropout, bias):
    x, w, b, a, bb = on(device, *make_inputs((3, 4), 7, 5, 3, torch.float64, bias=bias))
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)

    def fn(x, w, b, a, bb):
        torch.manual_seed(1234)  # the same dropout mask on every evaluation
        return ops.lora_linear(x, w, b, a, bb, 0.8, dropout, True)

    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))


def _opcheck_samples(device):
    s = []
    for dtype, adtype in [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ]:
        for lead, bias, rg in [((5,), True, True), ((2, 3), False, True), ((0,), True, False), ((4,), True, False)]:
            x, w, b, a, bb = on(device, *make_inputs(lead, 12, 10, 3, dtype, adtype, bias=bias))
            if rg and dtype in (torch.float32, torch.float64):
                x.requires_grad_(True)
                a.requires_grad_(True)
                bb.requires_grad_(True)
            s.append((x, w, b, a, bb, 0.5, 0.0, False))
    return s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", range(16))
def test_opcheck_lora_linear(device, sample):
    args = _opcheck_samples(device)[sample]
    torch.library.opcheck(torch.ops.lora_ext.lora_linear.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_lora_linear_with_dropout(device):
    # Randomness differs between eager and traced runs, so the AOT-dispatch comparison
    # does not apply; the pieces that take an explicit seed are opchecked in full below.
    x, w, b, a, bb = on(device, *make_inputs((6,), 12, 10, 3, torch.float64))
    a.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.lora_ext.lora_linear.default,
        (x, w, b, a, bb, 0.5, 0.3, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,adtype",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ],
)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_internal_pieces(device, dtype, adtype, p):
    x, w, b, a, bb = on(device, *make_inputs((3, 5), 12, 10, 3, dtype, adtype))
    # a host tensor either way; with CUDA tensors a 0-dim one, as the autograd kernel draws it (FakeTensor
    # takes CPU scalars next to CUDA tensors), on the CPU also the one-element 1-D form
    seed = None if p == 0 else torch.tensor(987654321) if device == "cuda" else torch.tensor([987654321])
    y, h = torch.ops.lora_ext._lora_linear_forward(x, w, b, a, bb, 0.5, p, seed)
    g = torch.randn_like(y)
    torch.library.opcheck(torch.ops.lora_ext._lora_linear_forward.default, (x, w, b, a, bb, 0.5, p, seed))
    ga, gb, gh = torch.ops.lora_ext._lora_linear_backward_lora(g, x, a, bb, h, 0.5, p, seed)
    assert gh.shape == h.shape and gh.dtype == h.dtype
    torch.library.opcheck(torch.ops.lora_ext._lora_linear_backward_lora.default, (g, x, a, bb, h, 0.5, p, seed))
    torch.library.opcheck(torch.ops.lora_ext._lora_linear_backward_input.default, (g, w, a, gh, p, seed))


class _Layer(torch.nn.Module):
    def __init__(self, dtype=torch.float32, adtype=None, p=0.0, in_f=16, out_f=12, r=4, device="cpu"):
        super().__init__()
        _, w, b, a, bb = on(device, *make_inputs((1,), in_f, out_f, r, dtype, adtype))
        self.w, self.b = torch.nn.Parameter(w, requires_grad=False), torch.nn.Parameter(b, requires_grad=False)
        self.a, self.bb = torch.nn.Parameter(a), torch.nn.Parameter(bb)
        self.p = p

    def forward(self, x):
        return ops.lora_linear(x, self.w, self.b, self.a, self.bb, 0.75, self.p, self.training)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_matches_eager(device, dynamic):
    torch._dynamo.reset()
    layer = _Layer(device=device)
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    ref = [x.grad.clone(), layer.a.grad.clone(), layer.bb.grad.clone()]
    for t in (x, layer.a, layer.bb):
        t.grad = None
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
    yc = compiled(x)
    torch.testing.assert_close(yc, y, atol=1e-5, rtol=1e-5)
    yc.backward(g)
    for got, want in zip((x.grad, layer.a.grad, layer.bb.grad), ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference graph too
        torch.testing.assert_close(compiled(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_with_dropout_draws_new_masks(device):
    torch._dynamo.reset()
    layer = _Layer(p=0.5, device=device).train()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(64, 16, device=device)
    y1, y2 = compiled(x), compiled(x)
    assert not torch.equal(y1, y2), "a compiled graph must not reuse one dropout mask"
    layer.eval()
    torch.testing.assert_close(compiled(x), layer(x))


def test_torch_export():
    layer = _Layer().eval()
    x = torch.randn(5, 16)
    ep = torch.export.export(layer, (x,), dynamic_shapes={"x": {0: torch.export.Dim("n")}})
    assert any("lora_ext.lora_linear" in str(n.target) for n in ep.graph.nodes)
    x2 = torch.randn(11, 16)
    torch.testing.assert_close(ep.module()(x2), layer(x2))
