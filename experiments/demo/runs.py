"""A finished demo run, opened again: its config, tokenizer, a stage's checkpoint, its held-out
split, and a teacher-forced scorer over a checkpoint (what the benchmarks and probes that start
from a demo run load)."""

from __future__ import annotations

import json
import os

from experiments.demo import data as data_lib
from experiments.demo import stages


def open_run(demo_dir: str, stage: str):
    """A finished run's (results dict, demo ConfigDict, tokenizer, checkpoint dir of `stage`);
    FileNotFoundError names what is missing (benchmarks that start from a demo run)."""
    import ml_collections

    from data_pipelines import tokenizer as tok_lib
    from experiments.configs import demo as demo_configs

    results_path = os.path.join(demo_dir, "results.json")
    ckpt_dir = os.path.join(demo_dir, stage, "checkpoints")
    nested = os.path.join(demo_dir, stage, "sft", "checkpoints")  # RFT trains its SFT half there
    if not os.path.exists(ckpt_dir) and os.path.exists(nested):
        ckpt_dir = nested
    for path in (results_path, ckpt_dir):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: run `python -m experiments.demo --out "
                                    f"{demo_dir}` first")
    with open(results_path) as f:
        res = json.load(f)
    tok = tok_lib.load_tokenizer(os.path.join(demo_dir, "tokenizer"))
    return res, ml_collections.ConfigDict(_known(res["config"], demo_configs.get_config(
        res["config"].get("preset", "default")).to_dict())), tok, ckpt_dir


def _known(recorded: dict, today: dict) -> dict:
    """A recorded run's config without the fields today's code no longer has (removed
    options, e.g. synthetic.oracle_text): no run of today's code can honour them, and the
    run's data, read from its directory, are what they made."""
    return {k: _known(v, today[k]) if isinstance(v, dict) and isinstance(today[k], dict) else v
            for k, v in recorded.items() if k in today}


def restore_params(ckpt_dir: str, cfg, rt):
    """The params of the latest checkpoint in ckpt_dir (a stage's TrainState), shaped like
    rt's; FileNotFoundError when it holds none."""
    from vrthinker_jax.train import checkpointing, steps

    like = steps.init_train_state(rt.params, steps.make_optimizer(cfg.optimizer), 0)
    ckpt = checkpointing.Checkpointer(ckpt_dir, save_every=10**9, keep=10**9)
    try:
        restored = ckpt.restore(like)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint")
    return restored[0].params


def load_heldout(demo_dir: str, demo) -> tuple[list[dict], dict]:
    """A finished run's held-out rows and their frame banks (for scoring only)."""
    data_dir = os.path.join(demo_dir, "data")
    heldout = data_lib.read_jsonl(os.path.join(data_dir, "heldout.jsonl"))
    return heldout, data_lib.load_banks(heldout, data_dir, int(demo.protocol.num_candidates),
                               demo.frame_size)


class TeacherForcedScorer:
    """The summed log-prob of each example's trained (assistant) tokens under a demo run's
    stage checkpoint, `batch` rows per call of one compiled function (the last call padded
    with copies whose scores are dropped). The probes' scorer; FileNotFoundError when the
    checkpoint directory holds no checkpoint."""

    def __init__(self, demo, tok, ckpt_dir: str, *, batch: int, seq_len: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from experiments.configs import sft as sft_cfgs
        from vrthinker_jax.train import runtime, steps

        cfg = stages.stage_config(sft_cfgs, demo, tok, protocol=demo.protocol.to_dict(), steps=1,
                           batch_size=batch, lr=1e-3, seq_len=seq_len)
        self.rt = runtime.setup(cfg, tok)
        self.params = restore_params(ckpt_dir, cfg, self.rt)
        self.batch, self.seq_len = int(batch), int(seq_len)
        graphdef, spec = self.rt.graphdef, self.rt.spec

        @jax.jit
        def seq_logp(params, batch):
            model = nnx.merge(graphdef, params)
            lp, _ = steps.sequence_token_stats(model, batch, spec)
            mask = (batch["loss_mask"][:, 1:] & batch["valid"][:, 1:]).astype(jnp.float32)
            return jnp.sum(lp * mask, axis=1)

        self._seq_logp = seq_logp

    def __call__(self, exs) -> list[float]:
        """exs: an iterable of examples (`train.examples`), consumed `batch` at a time."""
        import jax.numpy as jnp
        import numpy as np

        from vrthinker_jax.train import examples

        out, chunk = [], []

        def flush():
            n = len(chunk)
            chunk.extend([chunk[-1]] * (self.batch - n))
            batch = {k: jnp.asarray(v) for k, v in examples.collate(chunk).items()
                     if k not in ("id", "error")}
            out.extend(float(v) for v in np.asarray(self._seq_logp(self.params, batch))[:n])
            chunk.clear()

        for ex in exs:
            chunk.append(ex)
            if len(chunk) == self.batch:
                flush()
        if chunk:
            flush()
        return out
