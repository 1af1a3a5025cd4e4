"""Rollout pieces that need no model: sampling math, frame patches, segment frame positions,
chat tokenisation and M-RoPE positions (the memory window: test_memory.py)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rollout_helpers import make_tokenizer, tiny_protocol

from vrthinker_jax.rollout import chat, frame_bank, protocol, sampler

# --------------------------------------------------------------------------- sampling


def _np_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Reference: per row, the set of kept token ids."""
    keep = []
    for row in logits:
        order = np.argsort(-row, kind="stable")
        kept = set(range(len(row)))
        if 0 < top_k < len(row):
            kth = row[order[top_k - 1]]
            kept = {i for i in kept if row[i] >= kth}
        if top_p < 1.0:
            vals = np.array(sorted((row[i] for i in kept), reverse=True))
            p = np.exp(vals - vals.max())
            p /= p.sum()
            before = np.cumsum(p) - p
            n = max(1, int(np.sum(before < top_p)))
            cutoff = vals[n - 1]
            kept = {i for i in kept if row[i] >= cutoff}
        keep.append(kept)
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8),
                                         (1, 1.0), (0, 1e-6)])
def test_filter_logits_matches_reference(top_k, top_p):
    rng = np.random.default_rng(top_k * 100 + int(top_p * 10))
    logits = rng.normal(size=(6, 40)).astype(np.float32) * 2.0
    out = np.asarray(jax.jit(sampler.filter_logits, static_argnums=(1, 2))(
        jnp.asarray(logits), top_k, top_p))
    for row, ref in zip(out, _np_filter(logits, top_k, top_p)):
        got = set(np.nonzero(np.isfinite(row))[0].tolist())
        assert got == ref
    kept_vals = np.where(np.isfinite(out), out, 0)
    np.testing.assert_array_equal(kept_vals, np.where(np.isfinite(out), logits, 0))


def test_top_p_keeps_the_token_crossing_the_threshold():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    kept = np.isfinite(np.asarray(sampler.filter_logits(logits, 0, 0.7)))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 -> keep 0.3 too
    kept = np.isfinite(np.asarray(sampler.filter_logits(logits, 0, 0.5)))
    assert kept.tolist() == [[True, False, False, False]]


def test_sampling_distribution_and_logprobs():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]] * 4000, jnp.float32)
    temperature, top_k, top_p = 0.7, 4, 0.9
    tok, lp = jax.jit(sampler.sample_logits, static_argnums=(2, 3, 4))(
        logits, jax.random.key(0), temperature, top_k, top_p
    )
    tok, lp = np.asarray(tok), np.asarray(lp)
    scaled = np.asarray(logits[0]) / temperature
    kept = sorted(_np_filter(scaled[None], top_k, top_p)[0])
    assert set(tok.tolist()) <= set(kept)
    p = np.exp(scaled[kept] - scaled[kept].max())
    p /= p.sum()
    freq = np.array([(tok == k).mean() for k in kept])
    np.testing.assert_allclose(freq, p, atol=0.03)
    # log-probs are under the untruncated tempered softmax
    full = scaled - np.log(np.exp(scaled - scaled.max()).sum()) - scaled.max()
    np.testing.assert_allclose(lp, full[tok], rtol=1e-5)


def test_greedy_is_argmax_with_softmax_logprob():
    logits = jax.random.normal(jax.random.key(1), (5, 30))
    tok, lp = sampler.sample_logits(logits, jax.random.key(2), 0.0, 0, 1.0)
    np.testing.assert_array_equal(tok, np.argmax(logits, -1))
    ref = jax.nn.log_softmax(logits, -1)[jnp.arange(5), tok]
    np.testing.assert_allclose(lp, ref, rtol=1e-6)


def test_stop_sequences_match_only_within_the_turn():
    tokens = jnp.asarray([[5, 7, 8, 9, 0], [7, 8, 3, 3, 0], [1, 2, 7, 8, 0]], jnp.int32)
    last = jnp.asarray([2, 1, 3])
    turn = jnp.asarray([2, 1, 3])
    hit = sampler._ends_with(tokens, last, turn, ((7, 8), (99,)))
    # row 1 ends with 7, 8 but its turn has one token: the 7 came from the context
    assert np.asarray(hit).tolist() == [True, False, True]


# --------------------------------------------------------------------------- frame patches


def test_patchify_matches_transformers_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    spec = frame_bank.PatchSpec(patch_size=14, temporal_patch_size=2, merge_size=2)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 56, 84, 3), dtype=np.uint8)
    proc = Qwen2VLImageProcessorPil(do_resize=False, patch_size=14, temporal_patch_size=2,
                                 merge_size=2)
    ref = proc(images=[f for f in frames], return_tensors="np")
    ours = frame_bank.patchify_numpy(frames, spec)
    assert ours.shape == (3, 4 * 6, 3 * 2 * 14 * 14)
    np.testing.assert_array_equal(ref["image_grid_thw"], [spec.grid_thw(56, 84)] * 3)
    np.testing.assert_allclose(ours.reshape(-1, ours.shape[-1]), ref["pixel_values"], atol=2e-6)


