"""Load a reference video as IMAGE frames, streaming, with VideoHelperSuite-style selection."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..motion_core import video_io
from ..motion_core.video_io import FrameSelection, ResizeSpec
from .host_features import advanced, supported


class LoadReferenceVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadReferenceVideo",
            **supported(io.Schema, search_aliases=["motionclone", "load video", "reference video", "video frames"]),
            display_name="Load Reference Video",
            category="MotionClone",
            description=(
                "Loads a reference video (mp4, webm, mov, mkv, gif, animated webp) as frames, decoding as a "
                "stream and keeping only the selected frames. Defaults reproduce MotionClone's reference setup: "
                "16 evenly spaced frames over the whole clip, stretched to 512x512. Selection order: force_rate, "
                "skip_first_frames, select_every_nth, frame_load_cap, evenly_spaced_frames."
            ),
            inputs=[
                io.Combo.Input(
                    "file", options=video_io.list_input_videos(), upload=io.UploadType.video,
                    tooltip="A video in ComfyUI's input folder. Ignored when path is set or a VIDEO is connected.",
                ),
                io.Int.Input("frame_load_cap", default=0, min=0, max=1_000_000,
                             tooltip="Keep at most this many frames (after skipping and every-nth); 0 = all. "
                                     "With evenly_spaced_frames it bounds the window they are picked from.",
                                     **advanced(io.Int.Input)),
                io.Int.Input("skip_first_frames", default=0, min=0, max=10_000_000,
                             tooltip="Frames dropped at the start (counted after force_rate resampling).",
                             **advanced(io.Int.Input)),
                io.Int.Input("select_every_nth", default=1, min=1, max=10_000,
                             tooltip="Keep every n-th frame after skipping.", **advanced(io.Int.Input)),
                io.Int.Input("evenly_spaced_frames", default=16, min=0, max=10_000,
                             tooltip="Pick this many frames at evenly spaced indices over the whole selection "
                                     "(np.linspace(first, last, N).round(), as MotionClone's code); 0 = off."),
                io.Float.Input("force_rate", default=0.0, min=0.0, max=video_io.MAX_FORCE_RATE, step=0.01,
                               tooltip="Resample to this frame rate by timestamps; 0 = the source rate.",
                               **advanced(io.Float.Input)),
                io.Int.Input("width", default=512, min=0, max=video_io.MAX_OUTPUT_SIDE, step=8,
                             tooltip="Output width, rounded to the nearest multiple of 8; 0 = from the source "
                                     "(aspect ratio kept if height is set)."),
                io.Int.Input("height", default=512, min=0, max=video_io.MAX_OUTPUT_SIDE, step=8,
                             tooltip="Output height, rounded to the nearest multiple of 8; 0 = from the source."),
                io.Combo.Input("resize_mode", options=list(video_io.RESIZE_MODES), default="stretch",
                               tooltip="stretch: resize straight (MotionClone's reference); crop: cover and "
                                       "centre-crop; pad: fit and centre-pad with black."),
                io.String.Input("path", optional=True, default="", placeholder="/absolute/path/to/video.mp4",
                                tooltip="Instead of file: a path inside the input folder or a folder listed in "
                                        f"{video_io.ENV_VIDEO_DIRS}."),
                io.Video.Input("video", optional=True,
                               tooltip="A VIDEO (e.g. from core Load Video) used instead of file/path, with the "
                                       "same selection and resizing."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="Frames [F, H, W, 3], float 0..1."),
                io.Int.Output(display_name="frame_count"),
                io.Float.Output(display_name="fps",
                                tooltip="Rate of the returned frames: (force_rate or source fps) / select_every_nth,"
                                        " stretched so evenly spaced frames span the selection's duration."),
            ],
        )

    @classmethod
    def execute(cls, file: str, frame_load_cap: int, skip_first_frames: int, select_every_nth: int,
                evenly_spaced_frames: int, force_rate: float, width: int, height: int, resize_mode: str,
                path: str = "", video=None) -> io.NodeOutput:
        selection = FrameSelection(frame_load_cap, skip_first_frames, select_every_nth, evenly_spaced_frames,
                                   float(force_rate))
        resize = ResizeSpec(width, height, resize_mode)
        check = comfy.model_management.throw_exception_if_processing_interrupted
        progress = _ProgressReporter()
        if video is not None:
            if (path or "").strip():
                logging.info("Load Reference Video: the connected VIDEO is used, path %r is ignored", path)
            loaded = video_io.load_video_input(video, selection, resize, check_interrupt=check, progress=progress)
        else:
            loaded = video_io.load_video_file(_resolve(file, path), selection, resize, check_interrupt=check,
                                              progress=progress)
        return io.NodeOutput(loaded.images, loaded.frame_count, loaded.fps)

    @classmethod
    def fingerprint_inputs(cls, file: str = "", path: str = "", **kwargs) -> str:
        # Re-run when the file is replaced or edited; a connected VIDEO changes the cache key by itself.
        try:
            return video_io.file_fingerprint(_resolve(file, path))
        except (OSError, ValueError) as e:
            return f"unresolved: {e}"  # execute raises the clear error

    @classmethod
    def validate_inputs(cls, file: str) -> bool | str:
        # Existence is checked in execute, which knows whether path or a VIDEO replaces file. Declaring
        # `file` here also skips the combo-membership check, so path/VIDEO work with an empty input folder.
        if file and video_io.has_traversal(file):
            return f"Invalid video file name (contains '..'): {file}"
        return True


def _resolve(file: str, path: str) -> str:
    return video_io.resolve_video_path(path if (path or "").strip() else file)


class _ProgressReporter:
    """ComfyUI progress bar (UI and API progress messages) over the kept frames, created on the first frame."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, kept: int, expected: int) -> None:
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(expected)
        self.bar.update_absolute(kept, expected)
