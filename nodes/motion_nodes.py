"""MotionClone nodes: extract a sparse MOTION, sample guided by it, save/load it."""

from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io, ui

from ..motion_core.dit.wan_guidance import WanGuidanceSettings, WanMotionGuidance
from ..motion_core.dit.wan_motion import (
    WanMotion,
    extract_wan_motion,
    is_wan_model,
    latent_frames_of_video,
    parse_blocks,
    wan_fingerprint,
)
from ..motion_core.extraction import extract_sparse_motion, model_fingerprint
from ..motion_core.guided_sampling import (
    MEMORY_MODES,
    GuidanceSettings,
    MotionGuidance,
    attention_layers_of,
    select_layers,
)
from ..motion_core.loss_plot import as_comfy_image, draw_loss_plot
from ..motion_core.schedule import uneven_timesteps
from ..motion_core.sparse_motion import SparseMotion
from ..motion_core.windowed_motion import WindowedMotion, load_motion
from .host_features import advanced, supported
from .validation import numbers_valid, require_finite

Motion = io.Custom("MOTION")
MOTION_SUFFIX = ".motion.safetensors"
WAN_STEP_PER_WEIGHT = 1e-6  # on Wan, guidance_weight 2000 = Adam step 0.002 (DiTFlow's)


def _guidance_inputs() -> list:
    return [
        Motion.Input("motion", tooltip="Sparse motion from Extract Sparse Motion or Load Motion."),
        io.Float.Input("guidance_weight", default=2000.0, min=0.0, max=1e6, step=10.0,
                       tooltip="w in L = w * sum of MSE. 0 disables guidance (output equals KSampler's). On a Wan "
                               "model: the step size of the latent's optimisation in millionths (2000 = 0.002)."),
        io.Int.Input("guided_steps", default=0, min=0, max=10000,
                     tooltip="Guide the first N steps; 0 = every step whose timestep is >= (1 - r) * 1000."),
        io.Float.Input("noisy_fraction", default=0.4, min=0.01, max=1.0, step=0.01,
                       tooltip="r: the noisy part of the trajectory that is guided when guided_steps is 0."),
        io.Int.Input("warmup", default=10, min=0, max=1000, tooltip="Guided steps over which the loss ramps up.",
                     **advanced(io.Int.Input)),
        io.Int.Input("cooldown", default=10, min=0, max=1000, tooltip="Last guided steps over which it ramps down.",
                     **advanced(io.Int.Input)),
        io.Int.Input("gradient_every", default=1, min=1, max=100, optional=True,
                     tooltip="Compute the guidance gradient on every k-th guided step and reuse it, rescaled, on the "
                             "steps between (those cost a plain step). 1 = every step, as MotionClone. See the README "
                             "for the measured trade-off.", **advanced(io.Int.Input)),
        io.Mask.Input("mask", optional=True,
                      tooltip="Where the motion is applied in the new video (one mask, or one per frame). Only the "
                              "positions under it are guided; a MOTION extracted with a mask is mapped onto this "
                              "region by bounding boxes. Unconnected: the MOTION's own region, else the whole frame."),
        io.Float.Input("keep_still_weight", default=0.0, min=0.0, max=1e6, step=10.0, optional=True,
                       tooltip="With a region: pulls the positions outside it toward still video (SD: each frame "
                               "attending to itself; Wan: no motion flow), with this weight (like guidance_weight). "
                               "0 = off.",
                       **advanced(io.Float.Input)),
        io.Combo.Input("memory_mode", options=list(MEMORY_MODES), default="auto", optional=True,
                       tooltip="SD1.5/AnimateDiff: what a guided step's gradient keeps. lean: recompute each layer "
                               "in the backward (about the memory of a plain step, slower); fast: keep the whole "
                               "graph (faster, several times the memory); auto: fast when its measured estimate fits "
                               "in 3/4 of the free memory, else lean. The result is the same up to float rounding.",
                       **advanced(io.Combo.Input)),
    ]


def check_family(model, motion) -> None:
    """A MOTION guides only the model family it was extracted from (clear errors both ways)."""
    if isinstance(motion, WanMotion):
        if not is_wan_model(model):
            raise ValueError("MotionClone: this MOTION was extracted from a Wan model (family wan2.1); it cannot guide "
                             "this model. Extract the motion with the model you sample with.")
        return
    if is_wan_model(model):
        raise ValueError("MotionClone: this MOTION was extracted from an SD1.5 / AnimateDiff model; it cannot guide a "
                         "Wan model. Extract the motion with the Wan model (Extract Sparse Motion accepts it).")


