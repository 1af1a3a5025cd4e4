"""TFDS builders on small fixture files in each release's layout (made here), built and read back
as array_record without TensorFlow."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest
import tensorflow_datasets as tfds

from data_pipelines import schema
from data_pipelines import tfds_builders as tb
from data_pipelines.tfds_builders import common, genai_bench_video
from vrthinker_jax.rollout import protocol

tfds.disable_progress_bar()


def _touch(path: str, content: bytes = b"\x00fake-mp4") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)


def _records(name, split, data_dir, config=None) -> dict[str, dict]:
    src = tb.data_source(name, split, data_dir=data_dir, config=config)
    recs = [schema.decode(src[i]) for i in range(len(src))]
    return {r["id"]: r for r in recs}


# --------------------------------------------------------------------------- label rules


def test_label_rules():
    assert [schema.videogen_label(x) for x in ("A", "b", " same ", "", None)] == [1, 2, 0, -1, -1]
    with pytest.raises(schema.LabelError, match="'C'"):
        schema.videogen_label("C")
    votes = ("leftvote", "rightvote", "tievote", "bothbad_vote")
    assert [schema.genai_bench_label(v) for v in votes] == [1, 2, 0, 0]
    assert schema.genai_bench_label("bothbad_vote", bothbad="exclude") == -1
    with pytest.raises(schema.LabelError, match="upvote"):
        schema.genai_bench_label("upvote")
    mj = ("Video 1 better", "video 2  Better", "SAME", " Hard to judge", "Video1 better")
    assert [schema.mjbench_label(x) for x in mj] == [1, 2, 0, -1, 1]
    with pytest.raises(schema.LabelError, match="Video 3"):
        schema.mjbench_label("Video 3 better")
    assert schema.manifest_label("2") == 2 and schema.manifest_label(None) == -1
    with pytest.raises(schema.LabelError):
        schema.manifest_label(5)


def test_make_example_rejects_bad_label():
    with pytest.raises(schema.LabelError, match="OA=7"):
        schema.make_example(id="x", prompt="p", video_a="a", video_b="b", labels={"OA": 7},
                            source="s")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds every dataset once from fixture releases; returns {name: (manual, data_dir)}."""
    root = tmp_path_factory.mktemp("tfds")
    data_dir = str(root / "data")
    out = {}

    # VideoGen-RewardBench: CSV (with pandas' unnamed index column) + videos/
    vg = str(root / "videogen")
    for name in ("m1/a.mp4", "m2/b.mp4", "m1/c.mp4"):
        _touch(os.path.join(vg, "videos", name))
    with open(os.path.join(vg, "videogen-rewardbench.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "path_A", "path_B", "A_model", "B_model", "prompt", "VQ", "MQ", "TA",
                    "Overall", "fps_A", "num_frames_A", "fps_B", "num_frames_B"])
        w.writerow([0, "videos/m1/a.mp4", "videos/m2/b.mp4", "m1", "m2", "a cat, jumping", "A",
                    "B", "same", "A", 8, 16, 24, 48])
        w.writerow([1, "videos/m1/c.mp4", "videos/m2/gone.mp4", "m1", "m2", "a dog", "B", "B",
                    "B", "same", 8, 16, 24, 48])
    tb.build("videogen_rewardbench", manual_dir=vg, data_dir=data_dir)
    out["videogen_rewardbench"] = vg

    # GenAI-Bench: test_v1 as JSONL, test as a Hugging Face parquet shard; videos by URL
    gb = str(root / "genai")
    url = "https://huggingface.co/datasets/TIGER-Lab/GenAI-Bench/resolve/main/videos/"
    for name in ("l1.mp4", "r1.mp4", "l2.mp4", "r2.mp4"):
        _touch(os.path.join(gb, "videos", name))
    rows = [
        {"prompt": "p1", "left_model": "A", "left_video": url + "l1.mp4", "right_model": "B",
         "right_video": url + "r1.mp4", "vote_type": "leftvote"},
        {"prompt": "p2", "left_model": "A", "left_video": url + "l2.mp4", "right_model": "C",
         "right_video": url + "r2.mp4", "vote_type": "bothbad_vote"},
        {"prompt": "p3", "left_model": "C", "left_video": url + "l1.mp4", "right_model": "B",
         "right_video": url + "r2.mp4", "vote_type": "tievote"},
    ]
    os.makedirs(os.path.join(gb, "video_generation"))
    with open(os.path.join(gb, "video_generation", "test_v1.jsonl"), "w") as f:
        for r in rows[:2]:
            f.write(json.dumps(r) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[1:]),
                   os.path.join(gb, "video_generation", "test-00000-of-00001.parquet"))
    tb.build("genai_bench_video", manual_dir=gb, data_dir=data_dir)
    tb.build("genai_bench_video", manual_dir=gb, data_dir=data_dir,
             config="paths_bothbad_excluded")
    out["genai_bench_video"] = gb

    # MJ-Bench-Video: test.json (a list) and train.json (JSONL content)
    mj = str(root / "mjbench")
    for name in ("v0.mp4", "v1.mp4"):
        _touch(os.path.join(mj, "videos", name))
    test_rows = [
        {"caption": "c1", "video_0_path": "videos/v0.mp4", "video_1_path": "videos/v1.mp4",
         "category": "Alignment", "category_preference": "video 2 Better",
         "overall_preference": "Video 1 better "},
        {"caption": "c2", "video_0_path": "videos/v1.mp4", "video_1_path": "videos/v0.mp4",
         "category": "safety", "category_preference": "Same",
         "overall_preference": "HARD TO JUDGE"},
    ]
    with open(os.path.join(mj, "test.json"), "w") as f:
        json.dump(test_rows, f)
    with open(os.path.join(mj, "train.json"), "w") as f:
        f.write(json.dumps({**test_rows[0], "overall_preference": "same"}) + "\n")
        f.write(json.dumps({**test_rows[0], "category": "Fineness"}) + "\n")
    tb.build("mjbench_video", manual_dir=mj, data_dir=data_dir)
    out["mjbench_video"] = mj

    # video_pairs: JSONL manifest (relative paths, meta) + CSV test split, embedded too
    vp = str(root / "pairs")
    _touch(os.path.join(vp, "clips", "x.mp4"), b"video-x")
    _touch(os.path.join(vp, "clips", "y.mp4"), b"video-y")
    with open(os.path.join(vp, "train.jsonl"), "w") as f:
        f.write(json.dumps({"id": "p0", "prompt": "ball", "video_a": "clips/x.mp4",
                            "video_b": "clips/y.mp4", "TA": 1, "MQ": 0, "VQ": 2, "OA": 1,
                            "meta": {"defect": "blur"}}) + "\n")
    with open(os.path.join(vp, "test.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "video_a", "video_b", "TA", "MQ", "VQ", "OA"])
        w.writerow(["q0", "cube", "clips/y.mp4", os.path.join(vp, "clips", "x.mp4"), 2, 2, 0, ""])
    tb.build("video_pairs", manual_dir=vp, data_dir=data_dir)
    tb.build("video_pairs", manual_dir=vp, data_dir=data_dir, config="embedded")
    out["video_pairs"] = vp

    # vrthinker_cot: one valid trace
    cot = str(root / "cot")
    _touch(os.path.join(cot, "a.mp4"))
    _touch(os.path.join(cot, "b.mp4"))
    with open(os.path.join(cot, "traces.jsonl"), "w") as f:
        f.write(json.dumps(_trace("t0")) + "\n")
    tb.build("vrthinker_cot", manual_dir=cot, data_dir=data_dir)
    out["vrthinker_cot"] = cot
    return data_dir, out


def _trace(tid: str, frames=(3, 12), recorded=None) -> dict:
    labels = {"TA": 1, "MQ": 2, "VQ": 0, "OA": 1}
    return {
        "id": tid, "prompt": "a red ball", "video_a": "a.mp4", "video_b": "b.mp4",
        "labels": labels, "num_candidates": 8,
        "turns": [
            {"role": "assistant",
             "content": protocol.format_tool_turn("s", "t", labels, list(frames))},
            {"role": "tool", "frames": list(recorded if recorded is not None else frames)},
            {"role": "assistant", "content": protocol.format_final_turn("s", "t", labels)},
        ],
    }


# --------------------------------------------------------------------------- builders


def test_no_tensorflow_needed(built):
    assert "tensorflow" not in sys.modules
    data_dir, _ = built
    assert any(f.endswith(".array_record-00000-of-00001") for f in
               os.listdir(os.path.join(data_dir, "videogen_rewardbench", "paths", "1.0.0")))


def test_videogen_rewardbench(built):
    data_dir, manual = built
    recs = _records("videogen_rewardbench", "test", data_dir)
    r0, r1 = recs["videogen_rewardbench-test-0"], recs["videogen_rewardbench-test-1"]
    assert r0["labels"] == {"TA": 0, "MQ": 2, "VQ": 1, "OA": 1}
    assert r0["prompt"] == "a cat, jumping" and r0["source"] == "videogen_rewardbench"
    assert r0["video_a"] == os.path.join(manual["videogen_rewardbench"], "videos/m1/a.mp4")
    assert r0["meta"]["models"] == ["m1", "m2"] and r0["meta"]["fps"] == [8.0, 24.0]
    assert r0["meta"]["duration"] == [2.0, 2.0]
    assert r0["meta"]["original_labels"]["Overall"] == "A"
    assert r0["meta"]["row"].endswith("videogen-rewardbench.csv:2")
    # the missing video is kept, flagged, and counted in the dataset's metadata
    assert r1["labels"]["OA"] == 0 and r1["meta"]["missing_videos"] == ["videos/m2/gone.mp4"]
    report = tb.missing_report(tb.builder("videogen_rewardbench", data_dir=data_dir))
    assert report["test"]["missing_examples"] == 1
    assert report["test"]["first_missing"] == ["videos/m2/gone.mp4"]


def test_genai_bench_video(built):
    data_dir, manual = built
    v1 = _records("genai_bench_video", "test_v1", data_dir)
    test = _records("genai_bench_video", "test", data_dir)
    assert len(v1) == 2 and len(test) == 2
    by_prompt = {r["prompt"]: r for r in [*v1.values(), *test.values()]}
    assert by_prompt["p1"]["labels"] == {"TA": -1, "MQ": -1, "VQ": -1, "OA": 1}
    assert by_prompt["p1"]["video_a"] == os.path.join(manual["genai_bench_video"],
                                                      "videos", "l1.mp4")
    assert by_prompt["p2"]["labels"]["OA"] == 0  # bothbad -> tie by default
    assert by_prompt["p3"]["labels"]["OA"] == 0 and by_prompt["p3"]["meta"]["models"] == ["C", "B"]
    excl = _records("genai_bench_video", "test", data_dir, config="paths_bothbad_excluded")
    assert sorted(r["labels"]["OA"] for r in excl.values()) == [-1, 0]
    assert tb.missing_report(tb.builder("genai_bench_video", data_dir=data_dir))[
        "test_v1"]["missing_examples"] == 0


def test_genai_custom_config_object(tmp_path, built):
    _, manual = built
    cfg = genai_bench_video.GenaiConfig(name="custom_excl", bothbad="exclude", missing="skip")
    b = tb.build("genai_bench_video", manual_dir=manual["genai_bench_video"],
                 data_dir=str(tmp_path), config=cfg)
    assert b.info.splits["test"].num_examples == 2


def test_mjbench_video(built):
    data_dir, _ = built
    test = list(_records("mjbench_video", "test", data_dir).values())
    by_caption = {r["prompt"]: r for r in test}
    assert by_caption["c1"]["labels"] == {"TA": 2, "MQ": -1, "VQ": -1, "OA": 1}
    # hard to judge -> excluded (-1); safety has no VR-Thinker dimension
    assert by_caption["c2"]["labels"] == {"TA": -1, "MQ": -1, "VQ": -1, "OA": -1}
    assert by_caption["c2"]["meta"]["original_labels"]["overall_preference"] == "HARD TO JUDGE"
    train = sorted(_records("mjbench_video", "train", data_dir).values(), key=lambda r: r["id"])
    assert [r["labels"]["OA"] for r in train] == [0, 1]
    assert train[1]["labels"]["VQ"] == 2  # Fineness -> VQ


def test_video_pairs_and_embedding(built):
    data_dir, manual = built
    train = _records("video_pairs", "train", data_dir)
    assert train["p0"]["labels"] == {"TA": 1, "MQ": 0, "VQ": 2, "OA": 1}
    assert train["p0"]["meta"]["defect"] == "blur"
    assert train["p0"]["video_a"] == os.path.join(manual["video_pairs"], "clips", "x.mp4")
    assert train["p0"]["video_a_bytes"] == b""
    test = _records("video_pairs", "test", data_dir)
    assert test["q0"]["labels"]["OA"] == -1 and test["q0"]["labels"]["TA"] == 2
    emb = _records("video_pairs", "train", data_dir, config="embedded")
    assert emb["p0"]["video_a_bytes"] == b"video-x" and emb["p0"]["video_b_bytes"] == b"video-y"


def test_vrthinker_cot(built):
    data_dir, _ = built
    rec = _records("vrthinker_cot", "train", data_dir)["t0"]
    assert rec["num_candidates"] == 8 and len(rec["turns"]) == 3
    assert rec["labels"] == {"TA": 1, "MQ": 2, "VQ": 0, "OA": 1}
    pcfg = protocol.ProtocolConfig(num_candidates=8)
    segs = protocol.trace_segments(rec, pcfg)  # a decoded record is a trace again
    assert protocol.frames_in(segs)[-2:] == [3, 12]


# --------------------------------------------------------------------------- bad input


def test_malformed_row_names_file_and_line(tmp_path):
    vg = tmp_path / "vg"
    vg.mkdir()
    (vg / "videogen-rewardbench.csv").write_text(
        "path_A,path_B,A_model,B_model,prompt,VQ,MQ,TA,Overall\n"
        "a.mp4,b.mp4,m,n,p,A,B,A,A\n"
        "a.mp4,b.mp4,m,n,p,A,B,A,maybe\n"
    )
    with pytest.raises(common.RowError, match=r"videogen-rewardbench.csv:3: field Overall"):
        tb.build("videogen_rewardbench", manual_dir=str(vg), data_dir=str(tmp_path / "d"))
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "train.jsonl").write_text('{"id": "a", "prompt": "p", "video_a": "x", '
                                       '"video_b": "y"}\n{not json\n')
    with pytest.raises(common.RowError, match=r"train.jsonl:2: not valid JSON"):
        tb.build("video_pairs", manual_dir=str(pairs), data_dir=str(tmp_path / "d"))


def test_invalid_trace_error_and_skip(tmp_path):
    cot = tmp_path / "cot"
    cot.mkdir()
    with open(cot / "train.jsonl", "w") as f:
        f.write(json.dumps(_trace("good")) + "\n")
        f.write(json.dumps(_trace("bad", recorded=[3])) + "\n")  # frames disagree with the call
    with pytest.raises(common.RowError, match=r"train.jsonl:2: invalid trace 'bad'"):
        tb.build("vrthinker_cot", manual_dir=str(cot), data_dir=str(tmp_path / "d"))
    from data_pipelines.tfds_builders import vrthinker_cot

    cfg = vrthinker_cot.CotConfig(name="skip_invalid", invalid="skip")
    b = tb.build("vrthinker_cot", manual_dir=str(cot), data_dir=str(tmp_path / "d"), config=cfg)
    assert b.info.splits["train"].num_examples == 1
    assert b.info.metadata["excluded_rows"]["train"] == 1


def test_missing_policy_skip_and_error(tmp_path, built):
    _, manual = built
    from data_pipelines.tfds_builders import common as c

    skip = c.PairConfig(name="skip_missing", missing="skip")
    b = tb.build("videogen_rewardbench", manual_dir=manual["videogen_rewardbench"],
                 data_dir=str(tmp_path), config=skip)
    assert b.info.splits["test"].num_examples == 1
    assert tb.missing_report(b)["test"]["missing_examples"] == 1
    err = c.PairConfig(name="error_missing", missing="error")
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        tb.build("videogen_rewardbench", manual_dir=manual["videogen_rewardbench"],
                 data_dir=str(tmp_path), config=err)


def test_empty_manual_dir_is_a_clear_error(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "README").write_text("nothing here")
    with pytest.raises(ValueError, match="no annotation files"):
        tb.build("mjbench_video", manual_dir=str(d), data_dir=str(tmp_path / "d"))


def test_synthetic_output_builds_pairs_and_traces(tmp_path):
    from data_pipelines import synthetic

    out = str(tmp_path / "needle")
    info = synthetic.generate(out, 5, seed=1)
    data_dir = str(tmp_path / "d")
    pairs = tb.build("video_pairs", manual_dir=out, data_dir=data_dir)
    cot = tb.build("vrthinker_cot", manual_dir=out, data_dir=data_dir)
    for b in (pairs, cot):
        assert b.info.splits["train"].num_examples == info["train"]
        assert b.info.splits["heldout"].num_examples == info["heldout"]
    assert tb.missing_report(pairs)["train"]["missing_examples"] == 0
    rec = next(iter(_records("vrthinker_cot", "train", data_dir).values()))
    assert rec["num_candidates"] == synthetic.default_protocol().num_candidates
    assert os.path.isfile(rec["video_a"]) and rec["turns"][-1]["role"] == "assistant"


def test_video_resolver(tmp_path):
    _touch(str(tmp_path / "dl" / "nested" / "clip.mp4"))
    _touch(str(tmp_path / "videos" / "m1" / "0001.mp4"))
    r = common.VideoResolver([str(tmp_path)])
    want = str(tmp_path / "dl" / "nested" / "clip.mp4")
    assert r.resolve("https://host/datasets/x/resolve/main/videos/clip.mp4") == want
    assert r.resolve("clip.mp4") == want
    assert r.resolve("videos/m1/0001.mp4") == str(tmp_path / "videos" / "m1" / "0001.mp4")
    assert r.resolve(want) == want
    # a path with folders names its place: another model's same-named file is not it
    assert r.resolve("videos/m2/0001.mp4") is None
    assert r.resolve("") is None


def test_non_utf8_annotations_name_file_and_line(tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "train.jsonl").write_bytes(b'{"id": "a", "prompt": "p", "video_a": "x", '
                                        b'"video_b": "y"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(common.RowError, match=r"train.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        tb.build("video_pairs", manual_dir=str(pairs), data_dir=str(tmp_path / "d"))


def test_source_fingerprint_keys_the_build_by_directory_and_content(tmp_path):
    d = tmp_path / "rel"
    d.mkdir()
    (d / "test.jsonl").write_text('{"id": "a"}\n')
    (d / "a.mp4").write_bytes(b"v1")
    fp = tb.source_fingerprint(str(d))
    assert fp["dir"] == str(d) and tb.source_fingerprint(str(d)) == fp
    (d / "a.mp4").write_bytes(b"v2-fixed")  # a fixed video: same annotations, another build
    fixed = tb.source_fingerprint(str(d))
    assert fixed["annotations"] == fp["annotations"] and fixed["files"] != fp["files"]
    assert tb.cache_dir("T", fixed) != tb.cache_dir("T", fp)
    (d / "test.jsonl").write_text('{"id": "b"}\n')  # a changed label / prompt / path
    assert tb.source_fingerprint(str(d))["annotations"] != fp["annotations"]
    import shutil

    copy = tb.source_fingerprint(shutil.copytree(str(d), str(tmp_path / "copy")))
    assert tb.cache_dir("T", copy) != tb.cache_dir("T", tb.source_fingerprint(str(d)))
