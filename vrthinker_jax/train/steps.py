"""Compiled training steps shared by the three stages (SFT, RFT's SFT half, GRPO).

State is explicit: `TrainState(params, opt_state, step, rng, nonfinite)` where `params` is the
model's `nnx.State` and the graph definition is static (split once, merged inside the jitted
function, the flax-NNX-examples pattern). A step is a pure function `(state, batch) -> (state,
metrics)`; `compile_step` jits it, on a mesh with explicit NamedShardings when one is given.

Batches are dicts of arrays (see `examples.py`):
  tokens int32 [b, s]; positions int32 [3, b, s]; valid bool [b, s]; loss_mask bool [b, s];
  visible_until int32 [b, s]; frames uint8 [b, f, H, W, 3]; weight float32 [b] (0 drops a row);
  GRPO adds old_logp float32 [b, s], ref_logp float32 [b, s - 1], advantages float32 [b].

Non-finite steps: when the loss or any gradient is not finite the whole update (parameters and
optimizer state, including a gradient-accumulation buffer) is discarded, `nonfinite` is
incremented and the step's metrics say `skipped = 1`.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vrthinker_jax import sharding
from vrthinker_jax.rollout import frame_bank, memory
from vrthinker_jax.train import losses

# --------------------------------------------------------------------------- optimizer


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    cd = ml_collections.ConfigDict()
    cd.lr = 1e-5  # peak learning rate
    cd.warmup_steps = 10  # optimizer steps of linear warmup from 0
    cd.total_steps = 1000  # cosine decay horizon (optimizer steps)
    cd.end_lr_ratio = 0.1  # final lr = end_lr_ratio * lr
    cd.weight_decay = 0.0  # AdamW decoupled weight decay
    cd.b1 = 0.9  # Adam first-moment decay
    cd.b2 = 0.95  # Adam second-moment decay
    cd.eps = 1e-8  # Adam epsilon
    cd.grad_clip = 1.0  # global-norm clip of the (accumulated) gradient; <= 0 disables
    cd.accum_steps = 1  # micro-batches per optimizer step (optax.MultiSteps)
    # "float32": Adam moments (and the update math) in fp32 even when params are bf16;
    # "param": moments in the params' dtype (halves optimizer memory for bf16 params).
    cd.state_dtype = "float32"
    cd.update(overrides)
    return cd


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to `lr`, cosine decay to `lr * end_lr_ratio`, in optimizer steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.end_lr_ratio,
    )


def _fp32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs `tx` on fp32 copies of grads and params; updates come back in the params' dtype."""

    def up(t):
        return jax.tree.map(
            lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, t
        )

    def init(params):
        return tx.init(up(params))

    def update(grads, state, params=None):
        updates, state = tx.update(up(grads), state, None if params is None else up(params))
        if params is not None:
            updates = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)
        return updates, state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW + warmup/cosine + global-norm clip (+ fp32 state) (+ MultiSteps accumulation)."""
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    )
    tx = optax.chain(*parts)
    if cfg.state_dtype == "float32":
        tx = _fp32_state(tx)
    elif cfg.state_dtype != "param":
        raise ValueError(f"optimizer.state_dtype: expected 'float32' or 'param', got "
                         f"{cfg.state_dtype!r}")
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(cfg.accum_steps))
    elif cfg.accum_steps < 1:
        raise ValueError(f"optimizer.accum_steps must be >= 1, got {cfg.accum_steps}")
    return tx


def lr_at(cfg: ml_collections.ConfigDict, micro_steps_applied: int) -> float:
    """Learning rate of the next optimizer step after `micro_steps_applied` finite micro-steps."""
    return float(lr_schedule(cfg)(micro_steps_applied // max(int(cfg.accum_steps), 1)))


# --------------------------------------------------------------------------- state


@struct.dataclass
class TrainState:
    """params: nnx.State of the model; opt_state: optax state; step: int32 micro-steps taken
    (skipped ones included: it is the data position); rng: uint32 [2] raw key data;
    nonfinite: int32 micro-steps skipped for a non-finite loss or gradient."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array
    nonfinite: jax.Array

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def init_train_state(
    params: nnx.State, tx: optax.GradientTransformation, seed: int = 0
) -> TrainState:
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite=jnp.zeros((), jnp.int32),
    )


def train_state_shardings(state: TrainState, mesh: Mesh, rules=sharding.DEFAULT_RULES):
    """NamedSharding pytree (a prefix of `state`): every nnx Variable (params, Adam moments,
    accumulators - all carry the params' logical axes) by its axes under `rules`, everything
    else replicated."""
    return sharding.state_shardings(state, mesh, rules)


