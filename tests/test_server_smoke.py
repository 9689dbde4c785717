"""End-to-end: the real ComfyUI server loads the pack and runs the smoke workflow.

One headless server per module (tests/comfy_server.py) with the tiny model files in its
own base directory; also the user-facing `scripts/queue_workflow.py` against it, and the
pure helpers of `scripts/comfy_client.py`.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_server import ROOT, SCRIPTS, ComfyServer

sys.path.insert(0, str(SCRIPTS))

import demo  # noqa: E402
from comfy_client import (  # noqa: E402
    PromptValidationError,
    apply_overrides,
    history_outputs,
    import_errors,
    load_workflow,
)

SMOKE = ROOT / "workflows" / "motionclone_smoke_api.json"
OUR_NODES = ("MotionCloneCompactCheckpointLoader", "LoadAnimateDiffMotionModule")
# A generous bound so a hung server fails the test instead of blocking it; not a speed target.
RUN_BOUND_S = 600
BROKEN_MM = "broken_motion_module.safetensors"

# Core nodes only: exercises the harness and the CLI independent of the pack's nodes.
CORE_PROMPT = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 255}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "core"}},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    srv = ComfyServer(base)
    demo.write_tiny_models(srv.models_dir, load_workflow(SMOKE))
    # Listed like a real file, fails when loaded: for the execution-error test.
    srv.model_path("animatediff_models", BROKEN_MM).write_bytes(b"not a motion module")
    with srv:
        yield srv


# --------------------------------------------------------------------------- server


@pytest.mark.server
def test_pack_imports_and_registers_loaders(server):
    assert server.import_errors() == [], server.log_tail()
    info = server.object_info()
    for name in OUR_NODES:
        assert name in info, f"{name} missing from /object_info"
    # The combo inputs list the tiny files placed in the base dir's model folders.
    prompt = load_workflow(SMOKE)
    ckpt_spec = info["MotionCloneCompactCheckpointLoader"]["input"]["required"]["ckpt_name"]
    assert prompt["1"]["inputs"]["ckpt_name"] in _combo_options(ckpt_spec)
    mm_spec = info["LoadAnimateDiffMotionModule"]["input"]["required"]["model_name"]
    assert prompt["2"]["inputs"]["model_name"] in _combo_options(mm_spec)
    assert BROKEN_MM in _combo_options(mm_spec)


def _combo_options(spec: list) -> list[str]:
    # V3 nodes report ["COMBO", {"options": [...]}], V1 nodes [[...], {...}].
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


@pytest.mark.server
def test_smoke_workflow_runs(server):
    prompt = load_workflow(SMOKE)
    result = server.wait(server.queue(prompt), RUN_BOUND_S)
    assert result.ok, f"{result.error_message()}\n{server.log_tail()}"
    assert result.history["status"]["status_str"] == "success"
    assert result.history["status"]["completed"] is True

    sampler = [e for e in result.progress if e.node == "6"]
    assert sampler, f"no KSampler progress events in {result.progress}"
    assert {e.max for e in sampler} == {3}
    assert sampler[-1].value == 3

    assert len(result.paths) == 8
    assert all(p.suffix == ".png" and p.is_file() for p in result.paths), result.paths
    on_disk = sorted(server.output_dir.glob("motionclone_smoke_*.png"))
    assert on_disk == sorted(result.paths)

    from PIL import Image

    with Image.open(result.paths[0]) as im:
        assert im.size == (64, 64)


@pytest.mark.server
def test_interrupt_stops_a_running_prompt(server):
    prompt = load_workflow(SMOKE)
    prompt["6"]["inputs"]["steps"] = 500  # long enough that the interrupt lands mid-sampling
    prompt["8"]["inputs"]["filename_prefix"] = "interrupted"
    prompt_id = server.queue(prompt)
    sent = []

    def on_event(event, data):
        if event == "progress" and data.get("node") == "6" and not sent:
            sent.append(data["value"])
            server.interrupt()

    result = server.wait(prompt_id, RUN_BOUND_S, on_event=on_event)
    assert sent, "no KSampler progress before the end"
    assert result.status == "interrupted", result.status
    assert result.error["node_id"] == "6"
    assert max(e.value for e in result.progress if e.node == "6") < 500
    assert not list(server.output_dir.glob("interrupted_*.png"))


@pytest.mark.server
def test_invalid_prompt_raises_with_server_errors(server):
    prompt = copy.deepcopy(CORE_PROMPT)
    prompt["1"]["inputs"]["width"] = "wide"
    with pytest.raises(PromptValidationError) as exc:
        server.queue(prompt)
    assert "1" in exc.value.details["node_errors"]
    assert "width" in str(exc.value)


@pytest.mark.server
def test_execution_error_is_reported(server):
    prompt = load_workflow(SMOKE)
    prompt["2"]["inputs"]["model_name"] = BROKEN_MM  # passes validation (listed), fails when loaded
    result = server.wait(server.queue(prompt), RUN_BOUND_S)
    assert not result.ok
    assert result.status == "error"
    assert result.error["node_id"] == "2"
    assert "node 2" in result.error_message()
    report = result.failure_report()
    assert report.startswith("Traceback") and report.splitlines()[-1].startswith("error: node 2")


def _run_cli(server, *args):
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "queue_workflow.py"), *args, "--server", server.url],
        capture_output=True,
        text=True,
        timeout=RUN_BOUND_S,
    )


@pytest.mark.server
def test_queue_workflow_cli(server, tmp_path):
    wf = tmp_path / "core_api.json"
    wf.write_text(json.dumps(CORE_PROMPT))
    run = _run_cli(server, str(wf), "--set", "2.filename_prefix=cli_core", "--set", "1.batch_size=3",
                   "--output-dir", str(server.output_dir))  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    printed = [Path(line) for line in run.stdout.splitlines() if line.endswith(".png")]
    assert len(printed) == 3
    assert all(p.parent == server.output_dir and p.name.startswith("cli_core") and p.is_file() for p in printed)

    rejected = _run_cli(server, str(wf), "--set", "1.width=wide")
    assert rejected.returncode == 2
    assert "width" in rejected.stderr

    failed = _run_cli(server, str(SMOKE), "--set", f"2.model_name={BROKEN_MM}")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("error: node 2 (LoadAnimateDiffMotionModule) failed")


# --------------------------------------------------------------------------- pure helpers


def test_apply_overrides_parses_json_else_string():
    prompt = copy.deepcopy(CORE_PROMPT)
    apply_overrides(prompt, ["1.width=32", "2.filename_prefix=a b", '2.images=["1", 0]', "1.color=0xff"])
    assert prompt["1"]["inputs"]["width"] == 32
    assert prompt["2"]["inputs"]["filename_prefix"] == "a b"
    assert prompt["2"]["inputs"]["images"] == ["1", 0]
    assert prompt["1"]["inputs"]["color"] == "0xff"
    with pytest.raises(ValueError):
        apply_overrides(prompt, ["9.width=1"])
    with pytest.raises(ValueError):
        apply_overrides(prompt, ["1width=1"])


def test_import_errors_only_reports_our_pack():
    log = "\n".join(
        [
            "Traceback (most recent call last):",
            '  File "/x/ComfyUI/comfy_extras/nodes_audio.py", line 4, in <module>',
            "ModuleNotFoundError: No module named 'torchaudio'",
            "Cannot import /x/ComfyUI/comfy_extras/nodes_audio.py module for custom nodes: no torchaudio",
            "Traceback (most recent call last):",
            '  File "/b/custom_nodes/ComfyUI-MotionClone/__init__.py", line 7, in <module>',
            "ImportError: cannot import name 'X'",
            "Cannot import /b/custom_nodes/ComfyUI-MotionClone module for custom nodes: cannot import name 'X'",
            "   0.0 seconds (IMPORT FAILED): /b/custom_nodes/ComfyUI-MotionClone",
            "   0.1 seconds: /b/custom_nodes/other-pack",
        ]
    )
    errors = import_errors(log)
    assert len(errors) == 2
    assert errors[0].startswith("Traceback") and "ImportError: cannot import name 'X'" in errors[0]
    assert "nodes_audio" not in errors[0]
    assert "IMPORT FAILED" in errors[1]
    assert import_errors("   0.2 seconds: /b/custom_nodes/ComfyUI-MotionClone") == []


def test_history_outputs_lists_files_of_all_kinds():
    entry = {
        "outputs": {
            "8": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}], "animated": [True]},
            "9": {"gifs": [{"filename": "b.mp4", "subfolder": "vid", "type": "temp", "format": "video/h264-mp4"}]},
        }
    }
    files = history_outputs(entry)
    assert [(f.node, f.relpath(), f.type) for f in files] == [("8", "a.png", "output"), ("9", "vid/b.mp4", "temp")]
