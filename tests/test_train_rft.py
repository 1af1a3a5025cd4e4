"""RFT: all-correct filtering, trace writing that re-renders, acceptance rate, SFT on the kept
traces. The rollout engine is replaced by a test double that replays traces with chosen answers
(a random tiny model never answers, so it would accept nothing)."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
from flax import nnx
from test_train_grpo import fake_trajectory
from test_train_support import (
    BATCH,
    MAX_FRAMES,
    OPT,
    SEQ_LEN,
    ByteTokenizer,
    make_bank,
    make_trace,
    tiny_protocol,
)

from vrthinker_jax.models import model as model_lib
from vrthinker_jax.rollout import protocol
from vrthinker_jax.train import rft, rollouts, runtime


class ReplayEngine:
    """Answers prompt i's k-th sample right when k is even (the trace's labels), else wrong."""

    def __init__(self, traces_by_prompt, pcfg, tok):
        self.by_prompt, self.pcfg, self.tok = traces_by_prompt, pcfg, tok

    def rollout(self, prompts, banks, rng):
        out, count = [], {}
        for p in prompts:
            trace = self.by_prompt[p]
            k = count[p] = count.get(p, -1) + 1
            labels = trace["labels"]
            answer = labels if k % 2 == 0 else {key: (v + 1) % 3 for key, v in labels.items()}
            traj = fake_trajectory(trace, self.pcfg, self.tok, answer=answer)
            # the engine's final turn text ends with the stop token it generated
            traj.assistant_turns[-1] += protocol.IM_END
            out.append(traj)
        return out


def test_rft_keeps_all_correct_traces_and_trains_on_them(tmp_path, monkeypatch):
    from experiments.configs import rft as rft_config

    cfg = rft_config.get_config("tiny")
    pcfg = tiny_protocol(memory_window=4)
    cfg.protocol = ml_collections.ConfigDict(
        {f: getattr(pcfg, f) for f in pcfg.__dataclass_fields__})
    cfg.data.update(dict(batch_size=BATCH, seq_len=SEQ_LEN, max_frames=MAX_FRAMES))
    cfg.optimizer = OPT.copy_and_resolve_references()
    cfg.mesh.ici = {}
    cfg.samples_per_prompt, cfg.max_prompts, cfg.steps, cfg.progress = 2, 4, 3, False
    tok = ByteTokenizer()
    rng = np.random.default_rng(2)
    traces = [make_trace(rng, pcfg, i) for i in range(4)]
    banks = [make_bank(rng, pcfg) for _ in traces]
    by_prompt = {t["prompt"]: t for t in traces}
    monkeypatch.setattr(rollouts, "make_engine", lambda *a, **k: ReplayEngine(by_prompt, pcfg, tok))
    rt = runtime.setup(cfg, tok, model=model_lib.Qwen25VL(cfg.model, rngs=nnx.Rngs(0)))
    records = [{"id": t["id"], "prompt": t["prompt"], "labels": t["labels"]} for t in traces]
    ds = rollouts.in_memory_prompts(cfg, records, banks, BATCH // cfg.samples_per_prompt)
    rt, stats = rft.run_rft(cfg, str(tmp_path), None, tok, rt=rt, dataset=ds)
    assert stats["rollouts"] == 8 and stats["all_correct"] == 4
    assert stats["acceptance_rate"] == 0.5
    assert stats["accepted_traces"] == 4 and stats["pairs_with_accepted_trace"] == 1.0
    assert stats["sft_steps"] == 3 and np.isfinite(stats["sft_final_loss"])
    written = [json.loads(x) for x in open(tmp_path / "rft_traces.jsonl")]
    assert sorted(t["id"] for t in written) == sorted(t["id"] for t in traces)
    for t in written:
        original = next(x for x in traces if x["id"] == t["id"])
        assert t["turns"] == original["turns"]  # the end token was stripped, frames kept
        protocol.trace_segments(t, pcfg)
