"""The shipped workflows: both formats present and in agreement, valid for the server, runnable.

Static (no server): every `workflows/<name>.json` (UI format, what the frontend's "Save" writes)
has its `<name>_api.json` (API format, what "Queue" sends) and vice versa; the UI files are
well-formed graphs with a Note; the settings are the method doc's reference settings.

Server (one headless ComfyUI per module): the UI workflow converted to API format by the small
converter below (widgets_values -> input names in /object_info's order, links followed) gives
exactly the API file; every node type, input name, combo value, number range and link type is
valid for /object_info; and each API workflow, rewritten for the tiny test models and a short
run (`tiny_prompt`), runs to success with its outputs on disk.

The files are written by tests/frontend/build_workflows.py with the real frontend.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from comfy_server import ROOT, ComfyServer
from workflow_files import FILE_INPUTS, as_the_server_reads, host_titles_dropped

from motionclone.motion_core import tiny_models
from motionclone.motion_core.compact_checkpoint import write_tiny_checkpoint, write_tiny_wan_checkpoint

WORKFLOWS = ROOT / "workflows"
SMOKE = "motionclone_smoke_api.json"  # API-only smoke test of the tiny models (tests/test_server_smoke.py)
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))
API_FILES = sorted(p for p in WORKFLOWS.glob("*_api.json") if p.name != SMOKE)
NAMES = [p.stem for p in UI_FILES]
# Frontend-only nodes: not sent to the server, not in /object_info.
VIRTUAL_NODES = {"Note", "MarkdownNote"}
# Inputs of core nodes that ComfyUI 0.33 has and 0.3.75 lacks (what the shipped files set them to is the default).
NEWER_CORE_INPUTS = {("ContextWindowsManual", i) for i in (
    "freenoise", "cond_retain_index_list", "split_conds_to_windows", "latent_retain_index_list", "causal_window_fix")}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

CLIP = ROOT.parent / "shared" / "reference_videos" / "sample_fox.mp4"
TINY_CKPT, TINY_MM, TINY_SPARSECTRL = "tiny_sd15.safetensors", "tiny_mm.safetensors", "tiny_sparsectrl_rgb.safetensors"
TINY_LORA = "tiny_adapter_lora.safetensors"
TINY_WAN = "tiny_wan21.safetensors"
FIRST_FRAME = "first_frame.png"
FRAMES, SIZE, STEPS, GUIDED = 8, 64, 6, 4
WAN_FRAMES = 9  # Wan's VAE encodes 4k + 1 frames: 3 latent frames
RUN_BOUND_S = 600  # a hung server fails the test instead of blocking it; not a speed target


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _api_of(name: str) -> dict[str, Any]:
    return _load(WORKFLOWS / f"{name}_api.json")


def _ui_of(name: str) -> dict[str, Any]:
    return _load(WORKFLOWS / f"{name}.json")


# --------------------------------------------------------------------------- UI -> API converter


def _spec_type(spec: list) -> str:
    """The type of an /object_info input spec: V1 combos are a list of options."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _options(spec: list) -> dict[str, Any]:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _input_specs(info: dict[str, Any]) -> dict[str, list]:
    """Inputs in the order the frontend makes their widgets: required, then optional."""
    out = {}
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            out[name] = specs[name]
    return out


