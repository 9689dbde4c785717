#!/usr/bin/env python3
"""Benchmarks (figures, not tests). Run with the dev venv, e.g.

    python3 scripts/dev.py python scripts/benchmark.py guidance [--frames 16 --size 32 --steps 8]

`fidelity`: on the embedded demo model, LK-track motion fidelity of guided vs unguided
samples over synthetic reference clips and the shared real clips, several seeds, with
extraction time, sampling times, memory and MOTION size (`--scheduler uneven` for the
reference's uneven step spacing).

`attention`: on the embedded demo model, whether its temporal attention carries motion: per
guided layer, the entropy of the attention rows and how often the top-1 frame (what MOTION
stores) is the same for a moving reference and for a still copy of its first frame, over all
tokens and over the tokens the reference's subject passes through.

`ceiling`: on the embedded demo model, a diagnostic upper bound: samples whose latent is driven,
by many gradient iterations per early step, until their `up_blocks.1` attention matches the MOTION
almost exactly, scored like `fidelity`. No margin here means no guidance setting can clone motion
on this model (its temporal attention does not decide its motion).

`guidance`: on the tiny SD1.5-architecture model with a tiny motion module, the time of a
guided sampling step over a plain CFG step (KSampler), the peak memory of both (peak RSS of
a fresh process per mode, above its RSS after loading), and the MOTION's stored size over
the size of the dense attention maps it summarises.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _bootstrap() -> None:
    """Import ComfyUI (COMFYUI_PATH, set by `dev.py python`) and this pack as `motionclone`, CPU mode."""
    import importlib.util

    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("COMFYUI_PATH is not set: run `python3 scripts/dev.py python scripts/benchmark.py ...`")
    comfy_path = Path(os.environ["COMFYUI_PATH"])
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "scripts")]
    sys.path.append(str(comfy_path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location("motionclone", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["motionclone"] = module
    spec.loader.exec_module(module)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _guidance_worker(mode: str, frames: int, size: int, steps: int, threads: int) -> dict:
    _bootstrap()
    import torch

    torch.set_num_threads(threads)
    import comfy.sample

    from motionclone.motion_core.extraction import extract_sparse_motion
    from motionclone.motion_core.guided_sampling import (
        GuidanceSettings,
        MotionGuidance,
        attention_layers_of,
        select_layers,
    )
    from motionclone.motion_core.injection import apply_motion_modules, install_processors
    from motionclone.motion_core.motion_module import load_motion_adapter
    from motionclone.motion_core.tiny_models import build_tiny_sd15_model, write_tiny_motion_module

    with tempfile.TemporaryDirectory() as tmp:
        adapter, info = load_motion_adapter(write_tiny_motion_module(Path(tmp) / "mm.safetensors", seed=2, std=0.2))
    model = apply_motion_modules(build_tiny_sd15_model(0), adapter, info, install_processors(adapter))
    context = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(5))
    ref = torch.randn(frames, 4, size, size, generator=torch.Generator().manual_seed(6))
    layers = select_layers(attention_layers_of(model), "up_blocks.1")
    t0 = time.perf_counter()
    motion = extract_sparse_motion(model, ref, context, layers, seed=0)
    extract_s = time.perf_counter() - t0
    if mode == "guided":
        model = MotionGuidance(motion, GuidanceSettings(2000.0, guided_steps=steps, warmup=1, cooldown=1)).patch(model)
    latent = torch.zeros(frames, 4, size, size)
    pos, neg = [[context, {}]], [[torch.zeros(1, 7, 32), {}]]

    def run(n: int) -> float:
        t = time.perf_counter()
        comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 1), n, 8.5, "ddim", "ddim_uniform", pos, neg,
                            latent, seed=1, disable_pbar=True)
        return time.perf_counter() - t

    run(1)  # warm-up: model load, allocator
    base_rss = _rss_mb()
    step_s = min(run(steps) for _ in range(2)) / steps
    return {"mode": mode, "step_s": step_s, "peak_mb_above_load": _rss_mb() - base_rss, "extract_s": extract_s,
            "motion_bytes": motion.nbytes(), "dense_fp16_bytes": motion.dense_nbytes(), "frames": frames}


def bench_guidance(args: argparse.Namespace) -> None:
    results = {}
    for mode in ("plain", "guided"):
        out = subprocess.run(
            [sys.executable, __file__, "_guidance_worker", mode, str(args.frames), str(args.size), str(args.steps),
             str(args.threads)], check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        results[mode] = json.loads(out)
    plain, guided = results["plain"], results["guided"]
    f = plain["frames"]
    print(f"tiny SD1.5-architecture model, {f} frames, latent {args.size}x{args.size}, ddim, cfg 8.5, "
          f"{args.threads} thread(s), guided layers up_blocks.1")
    print(f"extraction (one partial forward):     {plain['extract_s']:.3f} s")
    print(f"plain CFG step (KSampler):            {plain['step_s'] * 1000:.1f} ms")
    print(f"guided step:                          {guided['step_s'] * 1000:.1f} ms")
    print(f"guided / plain step time:             {guided['step_s'] / plain['step_s']:.2f}x  (target <= 2.0x)")
    print(f"peak RSS above load, plain:           {plain['peak_mb_above_load']:.1f} MB")
    print(f"peak RSS above load, guided:          {guided['peak_mb_above_load']:.1f} MB")
    ratio = plain["motion_bytes"] / plain["dense_fp16_bytes"]
    print(f"MOTION size: {plain['motion_bytes']} B; dense fp16 maps: {plain['dense_fp16_bytes']} B; "
          f"ratio {ratio:.4f} = {ratio * f:.2f}/F (fp16 value + uint8 index per row vs F fp16 entries); "
          f"vs dense fp32 maps {ratio / 2:.4f} = {ratio * f / 2:.2f}/F")


def _fidelity_eval(args: argparse.Namespace):
    """scripts/fidelity_eval.py, with ComfyUI and the pack importable, `args.threads` torch threads and the
    demo model files of `args.model_dir` (e.g. a training run's output folder) if given."""
    _bootstrap()
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "scripts"))
    import fidelity_eval

    if args.model_dir is not None:
        folder = Path(args.model_dir)
        fidelity_eval.DEMO_CHECKPOINT = folder / fidelity_eval.DEMO_CHECKPOINT.name
        fidelity_eval.DEMO_MOTION_MODULE = folder / fidelity_eval.DEMO_MOTION_MODULE.name
        for path in (fidelity_eval.DEMO_CHECKPOINT, fidelity_eval.DEMO_MOTION_MODULE):
            if not path.is_file():
                raise SystemExit(f"--model-dir: {path} not found")
    return fidelity_eval


