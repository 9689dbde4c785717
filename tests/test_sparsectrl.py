"""SparseCtrl / ImageCondition: original files into diffusers, residuals through ComfyUI's control path."""

from __future__ import annotations

import asyncio
import copy

import comfy.controlnet
import comfy.lora
import comfy.model_management
import comfy.ops
import folder_paths
import pytest
import safetensors.torch
import torch
from diffusers import SparseControlNetModel
from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

import nodes as comfy_nodes  # ComfyUI's nodes.py (conftest keeps our nodes/ package off sys.path)
from motionclone.motion_core.compact_checkpoint import load_compact_checkpoint, write_tiny_checkpoint
from motionclone.motion_core.control_grad import skip_residuals_as_patch
from motionclone.motion_core.extraction import extract_sparse_motion
from motionclone.motion_core.guided_sampling import attention_layers_of, select_layers
from motionclone.motion_core.injection import apply_motion_modules, install_processors
from motionclone.motion_core.motion_module import load_motion_adapter
from motionclone.motion_core.sparsectrl import (
    LatentAnchorControl,
    SparseCtrlControl,
    SparseCtrlError,
    attach_control,
    condition_on_reference,
    control_residuals,
    from_diffusers_state_dict,
    load_sparsectrl,
    load_sparsectrl_patcher,
    parse_frame_indices,
)
from motionclone.motion_core.tiny_models import (
    TINY_MOTION_CHANNELS,
    TINY_SD15_UNET_CONFIG,
    build_tiny_sd15_model,
    init_weights_,
    write_tiny_motion_module,
    write_tiny_sparsectrl,
)
from motionclone.nodes.image_condition_nodes import ImageCondition, cached_sparsectrl
from motionclone.nodes.motion_nodes import MotionGuidedSampler

FRAMES, LATENT = 4, 8  # 4 frames of 8x8 latents (64x64 px)
SIGMA = 3.0


def _diffusers_kwargs(variant: str) -> dict:
    # The tiny layout write_tiny_sparsectrl uses (checked against it below).
    return dict(
        conditioning_channels=4 if variant == "rgb" else 3, use_simplified_condition_embedding=variant == "rgb",
        conditioning_embedding_out_channels=(8, 16, 16, 32), block_out_channels=TINY_MOTION_CHANNELS,
        cross_attention_dim=32, attention_head_dim=8, motion_num_attention_heads=8, motion_max_seq_length=32,
    )


def _image(seed: int, n: int = 1) -> torch.Tensor:
    return torch.rand(n, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(seed))


def _context(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 7, 32, generator=torch.Generator().manual_seed(seed))


