"""ComfyUI nodes of the pack (V3 schema). Thin: inputs, validation, calls into motion_core."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from ..motion_core import comfy_folders
from .checkpoint_nodes import LoadCompactCheckpoint
from .image_condition_nodes import ImageCondition
from .motion_module_nodes import LoadAnimateDiffMotionModule
from .motion_nodes import (
    ExtractSparseMotion,
    LoadMotion,
    MotionCloneGuider,
    MotionCloneUnevenSchedule,
    MotionGuidedSampler,
    SaveMotion,
)
from .video_nodes import LoadReferenceVideo

comfy_folders.register()


class MotionCloneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            LoadAnimateDiffMotionModule,
            LoadCompactCheckpoint,
            ExtractSparseMotion,
            MotionGuidedSampler,
            MotionCloneGuider,
            MotionCloneUnevenSchedule,
            SaveMotion,
            LoadMotion,
            LoadReferenceVideo,
            ImageCondition,
        ]


async def comfy_entrypoint() -> MotionCloneExtension:
    return MotionCloneExtension()
