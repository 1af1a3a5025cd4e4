"""Ahead-of-time fit planner: compiles the learner and rollout steps for a TPU topology on a CPU.

    python -m vrthinker_jax.tools.plan --config experiments/configs/grpo.py:7b --topology v5p-64 \
        [--out plan.md] [--set optimizer.accum_steps=8 --set mesh.ici.tensor=4 ...]

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

For each it reports XLA's per-chip memory (arguments, temporaries, total vs the chip's HBM), the
compiled FLOPs against an analytic count, and a roofline step time and MFU from the chip's peak
bf16 FLOP/s and HBM bandwidth (a lower bound on time / upper bound on MFU: no communication, no
overlap losses). Nothing is installed at run time.

Exit status: 0 every program fits in HBM_BUDGET of a chip's HBM; 3 something does not (the plan
says which knob to turn); 1 libtpu is not installed; 2 bad input (topology, config, override).
`--only learner,decode` compiles a subset (each 7B compile takes minutes on a small CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import time

from vrthinker_jax import cli

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip. hbm_bytes: HBM capacity; peak_flops: dense bf16 FLOP/s; hbm_bw: bytes/s."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bw: float


# Per-chip numbers from Google Cloud's TPU system-architecture pages:
#   v5p: https://cloud.google.com/tpu/docs/v5p  (95 GB HBM2e, 459 bf16 TFLOP/s, 2765 GB/s)
#   v5e: https://cloud.google.com/tpu/docs/v5e  (16 GB HBM2, 197 bf16 TFLOP/s, 819 GB/s)
#   v6e: https://cloud.google.com/tpu/docs/v6e  (32 GB HBM, 918 bf16 TFLOP/s, 1640 GB/s)
#   v4:  https://cloud.google.com/tpu/docs/v4   (32 GiB HBM2, 275 bf16 TFLOP/s, 1228 GB/s)
# HBM "GB" on those pages is GiB of usable memory as JAX reports it (v5e 16 GiB, v6e 32 GiB).
CHIPS = {
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9),
    "v4": Chip("v4", 32 * GIB, 275e12, 1228e9),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice (Cloud TPU naming) -> jax topology string, slice count and chip type.

    Cloud names count TensorCores for v4/v5p (2 per chip: v5p-64 = 32 chips) and chips for
    v5e/v6e (v5e-256 = 256 chips).
    """

    name: str
    jax_name: str  # `jax.experimental.topologies.get_topology_desc(topology_name=...)`
    num_slices: int
    chip: Chip

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(x) for x in self.jax_name.split(":")[1].split("x"))

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices


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
    )
}

# the share of HBM a plan may use: XLA's estimate misses runtime buffers and fragmentation
HBM_BUDGET = 0.85


class PlanError(ValueError):
    """A bad planner input (unknown topology, config path, override)."""


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
    chunk = int(model_cfg.get("attn_query_chunk", 0) or 0)
    return math.ceil(q_len / chunk) if 0 < chunk < q_len else 1


def head_trips(model_cfg, seq: int) -> int:
    """Iterations of the loss's vocabulary-projection loop (`model.lm_head_chunk`) over the
    seq - 1 predicted positions; XLA's cost analysis counts the loop body once."""
    chunk = int(model_cfg.get("lm_head_chunk", 0) or 0)
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
        if p.name.startswith("learner"):
            tips = []
            if not ctx.get("remat"):
                tips.append("set model.remat=True (recompute blocks in the backward pass)")
            accum = ctx.get("accum", 1)
            max_accum = ctx.get("max_accum", accum * need)  # micro-batch >= the batch shards
            if p.temp_bytes > p.argument_bytes and accum < max_accum:
                tips.append(f"cut the learner micro-batch (--set optimizer.accum_steps="
                            f"{min(accum * need, max_accum)}: activations scale with it)")
            if p.argument_bytes > 0.3 * p.hbm_bytes:
                tips.append("shard the state over more chips (mesh.ici.fsdp; keep "
                            "data=1) or keep Adam moments in bf16 (optimizer.state_dtype=param)")
            chunk = ctx.get("attn_chunk")
            if chunk is None:
                tips.append("the dense [seq, seq] attention scores dominate long rows: the "
                            "model needs query-chunked (or splash) attention")
            elif not chunk:
                tips.append("chunk the attention scores (--set model.attn_query_chunk=2048)")
            if not ctx.get("lm_head_chunk"):
                tips.append("project the loss's logits in chunks (--set "
                            "model.lm_head_chunk=2048)")
            out.append(head + " " + "; ".join(tips))
        else:
            rows = ctx.get("rollout_batch") or 0
            out.append(head + f" roll out fewer rows per engine call (--set grpo.rollout_batch="
                       f"{max(1, rows // need)}), a bf16 KV cache (--set sampling.cache_dtype="
                       "bfloat16), or more chips on the batch axes")
    return out


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


