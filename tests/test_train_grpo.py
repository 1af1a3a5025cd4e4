"""GRPO: batch assembly from trajectories (rewards, advantages, dropped groups), the compiled
update (ratio 1 and zero KL at the start; log-probs move with the advantage's sign), and the
rollout-driven loop with the engine."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train_support import (
    SEQ_LEN,
    ByteTokenizer,
    make_bank,
    make_batch,
    make_trace,
    stage_config,
)

from vrthinker_jax.models import model as model_lib
from vrthinker_jax.rollout import chat, protocol, sampler
from vrthinker_jax.train import grpo, rollouts, runtime, steps


def grpo_config():
    cfg, pcfg = stage_config("grpo")
    cfg.grpo.update(dict(group_size=2, prompts_per_step=2))
    cfg.sampling.update(dict(max_len=768, max_new_tokens=48, max_turn_tokens=24,
                             prompt_buckets=(256,)))
    return cfg, pcfg


@dataclasses.dataclass
class FakeTrajectory:
    """What the engine returns, built from a trace (the model 'generated' its assistant text)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    kind: np.ndarray  # sampler.VISUAL where the environment put a frame's tokens
    logp: np.ndarray
    positions: np.ndarray
    visible_until: np.ndarray
    frames: list
    assistant_turns: list
    tool_frames: list
    judgments: dict | None

    @property
    def frames_selected(self):
        return sum(len(f) for f in self.tool_frames)

    @property
    def tool_calls(self):
        return len(self.tool_frames)


def fake_trajectory(trace, pcfg, tok, *, answer: dict | None):
    t = chat.tokenize_segments(tok, protocol.trace_segments(trace, pcfg), 4)
    pos, _ = chat.mrope_positions(t.frame_of_token, (2, 2))
    turns = [x["content"] for x in trace["turns"] if x["role"] == "assistant"]
    return FakeTrajectory(
        tokens=t.ids, loss_mask=t.trainable, logp=np.zeros(len(t.ids), np.float32),
        kind=np.where(t.frame_of_token >= 0, sampler.VISUAL, sampler.CONTEXT).astype(np.int8),
        positions=pos, visible_until=t.visible_until(pcfg.memory_window), frames=t.frames,
        assistant_turns=turns, tool_frames=[x["frames"] for x in trace["turns"]
                                            if x["role"] == "tool"],
        judgments=answer,
    )


def test_rollout_batch_rewards_advantages_and_dropped_groups():
    cfg, pcfg = grpo_config()
    rng = np.random.default_rng(0)
    tok = ByteTokenizer()
    traces = [make_trace(rng, pcfg, i) for i in range(4)]
    labels = [tr["labels"] for tr in traces]
    wrong = {k: (v + 1) % 3 for k, v in labels[0].items()}
    # group 0: right vs wrong answer (signal); group 1: both unanswered (no signal)
    trajs = [fake_trajectory(traces[0], pcfg, tok, answer=labels[0]),
             fake_trajectory(traces[1], pcfg, tok, answer=wrong),
             fake_trajectory(traces[2], pcfg, tok, answer=None),
             fake_trajectory(traces[3], pcfg, tok, answer=None)]
    lab = [labels[0], labels[0], labels[2], labels[3]]
    banks = [make_bank(rng, pcfg) for _ in trajs]
    batch, parts, stats = grpo.rollout_batch(trajs, banks, lab, cfg)
    assert parts[0].accuracy == 1.0 and parts[1].accuracy == 0.0
    assert parts[0].total > parts[1].total
    assert batch["advantages"][0] > 0 > batch["advantages"][1]
    np.testing.assert_array_equal(batch["weight"], [1, 1, 0, 0])
    assert stats["groups_with_signal"] == 1 and stats["rows_in_update"] == 2
    assert batch["tokens"].shape == (4, SEQ_LEN) and batch["positions"].shape == (3, 4, SEQ_LEN)
    # the loss mask is exactly the assistant text
    assert batch["loss_mask"][0].sum() == trajs[0].loss_mask.sum()

    cfg.data.seq_len = 100  # too short: rows keep their reward but leave the update
    batch, _, stats = grpo.rollout_batch(trajs, banks, lab, cfg)
    assert stats["rows_too_long"] == 4 and batch["weight"].sum() == 0


