"""LK-track motion fidelity (CPU proxy of the CoTracker-based score).

The field's motion-fidelity score (Yatim et al., "Space-Time Diffusion Features for Zero-Shot
Text-Driven Motion Transfer", CVPR 2024, a.k.a. Diffusion Motion Transfer) tracks a dense grid of
points with CoTracker in the reference and the generated video, turns every track into per-frame
unit displacement vectors, scores a pair of tracks by the mean over frames of the cosine, and
averages, over generated tracks, the best match among reference tracks.

CoTracker cannot be downloaded here, so this module tracks the grid with OpenCV's pyramidal
Lucas-Kanade (frame-to-frame chaining plus a forward-backward check) and keeps the same track
similarity. It is a proxy: numbers are comparable with each other, not with published scores.
See docs/motion-fidelity.md for the differences and measured baselines.

numpy + OpenCV only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "MotionScores",
    "displacement_features",
    "lk_params_for_size",
    "motion_fidelity",
    "motion_recall",
    "motion_scores",
    "track_points",
    "track_similarity",
]


def _to_gray_u8(frames: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] uint8 or float in 0..1 -> [F, H, W] uint8 (LK needs 8-bit images)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got {frames.shape}")
    if frames.dtype != np.uint8:
        frames = np.clip(np.rint(frames.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    # RGB vs BGR does not matter for tracking; the weights only shift luminance slightly.
    return np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames])


def lk_params_for_size(height: int, width: int) -> dict:
    """Lucas-Kanade settings scaled to the frame size (tuned for 64x64 .. 512x512).

    - window: about 1/8 of the short side, odd, clamped to 7..21 px (9 at 64 px, 17 at 128 px,
      21 from 168 px up): big enough for texture, small enough not to straddle several motions.
    - pyramid levels (`maxLevel`): coarsest level about 32 px on the short side, clamped to 1..4
      (1 at 64 px, 2 at 128, 3 at 256, 4 at 512); with the window this covers frame-to-frame
      displacements up to roughly win/2 * 2^levels (9 px at 64 px, 34 px at 128, 168 px at 512).
    - forward-backward threshold: max(0.5, short side / 128) px (0.5 at 64, 1 at 128, 4 at 512).
    """
    short = min(height, width)
    win = int(np.clip(round(short / 8), 7, 21)) | 1  # force odd
    levels = int(np.clip(math.floor(math.log2(max(short, 1) / 32)), 1, 4))
    return {
        "winSize": (win, win),
        "maxLevel": levels,
        "criteria": (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01),
        "fb_threshold": max(0.5, short / 128),
    }


def _grid_points(height: int, width: int, grid: int) -> np.ndarray:
    """grid x grid points at cell centres, (x, y) pixel coordinates, row-major, float32."""
    xs = (np.arange(grid) + 0.5) * width / grid - 0.5
    ys = (np.arange(grid) + 0.5) * height / grid - 0.5
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=-1).astype(np.float32)


def track_points(frames: np.ndarray, grid: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Track a grid x grid lattice of points from frame 0 through the video with pyramidal LK.

    frames: [F, H, W, 3], uint8 or float in 0..1.
    Returns (tracks [N, F, 2] float32 (x, y) pixels, valid [N, F] bool), N = grid * grid, points
    row-major from the top-left cell centre. valid[:, 0] is True; valid[n, t] (t >= 1) says the step
    t-1 -> t of point n was measured, i.e. one of:
      - LK succeeded, the point stays inside the frame, and tracking it back lands within the
        forward-backward threshold of where it came from (see `lk_params_for_size`);
      - LK failed, no measured point lies within two grid cells, and the image around the point did
        not change (mean absolute difference over the LK window < 2/255): a static point in a flat
        area, displacement 0.
    Other ("lost") steps do not end the track: the point moves with the median measured displacement
    of the points within two grid cells of it, else of all points, else stays put. Like CoTracker,
    which reports positions for occluded and out-of-frame points, every track thus spans the whole
    video (positions may leave the frame); LK resumes from the carried position at the next step.
    """
    gray = _to_gray_u8(frames)
    num_frames, height, width = gray.shape
    params = lk_params_for_size(height, width)
    fb_threshold = params.pop("fb_threshold")
    win = params["winSize"][0]
    radius = 2.0 * max(height, width) / grid

    pts = _grid_points(height, width, grid)
    tracks = np.zeros((pts.shape[0], num_frames, 2), dtype=np.float32)
    valid = np.zeros((pts.shape[0], num_frames), dtype=bool)
    tracks[:, 0] = pts
    valid[:, 0] = True

    for t in range(1, num_frames):
        p0 = np.ascontiguousarray(tracks[:, t - 1])
        p1, st1, _ = cv2.calcOpticalFlowPyrLK(gray[t - 1], gray[t], p0.reshape(-1, 1, 2), None, **params)
        p0b, st0, _ = cv2.calcOpticalFlowPyrLK(gray[t], gray[t - 1], p1, None, **params)
        p1, p0b = p1.reshape(-1, 2), p0b.reshape(-1, 2)
        inside = (p1[:, 0] >= 0) & (p1[:, 0] <= width - 1) & (p1[:, 1] >= 0) & (p1[:, 1] <= height - 1)
        fb_err = np.linalg.norm(p0b - p0, axis=-1)
        ok = (st1.ravel() == 1) & (st0.ravel() == 1) & np.isfinite(p1).all(-1) & (fb_err < fb_threshold) & inside
        disp = np.where(ok[:, None], p1 - p0, 0.0)
        measured = ok.copy()

        lost = np.flatnonzero(~ok)
        if lost.size:
            # The image around a point far from any tracked one may simply not have changed (a flat,
            # static area where LK has nothing to lock onto): measured as static.
            change = cv2.blur(cv2.absdiff(gray[t], gray[t - 1]).astype(np.float32), (win, win))
            src = np.rint(p0[lost]).astype(int)
            in_src = (src[:, 0] >= 0) & (src[:, 0] < width) & (src[:, 1] >= 0) & (src[:, 1] < height)
            unchanged = np.zeros(lost.size, dtype=bool)
            unchanged[in_src] = change[src[in_src, 1], src[in_src, 0]] < 2.0
            fill = np.zeros((lost.size, 2))
            has_near = np.zeros(lost.size, dtype=bool)
            if ok.any():
                good = np.flatnonzero(ok)
                near = np.linalg.norm(p0[lost, None] - p0[None, good], axis=-1) < radius  # [lost, good]
                has_near = near.any(axis=1)
                cand = np.where(near[..., None], disp[good][None], np.nan)
                fill[has_near] = np.nanmedian(cand[has_near], axis=1)
                fill[~has_near] = np.median(disp[good], axis=0)
            static = ~has_near & unchanged
            fill[static] = 0.0
            disp[lost] = fill
            measured[lost[static]] = True
        tracks[:, t] = p0 + disp
        valid[:, t] = measured
    return tracks, valid


