"""Region masks on Wan (tiny random-weight native Wan): a MASK per video frame becomes one per latent frame
(Wan's causal VAE groups 1 + 4k frames), then a token mask by the coverage rule; the reference's region is
kept in the MOTION and its file; the loss counts only the target region's tokens (mapped onto the source
region by bounding boxes); each guided step moves the latent only inside the region (exactly zero outside);
an all-ones mask is no mask; bad masks are refused clearly."""

from __future__ import annotations

import pytest
import torch

from motionclone.motion_core.dit.amf import motion_mask
from motionclone.motion_core.dit.wan_guidance import WanGuidanceSettings, WanMotionGuidance
from motionclone.motion_core.dit.wan_region import WanRegion, latent_frame_masks, wan_token_mask
from motionclone.motion_core.dit.wan_tiny import build_tiny_wan_model
from motionclone.motion_core.region_mask import RegionMaskError
from motionclone.motion_core.windowed_motion import load_motion
from motionclone.nodes.motion_nodes import ExtractSparseMotion, MotionGuidedSampler

LATENT = (1, 16, 3, 8, 12)  # 9 video frames at 96x64 px -> token grid 3 x 4 x 6 (16 x 16 px tokens)
GRID = (3, 4, 6)


@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan_model(seed=0)


def _cond(seed: int) -> list:
    return [[torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(seed)), {}]]


def _extract(wan, mask=None):
    reference = torch.randn(*LATENT, generator=torch.Generator().manual_seed(1))
    return ExtractSparseMotion.execute(wan, timestep=400, seed=5, top_k=1, layers="auto",
                                       latent={"samples": reference}, positive=_cond(2), mask=mask).result[0]


def left(width_px: int = 48) -> torch.Tensor:
    m = torch.zeros(1, 64, 96)
    m[..., :width_px] = 1.0
    return m


def test_video_frames_group_into_latent_frames_and_tokens_by_coverage():
    mask = torch.zeros(9, 64, 96)
    for f in range(9):
        mask[f] = (f + 1) / 9.0
    grouped = latent_frame_masks(mask, (3, 8, 12))
    # latent frame 0 <- video frame 0; 1 <- frames 1..4; 2 <- frames 5..8
    assert torch.allclose(grouped[:, 0, 0], torch.tensor([1 / 9, 3.5 / 9, 7.5 / 9]))
    assert latent_frame_masks(torch.ones(1, 64, 96), (3, 8, 12)) is None  # all ones: no mask
    # Coverage: a column 24 px wide covers token column 0 (16 px) fully and half of column 1 (8 of 16 px).
    tokens = wan_token_mask(latent_frame_masks(left(24), (3, 8, 12)), GRID)
    inside = tokens.reshape(4, 6, 3)
    assert inside[:, :2].all() and not inside[:, 2:].any()
    with pytest.raises(RegionMaskError, match="covers less than half of every 4x6 token of latent frame"):
        wan_token_mask(latent_frame_masks(left(7), (3, 8, 12)), GRID)
    with pytest.raises(RegionMaskError, match="has 4 frames but the Wan video has 9"):
        latent_frame_masks(torch.ones(4, 64, 96), (3, 8, 12))


def test_the_reference_region_is_kept_in_the_motion_and_its_file(wan, tmp_path):
    plain, masked = _extract(wan), _extract(wan, left())
    assert plain.region is None
    assert torch.equal(masked.region, wan_token_mask(latent_frame_masks(left(), (3, 8, 12)), GRID))
    assert all(torch.equal(masked.flows[b], plain.flows[b]) for b in plain.blocks)  # the flow itself is unchanged
    masked.save(tmp_path / "region.motion.safetensors")
    loaded = load_motion(tmp_path / "region.motion.safetensors")
    assert torch.equal(loaded.region, masked.region)
    assert _extract(wan, torch.ones(1, 64, 96)).region is None


def test_the_loss_counts_only_the_region_and_maps_the_source_box_onto_the_target(wan):
    motion = _extract(wan, left())  # source: token columns 0-2
    right = 1.0 - left()  # target: token columns 3-5
    region = WanRegion(motion.region, latent_frame_masks(right, (3, 8, 12)), GRID, (3, 8, 12))
    block = motion.blocks[0]
    followed, counted = region.reference(motion.flows[block], motion.pairs)
    cols = torch.arange(24) % 6
    assert not counted[:, cols < 3].any()  # nothing outside the target region counts
    # Each target token follows the source token three columns to its left (same row, same frame i).
    flow = motion.flows[block]
    for p in range(len(motion.pairs)):
        for token in torch.nonzero(cols >= 3).flatten().tolist():
            assert torch.equal(followed[p, token], flow[p, token - 3])
    assert torch.equal(counted[:, cols >= 3], motion_mask(followed)[:, cols >= 3])


