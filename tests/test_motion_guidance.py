"""MotionClone extraction and guided sampling on a tiny SD1.5-architecture model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from motionclone.motion_core.attention_capture import CaptureState
from motionclone.motion_core.extraction import extract_sparse_motion
from motionclone.motion_core.guidance import ddim_reference_step
from motionclone.motion_core.guided_sampling import (
    GuidanceSettings,
    MotionGuidance,
    attention_layers_of,
    select_layers,
)
from motionclone.motion_core.injection import CAPTURE_KEY, apply_motion_modules, install_processors
from motionclone.motion_core.motion_module import load_motion_adapter
from motionclone.motion_core.sparse_motion import MotionMismatchError, SparseMotion
from motionclone.motion_core.tiny_models import build_tiny_sd15_model, write_tiny_motion_module
from motionclone.nodes import motion_nodes

FRAMES, SIZE = 8, 16  # latent frames and side (a 128 px video); up_blocks.1 sees 4x4 tokens


@pytest.fixture(scope="module")
def base_model():
    return build_tiny_sd15_model(seed=0)


@pytest.fixture(scope="module")
def model(base_model, tmp_path_factory):
    path = write_tiny_motion_module(tmp_path_factory.mktemp("mm") / "mm.safetensors", seed=2, std=0.2)
    adapter, info = load_motion_adapter(path)
    return apply_motion_modules(base_model, adapter, info, install_processors(adapter))


@pytest.fixture(scope="module")
def context():
    return torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def reference_latents():
    """A square moving right by one latent pixel per frame."""
    lat = torch.zeros(FRAMES, 4, SIZE, SIZE)
    for f in range(FRAMES):
        lat[f, :, 4:8, 2 + f : 6 + f] = 3.0
    return lat


@pytest.fixture(scope="module")
def motion(model, reference_latents, context):
    layers = select_layers(attention_layers_of(model), "up_blocks.1")
    return extract_sparse_motion(model, reference_latents, context, layers, timestep=400, seed=0)


def _conds(context):
    return [[context, {}]], [[torch.zeros(1, 7, 32), {}]]


def test_extraction_records_up_blocks_1_and_stops_early(model, reference_latents, context, motion):
    import comfy.model_management

    assert motion.layers == [f"up_blocks.1.motion_modules.{m}.transformer_blocks.0.attn{a}" for m in range(3)
                             for a in (1, 2)]
    assert motion.values[motion.layers[0]].shape == (4 * 4, 8, FRAMES, 1)
    assert motion.frames == FRAMES and (motion.latent_height, motion.latent_width) == (SIZE, SIZE)
    assert motion.timestep == 400 and motion.model_fingerprint.startswith("mm.safetensors:")
    # The forward stops right after the last recorded layer: later UNet blocks never run.
    comfy.model_management.load_models_gpu([model])
    later = model.model.diffusion_model.output_blocks[6]
    calls = []
    handle = later.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = extract_sparse_motion(model, reference_latents, context, motion.layers, seed=0)
    finally:
        handle.remove()
    assert calls == []
    assert all(torch.equal(again.indices[k], motion.indices[k]) for k in motion.layers)  # deterministic


def _independent_gradient(model, x, sigma, context, motion, weight):
    """dL/dz_t by the formula, written out plainly: top-1 gather, MSE, sum over layers, weight."""
    state = CaptureState(motion.layers)
    options = {**model.model_options["transformer_options"], "cond_or_uncond": [0], CAPTURE_KEY: state}
    leaf = x.detach().clone().requires_grad_(True)
    model.model.apply_model(leaf, torch.full((FRAMES,), sigma), c_crossattn=context.expand(FRAMES, -1, -1),
                            transformer_options=options)
    total = 0.0
    for name in motion.layers:
        probs, idx, val = state.probs[name], motion.indices[name], motion.values[name].float()
        picked = torch.stack([probs[s, h, f, int(idx[s, h, f, 0])] for s in range(idx.shape[0])
                              for h in range(idx.shape[1]) for f in range(idx.shape[2])])
        target = torch.stack([val[s, h, f, 0] for s in range(idx.shape[0]) for h in range(idx.shape[1])
                              for f in range(idx.shape[2])])
        total = total + ((picked - target) ** 2).sum() / picked.numel()
    (grad_x,) = torch.autograd.grad(weight * total, leaf)
    return grad_x * math.sqrt(1 + sigma**2)  # z_t = x / sqrt(1 + sigma^2)


def test_one_guided_ddim_step_is_the_reference_update(model, motion, context):
    """ComfyUI's ddim (Euler) step with our guidance == the reference DDIM update, gradient computed independently."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    sigma, sigma_next = float(ms.sigma(torch.tensor(800.0))), float(ms.sigma(torch.tensor(700.0)))
    weight, warmup, cfg = 3000.0, 4, 8.5
    guidance = MotionGuidance(motion, GuidanceSettings(weight, guided_steps=1, warmup=warmup, cooldown=0))
    latent = torch.zeros(FRAMES, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, 3)
    positive, negative = _conds(context)
    out = comfy.sample.sample_custom(guidance.patch(model), noise, cfg, comfy.samplers.ksampler("euler"),
                                     torch.tensor([sigma, sigma_next]), positive, negative, latent, seed=3,
                                     disable_pbar=True)
    x_next = model.model.process_latent_in(out)

    comfy.model_management.load_models_gpu([model])
    x = noise * sigma
    with torch.no_grad():
        def predict(ctx):
            return model.model.apply_model(x, torch.full((FRAMES,), sigma), c_crossattn=ctx.expand(FRAMES, -1, -1),
                                           transformer_options={**model.model_options["transformer_options"],
                                                                "cond_or_uncond": [0]})
        d_cond, d_uncond = predict(context), predict(torch.zeros(1, 7, 32))
    denoised = d_uncond + cfg * (d_cond - d_uncond)
    eps = (x - denoised) / sigma
    grad = _independent_gradient(model, x, sigma, context, motion, weight / warmup)  # ramp of step 0
    abar, abar_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    z_next = ddim_reference_step(x * math.sqrt(abar), eps, grad, abar, abar_next)
    expected = z_next / math.sqrt(abar_next)
    assert guidance.losses and guidance.losses[0][0] == 0
    assert (x_next - expected).abs().max() < 1e-4 * expected.abs().max()
    # ... and the guidance really moved the step (the check above is not vacuous).
    unguided = x + (sigma_next - sigma) * eps
    assert (x_next - unguided).abs().max() > 100 * (x_next - expected).abs().max()


