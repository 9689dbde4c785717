"""How much memory a guided step will hold, measured on the model itself before the step runs.

A guided step records an autograd graph from the latent up to the last guided layer; what the graph
saves for backward is the step's extra memory over a plain one. With the lean attention of the
graph-recording forward (guided_sampling.lean_attention_while_grad) everything it saves grows
linearly in the latent's area for a given frame count, model and layer set. So the graph-recording
forward runs twice on small crops of the real latent (8x8 and 16x16 latent pixels, stopped after the
last guided layer), the bytes autograd saves are counted (`saved_bytes`: each storage once,
weights excluded), and a line through the two points gives the estimate at the real size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

CALIBRATION_SIDES = (8, 16)  # latent pixels; multiples of 8 survive SD1.5's three downsamplings
MARGIN = 1.25  # backward's transient gradients and allocator slack on top of the saved graph


def saved_bytes(run: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` executes (`exclude`:
    tensors that live anyway, e.g. weights)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in excluded:
            seen[key] = max(seen.get(key, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


@dataclass(frozen=True)
class LinearBytes:
    """bytes = fixed + per_position * (latent height * width), fitted through two measurements."""

    fixed: float
    per_position: float

    @classmethod
    def through(cls, a: tuple[int, int], b: tuple[int, int]) -> LinearBytes:
        (pa, ba), (pb, bb) = a, b
        slope = (bb - ba) / (pb - pa)
        return cls(ba - slope * pa, slope)

    def at(self, height: int, width: int) -> float:
        return max(0.0, self.fixed + self.per_position * height * width)


def calibration_sizes(height: int, width: int) -> list[tuple[int, int]] | None:
    """The crops to measure at, or None when the latent is small enough to need no estimate."""
    if min(height, width) <= CALIBRATION_SIDES[-1]:
        return None
    return [(side, side) for side in CALIBRATION_SIDES]


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GB"
