"""MotionClone guidance on the embedded demo model, at the demo workflow's settings.

What is guarded: on the shipped model, guidance pulls the generated video's temporal attention
toward the reference's sparse motion (the MotionClone loss at the last guided step is well below
the loss of the unguided trajectory), on five procedural reference clips (one per trajectory kind,
seeds past the training set, picked so that LK can see their motion).

What is *not* guarded, because it does not hold: that the generated subject follows the
reference's motion. On this tiny model the temporal attention maps are close to uniform and
carry little of the motion (see demo_model/MODEL_CARD.md), so aligning them barely moves the
subject: `scripts/benchmark.py fidelity` prints LK-track motion fidelity and motion recall guided
vs unguided, and neither shows a clear margin. `scripts/benchmark.py ceiling` shows that even
attention matched almost exactly gives none; its diagnostic is tested here too.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from comfy_server import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import fidelity_eval as fe  # noqa: E402

pytestmark = pytest.mark.single_host  # the method's effect on the demo model, host-independent

DEMO_SETTINGS = fe.DemoSettings(steps=20, guided_steps=12, weight=1000.0)  # as demo_model/motionclone_demo_api.json


def _last_guided_loss(model, clip, vae, frames: np.ndarray, prompt: str, weight: float) -> float:
    import comfy.sample

    from motionclone.motion_core.extraction import extract_sparse_motion
    from motionclone.motion_core.guided_sampling import (
        GuidanceSettings,
        MotionGuidance,
        attention_layers_of,
        select_layers,
    )

    s = DEMO_SETTINGS
    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(frames).float() / 255.0)
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    layers = select_layers(attention_layers_of(model), "up_blocks.1")
    motion = extract_sparse_motion(model, latents, empty[0][0], layers, timestep=s.timestep, seed=0)
    guidance = MotionGuidance(motion, GuidanceSettings(weight, s.guided_steps, 0.4, s.warmup, s.cooldown))
    latent = torch.zeros_like(latents)
    comfy.sample.sample(guidance.patch(model), comfy.sample.prepare_noise(latent, 0), s.steps, s.cfg, s.sampler,
                        s.scheduler, positive, empty, latent, seed=0, disable_pbar=True)
    assert len(guidance.losses) == s.guided_steps
    return guidance.losses[-1][1]


def test_guidance_aligns_temporal_attention_on_the_demo_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # also the fastest setting on a shared 2-core machine
    try:
        model, clip, vae = fe.load_demo_model()
        rows = []
        for name, frames, prompt in fe.synthetic_clips(5, 128, 8):
            # A weight of 1e-4 leaves the trajectory unguided (the update is ~1e-7 of the latent)
            # but still records the loss.
            unguided = _last_guided_loss(model, clip, vae, frames, prompt, 1e-4)
            guided = _last_guided_loss(model, clip, vae, frames, prompt, DEMO_SETTINGS.weight)
            rows.append((name, guided, unguided))
            print(f"{name:30} motion loss at the last guided step: guided {guided:.3f} unguided {unguided:.3f}")
    finally:
        torch.set_num_threads(threads)
    ratio = np.mean([g for _, g, _ in rows]) / np.mean([u for _, _, u in rows])
    print(f"mean ratio guided / unguided {ratio:.2f}")
    # Measured: 0.036 vs 0.084, 0.084 vs 0.129, 0.052 vs 0.090, 0.077 vs 0.037 (zoom out), 0.064 vs 0.114;
    # ratio of the means 0.69. A guidance that does nothing gives ~1.
    assert ratio < 0.85
    assert sum(g < u for _, g, u in rows) >= 4


def test_attention_match_ceiling_drives_the_loss_down_from_comfyuis_own_sample():
    """The `ceiling` benchmark's diagnostic: its gradient iterations lower the motion loss (both figures
    at the first step here), and its unmatched run is exactly ComfyUI's ddim sample, so its margin is
    measured against the same baseline as `fidelity`."""
    import comfy.sample

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, clip, vae = fe.load_demo_model()
        name, frames, prompt = fe.synthetic_clips(1, 128, 8)[0]
        r = fe.attention_match_ceiling(model, clip, vae, name, frames, prompt, 0, iterations=5, matched_steps=1)
        empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        latent = torch.zeros(8, 4, 16, 16)
        samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 20, 7.5, "ddim", "ddim_uniform",
                                      positive, empty, latent, seed=0, disable_pbar=True)
        with torch.no_grad():
            comfy_frames = fe._to_uint8(vae.decode(samples))
    finally:
        torch.set_num_threads(threads)
    print(f"motion loss {r.loss_first:.4f} -> {r.loss_last:.4f}")
    diff = np.abs(r.frames["unguided"].astype(np.int16) - comfy_frames.astype(np.int16))
    print(f"unmatched vs ComfyUI ddim: mean abs diff {diff.mean():.3f}, max {diff.max()}")
    assert diff.mean() < 1.0 and diff.max() <= 16  # measured 0.42 / 5: batching order only
    assert np.abs(r.frames["matched"].astype(np.int16) - comfy_frames.astype(np.int16)).mean() > 2
    # Measured 0.377 -> 0.300 in 5 iterations at the first step (the benchmark's 8 x 10: 0.38 -> 0.01).
    assert r.loss_last < 0.9 * r.loss_first
