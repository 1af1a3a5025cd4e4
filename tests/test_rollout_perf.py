"""The rollout's fast paths change cost, not results: logits at chosen positions, the stacked KV
cache written in place, attention over a static cache prefix, bucketed inserts and chunked
prefill."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_rollout_helpers import make_tokenizer, model_config_for, tiny_protocol

from vrthinker_jax.models import config as model_config
from vrthinker_jax.models import model as model_lib
from vrthinker_jax.rollout import chat, frame_bank, memory, sampler
from vrthinker_jax.rollout import engine as engine_lib

B, S, MAX_LEN = 2, 6, 24


@functools.cache
def _model(scan: bool):
    cfg = model_config.get_config("tiny")
    cfg.scan_layers = scan
    return model_lib.Qwen25VL(cfg, rngs=nnx.Rngs(0))


@jax.jit
def _call(state, graphdef, ids, pos, mask, cache, index, at):
    m = nnx.merge(graphdef, state)
    return m(ids, pos, mask, cache=cache, cache_index=index, logits_at=at)


@functools.partial(jax.jit, static_argnums=(1,))
def _call_prefixes(state, graphdef, ids, pos, mask, cache, index, need):
    m = nnx.merge(graphdef, state)
    return m(ids, pos, mask, cache=cache, cache_index=index, kv_prefixes=(8, 16, MAX_LEN),
             kv_need=need)


def _inputs(kv_len):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 500, (B, S)), jnp.int32)
    start = np.array([3, 9], np.int32)
    q = start[:, None] + np.arange(S)[None]
    pos = jnp.asarray(np.broadcast_to(q[None], (3, B, S)), jnp.int32)
    slots = np.arange(kv_len)[None, None]
    # each query sees the (random) history before its row's segment and the segment causally
    mask = slots <= q[:, :, None]
    return ids, pos, jnp.asarray(mask), jnp.asarray(start)


def _cache(m):
    rng = np.random.default_rng(1)
    c = model_lib.init_cache(m.config, B, MAX_LEN, jnp.float32)
    return model_lib.KVCache(jnp.asarray(rng.normal(size=c.k.shape), jnp.float32),
                             jnp.asarray(rng.normal(size=c.v.shape), jnp.float32))


@pytest.mark.parametrize("scan", [False, True])
def test_logits_at_and_prefix_attention_match_the_full_call(scan):
    m = _model(scan)
    graphdef, state = nnx.split(m)
    ids, pos, full_mask, start = _inputs(MAX_LEN)
    full, cache_full = _call(state, graphdef, ids, pos, full_mask, _cache(m), start, None)
    assert full.shape == (B, S, m.config.text.vocab_size)
    at = jnp.asarray([[S - 1, 0], [2, 4]], jnp.int32)
    # slots >= 16 are invisible to every query (the last query sits at slot 9 + 5 = 14)
    kv_len = 16
    part, cache_part = _call(state, graphdef, ids, pos, full_mask[:, :, :kv_len], _cache(m),
                             start, at)
    assert part.shape == (B, 2, m.config.text.vocab_size)
    want = np.take_along_axis(np.asarray(full), np.asarray(at)[:, :, None], axis=1)
    np.testing.assert_allclose(np.asarray(part), want, atol=1e-5, rtol=1e-5)
    # layer 0's keys and values do not depend on attention: bit-equal; later layers' come from a
    # shorter reduction over keys whose weights are exactly 0: equal up to float rounding
    for a, b in ((cache_part.k, cache_full.k), (cache_part.v, cache_full.v)):
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # per-layer switch over cache prefixes: the bucket holding slot 14 (16) gives the same result
    m2 = functools.partial(_call_prefixes, state, graphdef, ids, pos, full_mask, _cache(m), start)
    for need in (15, 3):  # a fitting bucket, and one too short: shows the switch is taken
        got, cache_got = m2(jnp.int32(need))
        # layer 0's keys do not depend on attention; later layers' do
        np.testing.assert_array_equal(np.asarray(cache_got.k[0]), np.asarray(cache_full.k[0]))
        if need == 15:  # (a shorter reduction: equal up to float rounding)
            np.testing.assert_allclose(np.asarray(cache_got.k), np.asarray(cache_full.k),
                                       atol=1e-6)
        close = np.allclose(np.asarray(got), np.asarray(full), atol=1e-5, rtol=1e-5)
        assert close == (need == 15)
    # only each row's S new slots changed
    before = np.asarray(_cache(m).k)
    changed = np.any(np.asarray(cache_full.k) != before, axis=(0, 2, 4))  # [b, max_len]
    for i, s0 in enumerate(np.asarray(start)):
        np.testing.assert_array_equal(np.nonzero(changed[i])[0], np.arange(s0, s0 + S))


def test_scan_and_unrolled_cache_paths_agree():
    out = {}
    for scan in (False, True):
        m = _model(scan)
        graphdef, state = nnx.split(m)
        ids, pos, mask, start = _inputs(MAX_LEN)
        out[scan] = _call(state, graphdef, ids, pos, mask, _cache(m), start, None)
    np.testing.assert_allclose(np.asarray(out[False][0]), np.asarray(out[True][0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[False][1].k), np.asarray(out[True][1].k),
                               atol=1e-6)


def test_mask_wider_than_the_cache_is_an_error():
    m = _model(False)
    ids, pos, _, start = _inputs(MAX_LEN)
    with pytest.raises(ValueError, match="cache has 24 slots"):
        m(ids, pos, jnp.ones((B, S, MAX_LEN + 1), bool), cache=_cache(m), cache_index=start)


@pytest.mark.parametrize("max_len,scratch,n", [(2368, 256, 4), (896, 256, 3), (100, 8, 4),
                                               (896, 256, 1), (40, 8, 6)])
def test_kv_prefixes_are_increasing_and_end_at_the_cache_size(max_len, scratch, n):
    st = sampler.Static(max_len=max_len, scratch=scratch, window=1, tokens_per_frame=1,
                        stop_tool=(), stop_end=(), temperature=0.0, top_k=0,
                        top_p=1.0, max_new_tokens=1, max_turn_tokens=1, patch=None,
                        kv_buckets=n)
    p = st.kv_prefixes()
    assert p[-1] == st.size and list(p) == sorted(set(p)) and 1 <= len(p) <= n
    assert all(x % 64 == 0 for x in p[:-1])


@pytest.mark.slow  # two engines with their own compiles: ~30-70 s on 2 busy cores
def test_bucketed_inserts_give_the_same_rollout():
    """A K=2 rollout whose inserts land in different cache-prefix buckets equals the rollout
    that always attends over the whole cache, and compiles one response insert."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(tmp)
    cfg = model_config_for(tok)
    model = model_lib.Qwen25VL(cfg, rngs=nnx.Rngs(3))
    pcfg = tiny_protocol(max_turns=3)
    frame = (28, 56)
    banks = np.random.default_rng(0).integers(0, 256, (2, pcfg.total_frames) + frame + (3,),
                                              np.uint8)
    out = {}
    for n in (1, 4):
        scfg = sampler.sampling_config(temperature=0.0, max_len=384, max_new_tokens=60,
                                       max_turn_tokens=8, prompt_buckets=(160,),
                                       insert_kv_buckets=n)
        eng = engine_lib.RolloutEngine(model, cfg, tok, pcfg, scfg, frame)
        if n > 1:
            assert len(eng.static.kv_prefixes()) == n
        out[n] = eng.rollout(["a fox", "two cats"], banks, jax.random.key(0), force_tool_calls=2)
        assert eng.insert_fn._cache_size() == 2  # prompt insert + response insert
    for a, b in zip(out[1], out[4]):
        assert a.tool_calls == b.tool_calls == 2
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.visible_until, b.visible_until)
        np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)


