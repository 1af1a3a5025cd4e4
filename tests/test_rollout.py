"""The rollout engine on the tiny random Qwen2.5-VL: multi-turn frames and visibility, training
reproduces rollout log-probs, compile counts, sharded == single device, parity with transformers.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_rollout_helpers import make_tokenizer, model_config_for, tiny_protocol

from vrthinker_jax import sharding
from vrthinker_jax.models import config as model_config
from vrthinker_jax.rollout import chat, frame_bank, memory, protocol, sampler
from vrthinker_jax.rollout import engine as engine_lib
from vrthinker_jax.rollout import environment as env_lib

FRAME = (28, 56)  # 2 x 4 patches -> 1 x 2 merged tokens per frame
PROMPTS = ["a fox runs in snow", "a cat", "two dogs play with a ball", "rain"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vrthinker_jax.checkpoints import hf

    tok = make_tokenizer(str(tmp_path_factory.mktemp("tok")))
    cfg = model_config_for(tok)
    # the same random weights on both sides: a transformers model, imported by the checkpoint
    # importer
    torch.manual_seed(0)
    hf_cfg = Qwen2_5_VLConfig(**model_config.to_hf_config(cfg))
    hf_cfg._attn_implementation = "eager"
    hf_model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():
        # weights larger than the default init, so that the output depends on the context
        # (prompt text and frames) and greedy choices have clear margins
        for name, p in hf_model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
            elif p.ndim > 2:
                p.normal_(0.0, 0.1)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    model = hf.from_state_dict(cfg, state)
    # 7 turns: up to 6 tool calls, so K=1 and K=6 share one engine
    pcfg = tiny_protocol(max_turns=7)
    scfg = sampler.sampling_config(temperature=0.0, max_len=1024, max_new_tokens=400,
                                   max_turn_tokens=12, prompt_buckets=(96, 160),
                                   restrict_to_tokenizer_vocab=False)  # as transformers
    eng = engine_lib.RolloutEngine(model, cfg, tok, pcfg, scfg, FRAME)
    rng = np.random.default_rng(0)
    banks = rng.integers(0, 256, (len(PROMPTS), pcfg.total_frames) + FRAME + (3,), np.uint8)
    return dict(tok=tok, cfg=cfg, model=model, pcfg=pcfg, scfg=scfg, engine=eng, banks=banks,
                hf_model=hf_model, state=state)


def _forced(row, calls):
    # row-dependent selections, including a duplicate frame and frames of both videos
    table = [[2, 9], [16, 1, 5], [9], [4, 12, 13], [7, 7, 8], [1, 2, 3]]
    return table[(calls + row) % len(table)]


@pytest.fixture(scope="module")
def forced_k2(setup):
    """The module's first rollout (K=2 tool calls per row); records what it compiled."""
    eng = setup["engine"]
    before = eng.compile_count()
    trajs = eng.rollout(PROMPTS, setup["banks"], jax.random.key(0), force_tool_calls=2,
                        forced_frames=_forced)
    setup["first_rollout_compiles"] = eng.compile_count() - before
    return trajs


def _events_from_trajectory(traj, tok, tpf):
    """(frame_of_token, event starts, frames per event) recovered from a trajectory's kinds."""
    n = len(traj.tokens)
    frame_of = np.full(n, -1, np.int32)
    vis = np.nonzero(traj.kind == sampler.VISUAL)[0]
    for j, k in enumerate(vis):
        frame_of[k] = j // tpf
    im_end = tok.token_to_id(protocol.IM_END)
    starts, i = [0], 0
    gen = traj.kind == sampler.GENERATED
    while i < n:  # each context run after a generated run is one environment event
        if gen[i]:
            while i < n and gen[i]:
                i += 1
            j = i
            while j < n and not gen[j] and traj.tokens[j] != im_end:
                j += 1
            if j < n and not gen[j]:
                starts.append(j)
            i = j
        i += 1
    per_event = [int(len(set(frame_of[s:e][frame_of[s:e] >= 0])))
                 for s, e in zip(starts, starts[1:] + [n])]
    return frame_of, starts, per_event


