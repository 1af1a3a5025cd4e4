"""Multi-turn rollouts of a published checkpoint under its preset, in the compiled sampler.

The release re-renders the whole conversation before every turn (its memory rule removes the
images of all but the latest tool response, so tokens disappear from the middle of the prompt).
This engine renders the same conversation (`render.render`), finds the first token that differs
from what the row's KV cache holds, and re-prefills from there (`sampler.reprefill`: the cache
is truncated in compiled code, the prefix before the change is reused). Decoding is the
project's compiled `sampler.decode`. Segment lengths are padded to static buckets, so the number
of compiles depends on the buckets and the visual grids, never on the number of turns.

The environment is `rollout/release.py`: tool-call reading, responses, the model's turns as fed
back, the row's stop rules (call budget, token and image budgets, format) and the verdict.
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

from vrthinker_jax.models import model as model_lib
from vrthinker_jax.models import rope
from vrthinker_jax.rollout import chat, frame_bank, presets, release, render, sampler


@dataclasses.dataclass
class PresetTrajectory:
    """One finished row. turns: the generated text of each assistant turn (as decoded);
    history: each turn as fed back; generated: the ids of each turn; tool_frames: the 1-based
    candidate numbers each served call returned ([] for an error; a call for frame 0 returns
    the last candidate, as in the release); prompt_ids: the last prompt the model saw."""

    turns: list[str]
    history: list[str]
    generated: list[np.ndarray]
    tool_frames: list[list[int]]
    tool_errors: list[str | None]
    judgments: dict[str, int] | None
    stop: str  # answer | no_answer | tool_budget | tokens | images | format | cache_full
    prompt_ids: np.ndarray

    @property
    def assistant_turns(self) -> list[str]:  # the name eval's rows read
        return self.turns


@dataclasses.dataclass
class _Row:
    conv: render.Conversation
    candidates: np.ndarray
    turns: list[str] = dataclasses.field(default_factory=list)
    history: list[str] = dataclasses.field(default_factory=list)
    generated: list[np.ndarray] = dataclasses.field(default_factory=list)
    tool_frames: list[list[int]] = dataclasses.field(default_factory=list)
    tool_errors: list[str | None] = dataclasses.field(default_factory=list)
    stop: str = ""
    prompt_ids: np.ndarray | None = None
    prompt_len: int = 0


class PresetEngine:
    """Batched rollouts of `model` under `preset`.

    Args:
      model: the `Qwen25VL` nnx module; tokenizer: its tokenizer (data_pipelines.tokenizer);
      template: the checkpoint's `render.ChatTemplate`; preset: `presets.Preset`.
      max_len: KV-cache slots per row (default: the preset's token budget plus one turn).
      buckets: static segment lengths (a re-prefilled suffix is padded to the next one; each
        compiles once). Default: powers of two from 512 up to one that holds max_len.
      sampling: sampler.sampling_config overrides (temperature etc. default to the preset's).
    """

    def __init__(self, model, tokenizer, template: render.ChatTemplate,
                 preset: presets.Preset, *, max_len: int | None = None,
                 buckets: Sequence[int] | None = None, sampling=None):
        self.cfg = model.config
        self.tok, self.template, self.preset = tokenizer, template, preset
        budget = preset.budget
        sampling = dict(sampling or {})
        # the release checks its token cap only after a turn, so a prompt may pass it by a
        # response and a turn; a row whose prompt does not fit the cache ends ("cache_full")
        max_len = int(max_len or sampling.pop("max_len", 0)
                      or budget.max_total_tokens + budget.max_new_tokens + 8)
        if buckets is None:  # powers of two from 512, the last one max_len itself
            buckets = [512]
            while buckets[-1] < max_len:
                buckets.append(2 * buckets[-1])
            buckets[-1] = max_len
        self.buckets = tuple(sorted(int(b) for b in buckets))
        if self.buckets[-1] > max_len:
            raise ValueError(f"preset engine: bucket {self.buckets[-1]} exceeds max_len {max_len}")
        # prefill 512 tokens a pass: a re-prefill reads the weights once per chunk, and at 7B
        # smaller chunks make it weight-bound (tools/plan.py --eval-rollout plans with this)
        scfg = sampler.sampling_config(temperature=preset.sampling.temperature,
                                       top_p=preset.sampling.top_p, top_k=preset.sampling.top_k,
                                       prefill_chunk=512)
        scfg.update(sampling)
        self.graphdef, self.params = nnx.split(model)
        stop = lambda t: (int(tokenizer.token_to_id(t)),)  # noqa: E731
        # decode writes rows that do not run to slot max_len, and a chunked re-prefill's last
        # chunk may pass max_len by less than a chunk: that is all the scratch needed (rows a
        # re-prefill does not serve are finished and write over their own slots)
        chunk = int(scfg.prefill_chunk) or self.buckets[-1]
        self.static = sampler.Static(
            max_len=max_len, scratch=chunk, window=1, tokens_per_frame=1,
            stop_tool=(stop(release.TOOL_END),),
            stop_end=(stop(release.IM_END), stop("<|endoftext|>")),
            temperature=float(scfg.temperature), top_k=int(scfg.top_k),
            top_p=float(scfg.top_p), max_new_tokens=max_len,
            max_turn_tokens=int(budget.max_new_tokens),
            patch=frame_bank.PatchSpec.from_model_config(self.cfg),
            vocab_limit=int(tokenizer.vocab_size), serve_fraction=1.0,
            kv_buckets=int(scfg.insert_kv_buckets), prefill_chunk=int(scfg.prefill_chunk),
            banned_ids=chat.structural_ids(tokenizer),
        )
        self.decode_fn, _, self.finish_fn = sampler.compiled(self.static, self.graphdef)
        self.reprefill_fn = sampler.compiled_reprefill(self.static, self.graphdef)
        self._init = jax.jit(self._init_state, static_argnums=0)
        self.stats = {"decode_s": 0.0, "prefill_s": 0.0, "vision_s": 0.0, "render_s": 0.0,
                      "prefill_tokens": 0, "reused_tokens": 0}

    def _init_state(self, batch: int, rng):
        return sampler.init_state(model_lib.init_cache, self.cfg, batch, self.static, rng,
                                  jnp.float32)

    def update_params(self, params):
        self.params = params

    def compile_count(self) -> int:
        fns = (self.decode_fn, self.reprefill_fn, self.finish_fn, self._vision)
        return sum(f._cache_size() for f in fns)

    # ----------------------------------------------------------------- vision

    @functools.cached_property
    def _vision(self):
        def encode(params, pixels, grid):
            return nnx.merge(self.graphdef, params).encode_vision(pixels, grid)

        return jax.jit(encode, static_argnums=2)

    def _visual_rows(self, inputs: render.ModelInputs, items: list[int]) -> jax.Array:
        """[n_tokens, hidden] visual embeddings of the listed items (in order; images first
        numbered 0.., then the video as len(images)), encoded one image or one temporal group of
        a video at a time (one compile per frame size)."""
        merge2 = self.cfg.vision.spatial_merge_size ** 2
        grids = [tuple(int(v) for v in g) for g in inputs.image_grid_thw]
        vgrids = [tuple(int(v) for v in g) for g in inputs.video_grid_thw]
        starts = np.cumsum([0] + [int(np.prod(g)) for g in grids])
        vstarts = np.cumsum([0] + [int(np.prod(g)) for g in vgrids])
        out = []
        for k in items:
            if k < len(grids):
                pv, g = inputs.pixel_values[starts[k]:starts[k + 1]], grids[k]
            else:
                v = k - len(grids)
                pv, g = inputs.pixel_values_videos[vstarts[v]:vstarts[v + 1]], vgrids[v]
            # one temporal group at a time: the tower attends within a group only (its window
            # and full-attention blocks are per frame), so a video's groups encode alone, with
            # the compile (and the activation memory) of one image of that size
            t, hw = g[0], g[1] * g[2]
            for j in range(t):
                group = jnp.asarray(pv[j * hw:(j + 1) * hw], jnp.float32)
                out.append(self._vision(self.params, group, ((1, g[1], g[2]),)))
            assert sum(o.shape[0] for o in out[-t:]) == int(np.prod(g)) // merge2
        return jnp.concatenate(out) if out else jnp.zeros((0, self.cfg.text.hidden_size))

    # ----------------------------------------------------------------- one re-prefill

    def _suffix(self, inputs: render.ModelInputs, cached: np.ndarray):
        """(start, suffix ids, positions [3, n], next position, visual items in the suffix,
        bool [n] the suffix's visual tokens) for a row whose cache holds `cached`.

        Visual tokens are found by id here, as the release's processor finds them: the ids are
        the release's own rendering (its chat template expands each image or video into pads),
        and the sampler never draws a pad (`chat.structural_ids`)."""
        ids = inputs.input_ids[0].astype(np.int32)
        n = min(len(ids), len(cached))
        diff = np.nonzero(ids[:n] != cached[:n])[0]
        start = int(diff[0]) if len(diff) else n
        img, vid = int(self.cfg.image_token_id), int(self.cfg.video_token_id)
        visual = (ids == img) | (ids == vid)
        # a visual item that begins before `start` is re-encoded whole: back up to its start
        while start > 0 and start < len(ids) and visual[start] and visual[start - 1]:
            start -= 1
        pos, nxt = rope.rope_positions(ids, inputs.image_grid_thw, inputs.video_grid_thw,
                                       inputs.second_per_grid_ts, self.cfg)
        # item number of each visual token: images in order, then videos
        item_start = visual & ~np.concatenate([[False], visual[:-1]])
        is_img = ids == img
        img_no = np.cumsum(item_start & is_img) - 1
        vid_no = np.cumsum(item_start & ~is_img) - 1 + len(inputs.image_grid_thw)
        item = np.where(visual, np.where(is_img, img_no, vid_no), -1)
        items = sorted({int(i) for i in item[start:] if i >= 0})
        return start, ids[start:], pos[:, start:], int(nxt), items, visual[start:]

    def _reprefill(self, state, rows: dict[int, render.ModelInputs], cached: list[np.ndarray],
                   batch: int):
        parts = {i: self._suffix(inp, cached[i]) for i, inp in rows.items()}
        longest = max(len(p[1]) for p in parts.values())
        r = next((b for b in self.buckets if b >= longest), None)
        if r is None:
            raise ValueError(f"preset engine: a prompt suffix of {longest} tokens exceeds the "
                             f"largest bucket {self.buckets[-1]} (raise `buckets`)")
        hidden = self.cfg.text.hidden_size
        tokens = np.zeros((batch, r), np.int32)
        positions = np.zeros((3, batch, r), np.int32)
        length = np.zeros(batch, np.int32)
        nxt = np.zeros(batch, np.int32)
        start = np.zeros(batch, np.int32)
        serve = np.zeros(batch, bool)
        is_visual = np.zeros((batch, r), bool)
        t0 = time.perf_counter()
        visual = []
        for i in range(batch):
            if i not in parts:
                visual.append(jnp.zeros((r, hidden)))
                continue
            s, ids, pos, nx, items, vi = parts[i]
            n = len(ids)
            tokens[i, :n], positions[:, i, :n], length[i], nxt[i] = ids, pos, n, nx
            start[i], serve[i], is_visual[i, :n] = s, True, vi
            rows_vis = self._visual_rows(rows[i], items)
            visual.append(jnp.pad(rows_vis, ((0, r - rows_vis.shape[0]), (0, 0))))
            self.stats["prefill_tokens"] += n
            self.stats["reused_tokens"] += s
        self.stats["vision_s"] += time.perf_counter() - t0
        seg = sampler.Segment(tokens, length, positions, nxt, np.zeros((batch, 1), np.int32),
                              np.zeros((batch, 1), np.int32), np.zeros(batch, np.int32), serve)
        t0 = time.perf_counter()
        state = self.reprefill_fn(self.params, state, jax.device_put(seg), jnp.asarray(start),
                                  jnp.stack(visual), jnp.asarray(is_visual))
        jax.block_until_ready(state.cache_index)
        self.stats["prefill_s"] += time.perf_counter() - t0
        return state

    # ----------------------------------------------------------------- the rollout

    def rollout(self, prompts: list[str], candidates: Sequence[np.ndarray], rng: jax.Array, *,
                script: Callable[[int, int, str], str] | None = None,
                tools_enabled: bool = True) -> list[PresetTrajectory]:
        """Rolls out one trajectory per prompt.

        candidates: per row uint8 [2 * candidates_per_video, H, W, 3] (video 1's first; rows
          may differ in frame size).
        tools_enabled: must be True: the release's protocol has no tools-off mode.
        script: (row, turn, generated text) -> the turn's text as the environment reads it
          (benchmarks and tests: e.g. append a tool call to a random model's text).
        """
        if not tools_enabled:
            raise ValueError(f"preset {self.preset.name}: the release's protocol has no "
                             "tools-off mode (--no-tools)")
        p = self.preset
        b = len(prompts)
        rows = [_Row(release.first_turn(p, pr, c), c) for pr, c in zip(prompts, candidates)]
        state = self._init(b, rng)
        cached = [np.zeros(0, np.int32)] * b
        serve = {i: self._render(rows[i], p.first_turn.generation_prompt) for i in range(b)}
        for i in [i for i, v in serve.items() if v.input_ids.shape[1] + 1 >= self.static.max_len]:
            rows[i].stop = "cache_full"
            del serve[i]
        while serve:
            state = self._reprefill(state, serve, cached, b)
            t0 = time.perf_counter()
            state = self.decode_fn(self.params, state)  # serve_fraction 1: until no row runs
            index, tokens = jax.device_get((state.cache_index, state.tokens))
            self.stats["decode_s"] += time.perf_counter() - t0
            done = np.zeros(b, bool)
            turn_start = {i: len(v.input_ids[0]) for i, v in serve.items()}
            serve = {}
            for i, start in turn_start.items():
                cached[i] = tokens[i, :index[i]].copy()
                ids = tokens[i, start:index[i]]
                if self._after_turn(rows[i], ids, start, i, script):
                    serve[i] = self._render(rows[i], True)
                    if serve[i].input_ids.shape[1] + 1 >= self.static.max_len:
                        rows[i].stop = "cache_full"
                        del serve[i]
                if i not in serve:
                    done[i] = True
            if done.any():
                state = self.finish_fn(state, jnp.asarray(done))
        return [self._trajectory(r) for r in rows]

    def _render(self, row: _Row, gen: bool) -> render.ModelInputs:
        t0 = time.perf_counter()
        out = render.render(row.conv, self.preset, self.template, self.tok,
                            add_generation_prompt=gen)
        self.stats["render_s"] += time.perf_counter() - t0
        row.prompt_ids, row.prompt_len = out.input_ids[0], out.input_ids.shape[1]
        return out

    def _after_turn(self, row: _Row, ids: np.ndarray, prompt_len: int, i: int,
                    script) -> bool:
        """Records a finished turn and serves its tool call; False when the row ends (E:2446-2520
        for the stop rules)."""
        p = self.preset
        text = self.tok.decode([int(t) for t in ids])
        if script is not None:
            text = script(i, len(row.turns), text)
        row.turns.append(text)
        row.generated.append(np.asarray(ids))
        turn = release.read_turn(p, text)
        hist = turn.history
        row.history.append(hist)
        stop = None
        # a turn cut by the token cap is read as it stands, as the release does
        if not turn.wants_tool:
            stop = "done"
        elif len(row.tool_frames) >= p.budget.max_tool_calls:
            stop = "tool_budget"
        elif prompt_len + len(ids) > p.budget.max_total_tokens:
            stop = "tokens"
        elif not turn.format_ok:
            stop = "format"
        if stop is not None:
            row.conv.messages.append({"role": "assistant",
                                      "content": [{"type": "text", "text": hist}]})
            row.stop = stop
            return False
        result = release.parse_call(p, text)
        images = 1 + sum(len(f) for f in row.tool_frames) + len(result.frames)
        if images > p.budget.max_images:
            row.stop = "images"
            return False
        row.conv.messages.append({"role": "assistant", "content": [{"type": "text",
                                                                    "text": hist}]})
        last = len(row.tool_frames) + 1 == p.budget.max_tool_calls
        row.conv.messages.append(release.response_message(p, result, row.conv, row.candidates,
                                                          last=last))
        row.tool_frames.append([f + 1 for f in result.frames])
        row.tool_errors.append(result.error)
        return True

    def _trajectory(self, row: _Row) -> PresetTrajectory:
        # the verdict is read from the generated text (the rebuilt history drops what follows
        # </final answer>, where the box is)
        judgments = release.parse_answer(self.preset, "".join(row.turns))
        stop = row.stop
        if stop == "done":
            stop = "answer" if judgments else "no_answer"
        return PresetTrajectory(row.turns, row.history, row.generated, row.tool_frames,
                                row.tool_errors, judgments, stop, row.prompt_ids)
