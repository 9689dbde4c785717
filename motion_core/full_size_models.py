"""Full-size SD1.5 + AnimateDiff v3 stand-ins with random weights, for tests and the real-scale benchmark.

No weights can be downloaded here, so the shapes and key names users load are rebuilt in process:
ComfyUI's own SD1.5 UNet (its detected SD1.5 config: 320 channels, 768-wide text context, 8 heads),
an AnimateDiff v3 motion module in the key format of `v3_sd15_mm.ckpt` (diffusers' MotionAdapter
defaults are exactly that layout: channels 320/640/1280/1280, two motion modules per down level,
three per up level, a mid-block module, 8 heads, 32 positions) and an AnimateDiff v3 SparseCtrl in
the key format of `v3_sd15_sparsectrl_rgb.ckpt`. Same builders as the tiny models, other widths.
"""

from __future__ import annotations

import torch

from .tiny_models import TINY_SD15_UNET_CONFIG, build_tiny_sd15_model, write_tiny_motion_module, write_tiny_sparsectrl

# What ComfyUI's model detection gives for an SD1.5 checkpoint (the tiny config at full width).
SD15_UNET_CONFIG = {**TINY_SD15_UNET_CONFIG, "model_channels": 320, "context_dim": 768, "image_size": 64}
SD15_CONTEXT_DIM = 768
V3_MOTION_CHANNELS = (320, 640, 1280, 1280)
V3_MAX_FRAMES = 32
SPARSECTRL_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' default, used by the scribble variant


def build_sd15_model(seed: int = 0):
    """A ComfyUI MODEL with a full-size SD1.5 UNet (about 860 M parameters, random weights)."""
    return build_tiny_sd15_model(seed, unet_config=SD15_UNET_CONFIG)


def write_v3_motion_module(path, *, seed: int = 0, dtype: torch.dtype | None = torch.float16) -> str:
    """A random motion module with the tensors and key names of `v3_sd15_mm.ckpt` (float16 by default)."""
    return write_tiny_motion_module(path, seed=seed, block_out_channels=V3_MOTION_CHANNELS, max_frames=V3_MAX_FRAMES,
                                    mid_block=True, dtype=dtype)


def write_v3_sparsectrl(path, *, variant: str = "rgb", seed: int = 0,
                        dtype: torch.dtype | None = torch.float16) -> str:
    """A random SparseCtrl with the tensors and key names of `v3_sd15_sparsectrl_<variant>.ckpt`."""
    return write_tiny_sparsectrl(path, variant=variant, seed=seed, block_out_channels=V3_MOTION_CHANNELS,
                                 cross_attention_dim=SD15_CONTEXT_DIM, max_frames=V3_MAX_FRAMES,
                                 embedding_channels=SPARSECTRL_EMBEDDING_CHANNELS, dtype=dtype)
