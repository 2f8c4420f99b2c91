"""Every bad input is a RuntimeError/ValueError whose message names the op and says
what was expected; never a crash or silent broadcasting."""

import math

import pytest
import torch

from lora_ext import ops


def _good(dtype=torch.float32, rg=False):
    x = torch.randn(4, 8, dtype=dtype, requires_grad=rg)
    w = torch.randn(6, 8, dtype=dtype)
    b = torch.randn(6, dtype=dtype)
    a = torch.randn(3, 8, dtype=dtype, requires_grad=rg)
    bb = torch.randn(6, 3, dtype=dtype, requires_grad=rg)
    return dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scale=0.5, dropout_p=0.0, training=False)


def _meta(t):
    return t.detach().to("meta")


BAD_LINEAR = {
    "in mismatch x": (dict(x=torch.randn(4, 7)), "in = 8"),
    "in mismatch A": (dict(lora_A=torch.randn(3, 7)), "lora_A of shape \\[r, in\\]"),
    "out mismatch B": (dict(lora_B=torch.randn(5, 3)), "lora_B of shape \\[out, r\\] with out = 6"),
    "r mismatch": (dict(lora_B=torch.randn(6, 2)), "with r = 3"),
    "rank 0": (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), "r >= 1"),
    "x 0-dim": (dict(x=torch.tensor(1.0)), "at least 1 dim"),
    "weight 3-D": (dict(weight=torch.randn(1, 6, 8)), "weight to have 2 dims"),
    "weight 1-D": (dict(weight=torch.randn(8)), "weight to have 2 dims"),
    "A 1-D": (dict(lora_A=torch.randn(8)), "lora_A to have 2 dims"),
    "A 3-D": (dict(lora_A=torch.randn(1, 3, 8)), "lora_A to have 2 dims"),
    "B 3-D": (dict(lora_B=torch.randn(1, 6, 3)), "lora_B to have 2 dims"),
    "bias wrong size": (dict(bias=torch.randn(5)), "bias of shape \\[6\\]"),
    "bias broadcastable 1": (dict(bias=torch.randn(1)), "bias of shape \\[6\\]"),
    "bias 2-D": (dict(bias=torch.randn(1, 6)), "bias to have 1 dims"),
    "int x": (dict(x=torch.ones(4, 8, dtype=torch.int64), weight=torch.ones(6, 8, dtype=torch.int64)), "dtype float32"),
    "complex": (
        dict(x=torch.randn(4, 8, dtype=torch.complex64), weight=torch.randn(6, 8, dtype=torch.complex64)),
        "dtype float32",
    ),
    "weight dtype": (dict(weight=torch.randn(6, 8, dtype=torch.float64)), "weight of dtype Float"),
    "bias dtype": (dict(bias=torch.randn(6, dtype=torch.float64)), "bias of dtype Float"),
    "A/B dtype": (dict(lora_B=torch.randn(6, 3, dtype=torch.float64)), "same dtype"),
    "bf16 adapter on fp32": (
        dict(lora_A=torch.randn(3, 8).bfloat16(), lora_B=torch.randn(6, 3).bfloat16()),
        "lora_A/lora_B of dtype Float",
    ),
    "device weight": (dict(weight=torch.randn(6, 8, device="meta")), "weight on device"),
    "device A": (dict(lora_A=torch.randn(3, 8, device="meta")), "lora_A on device"),
    "device bias": (dict(bias=torch.randn(6, device="meta")), "bias on device"),
    "dropout 1": (dict(dropout_p=1.0), "0 <= dropout_p < 1"),
    "dropout negative": (dict(dropout_p=-0.1), "0 <= dropout_p < 1"),
    "dropout nan": (dict(dropout_p=math.nan), "0 <= dropout_p < 1"),
    "scale nan": (dict(scale=math.nan), "finite scale"),
    "scale inf": (dict(scale=math.inf), "finite scale"),
}


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "autograd"])
@pytest.mark.parametrize("case", list(BAD_LINEAR), ids=str)
def test_lora_linear_bad_input(case, requires_grad):
    changes, *_, pattern = BAD_LINEAR[case]
    kw = _good(rg=requires_grad)
    kw.update(changes)
    with pytest.raises((RuntimeError, ValueError), match="lora_ext::lora_linear: expected") as ei:
        ops.lora_linear(**kw)
    assert __import__("re").search(pattern, str(ei.value)), str(ei.value)