def _margins(mode: str, rows: list[tuple[float, float, float, float]]) -> str:
    """Mean fidelity and recall of `mode` vs unguided over rows of (fidelity, unguided fidelity, recall,
    unguided recall), with the margins and how many runs `mode` won."""
    cols = list(zip(*rows))
    f, fu = np.mean(cols[0]), np.mean(cols[1])
    r, ru = np.nanmean(cols[2]), np.nanmean(cols[3])  # recall is NaN where the reference has no moving track
    wins = sum(row[0] > row[1] for row in rows)
    return (f"fidelity {mode} {f:.3f} unguided {fu:.3f} margin {f - fu:+.3f} ({mode} higher in {wins}/{len(rows)}) "
            f"| recall {mode} {r:.3f} unguided {ru:.3f} margin {r - ru:+.3f}")


def bench_fidelity(args: argparse.Namespace) -> None:
    """Motion fidelity guided vs unguided on the demo model, plus timings, memory and MOTION size."""
    fe = _fidelity_eval(args)
    settings = fe.DemoSettings(steps=args.steps, guided_steps=args.guided_steps, weight=args.weight,
                               scheduler=args.scheduler, noisy_fraction=args.noisy_fraction)
    model, clip, vae = fe.load_demo_model()
    size = args.size
    clips = fe.synthetic_clips(args.clips, size, args.frames)
    if not args.no_real:
        clips += fe.real_clips(size, args.frames)
    schedule = f"uneven r={settings.noisy_fraction}" if settings.scheduler == "uneven" else settings.scheduler
    print(f"demo model, {args.frames} frames at {size}x{size}, {settings.sampler}/{schedule} "
          f"{settings.steps} steps ({settings.guided_steps} guided), weight {settings.weight}, cfg {settings.cfg}, "
          f"seeds {args.seeds}")
    print("fidelity: LK-track motion fidelity (CPU proxy of the CoTracker score, one-sided as in the field); "
          "recall: the reference's moving tracks matched in the video (a static video scores low)")
    print(f"{'clip':40} {'seed':>5} | {'fidelity: guided':>16} {'unguided':>8} {'margin':>7} | "
          f"{'recall: guided':>14} {'unguided':>8} {'margin':>7}")
    rows = []
    base_rss = _rss_mb()
    for name, frames, prompt in clips:
        for seed in args.seeds:
            r = fe.evaluate_clip(model, clip, vae, name, frames, prompt, seed, settings)
            rows.append(r)
            print(f"{name[:40]:40} {seed:5d} | {r.guided:16.3f} {r.unguided:8.3f} {r.guided - r.unguided:+7.3f} | "
                  f"{r.guided_recall:14.3f} {r.unguided_recall:8.3f} {r.guided_recall - r.unguided_recall:+7.3f}")
    groups = (("synthetic", [r for r in rows if ":" in r.name]), ("real", [r for r in rows if ":" not in r.name]))
    for group, sel in groups:
        if sel:
            print(f"mean {group:10} " + _margins("guided", [(r.guided, r.unguided, r.guided_recall,
                                                             r.unguided_recall) for r in sel]))
    r0 = rows[0]
    print(f"extraction {np.mean([r.extract_s for r in rows]):.2f} s; sampling guided "
          f"{np.mean([r.guided_s for r in rows]):.2f} s vs plain {np.mean([r.unguided_s for r in rows]):.2f} s "
          f"({np.mean([r.guided_s / r.unguided_s for r in rows]):.2f}x); peak RSS above load "
          f"{_rss_mb() - base_rss:.0f} MB; MOTION {r0.motion_bytes} B vs dense fp16 {r0.dense_bytes} B")


