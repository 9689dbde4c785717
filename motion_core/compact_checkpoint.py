"""Compact checkpoints: SD1.5-layout `.safetensors` files that carry their own architecture.

ComfyUI's checkpoint detection only recognises real SD1.5 widths (320/768), so a tiny
SD1.5-architecture model cannot go through CheckpointLoaderSimple. A compact checkpoint
uses ComfyUI's SD1.5 key layout (`model.diffusion_model.*`,
`cond_stage_model.transformer.text_model.*`, `first_stage_model.*`) and stores the
configs in the safetensors metadata entry `motionclone.architecture` (JSON):

    {"format": 1, "unet": <unet_config>, "clip": <CLIP text config>, "vae": {"ddconfig": ..., "embed_dim": 4}}

plus an optional "prediction": "eps" (the default, SD1.5) or "v" (v-prediction).

A Wan 2.1 compact checkpoint (`"family": "wan2.1"`; without it the family is SD1.5) holds a
`comfy.ldm.wan.model.WanModel` (its keyword arguments as "unet", keys under the same UNet prefix), the
same tiny CLIP text encoder as the text conditioning (its width is the model's `text_dim`), and a Wan
2.1 VAE ("vae": {"dim": base width}). ComfyUI's Wan text encoder is a fixed-size umT5-XXL and its
model detection fixes Wan's text width at 4096, so a tiny Wan cannot go through the core loaders;
this one builds the same classes (WAN21 model, comfy.sd.VAE's own Wan 2.1 detection).

Loading builds real ComfyUI objects (ModelPatcher around comfy.model_base.BaseModel,
comfy.sd.CLIP with comfy.sd1_clip classes, comfy.sd.VAE with AutoencoderKL), so the
result works with every stock node (CLIPTextEncode, KSampler, VAEDecode, ...).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .tiny_models import PREDICTIONS, TINY_SD15_UNET_CONFIG, build_tiny_sd15_model, init_weights_

ARCHITECTURE_METADATA_KEY = "motionclone.architecture"
FORMAT_VERSION = 1
SD15_FAMILY, WAN_FAMILY = "sd15", "wan2.1"

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model."
VAE_PREFIX = "first_stage_model."
# comfy.sd1_clip.SD1ClipModel names its single text encoder "clip_l".
_CLIP_MODULE_PREFIX = "clip_l."
# Present in the module but never written by ComfyUI's SD1.5 saving (SD1 uses the unprojected pooled output).
_CLIP_UNSAVED = ("clip_l.logit_scale", "clip_l.transformer.text_projection.weight")

# CLIP-L text config (comfy/sd1_clip_config.json) shrunk to 32 wide; vocab stays 49408 because
# comfy.clip_model.CLIPEmbeddings and the bundled SD1 tokenizer fix it.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 49407,
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 1,
    "projection_dim": 32,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}

# SD's AutoencoderKL with narrow channels; four levels keep ComfyUI's assumed 8x downscale and 4 latent channels.
TINY_VAE_CONFIG: dict[str, Any] = {
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    "embed_dim": 4,
}


def tiny_architecture() -> dict[str, Any]:
    """The architecture dict of `write_tiny_checkpoint` (a fresh copy)."""
    return copy.deepcopy(
        {"format": FORMAT_VERSION, "unet": TINY_SD15_UNET_CONFIG, "clip": TINY_CLIP_CONFIG, "vae": TINY_VAE_CONFIG}
    )


def tiny_wan_architecture() -> dict[str, Any]:
    """The architecture dict of `write_tiny_wan_checkpoint` (a fresh copy)."""
    from .dit.wan_tiny import TINY_WAN_CONFIG, TINY_WAN_VAE_DIM

    unet = {**TINY_WAN_CONFIG, "patch_size": list(TINY_WAN_CONFIG["patch_size"])}
    return copy.deepcopy({"format": FORMAT_VERSION, "family": WAN_FAMILY, "unet": unet, "clip": TINY_CLIP_CONFIG,
                          "vae": {"dim": TINY_WAN_VAE_DIM}})


def family_of(architecture: dict[str, Any]) -> str:
    return architecture.get("family", SD15_FAMILY)


def read_architecture(path: str | Path) -> dict[str, Any]:
    """The validated architecture dict of a compact checkpoint (reads only the file header).

    Raises ValueError if `path` is not a compact checkpoint or its metadata is unusable.
    """
    import safetensors

    path = Path(path)
    not_compact = (
        f"{path}: not a MotionClone compact checkpoint (expected a .safetensors file with "
        f"'{ARCHITECTURE_METADATA_KEY}' metadata). Load normal SD checkpoints with ComfyUI's "
        "'Load Checkpoint' node (CheckpointLoaderSimple)."
    )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for non-safetensors files
        raise ValueError(f"{not_compact} ({e})") from e
    raw = metadata.get(ARCHITECTURE_METADATA_KEY)
    if raw is None:
        raise ValueError(not_compact)
    try:
        architecture = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: '{ARCHITECTURE_METADATA_KEY}' metadata is not valid JSON: {e}") from e
    _validate_architecture(architecture, path)
    return architecture


def load_compact_checkpoint(path: str | Path) -> tuple[Any, Any, Any]:
    """Load a compact checkpoint as (MODEL ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE).

    Every tensor must match the architecture in the metadata (no missing, extra or
    misshaped keys); otherwise a ValueError names the file and the offending keys.
    """
    import comfy.sd
    import comfy.utils

    path = Path(path)
    architecture = read_architecture(path)
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    _check_weights(path, _expected_shapes(architecture, path), sd)

    clip = build_clip(architecture["clip"], _strip(sd, CLIP_PREFIX))
    if family_of(architecture) == WAN_FAMILY:
        from .dit.wan_tiny import wan_model_patcher

        unet_sd = {k: v.float() for k, v in _strip(sd, UNET_PREFIX).items()}
        # comfy.sd.VAE recognises a Wan 2.1 VAE from its keys and reads its width from them.
        return wan_model_patcher(architecture["unet"], unet_sd), clip, comfy.sd.VAE(sd=_strip(sd, VAE_PREFIX))
    model = build_tiny_sd15_model(unet_config=architecture["unet"], state_dict=_strip(sd, UNET_PREFIX),
                                  prediction=architecture.get("prediction", "eps"))
    vae = comfy.sd.VAE(sd=_strip(sd, VAE_PREFIX), config={"params": copy.deepcopy(architecture["vae"])})
    return model, clip, vae


def save_compact_checkpoint(
    path: str | Path,
    model: Any,
    clip: Any,
    vae: Any,
    architecture: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write MODEL/CLIP/VAE as a compact checkpoint with `architecture` in its metadata.

    Keys follow ComfyUI's own SD1.5 saving (comfy.sd.save_checkpoint), patches on the
    ModelPatcher included. `dtype` casts floating tensors (e.g. float16 to halve the
    file); None keeps each tensor's dtype. The tensors are checked against
    `architecture` before writing, so the file is guaranteed to load.
    """
    path = Path(path)
    _validate_architecture(architecture, path)
    return _write_checked(path, _state_dict_for_saving(model, clip, vae), architecture, dtype)


