#!/usr/bin/env python3
"""Train the shipped demo model (demo_model/): a small SD1.5-architecture text-to-image
model plus an AnimateDiff motion module, on procedural clips, on the CPU.

    python3 scripts/dev.py python training/train_demo_model.py            # the shipped files (about 60 min, one core)
    python3 scripts/dev.py python training/train_demo_model.py --quick    # a few steps per stage: checks the pipeline
    python3 scripts/dev.py python training/train_demo_model.py --prediction eps --motion-recipe frozen  # first model

Stages (each saves `<work>/<stage>.pt` when done and `<work>/<stage>_partial.pt` every
few hundred steps, so a rerun resumes instead of starting over; stages already done are loaded):
  vae     AutoencoderKL (ComfyUI class), built as a colour-thumbnail codec, trained on 32 px
          crops, then briefly on full 128 px frames; afterwards the latent mean/std is folded into
          quant_conv/post_quant_conv so that SD1.5's latent scale (0.18215) gives zero-mean,
          unit-std latents per channel
  encode  the clip dataset -> VAE latents (posterior mode, as ComfyUI's VAEEncode)
  image   UNet + CLIP text encoder on single frames (SD1.5 DDPM schedule; v prediction by default,
          since eps prediction gave frames close to independent images, see the model card)
  motion  AnimateDiff MotionAdapter on 8- and 16-frame clips, run through the pack's own
          injection (motion_core.injection.apply_motion_modules); settings per MOTION_RECIPES
  export  fp16 compact checkpoint + motion module in the original AnimateDiff key format,
          then both are reloaded through the pack's loaders and sampled as a check

Every random choice derives from --seed (data by clip seed, batches by step), so a rerun
with the same arguments reproduces the run (up to float non-associativity across thread counts).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "motionclone"

SIZE = 128  # pixels; latents 16x16, UNet levels 16/8/4/2: up_blocks.1 has 4x4 tokens
CROP = 32  # VAE training crops (pixels); then a short phase on full frames
CLIP_FRAMES = 16  # dataset clips; motion training uses them as 16 frames or as 8-frame sub-clips
LATENT_SCALE = 0.18215  # comfy.latent_formats.SD15.scale_factor

# ComfyUI SD1.5 layout at small widths: the pack's TINY_SD15_UNET_CONFIG (4 levels, attention on the
# first three, model_channels 32, context 32) with channels 32, 32, 64, 64 instead of 32, 64, 128, 128.
DEMO_UNET_OVERRIDES: dict[str, Any] = {"channel_mult": [1, 1, 2, 2]}
# SD's AutoencoderKL (8x down, 4 latent channels) made cheap for a CPU: no ResBlocks in the
# encoder levels, one per decoder level. Why 96 channels: ComfyUI's GroupNorm always has 32 groups
# and removes each group's per-image mean and scale; the decoder's last norm (norm_out, at full
# resolution) feeds conv_out directly, so with 1 or 2 channels per group the absolute colour of a
# flat region cannot reach the output (32- and 64-channel tries decoded red shapes and coloured
# backgrounds as greys). 3 channels per group keep a direction that can carry it (SD's VAE has 4).
DEMO_VAE_CONFIG: dict[str, Any] = {
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 96,
        "ch_mult": [1, 1, 1, 1],
        "num_res_blocks": 0,  # encoder: convs + mid block; decoder: one ResBlock per level + mid block
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    "embed_dim": 4,
}
MOTION_CHANNELS = (32, 32, 64, 64)  # = model_channels * channel_mult
MOTION_MAX_FRAMES = 32  # AnimateDiff v2/v3 positional-encoding length


@dataclass(frozen=True)
class MotionRecipe:
    """Settings of the motion stage (see train_motion)."""

    steps: int
    mm_lr: float  # motion module
    unet_lr: float  # image UNet fine-tuned along (0: frozen, AnimateDiff style)
    ema: float
    high_t: bool  # 3 in 4 timesteps from t >= 400 (else uniform)
    max_weight: float | None  # eps-MSE weighted by 1/SNR clamped to [1, max_weight] (None: plain eps-MSE)
    init_from: str | None = None  # continue from that recipe's finished motion stage
    attn_weight: float = 0.0  # weight of the attention-correspondence loss (see correspondence_loss)
    attn_max_t: int = 1000  # that loss only on videos noised to a timestep below this
    diff_weight: float = 0.0  # weight of the frame-difference loss (see frame_difference_loss)
    position_free: str | None = None  # motion modules under this prefix get a zero position encoding


CORRESPONDENCE_LAYERS = "up_blocks.1"  # the layers MotionClone guides by default
MOTION_RECIPES: dict[str, MotionRecipe] = {
    # The shipped motion module (with --prediction v, the default): image UNet fine-tuned along,
    # 3 in 4 timesteps from t >= 400, plain MSE on the UNet's target.
    "joint3k": MotionRecipe(steps=3000, mm_lr=2e-3, unet_lr=5e-4, ema=0.995, high_t=True, max_weight=None),
    # Earlier tries, all with eps prediction (see demo_model/MODEL_CARD.md, "How we got here"): frames
    # stayed close to independent images.
    # AnimateDiff style: frozen image UNet, plain eps-MSE, uniform timesteps (the first shipped module).
    "frozen": MotionRecipe(steps=1200, mm_lr=5e-4, unet_lr=0.0, ema=0.998, high_t=False, max_weight=None),
    # UNet fine-tuned along, noisy timesteps and x0-like weighting emphasised.
    "joint": MotionRecipe(steps=1500, mm_lr=2e-3, unet_lr=2e-4, ema=0.995, high_t=True, max_weight=20.0),
    "joint_x0": MotionRecipe(steps=3500, mm_lr=2e-3, unet_lr=5e-4, ema=0.995, high_t=True, max_weight=100.0),
    # joint3k continued with the attention-correspondence loss on the guided layers (correspondence_loss),
    # on all noise levels or only below t = 500: tried to make temporal attention carry the motion so
    # that MotionClone guidance clones it; it did not (model card).
    "corr": MotionRecipe(steps=1000, mm_lr=1e-3, unet_lr=2.5e-4, ema=0.995, high_t=True, max_weight=None,
                         init_from="joint3k", attn_weight=0.3),
    "corr_lowt": MotionRecipe(steps=2000, mm_lr=1e-3, unet_lr=2.5e-4, ema=0.995, high_t=False, max_weight=None,
                              init_from="joint3k", attn_weight=0.3, attn_max_t=500),
    # joint3k trained on (its loss was still falling at 3000 steps and its samples move less than the data)
    # with the frame-difference loss that weights the motion part of the target; negative (model card).
    "tdiff": MotionRecipe(steps=3000, mm_lr=1e-3, unet_lr=2.5e-4, ema=0.995, high_t=True, max_weight=None,
                          init_from="joint3k", diff_weight=4.0),
    # ... and with no position encoding in the guided level's motion modules: their temporal attention
    # can then only say which frames look alike at a token (the occupancy pattern MotionClone transfers),
    # not learn a pattern over frame positions that ignores content (what "corr" ended with).
    "tdiff_nopos": MotionRecipe(steps=3000, mm_lr=1e-3, unet_lr=2.5e-4, ema=0.995, high_t=True, max_weight=None,
                                init_from="joint3k", diff_weight=4.0, position_free=CORRESPONDENCE_LAYERS),
}
CORRESPONDENCE_TAU = 0.1  # squared latent distance scale; object vs background is ~0.5-3, static ~0.002
CORRESPONDENCE_MOVING = 0.05  # a token moves if two of its frames differ by more (about 30 % of tokens do)
DEFAULT_RECIPE, DEFAULT_PREDICTION = "joint3k", "v"


def default_steps(recipe: str = DEFAULT_RECIPE) -> dict[str, int]:
    return {"vae_crop": 1500, "vae_full": 150, "image": 2000, "motion": MOTION_RECIPES[recipe].steps}


DATASET_CLIPS = 600
DATA_SEED_OFFSET = 1_000_000  # dataset clip i has seed DATA_SEED_OFFSET + i (VAE clips: 2_000_000 + ...)
VAE_SEED_OFFSET = 2_000_000
HOLDOUT_SEED_OFFSET = 3_000_000


# --- host set-up --------------------------------------------------------------------------------


def setup_host(comfyui: Path) -> None:
    """ComfyUI importable in CPU mode with PyTorch SDPA attention; the pack as `motionclone`.

    SDPA is only a faster kernel for the same attention math (ComfyUI's CPU default is its
    sub-quadratic implementation); the trained weights run with either.
    """
    if str(comfyui) not in sys.path:
        sys.path.append(str(comfyui))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    if PACKAGE not in sys.modules:
        shell = types.ModuleType(PACKAGE)
        shell.__path__ = [str(ROOT)]
        sys.modules[PACKAGE] = shell


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step])


def step_gen(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stage, step, 7]).generate_state(1)[0]))


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def standard_init_(module: torch.nn.Module) -> None:
    """PyTorch's default init. ComfyUI's ops skip weight init (weights start uninitialised)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.Linear.reset_parameters(m)
        elif isinstance(m, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(m)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=0.02)


