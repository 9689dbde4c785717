"""Motion fidelity of MotionClone on the embedded demo model, guided vs unguided (in-process).

Used by `scripts/benchmark.py fidelity`, `attention` and `ceiling` (figures) and by
`tests/test_demo_fidelity.py` (its clips and demo settings). For each reference clip: VAE-encode
it, extract its sparse motion with the empty prompt, then sample the clip's *other* subject
prompt from the same seed twice, guided by the motion and unguided, decode, and score both
against the reference with the LK-track motion fidelity and motion recall
(motion_core/motion_fidelity.py, a CPU proxy of the CoTracker score, and its static-proof
companion). Callers must have ComfyUI on sys.path and the pack imported as `motionclone`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "demo_model"
DEMO_CHECKPOINT = DEMO_DIR / "motionclone_demo_sd15.safetensors"
DEMO_MOTION_MODULE = DEMO_DIR / "motionclone_demo_mm.safetensors"


@dataclass
class DemoSettings:
    """The demo workflow's settings (demo_model/motionclone_demo_api.json)."""

    steps: int = 20
    guided_steps: int = 12
    weight: float = 1000.0
    cfg: float = 7.5
    sampler: str = "ddim"
    # A ComfyUI scheduler, or "uneven": the reference spacing (guided steps dense over the noisy part).
    scheduler: str = "ddim_uniform"
    noisy_fraction: float = 0.4  # r of the uneven schedule (the reference's object-motion preset)
    warmup: int = 2
    cooldown: int = 2
    timestep: int = 400

    def sigmas(self) -> torch.Tensor | None:
        """Explicit sigmas for the uneven schedule, None for a named ComfyUI scheduler."""
        from motionclone.motion_core.schedule import uneven_sigmas

        return uneven_sigmas(self.steps, self.guided_steps, self.noisy_fraction) if self.scheduler == "uneven" else None


@dataclass
class ClipResult:
    name: str
    seed: int
    guided: float  # LK-track motion fidelity (the field's one-sided score)
    unguided: float
    guided_recall: float  # motion recall: the reference's moving tracks found in the video
    unguided_recall: float
    extract_s: float
    guided_s: float
    unguided_s: float
    motion_bytes: int
    dense_bytes: int
    frames: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def load_demo_model():
    """(MODEL with the demo motion module, CLIP, VAE) through the pack's own loaders."""
    from motionclone.motion_core.compact_checkpoint import load_compact_checkpoint
    from motionclone.motion_core.injection import apply_motion_modules, install_processors
    from motionclone.motion_core.motion_module import load_motion_adapter

    model, clip, vae = load_compact_checkpoint(DEMO_CHECKPOINT)
    adapter, info = load_motion_adapter(DEMO_MOTION_MODULE)
    return apply_motion_modules(model, adapter, info, install_processors(adapter)), clip, vae


def _encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.detach().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


@dataclass
class ReferenceMotion:
    latents: torch.Tensor  # the reference's VAE latents [F, 4, h, w]
    empty: list  # CONDITIONING of the empty prompt (extraction, negative)
    positive: list  # CONDITIONING of the new subject's prompt
    motion: object  # SparseMotion of the up_blocks.1 layers
    extract_s: float


def reference_motion(model, clip, vae, frames: np.ndarray, prompt: str, seed: int, timestep: int) -> ReferenceMotion:
    """VAE-encode the reference `frames` [F, H, W, 3] uint8 and extract its sparse motion (empty prompt,
    `up_blocks.1`, the seed's noise), with both prompts' conditioning."""
    from motionclone.motion_core.extraction import extract_sparse_motion
    from motionclone.motion_core.guided_sampling import attention_layers_of, select_layers

    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(frames).float() / 255.0)
    empty, positive = _encode(clip, ""), _encode(clip, prompt)
    layers = select_layers(attention_layers_of(model), "up_blocks.1")
    t0 = time.perf_counter()
    motion = extract_sparse_motion(model, latents, empty[0][0], layers, timestep=timestep, seed=seed)
    return ReferenceMotion(latents, empty, positive, motion, time.perf_counter() - t0)


def evaluate_clip(model, clip, vae, name: str, frames: np.ndarray, prompt: str, seed: int,
                  settings: DemoSettings) -> ClipResult:
    """`frames`: reference [F, H, W, 3] uint8 at the model's size; `prompt`: the new subject."""
    import comfy.sample

    from motionclone.motion_core.guided_sampling import GuidanceSettings, MotionGuidance
    from motionclone.motion_core.motion_fidelity import motion_scores

    ref = reference_motion(model, clip, vae, frames, prompt, seed, settings.timestep)
    motion, empty, positive = ref.motion, ref.empty, ref.positive
    latent = torch.zeros_like(ref.latents)
    scores, times, out_frames = {}, {}, {"reference": frames}
    for mode in ("guided", "unguided"):
        sampling_model = model
        if mode == "guided":
            guidance = GuidanceSettings(settings.weight, settings.guided_steps, settings.noisy_fraction,
                                        settings.warmup, settings.cooldown)
            sampling_model = MotionGuidance(motion, guidance).patch(model)
        t0 = time.perf_counter()
        # Explicit sigmas (uneven schedule) override the scheduler name.
        scheduler = "simple" if settings.scheduler == "uneven" else settings.scheduler
        samples = comfy.sample.sample(sampling_model, comfy.sample.prepare_noise(latent, seed), settings.steps,
                                      settings.cfg, settings.sampler, scheduler, positive, empty, latent,
                                      sigmas=settings.sigmas(), seed=seed, disable_pbar=True)
        times[mode] = time.perf_counter() - t0
        with torch.no_grad():
            out_frames[mode] = _to_uint8(vae.decode(samples))
        scores[mode] = motion_scores(frames, out_frames[mode])
    return ClipResult(name, seed, scores["guided"].fidelity, scores["unguided"].fidelity, scores["guided"].recall,
                      scores["unguided"].recall, ref.extract_s, times["guided"], times["unguided"], motion.nbytes(),
                      motion.dense_nbytes(), out_frames)