def load_config(spec: str):
    """'path/to/config.py:arg' -> the ConfigDict its `get_config(arg)` returns."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise PlanError(f"--config: no such file {path!r}")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    if root not in sys.path:  # experiments/configs/x.py imports `experiments.configs.common`
        sys.path.insert(0, root)
    mod_spec = importlib.util.spec_from_file_location("_plan_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise PlanError(f"--config: {path} has no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def apply_overrides(cfg, overrides: list[str]):
    """`a.b.c=value` (Python literal, or a bare string) for each override."""
    return cli.apply_overrides(cfg, overrides, PlanError)


# --------------------------------------------------------------------------- compile


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topo: Topology):
    # no TPU is opened, so planners may run side by side (libtpu otherwise takes a lock file)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kw = {"num_slices": topo.num_slices} if topo.num_slices > 1 else {}
    return topologies.get_topology_desc(topology_name=topo.jax_name, platform="tpu", **kw).devices


def mesh_for(cfg, devices, num_slices: int):
    """The config's mesh over the topology's devices. Multi-slice: a config whose dcn axes are
    all 1 gets dcn data = number of slices (pure data parallelism across slices)."""
    from vrthinker_jax import sharding

    ici = {k: int(v) for k, v in dict(cfg.mesh.ici).items()}
    dcn = {k: int(v) for k, v in dict(cfg.mesh.get("dcn") or {}).items()}
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
    "rollout": "lower grpo.rollout_batch (rows per engine call), set "
               "sampling.cache_dtype=bfloat16, or shard over more chips",
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
        raise PlanError(f"{name} does not fit: {detail} - {_OOM_TIPS[kind]}") from None


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
        hbm_bytes=chip.hbm_bytes, flops_compiled=float(cost.get("flops", 0.0)),
        flops_analytic=analytic["expected"] / n_chips, flops_model=analytic["model"] / n_chips,
        bytes_accessed=float(cost.get("bytes accessed", 0.0)), peak_flops=chip.peak_flops,
        hbm_bw=chip.hbm_bw, compile_s=time.perf_counter() - t0, note=note,
    )


def _abstract_model(model_cfg):
    from flax import nnx

    from vrthinker_jax.models import model as model_lib

    model = nnx.eval_shape(lambda: model_lib.Qwen25VL(model_cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def learner_batch(cfg) -> int:
    accum = int(cfg.optimizer.get("accum_steps", 1) or 1)
    rows = (int(cfg.grpo.prompts_per_step) * int(cfg.grpo.group_size)
            if cfg.get("stage") == "grpo" else int(cfg.data.batch_size))
    if rows % accum:
        raise PlanError(f"learner batch {rows} is not divisible by optimizer.accum_steps={accum}")
    return rows // accum


def plan_learner(cfg, mesh, graphdef, abs_params, chip: Chip, n_chips: int) -> StepPlan:
    import jax
    import jax.numpy as jnp

    from vrthinker_jax import sharding
    from vrthinker_jax.rollout import frame_bank
    from vrthinker_jax.train import steps

    mcfg = cfg.model
    kind = "grpo" if cfg.get("stage") == "grpo" else "sft"
    b, s, f = learner_batch(cfg), int(cfg.data.seq_len), int(cfg.data.max_frames)
    multiple = sharding.batch_size_multiple(mesh)
    if b % multiple:
        raise PlanError(f"learner batch {b} is not a multiple of the mesh's batch axes "
                        f"({multiple}); change optimizer.accum_steps or mesh")
    h, w = (int(x) for x in cfg.data.frame_size)
    sds = jax.ShapeDtypeStruct
    batch = {
        "tokens": sds((b, s), jnp.int32), "positions": sds((3, b, s), jnp.int32),
        "valid": sds((b, s), jnp.bool_), "loss_mask": sds((b, s), jnp.bool_),
        "visible_until": sds((b, s), jnp.int32), "frames": sds((b, f, h, w, 3), jnp.uint8),
        "weight": sds((b,), jnp.float32),
    }
    static = {}
    if kind == "grpo":
        g = cfg.grpo
        batch.update(old_logp=sds((b, s), jnp.float32), ref_logp=sds((b, s - 1), jnp.float32),
                     advantages=sds((b,), jnp.float32))
        static = dict(temperature=float(cfg.sampling.temperature) or 1.0,
                      clip_eps=float(g.clip_eps), clip_eps_high=g.clip_eps_high,
                      kl_coef=float(g.kl_coef))
    tx = steps.make_optimizer(cfg.optimizer)
    abs_state = jax.eval_shape(lambda p: steps.init_train_state(p, tx), abs_params)
    spec = steps.StepSpec(frame_bank.PatchSpec.from_model_config(mcfg), int(mcfg.image_token_id))
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


def rollout_static(cfg, *, scratch: int):
    """The sampler's static settings for the config (stop sequences are placeholders: they only
    change which token ids are compared, not shapes or cost). The insert is planned as one pass
    over the segment attending the whole cache (`sampling.prefill_chunk=0`, as the 3b/7b configs
    ship; `insert_kv_buckets` prefixes only ever read less)."""
    from vrthinker_jax.rollout import frame_bank, sampler

    mcfg, sc = cfg.model, cfg.sampling
    patch = frame_bank.PatchSpec.from_model_config(mcfg)
    h, w = (int(x) for x in cfg.data.frame_size)
    return sampler.Static(
        max_len=int(sc.max_len), scratch=int(scratch), window=int(cfg.protocol.memory_window),
        tokens_per_frame=patch.tokens_per_frame(h, w), image_pad_id=int(mcfg.image_token_id),
        stop_tool=((1,),), stop_end=((2,), (3,)), temperature=float(sc.temperature),
        top_k=int(sc.top_k), top_p=float(sc.top_p), max_new_tokens=int(sc.max_new_tokens),
        max_turn_tokens=int(sc.max_turn_tokens), patch=patch,
    )


def response_len_estimate(cfg, tokens_per_frame: int) -> int:
    """Static length of a tool-response insert (the engine measures it with the tokenizer): a
    full call's frames, each with its vision markers and a short caption, plus the response text.
    Only the rollout's scratch slots depend on it."""
    m = int(cfg.protocol.max_frames_per_call)
    return int(math.ceil((m * (tokens_per_frame + 16) + 256) / 16) * 16)