def _write_checked(path: Path, sd: dict[str, torch.Tensor], architecture: dict[str, Any],
                   dtype: torch.dtype | None) -> Path:
    """Cast floating tensors to `dtype` (None: as they are), check them against `architecture`, write the file."""
    import comfy.utils

    for key, tensor in sd.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        sd[key] = tensor.contiguous()
    _check_weights(path, _expected_shapes(architecture, path), sd)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(sd, str(path), metadata={ARCHITECTURE_METADATA_KEY: json.dumps(architecture)})
    return path


def _state_dict_for_saving(model: Any, clip: Any, vae: Any) -> dict[str, torch.Tensor]:
    """What comfy.sd.save_checkpoint writes for MODEL/CLIP/VAE, on the host's own API.

    Newer ComfyUI (0.33 tested) builds it on the ModelPatcher, which computes patched weights per
    layer (`ModelPatcher.state_dict_for_saving`; `BaseModel.state_dict_for_saving` then takes the UNet
    state dict first). ComfyUI 0.3.x patches the weights in while loading and reads the BaseModel.
    """
    import comfy.model_management

    clip_patcher = clip.load_model()
    vae_sd = vae.get_sd()
    if hasattr(model, "state_dict_for_saving"):
        clip_sd = clip.state_dict_for_saving()
        comfy.model_management.load_models_gpu([model, clip_patcher])
        return model.state_dict_for_saving(clip_sd, vae_sd)
    clip_sd = clip.get_sd()
    comfy.model_management.load_models_gpu([model, clip_patcher], force_patch_weights=True)
    return model.model.state_dict_for_saving(clip_sd, vae_sd)


def write_tiny_checkpoint(path: str | Path, *, seed: int = 0) -> Path:
    """Write a compact checkpoint of the tiny SD1.5 architecture with seeded random weights.

    Stored as float16 (about 22 MB); the same seed always gives the same file contents.
    """
    import comfy.sd

    architecture = tiny_architecture()
    model = build_tiny_sd15_model(seed, unet_config=architecture["unet"])
    clip = build_clip(architecture["clip"], None)
    init_weights_(clip_text_model(clip).transformer.text_model, seed + 1)
    vae_module = build_vae(architecture["vae"])
    init_weights_(vae_module, seed + 2)
    vae = comfy.sd.VAE(sd=vae_module.state_dict(), config={"params": copy.deepcopy(architecture["vae"])})
    return save_compact_checkpoint(path, model, clip, vae, architecture, dtype=torch.float16)


