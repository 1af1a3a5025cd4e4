"""The compiled preset engine against a test-only transformers implementation of the release's
loop (tests/release_reference.py: re-render the conversation every turn, strip the older tool
images, `generate`), on a tiny random Qwen2.5-VL saved as a Hugging Face directory."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipelines import tokenizer as tok_lib
from tests import release_reference as ref
from tests.test_tokenizer import QWEN25VL_TEMPLATE
from vrthinker_jax import checkpoints
from vrthinker_jax.rollout import preset_engine, render

TURN_TOKENS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("preset_engine") / "hf")
    hf = ref.tiny_release_checkpoint(d, QWEN25VL_TEMPLATE)
    p = ref.tiny_preset(TURN_TOKENS)
    model, _ = checkpoints.load_model(d)
    tok = tok_lib.load_tokenizer(d)
    engine = preset_engine.PresetEngine(model, tok, render.ChatTemplate.from_dir(d), p,
                                        max_len=2048, buckets=(256, 1024))
    rng = np.random.default_rng(3)
    cands = [rng.integers(0, 256, (96, ref.TINY_H, ref.TINY_W, 3), dtype=np.uint8)
             for _ in range(2)]
    proc = ref.preset_processor(p, d + "/tokenizer.json", QWEN25VL_TEMPLATE)
    return {"hf": hf, "engine": engine, "preset": p, "tok": tok, "proc": proc,
            "candidates": cands, "dir": d, "model": model}


@pytest.mark.slow
def test_greedy_rollout_equals_the_transformers_release_loop(setup):
    engine, p, tok = setup["engine"], setup["preset"], setup["tok"]
    prompts = ["a red fox jumps over a log", "two cats on a sofa"]
    trajs = engine.rollout(prompts, setup["candidates"], jax.random.key(0), script=ref.script)
    banned = list(engine.static.banned_ids) + list(range(tok.vocab_size, 512))
    for row, (prompt, traj) in enumerate(zip(prompts, trajs)):
        want = ref.release_loop(setup["hf"], setup["proc"], p, tok, prompt,
                                setup["candidates"][row], row, banned=banned)
        assert len(traj.generated) == len(want) == len(ref.CALLS) + 1
        for got, exp in zip(traj.generated, want):
            np.testing.assert_array_equal(got, exp)
        assert traj.tool_frames == [list(c) for c in ref.CALLS]
        assert traj.stop == "answer" and traj.judgments == {"OA": row + 1}
    # the cache before each changed token is reused, not prefilled again
    assert engine.stats["reused_tokens"] > 0

    # one tool call instead of three compiles nothing new (same buckets and visual grids)
    compiled = engine.compile_count()

    def one_call(row, turn, text):
        return ref.script(row, turn if turn == 0 else len(ref.CALLS), text)

    short = engine.rollout(prompts, setup["candidates"], jax.random.key(0), script=one_call)
    assert [len(t.tool_frames) for t in short] == [1, 1]
    assert engine.compile_count() == compiled


def test_a_prompt_the_cache_cannot_hold_ends_the_row(setup):
    """The release checks its token cap after a turn only, so a prompt can outgrow the cache:
    the row ends with stop 'cache_full' (counted, no answer) instead of failing the batch."""
    e = setup["engine"]
    small = preset_engine.PresetEngine(nnx.merge(e.graphdef, e.params), setup["tok"],
                                       e.template, setup["preset"], max_len=300,
                                       buckets=(256,))
    trajs = small.rollout(["a fox"], setup["candidates"][:1], jax.random.key(0))
    assert trajs[0].stop == "cache_full" and trajs[0].judgments is None
    assert trajs[0].turns == [] and len(trajs[0].prompt_ids) >= 299


@pytest.mark.slow
def test_greedy_rollout_under_the_vrthinker_preset_equals_transformers(setup):
    """The second published preset (initial frames as images, turns fed back verbatim, every
    response keeps its images): the same engine, the same token-for-token check."""
    p = ref.tiny_preset(TURN_TOKENS, "vrthinker")
    tok = setup["tok"]
    engine = preset_engine.PresetEngine(setup["model"], tok,
                                        render.ChatTemplate.from_dir(setup["dir"]), p,
                                        max_len=2048, buckets=(256, 1024))
    rng = np.random.default_rng(4)
    cands = [rng.integers(0, 256, (256, ref.TINY_H, ref.TINY_W, 3), dtype=np.uint8)]
    trajs = engine.rollout(["a robot rides a unicorn"], cands, jax.random.key(0),
                           script=ref.script)
    banned = list(engine.static.banned_ids) + list(range(tok.vocab_size, 512))
    proc = ref.preset_processor(p, setup["dir"] + "/tokenizer.json", QWEN25VL_TEMPLATE)
    want = ref.keep_all_loop(setup["hf"], proc, p, tok, "a robot rides a unicorn", cands[0], 0,
                             banned=banned)
    assert len(trajs[0].generated) == len(want) == len(ref.CALLS) + 1
    for got, exp in zip(trajs[0].generated, want):
        np.testing.assert_array_equal(got, exp)
    assert trajs[0].stop == "answer"
    assert trajs[0].judgments == {"TA": 1, "VQ": 2, "MQ": 0, "OA": 1}
