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
weights and still passes ComfyUI's isinstance dispatch (forward_timestep_embed).

Layers whose batch items are independent (ResBlocks and SpatialTransformers: one item per frame; the
transformer blocks inside a motion module: one item per spatial position) are checkpointed in
`CHUNKS` slices of their batch: the recompute in backward then holds one slice's activations at a
time, not the whole layer's (at 16 x 512 x 512 the largest level's feed-forward alone keeps ~1.4 GB).
A motion module mixes frames and positions (its GroupNorm spans both), so it is checkpointed whole,
and its transformer blocks, inside it, in slices of positions. Its whole-layer checkpoint records
nothing in the forward (`nested`: a custom autograd Function whose forward runs without grad), because
a non-reentrant checkpoint would keep the inputs of the checkpoints nested in it alive until backward.
The guided motion modules hand their attention maps to the loss, so their attention keeps its graph;
their feed-forwards, the largest part of what they save, are checkpointed in slices of positions.
Measured at 16 x 512 x 512 (full-size SD1.5 + v3, float32): the guided step's peak went from
3.25 GB (layers checkpointed whole) to 2.77 GB (slices) and 2.13 GB (nested, guided feed-forwards),
against 2.05 GB for a plain CFG step (README, `benchmark.py realscale --guided-breakdown 512`).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint

CHUNKS = 4  # slices of a batch-independent layer's batch, each checkpointed on its own

_SUBCLASSES: dict[tuple[type, bool, bool], type] = {}
# Set while a guided forward keeps its whole graph (memory_mode "fast", or "auto" when it fits): the
# checkpointed copies then run as the originals, so one set of object patches serves both modes.
_KEEP_GRAPH: contextvars.ContextVar[bool] = contextvars.ContextVar("motionclone_keep_graph", default=False)


@contextlib.contextmanager
def graph_kept(keep: bool = True) -> Iterator[None]:
    """Within this block the checkpointed layers keep their graphs (no recompute in backward)."""
    token = _KEEP_GRAPH.set(keep)
    try:
        yield
    finally:
        _KEEP_GRAPH.reset(token)


def _normal(value):
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def _checkpoint(fn, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


class _RecomputeInBackward(torch.autograd.Function):
    """A checkpoint whose forward records no graph at all (it runs under no_grad): checkpoints nested inside
    the layer then keep nothing either (a non-reentrant checkpoint would keep their inputs alive), and the
    backward recomputes the layer with grad, nested checkpoints included. Only input gradients are formed."""

    @staticmethod
    def forward(ctx, run, *tensors):
        ctx.run = run
        ctx.save_for_backward(*tensors)
        return run(*tensors)  # autograd runs a Function's forward without grad

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outputs = ctx.run(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad and g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
        return (None, *grads)


def _checkpoint_without_graph(fn, *args, **kwargs):
    differentiable = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def run(*tensors):
        call = list(args)
        for i, t in zip(differentiable, tensors, strict=True):
            call[i] = t
        return fn(*call, **kwargs)

    if not differentiable:
        return fn(*args, **kwargs)
    return _RecomputeInBackward.apply(run, *(args[i] for i in differentiable))


def _batch_of(args: tuple, kwargs: dict) -> int | None:
    first = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim else None


def _slice(value, start: int, stop: int, batch: int):
    # Every tensor carrying the batch (x, the timestep embedding, the text context) is sliced with it.
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[start:stop]
    return value


def _checkpointed_class(cls: type, sliced: bool, nested: bool = False) -> type:
    if (cls, sliced, nested) not in _SUBCLASSES:

        def forward(self, *args, **kwargs):
            parent = super(sub, self).forward
            if not torch.is_grad_enabled() or _KEEP_GRAPH.get():
                return parent(*args, **kwargs)
            # The checkpoint keeps its inputs for the recompute; inputs made inside ComfyUI's
            # inference_mode (the text context) cannot be kept by autograd: normal copies.
            args = tuple(_normal(a) for a in args)
            kwargs = {k: _normal(v) for k, v in kwargs.items()}
            if nested:
                return _checkpoint_without_graph(parent, *args, **kwargs)
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

        prefix = "SliceCheckpointed" if sliced else "NestCheckpointed" if nested else "Checkpointed"
        sub = type(f"{prefix}{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
        _SUBCLASSES[(cls, sliced, nested)] = sub
    return _SUBCLASSES[(cls, sliced, nested)]


def checkpointed(layer: torch.nn.Module, sliced: bool = False, nested: bool = False) -> torch.nn.Module:
    """A copy of `layer` (same parameters, buffers and submodules) that recomputes itself in backward;
    `sliced`: in `CHUNKS` slices of its batch, for layers whose batch items do not interact; `nested`: its
    forward records nothing (for layers holding checkpointed children, whose inputs would otherwise stay)."""
    out = copy.copy(layer)
    out.__class__ = _checkpointed_class(type(layer), sliced, nested)
    return out


def _with_children(parent: torch.nn.Module, **children: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `parent` with some children replaced; the original's child table is untouched."""
    out = copy.copy(parent)
    out._modules = dict(parent._modules)
    for name, child in children.items():
        out._modules[name] = child
    return out


def checkpointed_motion_module(layer: torch.nn.Module) -> torch.nn.Module:
    """A copy of a MotionModuleLayer (its `.module` a diffusers AnimateDiffTransformer3D) checkpointed whole
    (nested: its forward keeps nothing), whose transformer blocks (one batch item per spatial position) are
    checkpointed in slices inside it, for its recompute in backward."""
    inner = layer.module
    blocks = getattr(inner, "transformer_blocks", None)
    if isinstance(blocks, torch.nn.ModuleList):
        sliced = torch.nn.ModuleList([checkpointed(b, sliced=True) for b in blocks])
        layer = _with_children(layer, module=_with_children(inner, transformer_blocks=sliced))
    return checkpointed(layer, nested=True)


def guided_motion_module(layer: torch.nn.Module) -> torch.nn.Module:
    """A copy of a guided MotionModuleLayer whose transformer blocks' feed-forwards are checkpointed in slices of
    positions: the attention, which hands its maps to the loss, keeps its graph; the feed-forward after it
    (the largest saved activations of a guided module) keeps only its input."""
    inner = layer.module
    blocks = getattr(inner, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        return layer
    copies = []
    for block in blocks:
        ff = getattr(block, "ff", None)
        if isinstance(ff, torch.nn.Module) and not is_checkpointed(ff):
            block = _with_children(block, ff=checkpointed(ff, sliced=True))
        copies.append(block)
    return _with_children(layer, module=_with_children(inner, transformer_blocks=torch.nn.ModuleList(copies)))


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
