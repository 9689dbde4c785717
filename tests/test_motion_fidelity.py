"""LK-track motion fidelity (CPU proxy of the CoTracker-based score): formula, tracker, videos.

Synthetic videos are 16 frames of 64x64 with smooth random textures moved by sub-pixel warps; the
real clips are the shared reference videos (skipped if absent). Run with -s to see the measured
cross-clip matrix.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from motionclone.motion_core.motion_fidelity import (
    displacement_features,
    lk_params_for_size,
    motion_fidelity,
    motion_scores,
    track_points,
    track_similarity,
)
from motionclone.motion_core.video_io import FrameSelection, load_video_file

S = 64  # frame size
F = 16  # frames
CLIPS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference_videos"


# ---------------------------------------------------------------- synthetic videos


def _texture(seed: int, size: int, colour=(1.0, 1.0, 1.0), blur: float = 2.0) -> np.ndarray:
    """Smooth random colour texture, float32 [size, size, 3] in 0..1 (LK needs texture to lock onto)."""
    noise = cv2.GaussianBlur(np.random.default_rng(seed).random((size, size, 3)).astype(np.float32), (0, 0), blur)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return noise * np.asarray(colour, np.float32)


def _warp(img: np.ndarray, dx: float, dy: float, out: int) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, (out, out), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _to_u8(frames: list[np.ndarray]) -> np.ndarray:
    return np.clip(np.rint(np.stack(frames) * 255), 0, 255).astype(np.uint8)


def pan_video(seed: int, steps: np.ndarray, colour=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Whole frame translating by steps[t] (px) between frames t and t+1 (a camera pan).

    Cropped from a larger texture so no border content enters the view."""
    margin = 32
    tex = _texture(seed, S + 2 * margin, colour)
    offsets = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    assert np.abs(offsets).max() < margin
    return _to_u8([_warp(tex, dx, dy, S + 2 * margin)[margin:-margin, margin:-margin] for dx, dy in offsets])


def object_video(
    bg_seed: int,
    obj_seed: int,
    path: np.ndarray,
    shape: str = "square",
    radius: int = 10,
    bg_colour=(1.0, 1.0, 1.0),
    obj_colour=(1.0, 0.3, 0.2),
) -> np.ndarray:
    """A textured sprite whose centre follows path[t] over a static textured background."""
    bg = _texture(bg_seed, S, bg_colour)
    sprite = _texture(obj_seed, 2 * radius + 1, obj_colour, blur=1.0)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    inside = np.maximum(abs(xx), abs(yy)) <= radius if shape == "square" else xx**2 + yy**2 <= radius**2
    mask = inside.astype(np.float32)
    frames = []
    for cx, cy in path:
        m = np.float32([[1, 0, cx - radius], [0, 1, cy - radius]])
        spr = cv2.warpAffine(sprite, m, (S, S), flags=cv2.INTER_LINEAR)
        alpha = cv2.warpAffine(mask, m, (S, S), flags=cv2.INTER_LINEAR)[..., None]
        frames.append(spr * alpha + bg * (1 - alpha))
    return _to_u8(frames)


T = np.arange(F)
PATH = np.stack([16 + 2.0 * T, 28 + 6 * np.sin(T / 3)], axis=1)  # right, with a wiggle
PAN_STEP = np.tile([[1.2, 0.4]], (F - 1, 1))


def _random_walk_steps(seed: int, length: float = 1.5) -> np.ndarray:
    angle = np.random.default_rng(seed).uniform(0, 2 * np.pi, F - 1)
    return length * np.stack([np.cos(angle), np.sin(angle)], axis=1)


# ---------------------------------------------------------------- formula on hand-made tracks


