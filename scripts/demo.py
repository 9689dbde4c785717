#!/usr/bin/env python3
"""Demo run: a headless ComfyUI with this pack clones the motion of a reference clip.

Run it as `python3 scripts/dev.py demo` (sets up the venv and COMFYUI_PATH first).
Uses a persistent base directory (default .dev/demo: custom_nodes link, models, input,
output, comfyui.log) so the host's own folders are untouched.

Default: the demo workflow (demo_model/motionclone_demo_api.json) on the embedded demo
model (demo_model/*.safetensors, placed in the base's model folders): a procedurally
generated reference clip (a red circle on a curve) -> Extract Sparse Motion -> Motion Guided
Sampler with a new subject ("blue square"), plus the unguided KSampler from the same seed.
It saves the frames and an mp4, then writes side_by_side.png / side_by_side.gif (rows:
reference, guided, unguided) and prints the LK-track motion fidelity and motion recall of both.
`--workflow workflows/motionclone_smoke_api.json` runs the tiny random-weight smoke graph
(tiny model files are generated for any loader that names a missing file); paths are taken
from where you stand. Each run saves into its own folder, output/runs/<date-time>/ of the
base directory, printed at the end. Exit code 0 on success.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_client import (  # noqa: E402
    ComfyError,
    LocalComfyServer,
    ProgressPrinter,
    ServerStartError,
    load_workflow,
    prepare_base_dir,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "motionclone"  # the name tests/conftest.py imports the pack under
SMOKE_WORKFLOW = ROOT / "workflows" / "motionclone_smoke_api.json"
DEMO_WORKFLOW = ROOT / "demo_model" / "motionclone_demo_api.json"
DEMO_BASE = ROOT / ".dev" / "demo"
# Shipped demo weights -> the model folder their loader reads.
DEMO_MODEL_FILES = {"motionclone_demo_sd15.safetensors": "checkpoints",
                    "motionclone_demo_mm.safetensors": "animatediff_models"}
DEMO_REFERENCE = "motionclone_demo_reference.mp4"
DEMO_REFERENCE_CLIP = {"seed": 10_003, "shape": "circle", "colour": "red", "trajectory": "curve",
                       "background": "gradient"}

# Loader class -> (file input, ComfyUI model folder, pack module, writer of a tiny file).
TINY_MODEL_WRITERS: dict[str, tuple[str, str, str, str]] = {
    "MotionCloneCompactCheckpointLoader": (
        "ckpt_name",
        "checkpoints",
        "motion_core.compact_checkpoint",
        "write_tiny_checkpoint",
    ),
    "LoadAnimateDiffMotionModule": (
        "model_name",
        "animatediff_models",
        "motion_core.tiny_models",
        "write_tiny_motion_module",
    ),
}


def comfyui_path() -> Path:
    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("COMFYUI_PATH is not set: run the demo as `python3 scripts/dev.py demo`")
    return Path(os.environ["COMFYUI_PATH"]).resolve()


def ensure_pack_importable(comfyui: Path) -> str:
    """Make `motionclone.motion_core` importable here (ComfyUI on sys.path, CPU mode); returns the package name.

    Only the package shell is created, not its `__init__` (the node registration is the
    server's business); in the tests conftest has already imported the full pack.
    """
    if PACKAGE not in sys.modules:
        if str(comfyui) not in sys.path:
            sys.path.append(str(comfyui))
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
        shell = types.ModuleType(PACKAGE)
        shell.__path__ = [str(ROOT)]
        sys.modules[PACKAGE] = shell
    return PACKAGE


def tiny_model_files(prompt: dict[str, Any]) -> list[tuple[str, str, Callable[..., Any]]]:
    """(model folder, filename, writer) for each loader in `prompt` that has a tiny-model writer."""
    files = []
    for node in prompt.values():
        spec = TINY_MODEL_WRITERS.get(node["class_type"])
        if spec is None:
            continue
        input_name, folder, module, func = spec

        def writer(path: Path, *, seed: int = 0, _m: str = module, _f: str = func) -> Any:
            return getattr(importlib.import_module(f"{PACKAGE}.{_m}"), _f)(path, seed=seed)

        files.append((folder, node["inputs"][input_name], writer))
    return files


def write_tiny_models(
    models_dir: Path, prompt: dict[str, Any], *, seed: int = 0, overwrite: bool = False
) -> list[Path]:
    """Write the tiny model files `prompt` loads into `models_dir/<folder>/` (missing ones only)."""
    written = []
    for folder, filename, writer in tiny_model_files(prompt):
        path = models_dir / folder / filename
        if path.exists() and not overwrite:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name (same suffix: it picks the format), so an interrupted
        # write never leaves a file that a later run would take as complete.
        tmp = path.with_name(f"{path.stem}.part{path.suffix}")
        writer(tmp, seed=seed)
        os.replace(tmp, path)
        written.append(path)
    return written


def place_demo_inputs(base: Path) -> None:
    """Shipped demo weights into the base's model folders, and the reference clip into input/."""
    import shutil

    for name, folder in DEMO_MODEL_FILES.items():
        target = base / "models" / folder / name
        source = ROOT / "demo_model" / name
        if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    clip_path = base / "input" / DEMO_REFERENCE
    if not clip_path.exists():
        write_reference_clip(clip_path)


def write_reference_clip(path: Path) -> None:
    """The procedural reference clip (training/procedural_clips.py, a seed past the training set) as mp4."""
    import av
    from fidelity_eval import procedural_clips

    frames = procedural_clips().make_clip(**DEMO_REFERENCE_CLIP).frames
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def compose_side_by_side(paths: list[Path], out_dir: Path) -> dict[str, Any]:
    """side_by_side.png (rows: reference, guided, unguided) and an animated side_by_side.gif,
    plus motion fidelity and recall of guided and unguided against the reference."""
    import numpy as np
    from PIL import Image

    rows = {}
    for kind in ("reference", "guided", "unguided"):
        files = sorted(p for p in paths if p.suffix == ".png" and p.name.startswith(kind + "_"))
        if files:
            rows[kind] = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    if set(rows) != {"reference", "guided", "unguided"}:
        return {}
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows.values()], axis=0)
    png = out_dir / "side_by_side.png"
    Image.fromarray(grid).save(png)
    strip = [Image.fromarray(np.concatenate([rows[k][i] for k in rows], axis=1)) for i in range(len(rows["guided"]))]
    gif = out_dir / "side_by_side.gif"
    strip[0].save(gif, save_all=True, append_images=strip[1:], duration=125, loop=0)
    from motionclone.motion_core.motion_fidelity import motion_scores

    scores = {k: motion_scores(rows["reference"], rows[k]) for k in ("guided", "unguided")}
    return {"png": png, "gif": gif, **scores}