def _wan_guidance(motion: WanMotion, samples, weight, guided_steps, noisy_fraction, gradient_every, mask,
                  keep_still_weight) -> WanMotionGuidance:
    """On Wan the weight is read as the Adam step size on the latent, in millionths (docs/wan.md)."""
    motion.check_compatible(samples.shape)
    # keep_still_weight is on guidance_weight's scale: relative to it, the still loss's weight in the objective.
    keep_still = keep_still_weight / weight if weight > 0 else 0.0
    return WanMotionGuidance(motion, WanGuidanceSettings(step_size=weight * WAN_STEP_PER_WEIGHT,
                                                         guided_steps=guided_steps, noisy_fraction=noisy_fraction,
                                                         gradient_every=gradient_every, keep_still=keep_still), mask)


def _guidance(model, latent, motion: SparseMotion | WindowedMotion, weight, guided_steps, noisy_fraction, warmup,
              cooldown, gradient_every: int = 1, mask=None, keep_still_weight: float = 0.0,
              memory_mode: str = "auto") -> MotionGuidance:
    require_finite("MotionClone", guidance_weight=weight, noisy_fraction=noisy_fraction,
                   keep_still_weight=keep_still_weight)
    samples = latent["samples"]
    check_family(model, motion)
    if isinstance(motion, WanMotion):
        return _wan_guidance(motion, samples, weight, guided_steps, noisy_fraction, gradient_every, mask,
                             keep_still_weight)
    motion.check_compatible(samples.shape[0], samples.shape[-2], samples.shape[-1], attention_layers_of(model))
    if motion.model_fingerprint and motion.model_fingerprint != model_fingerprint(model):
        logging.warning("MotionClone: MOTION was extracted with %s, sampling with %s",
                        motion.model_fingerprint, model_fingerprint(model))
    return MotionGuidance(motion, GuidanceSettings(weight, guided_steps, noisy_fraction, warmup, cooldown,
                                                   gradient_every=gradient_every,
                                                   keep_still_weight=keep_still_weight, memory_mode=memory_mode),
                          mask)


