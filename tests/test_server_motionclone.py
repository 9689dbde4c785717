"""The MotionClone graph queued through a real headless ComfyUI server.

Runs under ComfyUI's own `torch.inference_mode()` with weights created by the loader
nodes (inference tensors), so the gradient guidance is exercised as users run it:
extraction from a real clip, Motion Guided Sampler (KSampler-like), the guider with
SamplerCustomAdvanced and the uneven SIGMAS, Save Motion, weight 0 == KSampler, interrupt.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from comfy_server import ROOT, ComfyServer
from PIL import Image

from motionclone.motion_core.compact_checkpoint import write_tiny_checkpoint
from motionclone.motion_core.tiny_models import write_tiny_motion_module

CLIP = ROOT.parent / "shared" / "reference_videos" / "sample_fox.mp4"
CKPT, MM = "tiny_sd15.safetensors", "tiny_mm.safetensors"
FRAMES = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not CLIP.exists():
        pytest.skip(f"reference clip missing: {CLIP}")
    srv = ComfyServer(tmp_path_factory.mktemp("comfy_mc"))
    write_tiny_checkpoint(srv.model_path("checkpoints", CKPT), seed=0)
    write_tiny_motion_module(srv.model_path("animatediff_models", MM), seed=2, std=0.2)
    srv.input_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(CLIP, srv.input_dir / CLIP.name)
    with srv:
        yield srv


def _graph(steps: int = 6, guided_steps: int = 4) -> dict:
    sampler = {"seed": 1, "steps": steps, "cfg": 8.5, "sampler_name": "ddim", "scheduler": "ddim_uniform",
               "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["11", 0], "denoise": 1.0}
    guidance = {"motion": ["9", 0], "guided_steps": guided_steps, "noisy_fraction": 0.4, "warmup": 1, "cooldown": 1}

    def decode_save(node: str, prefix: str, at: int) -> dict:
        return {str(at): {"class_type": "VAEDecode", "inputs": {"samples": [node, 0], "vae": ["1", 2]}},
                str(at + 1): {"class_type": "SaveImage", "inputs": {"images": [str(at), 0], "filename_prefix": prefix}}}

    return {
        "1": {"class_type": "MotionCloneCompactCheckpointLoader", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoadAnimateDiffMotionModule", "inputs": {"model": ["1", 0], "model_name": MM}},
        "3": {"class_type": "LoadVideo", "inputs": {"file": CLIP.name}},
        "4": {"class_type": "GetVideoComponents", "inputs": {"video": ["3", 0]}},
        "5": {"class_type": "ImageFromBatch", "inputs": {"image": ["4", 0], "batch_index": 0, "length": FRAMES}},
        "6": {"class_type": "ImageScale", "inputs": {"image": ["5", 0], "upscale_method": "bilinear", "width": 64,
                                                      "height": 64, "crop": "center"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "9": {"class_type": "ExtractSparseMotion", "inputs": {"model": ["2", 0], "vae": ["1", 2], "images": ["6", 0],
                                                               "clip": ["1", 1], "timestep": 400, "seed": 1,
                                                               "top_k": 1, "layers": "up_blocks.1"}},
        "10": {"class_type": "SaveMotion", "inputs": {"motion": ["9", 0], "filename_prefix": "motionclone/e2e"}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": FRAMES}},
        "12": {"class_type": "MotionGuidedSampler", "inputs": {"model": ["2", 0], **sampler, **guidance,
                                                               "guidance_weight": 20000.0}},
        **decode_save("12", "guided", 13),
        "15": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **sampler}},
        **decode_save("15", "plain", 16),
        "18": {"class_type": "MotionGuidedSampler", "inputs": {"model": ["2", 0], **sampler, **guidance,
                                                               "guidance_weight": 0.0}},
        **decode_save("18", "weight0", 19),
        "21": {"class_type": "MotionCloneGuider", "inputs": {"model": ["2", 0], "positive": ["7", 0],
                                                             "negative": ["8", 0], "cfg": 8.5,
                                                             "latent_image": ["11", 0], **guidance,
                                                             "guidance_weight": 20000.0}},
        "22": {"class_type": "MotionCloneUnevenSchedule", "inputs": {"model": ["2", 0], "steps": steps,
                                                                     "guided_steps": guided_steps,
                                                                     "noisy_fraction": 0.4}},
        "23": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "24": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "25": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["23", 0], "guider": ["21", 0],
                                                                 "sampler": ["24", 0], "sigmas": ["22", 0],
                                                                 "latent_image": ["11", 0]}},
        **decode_save("25", "custom", 26),
    }


def _frames(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(paths)])


@pytest.mark.server
def test_motionclone_graph_runs_end_to_end(server):
    assert server.import_errors() == [], server.log_tail()
    info = server.object_info()
    for node in ("ExtractSparseMotion", "MotionGuidedSampler", "MotionCloneGuider", "MotionCloneUnevenSchedule",
                 "SaveMotion", "LoadMotion"):
        assert node in info
    result = server.wait(server.queue(_graph()), timeout=900)
    assert result.ok, result.failure_report()

    by_prefix = {p: [f for f in result.paths if f.name.startswith(p + "_") and f.suffix == ".png"]
                 for p in ("guided", "plain", "weight0", "custom")}
    assert all(len(files) == FRAMES for files in by_prefix.values()), by_prefix
    guided, plain, weight0 = (_frames(by_prefix[p]) for p in ("guided", "plain", "weight0"))
    assert np.array_equal(weight0, plain)  # weight 0 is KSampler, bit for bit
    assert np.abs(guided.astype(int) - plain.astype(int)).max() > 0  # the gradient guidance acted
    assert list(server.output_dir.glob("motionclone/e2e_*.motion.safetensors"))
    # One progress update per sampling step, to the end (ddim_uniform may add a step).
    guided_progress = [e for e in result.progress if e.node == "12"]
    assert guided_progress and guided_progress[-1].value == guided_progress[-1].max >= 6, result.progress


@pytest.mark.server
def test_guided_sampling_can_be_interrupted(server):
    import threading

    graph = _graph(steps=400, guided_steps=300)
    graph = {k: v for k, v in graph.items() if k in {"1", "2", "3", "4", "5", "6", "7", "8", "9", "11", "12", "13",
                                                       "14"}}
    graph["12"]["inputs"]["seed"] = 2  # not cached from the previous test
    prompt_id = server.queue(graph)
    fired = threading.Event()

    def on_event(kind, data):
        if kind == "progress" and data.get("node") == "12" and data.get("value", 0) >= 2 and not fired.is_set():
            fired.set()
            server.interrupt()

    result = server.wait(prompt_id, timeout=900, on_event=on_event)
    assert fired.is_set() and result.status == "interrupted", result.failure_report()


@pytest.mark.server
def test_non_finite_numbers_are_refused_at_the_prompt(server):
    """NaN passes ComfyUI's own min/max checks (every comparison is false); the API may send it."""
    from comfy_client import PromptValidationError

    def upstream_of(graph: dict, output: str) -> dict:  # only this output: ComfyUI runs the valid others
        keep, todo = set(), [output]
        while todo:
            node = todo.pop()
            keep.add(node)
            todo += [v[0] for v in graph[node]["inputs"].values() if isinstance(v, list) and v[0] not in keep]
        return {k: v for k, v in graph.items() if k in keep}

    for node, name, output in (("12", "guidance_weight", "14"), ("12", "noisy_fraction", "14"),
                               ("21", "guidance_weight", "27"), ("12", "cfg", "14")):
        graph = _graph()
        graph[node]["inputs"][name] = float("nan")
        graph = upstream_of(graph, output)
        with pytest.raises(PromptValidationError) as err:
            server.queue(graph)
        assert f"{name} must be a finite number, got nan" in str(err.value.details), err.value.details
    graph = upstream_of(_graph(), "14")
    graph["12"]["inputs"]["guidance_weight"] = -1.0  # the range check still holds for inputs we validate
    with pytest.raises(PromptValidationError) as err:
        server.queue(graph)
    assert "smaller than min" in str(err.value.details)


