"""`python -m vrthinker_jax.score` in-process: a tiny random reward-model export, synthetic mp4s,
the printed judgment and trace, --json / --html outputs, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_eval_checkpoint import make_export, write_corrupt, write_videos

from vrthinker_jax.eval import predictions as preds_lib
from vrthinker_jax.score import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("score"))
    a, b = write_videos(os.path.join(d, "videos"), 2, seed=3)
    bad = write_corrupt(os.path.join(d, "videos", "bad.mp4"))
    return dict(export=make_export(d), a=a, b=b, bad=bad, dir=d)


def _one_error_line(capsys) -> str:
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert "Traceback" not in cap.err and lines[0].startswith("score: error: ")
    return lines[0]


def test_score_prints_judgment_and_writes_reports(files, tmp_path, capsys):
    out_json, out_html = str(tmp_path / "r.json"), str(tmp_path / "r.html")
    rc = main(["--checkpoint", files["export"], "--prompt", "a red fox runs <b>fast</b>",
               "--video-a", files["a"], "--video-b", files["b"], "--json", out_json,
               "--html", out_html])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    row = json.load(open(out_json))
    # printed: one line per key with the same judgment as the JSON row, then the trace
    names = {1: "video A", 2: "video B", 0: "tie", -1: "no answer"}
    for k in ("TA", "MQ", "VQ", "OA"):
        line = next(ln for ln in cap.out.splitlines() if ln.strip().startswith(k + " "))
        assert line.rstrip().endswith(names[row["pred"][k]])
    assert f"Trace ({row['turns']} turns" in cap.out
    assert "[assistant turn 1]" in cap.out
    assert "[frames shown first] frames 3 (A:3), 7 (A:7), 11 (B:3), 15 (B:7)" in cap.out
    # the row is in the eval predictions format (rescorable) and records where it came from
    assert set(row) >= {"id", "pred", "label", "trace", "turns", "frames_selected", "error"}
    assert preds_lib.make_row(row["id"], row["benchmark"], **{
        k: row[k] for k in ("pred", "label", "trace", "frames_selected", "meta", "prompt")}) == row
    assert 1 <= row["turns"] <= 2 and row["error"] is None
    assert row["meta"]["video_a"] == os.path.abspath(files["a"])
    assert row["meta"]["initial_frames"] == [3, 7, 11, 15]
    from vrthinker_jax.checkpoints import export

    assert row["meta"]["run"] == {"model_id": export.content_hash(files["export"]),
                                  "temperature": 0.0, "tools_enabled": True,
                                  "sampling_seed": None}
    html = open(out_html, encoding="utf-8").read()
    n_frames = 4 + sum(len(f) for f in row["frames_selected"])
    assert html.count("data:image/png;base64,") == n_frames  # every frame the model saw
    assert "&lt;b&gt;fast&lt;/b&gt;" in html and "<b>fast</b>" not in html


def test_bad_video_is_one_error_line(files, capsys):
    base = ["--checkpoint", files["export"], "--prompt", "p"]
    assert main(base + ["--video-a", files["a"], "--video-b", files["bad"]]) == 2
    line = _one_error_line(capsys)
    assert "bad.mp4" in line
    missing = os.path.join(files["dir"], "nope.mp4")
    assert main(base + ["--video-a", missing, "--video-b", files["b"]]) == 2
    assert f"--video-a {missing}: no such file" in _one_error_line(capsys)


def test_not_an_export_and_usage_errors(files, tmp_path, capsys):
    args = ["--prompt", "p", "--video-a", files["a"], "--video-b", files["b"]]
    assert main(["--checkpoint", str(tmp_path)] + args) == 2
    assert "not a reward-model export" in _one_error_line(capsys)
    assert main(args) == 2
    assert "--checkpoint" in _one_error_line(capsys)


def test_module_entry_point_bad_video_exit_status(files):
    """The real `python -m` process: status 2 and a single stderr line, no traceback."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    p = subprocess.run(
        [sys.executable, "-m", "vrthinker_jax.score", "--checkpoint", files["export"],
         "--prompt", "p", "--video-a", files["bad"], "--video-b", files["b"]],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "bad.mp4" in p.stderr, p.stderr


def test_a_prompt_longer_than_the_export_allows_is_one_line(files, capsys):
    assert main(["--checkpoint", files["export"], "--prompt", "a" * 20000, "--video-a",
                 files["a"], "--video-b", files["b"]]) == 2
    line = _one_error_line(capsys)
    assert "--prompt: 20000 characters make a prompt of " in line
    assert "more than the largest prompt bucket of the export (192 tokens)" in line
    assert f"sampling.prompt_buckets (and sampling.max_len) in {files['export']}" in line


def test_module_entry_point_non_utf8_prompt(files):
    """Bytes that are not UTF-8 on the command line (a latin-1 terminal): one line, status 2."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    argv = [sys.executable, "-m", "vrthinker_jax.score", "--checkpoint", files["export"],
            "--prompt", b"caf\xe9 au lait", "--video-a", files["a"], "--video-b", files["b"]]
    p = subprocess.run([os.fsencode(a) for a in argv], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr == ("score: error: --prompt: not valid UTF-8 text (byte 0xe9 at character "
                        "3); pass the prompt as UTF-8\n")
