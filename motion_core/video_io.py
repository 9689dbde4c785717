"""Streaming reference-video loader: frames are selected while decoding and resized on the fly.

Sources: PyAV for mp4/webm/mov/mkv/gif (and anything else ffmpeg reads), Pillow for animated WebP
(ffmpeg's webp decoder cannot read animated files), or an in-memory frame tensor (ComfyUI VIDEO
built from images). Only the selected frames are converted to RGB and kept; the decoder is
dropped as soon as the selection is complete.

Selection order (VideoHelperSuite's): force_rate resampling -> skip_first_frames ->
select_every_nth -> frame_load_cap -> evenly_spaced_frames. frame_load_cap therefore bounds the
window that evenly_spaced_frames picks from; evenly spaced picking needs the window's length and
costs one extra decoding pass that keeps no frames.

Output size, always a multiple of 8 (the VAE downsamples by 8):
- width and height given: each is rounded to the nearest multiple of 8 (halves up, at least 8);
- one given: it is rounded, the other follows the source aspect ratio, then is rounded;
- both 0 (keep): the source size rounded down ("crop": centre crop of at most 7 px, no rescale),
  up ("pad": black border, no rescale) or to the nearest multiple ("stretch").
resize_mode then fits the source into that size: "stretch" resizes straight (MotionClone's
reference code), "crop" scales to cover and centre-crops, "pad" scales to fit and centre-pads
with black.

Memory: before decoding, (upper bound of selected frames) * H * W * 3 * 4 bytes is checked
against MOTIONCLONE_MAX_VIDEO_BYTES (default 8 GiB); while decoding, the same limit is enforced
on the frames actually kept, in case the container metadata understated the frame count.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import cv2
import numpy as np
import torch

from .errors import MotionCloneError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".gif", ".webp")
RESIZE_MODES = ("stretch", "crop", "pad")
ENV_VIDEO_DIRS = "MOTIONCLONE_VIDEO_DIRS"
ENV_MAX_BYTES = "MOTIONCLONE_MAX_VIDEO_BYTES"
DEFAULT_MAX_BYTES = 8 * 1024**3
MAX_OUTPUT_SIDE = 8192
MAX_SOURCE_SIDE = 16384  # larger frames cost too much to decode even when scaled down
MAX_FORCE_RATE = 1000.0
FALLBACK_FPS = Fraction(8)  # AnimateDiff's usual rate, for streams that state none

SourceLike = str | os.PathLike | io.BytesIO


class VideoLoadError(MotionCloneError):
    """The video cannot be loaded as asked; the message says why and what to change."""


def _err(message: str) -> VideoLoadError:
    return VideoLoadError(f"Load Reference Video: {message}")


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class FrameSelection:
    """Which frames to keep (0 disables the cap, the evenly spaced pick and the resampling)."""

    frame_load_cap: int = 0
    skip_first_frames: int = 0
    select_every_nth: int = 1
    evenly_spaced_frames: int = 0
    force_rate: float = 0.0

    def validate(self) -> None:
        for name in ("frame_load_cap", "skip_first_frames", "evenly_spaced_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise _err(f"{name} must be a whole number >= 0, got {value!r}")
        if not isinstance(self.select_every_nth, int) or self.select_every_nth < 1:
            raise _err(f"select_every_nth must be >= 1, got {self.select_every_nth!r}")
        if not math.isfinite(self.force_rate) or not 0 <= self.force_rate <= MAX_FORCE_RATE:
            raise _err(f"force_rate must be between 0 (source rate) and {MAX_FORCE_RATE:g} fps, got {self.force_rate}")
        if self.evenly_spaced_frames and self.frame_load_cap and self.evenly_spaced_frames > self.frame_load_cap:
            raise _err(
                f"evenly_spaced_frames ({self.evenly_spaced_frames}) picks from the first frame_load_cap "
                f"({self.frame_load_cap}) selected frames, so it cannot be larger; raise frame_load_cap or set it to 0"
            )


@dataclass(frozen=True)
class ResizeSpec:
    """Output size (0 = from the source) and how the source is fitted into it."""

    width: int = 0
    height: int = 0
    mode: str = "stretch"

    def validate(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise _err(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.mode!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise _err(f"{name} must be a whole number >= 0 (0 = keep), got {value!r}")
            if value > MAX_OUTPUT_SIDE:
                raise _err(f"{name} {value} is larger than the maximum of {MAX_OUTPUT_SIDE}")


@dataclass(frozen=True)
class VideoInfo:
    """What the container says before decoding; frame_count and duration may be missing or wrong."""

    width: int
    height: int
    fps: Fraction
    frame_count: int | None
    duration: Fraction | None  # seconds
    decoder: str  # "pyav", "pillow" or "tensor"


@dataclass
class LoadStats:
    """Counters that show the loader streams (tests use them)."""

    decoded: int = 0  # source frames pulled from the decoder, over all passes
    converted: int = 0  # frames turned into RGB arrays and kept
    passes: int = 0
    check_interrupt: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    # progress(kept, expected): after each kept frame, when the container tells how many to expect.
    progress: Callable[[int, int], None] | None = field(default=None, repr=False, compare=False)

    def count_decoded(self) -> None:
        self.decoded += 1
        if self.check_interrupt is not None:
            self.check_interrupt()  # long decodes stay cancellable (ComfyUI's interrupt raises here)


@dataclass
class LoadedVideo:
    images: torch.Tensor  # [F, H, W, 3] float32 in 0..1
    fps: float  # rate of the returned frames (see _output_fps)
    source: VideoInfo
    stats: LoadStats = field(default_factory=LoadStats)

    @property
    def frame_count(self) -> int:
        return int(self.images.shape[0])


# ----------------------------------------------------------------------------- paths


def allowed_video_dirs() -> list[str]:
    """Real paths of the folders videos may be read from: ComfyUI's input folder + MOTIONCLONE_VIDEO_DIRS."""
    import folder_paths

    dirs = [folder_paths.get_input_directory()]
    dirs += [d.strip() for d in os.environ.get(ENV_VIDEO_DIRS, "").split(os.pathsep) if d.strip()]
    return [os.path.realpath(os.path.expanduser(d)) for d in dirs]


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def has_traversal(name: str) -> bool:
    return ".." in re.split(r"[\\/]+", name)