@pytest.mark.server
def test_a_guided_step_that_would_not_fit_is_refused_with_what_to_lower(server):
    """16 frames at 8192x8192: the estimate (two small crops, extrapolated) says it cannot fit, and the run
    stops at once with a message, instead of growing until the server is killed."""
    import torch

    from motionclone.motion_core.sparse_motion import SparseMotion

    frames, latent = 16, 1024
    layers = [f"up_blocks.1.motion_modules.{m}.transformer_blocks.0.attn{a}" for m in range(3) for a in (1, 2)]
    gen = torch.Generator().manual_seed(0)
    shape = ((latent // 4) ** 2, 8, frames, 1)
    motion = SparseMotion(values={n: torch.rand(shape, generator=gen).half() for n in layers},
                          indices={n: torch.randint(0, frames, shape, generator=gen).to(torch.uint8) for n in layers},
                          frames=frames, latent_height=latent, latent_width=latent, layers=layers, timestep=400,
                          top_k=1)
    motion.save(server.input_dir / "big.motion.safetensors")
    graph = {k: v for k, v in _graph().items() if k in {"1", "2", "7", "8"}}
    graph |= {
        "30": {"class_type": "LoadMotion", "inputs": {"motion_file": "big.motion.safetensors"}},
        "31": {"class_type": "EmptyLatentImage", "inputs": {"width": latent * 8, "height": latent * 8,
                                                            "batch_size": frames}},
        "32": {"class_type": "MotionGuidedSampler", "inputs": {
            "model": ["2", 0], "seed": 1, "steps": 2, "cfg": 8.5, "sampler_name": "ddim", "scheduler": "ddim_uniform",
            "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["31", 0], "denoise": 1.0, "motion": ["30", 0],
            "guidance_weight": 2000.0, "guided_steps": 1, "noisy_fraction": 0.4, "warmup": 0, "cooldown": 0}},
        "33": {"class_type": "SaveLatent", "inputs": {"samples": ["32", 0], "filename_prefix": "big"}},
    }
    result = server.wait(server.queue(graph), timeout=300)
    assert result.status == "error", result.status
    message = result.error_message()
    assert result.error["exception_type"] == "MotionClone.GuidanceMemoryError", message
    assert re.search(r"a guided step of 16 frames at 8192x8192 px would need about [\d.]+ GB .* but [\d.]+ GB are "
                     r"free on cpu\. Lower the width/height or the frame count", message), message
