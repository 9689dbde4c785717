"""AnimateDiff v3 SparseCtrl (RGB / scribble) applied through ComfyUI's ControlNet mechanism.

Loading: an original SparseCtrl file (`v3_sd15_sparsectrl_rgb.ckpt`, `..._scribble.ckpt`, or a
`.safetensors` of the same tensors) is read with `motion_module.read_state_dict`, its
diffusers config is inferred from the tensors, and the keys are mapped with diffusers' own
single-file conversion (`convert_animatediff_checkpoint_to_diffusers`, the mapping diffusers
registers for `SparseControlNetModel`) into diffusers' `SparseControlNetModel`.

Applying: `SparseCtrlControl` is a `comfy.controlnet.ControlBase`. For a batch of
`chunks * frames` latents it runs the SparseCtrl network once per cond/uncond chunk with the
condition (RGB: the image's latent; scribble: the image) at the chosen frame indices, zeros
elsewhere, plus a 1-channel mask of the conditioned frames. diffusers zeroes the noisy sample
input itself (SparseCtrl ignores it). The residuals come back as core ControlNets return
them: `{"input": [], "middle": [mid], "output": [12 skip residuals, first input block first]}`.

`LatentAnchorControl` is the `latent_anchor` mode: no network; the model's denoised (x0)
prediction of the chosen frames is blended toward the image's latent (see docs/image-to-video.md).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import comfy.controlnet  # this module is host-specific: the controls subclass ComfyUI's ControlBase
import torch

from .errors import MotionCloneError
from .motion_module import MotionModuleError, read_state_dict
from .motion_module import from_diffusers_state_dict as _motion_from_diffusers
from .motion_module import to_diffusers_state_dict as _motion_to_diffusers

# SD1.5 (and its ControlNets) use 8 attention heads everywhere; head count changes no tensor shape.
SD15_HEADS = 8
# v3 SparseCtrl motion modules use a position table of 32; used when a file omits `pos_encoder.pe`.
DEFAULT_MAX_FRAMES = 32
ANCHOR_WRAPPER_KEY = "motionclone_latent_anchor"

_MOTION_KEY = re.compile(r"^down_blocks\.(\d+)\.motion_modules\.(\d+)\.temporal_transformer\.")
_PE_SUFFIX = ".attention_blocks.0.pos_encoder.pe"


class SparseCtrlError(MotionCloneError):
    """A file that is not a usable SparseCtrl (or does not fit the model), with the reason."""


@dataclass(frozen=True)
class SparseCtrlInfo:
    name: str
    variant: str  # "rgb" (condition: VAE latent) or "scribble" (condition: the image)
    in_channels: int  # latent channels of the noisy-sample input
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    cross_attention_dim: int
    condition_channels: int  # without the mask channel
    has_mask: bool
    max_frames: int
    downscale: int  # condition resolution / latent resolution (1 for rgb, 8 for scribble)

    @property
    def residual_channels(self) -> list[int]:
        """Channels of the skip residuals, in the order of the UNet's input blocks."""
        out = [self.block_out_channels[0]]
        for level, ch in enumerate(self.block_out_channels):
            out += [ch] * self.layers_per_block
            if level < len(self.block_out_channels) - 1:
                out.append(ch)  # downsampler
        return out


