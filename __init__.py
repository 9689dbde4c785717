"""ComfyUI-MotionClone: training-free motion cloning (MotionClone, ICLR 2025) for ComfyUI.

ComfyUI imports this folder as a package and calls `comfy_entrypoint` (V3 node schema).
The nodes live in `nodes/` (thin) and the math and model patching in `motion_core/`.
"""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