def displacement_features(tracks: np.ndarray, static_px: float) -> np.ndarray:
    """Frame-to-frame displacements of tracks [N, F, 2] -> unit 3-vectors [N, F-1, 3].

    A displacement d becomes (sin(a) * d / |d|, cos(a)) with a = pi/2 * min(|d| / static_px, 1):
    for |d| >= static_px it is the plain unit displacement (the original formula), a point that does
    not move is (0, 0, 1), and shorter moves blend smoothly between the two. Dot products are then
    cos(angle) for two moving points, 1 for two static points, 0 for a static and a moving point,
    and the noise direction of a sub-threshold jitter never counts fully. static_px = 0 gives the
    original unit vectors, with (0, 0, 1) only for exactly-zero displacements.
    """
    disp = np.diff(tracks.astype(np.float64), axis=1)
    norm = np.linalg.norm(disp, axis=-1, keepdims=True)
    unit = disp / np.maximum(norm, 1e-12)
    if static_px > 0:
        angle = 0.5 * np.pi * np.minimum(norm / static_px, 1.0)
    else:
        angle = np.where(norm > 0, 0.5 * np.pi, 0.0)
    return np.concatenate([np.sin(angle) * unit, np.cos(angle)], axis=-1)


def track_similarity(
    ref_tracks: np.ndarray,
    ref_valid: np.ndarray,
    gen_tracks: np.ndarray,
    gen_valid: np.ndarray,
    static_px: float = 0.1,
    symmetric: bool = False,
) -> float:
    """Motion-fidelity formula on point tracks: mean over generated tracks of the best cosine match.

    ref_tracks [N, F, 2], gen_tracks [M, F, 2] in pixels of the same frame size; *_valid [*, F] bool
    as returned by `track_points`. Each frame-to-frame displacement becomes a unit vector (see
    `displacement_features` for displacements shorter than `static_px`); the similarity of two tracks
    is the mean over the F-1 steps of the cosine; the score is the mean over generated tracks of the
    max over reference tracks. Range [-1, 1]; 1 for identical motion.
    Like the CoTracker original, which scores every track whether or not the point is visible, all
    steps count, including ones `track_points` carried with the neighbours' motion; only tracks with
    no measured step at all (valid only at frame 0) are left out, as their motion is entirely borrowed.
    symmetric=True also scores every reference track by its best generated match and returns the
    average of both directions; the one-sided default cannot tell that a generated video lacks some of
    the reference's motions (a static video scores 1 against a reference with a static background).
    Returns nan if no track is left on either side.
    """
    if ref_tracks.shape[1] != gen_tracks.shape[1]:
        raise ValueError(f"frame counts differ: {ref_tracks.shape[1]} vs {gen_tracks.shape[1]}")
    if ref_tracks.shape[1] < 2:
        raise ValueError("need at least 2 frames")
    ref_keep = np.asarray(ref_valid)[:, 1:].any(axis=1)
    gen_keep = np.asarray(gen_valid)[:, 1:].any(axis=1)
    if not ref_keep.any() or not gen_keep.any():
        return float("nan")
    ref_feat = displacement_features(ref_tracks[ref_keep], static_px)
    gen_feat = displacement_features(gen_tracks[gen_keep], static_px)
    steps = ref_feat.shape[1]
    # mean over steps of per-step dot products, for every (generated, reference) pair: [M, N]
    sim = gen_feat.reshape(gen_feat.shape[0], -1) @ ref_feat.reshape(ref_feat.shape[0], -1).T / steps
    score = float(sim.max(axis=1).mean())
    if symmetric:
        score = 0.5 * (score + float(sim.max(axis=0).mean()))
    return score


