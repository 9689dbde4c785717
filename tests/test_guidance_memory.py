"""Memory of a guided step: lean attention in the graph-recording forward whatever the host's attention,
an estimate of what the step will hold (measured on two crops, extrapolated), and a clear refusal
when it would not fit, before any large allocation. ComfyUI's CPU default is sub-quadratic attention,
whose score chunks a backward keeps: the default 512x512x16 graph needed more than 22 GB with it."""

from __future__ import annotations

import logging

import pytest
import torch

from motionclone.motion_core.attention_capture import CaptureState, StopForward
from motionclone.motion_core.checkpointing import graph_kept
from motionclone.motion_core.extraction import extract_sparse_motion
from motionclone.motion_core.guided_sampling import (
    GuidanceMemoryError,
    GuidanceSettings,
    MotionGuidance,
    attention_layers_of,
    lean_attention_while_grad,
    select_layers,
)
from motionclone.motion_core.injection import CAPTURE_KEY, apply_motion_modules, install_processors
from motionclone.motion_core.memory_estimate import MARGIN, saved_bytes
from motionclone.motion_core.motion_module import load_motion_adapter
from motionclone.motion_core.tiny_models import build_tiny_sd15_model, write_tiny_motion_module

FRAMES = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_motion_module(tmp_path_factory.mktemp("mm") / "mm.safetensors", seed=2, std=0.2)
    adapter, info = load_motion_adapter(path)
    return apply_motion_modules(build_tiny_sd15_model(seed=0), adapter, info, install_processors(adapter))


def _motion(model, size: int):
    layers = select_layers(attention_layers_of(model), "up_blocks.1")
    return extract_sparse_motion(model, torch.randn(FRAMES, 4, size, size), torch.zeros(1, 7, 32), layers)


def _sample(model, motion, size: int, weight: float = 2000.0, memory_mode: str = "auto"):
    import comfy.sample

    latent = torch.zeros(FRAMES, 4, size, size)
    guidance = MotionGuidance(motion, GuidanceSettings(weight, guided_steps=1, warmup=0, cooldown=0,
                                                       memory_mode=memory_mode))
    with torch.inference_mode():
        comfy.sample.sample(guidance.patch(model), comfy.sample.prepare_noise(latent, 0), 2, 8.5, "ddim",
                            "ddim_uniform", [[torch.randn(1, 7, 32), {}]], [[torch.zeros(1, 7, 32), {}]], latent,
                            seed=0, disable_pbar=True)
    return guidance