def _x(chunks: int = 1, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(chunks * FRAMES, 4, LATENT, LATENT, generator=gen) * SIGMA


def _conds(seed: int = 0):
    return [[_context(1, seed), {}]], [[_context(1, seed + 100), {}]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sparsectrl")
    return {
        "dir": d,
        "rgb": write_tiny_sparsectrl(d / "sc_rgb.safetensors", variant="rgb", seed=3),
        "scribble": write_tiny_sparsectrl(d / "sc_scribble.ckpt", variant="scribble", seed=4),
        "mm": write_tiny_motion_module(d / "mm.safetensors", seed=2),
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model, _clip, vae = load_compact_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "t.safetensors"))
    return model, vae


@pytest.fixture(scope="module")
def video_model(base, files):
    adapter, info = load_motion_adapter(files["mm"])
    return apply_motion_modules(base[0], adapter, info, install_processors(adapter))


@pytest.fixture(scope="module")
def patchers(files):
    return {v: load_sparsectrl_patcher(files[v]) for v in ("rgb", "scribble")}


@pytest.fixture
def controlnet_folder(files, monkeypatch):
    paths, exts = folder_paths.folder_names_and_paths["controlnet"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnet", ([str(files["dir"]), *paths], exts))


def _control(patchers, variant, indices, image, strength=1.0, rng=(0.0, 1.0), vae=None):
    patcher, info = patchers[variant]
    return SparseCtrlControl(patcher, info, indices).set_cond_hint(image.movedim(-1, 1), strength, rng, vae=vae)


def _res(*args, **kwargs):
    """control_residuals as inside a sampler (no gradients): ComfyUI's residual dict."""
    with torch.no_grad():
        return control_residuals(*args, **kwargs)


def _unet(model, x, control=None, chunks=1):
    comfy.model_management.load_models_gpu([model])
    options = {**model.model_options["transformer_options"], "cond_or_uncond": [0] * chunks}
    with torch.no_grad():
        return model.model.apply_model(
            x, torch.full((x.shape[0],), SIGMA), c_crossattn=_context(x.shape[0]), control=control,
            transformer_options=options,
        )


# --- loading ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,suffix", [("rgb", ".safetensors"), ("scribble", ".ckpt")])
def test_original_format_loads_equal_to_directly_built_diffusers(tmp_path, variant, suffix):
    direct = SparseControlNetModel(**_diffusers_kwargs(variant))
    init_weights_(direct, 7)
    # As the loader leaves it: with grad-requiring weights torch's matmul takes another kernel route for
    # non-contiguous inputs, which rounds differently on some CPUs.
    direct.eval().requires_grad_(False)
    original = from_diffusers_state_dict({k: v.clone().contiguous() for k, v in direct.state_dict().items()})
    # The keys of the downloaded files (the ones diffusers' own model-type detection looks for).
    assert CHECKPOINT_KEY_NAMES["animatediff"] in original
    assert CHECKPOINT_KEY_NAMES[f"animatediff_{variant}"] in original
    assert not any(".attn1." in k or ".attention_blocks.1." in k for k in original if ".motion_modules." in k)
    path = str(tmp_path / f"sc{suffix}")
    safetensors.torch.save_file(original, path) if suffix == ".safetensors" else torch.save(original, path)
    # write_tiny_sparsectrl writes exactly this layout
    written = write_tiny_sparsectrl(tmp_path / "w.safetensors", variant=variant, seed=7)
    written_sd = safetensors.torch.load_file(written)
    assert written_sd.keys() == original.keys() and all(torch.equal(written_sd[k], original[k]) for k in original)

    net, info = load_sparsectrl(path)
    assert (info.variant, info.has_mask, info.max_frames) == (variant, True, 32)
    assert info.block_out_channels == TINY_MOTION_CHANNELS and info.cross_attention_dim == 32
    assert info.downscale == (1 if variant == "rgb" else 8)
    assert all(not p.is_inference() for p in net.parameters())
    loaded_sd, direct_sd = net.state_dict(), direct.state_dict()
    assert loaded_sd.keys() == direct_sd.keys() and all(torch.equal(loaded_sd[k], direct_sd[k]) for k in direct_sd)

    gen = torch.Generator().manual_seed(0)
    size = LATENT * info.downscale
    args = dict(
        sample=torch.randn(1, 4, FRAMES, LATENT, LATENT, generator=gen), timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(FRAMES, 7, 32, generator=gen),
        controlnet_cond=torch.randn(1, info.condition_channels, FRAMES, size, size, generator=gen),
        conditioning_mask=torch.ones(1, 1, FRAMES, size, size), return_dict=False,
    )
    with torch.no_grad():
        (down_a, mid_a), (down_b, mid_b) = net(**args), direct(**args)
    assert torch.equal(mid_a, mid_b) and all(torch.equal(a, b) for a, b in zip(down_a, down_b, strict=True))
    assert mid_a.abs().sum() > 0


def test_file_without_position_tables_loads_the_same(tmp_path, files):
    sd = safetensors.torch.load_file(files["rgb"])
    stripped = {k: v for k, v in sd.items() if not k.endswith("pos_encoder.pe")}
    assert len(stripped) < len(sd)
    safetensors.torch.save_file(stripped, str(tmp_path / "nope.safetensors"))
    (a, info), (b, _) = load_sparsectrl(tmp_path / "nope.safetensors"), load_sparsectrl(files["rgb"])
    assert info.max_frames == 32
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_wrong_files_fail_clearly(tmp_path, files):
    with pytest.raises(SparseCtrlError, match="mm.safetensors is an AnimateDiff motion module"):
        load_sparsectrl(files["mm"])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SparseCtrlError, match="junk.ckpt: cannot be read"):
        load_sparsectrl(tmp_path / "junk.ckpt")
    regular = {"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}
    safetensors.torch.save_file(regular, str(tmp_path / "cn.safetensors"))
    with pytest.raises(SparseCtrlError, match="cn.safetensors is a regular ControlNet"):
        load_sparsectrl(tmp_path / "cn.safetensors")
    sd = safetensors.torch.load_file(files["rgb"])
    no_mm = {k: v for k, v in sd.items() if ".motion_modules." not in k}
    safetensors.torch.save_file(no_mm, str(tmp_path / "nomm.safetensors"))
    with pytest.raises(SparseCtrlError, match="nomm.safetensors .*no motion modules"):
        load_sparsectrl(tmp_path / "nomm.safetensors")
    broken = {k: v for k, v in sd.items() if k != "controlnet_mid_block.weight"}
    safetensors.torch.save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(SparseCtrlError, match="broken.safetensors: .*missing .*controlnet_mid_block.weight"):
        load_sparsectrl(tmp_path / "broken.safetensors")
    with pytest.raises(SparseCtrlError, match="not found"):
        load_sparsectrl(tmp_path / "absent.ckpt")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cross_attention_dim=64), "wide.safetensors does not fit this model: its cross-attention dim is 64"),
        (dict(block_out_channels=(64, 128, 256, 256)), r"wide.safetensors does not fit .*channels \[64, 128, 256"),
        (dict(block_out_channels=(32, 64, 128)), "wide.safetensors does not fit .*3 levels"),
    ],
)
def test_sparsectrl_that_does_not_fit_the_model_fails_clearly(tmp_path, video_model, kwargs, match):
    path = write_tiny_sparsectrl(tmp_path / "wide.safetensors", variant="scribble", **kwargs)
    patcher, info = load_sparsectrl_patcher(path)
    control = SparseCtrlControl(patcher, info, [0]).set_cond_hint(_image(0).movedim(-1, 1))
    with pytest.raises(SparseCtrlError, match=match):
        _res(control, video_model, _x(), SIGMA, {"c_crossattn": _context(FRAMES)})