def test_forced_multi_turn_frames_and_window(setup, forced_k2):
    pcfg, eng, tok = setup["pcfg"], setup["engine"], setup["tok"]
    w = pcfg.memory_window
    evictions = 0
    for row, traj in enumerate(forced_k2):
        assert traj.tool_calls == 2 and traj.turns == 3
        # a turn the model ends with </tool_call> is answered with the call's parse (often an
        # error for a random model);
        # any other turn end gets the forced call injected
        expected_calls = []
        for c, turn in enumerate(traj.assistant_turns[:2]):
            if turn.endswith(protocol.TOOL_CALL_END):  # the model's own stop
                expected_calls.append(list(protocol.parse_tool_call(turn, pcfg).frames))
            else:
                expected_calls.append(list(dict.fromkeys(_forced(row, c))))
                assert protocol.format_tool_call(_forced(row, c)) in tok.decode(
                    traj.tokens.tolist())
        assert traj.tool_frames == expected_calls
        frames = protocol.initial_frames(pcfg) + expected_calls[0] + expected_calls[1]
        assert traj.frames == frames
        assert traj.window_frames == frames[-w:]
        assert int((traj.kind == sampler.VISUAL).sum()) == len(frames) * eng.tokens_per_frame
        # visibility equals the host-side definition used by training
        frame_of, starts, per_event = _events_from_trajectory(traj, tok, eng.tokens_per_frame)
        assert per_event == [2 * pcfg.num_initial_frames] + [len(c) for c in expected_calls]
        ref = memory.visible_until(frame_of, starts, per_event, w)
        np.testing.assert_array_equal(traj.visible_until, ref)
        evicted = max(0, len(frames) - w)
        evictions += evicted
        assert int((traj.visible_until < memory.NEVER).sum()) == evicted * eng.tokens_per_frame
        # the loss mask is exactly the model's turns (injected calls are environment text)
        assert int(traj.loss_mask.sum()) >= 3
        assert tok.decode(traj.generated.tolist()) == "".join(traj.assistant_turns)
        assert int(traj.loss_mask.sum()) <= 3 * setup["scfg"].max_turn_tokens
        assert traj.stop in ("capped", "answer", "no_answer", "tool_budget")
    assert evictions > 0


def _learner_batch(setup, trajs, rows):
    """Training rows from the trajectories, built by the learner's own code
    (`examples.from_trajectory`, `examples.collate`)."""
    from vrthinker_jax.train import examples

    seq = max(len(t.tokens) for t in trajs)
    n_frames = max(len(t.frames) for t in trajs)
    batch = examples.collate([
        examples.from_trajectory(t, setup["banks"][r], seq_len=seq, max_frames=n_frames)
        for r, t in zip(rows, trajs)])
    # the arrays (what the learner puts on the device; per-row text stays on the host)
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}


def _learner_logp(setup, batch):
    """The learner's log-probs of the rows (`steps.sequence_token_stats`): float32 [b, seq - 1]."""
    from vrthinker_jax.train import steps

    eng, model = setup["engine"], setup["model"]
    spec = steps.StepSpec(patch=eng.patch)
    logp, _ = jax.jit(lambda m, b: steps.sequence_token_stats(m, b, spec))(model, batch)
    return np.asarray(logp)


def _learner_logits(setup, batch):
    """Full logits float32 [b, seq, vocab] of the rows from the learner's embedding
    (`steps.embed_inputs`) and mask (`memory.attention_mask`): what `sequence_token_stats`
    projects, for checking greedy choices."""
    from vrthinker_jax.train import steps

    eng = setup["engine"]
    spec = steps.StepSpec(patch=eng.patch)

    @jax.jit
    def logits(m, b):
        embeds = steps.embed_inputs(m, b["tokens"], b["frames"], spec, b["visual"])
        mask = memory.attention_mask(b["visible_until"], b["valid"])
        return m(b["tokens"], b["positions"], mask, inputs_embeds=embeds)[0]

    return np.asarray(logits(setup["model"], batch))


