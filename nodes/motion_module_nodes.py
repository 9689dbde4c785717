"""Load AnimateDiff motion modules onto a MODEL."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..motion_core.comfy_folders import ANIMATEDIFF_MODELS
from ..motion_core.injection import apply_motion_modules, install_processors
from ..motion_core.motion_module import load_motion_adapter
from .host_features import supported


class LoadAnimateDiffMotionModule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadAnimateDiffMotionModule",
            **supported(io.Schema, search_aliases=["motionclone", "animatediff", "motion module", "v3_sd15_mm"]),
            display_name="Load AnimateDiff Motion Module",
            category="MotionClone/loaders",
            description=(
                "Applies an AnimateDiff motion module (v1/v2/v3 SD1.5, .ckpt or .safetensors from "
                "models/animatediff_models) to an SD1.5 MODEL. The frames of a video are the latent batch."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 model (checkpoint loader output)."),
                io.Combo.Input(
                    "model_name",
                    options=folder_paths.get_filename_list(ANIMATEDIFF_MODELS),
                    tooltip="Motion module file, e.g. v3_sd15_mm.ckpt, in models/animatediff_models.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with temporal attention; the input MODEL is unchanged.")],
        )

    @classmethod
    def execute(cls, model, model_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(ANIMATEDIFF_MODELS, model_name)
        adapter, info = load_motion_adapter(path)
        layers = install_processors(adapter)
        return io.NodeOutput(apply_motion_modules(model, adapter, info, layers))
