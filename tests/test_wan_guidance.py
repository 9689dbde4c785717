"""Wan phase 2b: guided sampling of a native Wan model with a Wan MOTION (tiny random-weight Wan).

The guided prefix (Adam on the latent against the attention-motion-flow loss, then the CFG denoiser at
the optimised latent and an Euler step) runs inside a SAMPLER_SAMPLE wrapper; the user's sampler runs the
rest. Weight 0 is the core sampler bit for bit; with an optimisation too small to move a float32 latent
the split run equals the unsplit one to float rounding; guidance lowers the motion loss at every guided
step against the unguided run from the same seed (printed).
"""

from __future__ import annotations

import comfy.sample
import pytest
import torch

import nodes
from motionclone.motion_core.dit.wan_capture import differentiable_kernels
from motionclone.motion_core.dit.wan_guidance import (
    WanGuidanceSettings,
    WanMotionGuidance,
    guided_count,
    unshifted_time,
)
from motionclone.motion_core.dit.wan_tiny import build_tiny_wan_model
from motionclone.nodes.motion_nodes import ExtractSparseMotion, MotionCloneGuider, MotionGuidedSampler

LATENT = (1, 16, 3, 8, 12)


@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan_model(seed=0)


def _cond(seed: int) -> list:
    return [[torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(seed)), {}]]


@pytest.fixture(scope="module")
def motion(wan):
    reference = torch.randn(*LATENT, generator=torch.Generator().manual_seed(1))
    return ExtractSparseMotion.execute(wan, timestep=400, seed=5, top_k=1, layers="auto",
                                       latent={"samples": reference}, positive=_cond(2)).result[0]


def _sample(model, steps=6, callback=None, sampler="euler", scheduler="simple"):
    latent = torch.zeros(*LATENT)
    noise = comfy.sample.prepare_noise(latent, 7)
    return comfy.sample.sample(model, noise, steps, 5.0, sampler, scheduler, _cond(3), _cond(4), latent,
                               callback=callback, disable_pbar=True, seed=7)


def test_the_guided_band_is_a_sigma_band():
    # 'simple' at shift 8, 50 steps: t = 1 - i/50; r = 0.2 guides the first 10 steps (DiTFlow's 10 of 50).
    shift, steps = 8.0, 50
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    sigmas = shift * t / (1 + (shift - 1) * t)
    assert unshifted_time(float(sigmas[7]), shift) == pytest.approx(float(t[7]))
    assert guided_count(sigmas, WanGuidanceSettings(noisy_fraction=0.2), shift) == 10
    assert guided_count(sigmas, WanGuidanceSettings(noisy_fraction=0.4), shift) == 20
    assert guided_count(sigmas, WanGuidanceSettings(guided_steps=3), shift) == 3
    with pytest.raises(ValueError, match="step size"):
        WanGuidanceSettings(step_size=float("nan"))


def test_weight_zero_is_the_core_sampler_bit_for_bit(wan, motion):
    latent = {"samples": torch.zeros(*LATENT)}
    (core,) = nodes.common_ksampler(wan, 7, 4, 5.0, "euler", "simple", _cond(3), _cond(4), latent)
    out = MotionGuidedSampler.execute(wan, 7, 4, 5.0, "euler", "simple", _cond(3), _cond(4), latent, 1.0, motion,
                                      0.0, 2, 0.2, 0, 0)
    assert torch.equal(out.result[0]["samples"], core["samples"])
    # The loss is still measured along that unguided run, at each guided step's state; at the first step the
    # guided run starts from the same state, so it measures the same loss there (before its optimisation).
    measured = [(e["step"], e["loss"]) for e in out.ui["motion_loss"]]
    guided = MotionGuidedSampler.execute(wan, 7, 4, 5.0, "euler", "simple", _cond(3), _cond(4), latent, 1.0, motion,
                                         50000.0, 2, 0.2, 0, 0).ui["motion_loss"]
    assert [s for s, _ in measured] == [0, 1] == [e["step"] for e in guided]
    assert measured[0][1] == pytest.approx(guided[0]["loss"], rel=1e-5)
    assert guided[1]["loss"] < measured[1][1]