@pytest.mark.slow  # two compiles (log-probs, GRPO update): ~1-2 min on 2 busy cores
def test_grpo_update_follows_the_advantage():
    cfg, pcfg = grpo_config()
    rng = np.random.default_rng(0)
    tok = ByteTokenizer()
    host = make_batch(rng, pcfg, tok)
    model = model_lib.Qwen25VL(cfg.model, rngs=nnx.Rngs(0))
    rt = runtime.setup(cfg, tok, model=model)
    batch = steps.put_batch(host, None, None)
    logp_fn = jax.jit(lambda p, b: steps.sequence_logprobs(p, b, graphdef=rt.graphdef,
                                                           spec=rt.spec))
    logp0 = logp_fn(rt.params, batch)
    # the rollout's log-prob of token t sits at t (old_logp[:, t+1] <-> token_logprobs[:, t])
    batch["old_logp"] = jnp.pad(logp0, ((0, 0), (1, 0)))
    batch["ref_logp"] = logp0
    batch["weight"] = jnp.ones(4)
    mask = np.asarray(host["loss_mask"][:, 1:], np.float32)
    for sign in (1.0, -1.0):
        # the rows share most of their template text, so one sign per run keeps the test sharp
        batch["advantages"] = jnp.full((4,), sign)
        state = steps.init_train_state(jax.tree.map(jnp.copy, rt.params),
                                       steps.make_optimizer(cfg.optimizer))
        fn = steps.step_fn("grpo", graphdef=rt.graphdef, spec=rt.spec,
                           optimizer=cfg.optimizer, state=state, batch_like=batch,
                           temperature=1.0, loss=(("clip_eps", 0.2), ("clip_eps_high", 0.28),
                                                    ("kl_coef", 0.05)))
        state, m = fn(state, batch)
        assert abs(m["ratio_mean"] - 1.0) < 1e-4 and abs(m["kl"]) < 1e-6
        assert m["clip_frac"] == 0.0 and int(m["skipped"]) == 0
        for _ in range(3):
            state, m = fn(state, batch)
        assert m["kl"] > 0
        delta = np.asarray(logp_fn(state.params, batch) - logp0)
        per_row = (delta * mask).sum(1) / mask.sum(1)
        assert (np.sign(per_row) == sign).all(), (sign, per_row)


@pytest.mark.slow  # compiles the rollout engine and the learner: ~2-3 min on 2 busy cores
def test_run_grpo_with_the_engine_resumes_exactly(tmp_path):
    cfg, pcfg = grpo_config()
    cfg.steps, cfg.ckpt_every = 3, 1
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    recs = [make_trace(rng, pcfg, i) for i in range(4)]
    banks = [make_bank(rng, pcfg) for _ in recs]

    def run(workdir, stop_after=None):
        rt = runtime.setup(cfg, tok, model=model_lib.Qwen25VL(cfg.model, rngs=nnx.Rngs(0)))
        ds = rollouts.in_memory_prompts(cfg, recs, banks, 2)
        logger = runtime.TrainLogger(str(tmp_path / "tb"))
        _, hist = grpo.run_grpo(cfg, str(workdir), None, tok, rt=rt, dataset=ds,
                                stop_after=stop_after, logger=logger)
        logger.close()
        return hist

    full = run(tmp_path / "full")
    assert len(full) == 3
    for rec in full:
        assert rec["time_rollout_s"] > 0 and "reward" in rec and "response_tokens" in rec
    run(tmp_path / "cut", stop_after=2)  # killed after step 1 (checkpoint at 1)
    resumed = run(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2]
    keys = ("reward", "response_tokens", "tool_calls")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full[1:]]


def test_micro_batches_split_rows_in_order():
    host = {"weight": np.arange(8, dtype=np.float32), "tokens": np.arange(16).reshape(8, 2),
            "positions": np.arange(48).reshape(3, 8, 2)}  # rows at dim 1
    parts = grpo.micro_batches(host, 4)
    assert [p["weight"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]), host["tokens"])
    assert all(p["positions"].shape == (3, 2, 2) for p in parts)
    np.testing.assert_array_equal(np.concatenate([p["positions"] for p in parts], 1),
                                  host["positions"])
    with pytest.raises(ValueError, match="accum_steps=3"):
        grpo.micro_batches(host, 3)


@pytest.mark.parametrize("key, value, match", [("grpo.rollout_batch", 3, "rollout_batch=3"),
                                               ("optimizer.accum_steps", 3, "accum_steps=3")])
def test_run_grpo_checks_the_row_split_first(key, value, match):
    cfg, _ = grpo_config()  # 2 prompts x 2 rollouts = 4 rows
    section, leaf = key.split(".")
    cfg[section][leaf] = value
    with pytest.raises(ValueError, match=match):
        grpo.run_grpo(cfg, "/nonexistent", None, ByteTokenizer(), rt=None)


@pytest.mark.slow  # compiles the engine at 2 rows and the learner at a 2-row micro-batch
def test_run_grpo_in_rollout_chunks_and_micro_batches(tmp_path, monkeypatch):
    cfg, pcfg = grpo_config()
    cfg.steps = 1
    cfg.grpo.rollout_batch = 2  # two engine calls per step
    cfg.optimizer.accum_steps = 2  # two micro-batches per update
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    recs = [make_trace(rng, pcfg, i) for i in range(4)]
    banks = [make_bank(rng, pcfg) for _ in recs]
    rt = runtime.setup(cfg, tok, model=model_lib.Qwen25VL(cfg.model, rngs=nnx.Rngs(0)))
    calls = []
    real = rollouts.make_engine

    def counting_engine(*a, **k):
        eng = real(*a, **k)
        rollout = eng.rollout
        eng.rollout = lambda prompts, *r, **kw: calls.append(len(prompts)) or rollout(
            prompts, *r, **kw)
        return eng

    monkeypatch.setattr(rollouts, "make_engine", counting_engine)
    _, hist = grpo.run_grpo(cfg, str(tmp_path / "w"), None, tok, rt=rt,
                            dataset=rollouts.in_memory_prompts(cfg, recs, banks, 2))
    assert calls == [2, 2] and len(hist) == 1
    assert "reward" in hist[0] and hist[0]["time_reference_s"] >= 0