def write_tiny_wan_checkpoint(path: str | Path, *, seed: int = 0) -> Path:
    """Write a compact checkpoint of a tiny Wan 2.1 T2V (dit/wan_tiny.py), the tiny CLIP as its text encoder
    and a tiny Wan 2.1 VAE, with seeded random weights, as float16 (about 5 MB, most of it the CLIP's
    vocabulary)."""
    from .dit.wan_tiny import build_tiny_wan, build_wan_vae, init_wan_vae_

    architecture = tiny_wan_architecture()
    unet = build_tiny_wan(seed)
    clip = build_clip(architecture["clip"], None)
    init_weights_(clip_text_model(clip).transformer.text_model, seed + 1)
    vae = build_wan_vae(architecture["vae"]["dim"])
    init_wan_vae_(vae, seed + 2)
    sd = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    sd.update({CLIP_PREFIX + k.removeprefix(_CLIP_MODULE_PREFIX): v for k, v in clip.get_sd().items()
               if k not in _CLIP_UNSAVED})
    sd.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    return _write_checked(Path(path), sd, architecture, torch.float16)


# --- internals ---------------------------------------------------------------------------------


def _validate_architecture(architecture: Any, path: Path) -> None:
    def fail(why: str) -> None:
        raise ValueError(f"{path}: invalid '{ARCHITECTURE_METADATA_KEY}' metadata: {why}")

    if not isinstance(architecture, dict):
        fail("expected a JSON object")
    if architecture.get("format") != FORMAT_VERSION:
        fail(f"unsupported format {architecture.get('format')!r} (this version reads format {FORMAT_VERSION})")
    for part in ("unet", "clip", "vae"):
        if not isinstance(architecture.get(part), dict):
            fail(f"'{part}' must be an object")
    family = family_of(architecture)
    if family not in (SD15_FAMILY, WAN_FAMILY):
        fail(f"unknown 'family' {family!r} (this version reads {SD15_FAMILY!r} and {WAN_FAMILY!r})")
    if family == WAN_FAMILY:
        unet, clip, vae = architecture["unet"], architecture["clip"], architecture["vae"]
        if not isinstance(vae.get("dim"), int) or vae["dim"] < 1:
            fail("a Wan 2.1 'vae' needs its base width 'dim' (a positive integer)")
        if unet.get("in_dim") != 16 or unet.get("out_dim") != 16 or unet.get("model_type", "t2v") != "t2v":
            fail("a Wan 2.1 'unet' is a text-to-video WanModel with in_dim and out_dim 16 (the Wan 2.1 VAE's latent)")
        if clip.get("hidden_size") != unet.get("text_dim"):
            fail(f"clip hidden_size {clip.get('hidden_size')} != unet text_dim {unet.get('text_dim')}")
        return
    if architecture.get("prediction", "eps") not in PREDICTIONS:
        fail(f"'prediction' must be one of {PREDICTIONS} (default 'eps'), got {architecture['prediction']!r}")
    unet, clip, vae = architecture["unet"], architecture["clip"], architecture["vae"]
    if not isinstance(vae.get("ddconfig"), dict) or "embed_dim" not in vae:
        fail("'vae' needs 'ddconfig' and 'embed_dim'")
    # comfy.sd.VAE hard-codes 8x downscale and 4 latent channels for AutoencoderKL configs.
    if len(vae["ddconfig"].get("ch_mult", [])) != 4 or vae["embed_dim"] != 4:
        fail("'vae' must have 4 levels in ddconfig.ch_mult (8x downscale) and embed_dim 4")
    if unet.get("in_channels") != vae["embed_dim"] or unet.get("out_channels") != vae["embed_dim"]:
        fail(f"unet in/out_channels must equal the VAE's embed_dim {vae['embed_dim']}")
    if clip.get("hidden_size") != unet.get("context_dim"):
        fail(f"clip hidden_size {clip.get('hidden_size')} != unet context_dim {unet.get('context_dim')}")