def _has_upload_widget(spec: list) -> bool:
    # The frontend adds an upload button widget after all others; its value is saved too.
    return any(_options(spec).get(k) for k in ("image_upload", "video_upload", "audio_upload", "animated_image_upload"))


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """API prompt of a UI workflow, as the frontend's graphToPrompt makes it.

    widgets_values hold one value per widget input in schema order, plus the extra
    control_after_generate value after each input that has one, plus the upload widget's
    value at the end. A linked input takes the link ([source id, output slot]) instead.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']}: muted/bypassed nodes are not handled")
        info = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        uploads = 0
        for name, spec in _input_specs(info).items():
            if _spec_type(spec) not in WIDGET_TYPES:
                continue
            inputs[name] = values.pop(0)
            if _options(spec).get("control_after_generate"):
                values.pop(0)
            uploads += _has_upload_widget(spec)
        # A core node of an older host may lack inputs the building frontend's host has (they come last).
        core = not info.get("python_module", "").startswith("custom_nodes")
        assert len(values) == uploads or core, f"node {node['id']} {node['type']}: widget values left: {values}"
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, dst, _, _ = links[slot["link"]]
                assert dst == node["id"]
                inputs[slot["name"]] = [str(src), src_slot]
        title = node.get("title") or info.get("display_name") or node["type"]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    return prompt


# --------------------------------------------------------------------------- static


def test_every_workflow_has_both_formats():
    assert NAMES, "no workflows shipped"
    assert sorted(p.name for p in API_FILES) == sorted(f"{n}_api.json" for n in NAMES)
    assert {"motionclone_t2v_object", "motionclone_camera", "motionclone_save_motion", "motionclone_load_motion",
            "motionclone_i2v"} <= set(NAMES)  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_a_well_formed_graph(name):
    wf = _ui_of(name)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for link_id, src, src_slot, dst, dst_slot, type_ in wf["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id, link_id
        assert out["type"] == type_
    linked = {link[0] for link in wf["links"]}
    for node in wf["nodes"]:  # no dangling link ids on either end
        assert {i["link"] for i in node.get("inputs", []) if i.get("link") is not None} <= linked
        assert {x for o in node.get("outputs", []) for x in o.get("links") or []} <= linked
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1, "each UI workflow explains itself in one Note"
    text = notes[0]["widgets_values"][0]
    assert "models/" in text and "MotionClone" in text


def _by_type(api: dict[str, Any], class_type: str) -> list[dict[str, Any]]:
    return [n["inputs"] for n in api.values() if n["class_type"] == class_type]


def _value(api: dict[str, Any], value: Any) -> Any:
    """A literal input value, following links to a PrimitiveInt."""
    if isinstance(value, list):
        src = api[value[0]]
        assert src["class_type"] == "PrimitiveInt", src
        return src["inputs"]["value"]
    return value


# (steps N, guided G, r) per workflow: the method doc's presets.
PRESETS = {
    "motionclone_t2v_object": (300, 180, 0.4),
    "motionclone_camera": (100, 50, 0.3),
    "motionclone_load_motion": (300, 180, 0.4),
    "motionclone_i2v": (100, 40, 0.3),
    "motionclone_long_video": (300, 180, 0.4),
    "motionclone_region": (300, 180, 0.4),
}
FRAMES_OF = {"motionclone_long_video": 52}  # reference frames; the others take the reference's 16


def _is_wan(api: dict[str, Any]) -> bool:
    return bool(_by_type(api, "UNETLoader"))


@pytest.mark.parametrize("name", [n for n in NAMES if _is_wan(_api_of(n))])
def test_wan_settings(name):
    """Core's Wan 2.1 T2V 1.3B graph (core loaders, shift 8) and the method doc's Wan defaults: the first
    10 of 50 steps guided (r = 0.2), step size 0.002 (2000 millionths), block 14 ('auto'); 4k + 1 frames."""
    api = _api_of(name)
    assert _by_type(api, "UNETLoader") == [{"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}]
    (clip,) = _by_type(api, "CLIPLoader")
    assert (clip["clip_name"], clip["type"]) == ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan")
    assert _by_type(api, "VAELoader") == [{"vae_name": "wan_2.1_vae.safetensors"}]
    assert [m["shift"] for m in _by_type(api, "ModelSamplingSD3")] == [8]
    (ref,) = _by_type(api, "LoadReferenceVideo")
    (latent,) = _by_type(api, "EmptyHunyuanLatentVideo")
    frames = ref["evenly_spaced_frames"]
    assert (frames - 1) % 4 == 0 and (latent["length"], latent["width"], latent["height"]) == (
        frames, ref["width"], ref["height"]) == (33, 832, 480)
    (ext,) = _by_type(api, "ExtractSparseMotion")
    # every frame pair (DiTFlow); key/value injection off by default (DiTFlow's code turns it on: opt-in here)
    assert (ext["top_k"], ext["layers"], ext["frame_pairs"], ext["kv_injection"]) == (1, "auto", 0, False)
    (sampler,) = _by_type(api, "MotionGuidedSampler")
    assert (sampler["steps"], sampler["guided_steps"], sampler["noisy_fraction"], sampler["guidance_weight"],
            sampler["gradient_every"], sampler["sampler_name"], sampler["scheduler"]) == (
        50, 0, 0.2, 2000, 1, "uni_pc", "simple")  # fmt: skip
    assert _value(api, ext["seed"]) == _value(api, sampler["seed"])  # extraction noise and initial noise


@pytest.mark.parametrize("name", [n for n in NAMES if not _is_wan(_api_of(n))])
def test_reference_settings(name):
    api = _api_of(name)
    assert _by_type(api, "CheckpointLoaderSimple") == [{"ckpt_name": "realisticVisionV51_v51VAE.safetensors"}]
    (mm,) = _by_type(api, "LoadAnimateDiffMotionModule")
    assert mm["model_name"] == "v3_sd15_mm.ckpt"
    frames = FRAMES_OF.get(name, 16)
    for ref in _by_type(api, "LoadReferenceVideo"):
        assert (ref["evenly_spaced_frames"], ref["width"], ref["height"], ref["resize_mode"]) == (frames, 512, 512,
                                                                                                 "stretch")
        assert (ref["frame_load_cap"], ref["skip_first_frames"], ref["select_every_nth"], ref["force_rate"]) == (
            0, 0, 1, 0)  # the whole clip
    extract = _by_type(api, "ExtractSparseMotion")
    for ext in extract:
        assert (ext["timestep"], ext["top_k"], ext["layers"]) == (400, 1, "up_blocks.1")
    if name in PRESETS:
        steps, guided, r = PRESETS[name]
        (sched,) = _by_type(api, "MotionCloneUnevenSchedule")
        assert (sched["steps"], sched["guided_steps"], sched["noisy_fraction"]) == (steps, guided, r)
        (guider,) = _by_type(api, "MotionCloneGuider")
        assert (guider["cfg"], guider["guidance_weight"], guider["guided_steps"], guider["warmup"],
                guider["cooldown"], guider["gradient_every"]) == (8.5, 2000, guided, 10, 10, 1)  # fmt: skip
        assert _by_type(api, "KSamplerSelect") == [{"sampler_name": "euler"}]  # DDIM (eta 0) on these sigmas
        (latent,) = _by_type(api, "EmptyLatentImage")
        ref_ids = [k for k, v in api.items() if v["class_type"] == "LoadReferenceVideo"]
        batch = [ref_ids[0], 1] if name in FRAMES_OF else 16  # a long video takes the reference's frame count
        assert latent == {"width": 512, "height": 512, "batch_size": batch}
    for windows in _by_type(api, "ContextWindowsManual"):  # 16-frame windows that stay put, overlap 4
        assert (windows["context_length"], windows["context_overlap"], windows["context_schedule"],
                windows["dim"]) == (16, 4, "standard_static", 0)
        (noise,) = _by_type(api, "RandomNoise")
        for ext in extract:  # extraction noise and initial noise from the same seed
            assert _value(api, ext["seed"]) == _value(api, noise["noise_seed"])
    if name == "motionclone_i2v":
        assert _by_type(api, "LoraLoaderModelOnly") == [{"lora_name": "v3_sd15_adapter.ckpt", "strength_model": 1,
                                                         "model": ["2", 0]}]  # fmt: skip
        (cond,) = _by_type(api, "ImageCondition")
        assert (cond["sparsectrl_name"], cond["frame_indices"], cond["strength"], cond["start_percent"],
                cond["end_percent"], cond["mode"]) == ("v3_sd15_sparsectrl_rgb.ckpt", "0", 1, 0, 1, "sparsectrl")
        assert "vae" in cond  # RGB SparseCtrl encodes the image
        (cond_id,) = [k for k, v in api.items() if v["class_type"] == "ImageCondition"]
        # The extraction runs the same SparseCtrl, on the reference's own frame 0 (reference code).
        assert [e["image_condition"] for e in extract] == [[cond_id, 0]]
    if name == "motionclone_load_motion":
        save_seed = _by_type(_api_of("motionclone_save_motion"), "ExtractSparseMotion")[0]["seed"]
        assert _value(api, _by_type(api, "RandomNoise")[0]["noise_seed"]) == save_seed


def test_load_motion_reads_what_save_motion_writes():
    (save,) = _by_type(_api_of("motionclone_save_motion"), "SaveMotion")
    (load,) = _by_type(_api_of("motionclone_load_motion"), "LoadMotion")
    # Save writes output/<prefix>_00001.motion.safetensors; the user copies it into input/.
    assert load["motion_file"] == Path(save["filename_prefix"]).name + "_00001.motion.safetensors"


# --------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not CLIP.exists():
        pytest.skip(f"reference clip missing: {CLIP}")
    srv = ComfyServer(tmp_path_factory.mktemp("comfy_workflows"))
    write_tiny_checkpoint(srv.model_path("checkpoints", TINY_CKPT), seed=0)
    write_tiny_wan_checkpoint(srv.model_path("checkpoints", TINY_WAN), seed=0)
    tiny_models.write_tiny_motion_module(srv.model_path("animatediff_models", TINY_MM), seed=2, std=0.2)
    if hasattr(tiny_models, "write_tiny_sparsectrl"):
        tiny_models.write_tiny_sparsectrl(srv.model_path("controlnet", TINY_SPARSECTRL), variant="rgb", seed=3)
    _write_tiny_adapter_lora(srv.model_path("loras", TINY_LORA))
    shutil.copy(CLIP, srv.input_dir / CLIP.name)
    _write_first_frame(srv.input_dir / FIRST_FRAME)
    with srv:
        assert srv.import_errors() == [], srv.log_tail()
        yield srv


def _write_tiny_adapter_lora(path: Path) -> None:
    """A LoRA for the tiny UNet in the v3 domain adapter's key format (diffusers attention processors)."""
    import safetensors.torch
    import torch

    gen = torch.Generator().manual_seed(4)
    shapes = {  # diffusers processor name -> (out, in) of the tiny UNet's projection
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora": (32, 32),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora": (64, 32),
    }
    lora = {}
    for name, (out_f, in_f) in shapes.items():
        lora[f"{name}.down.weight"] = 0.01 * torch.randn(4, in_f, generator=gen)
        lora[f"{name}.up.weight"] = 0.01 * torch.randn(out_f, 4, generator=gen)
    safetensors.torch.save_file(lora, str(path))


