"""Ahead-of-time fit planner: compiles the learner and rollout steps for a TPU topology on a CPU.

    python -m vrthinker_jax.tools.plan --config experiments/configs/grpo.py:7b --topology v5p-64 \
        [--out plan.md] [--config.optimizer.accum_steps=8 --config.mesh.ici.tensor=4 ...]

With `jax[tpu]` (libtpu) installed, `jax.experimental.topologies` describes the TPU slice (or
slices) without any TPU attached; the planner builds the model abstractly (`nnx.eval_shape`: no
7B parameter is ever materialised), shards it with `vrthinker_jax.sharding` over the config's mesh,
and lowers + compiles for that topology:

* the learner step: `train.steps.step_fn` ('grpo' for a GRPO config, else 'sft') at the learner
  micro-batch (GRPO: prompts_per_step x group_size / optimizer.accum_steps rows; SFT/RFT:
  data.batch_size / accum_steps) x data.seq_len tokens with data.max_frames frames per row;
* the rollout prefill: the engine's compiled `sampler.insert` for the prompt segment (the largest
  prompt bucket, the prompt's initial frames) into a max_len KV cache;
* the rollout decode: the engine's compiled `sampler.decode` (XLA's cost analysis counts its
  while-loop body once, i.e. one token for every row).

The rollout programs take the engine's own static shapes and state layout
(`vrthinker_jax/rollout/shapes.py`) at the stage's rows per engine call
(`shapes.rows_per_call`: GRPO grpo.rollout_batch, or prompts_per_step x group_size; RFT
data.batch_size // samples_per_prompt prompts x samples_per_prompt). The tool-response length
is measured with the config's `tokenizer` when it names one, else estimated.

For each it reports XLA's per-chip memory (arguments, temporaries, total vs the chip's HBM), the
compiled FLOPs against an analytic count, and a roofline step time and MFU from the chip's peak
bf16 FLOP/s and HBM bandwidth (a lower bound on time / upper bound on MFU: no communication, no
overlap losses). Nothing is installed at run time.

Exit status: 0 every program fits in HBM_BUDGET of a chip's HBM; 3 something does not (the plan
says which knob to turn; one line when XLA itself finds a program too large for HBM); 1 libtpu
is not installed; 2 bad input (topology, config, override).
`--only learner,decode` compiles a subset (each 7B compile takes minutes on a small CPU).

The eval rollout of a published checkpoint on small runtimes (Colab's v2-8, v5e-1, v6e-1):

    python -m vrthinker_jax.tools.plan --eval-rollout [--preset vr-thinker] [--size 7b] \
        [--topology v2-8,v5e-1,v6e-1] [--video-size 480x832] [--turn-tokens 300] [--turns 4] \
        [--rows mjbench_video=N] [--config.sampling.prefill_chunk=512 ...] [--compile]

walks one benchmark row through the preset's loop (prompt, turns, tool responses, the release's
truncate-and-re-prefill memory rule), then per runtime finds the rows per engine call that fit
(weights sharded by the sharding rules, KV cache, frame bank, the vision tower's and a prefill
pass's activations) and the roofline time per row and per benchmark: a table. This is analytic
(no libtpu needed); `--compile` also AOT-compiles the engine's inserts and decode at that batch
(docs/colab_tpu_plan.md). Exit status 3 when a runtime does not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import time

from vrthinker_jax import cli

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip. hbm_bytes: HBM capacity; peak_flops: dense bf16 FLOP/s; hbm_bw: bytes/s.

    devices_per_chip: JAX devices the chip shows (2 for v2/v3, whose two TensorCores are
    separate devices with half the chip's HBM each; 1 for megacore chips and v5e/v6e).
    """

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bw: float
    devices_per_chip: int = 1

    @property
    def device(self) -> Chip:
        """One JAX device's share of the chip: its HBM, FLOP/s and bandwidth split evenly over
        devices_per_chip (what every per-device number of a plan is measured against)."""
        d = self.devices_per_chip
        return Chip(f"{self.name} device", self.hbm_bytes // d, self.peak_flops / d,
                    self.hbm_bw / d)


# Per-chip numbers from Google Cloud's TPU system-architecture pages:
#   v5p: https://cloud.google.com/tpu/docs/v5p  (95 GB HBM2e, 459 bf16 TFLOP/s, 2765 GB/s)
#   v5e: https://cloud.google.com/tpu/docs/v5e  (16 GB HBM2, 197 bf16 TFLOP/s, 819 GB/s)
#   v6e: https://cloud.google.com/tpu/docs/v6e  (32 GB HBM, 918 bf16 TFLOP/s, 1640 GB/s)
#   v4:  https://cloud.google.com/tpu/docs/v4   (32 GiB HBM2, 275 bf16 TFLOP/s, 1228 GB/s)
#   v2:  https://cloud.google.com/tpu/docs/v2 gives no numbers and points to Jouppi et al., "A
#        Domain Specific Supercomputer for Training Deep Neural Networks" (CACM 2020,
#        https://dl.acm.org/doi/pdf/10.1145/3360307): 16 GiB HBM, 46 bf16 TFLOP/s and 700 GB/s
#        per chip; jax's own table (jax/_src/pallas/mosaic/tpu_info.py, TPU_V2) has 16e9 B,
#        4.6e13 FLOP/s and 7.16e11 B/s per chip, split over its 2 TensorCores (8 GiB each).
# HBM "GB" on those pages is GiB of usable memory as JAX reports it (v5e 16 GiB, v6e 32 GiB).
CHIPS = {
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9),
    "v4": Chip("v4", 32 * GIB, 275e12, 1228e9),
    "v2": Chip("v2", 16 * GIB, 46e12, 700e9, devices_per_chip=2),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice (Cloud TPU naming) -> jax topology string, slice count and chip type.

    Cloud names count TensorCores for v2/v4/v5p (2 per chip: v5p-64 = 32 chips, v2-8 = 4 chips)
    and chips for v5e/v6e (v5e-256 = 256 chips). host_chips: libtpu's chips-per-host bounds
    for slices smaller than its default host (a 1x1 slice); () = libtpu's default.
    """

    name: str
    jax_name: str  # `jax.experimental.topologies.get_topology_desc(topology_name=...)`
    num_slices: int
    chip: Chip
    host_chips: tuple[int, ...] = ()

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(x) for x in self.jax_name.split(":")[1].split("x"))

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def num_devices(self) -> int:
        return self.num_chips * self.chip.devices_per_chip


TOPOLOGIES = {
    t.name: t
    for t in (
        Topology("v5e-4", "v5e:2x2", 1, CHIPS["v5e"]),  # tests: the smallest v5e slice
        Topology("v4-32", "v4:2x2x4", 1, CHIPS["v4"]),
        Topology("v5p-64", "v5p:2x4x4", 1, CHIPS["v5p"]),
        Topology("v5p-128", "v5p:4x4x4", 1, CHIPS["v5p"]),
        Topology("v5p-256", "v5p:4x4x8", 1, CHIPS["v5p"]),
        Topology("v5e-256", "v5e:16x16", 1, CHIPS["v5e"]),
        Topology("2xv5e-256", "v5e:16x16", 2, CHIPS["v5e"]),  # multi-slice over DCN
        Topology("v6e-64", "v6e:8x8", 1, CHIPS["v6e"]),
        Topology("v6e-256", "v6e:16x16", 1, CHIPS["v6e"]),
        # Colab's TPU runtimes: one v2-8 board (4 chips, 8 TensorCores = 8 JAX devices), one
        # v5e chip, one v6e chip
        Topology("v2-8", "v2:2x2", 1, CHIPS["v2"]),
        Topology("v5e-1", "v5e:1x1", 1, CHIPS["v5e"], host_chips=(1, 1, 1)),
        Topology("v6e-1", "v6e:1x1", 1, CHIPS["v6e"], host_chips=(1, 1, 1)),
    )
}
COLAB_RUNTIMES = ("v2-8", "v5e-1", "v6e-1")

# the share of HBM a plan may use: XLA's estimate misses runtime buffers and fragmentation
HBM_BUDGET = 0.85


class PlanError(ValueError):
    """A bad planner input (unknown topology, config path, override)."""


class DoesNotFit(PlanError):
    """XLA could not fit a program in a chip's HBM (the CLI exits 3, as for a plan over budget)."""


