"""The rollout engine's static shapes and the layout of its state on a mesh.

One home for what must be known before a rollout runs, shared by the engine
(`engine.RolloutEngine`, which compiles and runs these shapes) and the fit planner
(`tools/plan.py`, which AOT-compiles them for a TPU topology): the KV-cache slots per row, the
static insert lengths and frame counts, the frame bank, how every state and segment array is
split over the mesh, and how many rows one engine call of a training stage holds. Pure functions
of config values; nothing here runs the model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vrthinker_jax import sharding
from vrthinker_jax.models import model as model_lib
from vrthinker_jax.rollout import frame_bank, protocol, sampler


@dataclasses.dataclass(frozen=True)
class RolloutShapes:
    """Static shapes of one engine's compiled calls (per row; rows are the caller's batch).

    max_len: real KV-cache slots per row (prompt + all turns + all frames);
    response_len: static length R of a tool-response insert, tokens (the worst response; the
      engine measures it with its tokenizer);
    prompt_buckets: static prompt-insert lengths, increasing (a prompt pads up to the next);
    prompt_frames: frames of the prompt insert (both videos' initial frames);
    bank_frames: candidate frames in a row's frame bank, both videos;
    frame_size: (H, W) pixels of a bank frame; patch: how a frame becomes patches;
    window: frame occurrences the memory window holds (W);
    max_new_tokens, max_turn_tokens: generated tokens per rollout (all turns) and per turn.
    """

    max_len: int
    response_len: int
    prompt_buckets: tuple[int, ...]
    prompt_frames: int
    bank_frames: int
    frame_size: tuple[int, int]
    patch: frame_bank.PatchSpec
    window: int
    max_new_tokens: int
    max_turn_tokens: int

    @property
    def scratch(self) -> int:
        """Cache slots past max_len: rows an insert does not serve write their padded segment
        there (static shapes mean every row computes every step)."""
        return max(self.response_len, 1)

    @property
    def cache_slots(self) -> int:
        """S = max_len + scratch: the cache and per-slot state length of every row."""
        return self.max_len + self.scratch

    @property
    def tokens_per_frame(self) -> int:
        return self.patch.tokens_per_frame(*self.frame_size)

    def prompt_bucket(self, n: int) -> int:
        """The static prompt length for a prompt of n tokens: the smallest bucket >= n."""
        for b in self.prompt_buckets:
            if n <= b:
                return b
        raise ValueError(f"sampling.prompt_buckets: prompt of {n} tokens exceeds the largest "
                         f"bucket {self.prompt_buckets[-1]}")

    def bank_shape(self, rows: int) -> tuple[int, ...]:
        """uint8 [rows, bank_frames, H, W, 3]: the candidate frames of `rows` rows."""
        return (int(rows), self.bank_frames, *self.frame_size, 3)


def tokens_per_frame(model_cfg, frame_size: Sequence[int]) -> int:
    """Visual tokens of one frame of frame_size (H, W) pixels (after the 2x2 merge)."""
    h, w = (int(x) for x in frame_size)
    return frame_bank.PatchSpec.from_model_config(model_cfg).tokens_per_frame(h, w)


def rollout_shapes(model_cfg, protocol_cfg: protocol.ProtocolConfig, sampling_cfg,
                   frame_size: Sequence[int], *, response_len: int) -> RolloutShapes:
    """The engine's static shapes for these configs (`sampler.sampling_config()` knobs;
    frame_size (H, W) in pixels, multiples of patch x merge). Raises ValueError naming the
    field when the configs cannot work together."""
    if protocol_cfg.max_frames_per_call > protocol_cfg.memory_window:
        raise ValueError("protocol: max_frames_per_call must not exceed memory_window")
    max_len = int(sampling_cfg.max_len)
    buckets = tuple(sorted(int(b) for b in sampling_cfg.prompt_buckets))
    if buckets[-1] > max_len:
        raise ValueError(f"sampling: largest prompt bucket {buckets[-1]} exceeds max_len "
                         f"{max_len}")
    h, w = (int(x) for x in frame_size)
    return RolloutShapes(
        max_len=max_len, response_len=int(response_len), prompt_buckets=buckets,
        prompt_frames=len(protocol.initial_frames(protocol_cfg)),
        bank_frames=int(protocol_cfg.total_frames), frame_size=(h, w),
        patch=frame_bank.PatchSpec.from_model_config(model_cfg),
        window=int(protocol_cfg.memory_window),
        max_new_tokens=int(sampling_cfg.max_new_tokens),
        max_turn_tokens=int(sampling_cfg.max_turn_tokens),
    )


def sampler_static(shapes: RolloutShapes, sampling_cfg, *,
                   stop_tool: tuple[tuple[int, ...], ...], stop_end: tuple[tuple[int, ...], ...],
                   vocab_limit: int = 0, banned_ids: tuple[int, ...] = ()) -> sampler.Static:
    """The compiled sampler's static settings: `shapes` plus the knobs of `sampling_cfg` (a
    `sampler.sampling_config()`, where each knob's default lives). The token ids
    (stop sequences, vocab_limit, banned ids) come from the caller's tokenizer; they change
    which ids are compared or masked, never a shape."""
    return sampler.Static(
        max_len=shapes.max_len, scratch=shapes.scratch, window=shapes.window,
        tokens_per_frame=shapes.tokens_per_frame, stop_tool=stop_tool, stop_end=stop_end,
        temperature=float(sampling_cfg.temperature), top_k=int(sampling_cfg.top_k),
        top_p=float(sampling_cfg.top_p), max_new_tokens=shapes.max_new_tokens,
        max_turn_tokens=shapes.max_turn_tokens, patch=shapes.patch,
        serve_fraction=float(sampling_cfg.serve_fraction),
        kv_buckets=int(sampling_cfg.insert_kv_buckets),
        prefill_chunk=int(sampling_cfg.prefill_chunk),
        vocab_limit=int(vocab_limit), banned_ids=tuple(banned_ids),
    )


# --------------------------------------------------------------------------- layout on a mesh


def init_state(model_cfg, rows: int, static: sampler.Static, cache_dtype,
               rng) -> sampler.RolloutState:
    """An empty `sampler.RolloutState` of `rows` rows (the KV cache
    [layers, rows, kv_heads, S, head_dim] in cache_dtype; S = static.size): what the engine
    starts every rollout from."""
    return sampler.init_state(model_lib.init_cache, model_cfg, rows, static, rng, cache_dtype)


def abstract_state(model_cfg, rows: int, static: sampler.Static,
                   cache_dtype) -> sampler.RolloutState:
    """ShapeDtypeStructs of `init_state` (the planner's and the engine's shardings)."""
    return jax.eval_shape(
        functools.partial(init_state, model_cfg, rows, static, cache_dtype), jax.random.key(0))


def state_shardings(mesh: Mesh, state: sampler.RolloutState,
                    rules=sharding.DEFAULT_RULES) -> sampler.RolloutState:
    """NamedShardings of a RolloutState (abstract or real) on `mesh`: every array split over
    the batch axes of `rules` (the KV cache [layers, b, kv_heads, S, head_dim] and positions
    [3, b, S] at dim 1, the cache not over kv heads; the rest at dim 0), scalars and the key
    replicated."""
    rep = NamedSharding(mesh, PartitionSpec())

    def rows(x, dim=0):
        return sharding.batch_sharding(mesh, x.ndim, dim, rules) if x.ndim else rep

    out = jax.tree.map(rows, state)
    return out.replace(cache=jax.tree.map(lambda x: rows(x, 1), state.cache),
                       positions=rows(state.positions, 1), rng=rep)


def abstract_segment(rows: int, length: int, frames: int) -> sampler.Segment:
    """ShapeDtypeStructs of one insert's `sampler.Segment`: tokens int32 [rows, length],
    positions int32 [3, rows, length], frames / frame_offsets int32 [rows, frames], length /
    next_pos / event_offset int32 [rows], serve bool [rows]."""
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    return sampler.Segment(
        tokens=sds((rows, length), i32), length=sds((rows,), i32),
        positions=sds((3, rows, length), i32), next_pos=sds((rows,), i32),
        frames=sds((rows, frames), i32), frame_offsets=sds((rows, frames), i32),
        event_offset=sds((rows,), i32), serve=sds((rows,), jnp.bool_))


def segment_shardings(mesh: Mesh, rules=sharding.DEFAULT_RULES) -> sampler.Segment:
    """NamedShardings of a Segment on `mesh`: rows split over the batch axes of `rules`
    (positions [3, b, R] at dim 1, every other field at dim 0)."""
    like = abstract_segment(1, 1, 1)
    return sampler.Segment(**{
        f.name: sharding.batch_sharding(mesh, getattr(like, f.name).ndim,
                                        1 if f.name == "positions" else 0, rules)
        for f in dataclasses.fields(like)})


# --------------------------------------------------------------------------- rows per call


def rft_prompts_per_call(cfg) -> int:
    """Prompts of one RFT engine call: data.batch_size // samples_per_prompt (at least one),
    each rolled out samples_per_prompt times."""
    return max(1, int(cfg.data.batch_size) // int(cfg.samples_per_prompt))


def rows_per_call(cfg) -> int:
    """Global rows (all processes together) of one rollout-engine call of a stage config:

    * grpo: grpo.rollout_batch, or (0) all prompts_per_step x group_size rows at once; it must
      divide them (the step rolls them out in several calls);
    * rft: rft_prompts_per_call x samples_per_prompt (the learner's data.batch_size, rounded
      down to whole prompts);
    * any other stage rolls nothing out: 0.
    """
    if cfg.stage == "grpo":
        g = cfg.grpo
        rows = int(g.prompts_per_step) * int(g.group_size)
        per_call = int(g.rollout_batch) or rows
        if rows % per_call:
            raise ValueError(f"grpo.rollout_batch={per_call} must divide prompts_per_step x "
                             f"group_size = {rows}")
        return per_call
    if cfg.stage == "rft":
        return rft_prompts_per_call(cfg) * int(cfg.samples_per_prompt)
    return 0
