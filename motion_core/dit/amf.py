"""Attention motion flow (AMF, DiTFlow): a per-token displacement field read from 3D self-attention.

For a DiT block's self-attention over video tokens (frame-major, token index f*h*w + r*w + c on the
grid (F', h, w)): A = mean over heads of Q_h K_h^T / sqrt(d), averaged *before* any softmax. For an
ordered pair (i, j) of latent frames, P_ij = softmax over frame j's HW keys of tau * A_ij, and the
displacement of query token p of frame i towards frame j, in token units, (column, row) order:

* soft (the generated video, differentiable): sum_q P_ij[p, q] * pos(q) - pos(p);
* argmax (the reference, integer): pos(argmax_q A_ij[p, q]) - pos(p) (tau > 0 does not move it).

The [N, N] map is never formed: the head mean is one product of the heads-concatenated q and k
(q_cat . k_cat / (n * sqrt(d)), exact), and the pairs are streamed, one [HW, HW] block at a time, each
under activation checkpointing, so the backward recomputes a pair's block instead of keeping every
pair's softmax. Plain torch; no ComfyUI imports.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from einops import rearrange

Grid = tuple[int, int, int]  # (F', h, w) of the token grid
Pairs = list[tuple[int, int]]

DITFLOW_TAU = 2.0  # DiTFlow's `motion_temp`: multiplies the logits (sharpens)


def frame_pairs(frames: int, span: int | None = None) -> Pairs:
    """Ordered (query frame i, key frame j) pairs, query-frame-major.

    span None: all F'^2 pairs, i = j included (DiTFlow). span = sf >= 1: FastVMT's forward pairs
    i <= j < min(F', i + sf) (sf = 4 at F' = 21: 78 pairs instead of 441), so the count grows linearly in F'.
    """
    if frames < 1:
        raise ValueError(f"need at least one latent frame, got {frames}")
    if span is None:
        return [(i, j) for i in range(frames) for j in range(frames)]
    if span < 1:
        raise ValueError(f"pair span must be >= 1 (1: each frame with itself only), got {span}")
    return [(i, j) for i in range(frames) for j in range(i, min(frames, i + span))]


def token_positions(
    h: int, w: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """[h*w, 2] positions (column, row) of one frame's tokens in raster order (index r*w + c)."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([cols.flatten(), rows.flatten()], dim=-1).to(dtype)


def _per_frame(t: torch.Tensor, grid: Grid, name: str) -> torch.Tensor:
    """[B, S, n, d] (S >= F'*h*w; later tokens, e.g. appended context latents, are dropped) -> [B, F', HW, n*d]."""
    if t.ndim != 4:
        raise ValueError(f"{name} must be [B, S, heads, head_dim], got shape {tuple(t.shape)}")
    frames, h, w = grid
    tokens = frames * h * w
    if t.shape[1] < tokens:
        raise ValueError(f"{name} has {t.shape[1]} tokens, fewer than the grid {tuple(grid)} needs ({tokens})")
    return rearrange(t[:, :tokens], "b (f s) n d -> b f s (n d)", f=frames)


def _check_pairs(pairs: Pairs, frames: int) -> None:
    if not pairs:
        raise ValueError("no frame pairs")
    bad = [p for p in pairs if not (0 <= p[0] < frames and 0 <= p[1] < frames)]
    if bad:
        raise ValueError(f"frame pairs outside 0..{frames - 1}: {bad[:4]}")


def head_mean_logits(q_frame: torch.Tensor, k_frame: torch.Tensor, heads: int) -> torch.Tensor:
    """mean_h(q_h . k_h) / sqrt(d) for heads-concatenated [B, Tq, n*d] and [B, Tk, n*d] -> [B, Tq, Tk].

    Exact: the concatenated dot product is the sum of the per-head ones, so dividing by n*sqrt(d)
    gives their mean without forming any per-head map.
    """
    d = q_frame.shape[-1] // heads
    return (q_frame @ k_frame.transpose(-1, -2)) / (heads * math.sqrt(d))


