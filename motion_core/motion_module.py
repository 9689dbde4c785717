"""AnimateDiff motion modules: read original checkpoints into diffusers' MotionAdapter.

Original AnimateDiff files (v1, v2, v3 for SD1.5; `.ckpt` or `.safetensors`) use keys
like `down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.
attention_blocks.0.to_q.weight`. diffusers' single-file conversion maps them to its
`MotionAdapter`; the adapter config is inferred from the tensors themselves (channels,
layer counts, mid block, positional-encoding length) so nothing is fetched from a hub.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from .errors import MotionCloneError

# Every AnimateDiff SD1.5/SDXL motion module uses 8 heads; head count does not change any
# tensor shape, so it cannot be read from the file.
ANIMATEDIFF_HEADS = 8
_MM_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.motion_modules\.(\d+)\.temporal_transformer\.")
_MID_KEY = re.compile(r"^mid_block\.motion_modules\.(\d+)\.temporal_transformer\.")


class MotionModuleError(MotionCloneError):
    """A file that is not a usable AnimateDiff motion module, with the reason."""


@dataclass(frozen=True)
class MotionModuleInfo:
    name: str
    version: str  # "v1" (no mid block, 24 positions) or "v2/v3" (mid block, 32 positions)
    block_out_channels: tuple[int, ...]
    layers_per_block: tuple[int, ...]
    transformer_layers: int
    max_frames: int
    has_mid_block: bool


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or pickle checkpoint (pickles with weights_only=True)."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise MotionModuleError(f"motion module file not found: {path}")
    try:
        if str(path).lower().endswith((".safetensors", ".sft")):
            import safetensors.torch

            sd = safetensors.torch.load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, not a checkpoint, unsafe pickle
        raise MotionModuleError(f"{name}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # some AnimateDiff releases wrap the tensors
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MotionModuleError(f"{name}: the file holds no tensor state dict")
    # Training wrappers (DataParallel) prefix keys with "module.".
    return {k.removeprefix("module."): v for k, v in sd.items()}


def infer_adapter_config(sd: dict[str, torch.Tensor], name: str) -> tuple[dict[str, Any], MotionModuleInfo]:
    """MotionAdapter kwargs and a summary, read off the tensor names and shapes."""
    if "controlnet_cond_embedding.conv_in.weight" in sd or "controlnet_cond_embedding.weight" in sd:
        raise MotionModuleError(
            f"{name} is a SparseCtrl ControlNet, not a motion module: load it with the ImageCondition node"
        )
    modules: dict[str, dict[int, set[int]]] = {"down_blocks": defaultdict(set), "up_blocks": defaultdict(set)}
    mid: set[int] = set()
    for key in sd:
        if m := _MM_KEY.match(key):
            modules[m.group(1)][int(m.group(2))].add(int(m.group(3)))
        elif m := _MID_KEY.match(key):
            mid.add(int(m.group(1)))
    down, up = modules["down_blocks"], modules["up_blocks"]
    if not down or not up:
        some = ", ".join(sorted(sd)[:3]) or "no tensors"
        raise MotionModuleError(
            f"{name} is not an AnimateDiff motion module: no 'down_blocks.N.motion_modules.M.temporal_transformer.*' "
            f"keys (found e.g. {some})"
        )
    n_blocks = len(down)
    if sorted(down) != list(range(n_blocks)) or sorted(up) != list(range(n_blocks)):
        raise MotionModuleError(f"{name}: down/up motion blocks are not contiguous: {sorted(down)} / {sorted(up)}")

    def prefix(kind: str, i: int, j: int) -> str:
        return f"{kind}.{i}.motion_modules.{j}.temporal_transformer."

    def channels(kind: str, i: int) -> int:
        key = prefix(kind, i, 0) + "proj_in.weight"
        if key not in sd:
            raise MotionModuleError(f"{name}: missing tensor {key}")
        return int(sd[key].shape[0])

    block_out = tuple(channels("down_blocks", i) for i in range(n_blocks))
    up_channels = tuple(channels("up_blocks", i) for i in range(n_blocks))
    if up_channels != tuple(reversed(block_out)):
        raise MotionModuleError(
            f"{name}: up-block channels {up_channels} do not mirror down-block channels {block_out}"
        )
    layers = tuple(len(down[i]) for i in range(n_blocks))
    for i in range(n_blocks):
        if len(up[n_blocks - 1 - i]) != layers[i] + 1:
            raise MotionModuleError(f"{name}: up block {n_blocks - 1 - i} should hold {layers[i] + 1} motion modules")
    tblocks = {int(k.split(".")[6]) for k in sd if k.startswith(prefix("down_blocks", 0, 0) + "transformer_blocks.")}
    pe_key = prefix("down_blocks", 0, 0) + "transformer_blocks.0.attention_blocks.0.pos_encoder.pe"
    if pe_key not in sd:
        raise MotionModuleError(f"{name}: missing positional encoding {pe_key}")
    max_frames = int(sd[pe_key].shape[1])
    for c in block_out:
        if c % ANIMATEDIFF_HEADS or c % 32:
            raise MotionModuleError(f"{name}: {c} channels is not a multiple of 32 (GroupNorm) and 8 heads")
    config = {
        "block_out_channels": block_out,
        "motion_layers_per_block": layers,
        "motion_transformer_layers_per_block": len(tblocks),
        "motion_mid_block_layers_per_block": max(len(mid), 1),
        "motion_transformer_layers_per_mid_block": len(tblocks),
        "motion_num_attention_heads": ANIMATEDIFF_HEADS,
        "motion_max_seq_length": max_frames,
        "use_motion_mid_block": bool(mid),
    }
    info = MotionModuleInfo(
        name=name,
        version="v2/v3" if mid else "v1",
        block_out_channels=block_out,
        layers_per_block=layers,
        transformer_layers=len(tblocks),
        max_frames=max_frames,
        has_mid_block=bool(mid),
    )
    return config, info


def to_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own conversion, plus the file's positional encodings.

    diffusers drops `pos_encoder.pe` and recomputes the sinusoid; we keep the file's
    table (identical for official files) so a module loads exactly as it was saved.
    """
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    converted = convert_animatediff_checkpoint_to_diffusers(sd)
    for key, value in sd.items():
        if key.endswith(".attention_blocks.0.pos_encoder.pe"):
            block = key.removesuffix(".attention_blocks.0.pos_encoder.pe").replace(".temporal_transformer", "")
            converted[f"{block}.pos_embed.pe"] = value
    return converted


