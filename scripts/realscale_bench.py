"""Real-scale benchmark pieces (run through `scripts/benchmark.py realscale` and `reuse`).

Each measurement runs in a fresh process (`worker`), so one mode's memory never counts against
another's: a full-size SD1.5 UNet (ComfyUI's config, random weights) with an AnimateDiff v3 motion
module in the original key format (motion_core/full_size_models.py), float32 on the CPU. Both plain
and guided steps use the same attention backend, torch's SDPA (what ComfyUI uses on a GPU; the
guided step's graph-recording forward uses it whatever the backend). Peak memory is the peak of the
allocations torch makes during the step above what was allocated before it (memory_estimate.peak_bytes:
the profiler's allocation timeline on a CPU), not RSS.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

FRAMES = 16


def _model(threads: int):
    import torch

    torch.set_num_threads(threads)
    import comfy.ldm.modules.attention as attention
    import comfy.model_management

    # One backend for every forward of every mode (plain steps would otherwise use the CPU default).
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    from motionclone.motion_core.full_size_models import build_sd15_model, write_v3_motion_module
    from motionclone.motion_core.injection import apply_motion_modules, install_processors
    from motionclone.motion_core.motion_module import load_motion_adapter

    with tempfile.TemporaryDirectory() as tmp:
        adapter, info = load_motion_adapter(write_v3_motion_module(Path(tmp) / "v3_sd15_mm.safetensors", seed=2))
    model = apply_motion_modules(build_sd15_model(0), adapter, info, install_processors(adapter))
    comfy.model_management.load_models_gpu([model])
    return model


def _inputs(size: int, frames: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, 77, 768, generator=gen)
    latents = torch.randn(frames, 4, size // 8, size // 8, generator=gen)
    return context, latents


def worker(mode: str, size: int, frames: int, threads: int, chunks: int = 0) -> dict[str, Any]:
    """One plain or guided sampling step at `size` px (the first step of a 300-step object-motion schedule);
    `chunks` > 0 replaces the number of batch slices of checkpointed layers (checkpointing.CHUNKS)."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import torch

    from motionclone.motion_core import checkpointing
    from motionclone.motion_core.guided_sampling import GuidanceMemoryError

    if chunks:
        checkpointing.CHUNKS = chunks

    from motionclone.motion_core.extraction import extract_sparse_motion
    from motionclone.motion_core.guided_sampling import (
        GuidanceSettings,
        MotionGuidance,
        attention_layers_of,
        select_layers,
    )
    from motionclone.motion_core.memory_estimate import peak_bytes

    model = _model(threads)
    context, latents = _inputs(size, frames)
    layers = select_layers(attention_layers_of(model), "up_blocks.1")
    t0 = time.perf_counter()
    motion = extract_sparse_motion(model, latents, context, layers, seed=0)
    extract_s = time.perf_counter() - t0
    sampling = model.get_model_object("model_sampling")
    sigmas = sampling.sigma(torch.tensor([999.0, 996.0]))  # one step, as the uneven schedule's first
    positive, negative = [[context, {}]], [[torch.zeros(1, 77, 768), {}]]
    noise = comfy.sample.prepare_noise(latents, 0)
    out: dict[str, Any] = {"mode": mode, "size": size, "frames": frames, "extract_s": extract_s}
    patched = model
    if mode != "plain":
        memory_mode = {"guided": "lean", "guided_kept": "fast", "guided_auto": "auto"}[mode]
        guidance = MotionGuidance(motion, GuidanceSettings(2000.0, guided_steps=1, warmup=0, cooldown=0,
                                                           memory_mode=memory_mode))
        # The estimate a user's run makes before its first guided step (it profiles on a CPU itself, so it
        # runs here, outside the step's own profile), then the step without it.
        estimates = []

        def estimate_only(model_, cond, x_in, timestep, model_options, motion_, check=guidance._check_memory):
            t = time.perf_counter()
            try:
                keep = check(model_, cond, x_in, timestep, model_options, motion_)
            except GuidanceMemoryError as e:
                keep = str(e)
            (key,) = guidance.memory_estimates
            estimates.append((guidance.memory_estimates[key], time.perf_counter() - t, keep,
                              guidance.estimates_by_choice.get(key, {}).get(True)))
            raise _Stop

        guidance._check_memory = estimate_only
        try:
            with torch.inference_mode():
                comfy.sample.sample_custom(guidance.patch(model), noise, 8.5, comfy.samplers.ksampler("euler"),
                                           sigmas, positive, negative, torch.zeros_like(latents), seed=0,
                                           disable_pbar=True)
        except _Stop:
            pass
        out["estimate_bytes"], out["estimate_s"], keep, out["kept_estimate_bytes"] = estimates[0]
        out["free_bytes"] = comfy.model_management.get_free_memory(torch.device("cpu"))
        if isinstance(keep, str) or (mode == "guided_auto" and not keep):
            # Refused (it would not fit), or auto chose to recompute: the same step as "guided", not run again.
            out["skipped"] = keep if isinstance(keep, str) else "auto chose checkpointing"
            return out
        out["keeps_graph"] = keep
        guidance._check_memory = lambda *args: keep
        patched = guidance.patch(model)

    def step() -> None:
        with torch.inference_mode():
            comfy.sample.sample_custom(patched, noise, 8.5, comfy.samplers.ksampler("euler"), sigmas, positive,
                                       negative, torch.zeros_like(latents), seed=0, disable_pbar=True)

    t0 = time.perf_counter()
    out["peak_bytes"] = peak_bytes(step, torch.device("cpu"))
    out["step_s"] = time.perf_counter() - t0
    return out