def _sample(model, motion, context, weight, sampler="ddim", scheduler="ddim_uniform", steps=24, guided=16, seed=1):
    import comfy.sample

    guidance = MotionGuidance(motion, GuidanceSettings(weight, guided_steps=guided, warmup=2, cooldown=2))
    latent = torch.zeros(FRAMES, 4, SIZE, SIZE)
    positive, negative = _conds(context)
    out = comfy.sample.sample(guidance.patch(model), comfy.sample.prepare_noise(latent, seed), steps, 8.5, sampler,
                              scheduler, positive, negative, latent, seed=seed, disable_pbar=True)
    return out, guidance


@pytest.mark.single_host
def test_guidance_pulls_attention_toward_the_motion(model, motion, context):
    # A weight of 1e-9 measures the loss along the unguided trajectory without changing it.
    _, unguided = _sample(model, motion, context, 1e-9)
    _, guided = _sample(model, motion, context, 10000.0)
    assert [s for s, _ in guided.losses] == list(range(16))
    ratio = guided.losses[-1][1] / unguided.losses[-1][1]
    print(f"motion loss at the last guided step: guided {guided.losses[-1][1]:.4f}, "
          f"unguided {unguided.losses[-1][1]:.4f}, ratio {ratio:.2f}")
    # Measured 0.50 on this tiny random model (w=10000; see docs/guidance.md for why not 2000 here).
    assert ratio < 0.65
    assert min(loss for _, loss in guided.losses[2:]) < 0.5 * unguided.losses[-1][1]