def resolve_video_path(name: str, allowed_dirs: list[str] | None = None) -> str:
    """Real path of a video named relative to the input folder (combo value) or by an absolute path.

    Symlinks are resolved before the check, so a link inside the input folder that points elsewhere
    is refused too; '..' is refused outright, as no legitimate name needs it.
    """
    import folder_paths

    raw = (name or "").strip()
    if not raw:
        raise _err("no video given: choose a file, enter a path or connect a VIDEO")
    if "\x00" in raw:
        raise _err("the video path contains a NUL character")
    if has_traversal(raw):
        raise _err(f"'{raw}': '..' is not allowed in video paths; give a path inside the allowed folders")
    expanded = os.path.expanduser(raw)
    # Relative names (the combo, or "sub/clip.mp4") are under the input folder; "[output]"-style
    # annotations are honoured and then subject to the same folder check. Joined here rather than by
    # folder_paths.get_annotated_filepath, which newer ComfyUI (0.33) makes refuse any link out of its
    # folder with a bare "Invalid file path": our check says why and honours MOTIONCLONE_VIDEO_DIRS.
    if os.path.isabs(expanded):
        candidate = expanded
    else:
        rel, base = folder_paths.annotated_filepath(raw)
        candidate = os.path.join(base or folder_paths.get_input_directory(), rel)
    real = os.path.realpath(candidate)
    dirs = allowed_dirs if allowed_dirs is not None else allowed_video_dirs()
    if not any(_inside(real, d) for d in dirs):
        raise _err(
            f"'{raw}' resolves to {real}, which is outside the allowed folders ({', '.join(dirs)}). Put the video in "
            f"ComfyUI's input folder or add its folder to {ENV_VIDEO_DIRS} (separated by '{os.pathsep}')."
        )
    if not os.path.exists(real):
        raise _err(f"video file not found: {real}")
    if not os.path.isfile(real):
        raise _err(f"'{real}' is not a file")
    return real


