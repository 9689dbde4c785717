"""The shipped UI workflows in the real ComfyUI frontend (comfyui-frontend-package, served by the
server) in headless Chromium: every node type is known, loading raises no errors, the frontend's
own graphToPrompt gives the shipped API file, and a screenshot per workflow is saved to
test-artifacts/frontend/<name>.png.

Needs Debian's chromium (/usr/bin/chromium; `python3 scripts/dev.py setup` installs it as root)
and the `playwright` package (its driver only; no browser download).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from comfy_server import ROOT, ComfyServer

sys.path.insert(0, str(Path(__file__).resolve().parent / "frontend"))

from build_workflows import WORKFLOWS_BUILT  # noqa: E402
from comfy_browser import chromium_missing_reason, comfy_page, js_function, write_frontend_settings  # noqa: E402

WORKFLOWS = ROOT / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))
SHOTS = ROOT / "test-artifacts" / "frontend"

# Loads a workflow the way opening a file does; reports what a user would see go wrong.
LOAD = """
async ([workflow, name]) => {
  await app.loadGraphData(workflow, true, true, name);
  await new Promise((r) => setTimeout(r, 300));  // let dialogs and the canvas settle
  const types = workflow.nodes.map((n) => n.type);
  const dialogs = [...document.querySelectorAll('.p-dialog')].map((d) => d.innerText);
  return {
    unregistered: types.filter((t) => !(t in LiteGraph.registered_node_types)),
    broken: app.graph.nodes.filter((n) => n.has_errors).map((n) => `${n.id} ${n.type}`),
    nodes: app.graph.nodes.length,
    dialogs,
  };
}
"""
PROMPT = "async () => JSON.parse(JSON.stringify((await app.graphToPrompt()).output))"


@pytest.fixture(scope="module")
def page():
    if reason := chromium_missing_reason():
        pytest.skip(reason)
    server = ComfyServer()
    write_frontend_settings(server.base_dir)
    with server:
        assert server.import_errors() == [], server.log_tail()
        with comfy_page(server.url) as cp:
            yield cp


def _load(cp, workflow: dict, name: str) -> tuple[dict, list[str]]:
    mark = cp.mark()
    state = cp.page.evaluate(LOAD, [workflow, name])
    return state, cp.errors(mark)


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_in_the_frontend(page, name):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    state, errors = _load(page, workflow, name)
    assert state["unregistered"] == [], f"node types unknown to the frontend: {state['unregistered']}"
    assert state["broken"] == [] and state["dialogs"] == [], state
    assert state["nodes"] == len(workflow["nodes"])
    assert errors == [], "\n".join(errors)
    # The frontend's own conversion is the shipped API file (test_workflows checks ours against it too).
    assert page.page.evaluate(PROMPT) == json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(SHOTS / f"{name}.png"))


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_shipped_files_are_what_the_builder_writes(page, name):
    """Files and their description in tests/frontend/build_workflows.py agree (edit the builder, then
    run it to regenerate both formats)."""
    out = page.page.evaluate(js_function("build_graph.js"), WORKFLOWS_BUILT[name]().to_js())
    hint = f"run `.dev/venv/bin/python tests/frontend/build_workflows.py {name}`"
    assert out["api"] == json.loads((WORKFLOWS / f"{name}_api.json").read_text()), hint
    assert out["workflow"] == json.loads((WORKFLOWS / f"{name}.json").read_text()), hint


@pytest.mark.server
def test_a_missing_node_type_is_detected(page):
    """The checks above can fail: a workflow with an unknown node type is reported."""
    workflow = json.loads((WORKFLOWS / f"{NAMES[0]}.json").read_text())
    workflow["nodes"][-1]["type"] = "MotionCloneNoSuchNode"
    state, _ = _load(page, workflow, "missing-node")
    assert state["unregistered"] == ["MotionCloneNoSuchNode"]
    assert any("MotionCloneNoSuchNode" in text for text in state["dialogs"]), state["dialogs"]
    page.page.keyboard.press("Escape")  # close the dialog: later loads start clean
    page.page.wait_for_function("() => document.querySelectorAll('.p-dialog').length === 0")
