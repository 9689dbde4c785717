"""A tiny Wan 2.1 T2V built from ComfyUI's own `comfy.ldm.wan.model.WanModel`, with seeded random weights.

Same architecture as Wan 2.1 T2V (patch (1, 2, 2), 16 latent channels, 3D RoPE, RMS-normed q/k,
text cross-attention), tiny widths: dim 48, 3 heads (head width 16, RoPE split [8, 4, 4] for time,
row, column), 4 blocks. A latent [1, 16, 3, 8, 12] (token grid 3 x 4 x 6) runs in milliseconds on a
CPU. The constructor call is the same in ComfyUI 0.3.75 and 0.33. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch

from ..tiny_models import init_weights_

# Wan 2.1 T2V 1.3B is dim 1536, 12 heads, ffn 8960, freq_dim 256, text_dim 4096 (umT5-XXL), 30 blocks.
TINY_WAN_CONFIG: dict[str, Any] = {
    "model_type": "t2v",
    "patch_size": (1, 2, 2),
    "text_len": 512,
    "in_dim": 16,
    "dim": 48,
    "ffn_dim": 64,
    "freq_dim": 32,
    "text_dim": 32,
    "out_dim": 16,
    "num_heads": 3,
    "num_layers": 4,
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}


def wan_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """WanModel keyword arguments from a config that may have been through JSON (patch_size as a list)."""
    return {**config, "patch_size": tuple(config.get("patch_size", (1, 2, 2)))}


def wan_module(config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """ComfyUI's `WanModel` for `config`, float32 with manual_cast ops (weights unset; `meta` gives shapes only)."""
    import comfy.ldm.wan.model
    import comfy.ops

    return comfy.ldm.wan.model.WanModel(**wan_kwargs(config), device=device, dtype=torch.float32,
                                        operations=comfy.ops.manual_cast)


def build_tiny_wan(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The bare diffusion model (`WanModel`, eval mode, float32, CPU); `overrides` change TINY_WAN_CONFIG entries.

    manual_cast ops, as ComfyUI uses when weights and compute dtypes may differ; they skip weight init,
    so every parameter is filled from `seed` (`tiny_models.init_weights_`).
    """
    with torch.inference_mode(False):  # weights usable under autograd even if built inside a ComfyUI node
        model = wan_module({**TINY_WAN_CONFIG, **overrides}, torch.device("cpu"))
        init_weights_(model, seed)
    return model.eval()


def tiny_wan_inputs(
    frames: int = 3,
    height: int = 8,
    width: int = 12,
    *,
    batch: int = 1,
    text_tokens: int = 7,
    text_dim: int = TINY_WAN_CONFIG["text_dim"],
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent [B, 16, T', H', W'], timestep [B] in 0..1000, context [B, L, text_dim]), seeded random."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY_WAN_CONFIG["in_dim"], frames, height, width, generator=gen)
    timestep = torch.full((batch,), 900.0)
    context = torch.randn(batch, text_tokens, text_dim, generator=gen)
    return x, timestep, context


def build_tiny_wan_model(seed: int = 0, **overrides: Any):
    """The same tiny Wan as a ComfyUI MODEL: a ModelPatcher around `comfy.model_base.WAN21` with the
    WAN21_T2V config (flow matching, shift 8, Wan21 latent format), as the core loaders build it."""
    return wan_model_patcher({**TINY_WAN_CONFIG, **overrides}, seed=seed)


def wan_model_patcher(config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None, seed: int = 0):
    """A ModelPatcher around `comfy.model_base.WAN21` (WAN21_T2V config) for WanModel keyword arguments
    `config`, with `state_dict` (the diffusion model's keys) or, without one, seeded random weights."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = {"image_model": "wan2.1", **wan_kwargs(config)}
    model_config = comfy.supported_models.WAN21_T2V(config)
    model_config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode(False):
        model = comfy.model_base.WAN21(model_config, device=torch.device("cpu"))
        if state_dict is None:
            init_weights_(model.diffusion_model, seed)
        else:
            model.diffusion_model.load_state_dict(state_dict, strict=True)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


# Wan 2.1's VAE (causal 3D convolutions, 16 latent channels, 8x spatial and 4x temporal compression) at a
# tiny base width; ComfyUI's VAE loader reads the width from the weights and fixes the rest (below).
TINY_WAN_VAE_DIM = 8
WAN21_VAE_FIXED: dict[str, Any] = {"z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                                   "temperal_downsample": [False, True, True], "dropout": 0.0}


def build_wan_vae(dim: int = TINY_WAN_VAE_DIM) -> torch.nn.Module:
    """ComfyUI's Wan 2.1 VAE module (`comfy.ldm.wan.vae.WanVAE`) at base width `dim`, weights unset."""
    import comfy.ldm.wan.vae

    return comfy.ldm.wan.vae.WanVAE(dim=dim, **WAN21_VAE_FIXED)


def init_wan_vae_(vae: torch.nn.Module, seed: int) -> None:
    """Seeded random weights; the RMS norms' scales start at 1, as trained ones roughly are."""
    init_weights_(vae, seed)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.fill_(1.0)
