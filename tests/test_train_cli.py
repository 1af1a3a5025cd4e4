"""`experiments/train.py` as a user runs it: a run that would learn nothing, nonsense step
counts and unknown config keys end in one stderr line, exit 2 and no export; a resumed run logs
each step once in metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_train_support import REPO

from tests import needle as needle_lib
from vrthinker_jax.train import runtime

SFT_TINY = os.path.join(REPO, "experiments", "configs", "sft.py") + ":tiny"


@pytest.fixture(scope="module")
def needle(tmp_path_factory):
    """Two synthetic needle traces and their sentencepiece."""
    return needle_lib.make(str(tmp_path_factory.mktemp("needle")), 2)


def train(workdir, *flags):
    """The CLI in its own process on one CPU device; returns (status, stderr lines)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    p = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "train.py"),
                        "--config", SFT_TINY, "--workdir", str(workdir), *flags],
                       capture_output=True, text=True, timeout=600, env=env)
    lines = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith(("W", "I"))]
    return p.returncode, lines, p.stderr


def _data_flags(needle, *extra):
    return [f"--config.train_data={needle['traces']}", f"--config.tokenizer={needle['tokenizer']}",
            "--config.data.batch_size=2", "--config.progress=False", *extra]


@pytest.mark.parametrize("flag, message", [
    ("--config.steps=-5", "error: sft: config field steps=-5: expected a positive integer"),
    ("--config.steps=0", "error: sft: config field steps=0: expected a positive integer"),
    ("--config.log_every=0", "error: sft: config field log_every=0: expected a positive integer"),
    ("--config.foo=1", "error: --config.foo: the config has no field 'foo'"),
    ("--config.optimizer.lrr=1",
     "error: --config.optimizer.lrr: the config has no field 'lrr' (Did you mean \"lr\"?)"),
])
def test_bad_counts_and_unknown_keys_are_one_line(needle, tmp_path, flag, message):
    rc, lines, err = train(tmp_path / "w", *_data_flags(needle, flag))
    assert rc == 2 and lines == [message], err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "w" / "export")


def test_every_trace_rejected_fails_before_compiling(needle, tmp_path):
    rc, lines, err = train(tmp_path / "w", *_data_flags(needle, "--config.data.seq_len=64",
                                                        "--config.steps=2"))
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: sft data: every trace would be rejected: 2 traces: 2 too")
    assert "raise data.seq_len" in lines[0]
    assert not os.path.exists(tmp_path / "w" / "export")
    assert not os.path.exists(tmp_path / "w" / "params")


@pytest.mark.slow  # compiles the tiny SFT step (~25 s on 2 cores)
def test_a_run_with_no_target_token_exits_2_and_writes_no_export(needle, tmp_path):
    """Rows rejected only when loaded (no scan ahead: the same as videos that fail to decode):
    the loop trains 2 steps on nothing, refuses at the end, saves no final checkpoint, and a
    re-run refuses again instead of exporting the untrained weights."""
    flags = _data_flags(needle, "--config.data.seq_len=64", "--config.data.scan_traces=False",
                        "--config.steps=2", "--config.ckpt_every=1")
    for _ in range(2):
        rc, lines, err = train(tmp_path / "w", *flags)
        assert rc == 2, err
        assert lines[-1].startswith("error: sft: 2 steps without one target token: every row "
                                    "was rejected (4 failed to build; first errors: "), err
        assert "nothing was learned" in lines[-1]
        assert not os.path.exists(tmp_path / "w" / "export")
        assert not os.path.exists(tmp_path / "w" / "params")
        assert "2" not in os.listdir(tmp_path / "w" / "checkpoints")


def test_logger_rewind_keeps_each_step_once(tmp_path):
    """What a resumed stage does first: its lines from the restored step on are dropped (they
    are about to be redone), other stages' lines and earlier steps stay."""
    log = runtime.TrainLogger(str(tmp_path))
    for step in range(4):
        log.scalars(step, {"sft/loss": float(step)})
    log.scalars(0, {"rft/acceptance_rate": 0.5})
    log.rewind("sft", 2)
    for step in range(2, 5):
        log.scalars(step, {"sft/loss": 10.0 + step})
    log.close()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    sft = [(x["step"], x["sft/loss"]) for x in lines if "sft/loss" in x]
    assert sft == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0)]
    assert sum("rft/acceptance_rate" in x for x in lines) == 1
