"""Key/value injection on Wan (DiTFlow's reference-content option; off by default).

DiTFlow (method doc 1.6): on guided steps only, the clean reference latent is noised to the step's sigma
with the generation's initial noise and run with the target prompt, and block 0's keys and values of the
self-attention replace the generated video's in every forward of that step (the optimisation's forwards
and both CFG branches). The generated video then attends, in its first block, to the reference's content
at its own queries.

How it is done here, the same on every host: the `k` and `v` projections of `blocks[0].self_attn` are
replaced, through the ModelPatcher's object patches, by copies of a subclass of their own class (same
weights, same keys for LoRAs and weight patches). While an injection is active (a context variable,
set by the guided prefix around one step) they return the reference's projections instead of their own;
RMSNorm and RoPE, which act token by token, then run as usual, so the attention sees exactly the
reference's keys and values. Recording runs the reference forward with the copies storing their outputs
and stopping the forward after `v`. Outside an active injection the copies are the originals.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..attention_capture import StopForward

INJECTION_BLOCK = 0  # DiTFlow's `injection_blocks: [0]`
_ACTIVE: contextvars.ContextVar[KVInjection | None] = contextvars.ContextVar("motionclone_wan_kv", default=None)
_SUBCLASSES: dict[type, type] = {}


@dataclass
class KVInjection:
    """The reference's k and v projections of the injection block ([1, S, dim]) for one guided step."""

    recording: bool = False
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def active(injection: KVInjection | None) -> Iterator[None]:
    token = _ACTIVE.set(injection)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _injecting_class(cls: type) -> type:
    if cls not in _SUBCLASSES:

        def forward(self, x, *args, **kwargs):
            out = super(sub, self).forward(x, *args, **kwargs)
            injection = _ACTIVE.get()
            if injection is None:
                return out
            if injection.recording:
                injection.outputs[self.motionclone_role] = out.detach()
                if self.motionclone_role == "v":  # k and v recorded: the reference forward has done its part
                    raise StopForward
                return out
            reference = injection.outputs[self.motionclone_role]
            if reference.shape[1:] != out.shape[1:]:
                raise RuntimeError(f"KV injection: the reference's {self.motionclone_role} is "
                                   f"{tuple(reference.shape)}, this forward's {tuple(out.shape)}")
            return reference.to(out).expand(out.shape[0], *reference.shape[1:])

        sub = type(f"KVInjected{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def _injecting(linear: torch.nn.Module, role: str) -> torch.nn.Module:
    out = copy.copy(linear)
    out.__class__ = _injecting_class(type(linear))
    out.motionclone_role = role
    return out


def injection_patches(model) -> dict[str, torch.nn.Module]:
    """{object patch key: module} replacing the injection block's k and v projections of a Wan ModelPatcher."""
    prefix = f"diffusion_model.blocks.{INJECTION_BLOCK}.self_attn"
    return {f"{prefix}.{role}": _injecting(model.get_model_object(f"{prefix}.{role}"), role) for role in ("k", "v")}


def record_reference_kv(diffusion_model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor,
                        context: torch.Tensor, transformer_options: dict | None = None) -> KVInjection:
    """Run the (patched) Wan model on the noised reference x [1, C, T', H', W'] and keep the injection block's
    k and v projections; the forward stops there."""
    injection = KVInjection(recording=True)
    with active(injection), torch.no_grad():
        try:
            diffusion_model(x, timestep, context, transformer_options=dict(transformer_options or {}))
        except StopForward:
            pass
    if set(injection.outputs) != {"k", "v"}:
        raise RuntimeError("KV injection: the injection block's k and v projections did not run (is the MODEL "
                           "patched with injection_patches?)")
    injection.recording = False
    return injection
