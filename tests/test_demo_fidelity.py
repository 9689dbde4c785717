"""Regression guard: on the embedded demo model MotionClone guidance clones motion.

Five procedural reference clips (one per trajectory kind: translate, curve, zoom in, zoom out,
bounce; seeds past the training set) x two seeds. For each: extract the clip's sparse motion,
then sample a *different* subject from the same seed with and without guidance (ddim, 12 steps,
8 guided, weight 2000, cfg 7.5) and score both against the reference with the LK-track motion
fidelity (CPU proxy of the CoTracker score, motion_core/motion_fidelity.py).

Measured with the shipped weights: guided 0.554, unguided 0.479, margin +0.075 (7 of 10 runs
better, 2 slightly worse); `scripts/benchmark.py fidelity` prints the table. The test asserts
about half that margin, so a broken guidance (margin ~0) fails it.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from comfy_server import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import fidelity_eval as fe  # noqa: E402

MIN_MARGIN = 0.035


def test_guided_motion_fidelity_beats_unguided_on_synthetic_clips():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # also the fastest setting on a shared 2-core machine
    try:
        model, clip, vae = fe.load_demo_model()
        settings = fe.DemoSettings(steps=12, guided_steps=8, weight=2000.0)
        rows = [fe.evaluate_clip(model, clip, vae, name, frames, prompt, seed, settings)
                for name, frames, prompt in fe.synthetic_clips(5, 128, 8) for seed in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    guided, unguided = np.mean([r.guided for r in rows]), np.mean([r.unguided for r in rows])
    for r in rows:
        print(f"{r.name:30} seed {r.seed}: guided {r.guided:.3f} unguided {r.unguided:.3f}")
    print(f"mean guided {guided:.3f} unguided {unguided:.3f} margin {guided - unguided:+.3f}")
    assert guided - unguided >= MIN_MARGIN
    assert sum(r.guided > r.unguided for r in rows) >= 5