class _Stop(Exception):
    pass


def breakdown(size: int, frames: int, threads: int) -> dict[str, Any]:
    """What the graph-recording forward keeps for backward without checkpointing, by UNet layer kind and
    resolution: the saved tensors of each module attributed to the outermost UNet layer it runs in."""
    import torch
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    from motionclone.motion_core.attention_capture import CaptureState, StopForward
    from motionclone.motion_core.guided_sampling import attention_layers_of, lean_attention_while_grad, select_layers
    from motionclone.motion_core.injection import CAPTURE_KEY, MotionModuleLayer

    model = _model(threads)
    context, latents = _inputs(size, frames)
    unet = model.model.diffusion_model
    layers = select_layers(attention_layers_of(model), "up_blocks.1")
    weights = {t.untyped_storage().data_ptr() for t in [*unet.parameters(), *unet.buffers()]}
    current: list[str] = []
    by_kind: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    kinds = ((MotionModuleLayer, "motion module"), (SpatialTransformer, "spatial transformer"), (ResBlock, "ResBlock"))

    def pre(module, args):
        for cls, name in kinds:
            if isinstance(module, cls) and not any(current):  # the outermost UNet layer names the memory
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                current.append(f"{name} at {x.shape[-1]}x{x.shape[-2]} latent" if x is not None and x.ndim == 4
                               else name)
                return
        current.append("")

    def post(module, args, output):
        current.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key and key not in weights and key not in seen:
            seen.add(key)
            label = next((c for c in current if c), "other (norms, convs between layers, embeddings)")
            by_kind[label] += t.untyped_storage().nbytes()
        return t

    handles = [m.register_forward_pre_hook(pre) for m in unet.modules()]
    handles += [m.register_forward_hook(post) for m in unet.modules()]
    options = {**model.model_options["transformer_options"], "cond_or_uncond": [0],
               CAPTURE_KEY: CaptureState(layers, stop_after_last=True),
               "optimized_attention_override": lean_attention_while_grad(None)}
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = latents.clone().requires_grad_(True)
            try:
                model.model.apply_model(x, torch.full((frames,), 14.6), c_crossattn=context.expand(frames, -1, -1),
                                        transformer_options=options)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return {"size": size, "frames": frames, "by_kind": dict(by_kind), "total": sum(by_kind.values())}