def row_dim(key: str) -> int:
    """The batch (row) dim of a batch entry: 0, except `positions` [3, rows, seq]."""
    return 1 if key == "positions" else 0


def batch_shardings(batch: dict, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> dict:
    """Batch dim (`row_dim`) over the mesh's batch axes."""
    return {k: sharding.batch_sharding(mesh, v.ndim, row_dim(k), rules) for k, v in batch.items()}


# --------------------------------------------------------------------------- forward


@struct.dataclass
class StepSpec:
    """Static settings of a step (hashable, closed over by the jitted function).

    mesh: the mesh the step runs on (None = one device). Activations are then pinned to it
    split by rows over the batch axes (`constrain_rows`); `step_fn` fills it in.
    rules: the logical axis -> mesh axes table on `mesh` (`sharding.freeze_rules` of the
    config's `mesh.rules`: hashable); the state, batch and activations are laid out by it.
    """

    patch: frame_bank.PatchSpec = struct.field(pytree_node=False)
    mesh: Mesh | None = struct.field(pytree_node=False, default=None)
    rules: ml_collections.FrozenConfigDict = struct.field(pytree_node=False,
                                                          default=sharding.DEFAULT_RULES)


def constrain_rows(x: jax.Array, spec: StepSpec, row: int = 0,
                   seq: int | None = None) -> jax.Array:
    """x laid out with dim `row` split over the mesh's batch axes (and dim `seq`, if given, over
    the 'seq_shard' axes: sequence parallelism), the rest whole.

    Why: without it XLA's sharding propagation may follow the fsdp-sharded weights instead of
    the batch, so every chip of an fsdp group computes the activations of all its group's rows
    split along hidden (on the 7B learner that is 8x the activation memory; tools/plan.py).
    """
    if spec.mesh is None:
        return x
    logical = [None] * x.ndim
    logical[row] = "batch"
    if seq is not None:
        logical[seq] = "seq_shard"
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(spec.mesh, sharding.spec_for(logical, x.shape, spec.mesh, spec.rules)))


def _row_axes(shape, spec: StepSpec) -> tuple[str, ...]:
    """The mesh axes `constrain_rows` splits dim 0 of `shape` over (none without a mesh)."""
    if spec.mesh is None:
        return ()
    first = sharding.spec_for(["batch"] + [None] * (len(shape) - 1), shape, spec.mesh,
                              spec.rules)[0]
    return () if first is None else (first,) if isinstance(first, str) else tuple(first)


def embed_inputs(model, tokens: jax.Array, frames: jax.Array, spec: StepSpec,
                 visual: jax.Array) -> jax.Array:
    """Token embeddings with every row's frames merged at its visual positions.

    tokens int32 [b, s]; frames uint8 [b, f, H, W, 3] (the i-th frame of a row fills the i-th
    run of its visual positions; rows with fewer frames pad with anything); visual bool [b, s]:
    the positions of frame tokens, from how the row was built (a pad id in text is text).
    Returns [b, s, hidden].
    """
    from vrthinker_jax.models import model as model_lib

    embeds = constrain_rows(model.embed(tokens), spec)
    b, f = frames.shape[:2]
    if f == 0:
        return embeds
    # the vision tower per row (vmap): its window reordering then stays inside a row, so rows
    # split over devices never need each other's patches
    frames = constrain_rows(frames, spec)
    axes, pin = _row_axes(frames.shape, spec), None
    if axes:
        # inside the vmap a constraint names the per-row dims (all whole); spmd_axis_name puts
        # the rows over the batch axes. Without it XLA replicated the rows in the tower (the
        # 7B learner on v5e-256 asked for 153 GiB per chip)
        rep = NamedSharding(spec.mesh, PartitionSpec())
        pin = functools.partial(jax.lax.with_sharding_constraint, shardings=rep)
    vis = nnx.vmap(lambda m, fr: frame_bank.encode_frames(m, fr, spec.patch, pin),
                   in_axes=(None, 0), spmd_axis_name=axes or None)(model, frames)
    vis = constrain_rows(vis.reshape(b, -1, vis.shape[-1]).astype(embeds.dtype), spec)
    # the rollout's merge (frame_bank.embed_with_frames): per row, at the marked positions
    return model_lib.merge_visual_at(embeds, visual, vis)


