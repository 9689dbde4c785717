"""Image condition for image-/sketch-to-video: AnimateDiff v3 SparseCtrl, or a plain latent anchor."""

from __future__ import annotations

import os
from collections import OrderedDict

import folder_paths
from comfy_api.latest import io

from ..motion_core.sparsectrl import (
    LatentAnchorControl,
    SparseCtrlControl,
    attach_control,
    load_sparsectrl_patcher,
    parse_frame_indices,
)
from .host_features import advanced, supported

NO_FILE = "none"
MODES = ("sparsectrl", "latent_anchor")
_CACHE: OrderedDict[tuple, tuple] = OrderedDict()  # (path, mtime, size) -> (ModelPatcher, SparseCtrlInfo)
_CACHE_SIZE = 2


def cached_sparsectrl(path: str):
    """Loaded SparseCtrl per file version; re-reads a file that changed on disk."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    loaded = load_sparsectrl_patcher(path)
    _CACHE[key] = loaded
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return loaded


class ImageCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImageCondition",
            **supported(io.Schema, search_aliases=["motionclone", "sparsectrl", "image to video", "sketch to video"]),
            display_name="Image Condition (SparseCtrl)",
            category="MotionClone",
            description=(
                "Conditions chosen frames of a video on image(s). sparsectrl: AnimateDiff v3 SparseCtrl "
                "(rgb: needs the VAE; scribble: the image is the sketch) as a ControlNet that chains with others. "
                "latent_anchor: no network; pulls the denoised prediction of those frames toward the image's latent."
            ),
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Combo.Input(
                    "sparsectrl_name",
                    options=[*folder_paths.get_filename_list("controlnet"), NO_FILE],
                    tooltip="v3_sd15_sparsectrl_rgb / _scribble (.ckpt or .safetensors) in models/controlnet. "
                            "Ignored in latent_anchor mode.",
                ),
                io.Image.Input("image", tooltip="One image (used for every index) or one per frame index."),
                io.String.Input("frame_indices", default="0",
                                tooltip="Comma-separated frame indices; negative counts from the end (-1 = last)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, **advanced(io.Float.Input)),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, **advanced(io.Float.Input)),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                               tooltip="sparsectrl: SparseCtrl residuals. latent_anchor: x0 of the chosen frames is "
                                       "blended toward the image latent by strength (no SparseCtrl file needed)."),
                io.Vae.Input("vae", optional=True, tooltip="Needed for rgb SparseCtrl and latent_anchor."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, positive, negative, sparsectrl_name: str, image, frame_indices: str, strength: float,
                start_percent: float, end_percent: float, mode: str = MODES[0], vae=None) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(positive, negative)
        indices = parse_frame_indices(frame_indices)
        if image.shape[0] not in (1, len(indices)):
            raise ValueError(
                f"Image Condition: {image.shape[0]} images for {len(indices)} frame indices (give 1 or {len(indices)})"
            )
        if mode == "sparsectrl":
            if sparsectrl_name == NO_FILE:
                raise ValueError("Image Condition: choose a SparseCtrl file, or use mode 'latent_anchor'")
            patcher, info = cached_sparsectrl(folder_paths.get_full_path_or_raise("controlnet", sparsectrl_name))
            if info.variant == "rgb" and vae is None:
                raise ValueError(f"Image Condition: {info.name} is an RGB SparseCtrl: connect a VAE")
            control = SparseCtrlControl(patcher, info, indices)
        elif mode == "latent_anchor":
            if vae is None:
                raise ValueError("Image Condition: latent_anchor encodes the image: connect a VAE")
            control = LatentAnchorControl(indices)
        else:
            raise ValueError(f"Image Condition: unknown mode {mode!r}")
        out = attach_control(positive, negative, control, image, strength, (start_percent, end_percent), vae=vae)
        return io.NodeOutput(*out)
