"""The thinking-with-images rollout: a host loop around the compiled decode / insert functions.

Per event the host reads the small status arrays, hands every turn that ended to the tool
environment (`environment.py`: the call's response, an error, or the end of the row), tokenises
the responses (`chat.tokenize_segments`), computes their M-RoPE positions
(`chat.mrope_positions`), and hands them to the compiled
`sampler.insert`, which gathers the frames from the on-device bank, encodes them in one chunk,
updates the memory window and prefills them (`sampling.prefill_chunk` tokens at a time, skipping
the chunks past the longest real response, so one static response length `resp_len` costs what
the responses need). Shapes never depend on the number of tool calls, so K tool calls compile
exactly as often as one: once per prompt bucket for the prompt insert, once for the response
insert, once for the decode loop (and once for `finish_rows` and the state's init).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vrthinker_jax import distributed, sharding
from vrthinker_jax.rollout import chat, memory, protocol, sampler
from vrthinker_jax.rollout import environment as env_lib
from vrthinker_jax.rollout import shapes as shapes_lib


@dataclasses.dataclass
class Trajectory:
    """One finished row. Arrays are unpadded, length n = tokens in the conversation.

    tokens int32 [n]; kind int8 [n] (sampler.CONTEXT / GENERATED / VISUAL); logp float32 [n]
    (log-prob of generated tokens, 0 elsewhere); positions int32 [3, n]; visible_until int32 [n]
    (key k visible to query q iff k <= q < visible_until[k]);
    frames: global frame number of each frame occurrence in order (initial frames first);
    window_frames: the frames in the memory window at the end, oldest first.
    """

    tokens: np.ndarray
    kind: np.ndarray
    logp: np.ndarray
    positions: np.ndarray
    visible_until: np.ndarray
    frames: list[int]
    window_frames: list[int]
    assistant_turns: list[str]
    tool_frames: list[list[int]]  # frames returned per tool call ([] for a failed call)
    tool_errors: list[str | None]
    judgments: dict[str, int] | None
    stop: str  # "answer" | "no_answer" | "capped" | "tool_budget"

    @property
    def tool_calls(self) -> int:
        return len(self.tool_frames)

    @property
    def turns(self) -> int:
        return len(self.assistant_turns)

    @property
    def frames_selected(self) -> int:
        return sum(len(f) for f in self.tool_frames)

    @property
    def loss_mask(self) -> np.ndarray:
        """bool [n]: tokens the model produced (the GRPO loss mask)."""
        return self.kind == sampler.GENERATED

    @property
    def generated(self) -> np.ndarray:
        return self.tokens[self.loss_mask]


def _stop_sequence(tokenizer, text: str) -> tuple[int, ...]:
    """One id when the tokenizer has `text` as a token, else its encoding."""
    try:
        tid = tokenizer.token_to_id(text)
    except (KeyError, ValueError):  # tokenizers that raise for unknown tokens
        tid = None
    if tid is not None:
        return (int(tid),)
    ids = tuple(int(i) for i in tokenizer.encode(text))
    if not ids:
        raise ValueError(f"tokenizer encodes the stop string {text!r} to nothing")
    return ids


def rollout_shapes(model_cfg, tokenizer, protocol_cfg: protocol.ProtocolConfig, sampling_cfg,
                   frame_size: Sequence[int]) -> shapes_lib.RolloutShapes:
    """Every static shape a `RolloutEngine` compiles (`shapes.rollout_shapes`), its
    response-insert length measured with `tokenizer` (`environment.max_response_len`). Needs no
    model. Raises ValueError on settings that disagree."""
    vt = chat.VisionTokens.from_tokenizer(tokenizer)
    if vt.pad != model_cfg.image_token_id:
        raise ValueError(
            f"tokenizer's <|image_pad|> id {vt.pad} != model config image_token_id "
            f"{model_cfg.image_token_id}"
        )
    resp_len = env_lib.max_response_len(tokenizer, protocol_cfg,
                                        shapes_lib.tokens_per_frame(model_cfg, frame_size))
    return shapes_lib.rollout_shapes(model_cfg, protocol_cfg, sampling_cfg, frame_size,
                                     response_len=resp_len)


def static_for(shapes: shapes_lib.RolloutShapes, tokenizer, sampling_cfg) -> sampler.Static:
    """The sampler's static settings for `shapes` with `tokenizer`'s stop sequences, vocabulary
    limit and structural ids (`shapes.sampler_static`)."""
    ends = [protocol.IM_END, "<|endoftext|>"]
    return shapes_lib.sampler_static(
        shapes, sampling_cfg,
        stop_tool=(_stop_sequence(tokenizer, protocol.TOOL_CALL_END),),
        stop_end=tuple(_stop_sequence(tokenizer, t) for t in ends),
        vocab_limit=(int(tokenizer.vocab_size)
                     if sampling_cfg.restrict_to_tokenizer_vocab else 0),
        banned_ids=chat.structural_ids(tokenizer),
    )


@dataclasses.dataclass
class _RowLog:
    """The host's record of one row during a rollout (the state holds its tokens)."""

    turn_start: int  # cache slot where the current assistant turn starts
    turns: list[str] = dataclasses.field(default_factory=list)
    tool_frames: list[list[int]] = dataclasses.field(default_factory=list)
    tool_errors: list[str | None] = dataclasses.field(default_factory=list)
    stop: str = ""  # why the row ended ("" while it runs): an `environment.Reply.stop`


