"""Where AnimateDiff motion modules sit in ComfyUI's SD1.5-style UNet.

AnimateDiff puts one motion module after every (ResBlock, SpatialTransformer) pair of
the UNet, after the mid block's transformer, and before each upsampler. In ComfyUI's
`UNetModel` that is the end of each non-downsampling `input_blocks[i]`, index 2 of
`middle_block`, and just before the `Upsample` of `output_blocks[i]`. The diffusers name
of the module at each place (`up_blocks.1.motion_modules.0`, ...) is derived by walking
the blocks, so any SD1.5-style width or depth maps the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Child name of an injected motion module inside a block (see injection.py).
MOTION_MODULE_CHILD = "motion_module"


def original_layers(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """A block's own layers. Another clone's patched copy of the block may be in place
    while it is the loaded model; its injected motion module is not part of the UNet."""
    return [(name, layer) for name, layer in block.named_children() if name != MOTION_MODULE_CHILD]


@dataclass(frozen=True)
class MotionSlot:
    diffusers_name: str  # e.g. "up_blocks.1.motion_modules.2"
    block_path: str  # attribute path under the diffusion model, e.g. "output_blocks.5"
    insert_at: int  # position in that TimestepEmbedSequential
    channels: int


def _out_channels(block: torch.nn.Module) -> int:
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    for _, layer in original_layers(block):
        if isinstance(layer, ResBlock):
            return int(layer.out_channels)
    raise ValueError(f"block without ResBlock: {[type(layer).__name__ for layer in block]}")


def motion_slots(diffusion_model: torch.nn.Module) -> list[MotionSlot]:
    """Every motion-module place of a ComfyUI SD1.5-style UNet, in forward order."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    slots: list[MotionSlot] = []
    level, j = 0, 0
    for idx, block in enumerate(diffusion_model.input_blocks):
        layers = [layer for _, layer in original_layers(block)]
        if idx == 0:
            continue  # conv_in
        if isinstance(layers[0], Downsample):
            level, j = level + 1, 0
            continue
        slots.append(MotionSlot(f"down_blocks.{level}.motion_modules.{j}", f"input_blocks.{idx}", len(layers),
                                _out_channels(block)))
        j += 1
    mid = diffusion_model.middle_block
    after = [i for i, (_, layer) in enumerate(original_layers(mid)) if isinstance(layer, SpatialTransformer)]
    mid_at = after[0] + 1 if after else 1
    slots.append(MotionSlot("mid_block.motion_modules.0", "middle_block", mid_at, _out_channels(mid)))
    level, j = 0, 0
    for idx, block in enumerate(diffusion_model.output_blocks):
        layers = [layer for _, layer in original_layers(block)]
        ups = [i for i, layer in enumerate(layers) if isinstance(layer, Upsample)]
        insert_at = ups[0] if ups else len(layers)
        slots.append(MotionSlot(f"up_blocks.{level}.motion_modules.{j}", f"output_blocks.{idx}", insert_at,
                                _out_channels(block)))
        j += 1
        if ups:
            level, j = level + 1, 0
    return slots