def test_guidance_works_when_motion_weights_became_inference_tensors(base_model, motion, context, tmp_path):
    """On a GPU, ComfyUI moves the loaded model (our injected motion modules included) with `.to()`
    inside the prompt's inference_mode, which leaves inference-tensor weights that autograd cannot
    save for backward. Same state here, made by converting the weights under inference_mode."""
    path = write_tiny_motion_module(tmp_path / "mm.safetensors", seed=2, std=0.2)
    adapter, info = load_motion_adapter(path)
    with torch.inference_mode():
        adapter.to(torch.float64).to(torch.float32)
    assert all(p.is_inference() for p in adapter.parameters())
    model = apply_motion_modules(base_model, adapter, info, install_processors(adapter))
    with torch.inference_mode():  # as ComfyUI runs a prompt
        out, guidance = _sample(model, motion, context, 10000.0, steps=6, guided=4)
    assert torch.isfinite(out).all() and len(guidance.losses) == 4


def test_guidance_works_when_the_loader_leaves_inference_tensor_weights(motion, context, tmp_path):
    """Whatever ComfyUI's loader does inside the prompt's inference_mode: ModelPatcher moves whole
    models to the GPU with `.to()`; ComfyUI 0.33's ModelPatcherDynamic (NVIDIA only, it cannot be built
    on a CPU) force-loads small layers on the device, without the weight wrappers it installs for
    large ones. Same state here: after every load, each UNet weight and buffer (motion modules
    included) is an inference tensor made as ComfyUI's set_attr_param makes them, and no wrapper was
    registered for it."""
    import comfy.patcher_extension as pe

    path = write_tiny_motion_module(tmp_path / "mm.safetensors", seed=2, std=0.2)
    adapter, info = load_motion_adapter(path)
    model = apply_motion_modules(build_tiny_sd15_model(seed=0), adapter, info, install_processors(adapter))
    seen = []

    def weights_as_inference_tensors(patcher, *args):
        unet = patcher.model.diffusion_model
        with torch.inference_mode():
            for module in unet.modules():
                for name, param in module._parameters.items():
                    if param is not None:
                        module._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
                for name, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[name] = buffer.clone()
        seen.append(sum(p.is_inference() for p in unet.parameters()))

    model.add_callback(pe.CallbacksMP.ON_LOAD, weights_as_inference_tensors)
    with torch.inference_mode():  # as ComfyUI runs a prompt
        out, guidance = _sample(model, motion, context, 10000.0, steps=6, guided=4)
    assert seen and seen[0] == len(list(model.model.diffusion_model.parameters()))  # the state was made
    assert torch.isfinite(out).all() and len(guidance.losses) == 4


def test_motion_modules_follow_the_unet_dtype_when_the_loader_made_them_inference_parameters(motion, context,
                                                                                             tmp_path):
    """ModelPatcherDynamic loads layers that are not ComfyUI ops (our motion modules) with set_attr_param
    inside inference_mode, in their own dtype; on their first forward they follow the UNet's dtype.
    Here: float64 inference Parameters after every load, under a float32 UNet; plain and guided
    sampling both run, and give what the float32 modules give."""
    import comfy.patcher_extension as pe

    path = write_tiny_motion_module(tmp_path / "mm.safetensors", seed=2, std=0.2)
    adapter, info = load_motion_adapter(path)
    reference = apply_motion_modules(build_tiny_sd15_model(seed=0), adapter, info, install_processors(adapter))
    with torch.inference_mode():
        expected, _ = _sample(reference, motion, context, 10000.0, steps=6, guided=4)
        expected_plain, _ = _sample(reference, motion, context, 0.0, steps=6, guided=4)
    adapter, info = load_motion_adapter(path)
    model = apply_motion_modules(build_tiny_sd15_model(seed=0), adapter, info, install_processors(adapter))

    def float64_inference_parameters(patcher, *args):
        with torch.inference_mode():
            for module in adapter.modules():
                for name, param in module._parameters.items():
                    if param is not None:
                        module._parameters[name] = torch.nn.Parameter(param.to(torch.float64), requires_grad=False)

    model.add_callback(pe.CallbacksMP.ON_LOAD, float64_inference_parameters)
    with torch.inference_mode():
        plain, _ = _sample(model, motion, context, 0.0, steps=6, guided=4)
        guided, guidance = _sample(model, motion, context, 10000.0, steps=6, guided=4)
    assert len(guidance.losses) == 4
    assert torch.equal(plain, expected_plain) and torch.equal(guided, expected)  # float64 -> float32 is exact


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("ddim", "ddim_uniform"),
                                                ("dpmpp_2m", "karras")])