def sequence_token_stats(
    model, batch: dict, spec: StepSpec, *, temperature: float = 1.0, entropy: bool = False
) -> tuple[jax.Array, jax.Array | None]:
    """log p(tokens[:, t+1]) float32 [b, s-1] (and the next-token entropy [b, s-1] if asked)
    at `temperature`: frames merged, memory-window mask built in-jit from the compact per-token
    form (key k visible to query q iff k <= q < visible_until[k]); the vocabulary projection
    runs `model.lm_head_chunk` positions at a time (`losses.chunked_token_stats`)."""
    embeds = embed_inputs(model, batch["tokens"], batch["frames"], spec, batch["visual"])
    mask = memory.attention_mask(batch["visible_until"], batch["valid"])
    seq = 1 if model.config.seq_parallel else None
    hidden, _ = model(batch["tokens"], batch["positions"], mask, inputs_embeds=embeds,
                      return_hidden=True, constrain=lambda x: constrain_rows(x, spec, seq=seq))
    chunk = int(model.config.lm_head_chunk)
    return losses.chunked_token_stats(hidden, batch["tokens"], model.logits, chunk,
                                      temperature=temperature, entropy=entropy)


def _row_weight(batch: dict) -> jax.Array:
    w = batch.get("weight")
    return jnp.ones(batch["tokens"].shape[:1], jnp.float32) if w is None else w


def weighted_sft_loss(lp, batch):
    """Weighted mean next-token CE over assistant tokens of rows with weight > 0.

    lp: float32 [b, s-1] log-probs of the next tokens (`sequence_token_stats`). Token weights
    are `loss_weight` when the batch has it (`data.synthesis_weight`), else 1 on the loss mask.
    Returns (loss, target_tokens). Rows are weighted by `weight` (0 drops a failed example).
    """
    mask = (batch["loss_mask"][:, 1:] & batch["valid"][:, 1:]).astype(jnp.float32)
    tw = mask if "loss_weight" not in batch else mask * batch["loss_weight"][:, 1:]
    w = _row_weight(batch)[:, None] * tw
    n = jnp.sum(w)
    return -jnp.sum(lp * w) / jnp.maximum(n, 1e-6), jnp.sum(mask * (w != 0))


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def apply_gradients(tx, state: TrainState, grads, loss) -> tuple[TrainState, dict]:
    """Optimizer update, discarded entirely (params and optimizer state) when not finite."""
    finite = jnp.isfinite(loss) & _all_finite(grads)
    # zero non-finite grads before the update so the discarded branch cannot poison anything
    safe = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, opt_state = tx.update(safe, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new = state.replace(
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        step=state.step + 1,
        nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
    )
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "skipped": (~finite).astype(jnp.int32),
        "nonfinite_total": new.nonfinite,
    }
    return new, metrics


def sft_step(
    state: TrainState, batch: dict, *, graphdef, tx, spec: StepSpec
) -> tuple[TrainState, dict]:
    """One SFT micro-step (pure; jit it with `compile_step`)."""

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        lp, _ = sequence_token_stats(model, batch, spec)
        return weighted_sft_loss(lp, batch)

    (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, metrics = apply_gradients(tx, state, grads, loss)
    metrics["target_tokens"] = n
    return state, metrics


def sequence_logprobs(
    params, batch: dict, *, graphdef, spec: StepSpec, temperature: float = 1.0
) -> jax.Array:
    """float32 [b, s-1]: log p(tokens[:, t+1]) under `params` at `temperature` (the reference
    policy's, or the old policy's when the rollout did not record them)."""
    model = nnx.merge(graphdef, params)
    return sequence_token_stats(model, batch, spec, temperature=temperature)[0]


def grpo_step(
    state: TrainState, batch: dict, *, graphdef, tx, spec: StepSpec, temperature: float,
    loss: tuple,
) -> tuple[TrainState, dict]:
    """One GRPO update: token-level clipped ratio over model-generated tokens, k3 KL.

    loss: `losses.grpo_loss_options(cfg.grpo)` as sorted (name, value) pairs (hashable: the
    compiled step is cached per setting).

    batch adds: old_logp float32 [b, s] (rollout log-prob of each generated token at its own
    position), ref_logp float32 [b, s-1] (aligned like token_logprobs), advantages float32 [b],
    weight float32 [b] (0 drops a row: groups without signal, failed rows).
    """
    mask = batch["loss_mask"][:, 1:] & batch["valid"][:, 1:] & (_row_weight(batch)[:, None] > 0)
    old = batch["old_logp"][:, 1:]
    options = dict(loss)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        logp, ent = sequence_token_stats(model, batch, spec, temperature=temperature,
                                         entropy=True)
        loss, m = losses.grpo_loss(
            logp, old, batch["ref_logp"] if options.get("kl_coef") else None,
            batch["advantages"], mask, **options)
        m["entropy"] = losses.masked_mean(jax.lax.stop_gradient(ent), mask)
        m["policy_tokens"] = jnp.sum(mask)
        return loss, m

    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, metrics = apply_gradients(tx, state, grads, loss)
    metrics.update(m)
    return state, metrics


# --------------------------------------------------------------------------- compile


STEP_KEYS = ("tokens", "positions", "valid", "loss_mask", "loss_weight", "visual",
             "visible_until", "frames", "weight", "old_logp", "ref_logp", "advantages")
STEPS = {"sft": sft_step, "grpo": grpo_step}


def compile_step(fn, state: TrainState, batch_like: dict, *, mesh: Mesh | None = None,
                 donate: bool = True, rules):
    """jax.jit of a `(state, batch) -> (state, metrics)` step.

    With a mesh, the state is laid out by its logical axes and the batch split over the batch
    axes (both by `rules`), with explicit in/out NamedShardings so the layout never drifts
    between steps; metrics come back replicated. `state` and `batch_like` only provide
    structure and shapes.
    """
    kw = {"donate_argnums": (0,)} if donate else {}
    if mesh is None:
        return jax.jit(fn, **kw)
    state_sh = train_state_shardings(state, mesh, rules)
    batch_sh = batch_shardings(batch_like, mesh, rules)
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep), **kw)


