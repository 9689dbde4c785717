"""What the shipped workflows need around them, shared by the workflow and frontend tests.

`FILE_INPUTS` maps each input that names a user's file to the ComfyUI folder it is read from;
`place_workflow_files` puts stand-ins for those files into a server's base directory, as a user
who has downloaded the models would have them (newer frontends flag a node whose file is absent);
`host_titles_dropped` compares API prompts across hosts, whose display names may differ, and
`as_the_server_reads` drops what the server ignores (frontend-only widgets such as the video
upload's "video-preview", which the frontend queues once the file exists).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# (node type, input) -> folder under models/, or "input" for ComfyUI's input folder.
FILE_INPUTS: dict[tuple[str, str], str] = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("LoadAnimateDiffMotionModule", "model_name"): "animatediff_models",
    ("LoadReferenceVideo", "file"): "input",
    ("LoadMotion", "motion_file"): "input",
    ("ImageCondition", "sparsectrl_name"): "controlnet",
    ("LoadImage", "image"): "input",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
}
REFERENCE_CLIP = Path(__file__).resolve().parents[2] / "shared" / "reference_videos" / "sample_fox.mp4"


def workflow_files(prompts: Iterable[dict[str, Any]]) -> set[tuple[str, str]]:
    """(folder, file name) of every file the API prompts name."""
    found = set()
    for prompt in prompts:
        for node in prompt.values():
            for name, value in node["inputs"].items():
                folder = FILE_INPUTS.get((node["class_type"], name))
                if folder is not None and isinstance(value, str):
                    found.add((folder, value))
    return found


def place_workflow_files(base_dir: Path, prompts: Iterable[dict[str, Any]]) -> None:
    """Stand-ins for the named files in a server base directory (call before the server starts).

    Images are a real PNG and videos the shared reference clip (the frontend previews them); model
    files are empty: the frontend only checks that the server lists them.
    """
    from PIL import Image

    for folder, name in workflow_files(prompts):
        path = base_dir / ("input" if folder == "input" else f"models/{folder}") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            continue
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            Image.new("RGB", (64, 64), (90, 120, 200)).save(path)
        elif path.suffix.lower() in (".mp4", ".webm", ".mov", ".mkv") and REFERENCE_CLIP.exists():
            shutil.copy(REFERENCE_CLIP, path)
        else:
            path.write_bytes(b"")


def host_titles_dropped(prompt: dict[str, Any], workflow: dict[str, Any]) -> dict[str, Any]:
    """`prompt` without the `_meta` titles that come from the host's display names.

    A node saved without a title of its own is titled by the host (e.g. "SaveAnimatedWEBP" in
    ComfyUI 0.3.75, "Save Animated WEBP" in 0.33); the server never reads `_meta`.
    """
    titled = {str(n["id"]) for n in workflow["nodes"] if n.get("title")}
    out = copy.deepcopy(prompt)
    for node_id, node in out.items():
        if node_id not in titled:
            node.pop("_meta", None)
    return out


def as_the_server_reads(prompt: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """`prompt` with only the inputs each node declares (ComfyUI's execution drops the others)."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        info = object_info.get(node["class_type"])
        if info is None:
            continue
        declared = {name for section in ("required", "optional") for name in info["input"].get(section, {})}
        node["inputs"] = {k: v for k, v in node["inputs"].items() if k in declared}
    return out