def new_run_dir(output_dir: Path) -> str:
    """A fresh `runs/<date-time>[-n]` folder name under `output_dir` (relative, for filename prefixes)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"runs/{stamp}", 1
    while (output_dir / name).exists():
        n += 1
        name = f"runs/{stamp}-{n}"
    (output_dir / name).mkdir(parents=True)
    return name


def save_into(prompt: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """`prompt` with every `filename_prefix` moved under `run_dir` (one folder per run, nothing piles up)."""
    out = {}
    for node_id, node in prompt.items():
        inputs = dict(node.get("inputs", {}))
        if isinstance(inputs.get("filename_prefix"), str):
            inputs["filename_prefix"] = f"{run_dir}/{inputs['filename_prefix']}"
        out[node_id] = {**node, "inputs": inputs}
    return out


def loss_curves(prompt: dict[str, Any], history: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Each Motion Guided Sampler's motion loss per guided step, from the run's history, by label."""
    curves = {}
    for node_id, node in prompt.items():
        if node["class_type"] != "MotionGuidedSampler":
            continue
        entries = history.get("outputs", {}).get(node_id, {}).get("motion_loss") or []
        weight = node["inputs"].get("guidance_weight")
        label = f"guided, weight {weight:g}" if weight else "unguided (weight 0)"
        curves[label] = [(int(e["step"]), float(e["loss"])) for e in entries]
    return curves


