"""AnimateDiff motion modules: loading original files, injection into ComfyUI, isolation."""

from __future__ import annotations

import pickle

import pytest
import safetensors.torch
import torch
from diffusers import MotionAdapter

from motionclone.motion_core.attention_capture import CaptureState
from motionclone.motion_core.injection import CAPTURE_KEY, MotionModuleLayer, apply_motion_modules, install_processors
from motionclone.motion_core.motion_module import (
    MotionModuleError,
    from_diffusers_state_dict,
    load_motion_adapter,
)
from motionclone.motion_core.tiny_models import (
    TINY_MOTION_CHANNELS,
    build_tiny_sd15_model,
    init_weights_,
    write_tiny_motion_module,
)

FRAMES = 6


def _direct_adapter(seed: int, **config) -> MotionAdapter:
    adapter = MotionAdapter(block_out_channels=TINY_MOTION_CHANNELS, **config)
    init_weights_(adapter, seed)
    return adapter.eval()


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_sd15_model(seed=1)


@pytest.fixture(scope="module")
def mm_path(tmp_path_factory):
    return write_tiny_motion_module(tmp_path_factory.mktemp("mm") / "tiny_mm.safetensors", seed=2)


def _patched(model, path):
    adapter, info = load_motion_adapter(path)
    return apply_motion_modules(model, adapter, info, install_processors(adapter))


