"""A Wan reference video's motion as a MOTION: the argmax attention motion flow (AMF) of guided blocks.

Extraction (method doc sections 1.2-1.3, 4.2-4.4): the reference latent goes through the model's
latent format (`process_latent_in`), is noised to one sigma with seeded noise (CONST flow matching:
sigma * eps + (1 - sigma) * x0; the model timestep is 1000 * sigma), and one forward per guided block,
stopped right after that block's self-attention, records q, k (after RoPE) of the conditional batch
item. The AMF is streamed per frame pair (`amf.argmax_amf`): the token-by-token map is never formed,
memory is a few [HW, HW] blocks. What is kept: int16 displacements [pairs, HW, 2] per block, about
2 * 2 * P * HW bytes (all 441 pairs of 480x832x81: 5.5 MB per block).

The file is the pack's MOTION safetensors (same format tag) with format version 4 and a `family`
("wan2.1"): Load Motion tells the families apart, and a MOTION of one family refuses the other's model.
With a source region (wan_region.py) the file also holds `region` (uint8 [h * w, T']).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..sparse_motion import FORMAT_NAME, MotionFileError, MotionMismatchError
from .amf import DITFLOW_TAU, Grid, Pairs, argmax_amf, frame_pairs
from .wan_capture import capture_qk, token_grid

WAN_FAMILY = "wan2.1"
WAN_FORMAT_VERSION = 4
FASTVMT_BLOCK = 14  # FastVMT's guided block (Wan 2.1 1.3B, 30 blocks; it uses 14 for the 40-block 14B too)
TEMPORAL_STRIDE = 4  # Wan's VAE: 1 + 4k video frames -> 1 + k latent frames


def wan_diffusion_model(model) -> torch.nn.Module | None:
    """The native Wan diffusion model of a MODEL (ModelPatcher), or None for any other model."""
    import comfy.ldm.wan.model

    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    return inner if isinstance(inner, comfy.ldm.wan.model.WanModel) else None


def is_wan_model(model) -> bool:
    return wan_diffusion_model(model) is not None


def wan_fingerprint(model) -> str:
    """Architecture of a Wan MODEL (family, width, heads, depth): enough to tell 1.3B from 14B."""
    inner = wan_diffusion_model(model)
    return f"{WAN_FAMILY}:dim{inner.dim}:heads{inner.num_heads}:blocks{len(inner.blocks)}"


def default_block(num_blocks: int) -> int:
    """FastVMT's block 14 where the model has it; half-way down a shallower model (tiny test models)."""
    return FASTVMT_BLOCK if num_blocks > FASTVMT_BLOCK else num_blocks // 2


def parse_blocks(text: str, num_blocks: int) -> list[int]:
    """Guided Wan blocks from '14', 'blocks.14' or '10, 14'; '' or 'auto': `default_block`."""
    text = text.strip()
    if text in ("", "auto"):
        return [default_block(num_blocks)]
    blocks = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(?:blocks\.)?(\d+)", part)
        if not match:
            raise ValueError(f"Wan layers are transformer blocks, '14' or 'blocks.14' (comma-separated), or 'auto'; "
                             f"got {part!r}")
        block = int(match.group(1))
        if block >= num_blocks:
            raise ValueError(f"this Wan model has blocks 0..{num_blocks - 1}, not {block}")
        if block not in blocks:
            blocks.append(block)
    return sorted(blocks)