def plan_rollout(cfg, mesh, graphdef, abs_params, chip: Chip, n_chips: int,
                 cache_dtype, programs=("prefill", "decode")) -> list[StepPlan]:
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from vrthinker_jax import sharding
    from vrthinker_jax.models import model as model_lib
    from vrthinker_jax.rollout import sampler

    mcfg, pc = cfg.model, cfg.protocol
    b = rollout_batch(cfg)
    multiple = sharding.batch_size_multiple(mesh)
    if b % multiple:
        raise PlanError(f"rollout batch {b} is not a multiple of the mesh's batch axes "
                        f"({multiple})")
    h, w = (int(x) for x in cfg.data.frame_size)
    tpf = sampler.frame_bank.PatchSpec.from_model_config(mcfg).tokens_per_frame(h, w)
    st = rollout_static(cfg, scratch=response_len_estimate(cfg, tpf))
    dec, ins, _ = sampler.compiled(st, graphdef)

    # the engine's layout: every state array split over the batch axes (the cache and
    # positions at dim 1), the key replicated; params by their logical axes
    abs_st = jax.eval_shape(
        lambda k: sampler.init_state(model_lib.init_cache, mcfg, b, st, k, cache_dtype),
        jax.random.key(0))
    rep = NamedSharding(mesh, PartitionSpec())

    def bs(x, dim=0):
        return sharding.batch_sharding(mesh, x.ndim, dim) if x.ndim else rep

    st_sh = jax.tree.map(bs, abs_st)
    st_sh = st_sh.replace(cache=jax.tree.map(functools.partial(bs, dim=1), abs_st.cache),
                          positions=bs(abs_st.positions, 1), rng=rep)
    state = _with_shardings(abs_st, st_sh)
    params = _with_shardings(abs_params, sharding.state_shardings(abs_params, mesh))
    total = 2 * int(pc.num_candidates)
    sds = jax.ShapeDtypeStruct
    bank = sds((b, total, h, w, 3), jnp.uint8,
               sharding=sharding.batch_sharding(mesh, 5))
    r = max(int(x) for x in cfg.sampling.prompt_buckets)
    nf = 2 * int(pc.num_initial_frames)

    def seg_arr(shape, dtype, dim=0):
        return sds(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), dim))

    seg = sampler.Segment(
        tokens=seg_arr((b, r), jnp.int32), length=seg_arr((b,), jnp.int32),
        positions=seg_arr((3, b, r), jnp.int32, 1), next_pos=seg_arr((b,), jnp.int32),
        frames=seg_arr((b, nf), jnp.int32), frame_offsets=seg_arr((b, nf), jnp.int32),
        event_offset=seg_arr((b,), jnp.int32), serve=seg_arr((b,), jnp.bool_),
    )
    kv = st.size
    cache_gib = kv_cache_bytes(mcfg, batch=b, slots=kv,
                               dtype_bytes=jnp.dtype(cache_dtype).itemsize) / GIB
    out = []
    pkw = dict(batch=b, seg_len=r, kv_len=kv, frames=nf, frame_size=(h, w))
    if "prefill" in programs:
        trips = attention_trips(mcfg, r)
        t0 = time.perf_counter()
        c_ins = compile_or_explain(ins.lower(params, state, bank, seg), "rollout prefill",
                                   "rollout")
        out.append(_step_plan(
            "rollout prefill", f"{b} x {r} tok, {nf} frames; KV {kv}", c_ins,
            prefill_flops(mcfg, **pkw), chip, n_chips, t0,
            counted=(prefill_flops(mcfg, layers=1 if mcfg.scan_layers else None,
                                   attn_trips=trips, **pkw)
                     if mcfg.scan_layers or trips > 1 else None),
            note=f"engine's compiled sampler.insert (prompt bucket {r}); KV cache "
                 f"{cache_gib:.1f} GiB in all, {jnp.dtype(cache_dtype).name}; frame banks "
                 f"{b * total * h * w * 3 / GIB:.1f} GiB in all",
        ))
    if "decode" in programs:
        t0 = time.perf_counter()
        c_dec = compile_or_explain(dec.lower(params, state), "rollout decode", "rollout")
        out.append(_step_plan(
            "rollout decode", f"{b} rows x 1 tok; KV {kv}", c_dec,
            decode_flops(mcfg, batch=b, kv_len=kv), chip, n_chips, t0,
            note="engine's compiled sampler.decode (a while loop; XLA counts its body once = "
                 "one token per row)",
            counted=decode_flops(mcfg, batch=b, kv_len=kv, layers=1) if mcfg.scan_layers else None,
        ))
    return out


