"""Procedural video clips: one coloured shape moving over a background, with a text label.

The training data of the shipped demo model (demo_model/MODEL_CARD.md) and a source of
reference videos with known motion for tests. numpy + OpenCV only; every clip is fully
determined by its seed (and the optional overrides), so any clip can be regenerated.

A clip is F frames of size x size RGB (uint8). The shape is composited with an
anti-aliased alpha mask, stays fully inside the frame, and its ground-truth centre and
size per frame are returned, so motion can be checked against the image content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

SIZE = 128
FRAMES = 8
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 175, 60),
    "blue": (40, 80, 225),
    "purple": (145, 55, 200),
    "white": (245, 245, 245),
}
TRAJECTORIES = ("translate", "curve", "zoom_in", "zoom_out", "bounce")
BACKGROUNDS = ("plain", "gradient", "noise")

# Backgrounds must stay this far (RGB Euclidean) from the shape colour, so the shape is
# always visible and can be segmented by colour in tests.
MIN_CONTRAST = 110.0
_COLOUR_JITTER = 12  # per-channel jitter of the shape colour (the label stays the same)
_SUBPIXEL_BITS = 4  # OpenCV fixed-point drawing: positions at 1/16 px


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # [F, H, W, 3] uint8 RGB
    label: str  # "<colour> <shape>", e.g. "red circle"
    shape: str
    colour: str
    rgb: tuple[int, int, int]  # the shape's actual colour (jittered from COLOURS[colour])
    trajectory: str
    background: str
    centers: np.ndarray  # [F, 2] float (x, y) in pixels: the shape's centroid per frame
    radii: np.ndarray  # [F] float: the shape's size per frame (circle radius; others scale the same way)


def labels() -> list[str]:
    """Every label a clip can carry ("red circle", ...), colours outer, shapes inner."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def make_clip(
    seed: int,
    *,
    frames: int = FRAMES,
    size: int = SIZE,
    shape: str | None = None,
    colour: str | None = None,
    trajectory: str | None = None,
    background: str | None = None,
) -> Clip:
    """The clip of `seed`; any of shape/colour/trajectory/background may be forced.

    All random choices are drawn even when overridden, so forcing one attribute leaves
    the others as they are for that seed.
    """
    if frames < 2:
        raise ValueError(f"need at least 2 frames, got {frames}")
    rng = np.random.default_rng(seed)
    picks = {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "trajectory": TRAJECTORIES[rng.integers(len(TRAJECTORIES))],
        "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
    }
    for name, value, allowed in (
        ("shape", shape, SHAPES),
        ("colour", colour, COLOURS),
        ("trajectory", trajectory, TRAJECTORIES),
        ("background", background, BACKGROUNDS),
    ):
        if value is not None:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose from {list(allowed)}")
            picks[name] = value
    base = np.array(COLOURS[picks["colour"]], dtype=np.float64)
    rgb = tuple(int(v) for v in np.clip(base + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255))
    bg = _background(rng, picks["background"], np.array(rgb, dtype=np.float64), size)
    radius = float(rng.uniform(0.09, 0.15) * size)
    u = np.linspace(0.0, 1.0, frames)
    centers, radii = _trajectory(rng, picks["trajectory"], u, radius, size)
    colour_img = np.array(rgb, dtype=np.float32)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i in range(frames):
        alpha = _alpha(picks["shape"], centers[i], radii[i], size)[..., None]
        out[i] = np.clip(bg * (1.0 - alpha) + colour_img * alpha + 0.5, 0, 255).astype(np.uint8)
    return Clip(
        frames=out,
        label=f"{picks['colour']} {picks['shape']}",
        shape=picks["shape"],
        colour=picks["colour"],
        rgb=rgb,
        trajectory=picks["trajectory"],
        background=picks["background"],
        centers=centers,
        radii=radii,
    )


