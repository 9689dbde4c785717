"""Wan benchmark pieces (run through `scripts/benchmark.py wan`).

A random-weight native ComfyUI Wan with Wan 2.1 1.3B's widths (dim 1536, 12 heads of 128, ffn 8960,
text 4096 with 512 text tokens) but only a few blocks, float32 on the CPU, each measurement in a fresh
process: one plain CFG Euler step, one guided step (the optimisation's iterations, then the CFG step),
and the extraction, with their peak allocations above the loaded model (memory_estimate.peak_bytes).
Per-block figures are what scale: `estimate_13b` extrapolates them to 30 blocks at 480x832x81.
"""

from __future__ import annotations

import math
import time
from typing import Any

WIDTHS = {"dim": 1536, "num_heads": 12, "ffn_dim": 8960, "freq_dim": 256, "text_dim": 4096}
TEXT_TOKENS = 512  # Wan pads umT5 prompts to 512 tokens
GRID_13B = (21, 30, 52)  # Wan 2.1 1.3B at 480x832x81: 21 latent frames of 30 x 52 tokens


def _model(blocks: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    import comfy.model_management

    from motionclone.motion_core.dit.wan_tiny import build_tiny_wan_model

    model = build_tiny_wan_model(seed=0, num_layers=blocks, **WIDTHS)
    comfy.model_management.load_models_gpu([model])
    return model


def worker(mode: str, frames: int, height: int, width: int, blocks: int, iterations: int,
           threads: int) -> dict[str, Any]:
    """mode plain: one CFG Euler step; guided: the same step with Wan guidance on it (one guided step of
    `iterations` Adam iterations against block blocks // 2); extract: the reference's motion."""
    import comfy.sample
    import comfy.samplers
    import torch

    from motionclone.motion_core.dit.wan_guidance import WanGuidanceSettings, WanMotionGuidance
    from motionclone.motion_core.dit.wan_motion import extract_wan_motion
    from motionclone.motion_core.memory_estimate import peak_bytes

    model = _model(blocks, threads)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, frames, height, width, generator=gen)
    context = torch.randn(1, TEXT_TOKENS, WIDTHS["text_dim"], generator=gen) * 0.1
    block = blocks // 2
    out: dict[str, Any] = {"mode": mode, "frames": frames, "height": height, "width": width,
                           "tokens": frames * (height // 2) * (width // 2), "blocks": blocks, "block": block}
    holder = {}

    def extract():
        holder["motion"] = extract_wan_motion(model, latent, context, [block], sigma=0.0, seed=0)

    t0 = time.perf_counter()
    out["extract_peak"] = peak_bytes(extract, torch.device("cpu"))
    out["extract_s"] = time.perf_counter() - t0
    if mode == "extract":
        return out
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 50)[:2]  # the first step of 50
    positive, negative = [[context, {}]], [[torch.zeros_like(context), {}]]
    noise = comfy.sample.prepare_noise(latent, 0)
    patched = model
    if mode == "guided":
        guidance = WanMotionGuidance(holder["motion"], WanGuidanceSettings(guided_steps=1, iterations=iterations))
        patched = guidance.patch(model)

    def step() -> None:
        with torch.inference_mode():
            comfy.sample.sample_custom(patched, noise, 5.0, comfy.samplers.sampler_object("euler"), sigmas, positive,
                                       negative, torch.zeros_like(latent), seed=0, disable_pbar=True)

    t0 = time.perf_counter()
    out["peak_bytes"] = peak_bytes(step, torch.device("cpu"))
    out["step_s"] = time.perf_counter() - t0
    if mode == "guided":  # one optimisation iteration alone: the forward to the guided block and its backward
        from motionclone.motion_core.dit.wan_capture import differentiable_kernels

        def iteration() -> None:
            with torch.enable_grad(), differentiable_kernels():
                x = (noise * sigmas[0]).requires_grad_(True)
                guidance.motion_loss(model.model, x, float(sigmas[0]), context).backward()

        out["iteration_peak"] = peak_bytes(iteration, torch.device("cpu"))
    return out


def estimate_13b(small: dict[str, dict[str, Any]], large: dict[str, dict[str, Any]],
                 iterations: int) -> dict[str, float]:
    """Wan 1.3B at 480x832x81 (21 x 30 x 52 = 32,760 tokens, 30 blocks, guided block 14), from two measured sizes.

    Memory: the peak of an optimisation iteration is linear in tokens (SDPA attention, checkpointed blocks,
    streamed AMF):
    the two sizes give its slope (bytes per token, at 1.3B's width), which holds the inputs the
    checkpointed blocks keep (`block` of them, dim floats per token each) and one block's recompute. 1.3B
    keeps 14 such inputs instead of `block`: the slope gets (14 - block) * dim * 4 more bytes per token.
    Time: per optimisation iteration the guided step adds a forward of the conditional branch to the guided
    block, its recompute and a backward (input gradients only); measured in plain steps (two full
    forwards) on this model, taken to 15 of 30 blocks by the path's share of the model."""
    dim = WIDTHS["dim"]
    tokens = math.prod(GRID_13B)
    block, blocks = large["plain"]["block"], large["plain"]["blocks"]
    dn = large["plain"]["tokens"] - small["plain"]["tokens"]
    slope = (large["guided"]["iteration_peak"] - small["guided"]["iteration_peak"]) / dn
    slope_13b = slope + (14 - block) * dim * 4
    per_iteration = (large["guided"]["step_s"] / large["plain"]["step_s"] - 1.0) / iterations
    per_iteration_13b = per_iteration * (15 / 30) / ((block + 1) / blocks)
    step_ratio = 1.0 + iterations * per_iteration_13b
    return {"tokens": tokens, "slope": slope, "guided_activations_gb": slope_13b * tokens / 1024**3,
            "step_ratio": step_ratio, "generation_ratio": (40 + 10 * step_ratio) / 50}


def block_flops(tokens: int, dim: int = WIDTHS["dim"], ffn: int = WIDTHS["ffn_dim"],
                text: int = TEXT_TOKENS) -> float:
    """Multiply-adds x 2 of one Wan block's forward: q, k, v, o and the cross-attention's q, o on the video
    tokens, k, v on the text; the feed-forward; self-attention logits and values (tokens^2 each)."""
    linear = tokens * (6 * dim * dim + 2 * dim * ffn) + text * 2 * dim * dim
    return 2.0 * (linear + 2 * tokens * tokens * dim)


def amf_cost(frames: int, threads: int, span: int = 4) -> dict[str, Any]:
    """Seconds of the soft AMF's forward and backward (streamed per frame pair, checkpointed) at the 1.3B token
    grid per frame (30 x 52, 12 heads of 128) over `frames` latent frames, for all pairs and for FastVMT's forward
    pairs within `span`; per pair, and scaled to 480x832x81 (441 and 78 pairs) beside the FLOPs of the 15 blocks
    an optimisation iteration runs forward (to block 14)."""
    import torch

    from motionclone.motion_core.dit.amf import frame_pairs, soft_amf

    torch.set_num_threads(threads)
    _, h, w = GRID_13B
    grid = (frames, h, w)
    gen = torch.Generator().manual_seed(0)
    heads, head_dim = WIDTHS["num_heads"], WIDTHS["dim"] // WIDTHS["num_heads"]
    q = torch.randn(1, frames * h * w, heads, head_dim, generator=gen).requires_grad_(True)
    k = torch.randn(1, frames * h * w, heads, head_dim, generator=gen).requires_grad_(True)
    out: dict[str, Any] = {"frames": frames, "grid": [h, w]}
    for name, pairs in (("all", frame_pairs(frames)), ("forward", frame_pairs(frames, span))):
        soft_amf(q, k, grid, pairs[:1]).sum().backward()  # warm-up
        t0 = time.perf_counter()
        soft_amf(q, k, grid, pairs).square().mean().backward()
        seconds = time.perf_counter() - t0
        out[name] = {"pairs": len(pairs), "s": seconds, "per_pair_s": seconds / len(pairs)}
    f13, _, _ = GRID_13B
    out["pairs_13b"] = {"all": len(frame_pairs(f13)), "forward": len(frame_pairs(f13, span))}
    tokens = f13 * h * w
    pair_flops = 2.0 * (h * w) ** 2 * WIDTHS["dim"]  # the logits of one pair block
    # An iteration: 15 blocks forward, their recompute and backward (about 4x a forward); the AMF likewise ~3x.
    out["share_13b"] = {name: 3 * n * pair_flops / (4 * 15 * block_flops(tokens))
                        for name, n in out["pairs_13b"].items()}
    return out
