"""Weights that ComfyUI created inside its prompt's `torch.inference_mode()`, made usable by autograd.

ComfyUI runs prompts under inference_mode, so weights it loads, moves to the GPU (`.to()`) or
force-loads during a prompt are inference tensors, which autograd refuses to save for backward:
MotionClone's guided pass fails on the first layer that records them. Which weights end up that
way depends on the host's loader: the classic ModelPatcher moves whole modules; ComfyUI 0.33's
ModelPatcherDynamic (DynamicVRAM, NVIDIA) casts large layers per call but force-loads small ones
(norms, biases under 16 KB) on the device, without the weight wrappers it installs for large ones.

`normal_tensors_for_grad` covers all of them alike: right before a forward that records a graph,
every parameter or buffer of the module tree that lives on the compute device and is an inference
tensor is replaced by a normal copy (same values, bit for bit; one tensor at a time, the old one is
freed when nothing else holds it). The Parameter object is replaced, as ComfyUI's own
`set_attr_param` does when it patches weights: an inference Parameter cannot be given normal storage
in place (it keeps no version counter). Weights kept elsewhere (CPU copies of offloaded layers) are
cast per call outside inference mode, which already gives normal tensors.

`follow_device_and_dtype` is the same care for the motion modules, which follow the UNet's dtype
(e.g. float16 on a GPU) on their first forward: ModelPatcherDynamic loads such non-ComfyUI layers
with set_attr_param inside inference_mode, and `module.to()` outside it would leave Parameters that
fail on every later use, with or without grad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _plain(t: torch.Tensor) -> bool:
    # Tensor subclasses (quantized weights) manage their own storage: leave them to their owner.
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _replace_tensors(module: torch.nn.Module, wanted: Callable[[torch.Tensor], bool],
                     convert: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Replace each plain parameter/buffer `wanted` says so of by `convert` of it, made outside inference
    mode (so the result is a normal tensor); returns how many were replaced."""
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for owner in module.modules():
            for name, param in owner._parameters.items():
                if param is not None and _plain(param) and wanted(param):
                    owner._parameters[name] = torch.nn.Parameter(convert(param), requires_grad=param.requires_grad)
                    replaced += 1
            for name, buffer in owner._buffers.items():
                if buffer is not None and _plain(buffer) and wanted(buffer):
                    owner._buffers[name] = convert(buffer)  # a buffer is replaced, not re-pointed
                    replaced += 1
    return replaced


def normal_tensors_for_grad(module: torch.nn.Module, device: torch.device) -> int:
    """Replace the inference-tensor parameters and buffers of `module` on `device` by normal copies.

    Returns how many were replaced (0 when there is nothing to do, which is cheap to find out).
    """
    return _replace_tensors(module, lambda t: t.device == device and t.is_inference(), torch.Tensor.clone)


def follow_device_and_dtype(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Give `module`'s parameters and floating buffers `device` and `dtype`, as normal tensors.

    Unlike `module.to()`, which swaps storage in place, this also works on Parameters that ComfyUI
    created inside inference_mode (its loaders' set_attr_param), which cannot take new storage outside
    it without breaking every later use ("Inference tensors do not track version counter")."""

    def differs(t: torch.Tensor) -> bool:
        return t.device != device or (t.is_floating_point() and t.dtype != dtype)

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)

    return _replace_tensors(module, differs, convert)