def list_input_videos() -> list[str]:
    """Video files directly in ComfyUI's input folder, for the file combo."""
    import folder_paths

    root = folder_paths.get_input_directory()
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(n for n in names if n.lower().endswith(VIDEO_EXTENSIONS) and os.path.isfile(os.path.join(root, n)))


def file_fingerprint(path: str) -> str:
    """Changes when the file is replaced or edited (path, mtime, size), without reading it."""
    st = os.stat(path)
    return f"{path}|{st.st_mtime_ns}|{st.st_size}"


def max_video_bytes() -> int:
    raw = os.environ.get(ENV_MAX_BYTES, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise _err(f"{ENV_MAX_BYTES}={raw!r} is not a whole number of bytes") from None
    if value <= 0:
        raise _err(f"{ENV_MAX_BYTES} must be > 0, got {value}")
    return value


# ----------------------------------------------------------------------------- sizes


def _round8(x: float) -> int:
    return max(8, int(math.floor(x / 8 + 0.5)) * 8)


def output_size(src_width: int, src_height: int, resize: ResizeSpec) -> tuple[int, int]:
    """(width, height) of the output frames, multiples of 8; see the module docstring."""
    if src_width <= 0 or src_height <= 0:
        raise _err(f"the video reports an invalid frame size {src_width}x{src_height}")
    if resize.width and resize.height:
        width, height = _round8(resize.width), _round8(resize.height)
    elif resize.width:
        width = _round8(resize.width)
        height = _round8(src_height * width / src_width)
    elif resize.height:
        height = _round8(resize.height)
        width = _round8(src_width * height / src_height)
    else:
        snap = {"crop": lambda v: max(8, v // 8 * 8), "pad": lambda v: -(-v // 8) * 8, "stretch": _round8}[resize.mode]
        width, height = snap(src_width), snap(src_height)
    if width > MAX_OUTPUT_SIDE or height > MAX_OUTPUT_SIDE:
        raise _err(
            f"output size {width}x{height} is larger than {MAX_OUTPUT_SIDE} pixels on a side; set width/height"
        )
    return width, height


def _resize(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if (w, h) == (width, height):
        return np.ascontiguousarray(frame)
    # INTER_AREA averages when shrinking (no aliasing); bilinear when enlarging (no overshoot).
    interp = cv2.INTER_AREA if width * height < w * h else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(frame), (width, height), interpolation=interp)


def fit_frame(frame: np.ndarray, width: int, height: int, mode: str, keep_scale: bool = False) -> np.ndarray:
    """Fit an HxWx3 frame into width x height by stretching, centre-cropping or centre-padding.

    keep_scale (the "keep size" case) crops or pads without rescaling, unless the frame does not
    cover (crop) or fit (pad) the target.
    """
    h, w = frame.shape[:2]
    if mode == "stretch" or (w, h) == (width, height):
        return _resize(frame, width, height)
    if mode == "crop":
        scale = max(width / w, height / h, 1.0 if keep_scale else 0.0)
        # Crop the source to the target aspect first: resizing only what is kept is cheaper.
        cw, ch = min(w, max(1, round(width / scale))), min(h, max(1, round(height / scale)))
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return _resize(frame[y0 : y0 + ch, x0 : x0 + cw], width, height)
    scale = min(width / w, height / h, 1.0 if keep_scale else math.inf)
    nw, nh = min(width, max(1, round(w * scale))), min(height, max(1, round(h * scale)))
    out = np.zeros((height, width, 3), dtype=frame.dtype)
    x0, y0 = (width - nw) // 2, (height - nh) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = _resize(frame, nw, nh)
    return out


# ----------------------------------------------------------------------------- sources


@dataclass
class _Frame:
    time: Fraction  # seconds since the first frame
    duration: Fraction | None
    array: Callable[[], np.ndarray]  # HxWx3 uint8 or float32; only called for kept frames


def _check_source_size(width: int, height: int, label: str) -> None:
    if width > MAX_SOURCE_SIDE or height > MAX_SOURCE_SIDE:
        raise _err(f"{label} has {width}x{height} frames, more than {MAX_SOURCE_SIDE} pixels on a side")


class _PyAVSource:
    def __init__(self, src: SourceLike, label: str, stats: LoadStats):
        import av

        self.src, self.label, self.stats = src, label, stats
        if isinstance(src, io.BytesIO):
            src.seek(0)
        try:
            self.container = av.open(src if isinstance(src, io.BytesIO) else os.fspath(src), mode="r")
        except (av.error.FFmpegError, OSError) as e:
            raise _err(f"{label} is not a readable video ({e})") from e
        if not self.container.streams.video:
            self.container.close()
            raise _err(f"{label} has no video stream")
        self.stream = stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_source_size(width, height, label)
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        duration = None
        if self.container.duration:
            duration = Fraction(self.container.duration, av.time_base)
        elif stream.duration and stream.time_base:
            duration = stream.duration * stream.time_base
        frames = int(stream.frames) if stream.frames and stream.frames > 0 else None
        self.decoded_to_end: int | None = None  # frames of a pass that ran to the end of the stream
        if not fps:
            fps = Fraction(frames) / duration if frames and duration else FALLBACK_FPS
        if frames is None and duration:
            frames = math.ceil(duration * fps)
        self.info = VideoInfo(width, height, Fraction(fps), frames, duration, "pyav")

    def frames(self) -> Iterator[_Frame]:
        import av

        dt = 1 / self.info.fps
        t0 = last = None
        count = 0
        decoded = self.container.decode(self.stream)
        while True:
            try:
                frame = next(decoded)
            except StopIteration:
                self.decoded_to_end = count
                return
            except av.error.FFmpegError as e:
                raise _err(f"decoding {self.label} failed after {count} frames ({e})") from e
            count += 1
            self.stats.count_decoded()
            tb = frame.time_base or self.stream.time_base
            if frame.pts is not None and tb:
                t = Fraction(frame.pts) * tb
            else:
                t = last + dt if last is not None else Fraction(0)
            t0 = t if t0 is None else t0
            last = t
            duration = Fraction(frame.duration) * tb if frame.duration and tb else None
            yield _Frame(t - t0, duration, lambda f=frame: f.to_ndarray(format="rgb24"))

    def close(self) -> None:
        self.container.close()


class _PillowSource:
    """Animated WebP (ffmpeg's webp decoder does not support animation)."""

    def __init__(self, src: SourceLike, label: str, stats: LoadStats):
        from PIL import Image, UnidentifiedImageError

        self.label, self.stats = label, stats
        if isinstance(src, io.BytesIO):
            src.seek(0)
        try:
            self.image = Image.open(src if isinstance(src, io.BytesIO) else os.fspath(src))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
            raise _err(f"{label} is not a readable WebP ({e})") from e
        width, height = self.image.size
        try:
            _check_source_size(width, height, label)
            self.count = int(getattr(self.image, "n_frames", 1))
            self.image.load()  # frame 0 only: its duration gives the nominal rate
        except VideoLoadError:
            self.image.close()
            raise
        except (OSError, EOFError, ValueError) as e:
            self.image.close()
            raise _err(f"{label} is not a readable WebP ({e})") from e
        fps = Fraction(1000, self._duration_ms())
        self.info = VideoInfo(width, height, fps, self.count, None, "pillow")

    def _duration_ms(self) -> int:
        ms = int(self.image.info.get("duration") or 0)
        return ms if ms > 0 else 100  # browsers show 0 ms frames for 100 ms

    def frames(self) -> Iterator[_Frame]:
        t = 0
        for i in range(self.count):
            try:
                self.image.seek(i)
                self.image.load()
                # Converted now: the Image object is reused for the next frame.
                array = np.array(self.image.convert("RGB"))
            except (OSError, EOFError, ValueError) as e:
                raise _err(f"decoding {self.label} failed after {i} frames ({e})") from e
            self.stats.count_decoded()
            ms = self._duration_ms()
            yield _Frame(Fraction(t, 1000), Fraction(ms, 1000), lambda a=array: a)
            t += ms

    def close(self) -> None:
        self.image.close()


class _TensorSource:
    """Frames already in memory (a VIDEO made from images)."""

    def __init__(self, images: torch.Tensor, fps: float | Fraction, label: str, stats: LoadStats):
        if images.ndim != 4 or images.shape[-1] < 3:
            raise _err(f"{label} frames must be [F, H, W, 3], got {list(images.shape)}")
        self.images, self.stats = images, stats
        fps = Fraction(fps).limit_denominator(1_000_000) if fps and fps > 0 else FALLBACK_FPS
        frames, height, width = images.shape[:3]
        _check_source_size(width, height, label)
        self.info = VideoInfo(width, height, fps, frames, Fraction(frames) / fps, "tensor")

    def frames(self) -> Iterator[_Frame]:
        dt = 1 / self.info.fps
        for i in range(self.images.shape[0]):
            self.stats.count_decoded()
            yield _Frame(i * dt, dt, lambda i=i: self.images[i, :, :, :3].detach().float().cpu().numpy())

    def close(self) -> None:
        pass


def _is_webp(src: SourceLike) -> bool:
    if isinstance(src, io.BytesIO):
        src.seek(0)
        head = src.read(12)
        src.seek(0)
    else:
        try:
            with open(src, "rb") as f:
                head = f.read(12)
        except FileNotFoundError:
            raise _err(f"video file not found: {os.fspath(src)}") from None
        except OSError as e:
            raise _err(f"cannot read {os.fspath(src)} ({e})") from e
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def _file_source_factory(src: SourceLike, stats: LoadStats) -> Callable[[], Any]:
    label = "the VIDEO input" if isinstance(src, io.BytesIO) else f"'{os.fspath(src)}'"
    kind = _PillowSource if _is_webp(src) else _PyAVSource
    return lambda: kind(src, label, stats)


# ----------------------------------------------------------------------------- selection


def _fraction(x: float) -> Fraction:
    return Fraction(repr(float(x)))  # the decimal the user typed: 29.97 -> 2997/100


def _resample(frames: Iterator[_Frame], rate: Fraction, fallback_duration: Fraction) -> Iterator[_Frame]:
    """Frames at t = j / rate: each output shows the source frame on screen at that time."""
    period = 1 / rate
    j = 0
    prev = None
    for frame in frames:
        if prev is not None:
            while j * period < frame.time:
                yield prev
                j += 1
        prev = frame
    if prev is not None:
        end = prev.time + (prev.duration or fallback_duration)
        while j * period < end:
            yield prev
            j += 1


def _candidates(source: Any, sel: FrameSelection) -> Iterator[_Frame]:
    """Frames after resampling, skip, every-nth and the cap, lazily (stops decoding at the cap)."""
    frames = source.frames()
    if sel.force_rate:
        frames = _resample(frames, _fraction(sel.force_rate), 1 / source.info.fps)
    kept = 0
    try:
        for i, frame in enumerate(frames):
            if i < sel.skip_first_frames or (i - sel.skip_first_frames) % sel.select_every_nth:
                continue
            yield frame
            kept += 1
            if sel.frame_load_cap and kept >= sel.frame_load_cap:
                return
    finally:
        frames.close()


def estimate_selected_frames(info: VideoInfo, sel: FrameSelection) -> int | None:
    """Upper bound of the frames kept, from metadata; None when the container says too little."""
    if sel.evenly_spaced_frames:
        return sel.evenly_spaced_frames
    n = info.frame_count
    if sel.force_rate:
        duration = info.duration if info.duration else (Fraction(n) / info.fps if n else None)
        n = math.ceil(duration * _fraction(sel.force_rate)) + 1 if duration else None
    if n is None:
        return sel.frame_load_cap or None
    n = -(-max(0, n - sel.skip_first_frames) // sel.select_every_nth)
    return min(n, sel.frame_load_cap) if sel.frame_load_cap else n


def _describe(sel: FrameSelection) -> str:
    return (
        f"skip_first_frames={sel.skip_first_frames}, select_every_nth={sel.select_every_nth}, "
        f"frame_load_cap={sel.frame_load_cap}, force_rate={sel.force_rate:g}"
    )


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _output_fps(info: VideoInfo, sel: FrameSelection, window: int | None) -> float:
    """Rate that plays the kept frames over the selected span: base rate / nth, stretched by the even pick."""
    fps = (_fraction(sel.force_rate) if sel.force_rate else info.fps) / sel.select_every_nth
    n = sel.evenly_spaced_frames
    if n > 1 and window and window > 1:
        fps *= Fraction(n - 1, window - 1)
    return float(fps)


def _load(open_source: Callable[[], Any], sel: FrameSelection, resize: ResizeSpec, max_bytes: int | None,
          stats: LoadStats) -> LoadedVideo:
    sel.validate()
    resize.validate()
    limit = max_bytes if max_bytes is not None else max_video_bytes()

    source = open_source()
    try:
        info = source.info
        width, height = output_size(info.width, info.height, resize)
        keep = not resize.width and not resize.height
        frame_bytes = width * height * 3 * 4
        bound = estimate_selected_frames(info, sel)
        if bound is not None and bound * frame_bytes > limit:
            raise _err(
                f"the output would be about {_gib(bound * frame_bytes)} ({bound} frames of {width}x{height}), above "
                f"the limit of {_gib(limit)} ({ENV_MAX_BYTES}); lower frame_load_cap, use evenly_spaced_frames or "
                f"select_every_nth, or set a smaller width/height"
            )

        window = None
        picked: Iterator[_Frame]
        if sel.evenly_spaced_frames:
            stats.passes += 1
            window = sum(1 for _ in _candidates(source, sel))  # counting pass: nothing converted or kept
            if damage := _damage(source):
                if sel.evenly_spaced_frames > window:
                    raise _err(f"{_damaged(source.label, damage)}; re-export or download it again, or lower "
                               f"evenly_spaced_frames to at most {window} to pick from the part that decodes")
                logging.warning("Load Reference Video: %s; the %d evenly spaced frames are picked from that part only",
                                _damaged(source.label, damage), sel.evenly_spaced_frames)
            if window == 0:
                raise _err(f"no frames left after selection ({_describe(sel)}; {stats.decoded} decoded)")
            if sel.evenly_spaced_frames > window:
                raise _err(
                    f"evenly_spaced_frames={sel.evenly_spaced_frames} but only {window} frames are left after "
                    f"selection ({_describe(sel)}); lower it or the skipping"
                )
            # MotionClone's reference: np.linspace(first, last, N).round() over the selection.
            wanted = np.linspace(0, window - 1, sel.evenly_spaced_frames).round().astype(int).tolist()
            source.close()
            source = open_source()
            picked = _pick(_candidates(source, sel), wanted)
        else:
            picked = _candidates(source, sel)

        stats.passes += 1
        kept: list[np.ndarray] = []
        for frame in picked:
            if (len(kept) + 1) * frame_bytes > limit:
                raise _err(
                    f"stopped after {len(kept)} frames: more would exceed the limit of {_gib(limit)} "
                    f"({ENV_MAX_BYTES}); the container metadata understated the frame count. Set frame_load_cap, "
                    f"use evenly_spaced_frames or set a smaller width/height"
                )
            fitted = fit_frame(frame.array(), width, height, resize.mode, keep_scale=keep)
            if info.decoder == "pyav" and fitted.base is not None:
                fitted = fitted.copy()  # a view on PyAV's frame: own the pixels so the frame is freed now
            kept.append(fitted)
            stats.converted += 1
            if stats.progress is not None and bound:
                stats.progress(len(kept), max(bound, len(kept)))
        if (damage := _damage(source)) and not sel.evenly_spaced_frames:
            wanted = f"{sel.frame_load_cap} frames" if sel.frame_load_cap else "all frames"
            raise _err(f"{_damaged(source.label, damage)}; {wanted} were asked for and {len(kept)} were loaded. "
                       "Re-export or download it again, or set frame_load_cap to at most "
                       f"{len(kept)} to use the part that decodes")
        if not kept:
            raise _err(f"no frames left after selection ({_describe(sel)}; {stats.decoded} frames decoded)")
    finally:
        source.close()

    images = _stack(kept, width, height)
    return LoadedVideo(images, _output_fps(info, sel, window), info, stats)


def _damage(source: Any) -> tuple[int, int] | None:
    """(decoded, promised) when a pass ran to the end of the stream well short of the container's frame count
    (a file cut short: its index, at the front, still lists every frame); None otherwise. A few frames of
    slack cover containers whose count is estimated from duration x rate."""
    decoded, promised = getattr(source, "decoded_to_end", None), source.info.frame_count
    if decoded is None or not promised:
        return None
    return (decoded, promised) if decoded < promised - max(2, round(0.05 * promised)) else None


def _damaged(label: str, damage: tuple[int, int]) -> str:
    decoded, promised = damage
    return (f"{label} is damaged: its container promises {promised} frames but only the first {decoded} decode "
            f"(the file was probably cut short while copying or downloading)")


def _pick(candidates: Iterator[_Frame], wanted: list[int]) -> Iterator[_Frame]:
    targets = set(wanted)
    last = max(wanted)
    try:
        for k, frame in enumerate(candidates):
            if k in targets:
                yield frame
            if k >= last:
                return  # stop decoding after the last wanted frame
    finally:
        candidates.close()


def _stack(kept: list[np.ndarray], width: int, height: int) -> torch.Tensor:
    """[F,H,W,3] float32 0..1, filled frame by frame so uint8 frames are freed as they are copied."""
    out = torch.empty((len(kept), height, width, 3), dtype=torch.float32)
    for i in range(len(kept)):
        frame, kept[i] = kept[i], None
        out[i].copy_(torch.from_numpy(frame))
        if frame.dtype == np.uint8:
            out[i].div_(255.0)
        else:
            out[i].clamp_(0.0, 1.0)
    return out


# ----------------------------------------------------------------------------- public API


def load_video_file(
    src: SourceLike,
    selection: FrameSelection | None = None,
    resize: ResizeSpec | None = None,
    *,
    max_bytes: int | None = None,
    check_interrupt: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoadedVideo:
    """Decode a file path (no folder check here: use resolve_video_path) or an in-memory file.

    max_bytes defaults to MOTIONCLONE_MAX_VIDEO_BYTES; check_interrupt is called per decoded frame,
    progress(kept, expected) per kept frame when the expected count is known.
    """
    stats = LoadStats(check_interrupt=check_interrupt, progress=progress)
    factory = _file_source_factory(src, stats)
    return _load(factory, selection or FrameSelection(), resize or ResizeSpec(), max_bytes, stats)


def load_video_tensor(
    images: torch.Tensor,
    fps: float | Fraction,
    selection: FrameSelection | None = None,
    resize: ResizeSpec | None = None,
    *,
    max_bytes: int | None = None,
    check_interrupt: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoadedVideo:
    """Same selection and resizing for frames already in memory ([F,H,W,C] float 0..1)."""
    stats = LoadStats(check_interrupt=check_interrupt, progress=progress)
    return _load(lambda: _TensorSource(images, fps, "the VIDEO input", stats), selection or FrameSelection(),
                 resize or ResizeSpec(), max_bytes, stats)


def load_video_input(
    video: Any,
    selection: FrameSelection | None = None,
    resize: ResizeSpec | None = None,
    *,
    max_bytes: int | None = None,
    check_interrupt: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoadedVideo:
    """A ComfyUI VIDEO (comfy_api VideoInput): streamed from its file when it has one, else its frames."""
    from comfy_api.latest import Input

    if type(video).get_stream_source is not Input.Video.get_stream_source:
        # File-backed (VideoFromFile): a path or BytesIO we can stream. The base implementation would
        # re-encode in-memory frames to H.264, which is lossy, so those take the tensor route.
        src = video.get_stream_source()
        return load_video_file(src, selection, resize, max_bytes=max_bytes, check_interrupt=check_interrupt,
                               progress=progress)
    components = video.get_components()
    logging.debug("MotionClone: VIDEO input without a file, selecting from its %d frames", components.images.shape[0])
    return load_video_tensor(components.images, components.frame_rate, selection, resize, max_bytes=max_bytes,
                             check_interrupt=check_interrupt, progress=progress)
