"""Temporal self-attention processor that can expose its attention probabilities.

Installed (diffusers' `set_processor`) on every temporal attention of a loaded motion
module. Without a capture request it is plain scaled-dot-product attention; when the
current forward carries a `CaptureState` naming its layer, it computes
P = softmax(Q K^T / sqrt(d)) explicitly, hands P to the state (with autograd graph if
grad is on) and uses it for the output. A measuring state (`measure_only`) leaves the
output on the plain path, bit for bit, and computes P beside it without grad. Capture is
requested per forward through `transformer_options`, so nothing global is switched on or
left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


class StopForward(Exception):
    """Raised after the last requested layer when the rest of the UNet is not needed."""


class CaptureState:
    """What one forward should record, and what it recorded.

    `probs[layer]` has shape [positions, heads, F, F] (rows sum to 1), positions being
    (videos in the batch) x H x W in that order. `on_layer(name, probs)` may run the
    guidance math as soon as a layer is seen (e.g. right after the last guided layer).
    `measure_only`: record P without grad and without touching the forward's output, and
    only in a forward that holds a conditional chunk; `chunks` is then that forward's
    cond_or_uncond list (0 = conditional), one entry per video chunk of the positions.
    """

    def __init__(
        self,
        layers: Iterable[str],
        *,
        stop_after_last: bool = False,
        on_layer: Callable[[str, torch.Tensor], None] | None = None,
        measure_only: bool = False,
    ) -> None:
        self.layers = list(layers)
        self.stop_after_last = stop_after_last
        self.on_layer = on_layer
        self.measure_only = measure_only
        self.chunks: list[int] = [0]
        self.probs: dict[str, torch.Tensor] = {}

    def wants(self, layer: str) -> bool:
        return layer in self.layers and layer not in self.probs

    def record(self, layer: str, probs: torch.Tensor) -> None:
        self.probs[layer] = probs
        if self.on_layer is not None:
            self.on_layer(layer, probs)
        if self.stop_after_last and self.complete:
            raise StopForward

    @property
    def complete(self) -> bool:
        return all(name in self.probs for name in self.layers)

    def conditional_probs(self) -> dict[str, torch.Tensor]:
        """The recorded maps of the conditional chunks only (uncond chunks of a batched forward dropped)."""
        keep = [i for i, c in enumerate(self.chunks) if c == 0]
        if keep == list(range(len(self.chunks))):
            return dict(self.probs)
        out = {}
        for name, p in self.probs.items():
            per_chunk = p.reshape(len(self.chunks), -1, *p.shape[1:])
            out[name] = per_chunk[keep].reshape(-1, *p.shape[1:])
        return out


class TemporalAttnProcessor:
    """Attention processor for AnimateDiff temporal self-attention (no masks, no norms)."""

    def __init__(self, layer_name: str) -> None:
        self.layer_name = layer_name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        motionclone: CaptureState | None = None,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, n, _ = q.shape
        heads = attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        if motionclone is not None and motionclone.wants(self.layer_name) and not motionclone.measure_only:
            scores = (q @ k.transpose(-1, -2)) * attn.scale
            probs = scores.float().softmax(dim=-1).to(q.dtype)  # [positions, heads, F, F]
            out = probs @ v
            motionclone.record(self.layer_name, probs)
        elif motionclone is not None and motionclone.wants(self.layer_name):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
            with torch.no_grad():
                motionclone.record(self.layer_name, ((q @ k.transpose(-1, -2)) * attn.scale).float().softmax(dim=-1))
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def check_plain_temporal_attention(attn, name: str) -> None:
    """The processor skips norms/residuals that AnimateDiff's temporal attention never uses."""
    unsupported = [
        flag
        for flag, on in (
            ("spatial_norm", attn.spatial_norm is not None),
            ("group_norm", attn.group_norm is not None),
            ("norm_cross", bool(attn.norm_cross)),
            ("residual_connection", attn.residual_connection),
            ("rescale_output_factor", attn.rescale_output_factor != 1.0),
        )
        if on
    ]
    if unsupported:
        raise ValueError(f"{name}: unexpected attention features for a motion module: {unsupported}")
