#!/usr/bin/env python3
"""Queue an API-format workflow on a running ComfyUI server and follow it to the end.

    python scripts/queue_workflow.py workflows/motionclone_smoke_api.json \\
        --server http://127.0.0.1:8188 --set 6.steps=20 --set 3.text="a red car" \\
        --output-dir /path/to/ComfyUI/output

`--set NODE_ID.input=VALUE` overrides an input; VALUE is parsed as JSON when it can be
(numbers, true/false, links such as ["4",0]), else taken as a string. Progress is printed
one line per node (needs `websocket-client`; without it the script waits on /history).
Prints the output files and exits 0 on success, 1 on a failed or interrupted run, 2 when
the server rejects the workflow or cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_client import (  # noqa: E402
    ComfyClient,
    ComfyError,
    ProgressPrinter,
    apply_overrides,
    load_workflow,
    websocket,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workflow", type=Path, help="API-format workflow JSON (ComfyUI: Workflow > Export (API))")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default %(default)s)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NODE_ID.input=VALUE",
        help="override an input (repeatable)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after S seconds (default %(default)s)")
    p.add_argument("--output-dir", type=Path, help="the server's output folder, to print full paths")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prompt = apply_overrides(load_workflow(args.workflow), args.overrides)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if websocket is None:
        print("note: websocket-client is not installed; no per-step progress", file=sys.stderr)
    with ComfyClient(args.server) as client:
        try:
            prompt_id = client.queue(prompt)
        except ComfyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (urllib.error.URLError, OSError) as exc:
            print(f"error: cannot reach ComfyUI at {args.server}: {exc}", file=sys.stderr)
            return 2
        print(f"queued {args.workflow.name} as {prompt_id}")
        try:
            result = client.wait(prompt_id, args.timeout, on_event=ProgressPrinter(prompt))
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if not result.ok:
        print(result.failure_report(), file=sys.stderr)
        return 1
    print(f"done: {len(result.outputs)} output file(s)")
    for f in result.outputs:
        if args.output_dir is not None and f.type == "output":
            print(args.output_dir / f.relpath())
        else:
            print(f.relpath() if f.type == "output" else f"{f.relpath()} ({f.type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
