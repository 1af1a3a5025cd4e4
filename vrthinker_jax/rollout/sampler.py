"""Batched multi-turn sampling with a preallocated KV cache and a static frame-memory window.

Everything here is a pure function of an explicit `RolloutState`, compiled once per static shape:
`decode` (one `lax.while_loop` that generates until a row needs the environment) and `insert`
(prefills a segment - the prompt, or an environment response with its frames - into the cache at
each served row's own offset). The host loop in `engine.py` parses tool calls between the two.

Cache layout: slot i of row b holds the i-th token of that row's conversation, so the cache
doubles as the trajectory record. `max_len` slots are real; `scratch` more at the end absorb the
writes of rows that are not being served (static shapes mean every row computes every step).

Visibility (README "Protocol decisions"; the rule is `memory.py`'s): key slot k is visible to a
query at slot q iff `written[k]` and `k <= q < visible_until[k]` - the rule training uses
(`memory.attention_mask`). When a response brings frames into the W-slot memory window, the
frames it pushes out (`memory.window_update`) get `visible_until` = the slot where that
response's event starts; their keys stay in the cache, masked.

Frames: a segment's frame tokens sit where its builder put them (`Segment.frame_offsets`); the
insert merges the frames' visual tokens there and marks those slots VISUAL, never by looking for
pad ids (text may hold one), with the learner's merge (`models.model.merge_visual_at`).

Cost: attention is the part that grows with the cache, so both compiled functions attend over the
shortest of a few static cache prefixes (`Static.kv_prefixes`, `sampling.insert_kv_buckets`) that
holds every active row's keys, chosen per layer inside the executable by a `lax.switch` that only
reads the cache (one compile however long the conversation gets; writes stay in place). An insert
prefills `sampling.prefill_chunk` tokens at a time in a while loop that stops after the longest
real segment: each chunk reads only the prefix its queries can see (causal), and the padding of
the static segment length costs no decoder work, so one static response length serves every tool
response. An insert projects only each row's last token to the vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, struct

from vrthinker_jax.models import model as model_lib
from vrthinker_jax.rollout import frame_bank, memory

# row status
RUNNING, WAIT_TOOL, DONE, CAPPED = 0, 1, 2, 3
# kind of a sequence slot
EMPTY, CONTEXT, GENERATED, VISUAL = 0, 1, 2, 3


def sampling_config(**overrides) -> ml_collections.ConfigDict:
    cd = ml_collections.ConfigDict()
    cd.temperature = 1.0  # softmax temperature; 0 = greedy
    cd.top_k = 0  # keep only the k most likely tokens; 0 = off
    cd.top_p = 1.0  # keep the smallest set of tokens with this much mass; 1 = off
    cd.max_len = 4096  # KV-cache slots per row (prompt + all turns + all frames)
    cd.max_new_tokens = 1024  # tokens the model may generate per rollout, all turns together
    cd.max_turn_tokens = 512  # tokens per assistant turn before the row is capped
    cd.prompt_buckets = (512, 1024, 2048)  # static prompt lengths (pad up to the next one)
    # leave the decode loop (to serve tool calls) once this fraction of the live rows waits for
    # the environment: 0 = as soon as one row waits (least idling), 1 = when no row decodes
    # (fewest inserts; each insert costs a full-batch prefill)
    cd.serve_fraction = 0.5
    # never draw ids >= the tokenizer's vocab_size (the model's embedding table is padded past
    # it, as Qwen's is); log-probs stay those of the full softmax the learner recomputes
    cd.restrict_to_tokenizer_vocab = True
    # inserts (each prefill chunk) and decode steps attend over the shortest of this many static
    # cache prefixes (equal fractions of the cache) that holds every key their active rows see:
    # all of them live in one compiled function (a lax.switch), so early turns and early prefill
    # chunks stop paying for the whole cache without extra compiles; more prefixes waste fewer
    # keys but compile longer (16 vs 4: rollout_bench K=6 1.39 -> 1.08 s on CPU, first rollout
    # ~3 s slower); 1 = always attend over the whole cache (cheapest compile)
    cd.insert_kv_buckets = 16
    # inserts prefill this many tokens at a time (a while loop over chunks, in one executable):
    # chunk j attends only over the keys up to its own end, and chunks after the longest real
    # segment are skipped, so the padding of a segment's static length costs no decoder work;
    # smaller chunks skip more but make more (smaller) passes over the weights; 0 = the whole
    # segment in one pass
    cd.prefill_chunk = 64
    # KV-cache dtype of the trainers' rollout engines ('float32' | 'bfloat16'): bf16 halves the
    # cache, the largest rollout buffer at 7B (tools/plan.py)
    cd.cache_dtype = "float32"
    cd.update(overrides)
    return cd


@struct.dataclass
class RolloutState:
    """All per-row rollout state; S = max_len + scratch slots."""

    cache: object  # the model's KVCache, leaves [layers, b, kv_heads, S, head_dim]
    cache_index: jax.Array  # int32 [b] next free slot
    next_pos: jax.Array  # int32 [b] M-RoPE position of the next text token
    written: jax.Array  # bool [b, S] slot holds a real token
    visible_until: jax.Array  # int32 [b, S]
    tokens: jax.Array  # int32 [b, S]
    kind: jax.Array  # int8 [b, S] EMPTY / CONTEXT / GENERATED / VISUAL
    logp: jax.Array  # float32 [b, S] log-prob of generated tokens (0 elsewhere)
    positions: jax.Array  # int32 [3, b, S]
    next_logits: jax.Array  # float32 [b, vocab] logits for the next token
    status: jax.Array  # int32 [b] RUNNING / WAIT_TOOL / DONE / CAPPED
    n_generated: jax.Array  # int32 [b] generated tokens, all turns
    turn_tokens: jax.Array  # int32 [b] generated tokens in the current turn
    memory: memory.FrameMemory
    rng: jax.Array  # one key (typed)


@struct.dataclass
class Segment:
    """A batch of context pieces to prefill, one per row (right-padded to a static length R).

    tokens int32 [b, R] (frame tokens are image-pad ids); length int32 [b] real tokens;
    positions int32 [3, b, R] M-RoPE positions, already offset by each row's next position;
    next_pos int32 [b] text position after the piece; frames int32 [b, F] global frame numbers
    in order of appearance (0 = none); frame_offsets int32 [b, F] offset of each frame's first
    visual token in the piece (its `tokens_per_frame` tokens from there are where the insert
    merges the frame: `segment_visual`); event_offset int32 [b] offset where the environment
    event starts (frames evicted by this piece are masked from there on); serve bool [b] rows
    that receive it.
    """

    tokens: jax.Array
    length: jax.Array
    positions: jax.Array
    next_pos: jax.Array
    frames: jax.Array
    frame_offsets: jax.Array
    event_offset: jax.Array
    serve: jax.Array


@dataclasses.dataclass(frozen=True)
class Static:
    """Static (hashable) settings closed over by the compiled functions."""

    max_len: int
    scratch: int
    window: int
    tokens_per_frame: int
    stop_tool: tuple[tuple[int, ...], ...]  # token sequences that end a turn with a tool call
    stop_end: tuple[tuple[int, ...], ...]  # token sequences that end the conversation
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    max_turn_tokens: int
    patch: frame_bank.PatchSpec
    vocab_limit: int = 0  # draw only ids < this (0 = any id)
    serve_fraction: float = 0.0  # see sampling_config
    kv_buckets: int = 1  # sampling_config.insert_kv_buckets
    prefill_chunk: int = 0  # sampling_config.prefill_chunk
    banned_ids: tuple[int, ...] = ()  # ids never drawn (vision markers and pads)

    def kv_prefixes(self) -> tuple[int, ...]:
        """Increasing static cache-prefix lengths an insert may attend over (last = size)."""
        n = max(1, int(self.kv_buckets))
        size = self.size
        # j-th bucket: (j + 1) / n of the slots, rounded up to a multiple of 64; the last = size
        return tuple(sorted({min(size, math.ceil(math.ceil(size * (j + 1) / n) / 64) * 64)
                             for j in range(n)}))

    @property
    def size(self) -> int:
        return self.max_len + self.scratch


def init_state(init_cache, model_cfg, batch: int, st: Static, rng, cache_dtype) -> RolloutState:
    """An empty state (every row DONE until the prompt insert serves it)."""
    size = st.size
    return RolloutState(
        cache=init_cache(model_cfg, batch, size, cache_dtype),
        cache_index=jnp.zeros((batch,), jnp.int32),
        next_pos=jnp.zeros((batch,), jnp.int32),
        written=jnp.zeros((batch, size), bool),
        visible_until=jnp.full((batch, size), memory.NEVER, jnp.int32),
        tokens=jnp.zeros((batch, size), jnp.int32),
        kind=jnp.zeros((batch, size), jnp.int8),
        logp=jnp.zeros((batch, size), jnp.float32),
        positions=jnp.zeros((3, batch, size), jnp.int32),
        next_logits=jnp.zeros((batch, int(model_cfg.text.vocab_size)), jnp.float32),
        status=jnp.full((batch,), DONE, jnp.int32),
        n_generated=jnp.zeros((batch,), jnp.int32),
        turn_tokens=jnp.zeros((batch,), jnp.int32),
        memory=memory.FrameMemory.empty(batch, st.window),
        rng=rng,
    )


# --------------------------------------------------------------------------- sampling


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets logits outside the top-k / top-p (nucleus) set to -inf.

    top_p keeps the smallest set of most likely tokens whose probability reaches top_p (the
    token that crosses the threshold is kept; ties at the cut-off are all kept). At least one
    token always survives. logits float32 [b, V] -> [b, V].
    """
    out = logits
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        out = jnp.where(logits < kth, -jnp.inf, out)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-out, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
        cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
        out = jnp.where(out < cutoff, -jnp.inf, out)
    return out


