"""Activation checkpointing of the guided step's graph-recording forward: recompute instead of keep.

A guided step records an autograd graph from the latent to the last guided temporal attention; kept
whole, it holds every intermediate activation of the UNet's down path (about 19 GB for a full-size
SD1.5 + AnimateDiff v3 at 16 x 512 x 512 in float32). With checkpointing each UNet layer (ResBlock,
SpatialTransformer, motion module) keeps only its input, and recomputes its insides during the
backward, one layer at a time: exact (the same operations run again), for one more forward of that
path.

`checkpointed_blocks` gives, for the ModelPatcher's object patches, copies of the UNet blocks up to
the block of the last guided layer in which those layers are checkpointed while grad is on. A
checkpointed layer is a shallow copy of the original of a subclass of its class: it shares the
weights and still passes ComfyUI's isinstance dispatch (forward_timestep_embed). The guided layers
themselves are not checkpointed: they hand their attention maps to the loss during the forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.utils.checkpoint

_SUBCLASSES: dict[type, type] = {}


def _normal(value):
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def _checkpointed_class(cls: type) -> type:
    if cls not in _SUBCLASSES:

        def forward(self, *args, **kwargs):
            parent = super(sub, self).forward
            if torch.is_grad_enabled():
                # The checkpoint keeps its inputs for the recompute; inputs made inside ComfyUI's
                # inference_mode (the text context) cannot be kept by autograd: normal copies.
                args = tuple(_normal(a) for a in args)
                kwargs = {k: _normal(v) for k, v in kwargs.items()}
                return torch.utils.checkpoint.checkpoint(parent, *args, use_reentrant=False,
                                                         preserve_rng_state=False, **kwargs)
            return parent(*args, **kwargs)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def checkpointed(layer: torch.nn.Module) -> torch.nn.Module:
    """A copy of `layer` (same parameters, buffers and submodules) that recomputes itself in backward."""
    out = copy.copy(layer)
    out.__class__ = _checkpointed_class(type(layer))
    return out


def is_checkpointed(layer: torch.nn.Module) -> bool:
    return type(layer) in _SUBCLASSES.values()


def checkpointed_blocks(get_block: Callable[[str], torch.nn.Module], block_paths: list[str],
                        keep: Callable[[torch.nn.Module], bool]) -> dict[str, torch.nn.Module]:
    """{block path: copy of the block whose layers are checkpointed}, for `add_object_patch`.

    `get_block(path)` returns the block as the model currently has it (another object patch included);
    `keep(layer)` says which layers stay as they are. Children keep their names, so weight patches and
    LoRAs that address them by key still find them."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

    out = {}
    for path in block_paths:
        block = get_block(path)
        copy_ = TimestepEmbedSequential()
        for name, child in block.named_children():
            copy_.add_module(name, child if keep(child) or is_checkpointed(child) else checkpointed(child))
        out[path] = copy_
    return out
