"""Long videos through core's context windows: extraction per window with the sampler's own windows,
guidance per window fused by core, the MOTION file with its windows, and clear errors for settings that
cannot work (tiny model, core's Context Windows (Manual) node)."""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors import safe_open

from motionclone.motion_core.context_windows import ContextWindowError, runs_frame_batch_windows, window_frames
from motionclone.motion_core.extraction import extract_sparse_motion
from motionclone.motion_core.guided_sampling import GuidanceSettings, MotionGuidance, attention_layers_of, select_layers
from motionclone.motion_core.injection import apply_motion_modules, install_processors
from motionclone.motion_core.memory_estimate import peak_bytes
from motionclone.motion_core.motion_module import load_motion_adapter
from motionclone.motion_core.region_mask import normalize_mask, token_masks
from motionclone.motion_core.sparse_motion import MotionMismatchError, SparseMotion
from motionclone.motion_core.tiny_models import build_tiny_sd15_model, write_tiny_motion_module
from motionclone.motion_core.windowed_motion import WindowedMotion, load_motion

SIZE = 16  # latent side


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_motion_module(tmp_path_factory.mktemp("mm") / "mm.safetensors", seed=2, std=0.2)
    adapter, info = load_motion_adapter(path)
    return apply_motion_modules(build_tiny_sd15_model(seed=0), adapter, info, install_processors(adapter))


def windowed(model, length: int = 8, overlap: int = 2, schedule: str = "standard_static", host_check: bool = True):
    """The MODEL through core's Context Windows (Manual) node, on either host (0.33 has more inputs). Hosts whose
    core cannot run windows over a video's frames (ComfyUI 0.3.75) skip: the pack refuses them (test below)."""
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    args = dict(model=model, context_length=length, context_overlap=overlap, context_schedule=schedule,
                context_stride=1, closed_loop=False, fuse_method="pyramid", dim=0, freenoise=False)
    accepted = inspect.signature(ContextWindowsManualNode.execute).parameters
    out = ContextWindowsManualNode.execute(**{k: v for k, v in args.items() if k in accepted}).result[0]
    if host_check and not runs_frame_batch_windows(out.model_options["context_handler"]):
        pytest.skip("this host's core context windows cannot run windows over frames (ComfyUI 0.3.75's set_step)")
    return out


