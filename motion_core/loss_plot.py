"""A small line plot of MotionClone's motion loss per guided step, as an image.

Drawn with Pillow (ComfyUI ships it), so no plotting library is needed. Used for the Motion
Guided Sampler's second output and by the demo, which draws the guided and unguided runs'
curves on one chart. Plain numpy/Pillow/torch; no ComfyUI imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

Curve = Sequence[tuple[int, float]]  # (guided step, loss)
COLOURS = ((220, 60, 50), (40, 110, 220), (40, 160, 80), (150, 80, 200))
BACKGROUND, AXES, GRID, TEXT = (255, 255, 255), (40, 40, 40), (225, 225, 225), (20, 20, 20)


def format_curve(curve: Curve) -> str:
    """'step:loss' pairs for logs and the demo's print-out."""
    return " ".join(f"{step}:{loss:.4g}" for step, loss in curve)


def draw_loss_plot(curves: Mapping[str, Curve], title: str, size: tuple[int, int] = (640, 360)) -> np.ndarray:
    """An HxWx3 uint8 RGB chart: one line per named curve over the guided steps, y from 0."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, width - 16, 36, height - 40
    draw.text((left, 10), title, fill=TEXT, font=font)
    values = [loss for curve in curves.values() for _, loss in curve if math.isfinite(loss)]
    steps = [step for curve in curves.values() for step, _ in curve]
    if not values:
        draw.text((left, (top + bottom) // 2), "no guided step ran: nothing to plot", fill=TEXT, font=font)
        return np.asarray(image)
    y_max = max(values) * 1.1 or 1.0
    x_min, x_max = min(steps), max(max(steps), min(steps) + 1)

    def at(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - x_min) / (x_max - x_min) * (right - left)
        y = bottom - loss / y_max * (bottom - top)
        return x, y

    for i in range(5):  # horizontal grid with loss labels
        loss = y_max * i / 4
        _, y = at(x_min, loss)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((4, y - 6), f"{loss:.3g}", fill=TEXT, font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXES, width=2)
    draw.text((left, bottom + 6), f"{x_min}", fill=TEXT, font=font)
    draw.text((right - 24, bottom + 6), f"{x_max}", fill=TEXT, font=font)
    draw.text(((left + right) // 2 - 40, bottom + 20), "guided step", fill=TEXT, font=font)
    for k, (name, curve) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = [at(step, loss) for step, loss in curve if math.isfinite(loss)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        legend_y = top + 4 + 14 * k
        draw.line([(right - 150, legend_y + 6), (right - 130, legend_y + 6)], fill=colour, width=3)
        draw.text((right - 124, legend_y), name, fill=TEXT, font=font)
    return np.asarray(image)


def as_comfy_image(rgb: np.ndarray) -> torch.Tensor:
    """ComfyUI IMAGE [1, H, W, 3] float 0..1."""
    return torch.from_numpy(rgb.astype(np.float32) / 255.0).unsqueeze(0)