@pytest.mark.parametrize("case", ["in mismatch x", "r mismatch", "rank 0", "bias wrong size", "dropout 1", "scale nan"])
def test_lora_linear_bad_input_meta(case):
    changes, *_, pattern = BAD_LINEAR[case]
    kw = {k: (_meta(v) if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    kw.update({k: (_meta(v) if isinstance(v, torch.Tensor) else v) for k, v in changes.items()})
    with pytest.raises((RuntimeError, ValueError), match="lora_ext::lora_linear: expected"):
        ops.lora_linear(**kw)


@pytest.mark.parametrize(
    "dtype,adtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]
)
@pytest.mark.parametrize("scale", [3.5e38, -1e39, 1e300])
def test_scale_beyond_float32_is_refused_by_every_op(dtype, adtype, scale):
    # The LoRA branch computes in float32 (float64 only for float64 adapters): a finite double beyond
    # FLT_MAX used to give inf weights/outputs, or ATen's "cannot be converted to type float" error.
    x, w, a, b = (
        torch.randn(3, 8).to(dtype),
        torch.randn(6, 8).to(dtype),
        torch.randn(2, 8).to(adtype),
        torch.randn(6, 2).to(adtype),
    )
    w0 = w.clone()
    calls = {
        "lora_linear": lambda: ops.lora_linear(x, w, None, a, b, scale),
        "lora_linear_multi": lambda: ops.lora_linear_multi(
            x, w, None, a[None], b[None], torch.tensor([scale], dtype=torch.float64), torch.zeros(3, dtype=torch.long)
        ),
        "merge_": lambda: ops.merge_(w, a, b, scale),
        "unmerge_": lambda: ops.unmerge_(w, a, b, scale),
        "merge_exact_codes": lambda: ops.merge_exact_codes(w, a, b, scale),
        "merge_exact_": lambda: ops.merge_exact_(w, a, b, scale),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError, match=f"lora_ext::{op}: expected (a )?finite scales? representable in float32"):
            call()
        assert torch.equal(w, w0), op
    # float64 adapters compute in float64: such scales are fine there
    x, w, a, b = (t.double() for t in (x, w, a, b))
    assert ops.lora_linear(x, w, None, a, b, scale).isfinite().all()


def test_value_errors_are_value_errors():
    kw = _good()
    kw["dropout_p"] = 1.5
    with pytest.raises(ValueError):
        ops.lora_linear(**kw)
    kw = _good()
    kw.update(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0))
    with pytest.raises(ValueError):
        ops.lora_linear(**kw)


BAD_MERGE = {
    "in mismatch": (dict(lora_A=torch.randn(3, 7)), "lora_A of shape"),
    "out mismatch": (dict(lora_B=torch.randn(5, 3)), "lora_B of shape"),
    "r mismatch": (dict(lora_B=torch.randn(6, 2)), "with r = 3"),
    "rank 0": (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), "r >= 1"),
    "weight 1-D": (dict(weight=torch.randn(48)), "weight to have 2 dims"),
    "A 3-D": (dict(lora_A=torch.randn(1, 3, 8)), "lora_A to have 2 dims"),
    "int weight": (dict(weight=torch.ones(6, 8, dtype=torch.int32)), "dtype float32"),
    "A/B dtype": (dict(lora_B=torch.randn(6, 3, dtype=torch.float64)), "same dtype"),
    "adapter fp64 on fp32": (
        dict(lora_A=torch.randn(3, 8).double(), lora_B=torch.randn(6, 3).double()),
        "lora_A/lora_B of dtype Float",
    ),
    "device": (dict(lora_A=torch.randn(3, 8, device="meta")), "lora_A on device"),
    "scale inf": (dict(scale=math.inf), "finite scale"),
}


@pytest.mark.parametrize("opname", ["merge_", "unmerge_"])
@pytest.mark.parametrize("case", list(BAD_MERGE), ids=str)
def test_merge_bad_input(opname, case):
    changes, pattern = BAD_MERGE[case]
    kw = dict(weight=torch.randn(6, 8), lora_A=torch.randn(3, 8), lora_B=torch.randn(6, 3), scale=0.5)
    kw.update(changes)
    before = kw["weight"].clone() if kw["weight"].device.type == "cpu" else None
    with pytest.raises((RuntimeError, ValueError), match=f"lora_ext::{opname}: expected") as ei:
        getattr(ops, opname)(kw["weight"], kw["lora_A"], kw["lora_B"], kw["scale"])
    assert __import__("re").search(pattern, str(ei.value)), str(ei.value)
    if before is not None:
        assert torch.equal(kw["weight"], before)  # nothing was changed


