"""Load Reference Video: streaming decode, frame selection by content, resizing, safety checks."""

from __future__ import annotations

import asyncio
import io
import os
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import folder_paths
import numpy as np
import pytest
import torch
from comfy_api.latest import InputImpl
from comfy_api.latest import io as comfy_io
from comfy_api.util import VideoComponents
from PIL import Image

from motionclone.motion_core import video_io
from motionclone.motion_core.video_io import FrameSelection, ResizeSpec, VideoLoadError
from motionclone.nodes.video_nodes import LoadReferenceVideo

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference_videos"
FRAMES, FPS, W, H = 24, 10, 64, 48
BASE, STEP = 16, 8  # frame i is a flat grey of BASE + STEP * i: decoded content names the frame


def _level(i: int) -> int:
    return BASE + STEP * i


def _grey_frames(n: int = FRAMES, w: int = W, h: int = H) -> list[np.ndarray]:
    return [np.full((h, w, 3), _level(i), np.uint8) for i in range(n)]


def _encode_av(path: Path, frames: list[np.ndarray], fps: int, codec: str, pix_fmt: str = "yuv420p",
               options: dict | None = None) -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        stream.options = options or {}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return path


def _save_pillow(path: Path, frames: list[np.ndarray], fps: int) -> Path:
    images = [Image.fromarray(a) for a in frames]
    extra = {"lossless": True} if path.suffix == ".webp" else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, **extra)
    return path


# One writer per container the node accepts; codecs from PyAV's wheel (PIL for gif and animated webp).
WRITERS = {
    "mp4": lambda p, f, fps: _encode_av(p, f, fps, "libx264", options={"crf": "0"}),
    "webm": lambda p, f, fps: _encode_av(p, f, fps, "libvpx-vp9", options={"lossless": "1"}),
    "mov": lambda p, f, fps: _encode_av(p, f, fps, "mpeg4", options={"qscale": "1"}),
    "mkv": lambda p, f, fps: _encode_av(p, f, fps, "ffv1", pix_fmt="bgr0"),
    "gif": _save_pillow,
    "webp": _save_pillow,
}


def write_clip(folder: Path, ext: str, frames: list[np.ndarray] | None = None, fps: int = FPS,
               name: str = "clip") -> Path:
    return WRITERS[ext](folder / f"{name}.{ext}", frames if frames is not None else _grey_frames(), fps)


def write_cut_short(folder: Path, name: str = "cut.mp4", keep: float = 0.4) -> Path:
    """A 16-frame mp4 with its index at the front (faststart), cut to `keep` of its bytes: the container
    still promises every frame, only the first ones decode (a copy or download that stopped early)."""
    full = folder / f"full_{name}"
    rng = np.random.default_rng(0)  # noise: the frames, not the header, make up the file
    with av.open(str(full), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for _ in range(16):
            array = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    data = full.read_bytes()
    (folder / name).write_bytes(data[: int(len(data) * keep)])
    return folder / name


def frame_ids(images: torch.Tensor) -> list[int]:
    """Which generated frame each output frame is, from its mean brightness."""
    levels = images.mean(dim=(1, 2, 3)).mul(255).tolist()
    ids = [round((v - BASE) / STEP) for v in levels]
    for v, i in zip(levels, ids):
        assert abs(v - _level(i)) < 3, f"frame content {v:.1f} is not a clean generated level"
    return ids


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {ext: write_clip(folder, ext) for ext in WRITERS}


@pytest.fixture
def input_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "input"
    folder.mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(folder))
    monkeypatch.delenv(video_io.ENV_VIDEO_DIRS, raising=False)
    monkeypatch.delenv(video_io.ENV_MAX_BYTES, raising=False)
    return folder


