"""Region masks: which motion is cloned (a mask at extraction) and where (a mask at sampling), the coverage rule
on each layer's token grid, bounding-box alignment between regions, keep-still, the file format, bad masks."""

from __future__ import annotations

import pytest
import torch

from motionclone.motion_core.extraction import extract_sparse_motion
from motionclone.motion_core.guidance import motion_loss
from motionclone.motion_core.guided_sampling import GuidanceSettings, MotionGuidance, attention_layers_of, select_layers
from motionclone.motion_core.injection import apply_motion_modules, install_processors
from motionclone.motion_core.motion_module import load_motion_adapter
from motionclone.motion_core.region_mask import (
    RegionGuide,
    RegionMaskError,
    keep_still_loss,
    latent_region,
    masked_motion_loss,
    normalize_mask,
    source_positions,
    token_mask,
)
from motionclone.motion_core.sparse_motion import SparseMotion
from motionclone.motion_core.tiny_models import build_tiny_sd15_model, write_tiny_motion_module

SIZE = 16  # latent side
LAYER = "up_blocks.1.attentions.0.transformer_blocks.0"


def random_motion(frames: int = 4, grid: int = 4, heads: int = 2, seed: int = 0, masks=None) -> SparseMotion:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(grid * grid, heads, frames, frames, generator=g), -1)
    return SparseMotion.from_probs({LAYER: probs}, frames=frames, latent_height=grid * 4, latent_width=grid * 4,
                                   timestep=400, top_k=2, masks=None if masks is None else {LAYER: masks})


