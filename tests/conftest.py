"""Test bootstrap: a real ComfyUI host on the CPU and this pack imported as `motionclone`.

The host is COMFYUI_PATH (scripts/dev.py sets it to each host it tests). It is
appended to sys.path, as ComfyUI has top-level `nodes`, `utils` and `server` modules; the
repo root is kept off sys.path because our `nodes/` package would shadow ComfyUI's.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH") or "/COMFYUI_PATH-not-set").resolve()
if not (COMFYUI_PATH / "comfy").is_dir():
    raise RuntimeError(f"No ComfyUI at {COMFYUI_PATH}: run `python3 scripts/dev.py test` or set COMFYUI_PATH")

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
if str(COMFYUI_PATH) not in sys.path:
    sys.path.append(str(COMFYUI_PATH))
sys.path.append(str(Path(__file__).resolve().parent))  # tests/ helpers (fixtures_*.py)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before comfy.model_management is imported anywhere
import comfy.model_management  # noqa: E402,F401


def _import_pack():
    spec = importlib.util.spec_from_file_location(
        "motionclone", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["motionclone"] = module
    spec.loader.exec_module(module)
    return module


motionclone = _import_pack()


def pytest_configure(config):
    # Previews that nodes save (e.g. Motion Guided Sampler's loss plot) go to a throw-away folder,
    # not into the host's own temp/ folder.
    import tempfile

    import folder_paths

    folder_paths.set_temp_directory(tempfile.mkdtemp(prefix="motionclone-test-temp-"))


# The slowest files, slowest first (measured with `--durations`): `dev.py test` spreads files over
# workers in collection order (pytest-xdist --dist loadfile), so the long ones start first instead
# of leaving one worker busy at the end.
SLOW_FILES_FIRST = (
    "test_long_video_server.py",
    "test_demo_fidelity.py",
    "test_motion_guidance.py",
    "test_context_windows.py",
    "test_guidance_memory.py",
    "test_dev_commands.py",
    "test_full_size.py",
)


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = Path(str(item.fspath)).name
        return SLOW_FILES_FIRST.index(name) if name in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)

    items.sort(key=rank)  # stable: order within a file and among the rest is kept
