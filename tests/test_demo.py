"""The main job end to end (`python -m experiments.demo --quick`): every stage runs, the results
table and JSON hold real numbers (recomputed here from the saved predictions), the held-out split
is disjoint from everything trained on, and the TensorBoard / HTML / predictions files exist."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from vrthinker_jax.eval import metrics, predictions

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
KEYS = ("TA", "MQ", "VQ", "OA")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "run")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.demo", "--quick", "--no-progress", "--out", out],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    return out, results, proc.stdout


def _jsonl(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


@pytest.mark.slow
def test_quick_demo_table_has_real_numbers(quick_run):
    out, results, stdout = quick_run
    names = [r["stage"] for r in results["table"]]
    assert results["complete"] is True
    assert names == ["baseline", "sft", "rft", "grpo", "final_tool_disabled"]
    n_held = results["heldout_pairs"]
    assert n_held == len(results["data"]["heldout_ids"]) > 0
    for row in results["table"]:
        assert not row.get("not_run"), row
        assert row["n_pairs"] == n_held
        # the table's numbers are those of metrics.evaluate_rows on the saved predictions
        name = {"baseline": "initial_frames_only"}.get(row["stage"], row["stage"])
        rows = predictions.read_predictions(
            os.path.join(out, "eval", name, "predictions.jsonl")).rows
        assert sorted(r["id"] for r in rows) == sorted(results["data"]["heldout_ids"])
        recomputed = metrics.evaluate_rows(rows)["by_dimension"]
        for k in KEYS:
            for conv in ("diff", "ties"):
                assert row["acc"][k][conv] == recomputed[k][conv]["accuracy"]
                v = row["acc"][k][conv]
                assert v is None or 0.0 <= v <= 1.0
        assert row["mean_tool_calls"] is not None and row["mean_frames_viewed"] >= 8
    # the baseline cannot call the tool (max_turns=1): it only ever sees the 8 initial frames
    assert results["table"][0]["mean_tool_calls"] == 0
    assert results["table"][0]["mean_frames_viewed"] == 8
    assert "gain" in results and isinstance(results["gain"]["oa_diff_points"], float)
    assert "initial frames only" in stdout and "OA diff" in stdout and "pairs" in stdout
    assert results["stages"]["pretrain"]["steps"] > 0  # visual pretraining ran first
    assert results["stages"]["sft"]["steps"] > 0
    assert results["stages"]["grpo"]["steps"] > 0
    assert "rollouts" in results["stages"]["rft"]


@pytest.mark.slow
def test_quick_demo_heldout_never_trained_on(quick_run):
    out, results, _ = quick_run
    held = set(results["data"]["heldout_ids"])
    train = set(results["data"]["train_ids"])
    assert held and train and not held & train
    data = os.path.join(out, "data")
    assert {r["id"] for r in _jsonl(os.path.join(data, "heldout.jsonl"))} == held
    for name in ("cot_train.jsonl", "cot_train_initial_frames_only.jsonl", "train.jsonl"):
        assert {r["id"] for r in _jsonl(os.path.join(data, name))} <= train
    rft_traces = os.path.join(out, "rft", "rft_traces.jsonl")
    assert os.path.exists(rft_traces)
    assert {r["id"] for r in _jsonl(rft_traces)} <= train
    # the tokenizer's corpus is the training split's text: no held-out prompt id leaks in
    assert results["lengths"]["vocab"] > 0


@pytest.mark.slow
def test_quick_demo_writes_tensorboard_and_html(quick_run):
    out, results, stdout = quick_run
    paths = results["paths"]
    assert glob.glob(os.path.join(paths["tensorboard"], "train", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(paths["tensorboard"], "eval", "grpo", "events.out.tfevents.*"))
    assert os.path.getsize(os.path.join(paths["tensorboard"], "train", "metrics.jsonl")) > 0
    with open(paths["html_report"], encoding="utf-8") as f:
        page = f.read()
    assert "<html" in page and "data:image/png;base64," in page
    assert any(i in page for i in results["data"]["heldout_ids"])
    for p in (paths["results_json"], paths["html_report"], paths["tensorboard"]):
        assert p in stdout


def test_demo_refuses_a_non_empty_out_dir(tmp_path, capsys):
    from experiments import demo

    (tmp_path / "x").write_text("keep me")
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and (tmp_path / "x").read_text() == "keep me"


def test_demo_rejects_an_unknown_override(tmp_path, capsys):
    from experiments import demo

    assert demo.main(["--quick", "--out", str(tmp_path / "o"), "--set", "sft.stepz=3"]) == 2
    assert "config has no field 'stepz'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_demo_configs_and_direct_answer_traces():
    from experiments import demo
    from experiments.configs import demo as demo_configs
    from vrthinker_jax.rollout import protocol

    for preset in demo_configs.PRESETS:
        c = demo_configs.get_config(preset)
        t = c.model.text
        assert sum(t.mrope_section) == t.head_dim // 2
        assert c.tokenizer_vocab < t.vocab_size
    with pytest.raises(ValueError, match="unknown preset"):
        demo_configs.get_config("huge")
    pcfg = protocol.ProtocolConfig(num_candidates=16, num_initial_frames=4, max_turns=4,
                                   max_frames_per_call=6, memory_window=20)
    trace = {"id": "x", "prompt": "a red square moves up", "labels": {k: 0 for k in KEYS},
             "num_candidates": 16, "turns": [
                 {"role": "assistant", "content": protocol.format_tool_turn(
                     "The initial frames look the same.", "Look closer.",
                     {k: 0 for k in KEYS}, [4, 20])},
                 {"role": "tool", "frames": [4, 20]},
                 {"role": "assistant", "content": protocol.format_final_turn(
                     "Frame 20 is noisy.", "Video 1 wins.", {"TA": 0, "MQ": 0, "VQ": 1,
                                                             "OA": 1})}]}
    trace["labels"] = {"TA": 0, "MQ": 0, "VQ": 1, "OA": 1}
    direct = demo.direct_answer_trace(trace)
    assert len(direct["turns"]) == 1
    one_turn = protocol.ProtocolConfig(**{**pcfg.__dict__, "max_turns": 1})
    segs = protocol.trace_segments(direct, one_turn)
    assert protocol.frames_in(segs) == protocol.initial_frames(one_turn)
    assert protocol.parse_final_answer(direct["turns"][0]["content"]) == trace["labels"]
    assert "Frame 20" not in direct["turns"][0]["content"]  # nothing seen beyond the initial


@pytest.mark.slow
def test_verdict_probe_on_the_quick_demo(quick_run):
    """The teacher-forced probe scores every held-out pair against its counterfactuals, with
    the frames seen and blacked out, and prints one JSON line."""
    out, results, _ = quick_run
    proc = subprocess.run(
        [sys.executable, "experiments/benchmarks/verdict_probe.py", "--demo-dir", out,
         "--stage", "sft", "--batch", "4"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    held = _jsonl(os.path.join(out, "data", "heldout.jsonl"))
    n_defect = sum(1 for r in held if r["meta"]["defect"])
    assert rep["pairs"] == len(held) == results["heldout_pairs"]
    for view in ("seen", "blind"):
        assert rep[view]["n_attribution"] == n_defect
        assert rep[view]["n_detection"] == len(held)
        assert 0.0 <= rep[view]["detection"] <= 1.0
    # blacking out the frames changes what the model is scored on
    assert rep["seen"]["mean_logp_true"] != rep["blind"]["mean_logp_true"]


@pytest.mark.slow
def test_pretrain_probe_on_the_quick_demo(quick_run):
    """The pretraining probe scores every defective held-out frame and moment (and as many clean
    ones) against all alternatives, seen and blacked out, and prints one JSON line."""
    out, _, _ = quick_run
    proc = subprocess.run(
        [sys.executable, "experiments/benchmarks/pretrain_probe.py", "--demo-dir", out,
         "--stage", "pretrain", "--batch", "8", "--max-items", "0"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    held = _jsonl(os.path.join(out, "data", "heldout.jsonl"))
    n_bad_frames = sum(len(r["meta"]["defect"]["global_frames"]) for r in held
                       if r["meta"]["defect"])
    for view in ("seen", "blind"):
        cap, judg = rep[view]["caption"], rep[view]["judgment"]
        assert cap["items"] == 2 * n_bad_frames  # every defective frame and as many clean
        assert sum(k["n"] for k in cap["by_kind"].values()) == n_bad_frames
        assert judg["items"] % 2 == 0 and judg["items"] > 0
        for x in (cap, judg):
            assert 0.0 <= x["accuracy"] <= 1.0 and x["alternatives"] >= 3


def test_pretraining_items_oversample_the_defects():
    """Every candidate frame and every moment appears; the defective ones are repeated to about
    the configured shares; a moment's row shows video 1's frame, then video 2's."""
    import ml_collections

    from experiments import demo

    n = 4
    pairs = [{"id": "a", "meta": {"defect": {"global_frames": [6]}}},
             {"id": "b", "meta": {"defect": None}}]
    caps = [{"id": p["id"], "captions": [f"{p['id']}{g}" for g in range(1, 2 * n + 1)],
             "judgments": [f"{p['id']} m{c}" for c in range(1, n + 1)]} for p in pairs]
    pt = ml_collections.ConfigDict(dict(defect_share=0.25, judgments=True,
                                        judgment_defect_share=0.5))
    items, counts = demo.pretraining_items(pairs, caps, n, pt)
    assert counts == {"caption_rows": 16, "defective_frames": 1, "judgment_rows": 8,
                      "defective_moments": 1, "rows_per_epoch": len(items)}
    cap_rows = [it for it in items if len(it["frames"]) == 1]
    moment_rows = [it for it in items if len(it["frames"]) == 2]
    assert {(it["id"], it["frames"][0]) for it in cap_rows} == {
        (p, g) for p in "ab" for g in range(1, 2 * n + 1)}
    bad = [it for it in cap_rows if it["id"] == "a" and it["frames"] == [6]]
    assert all(it["text"] == "a6" for it in bad)
    assert abs(len(bad) / len(cap_rows) - 0.25) < 0.05
    bad_m = [it for it in moment_rows if it["id"] == "a" and it["frames"] == [2, 6]]
    assert all(it["text"] == "a m2" for it in bad_m)
    assert abs(len(bad_m) / len(moment_rows) - 0.5) < 0.05
    assert all(it["frames"][1] == it["frames"][0] + n for it in moment_rows)
    assert all(items[i]["pair"] == ("ab".index(items[i]["id"])) for i in range(len(items)))
    with pytest.raises(ValueError, match="share must be in"):
        demo.oversample(cap_rows, [True] * len(cap_rows), 1.0)
    pt.judgments = False
    assert all(len(it["frames"]) == 1 for it in demo.pretraining_items(pairs, caps, n, pt)[0])