def _guider(model):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(_cond(3), _cond(4))
    guider.set_cfg(5.0)
    return guider


@pytest.mark.parametrize("sampler", ["euler", "uni_pc"])
def test_the_guided_prefix_hands_its_state_to_the_users_sampler(wan, motion, sampler):
    """A step far below float32 resolution leaves the latent as it is, so the guided run must equal: Euler over
    the first G steps, then the user's sampler, unchanged, over the rest from the state reached."""
    import comfy.samplers

    g = 2
    guidance = WanMotionGuidance(motion, WanGuidanceSettings(step_size=1e-30, guided_steps=g, iterations=1))
    sampling = wan.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 6)
    latent = torch.zeros(*LATENT)
    noise = comfy.sample.prepare_noise(latent, 7)
    with torch.inference_mode():  # as ComfyUI runs a prompt
        split = _guider(guidance.patch(wan)).sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas,
                                                    seed=7, disable_pbar=True)
        # By hand: core euler over sigmas[:G+1] (its output is the latent format's x_G / (1 - sigma_G)), then the
        # sampler over sigmas[G:] from noise x_G / sigma_G on an empty latent.
        base = wan.model
        prefix = _guider(wan).sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas[:g + 1], seed=7,
                                     disable_pbar=True)
        x_g = base.process_latent_in(prefix) * (1 - sigmas[g])
        by_hand = _guider(wan).sample(x_g / sigmas[g], latent, comfy.samplers.sampler_object(sampler), sigmas[g:],
                                      seed=7, disable_pbar=True)
        unsplit = _guider(wan).sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, seed=7,
                                      disable_pbar=True)
    assert len(guidance.loss_curve()) == g
    torch.testing.assert_close(split, by_hand, rtol=1e-4, atol=1e-4)
    if sampler == "euler":  # single-step: the split is invisible up to rounding
        torch.testing.assert_close(split, unsplit, rtol=1e-4, atol=1e-4)
    print(f"{sampler}: split vs unsplit run, largest difference {(split - unsplit).abs().max():.2e} "
          f"(of {unsplit.abs().max():.2f}; a multistep sampler restarts at first order at sigma_G)")


def test_guidance_lowers_the_motion_loss_at_every_guided_step(wan, motion):
    guided_steps = 3
    guidance = WanMotionGuidance(motion, WanGuidanceSettings(step_size=0.05, guided_steps=guided_steps))
    states: dict[str, list[torch.Tensor]] = {"guided": [], "unguided": []}
    _sample(guidance.patch(wan), callback=lambda i, x0, x, total: states["guided"].append(x.clone()))
    _sample(wan, callback=lambda i, x0, x, total: states["unguided"].append(x.clone()))
    sampling = wan.get_model_object("model_sampling")
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 6)
    with torch.no_grad():
        for step in range(guided_steps):
            losses = {kind: float(guidance.motion_loss(wan.model, states[kind][step], float(sigmas[step]),
                                                        _cond(3)[0][0])) for kind in states}
            print(f"step {step}: motion loss guided {losses['guided']:.4f}, unguided {losses['unguided']:.4f}")
            assert losses["guided"] < losses["unguided"]
    # Within a step the optimisation lowers the loss too (iteration 0 vs the next step's first).
    curve = guidance.loss_curve()
    assert [s for s, _ in curve] == list(range(guided_steps))