def _write_first_frame(path: Path) -> None:
    import cv2

    cap = cv2.VideoCapture(str(CLIP))
    ok, frame = cap.read()
    cap.release()
    assert ok, f"cannot read {CLIP}"
    cv2.imwrite(str(path), frame)


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_to_the_api_file(name, object_info):
    # Titles from this host's display names may differ from those of the frontend that built the files.
    # A core node of an older host may lack inputs the newer one has; the server ignores those.
    ui = _ui_of(name)
    assert host_titles_dropped(ui_to_api(ui, object_info), ui) == host_titles_dropped(
        as_the_server_reads(_api_of(name), object_info), ui)


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_is_valid_for_object_info(name, object_info):
    api = _api_of(name)
    for node_id, node in api.items():
        where = f"{name} node {node_id} {node['class_type']}"
        assert node["class_type"] in object_info, f"{where}: unknown node type"
        info = object_info[node["class_type"]]
        specs = _input_specs(info)
        unknown = set(node["inputs"]) - set(specs)
        # An older host's core node may lack inputs of the host the files were built with (the server ignores
        # them); the pack's own nodes and every node on the newest host must know all of theirs.
        assert not unknown or not info.get("python_module", "").startswith("custom_nodes") and all(
            (node["class_type"], i) in NEWER_CORE_INPUTS for i in unknown), f"{where}: unknown inputs {unknown}"
        missing = set(info["input"].get("required", {})) - set(node["inputs"])
        assert not missing, f"{where}: required inputs missing: {missing}"
        for name_, value in node["inputs"].items():
            if name_ in unknown:
                continue
            spec, type_ = specs[name_], _spec_type(specs[name_])
            if isinstance(value, list):  # a link: the source's output type must fit
                src = api[value[0]]["class_type"]
                out_type = object_info[src]["output"][value[1]]
                assert out_type == type_ or "*" in (out_type, type_), f"{where}.{name_}: {out_type} -> {type_}"
                continue
            opts = _options(spec)
            if type_ == "COMBO" and (node["class_type"], name_) not in FILE_INPUTS:
                choices = spec[0] if isinstance(spec[0], list) else opts["options"]
                assert value in choices, f"{where}.{name_}: {value!r} not in {choices}"
            if type_ in ("INT", "FLOAT"):
                assert opts.get("min", value) <= value <= opts.get("max", value), f"{where}.{name_}: {value}"
                assert type_ == "FLOAT" or isinstance(value, int), f"{where}.{name_}: {value!r} is not an INT"