def test_guided_sampling_works_with_comfy_samplers(model, motion, context, sampler, scheduler):
    plain, _ = _sample(model, motion, context, 1e-9, sampler, scheduler, steps=8, guided=5)
    guided, guidance = _sample(model, motion, context, 10000.0, sampler, scheduler, steps=8, guided=5)
    assert torch.isfinite(guided).all() and guided.shape == plain.shape
    assert (guided - plain).abs().max() > 1e-3
    assert len({s for s, _ in guidance.losses}) == 5


def _ksampler_args(context, seed=7, steps=4):
    positive, negative = _conds(context)
    return dict(seed=seed, steps=steps, cfg=8.5, sampler_name="ddim", scheduler="ddim_uniform", positive=positive,
                negative=negative, denoise=1.0)


def test_weight_zero_is_bit_identical_to_ksampler(model, motion, context):
    import nodes

    latent = {"samples": torch.zeros(FRAMES, 4, SIZE, SIZE)}
    args = _ksampler_args(context)
    (expected,) = nodes.KSampler().sample(model, latent_image=latent, **args)
    out = motion_nodes.MotionGuidedSampler.execute(
        model, latent_image=latent, motion=motion, guidance_weight=0.0, guided_steps=0, noisy_fraction=0.4,
        warmup=10, cooldown=10, **args,
    ).result[0]
    assert torch.equal(out["samples"], expected["samples"])  # the loss is still measured (next test)
    guided = motion_nodes.MotionGuidedSampler.execute(
        model, latent_image=latent, motion=motion, guidance_weight=2000.0, guided_steps=0, noisy_fraction=0.4,
        warmup=10, cooldown=10, **args,
    ).result[0]
    assert not torch.equal(guided["samples"], expected["samples"])


def test_a_run_that_starts_below_the_guided_band_says_so(model, motion, context, caplog):
    """denoise 0.5 starts below r = 0.4's band (timesteps >= 600): nothing is guided, KSampler's sample, and a
    warning names guided_steps, which then guides the run's first steps."""
    import logging

    import nodes

    latent = {"samples": torch.zeros(FRAMES, 4, SIZE, SIZE)}
    args = {**_ksampler_args(context, steps=4), "denoise": 0.5}
    settings = dict(motion=motion, guidance_weight=2000.0, noisy_fraction=0.4, warmup=0, cooldown=0)
    with caplog.at_level(logging.WARNING):
        out = motion_nodes.MotionGuidedSampler.execute(model, latent_image=latent, guided_steps=0, **args, **settings)
    assert any("no step of this run was guided" in r.getMessage() for r in caplog.records)
    (expected,) = nodes.KSampler().sample(model, latent_image=latent, **args)
    assert torch.equal(out.result[0]["samples"], expected["samples"])
    guided = motion_nodes.MotionGuidedSampler.execute(model, latent_image=latent, guided_steps=2, **args, **settings)
    assert [e["step"] for e in guided.ui["motion_loss"]] == [0, 1]


def test_loss_plot_output_and_weight_zero_measures_without_changing_the_sample(model, motion, context, caplog):
    """The sampler's second output plots the motion loss per guided step; at weight 0 the loss is measured
    along the unguided trajectory (sample bit-identical to KSampler above) and is higher than the guided
    run's at the last guided step. Both curves reach the log."""
    import logging

    latent = {"samples": torch.zeros(FRAMES, 4, SIZE, SIZE)}
    args = _ksampler_args(context, steps=8)
    settings = dict(motion=motion, guided_steps=6, noisy_fraction=0.4, warmup=1, cooldown=1)
    with caplog.at_level(logging.INFO):
        unguided = motion_nodes.MotionGuidedSampler.execute(model, latent_image=latent, guidance_weight=0.0, **args,
                                                            **settings)
        guided = motion_nodes.MotionGuidedSampler.execute(model, latent_image=latent, guidance_weight=10000.0,
                                                          **args, **settings)
    curves = {}
    for name, out in (("unguided", unguided), ("guided", guided)):
        plot = out.result[1]
        assert plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.dtype == torch.float32
        assert plot.min() < 0.5 < plot.max()  # something is drawn on the white chart
        curve = [(d["step"], d["loss"]) for d in out.ui["motion_loss"]]
        assert [s for s, _ in curve] == list(range(6)) and all(math.isfinite(v) and v > 0 for _, v in curve)
        assert out.ui["images"]  # the plot is shown on the node as a preview
        curves[name] = curve
    assert curves["guided"][-1][1] < curves["unguided"][-1][1]
    assert curves["guided"][0][1] == pytest.approx(curves["unguided"][0][1], rel=1e-4)  # same start
    logged = [r.getMessage() for r in caplog.records if "motion loss per guided step" in r.getMessage()]
    assert len(logged) == 2 and "measured on the unguided run" in logged[0] and "0:" in logged[0]


