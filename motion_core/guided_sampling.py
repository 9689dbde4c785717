"""MotionClone guidance wired into ComfyUI's sampler graph.

`MotionGuidance.patch(model)` returns a ModelPatcher clone with

* a CALC_COND_BATCH wrapper: on a guided step the unconditional branch runs without
  grad; the conditional branch runs with grad on a leaf copy of the latent and records
  the temporal-attention probabilities of the MOTION's layers. As soon as the last of
  them is recorded the loss L = w * ramp(i) * sum_l MSE(...) is differentiated w.r.t.
  the latent and grad is switched off for the rest of that same forward, so the
  conditional forward that builds the graph also supplies the noise prediction and the
  blocks after the last guided layer run without grad (as in the reference code);
* a post-CFG function applying the sampler-agnostic update D' = D - lambda * dL/dz_t to
  the CFG-combined denoised prediction (docs/guidance.md; exactly the reference DDIM
  step for ComfyUI's `ddim`/`euler` samplers);
* an APPLY_MODEL wrapper that, in that graph-recording forward, hands ControlNet skip
  residuals to the UNet out of place (control_grad.py);
* before that graph-recording forward, weights that ComfyUI created under its
  `torch.inference_mode()` get normal storage (inference_tensors.py), whichever loader put them
  there.

With weight 0 nothing is guided: the conditional forward runs as it would without the pack
(same batch, same attention path, bit for bit) and the motion loss is only measured beside it,
so an unguided run's loss curve can be compared with a guided one's (`loss_curve()`, logged at
the end of every run).

Nothing is mutated on the input MODEL; the state lives in this object, reset per run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .attention_capture import CaptureState, StopForward
from .checkpointing import (
    checkpointed,
    checkpointed_blocks,
    checkpointed_motion_module,
    graph_kept,
    guided_motion_module,
)
from .context_windows import running_frames
from .control_grad import controls_without_grad, skip_residuals_as_patch
from .errors import MotionCloneError
from .guidance import denoised_correction_scale, motion_loss, ramp_scale
from .inference_tensors import normal_tensors_for_grad
from .injection import CAPTURE_KEY, INFO_KEY, MotionModuleLayer
from .loss_plot import format_curve
from .memory_estimate import MARGIN as MEMORY_MARGIN
from .memory_estimate import LinearBytes, calibration_sizes, gib, peak_bytes
from .region_mask import RegionGuide, RegionMaskError, keep_still_loss, masked_motion_loss, normalize_mask
from .sparse_motion import MotionMismatchError, SparseMotion
from .unet_layout import motion_slots
from .windowed_motion import WindowedMotion

WRAPPER_KEY = "motionclone_guidance"


def attention_layers_of(model) -> list[str]:
    """Temporal attention layer names of a MODEL with motion modules (else a clear error)."""
    entry = model.model_options["transformer_options"].get(INFO_KEY)
    if entry is None:
        raise ValueError("this MODEL has no motion modules: apply 'Load AnimateDiff Motion Module' to it first")
    return list(entry["attention_layers"])


def select_layers(available: list[str], selection: str) -> list[str]:
    """Layers whose names start with one of the comma-separated prefixes (e.g. 'up_blocks.1')."""
    prefixes = [p.strip().rstrip(".") for p in selection.split(",") if p.strip()]
    chosen = [name for name in available if any(name == p or name.startswith(p + ".") for p in prefixes)]
    if not chosen:
        raise ValueError(f"no temporal attention layer matches {selection!r}; e.g. 'up_blocks.1' or 'down_blocks.2'")
    return chosen


class GuidanceError(MotionCloneError):
    """A guided step went numerically wrong; the message says where and what to lower."""


class GuidanceMemoryError(MotionCloneError):
    """A guided step would not fit in the free memory; the message says how much and what to lower."""


def _crossattn_of(cond: list[dict], model, x_in: torch.Tensor) -> torch.Tensor:
    """The first conditional entry's text context, one per frame (zeros of the UNet's width if none)."""
    try:
        context = cond[0]["model_conds"]["c_crossattn"].cond
    except (KeyError, IndexError, AttributeError, TypeError):
        dim = model.model_config.unet_config.get("context_dim") or 768
        context = torch.zeros(1, 77, dim)
    context = context.to(device=x_in.device, dtype=x_in.dtype)
    return context[:1].expand(x_in.shape[0], -1, -1)


def lean_attention_while_grad(existing: Callable | None) -> Callable:
    """A ComfyUI attention override for the graph-recording forward: while grad is on, the UNet's spatial
    attention runs as torch's scaled_dot_product_attention, whose backward keeps O(tokens) per layer;
    once grad is off (after the loss), and in every other forward, the host's choice (or `existing`).

    ComfyUI's CPU default (sub-quadratic attention) and split attention materialise score chunks that a
    backward must keep: a guided 512x512x16 step then needs more than 22 GB, against 2.5 GB with SDPA."""
    from comfy.ldm.modules.attention import attention_pytorch

    def override(func, *args, **kwargs):
        if torch.is_grad_enabled():
            return attention_pytorch(*args, **kwargs)
        return existing(func, *args, **kwargs) if existing is not None else func(*args, **kwargs)

    return override


def _first_per_step(losses: list[tuple[int, float]]) -> list[tuple[int, float]]:
    seen: dict[int, float] = {}
    for step, loss in losses:
        seen.setdefault(step, loss)
    return sorted(seen.items())


def _require_finite(t: torch.Tensor, what: str, loss: torch.Tensor | None, scale: float) -> None:
    if bool(torch.isfinite(t).all()):
        return
    loss_text = f", motion loss {float(loss.detach()):.4g}" if loss is not None else ""
    raise GuidanceError(
        f"MotionClone: {what} is not finite (NaN or infinity; weight x ramp {scale:g}{loss_text}). Sampling "
        "stopped: lower guidance_weight, or check that the model's prediction is finite without guidance "
        "(e.g. a float16 overflow)."
    )


MEMORY_MODES = ("auto", "lean", "fast")
# "auto" keeps the whole graph only when its estimate (margin included) leaves a quarter of the free memory
# for the rest of the step (the unconditional forward, the prediction after the guided layers).
AUTO_FAST_SHARE = 0.75


@dataclass
class GuidanceSettings:
    weight: float = 2000.0
    guided_steps: int = 0  # > 0: the first N steps; 0: every step with timestep >= (1 - r) * 1000
    noisy_fraction: float = 0.4  # r
    warmup: int = 10
    cooldown: int = 10
    checkpointing: bool = True  # recompute the graph's layers in backward instead of keeping them (exact)
    # "lean": always recompute (checkpointing); "fast": keep the whole graph; "auto": keep it when the measured
    # estimate fits in AUTO_FAST_SHARE of the free memory, else recompute. Without checkpointing: always kept.
    memory_mode: str = "auto"
    gradient_every: int = 1  # k: compute the gradient on every k-th guided step, reuse it (rescaled) between
    keep_still_weight: float = 0.0  # region masks: weight of the pull toward static attention outside the region

    def __post_init__(self) -> None:
        if self.gradient_every < 1:
            raise ValueError(f"gradient_every must be >= 1, got {self.gradient_every}")
        if not math.isfinite(self.keep_still_weight) or self.keep_still_weight < 0:
            raise ValueError(f"keep_still_weight must be a finite number >= 0, got {self.keep_still_weight}")
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {self.memory_mode!r}")


class MotionGuidance:
    def __init__(self, motion: SparseMotion | WindowedMotion, settings: GuidanceSettings,
                 mask: torch.Tensor | None = None) -> None:
        """`mask`: optional target region (a ComfyUI MASK, region_mask.py) where the motion is applied."""
        self.motion = motion
        self.settings = settings
        # The region of each context window's frames (None: outside context windows); None where nothing is masked.
        self.regions: dict[tuple[int, ...] | None, RegionGuide | None] = {}
        parts = ([(w.frames, w.motion) for w in motion.windows] if isinstance(motion, WindowedMotion)
                 else [(None, motion)])
        if mask is not None or any(part.masks for _, part in parts):
            target = normalize_mask(mask, motion.frames, motion.latent_height, motion.latent_width, "sampler's mask")
            for frames, part in parts:
                # A window's target is its frames' part of the mask, a mask like any other (all ones: no mask).
                part_target = target if target is None or frames is None else normalize_mask(
                    target[list(frames)], len(frames), motion.latent_height, motion.latent_width, "sampler's mask")
                region = RegionGuide(part, part_target)
                self.regions[frames] = region if region.active else None
        if settings.keep_still_weight > 0 and not any(self.regions.values()):
            raise RegionMaskError("keep_still_weight needs a region (a mask on the sampler or on Extract Sparse "
                                  "Motion): outside it the video is kept still")
        self._grads: dict[float, torch.Tensor] = {}  # sigma -> dL/dz_t awaiting the post-CFG step
        self.memory_estimates: dict[tuple, float] = {}  # (latent shape, device) -> bytes a guided step holds
        self.keeps_graph: dict[tuple, bool] = {}  # (latent shape, device) -> the memory mode's choice: graph kept
        self.estimates_by_choice: dict[tuple, dict[bool, float]] = {}  # ... -> {graph kept: bytes} (measured ones)
        # window (None outside context windows) -> (latent shape, gradient, its weight x ramp), for gradient reuse
        self._reused: dict[tuple | None, tuple] = {}
        self.window_losses: dict[tuple, list[tuple[int, float]]] = {}  # context window frames -> (step, loss)
        self.losses: list[tuple[int, float]] = []  # (step, unweighted motion loss), for tests/benchmarks

    @property
    def region(self) -> RegionGuide | None:
        """The target region outside context windows (None: the whole frame)."""
        return self.regions.get(None)

    # --- schedule -----------------------------------------------------------------
    def _step_info(self, sigma: float, model_options: dict, model_sampling) -> tuple[int, int, float] | None:
        """(step index, number of guided steps, next sigma) if this sigma is guided."""
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is None:
            return None
        sigmas = [float(s) for s in sigmas]
        same = [i for i in range(len(sigmas) - 1) if math.isclose(sigmas[i], sigma, rel_tol=1e-5)]
        # Second-order samplers also evaluate between two sigmas: that belongs to the step above.
        above = [i for i in range(len(sigmas) - 1) if sigmas[i] > sigma]
        step = same[0] if same else (above[-1] if above else 0)
        if self.settings.guided_steps > 0:
            guided = min(self.settings.guided_steps, len(sigmas) - 1)
        else:
            t_min = (1.0 - self.settings.noisy_fraction) * 1000.0
            ts = model_sampling.timestep(torch.tensor(sigmas[:-1])).tolist()
            guided = sum(1 for t in ts if t >= t_min - 1e-3)
        if step >= guided:
            return None
        return step, guided, sigmas[step + 1]

    # --- ComfyUI hooks --------------------------------------------------------------
    def _calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        sigma = float(timestep.flatten()[0])
        info = self._step_info(sigma, model_options, model.model_sampling)
        if info is None or conds[0] is None:
            return executor(model, conds, x_in, timestep, model_options)
        step, guided, sigma_next = info
        window = running_frames(model_options, x_in)
        motion = self._motion_for(window)
        if self.settings.weight == 0:
            return self._measure(executor, model, conds, x_in, timestep, model_options, step, motion, window)
        scale = self.settings.weight * ramp_scale(step, guided, self.settings.warmup, self.settings.cooldown)
        last = self._reused.get(window)
        if last is not None and step % self.settings.gradient_every and last[0] == x_in.shape:
            # Gradient reuse (beyond the paper): this step costs a plain one; the last gradient, rescaled to
            # this step's weight and ramp, is applied with this step's lambda.
            out = self._measure(executor, model, conds, x_in, timestep, model_options, step, motion, window)
            return self._apply(out, last[1] * (scale / last[2]), sigma, sigma_next, window, step)
        keep_graph = self._check_memory(model, conds[0], x_in, timestep, model_options, motion)
        region = self.regions.get(window)
        uncond_out = None
        if len(conds) > 1 and conds[1] is not None:
            with torch.no_grad():
                uncond_out = executor(model, [None, conds[1]], x_in, timestep, model_options)[1]
        normal_tensors_for_grad(model.diffusion_model, x_in.device)
        with torch.inference_mode(False), torch.enable_grad():
            x = x_in.detach().clone().requires_grad_(True)
            holder: dict[str, torch.Tensor] = {}

            def on_layer(name: str, probs: torch.Tensor) -> None:
                if not state.complete:
                    return
                loss = self._loss(state.probs, motion, region)
                self._record_loss(step, float(loss.detach()), window)
                still = self.settings.keep_still_weight > 0 and region is not None
                (grad_x,) = torch.autograd.grad(loss * scale, x, retain_graph=still)
                if region is not None:
                    # The motion's correction stays in the target region; keep-still acts outside it.
                    inside = region.latent.to(grad_x)
                    grad_x = grad_x * inside.repeat(grad_x.shape[0] // inside.shape[0], 1, 1, 1)
                if still:
                    ramp = scale / self.settings.weight
                    weight = self.settings.keep_still_weight * ramp
                    grad_x = grad_x + torch.autograd.grad(self._keep_still(state.probs, motion, region) * weight,
                                                          x)[0]
                _require_finite(grad_x, f"the motion loss gradient at guided step {step}", loss, scale)
                # dL/dz_t: the model sees z_t = x / sqrt(1 + sigma^2)
                holder["grad"] = grad_x * math.sqrt(1.0 + sigma * sigma)
                state.probs.clear()
                torch.set_grad_enabled(False)  # the rest of this forward: prediction only

            state = CaptureState(motion.layers, on_layer=on_layer)
            options = dict(model_options)
            transformer_options = model_options.get("transformer_options", {})
            options["transformer_options"] = {
                **transformer_options, CAPTURE_KEY: state,
                "optimized_attention_override": lean_attention_while_grad(
                    transformer_options.get("optimized_attention_override")),
            }
            with graph_kept(keep_graph):
                cond_out = executor(model, [controls_without_grad(conds[0]), None], x, timestep, options)[0].detach()
        if "grad" not in holder:
            raise RuntimeError(f"MOTION layers {motion.layers} were not all seen in the model's forward")
        grad = holder["grad"].detach()
        if self.settings.gradient_every > 1:
            self._reused[window] = (x_in.shape, grad, scale)
        out = [cond_out, uncond_out if uncond_out is not None else torch.zeros_like(cond_out)]
        return self._apply(out, grad, sigma, sigma_next, window, step)

    def _apply(self, out: list, grad: torch.Tensor, sigma: float, sigma_next: float, window, step: int) -> list:
        """Hand the step's gradient to the update. Outside context windows the post-CFG function applies it to
        the CFG-combined prediction. Inside a window it is applied here to both branches' predictions of the
        window, D - lambda * g: CFG's affine combination keeps it (uncond + s * (cond - uncond) moves by the
        same -lambda * g), and core's handler fuses the windows' predictions, corrections included."""
        if window is None:
            self._grads[sigma] = grad
            return out
        lam = denoised_correction_scale(sigma, sigma_next)
        guided = [o - lam * grad.to(o) if o is not None else o for o in out]
        for o in guided:
            if o is not None:
                _require_finite(o, f"the guided prediction at guided step {step}", None, self.settings.weight)
        return guided

    def _motion_for(self, window: tuple[int, ...] | None) -> SparseMotion:
        """The sparse motion to guide this forward with: the MOTION, or its window's part under context windows."""
        if isinstance(self.motion, WindowedMotion):
            if window is None:
                raise MotionMismatchError(
                    f"this MOTION holds {self.motion.describe()}, but the sampler runs all frames at once: apply "
                    "the same Context Windows node to the sampler's MODEL as to the extraction's"
                )
            return self.motion.for_frames(window)
        if window is not None:
            raise MotionMismatchError(
                f"the sampler runs context windows (frames {window[0]}..{window[-1]}), but this MOTION was "
                "extracted without them: extract it from the MODEL with the same Context Windows settings"
            )
        return self.motion

    def _record_loss(self, step: int, loss: float, window: tuple[int, ...] | None) -> None:
        self.losses.append((step, loss))
        if window is not None:
            self.window_losses.setdefault(window, []).append((step, loss))

    def _check_memory(self, model, cond: list[dict], x_in: torch.Tensor, timestep: torch.Tensor,
                      model_options: dict, motion: SparseMotion) -> bool:
        """Before the first guided step of a size: whether its graph is kept whole (memory_mode), and a clear
        refusal, with what to lower, of a step that would not fit (memory_estimate.py: the peak of its forward
        and backward measured on two small crops, extrapolated)."""
        import comfy.model_management

        key = (tuple(x_in.shape), str(x_in.device))
        if key in self.keeps_graph:
            return self.keeps_graph[key]
        mode = self.settings.memory_mode if self.settings.checkpointing else "fast"
        self.memory_estimates[key] = 0.0
        self.keeps_graph[key] = mode == "fast"
        height, width = x_in.shape[-2:]
        sizes = calibration_sizes(height, width)
        if sizes is None:  # too small to need an estimate; "auto" recomputes, as at every calibrated size it may
            return self.keeps_graph[key]
        normal_tensors_for_grad(model.diffusion_model, x_in.device)
        context = _crossattn_of(cond, model, x_in)
        options = {**model_options.get("transformer_options", {}), "cond_or_uncond": [0]}

        def need(keep: bool) -> float:
            with graph_kept(keep):
                points = [(h * w, self.graph_peak(model, context, x_in[..., :h, :w], timestep, options))
                          for h, w in sizes]
            return LinearBytes.through(*points).at(height, width) * MEMORY_MARGIN

        free = comfy.model_management.get_free_memory(x_in.device)
        needs = self.estimates_by_choice[key] = {}
        if mode == "auto":  # the kept graph first: when it fits, the checkpointed one need not be measured
            needs[True] = need(True)
            keep = needs[True] <= AUTO_FAST_SHARE * free
            if not keep:
                needs[False] = need(False)
        else:
            keep = mode == "fast"
            needs[keep] = need(keep)
        self.keeps_graph[key] = keep
        required = self.memory_estimates[key] = needs[keep]
        logging.info("MotionClone: a guided step of %d frames at %dx%d latent needs about %s with %s (%s; free: %s)",
                     x_in.shape[0], height, width, gib(required), "its graph kept" if keep else "checkpointing",
                     f"memory_mode {mode}" + (f", kept would need {gib(needs[True])}" if mode == "auto" and not keep
                                               else ""), gib(free))
        if required > free:
            lean = " or set memory_mode to lean or auto (recompute instead of keeping the graph)," if keep else ""
            raise GuidanceMemoryError(
                f"MotionClone: a guided step of {x_in.shape[0]} frames at {width * 8}x{height * 8} px would need "
                f"about {gib(required)} for its gradient (the graph up to {motion.layers[-1].split('.motion')[0]}), "
                f"but {gib(free)} are free on {x_in.device}. Lower the width/height or the frame count,{lean} guide "
                "an earlier layer set (fewer blocks in the graph), or free memory (other models, other programs)."
            )
        return keep

    def graph_peak(self, model, context: torch.Tensor, x: torch.Tensor, timestep: torch.Tensor,
                   transformer_options: dict) -> int:
        """Peak memory of a guided step's gradient on `x`: the graph-recording forward up to the last guided
        layer and its backward, with a stand-in loss on the same attention maps (memory_estimate.peak_bytes)."""

        def forward_and_backward() -> None:
            with torch.inference_mode(False), torch.enable_grad():
                leaf = x.detach().clone().requires_grad_(True)
                text = context.clone()  # made in ComfyUI's inference_mode: a normal copy autograd may keep

                def on_layer(name: str, probs: torch.Tensor) -> None:
                    if state.complete:
                        torch.autograd.grad(sum(p.square().sum() for p in state.probs.values()), leaf)
                        state.probs.clear()
                        raise StopForward  # the rest of the UNet runs without grad in a guided step

                state = CaptureState(self.motion.layers, on_layer=on_layer)
                options = {**transformer_options, CAPTURE_KEY: state, "optimized_attention_override":
                           lean_attention_while_grad(transformer_options.get("optimized_attention_override"))}
                try:
                    model.apply_model(leaf, timestep, c_crossattn=text, transformer_options=options)
                except StopForward:
                    pass

        return peak_bytes(forward_and_backward, x.device)

    def _measure(self, executor, model, conds, x_in, timestep, model_options, step: int, motion: SparseMotion,
                 window: tuple[int, ...] | None):
        """Weight 0, or a step that reuses the last gradient: the forward runs exactly as without guidance; the
        motion loss is only measured."""
        state = CaptureState(motion.layers, measure_only=True)
        options = dict(model_options)
        options["transformer_options"] = {**model_options.get("transformer_options", {}), CAPTURE_KEY: state}
        out = executor(model, conds, x_in, timestep, options)
        if state.complete:
            with torch.no_grad():
                self._record_loss(step, float(self._loss(state.conditional_probs(), motion, self.regions.get(window))),
                                  window)
        return out

    def loss_curve(self) -> list[tuple[int, float]]:
        """(guided step, motion loss before its update) of the last run; a step evaluated twice (second-order
        samplers) counts with its first evaluation, at the step's own sigma. Under context windows, the mean
        over the windows (each window's curve: `window_curves`)."""
        if self.window_losses:
            curves = self.window_curves().values()
            steps = sorted({s for curve in curves for s, _ in curve})
            return [(s, sum(v for c in curves for t, v in c if t == s) / sum(1 for c in curves for t, _ in c if t == s))
                    for s in steps]
        return _first_per_step(self.losses)

    def window_curves(self) -> dict[tuple[int, ...], list[tuple[int, float]]]:
        """Each context window's (guided step, motion loss) of the last run."""
        return {window: _first_per_step(losses) for window, losses in self.window_losses.items()}

    def _loss(self, probs: dict[str, torch.Tensor], motion: SparseMotion, region: RegionGuide | None) -> torch.Tensor:
        def loss(chunk: dict[str, torch.Tensor]) -> torch.Tensor:
            return motion_loss(chunk, motion) if region is None else masked_motion_loss(chunk, motion, region)

        return self._per_chunk(probs, motion, loss)

    def _keep_still(self, probs: dict[str, torch.Tensor], motion: SparseMotion, region: RegionGuide) -> torch.Tensor:
        return self._per_chunk(probs, motion, lambda chunk: keep_still_loss(chunk, region))

    @staticmethod
    def _per_chunk(probs: dict[str, torch.Tensor], motion: SparseMotion, loss) -> torch.Tensor:
        # Several positive conds in one forward stack their chunks along positions.
        first = motion.layers[0]
        chunks = probs[first].shape[0] // motion.values[first].shape[0]
        per_chunk = [loss({k: v.reshape(chunks, -1, *v.shape[1:])[c] for k, v in probs.items()}) for c in range(chunks)]
        return torch.stack(per_chunk).mean()

    def _post_cfg(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        sigma = float(args["sigma"].flatten()[0])
        grad = self._grads.pop(sigma, None)
        if grad is None:
            return denoised
        model_options = args["model_options"]
        info = self._step_info(sigma, model_options, args["model"].model_sampling)
        if info is None:
            return denoised
        lam = denoised_correction_scale(sigma, info[2])
        guided = denoised - lam * grad.to(denoised)
        _require_finite(guided, f"the guided prediction at guided step {info[0]}", None, self.settings.weight)
        return guided

    @staticmethod
    def _apply_model(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if torch.is_grad_enabled():  # only the guided conditional forward records a graph
            control = skip_residuals_as_patch(control, transformer_options)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _run(self, executor, *args, **kwargs):
        self._grads.clear()
        self.losses.clear()
        self.memory_estimates.clear()
        self.keeps_graph.clear()
        self.estimates_by_choice.clear()
        self._reused.clear()
        self.window_losses.clear()
        out = executor(*args, **kwargs)
        if not self.losses:
            logging.warning("MotionClone: no step of this run was guided: r = %g guides timesteps at or above %g and "
                            "guided_steps is %d (a run with denoise < 1 starts below the band). Set guided_steps to "
                            "guide its first steps.", self.settings.noisy_fraction,
                            (1.0 - self.settings.noisy_fraction) * 1000.0, self.settings.guided_steps)
        kind = "guided" if self.settings.weight else "measured on the unguided run"
        logging.info("MotionClone: motion loss per guided step (%s, weight %g), step:loss %s", kind,
                     self.settings.weight, format_curve(self.loss_curve()))
        for window, curve in self.window_curves().items():
            logging.info("MotionClone: context window frames %d..%d, step:loss %s", window[0], window[-1],
                         format_curve(curve))
        return out

    def patch(self, model):
        """A clone of `model` that applies this guidance when sampled."""
        import comfy.patcher_extension as pe

        attention_layers_of(model)  # clear error if there are no motion modules
        patched = model.clone()
        patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, self._run)
        patched.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, self._calc_cond_batch)
        patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, self._apply_model)
        patched.set_model_sampler_post_cfg_function(self._post_cfg)
        if self.settings.checkpointing and self.settings.weight != 0:
            for path, block in self._checkpointed_blocks(patched).items():
                patched.add_object_patch(f"diffusion_model.{path}", block)
        return patched

    def _checkpointed_blocks(self, model) -> dict:
        """The UNet blocks from the first to the one holding the last guided layer, with their layers
        checkpointed (checkpointing.py); the guided motion modules stay as they are."""
        from comfy.ldm.modules.attention import SpatialTransformer
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        unet = model.get_model_object("diffusion_model")
        slots = {slot.diffusers_name: slot.block_path for slot in motion_slots(unet)}
        guided_modules = {name.split(".transformer_blocks.")[0] for name in self.motion.layers}
        order = [f"input_blocks.{i}" for i in range(len(unet.input_blocks))] + ["middle_block"]
        order += [f"output_blocks.{i}" for i in range(len(unet.output_blocks))]
        last = max(order.index(slots[name]) for name in guided_modules if name in slots)

        def how(layer):
            if isinstance(layer, MotionModuleLayer):
                return guided_motion_module if layer.name in guided_modules else checkpointed_motion_module
            if isinstance(layer, ResBlock | SpatialTransformer):  # one batch item per frame
                return partial(checkpointed, sliced=True)
            return None

        return checkpointed_blocks(lambda path: model.get_model_object(f"diffusion_model.{path}"),
                                   order[: last + 1], how)