def test_frame_index_parsing_and_range(video_model, patchers):
    assert parse_frame_indices(" 0, 8 ,-1") == [0, 8, -1]
    for bad in ("", "a, b", "1, 1"):
        with pytest.raises(SparseCtrlError):
            parse_frame_indices(bad)
    control = _control(patchers, "scribble", [7], _image(0))
    with pytest.raises(SparseCtrlError, match=r"frame indices \[7\] are outside the 4 frames"):
        _res(control, video_model, _x(), SIGMA, {"c_crossattn": _context(FRAMES)})
    control = _control(patchers, "scribble", [0, 1], _image(0, n=3))
    with pytest.raises(SparseCtrlError, match="3 images for 2 frame indices"):
        _res(control, video_model, _x(), SIGMA, {"c_crossattn": _context(FRAMES)})


# --- residuals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["rgb", "scribble"])
def test_residuals_equal_direct_forward_with_condition_only_at_frame_indices(video_model, base, patchers, variant):
    vae = base[1]
    patcher, info = patchers[variant]
    net = patcher.model.net
    images = _image(5, n=2)
    control = _control(patchers, variant, [0, -1], images, vae=vae)  # -1 = last frame
    seen = []
    hook = net.controlnet_cond_embedding.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        ctx = _context(2 * FRAMES)
        res = _res(control, video_model, _x(chunks=2), SIGMA, {"c_crossattn": ctx}, chunks=2)
    finally:
        hook.remove()

    if variant == "rgb":  # the image's VAE latent, scaled as the model expects
        cond = video_model.model.latent_format.process_in(vae.encode(images))
    else:  # the image itself
        cond = images.movedim(-1, 1)
    expected = torch.zeros(FRAMES, *cond.shape[1:])
    expected[[0, FRAMES - 1]] = cond
    mask = torch.zeros(FRAMES, 1, *cond.shape[2:])
    mask[[0, FRAMES - 1]] = 1.0
    (got,) = seen
    assert torch.allclose(got, torch.cat([expected, mask], 1).repeat(2, 1, 1, 1), atol=1e-5)
    assert got[1:3].abs().sum() == 0  # frames without an image get nothing, mask included

    t = video_model.model.model_sampling.timestep(torch.tensor([SIGMA, SIGMA]))
    with torch.no_grad():
        down, mid = net(
            torch.zeros(2, 4, FRAMES, LATENT, LATENT), t, encoder_hidden_states=ctx,
            controlnet_cond=expected.transpose(0, 1)[None].expand(2, -1, -1, -1, -1),
            conditioning_mask=mask.transpose(0, 1)[None].expand(2, -1, -1, -1, -1), return_dict=False,
        )
    assert res["input"] == [] and len(res["middle"]) == 1 and len(res["output"]) == 12
    assert [r.shape[1] for r in res["output"]] == info.residual_channels
    assert torch.allclose(res["middle"][0], mid, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(res["output"], down, strict=True))


