"""A small client for a ComfyUI server, and a launcher for a headless local one.

One implementation shared by the user-facing scripts (`queue_workflow.py`, `demo.py`) and
the test harness (`tests/comfy_server.py`). Standard library plus `websocket-client`;
without `websocket-client` the client still works, polling `/history` instead of
following progress on the websocket.

    with LocalComfyServer(comfyui_path, base_dir) as server:
        client = server.client
        prompt_id = client.queue(prompt)
        result = client.wait(prompt_id, timeout=300, output_dir=server.output_dir)

Every wait is bounded in time; the launcher stops its server on exit, on errors and, on
Linux, also when the launching process dies.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

try:  # optional: progress events need the websocket
    import websocket  # websocket-client
except ImportError:  # pragma: no cover - the dev venv has it
    websocket = None

PACK_DIR_NAME = "ComfyUI-MotionClone"
HTTP_TIMEOUT = 30.0
# Messages that end a prompt (besides `executing` with node None, sent after history is stored).
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")

EventCallback = Callable[[str, dict[str, Any]], None]


class ComfyError(RuntimeError):
    """An error reported by the server; `details` holds its JSON when there is one."""

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.details = details


class ServerStartError(RuntimeError):
    """The local server exited or did not answer in time; the message ends with its log tail."""


class PromptValidationError(ComfyError):
    """POST /prompt answered 400: `details` is the server's {"error", "node_errors"} JSON."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ProgressEvent:
    node: str | None
    value: int
    max: int


@dataclass(frozen=True)
class OutputFile:
    node: str
    filename: str
    subfolder: str
    type: str  # "output", "temp" or "input"

    def relpath(self) -> str:
        return os.path.join(self.subfolder, self.filename) if self.subfolder else self.filename


@dataclass
class RunResult:
    """What happened to one queued prompt."""

    prompt_id: str
    status: str  # "success", "error" or "interrupted"
    history: dict[str, Any]  # the /history/{prompt_id} entry
    progress: list[ProgressEvent] = field(default_factory=list)
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    outputs: list[OutputFile] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)  # outputs resolved on disk (when the folders are known)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def error(self) -> dict[str, Any] | None:
        for event, data in self._all_messages():
            if event in ("execution_error", "execution_interrupted"):
                return data
        return None

    def error_message(self) -> str:
        err = self.error
        if self.ok:
            return ""
        if err is None:
            return f"prompt {self.prompt_id} ended with status {self.status!r}"
        if self.status == "interrupted":
            return f"interrupted at node {err.get('node_id')} ({err.get('node_type')})"
        return (
            f"node {err.get('node_id')} ({err.get('node_type')}) failed: "
            f"{err.get('exception_type')}: {str(err.get('exception_message')).strip()}"
        )

    def failure_report(self) -> str:
        """The server-side traceback (if any), then `error: <message>` as the last line."""
        tb = (self.error or {}).get("traceback") or []
        head = "Traceback (on the server):\n" + "".join(tb).rstrip() + "\n" if tb else ""
        return f"{head}error: {self.error_message()}"

    def _all_messages(self) -> list[tuple[str, dict[str, Any]]]:
        # The websocket stream when we had one, else the messages kept in the history.
        stored = [(m[0], m[1]) for m in self.history.get("status", {}).get("messages", []) if len(m) == 2]
        return self.messages + stored


def history_outputs(entry: dict[str, Any]) -> list[OutputFile]:
    """Files listed in a history entry's outputs (images, gifs, videos, audio, ...)."""
    files = []
    for node_id, node_out in entry.get("outputs", {}).items():
        for items in node_out.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and "filename" in item:
                    files.append(
                        OutputFile(
                            node=str(node_id),
                            filename=item["filename"],
                            subfolder=item.get("subfolder", ""),
                            type=item.get("type", "output"),
                        )
                    )
    return files


def _status_from(entry: dict[str, Any], messages: Sequence[tuple[str, dict[str, Any]]]) -> str:
    events = [e for e, _ in messages] + [m[0] for m in entry.get("status", {}).get("messages", []) if m]
    if "execution_interrupted" in events:
        return "interrupted"
    if "execution_error" in events:
        return "error"
    status = entry.get("status", {})
    return "success" if status.get("status_str") == "success" and status.get("completed", True) else "error"


# --------------------------------------------------------------------------- workflow helpers


