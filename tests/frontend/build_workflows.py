"""Writes the shipped workflows, both formats, with the real ComfyUI frontend.

    python3 scripts/dev.py python tests/frontend/build_workflows.py            # all workflows
    python3 scripts/dev.py python tests/frontend/build_workflows.py motionclone_camera

Each workflow is described below (node types, positions, widget values by name, links by
input name). A headless ComfyUI server with this pack is started and the frontend builds
every graph itself (build_graph.js), so `workflows/<name>.json` is exactly what the
frontend's "Save" writes and `workflows/<name>_api.json` exactly what it queues. Build them on
the newest host (dev.py's default host), whose frontend is the one users have.
tests/test_workflows.py and tests/test_frontend.py check that the two never drift apart.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKFLOWS = ROOT / "workflows"

# The reference setup's files, under the names ComfyUI users know them by.
CHECKPOINT = "realisticVisionV51_v51VAE.safetensors"
MOTION_MODULE = "v3_sd15_mm.ckpt"
SPARSECTRL_RGB = "v3_sd15_sparsectrl_rgb.ckpt"
DOMAIN_ADAPTER = "v3_sd15_adapter.ckpt"
SEED = 2025
NEGATIVE = ("bad anatomy, extra limbs, ugly, deformed, noisy, blurry, distorted, out of focus, poorly drawn face, "
            "poorly drawn hands, missing fingers")  # fmt: skip
SAVED_MOTION = "motion_00001.motion.safetensors"
NOTE_SIZE = (430, 420)
MODEL_FILES = (
    "Model files (ComfyUI/models/...):\n"
    f"- checkpoints/{CHECKPOINT}  (Realistic Vision v5.1, the reference setup's SD1.5 fine-tune; any SD1.5 "
    "checkpoint works)\n"
    f"- animatediff_models/{MOTION_MODULE}  (AnimateDiff v3 motion module)\n"
)


@dataclass
class Spec:
    """A workflow to build: nodes get ids 1, 2, ... in the order they are added."""

    name: str
    nodes: list[dict[str, Any]] = field(default_factory=list)
    links: list[list[Any]] = field(default_factory=list)
    scale: float = 0.68  # of the saved view, chosen so the whole graph shows in a 1600x1000 window

    def add(self, type_: str, pos: tuple[int, int], widgets: dict[str, Any] | None = None, *,
            title: str | None = None, size: tuple[int, int] | None = None) -> int:
        node_id = len(self.nodes) + 1
        self.nodes.append({"id": node_id, "type": type_, "pos": list(pos), "widgets": widgets or {}, "title": title,
                           "size": list(size) if size else None})
        return node_id

    def link(self, src: int, slot: int, dst: int, input_name: str) -> None:
        self.links.append([src, slot, dst, input_name])

    def note(self, text: str, pos: tuple[int, int] = (20, 20)) -> int:
        return self.add("Note", pos, {"text": text}, title="About this workflow", size=NOTE_SIZE)

    def to_js(self) -> dict[str, Any]:
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-motionclone/{self.name}")),
                "nodes": self.nodes, "links": self.links, "ds": {"scale": self.scale, "offset": [100, 150]}}


# --- shared parts --------------------------------------------------------------------------------
def _models(s: Spec, y: int = 470) -> tuple[int, int]:
    ckpt = s.add("CheckpointLoaderSimple", (20, y), {"ckpt_name": CHECKPOINT}, size=(430, 100))
    mm = s.add("LoadAnimateDiffMotionModule", (20, y + 150), {"model_name": MOTION_MODULE}, size=(430, 60))
    s.link(ckpt, 0, mm, "model")
    return ckpt, mm


def _reference(s: Spec, file: str, pos: tuple[int, int] = (20, 720)) -> int:
    return s.add("LoadReferenceVideo", pos, {
        "file": file, "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1, "evenly_spaced_frames": 16,
        "force_rate": 0.0, "width": 512, "height": 512, "resize_mode": "stretch",
    }, size=(430, 0))  # fmt: skip


def _prompts(s: Spec, ckpt: int, positive: str) -> tuple[int, int]:
    pos = s.add("CLIPTextEncode", (490, 20), {"text": positive}, title="Prompt (new video)", size=(420, 150))
    neg = s.add("CLIPTextEncode", (490, 220), {"text": NEGATIVE}, title="Negative prompt", size=(420, 150))
    s.link(ckpt, 1, pos, "clip")
    s.link(ckpt, 1, neg, "clip")
    return pos, neg


def _extract(s: Spec, ckpt: int, mm: int, ref: int, pos: tuple[int, int], seed: int | None = None) -> int:
    """Extraction at the reference settings; the seed comes from a Seed node when `seed` is None."""
    # With a Seed node linked the widget value is unused; it is kept equal so unlinking changes nothing.
    widgets = {"timestep": 400, "seed": SEED if seed is None else seed, "control_after_generate": "fixed", "top_k": 1,
               "layers": "up_blocks.1"}
    ext = s.add("ExtractSparseMotion", pos, widgets, size=(420, 0))
    s.link(mm, 0, ext, "model")
    s.link(ckpt, 2, ext, "vae")
    s.link(ref, 0, ext, "images")
    s.link(ckpt, 1, ext, "clip")
    return ext


@dataclass
class Preset:
    steps: int
    guided: int
    r: float


OBJECT = Preset(300, 180, 0.4)
CAMERA = Preset(100, 50, 0.3)
I2V_RGB = Preset(100, 40, 0.3)


def _generate(s: Spec, *, ckpt: int, mm: int, positive: int, negative: int, motion: int, preset: Preset,
              seed_node: int | None, fps_from: int | None, prefix: str, x: int = 950, negative_slot: int = 0,
              frames_from: int | None = None, guider_widgets: dict[str, Any] | None = None) -> int:
    """Latent, guider, uneven schedule, euler, noise, SamplerCustomAdvanced, decode and save; returns the guider."""
    title = "16 frames, 512x512" if frames_from is None else "as many frames as the reference, 512x512"
    latent = s.add("EmptyLatentImage", (490, 420), {"width": 512, "height": 512, "batch_size": 16}, title=title,
                   size=(420, 0))
    if frames_from is not None:
        s.link(frames_from, 1, latent, "batch_size")
    guider = s.add("MotionCloneGuider", (x, 20), {
        "cfg": 8.5, "guidance_weight": 2000.0, "guided_steps": preset.guided, "noisy_fraction": preset.r,
        "warmup": 10, "cooldown": 10, **(guider_widgets or {}),
    }, size=(380, 0))  # fmt: skip
    for src, slot, name in ((mm, 0, "model"), (positive, 0, "positive"), (negative, negative_slot, "negative"),
                            (latent, 0, "latent_image"), (motion, 0, "motion")):
        s.link(src, slot, guider, name)
    sched = s.add("MotionCloneUnevenSchedule", (x, 400), {"steps": preset.steps, "guided_steps": preset.guided,
                                                          "noisy_fraction": preset.r}, size=(380, 0))
    s.link(mm, 0, sched, "model")
    sampler = s.add("KSamplerSelect", (x, 570), {"sampler_name": "euler"}, title="Sampler (euler = DDIM, eta 0)",
                    size=(380, 0))
    noise = s.add("RandomNoise", (x, 670), {"noise_seed": SEED, "control_after_generate": "fixed"}, size=(380, 0))
    if seed_node is not None:
        s.link(seed_node, 0, noise, "noise_seed")
    sca = s.add("SamplerCustomAdvanced", (x, 800), size=(380, 0))
    for src, name in ((noise, "noise"), (guider, "guider"), (sampler, "sampler"), (sched, "sigmas"),
                      (latent, "latent_image")):
        s.link(src, 0, sca, name)
    decode = s.add("VAEDecode", (x + 420, 20), size=(300, 0))
    s.link(sca, 0, decode, "samples")
    s.link(ckpt, 2, decode, "vae")
    webp = s.add("SaveAnimatedWEBP", (x + 420, 120), {"filename_prefix": f"{prefix}/video", "fps": 8.0,
                                                       "lossless": False, "quality": 90, "method": "default"},
                 size=(420, 420))  # fmt: skip
    s.link(decode, 0, webp, "images")
    if fps_from is not None:
        s.link(fps_from, 2, webp, "fps")  # the reference's rate: same duration as the reference clip
    frames = s.add("SaveImage", (x + 420, 600), {"filename_prefix": f"{prefix}/frame"}, size=(420, 300))
    s.link(decode, 0, frames, "images")
    return guider


def _seed(s: Spec, pos: tuple[int, int]) -> int:
    return s.add("PrimitiveInt", pos, {"value": SEED, "control_after_generate": "fixed"},
                 title="Seed (extraction = sampling, as the reference)", size=(420, 0))


def _guided_workflow(name: str, note: str, file: str, prompt: str, preset: Preset) -> Spec:
    s = Spec(name)
    s.note(note)
    ckpt, mm = _models(s)
    ref = _reference(s, file)
    positive, negative = _prompts(s, ckpt, prompt)
    seed = _seed(s, (490, 600))
    ext = _extract(s, ckpt, mm, ref, (490, 720))
    s.link(seed, 0, ext, "seed")
    _generate(s, ckpt=ckpt, mm=mm, positive=positive, negative=negative, motion=ext, preset=preset, seed_node=seed,
              fps_from=ref, prefix=f"motionclone/{name.removeprefix('motionclone_')}")
    return s


# --- the workflows -------------------------------------------------------------------------------
def t2v_object() -> Spec:
    return _guided_workflow("motionclone_t2v_object", (
        "MotionClone: object motion, text to video.\n\n"
        "Clones the motion of a reference clip onto a new video described by the prompt, training-free.\n"
        "1. Load Reference Video: 16 evenly spaced frames over the whole clip, stretched to 512x512.\n"
        "2. Extract Sparse Motion: one UNet pass at t=400 with the empty prompt; keeps the top-1 temporal "
        "attention entry per row in up_blocks.1.\n"
        "3. MotionClone Guider: pulls the new video's temporal attention toward it (weight 2000, warm-up and "
        "cool-down 10) on the first 180 of 300 uneven steps (r=0.4, object-motion preset). cfg 8.5 = the reference "
        "code's 7.5; euler on these sigmas = DDIM with eta 0.\n"
        "The Seed node feeds the extraction noise and the sampling noise, as in the reference setup.\n\n"
        + MODEL_FILES
        + "Reference clip: ComfyUI/input/reference.mp4 (or upload one on Load Reference Video).\n"
        "Reference setup: about 14-16 GB of GPU memory."
    ), "reference.mp4", "a tiger walking in the forest, photo, realistic, high quality", OBJECT)


def camera() -> Spec:
    return _guided_workflow("motionclone_camera", (
        "MotionClone: camera motion.\n\n"
        "Clones the camera movement of a reference clip (pan, zoom, orbit) onto a new scene: same graph as the "
        "object-motion workflow, with the camera preset: 100 uneven steps, the first 50 guided, r=0.3 "
        "(guidance weight 2000, t=400, top-1, up_blocks.1, cfg 8.5, euler = DDIM eta 0).\n"
        "Describe a scene without moving subjects, so the motion that is cloned is the camera's.\n\n"
        + MODEL_FILES
        + "Reference clip: ComfyUI/input/camera_reference.mp4 (or upload one on Load Reference Video)."
    ), "camera_reference.mp4",
        "a quiet mountain lake at sunrise, pine forest on the shore, landscape photo, realistic, high quality",
        CAMERA)


def save_motion() -> Spec:
    s = Spec("motionclone_save_motion")
    s.note(
        "MotionClone: extract a motion once and save it.\n\n"
        "Extract Sparse Motion at the reference settings (16 frames, 512x512, t=400, empty prompt, top-1, "
        f"up_blocks.1, seed {SEED}) and Save Motion writes ComfyUI/output/motionclone/motion_NNNNN.motion.safetensors "
        "(about 0.6 MB: top-1 values and indices).\n"
        "To reuse it: copy the file into ComfyUI/input/ and open the 'motionclone_load_motion' workflow; use the "
        "same seed there, frames and size must match.\n\n"
        + MODEL_FILES
        + "Reference clip: ComfyUI/input/reference.mp4 (or upload one on Load Reference Video)."
    )
    ckpt, mm = _models(s)
    ref = _reference(s, "reference.mp4")
    ext = _extract(s, ckpt, mm, ref, (490, 470), seed=SEED)
    save = s.add("SaveMotion", (490, 800), {"filename_prefix": "motionclone/motion"}, size=(420, 0))
    s.link(ext, 0, save, "motion")
    return s


def load_motion() -> Spec:
    s = Spec("motionclone_load_motion")
    s.note(
        "MotionClone: generate from a saved motion.\n\n"
        f"Load Motion reads a MOTION from ComfyUI/input/ (e.g. {SAVED_MOTION}, written by the "
        "'motionclone_save_motion' workflow into output/motionclone/ and copied here). Generation as in the "
        "object-motion workflow: 300 uneven steps, the first 180 guided, r=0.4, weight 2000, cfg 8.5, euler = DDIM "
        f"eta 0, seed {SEED} (the extraction's seed). Frames and size must match the motion (16, 512x512). "
        "The animation plays at 8 fps (no reference clip here to take its rate from).\n\n"
        + MODEL_FILES
    )
    ckpt, mm = _models(s)
    positive, negative = _prompts(s, ckpt, "a tiger walking in the forest, photo, realistic, high quality")
    motion = s.add("LoadMotion", (490, 600), {"motion_file": SAVED_MOTION}, size=(420, 0))
    _generate(s, ckpt=ckpt, mm=mm, positive=positive, negative=negative, motion=motion, preset=OBJECT, seed_node=None,
              fps_from=None, prefix="motionclone/load_motion")
    return s


def i2v() -> Spec:
    s = Spec("motionclone_i2v", scale=0.6)
    s.note(
        "MotionClone: image to video (SparseCtrl RGB).\n\n"
        "The new video starts from your image and moves like the reference clip. Image Condition puts the "
        "AnimateDiff v3 RGB SparseCtrl on frame 0 (strength 1, whole schedule); the v3 domain adapter LoRA is on "
        "the image UNet, as in the reference setup. Image-to-video preset: 100 uneven steps, the first 40 "
        "guided, r=0.3 (weight 2000, t=400, top-1, up_blocks.1, cfg 8.5, euler = DDIM eta 0).\n"
        "Extract Sparse Motion gets the Image Condition too: as in the reference code, its SparseCtrl then runs "
        "during the extraction on the reference's own frame 0.\n"
        "Use a first frame laid out like the reference's (e.g. an edited first frame of the clip).\n\n"
        + MODEL_FILES
        + f"- controlnet/{SPARSECTRL_RGB}  (AnimateDiff v3 SparseCtrl, RGB)\n"
        f"- loras/{DOMAIN_ADAPTER}  (AnimateDiff v3 domain adapter)\n"
        "Inputs: ComfyUI/input/reference.mp4 and input/first_frame.png (or upload them on the nodes).\n"
        "Reference setup: about 20-22 GB of GPU memory."
    )
    ckpt = s.add("CheckpointLoaderSimple", (20, 470), {"ckpt_name": CHECKPOINT}, size=(430, 100))
    lora = s.add("LoraLoaderModelOnly", (20, 620), {"lora_name": DOMAIN_ADAPTER, "strength_model": 1.0},
                 title="Domain adapter (LoRA)", size=(430, 0))
    mm = s.add("LoadAnimateDiffMotionModule", (20, 760), {"model_name": MOTION_MODULE}, size=(430, 60))
    s.link(ckpt, 0, lora, "model")
    s.link(lora, 0, mm, "model")
    ref = _reference(s, "reference.mp4", (20, 880))
    positive, negative = _prompts(s, ckpt, "a tiger walking in the forest, photo, realistic, high quality")
    seed = _seed(s, (490, 600))
    ext = _extract(s, ckpt, mm, ref, (490, 720))
    s.link(seed, 0, ext, "seed")
    image = s.add("LoadImage", (950, 20), {"image": "first_frame.png"}, title="First frame of the new video",
                  size=(400, 380))
    cond = s.add("ImageCondition", (950, 460), {
        "sparsectrl_name": SPARSECTRL_RGB, "frame_indices": "0", "strength": 1.0, "start_percent": 0.0,
        "end_percent": 1.0, "mode": "sparsectrl",
    }, size=(400, 0))  # fmt: skip
    s.link(positive, 0, cond, "positive")
    s.link(negative, 0, cond, "negative")
    s.link(image, 0, cond, "image")
    s.link(ckpt, 2, cond, "vae")
    s.link(cond, 0, ext, "image_condition")
    _generate(s, ckpt=ckpt, mm=mm, positive=cond, negative=cond, motion=ext, preset=I2V_RGB, seed_node=seed,
              fps_from=ref, prefix="motionclone/i2v", x=1390, negative_slot=1)
    return s


def long_video() -> Spec:
    s = Spec("motionclone_long_video", scale=0.6)
    s.note(
        "MotionClone: long videos with context windows.\n\n"
        "52 frames, more than a motion module relates at once: core's Context Windows (Manual) runs the UNet on "
        "windows of 16 frames overlapping by 4 (standard_static: the windows stay put from step to step, which "
        "MotionClone needs). 52 = 16 + 3 x 12 tiles the windows evenly; with other counts core moves the last "
        "window back and it shares more frames with the one before, which pull them two ways "
        "(docs/long-videos.md). Extract Sparse Motion gets the same MODEL, so it records the reference's motion per "
        "window, on the frames the sampler will run; the guider pulls each window toward its own part, and core "
        "fuses the windows. Object-motion preset otherwise (300 uneven steps, 180 guided, r=0.4, weight 2000).\n"
        "Load Reference Video takes 52 evenly spaced frames; the latent takes its frame count.\n\n"
        + MODEL_FILES
        + "Reference clip: ComfyUI/input/reference.mp4 (or upload one on Load Reference Video).\n"
        "Needs a ComfyUI whose core context windows run over frames (0.33 does; 0.3.75's fail, and the pack says "
        "so at extraction)."
    )
    ckpt, mm = _models(s)
    windows = s.add("ContextWindowsManual", (20, 760), {
        "context_length": 16, "context_overlap": 4, "context_schedule": "standard_static", "context_stride": 1,
        "closed_loop": False, "fuse_method": "pyramid", "dim": 0,
    }, title="Context windows: 16 frames, overlap 4", size=(430, 0))  # fmt: skip
    s.link(mm, 0, windows, "model")
    ref = s.add("LoadReferenceVideo", (20, 1100), {
        "file": "reference.mp4", "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1,
        "evenly_spaced_frames": 52, "force_rate": 0.0, "width": 512, "height": 512, "resize_mode": "stretch",
    }, title="Reference: 52 frames", size=(430, 0))  # fmt: skip
    positive, negative = _prompts(s, ckpt, "a tiger walking in the forest, photo, realistic, high quality")
    seed = _seed(s, (490, 600))
    ext = _extract(s, ckpt, windows, ref, (490, 720))
    s.link(seed, 0, ext, "seed")
    _generate(s, ckpt=ckpt, mm=windows, positive=positive, negative=negative, motion=ext, preset=OBJECT,
              seed_node=seed, fps_from=ref, prefix="motionclone/long_video", frames_from=ref)
    return s


def region() -> Spec:
    s = Spec("motionclone_region", scale=0.6)
    s.note(
        "MotionClone: region-masked motion.\n\n"
        "Clones the motion of one region of the reference into one region of the new video. Here both are the "
        "left half of the frame, made with core mask nodes (Solid Mask 0 everywhere + Solid Mask 1 on 256x512, "
        "Mask Composite add): Extract Sparse Motion keeps only the motion under its mask (a token counts when at "
        "least half of it is covered, per guided layer), and the guider applies it under its own mask. Masks can "
        "differ (e.g. the subject's mask per frame from a segmentation pack on the reference, and a mask where it "
        "should move in the new video): the source region's bounding box is mapped onto the target's.\n"
        "keep_still_weight (advanced input on the guider, 0 here) pulls everything outside the target region "
        "toward a still video; try the guidance weight's order of magnitude (docs/region-masks.md).\n"
        "Object-motion preset otherwise (300 uneven steps, 180 guided, r=0.4, weight 2000).\n\n"
        + MODEL_FILES
        + "Reference clip: ComfyUI/input/reference.mp4 (or upload one on Load Reference Video)."
    )
    ckpt, mm = _models(s)
    ref = _reference(s, "reference.mp4")
    positive, negative = _prompts(s, ckpt, "a tiger walking in the forest, photo, realistic, high quality")
    seed = _seed(s, (490, 600))
    ext = _extract(s, ckpt, mm, ref, (490, 720))
    s.link(seed, 0, ext, "seed")
    blank = s.add("SolidMask", (20, 1120), {"value": 0.0, "width": 512, "height": 512}, title="Mask: nothing",
                  size=(300, 0))
    left = s.add("SolidMask", (20, 1260), {"value": 1.0, "width": 256, "height": 512}, title="Mask: left half",
                 size=(300, 0))
    region = s.add("MaskComposite", (340, 1160), {"x": 0, "y": 0, "operation": "add"},
                   title="Region: left half of the frame", size=(300, 0))
    s.link(blank, 0, region, "destination")
    s.link(left, 0, region, "source")
    s.link(region, 0, ext, "mask")
    guider = _generate(s, ckpt=ckpt, mm=mm, positive=positive, negative=negative, motion=ext, preset=OBJECT,
                       seed_node=seed, fps_from=ref, prefix="motionclone/region",
                       guider_widgets={"keep_still_weight": 0.0})
    s.link(region, 0, guider, "mask")
    return s


# Wan 2.1 T2V 1.3B as ComfyUI's own Wan examples load it (core loaders, files under those names).
WAN_MODEL = "wan2.1_t2v_1.3B_fp16.safetensors"
WAN_TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
WAN_FRAMES, WAN_WIDTH, WAN_HEIGHT = 33, 832, 480  # Wan's VAE encodes 4k + 1 frames: 33 -> 9 latent frames
WAN_NEGATIVE = "static, blurry, low quality, worst quality, deformed, distorted, jpeg artifacts, still image"


def wan_t2v() -> Spec:
    s = Spec("motionclone_wan_t2v", scale=0.6)
    s.note(
        "MotionClone on Wan 2.1: motion transfer, text to video.\n\n"
        "The motion of a reference clip, on a new video from Wan 2.1 T2V (native ComfyUI Wan, core loaders). "
        "Extract Sparse Motion records the reference's attention motion flow (DiTFlow's AMF) in Wan block 14 "
        "(layers 'auto'); Motion Guided Sampler optimises the latent toward it on the noisiest steps (r = 0.2: "
        "10 of 50, 5 Adam iterations each, step size 2000 millionths = 0.002, falling to half), then uni_pc runs "
        "the rest unchanged. Shift 8, cfg 6, 33 frames at 832x480 (Wan encodes 4k + 1 frames).\n"
        "Verified on a tiny random-weight Wan only: start here, then tune guidance_weight, r and the block "
        "(docs/wan.md). The Seed node feeds the extraction noise and the sampling noise.\n\n"
        "Model files (ComfyUI/models/...):\n"
        f"- diffusion_models/{WAN_MODEL}  (Wan 2.1 T2V 1.3B)\n"
        f"- text_encoders/{WAN_TEXT_ENCODER}  (umT5-XXL)\n"
        f"- vae/{WAN_VAE}\n"
        "Reference clip: ComfyUI/input/reference.mp4 (or upload one on Load Reference Video)."
    )
    unet = s.add("UNETLoader", (20, 470), {"unet_name": WAN_MODEL, "weight_dtype": "default"}, size=(430, 0))
    shift = s.add("ModelSamplingSD3", (20, 600), {"shift": 8.0}, size=(430, 0))
    s.link(unet, 0, shift, "model")
    clip = s.add("CLIPLoader", (20, 700), {"clip_name": WAN_TEXT_ENCODER, "type": "wan", "device": "default"},
                 size=(430, 0))
    vae = s.add("VAELoader", (20, 860), {"vae_name": WAN_VAE}, size=(430, 0))
    ref = s.add("LoadReferenceVideo", (20, 960), {
        "file": "reference.mp4", "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1,
        "evenly_spaced_frames": WAN_FRAMES, "force_rate": 0.0, "width": WAN_WIDTH, "height": WAN_HEIGHT,
        "resize_mode": "stretch",
    }, title=f"Reference: {WAN_FRAMES} frames", size=(430, 0))  # fmt: skip
    positive = s.add("CLIPTextEncode", (490, 20), {"text": "a tiger walking in the forest, photo, realistic, "
                                                           "high quality"}, title="Prompt (new video)", size=(420, 150))
    negative = s.add("CLIPTextEncode", (490, 220), {"text": WAN_NEGATIVE}, title="Negative prompt", size=(420, 150))
    for node in (positive, negative):
        s.link(clip, 0, node, "clip")
    seed = _seed(s, (490, 420))
    ext = s.add("ExtractSparseMotion", (490, 560), {"timestep": 400, "seed": SEED, "control_after_generate": "fixed",
                                                     "top_k": 1, "layers": "auto"}, size=(420, 0))
    for src, name in ((shift, "model"), (vae, "vae"), (ref, "images"), (clip, "clip"), (seed, "seed")):
        s.link(src, 0, ext, name)
    latent = s.add("EmptyHunyuanLatentVideo", (490, 900), {"width": WAN_WIDTH, "height": WAN_HEIGHT,
                                                            "length": WAN_FRAMES, "batch_size": 1},
                   title=f"{WAN_FRAMES} frames, {WAN_WIDTH}x{WAN_HEIGHT}", size=(420, 0))
    sampler = s.add("MotionGuidedSampler", (950, 20), {
        "seed": SEED, "control_after_generate": "fixed", "steps": 50, "cfg": 6.0, "sampler_name": "uni_pc",
        "scheduler": "simple", "denoise": 1.0, "guidance_weight": 2000.0, "guided_steps": 0, "noisy_fraction": 0.2,
        "warmup": 0, "cooldown": 0,
    }, size=(380, 0))  # fmt: skip
    for src, name in ((shift, "model"), (seed, "seed"), (positive, "positive"), (negative, "negative"),
                      (latent, "latent_image"), (ext, "motion")):
        s.link(src, 0, sampler, name)
    decode = s.add("VAEDecode", (1370, 20), size=(300, 0))
    s.link(sampler, 0, decode, "samples")
    s.link(vae, 0, decode, "vae")
    webp = s.add("SaveAnimatedWEBP", (1370, 120), {"filename_prefix": "motionclone/wan_t2v/video", "fps": 16.0,
                                                    "lossless": False, "quality": 90, "method": "default"},
                 size=(420, 420))  # fmt: skip
    s.link(decode, 0, webp, "images")
    loss = s.add("PreviewImage", (950, 560), title="Motion loss per guided step", size=(380, 300))
    s.link(sampler, 1, loss, "images")
    return s


WORKFLOWS_BUILT = {f().name: f for f in (t2v_object, camera, save_motion, load_motion, i2v, long_video, region,
                                         wan_t2v)}


def build(names: list[str] | None = None) -> list[Path]:
    """Start a server, build the named workflows (default all) in the frontend, write both files."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(HERE))
    from comfy_browser import chromium_missing_reason, comfy_page, js_function, write_frontend_settings
    from comfy_server import ComfyServer
    from workflow_files import place_workflow_files

    if reason := chromium_missing_reason():
        raise SystemExit(reason)
    names = names or list(WORKFLOWS_BUILT)
    written = []
    server = ComfyServer()
    write_frontend_settings(server.base_dir)
    # The files the workflows name, so the screenshots show the graphs as a user with the models sees them.
    specs = [WORKFLOWS_BUILT[name]() for name in names]
    place_workflow_files(server.base_dir, [{str(n["id"]): {"class_type": n["type"], "inputs": n["widgets"]}
                                            for n in spec.nodes} for spec in specs])
    with server, comfy_page(server.url) as cp:
        builder = js_function("build_graph.js")
        start = cp.mark()  # the frontend's own start-up messages are not ours
        shots = ROOT / "test-artifacts" / "frontend"
        shots.mkdir(parents=True, exist_ok=True)
        for name, spec in zip(names, specs):
            out = cp.page.evaluate(builder, spec.to_js())
            cp.page.evaluate("() => app.canvas.setDirty(true, true)")
            cp.page.wait_for_timeout(500)
            cp.page.screenshot(path=str(shots / f"build_{name}.png"))
            for path, data in ((WORKFLOWS / f"{name}.json", out["workflow"]), (WORKFLOWS / f"{name}_api.json",
                                                                                out["api"])):
                path.write_text(json.dumps(data, indent=2) + "\n")
                written.append(path)
        if errors := cp.errors(start):
            raise SystemExit("frontend errors while building:\n" + "\n".join(errors))
    return written


if __name__ == "__main__":
    for p in build(sys.argv[1:] or None):
        print(p.relative_to(ROOT))
