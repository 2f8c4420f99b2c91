"""lora_ext.LoraLinear: wrapping, PEFT names, init, scaling, adapter management, merge."""

import math

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoraLinear

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets


def _ref(layer: LoraLinear, x, names=None):
    names = layer.active_adapters if names is None else names
    y = torch.nn.functional.linear(x.double(), layer.base_layer.weight.double(), layer.base_layer.bias.double())
    for n in names:
        a, b = layer.lora_A[n].weight.double(), layer.lora_B[n].weight.double()
        y = y + layer.scaling[n] * (x.double() @ a.T) @ b.T
    return y


def test_wraps_without_copy_and_freezes():
    base = nn.Linear(16, 12)
    ptr = base.weight.data_ptr()
    layer = LoraLinear(base, r=4, lora_alpha=8)
    assert layer.base_layer is base and base.weight.data_ptr() == ptr
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == [
        "lora_A.default.weight",
        "lora_B.default.weight",
    ]
    assert list(layer.state_dict()) == [
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.default.weight",
        "lora_B.default.weight",
    ]
    assert layer.lora_A["default"].weight.shape == (4, 16) and layer.lora_B["default"].weight.shape == (12, 4)
    assert layer.weight is base.weight and layer.bias is base.bias
    with pytest.raises(TypeError, match="LoraLinear: expected a base layer of type Linear"):
        LoraLinear(nn.Conv1d(3, 3, 1))


def test_init_modes():
    base = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    layer = LoraLinear(base, r=8)  # True: A kaiming-uniform(a=sqrt(5)), B zeros -> no change at init
    a = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.abs().max() <= bound and a.std() > bound / 3
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    torch.testing.assert_close(layer(x), base(x))
    layer.add_adapter("g", r=16, init_lora_weights="gaussian")
    assert abs(layer.lora_A["g"].weight.std().item() - 1 / 16) < 0.01
    assert torch.count_nonzero(layer.lora_B["g"].weight) == 0
    layer.add_adapter("rand", r=4, init_lora_weights=False)
    assert torch.count_nonzero(layer.lora_B["rand"].weight) > 0
    with pytest.raises(ValueError, match="init_lora_weights"):
        layer.add_adapter("bad", init_lora_weights="pissa")


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_and_forward(use_rslora):
    layer = LoraLinear(nn.Linear(20, 10), r=4, lora_alpha=12, use_rslora=use_rslora, init_lora_weights=False)
    assert layer.scaling["default"] == (12 / 2 if use_rslora else 12 / 4)
    x = torch.randn(3, 7, 20)
    torch.testing.assert_close(layer(x).double(), _ref(layer, x), atol=1e-5, rtol=1e-5)


def test_adapter_management():
    layer = LoraLinear(nn.Linear(10, 6), r=2, init_lora_weights=False)
    layer.add_adapter("other", r=3, lora_alpha=6, init_lora_weights=False)
    assert layer.active_adapter == "default" and set(layer.lora_A) == {"default", "other"}
    x = torch.randn(4, 10)
    y_default = layer(x)
    layer.set_adapter("other")
    assert layer.active_adapter == "other"
    torch.testing.assert_close(layer(x).double(), _ref(layer, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer(x), y_default)
    layer.set_adapter(["default", "other"])  # several active adapters add up
    torch.testing.assert_close(layer(x).double(), _ref(layer, x), atol=1e-5, rtol=1e-5)
    layer.disable_adapters = True
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.disable_adapters = False
    layer.delete_adapter("other")
    assert list(layer.lora_A) == ["default"] and layer.active_adapters == ["default"]
    assert "other" not in layer.scaling and "lora_A.other.weight" not in layer.state_dict()
    torch.testing.assert_close(layer(x), y_default)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default")
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.delete_adapter("nope")
    with pytest.raises(ValueError, match="r >= 1"):
        layer.add_adapter("zero", r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        layer.add_adapter("d", lora_dropout=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_unmerge(dtype):
    base = nn.Linear(32, 24).to(dtype)
    w0 = base.weight.detach().clone()
    layer = LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    layer.add_adapter("b", r=2, init_lora_weights=False)
    want_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    assert layer.lora_A["default"].weight.dtype == want_dtype  # PEFT's default: fp32 adapters on a bf16 base
    layer.set_adapter(["default", "b"])
    x = torch.randn(6, 32, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default", "b"]
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(layer(x), y, atol=tol, rtol=tol)
    torch.testing.assert_close(layer(x), base(x))  # merged forward is the plain base linear
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight.float(), w0.float(), atol=tol, rtol=tol)


def test_safe_merge_refuses_non_finite():
    base = nn.Linear(8, 6)
    layer = LoraLinear(base, r=2, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    w0 = base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(base.weight, w0) and not layer.merged


def test_dropout_train_eval_and_training_updates_only_adapters():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8), r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(32, 16)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), _ref(layer, x), atol=1e-5, rtol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), layer.eval()(x))
    layer.train()
    w0 = layer.base_layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    a0 = layer.lora_A["default"].weight.detach().clone()
    layer(x).pow(2).mean().backward()
    opt.step()
    assert torch.equal(layer.base_layer.weight, w0) and layer.base_layer.weight.grad is None
    assert not torch.equal(layer.lora_A["default"].weight, a0)