def test_patchify_matches_data_pipeline_processor():
    processor = pytest.importorskip("data_pipelines.processor")
    spec = frame_bank.PatchSpec()
    frames = np.random.default_rng(1).integers(0, 256, size=(2, 28, 56, 3), dtype=np.uint8)
    ours = frame_bank.patchify_numpy(frames, spec)
    for f, mine in zip(frames, ours):
        ref, grid = processor.frame_to_image_patches(f, (28, 56))
        assert tuple(grid) == spec.grid_thw(28, 56)
        np.testing.assert_allclose(ref, mine, atol=2e-6)


def test_gather_frames():
    bank = jnp.arange(2 * 5, dtype=jnp.uint8).reshape(2, 5, 1, 1, 1)
    got = frame_bank.gather_frames(bank, jnp.asarray([[1, 5, 0], [2, 2, 3]]))
    assert np.asarray(got)[..., 0, 0, 0].tolist() == [[0, 4, 0], [6, 6, 7]]


def test_patch_spec_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 28"):
        frame_bank.PatchSpec().grid(30, 56)


# --------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_tokenize_segments_layout(tokenizer):
    pcfg = tiny_protocol()
    segs = protocol.prompt_segments("a fox runs", pcfg)
    call = protocol.parse_tool_call(protocol.format_tool_call([3, 9, 3]), pcfg)
    segs += [protocol.Text("<think>x</think>" + protocol.format_tool_call([3, 9, 3]),
                           trainable=True)]
    segs += protocol.tool_response_segments(call, pcfg, calls_done=1)
    t = chat.tokenize_segments(tokenizer, segs, tokens_per_frame=4)
    vt = chat.VisionTokens.from_tokenizer(tokenizer)
    assert t.frames == protocol.initial_frames(pcfg) + [3, 9]
    assert t.frames_per_event == [4, 2]
    assert (t.ids == vt.pad).sum() == 6 * 4
    for occ in range(6):
        where = np.nonzero(t.frame_of_token == occ)[0]
        assert len(where) == 4 and np.all(np.diff(where) == 1)
        assert t.ids[where[0] - 1] == vt.start and t.ids[where[-1] + 1] == vt.end
    text = tokenizer.decode(t.ids[t.trainable].tolist())
    assert text == "<think>x</think>" + protocol.format_tool_call([3, 9, 3])
    assert tokenizer.decode(t.ids[t.event_starts[1]:].tolist()).startswith(protocol.IM_END)


def test_synthesis_tokens_and_their_loss_weight(tokenizer):
    # the tokens inside <synthesis>...</synthesis> of assistant turns (what the model reports of
    # the frames) are marked, and data.synthesis_weight scales them in the SFT loss
    pcfg = tiny_protocol()
    turn = protocol.format_final_turn("Defect: frame 3 of video 1.", "VQ: 2.",
                                      {"TA": 0, "MQ": 0, "VQ": 2, "OA": 2})
    segs = protocol.prompt_segments("the prompt has <synthesis>no</synthesis> role", pcfg)
    segs += [protocol.Text(turn, trainable=True)]
    t = chat.tokenize_segments(tokenizer, segs, tokens_per_frame=4)
    assert not t.in_synthesis[~t.trainable].any()  # the user's text is never weighted
    inside = tokenizer.decode(t.ids[t.in_synthesis].tolist())
    assert "Defect: frame 3 of video 1." in inside and "VQ: 2." not in inside
    assert len(inside) <= len("<synthesis>Defect: frame 3 of video 1.</synthesis>") + 2
    w = t.loss_weights(4.0)
    assert set(np.unique(w[t.in_synthesis])) == {4.0}
    assert np.all(w[t.trainable & ~t.in_synthesis] == 1.0) and np.all(w[~t.trainable] == 0)
    np.testing.assert_array_equal(t.loss_weights(), t.trainable.astype(np.float32))


