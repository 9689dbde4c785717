"""SD1.5 noise schedule and MotionClone's "uneven" timestep spacing, as ComfyUI sigmas.

Plain torch/numpy; the schedule is built with the same float64 ops as ComfyUI's ModelSamplingDiscrete
(scaled-linear betas), so our sigmas map back to the intended integer timesteps exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


class SchedulePreset(NamedTuple):
    steps: int  # N, all sampling steps
    guided_steps: int  # G, the first G steps carry motion guidance
    r: float  # guided steps span timesteps [(1 - r) * 1000, 999]


# The reference setup's defaults per task.
PRESETS: dict[str, SchedulePreset] = {
    "object_motion": SchedulePreset(300, 180, 0.4),
    "camera_motion": SchedulePreset(100, 50, 0.3),
    "image_to_video": SchedulePreset(100, 40, 0.3),
    "sketch_to_video": SchedulePreset(200, 120, 0.4),
}


def sd15_alphas_cumprod() -> torch.Tensor:
    """abar_t for t = 0..999 (float64): betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sd15_sigmas() -> torch.Tensor:
    """k-diffusion sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..999 (float64, ascending)."""
    abar = sd15_alphas_cumprod()
    return ((1 - abar) / abar) ** 0.5


def timestep_to_sigma(t: float) -> float:
    """sigma at a (possibly fractional) timestep; log-sigma interpolation like ComfyUI, clamped to [0, 999]."""
    log_sigmas = sd15_sigmas().log()
    t = min(max(float(t), 0.0), NUM_TRAIN_TIMESTEPS - 1.0)
    lo, w = int(t), t - int(t)
    hi = min(lo + 1, NUM_TRAIN_TIMESTEPS - 1)
    return float(((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp())


def sigma_to_timestep(sigma: float, *, nearest: bool = False) -> float:
    """Inverse of timestep_to_sigma (clamped to [0, 999]); nearest=True: the closest integer timestep in
    log-sigma, which is what ComfyUI's ModelSamplingDiscrete.timestep feeds the model."""
    log_sigmas = sd15_sigmas().log()
    log_sigma = torch.tensor(float(sigma), dtype=torch.float64).log()
    if nearest:
        return float((log_sigmas - log_sigma).abs().argmin())
    hi = int(torch.searchsorted(log_sigmas, log_sigma).clamp(1, NUM_TRAIN_TIMESTEPS - 1))
    lo = hi - 1
    w = float((log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo]))
    return min(max(lo + w, 0.0), NUM_TRAIN_TIMESTEPS - 1.0)


def uneven_timesteps(steps: int, guided_steps: int, r: float) -> list[int]:
    """The reference "uneven" spacing (descending integer timesteps, length `steps`).

    With b = round((1 - r) * 1000) (the reference truncates, which gives the same b for all presets but
    e.g. 199 for r = 0.8 through float error):
    guided part   = rint(linspace(b, 999, G)) reversed  -> 999 ... b
    unguided part = rint(linspace(0, b - 1, N - G)) reversed -> b-1 ... 0
    rint rounds half to even (numpy's `round`, as the reference). A single-point linspace is its start.
    """
    if not 0 < guided_steps <= steps:
        raise ValueError(f"need 0 < guided_steps <= steps, got guided_steps={guided_steps}, steps={steps}")
    if not 0 < r < 1:
        raise ValueError(f"need 0 < r < 1, got r={r}")
    b = round((1 - r) * NUM_TRAIN_TIMESTEPS)
    unguided = steps - guided_steps
    if guided_steps > NUM_TRAIN_TIMESTEPS - b:
        raise ValueError(f"{guided_steps} guided steps do not fit in the {NUM_TRAIN_TIMESTEPS - b} distinct "
                         f"timesteps of [{b}, {NUM_TRAIN_TIMESTEPS - 1}] (r={r}); use fewer guided steps or a larger r")
    if unguided > b:
        raise ValueError(f"{unguided} unguided steps do not fit in the {b} distinct timesteps of [0, {b - 1}] "
                         f"(r={r}); use fewer steps, more guided steps or a smaller r")
    guided = np.rint(np.linspace(b, NUM_TRAIN_TIMESTEPS - 1, guided_steps))[::-1]
    rest = np.rint(np.linspace(0, b - 1, unguided))[::-1] if unguided else np.empty(0)
    timesteps = [int(t) for t in np.concatenate([guided, rest])]
    # Spacing >= 1 makes rounding keep them distinct; checked anyway because the sampler relies on it.
    assert all(a > c for a, c in zip(timesteps, timesteps[1:])), timesteps
    return timesteps


def uneven_sigmas(steps: int, guided_steps: int, r: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ComfyUI SIGMAS for the uneven schedule: N descending sigmas plus a trailing 0.0 (length N + 1).

    The first `guided_steps` steps (sigmas[i] -> sigmas[i + 1], i < G) are the guided ones.
    """
    sig = sd15_sigmas()[uneven_timesteps(steps, guided_steps, r)]
    return torch.cat([sig, sig.new_zeros(1)]).to(dtype)


def guided_step_count(steps: int, guided_fraction: float) -> int:
    """round(steps * guided_fraction) (Python round: half to even) clamped to [0, steps]."""
    return min(max(round(steps * guided_fraction), 0), steps)
