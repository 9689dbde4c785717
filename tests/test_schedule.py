"""SD1.5 schedule and the uneven MotionClone timestep spacing."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from motionclone.motion_core.schedule import (
    PRESETS,
    guided_step_count,
    sd15_alphas_cumprod,
    sd15_sigmas,
    sigma_to_timestep,
    timestep_to_sigma,
    uneven_sigmas,
    uneven_timesteps,
)


def test_alphas_cumprod_matches_diffusers_scaled_linear():
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    ours = sd15_alphas_cumprod()
    assert ours.shape == (1000,) and ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), sched.alphas_cumprod.float(), rtol=1e-6, atol=0)


def test_sigmas_match_comfy_model_sampling():
    from comfy.model_sampling import ModelSamplingDiscrete

    ms = ModelSamplingDiscrete()  # defaults are SD1.5's
    assert torch.equal(sd15_sigmas().float(), ms.sigmas)


def test_timestep_sigma_conversions():
    sig = sd15_sigmas()
    for t in (0, 1, 400, 999):
        assert math.isclose(timestep_to_sigma(t), float(sig[t]), rel_tol=1e-12)
        assert math.isclose(sigma_to_timestep(float(sig[t])), t, abs_tol=1e-9)
        assert sigma_to_timestep(float(sig[t]) * 1.001, nearest=True) == t
    assert math.isclose(sigma_to_timestep(timestep_to_sigma(400.25)), 400.25, abs_tol=1e-9)
    assert timestep_to_sigma(400) < timestep_to_sigma(400.5) < timestep_to_sigma(401)
    assert sigma_to_timestep(1e-6) == 0.0 and sigma_to_timestep(1e6) == 999.0


@pytest.mark.parametrize("name", list(PRESETS))
def test_uneven_timesteps_presets(name):
    n, g, r = PRESETS[name]
    ts = uneven_timesteps(n, g, r)
    b = round((1 - r) * 1000)
    assert len(ts) == n
    assert all(a > c for a, c in zip(ts, ts[1:]))  # strictly descending, hence distinct
    guided, rest = ts[:g], ts[g:]
    assert guided[0] == 999 and guided[-1] == b
    assert rest[0] == b - 1 and rest[-1] == 0
    # Evenly spread: consecutive gaps differ by at most one after rounding.
    gaps = [a - c for a, c in zip(guided, guided[1:])]
    assert max(gaps) - min(gaps) <= 1


def test_uneven_timesteps_reference_values():
    # numpy's linspace(600, 999, 180).round() / linspace(0, 599, 120).round() reversed, as the reference.
    ts = uneven_timesteps(300, 180, 0.4)
    assert ts[:4] == [999, 997, 995, 992] and ts[179] == 600
    assert ts[180:183] == [599, 594, 589] and ts[-2:] == [5, 0]


def test_uneven_timesteps_validation():
    assert uneven_timesteps(5, 5, 0.3)[-1] == 700  # all guided: no unguided tail
    assert uneven_timesteps(2, 1, 0.3) == [700, 0]  # single-point linspace is its start
    with pytest.raises(ValueError, match="guided_steps"):
        uneven_timesteps(10, 0, 0.3)
    with pytest.raises(ValueError, match="guided_steps"):
        uneven_timesteps(10, 11, 0.3)
    with pytest.raises(ValueError, match="r="):
        uneven_timesteps(10, 5, 1.0)
    with pytest.raises(ValueError, match=r"301 guided steps do not fit in the 300 distinct timesteps of \[700, 999\]"):
        uneven_timesteps(400, 301, 0.3)
    with pytest.raises(ValueError, match=r"701 unguided steps do not fit in the 700 distinct timesteps of \[0, 699\]"):
        uneven_timesteps(751, 50, 0.3)
    assert len(set(uneven_timesteps(1000, 300, 0.3))) == 1000  # exactly full ranges stay distinct


def test_uneven_sigmas():
    n, g, r = PRESETS["camera_motion"]
    sig = uneven_sigmas(n, g, r)
    ts = uneven_timesteps(n, g, r)
    assert sig.shape == (n + 1,) and sig.dtype == torch.float32
    assert float(sig[-1]) == 0.0 and bool((sig[:-1] > sig[1:]).all())
    assert math.isclose(float(sig[0]), timestep_to_sigma(999), rel_tol=1e-6)
    assert math.isclose(float(sig[g - 1]), timestep_to_sigma(700), rel_tol=1e-6)
    # ComfyUI's model sampling turns each sigma back into exactly the intended integer timestep.
    from comfy.model_sampling import ModelSamplingDiscrete

    assert ModelSamplingDiscrete().timestep(sig[:-1]).tolist() == ts


def test_guided_step_count():
    assert guided_step_count(100, 0.5) == 50
    assert guided_step_count(300, 0.6) == 180
    assert guided_step_count(10, 0.25) == 2  # half to even
    assert guided_step_count(10, -1.0) == 0 and guided_step_count(10, 2.0) == 10
