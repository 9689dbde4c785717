"""Schema features of newer ComfyUI hosts, used where the running host has them.

Capability checks, not version checks: a keyword is passed only when the host's class accepts it.
ComfyUI 0.33 has both used here, 0.3.75 neither: `search_aliases` on io.Schema (the node library
finds the node by other words too) and `advanced` on inputs (frontends that know it fold rarely
changed inputs into an "advanced" section; the value is still saved and sent as before).
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any


@cache
def _parameters(target: Any) -> frozenset[str]:
    return frozenset(inspect.signature(target).parameters)


def supported(target: Any, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that `target` (a V3 schema or input class) accepts on this host."""
    names = _parameters(target)
    return {k: v for k, v in kwargs.items() if k in names}


def advanced(input_class: Any) -> dict[str, Any]:
    """`advanced=True` for an input, where the host supports it."""
    return supported(input_class, advanced=True)