def _segment(cfg, rng, lengths, frames, next_pos, r, f):
    """A Segment of random text with each row's frames as vision runs (None: row not served)."""
    tpf = 2  # FRAME_HW below: 1 x 2 merged tokens per frame
    b = len(lengths)
    tokens = rng.integers(1, 400, (b, r)).astype(np.int32)
    positions = np.zeros((3, b, r), np.int32)
    out = dict(length=np.zeros(b, np.int32), next_pos=np.asarray(next_pos, np.int32).copy(),
               frames=np.zeros((b, f), np.int32), frame_offsets=np.zeros((b, f), np.int32),
               event_offset=np.zeros(b, np.int32), serve=np.zeros(b, bool))
    for i, (n, fr) in enumerate(zip(lengths, frames)):
        if n is None:
            continue
        frame_of = np.full(n, -1, np.int32)
        for j, frame in enumerate(fr):
            at = 2 + 5 * j  # <|vision_start|> pad pad <|vision_end|>, then text
            tokens[i, at: at + 4] = [cfg.vision_start_token_id] + [cfg.image_token_id] * tpf + [
                cfg.vision_end_token_id]
            frame_of[at + 1: at + 1 + tpf] = j
            out["frames"][i, j], out["frame_offsets"][i, j] = frame, at + 1
        pos, out["next_pos"][i] = chat.mrope_positions(frame_of, (1, 2), int(next_pos[i]))
        positions[:, i, :n] = pos
        out["length"][i], out["serve"][i] = n, True
    return sampler.Segment(tokens=jnp.asarray(tokens), positions=jnp.asarray(positions),
                           **{k: jnp.asarray(v) for k, v in out.items()})