def _expected_shapes(architecture: dict[str, Any], path: Path) -> dict[str, torch.Size]:
    """Key -> shape of every tensor a file with this architecture holds (modules built on 'meta')."""
    import comfy.supported_models

    meta = torch.device("meta")
    try:
        if family_of(architecture) == WAN_FAMILY:
            from .dit.wan_tiny import build_wan_vae, wan_module

            unet = wan_module(architecture["unet"], meta)
            with meta:
                vae = build_wan_vae(architecture["vae"]["dim"])
        else:
            model_config = comfy.supported_models.SD15(copy.deepcopy(architecture["unet"]))
            model_config.set_inference_dtype(torch.float32, None)
            unet = model_config.get_model({}, device=meta).diffusion_model
            with meta:
                vae = build_vae(architecture["vae"])
        clip = _clip_model_factory(architecture["clip"])(device=meta)
    except Exception as e:  # bad config values surface as assorted errors deep in ComfyUI
        raise ValueError(f"{path}: cannot build the model from its '{ARCHITECTURE_METADATA_KEY}' metadata: {e}") from e
    shapes = {UNET_PREFIX + k: v.shape for k, v in unet.state_dict().items()}
    saved_clip = {k: v for k, v in clip.state_dict().items() if _CLIP_MODULE_PREFIX + k not in _CLIP_UNSAVED}
    shapes.update({CLIP_PREFIX + k: v.shape for k, v in saved_clip.items()})
    shapes.update({VAE_PREFIX + k: v.shape for k, v in vae.state_dict().items()})
    if architecture.get("prediction") == "v":
        shapes["v_pred"] = torch.Size([0])  # ComfyUI's own marker of v-prediction checkpoints (state_dict_for_saving)
    return shapes


def _check_weights(path: Path, expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    wrong = sorted(k for k in expected if k in found and found[k].shape != expected[k])
    if not (missing or unexpected or wrong):
        return

    def listing(keys: list[str], describe=lambda k: k) -> str:
        shown = ", ".join(describe(k) for k in keys[:5])
        return shown + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    def shapes(k: str) -> str:
        return f"{k} is {list(found[k].shape)} in the file, {list(expected[k])} in the architecture"

    problems = []
    if wrong:
        problems.append("shape mismatch: " + listing(wrong, shapes))
    if missing:
        problems.append(f"{len(missing)} missing: {listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {listing(unexpected)}")
    raise ValueError(
        f"{path}: weights do not match the architecture in its '{ARCHITECTURE_METADATA_KEY}' metadata; "
        + "; ".join(problems)
    )


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _clip_model_factory(config: dict[str, Any]):
    """What comfy.sd1_clip.SD1ClipModel calls as `clip_model`: an SDClipModel with our text config."""
    import comfy.sd1_clip

    def build(device: Any = "cpu", dtype: torch.dtype | None = None, model_options: dict | None = None):
        # Same flags as comfy.sd1_clip.SD1CheckpointClipModel (SD1 conditions on the unprojected pooled output).
        return comfy.sd1_clip.SDClipModel(
            device=device,
            dtype=dtype,
            model_options=model_options or {},
            textmodel_json_config=copy.deepcopy(config),  # SDClipModel may write overrides into it
            return_projected_pooled=False,
        )

    return build


def _clip_target(config: dict[str, Any]):
    import comfy.sd1_clip
    import comfy.supported_models_base

    tokenizer = functools.partial(
        comfy.sd1_clip.SD1Tokenizer,
        tokenizer=functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=config["hidden_size"]),
    )
    target = comfy.supported_models_base.ClipTarget(tokenizer, comfy.sd1_clip.SD1ClipModel)
    target.params = {"clip_model": _clip_model_factory(config)}
    return target


def clip_text_model(clip: Any) -> Any:
    """The SD1 text model (comfy.sd1_clip.SDClipModel) inside a comfy.sd.CLIP."""
    return clip.cond_stage_model.clip_l


def build_clip(config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None) -> Any:
    """comfy.sd.CLIP for `config`; `state_dict` keys as under `cond_stage_model.` (already validated)."""
    import comfy.sd
    import comfy.utils

    parameters = comfy.utils.calculate_parameters(state_dict) if state_dict else 0
    clip = comfy.sd.CLIP(_clip_target(config), parameters=parameters)
    projection = clip_text_model(clip).transformer.text_projection.weight
    with torch.no_grad():
        # Not stored in SD1 checkpoints and unused; identity instead of uninitialised memory.
        projection.copy_(torch.eye(projection.shape[0], dtype=projection.dtype))
    if state_dict is not None:
        clip.load_sd({_CLIP_MODULE_PREFIX + k: v for k, v in state_dict.items()}, full_model=True)
    return clip


def build_vae(config: dict[str, Any]) -> torch.nn.Module:
    """ComfyUI's AutoencoderKL for an architecture's `vae` config (random weights)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(**copy.deepcopy(config))
