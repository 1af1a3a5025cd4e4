"""The main job end to end (`python -m experiments.demo` with the `quick` preset of
experiments/configs/demo.py): every stage runs, the results table and JSON hold real numbers
(recomputed here from the saved predictions), the held-out split is disjoint from everything
trained on, and the TensorBoard / HTML / predictions files exist."""

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
QUICK = os.path.join(ROOT, "experiments", "configs", "demo.py") + ":quick"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "run")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.demo", f"--config={QUICK}",
         "--config.progress=False", "--out", out],
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
    from experiments.demo import cli

    (tmp_path / "x").write_text("keep me")
    assert cli.main([f"--config={QUICK}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and (tmp_path / "x").read_text() == "keep me"


def test_demo_rejects_an_unknown_override_or_argument(tmp_path, capsys):
    from experiments.demo import cli

    assert cli.main([f"--config={QUICK}", "--out", str(tmp_path / "o"),
                     "--config.sft.stepz=3"]) == 2
    assert "--config.sft.stepz: " in capsys.readouterr().err
    assert cli.main(["--out", str(tmp_path / "o"), "--config.sft.steps=many"]) == 2
    assert "--config.sft.steps=many: invalid literal" in capsys.readouterr().err
    assert cli.main(["--out", str(tmp_path / "o"), "--set", "sft.steps=3"]) == 2
    assert "unrecognized arguments: --set" in capsys.readouterr().err
    assert cli.main([f"--config={QUICK[:-6]}:nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_demo_configs_and_direct_answer_traces():
    from experiments.configs import demo as demo_configs
    from experiments.demo import data as demo
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
    """The pretraining probe scores every defective held-out frame and oracle call (and as many
    clean ones) against all alternatives, seen and blacked out, and prints one JSON line."""
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
    n_bad_calls = sum(1 for r in held if r["meta"]["defect"])  # one call shows each defect
    for view in ("seen", "blind"):
        cap, call = rep[view]["caption"], rep[view]["call"]
        assert cap["items"] == 2 * n_bad_frames  # every defective frame and as many clean
        assert sum(k["n"] for k in cap["by_kind"].values()) == n_bad_frames
        assert call["items"] == 2 * n_bad_calls
        assert sum(k["n"] for k in call["by_kind"].values()) == n_bad_calls
        assert cap["alternatives"] >= 3 and call["alternatives"] >= 2
        for x in (cap, call):
            assert 0.0 <= x["accuracy"] <= 1.0


@pytest.mark.slow
def test_grpo_reward_bench_on_the_quick_demo(quick_run):
    """From the SFT checkpoint (the quick run's RFT may accept no trace, so it may have none), a
    warm SFT step, two GRPO steps (two inner updates each, on a pool of two prompts) and the
    fixed-prompt reward before and after: one JSON line with every part in range; a config
    override naming no field is refused in one line."""
    out, _, _ = quick_run

    def bench(*extra):
        return subprocess.run(
            [sys.executable, "experiments/benchmarks/grpo_reward_bench.py", "--demo-dir", out,
             "--from", "sft", *extra],
            cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
            text=True, timeout=900,
        )

    proc = bench("--sft-steps", "1", "--steps", "2", "--eval-prompts", "2", "--eval-samples",
                 "3", "--train-prompts", "2", "--config.grpo.inner_updates=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rep["from"] == "sft" and rep["steps"] == 2 and rep["fixed_prompts"] == 2
    assert rep["fixed_samples"] == 3 and rep["train_prompts"] == 2
    assert rep["overrides"] == ["--config.grpo.inner_updates=2"]
    assert len(rep["reward"]) == len(rep["rows_in_update"]) == len(rep["kl"]) == 2
    for part in (rep["fixed_before"], rep["fixed_after"]):
        assert 0.0 <= part["accuracy"] <= 1.0 and 0.0 <= part["format"] <= 1.0
    assert rep["fixed_rise"] == round(rep["fixed_after"]["total"] - rep["fixed_before"]["total"],
                                      4)
    # the ratio is the last inner update's: one update away from the rollout's policy, so
    # near 1 (a learner scoring the rollout's tokens differently would put it anywhere)
    for r, rows in zip(rep["ratio_mean"], rep["rows_in_update"]):
        assert (r is None) == (rows == 0)
        if r is not None:
            assert 0.5 < r < 2.0

    bad = bench("--steps", "1", "--config.grpo.no_such_field=1")
    assert bad.returncode == 2 and "has no field 'no_such_field' in grpo" in bad.stderr


@pytest.mark.slow
def test_grpo_step_probe_on_the_quick_demo(quick_run):
    """One GRPO gradient of a rollout batch, one Adam step along it, against it and along a
    placebo: one JSON line; along the gradient the positive rows gain on the negative ones more
    than against it (the objective's first-order promise)."""
    out, _, _ = quick_run
    proc = subprocess.run(
        [sys.executable, "experiments/benchmarks/grpo_step_probe.py", "--demo-dir", out,
         "--from", "sft", "--prompts", "2", "--group", "4", "--lrs", "1e-5,1e-4",
         "--eval-prompts", "1", "--eval-samples", "2"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rep["bench"] == "grpo_step_probe" and [q["lr"] for q in rep["probes"]] == [1e-5, 1e-4]
    for q in rep["probes"]:
        for way in ("along", "against", "random"):
            assert 0.0 <= q[way]["format"] <= 1.0 and 0.0 <= q[way]["accuracy"] <= 1.0
        if q["along"]["dlogp_pos"] is not None and q["along"]["dlogp_neg"] is not None:
            gap = {w: q[w]["dlogp_pos"] - q[w]["dlogp_neg"] for w in ("along", "against")}
            assert gap["along"] > gap["against"], q


@pytest.mark.slow
def test_stage3_bench_on_the_quick_demo(quick_run, tmp_path):
    """From the quick run's pretraining: SFT and RFT (stopped there), then GRPO from that RFT
    with an objective option overridden: one JSON line per run, every number in range."""
    out, _, _ = quick_run

    def bench(*extra):
        return subprocess.run(
            [sys.executable, "experiments/benchmarks/stage3_bench.py", "--base-dir", out,
             f"--config={QUICK}", "--format-prompts", "2", "--format-samples", "2", *extra],
            cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
            text=True, timeout=900,
        )

    first = bench("--out", str(tmp_path / "a"), "--until", "rft")
    assert first.returncode == 0, first.stderr[-3000:]
    rep = json.loads(first.stdout.strip().splitlines()[-1])
    assert rep["bench"] == "stage3" and "oa_diff_grpo" not in rep
    proc = bench("--out", str(tmp_path / "b"), "--reuse", str(tmp_path / "a"),
                 "--config.grpo.neg_adv_scale=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep2 = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in ("oa_diff_sft", "oa_diff_rft"):
        assert rep2[k] == rep[k]
    for k in ("oa_diff_sft", "oa_diff_rft", "oa_diff_grpo"):
        assert rep2[k] is None or 0.0 <= rep2[k] <= 100.0
    for k in ("format_before_grpo", "format_after_grpo"):
        assert 0.0 <= rep2[k] <= 1.0
    assert rep2["grpo"]["neg_adv_scale"] == 0.5 and rep2["wall_s"] > rep["wall_s_sft_rft"]
    # quick's data, not stage3's
    bad = bench("--out", str(tmp_path / "c"), "--config=experiments/configs/demo.py:stage3")
    assert bad.returncode == 2 and "differs" in bad.stderr


def _oracle_trace(pid: str, verdicts: list[tuple[int, str]], n: int) -> dict:
    """A "video"-style oracle trace: one call per (video, verdict), then the final turn."""
    from vrthinker_jax.rollout import protocol

    tie = {k: 0 for k in KEYS}
    turns, synthesis = [], "Initial frames: clean."
    for v, text in verdicts:
        frames = [(v - 1) * n + c for c in (2, 3)]
        turns += [{"role": "assistant", "content": protocol.format_tool_turn(
            synthesis, f"Check video {v}.", tie, frames)}, {"role": "tool", "frames": frames}]
        synthesis = text
    turns.append({"role": "assistant",
                  "content": protocol.format_final_turn(synthesis, "Done.", tie)})
    return {"id": pid, "prompt": "a red square moves up", "labels": tie, "num_candidates": n,
            "turns": turns}


def test_caption_items_oversample_the_defective_frames():
    from experiments.demo import pretraining as demo_pretraining

    n = 4
    pairs = [{"id": "a", "meta": {"defect": {"global_frames": [6]}}},
             {"id": "b", "meta": {"defect": None}}]
    caps = [{"id": p["id"], "captions": [f"{p['id']}{g}" for g in range(1, 2 * n + 1)]}
            for p in pairs]
    items, counts = demo_pretraining.caption_items(pairs, caps, 0.25)
    assert counts == {"caption_rows": 16, "defective_frames": 1, "rows_per_epoch": len(items)}
    assert {(it["id"], it["frames"][0]) for it in items} == {
        (p, g) for p in "ab" for g in range(1, 2 * n + 1)}
    bad = [it for it in items if it["id"] == "a" and it["frames"] == [6]]
    assert all(it["text"] == "a6" for it in bad)
    assert abs(len(bad) / len(items) - 0.25) < 0.05
    assert all(it["pair"] == "ab".index(it["id"]) for it in items)
    assert demo_pretraining.caption_items(pairs, caps, 0.0)[0] == items[:16]
    with pytest.raises(ValueError, match="share must be in"):
        demo_pretraining.oversample(items, [True] * len(items), 1.0)


def test_call_items_draw_fresh_frame_sets_with_the_right_verdict():
    """Rows of 1..max_frames frames of one video, in time order; the verdict names the defect
    exactly when a defective candidate is among them; about `share` of the rows do."""
    from experiments.demo import pretraining as demo_pretraining

    n = 16
    pairs = [{"id": "a", "meta": {"defect": {"video": 2, "kind": "smear",
                                             "candidates": [4, 5], "global_frames": [20, 21]}}},
             {"id": "b", "meta": {"defect": None}}]
    items, counts = demo_pretraining.call_items(pairs, n, 9, 400, 0.5, seed=0)
    assert counts == {"call_rows": 400, "defective_calls": sum(
        it["text"] == "Video 2: smear." for it in items)}
    assert abs(counts["defective_calls"] / 400 - 0.5) < 0.08
    sets = set()
    for it in items:
        frames = it["frames"]
        assert 1 <= len(frames) <= 9 and frames == sorted(set(frames))
        video = 1 if frames[0] <= n else 2
        assert all((f <= n) == (video == 1) for f in frames)  # one video per row
        shows = it["id"] == "a" and bool({20, 21} & set(frames))
        assert it["text"] == f"Video {video}: {'smear' if shows else 'clean'}."
        assert it["pair"] == "ab".index(it["id"])
        sets.add((it["id"], tuple(frames)))
    assert len(sets) > 350  # drawn afresh, not the same few sets
    assert demo_pretraining.call_items(pairs, n, 9, 400, 0.5, seed=0)[0] == items  # seeded
    with pytest.raises(ValueError, match="no training pair has a defect"):
        demo_pretraining.call_items(pairs[1:], n, 9, 10, 0.5, seed=0)


def test_reasoning_segments_train_everything_but_the_syntheses():
    from experiments.demo import pretraining as demo_pretraining
    from vrthinker_jax.rollout import protocol

    n = 4
    pcfg = protocol.ProtocolConfig(num_candidates=n, num_initial_frames=1, max_turns=3,
                                   max_frames_per_call=2, memory_window=4)
    trace = _oracle_trace("a", [(1, "Video 1: clean."), (2, "Video 2: smear.")], n)
    full = protocol.trace_segments(trace, pcfg)
    segs = demo_pretraining.reasoning_segments(trace, pcfg)
    assert not any(isinstance(s, protocol.Frame) for s in segs)
    text = "".join(s.text for s in full if isinstance(s, protocol.Text))
    assert "".join(s.text for s in segs) == text  # the same text, frames left out
    trained = "".join(s.text for s in segs if s.trainable)
    untrained = "".join(s.text for s in segs if not s.trainable)
    assert "<synthesis>" not in trained and "smear" not in trained
    assert "Video 2: smear.</synthesis>" in untrained
    assert trained.count("<think>") == 3 and trained.count("<final answer>") == 1


def test_rehearsal_mix_puts_every_call_row_among_the_traces():
    """SFT rows: each call item once, the traces cycled to fill the rest, each row rendered as
    what it is (a call: its frames and the verdict trained; a trace: the whole conversation)."""
    from experiments.demo import pretraining as demo_pretraining
    from vrthinker_jax.rollout import protocol

    n = 4
    pcfg = protocol.ProtocolConfig(num_candidates=n, num_initial_frames=1, max_turns=3,
                                   max_frames_per_call=2, memory_window=4)
    traces = [_oracle_trace(t, [(1, "Video 1: clean."), (2, "Video 2: smear.")], n)
              for t in "ab"]
    calls = [{"id": "a", "pair": 0, "frames": [5, 6], "text": "Video 2: smear."},
             {"id": "b", "pair": 1, "frames": [1], "text": "Video 1: clean."}]
    recs, banks = demo_pretraining.rehearsal_mix(traces, ["A", "B"], calls, ["cA", "cB"], 8,
                                                 seed=0)
    assert len(recs) == len(banks) == 8
    assert sorted(b for b in banks if b.startswith("c")) == ["cA", "cB"]
    assert sorted(r["id"] for r, b in zip(recs, banks) if not b.startswith("c")) == list("aaabbb")
    assert all(b == r["id"].upper() for r, b in zip(recs, banks) if "text" not in r)
    assert recs != [traces[i % 2] for i in range(6)] + calls  # shuffled
    call = demo_pretraining.mixed_segments(calls[0], pcfg)
    assert [s.index for s in call if isinstance(s, protocol.Frame)] == [5, 6]
    assert "".join(s.text for s in call if isinstance(s, protocol.Text) and s.trainable
                   ).startswith("Video 2: smear.")
    assert demo_pretraining.mixed_segments(traces[0], pcfg) == protocol.trace_segments(traces[0],
                                                                                       pcfg)
    with pytest.raises(ValueError, match="leave no room for traces"):
        demo_pretraining.rehearsal_mix(traces, ["A", "B"], calls, ["cA", "cB"], 2, seed=0)


def _run(*argv, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_quick_demo_export_works_with_score_eval_and_train(quick_run, tmp_path):
    """The quick run leaves a reward-model export that `score` and `eval` take, and the
    README's `train.py` command (at size `demo`) trains on the run's data and tokenizer."""
    out, results, stdout = quick_run
    export = results["paths"]["export"]
    assert export == os.path.join(os.path.abspath(out), "export") and f"export:       {export}" \
        in stdout
    data = os.path.join(out, "data")
    pair = _jsonl(os.path.join(data, "heldout.jsonl"))[0]
    p = _run("-m", "vrthinker_jax.score", "--checkpoint", export, "--prompt", pair["prompt"],
             "--video-a", os.path.join(data, pair["video_a"]),
             "--video-b", os.path.join(data, pair["video_b"]))
    assert p.returncode == 0 and "Judgment:" in p.stdout, p.stderr[-2000:]
    p = _run("-m", "vrthinker_jax.eval", "--benchmark", "video_pairs", "--data-dir", data,
             "--split", "heldout", "--subset", "2", "--checkpoint", export, "--out",
             str(tmp_path / "eval"), "--quiet")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.load(open(tmp_path / "eval" / "metrics.json"))["counts"]["rows"] >= 2
    p = _run("experiments/train.py", "--config", "experiments/configs/sft.py:demo", "--workdir",
             str(tmp_path / "w"), f"--config.train_data={data}/cot_train.jsonl",
             f"--config.tokenizer={out}/tokenizer", "--config.optimizer.lr=1e-3",
             "--config.steps=1", "--config.data.batch_size=2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["steps_run"] == 1
    assert os.path.isfile(tmp_path / "w" / "export" / "reward_model.json")


def test_the_demo_size_of_the_stage_configs_is_the_demos_model_and_protocol():
    from experiments.configs import demo as demo_configs
    from experiments.configs import grpo as grpo_config
    from experiments.configs import sft as sft_config

    demo = demo_configs.get_config("default")
    for lib in (sft_config, grpo_config):
        cfg = lib.get_config("demo")
        assert cfg.model.to_dict() == demo.model.to_dict()
        assert {k: cfg.protocol[k] for k in demo.protocol} == demo.protocol.to_dict()
        assert tuple(cfg.data.frame_size) == tuple(demo.frame_size)
        assert cfg.data.max_frames == demo.max_frames
        assert cfg.optimizer.lr == lib.get_config("tiny").optimizer.lr  # a CPU size
    assert grpo_config.get_config("demo").sampling.max_len == 2304