# --- loading ---------------------------------------------------------------------------------
def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of numbered children `prefix.N.*` present in the state dict."""
    return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def _reject_other_formats(sd: dict[str, torch.Tensor], name: str) -> None:
    some = ", ".join(sorted(sd)[:3]) or "no tensors"
    if any(k.startswith(("input_hint_block.", "control_model.", "zero_convs.")) for k in sd):
        raise SparseCtrlError(f"{name} is a regular ControlNet, not SparseCtrl: use core 'Apply ControlNet'")
    if any(_MOTION_KEY.match(k) for k in sd):
        raise SparseCtrlError(
            f"{name} is an AnimateDiff motion module, not SparseCtrl: load it with 'Load AnimateDiff Motion Module'"
        )
    raise SparseCtrlError(
        f"{name} is not an AnimateDiff SparseCtrl file: no 'controlnet_cond_embedding' tensors (found e.g. {some})"
    )


def infer_sparsectrl_config(sd: dict[str, torch.Tensor], name: str) -> tuple[dict[str, Any], SparseCtrlInfo]:
    """diffusers `SparseControlNetModel` kwargs and a summary, read off the tensor names and shapes."""

    def tensor(key: str) -> torch.Tensor:
        if key not in sd:
            raise SparseCtrlError(f"{name}: missing tensor {key} (not a complete SparseCtrl file)")
        return sd[key]

    if "controlnet_cond_embedding.weight" in sd:  # RGB: one conv over the latent (+ mask)
        variant, cond_in = "rgb", int(sd["controlnet_cond_embedding.weight"].shape[1])
    elif "controlnet_cond_embedding.conv_in.weight" in sd:  # scribble: a small strided conv stack over pixels
        variant, cond_in = "scribble", int(sd["controlnet_cond_embedding.conv_in.weight"].shape[1])
    else:
        _reject_other_formats(sd, name)
    in_channels = int(tensor("conv_in.weight").shape[1])
    motion_keys = [k for k in sd if _MOTION_KEY.match(k)]
    if not motion_keys:
        raise SparseCtrlError(
            f"{name} has a ControlNet condition embedding but no motion modules: not a SparseCtrl file "
            "(a diffusers-format regular ControlNet? use core 'Apply ControlNet')"
        )
    if any(".attention_blocks.1." in k for k in motion_keys):
        raise SparseCtrlError(f"{name}: its motion modules have two attention blocks per layer; SparseCtrl has one")

    n_blocks = _count(sd, "down_blocks.")
    block_out = tuple(int(tensor(f"down_blocks.{i}.resnets.0.conv1.weight").shape[0]) for i in range(n_blocks))
    layers = _count(sd, "down_blocks.0.resnets.")
    with_attention = [_count(sd, f"down_blocks.{i}.attentions.") > 0 for i in range(n_blocks)]
    if not any(with_attention):
        raise SparseCtrlError(f"{name}: no cross-attention blocks")
    first = with_attention.index(True)
    attn = f"down_blocks.{first}.attentions.0."
    cross_dim = int(tensor(attn + "transformer_blocks.0.attn2.to_k.weight").shape[1])
    for i in range(n_blocks):
        if _count(sd, f"down_blocks.{i}.motion_modules.") != layers:
            raise SparseCtrlError(f"{name}: down block {i} should hold {layers} motion modules")
    for c in block_out:
        if c % 32 or c % SD15_HEADS:
            raise SparseCtrlError(f"{name}: {c} channels is not a multiple of 32 (GroupNorm) and 8 heads")

    image_channels = in_channels if variant == "rgb" else 3
    if cond_in - image_channels not in (0, 1):
        raise SparseCtrlError(
            f"{name}: condition embedding takes {cond_in} channels, expected {image_channels} (+1 mask) "
            f"for a {variant} SparseCtrl"
        )
    pe_key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0" + _PE_SUFFIX
    max_frames = int(sd[pe_key].shape[1]) if pe_key in sd else DEFAULT_MAX_FRAMES
    config: dict[str, Any] = {
        "in_channels": in_channels,
        "conditioning_channels": image_channels,
        "concat_conditioning_mask": cond_in == image_channels + 1,
        "use_simplified_condition_embedding": variant == "rgb",
        "down_block_types": tuple("CrossAttnDownBlockMotion" if a else "DownBlockMotion" for a in with_attention),
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": SD15_HEADS,  # diffusers' historic name: this is the head count
        "transformer_layers_per_block": _count(sd, attn + "transformer_blocks."),
        "transformer_layers_per_mid_block": max(_count(sd, "mid_block.attentions.0.transformer_blocks."), 1),
        "temporal_transformer_layers_per_block": _count(
            sd, "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks."
        ),
        "use_linear_projection": tensor(attn + "proj_in.weight").ndim == 2,
        "motion_max_seq_length": max_frames,
        "motion_num_attention_heads": SD15_HEADS,
    }
    downscale = 1
    if variant == "scribble":
        n_emb = _count(sd, "controlnet_cond_embedding.blocks.") // 2 + 1
        emb = [int(sd["controlnet_cond_embedding.conv_in.weight"].shape[0])]
        emb += [int(tensor(f"controlnet_cond_embedding.blocks.{2 * j + 1}.weight").shape[0]) for j in range(n_emb - 1)]
        config["conditioning_embedding_out_channels"] = tuple(emb)
        downscale = 2 ** (n_emb - 1)  # each pair of embedding convs halves the resolution
    info = SparseCtrlInfo(
        name=name, variant=variant, in_channels=in_channels, block_out_channels=block_out, layers_per_block=layers,
        cross_attention_dim=cross_dim, condition_channels=image_channels,
        has_mask=bool(config["concat_conditioning_mask"]), max_frames=max_frames, downscale=downscale,
    )
    return config, info


def to_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original SparseCtrl keys -> diffusers keys.

    Only the motion modules are named differently (the rest already uses diffusers names), so
    diffusers' AnimateDiff single-file mapping applies to the whole file unchanged; the file's
    position tables are kept (diffusers would drop and recompute them)."""
    return _motion_to_diffusers(sd)


