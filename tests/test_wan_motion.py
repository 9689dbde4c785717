"""Motion transfer on Wan 2.1, phase 1: the AMF core on a tiny native ComfyUI Wan (no nodes yet).

Follows the test plan of the method notes (dit-motion-transfer-method.md, section 6, items 1-6):
token layout of the captured q/k, AMF parity with a literal dense DiTFlow restatement, the loss, a
synthetic translation, gradients (gradcheck, through the model, the in_training trap) and memory
(largest tensor and peak while streaming). Everything runs on the CPU in a few seconds.
"""

from __future__ import annotations

import math

import comfy.model_management
import comfyui_version
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from motionclone.motion_core.dit import amf
from motionclone.motion_core.dit.wan_capture import (
    CAPTURE_KEY,
    capture_qk,
    host_has_wan_attn1_patch,
    resolve_method,
)
from motionclone.motion_core.dit.wan_tiny import build_tiny_wan, tiny_wan_inputs

HOST = tuple(int(p) for p in comfyui_version.__version__.split(".")[:3])
ATTN1_HOST = HOST >= (0, 33, 0)  # Wan attn1 patches (with q, k) and block_index arrived by 0.33
HAS_IN_TRAINING = hasattr(comfy.model_management, "in_training")


@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan(seed=0)


def _routes() -> list[str]:
    return ["hook", "attn1_patch"] if ATTN1_HOST else ["hook"]


# --- a literal restatement of DiTFlow's AMF: the full [N, N] map, per-head logits, explicit softmax ----------

def ditflow_dense_amf(q, k, grid, pairs, tau, mode):
    frames, h, w = grid
    hw = h * w
    tokens = frames * hw
    d = q.shape[3]
    index = torch.arange(hw)
    col, row = index % w, index // w
    videos = []
    for b in range(q.shape[0]):
        qh = q[b, :tokens].permute(1, 0, 2)  # [heads, N, d]
        kh = k[b, :tokens].permute(1, 0, 2)
        full = (qh @ kh.transpose(1, 2) / math.sqrt(d)).mean(dim=0)  # [N, N], head mean before softmax
        flows = []
        for i, j in pairs:
            block = tau * full[i * hw:(i + 1) * hw, j * hw:(j + 1) * hw]
            e = torch.exp(block - block.max(dim=-1, keepdim=True).values)
            p = e / e.sum(dim=-1, keepdim=True)
            if mode == "argmax":
                best = p.argmax(dim=-1)
                flows.append(torch.stack([col[best] - col, row[best] - row], dim=-1))
            else:
                flows.append(torch.stack([(p * col).sum(-1) - col, (p * row).sum(-1) - row], dim=-1))
        videos.append(torch.stack(flows))
    return torch.stack(videos)


def random_qk(grid, heads=3, d=5, batch=1, dtype=torch.float64, seed=0, extra_tokens=0):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid) + extra_tokens
    return (torch.randn(batch, n, heads, d, generator=g, dtype=dtype),
            torch.randn(batch, n, heads, d, generator=g, dtype=dtype))


# --- 0: pairs ------------------------------------------------------------------------------------------

def test_frame_pairs():
    assert amf.frame_pairs(3) == [(i, j) for i in range(3) for j in range(3)]
    assert len(amf.frame_pairs(21, span=4)) == 78  # FastVMT at 81 frames: 21 self + 57 forward
    assert amf.frame_pairs(4, span=2) == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3)]
    assert amf.frame_pairs(1) == amf.frame_pairs(1, span=4) == [(0, 0)]
    with pytest.raises(ValueError):
        amf.frame_pairs(3, span=0)
    q, k = random_qk((2, 2, 2))
    with pytest.raises(ValueError, match="outside"):
        amf.soft_amf(q, k, (2, 2, 2), [(0, 2)])
    with pytest.raises(ValueError, match="fewer than the grid"):
        amf.soft_amf(q, k, (3, 2, 2))


