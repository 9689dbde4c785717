"""Wan phase 2a: the reference motion of a Wan video as a MOTION (extraction node, file, family errors).

On a tiny random-weight native ComfyUI Wan MODEL (`comfy.model_base.WAN21`, WAN21_T2V config): Extract
Sparse Motion dispatches on the model, records the argmax attention motion flow streamed per frame pair,
and the result equals the AMF computed by hand from the same model's q, k on the same noised latent;
Save/Load Motion keep it; a MOTION of one family is refused by the other's model with a clear error.
"""

from __future__ import annotations

import pytest
import torch

from motionclone.motion_core.dit import amf
from motionclone.motion_core.dit.wan_capture import capture_qk
from motionclone.motion_core.dit.wan_motion import (
    WanMotion,
    default_block,
    latent_frames_of_video,
    parse_blocks,
)
from motionclone.motion_core.dit.wan_tiny import build_tiny_wan_model
from motionclone.motion_core.sparse_motion import MotionMismatchError, SparseMotion
from motionclone.motion_core.windowed_motion import load_motion
from motionclone.nodes.motion_nodes import ExtractSparseMotion, MotionGuidedSampler

LATENT = (1, 16, 3, 8, 12)  # 9 video frames at 96x64 px -> token grid 3 x 4 x 6


@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan_model(seed=0)


def _reference(seed: int = 1) -> torch.Tensor:
    return torch.randn(*LATENT, generator=torch.Generator().manual_seed(seed))


def _context() -> list:
    return [[torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2)), {}]]


def _extract(wan, **kw):
    args = dict(timestep=400, seed=5, top_k=1, layers="up_blocks.1", latent={"samples": _reference()},
                positive=_context())
    return ExtractSparseMotion.execute(wan, **{**args, **kw}).result[0]


def test_extraction_equals_the_amf_of_the_models_own_qk_on_the_noised_reference(wan):
    motion = _extract(wan)
    assert isinstance(motion, WanMotion) and motion.blocks == [default_block(4)] == [2]
    assert motion.grid == (3, 4, 6) and motion.latent_shape == (3, 8, 12) and len(motion.pairs) == 9
    # By hand: the latent format, CONST noising sigma * eps + (1 - sigma) * x0 at sigma = 400 / 1000 with the
    # seed's noise, model timestep 1000 * sigma, q/k of block 2, the argmax AMF over all pairs.
    import comfy.sample

    base = wan.model
    x0 = base.process_latent_in(_reference())
    x = 0.4 * comfy.sample.prepare_noise(_reference(), 5) + 0.6 * x0
    with torch.no_grad():
        state = capture_qk(base.diffusion_model, x, torch.tensor([400.0]), _context()[0][0], 2, differentiable=False)
    expected = amf.argmax_amf(state.q, state.k, (3, 4, 6))[0]
    assert torch.equal(motion.flows[2], expected)
    assert motion.flows[2].abs().sum() > 0  # random weights still give non-trivial displacements
    assert motion.nbytes() == 9 * 24 * 2 * 2


def test_blocks_and_pair_span_are_chosen_by_the_user(wan):
    motion = _extract(wan, layers="blocks.1, 3")
    assert motion.blocks == [1, 3]
    assert parse_blocks("auto", 30) == [14] and parse_blocks("14", 30) == [14] and parse_blocks("", 40) == [14]
    with pytest.raises(ValueError, match="blocks 0..3, not 7"):
        _extract(wan, layers="7")
    with pytest.raises(ValueError, match="transformer blocks"):
        _extract(wan, layers="down_blocks.1")
    # frame_pairs k: FastVMT's forward pairs (each latent frame with the next k - 1), the same displacements as
    # those pairs' in the all-pairs motion.
    every, forward = _extract(wan), _extract(wan, frame_pairs=2)
    assert forward.pairs == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)] and len(every.pairs) == 9
    rows = [every.pairs.index(pair) for pair in forward.pairs]
    assert torch.equal(forward.flows[2], every.flows[2][rows])
    latent = {"samples": torch.zeros(*LATENT)}
    out = MotionGuidedSampler.execute(wan, 7, 3, 5.0, "euler", "simple", _context(), _context(), latent, 1.0,
                                      forward, 50000.0, 1, 0.2, 0, 0)
    assert len(out.ui["motion_loss"]) == 1 and out.ui["motion_loss"][0]["loss"] > 0
    from motionclone.motion_core.tiny_models import build_tiny_sd15_model

    with pytest.raises(ValueError, match="frame_pairs applies to Wan models"):
        ExtractSparseMotion.execute(build_tiny_sd15_model(seed=0), timestep=400, seed=5, top_k=1, layers="up_blocks.1",
                                    latent={"samples": torch.zeros(4, 4, 8, 8)}, positive=_context(), frame_pairs=4)


