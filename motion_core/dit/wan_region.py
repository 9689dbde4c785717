"""Region masks on Wan: which tokens' motion flow is followed, and where the latent may move.

The SD rules (region_mask.py) carried over to Wan's token grid (F', h, w) (patch 1 x 2 x 2 on the latent):

* **Frames.** A ComfyUI MASK holds one mask, or one per *video* frame (1 + 4k). Wan's causal VAE
  encodes video frame 0 alone into latent frame 0 and video frames 4t-3 .. 4t into latent frame t, so a
  latent frame's mask is the mean of those frames' masks.
* **Coverage.** As on SD: a token is inside when at least half of its cell (16 x 16 px) is covered.
* **Source -> target.** A target token of query frame i takes the reference's displacements of the
  source token at the same relative place in the source region's bounding box (frame i), as on SD
  (`source_positions`); the displacements are kept as they are, in tokens (not scaled by the boxes'
  size ratio). A token counts where it is in the target region and its source token in the source
  region, and, as in DiTFlow, where the reference moved at all.
* **Where the latent moves.** The optimisation's gradient is kept only where the region is (its support),
  and each guided step's change of the latent is multiplied by the region at latent resolution (soft
  edges; exactly zero outside).
* **Keep still** (optional): the tokens outside the target region are pulled toward no displacement to
  the other frames (the motion flow of a still video), with its own weight; that gradient is applied
  wherever it goes, as on SD.
"""

from __future__ import annotations

import torch

from ..region_mask import RegionMaskError, counted_rows, latent_region, normalize_mask, token_mask
from .amf import Grid, Pairs, motion_mask
from .wan_motion import TEMPORAL_STRIDE


def latent_frame_masks(mask: torch.Tensor | None, latent_shape: tuple[int, int, int],
                       what: str = "mask") -> torch.Tensor | None:
    """A ComfyUI MASK for a Wan video as [T', H, W] per latent frame (None: no mask, or all ones). Refuses masks
    whose frame count is neither 1 nor the video's, or that cannot map to the latent (region_mask rules)."""
    if mask is None:
        return None
    frames, height, width = latent_shape
    video_frames = 1 + TEMPORAL_STRIDE * (frames - 1)
    count = mask.shape[0] if mask.ndim == 3 else 1
    if count not in (1, video_frames):
        raise RegionMaskError(f"the {what} has {count} frames but the Wan video has {video_frames} ({frames} latent "
                              "frames): give one mask for all frames or one per video frame")
    video = normalize_mask(mask, video_frames, height, width, what)
    if video is None:
        return None
    groups = [video[:1]] + [video[1 + TEMPORAL_STRIDE * (t - 1): 1 + TEMPORAL_STRIDE * t] for t in range(1, frames)]
    return torch.stack([g.mean(dim=0) for g in groups])


def wan_token_mask(latent_masks: torch.Tensor, grid: Grid, what: str = "mask") -> torch.Tensor:
    """[T', H, W] -> bool [h * w, T'] over the token grid by the coverage rule; refuses a latent frame whose
    region covers no token."""
    tokens = token_mask(latent_masks, grid[1:])
    if empty := [t for t in range(tokens.shape[1]) if not bool(tokens[:, t].any())]:
        raise RegionMaskError(f"the {what} covers less than half of every {grid[1]}x{grid[2]} token of latent "
                              f"frame(s) {empty[:8]} (Wan's tokens are 16x16 px): use a larger region")
    return tokens


class WanRegion:
    """For one Wan MOTION and one target region: per block, the reference displacements each generated token
    follows and the entries the loss counts; and the region at latent resolution."""

    def __init__(self, source: torch.Tensor | None, target_masks: torch.Tensor | None, grid: Grid,
                 latent_shape: tuple[int, int, int]):
        """`source`: the MOTION's region (bool [HW, T'], or None); `target_masks`: the sampler's mask per latent
        frame ([T', H, W] from `latent_frame_masks`, or None: the source region is the target)."""
        target = wan_token_mask(target_masks, grid, "sampler's mask") if target_masks is not None else source
        if target is None:
            raise ValueError("a Wan region needs a source or a target mask")
        self.grid = grid
        self.target = target  # bool [HW, T']
        self.positions, self.rows = counted_rows(source, target, grid[1:], align=target_masks is not None)
        # [T', H', W'] in 0..1: soft edges from the pixel mask, else each token's 2 x 2 latent pixels
        self.latent = latent_region(target_masks, target, grid[1:], *latent_shape[1:])[:, 0].contiguous()

    def reference(self, flow: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(displacements [P, HW, 2] each generated token follows, bool [P, HW] entries the loss counts) for a
        block's reference flow [P, HW, 2]."""
        query = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        positions = self.positions.T[query]  # [P, HW]: the source token of each target token, per pair's frame i
        followed = torch.gather(flow, 1, positions[..., None].expand(-1, -1, 2))
        counted = self.rows.T[query] & motion_mask(followed)
        return followed, counted

    def still(self, pairs: Pairs) -> torch.Tensor:
        """bool [P, HW]: the entries of the keep-still loss, the tokens outside the target region of each pair's
        query frame, toward another frame (a frame with itself has no displacement to hold)."""
        query = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        other = torch.tensor([i != j for i, j in pairs])
        return ~self.target.T[query] & other[:, None]

    def restrict(self, change: torch.Tensor) -> torch.Tensor:
        """A change of the latent [B, C, T', H', W'] kept inside the region (soft edges, zero outside)."""
        return change * self.latent.to(change)[None, None]

    def support(self) -> torch.Tensor:
        """[1, 1, T', H', W'] bool: where the region is not zero (the gradient is kept there)."""
        return (self.latent > 0)[None, None]
