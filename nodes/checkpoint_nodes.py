"""Loader for compact checkpoints (tiny SD1.5-architecture or Wan 2.1 models that carry their own config)."""

from __future__ import annotations

from comfy_api.latest import io

from ..motion_core.compact_checkpoint import load_compact_checkpoint


class LoadCompactCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id="MotionCloneCompactCheckpointLoader",
            display_name="Load Compact Checkpoint (MotionClone)",
            category="MotionClone/loaders",
            description=(
                "Loads a compact checkpoint: an SD1.5-layout .safetensors whose 'motionclone.architecture' "
                "metadata describes its (usually tiny) UNet, CLIP and VAE, or a tiny Wan 2.1 model with its text "
                "encoder and VAE. Normal checkpoints load with 'Load Checkpoint', Wan models with the core Wan "
                "loaders."
            ),
            inputs=[
                io.Combo.Input(
                    "ckpt_name",
                    options=folder_paths.get_filename_list("checkpoints"),
                    tooltip="A compact checkpoint from the checkpoints folder.",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The denoising UNet (or Wan transformer)."),
                io.Clip.Output(tooltip="The text encoder."),
                io.Vae.Output(tooltip="The VAE."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name: str) -> io.NodeOutput:
        import folder_paths

        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        model, clip, vae = load_compact_checkpoint(path)
        return io.NodeOutput(model, clip, vae)