def test_learner_path_reproduces_rollout_logprobs(setup, forced_k2):
    """What GRPO trains on: rows built by `examples.from_trajectory` through the learner's
    `sequence_token_stats` give the rollout's log-probs (first-step ratio 1) on every generated
    token - same tokens, positions, frames (merged by the one `merge_visual_at`, at the
    positions the rollout recorded), visibility - and the learner's logits pick the rollout's
    greedy tokens. A pad id inside
    the model's text (which the sampler can no longer draw, but text may hold) stays text: the
    learner merges frames where the rollout put them, not where the pad id is."""
    rows = [0, 1]
    trajs = [forced_k2[r] for r in rows]
    batch = _learner_batch(setup, trajs, rows)
    logp = _learner_logp(setup, batch)
    logits = _learner_logits(setup, batch)
    banned = list(setup["engine"].static.banned_ids)
    for i, t in enumerate(trajs):
        gen = t.loss_mask[1:]
        assert gen.sum() > 0
        got = logp[i, : len(t.tokens) - 1][gen]
        np.testing.assert_allclose(got, t.logp[1:][gen], atol=2e-4)
        np.testing.assert_allclose(np.exp(got - t.logp[1:][gen]), 1.0, atol=5e-4)  # ratio
        structural = np.isin(t.tokens[t.loss_mask], banned)
        assert not structural.any()
        # greedy: every generated token is the argmax of the learner's logits over the ids the
        # sampler may draw (never a vision marker or pad)
        lg = logits[i, : len(t.tokens) - 1].copy()
        lg[:, banned] = -np.inf
        np.testing.assert_array_equal(np.argmax(lg, -1)[gen], t.tokens[1:][gen])

    # the same trajectory with its first generated token after a frame replaced by the pad id:
    # the learner embeds it as text and every frame stays where the rollout put it (merging by
    # pad id would take it for a frame and shift every later frame of the row)
    import dataclasses

    from vrthinker_jax.train import examples, steps

    eng, model = setup["engine"], setup["model"]
    t = trajs[0]
    first_frame = int(np.argmax(t.kind == sampler.VISUAL))
    k = first_frame + int(np.argmax(t.loss_mask[first_frame:]))
    tokens = t.tokens.copy()
    tokens[k] = eng.vt.pad
    spec = steps.StepSpec(patch=eng.patch)

    def embeds(traj):
        b = examples.collate([examples.from_trajectory(
            traj, setup["banks"][0], seq_len=len(t.tokens), max_frames=len(t.frames))])
        e = steps.embed_inputs(model, b["tokens"], b["frames"], spec, b["visual"])
        return np.asarray(e)[0], b["visual"][0]

    e_a, vis = embeds(t)
    e_b, vis_b = embeds(dataclasses.replace(t, tokens=tokens))
    np.testing.assert_array_equal(vis, vis_b)
    np.testing.assert_allclose(e_b[vis], e_a[vis], atol=1e-6)
    pad_embed = np.asarray(model.embed(np.asarray([[eng.vt.pad]])))[0, 0]
    np.testing.assert_allclose(e_b[k], pad_embed, atol=1e-6)


def test_scripted_environment_is_the_forced_rollout(setup, forced_k2):
    """`force_tool_calls` / `forced_frames` are shorthand for a `ScriptedEnvironment`: passing
    the environment gives the same trajectories, with no new compile."""
    eng = setup["engine"]
    before = eng.compile_count()
    env = env_lib.ScriptedEnvironment(setup["pcfg"], 2, _forced)
    trajs = eng.rollout(PROMPTS, setup["banks"], jax.random.key(0), environment=env)
    assert eng.compile_count() == before
    for a, b in zip(forced_k2, trajs):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.logp, b.logp)
        assert (a.tool_frames, a.tool_errors, a.stop) == (b.tool_frames, b.tool_errors, b.stop)
    with pytest.raises(ValueError, match="not both"):
        eng.rollout(PROMPTS, setup["banks"], jax.random.key(0), environment=env,
                    force_tool_calls=1)


