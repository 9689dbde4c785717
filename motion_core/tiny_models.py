"""Tiny SD1.5-architecture models built from real ComfyUI classes.

Used by the tests, the smoke/demo runs and benchmarks: same block layout as SD1.5 (four
levels, attention on the first three, one transformer per block, 8 heads), tiny widths,
so a forward pass takes milliseconds on a CPU. Nothing here is downloaded.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

# What ComfyUI's model detection yields for SD1.5, with widths shrunk (320 -> 32, 768 -> 32).
TINY_SD15_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "legacy": False,
    "context_dim": 32,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def init_weights_(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Deterministic random init (ComfyUI's ops skip weight init: weights start empty)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * std * 0.1)
            elif "norm" in name and param.ndim == 1:
                param.copy_(1.0 + torch.randn(param.shape, generator=gen) * std)
            else:
                fan_in = param[0].numel() if param.ndim > 1 else param.numel()
                param.copy_(torch.randn(param.shape, generator=gen) / max(fan_in, 1) ** 0.5)


PREDICTIONS = ("eps", "v")


def build_tiny_sd15_model(
    seed: int = 0,
    unet_config: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    prediction: str = "eps",
):
    """A ComfyUI MODEL (ModelPatcher around comfy.model_base.BaseModel, SD1.5 class).

    With `state_dict` (keys as in `diffusion_model.*` without that prefix) the weights
    are loaded strictly; otherwise they are random from `seed`. `prediction` is the
    parameterisation: "eps" (SD1.5) or "v" (as SD2-768 and v-prediction SD1.5 fine-tunes).
    """
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    config = copy.deepcopy(unet_config or TINY_SD15_UNET_CONFIG)
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(torch.float32, None)
    # What model_config.get_model does, with the model type chosen here instead of guessed from weights.
    model_type = comfy.model_base.ModelType.EPS if prediction == "eps" else comfy.model_base.ModelType.V_PREDICTION
    model = comfy.model_base.BaseModel(model_config, model_type=model_type, device=torch.device("cpu"))
    if state_dict is None:
        init_weights_(model.diffusion_model, seed)
    else:
        model.diffusion_model.load_state_dict(state_dict, strict=True)
    model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=device, offload_device=comfy.model_management.unet_offload_device()
    )


TINY_MOTION_CHANNELS = (32, 64, 128, 128)


def _save_tensors(tensors: dict[str, torch.Tensor], path) -> str:
    """As users download them: safetensors, or a plain torch pickle for `.ckpt`/`.pt`."""
    path = str(path)
    if path.endswith(".safetensors"):
        import safetensors.torch

        safetensors.torch.save_file(tensors, path)
    else:
        torch.save(tensors, path)
    return path


def write_tiny_motion_module(
    path, *, seed: int = 0, block_out_channels: tuple[int, ...] = TINY_MOTION_CHANNELS,
    max_frames: int = 32, mid_block: bool = True, std: float = 0.05, dtype: torch.dtype | None = None,
):
    """Write a random motion module in the *original AnimateDiff* key format (safetensors
    or, for a `.ckpt`/`.pt` path, a torch pickle of plain tensors).

    Made with diffusers' MotionAdapter at tiny widths, then converted back to the original
    keys (`...temporal_transformer...attention_blocks.0.pos_encoder.pe`), so loading it
    exercises the same conversion as a downloaded `v3_sd15_mm.ckpt`. AnimateDiff zero-
    initialises `proj_out`; a random one here makes the module actually mix frames.
    """
    from diffusers import MotionAdapter

    from .motion_module import from_diffusers_state_dict

    with torch.inference_mode(False):
        adapter = MotionAdapter(
            block_out_channels=tuple(block_out_channels),
            motion_max_seq_length=max_frames,
            use_motion_mid_block=mid_block,
        )
        init_weights_(adapter, seed, std=std)  # parameters only: the sinusoid tables stay
        sd = {k: v.detach().to(dtype or v.dtype, copy=True).contiguous() for k, v in adapter.state_dict().items()}
    return _save_tensors(from_diffusers_state_dict(sd), path)


def write_tiny_sparsectrl(
    path, *, variant: str, seed: int = 0, block_out_channels: tuple[int, ...] = TINY_MOTION_CHANNELS,
    cross_attention_dim: int = 32, max_frames: int = 32, embedding_channels: tuple[int, ...] = (8, 16, 16, 32),
    std: float = 0.05, dtype: torch.dtype | None = None,
):
    """Write a random AnimateDiff v3 SparseCtrl ("rgb" or "scribble") in the *original* key format.

    Built as diffusers' SparseControlNetModel at the tiny SD1.5 widths (8 heads, motion modules
    with one attention block, mask channel concatenated; rgb: simplified latent embedding,
    scribble: 8x-downscaling pixel embedding of `embedding_channels`), then converted back to
    the keys of `v3_sd15_sparsectrl_*.ckpt`. The zero-initialised output convs are random here
    so the residuals are not zero.
    """
    from diffusers import SparseControlNetModel

    from .sparsectrl import from_diffusers_state_dict

    if variant not in ("rgb", "scribble"):
        raise ValueError(f"variant must be 'rgb' or 'scribble', got {variant!r}")
    with torch.inference_mode(False):
        net = SparseControlNetModel(
            conditioning_channels=4 if variant == "rgb" else 3,
            use_simplified_condition_embedding=variant == "rgb",
            conditioning_embedding_out_channels=tuple(embedding_channels),
            block_out_channels=tuple(block_out_channels),
            # SD1.5's layout at any depth: cross-attention on every level but the last
            down_block_types=("CrossAttnDownBlockMotion",) * (len(block_out_channels) - 1) + ("DownBlockMotion",),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            motion_num_attention_heads=8,
            motion_max_seq_length=max_frames,
        )
        init_weights_(net, seed, std=std)  # parameters only: the sinusoid tables stay
        sd = {k: v.detach().to(dtype or v.dtype, copy=True).contiguous() for k, v in net.state_dict().items()}
    return _save_tensors(from_diffusers_state_dict(sd), path)
