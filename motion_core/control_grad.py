"""ControlNet residuals in a forward that autograd records.

ComfyUI's UNet adds ControlNet skip residuals in place (`h += ctrl` in
openaimodel.apply_control) to input-block outputs that the next block has already saved for
backward, so any ControlNet (core or SparseCtrl) breaks the backward of MotionClone's guided
pass. `skip_residuals_as_patch` hands those residuals to the UNet through an
`output_block_patch` that adds them out of place instead: same sums, same order.

`controls_without_grad` makes the ControlNets of the guided pass compute their residuals
without a graph: the guidance treats residuals as constants (SparseCtrl already does), and a
ControlNet whose weights are inference tensors (loaded or moved to the GPU inside ComfyUI's
inference_mode) could not be part of a graph anyway.
"""

from __future__ import annotations

import logging
from typing import Any

import torch


def skip_residuals_as_patch(control: dict | None, transformer_options: dict) -> dict | None:
    """Move a control dict's skip residuals ("output") into an `output_block_patch` that adds
    them without modifying tensors in place; returns the dict without them.

    ComfyUI's UNet adds skip residuals in place (`h += ctrl` in openaimodel.apply_control) to
    input-block outputs that the next block has saved for backward, so a forward with gradients
    (MotionClone's guided pass) fails in backward. Same sums, same order (before other patches)."""
    if not control or not control.get("output"):
        return control
    residuals = list(control["output"])

    def add_skip_residual(h, hsp, transformer_options):
        i = len(residuals) - 1 - transformer_options["block"][1]  # apply_control pops from the end
        r = residuals[i] if 0 <= i < len(residuals) else None
        if r is not None:
            if r.shape[1:] == hsp.shape[1:]:
                hsp = hsp + r.to(hsp.dtype)
            else:  # apply_control logs and skips a residual that does not fit
                logging.warning("control residual %s could not be added to %s", tuple(r.shape), tuple(hsp.shape))
        return h, hsp

    patches = dict(transformer_options.get("patches", {}))
    patches["output_block_patch"] = [add_skip_residual, *patches.get("output_block_patch", [])]
    transformer_options["patches"] = patches
    return {**control, "output": []}


class _ControlWithoutGrad:
    """Delegates to a ComfyUI ControlBase; `get_control` (the whole chain) runs under no_grad."""

    def __init__(self, control: Any) -> None:
        self._control = control

    def __getattr__(self, name: str) -> Any:
        return getattr(self._control, name)

    def get_control(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self._control.get_control(*args, **kwargs)


def controls_without_grad(conds: list[dict]) -> list[dict]:
    """Copies of ComfyUI's processed conds whose 'control' computes residuals without grad.

    One proxy per control object, so conds that shared a ControlNet still batch together."""
    proxies: dict[int, _ControlWithoutGrad] = {}
    out = []
    for cond in conds:
        control = cond.get("control")
        if control is None:
            out.append(cond)
        else:
            out.append({**cond, "control": proxies.setdefault(id(control), _ControlWithoutGrad(control))})
    return out