def reference(frames: int) -> torch.Tensor:
    """A square moving right, one latent pixel every other frame."""
    lat = torch.zeros(frames, 4, SIZE, SIZE)
    for f in range(frames):
        x = 1 + (f // 2) % (SIZE - 5)
        lat[f, :, 5:9, x:x + 4] = 3.0
    return lat


def extract(model, frames: int):
    layers = select_layers(attention_layers_of(model), "up_blocks.1")
    return extract_sparse_motion(model, reference(frames), torch.zeros(1, 7, 32), layers, seed=1)


def sample(model, motion, frames: int, weight: float, steps: int = 6, guided: int = 4, mask=None):
    import comfy.sample

    latent = torch.zeros(frames, 4, SIZE, SIZE)
    guidance = MotionGuidance(motion, GuidanceSettings(weight, guided_steps=guided, warmup=1, cooldown=1), mask)
    context = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        out = comfy.sample.sample(guidance.patch(model), comfy.sample.prepare_noise(latent, 1), steps, 8.5, "ddim",
                                  "ddim_uniform", [[context, {}]], [[torch.zeros(1, 7, 32), {}]], latent, seed=1,
                                  disable_pbar=True)
    return out, guidance


def test_the_motion_is_extracted_per_window_with_the_samplers_windows(model):
    long = windowed(model)
    windows = window_frames(long, 20)
    assert windows is not None and len(windows) >= 3
    assert windows[0] == tuple(range(8))  # the first window starts at frame 0: no anchor
    for w in windows[1:]:  # later ones: their frames, after core's causal anchor frame where the host has it
        body = w[1:] if len(w) == 9 else w
        assert list(body) == list(range(body[0], body[0] + 8)) and (len(w) == 8 or w[0] == body[0] - 1)
    motion = extract(long, 20)
    assert isinstance(motion, WindowedMotion) and motion.frames == 20
    assert [w.frames for w in motion.windows] == windows
    assert all(w.motion.frames == len(w.frames) for w in motion.windows)
    # A window's motion is what extraction gives on just those frames.
    alone = extract_sparse_motion(model, reference(20)[list(windows[1])], torch.zeros(1, 7, 32), motion.layers,
                                  seed=1)
    assert alone.layers == motion.layers and alone.values[alone.layers[0]].shape == \
        motion.windows[1].motion.values[alone.layers[0]].shape
    assert window_frames(long, 8) is None  # one window's worth: core runs it whole
    assert isinstance(extract(long, 8), SparseMotion)


def test_frame_counts_that_do_not_tile_the_windows_evenly_are_warned_about(model, caplog):
    long = windowed(model)  # 8 frames, overlap 2: windows start every 6 frames
    with caplog.at_level("WARNING"):
        window_frames(long, 20)  # 8 + 2 * 6: every overlap is 2
    assert "overlap unevenly" not in caplog.text
    with caplog.at_level("WARNING"):
        windows = window_frames(long, 22)  # core moves the last window back: it shares 6 frames
    assert windows[-1][-1] == 21
    assert "with 22 frames, context_length 8 and overlap 2, core's windows overlap unevenly ([2, 2, 6] frames " \
           "shared)" in caplog.text
    assert "evenly: 14, 20, 26, 32" in caplog.text


def test_guidance_runs_per_window_and_lowers_every_windows_loss(model):
    long = windowed(model)
    motion = extract(long, 20)
    _, unguided = sample(long, motion, 20, 1e-9)
    out, guided = sample(long, motion, 20, 10000.0)
    assert torch.isfinite(out).all()
    curves_u, curves_g = unguided.window_curves(), guided.window_curves()
    assert set(curves_g) == {w.frames for w in motion.windows} == set(curves_u)
    for window in curves_g:
        g, u = curves_g[window][-1][1], curves_u[window][-1][1]
        print(f"window {window[0]}..{window[-1]}: loss at the last guided step guided {g:.4f}, unguided {u:.4f}")
        assert [s for s, _ in curves_g[window]] == [0, 1, 2, 3]
        assert g < u
    assert len(guided.loss_curve()) == 4


def test_the_windowed_motion_file_keeps_its_windows(model, tmp_path):
    motion = extract(windowed(model), 20)
    motion.save(tmp_path / "long.motion.safetensors")
    loaded = load_motion(tmp_path / "long.motion.safetensors")
    assert isinstance(loaded, WindowedMotion) and loaded.context == motion.context
    assert [w.frames for w in loaded.windows] == [w.frames for w in motion.windows]
    for a, b in zip(loaded.windows, motion.windows, strict=True):
        assert all(torch.equal(a.motion.values[k], b.motion.values[k]) for k in a.motion.layers)
        assert all(torch.equal(a.motion.indices[k], b.motion.indices[k]) for k in a.motion.layers)
    plain = extract(model, 8)
    plain.save(tmp_path / "plain.motion.safetensors")
    assert isinstance(load_motion(tmp_path / "plain.motion.safetensors"), SparseMotion)


def test_region_masks_work_per_window_and_the_windowed_file_keeps_them(model, tmp_path, monkeypatch):
    """A source region at extraction: each window keeps its frames' rows (the motion itself unchanged) and the file
    keeps them (version 5). A per-frame target region at sampling: each window's correction lies in its frames'
    part of it and nowhere else."""
    long, frames = windowed(model), 20
    left = torch.zeros(1, SIZE * 8, SIZE * 8)
    left[..., : SIZE * 4] = 1.0
    layers = select_layers(attention_layers_of(long), "up_blocks.1")
    motion = extract_sparse_motion(long, reference(frames), torch.zeros(1, 7, 32), layers, seed=1, mask=left)
    plain = extract(long, frames)
    rows = token_masks(normalize_mask(left, frames, SIZE, SIZE), layers, SIZE, SIZE)
    for w, p in zip(motion.windows, plain.windows, strict=True):
        assert w.frames == p.frames
        for name in layers:
            assert torch.equal(w.motion.masks[name], rows[name][:, list(w.frames)])
            assert torch.equal(w.motion.values[name], p.motion.values[name])
    path = tmp_path / "long_region.motion.safetensors"
    motion.save(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format_version"] == "5"
    loaded = load_motion(path)
    for a, b in zip(loaded.windows, motion.windows, strict=True):
        assert all(torch.equal(a.motion.masks[k], b.motion.masks[k]) for k in layers)

    applied = []
    original = MotionGuidance._apply

    def spy(self, out, grad, sigma, sigma_next, window, step):
        applied.append((window, grad.clone()))
        return original(self, out, grad, sigma, sigma_next, window, step)

    monkeypatch.setattr(MotionGuidance, "_apply", spy)
    _, guided = sample(long, loaded, frames, 10000.0)  # the MOTION's own region: the left half
    assert len(applied) == 4 * len(motion.windows)
    for _, g in applied:
        assert torch.count_nonzero(g[..., SIZE // 2:]) == 0 and torch.count_nonzero(g[..., : SIZE // 2]) > 0
    applied.clear()
    # No source region; the target is the left half on frames 0-9 and the right half on frames 10-19.
    target = torch.zeros(frames, SIZE * 8, SIZE * 8)
    target[:10, :, : SIZE * 4] = 1.0
    target[10:, :, SIZE * 4:] = 1.0
    sample(long, plain, frames, 10000.0, mask=target)
    assert len(applied) == 4 * len(motion.windows)
    for window, g in applied:
        assert g.shape[0] == len(window)
        for frame, per_frame in zip(window, g, strict=True):
            outside = per_frame[..., SIZE // 2:] if frame < 10 else per_frame[..., : SIZE // 2]
            inside = per_frame[..., : SIZE // 2] if frame < 10 else per_frame[..., SIZE // 2:]
            assert torch.count_nonzero(outside) == 0 and torch.count_nonzero(inside) > 0


def test_a_host_whose_core_cannot_run_frame_windows_is_refused_clearly(model):
    long = windowed(model, host_check=False)
    if runs_frame_batch_windows(long.model_options["context_handler"]):
        assert isinstance(extract(long, 20), WindowedMotion)  # ComfyUI 0.33
        return
    with pytest.raises(ContextWindowError, match="cannot run windows over a video's frames.*update ComfyUI"):
        extract(long, 20)  # ComfyUI 0.3.75: said at extraction, not as a shape error deep in core's sampler


def test_settings_and_motions_that_cannot_work_are_refused(model):
    with pytest.raises(ContextWindowError, match=r"context_overlap \(8\) must be smaller than context_length \(8\)"):
        extract(windowed(model, 8, 8), 20)
    with pytest.raises(ContextWindowError, match="context_length 40 is above what the motion module relates: at most "
                                                 "32 frames per window"):
        extract(windowed(model, 40, 4), 48)
    with pytest.raises(ContextWindowError, match="moves its windows from step to step.*standard_static"):
        extract(windowed(model, 8, 2, "looped_uniform"), 20)
    motion = extract(windowed(model, 8, 2), 20)
    with pytest.raises(MotionMismatchError, match="extracted for windows .* same Context Windows settings"):
        sample(windowed(model, 8, 3), motion, 20, 2000.0)  # another schedule
    with pytest.raises(MotionMismatchError, match="runs all frames at once"):
        sample(model, motion, 20, 2000.0)  # windows extracted, none while sampling
    with pytest.raises(MotionMismatchError, match="extracted without them"):
        sample(windowed(model, 8, 2), extract(model, 20), 20, 2000.0)  # the reverse


def test_a_long_guided_run_holds_about_one_windows_memory(model):
    """Windows, not the whole clip, are in flight: 24 frames in windows of 8 against 8 frames whole."""
    long = windowed(model)
    peaks = {}
    for frames, m in ((8, model), (24, long)):
        motion = extract(m, frames)
        peaks[frames] = peak_bytes(lambda m=m, motion=motion, frames=frames: sample(m, motion, frames, 2000.0, 3, 2),
                                   torch.device("cpu"))
    print(f"peak of a guided run: 8 frames {peaks[8] / 2**20:.1f} MB, 24 frames in windows of 8 "
          f"{peaks[24] / 2**20:.1f} MB ({peaks[24] / peaks[8]:.2f}x)")
    assert peaks[24] <= 1.3 * peaks[8]
