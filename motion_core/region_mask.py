"""Region masks: clone the motion of one region of the reference, into one region of the new video.

ComfyUI MASKs are [M, H, W] floats in 0..1, M = 1 (every frame) or one per frame. The method works on
the temporal attention rows of each guided layer: one row per (spatial position of that layer's token
grid, query frame). So a mask becomes, per layer, a boolean [S, F] over those rows (`token_mask`):

* **Coverage rule.** A token is inside when at least half of its cell is covered: the mask is
  area-averaged onto the layer's grid (`interpolate(mode="area")`, i.e. the mean of the mask over the
  pixels the token stands for, on the grid the UNet's stride-2 convolutions give) and compared with 0.5.
  A soft mask therefore counts by its mean value.
* **Source -> target (bounding-box alignment).** With a source region (at extraction) and a different
  target region (at sampling), each target row at frame f takes the reference's row at the position of
  the source region's bounding box (frame f) that sits at the same relative place as the target position
  in the target region's bounding box (nearest token). Equal regions map every position to itself. A
  target row counts only where the mapped source position is inside the source region.
* **Where the correction goes.** The loss gradient w.r.t. the latent is applied only inside the target
  region (`RegionGuide.latent`, the mask at the latent's resolution): the UNet's spatial layers spread a
  region's gradient over the whole frame, and without this the rest of the video would follow the motion
  too (measured on the demo model, docs/region-masks.md).
* **Keep still.** Optionally the rows outside the target region are pulled toward a static pattern:
  each frame attending to itself (`keep_still_loss`: mean of (1 - P[f, f])^2 over those rows), with its
  own weight.

An all-ones mask is no mask (`normalize_mask` returns None), so it is bit-identical to none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import MotionCloneError
from .sparse_motion import SparseMotion, layer_grid

COVERAGE = 0.5  # a token is inside when at least this fraction of its cell is covered


class RegionMaskError(MotionCloneError):
    """A MASK that cannot be used as a motion region."""


def normalize_mask(mask: torch.Tensor | None, frames: int, latent_height: int, latent_width: int,
                   what: str = "mask") -> torch.Tensor | None:
    """The MASK as [frames, H, W] float32 in 0..1, or None for no mask / an all-ones mask. Refuses masks whose
    frame count or shape cannot map to the latent, that are not finite or that are empty."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise RegionMaskError(f"the {what} must be a MASK [frames, height, width], got shape {tuple(mask.shape)}")
    count, height, width = mask.shape
    if count not in (1, frames):
        raise RegionMaskError(f"the {what} has {count} frames but the video has {frames}: give one mask for all "
                              f"frames or one per frame")
    if not bool(torch.isfinite(mask).all()):
        raise RegionMaskError(f"the {what} holds values that are not finite (NaN or infinity)")
    # The mask may be at pixel size or any other size with the latent's aspect ratio (one latent pixel slack).
    if abs(height * latent_width / width - latent_height) > 1.0 or min(height, width) < 1:
        raise RegionMaskError(
            f"the {what} is {width}x{height} but the latent is {latent_width}x{latent_height} "
            f"({latent_width * 8}x{latent_height * 8} px): its aspect ratio must match the video's (resize or crop "
            "the mask to the video's size)"
        )
    mask = mask.detach().float().clamp(0.0, 1.0).cpu()
    if count == 1:
        mask = mask.expand(frames, height, width)
    if bool((mask >= 1.0).all()):
        return None
    if not bool((mask > 0).any(dim=(1, 2)).all()):
        empty = [i for i in range(frames) if not bool((mask[i] > 0).any())]
        raise RegionMaskError(f"the {what} is empty on frame(s) {empty[:8]}{' ...' if len(empty) > 8 else ''}: a "
                              "region needs at least part of every frame (or leave the mask unconnected)")
    return mask.contiguous()


