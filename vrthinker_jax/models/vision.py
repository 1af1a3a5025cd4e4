"""Qwen2.5-VL vision tower: patch embedding, window / full attention blocks, 2x2 merger.

All index bookkeeping (window reordering, attention segments, 2D rotary coordinates) is computed
on the host with numpy from the static `grid_thw`, so the device code is a fixed sequence of
gathers and dense ops. Attention is restricted to segments (a window of one frame, or a whole
frame for the full-attention blocks) by gathering each segment into a padded block
[n_segments, max_len]: cost is O(tokens * max_len), not O(tokens^2), and K same-size frames give
K * windows identical blocks with no padding waste.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vrthinker_jax.models import rope as rope_lib
from vrthinker_jax.models.layers import Dense, RMSNorm, dtype_of, masked_softmax, param


@dataclasses.dataclass(frozen=True)
class Segments:
    """Attention segments over the reordered patch sequence of length n.

    idx: int32 [n_seg, max_len] patch index per slot (n = an all-zero padding row);
    valid: bool [n_seg, max_len]; inv: int32 [n] flat slot (seg * max_len + offset) of each patch.
    """

    idx: np.ndarray
    valid: np.ndarray
    inv: np.ndarray


@dataclasses.dataclass(frozen=True)
class VisionPlan:
    """Host-side indices for one static grid_thw.

    perm: int32 [n] original patch index of each reordered slot (window order);
    hw: int32 [n, 2] (row, col) rotary coordinates of each reordered patch;
    unperm: int32 [n / merge^2] merged token order -> window order (undoes the reordering);
    window, full: Segments for windowed and full-attention blocks.
    """

    perm: np.ndarray
    hw: np.ndarray
    unperm: np.ndarray
    window: Segments
    full: Segments


def _segments(lengths: list[int]) -> Segments:
    lengths = [int(x) for x in lengths if x > 0]
    n = sum(lengths)
    width = max(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    off = np.arange(width)
    valid = off[None, :] < np.asarray(lengths)[:, None]
    idx = np.where(valid, starts[:, None] + off[None, :], n).astype(np.int32)
    inv = np.zeros(n, np.int32)
    for s, (st, ln) in enumerate(zip(starts, lengths)):
        inv[st: st + ln] = s * width + np.arange(ln)
    return Segments(idx, valid, inv)


@functools.lru_cache(maxsize=128)
def vision_plan(grid_thw: tuple, merge: int, window_size: int, patch_size: int) -> VisionPlan:
    """Indices for a static tuple of (t, h, w) grids (items in order), like transformers'
    get_vision_window_index / get_vision_position_ids / get_vision_cu_seqlens."""
    unit = merge * merge
    win = window_size // merge // patch_size  # window side in merge groups
    window_index, win_lens, full_lens, hw = [], [], [], []
    offset = 0
    for t, h, w in grid_thw:
        t, h, w = int(t), int(h), int(w)
        if h % merge or w % merge:
            raise ValueError(f"vision: grid {(t, h, w)} not divisible by merge size {merge}")
        lh, lw = h // merge, w // merge
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = -lh % win, -lw % win
        padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
        nh, nw = (lh + ph) // win, (lw + pw) // win
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, win * win)
        win_lens += ((padded >= 0).sum(-1).reshape(-1) * unit).tolist()
        flat = padded.reshape(-1)
        window_index.append(flat[flat >= 0] + offset)
        offset += t * lh * lw
        full_lens += [h * w] * t
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blk = (lh, merge, lw, merge)
        hh = hh.reshape(blk).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(blk).transpose(0, 2, 1, 3).reshape(-1)
        hw.append(np.tile(np.stack([hh, ww], -1), (t, 1)))
    wi = np.concatenate(window_index)
    perm = (wi[:, None] * unit + np.arange(unit)[None]).reshape(-1)
    hw_all = np.concatenate(hw)[perm]
    # Window reordering keeps frames contiguous, so frame segments stay in frame order.
    return VisionPlan(perm.astype(np.int32), hw_all.astype(np.int32),
                      np.argsort(wi).astype(np.int32), _segments(win_lens),
                      _segments(full_lens))


def segment_attention(q, k, v, seg: Segments, scale: float):
    """Non-causal attention inside each segment.

    q, k, v: [n, heads, head_dim]; returns [n, heads, head_dim] in v.dtype.
    """
    def blocks(x):
        x = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)
        return x[seg.idx]  # [n_seg, L, heads, head_dim]

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    s = jnp.einsum("bqhd,bkhd->bhqk", qb, kb, preferred_element_type=jnp.float32) * scale
    p = masked_softmax(s, jnp.asarray(seg.valid)[:, None, None, :]).astype(v.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, vb)
    n_seg, width = seg.idx.shape
    return o.reshape(n_seg * width, *o.shape[2:])[seg.inv]


class VisionBlock(nnx.Module):
    """x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x)) over the packed patch sequence [n, hidden]."""

    def __init__(self, vc, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h, f = vc.hidden_size, vc.num_heads, vc.intermediate_size
        self.num_heads = h
        self.head_dim = d // h
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(d, vc.rms_norm_eps, **kw)
        self.norm2 = RMSNorm(d, vc.rms_norm_eps, **kw)
        # fused qkv: [hidden, 3, heads, head_dim] (transformers' qkv rows split the same way)
        self.qkv_kernel = param(rngs, (d, 3, h, d // h), ("embed", None, "heads", "head_dim"),
                                param_dtype)
        self.qkv_bias = param(None, (3, h, d // h), (None, "heads", "head_dim"), param_dtype,
                              "zeros")
        self.proj_kernel = param(rngs, (h, d // h, d), ("heads", "head_dim", "embed"),
                                 param_dtype)
        self.proj_bias = param(None, (d,), ("embed",), param_dtype, "zeros")
        self.gate = Dense(d, f, ("embed", "mlp"), bias=True, rngs=rngs, **kw)
        self.up = Dense(d, f, ("embed", "mlp"), bias=True, rngs=rngs, **kw)
        self.down = Dense(f, d, ("mlp", "embed"), bias=True, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, seg: Segments):
        dt = self.dtype
        y = self.norm1(x)
        qkv = jnp.einsum("nd,dthk->tnhk", y, self.qkv_kernel[...].astype(dt))
        qkv = qkv + self.qkv_bias[...].astype(dt)[:, None]
        q, k, v = qkv[0], qkv[1], qkv[2]
        # rotary in float32 like the reference, then back to the compute dtype
        c, s = cos[:, None, :], sin[:, None, :]
        q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
        q = (q32 * c + rope_lib.rotate_half(q32) * s).astype(dt)
        k = (k32 * c + rope_lib.rotate_half(k32) * s).astype(dt)
        o = segment_attention(q, k, v, seg, self.head_dim ** -0.5)
        o = jnp.einsum("nhk,hkd->nd", o, self.proj_kernel[...].astype(dt))
        x = x + o + self.proj_bias[...].astype(dt)
        y = self.norm2(x)
        return x + self.down(jax.nn.silu(self.gate(y)) * self.up(y))


class PatchMerger(nnx.Module):
    """RMSNorm, group merge^2 consecutive patches, Linear-GELU-Linear to the text width."""

    def __init__(self, vc, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = vc.hidden_size * vc.spatial_merge_size ** 2
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.ln_q = RMSNorm(vc.hidden_size, vc.rms_norm_eps, **kw)
        self.fc1 = Dense(d, d, (None, "mlp"), bias=True, rngs=rngs, **kw)
        self.fc2 = Dense(d, vc.out_hidden_size, ("mlp", "embed"), bias=True, rngs=rngs, **kw)
        self.width = d

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, self.width)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    """Pixel patches [n, C*T*P*P] + static grid -> visual tokens [n / merge^2, text hidden]."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        vc = ml_collections.FrozenConfigDict(cfg.vision)
        self.vc = vc
        dtype, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dtype
        self.remat = bool(cfg.remat)
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        # Conv3d with kernel == stride over one patch == a linear map of the flattened patch.
        # replicated (1.5 M params at 7B): split over fsdp by its output, its gradient made XLA
        # all-gather every row's pixel patches (4.4 GB per chip on the 7B learner, v5e-256)
        self.patch_embed = Dense(patch_dim, vc.hidden_size, (None, None), bias=False,
                                 dtype=dtype, param_dtype=pdt, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(vc, dtype=dtype, param_dtype=pdt, rngs=rngs)
                                for _ in range(vc.depth)])
        self.merger = PatchMerger(vc, dtype=dtype, param_dtype=pdt, rngs=rngs)

    def plan(self, grid_thw) -> VisionPlan:
        grid = tuple(tuple(int(x) for x in g) for g in np.asarray(grid_thw).reshape(-1, 3))
        vc = self.vc
        return vision_plan(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)

    def rotary(self, hw: np.ndarray):
        """cos, sin [n, head_dim] float32 of the 2D rotary embedding for (row, col) coords."""
        hd = self.vc.hidden_size // self.vc.num_heads
        half = hd // 2
        inv = 1.0 / (self.vc.rope_theta ** (np.arange(0, half, 2, dtype=np.float32) / half))
        f = jnp.asarray(hw, jnp.float32)[:, :, None] * jnp.asarray(inv, jnp.float32)
        f = f.reshape(f.shape[0], -1)  # [n, half]: rows' freqs then cols' freqs
        emb = jnp.concatenate([f, f], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)

    def __call__(self, pixel_values, grid_thw, constrain=None):
        """constrain: optional [n, hidden] -> same, applied to the patch stream after the
        embedding and every block (the training step's sharding constraint)."""
        pin = constrain or (lambda x: x)
        plan = self.plan(grid_thw)
        n = int(plan.perm.shape[0])
        if pixel_values.shape[0] != n:
            raise ValueError(f"vision: pixel_values has {pixel_values.shape[0]} patches, grid_thw "
                             f"implies {n}")
        x = pin(self.patch_embed(pixel_values.astype(self.dtype))[plan.perm])
        cos, sin = self.rotary(plan.hw)
        full = set(int(i) for i in self.vc.fullatt_block_indexes)

        def runner(seg):
            # segments are static numpy indices: close over them instead of passing them through
            def run(blk, x, cos, sin):
                return blk(x, cos, sin, seg)

            return nnx.remat(run) if self.remat else run

        run_full, run_window = runner(plan.full), runner(plan.window)
        for i, blk in enumerate(self.blocks):
            x = pin((run_full if i in full else run_window)(blk, x, cos, sin))
        return self.merger(x)[plan.unperm]
