"""The real ComfyUI frontend in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

    write_frontend_settings(server.base_dir)      # before the server starts: no first-run dialogs
    with comfy_page(server.url) as cp:
        cp.page.evaluate("app.loadGraphData(...)")
        cp.errors()                               # console errors and page errors so far

Playwright's own browser download is never used: `executable_path` points at the system
Chromium, which `scripts/dev.py setup` installs. Every request that does not go to the
local server is aborted (the frontend otherwise asks the internet for release notes).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
HERE = Path(__file__).resolve().parent
# Settings of a user who has seen the first-run template browser already.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True}
# localStorage flags of dismissed banners (the "Nodes 2.0" announcement covers the top bar).
LOCAL_STORAGE = {"vueNodesBannerDismissed": "true"}
# Console errors of the frontend itself with this empty server, not of any workflow:
# 404s of optional files (user.css, templates index) and aborted off-machine requests.
BENIGN_CONSOLE = (
    re.compile(r"^Failed to load resource: the server responded with a status of 404"),
    re.compile(r"^Failed to load resource: net::ERR_FAILED"),
)


def chromium_missing_reason() -> str | None:
    """Why browser tests cannot run here, or None when they can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not installed (python3 scripts/dev.py test installs Debian's chromium as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright not installed (pip install -r requirements-dev.txt)"
    return None


def write_frontend_settings(base_dir: str | Path) -> Path:
    """The default user's settings file in a server's --base-directory (write before start)."""
    path = Path(base_dir) / "user" / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(FRONTEND_SETTINGS))
    return path


def js_function(name: str) -> str:
    """A JS function expression from this folder, without its leading comment lines."""
    lines = (HERE / name).read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith("//"))


@dataclass
class ComfyPage:
    page: object  # playwright.sync_api.Page
    messages: list[tuple[str, str]] = field(default_factory=list)  # (kind, text)

    def mark(self) -> int:
        return len(self.messages)

    def errors(self, since: int = 0) -> list[str]:
        """Page errors and console errors after `since`, without the frontend's benign ones."""
        out = []
        for kind, text in self.messages[since:]:
            if kind == "pageerror" or (kind == "console.error" and not any(p.match(text) for p in BENIGN_CONSOLE)):
                out.append(f"{kind}: {text}")
        return out


@contextmanager
def comfy_page(url: str, width: int = 1600, height: int = 1000, timeout_ms: float = 120_000) -> Iterator[ComfyPage]:
    """The frontend served by `url`, loaded and ready (`window.app.graph` exists)."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
                viewport={"width": width, "height": height},
            )  # fmt: skip
            try:
                context.route(re.compile(r"^(?!" + re.escape(url) + r")"), lambda route: route.abort())
                storage = (f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)})" for k, v in LOCAL_STORAGE.items())
                context.add_init_script(";".join(storage))
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(timeout_ms)
                cp = ComfyPage(page)
                page.on("console", lambda m: cp.messages.append((f"console.{m.type}", m.text)))
                page.on("pageerror", lambda e: cp.messages.append(("pageerror", str(e))))
                page.goto(url)
                page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph")
                yield cp
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
