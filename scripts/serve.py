#!/usr/bin/env python3
"""A headless ComfyUI with this pack, ready for the browser and the HTTP API.

Run it as `python3 scripts/dev.py serve` (sets up the venv and COMFYUI_PATH first). It uses a
persistent base directory (default .dev/serve: custom_nodes link, models, input, output,
comfyui.log), so the host's own folders are untouched, and puts in place everything the
shipped example graphs need: the embedded demo model and its reference clip
(demo_model/motionclone_demo_api.json) and the tiny random-weight files of the smoke graph
(workflows/motionclone_smoke_api.json). It prints the URL and a queue command that works as
written, then serves until Ctrl-C (or SIGTERM), when it stops the server and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_client import LocalComfyServer, ServerStartError, load_workflow, prepare_base_dir  # noqa: E402
from demo import (  # noqa: E402
    DEMO_WORKFLOW,
    ROOT,
    SMOKE_WORKFLOW,
    comfyui_path,
    ensure_pack_importable,
    place_demo_inputs,
    write_tiny_models,
)

SERVE_BASE = ROOT / ".dev" / "serve"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve ComfyUI headless with the MotionClone pack and example models.")
    p.add_argument("--port", type=int, default=8188, help="port on 127.0.0.1 (default %(default)s, ComfyUI's own)")
    p.add_argument("--base-dir", type=Path, default=SERVE_BASE, help="ComfyUI base directory (default %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads of the server; 0 = torch's default (all cores). Default 1, as the demo")
    return p.parse_args(argv)


def prepare(base: Path) -> Path:
    """Base directory with the pack linked, the demo model and clip, and the smoke graph's tiny files."""
    base = prepare_base_dir(base, ROOT)
    place_demo_inputs(base)
    ensure_pack_importable(comfyui_path())
    for path in write_tiny_models(base / "models", load_workflow(SMOKE_WORKFLOW)):
        print(f"wrote tiny model {path}", flush=True)
    return base


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = prepare(args.base_dir)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = LocalComfyServer(comfyui_path(), base, port=args.port, threads=args.threads or None).start()
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if errors := server.import_errors():
            print("error: the pack failed to import:\n" + "\n".join(errors), file=sys.stderr)
            return 1
        print(f"ComfyUI with MotionClone is ready at {server.url} (log: {server.log_path})", flush=True)
        print(f"  open {server.url} in a browser, or queue the example graphs (from the checkout's folder):",
              flush=True)
        for workflow in (SMOKE_WORKFLOW, DEMO_WORKFLOW):
            print(f"    python3 scripts/dev.py python scripts/queue_workflow.py {workflow.relative_to(ROOT)} "
                  f"--server {server.url} --output-dir {base / 'output'}", flush=True)
        print("Ctrl-C stops the server.", flush=True)
        while not stop.wait(0.5):
            if server.proc is None or server.proc.poll() is not None:
                print(f"error: the server exited; its log:\n{server.log_tail()}", file=sys.stderr)
                return 1
    finally:
        server.stop()
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