# Node types whose settings `tiny_prompt` knows; a new type in a workflow must be added here.
TINY_HANDLED = {
    "CheckpointLoaderSimple", "LoadAnimateDiffMotionModule", "LoadReferenceVideo", "EmptyLatentImage",
    "MotionCloneUnevenSchedule", "MotionCloneGuider", "ImageCondition", "LoadImage", "LoadMotion",
    "CLIPTextEncode", "PrimitiveInt", "ExtractSparseMotion", "KSamplerSelect", "RandomNoise", "SamplerCustomAdvanced",
    "VAEDecode", "SaveAnimatedWEBP", "SaveImage", "SaveMotion", "LoraLoaderModelOnly", "ContextWindowsManual",
    "SolidMask", "MaskComposite", "UNETLoader", "CLIPLoader", "VAELoader", "ModelSamplingSD3",
    "EmptyHunyuanLatentVideo", "MotionGuidedSampler", "PreviewImage",
}  # fmt: skip


def tiny_prompt(api: dict[str, Any], motion_file: str | None = None) -> dict[str, Any]:
    """A shipped API workflow on the tiny test models, for a short run; graph and links unchanged.

    - CheckpointLoaderSimple -> MotionCloneCompactCheckpointLoader (the tiny SD1.5-layout checkpoint);
      the motion module, SparseCtrl, adapter LoRA, reference clip, first-frame image and motion file
      -> the test's files;
    - FRAMES frames at SIZE x SIZE (reference video, empty latent and masks), STEPS uneven steps with GUIDED
      guided, warm-up/cool-down 1; everything else (weights, t, top-k, layers, cfg, seeds) as shipped.
    - Wan: the core loaders' three files become one compact checkpoint of a tiny Wan 2.1 (ComfyUI's WanModel,
      a tiny text encoder, a tiny Wan 2.1 VAE): UNETLoader -> MotionCloneCompactCheckpointLoader, and what
      CLIPLoader and VAELoader fed takes its CLIP and VAE (core's umT5-XXL has a fixed size and core's Wan
      detection a fixed text width, so nothing tiny loads through them); WAN_FRAMES frames, STEPS steps,
      GUIDED guided.
    """
    prompt = copy.deepcopy(api)
    wan = _is_wan(api)
    for node_id, node in list(prompt.items()):
        if node["class_type"] in ("CLIPLoader", "VAELoader"):
            (loader,) = [k for k, v in prompt.items() if v["class_type"] == "UNETLoader"]
            slot = 1 if node["class_type"] == "CLIPLoader" else 2
            for other in prompt.values():
                for key, value in other["inputs"].items():
                    if value == [node_id, 0]:
                        other["inputs"][key] = [loader, slot]
            del prompt[node_id]
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        assert kind in TINY_HANDLED, f"tiny_prompt does not know {kind}: decide how to shrink it"
        if kind == "CheckpointLoaderSimple":
            node["class_type"] = "MotionCloneCompactCheckpointLoader"
            inputs["ckpt_name"] = TINY_CKPT
        elif kind == "UNETLoader":
            node["class_type"] = "MotionCloneCompactCheckpointLoader"
            node["inputs"] = {"ckpt_name": TINY_WAN}
        elif kind == "EmptyHunyuanLatentVideo":
            inputs.update(width=SIZE, height=SIZE, length=WAN_FRAMES)
        elif kind == "MotionGuidedSampler":
            inputs.update(steps=STEPS, guided_steps=GUIDED)
        elif kind == "LoadAnimateDiffMotionModule":
            inputs["model_name"] = TINY_MM
        elif kind == "LoadReferenceVideo":
            inputs.update(file=CLIP.name, evenly_spaced_frames=WAN_FRAMES if wan else FRAMES, width=SIZE, height=SIZE)
        elif kind == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE)
            if not isinstance(inputs["batch_size"], list):  # a link takes the reference's frame count
                inputs["batch_size"] = FRAMES
        elif kind in ("SolidMask", "MaskComposite"):  # the shipped 512 px geometry, scaled to SIZE
            for key in ("width", "height", "x", "y"):
                if key in inputs and not isinstance(inputs[key], list):
                    inputs[key] = inputs[key] * SIZE // 512
        elif kind == "ContextWindowsManual":
            inputs.update(context_length=6, context_overlap=2)  # two windows over the FRAMES frames
        elif kind == "MotionCloneUnevenSchedule":
            inputs.update(steps=STEPS, guided_steps=GUIDED)
        elif kind == "MotionCloneGuider":
            inputs.update(guided_steps=GUIDED, warmup=1, cooldown=1)
        elif kind == "ImageCondition":
            inputs["sparsectrl_name"] = TINY_SPARSECTRL
        elif kind == "LoadImage":
            inputs["image"] = FIRST_FRAME
        elif kind == "LoraLoaderModelOnly":
            inputs["lora_name"] = TINY_LORA
        elif kind == "LoadMotion":
            assert motion_file, "a LoadMotion workflow needs the motion file"
            inputs["motion_file"] = motion_file
    return prompt


