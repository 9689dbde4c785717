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
"""

from __future__ import annotations

import torch


def _plain(t: torch.Tensor) -> bool:
    # Tensor subclasses (quantized weights) manage their own storage: leave them to their owner.
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def normal_tensors_for_grad(module: torch.nn.Module, device: torch.device) -> int:
    """Swap the inference-tensor parameters and buffers of `module` on `device` for normal copies.

    Returns how many were swapped (0 when there is nothing to do, which is cheap to find out).
    """
    swapped = 0
    with torch.inference_mode(False), torch.no_grad():
        for owner in module.modules():
            for name, param in owner._parameters.items():
                if param is not None and param.device == device and param.is_inference() and _plain(param):
                    owner._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=param.requires_grad)
                    swapped += 1
            for name, buffer in owner._buffers.items():
                if buffer is not None and buffer.device == device and buffer.is_inference() and _plain(buffer):
                    owner._buffers[name] = buffer.clone()  # a buffer is replaced, not re-pointed
                    swapped += 1
    return swapped
