"""Apply AnimateDiff motion modules to a ComfyUI MODEL without touching the input MODEL.

The returned MODEL is a ModelPatcher clone whose object patches replace the affected
`TimestepEmbedSequential` blocks by copies that hold the *same* original layers plus a
`MotionModuleLayer`. ComfyUI swaps those blocks in when it loads the clone and restores
the originals when it unloads it, so the shared UNet is only ever changed while the clone
is the model being run. Original layers keep their names ("output_blocks.5.2" is still
the upsampler), so LoRA/weight patches keep working.

`MotionModuleLayer` is called through the `forward_timestep_embed_patch` hook, which
hands it `transformer_options`: the frame count is the latent batch divided by the number
of cond/uncond chunks ComfyUI stacked into this forward, so frames of different branches
never attend to each other.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from .attention_capture import CaptureState, TemporalAttnProcessor, check_plain_temporal_attention
from .inference_tensors import follow_device_and_dtype
from .motion_module import MotionModuleError, MotionModuleInfo
from .unet_layout import MOTION_MODULE_CHILD, MotionSlot, motion_slots, original_layers

CAPTURE_KEY = "motionclone_capture"  # transformer_options entry holding a CaptureState
INFO_KEY = "motionclone_motion_module"  # transformer_options entry: MotionModuleInfo + layer names


class MotionModuleLayer(torch.nn.Module):
    """One AnimateDiff temporal transformer placed inside a UNet block."""

    def __init__(self, module: torch.nn.Module, name: str, max_frames: int) -> None:
        super().__init__()
        self.module = module
        self.name = name
        self.max_frames = max_frames

    def forward(self, x: torch.Tensor, frames: int | None = None, capture: CaptureState | None = None) -> torch.Tensor:
        frames = x.shape[0] if frames is None else frames
        if frames > self.max_frames:
            raise ValueError(
                f"{frames} frames in the latent batch, but the motion module supports at most {self.max_frames}"
            )
        param = next(self.module.parameters())
        if param.device != x.device or param.dtype != x.dtype:
            # Follow ComfyUI's device/dtype choice (e.g. a float16 UNet on the GPU).
            follow_device_and_dtype(self.module, x.device, x.dtype)
        kwargs = {"motionclone": capture} if capture is not None else None
        return self.module(x, num_frames=frames, cross_attention_kwargs=kwargs)


def _run_motion_module(layer: MotionModuleLayer, x, emb, context, transformer_options, *args) -> torch.Tensor:
    cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
    chunks = len(cond_or_uncond)
    if x.shape[0] % chunks:
        raise ValueError(f"batch of {x.shape[0]} does not split into {chunks} cond/uncond chunks")
    capture = transformer_options.get(CAPTURE_KEY)
    if capture is not None and capture.measure_only:
        # ComfyUI may run cond and uncond in separate forwards: measure the one with the prompt.
        if 0 not in cond_or_uncond:
            capture = None
        else:
            capture.chunks = cond_or_uncond
    return layer(x, frames=x.shape[0] // chunks, capture=capture)


def _adapter_module(adapter, diffusers_name: str) -> torch.nn.Module | None:
    parts = diffusers_name.split(".")
    if parts[0] == "mid_block":
        return adapter.mid_block.motion_modules[int(parts[2])] if adapter.mid_block is not None else None
    kind, i, _, j = parts
    blocks = getattr(adapter, kind)
    if int(i) >= len(blocks) or int(j) >= len(blocks[int(i)].motion_modules):
        return None
    return blocks[int(i)].motion_modules[int(j)]


def _check_fit(slots: list[MotionSlot], adapter, info: MotionModuleInfo) -> None:
    down = [s for s in slots if s.diffusers_name.startswith("down_blocks")]
    unet_levels = list(dict.fromkeys(s.diffusers_name.split(".")[1] for s in down))
    levels = [next(s.channels for s in down if s.diffusers_name.split(".")[1] == lv) for lv in unet_levels]
    if len(info.block_out_channels) != len(unet_levels):
        hint = " (an SDXL motion module?)" if len(info.block_out_channels) == 3 else ""
        raise MotionModuleError(
            f"{info.name} does not fit this model: it has {len(info.block_out_channels)} down blocks with channels "
            f"{list(info.block_out_channels)}{hint}, the model's UNet has {len(unet_levels)} levels with channels "
            f"{levels}"
        )
    for slot in slots:
        module = _adapter_module(adapter, slot.diffusers_name)
        if module is None:
            if slot.diffusers_name.startswith("mid_block"):
                continue  # v1 modules have no mid-block motion module
            raise MotionModuleError(f"{info.name} does not fit this model: no motion module {slot.diffusers_name}")
        width = module.proj_in.in_features
        if width != slot.channels:
            raise MotionModuleError(
                f"{info.name} does not fit this model: {slot.diffusers_name} has {width} channels but the UNet's "
                f"{slot.block_path} has {slot.channels} (motion module for channels {list(info.block_out_channels)}, "
                f"UNet levels {levels})"
            )


def install_processors(adapter) -> list[str]:
    """Put TemporalAttnProcessor on every temporal attention; returns their layer names."""
    names = []
    for prefix, module in adapter.named_modules():
        if type(module).__name__ != "Attention":
            continue
        check_plain_temporal_attention(module, prefix)
        module.set_processor(TemporalAttnProcessor(prefix))
        names.append(prefix)
    return names


def apply_motion_modules(model, adapter, info: MotionModuleInfo, attention_layers: list[str]):
    """A clone of `model` (ComfyUI ModelPatcher) running `adapter`'s motion modules."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

    if INFO_KEY in model.model_options["transformer_options"]:
        raise MotionModuleError("this MODEL already has motion modules applied")
    patched = model.clone()
    slots = motion_slots(patched.get_model_object("diffusion_model"))
    _check_fit(slots, adapter, info)
    import comfy.model_management

    by_block: dict[str, list[MotionSlot]] = defaultdict(list)
    for slot in slots:
        if _adapter_module(adapter, slot.diffusers_name) is not None:
            by_block[slot.block_path].append(slot)
    added_bytes = 0
    for path, block_slots in by_block.items():
        (slot,) = block_slots  # AnimateDiff places one motion module per block
        original = original_layers(patched.get_model_object(f"diffusion_model.{path}"))
        layer = MotionModuleLayer(_adapter_module(adapter, slot.diffusers_name), slot.diffusers_name, info.max_frames)
        added_bytes += comfy.model_management.module_size(layer)
        block = TimestepEmbedSequential()
        for i, (name, child) in enumerate(original):
            if i == slot.insert_at:
                block.add_module(MOTION_MODULE_CHILD, layer)
            block.add_module(name, child)  # same names: weight patches keep their keys
        if slot.insert_at == len(original):
            block.add_module(MOTION_MODULE_CHILD, layer)
        patched.add_object_patch(f"diffusion_model.{path}", block)
    # ComfyUI plans loading and offloading with model_size(), measured on the bare model: count the
    # injected modules too (the clone carries the size on to its own clones).
    patched.size = patched.model_size() + added_bytes
    patched.set_model_forward_timestep_embed_patch((MotionModuleLayer, _run_motion_module))
    options: dict[str, Any] = patched.model_options["transformer_options"]
    options[INFO_KEY] = {"info": info, "attention_layers": list(attention_layers)}
    return patched