def test_the_guider_carries_the_same_guidance(wan, motion):
    latent = {"samples": torch.zeros(*LATENT)}
    (guider,) = MotionCloneGuider.execute(wan, _cond(3), _cond(4), 5.0, latent, motion, 50000.0, 2, 0.2, 0,
                                          0).result
    import comfy.samplers

    noise = comfy.sample.prepare_noise(latent["samples"], 7)
    sigmas = torch.tensor([1.0, 0.9, 0.7, 0.0])
    out = guider.sample(noise, latent["samples"], comfy.samplers.sampler_object("euler"), sigmas, seed=7,
                        disable_pbar=True)
    plain = comfy.samplers.CFGGuider(wan)
    plain.set_conds(_cond(3), _cond(4))
    plain.set_cfg(5.0)
    unguided = plain.sample(noise, latent["samples"], comfy.samplers.sampler_object("euler"), sigmas, seed=7,
                            disable_pbar=True)
    assert out.shape == unguided.shape and not torch.equal(out, unguided)
    assert guider.model_patcher is not wan and not wan.wrappers  # the input MODEL is left as it was


def test_checkpointed_blocks_give_the_same_gradient_with_a_lower_peak(motion):
    from motionclone.motion_core.memory_estimate import peak_bytes

    wan4 = build_tiny_wan_model(seed=0)
    guidance = WanMotionGuidance(motion, WanGuidanceSettings())
    base = wan4.model
    x0 = torch.randn(*LATENT, generator=torch.Generator().manual_seed(9))
    context = _cond(3)[0][0]
    grads, peaks = {}, {}
    for on in (False, True):
        x = x0.clone().requires_grad_(True)

        def step(on=on, x=x):
            with differentiable_kernels():  # the recompute in backward must run the forward's kernels
                guidance.motion_loss(base, x, 0.9, context, checkpointing=on).backward()

        peaks[on] = peak_bytes(step, torch.device("cpu"))
        grads[on] = x.grad
    print(f"tiny Wan, guided block 2 of 4: peak of the loss's backward {peaks[False] / 2**10:.0f} KB kept, "
          f"{peaks[True] / 2**10:.0f} KB with blocks 0-1 checkpointed")
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)
    assert grads[True].abs().sum() > 0
    assert peaks[True] < peaks[False]


def test_a_noised_reference_start_is_denoise_and_guided_steps(wan, motion, caplog):
    """FastVMT's start, the reference latent noised to the first sigma, is core's img2img: the reference's LATENT
    as latent_image with denoise < 1. The r band then holds no step (it starts below it): a warning says to set
    guided_steps, which guides the first steps of the shortened run."""
    import logging

    reference = {"samples": torch.randn(*LATENT, generator=torch.Generator().manual_seed(1))}
    with caplog.at_level(logging.WARNING):
        unguided = MotionGuidedSampler.execute(wan, 7, 8, 5.0, "euler", "simple", _cond(3), _cond(4), reference,
                                               0.75, motion, 50000.0, 0, 0.2, 0, 0)
    assert any("no step of this run is guided" in r.getMessage() for r in caplog.records)
    (core,) = nodes.common_ksampler(wan, 7, 8, 5.0, "euler", "simple", _cond(3), _cond(4), reference, denoise=0.75)
    assert torch.equal(unguided.result[0]["samples"], core["samples"])
    guided = MotionGuidedSampler.execute(wan, 7, 8, 5.0, "euler", "simple", _cond(3), _cond(4), reference, 0.75,
                                         motion, 50000.0, 2, 0.2, 0, 0)
    assert [e["step"] for e in guided.ui["motion_loss"]] == [0, 1]
    assert not torch.equal(guided.result[0]["samples"], core["samples"])


