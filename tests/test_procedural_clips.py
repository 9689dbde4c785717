"""Procedural clips (training/procedural_clips.py): determinism, labels, and motion that is
really in the pixels (the shape found by colour moves as the returned trajectory says)."""

from __future__ import annotations

import numpy as np
import pytest

from motionclone.training.procedural_clips import (
    BACKGROUNDS,
    COLOURS,
    MIN_CONTRAST,
    SHAPES,
    TRAJECTORIES,
    labels,
    make_clip,
)


def _shape_mask(frame: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Pixels close to the shape's colour. Backgrounds keep MIN_CONTRAST (110) from it and their
    light noise has sigma <= 10, so a threshold of 40 separates shape from background; the
    anti-aliased rim is partly lost, symmetrically, which does not move the centroid."""
    dist = np.linalg.norm(frame.astype(np.float64) - np.array(rgb, dtype=np.float64), axis=-1)
    return dist < 40


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])  # pixel i covers [i, i + 1)


def test_same_seed_same_clip_and_different_seeds_differ():
    a, b, c = make_clip(5), make_clip(5), make_clip(6)
    assert np.array_equal(a.frames, b.frames) and a.label == b.label and np.array_equal(a.centers, b.centers)
    assert not np.array_equal(a.frames, c.frames)


def test_shapes_dtype_and_label():
    clip = make_clip(0, frames=12, size=96)
    assert clip.frames.shape == (12, 96, 96, 3) and clip.frames.dtype == np.uint8
    assert clip.centers.shape == (12, 2) and clip.radii.shape == (12,)
    assert clip.label == f"{clip.colour} {clip.shape}" and clip.label in labels()
    assert len(labels()) == len(COLOURS) * len(SHAPES)


def test_all_attributes_occur_and_overrides_keep_the_rest():
    clips = [make_clip(s) for s in range(120)]
    for attr, allowed in (("shape", SHAPES), ("colour", COLOURS), ("trajectory", TRAJECTORIES),
                          ("background", BACKGROUNDS)):
        assert {getattr(c, attr) for c in clips} == set(allowed), attr
    base, forced = make_clip(11), make_clip(11, shape="star", colour="red")
    assert forced.label == "red star"
    assert forced.trajectory == base.trajectory and np.allclose(forced.centers, base.centers)
    with pytest.raises(ValueError, match="unknown shape"):
        make_clip(0, shape="hexagon")


@pytest.mark.parametrize("trajectory", TRAJECTORIES)
def test_centroid_in_the_pixels_follows_the_trajectory(trajectory):
    for seed in range(6):
        clip = make_clip(seed, trajectory=trajectory, shape="circle")
        found = np.stack([_centroid(_shape_mask(f, clip.rgb)) for f in clip.frames])
        # Found vs. returned centres: within half a pixel for every frame.
        assert np.abs(found - clip.centers).max() < 0.5, (seed, found, clip.centers)
        step = np.linalg.norm(np.diff(found, axis=0), axis=1)
        if trajectory in ("translate", "curve", "bounce"):
            assert step.min() > 1.0, (seed, step)  # the shape moves in every frame
            # The frame-to-frame displacement in the pixels is the trajectory's.
            assert np.allclose(np.diff(found, axis=0), np.diff(clip.centers, axis=0), atol=0.6)
        if trajectory == "translate":  # constant velocity
            assert step.max() - step.min() < 0.3
        if trajectory == "curve":  # turning: the direction changes by more than 60 degrees overall
            d = np.diff(found, axis=0)
            cos = d[0] @ d[-1] / (np.linalg.norm(d[0]) * np.linalg.norm(d[-1]))
            assert cos < 0.5
        if trajectory == "bounce":  # at least one velocity reversal along x or y
            v = np.diff(found, axis=0)
            assert (np.sign(v[1:]) * np.sign(v[:-1]) < 0).any()


@pytest.mark.parametrize("trajectory", ["zoom_in", "zoom_out"])
def test_zoom_changes_the_area_as_the_radius_says(trajectory):
    for seed in range(4):
        clip = make_clip(seed, trajectory=trajectory, shape="square")
        areas = np.array([_shape_mask(f, clip.rgb).sum() for f in clip.frames], dtype=float)
        growth = areas[-1] / areas[0]
        expected = (clip.radii[-1] / clip.radii[0]) ** 2
        assert abs(growth / expected - 1) < 0.15, (seed, growth, expected)
        assert (np.diff(areas) > 0).all() if trajectory == "zoom_in" else (np.diff(areas) < 0).all()


def test_shape_stays_inside_and_background_contrasts():
    for seed in range(60):
        clip = make_clip(seed)
        for f in clip.frames:
            mask = _shape_mask(f, clip.rgb)
            assert mask.sum() > 50  # visible in every frame
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        corners = clip.frames[0][[0, 0, -1, -1], [0, -1, 0, -1]].astype(float)
        assert (np.linalg.norm(corners - np.array(clip.rgb), axis=1) > MIN_CONTRAST - 30).all()