def test_internal_ops_check_seed():
    x, w, a, bb = torch.randn(4, 8), torch.randn(6, 8), torch.randn(3, 8), torch.randn(6, 3)
    with pytest.raises(RuntimeError, match="_lora_linear_forward: expected a seed tensor exactly when dropout_p > 0"):
        torch.ops.lora_ext._lora_linear_forward(x, w, None, a, bb, 1.0, 0.5, None)
    with pytest.raises(RuntimeError, match="one-element int64"):
        torch.ops.lora_ext._lora_linear_forward(x, w, None, a, bb, 1.0, 0.5, torch.tensor([1.0]))


BWD_LORA_BAD = {
    "grad_y width": (dict(grad_y=torch.randn(4, 5)), "expected grad_y of shape \\[\\.\\.\\., 6\\] and dtype Float"),
    "grad_y dtype": (dict(grad_y=torch.randn(4, 6, dtype=torch.float64)), "expected grad_y of shape"),
    "x rows": (dict(x=torch.randn(5, 8)), "expected x with 4 rows of 8 \\(as grad_y\\)"),
    "x width": (dict(x=torch.randn(4, 7)), "expected x with 4 rows of 8"),
    "h shape": (dict(h=torch.randn(4, 2)), "expected h of shape \\[4, 3\\] and dtype Float"),
    "h dtype": (dict(h=torch.randn(4, 3, dtype=torch.float64)), "expected h of shape \\[4, 3\\]"),
}


@pytest.mark.parametrize("case", sorted(BWD_LORA_BAD))
def test_backward_lora_piece_bad_input(case):
    kw = dict(
        grad_y=torch.randn(4, 6),
        x=torch.randn(4, 8),
        lora_A=torch.randn(3, 8),
        lora_B=torch.randn(6, 3),
        h=torch.randn(4, 3),
    )
    change, msg = BWD_LORA_BAD[case]
    kw.update(change)
    with pytest.raises(RuntimeError, match="lora_ext::_lora_linear_backward_lora: " + msg):
        torch.ops.lora_ext._lora_linear_backward_lora(*kw.values(), 1.0, 0.0, None)


BWD_INPUT_BAD = {
    "grad_y width": (dict(grad_y=torch.randn(4, 5)), "expected grad_y of shape \\[\\.\\.\\., 6\\], got"),
    "grad_h rows": (dict(grad_h=torch.randn(3, 3)), "expected grad_h of shape \\[4, 3\\] and dtype Float"),
    "grad_h dtype": (dict(grad_h=torch.randn(4, 3, dtype=torch.float64)), "expected grad_h of shape \\[4, 3\\]"),
}


@pytest.mark.parametrize("case", sorted(BWD_INPUT_BAD))
def test_backward_input_piece_bad_input(case):
    kw = dict(grad_y=torch.randn(2, 2, 6), weight=torch.randn(6, 8), lora_A=torch.randn(3, 8), grad_h=torch.randn(4, 3))
    change, msg = BWD_INPUT_BAD[case]
    kw.update(change)
    with pytest.raises(RuntimeError, match="lora_ext::_lora_linear_backward_input: " + msg):
        torch.ops.lora_ext._lora_linear_backward_input(*kw.values(), 0.0, None)


OVERLAP = "more than one element of the written-to tensor refers to a single memory location"  # torch's check


@pytest.mark.parametrize("opname", ["merge_", "unmerge_"])
def test_merge_into_overlapping_weight_is_refused(opname):
    """An expanded weight (stride 0: several elements share one memory location) cannot be
    updated element by element: torch's overlap check refuses it before anything is written."""
    storage = torch.randn(1, 8)
    before = storage.clone()
    with pytest.raises(RuntimeError, match=OVERLAP):
        getattr(ops, opname)(storage.expand(6, 8), torch.randn(3, 8), torch.randn(6, 3), 0.5)
    assert torch.equal(storage, before)


def test_exact_merge_into_overlapping_weight_is_refused():
    storage = torch.randn(1, 8)
    before = storage.clone()
    with pytest.raises(RuntimeError, match=OVERLAP):
        ops.merge_exact_(storage.expand(6, 8), torch.randn(3, 8), torch.randn(6, 3), 0.5)
    assert torch.equal(storage, before)