def test_matches_peft_layer():
    import peft  # a test dependency (installed by scripts/run.sh)
    from peft.tuners.lora import Linear as PeftLinear

    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    ours = LoraLinear(base, r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True)
    theirs = PeftLinear(nn.Linear(24, 16), "default", config=cfg, r=4, lora_alpha=16, use_rslora=True)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    missing = set(theirs.state_dict()) - set(ours.state_dict())
    assert not missing, missing
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), theirs(x))


def test_compile_fullgraph():
    torch._dynamo.reset()
    layer = LoraLinear(nn.Linear(16, 8), r=4, init_lora_weights=False)
    x = torch.randn(3, 16)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_build_info():
    info = lora_ext.build_info()
    assert info["version"] == lora_ext.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["with_cuda"], bool) and info["compiler"] and "cxx_flags" in info


def test_bad_forward_input_names_the_op():
    layer = LoraLinear(nn.Linear(8, 6), r=2, init_lora_weights=False)
    with pytest.raises(
        RuntimeError,
        match=r"lora_ext::lora_linear: expected x of shape \[\.\.\., in\] with in = 8 "
        r"\(weight of shape \[6, 8\]\), got x of shape \[3, 7\]",
    ):
        layer(torch.randn(3, 7))
    with pytest.raises(
        RuntimeError,
        match=r"lora_ext::lora_linear: expected weight of dtype Double \(x's dtype\), "
        r"got Float",
    ):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(
        RuntimeError, match="lora_ext::lora_linear: expected x of dtype float32, float64, bfloat16 or float16, got Long"
    ):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"LoraLayer.add_adapter: expected an integer rank r >= 1, got 2.5"):
        layer.add_adapter("half", r=2.5)
    with pytest.raises(ValueError, match=r"LoraLayer.add_adapter: expected a number 0 <= lora_dropout < 1, got -0.1"):
        layer.add_adapter("neg", lora_dropout=-0.1)


def test_merged_state_misuse_warns_or_raises():
    layer = LoraLinear(nn.Linear(8, 6), r=2, init_lora_weights=False)
    layer.add_adapter("b", r=2, init_lora_weights=False)
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"LoraLinear.merge: unknown adapter\(s\) \['nope'\]; have \['default', 'b'\]"):
        layer.merge(["nope"])
    assert torch.equal(layer.weight, w0) and not layer.merged
    layer.merge()
    w1 = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"already merged: \['default'\]"):
        layer.merge()  # nothing is merged twice
    assert torch.equal(layer.weight, w1)
    with pytest.warns(UserWarning, match="LoRA adapters are merged; unmerging before switching adapters"):
        layer.set_adapter("b")
    assert not layer.merged and layer.active_adapter == "b"
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=1e-6)
    layer.merge(exact=True)
    with torch.no_grad():
        layer.lora_A["b"].weight.mul_(2.0)  # the adapter changes while merged: the codes no longer apply
    with pytest.warns(UserWarning, match="adapter 'b' changed while merged: unmerging it inexactly"):
        layer.unmerge()
    assert not layer.merged


def test_safe_merge_refuses_an_overflowing_merge():
    """Finite adapters whose merge would overflow the weight: only safe_merge=True checks that."""
    base = nn.Linear(4, 4)
    layer = LoraLinear(base, r=2, lora_alpha=8, init_lora_weights=False)
    with torch.no_grad():
        base.weight.fill_(3e38)
        layer.lora_A["default"].weight.fill_(1e19)
        layer.lora_B["default"].weight.fill_(1e19)  # scale * B @ A = 8e38: finite factors, infinite sum
    w0 = base.weight.detach().clone()
    with pytest.raises(
        ValueError,
        match=r"LoraLinear.merge\(safe_merge=True\): merging adapter 'default' would "
        r"produce non-finite weights; the weight was left unchanged",
    ):
        layer.merge(safe_merge=True)
    assert torch.equal(base.weight, w0) and not layer.merged