def zero_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


class Checkpoints:
    """Stage results and resumable partial states under the work directory."""

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.work / f"{name}.pt"

    def load(self, name: str) -> dict | None:
        p = self.path(name)
        return torch.load(p, map_location="cpu", weights_only=True) if p.exists() else None

    def save(self, name: str, obj: dict) -> None:
        tmp = self.path(name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, self.path(name))


def fp16_round(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 copies holding fp16-representable values: what the shipped fp16 files load as, so the
    later stages train against exactly the weights that ship."""
    return {k: (v.detach().half().float() if v.is_floating_point() else v.detach().clone()) for k, v in sd.items()}


class Progress:
    """Running loss average and a log line every 50 steps with the time left."""

    def __init__(self, name: str, start: int, total: int) -> None:
        self.name, self.start, self.total = name, start, total
        self.t0 = time.monotonic()
        self.avg: float | None = None

    def update(self, step: int, value: float) -> bool:
        """Adds `value` to the running average; True on the steps that should log."""
        self.avg = value if self.avg is None else 0.98 * self.avg + 0.02 * value
        return step % 50 == 0 or step == self.total - 1

    def log(self, step: int, detail: str) -> None:
        el = time.monotonic() - self.t0
        eta = el / (step - self.start + 1) * (self.total - step - 1)
        log(f"{self.name} step {step}/{self.total} {detail} | {el:.0f}s, eta {eta:.0f}s")


def optimiser_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


class EMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up: early weights are forgotten fast
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)


# --- models ---------------------------------------------------------------------------------------


def demo_unet_config() -> dict[str, Any]:
    from motionclone.motion_core.tiny_models import TINY_SD15_UNET_CONFIG

    return copy.deepcopy({**TINY_SD15_UNET_CONFIG, **DEMO_UNET_OVERRIDES})


def architecture(prediction: str = "eps") -> dict[str, Any]:
    from motionclone.motion_core import compact_checkpoint as cc

    arch = {
        "format": cc.FORMAT_VERSION,
        "unet": demo_unet_config(),
        "clip": copy.deepcopy(cc.TINY_CLIP_CONFIG),
        "vae": copy.deepcopy(DEMO_VAE_CONFIG),
    }
    if prediction != "eps":  # eps is the format's default: eps files keep their metadata
        arch["prediction"] = prediction
    return arch


def stage_name(args, stage: str) -> str:
    """Checkpoint name of a stage: the UNet stages of a v-prediction run are separate."""
    if stage == "motion" and args.motion_recipe != "frozen":  # "frozen" keeps its first name
        stage = f"motion_{args.motion_recipe}"
    return stage if args.prediction == "eps" or stage in ("vae", "latents") else f"{stage}_{args.prediction}"


def diffusion_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
                     prediction: str) -> torch.Tensor:
    """What the UNet is trained to output: the noise (eps) or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    if prediction == "eps":
        return noise
    a = abar[t].float().view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (what ComfyUI's VAE feeds its encoder)."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --- stage: VAE -----------------------------------------------------------------------------------


def train_vae(args, ck: Checkpoints) -> dict[str, torch.Tensor]:
    from motionclone.motion_core import compact_checkpoint as cc
    from motionclone.training.procedural_clips import make_clip

    done = ck.load("vae")
    if done is not None:
        log("vae: loaded finished stage")
        return done["vae"]
    torch.manual_seed(args.seed)
    vae = cc.build_vae(architecture()["vae"])
    standard_init_(vae)
    colour_path_init_(vae)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    steps_crop, steps_full = args.steps["vae_crop"], args.steps["vae_full"]
    total = steps_crop + steps_full
    start = 0
    partial = ck.load("vae_partial")
    if partial is not None:
        vae.load_state_dict(partial["vae"])
        opt.load_state_dict(partial["opt"])
        start = partial["step"]
        log(f"vae: resuming at step {start}")
    progress = Progress("vae", start, total)
    for step in range(start, total):
        rng = step_rng(args.seed, 1, step)
        full = step >= steps_crop
        batch = 2 if full else 16
        imgs = []
        for _ in range(batch):
            clip = make_clip(VAE_SEED_OFFSET + int(rng.integers(10**9)), frames=4, size=SIZE)
            img = clip.frames[int(rng.integers(4))]
            if not full:  # 32 px crop on the 8 px latent grid: 1/16 of the compute per sample
                y, x = (int(v) * 8 for v in rng.integers(0, (SIZE - CROP) // 8 + 1, 2))
                img = img[y : y + CROP, x : x + CROP]
            imgs.append(img)
        x = frames_to_tensor(np.stack(imgs))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.vae_lr, warmup=50)
        h = vae.quant_conv(vae.encoder(x))
        mean, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.randn(mean.shape, generator=step_gen(args.seed, 1, step)) * (0.5 * logvar).exp()
        rec = vae.decoder(vae.post_quant_conv(z))
        mse = F.mse_loss(rec, x)
        l1 = F.l1_loss(rec, x)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        # Colours at the latent grid's scale, weighted up: a tiny VAE otherwise learns luminance
        # first and for a long time decodes the (muted) colours as grey, which per-pixel MSE hardly punishes.
        low = F.mse_loss(F.avg_pool2d(rec, 8), F.avg_pool2d(x, 8))
        loss = mse + 0.5 * l1 + args.vae_low * low + args.vae_kl * kl
        optimiser_step(opt, loss, list(vae.parameters()))
        if progress.update(step, mse.item()):
            progress.log(step, f"{'full' if full else 'crop'} mse {mse.item():.5f} (avg {progress.avg:.5f}) "
                         f"l1 {l1.item():.4f} low {low.item():.5f} kl {kl.item():.3f} latent std "
                         f"{mean.std().item():.3f} post std {(0.5 * logvar).exp().mean().item():.4f}")
        if (step + 1) % 250 == 0 and step + 1 < total:
            ck.save("vae_partial", {"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    vae.eval()
    sd = normalise_latents(vae, args)
    ck.save("vae", {"vae": sd})
    return sd


# Colour path of the VAE init (see colour_path_init_): GroupNorm group g holds channels 3g..3g+2.
_SIG, _NEG, _REF = [0, 3, 6], [1, 4, 7], [2, 5, 8]  # +colour, -colour, constant reference, per RGB channel
_PATH = _SIG + _NEG + _REF
_REF_K = 20.0
_SILU_SHIFT = 6.0  # silu(x + 6) is x + 6 to within 1.5%: the path stays linear through the nonlinearity


@torch.no_grad()
def colour_path_init_(vae: torch.nn.Module) -> None:
    """Start the VAE as an exact colour thumbnail codec: latent channels 0-2 = the 8x8-average RGB,
    decoder = nearest upsampling of them; every other channel keeps its random init and all
    residual branches start at zero. Training then only has to add detail.

    Why: ComfyUI's GroupNorm (32 groups; 3 channels each here) removes each group's per-image mean
    and scale, and the last norm (norm_out) sits right before conv_out, so a network trained from
    random init for minutes decodes flat colours as greys (seen with 32/64/96-channel tries). A
    group (v, -v, K) has mean K/3 and a std that hardly depends on v when K >> |v|, so GroupNorm
    maps v linearly; `gamma = std, beta = K/3 + 6` then puts silu in its near-linear range.
    """
    enc, dec = vae.encoder, vae.decoder
    n = enc.conv_in.out_channels
    free = [c for c in range(n) if c not in _PATH]

    def path_conv(conv: torch.nn.Module, taps: list[tuple[int, int, float]], src) -> None:
        """Rows of the path channels: +/- copy of `src[c]` through `taps`, references = bias K."""
        conv.weight[_PATH] = 0.0
        conv.bias[_PATH] = 0.0
        for c in range(3):
            for i, j, w in taps:
                conv.weight[_SIG[c], src[c], i, j] = w
                conv.weight[_NEG[c], src[c], i, j] = -w
            conv.bias[_REF[c]] = _REF_K
        if conv.in_channels == n:  # free channels must not read the large constant references
            conv.weight[torch.tensor(free)[:, None], torch.tensor(_REF)[None, :]] = 0.0

    center = [(1, 1, 1.0)]
    average = [(0, 0, 0.25), (0, 1, 0.25), (1, 0, 0.25), (1, 1, 0.25)]  # 2x2 mean (Downsample pads right/bottom)
    path_conv(enc.conv_in, center, [0, 1, 2])
    for level in enc.down:
        if hasattr(level, "downsample"):
            path_conv(level.downsample.conv, average, _SIG)
    path_conv(dec.conv_in, center, [0, 1, 2])
    for level in dec.up:
        if hasattr(level, "upsample"):
            path_conv(level.upsample.conv, center, _SIG)
    for m in vae.modules():  # residual branches start at zero: every ResBlock and attention is the identity
        if type(m).__name__ == "ResnetBlock":
            zero_(m.conv2)
        elif type(m).__name__ == "AttnBlock":
            zero_(m.proj_out)
    std = _REF_K * math.sqrt(2.0) / 3.0  # std of the group (v, -v, K) for |v| << K
    for norm in (enc.norm_out, dec.norm_out):
        norm.weight[_PATH] = std
        norm.bias[_PATH] = _REF_K / 3.0 + _SILU_SHIFT
    enc.conv_out.weight.zero_()
    enc.conv_out.bias.zero_()
    dec.conv_out.weight.zero_()
    dec.conv_out.bias.zero_()
    for c in range(3):
        enc.conv_out.weight[c, _SIG[c], 1, 1] = 1.0
        enc.conv_out.bias[c] = -_SILU_SHIFT
        dec.conv_out.weight[c, _SIG[c], 1, 1] = 1.0
        dec.conv_out.bias[c] = -_SILU_SHIFT
    for conv in (vae.quant_conv, vae.post_quant_conv):
        conv.weight.zero_()
        conv.weight[:, :, 0, 0].copy_(torch.eye(conv.out_channels, conv.in_channels))
        conv.bias.zero_()
    vae.quant_conv.bias[4:] = -6.0  # posterior std 0.05: small next to colour values in [-1, 1]
    # Latent channel 3 starts as a faint random feature of the free channels, free to learn detail.
    enc.conv_out.weight[3] = torch.randn_like(enc.conv_out.weight[3]) * 0.01


@torch.no_grad()
def normalise_latents(vae: torch.nn.Module, args) -> dict[str, torch.Tensor]:
    """Fold a per-channel affine map into quant_conv/post_quant_conv (exact: both are 1x1 convs)
    so that LATENT_SCALE * (VAE latent) has zero mean and unit std per channel."""
    from motionclone.training.procedural_clips import make_clip

    frames = np.concatenate([make_clip(HOLDOUT_SEED_OFFSET + i, frames=4).frames for i in range(32)])
    x = frames_to_tensor(frames)
    z = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0]
    before = vae.decoder(vae.post_quant_conv(z))
    m = z.mean(dim=(0, 2, 3))
    s = z.std(dim=(0, 2, 3))
    k = 1.0 / (LATENT_SCALE * s)
    qw, qb = vae.quant_conv.weight, vae.quant_conv.bias
    pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias
    pb.add_(pw[:, :, 0, 0] @ m)  # before scaling pw: z = z'/k + m
    pw.div_(k.view(1, -1, 1, 1))
    qw[:4].mul_(k.view(-1, 1, 1, 1))
    qb[:4].sub_(m).mul_(k)
    qb[4:].add_(2 * k.log())  # logvar follows the scale of the mean
    z2 = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0]
    after = vae.decoder(vae.post_quant_conv(z2))
    mse = F.mse_loss(((before + 1) / 2).clamp(0, 1), ((x + 1) / 2)).item()
    psnr = -10 * math.log10(max(mse, 1e-12))
    log(f"vae: latent mean {m.tolist()} std {s.tolist()} -> scaled std "
        f"{(LATENT_SCALE * z2).std(dim=(0, 2, 3)).tolist()}; fold error {(after - before).abs().max().item():.2e}; "
        f"held-out PSNR {psnr:.2f} dB")
    return fp16_round(vae.state_dict())


# --- stage: encode dataset ------------------------------------------------------------------------


def encode_dataset(args, ck: Checkpoints, vae_sd: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    from motionclone.motion_core import compact_checkpoint as cc
    from motionclone.training.procedural_clips import make_clip

    done = ck.load("latents")
    if done is not None and done["latents"].shape[0] == args.clips:
        log("encode: loaded finished stage")
        return done["latents"], json.loads(done["labels"])
    vae = cc.build_vae(architecture()["vae"])
    vae.load_state_dict(vae_sd)
    vae.eval()
    lat, labels = [], []
    t0 = time.monotonic()
    with torch.no_grad():
        for i in range(args.clips):
            clip = make_clip(DATA_SEED_OFFSET + i, frames=CLIP_FRAMES, size=SIZE)
            z = vae.quant_conv(vae.encoder(frames_to_tensor(clip.frames))).chunk(2, dim=1)[0]
            lat.append((z * LATENT_SCALE).half())
            labels.append(clip.label)
            if i % 100 == 0:
                log(f"encode clip {i}/{args.clips} | {time.monotonic() - t0:.0f}s")
    latents = torch.stack(lat)  # [N, F, 4, 16, 16] model-space latents
    ck.save("latents", {"latents": latents, "labels": json.dumps(labels)})
    log(f"encode: {tuple(latents.shape)} latents, std {latents.float().std().item():.3f}")
    return latents, labels


# --- text encoder helpers -------------------------------------------------------------------------


class TextEncoder:
    """comfy.sd.CLIP (the class the checkpoint loads into) with a differentiable encode of labels."""

    def __init__(self, clip_sd: dict[str, torch.Tensor] | None, seed: int, *, trainable: bool = False) -> None:
        from motionclone.motion_core import compact_checkpoint as cc

        self.clip = cc.build_clip(architecture()["clip"], None)
        self.encoder = cc.clip_text_model(self.clip)  # comfy.sd1_clip.SDClipModel
        self.text_model = self.encoder.transformer.text_model
        if trainable:
            # ComfyUI keeps text-encoder weights in fp16 on the CPU too (computing in fp32);
            # Adam's state needs fp32. The shipped weights are fp16 again.
            self.text_model.float()
        if clip_sd is None:
            torch.manual_seed(seed + 1)
            standard_init_(self.text_model)
        else:
            self.text_model.load_state_dict(clip_sd)
        self._tokens: dict[str, list[int]] = {}
        for layer in self.text_model.encoder.layers:
            # comfy.clip_model.CLIPLayer adds its residuals in place, which autograd cannot
            # differentiate; the same sums out of place (instance attribute: only this encoder).
            layer.forward = types.MethodType(_clip_layer_forward, layer)

    def tokens(self, text: str) -> list[int]:
        if text not in self._tokens:
            (chunk,) = self.clip.tokenize(text)["l"]  # labels are short: one 77-token chunk
            self._tokens[text] = [int(t) for t, _w in chunk]
        return self._tokens[text]

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[B, 77, hidden]: the same computation as CLIPTextEncode (SDClipModel.forward)."""
        z, _pooled = self.encoder([self.tokens(t) for t in texts])
        return z

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.text_model.state_dict().items()}


def _clip_layer_forward(self, x, mask=None, optimized_attention=None):
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def sample_timesteps(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(0, 1000, (n,), generator=gen)


def noised(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    a = abar[t].float().view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# --- stage: image prior ---------------------------------------------------------------------------


def train_image(args, ck: Checkpoints, latents: torch.Tensor, labels: list[str]):
    from motionclone.motion_core.schedule import sd15_alphas_cumprod
    from motionclone.motion_core.tiny_models import build_tiny_sd15_model

    stage = stage_name(args, "image")
    done = ck.load(stage)
    if done is not None:
        log(f"{stage}: loaded finished stage")
        return done["unet"], done["clip"]
    torch.manual_seed(args.seed + 10)
    unet = build_tiny_sd15_model(args.seed, unet_config=demo_unet_config()).model.diffusion_model
    standard_init_(unet)
    # SD's zero-initialised residual outputs: every block starts as the identity.
    for name, m in unet.named_modules():
        if name == "out.2" or name.endswith("out_layers.3") or name.endswith("proj_out"):
            zero_(m)
    text = TextEncoder(None, args.seed, trainable=True)
    unet.train()
    text.text_model.train()
    params_unet = list(unet.parameters())
    emb = text.text_model.embeddings.token_embedding.weight
    params_text = [p for p in text.text_model.parameters() if p is not emb]
    for p in params_unet + params_text + [emb]:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        [
            {"params": params_unet + params_text, "weight_decay": 0.01},
            {"params": [emb], "weight_decay": 0.0},  # 49408 rows, ~20 used: decay would only shrink unused rows
        ],
        lr=args.lr,
    )
    ema = EMA(params_unet + params_text + [emb], decay=0.998)
    total, start = args.steps["image"], 0
    partial = ck.load(f"{stage}_partial")
    if partial is not None:
        unet.load_state_dict(partial["unet"])
        text.text_model.load_state_dict(partial["clip"])
        opt.load_state_dict(partial["opt"])
        ema.shadow = list(partial["ema"])
        start = partial["step"]
        log(f"image: resuming at step {start}")
    abar = sd15_alphas_cumprod()
    n_clips, n_frames = latents.shape[:2]
    batch = 16
    progress = Progress("image", start, total)
    for step in range(start, total):
        rng, gen = step_rng(args.seed, 3, step), step_gen(args.seed, 3, step)
        ci = rng.integers(n_clips, size=batch)
        fi = rng.integers(n_frames, size=batch)
        x0 = latents[torch.from_numpy(ci), torch.from_numpy(fi)].float()
        texts = ["" if rng.random() < args.uncond_p else labels[c] for c in ci]
        t = sample_timesteps(gen, batch)
        noise = torch.randn(x0.shape, generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr)
        context = text.encode(texts)
        pred = unet(noised(x0, t, noise, abar), t.float(), context)
        loss = F.mse_loss(pred, diffusion_target(x0, noise, t, abar, args.prediction))
        optimiser_step(opt, loss, params_unet + params_text + [emb])
        ema.update(step)
        if progress.update(step, loss.item()):
            progress.log(step, f"loss {loss.item():.4f} (avg {progress.avg:.4f})")
        if (step + 1) % 250 == 0 and step + 1 < total:
            ck.save(f"{stage}_partial", {"unet": unet.state_dict(), "clip": text.state_dict(), "opt": opt.state_dict(),
                                      "ema": ema.shadow, "step": step + 1})
    # Ship the EMA weights.
    with torch.no_grad():
        for s, p in zip(ema.shadow, ema.params):
            p.copy_(s)
    out = {"unet": fp16_round(unet.state_dict()), "clip": fp16_round(text.state_dict()),
           "final_loss_avg": progress.avg}
    ck.save(stage, out)
    return out["unet"], out["clip"]


# --- stage: motion module -------------------------------------------------------------------------


def new_adapter(seed: int):
    from diffusers import MotionAdapter

    torch.manual_seed(seed + 20)
    adapter = MotionAdapter(block_out_channels=MOTION_CHANNELS, motion_max_seq_length=MOTION_MAX_FRAMES,
                            use_motion_mid_block=True)
    # AnimateDiff zero-initialises each motion module's output projection: training starts from
    # the image model exactly.
    for name, m in adapter.named_modules():
        if name.endswith("proj_out"):
            zero_(m)
    return adapter


def motion_model(unet_sd: dict[str, torch.Tensor], adapter):
    """A ComfyUI MODEL of the frozen image UNet with `adapter` injected by the pack's own code."""
    import comfy.model_management

    from motionclone.motion_core.injection import apply_motion_modules, install_processors
    from motionclone.motion_core.motion_module import MotionModuleInfo
    from motionclone.motion_core.tiny_models import build_tiny_sd15_model

    base = build_tiny_sd15_model(unet_config=demo_unet_config(), state_dict=unet_sd)
    info = MotionModuleInfo(name="training", version="v2/v3", block_out_channels=MOTION_CHANNELS,
                            layers_per_block=(2, 2, 2, 2), transformer_layers=1, max_frames=MOTION_MAX_FRAMES,
                            has_mid_block=True)
    patched = apply_motion_modules(base, adapter, info, install_processors(adapter))
    comfy.model_management.load_models_gpu([patched])  # puts the object patches (motion blocks) in place
    return patched


def correspondence_targets(x0: torch.Tensor, side: int,
                           tau: float = CORRESPONDENCE_TAU) -> tuple[torch.Tensor, torch.Tensor]:
    """Which frames show the same thing at each token, where the token's content changes.

    `x0`: clean latents [videos, F, C, H, W], average-pooled to the layer's side x side token grid.
    Returns (targets [videos x side x side, F, F] whose row (p, i) is softmax_j(-|x_i(p) - x_j(p)|^2 / tau),
    moving [videos x side x side] bool): where an object passes, its frames attend to each other and
    the background frames to the background. Tokens whose content never changes are left out: every
    frame matches there, and a uniform target would flatten the attention everywhere.
    """
    n, f = x0.shape[:2]
    pooled = F.adaptive_avg_pool2d(x0.flatten(0, 1), side).view(n, f, -1, side, side)
    tokens = pooled.permute(0, 3, 4, 1, 2).reshape(n * side * side, f, -1)
    dist = torch.cdist(tokens, tokens).square()
    return (-dist / tau).softmax(dim=-1), dist.amax(dim=(1, 2)) > CORRESPONDENCE_MOVING


def correspondence_loss(probs: dict[str, torch.Tensor], x0: torch.Tensor,
                        videos: torch.Tensor | None = None) -> torch.Tensor:
    """KL divergence of each captured temporal attention [positions, heads, F, F] (positions =
    videos x H x W) from correspondence_targets on the moving tokens (of the `videos` marked True),
    averaged over layers, heads and rows."""
    losses = []
    for p in probs.values():
        side = math.isqrt(p.shape[0] // x0.shape[0])
        target, moving = correspondence_targets(x0, side)
        if videos is not None:
            moving = moving & videos.repeat_interleave(side * side)
        if not moving.any():
            continue
        target, p = target[moving][:, None], p[moving].float()
        losses.append((target * (target.clamp_min(1e-8).log() - p.clamp_min(1e-8).log())).sum(-1).mean())
    return torch.stack(losses).mean() if losses else x0.new_zeros(())


def frame_difference_loss(pred: torch.Tensor, target: torch.Tensor, n_frames: int) -> torch.Tensor:
    """MSE of consecutive-frame differences of prediction and target ([videos x F, C, H, W]).

    Motion is the part of a clip that differs between frames, a small share of the per-frame target, so
    plain MSE barely rewards getting it right; this term weights it on its own.
    """
    p, t = pred.unflatten(0, (-1, n_frames)), target.unflatten(0, (-1, n_frames))
    return F.mse_loss(p.diff(dim=1), t.diff(dim=1))


def train_motion(args, ck: Checkpoints, latents: torch.Tensor, labels: list[str], unet_sd, clip_sd):
    from motionclone.motion_core.attention_capture import CaptureState
    from motionclone.motion_core.guided_sampling import attention_layers_of, select_layers
    from motionclone.motion_core.injection import CAPTURE_KEY
    from motionclone.motion_core.schedule import sd15_alphas_cumprod

    recipe = MOTION_RECIPES[args.motion_recipe]
    stage = stage_name(args, "motion")
    done = ck.load(stage)
    if done is not None:
        log("motion: loaded finished stage")
        return done["adapter"], done["unet"]
    adapter = new_adapter(args.seed)
    if recipe.init_from is not None:  # a continuation: start from that recipe's finished stage
        base = argparse.Namespace(**{**vars(args), "motion_recipe": recipe.init_from})
        if not args.quick:
            base.steps = {**args.steps, "motion": MOTION_RECIPES[recipe.init_from].steps}
        base_adapter, unet_sd = train_motion(base, ck, latents, labels, unet_sd, clip_sd)
        adapter.load_state_dict(base_adapter)
        log(f"motion: continuing {stage_name(base, 'motion')} as {stage}")
    if recipe.position_free:
        zeroed = [n for n, _ in adapter.named_buffers() if n.startswith(recipe.position_free + ".") and
                  n.endswith("pos_embed.pe")]
        for name in zeroed:
            adapter.get_buffer(name).zero_()
        log(f"motion: zero position encoding in {len(zeroed)} motion modules under {recipe.position_free}")
    total, start = args.steps["motion"], 0
    partial = ck.load(f"{stage}_partial")
    patched = motion_model(unet_sd, adapter)
    unet = patched.model.diffusion_model
    mm_params = list(adapter.parameters())
    mm_ids = {id(p) for p in mm_params}
    unet_params = [p for p in unet.parameters() if id(p) not in mm_ids]  # the image UNet's own weights
    # "joint*" fine-tune the image UNet too, at a lower rate. Frozen (AnimateDiff style, "frozen"),
    # this tiny UNet leaves the module little to work with: its features mix each frame's own noise
    # (which the eps output must keep) with the content (which frames should share), and x0
    # predictions stayed barely more consistent across frames than independent ones.
    unet.requires_grad_(False)
    groups = [{"params": mm_params, "base_lr": recipe.mm_lr}]
    if recipe.unet_lr > 0:
        groups.append({"params": unet_params, "base_lr": recipe.unet_lr})
        for p in unet_params:
            p.requires_grad_(True)
    adapter.train().requires_grad_(True)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=recipe.mm_lr, weight_decay=0.01)
    ema = EMA(params, decay=recipe.ema)
    if partial is not None:
        adapter.load_state_dict(partial["adapter"])
        unet_state = {k: v for k, v in partial["unet"].items()}
        _load_unet_only(unet, unet_state)
        opt.load_state_dict(partial["opt"])
        ema.shadow = list(partial["ema"])
        start = partial["step"]
        log(f"motion: resuming at step {start}")
    text = TextEncoder(clip_sd, args.seed)
    with torch.no_grad():
        cache = {t: text.encode([t])[0] for t in sorted(set(labels)) + [""]}  # frozen encoder: encode once
    options = patched.model_options["transformer_options"]
    attn_layers = select_layers(attention_layers_of(patched), CORRESPONDENCE_LAYERS) if recipe.attn_weight else []
    abar = sd15_alphas_cumprod()
    n_clips = latents.shape[0]
    progress = Progress("motion", start, total)
    stage_id = 4 if recipe.init_from is None else 5  # a continuation draws new batches
    for step in range(start, total):
        rng, gen = step_rng(args.seed, stage_id, step), step_gen(args.seed, stage_id, step)
        # Alternate one 16-frame clip and two 8-frame clips (every other frame, or a contiguous half):
        # 16 latent frames per step either way, both clip lengths and two speeds seen.
        if step % 2 == 0:
            ci = rng.integers(n_clips, size=1)
            x0 = latents[int(ci[0])].float()[None]
        else:
            ci = rng.integers(n_clips, size=2)
            subs = []
            for c in ci:
                mode = int(rng.integers(3))
                clip_lat = latents[int(c)].float()
                subs.append(clip_lat[::2] if mode == 0 else clip_lat[:8] if mode == 1 else clip_lat[8:])
            x0 = torch.stack(subs)
        n_vid, n_frames = x0.shape[:2]
        texts = ["" if rng.random() < args.uncond_p else labels[c] for c in ci]
        t = sample_timesteps(gen, n_vid)  # one timestep per video, as AnimateDiff
        if recipe.high_t:  # 3 in 4 from t >= 400, where frames must agree on layout and colours
            t = torch.where(torch.rand(n_vid, generator=gen) < 0.25, t, 400 + (t * 3) // 5)
        noise = torch.randn(x0.shape, generator=gen)
        xt = noised(x0, t, noise, abar).flatten(0, 1)
        tt = t.repeat_interleave(n_frames).float()
        context = torch.stack([cache[s] for s in texts]).repeat_interleave(n_frames, dim=0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, g["base_lr"])
        # cond_or_uncond has one entry per video: the motion layers split the batch into videos by it.
        step_options = {**options, "cond_or_uncond": [0] * n_vid}
        if attn_layers:
            step_options[CAPTURE_KEY] = capture = CaptureState(attn_layers)
        pred = unet(xt, tt, context, transformer_options=step_options)
        target = diffusion_target(x0, noise, t, abar, args.prediction).flatten(0, 1)
        if recipe.max_weight is None:
            loss = F.mse_loss(pred, target)
        else:
            # eps-MSE weighted towards x0-MSE (1/SNR, clamped): at high noise a small eps error is a
            # large error in the frame being formed, and plain eps-MSE hardly rewards consistent frames.
            a_t = abar[t].float()
            weight = ((1 - a_t) / a_t).clamp(1.0, recipe.max_weight).repeat_interleave(n_frames)
            per_frame = (pred - target).square().mean(dim=(1, 2, 3))
            loss = (weight * per_frame).mean() / weight.mean()
        if attn_layers:
            loss = loss + recipe.attn_weight * correspondence_loss(capture.probs, x0, t < recipe.attn_max_t)
        if recipe.diff_weight:
            loss = loss + recipe.diff_weight * frame_difference_loss(pred, target, n_frames)
        optimiser_step(opt, loss, params)
        ema.update(step)
        if progress.update(step, loss.item()):
            progress.log(step, f"frames {n_vid}x{n_frames} loss {loss.item():.4f} (avg {progress.avg:.4f})")
        if (step + 1) % 250 == 0 and step + 1 < total:
            ck.save(f"{stage}_partial", {"adapter": adapter.state_dict(), "unet": _unet_only(unet),
                                       "opt": opt.state_dict(), "ema": ema.shadow, "step": step + 1})
    with torch.no_grad():
        for s, p in zip(ema.shadow, ema.params):
            p.copy_(s)
    out = {"adapter": fp16_round(adapter.state_dict()), "unet": fp16_round(_unet_only(unet)),
           "final_loss_avg": progress.avg}
    ck.save(stage, out)
    return out["adapter"], out["unet"]


def _unet_only(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The image UNet's state dict from the patched UNet (injected motion layers left out, original keys)."""
    from motionclone.motion_core.unet_layout import MOTION_MODULE_CHILD

    return {k: v.detach().clone() for k, v in unet.state_dict().items() if f".{MOTION_MODULE_CHILD}." not in k}


def _load_unet_only(unet: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        own = unet.state_dict()
        for k, v in sd.items():
            own[k].copy_(v)


# --- stage: export and check ----------------------------------------------------------------------


def export(args, ck: Checkpoints, vae_sd, unet_sd, clip_sd, adapter_sd, t_start: float) -> None:
    import comfy.sd
    import safetensors.torch

    from motionclone.motion_core import compact_checkpoint as cc
    from motionclone.motion_core.motion_module import from_diffusers_state_dict
    from motionclone.motion_core.tiny_models import build_tiny_sd15_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = architecture(args.prediction)
    model = build_tiny_sd15_model(unet_config=arch["unet"], state_dict=unet_sd, prediction=args.prediction)
    clip = cc.build_clip(arch["clip"], None)
    cc.clip_text_model(clip).transformer.text_model.load_state_dict(clip_sd)
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": copy.deepcopy(arch["vae"])})
    ckpt_path = out / args.ckpt_name
    cc.save_compact_checkpoint(ckpt_path, model, clip, vae, arch, dtype=torch.float16)
    mm = from_diffusers_state_dict({k: v.detach().clone().contiguous() for k, v in adapter_sd.items()})
    mm = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in mm.items()}
    mm_path = out / args.mm_name
    safetensors.torch.save_file(mm, str(mm_path), metadata={"motionclone.demo": "AnimateDiff-format motion module "
                                                            "trained on procedural clips; see MODEL_CARD.md"})
    summary = {
        "seed": args.seed,
        "steps": args.steps,
        "losses": {name: (ck.load(name) or {}).get("final_loss_avg")
                   for name in (stage_name(args, "image"), stage_name(args, "motion"))},
        "files": {p.name: p.stat().st_size for p in (ckpt_path, mm_path)},
        "wall_time_s": round(time.monotonic() - t_start, 1),
    }
    log(f"export: {json.dumps(summary)}")
    (ck.work / "summary.json").write_text(json.dumps(summary, indent=2))
    check_shipped(ckpt_path, mm_path, ck.work)


def sample_frames(model, clip, vae, text: str, frames: int, seed: int, steps: int = 20, cfg: float = 7.0):
    """KSampler (euler, normal) through ComfyUI's own sampling; returns decoded frames [F, H, W, 3] in [0, 1]."""
    import comfy.sample

    latent = torch.zeros(frames, 4, SIZE // 8, SIZE // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    samples = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, disable_pbar=True,
                                  seed=seed)
    return vae.decode(samples)


@torch.no_grad()
def check_shipped(ckpt_path: Path, mm_path: Path, work: Path) -> None:
    """Reload the shipped files through the pack's loaders, sample, report simple statistics."""
    import cv2

    from motionclone.motion_core.compact_checkpoint import load_compact_checkpoint
    from motionclone.motion_core.injection import apply_motion_modules, install_processors
    from motionclone.motion_core.motion_module import load_motion_adapter

    model, clip, vae = load_compact_checkpoint(ckpt_path)
    adapter, info = load_motion_adapter(mm_path)
    video_model = apply_motion_modules(model, adapter, info, install_processors(adapter))
    rows = []
    for i, text in enumerate(["red circle", "blue square", "yellow star", "green triangle", "white cross"]):
        vid = sample_frames(video_model, clip, vae, text, 8, seed=100 + i)
        img = sample_frames(model, clip, vae, text, 8, seed=100 + i)
        mad_vid = (vid[1:] - vid[:-1]).abs().mean().item()
        mad_img = (img[1:] - img[:-1]).abs().mean().item()
        log(f"check '{text}': consecutive-frame mean abs diff with motion module {mad_vid:.4f}, "
            f"image model alone (independent frames) {mad_img:.4f}")
        rows.append(torch.cat(list(vid), dim=1))
        rows.append(torch.cat(list(img), dim=1))
    grid = (torch.cat(rows, dim=0).numpy() * 255).round().astype(np.uint8)
    cv2.imwrite(str(work / "samples.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    log(f"check: sample grid (rows: video, independent images) written to {work / 'samples.png'}")


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None,
                   help="output folder (default: demo_model/ for the default settings, else <work>/<stage>_out)")
    p.add_argument("--work", default=str(ROOT / ".dev" / "demo_training"), help="checkpoints (default %(default)s)")
    p.add_argument("--ckpt-name", default="motionclone_demo_sd15.safetensors")
    p.add_argument("--mm-name", default="motionclone_demo_mm.safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--clips", type=int, default=DATASET_CLIPS, help="dataset clips (16 frames each)")
    p.add_argument("--lr", type=float, default=5e-4, help="UNet + text encoder")
    p.add_argument("--motion-recipe", choices=sorted(MOTION_RECIPES), default=DEFAULT_RECIPE,
                   help="motion-stage settings (default %(default)s: the shipped motion module)")
    p.add_argument("--prediction", choices=("eps", "v"), default=DEFAULT_PREDICTION,
                   help="UNet parameterisation (default %(default)s); the image and motion stages of a v run are "
                        "kept apart from the eps ones")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4, help="KL weight (per latent element, vs per-pixel MSE)")
    p.add_argument("--vae-low", type=float, default=4.0, help="weight of the 8x8-pooled colour MSE")
    p.add_argument("--uncond-p", type=float, default=0.1, help="label dropout (empty prompt) for CFG")
    p.add_argument("--quick", action="store_true", help="a few steps per stage into <work>/quick: pipeline check")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or str(ROOT / ".dev" / "ComfyUI"))
    args = p.parse_args(argv)
    args.steps = default_steps(args.motion_recipe)
    if args.out is None:
        shipped = args.motion_recipe == DEFAULT_RECIPE and args.prediction == DEFAULT_PREDICTION
        args.out = str(ROOT / "demo_model") if shipped else \
            str(Path(args.work) / f"{stage_name(args, 'motion')}_out")
    if args.quick:
        args.steps = {"vae_crop": 20, "vae_full": 4, "image": 20, "motion": 20}
        args.clips = 8
        args.work = str(Path(args.work) / "quick")
        args.out = str(Path(args.work) / "out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    setup_host(Path(args.comfyui))
    t_start = time.monotonic()
    log(f"training demo model: seed {args.seed}, steps {args.steps}, {args.clips} clips, threads {args.threads}")
    ck = Checkpoints(Path(args.work))
    vae_sd = train_vae(args, ck)
    latents, labels = encode_dataset(args, ck, vae_sd)
    unet_sd, clip_sd = train_image(args, ck, latents, labels)
    adapter_sd, unet_sd = train_motion(args, ck, latents, labels, unet_sd, clip_sd)
    export(args, ck, vae_sd, unet_sd, clip_sd, adapter_sd, t_start)
    log(f"done in {time.monotonic() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