def bench_attention(args: argparse.Namespace) -> None:
    """Temporal-attention diagnostics of the demo model (see fidelity_eval.temporal_attention_stats)."""
    fe = _fidelity_eval(args)
    model, clip, vae = fe.load_demo_model()
    print(f"demo model, 8 frames at 128x128, layers {args.layers}, timestep {args.timestep}; uniform rows have "
          f"entropy ln 8 = {np.log(8):.2f} nats; agreement = top-1 frame equal for the moving clip and a still copy "
          f"(all tokens / the tokens that move)")
    for name, frames, _prompt in fe.synthetic_clips(args.clips, 128, 8):
        stats = fe.temporal_attention_stats(model, clip, vae, frames, args.timestep, args.layers)
        ent, agree, moving = (np.array([v[i] for v in stats.values()]) for i in range(3))
        print(f"{name:30} entropy {ent.min():.2f}..{ent.max():.2f}  agreement {agree.min():.2f}..{agree.max():.2f} / "
              f"moving {np.nanmin(moving):.2f}..{np.nanmax(moving):.2f}  ({len(stats)} layers)")


def bench_ceiling(args: argparse.Namespace) -> None:
    """Motion fidelity of attention matched (almost) exactly vs unguided (fidelity_eval.attention_match_ceiling)."""
    fe = _fidelity_eval(args)
    model, clip, vae = fe.load_demo_model()
    print(f"demo model, 8 frames at 128x128, ddim_uniform 20 steps, cfg 7.5; the first {args.matched_steps} steps "
          f"each take {args.iterations} normalised gradient steps of {args.step_size} sigma on the motion loss "
          f"(up_blocks.1), seeds {args.seeds}")
    rows = []
    for name, frames, prompt in fe.synthetic_clips(args.clips, 128, 8):
        for seed in args.seeds:
            r = fe.attention_match_ceiling(model, clip, vae, name, frames, prompt, seed, iterations=args.iterations,
                                           matched_steps=args.matched_steps, step_size=args.step_size)
            rows.append(r)
            print(f"{name[:40]:40} {seed:5d} | motion loss {r.loss_first:.4f} -> {r.loss_last:.4f} | fidelity "
                  f"matched {r.matched:.3f} unguided {r.unguided:.3f} {r.matched - r.unguided:+.3f} | recall "
                  f"{r.matched_recall:.3f} vs {r.unguided_recall:.3f}", flush=True)
    first, last = np.mean([r.loss_first for r in rows]), np.mean([r.loss_last for r in rows])
    print(f"mean motion loss {first:.4f} -> {last:.4f} | " + _margins("matched", [
        (r.matched, r.unguided, r.matched_recall, r.unguided_recall) for r in rows]))


