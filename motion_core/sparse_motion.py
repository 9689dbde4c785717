"""The sparse motion representation ("MOTION"): top-k temporal-attention entries per guided layer.

Per layer the stored pair is `values` (fp16) and `indices` (uint8), both [S, heads, F, k]:
S spatial positions (times videos), attention heads, F query frames, k kept key frames.
Plain torch + safetensors; no ComfyUI imports.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import MotionCloneError

# SD1.5's UNet (and the AnimateDiff motion modules for it) works at four resolutions: each level down
# halves the latent (rounding up, as its stride-2 convolutions do); up_blocks.i is level 3 - i.
UNET_LEVELS = 4
_BLOCK = re.compile(r"^(?:(down_blocks|up_blocks)\.(\d+)|mid_block)\.")

FORMAT_NAME = "motionclone.sparse_motion"
FORMAT_VERSION = 1
MASKED_FORMAT_VERSION = 3  # version 1 plus a region mask per layer (2 is the windowed MOTION, windowed_motion.py)
MAX_FRAMES = 256  # indices are stored as uint8


def layer_grid_or_none(layer: str, latent_height: int, latent_width: int) -> tuple[int, int] | None:
    """(rows, columns) of `layer`'s token grid (e.g. up_blocks.1: a quarter of the latent per side); None for
    a layer name this rule does not know."""
    match = _BLOCK.match(layer)
    if match is None:
        return None
    kind, index = match.groups()
    level = UNET_LEVELS - 1 if kind is None else int(index) if kind == "down_blocks" else UNET_LEVELS - 1 - int(index)
    if not 0 <= level < UNET_LEVELS:
        return None
    scale = 2**level
    return math.ceil(latent_height / scale), math.ceil(latent_width / scale)


def layer_grid(layer: str, latent_height: int, latent_width: int) -> tuple[int, int]:
    grid = layer_grid_or_none(layer, latent_height, latent_width)
    if grid is None:
        raise ValueError(f"layer {layer!r} is not a block of the SD1.5 UNet: its token grid is unknown")
    return grid


def positions_per_video(layer: str, latent_height: int, latent_width: int) -> int | None:
    """Spatial positions of one video at `layer`; None for a layer name the grid rule does not know."""
    grid = layer_grid_or_none(layer, latent_height, latent_width)
    return None if grid is None else grid[0] * grid[1]


class MotionMismatchError(MotionCloneError):
    """A MOTION does not fit the latent / model it is applied to."""


class MotionFileError(MotionCloneError):
    """A file is not a (readable) MOTION file."""


@dataclass
class SparseMotion:
    values: dict[str, torch.Tensor]
    indices: dict[str, torch.Tensor]
    frames: int
    latent_height: int
    latent_width: int
    layers: list[str]
    timestep: int
    top_k: int
    model_fingerprint: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, str] = field(default_factory=dict)
    # Region masks (region_mask.py): per layer, bool [S, F], the rows whose motion was kept; empty: the whole frame.
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = list(self.layers)
        if self.masks and set(self.masks) != set(self.layers):
            raise ValueError("MOTION region masks must cover exactly its layers")
        for name, m in self.masks.items():
            if m.dtype != torch.bool or tuple(m.shape) != (self.values[name].shape[0], self.frames):
                raise ValueError(f"MOTION layer {name}: region mask must be bool [S, F] = "
                                 f"{[int(self.values[name].shape[0]), self.frames]}, got {m.dtype} {tuple(m.shape)}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"MOTION layer names repeat: {self.layers}")
        if set(self.values) != set(self.layers) or set(self.indices) != set(self.layers):
            raise ValueError("MOTION values/indices keys must equal its layer list")
        if not 1 <= self.frames <= MAX_FRAMES:
            raise ValueError(f"MOTION frames must be in [1, {MAX_FRAMES}], got {self.frames}")
        for name in self.layers:
            val, idx = self.values[name], self.indices[name]
            if val.dtype != torch.float16 or idx.dtype != torch.uint8:
                raise ValueError(f"MOTION layer {name}: values must be float16 and indices uint8")
            if val.ndim != 4 or val.shape != idx.shape:
                raise ValueError(f"MOTION layer {name}: values {tuple(val.shape)} and indices {tuple(idx.shape)} "
                                 "must both be [S, heads, F, k]")
            if val.shape[2] != self.frames or val.shape[3] != self.top_k:
                raise ValueError(f"MOTION layer {name}: shape {tuple(val.shape)} does not match "
                                 f"frames={self.frames}, top_k={self.top_k}")
            if idx.numel() and int(idx.max()) >= self.frames:
                raise ValueError(f"MOTION layer {name}: frame index {int(idx.max())} >= frames={self.frames}")
            if not bool(torch.isfinite(val).all()):
                raise ValueError(f"MOTION layer {name} holds values that are not finite (NaN or infinity): the "
                                 "attention it was extracted from was not finite, or the file is damaged")

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_probs(
        cls,
        probs: dict[str, torch.Tensor],
        *,
        top_k: int = 1,
        frames: int,
        latent_height: int,
        latent_width: int,
        timestep: int,
        model_fingerprint: str = "",
        extra: dict[str, str] | None = None,
        masks: dict[str, torch.Tensor] | None = None,
    ) -> SparseMotion:
        """Keep the top-k entries of each row of attention probabilities [S, heads, F, F] (layer order kept);
        `masks`: per layer, bool [S, F], the rows of a region mask (region_mask.token_masks)."""
        if not probs:
            raise ValueError("No attention probabilities given: no guided layer was recorded")
        if frames > MAX_FRAMES:
            raise ValueError(f"MOTION supports at most {MAX_FRAMES} frames (uint8 indices), got {frames}")
        if not 1 <= top_k <= frames:
            raise ValueError(f"top_k must be in [1, frames={frames}], got {top_k}")
        values, indices = {}, {}
        for name, p in probs.items():
            if p.ndim != 4 or p.shape[2] != frames or p.shape[3] != frames:
                raise ValueError(f"Layer {name}: attention probabilities must be [S, heads, {frames}, {frames}], "
                                 f"got {tuple(p.shape)}")
            val, idx = torch.topk(p.detach(), k=top_k, dim=-1)
            values[name] = val.to(torch.float16).contiguous()
            indices[name] = idx.to(torch.uint8).contiguous()
        return cls(values=values, indices=indices, frames=frames, latent_height=latent_height,
                   latent_width=latent_width, layers=list(probs), timestep=int(timestep), top_k=top_k,
                   model_fingerprint=model_fingerprint, extra=dict(extra or {}), masks=dict(masks or {}))

    # --- properties ---------------------------------------------------------------------------

    @property
    def tokens(self) -> dict[str, int]:
        """S (spatial positions, times videos) per layer."""
        return {name: int(self.values[name].shape[0]) for name in self.layers}

    def nbytes(self) -> int:
        """Bytes of the stored tensors (values + indices)."""
        return sum(t.numel() * t.element_size() for d in (self.values, self.indices) for t in d.values())

    def dense_nbytes(self) -> int:
        """Bytes the dense fp16 maps [S, heads, F, F] would take."""
        return sum(v.shape[0] * v.shape[1] * self.frames * self.frames * 2 for v in self.values.values())

    def to(self, device: torch.device | str) -> SparseMotion:
        return replace(self, values={k: v.to(device) for k, v in self.values.items()},
                       indices={k: v.to(device) for k, v in self.indices.items()}, extra=dict(self.extra),
                       masks={k: v.to(device) for k, v in self.masks.items()})

    def check_compatible(
        self, frames: int, latent_height: int, latent_width: int, layers: list[str] | None = None
    ) -> None:
        """Raise MotionMismatchError naming what differs; `layers` are the model's guidable layers (None: skip)."""
        problems = []
        if frames != self.frames:
            problems.append(f"MOTION has {self.frames} frames but the latent batch has {frames}")
        if (latent_height, latent_width) != (self.latent_height, self.latent_width):
            problems.append(
                f"MOTION was extracted from {self.latent_height}x{self.latent_width} latents "
                f"({self.latent_height * 8}x{self.latent_width * 8} px) but the latent is "
                f"{latent_height}x{latent_width} ({latent_height * 8}x{latent_width * 8} px)"
            )
        if layers is not None:
            missing = [name for name in self.layers if name not in set(layers)]
            if missing:
                problems.append(f"MOTION layers not found in the model: {', '.join(missing)}")
        if problems:
            raise MotionMismatchError("; ".join(problems))

    # --- file I/O -----------------------------------------------------------------------------

    def _metadata(self) -> dict[str, str]:
        return {
            "layers": self.layers,
            "frames": self.frames,
            "latent_height": self.latent_height,
            "latent_width": self.latent_width,
            "timestep": self.timestep,
            "top_k": self.top_k,
            "model_fingerprint": self.model_fingerprint,
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike) -> None:
        tensors = {}
        for name in self.layers:
            tensors[f"{name}.values"] = self.values[name].detach().cpu().contiguous()
            tensors[f"{name}.indices"] = self.indices[name].detach().cpu().contiguous()
            if self.masks:
                tensors[f"{name}.mask"] = self.masks[name].detach().cpu().to(torch.uint8).contiguous()
        version = MASKED_FORMAT_VERSION if self.masks else self.format_version
        # safetensors metadata is str->str: the format tag is a plain key, everything else one JSON blob.
        metadata = {"format": FORMAT_NAME, "format_version": str(version),
                    "motion": json.dumps(self._metadata())}
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> SparseMotion:
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT_NAME:
                    raise MotionFileError(f"{path} is not a MotionClone motion file (no '{FORMAT_NAME}' tag)")
                version = int(meta.get("format_version", "0"))
                if version not in (FORMAT_VERSION, MASKED_FORMAT_VERSION):
                    raise MotionFileError(f"{path}: motion format version {version} is not supported here "
                                          f"(plain MOTION files are versions {FORMAT_VERSION} and "
                                          f"{MASKED_FORMAT_VERSION})")
                info = json.loads(meta["motion"])
                keys = set(f.keys())
                missing = [k for name in info["layers"] for k in (f"{name}.values", f"{name}.indices")
                           if k not in keys]
                if missing:
                    raise MotionFileError(f"{path}: motion file lacks tensors {missing}")
                values = {n: f.get_tensor(f"{n}.values").to(device) for n in info["layers"]}
                indices = {n: f.get_tensor(f"{n}.indices").to(device) for n in info["layers"]}
                masks = {}
                if version == MASKED_FORMAT_VERSION:
                    absent = [f"{n}.mask" for n in info["layers"] if f"{n}.mask" not in keys]
                    if absent:
                        raise MotionFileError(f"{path}: masked motion file lacks tensors {absent}")
                    masks = {n: f.get_tensor(f"{n}.mask").to(device).bool() for n in info["layers"]}
        except MotionFileError:
            raise
        except SafetensorError as e:
            raise MotionFileError(f"{path} is not a MotionClone motion file (not a readable safetensors file: {e})"
                                  ) from e
        except (KeyError, ValueError, TypeError) as e:  # ValueError covers JSONDecodeError
            raise MotionFileError(f"{path}: motion metadata is damaged ({e!r})") from e
        try:
            motion = cls(values=values, indices=indices, frames=int(info["frames"]),
                       latent_height=int(info["latent_height"]), latent_width=int(info["latent_width"]),
                       layers=list(info["layers"]), timestep=int(info["timestep"]), top_k=int(info["top_k"]),
                       model_fingerprint=str(info.get("model_fingerprint", "")), format_version=FORMAT_VERSION,
                       extra={str(k): str(v) for k, v in info.get("extra", {}).items()}, masks=masks)
        except (KeyError, ValueError) as e:
            raise MotionFileError(f"{path}: invalid motion file: {e}") from e
        check_positions(path, motion)
        return motion


def check_positions(path: str, motion: SparseMotion) -> None:
    """The stored tensors must fit the latent size the metadata claims: a MOTION holds one video's positions
    (extraction takes one reference), and tensors of another size would be folded wrongly by the guidance."""
    for name in motion.layers:
        per_video = positions_per_video(name, motion.latent_height, motion.latent_width)
        stored = int(motion.values[name].shape[0])
        if per_video is not None and stored != per_video:
            raise MotionFileError(
                f"{path}: layer {name} stores {stored} spatial positions, but the {motion.latent_height}x"
                f"{motion.latent_width} latent the metadata names has {per_video} there: the metadata does not "
                "match the tensors (edited or damaged file); extract the motion again"
            )
