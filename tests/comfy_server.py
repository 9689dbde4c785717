"""Test harness: the real ComfyUI host as a headless server in a throw-away base directory.

    with ComfyServer() as server:
        server.model_path("checkpoints", "tiny.safetensors")  # a place for a model file
        result = server.wait(server.queue(prompt), timeout=120)

The base directory holds `custom_nodes/ComfyUI-MotionClone` (a link to this checkout),
`models/`, `input/`, `output/` and the server log, so the host's own folders are never
touched. Process handling and the HTTP/websocket client are `scripts/comfy_client.py`,
shared with the user-facing scripts.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from comfy_client import (  # noqa: E402
    PACK_DIR_NAME,
    ComfyClient,
    EventCallback,
    LocalComfyServer,
    RunResult,
    prepare_base_dir,
)


def comfyui_path() -> Path:
    """The host under test (COMFYUI_PATH, which scripts/dev.py sets)."""
    if not os.environ.get("COMFYUI_PATH"):
        raise RuntimeError("COMFYUI_PATH is not set: run through `python3 scripts/dev.py test` (or `dev.py python`)")
    return Path(os.environ["COMFYUI_PATH"]).resolve()


class ComfyServer:
    """Context manager around a real headless ComfyUI with this pack installed.

    `base_dir`: use (and keep) this folder; by default a temp folder removed on exit.
    The folders exist from construction on: write model files (`model_path`) before
    `start()`, so the loaders' file lists are certain to include them.
    `threads`: torch CPU threads of the server (None: torch's default).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        comfyui: str | os.PathLike[str] | None = None,
        startup_timeout: float = 180.0,
        extra_args: tuple[str, ...] = (),
        threads: int | None = 1,
    ) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="comfy-server-")).resolve()
        self.comfyui = Path(comfyui).resolve() if comfyui else comfyui_path()
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        # One torch thread: tiny models gain nothing from more, and tests often run beside
        # other busy processes, where extra OpenMP threads slow the server down many times.
        self.threads = threads
        self.process: LocalComfyServer | None = None
        prepare_base_dir(self.base_dir, ROOT)

    # -- folders
    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "comfyui.log"

    def model_path(self, folder: str, filename: str) -> Path:
        """Where a model file for ComfyUI's `folder` (e.g. "checkpoints") goes; creates the folder."""
        path = self.models_dir / folder / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- life cycle
    def start(self) -> ComfyServer:
        self.process = LocalComfyServer(
            self.comfyui,
            self.base_dir,
            extra_args=self.extra_args,
            startup_timeout=self.startup_timeout,
            threads=self.threads,
        )
        try:
            self.process.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- API
    @property
    def client(self) -> ComfyClient:
        if self.process is None or self.process.client is None:
            raise RuntimeError("server not started")
        return self.process.client

    @property
    def url(self) -> str:
        return self.client.url

    def object_info(self) -> dict[str, Any]:
        return self.client.object_info()

    def queue(self, prompt: dict[str, Any]) -> str:
        """POST /prompt; raises comfy_client.PromptValidationError (with the server's JSON) on HTTP 400."""
        return self.client.queue(prompt)

    def wait(self, prompt_id: str, timeout: float = 300.0, on_event: EventCallback | None = None) -> RunResult:
        """Follow the prompt on the websocket; output paths resolved under this base dir."""
        assert self.process is not None
        try:
            return self.client.wait(prompt_id, timeout, on_event=on_event, folders=self.process.folders)
        except (OSError, TimeoutError) as exc:  # URLError is an OSError: the server died or hangs
            raise RuntimeError(f"waiting for {prompt_id} failed: {exc!r}\nserver log:\n{self.log_tail()}") from exc

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.client.interrupt(prompt_id)

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines) if self.process else ""

    def import_errors(self, pack_dir_name: str = PACK_DIR_NAME) -> list[str]:
        """'Cannot import' / 'IMPORT FAILED' log lines for our pack (empty when it loaded)."""
        return self.process.import_errors(pack_dir_name) if self.process else []