def sample_logits(
    logits: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float,
    vocab_limit: int = 0, banned: tuple[int, ...] = (),
):
    """Draws one token per row. Returns (token int32 [b], log-prob float32 [b]).

    The log-prob is under the temperature-scaled, *untruncated* distribution - the one the
    learner recomputes - so top-k / top-p / vocab_limit only change which tokens are drawn.
    Greedy (temperature 0) reports the log-prob under the plain softmax.
    """
    logits = logits.astype(jnp.float32)
    allowed = logits
    if 0 < vocab_limit < logits.shape[-1]:
        allowed = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    if banned:  # structural ids (vision markers and pads) the model must never write as text
        allowed = allowed.at[:, jnp.asarray(banned, jnp.int32)].set(-jnp.inf)
    if temperature == 0.0:
        tok = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        filtered = filter_logits(allowed / temperature, top_k, top_p)
        tok = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    return tok, jnp.take_along_axis(logp, tok[:, None], -1)[:, 0]


# --------------------------------------------------------------------------- decode loop


def _set_rows(buf: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
    """buf [b, S], idx [b], values [b] -> buf with buf[i, idx[i]] = values[i]."""
    return buf.at[jnp.arange(buf.shape[0]), idx].set(values)


def _ends_with(tokens: jax.Array, last: jax.Array, turn_len: jax.Array, seqs) -> jax.Array:
    """bool [b]: the turn so far (ending at slot `last`) ends with one of the token sequences."""
    hit = jnp.zeros(last.shape, bool)
    for seq in seqs:
        n = len(seq)
        idx = jnp.clip(last[:, None] - (n - 1) + jnp.arange(n)[None], 0, tokens.shape[1] - 1)
        tail = jnp.take_along_axis(tokens, idx, axis=1)
        hit |= jnp.all(tail == jnp.asarray(seq, jnp.int32)[None], axis=1) & (turn_len >= n)
    return hit


def decode(graphdef, params, state: RolloutState, st: Static) -> RolloutState:
    """Generates tokens for RUNNING rows until none runs, or until at least one row and at
    least `serve_fraction` of the live (running or waiting) rows wait for the environment.

    Rows that are not RUNNING still flow through the model (static shapes) but write only to
    their scratch slot and keep their state.
    """
    slots = jnp.arange(st.size)[None]
    b = state.status.shape[0]

    def cond(s: RolloutState):
        running = jnp.sum(s.status == RUNNING)
        waiting = jnp.sum(s.status == WAIT_TOOL)
        serve = (waiting >= 1) & (waiting >= st.serve_fraction * (running + waiting))
        return (running > 0) & ~serve

    def body(s: RolloutState):
        # merged inside the loop body: a model merged outside carries the outer trace level,
        # which nnx.scan (scan_layers=True) refuses to mix with the loop's tracers
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x, params))
        rng, sub = jax.random.split(s.rng)
        active = s.status == RUNNING
        tok, lp = sample_logits(
            s.next_logits, sub, st.temperature, st.top_k, st.top_p, st.vocab_limit,
            st.banned_ids,
        )
        write = jnp.where(active, s.cache_index, st.max_len)
        written = s.written | ((slots == write[:, None]) & active[:, None])
        mask = written & (slots <= write[:, None]) & (write[:, None] < s.visible_until)
        # an inactive row attends to its scratch slot only, which keeps its softmax finite
        mask = jnp.where(active[:, None], mask, slots == write[:, None])
        pos = jnp.broadcast_to(s.next_pos[None, :, None], (3, b, 1))
        # attention (memory-bound: it reads every cache slot it covers) runs over the shortest
        # static cache prefix holding every active row's history; inactive rows' queries see
        # nothing there (a finite uniform softmax) and their outputs are discarded
        need = jnp.max(jnp.where(active, write + 1, 0))
        logits, cache = model(tok[:, None], pos, mask[:, None, :], cache=s.cache,
                              cache_index=write, kv_prefixes=st.kv_prefixes(), kv_need=need)
        tokens = _set_rows(s.tokens, write, jnp.where(active, tok, 0))
        n_gen = s.n_generated + active
        turn = s.turn_tokens + active
        hit_tool = _ends_with(tokens, write, turn, st.stop_tool)
        hit_end = _ends_with(tokens, write, turn, st.stop_end)
        full = (
            (write + 1 >= st.max_len) | (n_gen >= st.max_new_tokens) | (turn >= st.max_turn_tokens)
        )
        new_status = jnp.where(
            hit_tool, WAIT_TOOL, jnp.where(hit_end, DONE, jnp.where(full, CAPPED, RUNNING))
        )
        return s.replace(
            cache=cache,
            cache_index=s.cache_index + active,
            next_pos=s.next_pos + active,
            written=written,
            tokens=tokens,
            kind=_set_rows(s.kind, write, jnp.where(active, GENERATED, EMPTY).astype(jnp.int8)),
            logp=_set_rows(s.logp, write, jnp.where(active, lp, 0.0)),
            positions=s.positions.at[:, jnp.arange(b), write].set(
                jnp.where(active, s.next_pos, 0)[None]
            ),
            next_logits=jnp.where(active[:, None], logits[:, 0].astype(jnp.float32), s.next_logits),
            status=jnp.where(active, new_status, s.status),
            n_generated=n_gen,
            turn_tokens=turn,
            rng=rng,
        )

    return jax.lax.while_loop(cond, body, state)