# --- backgrounds --------------------------------------------------------------------------------


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = 0.0 if not ab.any() else float(np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _bg_colour(rng: np.random.Generator) -> np.ndarray:
    """A muted colour: low saturation, any brightness (HSV -> RGB with OpenCV's 0..180 hue)."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(0, 110), rng.uniform(25, 235)]]], dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _background(rng: np.random.Generator, kind: str, rgb: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] float32 background that keeps MIN_CONTRAST to `rgb` everywhere (before noise)."""
    for _ in range(1000):
        a, b = _bg_colour(rng), _bg_colour(rng)
        if kind != "gradient":
            b = a
        if _segment_distance(rgb, a, b) >= MIN_CONTRAST:
            break
    else:  # unreachable in practice: dark or light greys always contrast enough
        a = b = np.full(3, 20.0 if rgb.mean() > 128 else 235.0)
    angle = rng.uniform(0, 2 * math.pi)
    noise_sigma = rng.uniform(4.0, 10.0)
    noise = rng.normal(0.0, noise_sigma, (size, size, 3))
    if kind == "plain":
        return np.broadcast_to(a.astype(np.float32), (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1) - 0.5
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    t = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-9)
    img = a * (1 - t[..., None]) + b * t[..., None]
    if kind == "noise":  # light static noise (the same in every frame: a textured, still background)
        img = img + noise
    return np.clip(img, 0, 255).astype(np.float32)


# --- motion -------------------------------------------------------------------------------------


def _fold(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect an unbounded coordinate into [lo, hi] (a ball bouncing off walls)."""
    span = hi - lo
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


def _trajectory(
    rng: np.random.Generator, kind: str, u: np.ndarray, radius: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Centres [F, 2] and radii [F] along `u` in [0, 1]; the shape stays inside the frame."""
    # Shapes extend up to 1.15 r from the centre (the star's tips); keep a 2 px margin.
    def margin(r: float) -> float:
        return 1.15 * r + 2.0

    radii = np.full(u.shape, radius)
    if kind in ("zoom_in", "zoom_out"):
        small, large = rng.uniform(0.55, 0.7), rng.uniform(1.3, 1.6)
        s0, s1 = (small, large) if kind == "zoom_in" else (large, small)
        radii = radius * (s0 + (s1 - s0) * u)
        m = margin(radius * large)
        center = rng.uniform(m, size - m, 2)
        drift = rng.normal(0.0, 0.02 * size, 2)  # a slight drift, as a real zoom is rarely centred
        lo, hi = m, size - m
        centers = np.clip(center[None] + drift[None] * u[:, None], lo, hi)
        return centers, radii
    m = margin(radius)
    lo, hi = m, size - m
    if kind == "translate":
        angle = rng.uniform(0, 2 * math.pi)
        direction = np.array([math.cos(angle), math.sin(angle)])
        length = rng.uniform(0.22, 0.45) * size
        # Room along each axis decides where the start can be; shorten the path if it does not fit.
        extent = np.abs(direction) * length
        extent = np.minimum(extent, (hi - lo) * 0.95)
        length = float(np.min(np.where(np.abs(direction) > 1e-9, extent / np.maximum(np.abs(direction), 1e-9), 1e9)))
        delta = direction * length
        start_lo = lo - np.minimum(delta, 0)
        start_hi = hi - np.maximum(delta, 0)
        start = rng.uniform(start_lo, start_hi)
        return start[None] + delta[None] * u[:, None], radii
    if kind == "curve":
        # An arc of a circle: a quarter to a half turn, either way round.
        for _ in range(200):
            r_arc = rng.uniform(0.15, 0.3) * size
            a0 = rng.uniform(0, 2 * math.pi)
            sweep = rng.uniform(0.5, 1.0) * math.pi * rng.choice([-1.0, 1.0])
            center = rng.uniform(lo, hi, 2)
            ang = a0 + sweep * u
            pts = center[None] + r_arc * np.stack([np.cos(ang), np.sin(ang)], axis=1)
            if pts.min() >= lo and pts.max() <= hi:
                return pts, radii
        raise RuntimeError("no arc fits the frame")  # pragma: no cover - 200 tries always suffice
    if kind == "bounce":
        # Straight motion reflected off the walls, with at least one reversal visible between
        # sampled frames (a bounce inside the first or last frame interval would not show).
        for _ in range(500):
            angle = rng.uniform(0, 2 * math.pi)
            speed = rng.uniform(0.5, 0.8) * size
            start = rng.uniform(lo, hi, 2)
            raw = start[None] + speed * np.array([math.cos(angle), math.sin(angle)])[None] * u[:, None]
            pts = _fold(raw, lo, hi)
            v = np.diff(pts, axis=0)
            if len(u) < 3 or (v[1:] * v[:-1] < 0).any():
                return pts, radii
        raise RuntimeError("no bouncing path found")  # pragma: no cover
    raise ValueError(f"unknown trajectory {kind!r}")


# --- shapes -------------------------------------------------------------------------------------


def _polygon(shape: str, center: np.ndarray, r: float) -> np.ndarray | None:
    """Vertices [N, 2] of a polygonal shape centred (centroid) on `center`; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        # Equilateral, pointing up; its centroid is the circumcentre.
        R = 1.15 * r
        pts = [(R * math.cos(a), R * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        R, inner = 1.15 * r, 0.45 * 1.15 * r
        pts = [
            ((R if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / 5),
             (R if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]
    elif shape == "cross":
        a, w = r, 0.38 * r
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w),
               (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(pts, dtype=np.float64) + center[None]


def _alpha(shape: str, center: np.ndarray, r: float, size: int) -> np.ndarray:
    """Anti-aliased coverage mask [H, W] float32 in [0, 1]."""
    scale = 1 << _SUBPIXEL_BITS
    mask = np.zeros((size, size), dtype=np.uint8)
    # OpenCV's pixel centres are at integers; our coordinates treat pixel i as [i, i + 1).
    poly = _polygon(shape, np.asarray(center, dtype=np.float64) - 0.5, r)
    if poly is None:
        c = tuple(int(round(v * scale)) for v in np.asarray(center) - 0.5)
        cv2.circle(mask, c, int(round(r * scale)), 255, thickness=-1, lineType=cv2.LINE_AA, shift=_SUBPIXEL_BITS)
    else:
        pts = np.round(poly * scale).astype(np.int32)
        cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA, shift=_SUBPIXEL_BITS)
    return mask.astype(np.float32) / 255.0
