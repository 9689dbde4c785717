"""Guided sampling of a native Wan model with a Wan MOTION: the latent optimised on a high-sigma prefix.

The update the method notes recommend (dit-motion-transfer-method.md, 4.5), as DiTFlow's default
`latent` mode: at each guided step the sampler state x is copied to a float32 leaf and a fresh Adam
takes `iterations` steps on it against the attention-motion-flow loss (conditional branch only, the
forward stopped right after the guided block's self-attention); the CFG denoiser is then evaluated at
the optimised x and one Euler step is taken. The step size falls linearly from `step_size` to half of
it over the guided steps (DiTFlow: 0.002 -> 0.001). With `gradient_every` = k the gradient is
computed on iterations 0, k, 2k, ... and reused in between (FastVMT).

It runs inside a SAMPLER_SAMPLE wrapper: the guided prefix is sampled here, then the user's sampler
(unchanged) runs the remaining sigmas from the state reached (noise = x / sigma_G, latent 0: CONST
rebuilds x). Off (step size 0) installs nothing, so the core sampler runs bit for bit.

Memory: the blocks before the guided one are checkpointed during the optimisation's forward (through
Wan's own `patches_replace["dit"]` block hook): the backward keeps one [tokens, dim] input per block and
recomputes one block at a time, instead of every block's attention and feed-forward activations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.utils.checkpoint

from ..inference_tensors import normal_tensors_for_grad
from ..region_mask import RegionMaskError
from .amf import amf_loss, soft_amf
from .wan_capture import capture_qk, differentiable_kernels
from .wan_injection import active, injection_patches, record_reference_kv
from .wan_motion import WanMotion, wan_diffusion_model
from .wan_region import WanRegion, latent_frame_masks

WRAPPER_KEY = "motionclone_wan_guidance"
DITFLOW_STEP_SIZE = 0.002  # DiTFlow's learning rate at the first guided step
DITFLOW_ITERATIONS = 5
DITFLOW_FRACTION = 0.2  # DiTFlow guides the first 10 of 50 steps


@dataclass(frozen=True)
class WanGuidanceSettings:
    step_size: float = DITFLOW_STEP_SIZE
    iterations: int = DITFLOW_ITERATIONS
    guided_steps: int = 0  # 0: the steps whose unshifted time is above 1 - noisy_fraction
    noisy_fraction: float = DITFLOW_FRACTION
    gradient_every: int = 1
    keep_still: float = 0.0  # with a region: weight of the still loss outside it, relative to the motion loss

    def __post_init__(self) -> None:
        if not (math.isfinite(self.step_size) and self.step_size >= 0):
            raise ValueError(f"Wan guidance step size must be finite and >= 0, got {self.step_size}")
        if not (math.isfinite(self.keep_still) and self.keep_still >= 0):
            raise ValueError(f"keep_still must be finite and >= 0, got {self.keep_still}")
        if self.iterations < 1 or self.gradient_every < 1 or self.guided_steps < 0:
            raise ValueError("iterations and gradient_every must be >= 1, guided_steps >= 0")
        if not 0 < self.noisy_fraction <= 1:
            raise ValueError(f"noisy_fraction must be in (0, 1], got {self.noisy_fraction}")


def unshifted_time(sigma: float, shift: float) -> float:
    """t with sigma = shift * t / (1 + (shift - 1) * t) (ComfyUI's flow shift): the schedule's own time axis."""
    return sigma / (shift - (shift - 1.0) * sigma)


def guided_count(sigmas: torch.Tensor, settings: WanGuidanceSettings, shift: float) -> int:
    """How many of the first steps are guided: `guided_steps`, or those whose unshifted time t > 1 - r
    (a sigma band: 10 of 50 'simple' steps at r = 0.2 whatever the shift)."""
    steps = len(sigmas) - 1
    if settings.guided_steps:
        return min(settings.guided_steps, steps)
    edge = 1.0 - settings.noisy_fraction + 1e-6
    return sum(1 for s in sigmas[:-1].tolist() if unshifted_time(s, shift) > edge)


def _checkpointed_block(diffusion_model: torch.nn.Module, index: int, args: dict, extra: dict) -> dict:
    """A `patches_replace["dit"][("double_block", i)]` entry: the block keeps only its inputs and recomputes
    itself in backward. The block is taken by index, not through `extra["original_block"]`: that closure
    looks its block up when called, and in backward it would find the loop's last one. The transformer
    options are frozen as they are now (the block loop changes them)."""
    options = dict(args["transformer_options"])
    block = diffusion_model.blocks[index]

    def run(img, txt, vec, pe):
        return block(img, e=vec, freqs=pe, context=txt, context_img_len=None, transformer_options=options)

    img = torch.utils.checkpoint.checkpoint(run, args["img"], args["txt"], args["vec"], args["pe"],
                                            use_reentrant=False, preserve_rng_state=False)
    return {"img": img}


def with_checkpointed_blocks(diffusion_model: torch.nn.Module, transformer_options: dict | None,
                             blocks: range) -> dict:
    """A copy of transformer_options in which the Wan blocks `blocks` are checkpointed (where no other
    replace patch claims them); the caller's dicts are not modified. The backward must run where the
    forward did as far as kernels go (`differentiable_kernels`): the recompute must repeat the forward."""
    options = dict(transformer_options or {})
    replace = {name: dict(entries) for name, entries in options.get("patches_replace", {}).items()}
    dit = replace.setdefault("dit", {})
    for i in blocks:
        dit.setdefault(("double_block", i), partial(_checkpointed_block, diffusion_model, i))
    options["patches_replace"] = replace
    return options


class WanMotionGuidance:
    """Wan guidance for one sampling run; `patch(model)` returns a clone carrying the sampler wrapper."""

    def __init__(self, motion: WanMotion, settings: WanGuidanceSettings, mask: torch.Tensor | None = None) -> None:
        """`mask`: optional target region (a ComfyUI MASK, one or one per video frame; wan_region.py)."""
        self.motion = motion
        self.settings = settings
        target = latent_frame_masks(mask, motion.latent_shape, "sampler's mask")
        self.region = (WanRegion(motion.region, target, motion.grid, motion.latent_shape)
                       if target is not None or motion.region is not None else None)
        # Per block: (the reference displacements each token follows, the counted entries or None for DiTFlow's).
        self.references = {b: self.region.reference(motion.flows[b], motion.pairs) if self.region is not None
                           else (motion.flows[b], None) for b in motion.blocks}
        if settings.keep_still > 0 and self.region is None:
            raise RegionMaskError("keep_still_weight needs a region (a mask on the sampler or on Extract Sparse "
                                  "Motion): outside it the video is kept still")
        # Keep still: the tokens outside the region, toward no displacement to any other frame.
        self.still = self.region.still(motion.pairs) if settings.keep_still > 0 else None
        self.losses: list[tuple[int, int, float]] = []  # (guided step, iteration, loss before that iteration)

    # --- the loss (also used to measure any latent, e.g. an unguided run's) ----------------------

    def motion_loss(self, model, x: torch.Tensor, sigma: float, context: torch.Tensor,
                    transformer_options: dict | None = None, checkpointing: bool = True) -> torch.Tensor:
        """AMF loss of sampler state x [B, 16, T', H', W'] at `sigma`, averaged over the MOTION's blocks (a graph
        to x when grad is on). `model`: the MODEL's BaseModel (model_base.WAN21). `checkpointing` (with grad):
        the blocks before a guided one keep only their inputs and are recomputed in backward."""
        return self.losses_of(model, x, sigma, context, transformer_options, checkpointing)[0]

    def losses_of(self, model, x: torch.Tensor, sigma: float, context: torch.Tensor,
                  transformer_options: dict | None = None,
                  checkpointing: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the motion loss, the keep-still loss or None without keep-still) from the same forwards."""
        diffusion_model = model.diffusion_model
        sampling = model.model_sampling
        dtype = model.get_dtype()
        s = torch.full((x.shape[0],), float(sigma), device=x.device)
        xin = sampling.calculate_input(s, x).to(dtype)
        timestep = sampling.timestep(s).to(dtype)
        context = context.to(x.device, dtype)
        if context.is_inference() and torch.is_grad_enabled():  # made in ComfyUI's inference_mode: a normal copy
            with torch.inference_mode(False):
                context = context.clone()
        if context.shape[0] != x.shape[0]:
            context = context[:1].expand(x.shape[0], *context.shape[1:])
        total = x.new_zeros(())
        still = None if self.still is None else x.new_zeros(())
        for block in self.motion.blocks:
            options = transformer_options
            if checkpointing and torch.is_grad_enabled():
                options = with_checkpointed_blocks(diffusion_model, transformer_options, range(block))
            state = capture_qk(diffusion_model, xin, timestep, context, block, stop_after=True,
                               transformer_options=options)
            flow = soft_amf(state.q, state.k, self.motion.grid, self.motion.pairs, tau=self.motion.tau)
            reference, counted = self.references[block]
            total = total + amf_loss(flow, reference, counted)
            if still is not None:
                still = still + amf_loss(flow, flow.new_zeros(flow.shape[1:]), self.still)
        blocks = len(self.motion.blocks)
        return total / blocks, None if still is None else still / blocks

    def _optimise(self, model, x: torch.Tensor, sigma: float, context: torch.Tensor, step: int, guided: int,
                  transformer_options: dict) -> torch.Tensor:
        scale = 1.0 - 0.5 * step / max(guided - 1, 1)  # DiTFlow: linspace(0.002, 0.001) over the guided steps
        normal_tensors_for_grad(model.diffusion_model, x.device)
        # differentiable_kernels also around the backward: checkpointed blocks recompute there.
        with torch.inference_mode(False), torch.enable_grad(), differentiable_kernels():
            leaf = x.detach().to(torch.float32).clone().requires_grad_(True)
            adam = torch.optim.Adam([leaf], lr=self.settings.step_size * scale)
            cached = None
            for it in range(self.settings.iterations):
                if it % self.settings.gradient_every == 0:
                    adam.zero_grad(set_to_none=True)
                    loss, still = self.losses_of(model, leaf, sigma, context, transformer_options)
                    (grad,) = torch.autograd.grad(loss, leaf, retain_graph=still is not None)
                    if self.region is not None:  # the motion moves the latent only where the region is
                        grad = grad * self.region.support().to(leaf.device)
                    if still is not None:  # keep-still acts outside the region, wherever its gradient goes
                        grad = grad + torch.autograd.grad(still * self.settings.keep_still, leaf)[0]
                    leaf.grad = grad
                    cached = leaf.grad.detach().clone()
                    self.losses.append((step, it, float(loss.detach())))
                else:  # FastVMT's reuse: Adam steps again on the last computed gradient
                    leaf.grad = cached.clone()
                adam.step()
            out = leaf.detach()
            if self.region is not None and self.still is None:  # the region's soft edges; exactly x outside
                base = x.detach().to(torch.float32)
                out = base + self.region.restrict(out - base)
            return out.to(x.dtype)

    # --- the sampler wrapper ------------------------------------------------------------------------

    def _sample(self, executor, guider, sigmas: torch.Tensor, extra_args: dict, callback: Callable | None,
                noise: torch.Tensor, latent_image: torch.Tensor | None = None, denoise_mask=None,
                disable_pbar: bool = False):
        import comfy.model_management
        import comfy.samplers

        model = guider.inner_model
        sampling = model.model_sampling
        shift = float(getattr(sampling, "shift", 1.0))
        guided = guided_count(sigmas, self.settings, shift)
        if guided == 0:
            logging.warning("MotionClone on Wan: no step of this run is guided: r = %g guides unshifted times above "
                            "%g, and the run starts at %.3f (denoise < 1 starts lower). Set guided_steps to guide the "
                            "first steps of such a run.", self.settings.noisy_fraction,
                            1.0 - self.settings.noisy_fraction, unshifted_time(float(sigmas[0]), shift))
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        if denoise_mask is not None:
            raise ValueError("MotionClone on Wan: a noise mask (inpainting) is not supported with guidance")
        self.motion.check_compatible(noise.shape)
        context = guider.conds["positive"][0]["model_conds"]["c_crossattn"].cond
        options = dict(extra_args.get("model_options", {}).get("transformer_options", {}))
        latent = torch.zeros_like(noise) if latent_image is None else latent_image
        x = sampling.noise_scaling(sigmas[0], noise, latent)
        denoiser = comfy.samplers.KSamplerX0Inpaint(guider, sigmas)
        args = {**extra_args, "denoise_mask": None}
        total = len(sigmas) - 1
        reference = None
        if self.motion.injection_latent is not None:
            reference = model.process_latent_in(self.motion.injection_latent.to(noise.device, torch.float32))
        for i in range(guided):  # progress and previews: the caller's callback, as its sampler would call it
            comfy.model_management.throw_exception_if_processing_interrupted()
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            injection = None
            if reference is not None:  # DiTFlow: the reference noised to this sigma with the initial noise
                injection = self._reference_kv(model, sampling.noise_scaling(sigma, noise, reference), float(sigma),
                                               context, options)
            with active(injection):
                x = self._optimise(model, x, float(sigma), context, i, guided, options)
                with torch.no_grad():
                    denoised = denoiser(x, sigma * x.new_ones((x.shape[0],)), **args)
            if callback is not None:
                callback(i, denoised, x, total)
            # k-diffusion's Euler (to_d, then dt), operation for operation
            x = denoised if float(sigma_next) == 0 else x + (x - denoised) / sigma * (sigma_next - sigma)
        if guided == total:
            return sampling.inverse_noise_scaling(sigmas[-1], x)
        rest = sigmas[guided:]
        scale = float(getattr(sampling, "noise_scale", 1.0))

        def shifted(step, denoised, x_, _total):
            if callback is not None:
                callback(step + guided, denoised, x_, total)

        return executor(guider, rest, extra_args, shifted, x / (rest[0] * scale), torch.zeros_like(x), None,
                        disable_pbar)

    @staticmethod
    def _reference_kv(model, x_ref: torch.Tensor, sigma: float, context: torch.Tensor, options: dict):
        sampling = model.model_sampling
        dtype = model.get_dtype()
        s = torch.full((1,), sigma, device=x_ref.device)
        return record_reference_kv(model.diffusion_model, sampling.calculate_input(s, x_ref[:1]).to(dtype),
                                   sampling.timestep(s).to(dtype), context[:1].to(x_ref.device, dtype), options)

    def patch(self, model):
        """A clone of `model` whose sampling runs the guided prefix; the input MODEL is left as it is."""
        import comfy.patcher_extension

        if wan_diffusion_model(model) is None:
            raise ValueError("Wan guidance needs a native Wan MODEL")
        if getattr(getattr(model.model, "diffusion_model", None), "patch_embedding", None) is not None and \
                model.model.diffusion_model.patch_embedding.weight.shape[1] != 16:
            raise ValueError("MotionClone on Wan: image-to-video Wan models (extra input channels) are not supported "
                             "yet; use a text-to-video Wan 2.1 model")
        patched = model.clone()
        if self.settings.step_size > 0:
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, self._sample)
            if self.motion.injection_latent is not None:
                for key, module in injection_patches(patched).items():
                    patched.add_object_patch(key, module)
        else:  # weight 0: the sampler runs untouched; the loss is only measured along its run
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                         self._measure)
        return patched

    def _measure(self, executor, model, conds, x_in, timestep, model_options):
        """Weight 0: the motion loss of the sampler's state at each guided step's sigma, measured on its first
        evaluation there (a separate stopped forward without grad; what the sampler computes is unchanged)."""
        options = model_options.get("transformer_options", {})
        sigmas = options.get("sample_sigmas")
        positive = conds[0] if conds else None
        if sigmas is not None and positive:
            sigma = float(timestep.flatten()[0])
            shift = float(getattr(model.model_sampling, "shift", 1.0))
            guided = guided_count(sigmas.cpu(), self.settings, shift)
            same = [i for i, s in enumerate(sigmas[:guided].tolist()) if math.isclose(s, sigma, rel_tol=1e-5)]
            if same and same[0] not in {step for step, _, _ in self.losses}:
                self.motion.check_compatible(x_in.shape)
                context = positive[0]["model_conds"]["c_crossattn"].cond
                with torch.no_grad():
                    loss = self.motion_loss(model, x_in[:1], sigma, context[:1])
                self.losses.append((same[0], 0, float(loss)))
        return executor(model, conds, x_in, timestep, model_options)

    # --- what the nodes report ----------------------------------------------------------------------

    def loss_curve(self) -> list[tuple[int, float]]:
        """The loss at each guided step's first iteration (before that step's optimisation)."""
        return [(step, loss) for step, it, loss in self.losses if it == 0]

    def window_curves(self) -> dict:
        return {}