def test_strength_scales_residuals_and_zero_strength_changes_nothing(video_model, base, patchers):
    vae, x = base[1], _x()
    cond = {"c_crossattn": _context(FRAMES)}

    def residuals(strength):
        return _res(_control(patchers, "rgb", [0], _image(1), strength, vae=vae), video_model, x, SIGMA,
                                 cond)

    one, scaled, zero = residuals(1.0), residuals(0.37), residuals(0.0)
    for key in ("middle", "output"):
        assert all(torch.allclose(s, 0.37 * o, atol=1e-6) for s, o in zip(scaled[key], one[key], strict=True))
    # In the order of the UNet's skip connections (what apply_control pops them against).
    skips = []
    options = {**video_model.model_options["transformer_options"], "cond_or_uncond": [0]}
    options["patches"] = {"input_block_patch": [lambda h, _opts: skips.append(tuple(h.shape)) or h]}
    with torch.no_grad():
        video_model.model.apply_model(x, torch.full((FRAMES,), SIGMA), c_crossattn=_context(FRAMES),
                                      transformer_options=options)
    assert [tuple(r.shape) for r in one["output"]] == skips
    plain = _unet(video_model, x)
    assert torch.equal(_unet(video_model, x, zero), plain)
    assert not torch.allclose(_unet(video_model, x, one), plain, atol=1e-4)
    # and the node hands back the conditioning untouched at strength 0, like core Apply ControlNet
    pos, neg = _conds()
    out = ImageCondition.execute(pos, neg, "none", _image(1), "0", 0.0, 0.0, 1.0, "sparsectrl", vae)
    assert out.result == (pos, neg)


def test_with_gradients_skip_residuals_travel_as_patch_and_backward_works(video_model, base, patchers):
    """ComfyUI adds skip residuals in place, which breaks backward (MotionClone's guided pass)."""
    vae, x = base[1], _x()
    control = _control(patchers, "rgb", [0], _image(1), vae=vae)
    cond = {"c_crossattn": _context(FRAMES)}
    expected = _unet(video_model, x, _res(control, video_model, x, SIGMA, cond))
    options = {**video_model.model_options["transformer_options"], "cond_or_uncond": [0]}
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        res = skip_residuals_as_patch(control_residuals(control, video_model, xg, SIGMA, cond, options), options)
        assert res["output"] == [] and len(options["patches"]["output_block_patch"]) == 1
        out = video_model.model.apply_model(xg, torch.full((FRAMES,), SIGMA), c_crossattn=_context(FRAMES),
                                            control=res, transformer_options=options)
        (grad,) = torch.autograd.grad(out.square().sum(), xg)
    assert torch.allclose(out.detach(), expected, atol=1e-5)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_start_end_percent(video_model, patchers, base):
    sampling = video_model.model.model_sampling
    early, late = sampling.percent_to_sigma(0.2), sampling.percent_to_sigma(0.8)
    cond = {"c_crossattn": _context(FRAMES)}
    first_half = _control(patchers, "scribble", [0], _image(2), rng=(0.0, 0.5))
    second_half = _control(patchers, "scribble", [0], _image(2), rng=(0.5, 1.0))
    assert _res(first_half, video_model, _x(), early, cond) is not None
    assert _res(first_half, video_model, _x(), late, cond) is None
    assert _res(second_half, video_model, _x(), early, cond) is None
    assert _res(second_half, video_model, _x(), late, cond) is not None