def test_pad_id_in_prompt_text_stays_text(setup):
    """A prompt whose text holds the image-pad token: the rollout merges frames where it wrote
    them (never where a pad id is), records that token as context, and the learner's rows give
    the rollout's log-probs back."""
    eng, tok = setup["engine"], setup["tok"]
    prompts = [p + " <|image_pad|>" for p in PROMPTS]
    env = env_lib.ScriptedEnvironment(setup["pcfg"], 1, _forced)
    trajs = eng.rollout(prompts, setup["banks"], jax.random.key(0), environment=env)
    for t in trajs:
        in_text = (t.tokens == eng.vt.pad) & (t.kind != sampler.VISUAL)
        assert in_text.sum() == 1 and not t.loss_mask[in_text].any()
        assert int((t.kind == sampler.VISUAL).sum()) == len(t.frames) * eng.tokens_per_frame
    assert tok.decode(trajs[0].tokens[trajs[0].kind == sampler.CONTEXT].tolist()).count(
        "<|image_pad|>") == 1
    rows = [0, 1]
    logp = _learner_logp(setup, _learner_batch(setup, [trajs[r] for r in rows], rows))
    for i in rows:
        t = trajs[i]
        gen = t.loss_mask[1:]
        np.testing.assert_allclose(logp[i, : len(t.tokens) - 1][gen], t.logp[1:][gen],
                                   atol=2e-4)


@pytest.mark.slow
def test_rows_advance_independently(setup):
    """One row ends its turn with a tool call and is served while the other keeps decoding:
    the other's tokens are exactly those of an undisturbed run."""
    eng, pcfg = setup["engine"], setup["pcfg"]
    banks = setup["banks"][:2]
    plain = eng.rollout(PROMPTS[:2], banks, jax.random.key(0))
    assert [t.stop for t in plain] == ["capped", "capped"]  # the random model never stops
    gens = [t.generated for t in plain]

    def first(g, x):
        hits = np.nonzero(g == x)[0]
        return int(hits[0]) if len(hits) else len(g)

    # a token that row `a` emits strictly before row `b` does plays the tool-call stop
    a, stop, step_a, step_b = min(
        ((r, int(x), first(gens[r], x), first(gens[1 - r], x))
         for r in (0, 1) for x in gens[r][:-1]),
        key=lambda c: c[2] - c[3],
    )
    b = 1 - a
    assert step_a < step_b

    class StopTok:
        def __getattr__(self, name):
            return getattr(setup["tok"], name)

        def token_to_id(self, t):
            return stop if t == protocol.TOOL_CALL_END else setup["tok"].token_to_id(t)

    scfg = setup["scfg"]
    eng2 = engine_lib.RolloutEngine(setup["model"], setup["cfg"], StopTok(), pcfg, scfg, FRAME)
    trajs = eng2.rollout(PROMPTS[:2], banks, jax.random.key(0))
    ta, tb = trajs[a], trajs[b]
    # row a stopped at step_a, got an error reply (not a valid call) and went on; row b was not
    # disturbed up to its own stop (or its turn budget)
    assert ta.tool_calls >= 1 and ta.tool_errors[0] is not None
    np.testing.assert_array_equal(ta.generated[: step_a + 1], gens[a][: step_a + 1])
    assert "Tool error" in setup["tok"].decode(ta.tokens.tolist())
    n_b = min(step_b + 1, len(gens[b]))
    np.testing.assert_array_equal(tb.generated[:n_b], gens[b][:n_b])
    if step_b == len(gens[b]):
        np.testing.assert_array_equal(tb.tokens, plain[b].tokens)


def test_compiles_do_not_grow_with_tool_calls(setup, forced_k2):
    """The first rollout compiles one executable per rollout function - init, prompt insert,
    decode, response insert, finish - and a K=1 rollout runs all five too; K=1 and K=6 rollouts
    then add no compilation at all, so compiles(K=6) == compiles(K=1) == 5."""
    eng = setup["engine"]
    assert setup["first_rollout_compiles"] == 5
    before = eng.compile_count()
    for k in (1, 6):
        trajs = eng.rollout(PROMPTS, setup["banks"], jax.random.key(k), force_tool_calls=k)
        assert [t.tool_calls for t in trajs] == [k] * len(PROMPTS)
        assert eng.compile_count() == before, f"K={k} compiled again"


def test_sharded_rollout_equals_single_device(setup, forced_k2):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    eng = setup["engine"]
    sharded = engine_lib.RolloutEngine(
        setup["model"], setup["cfg"], setup["tok"], setup["pcfg"], setup["scfg"], FRAME,
        mesh=mesh,
    )
    assert sharded.params["embed_tokens"].value.sharding.spec != eng.params[
        "embed_tokens"].value.sharding.spec if hasattr(eng.params["embed_tokens"].value.sharding,
                                                        "spec") else True
    trajs = sharded.rollout(PROMPTS, setup["banks"], jax.random.key(0), force_tool_calls=2,
                            forced_frames=_forced)
    for a, b in zip(forced_k2, trajs):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.visible_until, b.visible_until)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_allclose(a.logp, b.logp, atol=1e-4)
        assert a.frames == b.frames


