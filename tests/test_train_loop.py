"""The SFT loop: checkpoints every N steps and resumes exactly after a simulated kill."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train_support import (
    BATCH,
    ByteTokenizer,
    make_bank,
    make_trace,
    stage_config,
)

from vrthinker_jax.models import model as model_lib
from vrthinker_jax.train import runtime, sft


def loop_config():
    cfg, pcfg = stage_config("sft")
    cfg.data.update(dict(batch_size=BATCH, seed=3))
    cfg.steps, cfg.ckpt_every, cfg.log_every = 5, 2, 1
    return cfg, pcfg


@pytest.fixture(scope="module")
def data():
    cfg, pcfg = loop_config()
    rng = np.random.default_rng(1)
    traces = [make_trace(rng, pcfg, i) for i in range(7)]
    banks = [make_bank(rng, pcfg) for _ in traces]
    graphdef, params = nnx.split(model_lib.Qwen25VL(cfg.model, rngs=nnx.Rngs(0)))
    return cfg, traces, banks, (graphdef, params)


def fresh_run(cfg, traces, banks, init):
    """A new runtime from the same initial params (copied: training donates its buffers)."""
    tok = ByteTokenizer()
    model = nnx.merge(init[0], jax.tree.map(jnp.copy, init[1]))
    rt = runtime.setup(cfg, tok, model=model)
    return rt, sft.in_memory_dataset(cfg, traces, banks, tok, rt)


@pytest.mark.slow  # three short runs with checkpoints: ~1.5-2.5 min on 2 busy cores
def test_resume_after_kill_continues_exactly(data, tmp_path):
    cfg, traces, banks, init = data
    rt, ds = fresh_run(cfg, traces, banks, init)
    logger = runtime.TrainLogger(str(tmp_path / "full" / "tb"))
    _, full = sft.run_sft(cfg, str(tmp_path / "full"), ds, rt=rt, logger=logger)
    logger.close()
    assert [r["step"] for r in full] == list(range(5))

    # killed after 3 steps: the last checkpoint is step 2, so step 2 is redone on resume
    rt, ds = fresh_run(cfg, traces, banks, init)
    cut_log = runtime.TrainLogger(str(tmp_path / "cut" / "tb"))
    _, first = sft.run_sft(cfg, str(tmp_path / "cut"), ds, rt=rt, stop_after=3, logger=cut_log)
    cut_log.close()
    assert len(first) == 3
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["2"]
    rt, ds = fresh_run(cfg, traces, banks, init)
    cut_log = runtime.TrainLogger(str(tmp_path / "cut" / "tb"))
    _, resumed = sft.run_sft(cfg, str(tmp_path / "cut"), ds, rt=rt, logger=cut_log)
    cut_log.close()
    # the redone step 2 is logged once, with the resumed run's numbers
    cut_lines = [json.loads(x) for x in open(tmp_path / "cut" / "tb" / "metrics.jsonl")]
    assert [x["step"] for x in cut_lines] == list(range(5))
    assert [x["sft/loss"] for x in cut_lines] == [r["loss"] for r in first[:2] + resumed]
    assert [r["step"] for r in resumed] == [2, 3, 4]
    assert [r["loss"] for r in first] == [r["loss"] for r in full[:3]]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full[2:]]

    # logging: metrics.jsonl and a TensorBoard event file
    lines = [json.loads(x) for x in open(tmp_path / "full" / "tb" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == list(range(5))
    assert {"sft/loss", "sft/lr", "sft/grad_norm", "sft/step_time_s"} <= set(lines[0])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "full" / "tb"))


def test_restore_into_another_model_fails_clearly(tmp_path):
    from vrthinker_jax.train import checkpointing

    ck = checkpointing.Checkpointer(str(tmp_path / "c"), save_every=1)
    ck.save(1, {"a": np.zeros(3, np.float32)}, {"data": {}})
    with pytest.raises(ValueError, match="does not match"):
        ck.restore({"b": np.zeros(3, np.float32), "c": np.zeros(2, np.float32)})
    ck.close()


def test_stage_configs_for_every_size():
    from experiments.configs import grpo as grpo_config
    from experiments.configs import rft as rft_config
    from experiments.configs import sft as sft_config

    for lib in (sft_config, rft_config, grpo_config):
        for size in ("tiny", "3b", "7b"):
            cfg = lib.get_config(size)
            assert cfg.stage in ("sft", "rft", "grpo") and cfg.steps > 0
            assert set(cfg.mesh.ici) == {"data", "fsdp", "tensor"}
            if size != "tiny":
                assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"
                assert cfg.model.remat and cfg.model.scan_layers
                assert cfg.optimizer.state_dtype == "float32"
    with pytest.raises(ValueError, match="unknown size"):
        sft_config.get_config("13b")


def test_cli_reports_a_missing_training_file(tmp_path):
    import subprocess
    import sys

    from test_train_support import REPO

    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "experiments", "train.py"),
         "--config", os.path.join(REPO, "experiments", "configs", "sft.py") + ":tiny",
         "--workdir", str(tmp_path), f"--config.train_data={tmp_path}/nope.jsonl",
         "--config.tokenizer=x", "--config.optimizer.lr=2e-5"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"error: train_data {tmp_path}/nope.jsonl: no such file", out.stderr[-500:]


def test_caption_dataset_rows_hold_one_frame_and_train_on_the_caption_only(data):
    """Visual pretraining rows: the frame of the row is the bank's frame g, the loss covers the
    caption and the turn end, nothing of the user turn."""
    cfg, _, banks, init = data
    cfg = cfg.copy_and_resolve_references()
    cfg.data.update(dict(seq_len=48, max_frames=1, shuffle=False))
    tok = ByteTokenizer()
    rt = runtime.setup(cfg, tok, model=nnx.merge(init[0], init[1]))
    n = banks[0].shape[0]
    caps = [{"id": f"p{i}", "captions": [f"c{i}-{g}" for g in range(1, n + 1)]}
            for i in range(2)]
    ds = sft.caption_dataset(cfg, caps, banks[:2], tok, rt)
    batch = ds[0]
    for row in range(BATCH):
        i, g = divmod(row, n)  # unshuffled: pair 0's frames 1..n, then pair 1's
        np.testing.assert_array_equal(batch["frames"][row, 0], banks[i][g])
        target = batch["tokens"][row][batch["loss_mask"][row]]
        assert tok.decode([int(t) for t in target]) == f"c{i}-{g + 1}<|im_end|>"
        assert batch["weight"][row] == 1.0
    with pytest.raises(ValueError, match="captions of 'p0': 1 captions"):
        sft.caption_dataset(cfg, [{"id": "p0", "captions": ["x"]}], banks[:1], tok, rt)
    # rows of several frames (the demo's judged moments): each slot holds its frame, in order
    cfg.data.update(dict(seq_len=160, max_frames=2))
    items = [{"id": "p0", "frames": [1, n], "text": "1 vs n: same."}]
    row = sft.frame_text_dataset(cfg, items, banks[:1], tok, rt)[0]
    assert not row["failed"][0]
    np.testing.assert_array_equal(row["frames"][0, 0], banks[0][0])
    np.testing.assert_array_equal(row["frames"][0, 1], banks[0][n - 1])
    target = row["tokens"][0][row["loss_mask"][0]]
    assert tok.decode([int(t) for t in target]) == "1 vs n: same.<|im_end|>"
    with pytest.raises(ValueError, match=r"pretraining item of 'p0': frames \[0\]"):
        sft.frame_text_dataset(cfg, [{"id": "p0", "frames": [0], "text": "x"}], banks[:1],
                               tok, rt)
