"""The thinking-with-images rollout: a host loop around the compiled decode / insert functions.

Per event the host reads the small status arrays, parses the tool calls of the rows that wait for
the environment (`protocol.parse_tool_call`), tokenises the responses (`chat.tokenize_segments`),
computes their M-RoPE positions (`chat.mrope_positions`), and hands them to the compiled
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
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vrthinker_jax import distributed, sharding
from vrthinker_jax.models import model as model_lib
from vrthinker_jax.rollout import chat, frame_bank, protocol, sampler

TOOLS_DISABLED = "Tool use is disabled for this evaluation: give your final answer now."


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


def _bucket(n: int, buckets) -> int:
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise ValueError(f"sampling.prompt_buckets: prompt of {n} tokens exceeds the largest bucket "
                     f"{max(buckets)}")


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


class RolloutEngine:
    """Batched multi-turn rollouts of a Qwen2.5-VL reward model with the select_frames tool.

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
      cache_dtype: KV-cache dtype.
    """

    def __init__(
        self, model, model_cfg, tokenizer, protocol_cfg: protocol.ProtocolConfig, sampling_cfg,
        frame_size: Sequence[int], *, mesh: Mesh | None = None, cache_dtype=jnp.float32,
    ):
        self.model_cfg = model_cfg
        self.tok = tokenizer
        self.pcfg = protocol_cfg
        self.scfg = sampling_cfg
        self.mesh = mesh
        self.frame_size = tuple(int(x) for x in frame_size)
        self.patch = frame_bank.PatchSpec.from_model_config(model_cfg)
        self.tokens_per_frame = self.patch.tokens_per_frame(*self.frame_size)
        self.merged_grid = self.patch.merged_grid(*self.frame_size)
        self.cache_dtype = cache_dtype
        self.vt = chat.VisionTokens.from_tokenizer(tokenizer)
        if self.vt.pad != model_cfg.image_token_id:
            raise ValueError(
                f"tokenizer's <|image_pad|> id {self.vt.pad} != model config image_token_id "
                f"{model_cfg.image_token_id}"
            )
        if protocol_cfg.max_frames_per_call > protocol_cfg.memory_window:
            raise ValueError("protocol: max_frames_per_call must not exceed memory_window")
        self.graphdef, params = nnx.split(model)
        self.update_params(params)
        self.resp_len = self._max_response_len()
        max_len = int(sampling_cfg.max_len)
        if max(sampling_cfg.prompt_buckets) > max_len:
            raise ValueError(f"sampling: largest prompt bucket {max(sampling_cfg.prompt_buckets)}"
                             f" exceeds max_len {max_len}")
        ends = [protocol.IM_END, "<|endoftext|>"]
        defaults = sampler.sampling_config()  # for knobs a hand-built config leaves out
        self.static = sampler.Static(
            max_len=max_len,
            # rows not served by an insert write their padded segment here
            scratch=max(self.resp_len, 1),
            window=protocol_cfg.memory_window,
            tokens_per_frame=self.tokens_per_frame,
            image_pad_id=self.vt.pad,
            stop_tool=(_stop_sequence(tokenizer, protocol.TOOL_CALL_END),),
            stop_end=tuple(_stop_sequence(tokenizer, t) for t in ends),
            temperature=float(sampling_cfg.temperature),
            top_k=int(sampling_cfg.top_k),
            top_p=float(sampling_cfg.top_p),
            max_new_tokens=int(sampling_cfg.max_new_tokens),
            max_turn_tokens=int(sampling_cfg.max_turn_tokens),
            patch=self.patch,
            serve_fraction=float(sampling_cfg.get("serve_fraction", 0.0)),
            kv_buckets=int(sampling_cfg.get("insert_kv_buckets", defaults.insert_kv_buckets)),
            prefill_chunk=int(sampling_cfg.get("prefill_chunk", defaults.prefill_chunk)),
            vocab_limit=(int(tokenizer.vocab_size)
                         if sampling_cfg.get("restrict_to_tokenizer_vocab", True) else 0),
            banned_ids=chat.structural_ids(tokenizer),
        )
        self.decode_fn, self.insert_fn, self.finish_fn = sampler.compiled(self.static,
                                                                          self.graphdef)
        # wall seconds and calls per phase, accumulated over rollouts (benchmarks read these)
        self.stats = {"decode_s": 0.0, "insert_s": 0.0, "decode_calls": 0, "insert_calls": 0}

    # ----------------------------------------------------------------- params and compile stats

    def update_params(self, params):
        """Roll out with these params (an nnx.State of the model), placed on the mesh if any."""
        if self.mesh is not None:
            params = sharding.shard_state(params, self.mesh)
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
        return distributed.put_rows(x, sharding.batch_sharding(self.mesh, x.ndim, batch_dim))

    def _put_segment(self, seg: sampler.Segment) -> sampler.Segment:
        """The segment's arrays on device in one transfer (split over the batch on a mesh)."""
        if self.mesh is None:
            return jax.device_put(seg)
        return distributed.put_rows(seg, sampler.Segment(**{
            f.name: sharding.batch_sharding(self.mesh, getattr(seg, f.name).ndim,
                                            1 if f.name == "positions" else 0)
            for f in dataclasses.fields(seg)
        }))

    def _rows(self, *arrays, row_dims=None):
        """This process's rows of global arrays (all of them with one process)."""
        dims = row_dims or (0,) * len(arrays)
        return tuple(distributed.local_rows(a, d) for a, d in zip(arrays, dims))

    def _state_shardings(self, batch: int):
        """NamedShardings of a RolloutState: batch split, rng replicated."""
        m = self.mesh

        def bs(ndim, dim=0):
            return sharding.batch_sharding(m, ndim, dim)

        shapes = jax.eval_shape(functools.partial(self._init_state, batch), jax.random.key(0))
        rep = NamedSharding(m, PartitionSpec())
        out = jax.tree.map(lambda x: bs(x.ndim) if x.ndim else rep, shapes)
        return out.replace(
            cache=jax.tree.map(lambda x: bs(x.ndim, 1), shapes.cache),
            positions=bs(3, 1),
            rng=rep,
        )

    def _init_state(self, batch: int, rng):
        return sampler.init_state(
            model_lib.init_cache, self.model_cfg, batch, self.static, rng, self.cache_dtype
        )

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

    def _max_response_len(self) -> int:
        """Longest environment response in tokens (the static response-insert length).

        The worst of: a full call's frames (with the duplicates note and the last-turn note) or
        the longest error message, plus an injected call (forced tool calls) before it, rounded
        up to a multiple of 8.
        """
        m, total = self.pcfg.max_frames_per_call, self.pcfg.total_frames
        worst = protocol.ToolCall(
            tuple(total - i for i in range(m)), note="Duplicate frame numbers were ignored."
        )
        bad_calls = [
            '{"name": "select_frames", "arguments": {"target_frames": [100000000]}}',
            '{"name": "select_frames", "arguments": {"target_frames": '
            + str(list(range(1, m + 2))) + "}}",
            '{"name": "' + "x" * 40 + '", "arguments": {}}',
            "{",
        ]
        calls = [worst, protocol.ToolCall((), error=TOOLS_DISABLED)] + [
            protocol.parse_tool_call(f"<tool_call>{body}</tool_call>", self.pcfg)
            for body in bad_calls
        ]
        longest = max(
            len(chat.tokenize_segments(
                self.tok, protocol.tool_response_segments(c, self.pcfg, calls_done=n),
                self.tokens_per_frame).ids)
            for c in calls for n in (1, self.pcfg.max_turns)
        )
        forced = len(self.tok.encode(protocol.format_tool_call(worst.frames)))
        return int(math.ceil((longest + forced) / 8) * 8)

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
        want = (b, self.pcfg.total_frames) + self.frame_size + (3,)
        if tuple(banks.shape) != want or banks.dtype != np.uint8:
            raise ValueError(f"frame banks: got {banks.dtype} {tuple(banks.shape)}, expected "
                             f"uint8 {want}")
        total = distributed.global_rows(self.mesh, b)
        if self.mesh is not None and total % sharding.batch_size_multiple(self.mesh):
            raise ValueError(f"batch {total} is not a multiple of the mesh's batch axes "
                             f"({sharding.batch_size_multiple(self.mesh)})")
        return total

    def _prefill(self, state, bank, segs_per_row: list[list[protocol.Segment]]):
        toks = [chat.tokenize_segments(self.tok, s, self.tokens_per_frame) for s in segs_per_row]
        # static shapes: the same on every process
        length = _bucket(distributed.max_over_processes(max(len(t.ids) for t in toks)),
                         self.scfg.prompt_buckets)
        n_frames = distributed.max_over_processes(max(len(t.frames) for t in toks))
        if n_frames > self.pcfg.memory_window:
            raise ValueError(f"prompt shows {n_frames} frames, more than memory_window")
        seg = self._segment(toks, length, n_frames, np.zeros(len(toks), np.int32))
        t0 = time.perf_counter()
        state = self.insert_fn(self.params, state, bank, self._put_segment(seg))
        jax.block_until_ready(state.cache_index)
        self.stats["insert_s"] += time.perf_counter() - t0
        self.stats["insert_calls"] += 1
        return state, toks

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
    ) -> list[Trajectory]:
        """Rolls out one trajectory per prompt.

        Args:
          prompts: b text prompts.
          banks: uint8 [b, 2 * num_candidates, H, W, 3] candidate frames of both videos.
          rng: a jax key.
          tools_enabled: False answers every tool call with TOOLS_DISABLED and no frames.
          force_tool_calls: K > 0 makes every row make exactly K tool calls (unless its cache
            fills): a turn that ends without a call before the K-th gets a canonical call
            injected (environment text, not in the loss mask), and the first turn end after K
            calls ends the row.
          forced_frames: (row, calls_done) -> frames of an injected call (default: consecutive
            windows over all frames).
        """
        b = len(prompts)  # this process's rows
        total = self._check_banks(banks, b)
        if force_tool_calls > self.pcfg.max_tool_calls:
            raise ValueError(f"force_tool_calls={force_tool_calls} exceeds the protocol's "
                             f"max_turns - 1 = {self.pcfg.max_tool_calls}")
        forced_frames = forced_frames or self._forced_frames
        bank = self._batch_put(banks)
        state = self._new_state(total, rng)
        state, _ = self._prefill(state, bank, [protocol.prompt_segments(p, self.pcfg)
                                               for p in prompts])

        turn_start = self._rows(state.cache_index)[0].copy()
        turns: list[list[str]] = [[] for _ in range(b)]
        tool_frames: list[list[list[int]]] = [[] for _ in range(b)]
        tool_errors: list[list[str | None]] = [[] for _ in range(b)]
        stop = ["" for _ in range(b)]
        finished = np.zeros(b, bool)
        while not distributed.all_processes(finished.all()):
            t0 = time.perf_counter()
            state = self.decode_fn(self.params, state)
            status, cache_index, next_pos, tokens = self._rows(
                state.status, state.cache_index, state.next_pos, state.tokens)
            self.stats["decode_s"] += time.perf_counter() - t0
            self.stats["decode_calls"] += 1
            responses: list[chat.Tokenized | None] = [None] * b
            newly_finished = np.zeros(b, bool)
            for i in range(b):
                if finished[i] or status[i] == sampler.RUNNING:
                    continue
                text = self._decode(tokens[i, turn_start[i] : cache_index[i]])
                turns[i].append(text)
                calls = len(tool_frames[i])
                real_call = status[i] == sampler.WAIT_TOOL
                if force_tool_calls:
                    inject = not real_call and calls < force_tool_calls
                    if calls >= force_tool_calls:
                        real_call = False
                else:
                    inject = False
                end = None
                if not (real_call or inject):
                    end = "capped" if status[i] == sampler.CAPPED else "done"
                elif calls >= self.pcfg.max_tool_calls:
                    end = "tool_budget"
                if end is None:
                    prefix: list[protocol.Segment] = []
                    if inject:
                        call_text = protocol.format_tool_call(forced_frames(i, calls))
                        prefix = [protocol.Text(call_text)]
                        call = protocol.parse_tool_call(call_text, self.pcfg)
                    elif tools_enabled:
                        call = protocol.parse_tool_call(text, self.pcfg)
                    else:
                        call = protocol.ToolCall((), error=TOOLS_DISABLED)
                    segs = prefix + protocol.tool_response_segments(
                        call, self.pcfg, calls_done=calls + 1
                    )
                    piece = chat.tokenize_segments(self.tok, segs, self.tokens_per_frame)
                    if cache_index[i] + len(piece.ids) + 1 >= self.static.max_len:
                        end = "capped"
                    else:
                        tool_frames[i].append(list(call.frames))
                        tool_errors[i].append(call.error)
                        responses[i] = piece
                if end is not None:
                    finished[i] = newly_finished[i] = True
                    stop[i] = end
            if distributed.any_process(newly_finished.any()):
                state = self.finish_fn(state, self._batch_put(newly_finished))
            if distributed.any_process(any(r is not None for r in responses)):
                seg = self._segment(responses, self.resp_len, self.pcfg.max_frames_per_call,
                                    next_pos)
                t0 = time.perf_counter()
                state = self.insert_fn(self.params, state, bank,
                                       self._put_segment(seg))
                jax.block_until_ready(state.cache_index)
                self.stats["insert_s"] += time.perf_counter() - t0
                self.stats["insert_calls"] += 1
                for i, r in enumerate(responses):
                    if r is not None:
                        turn_start[i] = cache_index[i] + len(r.ids)
            elif not distributed.any_process((status == sampler.RUNNING).any()):
                finished[:] = True  # nothing runs and nothing was served
        return self._trajectories(state, turns, tool_frames, tool_errors, stop)

    def _decode(self, ids: np.ndarray) -> str:
        """Text of generated ids; ids past the tokenizer's vocabulary (possible only without
        `restrict_to_tokenizer_vocab`) are dropped rather than failing the rollout."""
        vocab = int(self.tok.vocab_size)
        return self.tok.decode([int(i) for i in ids if 0 <= i < vocab])

    def _forced_frames(self, row: int, calls_done: int) -> list[int]:
        """Deterministic frames for injected calls: consecutive windows over all frames."""
        m = self.pcfg.max_frames_per_call
        total = self.pcfg.total_frames
        return [((calls_done * m + k) % total) + 1 for k in range(m)]

    def _trajectories(self, state, turns, tool_frames, tool_errors, stop) -> list[Trajectory]:
        tokens, kind, logp, positions, until, n, slot_frame, count = self._rows(
            state.tokens, state.kind, state.logp, state.positions, state.visible_until,
            state.cache_index, state.memory.slot_frame, state.memory.count,
            row_dims=(0, 0, 0, 1, 0, 0, 0, 0))
        w = self.pcfg.memory_window
        out = []
        for i in range(len(turns)):
            k = int(n[i])
            judgments = None
            reason = stop[i]
            if reason == "done":
                judgments = protocol.parse_final_answer(turns[i][-1]) if turns[i] else None
                reason = "answer" if judgments is not None else "no_answer"
            c = int(count[i])
            window = [int(slot_frame[i, j % w]) for j in range(max(0, c - w), c)]
            out.append(Trajectory(
                tokens=tokens[i, :k], kind=kind[i, :k], logp=logp[i, :k],
                positions=positions[:, i, :k], visible_until=until[i, :k],
                frames=protocol.initial_frames(self.pcfg)
                + [f for fr in tool_frames[i] for f in fr],
                window_frames=window, assistant_turns=turns[i], tool_frames=tool_frames[i],
                tool_errors=tool_errors[i], judgments=judgments, stop=reason,
            ))
        return out