def _subprocess_json(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_realscale(args: argparse.Namespace) -> None:
    gb = 1024**3
    print(f"realscale: full-size SD1.5 UNet + AnimateDiff v3 motion module (random weights, original key format), "
          f"{args.frames} frames, float32 on this CPU, {args.threads} thread(s), SDPA attention for every forward; "
          "one step at t=999 (cfg 8.5, euler), guided layers up_blocks.1, weight 2000"
          + (f", checkpointed layers in {args.chunks} batch slices" if args.chunks else ""), flush=True)
    summary = []
    for size in args.sizes:
        rows = {mode: _subprocess_json("_realscale_worker", mode, str(size), str(args.frames), str(args.threads),
                                       str(args.chunks))
                for mode in args.modes}
        plain = rows["plain"]
        print(f"{size} px: extraction (one partial forward) {plain['extract_s']:.1f} s", flush=True)
        for mode, row in rows.items():
            extra = ""
            if "estimate_bytes" in row:
                share = row["estimate_bytes"] / max(row.get("peak_bytes", 0), 1)
                extra = (f"; estimate before the step {row['estimate_bytes'] / gb:.2f} GB (measured on two crops in "
                         f"{row['estimate_s']:.1f} s" + (f"; {share:.2f}x the peak)" if "peak_bytes" in row else ")"))
            if row.get("kept_estimate_bytes") and mode == "guided_auto":
                extra += (f"; graph kept would need {row['kept_estimate_bytes'] / gb:.2f} GB of "
                          f"{row['free_bytes'] / gb:.1f} GB free")
            if "skipped" in row:
                print(f"  {mode:12s} not run: {row['skipped'][:160]}{extra}", flush=True)
                continue
            time_ratio, memory_ratio = row["step_s"] / plain["step_s"], row["peak_bytes"] / plain["peak_bytes"]
            choice = (" (auto chose: graph kept)" if row.get("keeps_graph") else "") if mode == "guided_auto" else ""
            print(f"  {mode:12s} step {row['step_s']:8.1f} s ({time_ratio:.2f}x plain), peak above the loaded model "
                  f"{row['peak_bytes'] / gb:6.2f} GB ({memory_ratio:.2f}x plain; float16: about "
                  f"{row['peak_bytes'] / 2 / gb:.2f} GB){choice}{extra}", flush=True)
        if "guided" in rows:
            g = rows["guided"]
            line = (f"realscale {size}: time ratio {g['step_s'] / plain['step_s']:.2f}, memory ratio "
                    f"{g['peak_bytes'] / plain['peak_bytes']:.2f}")
            a = rows.get("guided_auto")
            if a is not None:
                line += ("; auto: checkpointing, as above" if "skipped" in a else
                         f"; auto (graph kept): time ratio {a['step_s'] / plain['step_s']:.2f}, memory ratio "
                         f"{a['peak_bytes'] / plain['peak_bytes']:.2f}")
            summary.append(line)
    if args.guided_breakdown:
        b = _subprocess_json("_realscale_guided_breakdown", str(args.guided_breakdown), str(args.frames),
                             str(args.threads))
        total = sum(b["kept"].values())
        print(f"where a checkpointed guided step's gradient memory goes at {b['size']} px: peak "
              f"{b['peak'] / gb:.2f} GB = kept through the backward {total / gb:.2f} GB + the backward's transient "
              f"{(b['peak'] - total) / gb:.2f} GB")
        for kind, n in sorted(b["kept"].items(), key=lambda kv: -kv[1]):
            print(f"  {n / gb:6.2f} GB  {100 * n / b['peak']:4.1f} %  {kind}")
    if args.breakdown:
        b = _subprocess_json("_realscale_breakdown", str(args.breakdown), str(args.frames), str(args.threads))
        print(f"what the graph-recording forward keeps without checkpointing at {b['size']} px "
              f"({b['total'] / gb:.2f} GB; it grows with the area):")
        for kind, n in sorted(b["by_kind"].items(), key=lambda kv: -kv[1]):
            print(f"  {n / gb:6.2f} GB  {100 * n / b['total']:4.1f} %  {kind}")
    for line in summary:
        print(line)


def bench_wan(args: argparse.Namespace) -> None:
    """Wan guidance at 1.3B's widths (a few random blocks): plain vs guided step, extraction, two token counts,
    and the estimate for Wan 1.3B at 480x832x81 (scripts/wan_bench.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import wan_bench

    print(f"wan: random native ComfyUI Wan, 1.3B widths (dim 1536, 12 heads, ffn 8960, 512 text tokens), "
          f"{args.blocks} blocks (guided block {args.blocks // 2}), float32 on this CPU, {args.threads} thread(s); "
          f"one euler step of 50 at cfg 5, guided: {args.iterations} Adam iterations then the CFG step", flush=True)
    measured = []
    for frames in args.frames:
        rows = {mode: _subprocess_json("_wan_worker", mode, str(frames), str(args.height), str(args.width),
                                       str(args.blocks), str(args.iterations), str(args.threads))
                for mode in ("plain", "guided")}
        plain, guided = rows["plain"], rows["guided"]
        print(f"{frames} latent frames x {args.height}x{args.width} ({plain['tokens']} tokens): extraction "
              f"{plain['extract_s']:.1f} s, peak {plain['extract_peak'] / 2**20:.0f} MB; plain step "
              f"{plain['step_s']:.1f} s, peak {plain['peak_bytes'] / 2**20:.0f} MB; guided step "
              f"{guided['step_s']:.1f} s "
              f"({guided['step_s'] / plain['step_s']:.2f}x), peak {guided['peak_bytes'] / 2**20:.0f} MB "
              f"({guided['peak_bytes'] / plain['peak_bytes']:.2f}x; one optimisation iteration alone "
              f"{guided['iteration_peak'] / 2**20:.0f} MB)", flush=True)
        measured.append(rows)
    small, large = measured[0], measured[-1]
    token_ratio = large["plain"]["tokens"] / small["plain"]["tokens"]
    capture = large["plain"]["extract_peak"] / small["plain"]["extract_peak"]
    print(f"tokens x{token_ratio:.2f}: extraction peak x{capture:.2f}, "
          f"optimisation iteration peak x{large['guided']['iteration_peak'] / small['guided']['iteration_peak']:.2f} "
          f"(a full attention map would grow x{token_ratio ** 2:.2f})")
    e = wan_bench.estimate_13b(small, large, args.iterations)
    print(f"estimate, Wan 1.3B at 480x832x81 ({e['tokens']} tokens): guided activations about "
          f"{e['guided_activations_gb']:.1f} GB fp32 ({e['guided_activations_gb'] / 2:.1f} GB bf16) beside the "
          f"weights; a guided step about {e['step_ratio']:.1f}x a plain step, 10 guided of 50 steps about "
          f"{e['generation_ratio']:.2f}x the generation time")
    a = _subprocess_json("_wan_amf", str(args.amf_frames), str(args.threads))
    print(f"motion flow (soft AMF, forward + backward, streamed per pair) at the 1.3B grid "
          f"{a['grid'][0]}x{a['grid'][1]} per frame, {a['frames']} latent frames: all {a['all']['pairs']} pairs "
          f"{a['all']['s']:.1f} s "
          f"({1000 * a['all']['per_pair_s']:.0f} ms per pair), FastVMT's forward pairs ({a['forward']['pairs']}) "
          f"{a['forward']['s']:.1f} s; at 480x832x81: {a['pairs_13b']['all']} pairs about "
          f"{a['pairs_13b']['all'] * a['all']['per_pair_s']:.0f} s per iteration here, {a['pairs_13b']['forward']} "
          f"about {a['pairs_13b']['forward'] * a['all']['per_pair_s']:.0f} s; by FLOPs "
          f"{100 * a['share_13b']['all']:.1f} % "
          f"and {100 * a['share_13b']['forward']:.1f} % of an optimisation iteration (15 blocks)", flush=True)
    print(f"wan: guided step {large['guided']['step_s'] / large['plain']['step_s']:.2f}x plain, peak "
          f"{large['guided']['peak_bytes'] / large['plain']['peak_bytes']:.2f}x; capture peak x"
          f"{large['plain']['extract_peak'] / small['plain']['extract_peak']:.2f} for tokens x{token_ratio:.2f}")


def bench_reuse(args: argparse.Namespace) -> None:
    """Gradient reuse on the demo model: the motion loss the guided run reaches with k = 1, 2, 3 (the
    gradient computed on every k-th guided step) and the amortized cost of the guided phase over plain
    sampling of the same steps."""
    fe = _fidelity_eval(args)
    import comfy.sample
    import torch

    from motionclone.motion_core.guided_sampling import GuidanceSettings, MotionGuidance

    model, clip, vae = fe.load_demo_model()
    s = fe.DemoSettings()
    clips = fe.synthetic_clips(args.clips, 128, 8)
    losses: dict[int, list[float]] = {k: [] for k in args.k}
    times: dict[int | str, float] = {k: 0.0 for k in args.k} | {"plain": 0.0}
    for name, frames, prompt in clips:
        for seed in args.seeds:
            ref = fe.reference_motion(model, clip, vae, frames, prompt, seed, s.timestep)
            latent = torch.zeros_like(ref.latents)

            def sample(m, latent=latent, seed=seed, ref=ref):
                t = time.perf_counter()
                comfy.sample.sample(m, comfy.sample.prepare_noise(latent, seed), s.steps, s.cfg, s.sampler,
                                    s.scheduler, ref.positive, ref.empty, latent, seed=seed, disable_pbar=True)
                return time.perf_counter() - t

            sample(model)  # warm-up: model load
            times["plain"] += sample(model)
            for k in args.k:
                guidance = MotionGuidance(ref.motion, GuidanceSettings(s.weight, s.guided_steps, s.noisy_fraction,
                                                                       s.warmup, s.cooldown, gradient_every=k))
                times[k] += sample(guidance.patch(model))
                losses[k].append(guidance.loss_curve()[-1][1])
            print(f"  {name} seed {seed}: loss at the last guided step "
                  + ", ".join(f"k={k} {losses[k][-1]:.4f}" for k in args.k), flush=True)
    runs = len(clips) * len(args.seeds)
    guided_share = s.guided_steps / s.steps
    plain_phase = times["plain"] * guided_share  # the guided steps, sampled plain
    print(f"demo model, {runs} runs ({len(clips)} synthetic clips x seeds {args.seeds}), {s.steps} steps with the "
          f"first {s.guided_steps} guided, weight {s.weight:g}, {args.threads} thread(s)")
    base = float(np.mean(losses[1])) if 1 in losses else None
    for k in args.k:
        mean = float(np.mean(losses[k]))
        phase = times[k] - times["plain"] * (1 - guided_share)  # the other steps cost what plain ones do
        change = f", loss {100 * (mean / base - 1):+.1f} %" if base else ""
        print(f"reuse k={k}: loss at the last guided step {mean:.4f}{change} vs k=1, amortized ratio "
              f"{phase / plain_phase:.2f} (guided phase over the same steps plain)")


def bench_region(args: argparse.Namespace) -> None:
    """Region masks on the demo model (its reference clip, 16 frames): the left half's motion into the left half,
    against no mask and no guidance. Per run and seed: the motion loss restricted to each half, at the last guided
    step and averaged over the guided steps, and how far each half's attention at the last guided step moved from
    the unguided run's (mean |P - P_unguided|). A diagnostic run holds the right half's latent exactly on the
    unguided run's path (its denoised prediction replaced by the unguided run's at every guided step): what is left
    of the right half's attention drift there comes from the left half alone."""
    fe = _fidelity_eval(args)
    import comfy.sample
    import torch

    from motionclone.motion_core.extraction import extract_sparse_motion
    from motionclone.motion_core.guided_sampling import (
        GuidanceSettings,
        MotionGuidance,
        attention_layers_of,
        select_layers,
    )
    from motionclone.motion_core.region_mask import RegionGuide, masked_motion_loss, normalize_mask

    sys.path.insert(0, str(ROOT / "scripts"))
    from demo import DEMO_REFERENCE_CLIP

    s = fe.DemoSettings()
    model, clip, vae = fe.load_demo_model()
    frames = fe.procedural_clips().make_clip(**DEMO_REFERENCE_CLIP, frames=args.frames).frames
    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(frames).float() / 255.0)
    count, _, lh, lw = latents.shape
    empty, positive = fe._encode(clip, ""), fe._encode(clip, "blue square")
    layers = select_layers(attention_layers_of(model), "up_blocks.1")
    left = torch.zeros(1, lh * 8, lw * 8)
    left[:, :, : lw * 4] = 1.0
    halves = {"left": left, "right": 1.0 - left}
    right_latent = 1.0 - torch.nn.functional.adaptive_avg_pool2d(left[:, None], (lh, lw))
    names = ["unguided", "no mask", "left half", "left half + keep still", "left half, right held"]
    # run -> {"last": {half: [per seed]}, "phase": {half: [...]}, "drift": {half: [...]}}
    results: dict[str, dict] = {n: {k: {h: [] for h in halves} for k in ("last", "phase", "drift")} for n in names}
    held_gap = 0.0
    for seed in args.seeds:
        full = extract_sparse_motion(model, latents, empty[0][0], layers, timestep=s.timestep, seed=seed)
        masked = extract_sparse_motion(model, latents, empty[0][0], layers, timestep=s.timestep, seed=seed,
                                       mask=left)
        guides = {h: RegionGuide(full, normalize_mask(m, count, lh, lw)) for h, m in halves.items()}
        runs = {"unguided": (full, 0.0, 0.0), "no mask": (full, s.weight, 0.0), "left half": (masked, s.weight, 0.0),
                "left half + keep still": (masked, s.weight, args.keep_still),
                "left half, right held": (masked, s.weight, 0.0)}
        maps: dict[str, list[dict]] = {}
        unguided_denoised: list[torch.Tensor] = []
        states: dict[str, list[torch.Tensor]] = {}
        for name, (motion, weight, still) in runs.items():
            guidance = MotionGuidance(motion, GuidanceSettings(weight, s.guided_steps, s.noisy_fraction, s.warmup,
                                                               s.cooldown, keep_still_weight=still))
            seen: list[dict] = []
            measure = guidance._loss

            def spy(probs, m, region, measure=measure, seen=seen):
                seen.append({k: v.detach().clone() for k, v in probs.items()})
                return measure(probs, m, region)

            guidance._loss = spy  # the maps each guided step's loss sees, before its update
            patched = guidance.patch(model)
            calls = [0]

            def post_cfg(a, name=name, calls=calls, unguided_denoised=unguided_denoised):
                step, calls[0] = calls[0], calls[0] + 1
                if name == "unguided":
                    unguided_denoised.append(a["denoised"].detach().clone())
                elif name.endswith("held") and step < s.guided_steps:
                    m = right_latent.to(a["denoised"])
                    return a["denoised"] * (1.0 - m) + unguided_denoised[step].to(a["denoised"]) * m
                return a["denoised"]

            patched.set_model_sampler_post_cfg_function(post_cfg)  # after the guidance's own update
            latent = torch.zeros_like(latents)
            xs = states.setdefault(name, [])
            comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, seed), s.steps, s.cfg, s.sampler,
                                s.scheduler, positive, empty, latent, seed=seed, disable_pbar=True,
                                callback=lambda step, x0, x, total, xs=xs: xs.append(x.detach().clone()))
            maps[name] = seen
        held, plain = states["left half, right held"], states["unguided"]
        held_gap = max(held_gap, max(float(((a - b) * right_latent).abs().max())
                                     for a, b in zip(held[: s.guided_steps], plain[: s.guided_steps], strict=True)))
        layer = full.layers[0]
        for name, seen in maps.items():
            for h, guide in guides.items():
                curve = [float(masked_motion_loss(probs, full, guide)) for probs in seen]
                results[name]["last"][h].append(curve[-1])
                results[name]["phase"][h].append(float(np.mean(curve)))
                diff = (seen[-1][layer] - maps["unguided"][-1][layer]).abs().mean(dim=(1, 3))  # [S, F]
                results[name]["drift"][h].append(float(diff[guide.rows[layer]].mean()))
        print(f"  seed {seed}: " + "; ".join(
            f"{n} L {results[n]['last']['left'][-1]:.4f} R {results[n]['last']['right'][-1]:.4f}" for n in names[:3]),
            flush=True)
    print(f"demo model, its reference clip ({args.frames} frames), seeds {args.seeds}; {s.steps} steps, "
          f"{s.guided_steps} guided, weight {s.weight:g}; motion loss per half at the last guided step and (over the "
          "guided steps), attention moved from the unguided run at the last guided step; means over the seeds:")
    mean = {n: {k: {h: float(np.mean(v)) for h, v in d.items()} for k, d in r.items()} for n, r in results.items()}
    for name, r in mean.items():
        print(f"  {name:24s} loss left {r['last']['left']:.4f} ({r['phase']['left']:.4f}) right "
              f"{r['last']['right']:.4f} ({r['phase']['right']:.4f})   attention moved: left {r['drift']['left']:.4f}"
              f" right {r['drift']['right']:.4f}")

    def drops(name: str, kind: str) -> np.ndarray:
        return np.array(results["unguided"][kind]["left"]) - np.array(results[name][kind]["left"])

    for kind, what in (("last", "at the last guided step"), ("phase", "over the guided steps")):
        masked_drop, full_drop = drops("left half", kind), drops("no mask", kind)
        print(f"region: left-half loss drop {what}: masked {masked_drop.mean():+.4f}, unmasked {full_drop.mean():+.4f}"
              f" (mean over seeds; ratio {masked_drop.mean() / full_drop.mean():.2f}); per seed masked "
              f"{np.round(masked_drop, 4).tolist()}, unmasked {np.round(full_drop, 4).tolist()}; the masked drop is "
              f"the larger in {int((masked_drop > full_drop).sum())} of {len(args.seeds)} seeds")
    drift = {n: mean[n]["drift"]["right"] for n in names[1:]}
    print(f"region: right-half attention moved {drift['left half'] / drift['no mask']:.2f}x as far as unmasked "
          f"({drift['left half + keep still'] / drift['no mask']:.2f}x with keep still; "
          f"{drift['left half, right held'] / drift['no mask']:.2f}x with the right half's latent held on the unguided "
          f"path, max |x - x_unguided| there {held_gap:.1e})")