def procedural_clips():
    """training/procedural_clips.py as a module (the repo root is kept off sys.path: our
    `nodes/` package would shadow ComfyUI's `nodes`)."""
    import importlib.util

    name = "motionclone_procedural_clips"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "training" / "procedural_clips.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


MIN_MOVING_TRACKS = 24  # of the 16 x 16 tracked grid: the reference's motion must be visible to the tracker


def synthetic_clips(count: int, size: int, frames: int, first_seed: int = 10_000) -> list[tuple[str, np.ndarray, str]]:
    """(name, frames, new-subject prompt) for procedurally generated reference clips.

    Clip i has trajectory kind i mod 5 and the first seed (first_seed + i, then + 5, + 10, ...)
    whose clip LK can follow: at least MIN_MOVING_TRACKS grid tracks that move (a flat shape
    drifting slowly over a flat background can leave LK nothing to measure, and then a score
    compares static backgrounds only). The prompt names another colour and shape than the clip's,
    so the motion, not the appearance, is what guidance has to carry over. Seeds above the
    training range.
    """
    from motionclone.motion_core.motion_fidelity import track_points

    pc = procedural_clips()
    out = []
    trajectories = list(pc.TRAJECTORIES)
    static_px = 0.1 * size / 64
    for i in range(count):
        for k in range(100):
            c = pc.make_clip(first_seed + i + len(trajectories) * k, frames=frames, size=size,
                             trajectory=trajectories[i % len(trajectories)])
            tracks, _valid = track_points(c.frames)
            speed = np.linalg.norm(np.diff(tracks, axis=1), axis=-1).mean(axis=1)
            if int((speed >= 2 * static_px).sum()) >= MIN_MOVING_TRACKS:
                break
        else:
            raise RuntimeError(f"no trackable {trajectories[i % len(trajectories)]} clip in 100 seeds")
        colours, shapes = list(pc.COLOURS), list(pc.SHAPES)
        colour = colours[(colours.index(c.colour) + 1) % len(colours)]
        new = f"{colour} {shapes[(shapes.index(c.shape) + 2) % len(shapes)]}"
        out.append((f"{c.trajectory}:{c.label}", c.frames, new))
    return out


def real_clips(size: int, frames: int) -> list[tuple[str, np.ndarray, str]]:
    """The shared reference videos, evenly spaced frames resized straight to the model's size."""
    from motionclone.motion_core.video_io import FrameSelection, ResizeSpec, load_video_file

    folder = ROOT.parent / "shared" / "reference_videos"
    out = []
    for path in sorted(folder.glob("*.mp4")):
        video = load_video_file(path, FrameSelection(evenly_spaced_frames=frames), ResizeSpec(size, size, "stretch"))
        out.append((path.stem, _to_uint8(video.images), "red circle"))
    return out