def _core_controlnet(seed: int = 9):
    """A real ComfyUI ControlNet (comfy.cldm) at the tiny widths."""
    config = copy.deepcopy(TINY_SD15_UNET_CONFIG)
    config.pop("out_channels")
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, num_heads=8, dtype=torch.float32, device="cpu",
                                     operations=comfy.ops.disable_weight_init, **config)
    init_weights_(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"))


def test_composes_with_core_controlnet_in_the_chain(video_model, base, patchers):
    vae = base[1]
    pos, neg = _conds()
    core = _core_controlnet()
    (pos, neg) = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, core, _image(3), 0.8, 0.0, 1.0)
    patcher, info = patchers["rgb"]
    sc = SparseCtrlControl(patcher, info, [0])
    pos2, neg2 = attach_control(pos, neg, sc, _image(4), 0.6, (0.0, 1.0), vae=vae)
    chain = pos2[0][1]["control"]
    assert chain is neg2[0][1]["control"]  # one control for cond and uncond: they still batch together
    assert isinstance(chain, SparseCtrlControl) and chain.previous_controlnet is pos[0][1]["control"]

    x, cond = _x(), {"c_crossattn": _context(FRAMES)}
    both = _res(chain, video_model, x, SIGMA, cond)
    alone = chain.copy()  # same hint and strength, no previous control
    only_sc = _res(alone, video_model, x, SIGMA, cond)
    only_core = _res(chain.previous_controlnet, video_model, x, SIGMA, cond)
    assert torch.allclose(both["middle"][0], only_sc["middle"][0] + only_core["middle"][0], atol=1e-5)
    assert all(torch.allclose(b, s + c, atol=1e-5)
               for b, s, c in zip(both["output"], only_sc["output"], only_core["output"], strict=True))


def test_condition_on_reference_swaps_only_sparsectrl_hints(patchers):
    core = _core_controlnet().copy().set_cond_hint(_image(3).movedim(-1, 1))
    sc = _control(patchers, "scribble", [0, -1], _image(4)).set_previous_controlnet(core)
    video = _image(6, n=FRAMES)
    new = condition_on_reference(sc, video)
    assert new is not sc and new.previous_controlnet is not core
    assert torch.equal(new.cond_hint_original, video[[0, FRAMES - 1]].movedim(-1, 1))
    assert torch.equal(new.previous_controlnet.cond_hint_original, core.cond_hint_original)
    assert torch.equal(sc.cond_hint_original, _image(4).movedim(-1, 1))  # the original chain is unchanged


# --- sampling through the nodes -----------------------------------------------------------------
def _ksample(model, pos, neg, steps=3, sampler="euler"):
    latent = {"samples": torch.zeros(FRAMES, 4, LATENT, LATENT)}
    (out,) = comfy_nodes.common_ksampler(model, 0, steps, 7.5, sampler, "normal", pos, neg, latent)
    return out["samples"]


@pytest.mark.parametrize("variant,name", [("rgb", "sc_rgb.safetensors"), ("scribble", "sc_scribble.ckpt")])
def test_ksampler_runs_with_image_condition(controlnet_folder, video_model, base, variant, name):
    pos, neg = _conds()
    plain = _ksample(video_model, pos, neg)
    pos2, neg2 = ImageCondition.execute(pos, neg, name, _image(7), "0, 2", 1.0, 0.0, 1.0, "sparsectrl", base[1]).result
    assert pos2[0][1]["control"].info.variant == variant
    out = _ksample(video_model, pos2, neg2)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-4)
    assert "control" not in pos[0][1]  # inputs untouched
    assert cached_sparsectrl(folder_paths.get_full_path("controlnet", name)) is cached_sparsectrl(
        folder_paths.get_full_path("controlnet", name))


def test_motion_guided_sampler_with_image_condition(controlnet_folder, video_model, base):
    layers = select_layers(attention_layers_of(video_model), "up_blocks.1")
    motion = extract_sparse_motion(video_model, torch.randn(FRAMES, 4, LATENT, LATENT), _context(1), layers)
    pos, neg = _conds()
    pos2, neg2 = ImageCondition.execute(pos, neg, "sc_rgb.safetensors", _image(7), "0", 1.0, 0.0, 1.0,
                                        "sparsectrl", base[1]).result
    latent = {"samples": torch.zeros(FRAMES, 4, LATENT, LATENT)}

    def run(p, n):
        out = MotionGuidedSampler.execute(video_model, 0, 3, 7.5, "euler", "normal", p, n, latent, 1.0, motion,
                                          2000.0, 2, 0.4, 1, 1).result[0]
        return out["samples"]

    guided, guided_with_control = run(pos, neg), run(pos2, neg2)
    assert torch.isfinite(guided_with_control).all() and not torch.allclose(guided, guided_with_control, atol=1e-4)


