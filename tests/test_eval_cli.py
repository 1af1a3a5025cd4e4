"""The eval CLI in-process (`main(argv)`), the metrics JSON / table, TensorBoard events read back
without TensorFlow, and the HTML trace report."""

import base64
import io
import json
import os
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from vrthinker_jax.eval import html_report, metrics, report, tb
from vrthinker_jax.eval import predictions as P
from vrthinker_jax.eval.__main__ import main

BENCH = "videogen_rewardbench"


def _write_rows(path, rows, tail=""):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(tail)
    return str(path)


def _fixture_rows():
    # 10 rows: OA labels 1,2,1,2,1,2,0,0,1,2; the model answers 1 everywhere except r6 (tie)
    # and r9 (no answer); r8 failed (corrupt video).
    labels_oa = [1, 2, 1, 2, 1, 2, 0, 0, 1, 2]
    rows = []
    for i, y in enumerate(labels_oa):
        pred = {"TA": 1, "MQ": 2, "VQ": 1, "OA": 1}
        if i == 6:
            pred["OA"] = 0
        if i == 9:
            pred = {}
        if i == 8:
            rows.append(P.failed_row(f"r{i}", BENCH, "r8_a.mp4: moov atom not found",
                                     label={"TA": y, "MQ": y, "VQ": y, "OA": y}))
            continue
        rows.append(P.make_row(
            f"r{i}", BENCH, pred=pred, label={"TA": y, "MQ": y, "VQ": y, "OA": y},
            trace=[f"<think>turn {i}</think>", "<final answer>OA: 1</final answer>"],
            frames_selected=[[2, 40], []], meta={"duration_s": 1.0 + i},
        ))
    return rows


# scored rows (r8 failed, excluded): OA label/pred
#   r0 1/1 ok, r1 2/1, r2 1/1 ok, r3 2/1, r4 1/1 ok, r5 2/1, r6 0/0, r7 0/1, r9 2/-1
# diff: rows with label 1/2 = r0..r5, r9 (n=7); right r0, r2, r4 -> 3/7
# ties: n=9; right r0, r2, r4, r6 -> 4/9
# tie_half: n=7, no predicted tie among them -> 3/7


@pytest.fixture()
def pred_file(tmp_path):
    return _write_rows(tmp_path / "preds.jsonl", _fixture_rows())


