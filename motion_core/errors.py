"""The pack's error types, named cleanly where users read them.

ComfyUI reports a failed node's exception as `<class module>.<class name>`; for a custom node pack
the module is its import path, which ComfyUI derives from the install folder (e.g.
`/home/me/ComfyUI/custom_nodes/ComfyUI-MotionClone.motion_core.video_io.VideoLoadError`). Every
error of the pack derives from MotionCloneError, whose subclasses report `MotionClone.<Name>`.
"""

from __future__ import annotations

PUBLIC_MODULE = "MotionClone"


class MotionCloneError(ValueError):
    """Base of the pack's errors: the message says what went wrong and what to change."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.__module__ = PUBLIC_MODULE


MotionCloneError.__module__ = PUBLIC_MODULE