def _run(server, name: str, motion_file: str | None = None):
    log_start = len(server.log_text())
    result = server.wait(server.queue(tiny_prompt(_api_of(name), motion_file)), RUN_BOUND_S)
    assert result.ok, f"{name}: {result.failure_report()}\n{server.log_tail()}"
    assert "lora key not loaded" not in server.log_text()[log_start:]  # the tiny adapter LoRA applied
    assert result.history["status"]["status_str"] == "success" and result.history["status"]["completed"]
    return result


def _check_outputs(server, name: str, result) -> None:
    """Every output node wrote its files: FRAMES PNGs, an animated WEBP of FRAMES frames, a motion file."""
    from PIL import Image

    api = _api_of(name)
    frames = WAN_FRAMES if _is_wan(api) else FRAMES
    files: dict[str, list[Path]] = {}
    previews = {k for k, v in api.items() if v["class_type"] in ("PreviewImage", "MotionGuidedSampler")}
    for out in result.outputs:
        if out.type == "temp":  # the loss plot: on Motion Guided Sampler and on a Preview Image fed by it
            assert out.node in previews, out
            files.setdefault(out.node, []).append(server.base_dir / "temp" / out.relpath())
            continue
        assert out.type == "output", out
        path = server.output_dir / out.relpath()
        assert path.is_file(), path
        files.setdefault(out.node, []).append(path)
    for node_id, node in api.items():
        kind = node["class_type"]
        if kind == "SaveImage":
            assert len(files[node_id]) == frames and all(p.suffix == ".png" for p in files[node_id])
            with Image.open(files[node_id][0]) as im:
                assert im.size == (SIZE, SIZE)
        elif kind == "SaveAnimatedWEBP":
            (webp,) = files[node_id]
            with Image.open(webp) as im:
                assert webp.suffix == ".webp" and im.n_frames == frames and im.size == (SIZE, SIZE)
        elif kind == "PreviewImage":
            (plot,) = files[node_id]
            with Image.open(plot) as im:
                assert im.size[0] > 100 and im.size[1] > 100  # the loss plot
        elif kind == "SaveMotion":
            (motion,) = files[node_id]
            assert motion.name.endswith(".motion.safetensors") and motion.stat().st_size > 0