def test_guider_for_sampler_custom_advanced_matches_the_sampler_node(model, motion, context):
    import comfy.sample
    import comfy.samplers

    latent = {"samples": torch.zeros(FRAMES, 4, SIZE, SIZE)}
    args = _ksampler_args(context, steps=6)
    settings = dict(motion=motion, guidance_weight=5000.0, guided_steps=4, noisy_fraction=0.4, warmup=1, cooldown=1)
    via_sampler = motion_nodes.MotionGuidedSampler.execute(model, latent_image=latent, **args, **settings).result[0]
    guider = motion_nodes.MotionCloneGuider.execute(model, args["positive"], args["negative"], args["cfg"], latent,
                                                    **settings).result[0]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", 6)
    noise = comfy.sample.prepare_noise(latent["samples"], args["seed"])
    out = guider.sample(noise, latent["samples"], comfy.samplers.ksampler("euler"), sigmas, seed=args["seed"],
                        disable_pbar=True)
    torch.testing.assert_close(out, via_sampler["samples"], rtol=0, atol=1e-5)


def test_no_patch_leaks_into_the_input_model(model, motion, context):
    before_options = copy.deepcopy({k: v for k, v in model.model_options.items() if k != "transformer_options"})
    wrappers_before = copy.copy(model.wrappers)
    x = torch.randn(FRAMES, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(9))

    def run():
        import comfy.model_management

        comfy.model_management.load_models_gpu([model])
        with torch.no_grad():
            return model.model.apply_model(x, torch.ones(FRAMES), c_crossattn=context.expand(FRAMES, -1, -1),
                                           transformer_options={**model.model_options["transformer_options"],
                                                                "cond_or_uncond": [0]})

    expected = run()
    _sample(model, motion, context, 5000.0, steps=4, guided=2)
    assert model.wrappers == wrappers_before and not model.weight_wrapper_patches
    assert {k: v for k, v in model.model_options.items() if k != "transformer_options"}.keys() == before_options.keys()
    assert "sampler_post_cfg_function" not in model.model_options
    assert torch.equal(run(), expected)


