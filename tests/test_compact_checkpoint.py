"""Compact checkpoints: tiny SD1.5-architecture MODEL/CLIP/VAE through stock ComfyUI nodes."""

from __future__ import annotations

import json

import comfy.model_patcher
import comfy.sd
import folder_paths
import pytest
import safetensors.torch
import torch

import nodes as comfy_nodes  # ComfyUI's nodes.py (conftest keeps our nodes/ package off sys.path)
from motionclone.motion_core.compact_checkpoint import (
    ARCHITECTURE_METADATA_KEY,
    TINY_CLIP_CONFIG,
    load_compact_checkpoint,
    read_architecture,
    save_compact_checkpoint,
    tiny_architecture,
    tiny_wan_architecture,
    write_tiny_checkpoint,
    write_tiny_wan_checkpoint,
)
from motionclone.nodes.checkpoint_nodes import LoadCompactCheckpoint


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_path):
    return load_compact_checkpoint(tiny_path)


def _encode(clip, text: str):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def _unet_out(model, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([5.0, 1.0]), c_crossattn=context)


def _rewrite(src, dst, *, tensors=None, metadata=None):
    sd = safetensors.torch.load_file(str(src))
    sd.update(tensors or {})
    sd = {k: v for k, v in sd.items() if v is not None}
    safetensors.torch.save_file(sd, str(dst), metadata=metadata)
    return dst


def test_file_layout_and_metadata(tiny_path):
    sd = safetensors.torch.load_file(str(tiny_path))
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"model", "cond_stage_model", "first_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd
    assert sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 32)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in sd)
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert tiny_path.stat().st_size < 30e6
    assert read_architecture(tiny_path) == tiny_architecture()
    assert tiny_architecture()["clip"] == TINY_CLIP_CONFIG


def test_loads_real_comfy_objects(loaded):
    model, clip, vae = loaded
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(clip, comfy.sd.CLIP)
    assert isinstance(vae, comfy.sd.VAE)
    assert model.model.diffusion_model.model_channels == 32


def test_clip_encode_gives_tiny_conditioning(loaded):
    _, clip, _ = loaded
    cond = _encode(clip, "a cat walking on grass")
    other = _encode(clip, "a red car")
    assert cond[0][0].shape == (1, 77, 32)
    assert torch.isfinite(cond[0][0]).all()
    assert not torch.allclose(cond[0][0], other[0][0])  # the prompt reaches the text encoder


def test_ksampler_and_vae_on_four_frames(loaded):
    model, clip, vae = loaded
    latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 4)[0]
    positive, negative = _encode(clip, "a cat"), _encode(clip, "")
    out = comfy_nodes.KSampler().sample(model, 0, 2, 7.0, "euler", "normal", positive, negative, latent)[0]
    samples = out["samples"]
    assert samples.shape == (4, 4, 8, 8)
    assert torch.isfinite(samples).all()

    images = comfy_nodes.VAEDecode().decode(vae, out)[0]
    assert images.shape == (4, 64, 64, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.0

    encoded = comfy_nodes.VAEEncode().encode(vae, images.detach())[0]["samples"]
    assert encoded.shape == (4, 4, 8, 8)
    assert torch.isfinite(encoded).all()


def test_save_load_round_trip(tiny_path, loaded, tmp_path):
    model, clip, vae = loaded
    copy_path = save_compact_checkpoint(tmp_path / "copy.safetensors", model, clip, vae, read_architecture(tiny_path))
    first = safetensors.torch.load_file(str(tiny_path))
    second = safetensors.torch.load_file(str(copy_path))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key].float(), second[key].float()), key

    model2, clip2, vae2 = load_compact_checkpoint(copy_path)
    assert torch.equal(_unet_out(model), _unet_out(model2))
    assert torch.equal(_encode(clip, "a dog")[0][0], _encode(clip2, "a dog")[0][0])
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(vae.decode(latent), vae2.decode(latent))


