"""`eval --checkpoint` on a real (tiny, random) model: a reward-model export
(`checkpoints.export`) read back, video_pairs fixture data with one corrupt video, rollouts over
the data axis of all (simulated) devices, predictions, resume, metrics, and the trace report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_rollout_helpers import make_tokenizer, model_config_for, tiny_protocol

from vrthinker_jax.checkpoints import export
from vrthinker_jax.eval import __main__ as cli
from vrthinker_jax.eval import predictions as preds_lib
from vrthinker_jax.eval.__main__ import main
from vrthinker_jax.rollout import protocol

FRAME = (28, 56)  # 2 merged visual tokens per frame: the smallest valid bank frame
# a few generated tokens per turn: the random model's text is noise, only the plumbing matters
SAMPLING = dict(max_len=384, max_new_tokens=24, max_turn_tokens=8, prompt_buckets=(192,))


def make_export(directory: str, *, seed: int = 0) -> str:
    """A reward-model export of the tiny random model with a tiny BPE tokenizer."""
    from flax import nnx

    from vrthinker_jax.models import model as model_lib

    tok_dir = os.path.join(directory, "_tok")
    os.makedirs(tok_dir, exist_ok=True)
    tok = make_tokenizer(tok_dir)
    cfg = model_config_for(tok)
    model = model_lib.Qwen25VL(cfg, rngs=nnx.Rngs(seed))
    out = os.path.join(directory, "export")
    export.export_reward_model(
        out, model=model, tokenizer_path=os.path.join(tok_dir, "tokenizer.json"),
        protocol_cfg=tiny_protocol(max_turns=2), sampling_cfg=SAMPLING, frame_size=FRAME,
        info={"test": True})
    return out


def write_videos(directory: str, n: int, *, seed: int = 0, frames: int = 10) -> list[str]:
    """n small random-noise mp4s (different content each); returns their paths."""
    from data_pipelines import video as video_lib

    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n):
        clip = rng.integers(0, 256, (frames, 32, 48, 3), np.uint8)
        path = os.path.join(directory, f"v{i}.mp4")
        video_lib.write_video(path, clip, 8.0)
        paths.append(path)
    return paths


def write_corrupt(path: str) -> str:
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)  # a header, then junk
    return path


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return make_export(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pairs"))
    write_videos(os.path.join(d, "videos"), 4)
    write_corrupt(os.path.join(d, "videos", "bad.mp4"))
    rows = [
        {"id": "p0", "prompt": "a red fox runs", "video_a": "videos/v0.mp4",
         "video_b": "videos/v1.mp4", "TA": 1, "MQ": 2, "VQ": 0, "OA": 1},
        {"id": "p1", "prompt": "a cat", "video_a": "videos/v2.mp4",
         "video_b": "videos/v3.mp4", "TA": 2, "MQ": 2, "VQ": 2, "OA": 2},
        {"id": "p2", "prompt": "rain", "video_a": "videos/v1.mp4",
         "video_b": "videos/bad.mp4", "TA": 0, "MQ": 0, "VQ": 0, "OA": 0},
    ]
    with open(os.path.join(d, "test.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_export_round_trip(export_dir):
    rm = export.load_reward_model(export_dir)
    assert rm.frame_size == FRAME
    assert rm.protocol == tiny_protocol(max_turns=2)
    assert rm.sampling.max_new_tokens == SAMPLING["max_new_tokens"]
    assert rm.sampling.prompt_buckets == SAMPLING["prompt_buckets"]
    assert rm.info == {"test": True}
    assert int(rm.model_cfg.image_token_id) == rm.tokenizer.token_to_id("<|image_pad|>")
    manifest = export.read_manifest(export_dir)
    assert manifest["model"] == "model" and manifest["tokenizer"] == "tokenizer/tokenizer.json"


def test_export_errors_name_the_file_and_field(export_dir, tmp_path):
    with pytest.raises(export.ExportError, match="not a reward-model export"):
        export.load_reward_model(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = export.read_manifest(export_dir)
    (broken / export.EXPORT_FILE).write_text(json.dumps({**manifest, "frame_size": [30, 56]}))
    with pytest.raises(export.ExportError, match=r"reward_model.json: field 'frame_size'"):
        export.load_reward_model(str(broken))
    (broken / export.EXPORT_FILE).write_text(json.dumps({k: v for k, v in manifest.items()
                                                         if k != "protocol"}))
    with pytest.raises(export.ExportError, match="missing field 'protocol'"):
        export.load_reward_model(str(broken))


def _eval(export_dir, pairs_dir, out, *extra):
    return main(["--benchmark", "video_pairs", "--data-dir", pairs_dir, "--checkpoint",
                 export_dir, "--out", out, "--quiet", *extra])


def test_eval_checkpoint_end_to_end(export_dir, pairs_dir, tmp_path, capsys):
    import jax

    out = str(tmp_path / "out")
    assert _eval(export_dir, pairs_dir, out) == 0, capsys.readouterr().err
    rows = preds_lib.read_predictions(os.path.join(out, "predictions.jsonl")).rows
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ["p0", "p1", "p2"]
    # the corrupt video is a counted failure naming the file, not a lost example
    assert by_id["p2"]["error"] and "bad.mp4" in by_id["p2"]["error"]
    for i in ("p0", "p1"):
        r = by_id[i]
        assert r["error"] is None
        assert 1 <= r["turns"] <= 2 and r["trace"] and all(isinstance(t, str) for t in r["trace"])
        assert set(r["pred"]) == {"TA", "MQ", "VQ", "OA"}
        assert all(v in (-1, 0, 1, 2) for v in r["pred"].values())
        assert r["meta"]["initial_frames"] == protocol.initial_frames(tiny_protocol())
        assert r["label"] == {"p0": {"TA": 1, "MQ": 2, "VQ": 0, "OA": 1},
                              "p1": {"TA": 2, "MQ": 2, "VQ": 2, "OA": 2}}[i]
    # every row and the run manifest name the export by its content hash
    model_id = export.content_hash(export_dir)
    assert model_id.startswith("sha256:") and len(model_id) == 7 + 64
    assert {r["meta"]["run"]["model_id"] for r in rows} == {model_id}
    manifest = json.load(open(os.path.join(out, preds_lib.MANIFEST_FILE)))
    assert manifest["model"] == {"checkpoint": export_dir, "id": model_id}
    assert manifest["data"]["dir"] == os.path.abspath(pairs_dir)
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["counts"]["failed"] == 1
    assert m["counts"]["run"]["evaluated_now"] == 3
    assert m["run_config"]["mode"] == "checkpoint" and m["run_config"]["temperature"] == 0.0
    html = open(os.path.join(out, "traces.html"), encoding="utf-8").read()
    assert html.count("data:image/png;base64,") >= 4  # the initial frames, decoded from videos
    mesh, batch = cli._mesh_and_batch(None)  # what load_engine used: all 8 devices' data axis
    assert jax.device_count() == 8 and dict(mesh.shape)["data"] == 8 and batch == 8

    # a re-run resumes: nothing is predicted again (without --quiet: progress bar and table)
    capsys.readouterr()
    assert main(["--benchmark", "video_pairs", "--data-dir", pairs_dir, "--checkpoint",
                 export_dir, "--out", out]) == 0
    cap = capsys.readouterr()
    assert "eval video_pairs" in cap.err and "3/3" in cap.err  # tqdm
    assert "failed 1" in cap.out and "bad.mp4" in cap.out
    m2 = json.load(open(os.path.join(out, "metrics.json")))
    assert m2["counts"]["run"]["evaluated_now"] == 0 and m2["counts"]["run"]["resumed"] == 3


def test_eval_checkpoint_errors(export_dir, pairs_dir, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert _eval(str(plain), pairs_dir, str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a reward-model export" in err[0]
    assert _eval(export_dir, pairs_dir, str(tmp_path / "o"), "--batch-size", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 3: must be a positive multiple of the 8" in err[0]
    for mesh, msg in (("data=3", "needs 3 devices, have 8"), ("rows=8", "expected AXIS=SIZE")):
        assert _eval(export_dir, pairs_dir, str(tmp_path / "o"), "--mesh", mesh) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    mesh, batch = cli._mesh_and_batch(None, "data=2,fsdp=4")  # batch spans data x fsdp
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1} and batch == 8


def test_content_hash_follows_the_model_not_the_path(export_dir, tmp_path):
    """A copy hashes equal; other weights, or another protocol, do not."""
    import shutil

    copy = shutil.copytree(export_dir, str(tmp_path / "copy"))
    assert export.content_hash(copy) == export.content_hash(export_dir)
    other = make_export(str(tmp_path / "other"), seed=1)
    assert export.content_hash(other) != export.content_hash(export_dir)
    m = export.read_manifest(copy)
    m["protocol"]["max_turns"] = 3
    with open(os.path.join(copy, export.EXPORT_FILE), "w") as f:
        json.dump(m, f)
    assert export.content_hash(copy) != export.content_hash(export_dir)
    with pytest.raises(export.ExportError, match="not a reward-model export"):
        export.content_hash(str(tmp_path))


def test_export_of_an_existing_checkpoint_and_overwrite(export_dir, tmp_path, capsys):
    m = export.read_manifest(export_dir)
    tok = os.path.join(export_dir, m["tokenizer"])
    model_dir = os.path.join(export_dir, "model")
    kw = dict(model_dir=model_dir, tokenizer_path=tok, sampling_cfg=SAMPLING, frame_size=FRAME)
    out = export.export_reward_model(str(tmp_path / "e2"), protocol_cfg=m["protocol"], **kw)
    assert export.read_manifest(out)["model"] == model_dir  # outside DIR: absolute, not copied
    assert not os.path.exists(os.path.join(out, "model"))
    rm = export.load_reward_model(out)
    assert rm.model_cfg.to_dict() == export.load_reward_model(export_dir).model_cfg.to_dict()
    with pytest.raises(export.ExportError, match="already exists"):
        export.export_reward_model(out, protocol_cfg=m["protocol"], **kw)
    export.export_reward_model(out, protocol_cfg={**m["protocol"], "max_turns": 3},
                               overwrite=True, **kw)
    assert export.read_manifest(out)["protocol"]["max_turns"] == 3
    # the CLI: one error line for a bad frame size, the directory on success
    argv = ["--model", model_dir, "--tokenizer", tok, "--out", str(tmp_path / "e3")]
    assert export.main(argv + ["--frame-size", "30,56"]) == 2
    assert "frame_size (30, 56) must be two positive multiples of 28" in capsys.readouterr().err
    assert export.main(argv + ["--frame-size", "28,56", "--protocol",
                               json.dumps(m["protocol"])]) == 0
    assert export.load_reward_model(str(tmp_path / "e3")).protocol == rm.protocol