def _guided_progress(name: str, result) -> None:
    # The sampling node (SamplerCustomAdvanced, or Motion Guided Sampler: its guided prefix included) reports one
    # progress update per step, to the end.
    (sca,) = [k for k, v in _api_of(name).items() if v["class_type"] in ("SamplerCustomAdvanced",
                                                                           "MotionGuidedSampler")]
    events = [e for e in result.progress if e.node == sca]
    assert events and events[-1].value == events[-1].max == STEPS, result.progress


GENERATING = [n for n in NAMES if n not in ("motionclone_save_motion", "motionclone_load_motion")]


def _host_runs_frame_windows() -> bool:
    import comfy.context_windows

    from motionclone.motion_core.context_windows import runs_frame_batch_windows

    schedule = comfy.context_windows.get_matching_context_schedule("standard_static")
    fuse = comfy.context_windows.get_matching_fuse_method("pyramid")
    return runs_frame_batch_windows(comfy.context_windows.IndexListContextHandler(schedule, fuse, 6, 2))


@pytest.mark.server
@pytest.mark.parametrize("name", GENERATING)
def test_workflow_runs_on_tiny_models(name, server):
    uses_windows = any(n["class_type"] == "ContextWindowsManual" for n in _api_of(name).values())
    if uses_windows and not _host_runs_frame_windows():  # ComfyUI 0.3.75: the pack says why, at extraction
        result = server.wait(server.queue(tiny_prompt(_api_of(name))), RUN_BOUND_S)
        assert not result.ok and "cannot run windows over a video's frames" in result.error_message()
        return
    result = _run(server, name)
    _check_outputs(server, name, result)
    _guided_progress(name, result)


