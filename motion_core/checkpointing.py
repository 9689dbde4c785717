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

Layers whose batch items are independent (ResBlocks and SpatialTransformers: one item per frame; the
transformer blocks inside a motion module: one item per spatial position) are checkpointed in
`CHUNKS` slices of their batch: the recompute in backward then holds one slice's activations at a
time, not the whole layer's (at 16 x 512 x 512 the largest level's feed-forward alone keeps ~1.4 GB;
the guided step's peak went from 3.25 GB to 2.77 GB there, README).
A motion module mixes frames (its GroupNorm spans them), so it is checkpointed whole, and its
transformer blocks, inside it, in slices of positions: they run once more in backward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.utils.checkpoint

CHUNKS = 4  # slices of a batch-independent layer's batch, each checkpointed on its own

_SUBCLASSES: dict[tuple[type, bool], type] = {}


def _normal(value):
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def _checkpoint(fn, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def _batch_of(args: tuple, kwargs: dict) -> int | None:
    first = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim else None


def _slice(value, start: int, stop: int, batch: int):
    # Every tensor carrying the batch (x, the timestep embedding, the text context) is sliced with it.
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[start:stop]
    return value


def _checkpointed_class(cls: type, sliced: bool) -> type:
    if (cls, sliced) not in _SUBCLASSES:

        def forward(self, *args, **kwargs):
            parent = super(sub, self).forward
            if not torch.is_grad_enabled():
                return parent(*args, **kwargs)
            # The checkpoint keeps its inputs for the recompute; inputs made inside ComfyUI's
            # inference_mode (the text context) cannot be kept by autograd: normal copies.
            args = tuple(_normal(a) for a in args)
            kwargs = {k: _normal(v) for k, v in kwargs.items()}
            batch = _batch_of(args, kwargs) if sliced else None
            if batch is None or batch < 2:
                return _checkpoint(parent, *args, **kwargs)
            step = -(-batch // min(CHUNKS, batch))
            outs = []
            for start in range(0, batch, step):
                stop = min(start + step, batch)
                outs.append(_checkpoint(parent, *(_slice(a, start, stop, batch) for a in args),
                                        **{k: _slice(v, start, stop, batch) for k, v in kwargs.items()}))
            return torch.cat(outs)

        prefix = "SliceCheckpointed" if sliced else "Checkpointed"
        sub = type(f"{prefix}{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
        _SUBCLASSES[(cls, sliced)] = sub
    return _SUBCLASSES[(cls, sliced)]


def checkpointed(layer: torch.nn.Module, sliced: bool = False) -> torch.nn.Module:
    """A copy of `layer` (same parameters, buffers and submodules) that recomputes itself in backward;
    `sliced`: in `CHUNKS` slices of its batch, for layers whose batch items do not interact."""
    out = copy.copy(layer)
    out.__class__ = _checkpointed_class(type(layer), sliced)
    return out


def _with_children(parent: torch.nn.Module, **children: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `parent` with some children replaced; the original's child table is untouched."""
    out = copy.copy(parent)
    out._modules = dict(parent._modules)
    for name, child in children.items():
        out._modules[name] = child
    return out


def checkpointed_motion_module(layer: torch.nn.Module) -> torch.nn.Module:
    """A copy of a MotionModuleLayer (its `.module` a diffusers AnimateDiffTransformer3D) checkpointed whole,
    whose transformer blocks (one batch item per spatial position) are checkpointed in slices inside it."""
    inner = layer.module
    blocks = getattr(inner, "transformer_blocks", None)
    if isinstance(blocks, torch.nn.ModuleList):
        sliced = torch.nn.ModuleList([checkpointed(b, sliced=True) for b in blocks])
        layer = _with_children(layer, module=_with_children(inner, transformer_blocks=sliced))
    return checkpointed(layer)


def is_checkpointed(layer: torch.nn.Module) -> bool:
    return type(layer) in _SUBCLASSES.values()


def checkpointed_blocks(get_block: Callable[[str], torch.nn.Module], block_paths: list[str],
                        how: Callable[[torch.nn.Module], Callable[[torch.nn.Module], torch.nn.Module] | None],
                        ) -> dict[str, torch.nn.Module]:
    """{block path: copy of the block whose layers are checkpointed}, for `add_object_patch`.

    `get_block(path)` returns the block as the model currently has it (another object patch included);
    `how(layer)` gives the function that makes a layer's checkpointed copy, or None to keep the layer as
    it is. Children keep their names, so weight patches and LoRAs that address them by key still find them."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

    out = {}
    for path in block_paths:
        block = get_block(path)
        copy_ = TimestepEmbedSequential()
        for name, child in block.named_children():
            make = None if is_checkpointed(child) else how(child)
            copy_.add_module(name, child if make is None else make(child))
        out[path] = copy_
    return out
