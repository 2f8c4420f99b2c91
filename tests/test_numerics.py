"""The AdamW-aware tolerance of ``numerics.py`` (issue 31): it accepts a reduction in another order and
still catches a missing all-reduce, in one process, the way DDP splits a batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoraConfig
from numerics import GradRecorder, adamw_drift_bound, assert_close_after_adamw

pytestmark = pytest.mark.numerics  # scripts/isa_matrix.sh runs these under other instruction sets

SGD_STEPS, ADAMW_STEPS, LR = 3, 3, 1e-2


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 8))
    return lora_ext.inject_adapter(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
    ).train()


def _train(halves: str, recorder: GradRecorder | None = None):
    """3 SGD + 3 AdamW steps on 16 rows: the whole batch at once ("whole"), the mean of two half-batch
    gradients ("split", DDP's sum in another order), or the first half's only ("missing all-reduce")."""
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    opt = None
    for step in range(SGD_STEPS + ADAMW_STEPS):
        x, y = torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)
        if step == 0:
            opt = torch.optim.SGD(params, lr=0.1)
        elif step == SGD_STEPS:
            opt = torch.optim.AdamW(params, lr=LR)
        opt.zero_grad()
        if halves == "whole":
            nn.functional.mse_loss(model(x), y).backward()
        else:
            parts = (slice(0, 8), slice(8, 16)) if halves == "split" else (slice(0, 8),)
            for rows in parts:
                (nn.functional.mse_loss(model(x[rows]), y[rows]) / len(parts)).backward()
        if recorder is not None and step >= SGD_STEPS:
            recorder.record(model)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_reduction_in_another_order_passes_and_a_missing_all_reduce_fails():
    rec = GradRecorder()
    want = _train("whole", rec)
    split, missing = _train("split"), _train("missing all-reduce")
    assert rec.grads.keys() == want.keys() and all(len(g) == ADAMW_STEPS for g in rec.grads.values())
    for name in want:
        assert_close_after_adamw(split[name], want[name], rec.grads[name], LR, name)
    failures = 0
    for name in want:
        try:
            assert_close_after_adamw(missing[name], want[name], rec.grads[name], LR, name)
        except AssertionError as e:
            assert "elements beyond rtol" in str(e)
            failures += 1
    assert failures == len(want), f"a missing all-reduce passed for {len(want) - failures} of {len(want)} tensors"


def test_the_bound_is_tight_for_healthy_gradients_and_about_lr_for_gradients_within_the_noise():
    healthy = [torch.full((3,), 0.5), torch.full((3,), -0.4), torch.full((3,), 0.3)]
    b = adamw_drift_bound(healthy, lr=1e-2)
    assert float(b.max()) < 1e-2 * 1e-3  # a thousandth of lr over three steps
    noisy = [torch.tensor([1.0, 1e-9]), torch.tensor([1.0, -1e-9])]  # element 1 sits in element 0's noise
    b = adamw_drift_bound(noisy, lr=1e-2)
    assert float(b[0]) < 1e-6 and 1e-2 <= float(b[1]) <= 2 * 1e-2 * 2 * 2
    assert torch.equal(adamw_drift_bound([torch.zeros(4)] * 3, lr=1e-2), torch.zeros(4, dtype=torch.float64))


def test_the_message_names_the_element_and_the_allowance():
    want = torch.tensor([1.0, 2.0])
    with pytest.raises(AssertionError, match=r"w: 1 of 2 elements .* flat index 1: got 2\.0099.*, want 2,"):
        assert_close_after_adamw(torch.tensor([1.0, 2.01]), want, [torch.tensor([0.5, 0.5])], 1e-3, "w")
