"""Every error type of the pack reports as MotionClone.<Name>, however the pack was imported."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import motionclone.motion_core as core
from motionclone.motion_core.errors import MotionCloneError


def test_error_types_read_cleanly():
    found = {}
    for info in pkgutil.iter_modules(core.__path__):
        module = importlib.import_module(f"motionclone.motion_core.{info.name}")
        source = Path(module.__file__).read_text()
        for name in re.findall(r"^class (\w+Error)\(", source, flags=re.M):
            found[name] = getattr(module, name)
    expected = {"VideoLoadError", "MotionFileError", "MotionMismatchError", "MotionModuleError", "SparseCtrlError"}
    assert expected <= set(found), sorted(found)
    for name, cls in found.items():
        assert issubclass(cls, MotionCloneError) and issubclass(cls, ValueError), name
        assert f"{cls.__module__}.{cls.__qualname__}" == f"MotionClone.{name}"  # what ComfyUI shows