def token_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[F, H, W] mask -> bool [h * w, F] over a layer's token grid (row-major positions, as the temporal
    attention folds them), by the coverage rule."""
    h, w = grid
    frames, height, width = mask.shape
    # Pad to a multiple of the grid so each token's cell is the same block of pixels as the strided UNet's
    # (ceil division per level), then average each cell.
    cell_h, cell_w = math.ceil(height / h), math.ceil(width / w)
    padded = F.pad(mask[:, None], (0, cell_w * w - width, 0, cell_h * h - height), mode="replicate") \
        if (cell_h * h, cell_w * w) != (height, width) else mask[:, None]
    coverage = F.avg_pool2d(padded, (cell_h, cell_w))[:, 0]  # [F, h, w]
    return (coverage >= COVERAGE).reshape(frames, h * w).T.contiguous()


def token_masks(mask: torch.Tensor, layers: list[str], latent_height: int,
                latent_width: int) -> dict[str, torch.Tensor]:
    """`token_mask` for each guided layer's grid; refuses a mask that covers no token of some frame."""
    out = {}
    for name in layers:
        tm = token_mask(mask, layer_grid(name, latent_height, latent_width))
        if not bool(tm.any(dim=0).all()):
            frames = [f for f in range(tm.shape[1]) if not bool(tm[:, f].any())]
            raise RegionMaskError(f"the mask covers less than half of every token of layer {name} on frame(s) "
                                  f"{frames[:8]}: at that layer's {layer_grid(name, latent_height, latent_width)} "
                                  "grid the region is empty; use a larger region")
        out[name] = tm
    return out


def _bbox(inside: torch.Tensor) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), ends exclusive, of a non-empty bool [h, w]."""
    ys, xs = torch.nonzero(inside, as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def source_positions(source: torch.Tensor | None, target: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """long [S, F]: for each target row (position, frame), the source position it takes the reference's row from
    (bounding-box alignment; identity without a source region or where the boxes are equal)."""
    h, w = grid
    positions, frames = target.shape
    out = torch.arange(positions)[:, None].expand(positions, frames).clone()
    if source is None:
        return out
    for f in range(frames):
        ty0, ty1, tx0, tx1 = _bbox(target[:, f].reshape(h, w))
        sy0, sy1, sx0, sx1 = _bbox(source[:, f].reshape(h, w))
        if (ty0, ty1, tx0, tx1) == (sy0, sy1, sx0, sx1):
            continue
        y = torch.arange(h, dtype=torch.float64)
        x = torch.arange(w, dtype=torch.float64)
        sy = (sy0 + (y - ty0 + 0.5) * (sy1 - sy0) / (ty1 - ty0)).floor().clamp(sy0, sy1 - 1).long()
        sx = (sx0 + (x - tx0 + 0.5) * (sx1 - sx0) / (tx1 - tx0)).floor().clamp(sx0, sx1 - 1).long()
        out[:, f] = (sy[:, None] * w + sx[None, :]).reshape(-1)
    return out


def counted_rows(source: torch.Tensor | None, target: torch.Tensor, grid: tuple[int, int], align: bool,
                 where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(long [S, F] source position of each target row, bool [S, F] rows a masked loss counts) for a target
    region and an optional source region on one token grid. `align`: map the target's bounding box onto the
    source's (`source_positions`; else each row takes its own position). A row counts where it is in the target
    and its source position in the source region; refuses a target that counts no row (the loss would be 0 / 0).
    `where` prefixes the message (e.g. the layer)."""
    positions = source_positions(source if align else None, target, grid)
    rows = target if source is None else target & torch.gather(source, 0, positions)
    if not bool(rows.any()):
        raise RegionMaskError(
            f"{where}every position of the target mask maps onto a position the reference mask left out (the two "
            "regions are aligned by their bounding boxes, and the reference region does not fill its box where the "
            "target region lies): use a filled reference mask or another target mask")
    return positions, rows


