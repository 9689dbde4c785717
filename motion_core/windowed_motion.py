"""A MOTION for long videos: one sparse motion per context window.

With ComfyUI's context windows (core *Context Windows (Manual)*, comfy/context_windows.py) the UNet
runs on overlapping windows of frames, and an AnimateDiff motion module only ever relates the
frames of one window. So the reference's motion is extracted per window, on exactly the frames the
sampler will hand the motion modules for that window, and guidance pulls each window toward its own
maps. `WindowedMotion` holds the windows (the latent frames each one sees, in order) with their
SparseMotion; core's handler decides the windows, the fusing of their predictions stays core's.

File: the MOTION format (sparse_motion.py) at version 2, tensors `w{i}.{layer}.values|indices`,
metadata `windows` (frame lists) and `context` (the window settings, for messages). With a region mask
(region_mask.py) version 5: the same plus `w{i}.{layer}.mask`, each window's rows of the region (so a
reader that does not know masks refuses the file instead of guiding the whole frame).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .sparse_motion import (
    FORMAT_NAME,
    MotionFileError,
    MotionMismatchError,
    SparseMotion,
    check_positions,
)

WINDOWED_FORMAT_VERSION = 2
WINDOWED_MASKED_FORMAT_VERSION = 5


@dataclass
class MotionWindow:
    frames: tuple[int, ...]  # latent frames the motion modules see in this window, in order
    motion: SparseMotion  # its sparse motion (motion.frames == len(frames))


@dataclass
class WindowedMotion:
    windows: list[MotionWindow]
    frames: int  # frames of the whole video
    context: dict[str, str] = field(default_factory=dict)  # the context window settings it was made with

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError("a windowed MOTION needs at least one window")
        first = self.windows[0].motion
        for w in self.windows:
            if len(w.frames) != w.motion.frames:
                raise ValueError(f"window {list(w.frames)} has a MOTION of {w.motion.frames} frames")
            if max(w.frames) >= self.frames or min(w.frames) < 0:
                raise ValueError(f"window {list(w.frames)} is outside the video's {self.frames} frames")
            if (w.motion.layers, w.motion.latent_height, w.motion.latent_width) != (
                    first.layers, first.latent_height, first.latent_width):
                raise ValueError("the windows of a MOTION must share their layers and latent size")

    # The properties every MOTION has (layers, size, ...) are the windows'.
    @property
    def layers(self) -> list[str]:
        return self.windows[0].motion.layers

    @property
    def latent_height(self) -> int:
        return self.windows[0].motion.latent_height

    @property
    def latent_width(self) -> int:
        return self.windows[0].motion.latent_width

    @property
    def model_fingerprint(self) -> str:
        return self.windows[0].motion.model_fingerprint

    def describe(self) -> str:
        settings = ", ".join(f"{k} {v}" for k, v in self.context.items())
        return f"{len(self.windows)} context windows over {self.frames} frames ({settings})"

    def nbytes(self) -> int:
        return sum(w.motion.nbytes() for w in self.windows)

    def check_compatible(self, frames: int, latent_height: int, latent_width: int,
                         layers: list[str] | None = None) -> None:
        if frames != self.frames:
            raise MotionMismatchError(f"MOTION has {self.frames} frames ({self.describe()}) but the latent batch has "
                                      f"{frames}")
        self.windows[0].motion.check_compatible(len(self.windows[0].frames), latent_height, latent_width, layers)

    def for_frames(self, frames: tuple[int, ...]) -> SparseMotion:
        """The sparse motion of the window that sees exactly these frames (what the sampler runs)."""
        for w in self.windows:
            if w.frames == frames:
                return w.motion
        made = "; ".join(_span(w.frames) for w in self.windows)
        raise MotionMismatchError(
            f"the sampler runs a context window on frames {_span(frames)}, but this MOTION was extracted for "
            f"windows {made} ({self.describe()}): extract it from a MODEL with the same Context Windows settings "
            "as the sampler's, and the same frame count"
        )

    # --- file I/O -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        tensors = {}
        for i, w in enumerate(self.windows):
            for name in w.motion.layers:
                tensors[f"w{i}.{name}.values"] = w.motion.values[name].detach().cpu().contiguous()
                tensors[f"w{i}.{name}.indices"] = w.motion.indices[name].detach().cpu().contiguous()
                if w.motion.masks:
                    tensors[f"w{i}.{name}.mask"] = w.motion.masks[name].detach().cpu().to(torch.uint8).contiguous()
        masked = any(w.motion.masks for w in self.windows)
        first = self.windows[0].motion
        info = {**first._metadata(), "frames": self.frames, "windows": [list(w.frames) for w in self.windows],
                "context": self.context}
        save_file(tensors, os.fspath(path), metadata={"format": FORMAT_NAME,
                                                      "format_version": str(WINDOWED_MASKED_FORMAT_VERSION
                                                                            if masked else WINDOWED_FORMAT_VERSION),
                                                      "motion": json.dumps(info)})


def _span(frames: tuple[int, ...]) -> str:
    contiguous = list(frames) == list(range(frames[0], frames[-1] + 1))
    return f"[{frames[0]}..{frames[-1]}]" if contiguous else str(list(frames))


def load_motion(path: str | os.PathLike):
    """A MOTION file of any kind (plain, version 1 or 3 with masks; windowed, version 2 or 5 with masks; Wan,
    version 4)."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise MotionFileError(f"{path} is not a MotionClone motion file (not a readable safetensors file: {e})") from e
    from .dit.wan_motion import WanMotion, is_wan_motion_file

    if is_wan_motion_file(meta):
        return WanMotion.load(path)
    windowed_versions = (str(WINDOWED_FORMAT_VERSION), str(WINDOWED_MASKED_FORMAT_VERSION))
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") not in windowed_versions:
        return SparseMotion.load(path)
    masked = meta["format_version"] == str(WINDOWED_MASKED_FORMAT_VERSION)
    try:
        info = json.loads(meta["motion"])
        windows = [tuple(int(i) for i in frames) for frames in info["windows"]]
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            parts = []
            for i, frames in enumerate(windows):
                kinds = ("values", "indices", "mask") if masked else ("values", "indices")
                wanted = [f"w{i}.{n}.{kind}" for n in info["layers"] for kind in kinds]
                if missing := [k for k in wanted if k not in keys]:
                    raise MotionFileError(f"{path}: motion file lacks tensors {missing[:3]}")
                values = {n: f.get_tensor(f"w{i}.{n}.values") for n in info["layers"]}
                indices = {n: f.get_tensor(f"w{i}.{n}.indices") for n in info["layers"]}
                masks = {n: f.get_tensor(f"w{i}.{n}.mask").bool() for n in info["layers"]} if masked else {}
                motion = SparseMotion(values=values, indices=indices, frames=len(frames),
                                      latent_height=int(info["latent_height"]), latent_width=int(info["latent_width"]),
                                      layers=list(info["layers"]), timestep=int(info["timestep"]),
                                      top_k=int(info["top_k"]),
                                      model_fingerprint=str(info.get("model_fingerprint", "")),
                                      format_version=WINDOWED_FORMAT_VERSION, masks=masks)
                check_positions(path, motion)
                parts.append(MotionWindow(frames, motion))
        return WindowedMotion(parts, int(info["frames"]), {str(k): str(v) for k, v in info.get("context", {}).items()})
    except MotionFileError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise MotionFileError(f"{path}: invalid windowed motion file: {e}") from e