def _tracks(disp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tracks [N, F, 2] starting at 0 with the given displacements [N, F-1, 2], all measured."""
    tracks = np.concatenate([np.zeros_like(disp[:, :1]), np.cumsum(disp, axis=1)], axis=1)
    return tracks.astype(np.float32), np.ones(tracks.shape[:2], dtype=bool)


def test_track_similarity_formula():
    rng = np.random.default_rng(0)
    moving = rng.normal(size=(5, F - 1, 2)) * 3
    ref = _tracks(moving)
    assert track_similarity(*ref, *ref) == pytest.approx(1.0)
    assert track_similarity(*_tracks(moving[:1]), *_tracks(-moving[:1])) == pytest.approx(-1.0)
    assert track_similarity(*ref, *_tracks(-moving)) < 0.5  # the best of 5 unrelated random tracks
    # Unit vectors: scaling the displacements changes nothing.
    assert track_similarity(*ref, *_tracks(moving * 2.5)) == pytest.approx(1.0)
    # Hand-computed: one generated track, two reference tracks, per-step cosines averaged, max taken.
    gen = _tracks(np.array([[[1.0, 0.0], [0.0, 1.0]]]))
    two = _tracks(np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [-1.0, 0.0]]]))
    assert track_similarity(*two, *gen, static_px=0.1) == pytest.approx(0.5)  # max(mean(1, 0), mean(0, 0))
    # Static vs static agrees, static vs moving is 0; a sub-threshold jitter only partly counts.
    still = _tracks(np.zeros((3, F - 1, 2)))
    assert track_similarity(*still, *still) == pytest.approx(1.0)
    assert track_similarity(*ref, *still) == pytest.approx(0.0, abs=1e-9)
    assert track_similarity(*still, *ref) == pytest.approx(0.0, abs=1e-9)
    feats = displacement_features(_tracks(np.array([[[0.05, 0.0], [0.5, 0.0]]]))[0], static_px=0.1)
    np.testing.assert_allclose(feats[0], [[np.sin(np.pi / 4), 0, np.cos(np.pi / 4)], [1, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0)
    # static_px=0: the original's plain unit vectors; a tiny jitter then counts as a full direction.
    jitter = _tracks(np.full((1, F - 1, 2), 1e-3))
    assert track_similarity(*_tracks(np.ones((1, F - 1, 2))), *jitter, static_px=0.0) == pytest.approx(1.0)
    assert track_similarity(*_tracks(np.ones((1, F - 1, 2))), *jitter, static_px=0.1) < 0.05  # sin(pi/2 * 0.014)


def test_track_similarity_one_sided_and_masks():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(1, F - 1, 2)), rng.normal(size=(1, F - 1, 2))
    both = _tracks(np.concatenate([a, b]))
    only_a = _tracks(a)
    # Generated tracks that copy a subset of the reference's motions score 1 one-sided, less symmetric.
    assert track_similarity(*both, *only_a) == pytest.approx(1.0)
    assert track_similarity(*only_a, *both) < 1.0
    assert track_similarity(*both, *only_a, symmetric=True) < 1.0
    # A track never measured after frame 0 is left out, on either side.
    tracks, valid = _tracks(np.concatenate([a, -a]))
    valid[1, 1:] = False
    assert track_similarity(*only_a, tracks, valid) == pytest.approx(1.0)
    assert track_similarity(tracks, valid, *_tracks(-a)) < -0.9
    valid[:, 1:] = False
    assert np.isnan(track_similarity(*only_a, tracks, valid))
    with pytest.raises(ValueError):
        track_similarity(*only_a, *_tracks(a[:, :-1]))


# ---------------------------------------------------------------- tracker


def test_lk_params_scale_with_size():
    small, large = lk_params_for_size(64, 64), lk_params_for_size(512, 512)
    assert small["winSize"] == (9, 9) and small["maxLevel"] == 1
    assert large["winSize"] == (21, 21) and large["maxLevel"] == 4
    assert all(lk_params_for_size(s, s)["winSize"][0] % 2 == 1 for s in range(32, 600, 7))


def test_track_points_follows_a_pan():
    video = pan_video(3, PAN_STEP)
    tracks, valid = track_points(video, grid=16)
    assert tracks.shape == (256, F, 2) and valid.shape == (256, F) and valid[:, 0].all()
    np.testing.assert_allclose(tracks[:, 0].min(0), 1.5)  # cell centres of a 16 x 16 grid on 64 px
    np.testing.assert_allclose(tracks[:, 0].max(0), 61.5)
    assert valid.mean() > 0.7  # points near the leading edge leave the view, the rest are tracked
    steps = np.diff(tracks, axis=1)[valid[:, 1:]]
    assert np.median(np.abs(steps - PAN_STEP[0]), axis=0).max() < 0.05
    # Lost points are carried along with their neighbours, so every track keeps moving with the pan.
    np.testing.assert_allclose(np.median(np.diff(tracks, axis=1), axis=(0, 1)), PAN_STEP[0], atol=0.05)
    # float 0..1 input gives the same tracks as uint8
    tracks_f, _ = track_points(video.astype(np.float32) / 255, grid=16)
    np.testing.assert_allclose(tracks_f, tracks, atol=1e-3)


def test_track_points_flat_static_video_is_measured_static():
    flat = np.full((F, S, S, 3), 128, np.uint8)  # nothing for LK to lock onto, nothing changes
    tracks, valid = track_points(flat, grid=8)
    assert valid.all()
    np.testing.assert_array_equal(tracks, np.repeat(tracks[:, :1], F, axis=1))
    assert motion_fidelity(flat, flat, grid=8) == pytest.approx(1.0)


# ---------------------------------------------------------------- synthetic videos


def test_identical_videos_score_one():
    for video in (object_video(1, 2, PATH), pan_video(3, PAN_STEP), pan_video(5, _random_walk_steps(7))):
        assert motion_fidelity(video, video) == pytest.approx(1.0, abs=1e-6)


def test_same_motion_other_appearance_scores_high():
    ref = object_video(1, 2, PATH)
    gen = object_video(11, 12, PATH, shape="disc", bg_colour=(0.2, 0.5, 1.0), obj_colour=(0.3, 1.0, 0.3))
    assert motion_fidelity(ref, gen) > 0.8
    assert motion_fidelity(gen, ref) > 0.8
    assert motion_fidelity(pan_video(3, PAN_STEP), pan_video(4, PAN_STEP, colour=(1.0, 0.5, 0.2))) > 0.95
    # float input and a generated video at another resolution (resized to the reference's size)
    gen_128 = np.stack([cv2.resize(f, (128, 128), interpolation=cv2.INTER_CUBIC) for f in gen])
    assert motion_fidelity(ref.astype(np.float32) / 255, gen_128) > 0.8


def test_opposite_motion_scores_low():
    ref = pan_video(3, PAN_STEP)
    assert motion_fidelity(ref, pan_video(3, -PAN_STEP)) < -0.8
    assert motion_fidelity(ref, ref[::-1].copy()) < -0.8
    # An object going back along its path over the same static background: the background tracks
    # still match (the formula compares motions, not where they happen), the object's do not.
    obj = object_video(1, 2, PATH)
    same = object_video(11, 12, PATH, shape="disc")
    backwards = object_video(11, 12, PATH[::-1], shape="disc")
    assert motion_fidelity(obj, backwards) < motion_fidelity(obj, same) - 0.15


def test_static_vs_moving():
    moving = pan_video(3, PAN_STEP)
    still = pan_video(3, np.zeros((F - 1, 2)))
    assert motion_fidelity(moving, still) == pytest.approx(0.0, abs=0.05)
    assert motion_fidelity(still, moving) == pytest.approx(0.0, abs=0.05)
    assert motion_fidelity(still, pan_video(8, np.zeros((F - 1, 2)))) == pytest.approx(1.0)
    # The one-sided formula's blind spot: a static video matches a reference's static background
    # perfectly; the symmetric variant sees that the object's motion is missing.
    obj = object_video(1, 2, PATH)
    obj_still = object_video(1, 2, np.repeat(PATH[:1], F, axis=0))
    assert motion_fidelity(obj, obj_still) > 0.95
    assert motion_fidelity(obj, obj_still, symmetric=True) < 0.9
    assert motion_fidelity(obj_still, obj) < 0.8  # the moving object finds no match in a static reference


def test_unrelated_random_motion_is_near_chance():
    scores = []
    for seed in range(6):
        ref = pan_video(5, _random_walk_steps(100 + seed))
        gen = pan_video(6, _random_walk_steps(200 + seed))
        scores.append(motion_fidelity(ref, gen))
    # One global random direction per step: each score is a mean of 15 random cosines (sd ~0.18).
    assert max(abs(s) for s in scores) < 0.6
    assert abs(np.mean(scores)) < 0.25
    noise = np.random.default_rng(0).integers(0, 256, (F, S, S, 3), dtype=np.uint8)  # nothing to track
    score = motion_fidelity(pan_video(3, PAN_STEP), noise)
    assert np.isfinite(score) and score < 0.5


def test_motion_recall_is_not_fooled_by_static_or_unrelated_frames():
    obj = object_video(1, 2, PATH)
    same = object_video(11, 12, PATH, shape="disc", bg_colour=(0.2, 0.5, 1.0), obj_colour=(0.3, 1.0, 0.3))
    still = object_video(11, 12, np.repeat(PATH[:1], F, axis=0), shape="disc")
    backwards = object_video(11, 12, PATH[::-1], shape="disc")
    unrelated = np.stack([object_video(20 + i, 2, PATH[:1].repeat(2, 0))[0] for i in range(F)])  # new image per frame
    scores = {name: motion_scores(obj, gen) for name, gen in
              (("self", obj), ("same", same), ("still", still), ("backwards", backwards), ("unrelated", unrelated))}
    assert scores["self"].recall == pytest.approx(1.0, abs=1e-6)
    assert scores["same"].recall > 0.8
    # The one-sided fidelity rates a static video as well as the real motion; recall puts it, frames
    # unrelated to each other, and the motion played backwards far below the real motion.
    assert scores["still"].fidelity > 0.9
    for bad in ("still", "unrelated", "backwards"):
        assert scores[bad].recall < 0.5
        assert scores[bad].recall < scores["same"].recall - 0.4
    # A static reference has no motion to recall.
    assert np.isnan(motion_scores(still, obj).recall)
    assert motion_scores(obj, same).fidelity == pytest.approx(motion_fidelity(obj, same))


def test_frame_count_mismatch_raises():
    video = pan_video(3, PAN_STEP)
    with pytest.raises(ValueError):
        motion_fidelity(video, video[:-1])


# ---------------------------------------------------------------- real clips


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    paths = sorted(CLIPS_DIR.glob("*.mp4"))
    if not paths:
        pytest.skip(f"no reference clips in {CLIPS_DIR}")
    # The pack's own streaming loader, as users' reference videos are read.
    selection = FrameSelection(evenly_spaced_frames=F)
    return {p.stem: (load_video_file(p, selection).images.numpy() * 255 + 0.5).astype(np.uint8) for p in paths}


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])


@pytest.mark.parametrize("size", [64, 128])
def test_real_clips(clips, size, record_property):
    names = list(clips)
    videos = {n: _resize(v, size) for n, v in clips.items()}
    matrix = np.array([[motion_fidelity(videos[r], videos[g]) for r in names] for g in names])  # rows: generated
    reversed_scores = {n: motion_fidelity(v, v[::-1].copy()) for n, v in videos.items()}
    off = matrix[~np.eye(len(names), dtype=bool)]
    report = [
        f"LK-track motion fidelity, {len(names)} clips at {size}x{size}, 16 frames, grid 16",
        "rows = generated, columns = reference: " + ", ".join(names),
    ]
    report += ["  " + " ".join(f"{x:6.3f}" for x in row) + f"   {n}" for n, row in zip(names, matrix)]
    report.append("time-reversed vs itself: " + ", ".join(f"{n} {s:.3f}" for n, s in reversed_scores.items()))
    if off.size:
        report.append(f"unrelated clips: mean {off.mean():.3f}, min {off.min():.3f}, max {off.max():.3f}")
    print("\n" + "\n".join(report))
    record_property(f"motion_fidelity_matrix_{size}", matrix.round(4).tolist())
    record_property(f"motion_fidelity_reversed_{size}", {n: round(s, 4) for n, s in reversed_scores.items()})

    assert np.all(np.isfinite(matrix)) and np.all(np.abs(matrix) <= 1 + 1e-9)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)
    assert np.all(off < 0.99)
    for name, score in reversed_scores.items():
        assert score < 0.9, name  # playing a clip backwards changes its motion
    if "camera_pan_down" in reversed_scores:
        assert reversed_scores["camera_pan_down"] < 0  # a pan reversed moves the other way everywhere