def breakdown_guided(size: int, frames: int, threads: int) -> dict[str, Any]:
    """Where a checkpointed guided step's gradient memory goes: the inputs each checkpointed layer keeps for its
    recompute (by layer kind and latent side), the tensors autograd saves outside any checkpoint (the guided
    motion modules, which hand their attention maps to the loss, and the small layers left as they are), and
    the peak of the forward and backward (memory_estimate.peak_bytes); peak minus kept is the backward's
    transient (one slice's recompute and its gradients)."""
    import torch

    from motionclone.motion_core import checkpointing
    from motionclone.motion_core.extraction import extract_sparse_motion
    from motionclone.motion_core.guided_sampling import (
        GuidanceSettings,
        MotionGuidance,
        attention_layers_of,
        select_layers,
    )
    from motionclone.motion_core.injection import MotionModuleLayer

    model = _model(threads)
    context, latents = _inputs(size, frames)
    layers = select_layers(attention_layers_of(model), "up_blocks.1")
    motion = extract_sparse_motion(model, latents, context, layers, seed=0)
    guidance = MotionGuidance(motion, GuidanceSettings(2000.0, guided_steps=1, warmup=0, cooldown=0,
                                                       memory_mode="lean"))
    patched = guidance.patch(model)
    import comfy.model_management

    comfy.model_management.load_models_gpu([patched])
    unet = patched.model.diffusion_model
    weights = {t.untyped_storage().data_ptr() for t in [*unet.parameters(), *unet.buffers()]}
    kept: dict[str, int] = defaultdict(int)
    seen: set[int] = set()

    def in_backward() -> bool:  # what the backward's recomputes save is transient, not kept
        return torch._C._current_graph_task_id() != -1

    def tally(label: str, tensors) -> None:
        if in_backward():
            return
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.requires_grad or isinstance(t, torch.Tensor) and t.grad_fn:
                key = t.untyped_storage().data_ptr()
                if key and key not in weights and key not in seen:
                    seen.add(key)
                    kept[label] += t.untyped_storage().nbytes()

    original = checkpointing._checkpoint

    def recording(fn, *args, **kwargs):
        owner = type(getattr(fn, "__self__", None)).__name__.replace("SliceCheckpointed", "").replace(
            "Checkpointed", "")
        x = args[0] if args else None
        side = f" at {x.shape[-1]}x{x.shape[-2]}" if isinstance(x, torch.Tensor) and x.ndim == 4 else ""
        tally(f"checkpoint inputs: {owner}{side}", [*args, *kwargs.values()])
        return original(fn, *args, **kwargs)

    current: list[str] = []

    guided = {name.split(".transformer_blocks.")[0] for name in motion.layers}

    def pre(module, args):
        current.append("guided motion modules" if module.name in guided else "")

    def post(module, args, output):
        current.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key and key not in weights and key not in seen and not in_backward():
            seen.add(key)
            label = ("guided motion modules" if "guided motion modules" in current
                     else "other (inputs of the motion modules checkpointed whole; small layers left as they are)")
            kept[f"saved outside checkpoints: {label}"] += t.untyped_storage().nbytes()
        return t

    handles = [m.register_forward_pre_hook(pre) for m in unet.modules() if isinstance(m, MotionModuleLayer)]
    handles += [m.register_forward_hook(post) for m in unet.modules() if isinstance(m, MotionModuleLayer)]
    sampling = patched.get_model_object("model_sampling")
    timestep = sampling.sigma(torch.tensor([999.0])).expand(frames)
    x = latents * float(timestep[0])
    options = {**patched.model_options["transformer_options"], "cond_or_uncond": [0]}
    checkpointing._checkpoint = recording
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            peak = guidance.graph_peak(patched.model, context.expand(frames, -1, -1), x, timestep, options)
    finally:
        checkpointing._checkpoint = original
        for h in handles:
            h.remove()
    return {"size": size, "frames": frames, "kept": dict(kept), "peak": peak}
