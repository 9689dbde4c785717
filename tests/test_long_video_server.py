"""A long video on the demo model in a real server: a 52-frame reference through core's Context Windows
(Manual) (16 frames, overlap 4, standard_static: four windows, each overlapping the next by 4) -> a MOTION of
its windows -> a 52-frame guided video, with the unguided run (weight 0) beside it; every window's motion loss
at the last guided step is lower guided (printed). On a host whose core context windows cannot run over frames
(ComfyUI 0.3.75) the pack refuses, clearly."""

from __future__ import annotations

import shutil

import pytest
from comfy_server import ROOT, ComfyServer

FRAMES = 52  # 16 + 3 x 12: windows that tile evenly (48 moves the last window onto the third's frames)
DEMO = ROOT / "demo_model"
STEPS, GUIDED = 20, 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import sys

    import av

    srv = ComfyServer(tmp_path_factory.mktemp("comfy_long"))
    shutil.copy(DEMO / "motionclone_demo_sd15.safetensors", srv.model_path("checkpoints", "demo.safetensors"))
    shutil.copy(DEMO / "motionclone_demo_mm.safetensors", srv.model_path("animatediff_models", "demo_mm.safetensors"))
    sys.path.insert(0, str(ROOT / "scripts"))
    from fidelity_eval import procedural_clips

    # The demo reference's 16 frames played forward, back, forward, ...: a long clip as fast as the demo's,
    # so each 16-frame window holds as much motion as the demo's single window does.
    clip = procedural_clips().make_clip(10_003, frames=16, size=128, shape="circle", colour="red",
                                        trajectory="curve", background="gradient")
    frames = [*clip.frames, *clip.frames[::-1], *clip.frames, *clip.frames[::-1]][:FRAMES]
    with av.open(str(srv.input_dir / "long.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    with srv:
        yield srv


def _graph() -> dict:
    sampler = {"model": ["3", 0], "seed": 3, "steps": STEPS, "cfg": 7.5, "sampler_name": "ddim",
               "scheduler": "ddim_uniform", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["8", 0],
               "denoise": 1.0, "motion": ["7", 0], "guided_steps": GUIDED, "noisy_fraction": 0.4, "warmup": 2,
               "cooldown": 2}
    return {
        "1": {"class_type": "MotionCloneCompactCheckpointLoader", "inputs": {"ckpt_name": "demo.safetensors"}},
        "2": {"class_type": "LoadAnimateDiffMotionModule", "inputs": {"model": ["1", 0],
                                                                      "model_name": "demo_mm.safetensors"}},
        "3": {"class_type": "ContextWindowsManual", "inputs": {
            "model": ["2", 0], "context_length": 16, "context_overlap": 4, "context_schedule": "standard_static",
            "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid", "dim": 0,
            # ComfyUI 0.33's further inputs, at their defaults (0.3.75's server ignores them).
            "freenoise": False, "cond_retain_index_list": "", "split_conds_to_windows": False,
            "latent_retain_index_list": "", "causal_window_fix": True}},
        "4": {"class_type": "LoadReferenceVideo", "inputs": {
            "file": "long.mp4", "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1,
            "evenly_spaced_frames": FRAMES, "force_rate": 0.0, "width": 128, "height": 128, "resize_mode": "stretch"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blue square", "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "7": {"class_type": "ExtractSparseMotion", "inputs": {"model": ["3", 0], "vae": ["1", 2], "images": ["4", 0],
                                                              "clip": ["1", 1], "timestep": 400, "seed": 3, "top_k": 1,
                                                              "layers": "up_blocks.1"}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": ["4", 1]}},
        "9": {"class_type": "MotionGuidedSampler", "inputs": {**sampler, "guidance_weight": 1000.0}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "long/guided"}},
        "11": {"class_type": "MotionGuidedSampler", "inputs": {**sampler, "guidance_weight": 0.0}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "long/unguided"}},
        "13": {"class_type": "SaveMotion", "inputs": {"motion": ["7", 0], "filename_prefix": "long/motion"}},
    }


@pytest.mark.server
def test_a_52_frame_video_is_guided_window_by_window(server):
    import comfy.context_windows

    from motionclone.motion_core.context_windows import runs_frame_batch_windows
    from motionclone.motion_core.windowed_motion import WindowedMotion, load_motion

    handler = comfy.context_windows.IndexListContextHandler(
        comfy.context_windows.get_matching_context_schedule("standard_static"),
        comfy.context_windows.get_matching_fuse_method("pyramid"), 16, 4)
    result = server.wait(server.queue(_graph()), timeout=1200)
    if not runs_frame_batch_windows(handler):  # ComfyUI 0.3.75
        assert not result.ok and "cannot run windows over a video's frames" in result.error_message()
        return
    assert result.ok, result.failure_report()
    (motion_file,) = server.output_dir.glob("long/motion_*.motion.safetensors")
    motion = load_motion(motion_file)
    assert isinstance(motion, WindowedMotion) and motion.frames == FRAMES and len(motion.windows) >= 3
    outputs = result.history["outputs"]
    curves = {mode: {tuple(w["frames"]): [e["loss"] for e in w["loss"]] for w in outputs[node]["motion_loss_windows"]}
              for mode, node in (("guided", "9"), ("unguided", "11"))}
    assert set(curves["guided"]) == set(curves["unguided"]) and len(curves["guided"]) == len(motion.windows)
    for window in sorted(curves["guided"]):
        g, u = curves["guided"][window], curves["unguided"][window]
        print(f"frames {window[0]:2d}..{window[1]:2d}: motion loss guided {g[0]:.4f} -> {g[-1]:.4f}, "
              f"unguided {u[0]:.4f} -> {u[-1]:.4f}")
        assert len(g) == len(u) == GUIDED
        assert g[-1] < u[-1]
    assert any("context window frames" in line for line in server.log_text().splitlines())