def test_kv_injection_gives_every_forward_of_a_guided_step_the_references_keys_and_values(wan, motion):
    """kv_injection (off by default): on each guided step the reference, noised to that sigma with the sampler's
    initial noise and run with the target prompt, gives block 0's k and v projections to every forward of the
    step (the optimisation's and the CFG denoiser's); the steps after the prefix run as without it."""
    import comfy.samplers

    reference = torch.randn(*LATENT, generator=torch.Generator().manual_seed(1))
    injected = ExtractSparseMotion.execute(wan, timestep=400, seed=5, top_k=1, layers="auto",
                                           latent={"samples": reference}, positive=_cond(2),
                                           kv_injection=True).result[0]
    assert motion.injection_latent is None and torch.equal(injected.injection_latent, reference)
    assert all(flow.equal(motion.flows[b]) for b, flow in injected.flows.items())
    key = "diffusion_model.blocks.0.self_attn.k"
    settings = WanGuidanceSettings(step_size=0.05, guided_steps=2)
    assert key not in WanMotionGuidance(motion, settings).patch(wan).object_patches  # off by default
    patched = WanMotionGuidance(injected, settings).patch(wan)
    seen = {"step": 0, "k": []}
    handle = patched.object_patches[key].register_forward_hook(
        lambda module, args, out: seen["k"].append((seen["step"], out.detach().clone())))
    out = _sample(patched, steps=4, callback=lambda i, x0, x, total: seen.__setitem__("step", i + 1))
    handle.remove()
    import comfy.model_management

    comfy.model_management.load_models_gpu([wan])  # the unpatched MODEL again: the object patches come off
    assert not type(wan.model.diffusion_model.blocks[0].self_attn.k).__name__.startswith("KVInjected")

    # Step 0's reference k by hand: sigma_0 * noise + (1 - sigma_0) * x0, the positive prompt, the unpatched model.
    sampling = wan.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 4)
    noise = comfy.sample.prepare_noise(torch.zeros(*LATENT), 7)
    x_ref = sigmas[0] * noise + (1 - sigmas[0]) * wan.model.process_latent_in(reference)
    by_hand = []
    hook = wan.model.diffusion_model.blocks[0].self_attn.k.register_forward_hook(
        lambda module, args, o: by_hand.append(o.detach().clone()))
    with torch.no_grad():
        wan.model.diffusion_model(x_ref, sampling.timestep(sigmas[:1]), _cond(3)[0][0])
    hook.remove()
    step0 = [k for s, k in seen["k"] if s == 0]
    assert len(step0) > 5  # the recording, the optimisation's forwards (5 iterations) and the CFG denoiser's
    for k in step0:
        torch.testing.assert_close(k, by_hand[0].expand_as(k), rtol=1e-5, atol=1e-6)
    step1 = [k for s, k in seen["k"] if s == 1]
    assert all(torch.equal(k, step1[0].expand_as(k)) for k in step1) and not torch.allclose(step1[0], step0[0])
    after = [k for s, k in seen["k"] if s >= 2]  # the user's sampler on the rest: the video's own keys
    assert after and not any(torch.allclose(k[:1], step1[0][:1]) for k in after)
    without = _sample(WanMotionGuidance(motion, settings).patch(wan), steps=4)
    assert not torch.allclose(out, without)


def test_kv_injection_survives_save_and_load_and_is_refused_on_sd(wan, tmp_path):
    from motionclone.motion_core.tiny_models import build_tiny_sd15_model
    from motionclone.motion_core.windowed_motion import load_motion

    reference = torch.randn(*LATENT, generator=torch.Generator().manual_seed(1))
    injected = ExtractSparseMotion.execute(wan, timestep=400, seed=5, top_k=1, layers="auto",
                                           latent={"samples": reference}, positive=_cond(2),
                                           kv_injection=True).result[0]
    injected.save(tmp_path / "inj.motion.safetensors")
    loaded = load_motion(tmp_path / "inj.motion.safetensors")
    assert torch.equal(loaded.injection_latent, reference)
    with pytest.raises(ValueError, match="kv_injection applies to Wan models only"):
        ExtractSparseMotion.execute(build_tiny_sd15_model(seed=0), timestep=400, seed=5, top_k=1, layers="up_blocks.1",
                                    latent={"samples": torch.zeros(4, 4, 8, 8)}, positive=_cond(2), kv_injection=True)
