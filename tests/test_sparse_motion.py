"""SparseMotion: top-k extraction, safetensors round trip, compatibility checks, sizes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from motionclone.motion_core.sparse_motion import (
    MotionFileError,
    MotionMismatchError,
    SparseMotion,
    positions_per_video,
)

LAYERS = [
    "up_blocks.1.motion_modules.0.transformer_blocks.0.attn1",
    "up_blocks.1.motion_modules.0.transformer_blocks.0.attn2",
]


def random_probs(shape_by_layer: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=torch.float32).softmax(-1)
            for name, shape in shape_by_layer.items()}


def make_motion(frames: int = 6, top_k: int = 1, s: int = 12, heads: int = 2) -> SparseMotion:
    probs = random_probs({name: (s, heads, frames, frames) for name in LAYERS})
    # up_blocks.1 sees a quarter of the latent per side: 16x12 -> 4x3 = 12 positions
    return SparseMotion.from_probs(probs, top_k=top_k, frames=frames, latent_height=16, latent_width=12,
                                   timestep=400, model_fingerprint="abc123", extra={"source": "test.mp4"})


def test_from_probs_keeps_row_maxima():
    frames = 5
    probs = random_probs({LAYERS[0]: (7, 3, frames, frames)}, seed=1)
    m = SparseMotion.from_probs(probs, frames=frames, latent_height=2, latent_width=2, timestep=400,
                                model_fingerprint="x")
    p = probs[LAYERS[0]]
    assert m.layers == [LAYERS[0]] and m.tokens == {LAYERS[0]: 7}
    assert m.values[LAYERS[0]].dtype == torch.float16 and m.indices[LAYERS[0]].dtype == torch.uint8
    assert m.values[LAYERS[0]].shape == (7, 3, frames, 1)
    for s in range(7):
        for h in range(3):
            for f in range(frames):
                row = p[s, h, f].tolist()
                j = max(range(frames), key=row.__getitem__)
                assert int(m.indices[LAYERS[0]][s, h, f, 0]) == j
                assert float(m.values[LAYERS[0]][s, h, f, 0]) == float(torch.tensor(row[j]).half())


def test_from_probs_top_k_sorted_and_layer_order():
    m = make_motion(frames=6, top_k=3)
    assert m.layers == LAYERS
    v = m.values[LAYERS[1]].float()
    assert v.shape[-1] == 3 and bool((v[..., :-1] >= v[..., 1:]).all())


def test_from_probs_refuses_bad_input():
    with pytest.raises(ValueError, match="at most 256 frames"):
        SparseMotion.from_probs({"a": torch.full((1, 1, 257, 257), 1 / 257)}, frames=257, latent_height=1,
                                latent_width=1, timestep=400, model_fingerprint="")
    with pytest.raises(ValueError, match=r"\[S, heads, 4, 4\]"):
        SparseMotion.from_probs({"a": torch.ones(2, 1, 4, 3)}, frames=4, latent_height=1, latent_width=1,
                                timestep=400, model_fingerprint="")
    with pytest.raises(ValueError, match="top_k"):
        SparseMotion.from_probs({"a": torch.ones(2, 1, 4, 4)}, top_k=5, frames=4, latent_height=1,
                                latent_width=1, timestep=400, model_fingerprint="")


def test_save_load_round_trip(tmp_path):
    m = make_motion(frames=6, top_k=2)
    path = tmp_path / "walk.motion.safetensors"
    m.save(path)
    loaded = SparseMotion.load(path)
    assert loaded.layers == m.layers
    for name in m.layers:
        assert torch.equal(loaded.values[name], m.values[name])
        assert torch.equal(loaded.indices[name], m.indices[name])
    for attr in ("frames", "latent_height", "latent_width", "timestep", "top_k", "model_fingerprint",
                 "format_version", "extra", "tokens"):
        assert getattr(loaded, attr) == getattr(m, attr), attr


def test_load_refuses_other_safetensors(tmp_path):
    path = tmp_path / "some_lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(MotionFileError, match="some_lora.safetensors is not a MotionClone motion file"):
        SparseMotion.load(path)


def test_load_refuses_non_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(MotionFileError, match="notes.safetensors is not a MotionClone motion file"):
        SparseMotion.load(path)


def test_load_refuses_newer_format(tmp_path):
    m = make_motion()
    m.format_version = 99
    path = tmp_path / "future.safetensors"
    m.save(path)
    with pytest.raises(MotionFileError, match="future.safetensors: motion format version 99"):
        SparseMotion.load(path)


def test_check_compatible():
    m = make_motion(frames=6)
    m.check_compatible(6, 16, 12, LAYERS + ["down_blocks.0.other"])  # superset of layers is fine
    m.check_compatible(6, 16, 12)
    with pytest.raises(MotionMismatchError, match="MOTION has 6 frames but the latent batch has 8"):
        m.check_compatible(8, 16, 12)
    with pytest.raises(MotionMismatchError, match=r"16x12 latents \(128x96 px\) but the latent is 8x8"):
        m.check_compatible(6, 8, 8)
    with pytest.raises(MotionMismatchError, match=f"not found in the model: {LAYERS[1]}"):
        m.check_compatible(6, 16, 12, LAYERS[:1])
    with pytest.raises(ValueError):  # MotionMismatchError is a ValueError for generic callers
        m.check_compatible(6, 16, 16)


def test_positions_per_layer_follow_the_unet_levels():
    assert positions_per_video("up_blocks.1.motion_modules.0.transformer_blocks.0.attn1", 64, 64) == 256  # 512 px
    assert positions_per_video("down_blocks.0.motion_modules.1.x", 63, 65) == 63 * 65
    assert positions_per_video("down_blocks.2.motion_modules.0.x", 9, 9) == 9  # ceil(9 / 4) = 3 per side
    assert positions_per_video("mid_block.motion_modules.0.x", 64, 64) == 64
    assert positions_per_video("up_blocks.3.motion_modules.2.x", 20, 12) == 240
    assert positions_per_video("up_blocks.0.motion_modules.0.x", 17, 8) == 3
    assert positions_per_video("something.else", 64, 64) is None


def test_load_refuses_metadata_that_does_not_fit_the_tensors(tmp_path):
    import json

    from safetensors import safe_open

    m = make_motion(frames=6)
    path = tmp_path / "edited.motion.safetensors"
    m.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for h, w in ((8, 6), (32, 24), (16, 16)):  # 2x2 (a divisor: would have been folded as 3 videos), 8x6, 4x4
        info = json.loads(meta["motion"]) | {"latent_height": h, "latent_width": w}
        save_file(tensors, str(path), metadata={**meta, "motion": json.dumps(info)})
        with pytest.raises(MotionFileError, match=f"stores 12 spatial positions, but the {h}x{w} latent"):
            SparseMotion.load(path)


def test_invalid_construction():
    m = make_motion(frames=6)
    bad = dict(m.indices)
    bad[LAYERS[0]] = torch.full_like(bad[LAYERS[0]], 6)
    with pytest.raises(ValueError, match="frame index 6"):
        SparseMotion(values=m.values, indices=bad, frames=6, latent_height=16, latent_width=12, layers=LAYERS,
                     timestep=400, top_k=1)
    with pytest.raises(ValueError, match="keys"):
        SparseMotion(values=m.values, indices=m.indices, frames=6, latent_height=16, latent_width=12,
                     layers=LAYERS[:1], timestep=400, top_k=1)


def test_sizes():
    frames = 16
    m = make_motion(frames=frames, top_k=1, s=16, heads=8)
    # top-1: fp16 value + uint8 index = 3 bytes per row vs 2 * F bytes per dense row.
    assert m.dense_nbytes() == len(LAYERS) * 16 * 8 * frames * frames * 2
    assert m.nbytes() == len(LAYERS) * 16 * 8 * frames * 3
    assert m.nbytes() <= 1.5 * m.dense_nbytes() / frames
    assert m.values[LAYERS[0]].nbytes <= m.dense_nbytes() / len(LAYERS) / frames


def test_reference_size_figure():
    # Method doc: six maps [256, 8, 16, 16] at 512 px -> about 0.6 MB stored.
    layers = [f"up_blocks.1.motion_modules.{i}.transformer_blocks.0.attn{j}" for i in range(3) for j in (1, 2)]
    m = SparseMotion(values={n: torch.zeros(256, 8, 16, 1, dtype=torch.float16) for n in layers},
                     indices={n: torch.zeros(256, 8, 16, 1, dtype=torch.uint8) for n in layers},
                     frames=16, latent_height=64, latent_width=64, layers=layers, timestep=400, top_k=1)
    assert m.nbytes() == 589_824


def test_to_device_copies_metadata():
    m = make_motion()
    m2 = m.to("cpu")
    assert m2.layers == m.layers and m2.extra == m.extra and m2.extra is not m.extra