def latent_region(mask: torch.Tensor | None, rows: torch.Tensor, grid: tuple[int, int], latent_height: int,
                  latent_width: int) -> torch.Tensor:
    """[F, 1, h, w] in 0..1: the target region at the latent's resolution. From the pixel mask when there is one
    (the mean over each latent pixel's 8 x 8 block: soft edges, no seam), else from a layer's token rows (each
    token's block of latent pixels)."""
    if mask is not None:
        return F.adaptive_avg_pool2d(mask[:, None], (latent_height, latent_width)).contiguous()
    h, w = grid
    tokens = rows.T.reshape(-1, 1, h, w).float()
    cell_h, cell_w = math.ceil(latent_height / h), math.ceil(latent_width / w)
    up = tokens.repeat_interleave(cell_h, dim=2).repeat_interleave(cell_w, dim=3)
    return up[:, :, :latent_height, :latent_width].contiguous()


class RegionGuide:
    """The per-layer rows a masked loss counts and where their targets come from, for one MOTION and one
    target region (either may be None: no source region / the target takes the source's region)."""

    def __init__(self, motion: SparseMotion, target_mask: torch.Tensor | None):
        self.rows: dict[str, torch.Tensor] = {}  # bool [S, F]: rows the motion loss counts
        self.source: dict[str, torch.Tensor] = {}  # long [S, F]: source position of each row
        self.outside: dict[str, torch.Tensor] = {}  # bool [S, F]: rows outside the target region (keep still)
        # [F, 1, h, w] in 0..1: the target region at the latent's resolution, where the correction is applied
        self.latent: torch.Tensor | None = None
        source_masks = motion.masks
        targets = (token_masks(target_mask, motion.layers, motion.latent_height, motion.latent_width)
                   if target_mask is not None else None)
        for name in motion.layers:
            grid = layer_grid(name, motion.latent_height, motion.latent_width)
            src = source_masks.get(name)
            tgt = targets[name] if targets is not None else src
            if tgt is None:
                continue
            pos, rows = counted_rows(src, tgt, grid, align=targets is not None, where=f"at layer {name} ")
            self.rows[name], self.source[name], self.outside[name] = rows, pos, ~tgt
            if self.latent is None:
                self.latent = latent_region(target_mask, tgt, grid, motion.latent_height, motion.latent_width)

    @property
    def active(self) -> bool:
        return bool(self.rows)


def masked_motion_loss(probs: dict[str, torch.Tensor], motion: SparseMotion, guide: RegionGuide) -> torch.Tensor:
    """MotionClone's loss over the guide's rows only: per layer, the mean over the counted rows (x heads x k) of
    (P_gen[row, idx_ref] - val_ref)^2 with the reference row taken from the row's source position. Rows outside
    contribute exactly nothing (their terms are multiplied by 0)."""
    total = None
    for name in motion.layers:
        p = probs[name]
        idx, val = motion.indices[name], motion.values[name]
        rows, pos = guide.rows[name].to(p.device), guide.source[name].to(p.device)
        heads, k = idx.shape[1], idx.shape[3]
        # idx/val [S, heads, F, k] -> the source position's row for each target row
        gather = pos[:, None, :, None].expand(-1, heads, -1, k)
        idx_t = torch.gather(idx.to(p.device, torch.long), 0, gather)
        val_t = torch.gather(val.to(p.device, p.dtype), 0, gather)
        picked = torch.gather(p, dim=-1, index=idx_t)
        weight = rows[:, None, :, None].to(p.dtype)
        layer_loss = (weight * (picked - val_t) ** 2).sum() / (rows.sum() * heads * k)
        total = layer_loss if total is None else total + layer_loss
    if total is None:
        raise ValueError("MOTION has no layers")
    return total


def keep_still_loss(probs: dict[str, torch.Tensor], guide: RegionGuide) -> torch.Tensor:
    """Mean over the rows outside the target region of (1 - P[row, own frame])^2, summed over layers: each
    frame attending to itself, a static pattern. 0 where the region covers everything."""
    total = None
    for name, outside in guide.outside.items():
        p = probs[name]
        own = torch.diagonal(p, dim1=-2, dim2=-1)  # [S, heads, F]
        weight = outside.to(p.device)[:, None, :].to(p.dtype)
        count = outside.sum() * p.shape[1]
        term = (weight * (1.0 - own) ** 2).sum() / count.clamp(min=1)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no region to keep still")
    return total
