"""Checks of numeric inputs that ComfyUI's own validation lets through.

ComfyUI compares numbers with their min/max, and NaN passes both comparisons (API JSON may carry
NaN or Infinity). A node's `validate_inputs` that names an input also switches ComfyUI's range
check off for it, so `numbers_valid` does both: finite, and within the schema's min/max. Linked
inputs arrive as None at validation time and are checked when the node runs (`require_finite`).
"""

from __future__ import annotations

import math
from typing import Any


def numbers_valid(schema: Any, **values: Any) -> bool | str:
    """True, or a message naming the first input that is not finite or outside its range."""
    inputs = {i.id: i for i in schema.inputs}
    for name, value in values.items():
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue  # linked, or another type (ComfyUI checks types itself)
        if not math.isfinite(value):
            return f"{name} must be a finite number, got {value}"
        spec = inputs[name]
        low, high = getattr(spec, "min", None), getattr(spec, "max", None)
        if low is not None and value < low:
            return f"{name}: value {value} smaller than min of {low}"
        if high is not None and value > high:
            return f"{name}: value {value} bigger than max of {high}"
    return True


def require_finite(node: str, **values: float) -> None:
    """At run time (values from links included): a clear error for NaN or infinity."""
    for name, value in values.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"{node}: {name} must be a finite number, got {value}")