class ExtractSparseMotion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ExtractSparseMotion",
            **supported(io.Schema, search_aliases=["motionclone", "motion transfer", "reference video motion",
                                                   "temporal attention"]),
            display_name="Extract Sparse Motion",
            category="MotionClone",
            description="Records the reference video's temporal attention at one noisy timestep and keeps the "
                        "top-k entries of each row: MotionClone's motion representation. A MODEL with core context "
                        "windows (Context Windows (Manual), standard_static) and a longer video: per window, with "
                        "the windows the sampler will use (long videos). A native Wan 2.1 MODEL: the reference's "
                        "attention motion flow (layers: Wan blocks, e.g. 14; see docs/wan.md).",
            inputs=[
                io.Model.Input("model", tooltip="MODEL with AnimateDiff motion modules."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes the reference frames (not needed for a LATENT)."),
                io.Image.Input("images", optional=True, tooltip="Reference frames [F,H,W,3], at the output size."),
                io.Latent.Input("latent", optional=True, tooltip="Reference latents instead of images."),
                io.Conditioning.Input("positive", optional=True, tooltip="Defaults to the empty prompt (needs clip)."),
                io.Clip.Input("clip", optional=True, tooltip="Used to encode the empty prompt when no positive."),
                io.Conditioning.Input("image_condition", optional=True,
                                      tooltip="Image Condition's positive output: its SparseCtrl then runs on the "
                                              "reference video's own frames at the same indices (image-to-video)."),
                io.Int.Input("timestep", default=400, min=1, max=999, tooltip="Training timestep of the noising.",
                             **advanced(io.Int.Input)),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; use the sampler's seed to match the reference setup."),
                io.Int.Input("top_k", default=1, min=1, max=16, **advanced(io.Int.Input)),
                io.String.Input("layers", default="up_blocks.1",
                                tooltip="Comma-separated diffusers block prefixes of the guided temporal attention.",
                                **advanced(io.String.Input)),
                io.Mask.Input("mask", optional=True,
                              tooltip="Region whose motion is cloned (one mask, or one per frame): only positions "
                                      "under it (at least half of a token's area, per guided layer) keep their "
                                      "motion. Unconnected: the whole frame."),
                io.Int.Input("frame_pairs", default=0, min=0, max=1000, optional=True,
                             tooltip="Wan only: which latent-frame pairs the motion flow covers. 0 = every pair "
                                     "(DiTFlow; grows with the square of the frames); k = each frame with the next "
                                     "k - 1 (FastVMT's forward pairs, k = 4: 78 pairs instead of 441 at 81 frames).",
                             **advanced(io.Int.Input)),
                io.Boolean.Input("kv_injection", default=False, optional=True,
                                 tooltip="Wan only, off by default (DiTFlow's reference-content option): the MOTION "
                                         "keeps the reference latent, and on the guided steps block 0's keys and "
                                         "values of the reference, noised to the step with the sampler's noise, "
                                         "replace the new video's. Carries the reference's content and layout, "
                                         "not only its motion.", **advanced(io.Boolean.Input)),
            ],
            outputs=[Motion.Output()],
        )

    @classmethod
    def execute(cls, model, timestep, seed, top_k, layers, vae=None, images=None, latent=None, positive=None,
                clip=None, image_condition=None, mask=None, frame_pairs: int = 0,
                kv_injection: bool = False) -> io.NodeOutput:
        if is_wan_model(model):
            return io.NodeOutput(_extract_wan(model, timestep, seed, layers, vae, images, latent, positive, clip,
                                              image_condition, mask, frame_pairs, kv_injection))
        if frame_pairs:
            raise ValueError("Extract Sparse Motion: frame_pairs applies to Wan models (their motion flow between "
                             "latent frames); an AnimateDiff motion module relates all its frames: set it to 0")
        if kv_injection:
            raise ValueError("Extract Sparse Motion: kv_injection applies to Wan models only (DiTFlow's key/value "
                             "injection); turn it off for an AnimateDiff model")
        chosen = select_layers(attention_layers_of(model), layers)
        if latent is not None:
            latents = latent["samples"]
        elif images is not None:
            if vae is None:
                raise ValueError("Extract Sparse Motion: connect a VAE to encode the reference images")
            latents = vae.encode(images[:, :, :, :3])
        else:
            raise ValueError("Extract Sparse Motion: connect reference images (with a VAE) or a latent")
        if latents.shape[0] < 2:
            raise ValueError(f"Extract Sparse Motion: a video needs at least 2 frames, got {latents.shape[0]}")
        if positive is None:
            if clip is None:
                raise ValueError("Extract Sparse Motion: connect a positive conditioning, or a CLIP to encode ''")
            positive = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        control = None
        if image_condition is not None:
            from ..motion_core.sparsectrl import LatentAnchorControl, chain_links, condition_on_reference

            control = image_condition[0][1].get("control")
            if control is None:
                raise ValueError("Extract Sparse Motion: image_condition carries no control; connect the positive "
                                 "output of Image Condition")
            if images is None:
                raise ValueError("Extract Sparse Motion: image_condition needs the reference IMAGE frames")
            links = chain_links(control)
            if any(isinstance(link, LatentAnchorControl) for link in links):
                logging.warning("Extract Sparse Motion: image_condition comes from Image Condition in latent_anchor "
                                "mode, which only pins frames while sampling; extraction ignores it (only "
                                "SparseCtrl runs on the reference's own frames). Connect it to the sampler only.")
            if all(isinstance(link, LatentAnchorControl) for link in links):
                control = None
            else:
                control = condition_on_reference(control, images)
        motion = extract_sparse_motion(model, latents, positive[0][0], chosen, timestep=timestep, seed=seed,
                                       top_k=top_k, control=control, mask=mask)
        return io.NodeOutput(motion)


class MotionGuidedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="MotionGuidedSampler",
            **supported(io.Schema, search_aliases=["motionclone", "motion transfer", "ksampler",
                                                   "animatediff sampler"]),
            display_name="Motion Guided Sampler",
            category="MotionClone",
            description="KSampler with MotionClone guidance: early steps are pulled toward the MOTION's sparse "
                        "temporal attention. Use cfg 8.5 and ddim to match the reference setup.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=100, min=1, max=10000),
                io.Float.Input("cfg", default=8.5, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddim"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="ddim_uniform"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="Frames are the batch (e.g. 16)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                *_guidance_inputs(),
            ],
            outputs=[
                io.Latent.Output(),
                io.Image.Output(display_name="loss_plot",
                                tooltip="The motion loss at each guided step (weight 0: measured along the unguided "
                                        "run, which stays bit-identical to KSampler). Also in the log."),
            ],
        )

    @classmethod
    def validate_inputs(cls, cfg=None, denoise=None, guidance_weight=None, noisy_fraction=None,
                        keep_still_weight=None) -> bool | str:
        return numbers_valid(cls.define_schema(), cfg=cfg, denoise=denoise, guidance_weight=guidance_weight,
                             noisy_fraction=noisy_fraction, keep_still_weight=keep_still_weight)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                motion, guidance_weight, guided_steps, noisy_fraction, warmup, cooldown,
                gradient_every: int = 1, mask=None, keep_still_weight: float = 0.0,
                memory_mode: str = "auto") -> io.NodeOutput:
        import nodes

        require_finite("Motion Guided Sampler", cfg=cfg, denoise=denoise)
        guidance = _guidance(model, latent_image, motion, guidance_weight, guided_steps, noisy_fraction, warmup,
                             cooldown, gradient_every, mask, keep_still_weight, memory_mode)
        # KSampler's own code path: same noise, progress bar, previews and interrupt handling.
        (out,) = nodes.common_ksampler(guidance.patch(model), seed, steps, cfg, sampler_name, scheduler, positive,
                                       negative, latent_image, denoise=denoise)
        curve = guidance.loss_curve()
        kind = "guided" if guidance_weight else "unguided, measured"
        plot = as_comfy_image(draw_loss_plot({f"weight {guidance_weight:g}": curve},
                                             f"MotionClone motion loss per guided step ({kind})"))
        windows = [{"frames": [w[0], w[-1]], "loss": [{"step": s, "loss": v} for s, v in c]}
                   for w, c in guidance.window_curves().items()]
        return io.NodeOutput(out, plot, ui={**ui.PreviewImage(plot).as_dict(),
                                            "motion_loss": [{"step": s, "loss": v} for s, v in curve],
                                            "motion_loss_windows": windows})


class MotionCloneGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionCloneGuider",
            **supported(io.Schema, search_aliases=["motionclone", "motion transfer", "cfg guider"]),
            display_name="MotionClone Guider",
            category="MotionClone",
            description="CFG guider with MotionClone guidance, for SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Float.Input("cfg", default=8.5, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Latent.Input("latent_image", tooltip="Checked against the MOTION's frames and size."),
                *_guidance_inputs(),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def validate_inputs(cls, cfg=None, guidance_weight=None, noisy_fraction=None,
                        keep_still_weight=None) -> bool | str:
        return numbers_valid(cls.define_schema(), cfg=cfg, guidance_weight=guidance_weight,
                             noisy_fraction=noisy_fraction, keep_still_weight=keep_still_weight)

    @classmethod
    def execute(cls, model, positive, negative, cfg, latent_image, motion, guidance_weight, guided_steps,
                noisy_fraction, warmup, cooldown, gradient_every: int = 1, mask=None,
                keep_still_weight: float = 0.0, memory_mode: str = "auto") -> io.NodeOutput:
        import comfy.samplers

        require_finite("MotionClone Guider", cfg=cfg)
        # Weight 0 still measures the motion loss (in the log); the sampling is CFGGuider's, bit for bit.
        model = _guidance(model, latent_image, motion, guidance_weight, guided_steps, noisy_fraction, warmup,
                          cooldown, gradient_every, mask, keep_still_weight, memory_mode).patch(model)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


class MotionCloneUnevenSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionCloneUnevenSchedule",
            **supported(io.Schema, search_aliases=["motionclone", "sigmas", "scheduler"]),
            display_name="MotionClone Uneven Schedule",
            category="MotionClone",
            description="The reference 'uneven' spacing: guided_steps steps dense over timesteps "
                        "[(1-r)*1000, 999], the rest over [0, (1-r)*1000). Pair with guided_steps = the same N.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("steps", default=100, min=2, max=10000),
                io.Int.Input("guided_steps", default=50, min=1, max=10000),
                io.Float.Input("noisy_fraction", default=0.3, min=0.01, max=0.99, step=0.01),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps, guided_steps, noisy_fraction) -> io.NodeOutput:
        timesteps = torch.tensor(uneven_timesteps(steps, guided_steps, noisy_fraction), dtype=torch.float32)
        sigmas = model.get_model_object("model_sampling").sigma(timesteps)
        return io.NodeOutput(torch.cat([sigmas, sigmas.new_zeros([1])]))