def from_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SparseControlNetModel keys -> original keys (to write test files in the downloaded format)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".motion_modules." not in key:
            out[key] = value
            continue
        for k, v in _motion_from_diffusers({key: value}).items():
            if ".attention_blocks.1.pos_encoder.pe" not in k:  # SparseCtrl layers have one attention block
                out[k] = v
    return out


def load_sparsectrl(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """Build diffusers' SparseControlNetModel from an original SparseCtrl file: (net, info).

    Parameters are created outside inference mode, as for the motion modules."""
    from diffusers import SparseControlNetModel

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise SparseCtrlError(f"SparseCtrl file not found: {path}")
    try:
        sd = read_state_dict(path)
    except MotionModuleError as e:
        raise SparseCtrlError(str(e)) from e
    config, info = infer_sparsectrl_config(sd, name)
    converted = to_diffusers_state_dict(sd)
    with torch.inference_mode(False):
        net = SparseControlNetModel(**config)
        try:
            missing, unexpected = net.load_state_dict(converted, strict=False)
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[-1].strip()
            raise SparseCtrlError(
                f"{name}: tensor shapes do not match the SparseCtrl layout inferred from it: {detail}"
            ) from e
        # A file without position tables gets diffusers' sinusoid (the same values).
        missing = [k for k in missing if not k.endswith(".pos_embed.pe")]
        if missing or unexpected:
            raise SparseCtrlError(
                f"{name}: tensors do not match a {info.variant} SparseCtrl (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})"
            )
        net.eval().requires_grad_(False)
        if dtype is not None and dtype != next(net.parameters()).dtype:
            # nn.Module.to: ModelMixin.to only adds a warning about from_pretrained's keep-in-fp32 list (empty here)
            torch.nn.Module.to(net, dtype=dtype)
    return net, info


class SparseCtrlNet(torch.nn.Module):
    """Holder for ComfyUI's ModelPatcher, which assigns `.device` (read-only on diffusers models)."""

    def __init__(self, net: torch.nn.Module, info: SparseCtrlInfo) -> None:
        super().__init__()
        self.net = net
        self.info = info


def load_sparsectrl_patcher(path: str | os.PathLike):
    """(ModelPatcher around SparseCtrlNet, info), in the dtype ComfyUI would pick for a UNet on this device."""
    import comfy.model_management as mm
    import comfy.model_patcher

    load_device = mm.get_torch_device()
    dtype = mm.unet_dtype()
    dtype = mm.unet_manual_cast(dtype, load_device) or dtype  # plain torch layers cannot cast per call
    net, info = load_sparsectrl(path, dtype=dtype)
    patcher = comfy.model_patcher.ModelPatcher(
        SparseCtrlNet(net, info), load_device=load_device, offload_device=mm.unet_offload_device()
    )
    return patcher, info


# --- fit and frame indices ---------------------------------------------------------------------
def check_fits(info: SparseCtrlInfo, model) -> None:
    """Raise SparseCtrlError unless the residuals match `model`'s UNet (a comfy BaseModel)."""
    uc = getattr(getattr(model, "model_config", None), "unet_config", None) or {}
    needed = ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "in_channels")
    if not all(k in uc for k in needed):
        raise SparseCtrlError(f"{info.name} needs an SD1.5-style UNet; this model ({type(model).__name__}) is not one")
    mc, mult, res = uc["model_channels"], list(uc["channel_mult"]), uc["num_res_blocks"]
    res = list(res) if isinstance(res, list | tuple) else [res] * len(mult)
    unet_levels = [mc * m for m in mult]
    skips = [mc]
    for level, ch in enumerate(unet_levels):
        skips += [ch] * res[level] + ([ch] if level < len(mult) - 1 else [])
    if uc["context_dim"] != info.cross_attention_dim:
        raise SparseCtrlError(
            f"{info.name} does not fit this model: its cross-attention dim is {info.cross_attention_dim}, "
            f"the model's text context is {uc['context_dim']} wide (SparseCtrl v3 is for SD1.5: 768)"
        )
    if uc["in_channels"] != info.in_channels:
        raise SparseCtrlError(
            f"{info.name} does not fit this model: it takes {info.in_channels} latent channels, "
            f"the UNet {uc['in_channels']}"
        )
    if info.residual_channels != skips:
        raise SparseCtrlError(
            f"{info.name} does not fit this model: it has {len(info.block_out_channels)} levels with channels "
            f"{list(info.block_out_channels)} (residual channels {info.residual_channels}), the UNet has "
            f"{len(unet_levels)} levels with channels {unet_levels} (skip channels {skips})"
        )


def parse_frame_indices(text: str) -> list[int]:
    """'0, 8, -1' -> [0, 8, -1] (negative counts from the last frame)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise SparseCtrlError("frame_indices is empty: give e.g. '0' or '0, 15'")
    try:
        indices = [int(p) for p in parts]
    except ValueError:
        raise SparseCtrlError(f"frame_indices must be comma-separated integers, got {text!r}") from None
    dup = [i for i, n in Counter(indices).items() if n > 1]
    if dup:
        raise SparseCtrlError(f"frame_indices repeats {dup}")
    return indices


def resolve_frame_indices(indices: list[int] | tuple[int, ...], frames: int, who: str) -> list[int]:
    resolved = [i + frames if i < 0 else i for i in indices]
    bad = [i for i, r in zip(indices, resolved, strict=True) if not 0 <= r < frames]
    if bad:
        raise SparseCtrlError(f"{who}: frame indices {bad} are outside the {frames} frames of the latent batch")
    if len(set(resolved)) != len(resolved):
        raise SparseCtrlError(f"{who}: frame indices {list(indices)} name the same frame twice for {frames} frames")
    return resolved


def _frames(x: torch.Tensor, chunks: int, who: str) -> int:
    if chunks < 1 or x.shape[0] % chunks:
        raise SparseCtrlError(f"{who}: batch of {x.shape[0]} does not split into {chunks} cond/uncond chunks")
    return x.shape[0] // chunks


def _per_index(images: torch.Tensor, count: int, who: str) -> torch.Tensor:
    if images.shape[0] == 1:
        return images.expand(count, *images.shape[1:])
    if images.shape[0] != count:
        raise SparseCtrlError(f"{who}: {images.shape[0]} images for {count} frame indices (give 1 or {count})")
    return images


def encode_latents(vae, images: torch.Tensor, height: int, width: int, latent_format) -> torch.Tensor:
    """IMAGE-range pixels [N, C, H, W] -> model-space latents [N, 4, height, width] (like core ControlNet)."""
    import comfy.model_management
    import comfy.utils

    ratio = vae.spacial_compression_encode()
    pixels = comfy.utils.common_upscale(images[:, :3], width * ratio, height * ratio, "bilinear", "center")
    loaded = comfy.model_management.loaded_models(only_currently_used=True)
    with torch.no_grad():
        latents = vae.encode(pixels.movedim(1, -1))
    comfy.model_management.load_models_gpu(loaded)  # encoding may have unloaded the sampled model
    return latent_format.process_in(latents)


def _in_range(control, t: torch.Tensor) -> bool:
    # Same test as comfy.controlnet.ControlNet.get_control (t holds sigmas; the range is sigmas too).
    rng = control.timestep_range
    return rng is None or not (t[0] > rng[0] or t[0] < rng[1])


# --- controls ------------------------------------------------------------------------------------
class SparseCtrlControl(comfy.controlnet.ControlBase):
    """SparseCtrl as a ComfyUI control: chains, strength and start/end percent like core ControlNets."""

    def __init__(self, patcher, info: SparseCtrlInfo, frame_indices: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        self.patcher = patcher
        self.info = info
        self.frame_indices = tuple(frame_indices)
        self.model_sampling_current = None
        self.model_latent_format = None
        self._hint_key = None
        self._mask = None

    def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0), vae=None, extra_concat=()):
        super().set_cond_hint(cond_hint, strength, timestep_percent_range, vae=vae, extra_concat=list(extra_concat))
        self.vae = vae  # ControlBase keeps the VAE only when latent_format is set; rgb needs it
        return self

    def pre_run(self, model, percent_to_timestep_function) -> None:
        super().pre_run(model, percent_to_timestep_function)
        check_fits(self.info, model)
        self.model_sampling_current = model.model_sampling
        self.model_latent_format = model.latent_format

    def cleanup(self) -> None:
        self.model_sampling_current = None
        self.model_latent_format = None
        self._hint_key = None
        self._mask = None
        super().cleanup()

    def copy(self) -> SparseCtrlControl:
        c = SparseCtrlControl(self.patcher, self.info, self.frame_indices)
        self.copy_to(c)
        return c

    def get_models(self) -> list:
        return super().get_models() + [self.patcher]

    def _condition(self, x: torch.Tensor, frames: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition [F, C, H', W'] (zeros off the chosen frames) and mask [F, 1, H', W']."""
        height, width = x.shape[-2:]
        key = (frames, height, width, x.device, dtype)
        if self._hint_key == key:
            return self.cond_hint, self._mask
        who = self.info.name
        idx = resolve_frame_indices(self.frame_indices, frames, who)
        images = _per_index(self.cond_hint_original, len(idx), who)
        if self.info.variant == "rgb":
            if self.vae is None:
                raise SparseCtrlError(f"{who} is an RGB SparseCtrl: connect a VAE to encode the image")
            cond = encode_latents(self.vae, images, height, width, self.model_latent_format)
        else:
            import comfy.utils

            pixels = images[:, :3] if images.shape[1] >= 3 else images[:, :1].expand(-1, 3, -1, -1)
            size = (width * self.info.downscale, height * self.info.downscale)
            cond = comfy.utils.common_upscale(pixels, size[0], size[1], "bilinear", "center")
        full = torch.zeros((frames, *cond.shape[1:]), dtype=dtype, device=x.device)
        full[idx] = cond.to(full)
        mask = torch.zeros((frames, 1, *cond.shape[2:]), dtype=dtype, device=x.device)
        mask[idx] = 1.0
        self.cond_hint, self._mask, self._hint_key = full, mask, key
        return full, mask

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if not _in_range(self, t):
            return control_prev
        frames = _frames(x_noisy, batched_number, self.info.name)
        if frames > self.info.max_frames:
            raise SparseCtrlError(
                f"{self.info.name}: {frames} frames in the latent batch, "
                f"its motion modules support {self.info.max_frames}"
            )
        net = self.patcher.model.net
        param = next(net.parameters())
        if param.device != x_noisy.device:
            net.to(x_noisy.device)  # ComfyUI left it offloaded (low VRAM): plain layers cannot stream weights
        dtype = param.dtype
        hint, mask = self._condition(x_noisy, frames, dtype)
        context = cond.get("crossattn_controlnet", cond["c_crossattn"])
        b = batched_number

        def per_chunk(v: torch.Tensor) -> torch.Tensor:  # [F, C, h, w] -> [b, C, F, h, w]
            return v.unsqueeze(0).expand(b, *v.shape).transpose(1, 2)

        # The residuals do not depend on x (SparseCtrl zeroes its sample input): never part of a graph.
        with torch.no_grad():
            x_in = self.model_sampling_current.calculate_input(t, x_noisy)  # what core ControlNet feeds
            sample = x_in.to(dtype).reshape(b, frames, *x_in.shape[1:]).transpose(1, 2)
            timestep = self.model_sampling_current.timestep(t).float().reshape(b, frames)[:, 0]
            down, mid = net(
                sample, timestep,
                encoder_hidden_states=context.to(device=x_noisy.device, dtype=dtype),
                controlnet_cond=per_chunk(hint),
                conditioning_mask=per_chunk(mask) if self.info.has_mask else None,
                return_dict=False,
            )
        control = {"input": [], "middle": [mid], "output": list(down)}
        merged = self.control_merge(control, control_prev, output_dtype=None)
        return merged


class LatentAnchorControl(comfy.controlnet.ControlBase):
    """`latent_anchor` mode: blends the denoised prediction of the chosen frames toward the image latent.

    No residuals: while active (start..end percent) it adds an APPLY_MODEL wrapper to the
    transformer_options of the forward it is called for, which replaces
    x0[frame] by x0[frame] + strength * (latent - x0[frame]) for every cond/uncond chunk."""

    def __init__(self, frame_indices: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        self.frame_indices = tuple(frame_indices)
        self.model_latent_format = None
        self._anchor = None
        self._anchor_key = None

    def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0), vae=None, extra_concat=()):
        super().set_cond_hint(cond_hint, strength, timestep_percent_range, vae=vae, extra_concat=list(extra_concat))
        self.vae = vae
        return self

    def pre_run(self, model, percent_to_timestep_function) -> None:
        super().pre_run(model, percent_to_timestep_function)
        self.model_latent_format = model.latent_format

    def cleanup(self) -> None:
        self.model_latent_format = None
        self._anchor = self._anchor_key = None
        super().cleanup()

    def copy(self) -> LatentAnchorControl:
        c = LatentAnchorControl(self.frame_indices)
        self.copy_to(c)
        return c

    def _anchor_for(self, x: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (frames, *x.shape[-2:], x.device)
        if self._anchor_key != key:
            who = "latent_anchor"
            idx = resolve_frame_indices(self.frame_indices, frames, who)
            if self.vae is None:
                raise SparseCtrlError("latent_anchor: connect a VAE to encode the image")
            images = _per_index(self.cond_hint_original, len(idx), who)
            latents = encode_latents(self.vae, images, x.shape[-2], x.shape[-1], self.model_latent_format)
            anchor = torch.zeros((frames, *latents.shape[1:]), device=x.device)
            anchor[idx] = latents.to(anchor)
            weight = torch.zeros((frames, 1, 1, 1), device=x.device)
            weight[idx] = 1.0
            self._anchor, self._anchor_key = (anchor, weight), key
        return self._anchor

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if not _in_range(self, t) or self.strength == 0:
            return control_prev
        frames = _frames(x_noisy, batched_number, "latent_anchor")
        anchor, weight = self._anchor_for(x_noisy, frames)
        weight = weight * self.strength

        def anchor_wrapper(executor, x, *args, **kwargs):
            out = executor(x, *args, **kwargs)
            chunks = out.shape[0] // frames
            w = weight.repeat(chunks, 1, 1, 1).to(out)
            return out + w * (anchor.repeat(chunks, 1, 1, 1).to(out) - out)

        _add_apply_model_wrapper(transformer_options, anchor_wrapper)
        return control_prev


def _add_apply_model_wrapper(transformer_options: dict, fn) -> None:
    # transformer_options is built afresh for each batched forward (calc_cond_batch); copy the
    # nested levels anyway so nothing shared with the MODEL's options is changed.
    import comfy.patcher_extension as pe

    wrappers = dict(transformer_options.get("wrappers", {}))
    per_type = {k: list(v) for k, v in wrappers.get(pe.WrappersMP.APPLY_MODEL, {}).items()}
    per_type.setdefault(ANCHOR_WRAPPER_KEY, []).append(fn)
    wrappers[pe.WrappersMP.APPLY_MODEL] = per_type
    transformer_options["wrappers"] = wrappers


# --- conditioning and single forwards ------------------------------------------------------------
def attach_control(positive, negative, control, image: torch.Tensor, strength: float,
                   percent_range: tuple[float, float], vae=None):
    """What core ControlNetApplyAdvanced does: one control copy per previous control, shared by
    positive and negative (so cond and uncond still batch together), chained to it."""
    if strength == 0:
        return positive, negative
    hint = image.movedim(-1, 1)
    made: dict[Any, Any] = {}
    out = []
    for conditioning in (positive, negative):
        c = []
        for t in conditioning:
            d = t[1].copy()
            prev = d.get("control", None)
            if prev not in made:
                made[prev] = control.copy().set_cond_hint(hint, strength, tuple(percent_range), vae=vae)
                made[prev].set_previous_controlnet(prev)
            d["control"] = made[prev]
            d["control_apply_to_uncond"] = False
            c.append([t[0], d])
        out.append(c)
    return out[0], out[1]


def chain_links(control) -> list:
    """The links of a control chain, first to last."""
    links = []
    while control is not None:
        links.append(control)
        control = control.previous_controlnet
    return links


def condition_on_reference(control, frames: torch.Tensor):
    """A copy of a control chain whose SparseCtrl links take their condition images from a
    reference video (IMAGE [F, H, W, C]) at their own frame indices, as MotionClone's
    extraction does; other links are copied unchanged."""
    if control is None:
        return None
    prev = condition_on_reference(control.previous_controlnet, frames)
    c = control.copy()
    if isinstance(control, SparseCtrlControl):
        idx = resolve_frame_indices(control.frame_indices, frames.shape[0], control.info.name)
        c.set_cond_hint(frames[idx].movedim(-1, 1), control.strength, control.timestep_percent_range, vae=control.vae)
    c.set_previous_controlnet(prev)
    return c


def control_residuals(control, model, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict,
                      transformer_options: dict | None = None, *, chunks: int = 1):
    """One forward of a control chain outside a sampler (e.g. motion extraction).

    `model`: the ModelPatcher that will run; `x`: noisy latent [chunks * F, C, h, w] in the
    sampler's space (x0 + sigma * noise); `cond`: at least {"c_crossattn": [chunks * F, T, D]}.
    Returns the dict to pass as `control=` to `model.model.apply_model(...)`, or None; pass the
    same `transformer_options` dict to apply_model. (Under gradients, MotionGuidance's
    APPLY_MODEL wrapper moves skip residuals out of ComfyUI's in-place add: control_grad.py.)"""
    import comfy.model_management

    if control is None:
        return None
    base = model.model
    comfy.model_management.load_models_gpu([model, *control.get_models()])
    sampling = base.model_sampling
    sigmas = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).flatten()
    sigmas = sigmas.expand(x.shape[0]) if sigmas.numel() == 1 else sigmas
    options = transformer_options if transformer_options is not None else {}
    options.setdefault("cond_or_uncond", [0] * chunks)
    control.pre_run(base, lambda p: sampling.percent_to_sigma(p))
    try:
        return control.get_control(x, sigmas, cond, chunks, options)
    finally:
        control.cleanup()
