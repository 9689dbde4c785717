"""Guidance math: loss/gradient vs an explicit-loop implementation, ramps, and the DDIM <-> Euler equivalence."""

from __future__ import annotations

import math

import pytest
import torch

from motionclone.motion_core.guidance import (
    ddim_reference_step,
    denoised_correction_scale,
    motion_loss,
    ramp_scale,
)
from motionclone.motion_core.schedule import sd15_alphas_cumprod, timestep_to_sigma
from motionclone.motion_core.sparse_motion import SparseMotion

S, HEADS, FRAMES, CHANNELS, HEAD_DIM = 3, 2, 4, 5, 3
LAYERS = ["up_blocks.1.motion_modules.0.transformer_blocks.0.attn1",
          "up_blocks.1.motion_modules.1.transformer_blocks.0.attn1"]


def make_projections(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(CHANNELS, HEADS * HEAD_DIM, generator=g, dtype=torch.float64),
                   torch.randn(CHANNELS, HEADS * HEAD_DIM, generator=g, dtype=torch.float64))
            for name in LAYERS}


def tiny_temporal_attention(x: torch.Tensor, proj) -> dict[str, torch.Tensor]:
    """x [S, F, C] -> per layer softmax(Q K^T / sqrt(d)) as [S, heads, F, F]."""
    out = {}
    for name, (wq, wk) in proj.items():
        q = (x @ wq).view(S, FRAMES, HEADS, HEAD_DIM).transpose(1, 2)
        k = (x @ wk).view(S, FRAMES, HEADS, HEAD_DIM).transpose(1, 2)
        out[name] = (q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)).softmax(-1)
    return out


def loop_loss(x: torch.Tensor, proj, motion: SparseMotion, weight: float, ramp: float) -> torch.Tensor:
    """Independent implementation: explicit loops, per-row softmax, per-entry squared error."""
    total = torch.zeros((), dtype=torch.float64)
    for name in motion.layers:
        wq, wk = proj[name]
        sq_sum, count = torch.zeros((), dtype=torch.float64), 0
        for s in range(S):
            for h in range(HEADS):
                cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                for f in range(FRAMES):
                    q = x[s, f] @ wq[:, cols]
                    scores = [torch.dot(q, x[s, j] @ wk[:, cols]) / math.sqrt(HEAD_DIM) for j in range(FRAMES)]
                    denom = sum(torch.exp(sc) for sc in scores)
                    for kk in range(motion.top_k):
                        j = int(motion.indices[name][s, h, f, kk])
                        ref = float(motion.values[name][s, h, f, kk])
                        sq_sum = sq_sum + (torch.exp(scores[j]) / denom - ref) ** 2
                        count += 1
        total = total + sq_sum / count
    return weight * ramp * total


@pytest.mark.parametrize("top_k", [1, 2])
def test_loss_and_gradient_match_loop_implementation(top_k):
    proj = make_projections(seed=0)
    g = torch.Generator().manual_seed(1)
    x_ref = torch.randn(S, FRAMES, CHANNELS, generator=g, dtype=torch.float64)
    x_gen = torch.randn(S, FRAMES, CHANNELS, generator=g, dtype=torch.float64)
    motion = SparseMotion.from_probs(tiny_temporal_attention(x_ref, proj), top_k=top_k, frames=FRAMES,
                                     latent_height=1, latent_width=S, timestep=400, model_fingerprint="t")
    weight, guided_steps, step = 2000.0, 12, 1
    ramp = ramp_scale(step, guided_steps, warmup=4, cooldown=4)
    assert ramp == 0.5

    xa = x_gen.clone().requires_grad_(True)
    ours = weight * ramp * motion_loss(tiny_temporal_attention(xa, proj), motion)
    (grad_ours,) = torch.autograd.grad(ours, xa)

    xb = x_gen.clone().requires_grad_(True)
    theirs = loop_loss(xb, proj, motion, weight, ramp)
    (grad_theirs,) = torch.autograd.grad(theirs, xb)

    assert ours.dtype == torch.float64 and float(ours.detach()) > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-12)
    assert grad_ours.abs().max() > 0