def load_motion_adapter(path: str | os.PathLike):
    """Build a diffusers MotionAdapter from an original AnimateDiff checkpoint.

    Returns (adapter, info). Parameters are created outside inference mode so that the
    guidance can backpropagate through them inside a ComfyUI prompt run.
    """
    from diffusers import MotionAdapter

    name = os.path.basename(path)
    sd = read_state_dict(path)
    config, info = infer_adapter_config(sd, name)
    converted = to_diffusers_state_dict(sd)
    with torch.inference_mode(False):
        adapter = MotionAdapter(**config)
        missing, unexpected = adapter.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise MotionModuleError(
                f"{name}: tensors do not match an AnimateDiff {info.version} motion module "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        adapter.eval().requires_grad_(False)
    return adapter, info


def from_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the conversion: diffusers MotionAdapter keys -> original AnimateDiff keys.

    Used to write test and demo modules in the format users download.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key, count=1)
        if key.endswith(".pos_embed.pe"):
            base = key.removesuffix(".pos_embed.pe")
            for a in (0, 1):  # the original keeps one table per attention block
                out[f"{base}.attention_blocks.{a}.pos_encoder.pe"] = value.clone()
            continue
        key = (
            key.replace(".norm1", ".norms.0")
            .replace(".norm2", ".norms.1")
            .replace(".norm3", ".ff_norm")
            .replace(".attn1", ".attention_blocks.0")
            .replace(".attn2", ".attention_blocks.1")
        )
        out[key] = value
    return out
