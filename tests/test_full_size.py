"""The real architecture at small resolution: a full-size SD1.5 UNet (ComfyUI's own SD1.5 config), an
AnimateDiff v3 motion module and an rgb SparseCtrl with the shapes and key names of `v3_sd15_mm.ckpt` and
`v3_sd15_sparsectrl_rgb.ckpt` (random weights, written to disk as float16), loaded through the pack's
own loader nodes; extraction and one guided step run at 64x64 px."""

from __future__ import annotations

import folder_paths
import pytest
import torch

from motionclone.motion_core.comfy_folders import ANIMATEDIFF_MODELS
from motionclone.motion_core.full_size_models import build_sd15_model, write_v3_motion_module, write_v3_sparsectrl
from motionclone.motion_core.guided_sampling import GuidanceSettings, MotionGuidance, attention_layers_of
from motionclone.nodes.image_condition_nodes import ImageCondition
from motionclone.nodes.motion_module_nodes import LoadAnimateDiffMotionModule
from motionclone.nodes.motion_nodes import ExtractSparseMotion

FRAMES, LATENT = 8, 8  # a 64x64 px video: the whole UNet runs, on few positions


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full_size")
    mm = write_v3_motion_module(folder / "v3_sd15_mm.ckpt", seed=2)  # a torch pickle, as downloaded
    sc = write_v3_sparsectrl(folder / "v3_sd15_sparsectrl_rgb.safetensors", seed=3)
    return folder, mm, sc


@pytest.fixture(scope="module")
def model(files):
    folder, _, _ = files
    base = build_sd15_model(seed=0)
    paths, exts = folder_paths.folder_names_and_paths[ANIMATEDIFF_MODELS]
    folder_paths.folder_names_and_paths[ANIMATEDIFF_MODELS] = ([str(folder), *paths], exts)
    try:
        (video_model,) = LoadAnimateDiffMotionModule.execute(base, "v3_sd15_mm.ckpt").result
    finally:
        folder_paths.folder_names_and_paths[ANIMATEDIFF_MODELS] = (paths, exts)
    return video_model


def test_the_v3_motion_module_loads_with_the_inferred_config(model):
    from motionclone.motion_core.injection import INFO_KEY

    info = model.model_options["transformer_options"][INFO_KEY]["info"]
    assert (info.name, info.version, info.block_out_channels, info.layers_per_block, info.transformer_layers,
            info.max_frames, info.has_mid_block) == ("v3_sd15_mm.ckpt", "v2/v3", (320, 640, 1280, 1280), (2, 2, 2, 2),
                                                     1, 32, True)
    layers = attention_layers_of(model)
    up1 = [name for name in layers if name.startswith("up_blocks.1.")]
    assert up1 == [f"up_blocks.1.motion_modules.{m}.transformer_blocks.0.attn{a}" for m in range(3) for a in (1, 2)]
    assert len(layers) == 2 * (2 * 4 + 3 * 4 + 1)  # two temporal attentions per module, 21 modules
    injected = dict(model.object_patches)
    block = next(b for b in injected.values() if hasattr(b, "motion_module")
                 and b.motion_module.name == "up_blocks.1.motion_modules.0")
    attn = block.motion_module.module.transformer_blocks[0].attn1
    assert (attn.to_q.in_features, attn.heads, block.motion_module.max_frames) == (1280, 8, 32)


def test_extraction_and_one_guided_step_run(model, files):
    import comfy.sample

    _, _, sc = files
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    positive, negative = [[context, {}]], [[torch.zeros(1, 77, 768), {}]]
    reference = torch.randn(FRAMES, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1))
    (motion,) = ExtractSparseMotion.execute(model, timestep=400, seed=0, top_k=1, layers="up_blocks.1",
                                            latent={"samples": reference}, positive=positive).result
    assert motion.values[motion.layers[0]].shape == (4, 8, FRAMES, 1)  # 8x8 latent -> 2x2 at up_blocks.1
    guidance = MotionGuidance(motion, GuidanceSettings(2000.0, guided_steps=1, warmup=0, cooldown=0))
    latent = torch.zeros(FRAMES, 4, LATENT, LATENT)
    with torch.inference_mode():  # as ComfyUI runs a prompt: weights the loader made are inference tensors
        out = comfy.sample.sample(guidance.patch(model), comfy.sample.prepare_noise(latent, 0), 2, 8.5, "ddim",
                                  "ddim_uniform", positive, negative, latent, seed=0, disable_pbar=True)
    assert torch.isfinite(out).all() and len(guidance.losses) == 1


def test_the_v3_sparsectrl_loads_through_image_condition(files, monkeypatch):
    folder, _, _ = files
    paths, exts = folder_paths.folder_names_and_paths["controlnet"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnet", ([str(folder), *paths], exts))
    from motionclone.motion_core.sparsectrl import SparseCtrlControl

    class Vae:  # the rgb variant encodes the image; only the shape matters here
        def encode(self, pixels):
            return torch.zeros(pixels.shape[0], 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

    pos, neg = [[torch.zeros(1, 77, 768), {}]], [[torch.zeros(1, 77, 768), {}]]
    out_pos, _ = ImageCondition.execute(pos, neg, "v3_sd15_sparsectrl_rgb.safetensors", torch.rand(1, 64, 64, 3),
                                        "0", 1.0, 0.0, 1.0, "sparsectrl", Vae()).result
    control = out_pos[0][1]["control"]
    assert isinstance(control, SparseCtrlControl)
    assert (control.info.variant, control.info.block_out_channels, control.info.cross_attention_dim,
            control.info.max_frames) == ("rgb", (320, 640, 1280, 1280), 768, 32)