def half(frames: int, height: int, width: int, left: bool = True) -> torch.Tensor:
    m = torch.zeros(frames, height, width)
    if left:
        m[:, :, : width // 2] = 1.0
    else:
        m[:, :, width // 2:] = 1.0
    return m


def test_coverage_rule_on_a_hand_computed_case():
    # 16 x 16 px onto a 4 x 4 grid: each token stands for a 4 x 4 block of pixels.
    mask = torch.zeros(1, 16, 16)
    mask[0, 0:4, 0:2] = 1.0  # token (0, 0): half of its block -> inside (>= 0.5)
    mask[0, 0:4, 4:5] = 1.0  # token (0, 1): a quarter -> outside
    mask[0, 4:8, 8:12] = 0.6  # token (1, 2): soft, mean 0.6 -> inside
    mask[0, 12:16, 12:16] = 0.4  # token (3, 3): soft, mean 0.4 -> outside
    inside = token_mask(mask, (4, 4))
    assert inside.shape == (16, 1)
    assert sorted(torch.nonzero(inside[:, 0]).flatten().tolist()) == [0 * 4 + 0, 1 * 4 + 2]
    # A grid that does not divide the mask (the UNet rounds up): 10 px onto 3 cells of 4 px, the last padded.
    mask = torch.zeros(1, 10, 10)
    mask[0, 8:10, 8:10] = 1.0  # the last cell holds 2 x 2 real pixels, padded by replicating them
    assert token_mask(mask, (3, 3))[:, 0].tolist() == [False] * 8 + [True]


def test_positions_outside_the_region_contribute_nothing_to_loss_or_gradient():
    frames = 4
    motion = random_motion(frames)
    target = half(frames, 64, 64)  # pixel size of a 16 x 16 latent
    guide = RegionGuide(motion, normalize_mask(target, frames, 16, 16))
    probs = torch.softmax(torch.randn(16, 2, frames, frames, generator=torch.Generator().manual_seed(3)), -1)
    probs.requires_grad_(True)
    loss = masked_motion_loss({LAYER: probs}, motion, guide)
    (grad,) = torch.autograd.grad(loss, probs)
    rows = guide.rows[LAYER]  # [S, F]: left half of the 4 x 4 grid
    assert rows.sum() == 8 * frames and rows.reshape(4, 4, frames)[:, :2].all()
    outside = ~rows
    assert torch.count_nonzero(grad.permute(0, 2, 1, 3)[outside]) == 0  # exactly zero, not small
    assert torch.count_nonzero(grad.permute(0, 2, 1, 3)[rows]) > 0
    # Inside, it is MotionClone's loss on those rows: the MSE over the region's rows of the same gather.
    keep = rows[:, 0]  # the same positions on every frame
    sub = SparseMotion.from_probs({LAYER: probs.detach()[keep]}, frames=frames, latent_height=16, latent_width=8,
                                  timestep=400, top_k=2)
    sub.values, sub.indices = {LAYER: motion.values[LAYER][keep]}, {LAYER: motion.indices[LAYER][keep]}
    expected = motion_loss({LAYER: probs.detach()[keep]}, sub)
    assert torch.allclose(loss.detach(), expected, rtol=1e-6, atol=0)


def test_an_all_ones_mask_is_no_mask(tmp_path):
    assert normalize_mask(torch.ones(1, 64, 64), 4, 16, 16) is None
    assert normalize_mask(None, 4, 16, 16) is None
    motion = random_motion()
    assert MotionGuidance(motion, GuidanceSettings(), torch.ones(4, 64, 64)).region is None


def test_bounding_box_alignment_maps_the_source_region_onto_the_target():
    grid = (4, 4)
    src = torch.zeros(4, 4, dtype=torch.bool)
    src[0:2, 0:2] = True  # top-left 2 x 2
    tgt = torch.zeros(4, 4, dtype=torch.bool)
    tgt[2:4, 2:4] = True  # bottom-right 2 x 2: a shift
    pos = source_positions(src.reshape(16, 1), tgt.reshape(16, 1), grid)[:, 0].reshape(4, 4)
    assert pos[2, 2] == 0 and pos[2, 3] == 1 and pos[3, 2] == 4 and pos[3, 3] == 5
    # A larger target (the whole frame) from the 2 x 2 source: each source token covers a 2 x 2 block.
    whole = torch.ones(16, 1, dtype=torch.bool)
    pos = source_positions(src.reshape(16, 1), whole, grid)[:, 0].reshape(4, 4)
    assert pos.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [4, 4, 5, 5], [4, 4, 5, 5]]
    # Equal regions, and no source region: every position takes its own row.
    same = source_positions(src.reshape(16, 1), src.reshape(16, 1), grid)
    assert torch.equal(same[:, 0], torch.arange(16))
    assert torch.equal(source_positions(None, tgt.reshape(16, 1), grid)[:, 0], torch.arange(16))


def test_a_source_region_counts_only_target_rows_whose_source_is_inside():
    frames = 2
    src = torch.zeros(16, frames, dtype=torch.bool)
    src.reshape(4, 4, frames)[0:2, 0:2] = True
    motion = random_motion(frames, masks=src)
    # No target mask: the MOTION's own region, position for position.
    guide = RegionGuide(motion, None)
    assert torch.equal(guide.rows[LAYER], src)
    # A shifted target of the same size: all its rows count, each from the shifted source row.
    target = torch.zeros(frames, 64, 64)
    target[:, 32:64, 32:64] = 1.0
    guide = RegionGuide(motion, normalize_mask(target, frames, 16, 16))
    assert guide.rows[LAYER].sum() == 4 * frames
    assert guide.source[LAYER].reshape(4, 4, frames)[2, 2, 0] == 0


def test_a_target_that_maps_only_onto_positions_the_reference_left_out_is_refused():
    # Reference region: the top-left and bottom-right tokens; target: the other two corners. Same bounding box,
    # so each target row maps onto itself, where the reference kept no motion: nothing would be counted.
    frames = 2
    src = torch.zeros(16, frames, dtype=torch.bool)
    src.reshape(4, 4, frames)[0, 0] = src.reshape(4, 4, frames)[3, 3] = True
    target = torch.zeros(frames, 64, 64)
    target[:, 0:16, 48:64] = target[:, 48:64, 0:16] = 1.0
    with pytest.raises(RegionMaskError, match="maps onto a position the reference mask left out"):
        RegionGuide(random_motion(frames, masks=src), normalize_mask(target, frames, 16, 16))
    target[:, 0:16, 0:16] = 1.0  # one target corner on the reference's: that row counts
    assert RegionGuide(random_motion(frames, masks=src), normalize_mask(target, frames, 16, 16)).rows[LAYER].sum() == 2


def test_keep_still_pulls_only_the_rows_outside_toward_their_own_frame():
    frames = 4
    motion = random_motion(frames)
    guide = RegionGuide(motion, normalize_mask(half(frames, 64, 64), frames, 16, 16))
    probs = torch.softmax(torch.randn(16, 2, frames, frames), -1).requires_grad_(True)
    loss = keep_still_loss({LAYER: probs}, guide)
    (grad,) = torch.autograd.grad(loss, probs)
    per_row = grad.permute(0, 2, 1, 3)  # [S, F, heads, F]
    assert torch.count_nonzero(per_row[guide.rows[LAYER]]) == 0  # inside the region: untouched
    eye = torch.eye(frames, dtype=torch.bool)
    assert torch.count_nonzero(grad[..., ~eye]) == 0  # only P[f, f] is pulled
    assert (grad[..., eye].permute(0, 2, 1)[~guide.rows[LAYER]] < 0).all()  # upward (toward 1)
    still = torch.eye(frames).expand(16, 2, frames, frames)
    assert keep_still_loss({LAYER: still}, guide) == 0


def test_masked_motion_files_round_trip_and_plain_files_stay_version_1(tmp_path):
    from safetensors import safe_open

    src = torch.zeros(16, 4, dtype=torch.bool)
    src[:5] = True
    masked = random_motion(masks=src)
    masked.save(tmp_path / "m.motion.safetensors")
    loaded = SparseMotion.load(tmp_path / "m.motion.safetensors")
    assert torch.equal(loaded.masks[LAYER], src) and torch.equal(loaded.values[LAYER], masked.values[LAYER])
    random_motion().save(tmp_path / "p.motion.safetensors")
    with safe_open(str(tmp_path / "p.motion.safetensors"), "pt") as f:
        assert f.metadata()["format_version"] == "1" and not any(k.endswith(".mask") for k in f.keys())
    assert SparseMotion.load(tmp_path / "p.motion.safetensors").masks == {}


@pytest.mark.parametrize("mask, message", [
    (torch.ones(3, 64, 64), "has 3 frames but the video has 4"),
    (half(1, 64, 32), "is 32x64 but the latent is 16x16 .* aspect ratio"),
    (torch.zeros(1, 64, 64), r"empty on frame\(s\) \[0, 1, 2, 3\]"),
    (torch.full((1, 64, 64), float("nan")), "not finite"),
    (torch.ones(2, 2, 64, 64), "must be a MASK"),
])
def test_masks_that_cannot_map_to_the_latent_are_refused(mask, message):
    with pytest.raises(RegionMaskError, match=message):
        normalize_mask(mask, 4, 16, 16)


def test_a_region_too_small_for_a_guided_layer_is_refused():
    mask = torch.zeros(1, 64, 64)
    mask[0, 0:4, 0:4] = 1.0  # a sixteenth of one 16 x 16 px token of the 4 x 4 grid
    with pytest.raises(RegionMaskError, match=f"less than half of every token of layer {LAYER}"):
        RegionGuide(random_motion(), normalize_mask(mask, 4, 16, 16))


def test_the_latent_region_from_a_pixel_mask_and_from_token_rows():
    mask = torch.zeros(1, 16, 16)
    mask[0, :, :6] = 1.0  # 6 of 16 px columns onto a 2 x 2 latent (8 x 8 px each): 6/8 of the left column
    region = latent_region(mask, None, (1, 1), 2, 2)
    assert region.shape == (1, 1, 2, 2) and region[0, 0].tolist() == [[0.75, 0.0], [0.75, 0.0]]
    rows = torch.tensor([[True], [False], [False], [True]])  # a 2 x 2 token grid onto a 4 x 4 latent
    region = latent_region(None, rows, (2, 2), 4, 4)
    assert region[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_keep_still_needs_a_region():
    with pytest.raises(RegionMaskError, match="keep_still_weight needs a region"):
        MotionGuidance(random_motion(), GuidanceSettings(keep_still_weight=100.0))


# --- on a tiny model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_motion_module(tmp_path_factory.mktemp("mm") / "mm.safetensors", seed=2, std=0.2)
    adapter, info = load_motion_adapter(path)
    return apply_motion_modules(build_tiny_sd15_model(seed=0), adapter, info, install_processors(adapter))


def reference(frames: int) -> torch.Tensor:
    lat = torch.zeros(frames, 4, SIZE, SIZE)
    for f in range(frames):
        lat[f, :, 5:9, 1 + f:5 + f] = 3.0
    return lat


def extract(model, frames: int, mask=None):
    layers = select_layers(attention_layers_of(model), "up_blocks.1")
    return extract_sparse_motion(model, reference(frames), torch.zeros(1, 7, 32), layers, seed=1, mask=mask)


def sample(model, motion, weight: float, mask=None, keep_still: float = 0.0):
    import comfy.sample

    frames = motion.frames
    latent = torch.zeros(frames, 4, SIZE, SIZE)
    guidance = MotionGuidance(motion, GuidanceSettings(weight, guided_steps=4, warmup=1, cooldown=1,
                                                       keep_still_weight=keep_still), mask)
    context = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        out = comfy.sample.sample(guidance.patch(model), comfy.sample.prepare_noise(latent, 1), 6, 8.5, "ddim",
                                  "ddim_uniform", [[context, {}]], [[torch.zeros(1, 7, 32), {}]], latent, seed=1,
                                  disable_pbar=True)
    return out, guidance


def test_an_all_ones_mask_samples_bit_identically_to_no_mask(model):
    frames = 8
    plain = extract(model, frames)
    ones = extract(model, frames, torch.ones(1, SIZE * 8, SIZE * 8))
    assert ones.masks == {} and all(torch.equal(ones.values[k], plain.values[k]) for k in plain.layers)
    a, _ = sample(model, plain, 2000.0)
    b, _ = sample(model, plain, 2000.0, mask=torch.ones(frames, SIZE * 8, SIZE * 8))
    assert torch.equal(a, b)


def test_a_masked_region_is_guided_and_the_mask_travels_with_the_motion(model):
    frames = 8
    left = half(1, SIZE * 8, SIZE * 8)
    motion = extract(model, frames, left)
    assert set(motion.masks) == set(motion.layers)
    _, unguided = sample(model, motion, 1e-9)
    out, guided = sample(model, motion, 3000.0)  # the MOTION's own region: no mask on the sampler
    assert torch.isfinite(out).all()
    g, u = guided.loss_curve()[-1][1], unguided.loss_curve()[-1][1]
    print(f"masked region: motion loss at the last guided step guided {g:.4f}, unguided {u:.4f}")
    assert g < u
    out_still, _ = sample(model, motion, 3000.0, keep_still=3000.0)
    assert torch.isfinite(out_still).all() and not torch.equal(out_still, out)


def test_the_correction_is_applied_only_inside_the_target_region(model, monkeypatch):
    frames = 8
    motion = extract(model, frames)
    grads = []
    original = MotionGuidance._apply

    def spy(self, out, grad, *args):
        grads.append(grad.clone())
        return original(self, out, grad, *args)

    monkeypatch.setattr(MotionGuidance, "_apply", spy)
    sample(model, motion, 3000.0, mask=half(1, SIZE * 8, SIZE * 8))
    assert len(grads) == 4
    for g in grads:
        assert torch.count_nonzero(g[..., SIZE // 2:]) == 0 and torch.count_nonzero(g[..., : SIZE // 2]) > 0