def _graph_bytes(model, motion, size: int, lean: bool) -> int:
    """What the graph-recording forward saves at `size` (stopped after the last guided layer)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    unet = model.model.diffusion_model

    def forward():
        options = {**model.model_options["transformer_options"], "cond_or_uncond": [0],
                   CAPTURE_KEY: CaptureState(motion.layers, stop_after_last=True)}
        if lean:
            options["optimized_attention_override"] = lean_attention_while_grad(None)
        with torch.enable_grad():
            x = torch.randn(FRAMES, 4, size, size, requires_grad=True)
            try:
                model.model.apply_model(x, torch.full((FRAMES,), 5.0), c_crossattn=torch.zeros(FRAMES, 7, 32),
                                        transformer_options=options)
            except StopForward:
                pass

    return saved_bytes(forward, exclude=[*unet.parameters(), *unet.buffers()])


def test_the_graph_recording_forward_uses_lean_attention_whatever_the_host_default(model, monkeypatch):
    import comfy.ldm.modules.attention as attention

    assert attention.optimized_attention.__name__ != "attention_pytorch"  # the CPU default: sub-quadratic
    calls = {"grad": 0, "lean_grad": 0, "no_grad": 0}
    default, lean = attention.optimized_attention, attention.attention_pytorch

    def spy_default(*args, **kwargs):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return default(*args, **kwargs)

    def spy_lean(*args, **kwargs):
        calls["lean_grad"] += torch.is_grad_enabled()
        return lean(*args, **kwargs)

    motion = _motion(model, 16)
    monkeypatch.setattr(attention, "optimized_attention", spy_default)
    monkeypatch.setattr(attention, "attention_pytorch", spy_lean)
    _sample(model, motion, 16)
    assert calls["grad"] > 0 and calls["lean_grad"] == calls["grad"], calls  # every graph-recording call is lean
    assert calls["no_grad"] > 0  # the other forwards keep the host's choice


def test_the_lean_graph_grows_with_the_area_and_the_default_one_faster(model):
    motion = _motion(model, 16)
    lean = {s: _graph_bytes(model, motion, s, lean=True) for s in (16, 32)}
    default = {s: _graph_bytes(model, motion, s, lean=False) for s in (16, 32)}
    print(f"graph of {FRAMES} frames, 16 -> 32 latent: lean {lean[16] / 2**20:.0f} -> {lean[32] / 2**20:.0f} MB, "
          f"host default {default[16] / 2**20:.0f} -> {default[32] / 2**20:.0f} MB")
    assert lean[32] / lean[16] < 4.2  # four times the area: linear
    assert default[32] / default[16] > 6  # the score chunks grow with the square of the area
    assert lean[32] < default[32] / 2


@pytest.mark.single_host
def test_the_estimate_is_the_peak_of_the_steps_gradient(model, caplog, monkeypatch):
    """Measured on two crops (8 and 16 latent pixels) and extrapolated; the same measurement at the real
    size, taken inside the same run, agrees."""
    motion = _motion(model, 40)
    full = {}
    check = MotionGuidance._check_memory

    def check_and_measure_full_size(self, model_, cond, x_in, timestep, model_options, motion_):
        keep = check(self, model_, cond, x_in, timestep, model_options, motion_)
        options = {**model_options.get("transformer_options", {}), "cond_or_uncond": [0]}
        context = torch.zeros(x_in.shape[0], 7, 32)
        with graph_kept(keep):
            full["peak"] = self.graph_peak(model_, context, x_in, timestep, options)
        return keep

    monkeypatch.setattr(MotionGuidance, "_check_memory", check_and_measure_full_size)
    with caplog.at_level(logging.INFO):
        guidance = _sample(model, motion, 40, memory_mode="lean")
    assert any("a guided step of 8 frames at 40x40 latent needs about" in r.getMessage() for r in caplog.records)
    (estimate,) = guidance.memory_estimates.values()
    print(f"estimate {estimate / 2**20:.1f} MB = {MARGIN} x the extrapolated peak; "
          f"measured {full['peak'] / 2**20:.1f} MB")
    assert estimate / MARGIN == pytest.approx(full["peak"], rel=0.05)


@pytest.mark.single_host
def test_checkpointing_lowers_the_peak_and_changes_nothing(model):
    """memory_mode lean (checkpointed layers recompute in backward) against fast (the same object patches, the
    graph kept) and against no checkpointing patches at all."""
    import comfy.sample

    motion = _motion(model, 32)
    peaks, outs = {}, {}
    for name, settings in (("lean", {"memory_mode": "lean"}), ("fast", {"memory_mode": "fast"}),
                           ("unpatched", {"checkpointing": False})):
        guidance = MotionGuidance(motion, GuidanceSettings(2000.0, guided_steps=1, warmup=0, cooldown=0, **settings))
        peak = {}
        check = guidance._check_memory

        def measure(model_, cond, x_in, timestep, model_options, motion_, guidance=guidance, peak=peak, check=check):
            keep = check(model_, cond, x_in, timestep, model_options, motion_)
            options = {**model_options.get("transformer_options", {}), "cond_or_uncond": [0]}
            with graph_kept(keep):
                peak["bytes"] = guidance.graph_peak(model_, torch.zeros(x_in.shape[0], 7, 32), x_in, timestep,
                                                    options)
            return keep

        guidance._check_memory = measure
        latent = torch.zeros(FRAMES, 4, 32, 32)
        with torch.inference_mode():
            outs[name] = comfy.sample.sample(guidance.patch(model), comfy.sample.prepare_noise(latent, 0), 2, 8.5,
                                             "ddim", "ddim_uniform", [[torch.randn(1, 7, 32, generator=torch.Generator()
                                                                                   .manual_seed(3)), {}]],
                                             [[torch.zeros(1, 7, 32), {}]], latent, seed=0, disable_pbar=True)
        peaks[name] = peak["bytes"]
        assert guidance.keeps_graph == {((FRAMES, 4, 32, 32), "cpu"): name != "lean"}
    print(f"peak of a guided step's gradient, 8 frames at 32x32 latent: {peaks['unpatched'] / 2**20:.0f} MB kept "
          f"without patches, {peaks['fast'] / 2**20:.0f} MB kept through the patches (fast), "
          f"{peaks['lean'] / 2**20:.0f} MB checkpointed (lean)")
    diff = (outs["lean"] - outs["unpatched"]).abs().max().item()
    print(f"largest difference of the samples {diff:.2e} (of {outs['unpatched'].abs().max().item():.2f})")
    assert peaks["lean"] < 0.6 * peaks["unpatched"]
    assert peaks["fast"] == pytest.approx(peaks["unpatched"], rel=0.02)  # the patched layers run as the originals
    assert torch.equal(outs["fast"], outs["unpatched"])
    # The recompute runs the same operations; only batch slices of different sizes may round differently.
    torch.testing.assert_close(outs["lean"], outs["unpatched"], rtol=1e-5, atol=1e-4)


def test_auto_keeps_the_graph_only_where_it_fits_comfortably(model, monkeypatch, caplog):
    """memory_mode auto: both estimates are measured; the kept graph when it needs at most 3/4 of the free
    memory, else checkpointing when that fits, else a refusal that names the lean need."""
    import comfy.model_management

    from motionclone.motion_core.guided_sampling import AUTO_FAST_SHARE

    motion = _motion(model, 24)
    key = ((FRAMES, 4, 24, 24), "cpu")
    with caplog.at_level(logging.INFO):
        roomy = _sample(model, motion, 24)
    assert roomy.keeps_graph[key] and set(roomy.estimates_by_choice[key]) == {True}  # lean not measured
    assert roomy.memory_estimates[key] == roomy.estimates_by_choice[key][True]
    assert any("with its graph kept (memory_mode auto" in r.getMessage() for r in caplog.records)
    needs = {True: roomy.estimates_by_choice[key][True],
             False: _sample(model, motion, 24, memory_mode="lean").memory_estimates[key]}
    assert needs[True] > 1.5 * needs[False]

    def free(amount):
        def free_memory(dev=None, torch_free_too: bool = False):
            return (amount, amount) if torch_free_too else amount
        return free_memory

    # Kept would fit in the free memory, but not in 3/4 of it: auto recomputes.
    monkeypatch.setattr(comfy.model_management, "get_free_memory", free(needs[True] / AUTO_FAST_SHARE * 0.99))
    tight = _sample(model, motion, 24)
    assert not tight.keeps_graph[key] and set(tight.estimates_by_choice[key]) == {True, False}
    assert tight.memory_estimates[key] == pytest.approx(needs[False], rel=0.05)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", free(needs[False] * 0.5))
    with pytest.raises(GuidanceMemoryError, match="Lower the width/height or the frame count, guide"):
        _sample(model, motion, 24)
    with pytest.raises(GuidanceMemoryError, match="or set memory_mode to lean or auto"):
        _sample(model, motion, 24, memory_mode="fast")
    with pytest.raises(ValueError, match="memory_mode must be one of"):
        GuidanceSettings(memory_mode="small")


def test_a_step_that_would_not_fit_is_refused_before_it_allocates(model, monkeypatch):
    import comfy.model_management

    motion = _motion(model, 24)
    forwards = []
    handle = model.model.diffusion_model.out.register_forward_hook(lambda *a: forwards.append(1))  # full forwards
    def free_memory(dev=None, torch_free_too: bool = False):
        return (2**20, 2**20) if torch_free_too else 2**20

    monkeypatch.setattr(comfy.model_management, "get_free_memory", free_memory)
    try:
        with pytest.raises(GuidanceMemoryError, match=r"a guided step of 8 frames at 192x192 px would need about "
                                                      r"[\d.]+ GB .* but 0.00 GB are free on cpu\. Lower the "
                                                      r"width/height or the frame count"):
            _sample(model, motion, 24)
    finally:
        handle.remove()
    assert forwards == []  # refused before the step's first full forward