def test_loss_gradient_matches_finite_differences():
    proj = make_projections(seed=2)
    g = torch.Generator().manual_seed(3)
    motion = SparseMotion.from_probs(
        tiny_temporal_attention(torch.randn(S, FRAMES, CHANNELS, generator=g, dtype=torch.float64), proj),
        frames=FRAMES, latent_height=1, latent_width=S, timestep=400, model_fingerprint="t")
    x = torch.randn(S, FRAMES, CHANNELS, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: motion_loss(tiny_temporal_attention(t, proj), motion), (x,))


def test_loss_is_zero_on_reference_and_checks_shapes():
    proj = make_projections(seed=0)
    x = torch.randn(S, FRAMES, CHANNELS, dtype=torch.float64)
    probs = tiny_temporal_attention(x, proj)
    motion = SparseMotion.from_probs(probs, frames=FRAMES, latent_height=1, latent_width=S, timestep=400,
                                     model_fingerprint="t")
    # Only the fp16 rounding of the stored values remains.
    assert float(motion_loss(probs, motion)) < 1e-7
    folded = {name: torch.cat([p, p]) for name, p in probs.items()}  # two videos folded into S
    with pytest.raises(ValueError, match=r"shape \(6, 2, 4, 4\) but the MOTION expects"):
        motion_loss(folded, motion)
    with pytest.raises(KeyError, match=LAYERS[1]):
        motion_loss({LAYERS[0]: probs[LAYERS[0]]}, motion)


def test_ramp_scale():
    g = 30
    assert [ramp_scale(i, g) for i in range(3)] == [0.1, 0.2, 0.3]
    assert ramp_scale(9, g) == 1.0 and ramp_scale(10, g) == 1.0 and ramp_scale(20, g) == 1.0
    assert [ramp_scale(i, g) for i in (21, 28, 29)] == [0.9, 0.2, 0.1]
    assert ramp_scale(5, 12) == min(6 / 10, 7 / 10)  # both ramps apply: min
    assert ramp_scale(0, 5, warmup=0, cooldown=0) == 1.0
    assert ramp_scale(4, 5, warmup=0, cooldown=2) == 0.5
    assert ramp_scale(0, 5, warmup=2, cooldown=0) == 0.5
    with pytest.raises(ValueError):
        ramp_scale(30, 30)


def euler_step(x, denoised, sigma, sigma_next):
    return x + (sigma_next - sigma) * (x - denoised) / sigma


@pytest.mark.parametrize(("t", "t_prev"), [(999, 993), (700, 650), (420, 0), (12, 0)])
def test_euler_with_corrected_denoised_equals_reference_ddim(t, t_prev):
    abar = sd15_alphas_cumprod()
    gen = torch.Generator().manual_seed(t)
    z_t, eps, grad = (torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    grad = grad * 50  # a sizeable guidance gradient

    sigma, sigma_next = timestep_to_sigma(t), timestep_to_sigma(t_prev)
    abar_t, abar_prev = float(abar[t]), float(abar[t_prev])
    assert math.isclose(abar_t, 1 / (1 + sigma**2), rel_tol=1e-12)

    z_prev = ddim_reference_step(z_t, eps, grad, abar_t, abar_prev)
    x_prev_ref = z_prev / math.sqrt(abar_prev)

    x = z_t / math.sqrt(abar_t)  # k-diffusion x-space
    denoised = x - sigma * eps
    lam = denoised_correction_scale(sigma, sigma_next)
    x_next = euler_step(x, denoised - lam * grad, sigma, sigma_next)
    torch.testing.assert_close(x_next, x_prev_ref, rtol=1e-12, atol=1e-12)

    # DPM-Solver++ first-order step (dpmpp_2m's first step) is the same update.
    x_dpm = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * (denoised - lam * grad)
    torch.testing.assert_close(x_dpm, x_prev_ref, rtol=1e-12, atol=1e-12)

    # The guidance really moves the sample (and only through lambda) unless the target is sigma 0.
    unguided = euler_step(x, denoised, sigma, sigma_next)
    assert (lam > 0) == (not torch.allclose(unguided, x_next))


def test_correction_scale_final_step_and_errors():
    assert denoised_correction_scale(0.03, 0.0) == 0.0
    with pytest.raises(ValueError):
        denoised_correction_scale(1.0, 1.0)
    with pytest.raises(ValueError):
        denoised_correction_scale(1.0, 2.0)
    s, sn = 10.0, 8.0
    assert math.isclose(denoised_correction_scale(s, sn), s * sn / (s - sn) * math.sqrt(1 - 1 / (1 + s * s)))
