"""Host-agnostic MotionClone pieces and the ComfyUI patching glue.

Modules import ComfyUI (`comfy`, `folder_paths`) only where they patch or load into the
host; the math (sparse motion, guidance, schedules) is plain torch.
"""