def main(argv: list[str]) -> None:
    if argv and argv[0] == "_guidance_worker":
        mode, frames, size, steps, threads = argv[1], *map(int, argv[2:6])
        print(json.dumps(_guidance_worker(mode, frames, size, steps, threads)))
        return
    if argv and argv[0] in ("_wan_worker", "_wan_amf"):
        _bootstrap()
        sys.path.insert(0, str(ROOT / "scripts"))
        import wan_bench

        if argv[0] == "_wan_worker":
            print(json.dumps(wan_bench.worker(argv[1], *map(int, argv[2:8]))))
        else:
            print(json.dumps(wan_bench.amf_cost(*map(int, argv[1:3]))))
        return
    if argv and argv[0] in ("_realscale_worker", "_realscale_breakdown", "_realscale_guided_breakdown"):
        _bootstrap()
        sys.path.insert(0, str(ROOT / "scripts"))
        import realscale_bench

        if argv[0] == "_realscale_worker":
            print(json.dumps(realscale_bench.worker(argv[1], *map(int, argv[2:6]))))
        elif argv[0] == "_realscale_guided_breakdown":
            print(json.dumps(realscale_bench.breakdown_guided(*map(int, argv[1:4]))))
        else:
            print(json.dumps(realscale_bench.breakdown(*map(int, argv[1:4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("guidance", help="guided vs plain step time, peak memory, MOTION size")
    g.add_argument("--frames", type=int, default=16)
    g.add_argument("--size", type=int, default=32, help="latent side (x8 pixels)")
    g.add_argument("--steps", type=int, default=6)
    g.add_argument("--threads", type=int, default=1)
    f = sub.add_parser("fidelity", help="motion fidelity guided vs unguided on the demo model")
    f.add_argument("--clips", type=int, default=5, help="synthetic reference clips (one per trajectory kind)")
    f.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    f.add_argument("--frames", type=int, default=8)
    f.add_argument("--size", type=int, default=128)
    f.add_argument("--steps", type=int, default=20)
    f.add_argument("--guided-steps", type=int, default=12)
    f.add_argument("--weight", type=float, default=1000.0, help="guidance weight (default: the demo workflow's)")
    f.add_argument("--scheduler", default="ddim_uniform",
                   help="a ComfyUI scheduler (default: the demo workflow's) or 'uneven' (the reference's spacing: "
                        "the guided steps dense over the noisy part)")
    f.add_argument("--noisy-fraction", type=float, default=0.4, help="r of the uneven schedule")
    f.add_argument("--threads", type=int, default=1, help="torch threads (more can be far slower on a busy machine)")
    f.add_argument("--no-real", action="store_true", help="skip the shared real reference clips")
    a = sub.add_parser("attention", help="demo model: does its temporal attention carry motion?")
    a.add_argument("--clips", type=int, default=3)
    a.add_argument("--timestep", type=int, default=400)
    a.add_argument("--layers", default="up_blocks.1")
    a.add_argument("--threads", type=int, default=1)
    u = sub.add_parser("reuse", help="demo model: gradient reuse every k guided steps, loss and amortized cost")
    u.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    u.add_argument("--clips", type=int, default=5)
    u.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    u.add_argument("--threads", type=int, default=1)
    u.add_argument("--model-dir", default=None)
    r = sub.add_parser("realscale", help="full-size SD1.5 + v3: plain vs guided step time and peak memory")
    r.add_argument("--sizes", type=int, nargs="*", default=[256, 512],
                   help="video side in pixels (none: only the breakdowns)")
    r.add_argument("--frames", type=int, default=16)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--modes", nargs="+", default=["plain", "guided", "guided_auto"],
                   help="plain; guided (memory_mode lean: checkpointed graph); guided_kept (fast: the whole graph "
                        "kept); guided_auto (the default auto: kept when it fits in 3/4 of the free memory, run only "
                        "then)")
    r.add_argument("--chunks", type=int, default=0,
                   help="batch slices of the checkpointed layers (0: the pack's default, checkpointing.CHUNKS)")
    r.add_argument("--breakdown", type=int, default=256, help="size of the memory breakdown (0: none)")
    r.add_argument("--guided-breakdown", type=int, default=0,
                   help="size of the breakdown of a checkpointed guided step's gradient memory (0: none)")
    w = sub.add_parser("wan", help="Wan at 1.3B widths: plain vs guided step, capture memory, 1.3B estimate")
    w.add_argument("--frames", type=int, nargs=2, default=[3, 6], help="latent frames of the two sizes")
    w.add_argument("--height", type=int, default=16, help="latent height (x8 pixels)")
    w.add_argument("--width", type=int, default=32, help="latent width (x8 pixels)")
    w.add_argument("--blocks", type=int, default=4)
    w.add_argument("--iterations", type=int, default=5)
    w.add_argument("--threads", type=int, default=2)
    w.add_argument("--amf-frames", type=int, default=6, help="latent frames of the motion-flow cost measurement")
    m = sub.add_parser("region", help="demo model: region masks, the left half's motion into the left half")
    m.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    m.add_argument("--frames", type=int, default=16)
    m.add_argument("--keep-still", type=float, default=1000.0, help="keep_still_weight of the keep-still run")
    m.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("ceiling", help="demo model: fidelity when its attention matches the MOTION almost exactly")
    c.add_argument("--clips", type=int, default=5)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    c.add_argument("--iterations", type=int, default=10, help="gradient iterations per matched step")
    c.add_argument("--matched-steps", type=int, default=8, help="of 20")
    c.add_argument("--step-size", type=float, default=0.02, help="RMS move per iteration, in units of sigma")
    c.add_argument("--threads", type=int, default=1)
    for demo in (f, a, c, m):
        demo.add_argument("--model-dir", default=None,
                          help="folder with the two demo model files (default: demo_model/), e.g. a training output")
    args = parser.parse_args(argv)
    {"guidance": bench_guidance, "fidelity": bench_fidelity, "attention": bench_attention,
     "ceiling": bench_ceiling, "realscale": bench_realscale, "reuse": bench_reuse,
     "region": bench_region, "wan": bench_wan}[args.cmd](args)


if __name__ == "__main__":
    main(sys.argv[1:])
