"""MotionClone guidance math: the sparse temporal-attention loss, its step ramps, and the update rule.

See docs/guidance.md for the derivation of `denoised_correction_scale` (the sampler-agnostic form of
the reference code's guided DDIM step). Plain torch; no ComfyUI imports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .sparse_motion import SparseMotion


def motion_loss(probs: dict[str, torch.Tensor], motion: SparseMotion) -> torch.Tensor:
    """Sum over motion.layers of MSE(gather(P_gen, -1, idx_ref), val_ref), each MSE a mean over its entries.

    `probs[layer]` are the generated video's attention probabilities [S, heads, F, F]; S must equal the
    stored S (one video's positions, or the same fold of videos as at extraction). Differentiable in probs.
    The guidance weight (2000 in the reference) and ramp are the caller's.
    """
    total = None
    for name in motion.layers:
        if name not in probs:
            raise KeyError(f"No attention probabilities recorded for MOTION layer {name}")
        p = probs[name]
        idx, val = motion.indices[name], motion.values[name]
        expected = (*idx.shape[:3], motion.frames)
        if tuple(p.shape) != expected:
            raise ValueError(f"Layer {name}: generated attention has shape {tuple(p.shape)} but the MOTION "
                             f"expects [S, heads, F, F] = {list(expected)} (batched videos must be guided one "
                             "MOTION slice at a time)")
        picked = torch.gather(p, dim=-1, index=idx.to(device=p.device, dtype=torch.long))
        layer_loss = F.mse_loss(picked, val.to(device=p.device, dtype=p.dtype))
        total = layer_loss if total is None else total + layer_loss
    if total is None:
        raise ValueError("MOTION has no layers")
    return total


def ramp_scale(i: int, guided_steps: int, warmup: int = 10, cooldown: int = 10) -> float:
    """Loss scale at guided step i (0-based) of G: (i+1)/warmup early, (G-i)/cooldown late, min of both.

    warmup/cooldown 0 disables that ramp. (The reference multiplies the two when they overlap, i.e. when
    G < warmup + cooldown; we take the min so a short schedule is not damped twice.)
    """
    if not 0 <= i < guided_steps:
        raise ValueError(f"guided step index {i} outside [0, {guided_steps})")
    if warmup < 0 or cooldown < 0:
        raise ValueError("warmup and cooldown must be >= 0")
    scale = 1.0
    if warmup and i < warmup:
        scale = min(scale, (i + 1) / warmup)
    if cooldown and i >= guided_steps - cooldown:
        scale = min(scale, (guided_steps - i) / cooldown)
    return scale


def denoised_correction_scale(sigma: float, sigma_next: float) -> float:
    """lambda such that denoised' = denoised - lambda * g reproduces the reference guided DDIM step.

    g = dL/dz_t is the loss gradient w.r.t. the model input z_t = x / sqrt(1 + sigma^2) (k-diffusion x).
    lambda = sigma * sigma_next / (sigma - sigma_next) * sqrt(1 - abar_t), abar_t = 1 / (1 + sigma^2);
    0 for the final step to sigma_next = 0 (as in the reference, whose step to abar = 1 drops the term).
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma_next < 0 or sigma_next >= sigma:
        raise ValueError(f"need 0 <= sigma_next < sigma, got sigma={sigma}, sigma_next={sigma_next}")
    if sigma_next == 0:
        return 0.0
    sqrt_one_minus_abar = sigma / math.sqrt(1.0 + sigma * sigma)  # sqrt(1 - 1/(1+s^2)), stable form
    return sigma * sigma_next / (sigma - sigma_next) * sqrt_one_minus_abar


def ddim_reference_step(
    z_t: torch.Tensor,
    eps: torch.Tensor,
    grad: torch.Tensor | None,
    abar_t: float | torch.Tensor,
    abar_prev: float | torch.Tensor,
) -> torch.Tensor:
    """The reference code's guided DDIM (eta 0) step in z-space (model-input scale).

    x0_hat uses the unguided (CFG-combined) eps; only the direction term uses eps' = eps - sqrt(1-abar_t) g.
    """
    abar_t = torch.as_tensor(abar_t, dtype=z_t.dtype, device=z_t.device)
    abar_prev = torch.as_tensor(abar_prev, dtype=z_t.dtype, device=z_t.device)
    x0_hat = (z_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    eps_guided = eps if grad is None else eps - (1 - abar_t).sqrt() * grad
    return abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps_guided
