"""How much memory a guided step will take, measured on the model itself before the step runs.

A guided step records an autograd graph from the latent up to the last guided layer and runs its
backward; that is its extra memory over a plain step. With the lean attention and the activation
checkpointing of the graph-recording forward (guided_sampling, checkpointing.py) it grows linearly in
the latent's area for a given model, frame count and layer set. So the same forward and backward run
twice on small crops of the real latent (8x8 and 16x16 latent pixels; a stand-in loss on the same
attention maps), their peak allocation is measured (`peak_bytes`: CUDA's peak counter, or on a CPU
the allocation timeline of torch's profiler), and a line through the two points gives the estimate
at the real size. `saved_bytes` counts what autograd keeps for backward (for the benchmark's
breakdown and the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

CALIBRATION_SIDES = (8, 16)  # latent pixels; multiples of 8 survive SD1.5's three downsamplings
MARGIN = 1.2  # allocator slack and fragmentation on top of the measured peak


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


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Peak of the memory `run()` allocates on `device` above what was allocated before it.

    CUDA: the caching allocator's own peak counter. CPU: the allocation timeline that torch's profiler
    records (each op's own allocations and every free, in order)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak
