"""Extract the sparse motion of a reference video (MotionClone's representation).

Reference latents are noised once at training timestep t (default 400) with the seed's
noise, the UNet runs once with the (empty-prompt) conditioning, and the temporal
attention probabilities of the chosen layers are recorded; the forward stops right after
the last of them. Top-k of each row is kept (SparseMotion).
"""

from __future__ import annotations

import hashlib
import json

import torch

from .attention_capture import CaptureState, StopForward
from .context_windows import settings_of, window_frames
from .injection import CAPTURE_KEY, INFO_KEY
from .region_mask import normalize_mask, token_masks
from .sparse_motion import SparseMotion
from .windowed_motion import MotionWindow, WindowedMotion


def model_fingerprint(model) -> str:
    """Identity of the motion module a MOTION was made with (file name, layout)."""
    info = model.model_options["transformer_options"][INFO_KEY]["info"]
    blob = json.dumps([info.name, list(info.block_out_channels), info.max_frames, info.has_mid_block])
    return f"{info.name}:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def extract_sparse_motion(
    model,
    latents: torch.Tensor,
    context: torch.Tensor,
    layers: list[str],
    *,
    timestep: int = 400,
    seed: int = 0,
    top_k: int = 1,
    control=None,
    mask: torch.Tensor | None = None,
) -> SparseMotion | WindowedMotion:
    """`latents`: reference latents [F, C, h, w] as the VAE gives them (unscaled);
    `context`: cross-attention conditioning [1, tokens, dim]; `control`: an optional ComfyUI
    control chain (e.g. SparseCtrl conditioned on the reference's own frames) run in the forward.

    When the MODEL carries core context windows and the video is longer than one, the motion is
    extracted per window, on the frames the sampler will hand the motion modules for it
    (a WindowedMotion; context_windows.py). `mask`: an optional source region (a ComfyUI MASK): only the
    rows under it keep their motion (region_mask.py); an all-ones mask is no mask."""
    import comfy.model_management
    import comfy.sample

    frames, _, height, width = latents.shape
    info = model.model_options["transformer_options"][INFO_KEY]["info"]
    windows = window_frames(model, frames, info.max_frames)
    region = normalize_mask(mask, frames, height, width, "reference mask")
    masks = token_masks(region, layers, height, width) if region is not None else {}
    comfy.model_management.load_models_gpu([model])
    base = model.model
    device = model.load_device
    x0 = base.process_latent_in(latents.float())
    # Same noise as the generation's initial noise for this seed and shape (reference setup).
    noise = comfy.sample.prepare_noise(latents, seed)
    sigma = base.model_sampling.sigma(torch.tensor([float(timestep)]))
    x = (x0 + noise * sigma).to(device)
    made = {"top_k": top_k, "latent_height": height, "latent_width": width, "timestep": int(timestep),
            "model_fingerprint": model_fingerprint(model)}
    if windows is None:
        probs = _record(model, x, sigma, context, layers, control)
        return SparseMotion.from_probs(probs, frames=frames, masks=masks, **made)
    if control is not None:
        raise ValueError("an image condition at extraction is not supported with context windows yet: extract "
                         "without it, or without context windows")
    parts = []
    for window in windows:
        comfy.model_management.throw_exception_if_processing_interrupted()
        probs = _record(model, x[list(window)], sigma, context, layers, None)
        # A region's rows are per frame, so a window's region is its frames' columns.
        window_masks = {name: m[:, list(window)] for name, m in masks.items()}
        parts.append(MotionWindow(window, SparseMotion.from_probs(probs, frames=len(window), masks=window_masks,
                                                                  **made)))
    return WindowedMotion(parts, frames, settings_of(model))


def _record(model, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, layers: list[str],
            control) -> dict[str, torch.Tensor]:
    """The attention maps of `layers` in one UNet forward of the noisy latent `x` (stopped after the last)."""
    frames, device = x.shape[0], x.device
    base = model.model
    state = CaptureState(layers, stop_after_last=True)
    options = {**model.model_options["transformer_options"], "cond_or_uncond": [0], CAPTURE_KEY: state}
    context = context.to(device).expand(frames, -1, -1)
    with torch.no_grad():
        residuals = None
        if control is not None:
            from .sparsectrl import control_residuals

            residuals = control_residuals(control, model, x, sigma, {"c_crossattn": context}, options)
        try:
            base.apply_model(x, sigma.expand(frames).to(device), c_crossattn=context, control=residuals,
                             transformer_options=options)
        except StopForward:
            pass
    if not state.complete:
        missing = [name for name in layers if name not in state.probs]
        raise RuntimeError(f"temporal attention layers were not reached in the forward: {missing}")
    return {name: state.probs[name].float().cpu() for name in layers}