def test_a_guided_step_moves_the_latent_only_inside_the_region(wan):
    motion = _extract(wan)
    guidance = WanMotionGuidance(motion, WanGuidanceSettings(step_size=0.05, iterations=3), left())
    x = torch.randn(*LATENT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = guidance._optimise(wan.model, x, 0.9, _cond(3)[0][0], 0, 1, {})
    change = out - x
    assert torch.count_nonzero(change[..., 6:]) == 0  # latent columns 6-11 are the right half (48 px of 96)
    assert torch.count_nonzero(change[..., :6]) > 0
    assert len(guidance.losses) == 3


def test_an_all_ones_mask_samples_bit_identically_to_no_mask_and_a_region_run_is_guided(wan):
    motion = _extract(wan)
    args = dict(seed=7, steps=4, cfg=5.0, sampler_name="euler", scheduler="simple", positive=_cond(3),
                negative=_cond(4), guidance_weight=50000.0, guided_steps=2, noisy_fraction=0.4, warmup=0,
                cooldown=0, denoise=1.0)
    latent = {"samples": torch.zeros(*LATENT)}
    with torch.inference_mode():
        plain = MotionGuidedSampler.execute(wan, latent_image=latent, motion=motion, **args).result[0]["samples"]
        ones = MotionGuidedSampler.execute(wan, latent_image=latent, motion=motion, mask=torch.ones(9, 64, 96),
                                           **args).result[0]["samples"]
        region = MotionGuidedSampler.execute(wan, latent_image=latent, motion=motion, mask=left(),
                                             **args).result[0]["samples"]
        still = MotionGuidedSampler.execute(wan, latent_image=latent, motion=motion, mask=left(),
                                            keep_still_weight=50000.0, **args).result[0]["samples"]
    assert torch.equal(plain, ones)
    assert torch.isfinite(region).all() and not torch.equal(region, plain)
    assert torch.isfinite(still).all() and not torch.equal(still, region)
    with pytest.raises(RegionMaskError, match="keep_still_weight needs a region"):
        MotionGuidedSampler.execute(wan, latent_image=latent, motion=motion, keep_still_weight=10.0, **args)


def test_keep_still_holds_the_tokens_outside_the_region_toward_no_motion(wan):
    """From the same latent, one guided step with keep-still ends with less displacement outside the region (the
    keep-still loss) than without; its gradient also moves the latent outside the region."""
    motion = _extract(wan)
    x = torch.randn(*LATENT, generator=torch.Generator().manual_seed(3))
    context = _cond(3)[0][0]
    still = WanMotionGuidance(motion, WanGuidanceSettings(step_size=0.05, iterations=5, keep_still=4.0), left())
    free = WanMotionGuidance(motion, WanGuidanceSettings(step_size=0.05, iterations=5), left())
    cols = torch.arange(24) % 6
    entries = still.still
    assert entries[:, cols < 3].sum() == 0 and bool(entries[:, cols >= 3].any())
    assert all(not entries[p].any() for p, (i, j) in enumerate(motion.pairs) if i == j)
    with torch.no_grad():
        held, moved = (g._optimise(wan.model, x, 0.9, context, 0, 1, {}) for g in (still, free))
        before = float(still.losses_of(wan.model, x, 0.9, context)[1])
        after_held = float(still.losses_of(wan.model, held, 0.9, context)[1])
        after_free = float(still.losses_of(wan.model, moved, 0.9, context)[1])
    print(f"Wan keep-still loss outside the region: start {before:.4f}, one step with keep-still {after_held:.4f}, "
          f"without {after_free:.4f}")
    assert after_held < after_free and after_held < before
    assert torch.count_nonzero((held - x)[..., 6:]) > 0 and torch.count_nonzero((moved - x)[..., 6:]) == 0
    with pytest.raises(RegionMaskError, match="keep_still_weight needs a region"):
        WanMotionGuidance(motion, WanGuidanceSettings(keep_still=1.0))


def test_guidance_lowers_the_region_loss(wan):
    """The region's loss at the guided step's latent, before and after the optimisation (printed)."""
    motion = _extract(wan, left())
    guidance = WanMotionGuidance(motion, WanGuidanceSettings(step_size=0.05, iterations=5))
    x = torch.randn(*LATENT, generator=torch.Generator().manual_seed(3))
    context = _cond(3)[0][0]
    with torch.no_grad():
        out = guidance._optimise(wan.model, x, 0.9, context, 0, 1, {})
        after = float(guidance.motion_loss(wan.model, out, 0.9, context))
    before = guidance.losses[0][2]
    print(f"Wan region loss: {before:.4f} before, {after:.4f} after 5 Adam iterations")
    assert after < before