def motion_recall(
    ref_tracks: np.ndarray,
    ref_valid: np.ndarray,
    gen_tracks: np.ndarray,
    gen_valid: np.ndarray,
    static_px: float = 0.1,
    moving_px: float | None = None,
) -> float:
    """How much of the reference's motion the generated video contains: mean over the reference's
    *moving* tracks of the best similarity among generated tracks (same per-track similarity as
    `track_similarity`).

    The field's one-sided score averages over generated tracks, so a video that does not move (or
    whose frames are unrelated, leaving LK nothing to track) scores about 1 against any reference
    with a static background. Here such a video scores about 0: a moving reference track is matched
    only by a generated track moving the same way. A reference track is moving when its mean
    frame-to-frame displacement is at least `moving_px` (default 2 * static_px). Returns nan when the
    reference has no moving track, 0 when the generated video has no tracked point.
    """
    if ref_tracks.shape[1] != gen_tracks.shape[1]:
        raise ValueError(f"frame counts differ: {ref_tracks.shape[1]} vs {gen_tracks.shape[1]}")
    if ref_tracks.shape[1] < 2:
        raise ValueError("need at least 2 frames")
    moving_px = 2.0 * static_px if moving_px is None else moving_px
    ref_keep = np.asarray(ref_valid)[:, 1:].any(axis=1)
    speed = np.linalg.norm(np.diff(ref_tracks.astype(np.float64), axis=1), axis=-1).mean(axis=1)
    moving = ref_keep & (speed >= moving_px)
    if not moving.any():
        return float("nan")
    gen_keep = np.asarray(gen_valid)[:, 1:].any(axis=1)
    if not gen_keep.any():
        return 0.0
    ref_feat = displacement_features(ref_tracks[moving], static_px)
    gen_feat = displacement_features(gen_tracks[gen_keep], static_px)
    sim = ref_feat.reshape(ref_feat.shape[0], -1) @ gen_feat.reshape(gen_feat.shape[0], -1).T / ref_feat.shape[1]
    return float(sim.max(axis=1).mean())


def _resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.shape[1:3] == (height, width):
        return frames
    interp = cv2.INTER_AREA if frames.shape[1] * frames.shape[2] > height * width else cv2.INTER_LINEAR
    return np.stack([cv2.resize(np.ascontiguousarray(f), (width, height), interpolation=interp) for f in frames])


@dataclass(frozen=True)
class MotionScores:
    fidelity: float  # the field's one-sided score (track_similarity)
    recall: float  # motion_recall: the reference's moving tracks found in the generated video


def motion_scores(
    reference_frames: np.ndarray, generated_frames: np.ndarray, grid: int = 16, static_px: float | None = None
) -> MotionScores:
    """Both scores from one tracking of each video (conventions as in `motion_fidelity`)."""
    ref, gen, static_px = _tracks_of(reference_frames, generated_frames, grid, static_px)
    return MotionScores(
        track_similarity(*ref, *gen, static_px=static_px), motion_recall(*ref, *gen, static_px=static_px)
    )


def _tracks_of(reference_frames, generated_frames, grid: int, static_px: float | None):
    reference_frames = np.asarray(reference_frames)
    generated_frames = np.asarray(generated_frames)
    if reference_frames.shape[0] != generated_frames.shape[0]:
        raise ValueError(f"frame counts differ: {reference_frames.shape[0]} vs {generated_frames.shape[0]}")
    height, width = reference_frames.shape[1:3]
    generated_frames = _resize_frames(generated_frames, height, width)
    if static_px is None:
        static_px = 0.1 * min(height, width) / 64
    return track_points(reference_frames, grid), track_points(generated_frames, grid), static_px


def motion_fidelity(
    reference_frames: np.ndarray,
    generated_frames: np.ndarray,
    grid: int = 16,
    static_px: float | None = None,
    symmetric: bool = False,
) -> float:
    """LK-track motion fidelity (CPU proxy of the CoTracker-based score) of a generated video.

    Both videos are [F, H, W, 3] (uint8 or float 0..1) with the same F. The generated video is
    resized to the reference's H x W (so pixel displacements are comparable) and both are tracked
    with `track_points(..., grid)`; the score is `track_similarity(ref, gen)`, in [-1, 1], 1 for
    identical motion. `static_px` (see `displacement_features`) defaults to 0.1 px per 64 px of the
    reference's short side, so a video scores the same at any resolution; `symmetric` as in
    `track_similarity`.
    """
    (ref_tracks, ref_valid), (gen_tracks, gen_valid), static_px = _tracks_of(reference_frames, generated_frames,
                                                                              grid, static_px)
    return track_similarity(ref_tracks, ref_valid, gen_tracks, gen_valid, static_px=static_px, symmetric=symmetric)