# how a turn ended, from the row's status after a decode call
_TURN_END = {sampler.WAIT_TOOL: env_lib.TOOL_CALL, sampler.DONE: env_lib.END,
             sampler.CAPPED: env_lib.CAPPED}


class RolloutEngine:
    """Batched multi-turn rollouts of a Qwen2.5-VL reward model with the select_frames tool.

    The engine drives generation; what a finished turn gets back is the environment's
    (`environment.ToolEnvironment`, or a `ScriptedEnvironment` given to `rollout`).

    Args:
      model: the `Qwen25VL` nnx module (its params are split off; call `update_params` after a
        training step to roll out with new weights).
      model_cfg: its config (`models.config.get_config`).
      tokenizer: the common.md tokenizer interface.
      protocol_cfg: `protocol.ProtocolConfig`.
      sampling_cfg: `sampler.sampling_config()`.
      frame_size: (height, width) of the bank's frames (multiples of patch x merge).
      mesh: optional device mesh; the batch is split over its batch axes and params follow their
        logical axes (`vrthinker_jax.sharding`).
      rules: the logical axis -> mesh axes table on `mesh` (a stage config's `mesh.rules`;
        default `sharding.DEFAULT_RULES`).
      cache_dtype: KV-cache dtype.
    """

    def __init__(
        self, model, model_cfg, tokenizer, protocol_cfg: protocol.ProtocolConfig, sampling_cfg,
        frame_size: Sequence[int], *, mesh: Mesh | None = None, cache_dtype=jnp.float32,
        rules=sharding.DEFAULT_RULES,
    ):
        self.model_cfg = model_cfg
        self.tok = tokenizer
        self.pcfg = protocol_cfg
        self.mesh = mesh
        self.rules = sharding.freeze_rules(rules)
        # mesh and rules are fixed for the engine's life: one layout for every insert
        self._segment_shardings = (None if mesh is None else
                                   shapes_lib.segment_shardings(mesh, self.rules))
        self.frame_size = tuple(int(x) for x in frame_size)
        self.shapes = rollout_shapes(model_cfg, tokenizer, protocol_cfg, sampling_cfg,
                                     self.frame_size)
        self.static = static_for(self.shapes, tokenizer, sampling_cfg)
        self.patch = self.static.patch
        self.tokens_per_frame = self.static.tokens_per_frame
        self.merged_grid = self.patch.merged_grid(*self.frame_size)
        self.cache_dtype = cache_dtype
        self.vt = chat.VisionTokens.from_tokenizer(tokenizer)
        self.graphdef, params = nnx.split(model)
        self.update_params(params)
        self.decode_fn, self.insert_fn, self.finish_fn = sampler.compiled(self.static,
                                                                          self.graphdef)
        # wall seconds and calls per phase, accumulated over rollouts (benchmarks read these)
        self.stats = {"decode_s": 0.0, "insert_s": 0.0, "decode_calls": 0, "insert_calls": 0}

    @property
    def resp_len(self) -> int:
        """Static length of a tool-response insert in tokens (`environment.max_response_len`;
        also the cache's scratch slots)."""
        return self.shapes.response_len

    # ----------------------------------------------------------------- params and compile stats

    def update_params(self, params):
        """Roll out with these params (an nnx.State of the model), placed on the mesh if any."""
        if self.mesh is not None:
            params = sharding.shard_state(params, self.mesh, self.rules)
        self.params = params

    def compile_count(self) -> int:
        """Executables compiled so far by the rollout's jitted functions (all shapes)."""
        fns = (self.decode_fn, self.insert_fn, self.finish_fn, *self._init_fns.values())
        return sum(f._cache_size() for f in fns)

    # ----------------------------------------------------------------- placement
    # In a run of P processes the host loop holds this process's rows only: rows go to the
    # device through `distributed.put_rows` and come back through `distributed.local_rows`, and
    # every decision that makes a compiled call (or fixes a static shape) is agreed by all.

    def _batch_put(self, x, batch_dim: int = 0):
        x = np.asarray(x)
        if self.mesh is None:
            return jax.device_put(x)
        return distributed.put_rows(x, sharding.batch_sharding(self.mesh, x.ndim, batch_dim,
                                                                   self.rules))

    def _put_segment(self, seg: sampler.Segment) -> sampler.Segment:
        """The segment's arrays on device in one transfer (split over the batch on a mesh)."""
        if self.mesh is None:
            return jax.device_put(seg)
        return distributed.put_rows(seg, self._segment_shardings)

    def _rows(self, *arrays, row_dims=None):
        """This process's rows of global arrays (all of them with one process)."""
        dims = row_dims or (0,) * len(arrays)
        return tuple(distributed.local_rows(a, d) for a, d in zip(arrays, dims))

    def _state_shardings(self, batch: int):
        """NamedShardings of a RolloutState of `batch` rows (`shapes.state_shardings`)."""
        return shapes_lib.state_shardings(self.mesh, shapes_lib.abstract_state(
            self.model_cfg, batch, self.static, self.cache_dtype), self.rules)

    def _init_state(self, batch: int, rng):
        return shapes_lib.init_state(self.model_cfg, batch, self.static, self.cache_dtype, rng)

    @functools.cached_property
    def _init_fns(self) -> dict:
        return {}

    def _new_state(self, batch: int, rng) -> sampler.RolloutState:
        if self.mesh is not None:  # the key may live on another mesh (e.g. the learner's)
            rng = distributed.put_value(rng, NamedSharding(self.mesh, PartitionSpec()))
        if batch not in self._init_fns:
            kw = {} if self.mesh is None else {"out_shardings": self._state_shardings(batch)}
            self._init_fns[batch] = jax.jit(functools.partial(self._init_state, batch), **kw)
        return self._init_fns[batch](rng)

    # ----------------------------------------------------------------- host-side segments

    def _segment(
        self, pieces: list[chat.Tokenized | None], length: int, n_frames: int,
        next_pos: np.ndarray,
    ) -> sampler.Segment:
        """Pads per-row tokenised pieces to a Segment (numpy). Rows with None are not served."""
        b = len(pieces)
        tokens = np.zeros((b, length), np.int32)
        seg_len = np.zeros((b,), np.int32)
        positions = np.zeros((3, b, length), np.int32)
        nxt = np.asarray(next_pos, np.int32).copy()
        frames = np.zeros((b, n_frames), np.int32)
        offsets = np.zeros((b, n_frames), np.int32)
        event = np.zeros((b,), np.int32)
        serve = np.zeros((b,), bool)
        for i, t in enumerate(pieces):
            if t is None:
                continue
            n = len(t.ids)
            if n > length:
                raise ValueError(f"segment of {n} tokens exceeds its static length {length}")
            if len(t.frames) > n_frames:
                raise ValueError(f"segment has {len(t.frames)} frames, static limit {n_frames}")
            pos, after = chat.mrope_positions(t.frame_of_token, self.merged_grid, int(nxt[i]))
            tokens[i, :n] = t.ids
            seg_len[i] = n
            positions[:, i, :n] = pos
            nxt[i] = after
            frames[i, : len(t.frames)] = t.frames
            for occ in range(len(t.frames)):
                offsets[i, occ] = int(np.argmax(t.frame_of_token == occ))
            event[i] = t.event_starts[-1]
            serve[i] = True
        return sampler.Segment(tokens, seg_len, positions, nxt, frames, offsets, event, serve)

    def _check_banks(self, banks: np.ndarray, b: int) -> int:
        """Checks this process's `b` rows of banks; returns the global batch."""
        want = self.shapes.bank_shape(b)
        if tuple(banks.shape) != want or banks.dtype != np.uint8:
            raise ValueError(f"frame banks: got {banks.dtype} {tuple(banks.shape)}, expected "
                             f"uint8 {want}")
        total = distributed.global_rows(self.mesh, b, self.rules)
        if self.mesh is not None and total % sharding.batch_size_multiple(self.mesh, self.rules):
            raise ValueError(f"batch {total} is not a multiple of the mesh's batch axes "
                             f"({sharding.batch_size_multiple(self.mesh, self.rules)})")
        return total

    def _prefill(self, state, bank, segs_per_row: list[list[protocol.Segment]]):
        toks = [chat.tokenize_segments(self.tok, s, self.tokens_per_frame) for s in segs_per_row]
        # static shapes: the same on every process
        length = self.shapes.prompt_bucket(
            distributed.max_over_processes(max(len(t.ids) for t in toks)))
        n_frames = distributed.max_over_processes(max(len(t.frames) for t in toks))
        if n_frames > self.pcfg.memory_window:
            raise ValueError(f"prompt shows {n_frames} frames, more than memory_window")
        seg = self._segment(toks, length, n_frames, np.zeros(len(toks), np.int32))
        return self._insert(state, bank, seg), toks

    def _insert(self, state, bank, seg: sampler.Segment):
        """One compiled insert of a host segment, timed."""
        t0 = time.perf_counter()
        state = self.insert_fn(self.params, state, bank, self._put_segment(seg))
        jax.block_until_ready(state.cache_index)
        self.stats["insert_s"] += time.perf_counter() - t0
        self.stats["insert_calls"] += 1
        return state

    def _decode(self, state):
        """One compiled decode call (until rows wait for the environment), timed; returns the
        state and this process's rows of (status, cache_index, next_pos, tokens)."""
        t0 = time.perf_counter()
        state = self.decode_fn(self.params, state)
        rows = self._rows(state.status, state.cache_index, state.next_pos, state.tokens)
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["decode_calls"] += 1
        return state, rows

    # ----------------------------------------------------------------- one-turn generation

    def generate(
        self, segs_per_row: list[list[protocol.Segment]], rng: jax.Array,
        banks: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Prefills arbitrary segments (text and frames) and decodes one turn per row.

        Rows stop at `<|im_end|>`, `<|endoftext|>`, `</tool_call>` or the turn budget. Returns
        the generated ids per row (int32, stop token included).
        """
        b = len(segs_per_row)
        if banks is None:
            banks = np.zeros((b, self.pcfg.total_frames) + self.frame_size + (3,), np.uint8)
        total = self._check_banks(banks, b)
        bank = self._batch_put(banks)
        state, toks = self._prefill(self._new_state(total, rng), bank, segs_per_row)
        state = self.decode_fn(self.params, state)
        tokens, kind, n = self._rows(state.tokens, state.kind, state.cache_index)
        return [tokens[i, : n[i]][kind[i, : n[i]] == sampler.GENERATED] for i in range(b)]

    # ----------------------------------------------------------------- the rollout

    def rollout(
        self,
        prompts: list[str],
        banks: np.ndarray,
        rng: jax.Array,
        *,
        tools_enabled: bool = True,
        force_tool_calls: int = 0,
        forced_frames: Callable[[int, int], Sequence[int]] | None = None,
        environment: env_lib.ToolEnvironment | None = None,
    ) -> list[Trajectory]:
        """Rolls out one trajectory per prompt.

        Args:
          prompts: b text prompts.
          banks: uint8 [b, 2 * num_candidates, H, W, 3] candidate frames of both videos.
          rng: a jax key.
          tools_enabled: False answers every tool call with `environment.TOOLS_DISABLED` and no
            frames.
          force_tool_calls: K > 0 makes every row make exactly K tool calls (unless its cache
            fills): `environment.ScriptedEnvironment(protocol_cfg, K, forced_frames)`.
          forced_frames: (row, calls_done) -> frames of an injected call (default:
            `environment.consecutive_frames`).
          environment: the environment that answers finished turns, instead of the one the
            three arguments above describe (which must then be left at their defaults).
        """
        env = self._environment(environment, tools_enabled, force_tool_calls, forced_frames)
        b = len(prompts)  # this process's rows
        total = self._check_banks(banks, b)
        bank = self._batch_put(banks)
        state, _ = self._prefill(self._new_state(total, rng), bank,
                                 [protocol.prompt_segments(p, self.pcfg) for p in prompts])
        logs = [_RowLog(int(s)) for s in self._rows(state.cache_index)[0]]
        while not distributed.all_processes(all(log.stop for log in logs)):
            state, (status, cache_index, next_pos, tokens) = self._decode(state)
            was_running = np.asarray([not log.stop for log in logs])
            responses = self._serve_turns(env, logs, status, cache_index, tokens)
            ended = was_running & np.asarray([bool(log.stop) for log in logs])
            if distributed.any_process(ended.any()):
                state = self.finish_fn(state, self._batch_put(ended))
            if distributed.any_process(any(r is not None for r in responses)):
                seg = self._segment(responses, self.resp_len, self.pcfg.max_frames_per_call,
                                    next_pos)
                state = self._insert(state, bank, seg)
                for log, r, n in zip(logs, responses, cache_index):
                    if r is not None:
                        log.turn_start = int(n) + len(r.ids)
            elif not distributed.any_process((status == sampler.RUNNING).any()):
                break  # nothing runs and nothing was served
        return self._trajectories(state, logs)

    def _environment(self, env, tools_enabled, force_tool_calls, forced_frames):
        """The rollout's environment: `env`, or the one the shorthand arguments describe."""
        if env is not None:
            if not tools_enabled or force_tool_calls or forced_frames is not None:
                raise ValueError("rollout: pass either environment or tools_enabled / "
                                 "force_tool_calls / forced_frames, not both")
            return env
        if force_tool_calls:
            return env_lib.ScriptedEnvironment(self.pcfg, force_tool_calls, forced_frames,
                                               tools_enabled=tools_enabled)
        return env_lib.ToolEnvironment(self.pcfg, tools_enabled=tools_enabled)

    def _serve_turns(self, env, logs: list[_RowLog], status, cache_index,
                     tokens) -> list[chat.Tokenized | None]:
        """Hands every turn that just ended to the environment; records each reply in the
        row's log. Returns the tokenised response per row (None: nothing to insert)."""
        responses: list[chat.Tokenized | None] = [None] * len(logs)
        for i, log in enumerate(logs):
            if log.stop or status[i] == sampler.RUNNING:
                continue
            text = self._text(tokens[i, log.turn_start: cache_index[i]])
            log.turns.append(text)
            reply = env.reply(i, text, _TURN_END[int(status[i])], len(log.tool_frames))
            if reply.stop is not None:
                log.stop = reply.stop
                continue
            piece = chat.tokenize_segments(self.tok, list(reply.segments), self.tokens_per_frame)
            # the response and one generated token must fit the cache's real slots
            if cache_index[i] + len(piece.ids) + 1 >= self.static.max_len:
                log.stop = "capped"
                continue
            log.tool_frames.append(list(reply.call.frames))
            log.tool_errors.append(reply.call.error)
            responses[i] = piece
        return responses

    def _text(self, ids: np.ndarray) -> str:
        """Text of generated ids; ids past the tokenizer's vocabulary (possible only without
        `restrict_to_tokenizer_vocab`) are dropped rather than failing the rollout."""
        vocab = int(self.tok.vocab_size)
        return self.tok.decode([int(i) for i in ids if 0 <= i < vocab])

    def _trajectories(self, state, logs: list[_RowLog]) -> list[Trajectory]:
        tokens, kind, logp, positions, until, n, slot_frame, count = self._rows(
            state.tokens, state.kind, state.logp, state.positions, state.visible_until,
            state.cache_index, state.memory.slot_frame, state.memory.count,
            row_dims=(0, 0, 0, 1, 0, 0, 0, 0))
        out = []
        for i, log in enumerate(logs):
            k = int(n[i])
            judgments = None
            reason = log.stop
            if reason == "done":
                judgments = protocol.parse_final_answer(log.turns[-1]) if log.turns else None
                reason = "answer" if judgments is not None else "no_answer"
            out.append(Trajectory(
                tokens=tokens[i, :k], kind=kind[i, :k], logp=logp[i, :k],
                positions=positions[:, i, :k], visible_until=until[i, :k],
                frames=protocol.initial_frames(self.pcfg)
                + [f for fr in log.tool_frames for f in fr],
                window_frames=memory.window_frames(slot_frame[i], int(count[i])),
                assistant_turns=log.turns, tool_frames=log.tool_frames,
                tool_errors=log.tool_errors, judgments=judgments, stop=reason,
            ))
        return out