def _node(file: str = "", *, path: str = "", video=None, frame_load_cap=0, skip_first_frames=0, select_every_nth=1,
          evenly_spaced_frames=0, force_rate=0.0, width=0, height=0, resize_mode="stretch"):
    out = LoadReferenceVideo.execute(file, frame_load_cap, skip_first_frames, select_every_nth, evenly_spaced_frames,
                                     force_rate, width, height, resize_mode, path=path, video=video)
    return out.result


# ----------------------------------------------------------------------------- selection by content

SELECTIONS = [
    (FrameSelection(), list(range(FRAMES)), FPS),
    (FrameSelection(frame_load_cap=5), [0, 1, 2, 3, 4], FPS),
    (FrameSelection(skip_first_frames=3, select_every_nth=4), [3, 7, 11, 15, 19, 23], FPS / 4),
    (FrameSelection(frame_load_cap=4, skip_first_frames=2, select_every_nth=3), [2, 5, 8, 11], FPS / 3),
    # np.linspace(0, 23, 4).round() -> 0, 8, 15, 23; fps keeps the clip's duration: 10 * 3 / 23.
    (FrameSelection(evenly_spaced_frames=4), [0, 8, 15, 23], FPS * 3 / 23),
    # Candidates 2, 5, ..., 23 (8 frames); linspace(0, 7, 3) = 0, 3.5, 7 -> round half to even: 0, 4, 7.
    (FrameSelection(skip_first_frames=2, select_every_nth=3, evenly_spaced_frames=3), [2, 14, 23], FPS / 3 * 2 / 7),
    # The cap bounds the window the even pick spans: first 10 frames -> linspace(0, 9, 4) = 0, 3, 6, 9.
    (FrameSelection(frame_load_cap=10, evenly_spaced_frames=4), [0, 3, 6, 9], FPS * 3 / 9),
    (FrameSelection(force_rate=5), list(range(0, FRAMES, 2)), 5),
    (FrameSelection(force_rate=20), [i // 2 for i in range(2 * FRAMES)], 20),
    (FrameSelection(force_rate=5, skip_first_frames=1, frame_load_cap=3), [2, 4, 6], 5),
]


@pytest.mark.parametrize("ext", list(WRITERS))
def test_selection_by_content_in_every_container(clips, ext):
    for selection, expected, fps in SELECTIONS:
        loaded = video_io.load_video_file(clips[ext], selection)
        assert loaded.images.shape == (len(expected), H, W, 3), (ext, selection)
        assert loaded.images.dtype == torch.float32
        assert frame_ids(loaded.images) == expected, (ext, selection)
        assert loaded.fps == pytest.approx(fps), (ext, selection)
    assert loaded.source.decoder == ("pillow" if ext == "webp" else "pyav")


def test_variable_frame_durations_are_resampled_by_timestamp(tmp_path):
    # Animated webp with per-frame durations 100, 300, 100 ms: at 10 fps frame 1 lasts three outputs.
    frames = _grey_frames(3)
    images = [Image.fromarray(a) for a in frames]
    path = tmp_path / "vfr.webp"
    images[0].save(path, save_all=True, append_images=images[1:], duration=[100, 300, 100], lossless=True)
    assert frame_ids(video_io.load_video_file(path, FrameSelection(force_rate=10)).images) == [0, 1, 1, 1, 2]
    assert frame_ids(video_io.load_video_file(path).images) == [0, 1, 2]


# ----------------------------------------------------------------------------- sizes


def _band_frames(n: int = 2) -> list[np.ndarray]:
    """64x32: red columns 0-15, green 16-47, blue 48-63."""
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:, :16, 0] = 255
    frame[:, 16:48, 1] = 255
    frame[:, 48:, 2] = 255
    return [frame] * n


def _channel_share(image: torch.Tensor) -> list[float]:
    return (image.sum(dim=(0, 1)) / image.sum()).tolist()


def test_crop_pad_stretch(tmp_path):
    path = write_clip(tmp_path, "mkv", _band_frames())  # ffv1 RGB: lossless

    crop = video_io.load_video_file(path, resize=ResizeSpec(32, 32, "crop")).images
    assert crop.shape == (2, 32, 32, 3)
    assert torch.allclose(crop[0], torch.tensor([0.0, 1.0, 0.0]).expand(32, 32, 3), atol=0.02)  # centre only

    pad = video_io.load_video_file(path, resize=ResizeSpec(64, 64, "pad")).images[0]
    assert pad.shape == (64, 64, 3)
    assert pad[:16].abs().max() == 0 and pad[48:].abs().max() == 0  # black bars above and below
    assert torch.allclose(pad[16:48, 20:44], torch.tensor([0.0, 1.0, 0.0]).expand(32, 24, 3), atol=0.02)
    assert pad[16:48, :12, 0].min() > 0.98 and pad[16:48, 52:, 2].min() > 0.98

    stretch = video_io.load_video_file(path, resize=ResizeSpec(32, 32, "stretch")).images[0]
    assert stretch.shape == (32, 32, 3)
    assert _channel_share(stretch) == pytest.approx([0.25, 0.5, 0.25], abs=0.02)  # all bands, squeezed
    assert stretch[:, :6, 0].min() > 0.98 and stretch[:, 26:, 2].min() > 0.98


@pytest.mark.parametrize(
    ("width", "height", "mode", "expected"),
    [
        (50, 0, "stretch", (48, 24)),  # 50 -> 48; height follows the 2:1 aspect: 24
        (0, 20, "crop", (48, 24)),  # 20 -> 24 (halves round up); width follows: 64 * 24 / 32 = 48
        (36, 36, "pad", (40, 40)),
        (0, 0, "crop", (56, 32)),  # keep: 60x36 rounded down
        (0, 0, "pad", (64, 40)),  # rounded up
        (0, 0, "stretch", (64, 40)),  # nearest (60 -> 64, 36 -> 40)
        (3, 3, "stretch", (8, 8)),  # at least 8
    ],
)
def test_output_sizes_are_multiples_of_8(width, height, mode, expected):
    src = (64, 32) if (width, height) != (0, 0) else (60, 36)
    assert video_io.output_size(*src, ResizeSpec(width, height, mode)) == expected


def test_keep_size_pads_a_source_that_is_not_a_multiple_of_8(tmp_path):
    frames = [np.full((36, 60, 3), 200, np.uint8)] * 2
    path = write_clip(tmp_path, "mkv", frames)
    padded = video_io.load_video_file(path, resize=ResizeSpec(0, 0, "pad")).images[0]
    assert padded.shape == (40, 64, 3)
    assert padded[2:38, 2:62].mean() == pytest.approx(200 / 255, abs=0.01)
    assert padded[:2].max() == 0 and padded[:, :2].max() == 0
    assert video_io.load_video_file(path, resize=ResizeSpec(0, 0, "crop")).images.shape == (2, 32, 56, 3)


# ----------------------------------------------------------------------------- the real reference clips


@pytest.fixture(scope="module")
def reference_clips() -> list[Path]:
    clips = sorted(REFERENCE_DIR.glob("*.mp4"))
    if not clips:
        pytest.skip(f"no reference clips at {REFERENCE_DIR}")
    return clips


def test_reference_clips_through_the_node(reference_clips, input_dir, monkeypatch):
    monkeypatch.setenv(video_io.ENV_VIDEO_DIRS, str(REFERENCE_DIR))
    for clip in reference_clips:
        with av.open(str(clip)) as c:
            stream = c.streams.video[0]
            source_frames, source_fps = stream.frames, float(stream.average_rate)
        # The node's defaults: MotionClone's 16 evenly spaced frames at 512x512, stretched.
        images, count, fps = _node(path=str(clip), evenly_spaced_frames=16, width=512, height=512)
        assert images.shape == (16, 512, 512, 3) and count == 16
        assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
        assert fps == pytest.approx(source_fps * 15 / (source_frames - 1))


def test_reference_even_pick_matches_single_frame_loads(reference_clips):
    clip = max(reference_clips, key=lambda p: av.open(str(p)).streams.video[0].frames)  # the longest
    with av.open(str(clip)) as c:
        total = c.streams.video[0].frames
    resize = ResizeSpec(128, 128)
    picked = video_io.load_video_file(clip, FrameSelection(evenly_spaced_frames=4), resize)
    indices = np.linspace(0, total - 1, 4).round().astype(int)
    for k, index in enumerate(indices):
        single = video_io.load_video_file(clip, FrameSelection(skip_first_frames=int(index), frame_load_cap=1), resize)
        assert single.stats.converted == 1
        assert torch.equal(picked.images[k], single.images[0])
    assert not torch.equal(picked.images[0], picked.images[-1])


def test_reference_aspect_and_crop(reference_clips):
    clip = reference_clips[0]
    loaded = video_io.load_video_file(clip, FrameSelection(frame_load_cap=2), ResizeSpec(250, 0, "crop"))
    assert loaded.images.shape == (2, 248, 248, 3)  # square source; 250 rounds to 248
    wide = video_io.load_video_file(clip, FrameSelection(frame_load_cap=1), ResizeSpec(256, 128, "crop"))
    assert wide.images.shape == (1, 128, 256, 3)


# ----------------------------------------------------------------------------- VIDEO input


def test_video_input_from_file_and_from_components(clips, input_dir):
    expected = [3, 7, 11, 15, 19, 23]
    options = dict(skip_first_frames=3, select_every_nth=4, width=32, height=24)
    for ext in ("mp4", "webp"):
        from_path = InputImpl.VideoFromFile(str(clips[ext]))
        images, count, fps = _node(video=from_path, **options)
        assert images.shape == (6, 24, 32, 3) and count == 6 and fps == pytest.approx(FPS / 4)
        assert frame_ids(images) == expected
        from_bytes = InputImpl.VideoFromFile(io.BytesIO(clips[ext].read_bytes()))
        assert frame_ids(_node(video=from_bytes, **options)[0]) == expected

    frames = torch.stack([torch.from_numpy(a) for a in _grey_frames()]).float() / 255
    video = InputImpl.VideoFromComponents(VideoComponents(images=frames, audio=None, frame_rate=Fraction(FPS)))
    # The connected VIDEO wins over file/path, which need not exist.
    images, count, fps = _node("missing.mp4", path="/nowhere/x.mp4", video=video, evenly_spaced_frames=4)
    assert frame_ids(images) == [0, 8, 15, 23] and count == 4
    assert fps == pytest.approx(FPS * 3 / 23)
    assert torch.equal(images[1], frames[8])  # no lossy re-encode on the tensor route


# ----------------------------------------------------------------------------- node, folders, paths


def test_schema_and_registration():
    schema = LoadReferenceVideo.define_schema()
    assert (schema.node_id, schema.display_name, schema.category) == (
        "LoadReferenceVideo", "Load Reference Video", "MotionClone")
    names = [i.id for i in schema.inputs]
    assert names == ["file", "frame_load_cap", "skip_first_frames", "select_every_nth", "evenly_spaced_frames",
                     "force_rate", "width", "height", "resize_mode", "path", "video"]
    assert schema.inputs[0].upload == comfy_io.UploadType.video
    assert schema.inputs[-1].optional and schema.inputs[-2].optional
    assert [o.io_type for o in schema.outputs] == ["IMAGE", "INT", "FLOAT"]
    from motionclone.nodes import MotionCloneExtension

    assert LoadReferenceVideo in asyncio.run(MotionCloneExtension().get_node_list())


def test_file_combo_and_fingerprint(clips, input_dir):
    for ext in WRITERS:
        (input_dir / f"clip.{ext}").write_bytes(clips[ext].read_bytes())
    (input_dir / "notes.txt").write_text("x")
    (input_dir / "sub").mkdir()
    assert LoadReferenceVideo.define_schema().inputs[0].options == sorted(f"clip.{e}" for e in WRITERS)

    images, count, fps = _node("clip.gif", frame_load_cap=2)
    assert frame_ids(images) == [0, 1] and count == 2 and fps == FPS

    first = LoadReferenceVideo.fingerprint_inputs(file="clip.mp4", path="")
    assert first == LoadReferenceVideo.fingerprint_inputs(file="clip.mp4", path="")
    write_clip(input_dir, "mp4", _grey_frames(5))  # replaced by a different clip
    st = os.stat(input_dir / "clip.mp4")
    os.utime(input_dir / "clip.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert LoadReferenceVideo.fingerprint_inputs(file="clip.mp4", path="") != first
    assert _node("clip.mp4")[1] == 5
    assert "unresolved" in LoadReferenceVideo.fingerprint_inputs(file="gone.mp4", path="")


def test_paths_must_stay_in_allowed_folders(clips, input_dir, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    clip = outside / "clip.mp4"
    clip.write_bytes(clips["mp4"].read_bytes())
    (input_dir / "sub").mkdir()
    (input_dir / "sub" / "inner.mp4").write_bytes(clips["mp4"].read_bytes())

    with pytest.raises(VideoLoadError, match="outside the allowed folders"):
        _node(path=str(clip))
    with pytest.raises(VideoLoadError, match=r"'\.\.' is not allowed"):
        _node(path=str(input_dir / ".." / "outside" / "clip.mp4"))
    with pytest.raises(VideoLoadError, match=r"'\.\.' is not allowed"):
        _node("../outside/clip.mp4")
    assert "'..'" in LoadReferenceVideo.validate_inputs(file="../outside/clip.mp4")
    assert LoadReferenceVideo.validate_inputs(file="") is True
    (input_dir / "link.mp4").symlink_to(clip)  # a link in the input folder pointing out of it
    with pytest.raises(VideoLoadError, match="outside the allowed folders"):
        _node("link.mp4")
    with pytest.raises(VideoLoadError, match="outside the allowed folders"):
        _node("x.mp4 [output]")  # annotated names are honoured, then checked like any other

    assert _node(path="sub/inner.mp4")[1] == FRAMES  # relative paths are under the input folder
    assert _node(path=str(input_dir / "sub" / "inner.mp4"))[1] == FRAMES
    monkeypatch.setenv(video_io.ENV_VIDEO_DIRS, os.pathsep.join([str(tmp_path / "other"), str(outside)]))
    assert _node(path=str(clip), frame_load_cap=3)[1] == 3
    assert _node("link.mp4", frame_load_cap=3)[1] == 3  # its target is now in an allowed folder


def test_missing_not_a_video_and_no_video_given(input_dir):
    with pytest.raises(VideoLoadError, match="not found"):
        _node("missing.mp4")
    with pytest.raises(VideoLoadError, match="no video given"):
        _node("")
    (input_dir / "text.mp4").write_text("hello, this is not a video\n" * 20)
    with pytest.raises(VideoLoadError, match="not a readable video"):
        _node("text.mp4")
    (input_dir / "fake.webp").write_bytes(b"RIFF\x10\x00\x00\x00WEBPVP8 garbage" + bytes(64))
    with pytest.raises(VideoLoadError, match="not a readable WebP"):
        _node("fake.webp")
    (input_dir / "empty.mkv").write_bytes(b"")
    with pytest.raises(VideoLoadError, match="not a readable video"):
        _node("empty.mkv")
    (input_dir / "folder.mp4").mkdir()
    with pytest.raises(VideoLoadError, match="not a file"):
        _node("folder.mp4")


def test_zero_frames_and_bad_options(clips):
    path = clips["mp4"]
    with pytest.raises(VideoLoadError, match="no frames left after selection"):
        video_io.load_video_file(path, FrameSelection(skip_first_frames=FRAMES))
    with pytest.raises(VideoLoadError, match="no frames left after selection"):
        video_io.load_video_file(path, FrameSelection(skip_first_frames=100, evenly_spaced_frames=2))
    with pytest.raises(VideoLoadError, match="only 8 frames are left"):
        video_io.load_video_file(path, FrameSelection(select_every_nth=3, evenly_spaced_frames=9))
    bad = [
        (FrameSelection(frame_load_cap=4, evenly_spaced_frames=8), ResizeSpec(), "cannot be larger"),
        (FrameSelection(select_every_nth=0), ResizeSpec(), "select_every_nth"),
        (FrameSelection(skip_first_frames=-1), ResizeSpec(), "skip_first_frames"),
        (FrameSelection(force_rate=-1.0), ResizeSpec(), "force_rate"),
        (FrameSelection(force_rate=float("nan")), ResizeSpec(), "force_rate"),
        (FrameSelection(), ResizeSpec(64, 64, "zoom"), "resize_mode"),
        (FrameSelection(), ResizeSpec(9000, 64), "larger than the maximum"),
        (FrameSelection(), ResizeSpec(-8, 64), "width"),
    ]
    for selection, resize, message in bad:
        with pytest.raises(VideoLoadError, match=message):
            video_io.load_video_file(path, selection, resize)
    # A derived size that ends up too large is refused too (width set, height from a 1:50 aspect).
    with pytest.raises(VideoLoadError, match="larger than 8192"):
        video_io.output_size(100, 5000, ResizeSpec(200, 0))


# ----------------------------------------------------------------------------- memory


def test_too_large_is_refused_before_decoding(clips, monkeypatch):
    def no_decoding(self):
        raise AssertionError("decoding started")

    monkeypatch.setattr(video_io._PyAVSource, "frames", no_decoding)
    monkeypatch.setattr(video_io._PillowSource, "frames", no_decoding)
    frame_bytes = H * W * 3 * 4
    monkeypatch.setenv(video_io.ENV_MAX_BYTES, str(10 * frame_bytes))
    for ext in ("mp4", "mkv", "gif", "webp"):
        with pytest.raises(VideoLoadError, match=r"24 frames of 64x48\), above the limit"):
            video_io.load_video_file(clips[ext])
        with pytest.raises(VideoLoadError, match="11 frames"):
            video_io.load_video_file(clips[ext], FrameSelection(evenly_spaced_frames=11))
    with pytest.raises(VideoLoadError, match="above the limit"):
        video_io.load_video_file(clips["mp4"], FrameSelection(force_rate=100))  # 240 frames after resampling
    with pytest.raises(VideoLoadError, match="above the limit"):
        video_io.load_video_file(clips["mp4"], resize=ResizeSpec(256, 256))
    monkeypatch.setenv(video_io.ENV_MAX_BYTES, "lots")
    with pytest.raises(VideoLoadError, match="not a whole number"):
        video_io.load_video_file(clips["mp4"])


def test_limit_holds_when_metadata_understates(clips, monkeypatch):
    # As if the container claimed one frame: the pre-check passes, the running check must stop.
    monkeypatch.setattr(video_io, "estimate_selected_frames", lambda info, sel: 1)
    monkeypatch.setenv(video_io.ENV_MAX_BYTES, str(5 * H * W * 3 * 4))
    with pytest.raises(VideoLoadError, match="stopped after 5 frames"):
        video_io.load_video_file(clips["mkv"])
    assert video_io.load_video_file(clips["mkv"], FrameSelection(frame_load_cap=5)).frame_count == 5


def test_decoding_streams(tmp_path):
    n, size = 300, 128
    frames = [np.full((size, size, 3), (i * 7) % 256, np.uint8) for i in range(n)]
    path = _encode_av(tmp_path / "long.mp4", frames, 30, "mpeg4", options={"qscale": "2"})
    full_uint8 = n * size * size * 3

    capped = video_io.load_video_file(path, FrameSelection(frame_load_cap=3))
    assert capped.stats.decoded == 3 and capped.stats.converted == 3  # stops pulling frames at the cap

    def peak(selection: FrameSelection) -> tuple[int, video_io.LoadedVideo]:
        tracemalloc.start()
        try:
            loaded = video_io.load_video_file(path, selection)
            return tracemalloc.get_traced_memory()[1], loaded
        finally:
            tracemalloc.stop()

    late, loaded = peak(FrameSelection(skip_first_frames=n - 3))
    assert loaded.stats.decoded == n and loaded.stats.converted == 3
    even, loaded = peak(FrameSelection(evenly_spaced_frames=4))
    assert loaded.stats.decoded == 2 * n and loaded.stats.converted == 4 and loaded.stats.passes == 2
    everything, loaded = peak(FrameSelection())
    assert loaded.frame_count == n
    # tracemalloc sees the kept uint8 frames: keeping all of them shows up, streaming stays tiny.
    assert everything > full_uint8
    assert late < full_uint8 / 20 and even < full_uint8 / 20


def test_a_long_full_hd_reference_is_sampled_without_loading_the_clip(tmp_path):
    """Long videos: a 1080p clip sampled to 96 frames at 512 px keeps 96 small frames, never the clip (a
    10-minute clip streams the same way, only with more frames decoded)."""
    n, (h, w) = 300, (1080, 1920)
    ramp = np.linspace(0, 255, w, dtype=np.float32)
    frames = [np.broadcast_to(((ramp + 9 * i) % 256).astype(np.uint8)[None, :, None], (h, w, 3)).copy()
              for i in range(n)]
    path = _encode_av(tmp_path / "full_hd.mp4", frames, 24, "mpeg4", options={"qscale": "4"})
    del frames
    tracemalloc.start()
    try:
        loaded = video_io.load_video_file(path, FrameSelection(evenly_spaced_frames=96),
                                          ResizeSpec(512, 512, "crop"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tuple(loaded.images.shape) == (96, 512, 512, 3)
    assert loaded.stats.converted == 96 and loaded.stats.decoded == 2 * n  # a counting pass, then the pick
    clip_bytes, kept_bytes, frame_bytes = n * h * w * 3, 96 * 512 * 512 * 3, h * w * 3
    print(f"1080p x {n} -> 96 x 512 px: peak traced {peak / 2**20:.0f} MB (clip {clip_bytes / 2**20:.0f} MB)")
    assert peak < kept_bytes + 8 * frame_bytes < clip_bytes / 4


def test_interrupt_stops_decoding(clips):
    class Interrupted(Exception):
        pass

    seen = []

    def check():
        seen.append(1)
        if len(seen) == 5:
            raise Interrupted

    for ext in ("mp4", "webp"):
        seen.clear()
        with pytest.raises(Interrupted):  # not wrapped: ComfyUI recognises its own interrupt exception
            video_io.load_video_file(clips[ext], check_interrupt=check)
        assert len(seen) == 5


def test_a_file_cut_short_is_reported_as_damaged(tmp_path, caplog):
    import logging

    cut = write_cut_short(tmp_path)
    survived = video_io.load_video_file(cut, FrameSelection(frame_load_cap=2)).source.frame_count
    assert survived == 16  # the container still promises all of them
    with pytest.raises(VideoLoadError, match=r"is damaged: its container promises 16 frames but only the first "
                                             r"(\d+) decode.*lower evenly_spaced_frames to at most"):
        video_io.load_video_file(cut, FrameSelection(evenly_spaced_frames=16))
    with pytest.raises(VideoLoadError, match="is damaged.*all frames were asked for"):
        video_io.load_video_file(cut, FrameSelection())
    with caplog.at_level(logging.WARNING):  # fewer frames asked for than survived: a warning, and the frames
        loaded = video_io.load_video_file(cut, FrameSelection(evenly_spaced_frames=3))
    assert loaded.frame_count == 3 and any("is damaged" in r.getMessage() for r in caplog.records)
    # A whole file is not damaged.
    assert video_io.load_video_file(tmp_path / "full_cut.mp4", FrameSelection()).frame_count == 16


def test_progress_counts_kept_frames(clips, input_dir, monkeypatch):
    import comfy.utils

    calls = []
    video_io.load_video_file(clips["mp4"], FrameSelection(evenly_spaced_frames=5), progress=lambda *a: calls.append(a))
    assert calls == [(k, 5) for k in range(1, 6)]
    calls.clear()
    video_io.load_video_file(clips["mkv"], FrameSelection(frame_load_cap=7), progress=lambda *a: calls.append(a))
    assert calls == [(k, 7) for k in range(1, 8)]

    # The node drives ComfyUI's progress bar (what the UI and the API's progress messages show) with
    # every kept frame; newer ComfyUI (0.33) throttles what reaches the hook, but always sends the
    # first and the final update.
    updates, hooked = [], []
    update_absolute = comfy.utils.ProgressBar.update_absolute

    def spy(bar, value, total=None, preview=None):
        updates.append((value, total))
        return update_absolute(bar, value, total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", spy)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        hooked.append((value, total)))
    (input_dir / "clip.mp4").write_bytes(clips["mp4"].read_bytes())
    _node("clip.mp4", select_every_nth=4)
    kept = FRAMES // 4
    assert updates == [(k, kept) for k in range(1, kept + 1)]
    assert hooked[0] == (1, kept) and hooked[-1] == (kept, kept) and set(hooked) <= set(updates)


# ----------------------------------------------------------------------------- real server


@pytest.mark.server
def test_node_in_a_real_server(tmp_path, monkeypatch):
    from comfy_server import ComfyServer

    outside = tmp_path / "outside"
    outside.mkdir()
    clip_outside = write_clip(outside, "mp4")
    monkeypatch.delenv(video_io.ENV_VIDEO_DIRS, raising=False)
    with ComfyServer(tmp_path / "base") as server:
        write_clip(server.input_dir, "webm")  # added after start: the combo is listed per request
        spec = server.object_info()["LoadReferenceVideo"]["input"]["required"]["file"]
        assert spec[1]["options"] == ["clip.webm"] and spec[1]["video_upload"] is True

        def run(**inputs):
            node = {"file": "clip.webm", "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1,
                    "evenly_spaced_frames": 4, "force_rate": 0.0, "width": 40, "height": 0,
                    "resize_mode": "stretch"} | inputs
            prompt = {"1": {"class_type": "LoadReferenceVideo", "inputs": node},
                      "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ref"}}}
            return server.wait(server.queue(prompt), 300)

        result = run()
        assert result.ok, f"{result.error_message()}\n{server.log_tail()}"
        assert len(result.paths) == 4
        with Image.open(result.paths[1]) as im:
            assert im.size == (40, 32)  # 40 wide; 48 * 40 / 64 = 30 -> 32
            assert abs(np.asarray(im).mean() - _level(8)) < 3
        # An empty combo value is fine when a path is given (combo membership is not enforced).
        assert run(file="", path=str(server.input_dir / "clip.webm")).ok
        refused = run(path=str(clip_outside))
        assert not refused.ok and "outside the allowed folders" in refused.error_message()
        # The error type reads cleanly in the UI, without the install path of the pack.
        assert refused.error["exception_type"] == "MotionClone.VideoLoadError", refused.error
        write_cut_short(server.input_dir)  # a file cut short says so, instead of blaming the selection
        damaged = run(file="cut.mp4", evenly_spaced_frames=16)
        assert not damaged.ok and "cut.mp4' is damaged: its container promises 16 frames" in damaged.error_message()
