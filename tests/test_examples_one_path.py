"""One path for each training row (`vrthinker_jax.train.examples`): the rows the on-disk Grain
pipeline builds from traces and their videos are the rows the in-memory pipeline builds from
the same traces and frame banks (every key, value and dtype, failed rows included); a GRPO row
from a trajectory is the row of the same conversation; prompt rows agree the same way."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest
from flax import nnx
from test_train_support import ByteTokenizer, make_trace, stage_config

from data_pipelines import grain_pipelines as gp
from data_pipelines import schema
from data_pipelines import video as video_lib
from vrthinker_jax.models import model as model_lib
from vrthinker_jax.rollout import chat, sampler
from vrthinker_jax.train import examples, runtime, sft, steps

SIZE = (56, 56)  # the tiny model's frames: 2 x 2 merged visual tokens each
FRAMES = 12  # frames per test video (8 candidates are sampled from them)
# what the SFT step reads from a row (GRPO adds ref_logp / advantages to the batch itself)
SFT_KEYS = set(steps.STEP_KEYS) - {"ref_logp", "advantages"}


def _assert_same_batch(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], list):
            assert a[k] == b[k], k
        else:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("one_path"))
    rng = np.random.default_rng(0)
    for name in ("a.mp4", "b.mp4"):  # textured frames: any decode mismatch shows in pixels
        video_lib.write_video(os.path.join(root, name),
                              rng.integers(0, 256, (FRAMES, 32, 48, 3), dtype=np.uint8))
    cfg, pcfg = stage_config("sft")
    traces = [make_trace(rng, pcfg, i, tool_calls=c) for i, c in enumerate((1, 1, 2, 1))]
    bad = traces[3]["turns"]
    bad[1] = dict(bad[1], frames=[f % pcfg.total_frames + 1 for f in bad[1]["frames"]])
    for t in traces:
        t.update(video_a=os.path.join(root, "a.mp4"), video_b=os.path.join(root, "b.mp4"))
    path = os.path.join(root, "traces.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in traces)
    tok = ByteTokenizer()
    rt = runtime.setup(cfg, tok, model=model_lib.Qwen25VL(cfg.model, rngs=nnx.Rngs(0)))
    lengths = [len(examples.tokenize_trace(t, tok, pcfg, rt.merged_grid).ids)
               for t in traces[:3]]
    # the two-call trace is the one that does not fit (tokens and frames)
    cfg.data.update(dict(batch_size=len(traces), shuffle=False, num_epochs=1, frame_size=SIZE,
                         seq_len=max(lengths[:2]), process_index=0, process_count=1))
    assert lengths[2] > cfg.data.seq_len
    return dict(cfg=cfg, pcfg=pcfg, tok=tok, rt=rt, path=path, traces=traces)


@pytest.fixture(scope="module")
def batches(env):
    """The first batch of each pipeline: on disk (Grain: the JSONL file, frames decoded from
    its videos) and in memory (the traces as dicts, each with its decoded pair bank)."""
    cfg, pcfg = env["cfg"], env["pcfg"]
    disk = next(iter(gp.sft_dataset(env["path"], cfg.data, tokenizer=env["tok"], pcfg=pcfg,
                                    model_cfg=env["rt"].model_cfg)))
    banks = [gp.pair_bank(t, pcfg.num_candidates, SIZE) for t in env["traces"]]
    memory = sft.in_memory_dataset(cfg, env["traces"], banks, env["tok"], env["rt"])[0]
    return disk, memory, banks


def test_disk_and_memory_rows_are_identical(env, batches):
    disk, memory, _ = batches
    _assert_same_batch(disk, memory)
    assert SFT_KEYS <= set(disk)
    assert disk["status"].tolist() == [examples.OK, examples.OK, examples.TOO_LONG,
                                       examples.INVALID_TRACE]
    assert disk["id"] == [t["id"] for t in env["traces"]]
    np.testing.assert_array_equal(disk["failed"], [False, False, True, True])
    np.testing.assert_array_equal(disk["weight"], [1, 1, 0, 0])
    assert "'t2'" in disk["error"][2] and "seq_len" in disk["error"][2]
    assert "records frames" in disk["error"][3]
    assert not disk["valid"][2:].any() and not disk["loss_mask"][2:].any()
    assert disk["visual"][:2].sum() == 4 * disk["frame_mask"][:2].sum()  # 4 tokens a frame


def test_rows_show_the_frames_they_number(env, batches):
    """Each frame slot holds the bank frame of its global number (the Grain path decodes only
    those frames; the in-memory path looks them up in the whole bank)."""
    disk, _, banks = batches
    for r in range(2):
        t = examples.tokenize_trace(env["traces"][r], env["tok"], env["pcfg"],
                                    env["rt"].merged_grid)
        assert disk["frame_mask"][r].sum() == len(t.frames)
        for slot, g in enumerate(t.frames):
            np.testing.assert_array_equal(disk["frames"][r, slot], banks[r][g - 1])
        assert disk["frames"][r].any()
        assert not disk["frames"][r, len(t.frames):].any()


def test_trajectory_row_is_the_trace_row(env, batches):
    """GRPO's row of a conversation (`from_trajectory`, what the rollout recorded) equals the
    SFT row of the same conversation when the model 'generated' the assistant text."""
    disk, _, banks = batches
    cfg, pcfg, trace = env["cfg"], env["pcfg"], env["traces"][0]
    t = examples.tokenize_trace(trace, env["tok"], pcfg, env["rt"].merged_grid)
    traj = types.SimpleNamespace(
        tokens=t.ids, loss_mask=t.trainable, logp=np.zeros(len(t.ids), np.float32),
        kind=np.where(t.frame_of_token >= 0, sampler.VISUAL, sampler.CONTEXT).astype(np.int8),
        positions=chat.mrope_positions(t.frame_of_token, env["rt"].merged_grid)[0],
        visible_until=t.visible_until(pcfg.memory_window), frames=t.frames)
    kw = dict(seq_len=cfg.data.seq_len, max_frames=cfg.data.max_frames)
    row = examples.from_trajectory(traj, banks[0], id=trace["id"], **kw)
    _assert_same_batch(examples.collate([row]), _rows(disk, 0))
    with pytest.raises(examples.ExampleTooLong, match="seq_len"):
        examples.from_trajectory(traj, banks[0], seq_len=len(t.ids) - 1,
                                 max_frames=kw["max_frames"])
    # GRPO's failed row (an over-long trajectory) is the pipelines' failed row
    failed = examples.failed_example(kw["seq_len"], kw["max_frames"], banks[0].shape[1:],
                                     id="t2", error=disk["error"][2])
    _assert_same_batch(examples.collate([failed]), _rows(disk, 2))


def _rows(batch: dict, start: int, stop: int | None = None) -> dict:
    """Rows [start, stop) of a collated batch, still collated (positions [3, rows, seq])."""
    stop = start + 1 if stop is None else stop
    return {k: v[start:stop] if isinstance(v, list) else
            np.take(v, np.arange(start, stop), axis=steps.row_dim(k)) for k, v in batch.items()}


def test_prompt_rows_are_identical(env, tmp_path):
    pcfg = env["pcfg"]
    pairs = [{"id": t["id"], "prompt": t["prompt"], "video_a": t["video_a"],
              "video_b": t["video_b"], **t["labels"]} for t in env["traces"][:2]]
    pairs.append(dict(pairs[0], id="gone", video_b=str(tmp_path / "none.mp4")))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = gp.data_config(batch_size=4, frame_size=SIZE, shuffle=False, num_epochs=1,
                         process_index=0, process_count=1)
    disk = next(iter(gp.prompt_dataset(str(path), cfg, num_candidates=pcfg.num_candidates)))
    rows = [examples.prompt_row(p["id"], p["prompt"], gp.pair_bank(p, pcfg.num_candidates,
                                                                    SIZE),
                                schema.labels_array(p)) for p in pairs[:2]]
    shape = rows[0]["bank"].shape
    rows.append(examples.prompt_row("gone", pairs[2]["prompt"], np.zeros(shape, np.uint8),
                                    schema.labels_array(pairs[2]), status=examples.DECODE_ERROR,
                                    error=disk["error"][2]))
    rows.append(examples.prompt_row("", "", np.zeros(shape, np.uint8), schema.labels_array({}),
                                    status=examples.PADDING))
    _assert_same_batch(disk, examples.collate_prompts(rows))
    assert "none.mp4" in disk["error"][2]
    assert examples.count_status(disk) == {"ok": 2, "decode_error": 1, "padding": 1}
