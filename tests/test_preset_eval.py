"""A published checkpoint's user path on a tiny random model: `convert_hf --preset`, then `eval`
on a VideoGen-RewardBench release layout and `score` on one pair, all through the CLIs."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from tests import release_reference as ref
from tests.test_tokenizer import QWEN25VL_TEMPLATE
from vrthinker_jax.eval import predictions as preds_lib
from vrthinker_jax.rollout import presets


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from vrthinker_jax.tools import convert_hf

    d = tmp_path_factory.mktemp("preset_export")
    ref.tiny_release_checkpoint(str(d / "hf"), QWEN25VL_TEMPLATE)
    # the shipped preset with budgets a tiny CPU run can afford (the test frames need no resize)
    src = open(presets.resolve("vr-thinker")).read()
    small = {"initial_min_pixels": 28 * 28, "initial_max_pixels": 56 * 84,
             "video_max_pixels": 56 * 84, "image_max_pixels": 56 * 84, "max_new_tokens": 6}
    src = "\n".join(f"{line.split(' =')[0]} = {small[line.split(' =')[0]]}"
                    if line.split(" =")[0] in small else line for line in src.splitlines())
    (d / "small.toml").write_text(src)
    out = str(d / "export")
    assert convert_hf.main(["--hf-dir", str(d / "hf"), "--out", out, "--preset",
                            str(d / "small.toml")]) == 0
    return out


@pytest.fixture(scope="module")
def videogen(tmp_path_factory):
    """A VideoGen-RewardBench release (CSV + videos/) of 3 pairs, one with a missing video."""
    from data_pipelines import video

    d = tmp_path_factory.mktemp("videogen")
    rng = np.random.default_rng(0)
    for name in ("m1/a.mp4", "m2/b.mp4", "m1/c.mp4", "m2/d.mp4"):
        os.makedirs(os.path.dirname(d / "videos" / name), exist_ok=True)
        video.write_video(str(d / "videos" / name),
                          rng.integers(0, 256, (12, 56, 84, 3), dtype=np.uint8), 8.0)
    with open(d / "videogen-rewardbench.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "path_A", "path_B", "A_model", "B_model", "prompt", "VQ", "MQ", "TA",
                    "Overall", "fps_A", "num_frames_A", "fps_B", "num_frames_B"])
        w.writerow([0, "videos/m1/a.mp4", "videos/m2/b.mp4", "m1", "m2", "a cat", "A", "B",
                    "same", "A", 8, 12, 8, 12])
        w.writerow([1, "videos/m1/c.mp4", "videos/m2/d.mp4", "m1", "m2", "a dog", "B", "B", "B",
                    "B", 8, 12, 8, 12])
        w.writerow([2, "videos/m1/c.mp4", "videos/m2/gone.mp4", "m1", "m2", "rain", "B", "B",
                    "B", "B", 8, 12, 8, 12])
    return str(d)


@pytest.mark.slow
def test_convert_with_a_preset_then_eval_and_score(export_dir, videogen, tmp_path, capsys):
    from vrthinker_jax import score
    from vrthinker_jax.eval.__main__ import main as eval_main

    manifest = json.load(open(os.path.join(export_dir, "reward_model.json")))
    assert manifest["preset_name"] == "vr-thinker" and manifest["preset"] == "preset.toml"
    out = str(tmp_path / "out")
    rc = eval_main(["--benchmark", "videogen_rewardbench", "--data-dir", videogen,
                    "--checkpoint", export_dir, "--out", out, "--quiet", "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    rows = preds_lib.read_predictions(os.path.join(out, "predictions.jsonl")).rows
    assert len(rows) == 3
    failed = [r for r in rows if r["error"]]
    assert len(failed) == 1 and "gone.mp4" in failed[0]["error"]  # counted, named
    for r in rows:
        if r["error"]:
            continue
        # a random model answers nothing: each row is counted as parsed or not
        assert r["turns"] >= 1 and r["meta"]["stop"] in ("answer", "no_answer", "format")
        assert r["pred"]["OA"] in (-1, 0, 1, 2)
        assert r["meta"]["initial_frames"] == [1, 13, 25, 37, 49, 61, 73, 85]
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["counts"]["failed"] == 1

    capsys.readouterr()
    vids = os.path.join(videogen, "videos")
    assert score.main(["--checkpoint", export_dir, "--prompt", "a cat", "--video-a",
                       os.path.join(vids, "m1/a.mp4"), "--video-b",
                       os.path.join(vids, "m2/b.mp4")]) == 0
    text = capsys.readouterr().out
    assert "Judgment:" in text and "[frames shown first] frames 1 (A:1), 13 (A:13)" in text
    # the release's protocol has no tools-off mode: one line, exit 2
    assert eval_main(["--benchmark", "videogen_rewardbench", "--data-dir", videogen,
                      "--checkpoint", export_dir, "--out", str(tmp_path / "o2"), "--quiet",
                      "--no-tools"]) == 2
    assert "no tools-off mode" in capsys.readouterr().err


def test_convert_with_the_project_preset_writes_a_protocol_export(tmp_path, capsys):
    from vrthinker_jax.checkpoints import export
    from vrthinker_jax.tools import convert_hf

    hf_dir = str(tmp_path / "hf")
    ref.tiny_release_checkpoint(hf_dir, QWEN25VL_TEMPLATE)
    out = str(tmp_path / "export")
    assert convert_hf.main(["--hf-dir", hf_dir, "--out", out, "--preset", "vrthinker_jax"]) == 0
    m = json.load(open(os.path.join(out, "reward_model.json")))
    assert m["protocol"]["num_candidates"] == 128 and m["frame_size"] == [448, 448]
    assert m["info"]["preset"] == "vrthinker_jax" and "preset" not in m
    rm = export.load_reward_model(out)
    assert rm.preset is None and rm.protocol.memory_window == 32
    # an unknown preset is refused before the conversion, in one line
    capsys.readouterr()
    assert convert_hf.main(["--hf-dir", hf_dir, "--out", str(tmp_path / "e2"), "--preset",
                            "no-such"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a file nor one of" in err[0]
    assert not os.path.exists(tmp_path / "e2" / "model")


def test_render_then_forward_matches_transformers_on_what_the_model_saw(tmp_path):
    """The user's logit check: `tools.render` writes what the model sees after a tool call
    (the shipped vr-thinker preset, its own pixel budgets), `tools.forward` runs our port on it,
    transformers runs on the same file."""
    from data_pipelines import video
    from tests import hf_reference as R
    from vrthinker_jax.tools import forward, render

    hf_dir = str(tmp_path / "hf")
    hf = ref.tiny_release_checkpoint(hf_dir, QWEN25VL_TEMPLATE)
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        video.write_video(str(tmp_path / f"{name}.mp4"),
                          rng.integers(0, 256, (20, 30, 40, 3), dtype=np.uint8), 8.0)
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps(['<synthesis>x</synthesis><think>y</think><recommend answer>'
                                 'OA=1</recommend answer><tool_call>{"name": "select_frames", '
                                 '"arguments": {"target_frames": [5, 60]}}</tool_call>']))
    npz = str(tmp_path / "in.npz")
    assert render.main(["--checkpoint", hf_dir, "--preset", "vr-thinker", "--prompt", "a fox",
                        "--video-a", str(tmp_path / "a.mp4"), "--video-b",
                        str(tmp_path / "b.mp4"), "--turns", str(turns), "--out", npz]) == 0
    out = str(tmp_path / "out.npz")
    assert forward.main(["--checkpoint", hf_dir, "--inputs", npz, "--out", out]) == 0
    inputs = forward.read_inputs(npz)
    assert len(inputs["image_grid_thw"]) == 2 and len(inputs["video_grid_thw"]) == 1
    want = R.hf_logits(hf, inputs)
    with np.load(out) as f:
        got = f["logits"]
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= 1e-4