def _pair_soft(q_i: torch.Tensor, k_j: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    # q_i already carries tau / (n*sqrt(d)): one [B, HW, HW] block for the logits, one for the softmax.
    probs = (q_i @ k_j.transpose(-1, -2)).softmax(dim=-1)
    return probs @ pos - pos


def soft_amf(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Grid,
    pairs: Pairs | None = None,
    *,
    tau: float = DITFLOW_TAU,
    checkpoint: bool = True,
) -> torch.Tensor:
    """Soft-argmax AMF [B, P, HW, 2] (column, row) of q, k [B, S, n, d] (after RoPE) for `pairs` (default: all).

    Differentiable in q and k. Peak memory beyond q, k, their grads and the [B, P, HW, 2] result is a
    few [B, HW, HW] blocks: with `checkpoint` (and grad on) each pair keeps only its inputs and its
    [B, HW, 2] output; the backward recomputes the pair's block.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    frames, h, w = grid
    pairs = frame_pairs(frames) if pairs is None else list(pairs)
    _check_pairs(pairs, frames)
    heads = q.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)  # bf16 / fp16 logits would round the softmax
    scale = tau / (heads * math.sqrt(q.shape[3]))
    # unbind: the backward stacks the per-frame grads once instead of scattering each pair's into a full-size zero.
    q_frames = (_per_frame(q, grid, "q").to(compute) * scale).unbind(1)
    k_frames = _per_frame(k, grid, "k").to(compute).unbind(1)
    pos = token_positions(h, w, dtype=compute, device=q.device)
    recompute = checkpoint and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    flows = []
    for i, j in pairs:
        if recompute:
            flows.append(torch.utils.checkpoint.checkpoint(
                _pair_soft, q_frames[i], k_frames[j], pos, use_reentrant=False, preserve_rng_state=False))
        else:
            flows.append(_pair_soft(q_frames[i], k_frames[j], pos))
    return torch.stack(flows, dim=1)


@torch.no_grad()
def argmax_amf(q: torch.Tensor, k: torch.Tensor, grid: Grid, pairs: Pairs | None = None) -> torch.Tensor:
    """Argmax AMF [B, P, HW, 2] int16 (column, row) of q, k [B, S, n, d]: the reference's integer displacements.

    No autograd; the same streaming ([B, HW, HW] at a time). Ties go to the lowest key index (torch.argmax).
    |dx| <= w - 1 and |dy| <= h - 1, so int16 holds any grid up to 32768 tokens a side.
    """
    frames, h, w = grid
    if max(h, w) > 2**15:
        raise ValueError(f"token grid {h}x{w} too large for int16 displacements")
    pairs = frame_pairs(frames) if pairs is None else list(pairs)
    _check_pairs(pairs, frames)
    compute = torch.promote_types(q.dtype, torch.float32)
    q_frames = _per_frame(q, grid, "q").to(compute).unbind(1)
    k_frames = _per_frame(k, grid, "k").to(compute).unbind(1)
    pos = token_positions(h, w, dtype=torch.long, device=q.device)
    flows = []
    for i, j in pairs:
        best = head_mean_logits(q_frames[i], k_frames[j], q.shape[2]).argmax(dim=-1)  # [B, HW]
        flows.append(pos[best] - pos)
    return torch.stack(flows, dim=1).to(torch.int16)


def motion_mask(reference: torch.Tensor) -> torch.Tensor:
    """[..., P, HW] bool: the entries whose reference displacement is non-zero (DiTFlow's `threshloss`)."""
    return (reference != 0).any(dim=-1)


def amf_loss(generated: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DiTFlow's thresholded AMF loss: the MSE of (generated - reference) over the masked (pair, token) entries.

    generated: soft AMF [B, P, HW, 2]; reference: argmax AMF [P, HW, 2] or [B, P, HW, 2] (broadcast over
    B). mask: bool, broadcastable to [B, P, HW]; default `motion_mask(reference)` (non-zero reference
    displacement), so static tokens and the mostly-zero i = j pairs impose nothing; a caller's region mask
    is combined with it by `&`. L = sum over masked entries and both components of the squared difference
    / (2 * count), i.e. a mean over entries (DiTFlow), not FastVMT's per-pair squared L2 sum: independent
    of grid size and pair count, and loss scale does not matter under Adam anyway. No masked entry (a
    static reference): 0, still connected to the graph (zero gradient), not DiTFlow's NaN.
    """
    if generated.shape[-1] != 2 or reference.shape[-1] != 2:
        raise ValueError("AMFs end in 2 components (column, row)")
    if tuple(reference.shape[-3:]) != tuple(generated.shape[-3:]):
        raise ValueError(f"reference AMF {tuple(reference.shape)} does not match generated {tuple(generated.shape)}: "
                         "same pairs, same token grid needed")
    reference = reference.to(device=generated.device, dtype=generated.dtype)
    if mask is None:
        mask = motion_mask(reference)
    mask = mask.to(generated.device)
    if mask.is_inference() and not torch.is_inference_mode_enabled():  # e.g. a region made under ComfyUI's
        mask = mask.clone()  # inference mode: a normal copy, which autograd may save
    mask = mask.expand(generated.shape[:-1])
    squared = (generated - reference).square().sum(dim=-1)
    total = torch.where(mask, squared, torch.zeros_like(squared)).sum()
    return total / (2 * mask.sum().clamp(min=1))