def rollout_batch(cfg) -> int:
    """Rows per engine call: `grpo.rollout_batch` when the config sets it (the trainer then rolls
    out the P x G rows in several calls), else all P x G rows at once."""
    if cfg.get("stage") == "grpo":
        rows = int(cfg.grpo.prompts_per_step) * int(cfg.grpo.group_size)
        return int(cfg.grpo.get("rollout_batch") or rows)
    if cfg.get("stage") == "rft":
        return int(cfg.data.batch_size) * int(cfg.get("samples_per_prompt", 1))
    return 0


PROGRAMS = ("learner", "prefill", "decode")


def make_plan(cfg, topo: Topology, *, cache_dtype: str = "float32",
              programs=PROGRAMS) -> tuple[dict, list[StepPlan], list[str]]:
    """Compiles the config's `programs` (of PROGRAMS) for `topo`; returns (header, plans,
    suggestions)."""
    import jax.numpy as jnp

    from vrthinker_jax import sharding
    from vrthinker_jax.models import config as model_config

    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise PlanError(f"--only: unknown programs {sorted(unknown)}; expected {PROGRAMS}")
    cfg.model = model_config.Qwen25VLConfig.from_configdict(cfg.model)
    devices = topology_devices(topo)
    mesh = mesh_for(cfg, devices, topo.num_slices)
    graphdef, abs_params = _abstract_model(cfg.model)
    n = len(devices)
    counts = param_counts(cfg.model)
    plans = []
    if "learner" in programs:
        plans.append(plan_learner(cfg, mesh, graphdef, abs_params, topo.chip, n))
    rb = rollout_batch(cfg)
    wanted = tuple(p for p in ("prefill", "decode") if p in programs)
    if wanted and rb:
        plans += plan_rollout(cfg, mesh, graphdef, abs_params, topo.chip, n,
                              jnp.dtype(cache_dtype), wanted)
    header = {
        "config": f"{cfg.get('stage', '?')}:{cfg.get('size', '?')}",
        "topology": f"{topo.name} ({topo.jax_name}{f' x {topo.num_slices} slices' if topo.num_slices > 1 else ''}, {n} chips, "  # noqa: E501
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
    ctx = {"remat": bool(cfg.model.remat), "accum": int(cfg.optimizer.accum_steps),
           "rollout_batch": rb, "attn_chunk": cfg.model.get("attn_query_chunk"),
           "lm_head_chunk": cfg.model.get("lm_head_chunk"),
           "max_accum": learner_batch(cfg) * int(cfg.optimizer.accum_steps)
           // sharding.batch_size_multiple(mesh)}
    return header, plans, suggestions(plans, ctx)


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vrthinker_jax.tools.plan",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="experiments/configs/<stage>.py:<size>")
    ap.add_argument("--topology", required=True, help=f"one of {', '.join(TOPOLOGIES)}")
    ap.add_argument("--out", default="", help="write the Markdown plan here (appends)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set optimizer.accum_steps=8")
    ap.add_argument("--cache-dtype", default=None, choices=("float32", "bfloat16"),
                    help="rollout KV-cache dtype (default: the config's sampling.cache_dtype)")
    ap.add_argument("--only", default=",".join(PROGRAMS),
                    help=f"comma-separated programs to compile (default all: {','.join(PROGRAMS)})")
    args = ap.parse_args(argv)
    try:
        topo = get_topology(args.topology)
        if not libtpu_available():
            print("plan: libtpu is not installed; install the tpu extra (`bash "
                  "experiments/launch/setup_env.sh tpu`, then run with .venv-tpu/bin/python; or "
                  "pip install -e '.[tpu]') to compile for TPU topologies", file=sys.stderr)
            return 1
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU, run nothing on it
        cfg = apply_overrides(load_config(args.config), args.set)
        cache_dtype = args.cache_dtype or cfg.get("sampling", {}).get("cache_dtype", "float32")
        header, plans, tips = make_plan(cfg, topo, cache_dtype=cache_dtype,
                                        programs=tuple(p for p in args.only.split(",") if p))
    except PlanError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    text = render_markdown(header, plans, tips)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as fh:
            fh.write(text + "\n")
    return 0 if not tips else 3


if __name__ == "__main__":
    sys.exit(main())