def test_guided_sampling_with_a_core_controlnet_alone(video_model, base):
    """ComfyUI's in-place residual add would break the guided backward without control_grad."""
    layers = select_layers(attention_layers_of(video_model), "up_blocks.1")
    motion = extract_sparse_motion(video_model, torch.randn(FRAMES, 4, LATENT, LATENT), _context(1), layers)
    pos, neg = _conds()
    pos2, neg2 = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, _core_controlnet(), _image(3), 0.8,
                                                                        0.0, 1.0)
    latent = {"samples": torch.zeros(FRAMES, 4, LATENT, LATENT)}

    def run(p, n, weight):
        out = MotionGuidedSampler.execute(video_model, 0, 3, 7.5, "euler", "normal", p, n, latent, 1.0, motion,
                                          weight, 2, 0.4, 1, 1).result[0]
        return out["samples"]

    with_control = run(pos2, neg2, 2000.0)
    assert torch.isfinite(with_control).all()
    assert not torch.allclose(with_control, run(pos2, neg2, 0.0), atol=1e-4)  # guidance acted
    assert not torch.allclose(with_control, run(pos, neg, 2000.0), atol=1e-4)  # and so did the ControlNet


def test_guided_sampling_with_a_core_controlnet_loaded_in_inference_mode(video_model, base):
    """As in a ComfyUI prompt: the ControlNet's weights are inference tensors (loaded by a node inside
    inference_mode, or moved to a GPU there) and sampling runs under inference_mode."""
    layers = select_layers(attention_layers_of(video_model), "up_blocks.1")
    motion = extract_sparse_motion(video_model, torch.randn(FRAMES, 4, LATENT, LATENT), _context(1), layers)
    with torch.inference_mode():
        controlnet = _core_controlnet()
        assert next(controlnet.control_model.parameters()).is_inference()
        pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(*_conds(), controlnet, _image(3), 0.8,
                                                                          0.0, 1.0)
        latent = {"samples": torch.zeros(FRAMES, 4, LATENT, LATENT)}
        out = MotionGuidedSampler.execute(video_model, 0, 3, 7.5, "euler", "normal", pos, neg, latent, 1.0, motion,
                                          2000.0, 2, 0.4, 1, 1).result[0]
    assert torch.isfinite(out["samples"]).all()


def test_extraction_runs_sparsectrl_on_the_reference_frames(controlnet_folder, video_model, base, caplog):
    import logging

    from motionclone.motion_core.sparsectrl import condition_on_reference
    from motionclone.nodes.motion_nodes import ExtractSparseMotion

    vae, reference = base[1], _image(11, n=FRAMES)
    pos, neg = _conds()
    cond_pos, _ = ImageCondition.execute(pos, neg, "sc_rgb.safetensors", _image(7), "0", 1.0, 0.0, 1.0,
                                         "sparsectrl", vae).result
    args = dict(timestep=400, seed=0, top_k=1, layers="up_blocks.1", vae=vae, images=reference, positive=pos)
    plain = ExtractSparseMotion.execute(video_model, **args).result[0]
    conditioned = ExtractSparseMotion.execute(video_model, **args, image_condition=cond_pos).result[0]

    control = cond_pos[0][1]["control"]
    latents = vae.encode(reference)
    on_reference = extract_sparse_motion(video_model, latents, pos[0][0], plain.layers,
                                         control=condition_on_reference(control, reference))
    on_generation_image = extract_sparse_motion(video_model, latents, pos[0][0], plain.layers, control=control)

    def same(a, b):
        return all(torch.equal(a.values[k], b.values[k]) for k in a.layers)

    assert same(conditioned, on_reference)  # the node conditions on the reference's own frame 0
    assert not same(conditioned, plain) and not same(conditioned, on_generation_image)
    with pytest.raises(ValueError, match="image_condition carries no control"):
        ExtractSparseMotion.execute(video_model, **args, image_condition=pos)
    # latent_anchor acts only while sampling: extraction says it ignores it, and gives the plain MOTION.
    anchor_pos, _ = ImageCondition.execute(pos, neg, "none", _image(7), "0", 1.0, 0.0, 1.0, "latent_anchor",
                                           vae).result
    with caplog.at_level(logging.WARNING):
        anchored = ExtractSparseMotion.execute(video_model, **args, image_condition=anchor_pos).result[0]
    assert same(anchored, plain)
    assert any("latent_anchor" in r.getMessage() and "ignores it" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="needs the reference IMAGE frames"):
        ExtractSparseMotion.execute(video_model, timestep=400, seed=0, top_k=1, layers="up_blocks.1",
                                    latent={"samples": latents}, positive=pos, image_condition=cond_pos)


