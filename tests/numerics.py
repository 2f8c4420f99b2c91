"""Tolerances for comparing two runs that sum in different orders (issue 31).

Two trainings of the same model that split or shard a reduction differently (DDP, FSDP2, tensor
parallel, ...) get gradients that differ by rounding: a few ulp of the gradient tensor's scale, and which
few depends on the GEMM kernels the CPU gets (AVX2 or AVX-512 MKL, ATen's vector paths). SGD passes that
difference on linearly (lr * |delta g|), so after SGD steps a tight ``rtol 1e-5 / atol 1e-6`` holds on any
CPU. AdamW does not: its update ``u = m_hat / (sqrt(v_hat) + eps)`` divides by the gradient's own RMS, so
an element whose gradient is near zero (within the rounding noise of its tensor) can move by up to ~lr in
one run and not the other. ``assert_close_after_adamw`` allows exactly that, element by element, from the
reference's recorded gradients, and stays tight everywhere else.

The bound. ``m_hat_t`` is a weighted mean and ``sqrt(v_hat_t)`` a weighted RMS of g_1..g_t (weights
summing to 1), so both move by at most ``N_t = max_{s<=t} |delta g_s|`` when the gradients move by
``delta g_s``; with ``|delta g_s| <= NOISE * max|g_s|`` (the rounding noise of the tensor's reduction,
taken 100x fp32's epsilon: measured differences are ~1e-7 of the scale):

    |delta u_t| <= (1 + U_t) * N_t / (sqrt(v_hat_t) - N_t),   capped at 2 U_t,

where ``U_t = 1 / sqrt(min_s w_s)`` bounds ``|u_t| = |m_hat_t| / sqrt(v_hat_t)`` (``w_s`` are v_hat's
weights; U_t ~ sqrt(t)). A parameter then drifts by at most ``sum_t lr * |delta u_t|`` over the AdamW
steps (weight decay multiplies drift by 1 - lr*wd < 1, which only shrinks it). An element with a healthy
gradient gets a bound of ~lr * 1e-5 on top of the tight tolerance; only elements whose gradient sat within
the noise get up to ~2 lr per step. A missing all-reduce or a wrong shard changes gradients by O(|g|), far
beyond the noise, and fails (``tests/test_numerics.py`` shows both).
"""

from __future__ import annotations

import math

import torch

NOISE = 1e-5  # rounding noise of a gradient reduction, relative to the tensor's largest |g|
RTOL, ATOL = 1e-5, 1e-6  # what SGD steps keep on any CPU


def adamw_drift_bound(grads: list[torch.Tensor], lr: float, betas=(0.9, 0.999), noise: float = NOISE) -> torch.Tensor:
    """Per-element bound on |p_a - p_b| after AdamW steps with gradients ``grads`` (one tensor per step, the
    reference's) when the other run's gradients differ by rounding only."""
    _, b2 = betas
    bound = torch.zeros_like(grads[0], dtype=torch.float64)
    v = torch.zeros_like(bound)
    n_max = 0.0
    for t, g in enumerate(grads, start=1):
        g = g.detach().to(torch.float64)
        v = b2 * v + (1 - b2) * g * g
        rms = (v / (1 - b2**t)).sqrt()
        n_max = max(n_max, noise * g.abs().max().item())
        w_min = (1 - b2) * b2 ** (t - 1) / (1 - b2**t)  # the oldest gradient's weight in v_hat
        u_cap = 1 / math.sqrt(w_min)
        slack = (rms - n_max).clamp_min(0)
        du = torch.where(slack > 0, (1 + u_cap) * n_max / slack.clamp_min(1e-300), torch.full_like(rms, 2 * u_cap))
        if n_max == 0:  # no gradient anywhere in the tensor so far: no update in either run
            du = torch.zeros_like(du)
        bound += lr * du.clamp_max(2 * u_cap)
    return bound


def assert_close_after_adamw(
    got: torch.Tensor,
    want: torch.Tensor,
    grads: list[torch.Tensor],
    lr: float,
    what: str = "",
    rtol: float = RTOL,
    atol: float = ATOL,
) -> None:
    """``|got - want| <= atol + rtol |want| + adamw_drift_bound(grads, lr)`` element by element."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    diff = (got.double() - want.double()).abs()
    drift = adamw_drift_bound(grads, lr) if grads else torch.zeros_like(diff)
    tol = atol + rtol * want.double().abs() + drift
    bad = diff > tol
    if bool(bad.any()):
        i = int((diff - tol).flatten().argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {diff.numel()} elements beyond rtol {rtol} / atol {atol} + AdamW's rounding "
            f"drift; worst at flat index {i}: got {got.flatten()[i].item():.9g}, want {want.flatten()[i].item():.9g}, "
            f"|diff| {diff.flatten()[i].item():.3g} > allowed {tol.flatten()[i].item():.3g} "
            f"(of which AdamW drift {drift.flatten()[i].item():.3g}; lr {lr})"
        )


class GradRecorder:
    """The reference's gradients at its AdamW steps, by parameter name: ``record(model)`` after each backward."""

    def __init__(self):
        self.grads: dict[str, list[torch.Tensor]] = {}

    def record(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if p.requires_grad and p.grad is not None:
                self.grads.setdefault(name, []).append(p.grad.detach().clone())