def _hf_rope_index(ids: np.ndarray, image_pad: int, grids: np.ndarray, merge: int):
    """transformers' Qwen2.5-VL get_rope_index on one row, without building a model."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    fake = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=merge, tokens_per_second=2)))
    fake.get_vision_position_ids = lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(
        fake, *a, **k)
    ids_t = torch.as_tensor(ids[None].astype(np.int64))
    pos, _ = Qwen2_5_VLModel.get_rope_index(
        fake, ids_t, (ids_t == image_pad).int(), image_grid_thw=torch.as_tensor(grids),
    )
    return pos[:, 0].numpy()


@pytest.mark.parametrize("frame_hw", [(28, 28), (56, 84)])
def test_mrope_positions_match_transformers(tokenizer, frame_hw):
    pcfg = tiny_protocol()
    spec = frame_bank.PatchSpec()
    segs = protocol.prompt_segments("a fox runs", pcfg)
    tpf = spec.tokens_per_frame(*frame_hw)
    t = chat.tokenize_segments(tokenizer, segs, tokens_per_frame=tpf)
    grids = np.asarray([spec.grid_thw(*frame_hw)] * len(t.frames))
    ref = _hf_rope_index(t.ids, tokenizer.token_to_id("<|image_pad|>"), grids, 2)
    pos, nxt = t.positions(spec.merged_grid(*frame_hw))
    np.testing.assert_array_equal(pos, ref)
    assert nxt == ref.max() + 1
    # a piece appended later is the same positions shifted by the conversation's next position
    head, tail = t.ids[:40], t.ids[40:]
    assert t.frame_of_token[39] < 0 and t.frame_of_token[40] < 0
    p1, n1 = chat.mrope_positions(t.frame_of_token[:40], spec.merged_grid(*frame_hw))
    p2, n2 = chat.mrope_positions(t.frame_of_token[40:], spec.merged_grid(*frame_hw), start=n1)
    np.testing.assert_array_equal(np.concatenate([p1, p2], 1), ref)
    assert len(head) + len(tail) == len(t.ids) and n2 == nxt


def test_banned_ids_are_never_drawn_even_when_they_dominate():
    """Issue 21: a model biased towards <|image_pad|> (and the other vision ids) never writes
    them; the log-prob stays that of the full softmax the learner recomputes."""
    logits = jnp.zeros((64, 16)).at[:, 5].set(20.0).at[:, 6].set(19.0)  # ids 5, 6 dominate
    banned = (5, 6)
    for temperature in (0.0, 1.0):
        tok, lp = sampler.sample_logits(logits, jax.random.key(0), temperature, 0, 1.0,
                                        banned=banned)
        assert not np.isin(np.asarray(tok), banned).any()
        full = jax.nn.log_softmax(logits / (temperature or 1.0), axis=-1)
        np.testing.assert_allclose(np.asarray(lp),
                                   np.asarray(full)[np.arange(64), np.asarray(tok)], rtol=1e-6)
    tok, _ = sampler.sample_logits(logits, jax.random.key(0), 1.0, 0, 1.0)
    assert np.isin(np.asarray(tok), banned).mean() > 0.9  # without the ban they win


# --------------------------------------------------------------------------- frame positions


def test_segment_visual_marks_the_frames_tokens_not_pad_ids(tokenizer):
    """The insert merges frames where the segment's builder put them (`segment_visual`, from
    the frame offsets), so a pad id in the text is never taken for a frame."""
    pcfg, tpf = tiny_protocol(), 4
    call = protocol.parse_tool_call(protocol.format_tool_call([3, 9]), pcfg)
    rows = [chat.tokenize_segments(tokenizer, segs, tpf) for segs in (
        protocol.prompt_segments("a fox", pcfg),
        protocol.tool_response_segments(call, pcfg, calls_done=1))]
    r, f = max(len(t.ids) for t in rows), max(len(t.frames) for t in rows) + 1
    tokens = np.zeros((2, r), np.int32)
    frames, offsets = np.zeros((2, f), np.int32), np.zeros((2, f), np.int32)
    want = np.zeros((2, r), bool)
    for i, t in enumerate(rows):
        tokens[i, : len(t.ids)] = t.ids
        frames[i, : len(t.frames)] = t.frames
        offsets[i, : len(t.frames)] = [int(np.argmax(t.frame_of_token == o))
                                       for o in range(len(t.frames))]
        want[i, : len(t.ids)] = t.frame_of_token >= 0
    pad = chat.VisionTokens.from_tokenizer(tokenizer).pad
    tokens[0, 1] = pad  # a pad id in text
    seg = sampler.Segment(tokens, np.zeros(2, np.int32), np.zeros((3, 2, r), np.int32),
                          np.zeros(2, np.int32), frames, offsets, np.zeros(2, np.int32),
                          np.ones(2, bool))
    np.testing.assert_array_equal(np.asarray(sampler.segment_visual(seg, tpf)), want)


def test_merge_visual_at_per_row_and_whole_batch():
    """`merge_visual_at`, the one merge of rollout and learner: per-row visual rows go to each
    row's marked positions in order (rows pad theirs); a [n, d] stream fills the batch
    row-major; unmarked positions keep their embeddings."""
    from vrthinker_jax.models import model as model_lib

    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(2, 6, 3)).astype(np.float32)
    marked = np.asarray([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 1]], bool)
    visual = rng.normal(size=(2, 3, 3)).astype(np.float32)  # row 1 uses 2 of its 3
    got = np.asarray(model_lib.merge_visual_at(jnp.asarray(embeds), jnp.asarray(marked),
                                               jnp.asarray(visual)))
    want = embeds.copy()
    for i in range(2):
        want[i, marked[i]] = visual[i, : marked[i].sum()]
    np.testing.assert_array_equal(got, want)
    stream = np.concatenate([visual[0], visual[1, :2]])
    flat = np.asarray(model_lib.merge_visual_at(jnp.asarray(embeds), jnp.asarray(marked),
                                                jnp.asarray(stream)))
    np.testing.assert_array_equal(flat, want)