@pytest.mark.server
def test_saved_motion_drives_the_load_motion_workflow(server):
    saved = _run(server, "motionclone_save_motion")
    _check_outputs(server, "motionclone_save_motion", saved)
    (motion,) = [p for p in saved.paths if p.name.endswith(".motion.safetensors")]
    shutil.copy(motion, server.input_dir / motion.name)  # what the Note tells the user to do
    loaded = _run(server, "motionclone_load_motion", motion_file=motion.name)
    _check_outputs(server, "motionclone_load_motion", loaded)
    _guided_progress("motionclone_load_motion", loaded)


@pytest.mark.server
def test_wan_workflow_guidance_lowers_the_motion_loss_in_the_server(server):
    """The shipped Wan graph as a prompt runs it (inference mode, the server's model management): the motion
    loss at each guided step, guided vs weight 0 from the same seed (which measures it along the unguided run)."""
    name = "motionclone_wan_t2v"
    curves = {}
    for weight in (50000.0, 0.0):  # step size 0.05: a visible effect on the tiny random model (tests/test_wan_guidance)
        prompt = tiny_prompt(_api_of(name))
        (node,) = [k for k, v in prompt.items() if v["class_type"] == "MotionGuidedSampler"]
        prompt[node]["inputs"]["guidance_weight"] = weight
        result = server.wait(server.queue(prompt), RUN_BOUND_S)
        assert result.ok, f"{result.failure_report()}\n{server.log_tail()}"
        curves[weight] = [e["loss"] for e in result.history["outputs"][node]["motion_loss"]]
    guided, unguided = curves[50000.0], curves[0.0]
    print("Wan in the server, motion loss per guided step: guided", [f"{v:.3f}" for v in guided], "unguided",
          [f"{v:.3f}" for v in unguided])
    assert len(guided) == len(unguided) == GUIDED
    assert guided[0] == pytest.approx(unguided[0], rel=1e-4)  # same seed, same start
    assert all(g < u for g, u in zip(guided[1:], unguided[1:], strict=True))


@pytest.mark.server
def test_wan_region_masks_run_in_the_server(server):
    """The shipped Wan graph with a region from core mask nodes (Solid Mask + Mask Composite: the left half) on
    Extract Sparse Motion and on the sampler, in the server (inference mode): the region's loss per guided step,
    guided vs weight 0 from the same seed; and a run with keep-still (inference-mode masks in its loss too)."""
    curves = {}
    for weight, still in ((50000.0, 0.0), (0.0, 0.0), (50000.0, 50000.0)):
        prompt = tiny_prompt(_api_of("motionclone_wan_t2v"))
        prompt["90"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}}
        prompt["91"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIZE // 2, "height": SIZE}}
        prompt["92"] = {"class_type": "MaskComposite", "inputs": {"destination": ["90", 0], "source": ["91", 0],
                                                                  "x": 0, "y": 0, "operation": "add"}}
        for kind in ("ExtractSparseMotion", "MotionGuidedSampler"):
            (node,) = [k for k, v in prompt.items() if v["class_type"] == kind]
            prompt[node]["inputs"]["mask"] = ["92", 0]
        prompt[node]["inputs"].update(guidance_weight=weight, keep_still_weight=still)
        result = server.wait(server.queue(prompt), RUN_BOUND_S)
        assert result.ok, f"{result.failure_report()}\n{server.log_tail()}"
        curves[weight, still] = [e["loss"] for e in result.history["outputs"][node]["motion_loss"]]
    guided, unguided, held = curves[50000.0, 0.0], curves[0.0, 0.0], curves[50000.0, 50000.0]
    print("Wan region in the server, the region's motion loss per guided step: guided",
          [f"{v:.3f}" for v in guided], "unguided", [f"{v:.3f}" for v in unguided], "with keep-still",
          [f"{v:.3f}" for v in held])
    assert len(held) == GUIDED and all(math.isfinite(v) for v in held)
    assert len(guided) == len(unguided) == GUIDED
    assert guided[0] == pytest.approx(unguided[0], rel=1e-4)
    assert all(g < u for g, u in zip(guided[1:], unguided[1:], strict=True))


def test_readme_names_the_input_files_each_workflow_reads():
    from workflow_files import workflow_files

    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|[^|]*\|([^|]*)\|$",
                                                          (ROOT / "README.md").read_text(), flags=re.M)}
    for name in NAMES:
        inputs = {f for folder, f in workflow_files([_api_of(name)]) if folder == "input"}
        assert inputs and {f"`{f}`" for f in inputs} <= set(re.findall(r"`[^`]+`", rows.get(name, ""))), name