def latent_frames_of_video(frames: int) -> int:
    """Latent frames of a `frames`-frame video under Wan's causal VAE; refuses counts it cannot map."""
    if frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
        below = 1 + TEMPORAL_STRIDE * ((max(frames, 1) - 1) // TEMPORAL_STRIDE)
        raise ValueError(f"Wan's VAE encodes 4k + 1 frames (1, 5, ..., 17, 33, 81) into k + 1 latent frames; "
                         f"the reference has {frames}: trim it to {below} or extend it to {below + TEMPORAL_STRIDE} "
                         "frames (Load Reference Video's frame count)")
    return 1 + (frames - 1) // TEMPORAL_STRIDE


@dataclass
class WanMotion:
    """Per guided block, int16 displacements [P, HW, 2] (column, row) of the reference, for `pairs` on `grid`."""

    flows: dict[int, torch.Tensor]
    pairs: Pairs
    grid: Grid  # (F', h, w) tokens
    latent_shape: tuple[int, int, int]  # (T', H', W') of the reference latent
    sigma: float
    tau: float = DITFLOW_TAU
    model_fingerprint: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # The reference LATENT [1, C, T', H', W'] (as given, before the latent format) when the guidance is to inject
    # its keys and values (wan_injection.py, DiTFlow's reference-content option); None: no injection.
    injection_latent: torch.Tensor | None = None
    # The reference's region (wan_region.py): bool [h * w, T'], the tokens whose motion was kept; None: all.
    region: torch.Tensor | None = None
    family: ClassVar[str] = WAN_FAMILY

    def __post_init__(self) -> None:
        if not self.flows:
            raise ValueError("a Wan MOTION needs at least one block")
        self.pairs = [(int(i), int(j)) for i, j in self.pairs]
        self.grid = tuple(int(v) for v in self.grid)
        self.latent_shape = tuple(int(v) for v in self.latent_shape)
        frames, h, w = self.grid
        if any(not (0 <= i < frames and 0 <= j < frames) for i, j in self.pairs):
            raise ValueError(f"frame pairs outside the {frames} latent frames")
        for block, flow in self.flows.items():
            if tuple(flow.shape) != (len(self.pairs), h * w, 2) or flow.dtype != torch.int16:
                raise ValueError(f"block {block}: flow must be int16 [{len(self.pairs)}, {h * w}, 2], got "
                                 f"{flow.dtype} {tuple(flow.shape)}")
        if self.injection_latent is not None and (self.injection_latent.ndim != 5 or
                                                  tuple(self.injection_latent.shape[-3:]) != self.latent_shape):
            raise ValueError(f"the injection latent must be [1, C, {', '.join(map(str, self.latent_shape))}], got "
                             f"{tuple(self.injection_latent.shape)}")
        if self.region is not None:
            self.region = self.region.bool()
            if tuple(self.region.shape) != (h * w, frames) or not bool(self.region.any(dim=0).all()):
                raise ValueError(f"the region must be bool [{h * w}, {frames}] with a token on every latent frame, got "
                                 f"{tuple(self.region.shape)}")

    @property
    def blocks(self) -> list[int]:
        return sorted(self.flows)

    @property
    def frames(self) -> int:
        """Latent frames (T'); the video has 1 + 4 (T' - 1)."""
        return self.latent_shape[0]

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.flows.values())

    def check_compatible(self, latent_shape: tuple[int, ...] | torch.Size) -> None:
        """Raise MotionMismatchError unless a latent [B, C, T', H', W'] has the reference's (T', H', W')."""
        got = tuple(int(v) for v in latent_shape[-3:])
        if got != self.latent_shape:
            t, h, w = self.latent_shape
            raise MotionMismatchError(
                f"MOTION was extracted from a {1 + 4 * (t - 1)}-frame {h * 8}x{w * 8} Wan video (latent {t}x{h}x{w}); "
                f"the latent is {got[0]}x{got[1]}x{got[2]} ({1 + 4 * (got[0] - 1)} frames, "
                f"{got[1] * 8}x{got[2] * 8} px)")

    # --- file I/O -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"block{b}.flow": self.flows[b].detach().cpu().contiguous() for b in self.blocks}
        if self.injection_latent is not None:
            tensors["injection_latent"] = self.injection_latent.detach().float().cpu().contiguous()
        if self.region is not None:
            tensors["region"] = self.region.detach().cpu().to(torch.uint8).contiguous()
        info = {"family": self.family, "blocks": self.blocks, "pairs": self.pairs, "grid": list(self.grid),
                "latent_shape": list(self.latent_shape), "sigma": self.sigma, "tau": self.tau,
                "model_fingerprint": self.model_fingerprint, "extra": self.extra}
        save_file(tensors, os.fspath(path), metadata={"format": FORMAT_NAME, "format_version": str(WAN_FORMAT_VERSION),
                                                      "family": self.family, "motion": json.dumps(info)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> WanMotion:
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT_NAME or meta.get("family") != WAN_FAMILY:
                    raise MotionFileError(f"{path} is not a Wan MOTION file")
                info = json.loads(meta["motion"])
                keys = set(f.keys())
                if missing := [f"block{b}.flow" for b in info["blocks"] if f"block{b}.flow" not in keys]:
                    raise MotionFileError(f"{path}: Wan motion file lacks tensors {missing}")
                flows = {int(b): f.get_tensor(f"block{b}.flow") for b in info["blocks"]}
                injection = f.get_tensor("injection_latent") if "injection_latent" in keys else None
                region = f.get_tensor("region").bool() if "region" in keys else None
        except MotionFileError:
            raise
        except SafetensorError as e:
            raise MotionFileError(f"{path} is not a MotionClone motion file (not a readable safetensors file: {e})"
                                  ) from e
        except (KeyError, ValueError, TypeError) as e:
            raise MotionFileError(f"{path}: Wan motion metadata is damaged ({e!r})") from e
        try:
            return cls(flows=flows, pairs=[tuple(p) for p in info["pairs"]], grid=tuple(info["grid"]),
                       latent_shape=tuple(info["latent_shape"]), sigma=float(info["sigma"]),
                       tau=float(info.get("tau", DITFLOW_TAU)),
                       model_fingerprint=str(info.get("model_fingerprint", "")),
                       extra={str(k): str(v) for k, v in info.get("extra", {}).items()}, injection_latent=injection,
                       region=region)
        except (KeyError, ValueError, TypeError) as e:
            raise MotionFileError(f"{path}: invalid Wan motion file: {e}") from e


def is_wan_motion_file(meta: dict[str, str]) -> bool:
    return meta.get("format") == FORMAT_NAME and meta.get("family") == WAN_FAMILY


def extract_wan_motion(
    model,
    latent: torch.Tensor,
    context: torch.Tensor,
    blocks: list[int],
    *,
    sigma: float,
    seed: int = 0,
    pair_span: int | None = None,
    model_fingerprint: str = "",
    kv_injection: bool = False,
    mask: torch.Tensor | None = None,
) -> WanMotion:
    """The reference motion of a Wan latent [1, 16, T', H', W'] (as a LATENT holds it, before the latent format).

    context: the conditional text embedding [1, L, D] (DiTFlow uses the empty prompt). sigma in [0, 1):
    the reference's noise level (0: DiTFlow's clean reference). pair_span None: all T'^2 frame pairs
    (DiTFlow); k: FastVMT's forward pairs j - i < k. One stopped forward per block, no autograd.
    kv_injection: the MOTION keeps the reference latent, and the guidance injects its block-0 keys and values
    on the guided steps (wan_injection.py). mask: an optional source region (a ComfyUI MASK, one or one per video
    frame; wan_region.py): only its tokens' motion is followed.
    """
    import comfy.model_management
    import comfy.sample

    from .wan_region import latent_frame_masks, wan_token_mask

    diffusion_model = wan_diffusion_model(model)
    if diffusion_model is None:
        raise ValueError("extract_wan_motion needs a native ComfyUI Wan MODEL")
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise ValueError(f"a Wan reference latent is [1, C, T', H', W'], got {tuple(latent.shape)}")
    if not 0.0 <= sigma < 1.0 or not math.isfinite(sigma):
        raise ValueError(f"the reference noise level sigma must be in [0, 1), got {sigma}")
    region_masks = latent_frame_masks(mask, tuple(latent.shape[-3:]), "reference mask")
    comfy.model_management.load_models_gpu([model])
    base = model.model
    device, dtype = model.load_device, base.get_dtype()
    sampling = model.get_model_object("model_sampling")
    with torch.no_grad():
        x0 = base.process_latent_in(latent.float()).to(device)
        noise = comfy.sample.prepare_noise(latent, seed).to(device)
        s = torch.tensor([sigma], device=device)
        x = sampling.calculate_input(s, sampling.noise_scaling(s, noise, x0))
        timestep = sampling.timestep(s)
        options = dict(model.model_options.get("transformer_options", {}))
        grid = token_grid(diffusion_model, x.shape)
        pairs = frame_pairs(grid[0], pair_span)
        region = wan_token_mask(region_masks, grid, "reference mask") if region_masks is not None else None
        flows = {}
        for block in blocks:
            state = capture_qk(diffusion_model, x.to(dtype), timestep.to(dtype), context[:1].to(device, dtype), block,
                               differentiable=False, transformer_options=options)
            flows[block] = argmax_amf(state.q[:1], state.k[:1], grid, pairs)[0].cpu()
    return WanMotion(flows=flows, pairs=pairs, grid=grid, latent_shape=tuple(latent.shape[-3:]), sigma=float(sigma),
                     model_fingerprint=model_fingerprint, extra={"pair_span": str(pair_span or "all")},
                     injection_latent=latent.detach().float().cpu().clone() if kv_injection else None,
                     region=region)