def test_save_and_load_keep_the_wan_motion(wan, tmp_path):
    motion = _extract(wan)
    path = tmp_path / "wan.motion.safetensors"
    motion.save(path)
    loaded = load_motion(path)
    assert isinstance(loaded, WanMotion)
    assert loaded.blocks == motion.blocks and loaded.pairs == motion.pairs and loaded.grid == motion.grid
    assert loaded.latent_shape == motion.latent_shape and loaded.sigma == motion.sigma
    assert loaded.model_fingerprint == motion.model_fingerprint == "wan2.1:dim48:heads3:blocks4"
    assert all(torch.equal(loaded.flows[b], motion.flows[b]) for b in motion.blocks)


def test_a_motion_of_one_family_is_refused_by_the_other(wan):
    from motionclone.motion_core.tiny_models import build_tiny_sd15_model

    wan_motion = _extract(wan)
    sd_motion = SparseMotion.from_probs({"up_blocks.1.attentions.0.transformer_blocks.0": torch.softmax(
        torch.randn(16, 2, 4, 4), -1)}, frames=4, latent_height=16, latent_width=16, timestep=400, top_k=1)
    args = dict(seed=0, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", positive=_context(),
                negative=_context(), guidance_weight=2000.0, guided_steps=0, noisy_fraction=0.4, warmup=0,
                cooldown=0, denoise=1.0)
    with pytest.raises(ValueError, match="extracted from an SD1.5 / AnimateDiff model; it cannot guide a Wan"):
        MotionGuidedSampler.execute(wan, latent_image={"samples": torch.zeros(*LATENT)}, motion=sd_motion, **args)
    with pytest.raises(ValueError, match="extracted from a Wan model"):
        MotionGuidedSampler.execute(build_tiny_sd15_model(0), latent_image={"samples": torch.zeros(4, 4, 16, 16)},
                                    motion=wan_motion, **args)
    with pytest.raises(MotionMismatchError, match="9-frame 64x96 Wan video"):
        MotionGuidedSampler.execute(wan, latent_image={"samples": torch.zeros(1, 16, 5, 8, 12)}, motion=wan_motion,
                                    **args)


def test_bad_wan_references_are_refused_clearly(wan):
    assert latent_frames_of_video(81) == 21 and latent_frames_of_video(17) == 5
    with pytest.raises(ValueError, match="4k \\+ 1 frames.*has 16: trim it to 13 or extend it to 17"):
        latent_frames_of_video(16)

    class NoVae:
        def encode(self, images):
            raise AssertionError("the frame count is checked before encoding")

    with pytest.raises(ValueError, match="has 16"):
        _extract(wan, latent=None, images=torch.rand(16, 64, 96, 3), vae=NoVae())

    class ImageVae:
        def encode(self, images):
            return torch.zeros(images.shape[0], 4, 8, 12)

    with pytest.raises(ValueError, match="video latent .* image VAE"):
        _extract(wan, latent=None, images=torch.rand(17, 64, 96, 3), vae=ImageVae())
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        _extract(wan, latent={"samples": torch.zeros(1, 16, 1, 8, 12)})
    with pytest.raises(ValueError, match="image_condition is not supported on Wan"):
        _extract(wan, image_condition=[[torch.zeros(1, 7, 32), {}]])
    with pytest.raises(ValueError, match="the reference mask has 4 frames but the Wan video has 9 \\(3 latent"):
        _extract(wan, mask=torch.ones(4, 64, 96))
    motion = _extract(wan)
    with pytest.raises(MotionMismatchError, match="9-frame 64x96 Wan video"):
        motion.check_compatible((1, 16, 5, 8, 12))
