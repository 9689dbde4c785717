"""q and k of one Wan block's self-attention (after RMSNorm and RoPE), captured inside ComfyUI's native Wan.

Two routes to the same tensors, [B, S, heads, head_dim], token index f*h*w + r*w + c:

* "attn1_patch" (ComfyUI 0.33): `WanSelfAttention.forward` calls every `attn1_patch` with
  {"x": attention output before `o`, "q", "k" (after RoPE), "transformer_options"}, and `forward_orig`
  sets transformer_options["block_index"]. The patch records q, k at the wanted block and returns x
  unchanged.
* "hook" (any host; the only one on 0.3.75, whose Wan has neither attn1 patches nor block_index): a
  forward pre-hook with kwargs on `blocks[b].self_attn` recomputes q, k from the module's input and
  RoPE `freqs` with the module's own layers and the host's `apply_rope1` (one more q/k projection,
  ~2*N*dim^2 MACs), so the result is bit-identical to what the attention uses.

What a forward records is asked for per forward: a WanCaptureState under CAPTURE_KEY in its
transformer_options (the pack's per-forward pattern: nothing global is left switched on).
`stop_after` raises the pack's StopForward once recorded, so the blocks after b never run.

Differentiability (ComfyUI 0.33): `apply_rope1` runs a comfy_kitchen op with no autograd formula unless
`comfy.model_management.in_training` is set; a backward through it raises. `differentiable_kernels`
sets the flag for the guided forward only (try/finally, as comfy_extras/nodes_train.py does); hosts
without the flag (0.3.75: plain-torch RoPE) need nothing.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..attention_capture import StopForward
from .amf import Grid

CAPTURE_KEY = "motionclone_wan_qk"
METHODS = ("auto", "attn1_patch", "hook")


@dataclass
class WanCaptureState:
    """One forward's request (block, stop_after) and what it recorded (q, k: [B, S, n, d], with graph if grad is on)."""

    block: int
    stop_after: bool = False
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    grid: Grid | None = None  # set by capture_qk from the latent and the patch size
    output: torch.Tensor | None = None  # the model's output when the forward ran to the end

    def record(self, q: torch.Tensor, k: torch.Tensor) -> None:
        self.q, self.k = q, k
        if self.stop_after:
            raise StopForward

    @property
    def complete(self) -> bool:
        return self.q is not None


def _state(transformer_options: dict | None) -> WanCaptureState | None:
    state = (transformer_options or {}).get(CAPTURE_KEY)
    return state if isinstance(state, WanCaptureState) and not state.complete else None


def host_has_wan_attn1_patch() -> bool:
    """Whether this ComfyUI's WanSelfAttention calls attn1 patches (0.33: yes, with q, k after RoPE; 0.3.75: no)."""
    import comfy.ldm.wan.model

    try:
        source = inspect.getsource(comfy.ldm.wan.model.WanSelfAttention.forward)
    except (OSError, TypeError):  # no source (frozen install): the hook works everywhere
        return False
    return "attn1_patch" in source and '"q"' in source


def qk_attn1_patch(args: dict[str, Any]) -> torch.Tensor:
    """attn1 patch for Wan (install on Wan models only: SD UNets call attn1 patches with other arguments)."""
    options = args.get("transformer_options") or {}
    state = _state(options)
    if state is not None and options.get("block_index") == state.block:
        state.record(args["q"], args["k"])
    return args["x"]


def recompute_qk(self_attn: torch.nn.Module, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, S, n, d] as `WanSelfAttention.forward` builds them: RoPE(RMSNorm(W x)), the host's apply_rope1."""
    import comfy.ldm.wan.model

    apply_rope1 = comfy.ldm.wan.model.apply_rope1  # whatever the Wan module itself calls
    b, s = x.shape[:2]
    n, d = self_attn.num_heads, self_attn.head_dim
    q = apply_rope1(self_attn.norm_q(self_attn.q(x)).view(b, s, n, d), freqs)
    k = apply_rope1(self_attn.norm_k(self_attn.k(x)).view(b, s, n, d), freqs)
    return q, k