def report_losses(curves: dict[str, list[tuple[int, float]]], out_dir: Path) -> Path | None:
    """Print the curves and save them on one chart (motion_loss.png); None when there are none."""
    if not any(curves.values()):
        return None
    from PIL import Image

    from motionclone.motion_core.loss_plot import draw_loss_plot, format_curve

    print("motion loss per guided step (step:loss; the guidance pulls the temporal attention toward the MOTION):")
    for label, curve in curves.items():
        print(f"  {label:22s} {format_curve(curve)}")
    finals = {label: curve[-1][1] for label, curve in curves.items() if curve}
    if len(finals) == 2:
        (a, va), (b, vb) = finals.items()
        print(f"  at the last guided step: {a} {va:.4g}, {b} {vb:.4g} (ratio {va / vb:.2f})")
    path = out_dir / "motion_loss.png"
    Image.fromarray(draw_loss_plot(curves, "MotionClone motion loss per guided step")).save(path)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the MotionClone smoke/demo workflow on a headless ComfyUI.")
    p.add_argument("--workflow", type=Path, default=DEMO_WORKFLOW, help="API-format workflow (default: the demo)")
    p.add_argument("--base-dir", type=Path, default=DEMO_BASE, help="ComfyUI base directory (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the run (default %(default)s)")
    p.add_argument("--fresh-models", action="store_true", help="rewrite the tiny model files even if they exist")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of the server; 0 = torch's default (all cores). Default 1: the tiny smoke "
        "models gain nothing from more, and on a busy machine extra threads slow sampling down many times",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    comfyui = comfyui_path()
    prompt = load_workflow(args.workflow)
    base = prepare_base_dir(args.base_dir, ROOT)
    uses_demo_model = any(n["inputs"].get("ckpt_name") in DEMO_MODEL_FILES for n in prompt.values())
    if uses_demo_model:
        place_demo_inputs(base)
    if tiny_model_files(prompt):
        ensure_pack_importable(comfyui)
        for path in write_tiny_models(base / "models", prompt, overwrite=args.fresh_models):
            print(f"wrote tiny model {path}")
    t0 = time.monotonic()
    print(f"starting ComfyUI ({comfyui}) with base directory {base}")
    try:
        with LocalComfyServer(comfyui, base, threads=args.threads or None) as server:
            print(f"server ready at {server.url} in {time.monotonic() - t0:.1f} s (log: {server.log_path})")
            errors = server.import_errors()
            if errors:
                print("error: the pack failed to import:\n" + "\n".join(errors), file=sys.stderr)
                return 1
            info = server.client.object_info()
            missing = sorted({n["class_type"] for n in prompt.values()} - info.keys())
            if missing:
                print(f"error: the server has no node(s) {', '.join(missing)}", file=sys.stderr)
                return 1
            t1 = time.monotonic()
            run_dir = new_run_dir(base / "output")
            prompt_id = server.client.queue(save_into(prompt, run_dir))
            print(f"queued {args.workflow.name} as {prompt_id}")
            result = server.client.wait(
                prompt_id, args.timeout, on_event=ProgressPrinter(prompt), folders=server.folders
            )
            if not result.ok:
                print(result.failure_report(), file=sys.stderr)
                return 1
            print(f"run finished in {time.monotonic() - t1:.1f} s; {len(result.paths)} file(s) saved, e.g.:")
            for path in [p for p in result.paths if p.suffix != ".png"] or result.paths[:1]:
                print(f"  {path}")
            if uses_demo_model:
                ensure_pack_importable(comfyui)
                composed = compose_side_by_side(result.paths, base / "output" / run_dir)
                if composed:
                    print(f"side by side (reference / guided / unguided): {composed['png']}")
                    print(f"animated side by side: {composed['gif']}")
                    g, u = composed["guided"], composed["unguided"]
                    print(f"vs the reference: LK-track motion fidelity guided {g.fidelity:.3f}, unguided "
                          f"{u.fidelity:.3f}; motion recall guided {g.recall:.3f}, unguided {u.recall:.3f}")
            ensure_pack_importable(comfyui)
            if plot := report_losses(loss_curves(prompt, result.history), base / "output" / run_dir):
                print(f"motion loss chart: {plot}")
            print(f"this run's files are in {base / 'output' / run_dir}")
    except (ServerStartError, ComfyError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