def temporal_attention_stats(model, clip, vae, frames: np.ndarray, timestep: int = 400,
                             prefix: str = "up_blocks.1", seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Does the model's temporal attention carry the motion MotionClone would extract?

    Per temporal attention layer under `prefix`: (mean entropy of the attention rows in nats,
    fraction of rows whose top-1 frame is the same for the moving clip `frames` and for a
    still copy of its first frame, the same fraction over the moving tokens only). Uniform rows
    have entropy ln(F). Static tokens look alike in both clips, so the motion shows in the second
    fraction: near 1 means the sparse motion (top-1 indices) hardly depends on the motion.
    A token moves if some pixel of its patch has a standard deviation over the frames above 0.05.
    """
    import comfy.model_management

    from motionclone.motion_core.attention_capture import CaptureState
    from motionclone.motion_core.guided_sampling import attention_layers_of, select_layers
    from motionclone.motion_core.injection import CAPTURE_KEY

    layers = select_layers(attention_layers_of(model), prefix)
    empty = _encode(clip, "")[0][0]
    comfy.model_management.load_models_gpu([model])

    def capture(video: np.ndarray) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            latent = model.model.process_latent_in(vae.encode(torch.from_numpy(video).float() / 255.0))
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
            sigma = model.model.model_sampling.sigma(torch.tensor([float(timestep)]))
            x = model.model.model_sampling.noise_scaling(sigma, noise, latent)
            state = CaptureState(layers)
            n = latent.shape[0]
            options = {**model.model_options["transformer_options"], "cond_or_uncond": [0], CAPTURE_KEY: state}
            model.model.apply_model(x, sigma.expand(n), c_crossattn=empty.expand(n, -1, -1),
                                    transformer_options=options)
        return state.probs

    moving, still = capture(frames), capture(np.repeat(frames[:1], len(frames), axis=0))
    pixel_std = torch.from_numpy(frames).float().div(255.0).std(dim=0).amax(dim=-1)[None, None]  # [1, 1, H, W]
    out = {}
    for name in layers:
        p, q = moving[name].float(), still[name].float()  # [H x W tokens, heads, F, F]
        side = math.isqrt(p.shape[0])
        moves = torch.nn.functional.adaptive_max_pool2d(pixel_std, side).flatten() > 0.05
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()
        same = (p.argmax(-1) == q.argmax(-1)).float()
        moving_agree = same[moves].mean().item() if moves.any() else float("nan")
        out[name] = (entropy, same.mean().item(), moving_agree)
    return out


@dataclass
class CeilingResult:
    name: str
    seed: int
    matched: float  # motion fidelity of the sample whose attention was matched to the MOTION
    unguided: float
    matched_recall: float
    unguided_recall: float
    loss_first: float  # motion loss (unweighted) before the first iteration of the first step
    loss_last: float  # ... after the iterations of the last matched step
    frames: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def attention_match_ceiling(model, clip, vae, name: str, frames: np.ndarray, prompt: str, seed: int, *,
                            iterations: int = 10, matched_steps: int = 8, step_size: float = 0.02,
                            steps: int = 20, cfg: float = 7.5, timestep: int = 400) -> CeilingResult:
    """How much motion fidelity would perfectly matched sparse attention buy on this model?

    A diagnostic, not MotionClone: a plain DDIM loop (ddim_uniform sigmas) that, at each of its first
    `matched_steps` steps, takes `iterations` normalised gradient steps on the latent (each moves it by
    step_size * sigma in RMS) to drive the motion loss of the `up_blocks.1` layers down, far further
    than one guidance step does. If the loss falls to a few per cent and the motion still does not
    follow the reference, the model's temporal attention does not decide its motion and no guidance
    weight or schedule will clone it.
    """
    import comfy.model_management
    import comfy.sample
    import comfy.samplers

    from motionclone.motion_core.attention_capture import CaptureState, StopForward
    from motionclone.motion_core.guidance import motion_loss
    from motionclone.motion_core.injection import CAPTURE_KEY
    from motionclone.motion_core.motion_fidelity import motion_scores

    ref = reference_motion(model, clip, vae, frames, prompt, seed, timestep)
    latents, motion, layers = ref.latents, ref.motion, ref.motion.layers
    empty, positive = ref.empty[0][0], ref.positive[0][0]
    comfy.model_management.load_models_gpu([model])
    base, n = model.model, latents.shape[0]
    sigmas = comfy.samplers.calculate_sigmas(base.model_sampling, "ddim_uniform", steps)

    def forward(x, sigma, context, capture=None):
        options = {**model.model_options["transformer_options"], "cond_or_uncond": [0]}
        if capture is not None:
            options[CAPTURE_KEY] = capture
        return base.apply_model(x, sigma.expand(n), c_crossattn=context.expand(n, -1, -1),
                                transformer_options=options)

    def loss_at(x, sigma):
        capture = CaptureState(layers, stop_after_last=True)
        try:
            forward(x, sigma, positive, capture)
        except StopForward:
            pass
        return motion_loss(capture.probs, motion)

    def sample(match: bool):
        # As ComfyUI's KSampler starts a full denoise (max_denoise), so the unmatched run is its ddim sample.
        noise = comfy.sample.prepare_noise(latents, seed)
        x = base.model_sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
        losses = []
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            if match and i < matched_steps:
                for _ in range(iterations):
                    with torch.inference_mode(False), torch.enable_grad():
                        leaf = x.detach().clone().requires_grad_(True)
                        loss = loss_at(leaf, sigma)
                        (grad,) = torch.autograd.grad(loss, leaf)
                    losses.append(float(loss.detach()))
                    x = x - step_size * sigma * grad / grad.square().mean().sqrt().clamp_min(1e-12)
                if i == matched_steps - 1:
                    with torch.no_grad():
                        losses.append(float(loss_at(x, sigma)))
            with torch.no_grad():
                cond, uncond = forward(x, sigma, positive), forward(x, sigma, empty)
                denoised = uncond + cfg * (cond - uncond)
                x = denoised + (x - denoised) * (sigma_next / sigma) if sigma_next > 0 else denoised
        with torch.no_grad():
            return _to_uint8(vae.decode(base.process_latent_out(x))), losses

    matched, losses = sample(True)
    unguided, _ = sample(False)
    a, b = motion_scores(frames, matched), motion_scores(frames, unguided)
    return CeilingResult(name, seed, a.fidelity, b.fidelity, a.recall, b.recall, losses[0], losses[-1],
                         {"reference": frames, "matched": matched, "unguided": unguided})