def install_qk_hook(diffusion_model: torch.nn.Module, block: int) -> torch.utils.hooks.RemovableHandle:
    """Forward pre-hook on blocks[block].self_attn that records q, k for a forward carrying a WanCaptureState.

    A pre-hook, so that with stop_after the block's attention itself is skipped. Remove the handle after use.
    """
    blocks = diffusion_model.blocks
    if not 0 <= block < len(blocks):
        raise ValueError(f"block {block} outside 0..{len(blocks) - 1}")

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        options = kwargs.get("transformer_options", args[2] if len(args) > 2 else None)
        state = _state(options)
        if state is None or state.block != block:
            return None
        x = args[0] if args else kwargs["x"]
        freqs = args[1] if len(args) > 1 else kwargs["freqs"]
        state.record(*recompute_qk(module, x, freqs))
        return None

    return blocks[block].self_attn.register_forward_pre_hook(hook, with_kwargs=True)


@contextmanager
def differentiable_kernels(enabled: bool = True) -> Iterator[None]:
    """Route ComfyUI's RoPE to its plain-torch (differentiable) path for the duration, and restore after.

    Sets comfy.model_management.in_training where the host has that flag (0.33); a no-op elsewhere.
    """
    import comfy.model_management as mm

    if not enabled or not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


def token_grid(diffusion_model: torch.nn.Module, latent_shape: tuple[int, ...] | torch.Size) -> Grid:
    """(F', h, w) of a latent [B, C, T, H, W]: ComfyUI pads each axis up to the patch size before the patch conv."""
    pt, ph, pw = diffusion_model.patch_size
    t, h, w = latent_shape[-3:]
    return math.ceil(t / pt), math.ceil(h / ph), math.ceil(w / pw)


def resolve_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"capture method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "attn1_patch" if host_has_wan_attn1_patch() else "hook"
    if method == "attn1_patch" and not host_has_wan_attn1_patch():
        raise ValueError("this ComfyUI's Wan self-attention calls no attn1 patches (ComfyUI < 0.33): use 'hook'")
    return method


def capture_qk(
    diffusion_model: torch.nn.Module,
    x: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    block: int,
    *,
    method: str = "auto",
    stop_after: bool = True,
    differentiable: bool | None = None,
    transformer_options: dict | None = None,
    **model_kwargs: Any,
) -> WanCaptureState:
    """Run a Wan diffusion model on latent x and return the state holding block `block`'s q, k and the grid.

    stop_after: end the forward right after the capture (blocks > b, head and output never computed).
    differentiable (default: whether grad is on): set the host's in_training flag and run attention as
    PyTorch SDPA while grad is on (sage / sub-quadratic attention are inference kernels or keep large
    score chunks for the backward). The caller's transformer_options are copied, never modified.
    """
    from ..guided_sampling import lean_attention_while_grad

    if not 0 <= block < len(diffusion_model.blocks):
        raise ValueError(f"block {block} outside 0..{len(diffusion_model.blocks) - 1}")
    route = resolve_method(method)
    differentiable = torch.is_grad_enabled() if differentiable is None else differentiable
    state = WanCaptureState(block=block, stop_after=stop_after, grid=token_grid(diffusion_model, x.shape))
    options = dict(transformer_options or {})
    options[CAPTURE_KEY] = state
    if differentiable:
        options["optimized_attention_override"] = lean_attention_while_grad(options.get("optimized_attention_override"))
    handle = None
    if route == "attn1_patch":
        patches = {name: list(fns) for name, fns in options.get("patches", {}).items()}
        patches["attn1_patch"] = [*patches.get("attn1_patch", []), qk_attn1_patch]
        options["patches"] = patches
    else:
        handle = install_qk_hook(diffusion_model, block)
    try:
        with differentiable_kernels(differentiable):
            state.output = diffusion_model(x, timestep, context, transformer_options=options, **model_kwargs)
    except StopForward:
        pass
    finally:
        if handle is not None:
            handle.remove()
    if not state.complete:
        raise RuntimeError(f"Wan block {block}'s self-attention did not run in this forward (route {route!r})")
    return state