def load_workflow(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An API-format workflow ({node_id: {"class_type", "inputs"}}), checked for shape."""
    prompt = json.loads(Path(path).read_text())
    if not isinstance(prompt, dict) or "nodes" in prompt:
        raise ValueError(f"{path}: not an API-format workflow (export it with 'Export (API)')")
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            raise ValueError(f"{path}: node {node_id!r} has no class_type")
    return prompt


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, booleans, lists, links like ["4", 0]), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(prompt: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `NODE_ID.input=VALUE` overrides in place; returns the prompt."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        node_id, dot, input_name = key.partition(".")
        if not sep or not dot or not node_id or not input_name:
            raise ValueError(f"override {item!r} is not NODE_ID.input=VALUE")
        if node_id not in prompt:
            raise ValueError(f"override {item!r}: no node {node_id!r} in the workflow")
        prompt[node_id].setdefault("inputs", {})[input_name] = parse_value(raw)
    return prompt


# --------------------------------------------------------------------------- client


def _is_loopback(host: str | None) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


class ComfyClient:
    """HTTP + websocket client for one ComfyUI server (one client id, one websocket)."""

    def __init__(self, url: str = "http://127.0.0.1:8188", client_id: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        parsed = urllib.parse.urlsplit(self.url)
        # A proxy from the environment must not intercept a server on this machine.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)
        self._ws: Any = None

    # -- HTTP
    def _request(self, method: str, path: str, payload: Any = None, timeout: float = HTTP_TIMEOUT) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with self._opener.open(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def get(self, path: str, timeout: float = HTTP_TIMEOUT) -> Any:
        return self._request("GET", path, timeout=timeout)

    def system_stats(self, timeout: float = HTTP_TIMEOUT) -> dict[str, Any]:
        return self.get("/system_stats", timeout=timeout)

    def object_info(self) -> dict[str, Any]:
        return self.get("/object_info")

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of a finished prompt, None while it is queued or running."""
        return self.get(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def interrupt(self, prompt_id: str | None = None) -> None:
        self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def queue(self, prompt: dict[str, Any]) -> str:
        """POST /prompt; returns the prompt id. Raises PromptValidationError on HTTP 400."""
        self._connect_ws()  # before queueing, so no event of this prompt is missed
        try:
            answer = self._request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            try:
                details = json.loads(body)
            except json.JSONDecodeError:
                details = body
            if exc.code == 400:
                raise PromptValidationError(f"prompt rejected: {format_validation_error(details)}", details) from None
            raise ComfyError(f"POST /prompt failed with HTTP {exc.code}: {body[:2000]}", details) from None
        return answer["prompt_id"]

    # -- websocket
    def _connect_ws(self) -> None:
        if websocket is None or self._ws is not None:
            return
        ws_url = re.sub(r"^http", "ws", self.url) + f"/ws?clientId={self.client_id}"
        self._ws = websocket.create_connection(ws_url, timeout=HTTP_TIMEOUT)

    def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None

    def __enter__(self) -> ComfyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(
        self,
        prompt_id: str,
        timeout: float = 600.0,
        *,
        on_event: EventCallback | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        folders: dict[str, str | os.PathLike[str]] | None = None,
    ) -> RunResult:
        """Follow `prompt_id` until it ends (or raise TimeoutError after `timeout` s).

        `on_event(type, data)` sees this prompt's websocket messages as they arrive.
        Output paths are resolved under `output_dir` (type "output") or `folders[type]`.
        """
        deadline = time.monotonic() + timeout
        progress: list[ProgressEvent] = []
        messages: list[tuple[str, dict[str, Any]]] = []
        entry = None
        if self._ws is not None:
            entry = self._follow_ws(prompt_id, deadline, progress, messages, on_event)
        while entry is None:  # no websocket, or it closed early: poll the history
            entry = self.history(prompt_id)
            if entry is None:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
                time.sleep(0.25)
        dirs = {k: Path(v) for k, v in (folders or {}).items()}
        if output_dir is not None:
            dirs["output"] = Path(output_dir)
        outputs = history_outputs(entry)
        paths = [dirs[f.type] / f.relpath() for f in outputs if f.type in dirs]
        return RunResult(
            prompt_id=prompt_id,
            status=_status_from(entry, messages),
            history=entry,
            progress=progress,
            messages=messages,
            outputs=outputs,
            paths=paths,
        )

    def _follow_ws(
        self,
        prompt_id: str,
        deadline: float,
        progress: list[ProgressEvent],
        messages: list[tuple[str, dict[str, Any]]],
        on_event: EventCallback | None,
    ) -> dict[str, Any] | None:
        """Read websocket messages until the prompt is done; its history entry, or None if the socket closed."""
        next_history_check = time.monotonic() + 5.0
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within the time given")
            self._ws.settimeout(min(1.0, deadline - now))
            try:
                raw = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                raw = None
            except (websocket.WebSocketConnectionClosedException, OSError):
                self.close()
                return None
            if isinstance(raw, str) and raw:
                msg = json.loads(raw)
                event, data = msg.get("type", ""), msg.get("data") or {}
                if data.get("prompt_id") == prompt_id:
                    messages.append((event, data))
                    if event == "progress":
                        progress.append(ProgressEvent(data.get("node"), int(data["value"]), int(data["max"])))
                    if on_event is not None:
                        on_event(event, data)
                    # `executing` node None comes after the history entry is stored.
                    if event == "executing" and data.get("node") is None:
                        entry = self.history(prompt_id)
                        if entry is not None:
                            return entry
            # Binary frames are previews: ignored. A missed end message is caught by a slow history check.
            if time.monotonic() >= next_history_check:
                next_history_check = time.monotonic() + 5.0
                entry = self.history(prompt_id)
                if entry is not None:
                    return entry


def format_validation_error(details: Any) -> str:
    """One readable line per problem from a /prompt 400 answer."""
    if not isinstance(details, dict):
        return str(details)
    parts = []
    err = details.get("error")
    if isinstance(err, dict):
        parts.append(f"{err.get('message', '')} {err.get('details', '')}".strip())
    elif err:
        parts.append(str(err))
    for node_id, node_err in (details.get("node_errors") or {}).items():
        for e in node_err.get("errors", []):
            parts.append(f"node {node_id} ({node_err.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(p for p in parts if p) or json.dumps(details)


# --------------------------------------------------------------------------- progress printing


class ProgressPrinter:
    """`on_event` callback printing one line per executed node, with a bar for nodes that report progress."""

    def __init__(self, prompt: dict[str, Any], stream: IO[str] | None = None, width: int = 30) -> None:
        self.prompt = prompt
        self.stream = stream or sys.stdout
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._node: str | None = None
        self._last: tuple[int, int] | None = None
        self._started = time.monotonic()

    def _label(self, node: str | None) -> str:
        cls = self.prompt.get(str(node), {}).get("class_type", "?")
        return f"#{node} {cls}"

    def _bar(self, value: int, total: int) -> str:
        filled = self.width * value // total if total else self.width
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {value}/{total}"

    def _finish_node(self) -> None:
        if self._node is None:
            return
        elapsed = time.monotonic() - self._started
        tail = self._bar(*self._last) if self._last else "done"
        end = "\r" if self.tty else ""
        self.stream.write(f"{end}{self._label(self._node):<40} {tail} ({elapsed:.1f} s)\n")
        self.stream.flush()
        self._node, self._last = None, None

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "execution_cached" and data.get("nodes"):
            self.stream.write(f"cached: {', '.join(self._label(n) for n in data['nodes'])}\n")
        elif event == "executing":
            self._finish_node()
            if data.get("node") is not None:
                self._node, self._started = str(data["node"]), time.monotonic()
        elif event == "progress":
            node = str(data.get("node"))
            if node != self._node:
                self._finish_node()
                self._node, self._started = node, time.monotonic()
            self._last = (int(data["value"]), int(data["max"]))
            if self.tty:
                self.stream.write(f"\r{self._label(node):<40} {self._bar(*self._last)}")
        elif event in TERMINAL_EVENTS:  # the caller reports errors (RunResult.error_message)
            self._finish_node()
        self.stream.flush()


# --------------------------------------------------------------------------- local server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base_dir: str | os.PathLike[str], pack_root: str | os.PathLike[str]) -> Path:
    """A ComfyUI --base-directory with this pack linked in and empty model/input/output folders.

    Reusable (idempotent). Only `base_dir` is written: the host's own folders stay untouched.
    """
    base = Path(base_dir).resolve()
    for sub in ("custom_nodes", "models", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    target = Path(pack_root).resolve()
    if link.is_symlink() and link.resolve() != target:
        link.unlink()
    if not link.is_symlink():
        if link.exists():
            raise FileExistsError(f"{link} exists and is not a link to {target}")
        link.symlink_to(target, target_is_directory=True)
    return base


def _set_parent_death_signal() -> None:
    # Runs in the child before exec: ask Linux to SIGTERM it when the launching process dies.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


_RUNNING: set[LocalComfyServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


class LocalComfyServer:
    """A headless ComfyUI (`main.py --cpu`) on 127.0.0.1 with its own --base-directory.

    Output goes to `<base_dir>/comfyui.log`. Use as a context manager; `stop()` is idempotent.
    """

    def __init__(
        self,
        comfyui_path: str | os.PathLike[str],
        base_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 180.0,
        log_name: str = "comfyui.log",
        threads: int | None = None,
    ) -> None:
        self.comfyui_path = Path(comfyui_path).resolve()
        self.base_dir = Path(base_dir).resolve()
        self.port = port
        self._fixed_port = port is not None
        self.python = python
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = self.base_dir / log_name
        # CPU threads for torch (OMP/MKL); None keeps torch's default (all cores). With
        # every core in use, a busy machine makes OpenMP's waiting threads thrash:
        # measured 10-45x slower tiny-model sampling with 2 threads on 2 busy cores.
        self.threads = threads
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: ComfyClient | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def folders(self) -> dict[str, Path]:
        return {t: self.base_dir / t for t in ("output", "input", "temp")}

    def command(self) -> list[str]:
        return [
            self.python, "main.py",
            "--cpu",
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--disable-auto-launch",
            "--base-directory", str(self.base_dir),
            "--database-url", "sqlite:///:memory:",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> LocalComfyServer:
        if not (self.comfyui_path / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI main.py in {self.comfyui_path}")
        for _ in range(3):  # a free port can be taken between probing and binding: retry on another
            if not self._fixed_port:
                self.port = free_port()
            try:
                self._spawn_and_wait()
                return self
            except ServerStartError as exc:
                if self._fixed_port or "address already in use" not in str(exc).lower():
                    raise
        raise ServerStartError("could not find a free port for ComfyUI")

    def _spawn_and_wait(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)  # a repo root on it would shadow ComfyUI's `nodes`
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.comfyui_path,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, stopped as a whole
                preexec_fn=_set_parent_death_signal if sys.platform.startswith("linux") else None,
            )
        _RUNNING.add(self)
        client = ComfyClient(self.url)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise ServerStartError(f"ComfyUI exited with code {code} during start-up:\n{self.log_tail()}")
            try:
                client.system_stats(timeout=2.0)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise ServerStartError(f"ComfyUI not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)
        self.client = client

    def log_text(self) -> str:
        """This run's server log (the file may hold earlier runs when the base dir is reused)."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_errors(self, pack_dir_name: str = PACK_DIR_NAME) -> list[str]:
        """Log lines saying our pack (custom_nodes/<pack_dir_name>) failed to load, with its traceback."""
        return import_errors(self.log_text(), pack_dir_name)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate (SIGTERM to its process group), then kill after `timeout` s."""
        if self.client is not None:
            self.client.close()
        proc, self.proc = self.proc, None
        _RUNNING.discard(self)
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> LocalComfyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def import_errors(log: str, pack_dir_name: str = PACK_DIR_NAME) -> list[str]:
    """Failure lines about `custom_nodes/<pack_dir_name>` in a ComfyUI log.

    ComfyUI logs "Cannot import <path> module for custom nodes: <error>", "(IMPORT FAILED): <path>"
    in the import-time table, "Error while calling comfy_entrypoint in <path>" and "Skip <path>".
    """
    needle = f"custom_nodes{os.sep}{pack_dir_name}"
    lines = log.splitlines()
    found = []
    for i, line in enumerate(lines):
        if needle not in line:
            continue
        if any(k in line for k in ("Cannot import", "IMPORT FAILED", "Error while calling comfy_entrypoint", "Skip ")):
            if "Cannot import" in line:
                # The traceback logged just before says where.
                start = max(0, i - 1)
                while start > 0 and not lines[start].startswith("Traceback"):
                    if i - start > 60:
                        break
                    start -= 1
                found.append("\n".join(lines[start : i + 1]) if lines[start].startswith("Traceback") else line)
            else:
                found.append(line)
    return found