def test_v_prediction_round_trip(loaded, tmp_path):
    """A v-prediction model saves with ComfyUI's `v_pred` marker and loads back as V_PREDICTION."""
    import comfy.model_base

    from motionclone.motion_core.tiny_models import build_tiny_sd15_model

    model, clip, vae = loaded
    arch = tiny_architecture() | {"prediction": "v"}
    unet_sd = {k: v.float() for k, v in model.model.diffusion_model.state_dict().items()}
    v_model = build_tiny_sd15_model(unet_config=arch["unet"], state_dict=unet_sd, prediction="v")
    path = save_compact_checkpoint(tmp_path / "v.safetensors", v_model, clip, vae, arch)
    assert "v_pred" in safetensors.torch.load_file(str(path))
    reloaded, _clip, _vae = load_compact_checkpoint(path)
    assert reloaded.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    # Same UNet weights, other parameterisation: the same raw output, another denoised estimate.
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(model.model.diffusion_model(x, t, context), reloaded.model.diffusion_model(x, t, context))
    assert not torch.allclose(_unet_out(model), _unet_out(reloaded))

    bad = _rewrite(path, tmp_path / "x.safetensors",
                   metadata={ARCHITECTURE_METADATA_KEY: json.dumps(arch | {"prediction": "x0"})})
    with pytest.raises(ValueError, match="'prediction' must be one of"):
        load_compact_checkpoint(bad)


def test_tiny_checkpoint_is_seeded(tiny_path, tmp_path):
    same = safetensors.torch.load_file(str(write_tiny_checkpoint(tmp_path / "a.safetensors", seed=0)))
    other = safetensors.torch.load_file(str(write_tiny_checkpoint(tmp_path / "b.safetensors", seed=1)))
    reference = safetensors.torch.load_file(str(tiny_path))
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(reference[key], other[key])


def test_non_compact_files_are_rejected_clearly(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="plain.safetensors: not a MotionClone compact checkpoint") as err:
        load_compact_checkpoint(plain)
    assert "CheckpointLoaderSimple" in str(err.value)

    pickled = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}}, pickled)
    with pytest.raises(ValueError, match="old.ckpt: not a MotionClone compact checkpoint"):
        load_compact_checkpoint(pickled)


def test_weights_not_matching_the_architecture(tiny_path, tmp_path):
    metadata = {ARCHITECTURE_METADATA_KEY: json.dumps(tiny_architecture())}
    key = "first_stage_model.encoder.conv_in.weight"
    bad = _rewrite(tiny_path, tmp_path / "bad.safetensors", tensors={key: torch.zeros(16, 3, 3, 3)}, metadata=metadata)
    expected = r"shape mismatch: first_stage_model\.encoder\.conv_in\.weight is \[16, 3, 3, 3\]"
    with pytest.raises(ValueError, match=expected):
        load_compact_checkpoint(bad)

    key = "model.diffusion_model.out.2.bias"
    gone = _rewrite(tiny_path, tmp_path / "gone.safetensors", tensors={key: None}, metadata=metadata)
    with pytest.raises(ValueError, match=r"1 missing: model\.diffusion_model\.out\.2\.bias"):
        load_compact_checkpoint(gone)

    wider = tiny_architecture()
    wider["clip"]["hidden_size"] = wider["unet"]["context_dim"] = 64
    wide = _rewrite(tiny_path, tmp_path / "wide.safetensors", metadata={ARCHITECTURE_METADATA_KEY: json.dumps(wider)})
    with pytest.raises(ValueError, match="token_embedding.weight is \\[49408, 32\\] in the file, \\[49408, 64\\]"):
        load_compact_checkpoint(wide)

    future = tiny_architecture() | {"format": 2}
    newer = _rewrite(tiny_path, tmp_path / "new.safetensors", metadata={ARCHITECTURE_METADATA_KEY: json.dumps(future)})
    with pytest.raises(ValueError, match="unsupported format 2"):
        load_compact_checkpoint(newer)