def test_rescore_writes_metrics_tb_html_and_prints_table(pred_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--benchmark", BENCH, "--predictions", pred_file, "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "diff (no ties)" in printed and "42.86% (3/7)" in printed and "44.44% (4/9)" in printed
    assert "failed x1: r8_a.mp4: moov atom not found" in printed
    rep = json.loads((out / "metrics.json").read_text())
    oa = rep["by_dimension"]["OA"]
    assert (oa["diff"]["correct"], oa["diff"]["n"]) == (3.0, 7)
    assert (oa["ties"]["correct"], oa["ties"]["n"]) == (4.0, 9)
    assert oa["tie_half"]["accuracy"] == pytest.approx(3 / 7)
    assert oa["no_answer"] == 1
    assert rep["headline"]["convention"] == "diff"
    assert rep["headline"]["accuracy"] == pytest.approx(3 / 7)
    assert rep["counts"]["failed"] == 1 and rep["counts"]["scored"] == 9
    # every accuracy block names its convention, and sits under that convention's key
    for dim in rep["by_dimension"].values():
        for conv in ("diff", "ties", "tie_half"):
            assert dim[conv]["convention"] == conv
    assert set(rep["conventions"]) == {"diff", "ties", "tie_half", "ties_sweep"}
    assert rep["run_config"]["benchmark"] == BENCH
    assert (out / "traces.html").exists()
    acc = event_accumulator.EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert f"eval/{BENCH}/OA/diff/accuracy" in acc.Tags()["tensors"]


def test_subset_is_stratified_and_seeded(pred_file, tmp_path):
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    args = ["--benchmark", BENCH, "--predictions", pred_file, "--subset", "5", "--seed", "3",
            "--quiet"]
    assert main(args + ["--out", str(out1)]) == 0
    assert main(args + ["--out", str(out2)]) == 0
    ids1 = (out1 / "subset_ids.txt").read_text().split()
    assert ids1 == (out2 / "subset_ids.txt").read_text().split() and len(ids1) == 5
    # OA strata over the 10 rows: "1": 4 rows, "2": 4, "0": 2 -> quotas 2, 2, 1
    oa = {r["id"]: r["label"]["OA"] for r in _fixture_rows()}
    assert sorted(oa[i] for i in ids1) == [0, 1, 1, 2, 2]
    rep = json.loads((out1 / "metrics.json").read_text())
    assert rep["counts"]["skipped"]["not_in_subset"] == 5
    assert rep["counts"]["rows"] == 10 and rep["run_config"]["subset"] == 5


def _err_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_inputs_give_one_line_and_nonzero_exit(pred_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["--benchmark", BENCH, "--predictions", str(tmp_path / "nope.jsonl"),
                 "--out", out]) == 2
    assert "nope.jsonl: no such predictions file" in _err_line(capsys)

    lines = open(pred_file).read().splitlines()
    bad = _write_rows(tmp_path / "bad.jsonl", [], tail="\n".join(
        [lines[0], '{"id": "x", "benchmark": ', lines[1]]) + "\n")
    assert main(["--benchmark", BENCH, "--predictions", bad, "--out", out]) == 2
    assert "bad.jsonl:2: not valid JSON" in _err_line(capsys)

    assert main(["--benchmark", "mjbench_video", "--predictions", pred_file, "--out", out]) == 2
    assert "expected 'mjbench_video'" in _err_line(capsys)

    assert main(["--benchmark", BENCH, "--predictions", pred_file]) == 2
    assert "--out" in _err_line(capsys)

    assert main(["--benchmark", "imagenet", "--predictions", pred_file, "--out", out]) == 2
    assert "invalid choice" in _err_line(capsys)

    assert main(["--benchmark", BENCH, "--predictions", pred_file, "--out", out,
                 "--length-buckets", "8,4"]) == 2
    assert "ascending" in _err_line(capsys)

    assert main(["--benchmark", BENCH, "--predictions", pred_file, "--out", out,
                 "--subset", "-1"]) == 2
    assert "--subset must be >= 0" in _err_line(capsys)


def test_checkpoint_that_is_not_an_export_is_rejected_clearly(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert main(["--benchmark", "video_pairs", "--checkpoint", str(ckpt), "--data-dir",
                 str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a reward-model export (no reward_model.json)" in _err_line(capsys)
    assert main(["--benchmark", "video_pairs", "--checkpoint", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in _err_line(capsys)


def test_truncated_last_line_is_a_warning(tmp_path, capsys):
    rows = _fixture_rows()
    path = _write_rows(tmp_path / "p.jsonl", rows[:-1], tail=json.dumps(rows[-1])[:30])
    out = tmp_path / "out"
    assert main(["--benchmark", BENCH, "--predictions", path, "--out", str(out), "--quiet"]) == 0
    assert "last line is truncated" in _err_line(capsys)
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["counts"]["skipped"]["truncated_line"] == 1 and rep["counts"]["rows"] == 9


def test_empty_file_gives_null_accuracies(tmp_path, capsys):
    path = _write_rows(tmp_path / "p.jsonl", [])
    out = tmp_path / "out"
    assert main(["--benchmark", BENCH, "--predictions", path, "--out", str(out)]) == 0
    assert "(no labelled rows)" in capsys.readouterr().out
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["headline"]["accuracy"] is None and rep["headline"]["n"] == 0


def test_tensorboard_scalars_and_hparams_round_trip(tmp_path):
    rows = _fixture_rows()
    rows[0]["scores"] = {"OA": [1.0, 0.0]}
    rep = report.build_report(metrics.evaluate_rows(rows), benchmark=BENCH, source="x")
    cfg = {"benchmark": BENCH, "subset": 5, "lr": 1e-5, "nested": {"edges": [0, 4]}}
    logdir = tb.log_eval(str(tmp_path / "tb"), rep, cfg, step=7)
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    ev = acc.Tensors(f"eval/{BENCH}/OA/ties/accuracy")[0]
    assert ev.step == 7
    assert float(ev.tensor_proto.float_val[0]) == pytest.approx(4 / 9)
    assert f"eval/{BENCH}/OA/ties_sweep/threshold" in tags
    assert f"eval/{BENCH}/by_length/[1,4)s/OA/diff/accuracy" not in tags  # default edges
    assert f"eval/{BENCH}/by_length/[0,4)s/OA/diff/accuracy" in tags
    assert float(acc.Tensors(f"eval/{BENCH}/counts/failed")[0].tensor_proto.float_val[0]) == 1
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    hp = data.session_start_info.hparams
    assert hp["benchmark"].string_value == BENCH and hp["subset"].number_value == 5
    assert hp["nested.edges"].string_value == "[0, 4]"


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_html_report_embeds_frames_and_escapes_text(tmp_path):
    row = P.make_row(
        "ex<1>", BENCH, pred={"OA": 1}, label={"OA": 2}, prompt="a cat & a <dog>",
        trace=["<think>look</think><script>alert(1)</script>", "<final answer>OA: 1"],
        frames_selected=[[3, 9], []], meta={"initial_frames": [1]},
    )
    asked = []

    def loader(r, frames):
        asked.append(list(frames))
        return [np.full((8, 12, 3), f, np.uint8) for f in frames]

    path = html_report.write_html_report([row], str(tmp_path / "r.html"), frame_loader=loader)
    text = open(path, encoding="utf-8").read()
    assert asked == [[1], [3, 9]]
    assert text.startswith("<!DOCTYPE html>")
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "ex&lt;1&gt;" in text and "a cat &amp; a &lt;dog&gt;" in text
    chk = _Checker()
    chk.feed(text)
    assert chk.errors == [] and chk.stack == []
    assert [i["alt"] for i in chk.imgs] == ["Frame 1", "Frame 3", "Frame 9"]
    prefix = "data:image/png;base64,"
    img = Image.open(io.BytesIO(base64.b64decode(chk.imgs[2]["src"][len(prefix):])))
    assert img.size == (12, 8) and np.asarray(img)[0, 0, 0] == 9
    assert 'class="bad"' in text  # OA 1 vs label 2 is marked wrong
    # without a loader, frames are listed by number only; report re-exports the writer
    p2 = report.write_html_report([row], str(tmp_path / "r2.html"))
    assert "<img" not in open(p2).read() and "Frame 9" in open(p2).read()
    assert os.path.getsize(p2) < os.path.getsize(path)


def test_summary_writer_scalars_text_images(tmp_path):
    img = np.zeros((6, 10, 3), np.uint8)
    img[:, :, 1] = 200
    with tb.SummaryWriter(str(tmp_path)) as w:
        w.scalar("train/loss", 1.5, 3)
        w.text("train/trace", "<think>hi</think>", 3)
        w.image("train/frame", img, 3)
        w.hparams({"lr": 0.5, "model": {"size": "tiny"}}, {"final/acc": 0.25})
        with pytest.raises(ValueError, match="uint8"):
            w.image("bad", img.astype(np.float32), 0)
    acc = event_accumulator.EventAccumulator(
        str(tmp_path), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    assert float(acc.Tensors("train/loss")[0].tensor_proto.float_val[0]) == 1.5
    assert acc.Tensors("train/loss")[0].step == 3
    assert acc.Tensors("train/trace")[0].tensor_proto.string_val[0] == b"<think>hi</think>"
    im = acc.Images("train/frame")[0]
    assert (im.width, im.height, im.step) == (10, 6, 3)
    assert np.asarray(Image.open(io.BytesIO(im.encoded_image_string)))[0, 0, 1] == 200
    assert float(acc.Tensors("final/acc")[0].tensor_proto.float_val[0]) == 0.25
    data = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert data.session_start_info.hparams["model.size"].string_value == "tiny"


def test_checkpoint_path_end_to_end_with_a_fake_engine(tmp_path, monkeypatch, capsys):
    """Everything of --checkpoint except loading a real model: the video_pairs builder reads the
    manifest, a missing and a corrupt video become counted failures, a re-run resumes."""
    import vrthinker_jax.eval.__main__ as cli

    data = tmp_path / "release"
    data.mkdir()
    lines = []
    for i in range(6):
        for side in "ab":
            name = f"{side}{i}.mp4"
            if i == 5:
                continue  # pair 5: missing files
            (data / name).write_bytes(b"corrupt" if (i == 4 and side == "b") else b"ok")
        lines.append(json.dumps({"id": f"p{i}", "prompt": f"prompt {i}", "video_a": f"a{i}.mp4",
                                 "video_b": f"b{i}.mp4", "TA": -1, "MQ": -1, "VQ": -1,
                                 "OA": 1 + i % 2, "meta": {"duration_s": float(i)}}))
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")

    calls = []

    class Traj:
        assistant_turns = ["<think>x</think><tool_call>...</tool_call>", "<final answer>"]
        tool_frames = [[2]]
        judgments = {"TA": 1, "MQ": 1, "VQ": 1, "OA": 1}
        stop = "answer"

    def rollout(prompts, banks, step):
        calls.append(list(prompts))
        return [Traj() for _ in prompts]

    def load_bank(ex):
        for key in ("video_a", "video_b"):
            if open(ex[key], "rb").read() == b"corrupt":
                raise ValueError(f"{ex[key]}: cannot decode video")
        return np.full((4, 4, 4, 3), 7, np.uint8)

    monkeypatch.setattr(cli, "load_engine", lambda args: (rollout, load_bank, 2, [1, 3], {}))
    monkeypatch.setattr(cli, "model_identity", lambda path: "sha256:fake")
    out = tmp_path / "out"
    argv = ["--benchmark", "video_pairs", "--checkpoint", str(tmp_path), "--data-dir",
            str(data), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    # p5 (missing files) never reaches the engine; p4's corrupt video fails in load_bank; every
    # engine call is a full static batch of 2 (padded with a copy where a pair failed)
    assert all(len(c) == 2 for c in calls)
    assert {p for c in calls for p in c} == {f"prompt {i}" for i in range(4)}
    rep = json.loads((out / "metrics.json").read_text())
    c = rep["counts"]
    assert c["scored"] == 4 and c["failed"] == 2
    assert any(r.startswith("missing video files: ") for r in c["failed_reasons"])
    assert any(r.endswith("b4.mp4: cannot decode video") for r in c["failed_reasons"])
    # OA labels p0 1, p1 2, p2 1, p3 2; the engine says 1 -> diff 2/4
    assert (rep["by_dimension"]["OA"]["diff"]["correct"], rep["by_dimension"]["OA"]["diff"]["n"]) \
        == (2.0, 4)
    html = (out / "traces.html").read_text()
    assert html.count("<img") == 4 * 3  # 4 answered pairs x (2 initial + 1 chosen frame)
    # a re-run resumes: nothing is predicted again, the numbers are the same
    calls.clear()
    assert main(argv) == 0 and calls == []
    rep2 = json.loads((out / "metrics.json").read_text())
    assert rep2["by_dimension"] == rep["by_dimension"] and rep2["counts"]["run"]["resumed"] == 6
    assert len(P.read_predictions(str(out / "predictions.jsonl")).rows) == 6
    # --subset 2 over OA strata (1: p0 p2 p4, 2: p1 p3 p5) -> one of each
    out3 = tmp_path / "out3"
    assert main(argv[:-3] + ["--out", str(out3), "--subset", "2", "--quiet"]) == 0
    ids = (out3 / "subset_ids.txt").read_text().split()
    assert len(ids) == 2 and sorted(int(i[1]) % 2 for i in ids) == [0, 1]


# --------------------------------------------------------------------------- what made a run


def _release(directory, labels_oa=(1, 2, 1, 2), corrupt=(), fmt="jsonl"):
    """A video_pairs release of len(labels_oa) pairs; pairs in `corrupt` have a bad video b."""
    os.makedirs(directory, exist_ok=True)
    rows = []
    for i, y in enumerate(labels_oa):
        for side in "ab":
            bad = side == "b" and i in corrupt
            with open(os.path.join(directory, f"{side}{i}.mp4"), "wb") as f:
                f.write(b"corrupt" if bad else b"ok")
        rows.append({"id": f"p{i}", "prompt": f"prompt {i}", "video_a": f"a{i}.mp4",
                     "video_b": f"b{i}.mp4", "TA": -1, "MQ": -1, "VQ": -1, "OA": y})
    if fmt == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        cols = list(rows[0])
        text = ",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n"
                                                for r in rows)
    with open(os.path.join(directory, f"test.{fmt}"), "w") as f:
        f.write(text)
    return str(directory)


@pytest.fixture()
def fake_model(monkeypatch):
    """The eval CLI with a fake engine: a model's id is its --checkpoint's base name, every
    answer is OA 1; `state["interrupt_at"] = k` raises KeyboardInterrupt at the k-th batch."""
    import vrthinker_jax.eval.__main__ as cli

    state = {"calls": 0, "interrupt_at": None}

    class Traj:
        assistant_turns = ["<final answer>OA: 1</final answer>"]
        tool_frames: list = []
        judgments = {"TA": 1, "MQ": 1, "VQ": 1, "OA": 1}
        stop = "answer"

    def rollout(prompts, banks, step):
        state["calls"] += 1
        if state["calls"] == state["interrupt_at"]:
            raise KeyboardInterrupt
        return [Traj() for _ in prompts]

    def load_bank(ex):
        for key in ("video_a", "video_b"):
            if open(ex[key], "rb").read() == b"corrupt":
                raise ValueError(f"{ex[key]}: cannot decode video")
        return np.zeros((4, 4, 4, 3), np.uint8)

    monkeypatch.setattr(cli, "load_engine", lambda args: (rollout, load_bank, 2, [1], {}))
    monkeypatch.setattr(cli, "model_identity",
                        lambda path: "sha256:" + os.path.basename(os.path.abspath(path)))
    return state


def _model_eval(ckpt, data, out, *extra):
    return main(["--benchmark", "video_pairs", "--checkpoint", str(ckpt), "--data-dir",
                 str(data), "--out", str(out), "--quiet", *extra])


def _rows(out):
    return P.read_predictions(str(out / "predictions.jsonl")).rows


def _labels(out):
    return {r["id"]: r["label"]["OA"] for r in _rows(out)}


def test_a_changed_data_dir_is_built_afresh_and_retry_uses_its_paths(fake_model, tmp_path):
    """Issue 19, repro 1: the TFDS build is keyed by the release directory and its content."""
    (tmp_path / "A").mkdir()
    d1 = _release(tmp_path / "d1")
    out = tmp_path / "out"
    assert _model_eval(tmp_path / "A", d1, out) == 0
    assert _labels(out) == {"p0": 1, "p1": 2, "p2": 1, "p3": 2}
    os.remove(out / "predictions.jsonl")
    d2 = _release(tmp_path / "d2", labels_oa=(2, 2, 1, 2))  # p0's label changed
    assert _model_eval(tmp_path / "A", d2, out) == 0
    rows = _rows(out)
    assert _labels(out) == {"p0": 2, "p1": 2, "p2": 1, "p3": 2}
    assert all(r["meta"]["row"].startswith(os.path.join(d2, "test.jsonl")) for r in rows)
    # a broken video, fixed in a copy of the release: --retry-failed reads the copy's files
    out2 = tmp_path / "out2"
    d3 = _release(tmp_path / "d3", corrupt=(1,))
    assert _model_eval(tmp_path / "A", d3, out2) == 0
    assert [r["id"] for r in _rows(out2) if r["error"]] == ["p1"]
    d4 = _release(tmp_path / "d4")
    assert _model_eval(tmp_path / "A", d4, out2, "--retry-failed") == 0
    last = {r["id"]: r for r in _rows(out2)}["p1"]  # the retried row (the last one wins)
    assert last["error"] is None and last["meta"]["row"].startswith(d4)
    manifest = json.loads((out2 / P.MANIFEST_FILE).read_text())
    assert manifest["data"]["dir"] == d4


def test_a_resume_with_another_model_or_setting_refuses(fake_model, tmp_path, capsys):
    """Issue 19, repro 2: Ctrl-C, then the same --out with model B and --temperature 0.7."""
    for name in "AB":
        (tmp_path / name).mkdir()
    data = _release(tmp_path / "d", labels_oa=(1, 2, 1, 2, 1, 2))
    out = tmp_path / "out"
    fake_model["interrupt_at"] = 2
    assert _model_eval(tmp_path / "A", data, out) == 130
    line = _err_line(capsys)
    assert line == (f"eval: stopped, 2 rows written to {out / 'predictions.jsonl'} (2 by this "
                    "run); re-run the same command to resume")
    rows = _rows(out)
    assert [r["meta"]["run"] for r in rows] == [{"model_id": "sha256:A", "temperature": 0.0,
                                                 "tools_enabled": True,
                                                 "sampling_seed": None}] * 2
    assert _model_eval(tmp_path / "B", data, out, "--temperature", "0.7") == 2
    line = _err_line(capsys)
    assert line.startswith(f"eval: error: --out {out} holds predictions of another run: model "
                           f"(--checkpoint content): the rows were made with {tmp_path / 'A'} "
                           "(sha256:A), this run has ")
    assert "--temperature: the rows were made with 0.0, this run has 0.7" in line
    assert "--seed (sampling): the rows were made with None, this run has 0" in line
    assert line.endswith("pass --overwrite to start over or choose another --out")
    assert len(_rows(out)) == 2  # nothing was added
    changed = _release(tmp_path / "d2", labels_oa=(2, 2, 1, 2, 1, 2))
    assert _model_eval(tmp_path / "A", changed, out) == 2
    assert "data (the release's annotation files): the rows were made with " in _err_line(capsys)
    # the same model, data and settings resume; --overwrite starts over with B
    fake_model["interrupt_at"] = None
    assert _model_eval(tmp_path / "A", data, out) == 0
    assert sorted(r["id"] for r in _rows(out)) == [f"p{i}" for i in range(6)]
    assert _model_eval(tmp_path / "B", data, out, "--temperature", "0.7", "--overwrite") == 0
    rows = _rows(out)
    assert len(rows) == 6 and {r["meta"]["run"]["model_id"] for r in rows} == {"sha256:B"}
    assert {r["meta"]["run"]["temperature"] for r in rows} == {0.7}
    rc = json.loads((out / "metrics.json").read_text())["run_config"]
    assert rc["model_id"] == "sha256:B" and rc["data_dir"] == data
    # predictions without a manifest (an older version, a copied file) are not resumed blindly
    os.remove(out / P.MANIFEST_FILE)
    assert _model_eval(tmp_path / "B", data, out, "--temperature", "0.7") == 2
    assert "predictions.jsonl has no run_manifest.json" in _err_line(capsys)


def test_data_dir_problems_are_one_line(fake_model, tmp_path, capsys):
    (tmp_path / "A").mkdir()
    (tmp_path / "empty").mkdir()
    assert _model_eval(tmp_path / "A", tmp_path / "empty", tmp_path / "o") == 2
    assert _err_line(capsys) == (f"eval: error: --data-dir {tmp_path / 'empty'}: the directory "
                                 "is empty (expected the video_pairs release: its annotation "
                                 "files and videos)")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("no annotations here")
    assert _model_eval(tmp_path / "A", tmp_path / "notes", tmp_path / "o2") == 2
    assert "video_pairs: no annotation files found in" in _err_line(capsys)
    data = _release(tmp_path / "csv", fmt="csv")
    csv_path = os.path.join(data, "test.csv")
    lines = open(csv_path, "rb").read().split(b"\n")
    lines[2] = lines[2].replace(b"prompt 1", b"caf\xe9 prompt")  # latin-1, not UTF-8
    open(csv_path, "wb").write(b"\n".join(lines))
    assert _model_eval(tmp_path / "A", data, tmp_path / "o3") == 2
    assert _err_line(capsys).endswith(f"{csv_path}:3: not UTF-8 text (byte 0xe9); save the "
                                      "file as UTF-8")