_COMPILED: dict = {}


def _config_key(cfg) -> str:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.dumps(d, sort_keys=True, default=str)


def step_fn(kind: str, *, graphdef, spec: StepSpec, optimizer: ml_collections.ConfigDict,
            state: TrainState, batch_like: dict, mesh: Mesh | None = None, **static):
    """The jitted `kind` step ('sft' | 'grpo'), cached per (model graph, spec, optimizer config,
    mesh, static settings): stages and tests that train the same model share one compile.
    The state, batch and activations are laid out by `spec.rules`.

    `state` must come from `init_train_state(..., make_optimizer(optimizer))`.
    """
    if kind not in STEPS:
        raise ValueError(f"unknown step kind {kind!r}; expected one of {sorted(STEPS)}")
    spec = spec.replace(mesh=mesh)
    key = (kind, graphdef, spec, _config_key(optimizer), mesh, tuple(sorted(static.items())))
    if key not in _COMPILED:
        fn = functools.partial(STEPS[kind], graphdef=graphdef, tx=make_optimizer(optimizer),
                               spec=spec, **static)
        _COMPILED[key] = compile_step(fn, state, batch_like, mesh=mesh, rules=spec.rules)
    return _COMPILED[key]


def place_state(state: TrainState, mesh: Mesh | None, rules) -> TrainState:
    """Puts the state on the mesh by its logical axes under `rules` (no-op without a mesh).

    The placed arrays never share buffers with `state`: the step functions donate the placed
    state, and jax.device_put of an array onto a replicated sharding over devices that include
    its own reuses its buffer (even with may_alias=False, jax 0.10.2), so the first step would
    delete the caller's array. Replicated leaves (norms, biases, the patch embedding: small) are
    copied."""
    if mesh is None:
        return state
    from vrthinker_jax import distributed

    # the shardings are a prefix of the state (one per nnx Variable): put each subtree's leaves
    placed = jax.tree.map(
        lambda s, sub: jax.tree.map(lambda x: distributed.put_value(x, s), sub),
        train_state_shardings(state, mesh, rules), state)

    def own(src, dst):
        if isinstance(src, jax.Array) and dst.sharding.is_fully_replicated:
            return jnp.copy(dst)
        return dst

    return jax.tree.map(own, state, placed)


def put_batch(batch: dict, mesh: Mesh | None, rules) -> dict:
    """This process's host rows -> global device arrays of the keys a step reads, split over
    the mesh's batch axes (of `rules`) when given (`distributed.put_rows`: in a run of P
    processes each passes its own rows and the global batch is their concatenation); other
    keys (ids, error strings, status) stay on the host."""
    from vrthinker_jax import distributed

    arrays = {k: np.asarray(v) for k, v in batch.items() if k in STEP_KEYS}
    return distributed.put_rows(arrays,
                                None if mesh is None else batch_shardings(arrays, mesh, rules))