def _run(model, x, cond_or_uncond=(0,), sigma=1.0, **options):
    """One UNet call with the model's transformer_options merged in, as calc_cond_batch does."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    n = x.shape[0]
    context = torch.linspace(-1, 1, 7 * 32).reshape(1, 7, 32).expand(n, -1, -1)
    transformer_options = {**model.model_options["transformer_options"], "cond_or_uncond": list(cond_or_uncond)}
    with torch.no_grad():
        return model.model.apply_model(
            x, torch.full((n,), sigma), c_crossattn=context, transformer_options={**transformer_options, **options}
        )


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("mid_block,max_frames", [(True, 32), (False, 24)])  # v2/v3-like, v1-like
def test_original_format_loads_equal_to_directly_built_diffusers(tmp_path, suffix, mid_block, max_frames):
    direct = _direct_adapter(3, use_motion_mid_block=mid_block, motion_max_seq_length=max_frames)
    path = str(tmp_path / f"mm{suffix}")
    original = from_diffusers_state_dict({k: v.clone().contiguous() for k, v in direct.state_dict().items()})
    assert any(".temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe" in k for k in original)
    if suffix == ".safetensors":
        safetensors.torch.save_file(original, path)
    else:
        torch.save(original, path)

    loaded, info = load_motion_adapter(path)
    assert info.has_mid_block is mid_block and info.max_frames == max_frames
    assert info.block_out_channels == TINY_MOTION_CHANNELS and info.layers_per_block == (2, 2, 2, 2)
    loaded_sd, direct_sd = loaded.state_dict(), direct.state_dict()
    assert loaded_sd.keys() == direct_sd.keys()
    assert all(torch.equal(loaded_sd[k], direct_sd[k]) for k in direct_sd)

    layers = install_processors(loaded)
    assert len(layers) == 2 * (8 + 12 + int(mid_block))  # two temporal attentions per motion module
    x = torch.randn(2 * FRAMES, 128, 4, 4)
    ref = direct.up_blocks[1].motion_modules[2]
    ours = loaded.up_blocks[1].motion_modules[2]
    with torch.no_grad():
        expected = ref(x, num_frames=FRAMES)
        torch.testing.assert_close(ours(x, num_frames=FRAMES), expected, rtol=1e-5, atol=1e-5)
        # The capture path (explicit softmax) computes the same attention.
        state = CaptureState(["up_blocks.1.motion_modules.2.transformer_blocks.0.attn1"])
        torch.testing.assert_close(
            ours(x, num_frames=FRAMES, cross_attention_kwargs={"motionclone": state}), expected, rtol=1e-5, atol=1e-5
        )
    probs = state.probs["up_blocks.1.motion_modules.2.transformer_blocks.0.attn1"]
    assert probs.shape == (2 * 4 * 4, 8, FRAMES, FRAMES)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_temporal_attention_mixes_frames_only_with_motion_modules(tiny_model, mm_path):
    patched = _patched(tiny_model, mm_path)
    x = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x_changed = x.clone()
    x_changed[3] += 0.5
    plain_delta = (_run(tiny_model, x_changed) - _run(tiny_model, x))[5].abs().max()
    patched_delta = (_run(patched, x_changed) - _run(patched, x))[5].abs().max()
    assert plain_delta == 0  # the image UNet treats frames independently
    assert patched_delta > 1e-3
    # ... and frame 3 itself changes in both
    assert (_run(tiny_model, x_changed) - _run(tiny_model, x))[3].abs().max() > 0


def test_cond_and_uncond_chunks_do_not_mix(tiny_model, mm_path):
    patched = _patched(tiny_model, mm_path)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(FRAMES, 4, 16, 16, generator=gen), torch.randn(FRAMES, 4, 16, 16, generator=gen)
    both = _run(patched, torch.cat([a, b]), cond_or_uncond=(1, 0))
    torch.testing.assert_close(both[:FRAMES], _run(patched, a), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[FRAMES:], _run(patched, b), rtol=1e-4, atol=1e-5)
    # Treated as one 12-frame video instead, the halves would influence each other.
    assert not torch.allclose(_run(patched, torch.cat([a, b]))[:FRAMES], both[:FRAMES], atol=1e-5)


def test_original_model_untouched_after_sampling(tiny_model, mm_path):
    import comfy.sample
    import comfy.samplers

    x = torch.randn(FRAMES, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    before = _run(tiny_model, x)
    sd_before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    patched = _patched(tiny_model, mm_path)
    cond = [[torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3)), {}]]
    latent = torch.zeros(FRAMES, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(patched, noise, 3, 5.0, "euler", "normal", cond, cond, latent, denoise=1.0, seed=0)
    assert out.shape == latent.shape and torch.isfinite(out).all()

    after = _run(tiny_model, x)
    assert torch.equal(before, after)
    assert not any(isinstance(m, MotionModuleLayer) for m in tiny_model.model.modules())
    sd_after = tiny_model.model.state_dict()
    assert sd_after.keys() == sd_before.keys()
    assert all(torch.equal(sd_after[k], sd_before[k]) for k in sd_before)
    assert not tiny_model.object_patches and "forward_timestep_embed_patch" not in str(tiny_model.model_options)


def test_model_size_counts_the_motion_modules(tiny_model, mm_path):
    # ComfyUI reserves memory and decides offloading from model_size(); the motion weights must be in it.
    adapter, info = load_motion_adapter(mm_path)
    base = tiny_model.model_size()
    patched = apply_motion_modules(tiny_model, adapter, info, install_processors(adapter))
    motion_bytes = sum(t.nbytes for t in adapter.state_dict().values())  # every module of it is injected
    assert motion_bytes > 0
    assert patched.model_size() == base + motion_bytes
    assert patched.clone().model_size() == patched.model_size()
    assert tiny_model.model_size() == base  # the input MODEL is not changed


def test_capture_request_travels_through_transformer_options(tiny_model, mm_path):
    patched = _patched(tiny_model, mm_path)
    name = "up_blocks.1.motion_modules.0.transformer_blocks.0.attn2"
    state = CaptureState([name])
    _run(patched, torch.randn(2 * FRAMES, 4, 16, 16), cond_or_uncond=(0, 1), **{CAPTURE_KEY: state})
    # 16x16 latent -> 4x4 tokens at up level 1; two chunks of FRAMES frames each.
    assert state.probs[name].shape == (2 * 4 * 4, 8, FRAMES, FRAMES)


def test_too_many_frames_is_a_clear_error(tiny_model, tmp_path):
    path = write_tiny_motion_module(tmp_path / "short.safetensors", max_frames=4)
    with pytest.raises(ValueError, match="5 frames in the latent batch, but the motion module supports at most 4"):
        _run(_patched(tiny_model, path), torch.randn(5, 4, 16, 16))


def test_bad_files_give_clear_errors(tiny_model, tmp_path):
    not_mm = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(not_mm))
    with pytest.raises(MotionModuleError, match=r"lora\.safetensors is not an AnimateDiff motion module"):
        load_motion_adapter(not_mm)

    garbage = tmp_path / "broken.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(MotionModuleError, match=r"broken\.ckpt: cannot be read"):
        load_motion_adapter(garbage)

    class Evil:
        def __reduce__(self):
            return (print, ("pickles must not run",))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(MotionModuleError, match=r"evil\.ckpt: cannot be read"):  # weights_only refuses it
        load_motion_adapter(evil)

    sparsectrl = tmp_path / "v3_sd15_sparsectrl_rgb.safetensors"
    safetensors.torch.save_file({"controlnet_cond_embedding.weight": torch.zeros(2, 2)}, str(sparsectrl))
    with pytest.raises(MotionModuleError, match="SparseCtrl ControlNet, not a motion module"):
        load_motion_adapter(sparsectrl)

    with pytest.raises(MotionModuleError, match="not found"):
        load_motion_adapter(tmp_path / "missing.ckpt")


def test_module_that_does_not_fit_the_model_is_refused(tiny_model, tmp_path):
    sdxl_like = write_tiny_motion_module(tmp_path / "mm_sdxl.safetensors", block_out_channels=(32, 64, 128))
    with pytest.raises(MotionModuleError, match=r"mm_sdxl\.safetensors does not fit this model: .*3 down blocks.*SDXL"):
        _patched(tiny_model, sdxl_like)
    wide = write_tiny_motion_module(tmp_path / "mm_wide.safetensors", block_out_channels=(64, 128, 256, 256))
    with pytest.raises(MotionModuleError, match=r"mm_wide\.safetensors does not fit.*64 channels but the UNet's"):
        _patched(tiny_model, wide)
    # Applying twice would put two modules in each block.
    patched = _patched(tiny_model, write_tiny_motion_module(tmp_path / "ok.safetensors"))
    with pytest.raises(MotionModuleError, match="already has motion modules"):
        _patched(patched, tmp_path / "ok.safetensors")


def test_loader_node_lists_folder_and_applies(tiny_model, mm_path, tmp_path):
    import shutil

    import folder_paths

    from motionclone.motion_core.comfy_folders import ANIMATEDIFF_MODELS
    from motionclone.nodes.motion_module_nodes import LoadAnimateDiffMotionModule

    folder = tmp_path / "animatediff_models"
    folder.mkdir()
    shutil.copy(mm_path, folder / "v3_tiny.safetensors")
    paths = folder_paths.folder_names_and_paths[ANIMATEDIFF_MODELS][0]
    paths.append(str(folder))
    try:
        schema = LoadAnimateDiffMotionModule.define_schema()
        combo = next(i for i in schema.inputs if i.id == "model_name")
        assert "v3_tiny.safetensors" in combo.options
        out = LoadAnimateDiffMotionModule.execute(tiny_model, "v3_tiny.safetensors")
    finally:
        paths.remove(str(folder))
    patched = out.result[0]
    assert patched is not tiny_model and patched.object_patches
    assert "forward_timestep_embed_patch" in patched.model_options["transformer_options"]["patches"]


def test_dtype_move_inside_inference_mode_keeps_weights_usable_for_autograd(tmp_path):
    adapter, info = load_motion_adapter(write_tiny_motion_module(tmp_path / "mm.safetensors"))
    install_processors(adapter)
    layer = MotionModuleLayer(adapter.up_blocks[1].motion_modules[0], "up_blocks.1.motion_modules.0", 32)
    with torch.inference_mode():  # as in a ComfyUI prompt, the UNet asks for float64 here
        layer(torch.randn(4, 128, 2, 2, dtype=torch.float64), frames=4)
    assert not any(p.is_inference() for p in layer.parameters())
    x = torch.randn(4, 128, 2, 2, dtype=torch.float64, requires_grad=True)
    layer(x, frames=4).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