def get_topology(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise PlanError(f"--topology: unknown {name!r}; known: {', '.join(sorted(TOPOLOGIES))}")
    return TOPOLOGIES[name]


# --------------------------------------------------------------------------- analytic model


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a Qwen2.5-VL config (all params; `*_matmul` excludes the embedding
    gather, norms and biases, i.e. what multiplies activations)."""

    text_layers: int  # decoder blocks, all params
    text_layers_matmul: int
    embed: int  # token embedding table
    lm_head: int  # separate head (0 when tied)
    head_matmul: int  # the logits matmul (the tied embedding or the head)
    vision: int  # vision tower + merger, all params
    vision_matmul: int

    @property
    def total(self) -> int:
        return self.text_layers + self.embed + self.lm_head + self.vision + self.final_norm

    final_norm: int = 0


def param_counts(model_cfg) -> ParamCounts:
    t, v = model_cfg.text, model_cfg.vision
    d, h, kv, hd, f = (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
                       t.intermediate_size)
    attn_mm = d * h * hd + 2 * d * kv * hd + h * hd * d
    mlp_mm = 3 * d * f
    layer_mm = attn_mm + mlp_mm
    layer = layer_mm + h * hd + 2 * kv * hd + 2 * d  # q/k/v biases, two RMSNorms
    vd, vf = v.hidden_size, v.intermediate_size
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    vblock_mm = 4 * vd * vd + 3 * vd * vf  # fused qkv + proj, gated MLP
    vblock = vblock_mm + 7 * vd + 2 * vf  # qkv/proj/MLP biases, two RMSNorms
    merged = vd * v.spatial_merge_size**2
    merger_mm = merged * merged + merged * v.out_hidden_size
    vision_mm = patch_dim * vd + v.depth * vblock_mm + merger_mm
    # + the merger's RMSNorm and its two biases
    vision = patch_dim * vd + v.depth * vblock + merger_mm + vd + merged + v.out_hidden_size
    vocab = t.vocab_size * d
    return ParamCounts(
        text_layers=t.num_hidden_layers * layer,
        text_layers_matmul=t.num_hidden_layers * layer_mm,
        embed=vocab,
        lm_head=0 if t.tie_word_embeddings else vocab,
        head_matmul=vocab,
        vision=vision,
        vision_matmul=vision_mm,
        final_norm=d,
    )


def vision_patches_per_frame(model_cfg, frame_size) -> int:
    p = model_cfg.vision.patch_size
    return (int(frame_size[0]) // p) * (int(frame_size[1]) // p)


def vision_attention_flops(model_cfg, frames: int, patches: int) -> float:
    """Forward FLOPs of the vision tower's attention for `frames` images of `patches` patches:
    full-attention blocks attend over the whole frame, the others within windows."""
    v = model_cfg.vision
    win = (v.window_size // v.patch_size) ** 2  # patches per window
    full = len(v.fullatt_block_indexes)
    per_frame = full * patches * patches + (v.depth - full) * patches * min(win, patches)
    return 4.0 * v.hidden_size * per_frame * frames


def _layers(model_cfg, layers):
    return model_cfg.text.num_hidden_layers if layers is None else layers


def attention_trips(model_cfg, q_len: int) -> int:
    """Iterations of the query-chunk loop in each decoder attention (`model.attn_query_chunk`);
    XLA's cost analysis counts the loop body once."""
    chunk = int(model_cfg.attn_query_chunk)
    return math.ceil(q_len / chunk) if 0 < chunk < q_len else 1


def head_trips(model_cfg, seq: int) -> int:
    """Iterations of the loss's vocabulary-projection loop (`model.lm_head_chunk`) over the
    seq - 1 predicted positions; XLA's cost analysis counts the loop body once."""
    chunk = int(model_cfg.lm_head_chunk)
    return math.ceil((seq - 1) / chunk) if 0 < chunk < seq - 1 else 1


def train_flops(model_cfg, *, batch: int, seq: int, frames: int, frame_size, remat: bool,
                layers: int | None = None, attn_trips: int = 1, lm_trips: int = 1) -> dict:
    """Analytic FLOPs of one training step (forward + backward) over `batch` rows of `seq` tokens
    with `frames` frames each. Returns {'model': 6ND + attention (the MFU numerator),
    'expected': what the compiled program should do (adds the remat recompute forward)}.

    Attention is counted dense over the whole [seq, seq] score matrix because that is what the
    model computes (the causal / memory-window mask is applied to the full scores).
    layers / attn_trips / lm_trips: count that many decoder layers, 1 / attn_trips of the
    attention and 1 / lm_trips of the vocabulary projection (what XLA reports for a scan over
    layers and loops over query and loss chunks).
    """
    n = param_counts(model_cfg)
    t = model_cfg.text
    nl = _layers(model_cfg, layers)
    tokens = batch * seq
    layer_mm = n.text_layers_matmul * nl // t.num_hidden_layers
    head_fwd = 2.0 * n.head_matmul * tokens / lm_trips
    text_fwd = 2.0 * layer_mm * tokens + head_fwd
    attn_fwd = 4.0 * nl * t.num_attention_heads * t.head_dim * seq * seq * batch / attn_trips
    patches = vision_patches_per_frame(model_cfg, frame_size)
    vis_fwd = (2.0 * n.vision_matmul * patches * frames * batch
               + vision_attention_flops(model_cfg, frames * batch, patches))
    fwd = text_fwd + attn_fwd + vis_fwd
    model = 3.0 * fwd
    # remat recomputes each block's forward in the backward pass; the head is recomputed only
    # when the loss projects it in checkpointed chunks
    chunked_head = head_trips(model_cfg, seq) > 1
    recompute = (fwd - (0.0 if chunked_head else head_fwd)) if remat else (
        head_fwd if chunked_head else 0.0)
    return {"model": model, "expected": model + recompute, "tokens": tokens}


def prefill_flops(model_cfg, *, batch: int, seg_len: int, kv_len: int, frames: int,
                  frame_size, layers: int | None = None, attn_trips: int = 1,
                  logit_positions: int = 1) -> dict:
    """Forward FLOPs of prefilling `seg_len` tokens per row attending over `kv_len` cache slots
    (layers / attn_trips as in `train_flops`), projecting `logit_positions` of them per row to
    the vocabulary (an insert projects only each row's last token: `sampler.insert`
    logits_at; a plain forward all seg_len)."""
    n = param_counts(model_cfg)
    t = model_cfg.text
    nl = _layers(model_cfg, layers)
    patches = vision_patches_per_frame(model_cfg, frame_size)
    fwd = (2.0 * (n.text_layers_matmul * nl // t.num_hidden_layers) * batch * seg_len
           + 2.0 * n.head_matmul * batch * logit_positions
           + 4.0 * nl * t.num_attention_heads * t.head_dim * seg_len * kv_len
           * batch / attn_trips
           + 2.0 * n.vision_matmul * patches * frames * batch
           + vision_attention_flops(model_cfg, frames * batch, patches))
    return {"model": fwd, "expected": fwd, "tokens": batch * seg_len}


def decode_flops(model_cfg, *, batch: int, kv_len: int, layers: int | None = None) -> dict:
    """One decode token per row: 2 x params + attention over the whole cache."""
    n = param_counts(model_cfg)
    t = model_cfg.text
    nl = _layers(model_cfg, layers)
    fwd = batch * (2.0 * (n.text_layers_matmul * nl // t.num_hidden_layers + n.head_matmul)
                   + 4.0 * nl * t.num_attention_heads * t.head_dim * kv_len)
    return {"model": fwd, "expected": fwd, "tokens": batch}


def kv_cache_bytes(model_cfg, *, batch: int, slots: int, dtype_bytes: int) -> int:
    t = model_cfg.text
    per_slot = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dtype_bytes
    return per_slot * batch * slots


def train_state_bytes(model_cfg, *, param_bytes: int, opt_bytes: int = 4) -> int:
    """Params + Adam's two moments (in `opt_bytes` each), all devices together."""
    n = param_counts(model_cfg).total
    return n * (param_bytes + 2 * opt_bytes)


# --------------------------------------------------------------------------- results and table


@dataclasses.dataclass
class StepPlan:
    """What one compiled program costs per chip."""

    name: str  # "learner (grpo)", "rollout prefill", "rollout decode"
    shape: str  # human description of the batch
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    flops_compiled: float  # per chip, from XLA's cost analysis
    flops_analytic: float  # per chip: the 'expected' analytic count / chips
    flops_model: float  # per chip: the MFU numerator (6ND + attention, or 2N per token)
    bytes_accessed: float  # per chip, from XLA's cost analysis
    peak_flops: float
    hbm_bw: float
    compile_s: float = 0.0
    note: str = ""

    @property
    def total_bytes(self) -> int:
        """Peak per-chip footprint: live arguments, outputs not aliased to a donated argument,
        temporaries and the program itself."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def hbm_fraction(self) -> float:
        return self.total_bytes / self.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.hbm_fraction <= HBM_BUDGET

    @property
    def time_compute(self) -> float:
        return self.flops_compiled / self.peak_flops

    @property
    def time_memory(self) -> float:
        return self.bytes_accessed / self.hbm_bw

    @property
    def step_time(self) -> float:
        """Roofline: the slower of compute and HBM traffic (no communication term)."""
        return max(self.time_compute, self.time_memory)

    @property
    def mfu(self) -> float:
        t = self.step_time
        return self.flops_model / (t * self.peak_flops) if t > 0 else 0.0

    @property
    def bound(self) -> str:
        return "compute" if self.time_compute >= self.time_memory else "memory"


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _flops(x: float) -> str:
    return f"{x:.3g}"


def _secs(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


TABLE_COLUMNS = ("step", "batch", "args GiB", "temp GiB", "total GiB", "HBM %", "fits",
                 "FLOPs/chip compiled", "FLOPs/chip analytic", "ratio", "roofline time",
                 "bound", "MFU est.")


def table_row(p: StepPlan) -> list[str]:
    ratio = p.flops_compiled / p.flops_analytic if p.flops_analytic else float("nan")
    return [p.name, p.shape, _gib(p.argument_bytes), _gib(p.temp_bytes), _gib(p.total_bytes),
            f"{100 * p.hbm_fraction:.1f}%", "yes" if p.fits else "**NO**",
            _flops(p.flops_compiled), _flops(p.flops_analytic), f"{ratio:.2f}",
            _secs(p.step_time), p.bound, f"{100 * p.mfu:.1f}%"]


def markdown_table(plans: list[StepPlan]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(table_row(p)) + " |" for p in plans]
    return "\n".join(lines)


def suggestions(plans: list[StepPlan], ctx: dict) -> list[str]:
    """Knobs to turn for each program that does not fit (most effective first)."""
    out = []
    for p in plans:
        if p.fits:
            continue
        over = p.total_bytes / (HBM_BUDGET * p.hbm_bytes)
        need = max(2, 2 ** math.ceil(math.log2(over)))
        head = f"{p.name} needs {_gib(p.total_bytes)} GiB/chip, {over:.1f}x the " \
               f"{int(HBM_BUDGET * 100)}% budget:"
        tips = _learner_tips(p, ctx, need) if p.name.startswith("learner") else [
            _rollout_tip(ctx, need)]
        out.append(head + " " + "; ".join(tips))
    return out


def _learner_tips(p: StepPlan, ctx: dict, need: int) -> list[str]:
    """What cuts a learner step that is `need` x too large."""
    tips = []
    if not ctx.get("remat"):
        tips.append("recompute blocks in the backward pass (--config.model.remat=True)")
    accum = ctx.get("accum", 1)
    max_accum = ctx.get("max_accum", accum * need)  # micro-batch >= the batch shards
    if p.temp_bytes > p.argument_bytes and accum < max_accum:
        tips.append(f"cut the learner micro-batch (--config.optimizer.accum_steps="
                    f"{min(accum * need, max_accum)}: activations scale with it)")
    if p.argument_bytes > 0.3 * p.hbm_bytes:
        tips.append("shard the state over more chips (mesh.ici.fsdp; keep "
                    "data=1) or keep Adam moments in bf16 (--config.optimizer.state_dtype=param)")
    if not ctx.get("attn_chunk"):
        tips.append("chunk the attention scores (--config.model.attn_query_chunk=2048)")
    if not ctx.get("lm_head_chunk"):
        tips.append("project the loss's logits in chunks (--config.model.lm_head_chunk=2048)")
    return tips


def _rollout_tip(ctx: dict, need: int) -> str:
    """What cuts a rollout program that is `need` x too large: fewer rows per engine call
    (GRPO: grpo.rollout_batch; RFT: data.batch_size, whole prompts of samples_per_prompt)."""
    fewer = max(1, (ctx.get("rollout_batch") or 0) // need)
    if ctx.get("stage") == "rft":
        k = ctx.get("samples_per_prompt", 1)
        knob = f"data.batch_size={max(k, fewer // k * k)}"
    else:
        knob = f"grpo.rollout_batch={fewer}"
    return (f"roll out fewer rows per engine call (--config.{knob}), a bf16 KV cache "
            "(--config.sampling.cache_dtype=bfloat16), or more chips on the batch axes")


def render_markdown(header: dict, plans: list[StepPlan], tips: list[str]) -> str:
    lines = [f"## {header['config']} on {header['topology']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k not in ("config", "topology")]
    lines += ["", markdown_table(plans), ""]
    notes = [f"- {p.name}: {p.note}" for p in plans if p.note]
    if notes:
        lines += ["Notes:", *notes, ""]
    if tips:
        lines += ["Does not fit:", *[f"- {t}" for t in tips], ""]
    else:
        lines += [f"Every program fits in {int(HBM_BUDGET * 100)}% of HBM per chip.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- config loading


# A stage config comes from its file with `cli.load_config(spec, overrides, PlanError)`, as
# `experiments/train.py --config` loads it (stage configs import `experiments.configs`: run from
# the repository root, as every command in the README is).


# --------------------------------------------------------------------------- compile


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topo: Topology):
    # no TPU is opened, so planners may run side by side (libtpu otherwise takes a lock file)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kw = {"num_slices": topo.num_slices} if topo.num_slices > 1 else {}
    if topo.host_chips:  # libtpu's default host (2x2x1 chips) does not divide a 1x1 slice
        kw["chips_per_host_bounds"] = list(topo.host_chips)
    return topologies.get_topology_desc(topology_name=topo.jax_name, platform="tpu", **kw).devices


def stage_rules(cfg):
    """The stage config's sharding rules (`mesh.rules`), frozen as the runtime freezes them."""
    from vrthinker_jax import sharding

    return sharding.freeze_rules(cfg.mesh.rules)


def mesh_for(cfg, devices, num_slices: int):
    """The config's mesh over the topology's devices. Multi-slice: a config whose dcn axes are
    all 1 gets dcn data = number of slices (pure data parallelism across slices)."""
    from vrthinker_jax import sharding

    ici = {k: int(v) for k, v in dict(cfg.mesh.ici).items()}
    dcn = {k: int(v) for k, v in dict(cfg.mesh.dcn).items()}
    if num_slices > 1 and math.prod(dcn.values() or [1]) == 1:
        dcn = {"data": num_slices}
    elif num_slices == 1 and math.prod(dcn.values() or [1]) != 1:
        raise PlanError(f"mesh.dcn {dcn} needs several slices; pick a multi-slice topology")
    try:
        return sharding.make_mesh(ici, dcn, devices=devices)
    except ValueError as e:
        raise PlanError(f"mesh: {e}") from None


def _with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying the matching NamedSharding (shardings is a
    prefix tree of `tree`)."""
    import jax

    def one(sh, sub):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), sub)

    return jax.tree.map(one, shardings, tree)


_OOM_TIPS = {
    "learner": "raise optimizer.accum_steps (a smaller micro-batch), set model.remat=True, or "
               "shard over more chips",
    "rollout": "lower grpo.rollout_batch (GRPO) or data.batch_size (RFT), the rows per engine "
               "call, set sampling.cache_dtype=bfloat16, or shard over more chips",
}


def compile_or_explain(lowered, name: str, kind: str):
    """lowered.compile(); when XLA cannot fit the program in HBM, a PlanError that says so (one
    line, with XLA's numbers and the knob to turn) instead of a compiler traceback."""
    try:
        return lowered.compile()
    except Exception as e:  # XLA raises JaxRuntimeError (its module moved across jax versions)
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg:
            raise
        detail = msg.split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
        raise DoesNotFit(f"{name} does not fit: {detail} - {_OOM_TIPS[kind]}") from None


def _stats(compiled) -> tuple[dict, dict]:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per program
        cost = cost[0] if cost else {}
    m = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
    return m, dict(cost or {})


def _step_plan(name, shape, compiled, analytic: dict, chip: Chip, n_chips: int, t0: float,
               note: str = "", counted: dict | None = None) -> StepPlan:
    """`counted`: the analytic count with each loop body counted once (the scanned decoder layer,
    the attention's query-chunk loop), which is what XLA's cost analysis reports. The compiled
    FLOPs are then scaled by analytic / counted to stand for every iteration."""
    m, cost = _stats(compiled)
    scale = analytic["expected"] / counted["expected"] if counted else 1.0
    if counted:
        note = (note + "; " if note else "") + (
            f"loops (scanned layers, attention query and loss chunks): XLA counts a body once, "
            f"compiled FLOPs scaled x{scale:.1f}"
            f" (raw {float(cost.get('flops', 0.0)):.3g} FLOPs/chip vs {counted['expected'] / n_chips:.3g}"  # noqa: E501
            " analytic with one layer)")
    # bytes are left as XLA reports them: in a scan they are dominated by the stacked buffers
    # (KV cache, layer params) each iteration slices, which the body already counts in full
    cost = {"flops": float(cost.get("flops", 0.0)) * scale,
            "bytes accessed": float(cost.get("bytes accessed", 0.0))}
    return StepPlan(
        name=name, shape=shape, argument_bytes=m["argument"], output_bytes=m["output"],
        alias_bytes=m["alias"], temp_bytes=m["temp"], code_bytes=m["generated_code"],
        hbm_bytes=chip.device.hbm_bytes, flops_compiled=float(cost.get("flops", 0.0)),
        flops_analytic=analytic["expected"] / n_chips, flops_model=analytic["model"] / n_chips,
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        peak_flops=chip.device.peak_flops, hbm_bw=chip.device.hbm_bw,
        compile_s=time.perf_counter() - t0, note=note,
    )


def _abstract_model(model_cfg):
    from flax import nnx

    from vrthinker_jax.models import model as model_lib

    model = nnx.eval_shape(lambda: model_lib.Qwen25VL(model_cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def learner_batch(cfg) -> int:
    accum = int(cfg.optimizer.accum_steps)
    if accum < 1:
        raise PlanError(f"optimizer.accum_steps must be >= 1, got {accum}")
    rows = (int(cfg.grpo.prompts_per_step) * int(cfg.grpo.group_size)
            if cfg.stage == "grpo" else int(cfg.data.batch_size))
    if rows % accum:
        raise PlanError(f"learner batch {rows} is not divisible by optimizer.accum_steps={accum}")
    return rows // accum


def plan_learner(cfg, mesh, graphdef, abs_params, chip: Chip, n_chips: int) -> StepPlan:
    import jax
    import jax.numpy as jnp

    from vrthinker_jax import sharding
    from vrthinker_jax.rollout import frame_bank
    from vrthinker_jax.train import losses, steps

    mcfg = cfg.model
    kind = "grpo" if cfg.stage == "grpo" else "sft"
    b, s, f = learner_batch(cfg), int(cfg.data.seq_len), int(cfg.data.max_frames)
    rules = stage_rules(cfg)
    multiple = sharding.batch_size_multiple(mesh, rules)
    if b % multiple:
        raise PlanError(f"learner batch {b} is not a multiple of the mesh's batch axes "
                        f"({multiple}); change optimizer.accum_steps or mesh")
    h, w = (int(x) for x in cfg.data.frame_size)
    sds = jax.ShapeDtypeStruct
    batch = {
        "tokens": sds((b, s), jnp.int32), "positions": sds((3, b, s), jnp.int32),
        "valid": sds((b, s), jnp.bool_), "loss_mask": sds((b, s), jnp.bool_),
        "visual": sds((b, s), jnp.bool_),
        "visible_until": sds((b, s), jnp.int32), "frames": sds((b, f, h, w, 3), jnp.uint8),
        "weight": sds((b,), jnp.float32),
    }
    static = {}
    if kind == "grpo":
        g = cfg.grpo
        batch.update(old_logp=sds((b, s), jnp.float32), ref_logp=sds((b, s - 1), jnp.float32),
                     advantages=sds((b,), jnp.float32))
        static = dict(temperature=float(cfg.sampling.temperature) or 1.0,
                      loss=tuple(sorted(losses.grpo_loss_options(g).items())))
    tx = steps.make_optimizer(cfg.optimizer)
    abs_state = jax.eval_shape(lambda p: steps.init_train_state(p, tx), abs_params)
    spec = steps.StepSpec(frame_bank.PatchSpec.from_model_config(mcfg), rules=rules)
    fn = steps.step_fn(kind, graphdef=graphdef, spec=spec, optimizer=cfg.optimizer,
                       state=abs_state, batch_like=batch, mesh=mesh, **static)
    t0 = time.perf_counter()
    compiled = compile_or_explain(fn.lower(abs_state, batch), f"learner ({kind})", "learner")
    kw = dict(batch=b, seq=s, frames=f, frame_size=(h, w), remat=bool(mcfg.remat))
    trips, lm_trips = attention_trips(mcfg, s), head_trips(mcfg, s)
    counted = (train_flops(mcfg, layers=1 if mcfg.scan_layers else None, attn_trips=trips,
                           lm_trips=lm_trips, **kw)
               if mcfg.scan_layers or trips > 1 or lm_trips > 1 else None)
    return _step_plan(f"learner ({kind})", f"{b} x {s} tok, {f} frames", compiled,
                      train_flops(mcfg, **kw), chip, n_chips, t0, counted=counted)


# stop sequences the plan compiles with: the tokenizer's ids only change which ids are compared
PLAN_STOPS = dict(stop_tool=((1,),), stop_end=((2,), (3,)))


def response_len_estimate(pcfg, tokens_per_frame: int) -> int:
    """An estimate of the static tool-response length when no tokenizer is at hand (the engine
    measures it: `environment.max_response_len`): a full call's frames, each with its vision
    markers and a short caption, plus the response text. Only the rollout's scratch slots and
    the response insert depend on it."""
    m = int(pcfg.max_frames_per_call)
    return int(math.ceil((m * (tokens_per_frame + 16) + 256) / 16) * 16)


def rollout_shapes(cfg, tokenizer=None):
    """The engine's static shapes for a stage config: what `RolloutEngine` derives from the
    configs the trainers give it (`engine.rollout_shapes`). With a tokenizer the tool-response
    length is measured as the engine measures it; without, `response_len_estimate`."""
    from vrthinker_jax.rollout import engine, protocol, shapes

    pcfg = protocol.ProtocolConfig.from_configdict(cfg.protocol)
    frame_size = tuple(cfg.data.frame_size)
    try:
        if tokenizer is not None:
            return engine.rollout_shapes(cfg.model, tokenizer, pcfg, cfg.sampling, frame_size)
        n = response_len_estimate(pcfg, shapes.tokens_per_frame(cfg.model, frame_size))
        return shapes.rollout_shapes(cfg.model, pcfg, cfg.sampling, frame_size, response_len=n)
    except ValueError as e:
        raise PlanError(str(e)) from None


def rollout_static(cfg, sh):
    """The sampler settings the plan compiles for shapes `sh`: the engine's
    (`shapes.sampler_static`) with placeholder stop sequences, and the insert as one pass over
    the segment attending the whole cache (prefill_chunk=0, as the 3b/7b configs ship;
    insert_kv_buckets=1: its shorter prefixes only ever read less), the most it can take."""
    from vrthinker_jax.rollout import shapes

    st = shapes.sampler_static(sh, cfg.sampling, **PLAN_STOPS)
    return dataclasses.replace(st, kv_buckets=1, prefill_chunk=0)


def rollout_state_args(mesh, model_cfg, st, abs_params, batch: int, cache_dtype,
                       rules=None):
    """(params, state) ShapeDtypeStructs laid out as the engine lays them out: the state
    `shapes.state_shardings` (rows over the batch axes), params by their logical axes, both
    under `rules` (a stage's `stage_rules`; default `sharding.DEFAULT_RULES`)."""
    from vrthinker_jax import sharding
    from vrthinker_jax.rollout import shapes

    rules = sharding.DEFAULT_RULES if rules is None else rules
    abs_st = shapes.abstract_state(model_cfg, batch, st, cache_dtype)
    return (_with_shardings(abs_params, sharding.state_shardings(abs_params, mesh, rules)),
            _with_shardings(abs_st, shapes.state_shardings(mesh, abs_st, rules)))


def insert_args(mesh, *, batch: int, seg_len: int, frames: int, frame_size, bank_frames: int,
                rules=None):
    """(bank, segment) ShapeDtypeStructs of one `sampler.insert` call: a uint8 frame bank
    [batch, bank_frames, H, W, 3] and a segment of seg_len tokens with `frames` frames per row
    (`shapes.abstract_segment`), split over the batch axes as the engine splits them."""
    import jax
    import jax.numpy as jnp

    from vrthinker_jax import sharding
    from vrthinker_jax.rollout import shapes

    rules = sharding.DEFAULT_RULES if rules is None else rules
    h, w = (int(x) for x in frame_size)
    bank = jax.ShapeDtypeStruct((batch, bank_frames, h, w, 3), jnp.uint8,
                                sharding=sharding.batch_sharding(mesh, 5, rules=rules))
    seg = _with_shardings(shapes.abstract_segment(batch, seg_len, frames),
                          shapes.segment_shardings(mesh, rules))
    return bank, seg


def rows_per_call(cfg) -> int:
    """Global rows of one rollout-engine call of the stage (`shapes.rows_per_call`)."""
    from vrthinker_jax.rollout import shapes

    try:
        return shapes.rows_per_call(cfg)
    except ValueError as e:
        raise PlanError(str(e)) from None


@dataclasses.dataclass
class RolloutPrograms:
    """The abstract arguments of the engine's programs for a stage config, as the engine calls
    them: `rows` rows of `shapes` (`static` compiled); params / state / bank / seg are sharded
    ShapeDtypeStructs (the prompt insert: the largest prompt bucket, the initial frames)."""

    rows: int
    shapes: object  # shapes.RolloutShapes
    static: object  # sampler.Static
    params: object
    state: object
    bank: object
    seg: object
    measured: bool  # the response length was measured with a tokenizer (else estimated)


def rollout_programs(cfg, mesh, abs_params, cache_dtype, tokenizer=None) -> RolloutPrograms:
    """What `plan_rollout` compiles; cfg.model must be a resolved model config."""
    from vrthinker_jax import sharding

    b = rows_per_call(cfg)
    rules = stage_rules(cfg)
    multiple = sharding.batch_size_multiple(mesh, rules)
    if b % multiple:
        raise PlanError(f"rollout batch {b} is not a multiple of the mesh's batch axes "
                        f"({multiple})")
    sh = rollout_shapes(cfg, tokenizer)
    st = rollout_static(cfg, sh)
    params, state = rollout_state_args(mesh, cfg.model, st, abs_params, b, cache_dtype, rules)
    bank, seg = insert_args(mesh, batch=b, seg_len=sh.prompt_buckets[-1],
                            frames=sh.prompt_frames, frame_size=sh.frame_size,
                            bank_frames=sh.bank_frames, rules=rules)
    return RolloutPrograms(b, sh, st, params, state, bank, seg, tokenizer is not None)


def plan_rollout(cfg, mesh, graphdef, abs_params, chip: Chip, n_chips: int, cache_dtype,
                 programs=("prefill", "decode"), tokenizer=None) -> list[StepPlan]:
    """Compiles the engine's prompt insert ('prefill') and decode loop ('decode') at the
    stage's rows per engine call (`rollout_programs`)."""
    import jax.numpy as jnp

    from vrthinker_jax.rollout import sampler

    p = rollout_programs(cfg, mesh, abs_params, cache_dtype, tokenizer)
    dec, ins, _ = sampler.compiled(p.static, graphdef)
    out = []
    if "prefill" in programs:
        t0 = time.perf_counter()
        compiled = compile_or_explain(ins.lower(p.params, p.state, p.bank, p.seg),
                                      "rollout prefill", "rollout")
        out.append(_prefill_plan(cfg.model, p, compiled, chip, n_chips, t0,
                                 jnp.dtype(cache_dtype)))
    if "decode" in programs:
        b, kv, mcfg = p.rows, p.shapes.cache_slots, cfg.model
        t0 = time.perf_counter()
        compiled = compile_or_explain(dec.lower(p.params, p.state), "rollout decode", "rollout")
        out.append(_step_plan(
            "rollout decode", f"{b} rows x 1 tok; KV {kv}", compiled,
            decode_flops(mcfg, batch=b, kv_len=kv), chip, n_chips, t0,
            note="engine's compiled sampler.decode (a while loop; XLA counts its body once = "
                 "one token per row)",
            counted=decode_flops(mcfg, batch=b, kv_len=kv, layers=1) if mcfg.scan_layers else None,
        ))
    return out


def _prefill_plan(mcfg, p: RolloutPrograms, compiled, chip: Chip, n_chips: int, t0: float,
                  cache_dtype) -> StepPlan:
    """The StepPlan of the compiled prompt insert of `p`."""
    sh, b = p.shapes, p.rows
    r, nf, kv, (h, w) = sh.prompt_buckets[-1], sh.prompt_frames, sh.cache_slots, sh.frame_size
    cache_gib = kv_cache_bytes(mcfg, batch=b, slots=kv,
                               dtype_bytes=cache_dtype.itemsize) / GIB
    pkw = dict(batch=b, seg_len=r, kv_len=kv, frames=nf, frame_size=(h, w))
    trips = attention_trips(mcfg, r)
    how = ("measured with the tokenizer" if p.measured
           else "estimated; --config.tokenizer=PATH measures it")
    return _step_plan(
        "rollout prefill", f"{b} x {r} tok, {nf} frames; KV {kv}", compiled,
        prefill_flops(mcfg, **pkw), chip, n_chips, t0,
        counted=(prefill_flops(mcfg, layers=1 if mcfg.scan_layers else None, attn_trips=trips,
                               **pkw)
                 if mcfg.scan_layers or trips > 1 else None),
        note=f"engine's compiled sampler.insert (prompt bucket {r}); KV cache "
             f"{cache_gib:.1f} GiB in all, {cache_dtype.name}; frame banks "
             f"{b * sh.bank_frames * h * w * 3 / GIB:.1f} GiB in all; tool responses "
             f"{sh.response_len} tokens ({how})",
    )


PROGRAMS = ("learner", "prefill", "decode")


def plan_tokenizer(cfg):
    """The stage's tokenizer (`cfg.tokenizer`, as training loads it, with the model's vision
    token ids aligned to it), or None when the config names none: the plan then estimates the
    tool-response length."""
    if not cfg.tokenizer:
        return None
    from data_pipelines.tokenizer import load_tokenizer
    from vrthinker_jax.train import runtime

    try:
        tok = load_tokenizer(cfg.tokenizer)
        runtime.align_model_config(cfg.model, tok)
    except (OSError, ValueError) as e:
        raise PlanError(f"tokenizer {cfg.tokenizer}: {e}") from None
    return tok


def make_plan(cfg, topo: Topology, *, cache_dtype: str = "float32",
              programs=PROGRAMS) -> tuple[dict, list[StepPlan], list[str]]:
    """Compiles the config's `programs` (of PROGRAMS) for `topo`; returns (header, plans,
    suggestions)."""
    import jax.numpy as jnp

    from vrthinker_jax.models import config as model_config

    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise PlanError(f"--only: unknown programs {sorted(unknown)}; expected {PROGRAMS}")
    cfg.model = model_config.Qwen25VLConfig.from_configdict(cfg.model)
    tokenizer = plan_tokenizer(cfg)
    devices = topology_devices(topo)
    mesh = mesh_for(cfg, devices, topo.num_slices)
    graphdef, abs_params = _abstract_model(cfg.model)
    n = len(devices)
    plans = []
    if "learner" in programs:
        plans.append(plan_learner(cfg, mesh, graphdef, abs_params, topo.chip, n))
    wanted = tuple(p for p in ("prefill", "decode") if p in programs)
    if wanted and rows_per_call(cfg):
        plans += plan_rollout(cfg, mesh, graphdef, abs_params, topo.chip, n,
                              jnp.dtype(cache_dtype), wanted, tokenizer)
    return plan_header(cfg, topo, mesh, plans), plans, suggestions(plans, tips_context(cfg, mesh))


def plan_header(cfg, topo: Topology, mesh, plans: list[StepPlan]) -> dict:
    """The plan's header lines: config, topology, mesh, model, optimizer, compile times."""
    slices = f" x {topo.num_slices} slices" if topo.num_slices > 1 else ""
    counts = param_counts(cfg.model)
    return {
        "config": f"{cfg.stage}:{cfg.size}",
        "topology": f"{topo.name} ({topo.jax_name}{slices}, {len(mesh.devices.flat)} chips, "
                    f"{topo.chip.hbm_bytes / GIB:.0f} GiB HBM, "
                    f"{topo.chip.peak_flops / 1e12:.0f} bf16 TFLOP/s, "
                    f"{topo.chip.hbm_bw / 1e9:.0f} GB/s per chip)",
        "mesh": ", ".join(f"{k}={v}" for k, v in mesh.shape.items()),
        "model": f"{counts.total / 1e9:.2f} B params ({cfg.model.param_dtype} params, "
                 f"{cfg.model.dtype} compute, remat={bool(cfg.model.remat)}, "
                 f"scan_layers={bool(cfg.model.scan_layers)})",
        "optimizer": f"accum_steps={cfg.optimizer.accum_steps}, "
                     f"state_dtype={cfg.optimizer.state_dtype}",
        "compile time": ", ".join(f"{p.name} {p.compile_s:.0f} s" for p in plans),
    }


def tips_context(cfg, mesh) -> dict:
    """What `suggestions` needs to know of the config and mesh."""
    from vrthinker_jax import sharding

    return {"remat": bool(cfg.model.remat), "accum": int(cfg.optimizer.accum_steps),
            "stage": cfg.stage, "rollout_batch": rows_per_call(cfg),
            "samples_per_prompt": int(cfg.samples_per_prompt) if cfg.stage == "rft" else 1,
            "attn_chunk": int(cfg.model.attn_query_chunk),
            "lm_head_chunk": int(cfg.model.lm_head_chunk),
            "max_accum": learner_batch(cfg) * int(cfg.optimizer.accum_steps)
            // sharding.batch_size_multiple(mesh, stage_rules(cfg))}


# --------------------------------------------------------------------------- eval rollout
#
# `--eval-rollout`: which runtime holds a published checkpoint's benchmark rollout, with how many
# rows per engine call, and how long a benchmark takes at the roofline. It costs one planned
# trajectory (every row of a batch alike) with the analytic model below; `--compile` also
# AOT-compiles the engine's insert and decode at that batch (needs libtpu).


# Rows per benchmark. ../shared/spec/vrthinker-protocol.md gives none: these are the dataset
# cards' counts (approximate; set `--rows NAME=N` to your files'). 0 = unknown: the plan then
# gives the time per 1000 rows.
#   videogen_rewardbench: "26.5k (prompt, Video A, Video B) triplets",
#     https://huggingface.co/datasets/KwaiVGI/VideoGen-RewardBench (README)
#   genai_bench_video: "1069 votes for video generation",
#     https://huggingface.co/datasets/TIGER-Lab/GenAI-Bench (README; its viewer lists 2.98k
#     video_generation rows over the test and test_v1 splits)
#   mjbench_video: no count found (https://huggingface.co/datasets/MJ-Bench/MJ-BENCH-VIDEO)
BENCHMARK_ROWS = {"videogen_rewardbench": 26500, "genai_bench_video": 1069, "mjbench_video": 0}
BENCHMARK_NAMES = {"videogen_rewardbench": "VideoGen-RewardBench",
                   "genai_bench_video": "GenAI-Bench video", "mjbench_video": "MJ-Bench-Video"}

# Planning assumptions for one eval row under a published checkpoint's preset: what the row
# looks like beyond what the preset fixes (its frames, budgets and pixel budgets are read from
# `vrthinker_jax/presets/<name>.toml` by `eval_trajectory_config`). Text token counts are
# estimates until measured with the checkpoint's tokenizer; they are small next to the visual
# tokens.
EVAL_ASSUMPTIONS = dict(
    video_size=(480, 832),  # native H x W of a benchmark video (--video-size)
    # native H x W of a selected frame; (0, 0) = the video's (eval passes the decoded frames,
    # E:2566, so they have the video's size)
    image_size=(0, 0),
    turns=4,  # assistant turns of the planned trajectory: 3 calls + the answer (--turns)
    gen_tokens_per_turn=300,  # generated tokens per turn, planned (--turn-tokens)
    # "You are a helpful assistant." + qwen-agent's Nous tools block with the select_frames
    # schema (E:1237-1262) + the chat template's markers: estimate
    system_tokens=310,
    instruction_tokens=350,  # the card's task text after the video item: estimate
    # "\nAfter selecting frames: Here are the selected frames" (E:2584-2588): estimate
    response_text_tokens=12,
    message_tokens=5,  # chat-template markers per message: <|im_start|>role\n <|im_end|>\n
    vision_marker_tokens=2,  # <|vision_start|> and <|vision_end|> around each item
)


def eval_trajectory_config(preset_name: str) -> dict:
    """The planned row's facts: the preset's frames, budgets and pixel budgets, plus
    EVAL_ASSUMPTIONS."""
    from vrthinker_jax.rollout import presets

    p = presets.load(preset_name)
    if not isinstance(p, presets.Preset):
        raise PlanError(f"--preset {preset_name}: the eval-rollout plan is for a published "
                        "checkpoint's preset (engine = release)")
    return dict(
        EVAL_ASSUMPTIONS,
        video_frames=p.num_initial,  # the first turn's video item
        # the initial frames' budget (the data loader's smart_resize); the processor's own
        # video budget comes after it
        video_min_pixels=p.pixels.initial_min_pixels,
        video_max_pixels=min(p.pixels.initial_max_pixels, p.pixels.video_max_pixels),
        image_min_pixels=p.pixels.image_min_pixels,  # a selected frame's budget
        image_max_pixels=p.pixels.image_max_pixels,
        num_candidates=p.total_candidates,  # frames a call can select, both videos
        frames_per_call=p.frames.max_per_call,  # images per tool response at most
        max_tool_calls=p.budget.max_tool_calls,
        max_turn_tokens=p.budget.max_new_tokens,  # new tokens per assistant turn at most
        token_cap=p.budget.max_total_tokens,  # a row stops once prompt + turn exceed this
    )


# The rollout state's bytes per cache slot besides the KV cache (`sampler.RolloutState`):
# written (bool), visible_until (int32), tokens (int32), kind (int8), logp (float32) and
# positions (3 x int32).
STATE_BYTES_PER_SLOT = 1 + 4 + 4 + 1 + 4 + 3 * 4
RELEASE_KV_SLOTS = 12 * 1024  # the release's per-row cap (12 * 1024 - 200 tokens) rounded up
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


def eval_rollout_config(size: str = "7b", preset: str = "vr-thinker"):
    """The eval rollout the planner costs: rows of a published checkpoint's protocol run by the
    engine with bf16 weights and a bf16 KV cache. Every knob can be changed with
    --config.KEY=VALUE (`cli.override_config`)."""
    import ml_collections

    from vrthinker_jax.models import config as model_config

    try:
        facts = eval_trajectory_config(preset)
    except ValueError as e:  # presets.PresetError names the file
        raise PlanError(f"--preset: {e}") from None
    try:
        model = model_config.get_config(size)
    except ValueError as e:
        raise PlanError(f"--size: {e}") from None
    model.dtype = model.param_dtype = "bfloat16"  # an eval holds bf16 weights (16.6 GB at 7B)
    model.scan_layers = True  # one compiled decoder layer: compile time only
    c = ml_collections.ConfigDict()
    c.size, c.preset, c.model = size, preset, model
    c.trajectory = ml_collections.ConfigDict(facts)
    c.sampling = ml_collections.ConfigDict(dict(
        # KV slots per row; 0 = the release's 12288 or the planned trajectory's need if larger
        kv_slots=0,
        cache_dtype="bfloat16",
        # inserts prefill this many tokens per pass (`sampling_config.prefill_chunk`): bounds
        # the decoder's activations and skips a static segment's padding; each pass re-reads
        # the weights (0 = one pass over the padded segment)
        prefill_chunk=512,
        # frames (images or a video's temporal groups) the vision tower encodes per pass: the
        # preset engine encodes one at a time (`preset_engine._visual_rows`); 0 = all of an
        # insert's frames at once (the project engine's insert)
        vision_frames_per_pass=1,
        prompt_multiple=256,  # the first prompt is padded to a multiple of this (its bucket)
        response_multiple=64,  # a re-prefill's static length is a multiple of this
    ))
    # mesh axis sizes; all 0 = tensor parallel over min(devices, kv heads), data for the rest
    c.mesh = ml_collections.ConfigDict(dict(data=0, fsdp=0, tensor=0))
    c.benchmarks = ml_collections.ConfigDict(dict(BENCHMARK_ROWS))
    c.max_rows = 256  # the largest batch the search tries
    return c


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // int(m)) * int(m)


@dataclasses.dataclass(frozen=True)
class Prefill:
    """One insert of a row: `tokens` real tokens prefilled from cache slot `start` (padded by the
    engine to the static length `static`), with `groups` vision-tower frames of `hw` pixels (the
    video's temporal groups, or images)."""

    name: str
    tokens: int
    static: int
    start: int
    groups: int
    hw: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """The token accounting of one planned eval row.

    decodes: (cache length before the turn, tokens generated) per assistant turn; peak: the
    most cache slots the row fills; bank_frames: candidate frames the row's frame bank holds."""

    video_hw: tuple[int, int]
    image_hw: tuple[int, int]
    video_tokens: int
    image_tokens: int
    prefills: tuple[Prefill, ...]
    decodes: tuple[tuple[int, int], ...]
    tool_calls: int
    peak: int
    stop: str
    bank_frames: int
    chunk: int = 512  # the engine's prefill chunk (sampling.prefill_chunk)

    @property
    def generated(self) -> int:
        return sum(g for _, g in self.decodes)

    @property
    def scratch(self) -> int:
        """Extra cache slots per row past max_len: the preset engine's is one prefill chunk
        (rows a re-prefill does not serve are finished and write over their own slots)."""
        return self.chunk


def frame_sizes(tc, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(video frame, selected image) sizes in pixels after Qwen's smart_resize with the
    preset's budgets (multiples of `factor` = patch x merge)."""
    from data_pipelines.processor import smart_resize

    vh, vw = (int(x) for x in tc.video_size)
    ih, iw = (int(x) for x in tc.image_size) if any(tc.image_size) else (vh, vw)
    return (smart_resize(vh, vw, factor, tc.video_min_pixels, tc.video_max_pixels),
            smart_resize(ih, iw, factor, tc.image_min_pixels, tc.image_max_pixels))


def eval_trajectory(tc, patch, *, prompt_multiple: int = 256,
                    response_multiple: int = 64, chunk: int = 512) -> Trajectory:
    """Walks one row through the release's loop with `tc.turns` turns of
    `tc.gen_tokens_per_turn` tokens (tc: `eval_rollout_config().trajectory`; patch:
    `frame_bank.PatchSpec`).

    The first prompt (system + tools, the video item of video_frames / temporal_patch groups,
    the task text) is prefilled whole. After each turn that calls the tool (E:2515: unless
    prompt + turn exceed token_cap, or the turn is the last), the response's images arrive and
    the previous response loses its images, which moves every later token: the engine truncates
    the cache at the first removed token (the rewritten model turn, for the first response) and
    prefills the rest again: the model's turn + the new response.
    """
    f = patch.patch_size * patch.merge_size
    (vh, vw), (ih, iw) = frame_sizes(tc, f)
    groups = -(-int(tc.video_frames) // patch.temporal_patch_size)
    vtok, itok = groups * (vh // f) * (vw // f), (ih // f) * (iw // f)
    m, mark, n = int(tc.message_tokens), int(tc.vision_marker_tokens), int(tc.frames_per_call)
    g, turns, text = int(tc.gen_tokens_per_turn), int(tc.turns), int(tc.response_text_tokens)
    if not 1 <= turns <= int(tc.max_tool_calls) + 1:
        raise PlanError(f"trajectory.turns={turns}: expected 1..max_tool_calls + 1 = "
                        f"{int(tc.max_tool_calls) + 1}")
    if not 0 < g <= int(tc.max_turn_tokens):
        raise PlanError(f"trajectory.gen_tokens_per_turn={g}: expected 1..max_turn_tokens = "
                        f"{tc.max_turn_tokens}")
    prompt = int(tc.system_tokens) + 2 * m + mark + vtok + int(tc.instruction_tokens)
    images = n * (itok + mark)
    response = m + text + images
    re_static = _round_up(int(tc.max_turn_tokens) + response, response_multiple)
    prefills = [Prefill("prompt", prompt, _round_up(prompt, prompt_multiple), 0, groups,
                        (vh, vw))]
    decodes, length, resp_at, stop = [], prompt, None, ""
    for turn in range(1, turns + 1):
        decodes.append((length, g))
        length += g
        if turn == turns:
            stop = f"answers in turn {turn}"
            break
        if length > int(tc.token_cap):
            stop = f"stopped by the token cap ({tc.token_cap}) after turn {turn}"
            break
        # the rewritten model turn (first response) or the previous response's first image
        start = length - g if resp_at is None else resp_at + m + text
        new = length + response - (0 if resp_at is None else images)
        prefills.append(Prefill(f"re-prefill {turn}", new - start, re_static, start, n,
                                (ih, iw)))
        resp_at, length = new - response, new
    return Trajectory((vh, vw), (ih, iw), vtok, itok, tuple(prefills), tuple(decodes),
                      len(prefills) - 1, length, stop, int(tc.num_candidates), int(chunk))


def resolve_kv_slots(sc, traj: Trajectory) -> int:
    """The KV slots per row: sampling.kv_slots, or (0) the release's 12288 raised to the planned
    trajectory's need."""
    if int(sc.kv_slots):
        if int(sc.kv_slots) < traj.peak:
            raise PlanError(f"sampling.kv_slots={sc.kv_slots} cannot hold the planned row's "
                            f"{traj.peak} tokens; raise it or plan a smaller --video-size")
        return int(sc.kv_slots)
    return max(RELEASE_KV_SLOTS, _round_up(traj.peak, 256))


def eval_mesh(mesh_cfg, model_cfg, n_devices: int) -> dict[str, int]:
    """{'data', 'fsdp', 'tensor'} sizes for a runtime of n_devices: the config's when set, else
    tensor = the largest of 8, 4, 2, 1 dividing the devices and the text model's heads and kv
    heads, data = the rest (fsdp would re-gather the weights every decode step)."""
    sizes = {k: int(v) for k, v in dict(mesh_cfg).items()}
    if not any(sizes.values()):
        t = model_cfg.text
        tp = next(x for x in (8, 4, 2, 1) if not n_devices % x and not t.num_key_value_heads % x
                  and not t.num_attention_heads % x)
        sizes = {"data": n_devices // tp, "fsdp": 1, "tensor": tp}
    if math.prod(max(v, 1) for v in sizes.values()) != n_devices:
        raise PlanError(f"mesh {sizes} does not cover the runtime's {n_devices} devices")
    return {k: max(v, 1) for k, v in sizes.items()}


def param_bytes_per_device(abs_params, mesh_shape: dict) -> dict[str, int]:
    """Bytes of params one device holds under the sharding rules (the engine's layout,
    `sharding.state_shardings`) on a mesh of `mesh_shape` sizes: {'all', 'vision' (the vision
    tower), 'embed' (the token embedding, of which decoding gathers a few rows only)}.
    abs_params: an nnx.State of ShapeDtypeStructs (`nnx.eval_shape`)."""
    import jax
    from jax.sharding import AbstractMesh

    from vrthinker_jax import sharding

    amesh = AbstractMesh(tuple(mesh_shape[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
    shards = jax.tree.leaves(sharding.state_shardings(abs_params, amesh))
    leaves = jax.tree_util.tree_flatten_with_path(abs_params)[0]
    out = {"all": 0, "vision": 0, "embed": 0}
    for (path, x), sh in zip(leaves, shards, strict=True):
        n = math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
        name = jax.tree_util.keystr(path)
        out["all"] += n
        out["vision"] += n if "visual" in name else 0
        out["embed"] += n if "embed_tokens" in name else 0
    return out


def insert_activation_bytes(model_cfg, p: Prefill, *, rows: int, tensor: int, prefill_chunk: int,
                            kv_size: int, frames_per_pass: int = 0) -> dict[str, int]:
    """Peak activation bytes of one insert on one device holding `rows` rows, bf16 compute:

    * 'vision': the vision tower over all the insert's frames at once (the engine encodes them in
      one chunk; `frames_per_pass` > 0 = that many at a time): a full-attention block's float32
      scores [frames, heads, P, P] over a frame's P patches dominate, plus float32 pixel
      patches, residual copies and the MLP;
    * 'decoder': the segment's embeddings [rows, static + visual tokens, hidden] and one
      prefill pass (`prefill_chunk` tokens) of a layer: MLP, residual copies, float32 scores of
      `attn_query_chunk` queries over the kv_size-slot cache, logits.
    Only the float32 scores count: XLA fuses the softmax's normalisation into the matmul with V
    (AOT, v6e-1, 2 rows x 8 frames of 476x840: 5.19 GiB of temporaries, 5.04 GiB modeled).
    Heads, MLP widths split over `tensor` where they divide it.
    """
    v, t = model_cfg.vision, model_cfg.text
    bf = 2
    patches = vision_patches_per_frame(model_cfg, p.hw)
    frames = rows * p.groups
    frames = min(frames, frames_per_pass) if frames_per_pass else frames
    vs = tensor if v.num_heads % tensor == 0 else 1
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    vision = frames * (v.num_heads // vs * patches * patches * 4
                       + patches * (4 * patch_dim + 4 * v.hidden_size * bf
                                    + 3 * v.intermediate_size * bf // vs))
    c = prefill_chunk if 0 < prefill_chunk < p.static else p.static
    q = int(model_cfg.attn_query_chunk)
    q = min(q, c) if q > 0 else c
    ts = tensor if t.num_attention_heads % tensor == 0 else 1
    visual_tokens = p.groups * patches // v.spatial_merge_size ** 2
    decoder = rows * ((p.static + visual_tokens) * t.hidden_size * bf
                      + c * (4 * t.hidden_size * bf + 3 * t.intermediate_size * bf // ts)
                      + t.num_attention_heads // ts * q * kv_size * 4
                      + t.vocab_size * 4)
    return {"vision": vision, "decoder": decoder}


def eval_memory(model_cfg, traj: Trajectory, *, rows: int, mesh: dict, params: dict,
                kv_slots: int, sc, frames_per_pass: int | None = None) -> dict[str, int]:
    """Per-device bytes of the eval rollout at `rows` rows per engine call (split over the
    batch axes data x fsdp; the cache, state and bank are not split over tensor, as the engine
    lays them out): persistent params, KV cache (kv_slots + scratch slots per row), rollout
    state and frame bank, plus the largest transient of an insert's vision tower, an insert's
    decoder pass, or a decode step. 'total' is what must fit. frames_per_pass: the vision
    tower's (default: sampling.vision_frames_per_pass)."""
    t = model_cfg.text
    if frames_per_pass is None:
        frames_per_pass = int(sc.vision_frames_per_pass)
    r = rows // (mesh["data"] * mesh["fsdp"])
    size = kv_slots + traj.scratch
    mem = {
        "params": params["all"],
        "kv cache": kv_cache_bytes(model_cfg, batch=r, slots=size,
                                   dtype_bytes=DTYPE_BYTES[sc.cache_dtype]),
        "rollout state": r * (size * STATE_BYTES_PER_SLOT + t.vocab_size * 4),
        # the preset engine keeps a row's candidate frames on the host (it encodes the
        # visual items each re-prefill needs there), so no frame bank sits on the device
        "frame bank": 0,
    }
    acts = [insert_activation_bytes(model_cfg, p, rows=r, tensor=mesh["tensor"],
                                    prefill_chunk=int(sc.prefill_chunk), kv_size=size,
                                    frames_per_pass=frames_per_pass) for p in traj.prefills]
    ts = mesh["tensor"] if t.num_attention_heads % mesh["tensor"] == 0 else 1
    mem["vision tower"] = max(a["vision"] for a in acts)
    mem["prefill pass"] = max(a["decoder"] for a in acts)
    mem["decode step"] = r * (3 * t.vocab_size * 4 + t.num_attention_heads // ts * size * 4)
    mem["total"] = (sum(mem[k] for k in ("params", "kv cache", "rollout state", "frame bank"))
                    + max(mem["vision tower"], mem["prefill pass"], mem["decode step"]))
    return mem


def _roofline_s(flops: float, nbytes: float, chip: Chip) -> tuple[float, str]:
    """(seconds, bound) of per-device work at the chip's peak FLOP/s and HBM bandwidth."""
    tc, tm = flops / chip.device.peak_flops, nbytes / chip.device.hbm_bw
    return max(tc, tm), ("compute" if tc >= tm else "memory")


def eval_call_seconds(model_cfg, traj: Trajectory, *, rows: int, topo: Topology, mesh: dict,
                      params: dict, sc) -> dict[str, tuple[float, str]]:
    """Roofline (seconds, bound) per phase of one engine call of `rows` rows that all follow
    `traj`: each insert (FLOPs of the tokens it computes; bytes: the weights once per prefill
    pass, the cache prefix once per query chunk) and all decode steps (each reads the text
    weights and every row's cache prefix). Work splits evenly over the devices; no
    communication, no overlap losses: a lower bound on time."""
    n_dev, chip = topo.num_devices, topo.chip
    r = rows / (mesh["data"] * mesh["fsdp"])
    kvs = mesh["tensor"] if model_cfg.text.num_key_value_heads % mesh["tensor"] == 0 else 1
    slot = kv_cache_bytes(model_cfg, batch=1, slots=1,
                          dtype_bytes=DTYPE_BYTES[sc.cache_dtype]) / kvs
    c, q = int(sc.prefill_chunk), int(model_cfg.attn_query_chunk)
    out = {}
    for p in traj.prefills:
        chunked = 0 < c < p.static
        tokens = min(_round_up(p.tokens, c), p.static) if chunked else p.static
        kv = p.start + (tokens / 2 if chunked else p.static)
        flops = prefill_flops(model_cfg, batch=rows, seg_len=tokens, kv_len=kv,
                              frames=p.groups, frame_size=p.hw)["model"] / n_dev
        passes = -(-tokens // c) if chunked else 1
        trips = -(-tokens // q) if 0 < q < tokens else 1
        # the decoder's weights once per prefill pass, the vision tower's once per frame pass
        fpp = int(sc.vision_frames_per_pass)
        vision_passes = -(-int(r * p.groups) // fpp) if fpp else 1
        nbytes = (passes * (params["all"] - params["embed"] - params["vision"])
                  + vision_passes * params["vision"] + r * slot * (trips * kv + tokens))
        out[p.name] = _roofline_s(flops, nbytes, chip)
    total, bound = 0.0, "memory"
    for start, g in traj.decodes:
        kv = start + g / 2
        flops = g * decode_flops(model_cfg, batch=rows, kv_len=kv)["model"] / n_dev
        nbytes = g * (params["all"] - params["vision"] - params["embed"] + r * slot * kv)
        s, bound = _roofline_s(flops, nbytes, chip)
        total += s
    out["decode"] = (total, bound)
    return out


@dataclasses.dataclass
class EvalPlan:
    """One runtime's answer for the eval rollout.

    rows: rows per engine call that fit in HBM_BUDGET of a device's HBM (0 = not one batch);
    memory: per-device bytes at `rows` (at the smallest batch when none fits); phases:
    roofline (seconds, bound) per phase of one call."""

    topology: Topology
    mesh: dict
    rows: int
    memory: dict
    phases: dict
    notes: list
    compiled: list = dataclasses.field(default_factory=list)

    @property
    def budget(self) -> float:
        return HBM_BUDGET * self.topology.chip.device.hbm_bytes

    @property
    def call_s(self) -> float:
        return sum(s for s, _ in self.phases.values())

    @property
    def row_s(self) -> float:
        return self.call_s / self.rows if self.rows else float("inf")

    def benchmark_s(self, n: int) -> float:
        return math.ceil(n / self.rows) * self.call_s if self.rows else float("inf")


def max_eval_rows(fits, multiple: int, limit: int) -> int:
    """The largest multiple of `multiple` up to `limit` rows for which fits(rows) holds (memory
    grows with rows), 0 when even `multiple` rows do not fit."""
    best = 0
    for rows in range(multiple, limit + 1, multiple):
        if not fits(rows):
            break
        best = rows
    return best


def plan_eval_runtime(cfg, topo: Topology, traj: Trajectory, abs_params) -> EvalPlan:
    """The batch that fits `topo` and its roofline time (analytic; no libtpu needed)."""
    mcfg, sc = cfg.model, cfg.sampling
    mesh = eval_mesh(cfg.mesh, mcfg, topo.num_devices)
    params = param_bytes_per_device(abs_params, mesh)
    kv = resolve_kv_slots(sc, traj)
    budget = HBM_BUDGET * topo.chip.device.hbm_bytes
    multiple = mesh["data"] * mesh["fsdp"]

    def memory(rows, frames_per_pass=None):
        return eval_memory(mcfg, traj, rows=rows, mesh=mesh, params=params, kv_slots=kv, sc=sc,
                           frames_per_pass=frames_per_pass)

    rows = max_eval_rows(lambda b: memory(b)["total"] <= budget, multiple, int(cfg.max_rows))
    mem = memory(rows or multiple)
    phases = (eval_call_seconds(mcfg, traj, rows=rows, topo=topo, mesh=mesh, params=params,
                                sc=sc) if rows else {})
    plan = EvalPlan(topo, mesh, rows, mem, phases, [])
    plan.notes = eval_notes(plan, cfg, traj, kv, lambda b: memory(b, frames_per_pass=1))
    return plan


def eval_notes(plan: EvalPlan, cfg, traj: Trajectory, kv: int, memory_one_frame) -> list[str]:
    """Why a runtime does not fit, what limits its batch, and what would raise it."""
    mem, budget, notes = plan.memory, plan.budget, []
    multiple = plan.mesh["data"] * plan.mesh["fsdp"]
    if mem["params"] > budget:
        notes.append(f"bf16 weights alone are {mem['params'] / GIB:.2f} GiB per device, over the "
                     f"{budget / GIB:.2f} GiB budget ({int(HBM_BUDGET * 100)}% of "
                     f"{plan.topology.chip.device.hbm_bytes / GIB:.0f} GiB)")
    elif not plan.rows:
        notes.append(f"a batch of {_rows(multiple)} needs {mem['total'] / GIB:.2f} GiB per "
                     f"device, over the {budget / GIB:.2f} GiB budget")
    transient = max(mem["vision tower"], mem["prefill pass"], mem["decode step"])
    if int(cfg.sampling.vision_frames_per_pass) not in (0, 1):
        notes.append(f"what-if: the vision tower encodes {cfg.sampling.vision_frames_per_pass} "
                     "frame(s) per pass; the preset engine encodes one at a time")
    elif (not int(cfg.sampling.vision_frames_per_pass) and mem["params"] <= budget
          and mem["vision tower"] == transient):
        rows = max_eval_rows(lambda b: memory_one_frame(b)["total"] <= budget, multiple,
                             int(cfg.max_rows))
        notes.append(
            f"the vision tower's full-attention blocks over all of an insert's frames at once "
            f"({mem['vision tower'] / GIB:.2f} GiB at {_rows(plan.rows or multiple)}) limit the "
            f"batch; encoding one item at a time (as the preset engine does) would "
            + (f"allow {_rows(rows)}" if rows else "still not fit a batch"))
    if plan.mesh["fsdp"] > 1:
        gathered = mem["params"] * (plan.mesh["fsdp"] - 1)
        notes.append(f"fsdp {plan.mesh['fsdp']}: every decode step all-gathers "
                     f"{gathered / 1e9:.1f} GB of weights per device over ICI, which this "
                     "roofline does not count (tensor parallelism moves only activations)")
    if kv > RELEASE_KV_SLOTS:
        notes.append(f"the planned row fills {traj.peak} cache slots, more than the release's "
                     f"{RELEASE_KV_SLOTS}: the cache has {kv} slots per row")
    per_row = mem["kv cache"] / max(plan.rows or multiple, 1) * multiple
    notes.append(f"KV cache {kv} + {traj.scratch} scratch slots per row (scratch: one prefill "
                 f"chunk; rows a re-prefill does not serve write over their own slots), "
                 f"{per_row / GIB:.2f} GiB per row")
    return notes


def eval_shapes(cfg, traj: Trajectory):
    """The engine's static shapes (`shapes.RolloutShapes`) for the planned eval row: a cache of
    `resolve_kv_slots` + one prefill chunk of scratch, the prompt bucket, frames_per_call images
    of the row's image size per response, a window of one response's images (the release keeps
    the last response's images only)."""
    from vrthinker_jax.rollout import frame_bank, shapes

    tc, first = cfg.trajectory, traj.prefills[0]
    return shapes.RolloutShapes(
        max_len=resolve_kv_slots(cfg.sampling, traj), response_len=traj.scratch,
        prompt_buckets=(first.static,), prompt_frames=first.groups, bank_frames=traj.bank_frames,
        frame_size=traj.image_hw, patch=frame_bank.PatchSpec.from_model_config(cfg.model),
        window=int(tc.frames_per_call), max_new_tokens=RELEASE_KV_SLOTS,
        max_turn_tokens=int(tc.max_turn_tokens))


def compile_eval(cfg, plan: EvalPlan, traj: Trajectory, graphdef, abs_params) -> list[StepPlan]:
    """AOT-compiles (libtpu) the engine's programs for `plan`'s runtime at its batch: the prompt
    insert (the video's temporal groups as frames: the same vision-tower shapes), a re-prefill
    insert (frames_per_call images) and decode. Raises PlanError when XLA finds the program
    too large for HBM. FLOPs are XLA's for one prefill pass (+ the vision tower) or one decode
    step: the engine's loops run their bodies several times."""
    import jax.numpy as jnp

    from vrthinker_jax import sharding
    from vrthinker_jax.rollout import sampler, shapes

    mcfg, sc, topo = cfg.model, cfg.sampling, plan.topology
    mesh = sharding.make_mesh(plan.mesh, devices=topology_devices(topo))
    b = plan.rows or plan.mesh["data"] * plan.mesh["fsdp"]
    # greedy, the sampling defaults' kv prefixes, the eval config's prefill chunk
    st = shapes.sampler_static(
        eval_shapes(cfg, traj), sampler.sampling_config(temperature=0.0,
                                                        prefill_chunk=int(sc.prefill_chunk)),
        **PLAN_STOPS)
    dec, ins, _ = sampler.compiled(st, graphdef)
    params, state = rollout_state_args(mesh, mcfg, st, abs_params, b,
                                       jnp.dtype(sc.cache_dtype))
    n, out, one = topo.num_devices, [], 1 if mcfg.scan_layers else None
    for p in traj.prefills[:2]:
        bank, seg = insert_args(mesh, batch=b, seg_len=p.static, frames=p.groups,
                                frame_size=p.hw, bank_frames=traj.bank_frames)
        c = int(sc.prefill_chunk) if 0 < int(sc.prefill_chunk) < p.static else p.static
        kw = dict(batch=b, seg_len=c, kv_len=st.size, frames=p.groups, frame_size=p.hw)
        name = "prompt insert" if p.name == "prompt" else "re-prefill insert"
        t0 = time.perf_counter()
        compiled = compile_or_explain(ins.lower(params, state, bank, seg), name, "rollout")
        out.append(_step_plan(
            name, f"{b} x {p.static} tok, {p.groups} frames {p.hw[0]}x{p.hw[1]}; KV {st.size}",
            compiled, prefill_flops(mcfg, **kw), topo.chip, n, t0,
            counted=prefill_flops(mcfg, layers=one, attn_trips=attention_trips(mcfg, c), **kw),
            note=f"sampler.insert; FLOPs of one {c}-token prefill pass + the vision tower"))
    t0 = time.perf_counter()
    compiled = compile_or_explain(dec.lower(params, state), "decode", "rollout")
    out.append(_step_plan("decode", f"{b} rows x 1 tok; KV {st.size}", compiled,
                          decode_flops(mcfg, batch=b, kv_len=st.size), topo.chip, n, t0,
                          counted=decode_flops(mcfg, batch=b, kv_len=st.size, layers=one),
                          note="sampler.decode; FLOPs of one step"))
    return out


def _rows(n: int) -> str:
    return f"{n} row{'' if n == 1 else 's'}"


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 2 * 3600 else f"{s / 3600:.1f} h"


def eval_table(plans: list[EvalPlan], benchmarks: dict) -> str:
    """The answer table: runtime | fits? | max rows per batch | GiB per device | time per row |
    one column per benchmark (unknown row counts: time per 1000 rows)."""
    cols = ["runtime", "fits?", "max rows per batch", "GiB per device (used / budget)",
            "time per row"]
    cols += [f"{BENCHMARK_NAMES.get(k, k)} ({int(n):,} rows)" if int(n) else
             f"{BENCHMARK_NAMES.get(k, k)} (per 1,000 rows; count unknown)"
             for k, n in benchmarks.items()]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for p in plans:
        t, mesh = p.topology, ", ".join(f"{k} {v}" for k, v in p.mesh.items() if v > 1)
        devices = f"{t.num_devices} device{'s' if t.num_devices > 1 else ''}"
        where = f"{t.name} ({devices}{': ' + mesh if mesh else ''})"
        cells = [where, "yes" if p.rows else "**no**", str(p.rows),
                 f"{p.memory['total'] / GIB:.1f} / {p.budget / GIB:.1f}", _duration(p.row_s)]
        cells += [_duration(p.benchmark_s(int(n) or 1000)) for n in benchmarks.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_eval_markdown(cfg, traj: Trajectory, plans: list[EvalPlan], source: str) -> str:
    tc, sc, mcfg = cfg.trajectory, cfg.sampling, cfg.model
    kv = resolve_kv_slots(sc, traj)
    (vh, vw), (ih, iw) = traj.video_hw, traj.image_hw
    re = traj.prefills[1:]
    # the table's benchmark columns in BENCHMARK_ROWS' order (a ConfigDict sorts its keys)
    ordered = {k: cfg.benchmarks[k] for k in [*BENCHMARK_ROWS, *sorted(cfg.benchmarks)]
               if k in cfg.benchmarks}
    lines = [f"## Eval rollout: `{cfg.preset}` preset, {cfg.size}, videos "
             f"{tc.video_size[0]}x{tc.video_size[1]}", "",
             f"- weights: {param_counts(mcfg).total / 1e9:.2f} B params in bf16 = "
             f"{2 * param_counts(mcfg).total / 1e9:.1f} GB",
             f"- row: first prompt {traj.prefills[0].tokens} tokens (the video item: "
             f"{traj.video_tokens} tokens at {vh}x{vw}); {traj.tool_calls} tool "
             f"call{'' if traj.tool_calls == 1 else 's'} of "
             f"{tc.frames_per_call} images ({traj.image_tokens} tokens each at {ih}x{iw}); "
             f"{len(traj.decodes)} turns x {tc.gen_tokens_per_turn} generated tokens; "
             + (f"re-prefills of {re[0].tokens} tokens (static {re[0].static}); " if re else "")
             + f"{traj.peak} cache slots at the end ({traj.stop})",
             f"- engine: KV cache {kv} + {traj.scratch} scratch slots per row, "
             f"{sc.cache_dtype}; prefill_chunk {sc.prefill_chunk}; attn_query_chunk "
             f"{mcfg.attn_query_chunk}; greedy; the vision tower encodes "
             + (f"{sc.vision_frames_per_pass} frame(s) per pass (the preset engine: one image "
                "or video group at a time)" if int(sc.vision_frames_per_pass)
                else "an insert's frames at once"),
             f"- source: {source}", "", eval_table(plans, ordered), ""]
    for p in plans:
        mem = ", ".join(f"{k} {v / GIB:.2f}" for k, v in p.memory.items() if k != "total")
        phases = ", ".join(f"{k} {_duration(s)} ({b})" for k, (s, b) in p.phases.items())
        lines += [f"### {p.topology.name}", "",
                  f"- GiB per device at {_rows(p.rows or p.mesh['data'] * p.mesh['fsdp'])}"
                  f"{'' if p.rows else ' (does not fit)'}: {mem}"]
        if p.rows:
            lines.append(f"- one engine call of {_rows(p.rows)}: {_duration(p.call_s)} at the "
                         f"roofline ({phases})")
        lines += [f"- {n}" for n in p.notes]
        if p.compiled:
            lines += ["", markdown_table(p.compiled)]
        lines.append("")
    return "\n".join(lines)


@functools.lru_cache(maxsize=2)
def _abstract_model_of(model_json: str):
    from vrthinker_jax.models import config as model_config

    return _abstract_model(model_config.Qwen25VLConfig.from_configdict(json.loads(model_json)))


def abstract_eval_model(model_cfg):
    """(graphdef, abstract params) of a model config, built once per config (a 7B's
    `nnx.eval_shape` takes a second or more; plans of several runtimes share it)."""
    return _abstract_model_of(model_cfg.to_json())


def run_eval_plan(cfg, topos: list[Topology], *, compile_programs: bool = False
                  ) -> tuple[str, list[EvalPlan]]:
    """Plans each runtime (and with compile_programs, AOT-compiles its programs; a program
    libtpu cannot compile is reported in the runtime's notes and the analytic plan stands)."""
    from vrthinker_jax.models import config as model_config
    from vrthinker_jax.rollout import frame_bank

    cfg.model = model_config.Qwen25VLConfig.from_configdict(cfg.model)
    sc = cfg.sampling
    traj = eval_trajectory(cfg.trajectory, frame_bank.PatchSpec.from_model_config(cfg.model),
                           prompt_multiple=int(sc.prompt_multiple),
                           response_multiple=int(sc.response_multiple),
                           chunk=int(sc.prefill_chunk))
    graphdef, abs_params = abstract_eval_model(cfg.model)
    plans = [plan_eval_runtime(cfg, t, traj, abs_params) for t in topos]
    source = "analytic model (per-device memory and roofline; no libtpu compile)"
    if compile_programs:
        source = ("analytic model, checked by AOT-compiling the engine's inserts and decode "
                  "with libtpu at each runtime's batch (tables under each runtime)")
        for p in plans:
            try:
                p.compiled = compile_eval(cfg, p, traj, graphdef, abs_params)
            except PlanError as e:
                p.notes.append(f"XLA: {e}")
            except Exception as e:  # noqa: BLE001 - libtpu may not support an old chip
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                p.notes.append(f"libtpu could not compile for {p.topology.name} ({first}); "
                               "the analytic plan stands")
    return render_eval_markdown(cfg, traj, plans, source), plans


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m vrthinker_jax.tools.plan", description=__doc__.split("\n\n")[0],
        epilog="Any field of the config is overridden with --config.FIELD=VALUE (as "
               "experiments/train.py takes it), e.g. --config.optimizer.accum_steps=8 "
               "--config.mesh.ici.tensor=4; with --eval-rollout, of the eval config, e.g. "
               "--config.sampling.prefill_chunk=1024 --config.trajectory.turns=3.")
    ap.add_argument("--config", default="", help="experiments/configs/<stage>.py:<size>")
    ap.add_argument("--topology", default="",
                    help=f"one of {', '.join(TOPOLOGIES)}; --eval-rollout: a comma list, "
                         f"default 'colab' = {','.join(COLAB_RUNTIMES)}")
    ap.add_argument("--out", default="", help="write the Markdown plan here (appends)")
    ap.add_argument("--cache-dtype", default=None, choices=("float32", "bfloat16"),
                    help="rollout KV-cache dtype (default: the config's sampling.cache_dtype)")
    ap.add_argument("--only", default=",".join(PROGRAMS),
                    help=f"comma-separated programs to compile (default all: {','.join(PROGRAMS)})")
    ev = ap.add_argument_group("eval rollout of a published checkpoint (--eval-rollout)")
    ev.add_argument("--eval-rollout", action="store_true",
                    help="plan a benchmark's eval rollout per runtime (analytic; no --config)")
    ev.add_argument("--preset", default="vr-thinker",
                    help="a published checkpoint's preset (name or .toml path)")
    ev.add_argument("--size", default="7b", help="model size (tiny, 3b, 7b)")
    ev.add_argument("--video-size", default="", metavar="HxW",
                    help="native video size (default 480x832)")
    ev.add_argument("--turn-tokens", type=int, default=0,
                    help="generated tokens per assistant turn (default 300)")
    ev.add_argument("--turns", type=int, default=0, help="assistant turns per row (default 4)")
    ev.add_argument("--kv-slots", type=int, default=None,
                    help="KV slots per row (default: 12288, or the row's need if larger)")
    ev.add_argument("--rows", action="append", default=[], metavar="BENCHMARK=N",
                    help=f"rows of a benchmark ({', '.join(BENCHMARK_ROWS)})")
    ev.add_argument("--compile", action="store_true",
                    help="also AOT-compile the engine's inserts and decode (needs libtpu)")
    return ap


def _emit(text: str, out: str) -> None:
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a") as fh:
            fh.write(text + "\n")


def _no_libtpu() -> int:
    print("plan: libtpu is not installed; install the tpu extra (`bash "
          "experiments/launch/setup_env.sh tpu`, then run with .venv-tpu/bin/python; or "
          "pip install -e '.[tpu]') to compile for TPU topologies", file=sys.stderr)
    return 1


def eval_config_from_args(args):
    """The eval-rollout config with the CLI's shortcuts and then its --config.KEY=VALUE
    overrides (args.overrides) applied."""
    cfg = eval_rollout_config(args.size, args.preset)
    tc = cfg.trajectory
    if args.video_size:
        h, x, w = args.video_size.lower().partition("x")
        if not (x and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
            raise PlanError(f"--video-size {args.video_size!r}: expected HxW, e.g. 480x832")
        tc.video_size = (int(h), int(w))
    if args.turn_tokens:
        tc.gen_tokens_per_turn = args.turn_tokens
    if args.turns:
        tc.turns = args.turns
    if args.kv_slots is not None:
        cfg.sampling.kv_slots = args.kv_slots
    for item in args.rows:
        name, eq, n = item.partition("=")
        if not eq or name not in BENCHMARK_ROWS or not n.isdigit():
            raise PlanError(f"--rows {item!r}: expected NAME=N with NAME one of "
                            f"{', '.join(BENCHMARK_ROWS)}")
        cfg.benchmarks[name] = int(n)
    return cli.override_config(cfg, args.overrides, PlanError)


def _eval_main(args) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # plan (and compile) for TPU on a CPU
    try:
        names = (COLAB_RUNTIMES if args.topology in ("", "colab")
                 else [t for t in args.topology.split(",") if t])
        topos = [get_topology(t) for t in names]
        if args.compile and not libtpu_available():
            return _no_libtpu()
        text, plans = run_eval_plan(eval_config_from_args(args), topos,
                                    compile_programs=args.compile)
    except PlanError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    _emit(text, args.out)
    return 0 if all(p.rows for p in plans) else 3


def parse_args(argv=None) -> argparse.Namespace:
    """The CLI's arguments; its `--config.KEY=VALUE` overrides in args.overrides (anything
    else unknown is a PlanError)."""
    args, extra = _parser().parse_known_args(argv)
    args.overrides = cli.split_config_overrides(extra, PlanError)
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except PlanError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    if args.eval_rollout:
        return _eval_main(args)
    try:
        if not args.config or not args.topology:
            raise PlanError("--config and --topology are required (or --eval-rollout)")
        topo = get_topology(args.topology)
        if not libtpu_available():
            return _no_libtpu()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU, run nothing on it
        cfg = cli.load_config(args.config, args.overrides, PlanError)
        cache_dtype = args.cache_dtype or cfg.sampling.cache_dtype
        header, plans, tips = make_plan(cfg, topo, cache_dtype=cache_dtype,
                                        programs=tuple(p for p in args.only.split(",") if p))
    except PlanError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 3 if isinstance(e, DoesNotFit) else 2
    _emit(render_markdown(header, plans, tips), args.out)
    return 0 if not tips else 3


if __name__ == "__main__":
    sys.exit(main())