def _hf_greedy(setup, ids, pixel_values=None, grid=None):
    import torch

    tok = setup["tok"]
    stops = [tok.token_to_id(protocol.IM_END), tok.token_to_id("<|endoftext|>"),
             tok.token_to_id(protocol.TOOL_CALL_END)]
    kw = {}
    if pixel_values is not None:
        kw = dict(pixel_values=torch.as_tensor(np.array(pixel_values)),
                  image_grid_thw=torch.as_tensor(np.asarray(grid, np.int64)),
                  mm_token_type_ids=torch.as_tensor(
                      (ids == setup["cfg"].image_token_id).astype(np.int64))[None])
    n = setup["scfg"].max_turn_tokens
    # the engine never draws vision markers or pads: transformers is told the same
    kw["suppress_tokens"] = list(setup["engine"].static.banned_ids)
    with torch.no_grad():
        out = setup["hf_model"].generate(
            torch.as_tensor(ids[None].astype(np.int64)), max_new_tokens=n, do_sample=False,
            eos_token_id=stops, pad_token_id=stops[0], **kw,
        )
    return out[0, len(ids):].numpy()


def test_greedy_text_only_equals_transformers_generate(setup):
    eng, tok = setup["engine"], setup["tok"]
    texts = [f"{protocol.IM_START}user\nIs video 1 better? {p}{protocol.IM_END}\n"
             f"{protocol.IM_START}assistant\n" for p in PROMPTS]
    ours = eng.generate([[protocol.Text(t)] for t in texts], jax.random.key(0))
    for text, got in zip(texts, ours):
        ref = _hf_greedy(setup, np.asarray(tok.encode(text)))
        np.testing.assert_array_equal(got, ref)


def test_scanned_layers_rollout_equals_layer_loop(setup):
    """The 3b/7b configs scan the decoder layers: the decode loop must trace with nnx.scan inside
    lax.while_loop and give the same greedy tokens as the per-layer loop."""
    from vrthinker_jax.checkpoints import hf

    cfg = setup["cfg"].copy_and_resolve_references()
    cfg.scan_layers = True
    model = hf.from_state_dict(cfg, setup["state"])
    eng = engine_lib.RolloutEngine(model, cfg, setup["tok"], setup["pcfg"], setup["scfg"], FRAME)
    segs = [protocol.prompt_segments(p, setup["pcfg"]) for p in PROMPTS]
    ours = eng.generate(segs, jax.random.key(0), banks=setup["banks"])
    ref = setup["engine"].generate(segs, jax.random.key(0), banks=setup["banks"])
    for got, want in zip(ours, ref):
        np.testing.assert_array_equal(got, want)


def test_greedy_two_video_prompt_equals_transformers_generate(setup):
    """The protocol's first prompt (initial frames of both videos, each frame an image): the
    rollout's prefill (frames gathered from the bank, patchified and encoded in jit) gives the
    same greedy tokens as transformers on the same pixel values and grids."""
    eng, pcfg = setup["engine"], setup["pcfg"]
    # the rollout's batch, bucket and frame count: reuses the rollout's compiled functions
    segs = [protocol.prompt_segments(p, pcfg) for p in PROMPTS]
    ours = eng.generate(segs, jax.random.key(0), banks=setup["banks"])
    for row, (seg, got) in enumerate(zip(segs, ours)):
        t = chat.tokenize_segments(setup["tok"], seg, eng.tokens_per_frame)
        pixels = setup["banks"][row][np.asarray(t.frames) - 1]
        pv = frame_bank.patchify_numpy(pixels, eng.patch)
        grid = [eng.patch.grid_thw(*FRAME)] * len(t.frames)
        ref = _hf_greedy(setup, t.ids, pv.reshape(-1, pv.shape[-1]), grid)
        np.testing.assert_array_equal(got, ref)
    # the frames matter: other pixels, other tokens
    other = eng.generate(segs, jax.random.key(0), banks=255 - setup["banks"])
    assert any(not np.array_equal(a, b) for a, b in zip(ours, other))