# --- 1: layout ------------------------------------------------------------------------------------------

def independent_qk(self_attn, x, grid):
    """q, k from the block's input without ComfyUI code: linear, RMSNorm, 3D RoPE [d-4(d//6), 2(d//6), 2(d//6)]
    on positions (frame, row, column) of token index f*h*w + r*w + c, all in float64."""
    frames, h, w = grid
    n, d = self_attn.num_heads, self_attn.head_dim
    x = x.double()
    index = torch.arange(frames * h * w)
    positions = [index // (h * w), index % (h * w) // w, index % w]
    split = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    angles = torch.cat([pos[:, None].double() * 10000.0 ** (-torch.arange(0, s, 2).double() / s)
                        for pos, s in zip(positions, split)], dim=-1)  # [S, d/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def project(linear, norm):
        y = x @ linear.weight.double().T + linear.bias.double()
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
        y = y.view(*y.shape[:2], n, d)
        even, odd = y[..., 0::2], y[..., 1::2]
        return torch.stack([cos * even - sin * odd, sin * even + cos * odd], dim=-1).flatten(-2)

    return project(self_attn.q, self_attn.norm_q), project(self_attn.k, self_attn.norm_k)


@pytest.mark.parametrize("route", _routes())
@pytest.mark.parametrize(("frames", "height", "width"), [(3, 8, 12), (1, 6, 10), (2, 7, 9)])
def test_captured_qk_match_independent_recomputation(wan, route, frames, height, width):
    block = 2
    x, t, ctx = tiny_wan_inputs(frames, height, width, seed=frames)
    seen = {}

    def keep_input(module, args, kwargs):
        seen["x"] = args[0]

    handle = wan.blocks[block].self_attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with torch.no_grad():
            state = capture_qk(wan, x, t, ctx, block, method=route)
    finally:
        handle.remove()
    grid = (frames, math.ceil(height / 2), math.ceil(width / 2))  # odd sizes are padded up to the patch
    assert state.grid == grid
    assert state.q.shape == state.k.shape == (1, math.prod(grid), 3, 16)
    q_ref, k_ref = independent_qk(wan.blocks[block].self_attn, seen["x"], grid)
    torch.testing.assert_close(state.q.double(), q_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(state.k.double(), k_ref, rtol=0, atol=2e-5)
    # a transposed grid (column-major tokens) would not match: the comparison can fail
    if grid[1] > 1 and grid[2] > 1:
        q_t, _ = independent_qk(wan.blocks[block].self_attn, seen["x"], (frames, grid[2], grid[1]))
        assert (state.q.double() - q_t).abs().max() > 1e-2


def test_routes_per_host(wan):
    assert host_has_wan_attn1_patch() == ATTN1_HOST
    assert resolve_method("auto") == ("attn1_patch" if ATTN1_HOST else "hook")
    if not ATTN1_HOST:
        with pytest.raises(ValueError, match="attn1"):
            resolve_method("attn1_patch")


@pytest.mark.skipif(not ATTN1_HOST, reason="ComfyUI < 0.33: Wan calls no attn1 patches, the hook is the only route")
def test_hook_and_attn1_patch_give_identical_qk(wan):
    x, t, ctx = tiny_wan_inputs(3, 8, 12, batch=2, seed=5)
    for block in (0, 3):
        with torch.no_grad():
            a = capture_qk(wan, x, t, ctx, block, method="hook", stop_after=False)
            b = capture_qk(wan, x, t, ctx, block, method="attn1_patch", stop_after=False)
        assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k)
        assert torch.equal(a.output, b.output)  # neither route changes the forward


@pytest.mark.parametrize("route", _routes())
def test_capture_leaves_forward_and_options_alone(wan, route):
    x, t, ctx = tiny_wan_inputs(seed=3)
    options = {"patches": {}}
    with torch.no_grad():
        plain = wan(x, t, ctx, transformer_options={})
        state = capture_qk(wan, x, t, ctx, 1, method=route, stop_after=False, transformer_options=options)
        stopped = capture_qk(wan, x, t, ctx, 1, method=route)
    assert torch.equal(state.output, plain)
    assert stopped.output is None and torch.equal(stopped.q, state.q)
    assert options == {"patches": {}} and CAPTURE_KEY not in options
    assert not wan.blocks[1].self_attn._forward_pre_hooks  # hook removed, also after StopForward
    if HAS_IN_TRAINING:
        assert comfy.model_management.in_training is False


# --- 2: AMF parity with the dense restatement --------------------------------------------------------------

@pytest.mark.parametrize(("grid", "span", "tau", "batch"), [
    ((3, 3, 4), None, 2.0, 1), ((4, 2, 5), 2, 1.0, 2), ((1, 3, 3), None, 3.5, 1), ((5, 3, 2), 4, 0.7, 1)])
def test_streamed_amf_equals_dense_ditflow(grid, span, tau, batch):
    q, k = random_qk(grid, batch=batch, seed=len(grid) + grid[0], extra_tokens=4)  # extra tokens are ignored
    pairs = amf.frame_pairs(grid[0], span)
    soft = amf.soft_amf(q, k, grid, pairs, tau=tau)
    dense_soft = ditflow_dense_amf(q, k, grid, pairs, tau, "soft")
    assert soft.shape == (batch, len(pairs), grid[1] * grid[2], 2)
    torch.testing.assert_close(soft, dense_soft, rtol=0, atol=1e-12)
    hard = amf.argmax_amf(q, k, grid, pairs)
    assert hard.dtype == torch.int16
    assert torch.equal(hard.long(), ditflow_dense_amf(q, k, grid, pairs, tau, "argmax"))
    # the per-head mean of the logits, not of the probabilities: the concatenation trick is exact
    qf, kf = q[:, :4].flatten(2), k[:, :6].flatten(2)
    per_head = torch.einsum("bpnd,bqnd->bnpq", q[:, :4], k[:, :6]).mean(1) / math.sqrt(q.shape[3])
    torch.testing.assert_close(amf.head_mean_logits(qf, kf, q.shape[2]), per_head, rtol=0, atol=1e-12)


def test_checkpointed_and_plain_streaming_agree():
    grid = (3, 3, 4)
    q, k = random_qk(grid, seed=9)
    ref = amf.argmax_amf(q + 0.5, k, grid)
    grads = []
    for ckpt in (True, False):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        amf.amf_loss(amf.soft_amf(qq, kk, grid, checkpoint=ckpt), ref).backward()
        grads.append((qq.grad, kk.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)


# --- 3: loss ------------------------------------------------------------------------------------------

def test_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    gen = torch.randn(2, 3, 4, 2, generator=g, dtype=torch.float64)
    ref = torch.tensor([[[0, 0], [1, 0], [0, -2], [0, 0]],
                        [[0, 0], [0, 0], [0, 0], [0, 0]],
                        [[3, 1], [0, 0], [0, 0], [-1, -1]]], dtype=torch.int16)
    total, count = 0.0, 0
    for b in range(2):
        for p in range(3):
            for t in range(4):
                if ref[p, t, 0] != 0 or ref[p, t, 1] != 0:
                    total += float((gen[b, p, t, 0] - ref[p, t, 0]) ** 2 + (gen[b, p, t, 1] - ref[p, t, 1]) ** 2)
                    count += 2
    assert count == 2 * 2 * 4
    assert amf.amf_loss(gen, ref).item() == pytest.approx(total / count, rel=1e-14)
    # a caller's region mask (here: token 3 only) combines with the motion mask
    region = torch.tensor([False, False, False, True])
    only = amf.amf_loss(gen, ref, amf.motion_mask(ref) & region)
    expected = ((gen[:, 2, 3] - torch.tensor([-1.0, -1.0], dtype=torch.float64)) ** 2).sum() / (2 * 2)
    assert only.item() == pytest.approx(expected.item(), rel=1e-14)
    with pytest.raises(ValueError, match="does not match"):
        amf.amf_loss(gen, ref[:, :3])


def test_static_reference_gives_zero_loss_not_nan():
    gen = torch.randn(1, 4, 6, 2, dtype=torch.float64, requires_grad=True)
    loss = amf.amf_loss(gen, torch.zeros(4, 6, 2, dtype=torch.int16))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(gen.grad, torch.zeros_like(gen))
    gen2 = gen.detach().clone().requires_grad_()
    ref = torch.ones(4, 6, 2, dtype=torch.int16)
    empty = amf.amf_loss(gen2, ref, torch.zeros(4, 6, dtype=torch.bool))
    assert empty.item() == 0.0 and not torch.isnan(empty)


# --- 4: synthetic motion ------------------------------------------------------------------------------

def test_translated_texture_gives_exact_displacement():
    """Content moves by (dx, dy) = (2, -1) tokens per frame: every token whose match stays inside the frame
    must get (j - i) * (dx, dy), column first. A sign or axis swap fails."""
    frames, h, w, dx, dy = 4, 6, 8, 2, -1
    margin = frames * 2
    g = torch.Generator().manual_seed(4)
    canvas = torch.nn.functional.normalize(
        torch.randn(h + 2 * margin, w + 2 * margin, 32, generator=g, dtype=torch.float64), dim=-1)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    video = torch.stack([canvas[rows - f * dy + margin, cols - f * dx + margin] for f in range(frames)])
    q = video.reshape(1, frames * h * w, 2, 16)  # two heads of 16
    grid, pairs = (frames, h, w), amf.frame_pairs(frames)
    hard = amf.argmax_amf(q, q, grid, pairs)[0].long()
    soft = amf.soft_amf(q, q, grid, pairs, tau=2000.0)[0]
    checked = 0
    for p, (i, j) in enumerate(pairs):
        want = torch.tensor([(j - i) * dx, (j - i) * dy])
        inside = ((cols + (j - i) * dx).clamp(0, w - 1) == cols + (j - i) * dx) & (
            (rows + (j - i) * dy).clamp(0, h - 1) == rows + (j - i) * dy)
        inside = inside.flatten()
        assert inside.any()
        assert torch.equal(hard[p][inside], want.expand(int(inside.sum()), 2))
        torch.testing.assert_close(soft[p][inside], want.double().expand(int(inside.sum()), 2), rtol=0, atol=1e-9)
        checked += int(inside.sum())
    assert checked > len(pairs) * h * w // 3


# --- 5: gradients -------------------------------------------------------------------------------------

@pytest.mark.single_host  # plain torch: host-independent
def test_gradcheck_soft_amf_and_loss():
    grid = (2, 2, 3)
    q, k = random_qk(grid, heads=2, d=3, seed=11)
    q.requires_grad_()
    k.requires_grad_()
    pairs = amf.frame_pairs(2, span=2)
    noise = torch.randn(q.shape, generator=torch.Generator().manual_seed(12), dtype=q.dtype)
    ref = amf.argmax_amf(q.detach() + noise, k.detach(), grid, pairs)
    assert amf.motion_mask(ref).any() and not amf.motion_mask(ref).all()  # the mask matters
    assert torch.autograd.gradcheck(lambda a, b: amf.soft_amf(a, b, grid, tau=2.0), (q, k))
    assert torch.autograd.gradcheck(lambda a, b: amf.amf_loss(amf.soft_amf(a, b, grid, pairs, tau=1.5), ref), (q, k))


def _guided_loss(wan, x, t, ctx, ref, block=2, **kwargs):
    state = capture_qk(wan, x, t, ctx, block, **kwargs)
    return amf.amf_loss(amf.soft_amf(state.q, state.k, state.grid, tau=2.0), ref)


@pytest.fixture(scope="module")
def reference(wan):
    """Argmax AMF of another 'video' at block 2: the target the guided latent is pulled towards."""
    x_ref, t, ctx = tiny_wan_inputs(seed=21)
    with torch.no_grad():
        state = capture_qk(wan, x_ref, t, ctx, 2)
    ref = amf.argmax_amf(state.q, state.k, state.grid)
    assert amf.motion_mask(ref).float().mean() > 0.3
    return ref


@pytest.mark.parametrize("route", _routes())
def test_gradient_reaches_latent_and_matches_finite_differences(wan, reference, route):
    x, t, ctx = tiny_wan_inputs(seed=22)
    latent = x.clone().requires_grad_()
    loss = _guided_loss(wan, latent, t, ctx, reference, method=route)
    loss.backward()
    grad = latent.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # truncated at the block vs the full forward: same loss, same gradient
    full = x.clone().requires_grad_()
    full_loss = _guided_loss(wan, full, t, ctx, reference, method=route, stop_after=False)
    full_loss.backward()
    assert full_loss.item() == loss.item()
    torch.testing.assert_close(full.grad, grad, rtol=0, atol=0)
    # directional derivative against a central difference (float32 model: loose tolerance)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    eps = 1e-2
    with torch.no_grad():
        up = _guided_loss(wan, x + eps * direction, t, ctx, reference, method=route, differentiable=True)
        down = _guided_loss(wan, x - eps * direction, t, ctx, reference, method=route, differentiable=True)
    numeric = (up - down).item() / (2 * eps)
    analytic = (grad * direction).sum().item()
    print(f"\n[wan grad {route}] dL/dx . v: autograd {analytic:.6f}, central difference {numeric:.6f}")
    assert abs(numeric) > 1e-4
    assert numeric == pytest.approx(analytic, rel=3e-2)


def test_in_training_trap(wan, reference):
    """ComfyUI 0.33 runs RoPE as a comfy_kitchen op without autograd formula unless in_training is set: a
    backward then raises. capture_qk sets the flag while grad is on (and restores it); 0.3.75 has plain-torch
    RoPE and no flag, so the gradient flows either way."""
    x, t, ctx = tiny_wan_inputs(seed=22)
    latent = x.clone().requires_grad_()
    loss = _guided_loss(wan, latent, t, ctx, reference, differentiable=False)
    if HAS_IN_TRAINING:
        assert comfy.model_management.in_training is False
        with pytest.raises(RuntimeError, match="autograd"):
            loss.backward()
    else:
        loss.backward()
        assert latent.grad.abs().sum() > 0
    latent = x.clone().requires_grad_()
    _guided_loss(wan, latent, t, ctx, reference).backward()  # the default: differentiable while grad is on
    assert latent.grad.abs().sum() > 0
    if HAS_IN_TRAINING:
        assert comfy.model_management.in_training is False


# --- 6: memory ----------------------------------------------------------------------------------------

class AllocationProbe(TorchDispatchMode):
    """Records the largest tensor any op creates and the peak of the bytes those ops hold at once.

    Storages are followed by weak reference (also those autograd keeps for the backward); views and
    tensors from before the probe (its `existing` argument) are not counted."""

    def __init__(self, existing=()):
        super().__init__()
        self.known = {StorageWeakRef(t.untyped_storage()) for t in existing}
        self.live: dict[StorageWeakRef, int] = {}
        self.peak = 0
        self.largest = 0
        self.largest_shape: tuple[int, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                ref = StorageWeakRef(t.untyped_storage())
                if ref in self.known or ref in self.live:
                    continue  # in-place / out= results, or storage from before the probe
                self.live[ref] = t.untyped_storage().nbytes()
                if t.numel() > self.largest:
                    self.largest, self.largest_shape = t.numel(), tuple(t.shape)
        self.live = {r: n for r, n in self.live.items() if not r.expired()}
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _streamed_step(q, k, grid, pairs, ref):
    amf.amf_loss(amf.soft_amf(q, k, grid, pairs), ref).backward()


def _unchecked_step(q, k, grid, pairs, ref):
    amf.amf_loss(amf.soft_amf(q, k, grid, pairs, checkpoint=False), ref).backward()


def _dense_step(q, k, grid, pairs, ref):
    amf.amf_loss(ditflow_dense_amf(q, k, grid, pairs, amf.DITFLOW_TAU, "soft"), ref).backward()


def _measure(step, grid, span, heads, d, seed=0):
    q, k = random_qk(grid, heads=heads, d=d, dtype=torch.float32, seed=seed)
    pairs = amf.frame_pairs(grid[0], span)
    noise = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    ref = amf.argmax_amf(q + 0.5 * noise, k, grid, pairs)
    q.requires_grad_()
    k.requires_grad_()
    probe = AllocationProbe(existing=(q, k, ref))
    with probe:
        step(q, k, grid, pairs, ref)
    assert q.grad is not None and k.grad.abs().sum() > 0
    return probe


@pytest.mark.single_host  # plain torch: host-independent
def test_largest_tensor_while_streaming_is_one_frame_pair_block():
    grid, hw = (4, 6, 8), 48
    tokens = 4 * hw
    probe = _measure(_streamed_step, grid, None, heads=1, d=8)
    print(f"\n[amf memory] largest tensor while streaming (forward + backward): {probe.largest_shape}; "
          f"HW^2 = {hw * hw}, N^2 = {tokens * tokens}")
    # q, k (1536 entries) and the AMF (16 pairs x 48 x 2) are smaller than one block here: the block is the max
    assert probe.largest == hw * hw
    dense = _measure(_dense_step, grid, None, heads=1, d=8)
    assert dense.largest >= tokens * tokens  # the probe does see an [N, N] map when there is one


@pytest.mark.single_host  # plain torch: host-independent
def test_streamed_peak_grows_linearly_in_frames_with_fixed_pair_span():
    """Fixed grid 6 x 8 and span 3: doubling the frames doubles tokens and pairs. The streamed peak (grads of
    q, k, the AMF, a few [HW, HW] blocks) at most doubles; the dense map grows ~4x; without checkpointing
    every pair's softmax block is kept for the backward."""
    figures = {}
    for frames in (8, 16):
        grid = (frames, 6, 8)
        streamed = _measure(_streamed_step, grid, 3, heads=2, d=8)
        unchecked = _measure(_unchecked_step, grid, 3, heads=2, d=8)
        dense = _measure(_dense_step, grid, 3, heads=2, d=8)
        figures[frames] = (streamed.peak, unchecked.peak, dense.peak, (frames * 48) ** 2 * 4)
    (s8, u8, d8, map8), (s16, u16, d16, map16) = figures[8], figures[16]
    blocks16 = len(amf.frame_pairs(16, 3)) * 48 * 48 * 4  # every pair's [HW, HW] softmax, float32
    print(f"\n[amf memory] peak bytes, grid F' x 6 x 8, span 3, 2 heads of 8, float32, forward + backward:\n"
          f"  F'=8  (N=384): streamed {s8:>9,}  no checkpoint {u8:>9,}  dense {d8:>10,}  one N^2 map {map8:>10,}\n"
          f"  F'=16 (N=768): streamed {s16:>9,}  no checkpoint {u16:>9,}  dense {d16:>10,}  one N^2 map {map16:>10,}\n"
          f"  ratio 16/8: streamed {s16 / s8:.2f}, dense {d16 / d8:.2f}")
    assert s16 / s8 <= 2.2
    assert d16 / d8 >= 3.3  # the measurement does detect quadratic growth
    assert s16 < map16 / 4
    assert s16 < blocks16 < u16  # checkpointing: the pairs' blocks are not all held for the backward

