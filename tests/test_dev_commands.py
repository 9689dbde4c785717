"""The newcomer's commands: `dev.py demo`, `dev.py serve` and the README's queue example, run as a user
runs them (from the checkout's folder, through scripts/dev.py), plus the set-up's choices that need no
server (which torch-family fixes apply, which commands touch system packages).

The commands run against the host under test: COMFYUI_PATH names one of dev.py's own hosts, which it
recognises, so no new venv is made.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from comfy_server import ROOT

DEV_PY = ROOT / "scripts" / "dev.py"
NODE_NAMES = ("Extract Sparse Motion", "Motion Guided Sampler", "Load Reference Video",
              "Load AnimateDiff Motion Module", "Image Condition (SparseCtrl)", "MotionClone Guider", "Save Motion",
              "Load Motion")
PACK_NODES = ("ExtractSparseMotion", "MotionGuidedSampler", "MotionCloneGuider", "MotionCloneUnevenSchedule",
              "SaveMotion", "LoadMotion", "LoadReferenceVideo", "ImageCondition", "LoadAnimateDiffMotionModule",
              "MotionCloneCompactCheckpointLoader")
RUN_BOUND_S = 600  # a hung command fails the test instead of blocking it; not a speed target


def _dev_module():
    spec = importlib.util.spec_from_file_location("motionclone_dev", DEV_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- no server


def test_torch_family_is_patched_only_where_it_does_not_import(monkeypatch):
    dev = _dev_module()
    host = dev.WHEEL_HOST
    patched = []
    monkeypatch.setattr(dev, "patch_torchvision", lambda python: patched.append("torchvision"))
    monkeypatch.setattr(dev, "patch_torchaudio", lambda python: patched.append("torchaudio"))

    monkeypatch.setattr(dev, "_import_error", lambda python, statement: None)  # e.g. a CUDA torch: all import
    dev.make_torch_family_importable(host)
    assert patched == []

    errors = {"import torchvision": "RuntimeError: operator torchvision::nms does not exist",
              "import torchaudio": "OSError: libc10_cuda.so: cannot open shared object file\n"
                                   "OSError: Could not load this library: .../torchaudio/lib/_torchaudio.so"}
    monkeypatch.setattr(dev, "_import_error", lambda python, statement: errors.get(statement))
    dev.make_torch_family_importable(host)
    assert patched == ["torchvision", "torchaudio"]

    monkeypatch.setattr(dev, "_import_error", lambda python, statement: "ModuleNotFoundError: No module named 'x'")
    with pytest.raises(SystemExit, match="torchvision does not import"):
        dev.make_torch_family_importable(host)  # anything else is not ours to patch


def test_only_the_test_command_installs_the_browser(monkeypatch, tmp_path):
    dev = _dev_module()
    monkeypatch.setattr(dev, "DEV", tmp_path)  # the hosts' own files stay untouched
    calls = []
    monkeypatch.setattr(dev, "ensure_chromium", lambda: calls.append("chromium") or True)
    monkeypatch.setattr(dev, "setup", lambda host: host)
    monkeypatch.setattr(dev, "chosen_hosts", lambda all_defaults: [dev.WHEEL_HOST])
    ran = []

    class Done:
        returncode = 0

    monkeypatch.setattr(dev.subprocess, "run", lambda cmd, **kw: ran.append((cmd, kw)) or Done())
    assert dev.cmd_demo(["--workflow", "workflows/motionclone_smoke_api.json"]) == 0
    assert calls == []
    # The demo runs where the user stands (no cwd of its own), so their relative paths mean what they say.
    (cmd, kw), = ran
    assert "cwd" not in kw and cmd[-2:] == ["--workflow", "workflows/motionclone_smoke_api.json"]
    monkeypatch.setattr(dev, "_junit_counts", lambda path: {})
    dev.cmd_test(["-k", "nothing"])
    assert calls == ["chromium"]


def test_the_test_command_spreads_files_and_runs_single_host_tests_once(monkeypatch):
    dev = _dev_module()
    monkeypatch.setenv("MOTIONCLONE_TEST_WORKERS", "2")
    assert dev.pytest_defaults([], first_host=True) == ["-n", "2", "--dist", "loadfile"]
    assert dev.pytest_defaults(["tests/x.py"], first_host=False) == ["-n", "2", "--dist", "loadfile",
                                                                     "-m", "not single_host"]
    # The caller's own choices win: workers, no xdist, a marker expression.
    assert dev.pytest_defaults(["-n", "1"], first_host=True) == []
    assert dev.pytest_defaults(["-p", "no:xdist", "-m", "server"], first_host=False) == []
    monkeypatch.setenv("MOTIONCLONE_TEST_WORKERS", "1")
    assert dev.pytest_defaults([], first_host=False) == ["-m", "not single_host"]


def test_our_hosts_are_recognised_by_their_path():
    dev = _dev_module()
    comfyui = Path(os.environ["COMFYUI_PATH"]).resolve()
    host = dev.path_host(comfyui)
    if comfyui.parent.parent == dev.DEV.resolve():  # the test command's own hosts
        assert host.kind == "managed" and host.venv == comfyui.parent / "venv" and host.comfyui == comfyui
    else:  # a user's install
        assert host.kind == "path" and host.comfyui == comfyui


# --------------------------------------------------------------------------- real commands


@pytest.mark.server
def test_demo_from_the_checkout_folder_saves_each_run_in_its_own_folder(tmp_path):
    base = tmp_path / "demo"
    folders = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, DEV_PY, "demo", "--workflow", "workflows/motionclone_smoke_api.json",
                               "--base-dir", base], cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=RUN_BOUND_S)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (where,) = re.findall(r"this run's files are in (\S+)", proc.stdout)
        folders.append(Path(where))
    assert folders[0] != folders[1] and all(f.parent == base / "output" / "runs" for f in folders)
    for folder in folders:
        assert len(list(folder.rglob("motionclone_smoke_*.png"))) == 8  # one image per frame, this run's only
    assert not [p for p in (base / "output").rglob("*.png") if "runs" not in p.parts]  # nothing outside them


@pytest.mark.server
def test_the_demo_shows_what_the_guidance_does(tmp_path):
    """The default demo: both runs' motion loss per guided step printed and drawn, the guided one lower
    at the end (the guidance aligns the attention), next to the fidelity figures."""
    proc = subprocess.run([sys.executable, DEV_PY, "demo", "--base-dir", tmp_path / "demo"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=RUN_BOUND_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    curves = {label: [float(v) for v in re.findall(r"\d+:([\d.e+-]+)", rest)]
              for label, rest in re.findall(r"^  (guided, weight \S+|unguided \(weight 0\))\s+(.*)$", out, flags=re.M)}
    assert set(curves) == {"guided, weight 1000", "unguided (weight 0)"}, out
    assert len(curves["guided, weight 1000"]) == len(curves["unguided (weight 0)"]) == 12
    assert curves["guided, weight 1000"][-1] < curves["unguided (weight 0)"][-1]
    (chart,) = re.findall(r"motion loss chart: (\S+)", out)
    (folder,) = re.findall(r"this run's files are in (\S+)", out)
    assert Path(chart) == Path(folder) / "motion_loss.png" and Path(chart).stat().st_size > 0
    assert (Path(folder) / "side_by_side.gif").exists() and "LK-track motion fidelity" in out


def _wait_for_url(proc: subprocess.Popen, lines: list[str]) -> str:
    deadline = time.monotonic() + RUN_BOUND_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(r"is ready at (http://\S+)", line):
            return m.group(1)
    raise AssertionError("dev.py serve did not say it is ready:\n" + "".join(lines))


@pytest.mark.server
def test_serve_runs_the_readme_api_example_and_the_frontend_lists_the_nodes(tmp_path):
    from comfy_client import ComfyClient, free_port

    sys.path.insert(0, str(ROOT / "tests" / "frontend"))
    from comfy_browser import write_frontend_settings

    base = tmp_path / "serve"
    write_frontend_settings(base)  # a user past the first-run dialogs
    port = free_port()
    proc = subprocess.Popen([sys.executable, DEV_PY, "serve", "--port", str(port), "--base-dir", base], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    lines: list[str] = []
    try:
        url = _wait_for_url(proc, lines)
        info = ComfyClient(url).object_info()
        assert set(PACK_NODES) <= set(info), sorted(set(PACK_NODES) - set(info))
        # The README's API example, as written (only the port differs here).
        readme = (ROOT / "README.md").read_text()
        (example,) = re.findall(r"^python3 scripts/dev\.py python scripts/queue_workflow\.py .*(?:\n {4}.*)*", readme,
                                flags=re.M)
        args = example.replace("\\\n", " ").split()[2:]
        args = [a.replace("http://127.0.0.1:8188", url).replace(".dev/serve/output", str(base / "output"))
                for a in args]
        run = subprocess.run([sys.executable, DEV_PY, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=RUN_BOUND_S)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert len(list((base / "output").rglob("motionclone_smoke_*.png"))) == 8
        _node_library_lists_the_pack(url)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        out, _ = proc.communicate(timeout=60)
        lines.append(out)
    assert proc.returncode == 0, "".join(lines)
    assert "server stopped" in "".join(lines)
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)


def _node_library_lists_the_pack(url: str) -> None:
    from comfy_browser import chromium_missing_reason, comfy_page

    if reason := chromium_missing_reason():
        pytest.skip(reason)
    with comfy_page(url) as cp:
        cp.page.get_by_role("button", name="Node Library (n)").click()
        search = cp.page.locator("input[placeholder*='earch']").first
        for name in NODE_NAMES:
            search.fill(name)
            cp.page.wait_for_function("(name) => document.body.innerText.includes(name)", arg=name, timeout=20_000)
