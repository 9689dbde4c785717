"""Model folders the pack reads, registered with ComfyUI's `folder_paths`."""

from __future__ import annotations

import os

# AnimateDiff-Evolved's folder name, so users' existing motion modules are found.
ANIMATEDIFF_MODELS = "animatediff_models"


def register() -> None:
    import folder_paths

    default = os.path.join(folder_paths.models_dir, ANIMATEDIFF_MODELS)
    # Another pack (AnimateDiff-Evolved) or extra_model_paths.yaml may have registered it.
    paths, exts = folder_paths.folder_names_and_paths.get(ANIMATEDIFF_MODELS, ([], set()))
    if default not in paths:
        paths = [*paths, default]
    folder_paths.folder_names_and_paths[ANIMATEDIFF_MODELS] = (
        paths,
        set(exts) | set(folder_paths.supported_pt_extensions),
    )