def test_non_finite_inputs_motions_and_steps_stop_with_clear_errors(model, motion, context, tmp_path):
    from motionclone.motion_core.guided_sampling import GuidanceError
    from motionclone.motion_core.sparse_motion import MotionFileError

    latent = {"samples": torch.zeros(FRAMES, 4, SIZE, SIZE)}
    args = _ksampler_args(context)
    settings = dict(motion=motion, guidance_weight=2000.0, guided_steps=2, noisy_fraction=0.4, warmup=1, cooldown=1)
    # A linked NaN reaches execute (validate_inputs sees links as None).
    with pytest.raises(ValueError, match="noisy_fraction must be a finite number, got nan"):
        motion_nodes.MotionGuidedSampler.execute(model, latent_image=latent, **args,
                                                 **{**settings, "noisy_fraction": float("nan")})
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        motion_nodes.MotionGuidedSampler.execute(model, latent_image=latent, **{**args, "cfg": float("inf")},
                                                 **settings)
    assert motion_nodes.MotionGuidedSampler.validate_inputs(guidance_weight=None, cfg=8.5) is True
    assert "finite" in motion_nodes.MotionCloneGuider.validate_inputs(guidance_weight=float("nan"))
    # A motion file whose values are NaN.
    bad = motion.to("cpu")
    values = {k: v.clone() for k, v in bad.values.items()}
    values[bad.layers[0]][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        SparseMotion(**{**bad.__dict__, "values": values})
    path = tmp_path / "nan.motion.safetensors"
    bad.save(path)
    import safetensors.torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[f"{bad.layers[0]}.values"] = values[bad.layers[0]]
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    with pytest.raises(MotionFileError, match="not finite"):
        SparseMotion.load(path)
    # A guided step whose gradient is not finite stops the run and says what to lower.
    with pytest.raises(GuidanceError, match="not finite.*lower guidance_weight"):
        _sample(model, motion, context, float("inf"), steps=4, guided=2)


def test_mismatched_motion_is_refused(model, motion, context):
    args = _ksampler_args(context)
    settings = dict(guidance_weight=2000.0, guided_steps=0, noisy_fraction=0.4, warmup=10, cooldown=10)
    for shape, message in [((FRAMES + 2, 4, SIZE, SIZE), "MOTION has 8 frames but the latent batch has 10"),
                           ((FRAMES, 4, SIZE, SIZE + 8), "latent")]:
        with pytest.raises(MotionMismatchError, match=message):
            motion_nodes.MotionGuidedSampler.execute(model, latent_image={"samples": torch.zeros(shape)},
                                                     motion=motion, **args, **settings)
    renamed = SparseMotion(
        values={"up_blocks.9.x": motion.values[motion.layers[0]]},
        indices={"up_blocks.9.x": motion.indices[motion.layers[0]]},
        frames=FRAMES, latent_height=SIZE, latent_width=SIZE, layers=["up_blocks.9.x"], timestep=400, top_k=1,
    )
    with pytest.raises(MotionMismatchError, match="up_blocks.9.x"):
        motion_nodes.MotionGuidedSampler.execute(model, latent_image={"samples": torch.zeros(FRAMES, 4, SIZE, SIZE)},
                                                 motion=renamed, **args, **settings)


def test_model_without_motion_modules_is_refused(base_model, motion, context):
    with pytest.raises(ValueError, match="no motion modules: apply 'Load AnimateDiff Motion Module'"):
        motion_nodes.MotionGuidedSampler.execute(
            base_model, latent_image={"samples": torch.zeros(FRAMES, 4, SIZE, SIZE)}, motion=motion,
            guidance_weight=2000.0, guided_steps=0, noisy_fraction=0.4, warmup=10, cooldown=10,
            **_ksampler_args(context),
        )
    with pytest.raises(ValueError, match="no motion modules"):
        motion_nodes.ExtractSparseMotion.execute(base_model, timestep=400, seed=0, top_k=1, layers="up_blocks.1",
                                                 latent={"samples": torch.zeros(FRAMES, 4, SIZE, SIZE)},
                                                 positive=[[context, {}]])


def test_extract_node_inputs_and_errors(model, reference_latents, context, motion):
    kwargs = dict(timestep=400, seed=0, top_k=1, layers="up_blocks.1")
    out = motion_nodes.ExtractSparseMotion.execute(model, latent={"samples": reference_latents},
                                                   positive=[[context, {}]], **kwargs).result[0]
    assert all(torch.equal(out.values[k], motion.values[k]) for k in motion.layers)
    with pytest.raises(ValueError, match="connect reference images"):
        motion_nodes.ExtractSparseMotion.execute(model, positive=[[context, {}]], **kwargs)
    with pytest.raises(ValueError, match="connect a VAE"):
        motion_nodes.ExtractSparseMotion.execute(model, images=torch.zeros(FRAMES, 128, 128, 3),
                                                 positive=[[context, {}]], **kwargs)
    with pytest.raises(ValueError, match="positive conditioning, or a CLIP"):
        motion_nodes.ExtractSparseMotion.execute(model, latent={"samples": reference_latents}, **kwargs)
    with pytest.raises(ValueError, match="no temporal attention layer matches 'up_blocks.7'"):
        motion_nodes.ExtractSparseMotion.execute(model, latent={"samples": reference_latents},
                                                 positive=[[context, {}]], **{**kwargs, "layers": "up_blocks.7"})


def test_save_and_load_motion_nodes_round_trip(motion, tmp_path):
    import folder_paths

    out_dir, in_dir = tmp_path / "output", tmp_path / "input"
    out_dir.mkdir()
    in_dir.mkdir()
    old_out, old_in = folder_paths.get_output_directory(), folder_paths.get_input_directory()
    folder_paths.set_output_directory(str(out_dir))
    folder_paths.set_input_directory(str(in_dir))
    try:
        ui = motion_nodes.SaveMotion.execute(motion, "motionclone/test").ui["motion"][0]
        saved = out_dir / ui["subfolder"] / ui["filename"]
        assert saved.name == "test_00001.motion.safetensors" and saved.exists()
        (in_dir / "reuse").mkdir()
        saved.rename(in_dir / "reuse" / saved.name)
        options = next(i for i in motion_nodes.LoadMotion.define_schema().inputs if i.id == "motion_file").options
        assert options == ["reuse/test_00001.motion.safetensors"]
        loaded = motion_nodes.LoadMotion.execute("reuse/test_00001.motion.safetensors").result[0]
        with pytest.raises(ValueError, match="outside the input folder"):
            motion_nodes.LoadMotion.execute("../output/x.motion.safetensors")
    finally:
        folder_paths.set_output_directory(old_out)
        folder_paths.set_input_directory(old_in)
    assert loaded.layers == motion.layers and loaded.model_fingerprint == motion.model_fingerprint
    assert all(torch.equal(loaded.values[k], motion.values[k]) and torch.equal(loaded.indices[k], motion.indices[k])
               for k in motion.layers)


def test_uneven_schedule_node(model):
    sigmas = motion_nodes.MotionCloneUnevenSchedule.execute(model, 20, 12, 0.4).result[0]
    ms = model.get_model_object("model_sampling")
    timesteps = ms.timestep(sigmas[:-1]).round().tolist()
    assert len(sigmas) == 21 and sigmas[-1] == 0 and all(a > b for a, b in zip(sigmas, sigmas[1:]))
    assert timesteps[0] == 999 and all(t >= 600 for t in timesteps[:12]) and all(t < 600 for t in timesteps[12:])


def test_gradient_reuse_computes_every_kth_gradient_and_rescales_it_between(model, motion, context, monkeypatch):
    import comfy.sample

    grads = []
    real_grad = torch.autograd.grad

    def counting(*args, **kwargs):
        if torch._C._current_graph_task_id() == -1:  # a backward of its own, not a layer's recompute inside one
            grads.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    applied = {}
    post_cfg = MotionGuidance._post_cfg

    def record(self, args):
        sigma = float(args["sigma"].flatten()[0])
        if sigma in self._grads:
            applied[sigma] = self._grads[sigma].clone()
        return post_cfg(self, args)

    monkeypatch.setattr(MotionGuidance, "_post_cfg", record)
    latent = torch.zeros(FRAMES, 4, SIZE, SIZE)
    positive, negative = _conds(context)
    outs = {}
    for k in (1, 2):
        grads.clear()
        applied.clear()
        guidance = MotionGuidance(motion, GuidanceSettings(10000.0, guided_steps=4, warmup=4, cooldown=0,
                                                           gradient_every=k))
        outs[k] = comfy.sample.sample(guidance.patch(model), comfy.sample.prepare_noise(latent, 1), 6, 8.5, "ddim",
                                      "ddim_uniform", positive, negative, latent, seed=1, disable_pbar=True)
        assert len(grads) == 4 // k  # one backward per computed gradient
        assert [s for s, _ in guidance.losses] == [0, 1, 2, 3]  # reuse steps still measure the loss
        sigmas = sorted(applied, reverse=True)
        assert len(sigmas) == 4  # every guided step is guided
        if k == 2:  # steps 1 and 3 reuse steps 0 and 2, rescaled by the warm-up ramp (i + 1) / 4
            torch.testing.assert_close(applied[sigmas[1]], applied[sigmas[0]] * 2, rtol=1e-6, atol=0)
            torch.testing.assert_close(applied[sigmas[3]], applied[sigmas[2]] * 4 / 3, rtol=1e-6, atol=0)
    assert not torch.equal(outs[1], outs[2])
    with pytest.raises(ValueError, match="gradient_every must be >= 1"):
        GuidanceSettings(gradient_every=0)
