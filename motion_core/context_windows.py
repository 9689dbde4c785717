"""ComfyUI's context windows (comfy/context_windows.py), seen from the pack.

Core's *Context Windows (Manual)* puts an IndexListContextHandler in the MODEL's model_options; during
sampling it runs calc_cond_batch once per window and sets `transformer_options["context_window"]` to
the window being run, so MotionClone's CALC_COND_BATCH wrapper sees each window on its own. The pack
asks the same handler for the windows at extraction (`window_frames`) and reads the running window at
sampling (`running_frames`); the schedules, the slicing of conds and the fusing stay core's.

The frames a window hands the UNet are its index list, after one rule of core's ComfyUI 0.33: with
`causal_window_fix` (default on) a window that does not start at frame 0 gets the frame before it
prepended as an anchor (`causal_anchor_index`), which the motion modules see like any other frame.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .errors import MotionCloneError

STEPS_CHECKED = 4  # windows of a schedule that moves them from step to step differ within the first steps


class ContextWindowError(MotionCloneError):
    """The MODEL's context windows cannot be used for MotionClone as they are set."""


def context_handler(model) -> Any | None:
    return model.model_options.get("context_handler")


def runs_frame_batch_windows(handler) -> bool:
    """Whether the host's handler can run windows over the frames of the batch (AnimateDiff): ComfyUI 0.3.75's
    IndexListContextHandler.set_step compares the sampler's sigmas with the per-frame timestep and fails for
    any batch but one; 0.33's takes the first. A capability probe, no version check."""
    saved = getattr(handler, "_step", 0)
    try:
        handler.set_step(torch.full((3,), 2.0), {"transformer_options": {"sample_sigmas": torch.tensor([2.0, 1.0])}})
        return True
    except RuntimeError:
        return False
    finally:
        handler._step = saved


def _check(handler, max_frames: int | None) -> None:
    name = type(handler).__name__
    for attr in ("context_length", "context_overlap", "get_context_windows", "set_step"):
        if not hasattr(handler, attr):
            raise ContextWindowError(f"the MODEL's context handler ({name}) is not one of core's index-list handlers")
    if not runs_frame_batch_windows(handler):
        raise ContextWindowError(
            "this ComfyUI's core context windows cannot run windows over a video's frames (its "
            "IndexListContextHandler.set_step fails when the batch holds more than one frame, as in ComfyUI 0.3.75): "
            "update ComfyUI (0.33 works) to use context windows"
        )
    if getattr(handler, "dim", 0) != 0:
        raise ContextWindowError(f"context windows over dim {handler.dim}: AnimateDiff's frames are dim 0 (the batch)")
    if handler.context_overlap >= handler.context_length:
        raise ContextWindowError(f"context_overlap ({handler.context_overlap}) must be smaller than context_length "
                                 f"({handler.context_length})")
    anchor = 1 if getattr(handler, "causal_window_fix", False) else 0  # core's causal anchor frame
    if max_frames is not None and handler.context_length + anchor > max_frames:
        raise ContextWindowError(
            f"context_length {handler.context_length} is above what the motion module relates: at most {max_frames} "
            f"frames per window{' with the causal anchor frame' if anchor else ''}; lower context_length to "
            f"{max_frames - anchor}"
        )


def _seen(window, handler, total: int) -> tuple[int, ...]:
    frames = list(window.index_list)
    anchor = getattr(window, "causal_anchor_index", None)
    if anchor is None and getattr(handler, "causal_window_fix", False) and 0 <= frames[0] - 1 < total:
        anchor = frames[0] - 1  # what core's evaluate_context_windows sets on the window it runs
    if anchor is not None and anchor >= 0:
        frames = [anchor, *frames]
    for i in getattr(handler, "latent_retain_index_list", []) or []:
        if i < len(frames):
            frames[i] = i  # IndexListContextWindow.get_tensor puts the video's frame i at window position i
    return tuple(frames)


def window_frames(model, frames: int, max_frames: int | None = None) -> list[tuple[int, ...]] | None:
    """The frames each context window hands the UNet for a video of `frames`, in core's order; None when the
    MODEL has no context windows or the video fits in one (core then runs it whole)."""
    handler = context_handler(model)
    if handler is None:
        return None
    _check(handler, max_frames)
    if frames <= handler.context_length:
        return None
    probe = torch.empty((frames, 1))
    saved_step = getattr(handler, "_step", 0)
    try:
        schedules = []
        for step in range(STEPS_CHECKED):
            handler._step = step
            schedules.append([list(w.index_list) for w in handler.get_context_windows(model.model, probe,
                                                                                       model.model_options)])
        handler._step = 0
        windows = handler.get_context_windows(model.model, probe, model.model_options)
    finally:
        handler._step = saved_step
    if any(s != schedules[0] for s in schedules[1:]):
        schedule = getattr(getattr(handler, "context_schedule", None), "name", "this schedule")
        raise ContextWindowError(
            f"the context schedule {schedule!r} moves its windows from step to step; MotionClone extracts the "
            "reference's motion per window once, so it needs windows that stay put: use 'standard_static' (or "
            "'batched')"
        )
    _warn_uneven(handler, [list(w.index_list) for w in windows], frames)
    return [_seen(w, handler, frames) for w in windows]


def even_frame_counts(length: int, overlap: int, count: int = 4) -> list[int]:
    """Video lengths whose windows all overlap by exactly `overlap`: length + n * (length - overlap)."""
    return [length + n * (length - overlap) for n in range(1, count + 1)]


def _warn_uneven(handler, index_lists: list[list[int]], frames: int) -> None:
    """Core's static schedule shifts the last window back to end on the last frame, so for other video
    lengths the last two windows share more frames than the overlap; each pulls those frames toward its
    own attention maps (measured on the demo model: the last window's loss no longer drops, see
    docs/long-videos.md)."""
    shared = [len(set(a) & set(b)) for a, b in zip(index_lists, index_lists[1:])]
    if shared and max(shared) > handler.context_overlap:
        logging.warning(
            "MotionClone: with %d frames, context_length %d and overlap %d, core's windows overlap unevenly "
            "(%s frames shared): guidance pulls the extra shared frames two ways; frame counts that tile "
            "evenly: %s", frames, handler.context_length, handler.context_overlap, shared,
            ", ".join(map(str, even_frame_counts(handler.context_length, handler.context_overlap))))


def running_frames(model_options: dict, x_in: torch.Tensor) -> tuple[int, ...] | None:
    """The frames of the context window core is running now (None outside context windows)."""
    window = model_options.get("transformer_options", {}).get("context_window")
    if window is None:
        return None
    handler = model_options.get("context_handler")
    frames = _seen(window, handler, getattr(window, "total_frames", 0) or 10**9)
    return frames if len(frames) == x_in.shape[0] else None


def settings_of(model) -> dict[str, str]:
    """The handler's settings, for messages and the MOTION's metadata."""
    handler = context_handler(model)
    if handler is None:
        return {}
    schedule = getattr(getattr(handler, "context_schedule", None), "name", "?")
    return {"context_length": str(handler.context_length), "context_overlap": str(handler.context_overlap),
            "context_schedule": schedule,
            "causal_window_fix": str(bool(getattr(handler, "causal_window_fix", False)))}
