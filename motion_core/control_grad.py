"""ControlNet residuals in a forward that autograd records.

ComfyUI's UNet adds ControlNet skip residuals in place (`h += ctrl` in
openaimodel.apply_control) to input-block outputs that the next block has already saved for
backward, so any ControlNet (core or SparseCtrl) breaks the backward of MotionClone's guided
pass. `skip_residuals_as_patch` hands those residuals to the UNet through an
`output_block_patch` that adds them out of place instead: same sums, same order.
"""

from __future__ import annotations

import logging


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