# --------------------------------------------------------------------------- segment insert


def _prefill_chunks(graphdef, params, model, cache, seg: Segment, embeds, start, length,
                    written, visible_until, st: Static):
    """Runs a segment through the decoder into the cache, `st.prefill_chunk` queries at a time.

    embeds [b, R, hidden]; start, length int32 [b] (unserved rows: start = max_len, length 0);
    written bool [b, S] already includes the segment's slots; visible_until int32 [b, S].
    Returns (cache, float32 [b, vocab] logits after each row's last real token).

    Chunk j's queries see keys up to their own slot, so its attention reads only the shortest
    static cache prefix (`Static.kv_prefixes`) holding `start + (j + 1) * chunk` for the rows it
    serves: a prompt's first chunk reads its first keys only, not the whole prompt. The chunks run
    in a while loop that stops after the last chunk holding a real token of a served row, so the
    padding of a segment's static length costs no decoder work. Chunks see the same keys as one
    whole-segment call and give the same results up to float rounding (tested).
    """
    b, r = seg.tokens.shape
    slots = jnp.arange(st.size)[None]
    last = jnp.clip(length - 1, 0, r - 1)
    c = st.prefill_chunk if 0 < st.prefill_chunk < r else r
    n_chunks = -(-r // c)
    pad = n_chunks * c - r
    tokens = jnp.pad(seg.tokens, ((0, 0), (0, pad)))
    positions = jnp.pad(seg.positions, ((0, 0), (0, 0), (0, pad)))
    embeds = jnp.pad(embeds, ((0, 0), (0, pad), (0, 0)))

    def run(m, j, cache):
        """Chunk j (traced int32): (normed hidden [b, 1, hidden] at each row's last position
        clipped into the chunk, cache)."""
        off = j * c
        rel = off + jnp.arange(c)[None]
        real = rel < length[:, None]  # [b, c]
        q_slot = start[:, None] + rel  # [b, c]
        mask = (
            written[:, None, :]
            & (slots[:, None] <= q_slot[:, :, None])
            & (q_slot[:, :, None] < visible_until[:, None, :])
        )
        # padding queries see only themselves (their outputs are discarded)
        mask = jnp.where(real[:, :, None], mask, slots[:, None] == q_slot[:, :, None])
        # attention reads only a static prefix of the cache that holds every key a real query of
        # this chunk sees (later slots are unwritten, scratch, or after the chunk)
        live = seg.serve & (length > off)
        need = jnp.max(jnp.where(live, start + jnp.minimum(length, off + c), 0))
        return m(
            jax.lax.dynamic_slice_in_dim(tokens, off, c, 1),
            jax.lax.dynamic_slice_in_dim(positions, off, c, 2), mask,
            inputs_embeds=jax.lax.dynamic_slice_in_dim(embeds, off, c, 1), cache=cache,
            cache_index=start + off, logits_at=jnp.clip(last - off, 0, c - 1)[:, None],
            kv_prefixes=st.kv_prefixes(), kv_need=need, return_hidden=True,
        )

    if n_chunks == 1:  # one call, no loop
        hidden, cache = run(model, jnp.int32(0), cache)
        return cache, model.logits(hidden)[:, 0]

    def body(j, carry):
        cache, hidden = carry
        # merged inside the loop body: see `decode`
        m = nnx.merge(graphdef, jax.tree.map(lambda x: x, params))
        h, cache = run(m, j, cache)
        mine = (last >= j * c) & (last < (j + 1) * c)  # the chunk holds the row's last token
        return cache, jnp.where(mine[:, None, None], h, hidden)

    n_live = (jnp.max(length) + c - 1) // c
    hidden = jnp.zeros((b, 1, embeds.shape[-1]), embeds.dtype)
    cache, hidden = jax.lax.fori_loop(0, n_live, body, (cache, hidden))
    return cache, model.logits(hidden)[:, 0]


def insert(graphdef, params, state: RolloutState, bank: jax.Array, seg: Segment, st: Static):
    """Appends a context segment (prompt or environment response) to the served rows.

    Frames are gathered from the bank (uint8 [b, total, H, W, 3]), encoded by the vision tower in
    one chunk of b * F images, merged at the segment's frame positions (`segment_visual`), and
    the segment is prefilled into the cache at each served row's `cache_index`, `prefill_chunk`
    tokens at a time (`_prefill_chunks`: padding chunks are skipped). Served rows become
    RUNNING with the segment's last logits as their next-token logits.
    """
    model = nnx.merge(graphdef, params)
    serve = seg.serve
    start = jnp.where(serve, state.cache_index, st.max_len)  # unserved rows write scratch
    length = jnp.where(serve, seg.length, 0)

    # 1) memory window: the new frames take the oldest slots; the frames they evict are masked
    # for every query from the event start on
    n_new = jnp.where(serve, jnp.sum(seg.frames > 0, axis=1), 0)
    window, visible_until = memory.window_update(
        state.memory, state.visible_until, n_new, seg.frames, start[:, None] + seg.frame_offsets,
        start + seg.event_offset, st.tokens_per_frame,
    )

    # 2) embeddings: text embeddings with the frames' visual tokens where the segment put them
    visual = segment_visual(seg, st.tokens_per_frame)
    pixels = frame_bank.gather_frames(bank, seg.frames)  # [b, F, H, W, 3]
    embeds = frame_bank.embed_with_frames(model, seg.tokens, pixels, st.patch, visual)

    return _write_segment(graphdef, params, model, state, seg, embeds, visual, start, length,
                          visible_until, st).replace(memory=window)


def segment_visual(seg: Segment, tokens_per_frame: int) -> jax.Array:
    """bool [b, R]: the segment's frame tokens, `tokens_per_frame` from each real frame's
    offset (frames = 0 are padding)."""
    rel = jnp.arange(seg.tokens.shape[1])[None, None]  # [1, 1, R]
    off = seg.frame_offsets[:, :, None]  # [b, F, 1]
    span = (rel >= off) & (rel < off + tokens_per_frame) & (seg.frames > 0)[:, :, None]
    return jnp.any(span, axis=1)


def _write_segment(graphdef, params, model, state: RolloutState, seg: Segment, embeds, visual,
                   start, length, visible_until, st: Static) -> RolloutState:
    """Prefills `embeds` [b, R, hidden] into the cache at slots start..start+length of each
    served row (`prefill_chunk` queries at a time) and records the segment in the sequence
    buffers (`visual` bool [b, R]: the frame tokens, recorded as VISUAL); served rows become
    RUNNING with the segment's last logits."""
    b, r = seg.tokens.shape
    serve = seg.serve
    slots = jnp.arange(st.size)[None]
    rel = jnp.arange(r)[None]
    real = rel < length[:, None]  # [b, R]
    q_slot = start[:, None] + rel  # [b, R]
    new = (slots >= start[:, None]) & (slots < (start + length)[:, None])  # [b, S]
    written = state.written | new
    cache, last_logits = _prefill_chunks(
        graphdef, params, model, state.cache, seg, embeds, start, length, written, visible_until,
        st,
    )
    # record the segment in the sequence buffers (padding entries land in the last slot)
    rows = jnp.arange(b)[:, None]
    wslot = jnp.where(real, q_slot, st.size - 1)
    kind = jnp.where(real, jnp.where(visual, VISUAL, CONTEXT), EMPTY).astype(jnp.int8)
    return state.replace(
        cache=cache,
        cache_index=jnp.where(serve, start + length, state.cache_index),
        next_pos=jnp.where(serve, seg.next_pos, state.next_pos),
        written=written,
        visible_until=visible_until,
        tokens=state.tokens.at[rows, wslot].set(jnp.where(real, seg.tokens, 0)),
        kind=state.kind.at[rows, wslot].set(kind),
        logp=state.logp.at[rows, wslot].set(0.0),
        positions=state.positions.at[:, rows, wslot].set(jnp.where(real[None], seg.positions, 0)),
        next_logits=jnp.where(serve[:, None], last_logits.astype(jnp.float32), state.next_logits),
        status=jnp.where(serve, RUNNING, state.status),
        turn_tokens=jnp.where(serve, 0, state.turn_tokens),
    )


def reprefill(graphdef, params, state: RolloutState, seg: Segment, start: jax.Array,
              visual: jax.Array, is_visual: jax.Array, st: Static) -> RolloutState:
    """Truncates each served row to `start` and prefills a segment there: the release's memory
    rule removes tokens mid-sequence, so the prompt after the first changed token is prefilled
    again while the cache before it is kept.

    start int32 [b] (served rows: the first slot that changes, <= cache_index); visual [b, V,
    hidden] the segment's visual-token embeddings, computed by the vision tower outside, in
    order; is_visual bool [b, R] the segment's visual tokens (the i-th takes visual[:, i]).
    Keys at or after `start` stop being visible (their slots are rewritten or unwritten).

    Rows not served must be finished (DONE): they compute the padded segment too (static
    shapes) and write it over their own slots from their cache_index on (clipped so the writes
    fit), so the cache needs only `prefill_chunk` scratch slots, not a whole segment's.
    """
    model = nnx.merge(graphdef, params)
    slots = jnp.arange(st.size)[None]
    serve = seg.serve
    r = seg.tokens.shape[1]
    c = st.prefill_chunk if 0 < st.prefill_chunk < r else r
    pad_end = -(-r // c) * c  # the chunked prefill writes up to here past `start`
    start = jnp.where(serve, start, jnp.clip(state.cache_index, 0, st.size - pad_end))
    length = jnp.where(serve, seg.length, 0)
    keep = ~serve[:, None] | (slots < start[:, None]) | (slots >= st.max_len)
    state = state.replace(written=state.written & keep)
    embeds = model_lib.merge_visual_at(model.embed(seg.tokens), is_visual, visual)
    return _write_segment(graphdef, params, model, state, seg, embeds, is_visual, start, length,
                          state.visible_until, st)


def finish_rows(state: RolloutState, rows: jax.Array) -> RolloutState:
    """Marks rows (bool [b]) DONE so the decode loop skips them."""
    return state.replace(status=jnp.where(rows, DONE, state.status))


@functools.cache
def compiled(st: Static, graphdef):
    """The jitted (decode(params, state), insert(params, state, bank, seg), finish_rows(state,
    rows)) functions for one static configuration and model structure.

    graphdef is bound here rather than passed as a static argument: jit would hash the whole
    module graph on every call (milliseconds per call, a large share of a tiny model's rollout).
    The state is donated so the cache is updated in place.
    """
    dec = jax.jit(functools.partial(decode, graphdef, st=st), donate_argnums=(1,))
    ins = jax.jit(functools.partial(insert, graphdef, st=st), donate_argnums=(1,))
    fin = jax.jit(finish_rows, donate_argnums=(0,))
    return dec, ins, fin


@functools.cache
def compiled_reprefill(st: Static, graphdef):
    """The jitted reprefill(params, state, seg, start, visual, is_visual) (state donated)."""
    return jax.jit(functools.partial(reprefill, graphdef, st=st), donate_argnums=(1,))