def test_node_errors(controlnet_folder, base):
    pos, neg = _conds()
    with pytest.raises(ValueError, match="RGB SparseCtrl: connect a VAE"):
        ImageCondition.execute(pos, neg, "sc_rgb.safetensors", _image(0), "0", 1.0, 0.0, 1.0, "sparsectrl")
    with pytest.raises(ValueError, match="2 images for 1 frame indices"):
        ImageCondition.execute(pos, neg, "sc_rgb.safetensors", _image(0, 2), "0", 1.0, 0.0, 1.0, "sparsectrl", base[1])
    with pytest.raises(ValueError, match="choose a SparseCtrl file"):
        ImageCondition.execute(pos, neg, "none", _image(0), "0", 1.0, 0.0, 1.0, "sparsectrl", base[1])
    with pytest.raises(ValueError, match="latent_anchor encodes the image"):
        ImageCondition.execute(pos, neg, "none", _image(0), "0", 1.0, 0.0, 1.0, "latent_anchor")


def test_latent_anchor_pins_the_frame_to_the_image_latent(video_model, base):
    vae = base[1]
    image = _image(8)
    pos, neg = _conds()
    plain = _ksample(video_model, pos, neg, steps=4)

    def anchored(strength=1.0, end=1.0):
        p, n = ImageCondition.execute(pos, neg, "none", image, "0", strength, 0.0, end, "latent_anchor", vae).result
        assert isinstance(p[0][1]["control"], LatentAnchorControl)
        return _ksample(video_model, p, n, steps=4)

    target = vae.encode(image)[0]
    full = anchored()
    # With x0 of frame 0 fixed to the latent at every step, a first-order sampler lands on it.
    assert torch.allclose(full[0], target, atol=1e-4)
    assert not torch.allclose(plain[0], target, atol=1e-2)
    assert not torch.allclose(full[1:], plain[1:], atol=1e-4)  # other frames see it through temporal attention
    half = anchored(strength=0.5)
    assert not torch.allclose(half[0], target, atol=1e-3) and not torch.allclose(half[0], plain[0], atol=1e-3)
    early_only = anchored(end=0.5)
    assert not torch.allclose(early_only[0], target, atol=1e-3) and not torch.allclose(early_only, plain, atol=1e-4)


# --- domain adapter and registration -------------------------------------------------------------
def test_v3_adapter_lora_key_format_is_understood_by_core_lora_loader():
    """AnimateDiff's domain adapter uses diffusers attention-processor LoRA keys; core maps them."""
    model = build_tiny_sd15_model(seed=5)
    gen = torch.Generator().manual_seed(0)
    lora = {}
    names = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora":
            "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora":
            "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0.weight",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_k_lora":
            "diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
    }
    state = model.model.state_dict()
    for name, target in names.items():
        out_f, in_f = state[target].shape
        lora[f"{name}.down.weight"] = torch.randn(4, in_f, generator=gen)
        lora[f"{name}.up.weight"] = torch.randn(out_f, 4, generator=gen)
    loaded = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert set(loaded) == set(names.values())
    patched = model.clone()
    patched.add_patches(loaded, 0.7)
    patched.patch_model()
    try:
        for name, target in names.items():
            delta = lora[f"{name}.up.weight"] @ lora[f"{name}.down.weight"]
            got = patched.model.state_dict()[target]
            assert torch.allclose(got, state[target] + 0.7 * delta, atol=1e-5)
    finally:
        patched.unpatch_model()


def test_node_schema_and_registration():
    import motionclone.nodes as pack_nodes

    schema = ImageCondition.define_schema()
    assert (schema.node_id, schema.display_name, schema.category) == (
        "ImageCondition", "Image Condition (SparseCtrl)", "MotionClone")
    names = [i.id for i in schema.inputs]
    assert names == ["positive", "negative", "sparsectrl_name", "image", "frame_indices", "strength",
                     "start_percent", "end_percent", "mode", "vae"]
    mode = next(i for i in schema.inputs if i.id == "mode")
    assert list(mode.options) == ["sparsectrl", "latent_anchor"]
    extension = asyncio.run(pack_nodes.comfy_entrypoint())
    assert ImageCondition in asyncio.run(extension.get_node_list())