@pytest.mark.slow  # two insert compiles: ~10 s on 2 busy cores (the fast rollout tests run the
# chunked path too: greedy parity with transformers, training reproduces rollout log-probs)
def test_chunked_prefill_equals_whole_segment_insert():
    """An insert prefilled in chunks (7 tokens, not dividing the segment; padding chunks skipped;
    each chunk attending over its own cache prefix) gives the whole-segment insert's state: a
    prompt insert, then a response insert serving two of three rows that evicts a frame."""
    m = _model(False)
    cfg = m.config
    graphdef, params = nnx.split(m)
    rng = np.random.default_rng(0)
    bank = jnp.asarray(rng.integers(0, 256, (3, 8, 28, 56, 3), np.uint8))
    prompt = _segment(cfg, rng, [37, 12, 25], [[3, 5], [], [8]], [0, 0, 0], 40, 2)
    base = dict(max_len=96, scratch=40, window=3, tokens_per_frame=2,
                stop_tool=((1,),), stop_end=((2,),),
                temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=8, max_turn_tokens=8,
                patch=frame_bank.PatchSpec.from_model_config(cfg), kv_buckets=3)
    out = {}
    for chunk in (0, 7):
        st = sampler.Static(**base, prefill_chunk=chunk)
        assert len(st.kv_prefixes()) == 3
        ins = jax.jit(functools.partial(sampler.insert, graphdef, st=st))
        s = sampler.init_state(model_lib.init_cache, cfg, 3, st, jax.random.key(0), jnp.float32)
        s = ins(params, s, bank, prompt)
        resp = _segment(cfg, np.random.default_rng(1), [30, None, 9], [[1, 2], None, [6]],
                        np.asarray(s.next_pos), 40, 2)
        out[chunk] = jax.device_get(ins(params, s, bank, resp))
    whole, chunked = out[0], out[7]
    assert list(whole.cache_index) == [67, 12, 34]
    assert (whole.visible_until < memory.NEVER).any()  # the response evicted a frame
    for name in ("cache_index", "next_pos", "written", "visible_until", "tokens", "kind",
                 "positions", "status", "memory"):
        for a, b in zip(jax.tree.leaves(getattr(whole, name)),
                        jax.tree.leaves(getattr(chunked, name))):
            np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_allclose(chunked.next_logits, whole.next_logits, atol=1e-5, rtol=1e-5)
    w = whole.written[None, :, None, :, None]  # compare the cache at written slots only
    for a, b in ((whole.cache.k, chunked.cache.k), (whole.cache.v, chunked.cache.v)):
        np.testing.assert_allclose(np.where(w, b, 0), np.where(w, a, 0), atol=1e-5)