def _extract_wan(model, timestep, seed, layers, vae, images, latent, positive, clip, image_condition,
                 mask, frame_pairs: int = 0, kv_injection: bool = False) -> WanMotion:
    """Extract Sparse Motion on a native Wan MODEL: the reference's attention motion flow (docs/wan.md)."""
    if image_condition is not None:
        raise ValueError("Extract Sparse Motion: image_condition is not supported on Wan models yet")
    if latent is not None:
        latents = latent["samples"]
    elif images is not None:
        if vae is None:
            raise ValueError("Extract Sparse Motion: connect Wan's VAE to encode the reference images")
        latent_frames_of_video(images.shape[0])  # refuses frame counts Wan's VAE cannot map, before encoding
        latents = vae.encode(images[:, :, :, :3])
    else:
        raise ValueError("Extract Sparse Motion: connect reference images (with Wan's VAE) or a latent")
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"Extract Sparse Motion: a Wan model needs a video latent [1, 16, T, H, W] (Wan's VAE); got "
                         f"{tuple(latents.shape)}. Is the VAE an image VAE?")
    if latents.shape[2] < 2:
        raise ValueError("Extract Sparse Motion: a video needs at least 2 latent frames (5 video frames) on Wan")
    if positive is None:
        if clip is None:
            raise ValueError("Extract Sparse Motion: connect a positive conditioning, or a CLIP to encode ''")
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    blocks = model.model.diffusion_model.blocks
    # The widget's SD default names an SD layer; on Wan it means the default block.
    blocks = parse_blocks("auto" if layers.strip() == "up_blocks.1" else layers, len(blocks))
    return extract_wan_motion(model, latents, positive[0][0], blocks, sigma=timestep / 1000.0, seed=seed,
                              pair_span=frame_pairs or None, model_fingerprint=wan_fingerprint(model),
                              kv_injection=bool(kv_injection), mask=mask)


class SaveMotion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveMotion",
            **supported(io.Schema, search_aliases=["motionclone", "save motion"]),
            display_name="Save Motion",
            category="MotionClone",
            description=f"Saves a MOTION as <prefix>_NNNNN{MOTION_SUFFIX} in the output folder.",
            inputs=[Motion.Input("motion"), io.String.Input("filename_prefix", default="motionclone/motion")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, motion: SparseMotion, filename_prefix: str) -> io.NodeOutput:
        import folder_paths

        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory()
        )
        filename = f"{name}_{counter:05}{MOTION_SUFFIX}"
        motion.save(os.path.join(folder, filename))
        return io.NodeOutput(ui={"motion": [{"filename": filename, "subfolder": subfolder, "type": "output"}]})


class LoadMotion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        root = folder_paths.get_input_directory()
        files = sorted(
            os.path.relpath(os.path.join(d, f), root)
            for d, _, names in os.walk(root, followlinks=True) for f in names if f.endswith(".safetensors")
        )
        return io.Schema(
            node_id="LoadMotion",
            **supported(io.Schema, search_aliases=["motionclone", "load motion"]),
            display_name="Load Motion",
            category="MotionClone",
            description="Loads a MOTION .safetensors from the input folder (copy saved motions there).",
            inputs=[io.Combo.Input("motion_file", options=files)],
            outputs=[Motion.Output()],
        )

    @classmethod
    def execute(cls, motion_file: str) -> io.NodeOutput:
        import folder_paths

        root = os.path.realpath(folder_paths.get_input_directory())
        path = os.path.realpath(os.path.join(root, motion_file))
        if os.path.commonpath([root, path]) != root:
            raise ValueError(f"Load Motion: {motion_file!r} is outside the input folder")
        return io.NodeOutput(load_motion(path))

    @classmethod
    def fingerprint_inputs(cls, motion_file: str):
        import folder_paths

        return os.path.getmtime(os.path.join(folder_paths.get_input_directory(), motion_file))
