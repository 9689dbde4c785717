"""The shipped UI workflows in the real ComfyUI frontend (comfyui-frontend-package, served by the
server) in headless Chromium: every node type is known, loading raises no errors and flags no node,
the frontend's own graphToPrompt gives the shipped API file, and a screenshot per workflow is saved
to test-artifacts/frontend/<host>/<name>.png.

The shipped files are built by the current frontend (the newest host's). On that host the builder
must write them exactly; on an older host (ComfyUI 0.3.75's frontend) the same files must load.
The server holds stand-ins for the model and input files the workflows name, as a user's would.

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
from workflow_files import as_the_server_reads, host_titles_dropped, place_workflow_files  # noqa: E402

WORKFLOWS = ROOT / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))
SHOTS = ROOT / "test-artifacts" / "frontend"

# Loads a workflow the way opening a file does; reports what a user would see go wrong: dialogs
# (frontend 1.32) and the error overlay (frontend 1.49: "N errors found").
LOAD = """
async ([workflow, name]) => {
  await app.loadGraphData(workflow, true, true, name);
  await new Promise((r) => setTimeout(r, 500));  // let dialogs, overlays and the canvas settle
  const types = workflow.nodes.map((n) => n.type);
  const notices = [...document.querySelectorAll('.p-dialog, [data-testid="error-overlay"]')].map((d) => d.innerText);
  return {
    unregistered: types.filter((t) => !(t in LiteGraph.registered_node_types)),
    broken: app.graph.nodes.filter((n) => n.has_errors).map((n) => `${n.id} ${n.type}`),
    nodes: app.graph.nodes.length,
    notices,
  };
}
"""
PROMPT = "async () => JSON.parse(JSON.stringify((await app.graphToPrompt()).output))"
VERSION = "() => window.__COMFYUI_FRONTEND_VERSION__"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3])


@pytest.fixture(scope="module")
def page():
    if reason := chromium_missing_reason():
        pytest.skip(reason)
    server = ComfyServer()
    write_frontend_settings(server.base_dir)
    place_workflow_files(server.base_dir, [json.loads((WORKFLOWS / f"{n}_api.json").read_text()) for n in NAMES])
    with server:
        assert server.import_errors() == [], server.log_tail()
        with comfy_page(server.url) as cp:
            cp.object_info = server.object_info()
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
    assert state["broken"] == [] and state["notices"] == [], state
    assert state["nodes"] == len(workflow["nodes"])
    assert errors == [], "\n".join(errors)
    # The frontend's own conversion is the shipped API file (test_workflows checks ours against it too);
    # titles a node takes from this host's display names may differ from the building frontend's.
    api = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    prompt = as_the_server_reads(page.page.evaluate(PROMPT), page.object_info)
    if _version(page.page.evaluate(VERSION)) == _version(workflow["extra"]["frontendVersion"]):
        assert prompt == api
    else:  # an older frontend: its host's core nodes may lack inputs of the newer one (the server ignores them)
        assert host_titles_dropped(prompt, workflow) == host_titles_dropped(
            as_the_server_reads(api, page.object_info), workflow)
    shots = SHOTS / page.page.evaluate(VERSION)
    shots.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(shots / f"{name}.png"))


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_shipped_files_are_what_the_builder_writes(page, name):
    """Files and their description in tests/frontend/build_workflows.py agree (edit the builder, then
    run it on the newest host to regenerate both formats). An older host's frontend (ComfyUI 0.3.75)
    writes older files: there the shipped ones must come from a newer frontend, and load (test above)."""
    shipped = json.loads((WORKFLOWS / f"{name}.json").read_text())
    built_by, here = shipped["extra"]["frontendVersion"], page.page.evaluate(VERSION)
    if _version(here) != _version(built_by):
        assert _version(built_by) > _version(here), f"{name} was built by frontend {built_by}, older than {here}"
        return
    out = page.page.evaluate(js_function("build_graph.js"), WORKFLOWS_BUILT[name]().to_js())
    hint = f"run `python3 scripts/dev.py python tests/frontend/build_workflows.py {name}`"
    assert out["api"] == json.loads((WORKFLOWS / f"{name}_api.json").read_text()), hint
    assert out["workflow"] == shipped, hint


@pytest.mark.server
def test_a_missing_node_type_is_detected(page):
    """The checks above can fail: a workflow with an unknown node type is reported to the user."""
    workflow = json.loads((WORKFLOWS / f"{NAMES[0]}.json").read_text())
    workflow["nodes"][-1]["type"] = "MotionCloneNoSuchNode"
    state, _ = _load(page, workflow, "missing-node")
    assert state["unregistered"] == ["MotionCloneNoSuchNode"]
    assert state["notices"], state
    shown = "\n".join(state["notices"])
    if "MotionCloneNoSuchNode" not in shown:  # frontend 1.49: the overlay counts, its details name the node
        page.page.get_by_text("View details").click()
        shown = page.page.locator('[data-testid="error-group-missing-node"]').inner_text()
    assert "MotionCloneNoSuchNode" in shown, shown
    page.page.reload()  # later loads start clean
    page.page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph")