def test_node_lists_and_loads_the_file(tiny_path, monkeypatch):
    paths, exts = folder_paths.folder_names_and_paths["checkpoints"]
    # Copies, so the host's folder list and filename cache come back untouched.
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", (list(paths), set(exts)))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    folder_paths.add_model_folder_path("checkpoints", str(tiny_path.parent))

    schema = LoadCompactCheckpoint.define_schema()
    assert schema.node_id == "MotionCloneCompactCheckpointLoader"
    assert schema.category == "MotionClone/loaders"
    assert [i.id for i in schema.inputs] == ["ckpt_name"]
    assert tiny_path.name in schema.inputs[0].options
    assert [o.io_type for o in schema.outputs] == ["MODEL", "CLIP", "VAE"]

    model, clip, vae = LoadCompactCheckpoint.execute(tiny_path.name).result
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert _encode(clip, "x")[0][0].shape == (1, 77, 32)
    assert isinstance(vae, comfy.sd.VAE)


# --- Wan 2.1 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_wan_path(tmp_path_factory):
    return write_tiny_wan_checkpoint(tmp_path_factory.mktemp("wan") / "tiny_wan.safetensors", seed=0)


def test_wan_checkpoint_loads_comfys_own_wan_classes(tiny_wan_path):
    import comfy.ldm.wan.model
    import comfy.ldm.wan.vae
    import comfy.model_base

    architecture = read_architecture(tiny_wan_path)
    assert architecture == tiny_wan_architecture() and architecture["family"] == "wan2.1"
    sd = safetensors.torch.load_file(str(tiny_wan_path))
    assert "model.diffusion_model.head.modulation" in sd and "first_stage_model.decoder.head.0.gamma" in sd
    model, clip, vae = load_compact_checkpoint(tiny_wan_path)
    assert isinstance(model.model, comfy.model_base.WAN21)
    assert isinstance(model.model.diffusion_model, comfy.ldm.wan.model.WanModel)
    # The stored weights are what the model holds (float16 in the file).
    head = sd["model.diffusion_model.head.head.weight"].float()
    assert torch.equal(model.model.diffusion_model.head.head.weight.detach(), head)
    assert isinstance(vae.first_stage_model, comfy.ldm.wan.vae.WanVAE)  # core's own Wan 2.1 VAE detection
    cond = _encode(clip, "a fox")[0][0]
    assert cond.shape[-1] == architecture["unet"]["text_dim"]
    # Wan's VAE: 4k + 1 frames -> k + 1 latent frames, 8x smaller, 16 channels; and back.
    latent = vae.encode(torch.rand(9, 64, 64, 3))
    assert latent.shape == (1, 16, 3, 8, 8) and torch.isfinite(latent).all()
    assert vae.decode(latent).shape[-4:] == (9, 64, 64, 3)


def test_wan_checkpoint_is_seeded_and_checked(tiny_wan_path, tmp_path):
    again = write_tiny_wan_checkpoint(tmp_path / "again.safetensors", seed=0)
    other = write_tiny_wan_checkpoint(tmp_path / "other.safetensors", seed=1)
    first, second = safetensors.torch.load_file(str(tiny_wan_path)), safetensors.torch.load_file(str(again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    key = "model.diffusion_model.head.head.weight"
    assert not torch.equal(first[key], safetensors.torch.load_file(str(other))[key])

    narrow = tiny_wan_architecture()
    narrow["unet"]["text_dim"] = 16
    bad = _rewrite(tiny_wan_path, tmp_path / "narrow.safetensors",
                   metadata={ARCHITECTURE_METADATA_KEY: json.dumps(narrow)})
    with pytest.raises(ValueError, match="clip hidden_size 32 != unet text_dim 16"):
        load_compact_checkpoint(bad)
    unknown = tiny_wan_architecture() | {"family": "wan9"}
    bad = _rewrite(tiny_wan_path, tmp_path / "unknown.safetensors",
                   metadata={ARCHITECTURE_METADATA_KEY: json.dumps(unknown)})
    with pytest.raises(ValueError, match="unknown 'family' 'wan9'"):
        load_compact_checkpoint(bad)
    key = "first_stage_model.decoder.head.0.gamma"
    gone = _rewrite(tiny_wan_path, tmp_path / "gone.safetensors", tensors={key: None},
                    metadata={ARCHITECTURE_METADATA_KEY: json.dumps(tiny_wan_architecture())})
    with pytest.raises(ValueError, match=r"1 missing: first_stage_model\.decoder\.head\.0\.gamma"):
        load_compact_checkpoint(gone)
