"""Synthetic needle pairs: defects exactly where claimed, never in the initial frames; labels,
oracle traces, splits and determinism."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_pipelines import synthetic, video
from vrthinker_jax.rollout import protocol

NUM_PAIRS = 18
SEED = 3
PCFG = synthetic.default_protocol()
# max over 4x4 blocks of the mean |A - B|: every defect kind measured >= 20; the other frames of
# a pair decode bit-identical (every frame a keyframe at a constant quantiser)
VISIBLE = 12.0


def _block_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """uint8 [F, H, W, 3] x2 -> float [F]: largest 4x4-block mean absolute difference."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(-1)
    f, h, w = d.shape
    return d.reshape(f, h // 4, 4, w // 4, 4).mean((2, 4)).max((1, 2))


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("needle"))
    info = synthetic.generate(out, NUM_PAIRS, SEED)
    rows = _read_jsonl(os.path.join(out, "train.jsonl")) + _read_jsonl(
        os.path.join(out, "heldout.jsonl"))
    traces = _read_jsonl(os.path.join(out, "cot_train.jsonl")) + _read_jsonl(
        os.path.join(out, "cot_heldout.jsonl"))
    decoded = {}
    for r in rows:
        decoded[r["id"]] = tuple(
            video.read_frames(os.path.join(out, r[k]), np.arange(r["meta"]["num_frames"]),
                              seek=False)
            for k in ("video_a", "video_b")
        )
    return {"out": out, "info": info, "rows": rows, "traces": {t["id"]: t for t in traces},
            "decoded": decoded}


def test_counts_and_split(data):
    info, rows = data["info"], data["rows"]
    assert info["train"] + info["heldout"] == NUM_PAIRS == len(rows)
    assert info["heldout"] == round(0.2 * NUM_PAIRS)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == NUM_PAIRS
    train = {r["id"] for r in rows if r["meta"]["split"] == "train"}
    held = {r["id"] for r in rows if r["meta"]["split"] == "heldout"}
    assert train.isdisjoint(held) and len(train | held) == NUM_PAIRS
    kinds = {r["meta"]["defect"]["dimension"] for r in rows if r["meta"]["defect"]}
    assert kinds == {"TA", "MQ", "VQ"}
    assert any(r["meta"]["defect"] is None for r in rows)  # some fully tied pairs


def test_videos_decode_with_probe(data):
    r = data["rows"][0]
    info = video.probe(os.path.join(data["out"], r["video_a"]))
    assert (info.num_frames, info.width, info.height) == (32, 64, 64)
    assert info.fps == pytest.approx(8.0)


def test_defect_exactly_in_claimed_frames(data):
    layout = synthetic.make_layout(32, PCFG, 1)
    initial_frames = [int(layout.candidate_frames[c - 1]) for c in layout.initial]
    for r in data["rows"]:
        a, b = data["decoded"][r["id"]]
        visible = set(np.nonzero(_block_diff(a, b) > VISIBLE)[0].tolist())
        d = r["meta"]["defect"]
        claimed = set(d["frames"]) if d else set()
        assert visible == claimed, (r["id"], sorted(visible), sorted(claimed))
        # nothing of the defect leaks into the other frames through the codec
        outside = [t for t in range(len(a)) if t not in claimed]
        np.testing.assert_array_equal(a[outside], b[outside])
        assert not claimed & set(initial_frames)
        if d:
            # strictly between two initial frames, with a clean margin on both sides
            lo, hi = min(claimed), max(claimed)
            assert any(f0 + 1 < lo and hi < f1 - 1
                       for f0, f1 in zip(initial_frames, initial_frames[1:], strict=False))
            assert d["candidates"] and all(
                int(layout.candidate_frames[c - 1]) in claimed for c in d["candidates"])


def test_labels_point_at_the_clean_video(data):
    cfg = synthetic.synthetic_config()
    layout = synthetic.make_layout(cfg.frames, PCFG, cfg.margin_frames)
    for i, r in enumerate(sorted(data["rows"], key=lambda r: r["id"])):
        d = r["meta"]["defect"]
        labels = {k: r[k] for k in protocol.LABEL_KEYS}
        if d is None:
            assert labels == {k: 0 for k in protocol.LABEL_KEYS}
            continue
        clean = 3 - d["video"]
        assert labels[d["dimension"]] == clean and labels["OA"] == clean
        assert all(labels[k] == 0 for k in protocol.DIMENSIONS if k != d["dimension"])
        # the video the labels call clean matches a clean re-render at the defect frames
        pair, _, _ = synthetic.make_pair(i, SEED, cfg, layout)
        assert pair.id == r["id"]
        rendered = synthetic.render(pair.scene, cfg, None, np.random.default_rng(0))
        frames = d["frames"]
        decoded = data["decoded"][r["id"]]
        good, bad = decoded[clean - 1][frames], decoded[d["video"] - 1][frames]
        assert np.abs(good.astype(int) - rendered[frames]).mean() < 3.0
        assert np.all(_block_diff(bad, rendered[frames]) > _block_diff(good, rendered[frames]))
        assert _block_diff(bad, rendered[frames]).min() > VISIBLE


def test_oracle_traces(data):
    layout = synthetic.make_layout(32, PCFG, synthetic.synthetic_config().margin_frames)
    n = PCFG.num_candidates
    for r in data["rows"]:
        trace = data["traces"][r["id"]]
        labels = {k: r[k] for k in protocol.LABEL_KEYS}
        assert trace["labels"] == labels and trace["num_candidates"] == PCFG.num_candidates
        assert (trace["video_a"], trace["video_b"]) == (r["video_a"], r["video_b"])
        segs = protocol.trace_segments(trace, PCFG)  # raises if calls and frames disagree
        assistant = [t["content"] for t in trace["turns"] if t["role"] == "assistant"]
        assert all(protocol.turn_format_ok(t) for t in assistant)
        assert protocol.parse_final_answer(assistant[-1]) == labels
        assert len(assistant) - 1 <= PCFG.max_tool_calls
        # every pair, defect or not: video 1's scanned candidates, then video 2's
        tools = [t["frames"] for t in trace["turns"] if t["role"] == "tool"]
        assert tools == [layout.scan, [n + c for c in layout.scan]], r["id"]
        picked = set(protocol.frames_in(segs)) - set(protocol.initial_frames(PCFG))
        d = r["meta"]["defect"]
        if d:
            assert picked & set(d["global_frames"]), (r["id"], picked, d)
            # the call of the defect's own video shows it
            assert set(tools[d["video"] - 1]) & set(d["global_frames"]), (r["id"], d)


def test_defect_kinds_restrict_the_draw(tmp_path):
    cfg = synthetic.synthetic_config(defect_kinds={"TA": ("colour",), "MQ": ("teleport",),
                                                   "VQ": ("noise",)})
    layout = synthetic.make_layout(32, PCFG, cfg.margin_frames)
    kinds = {synthetic.make_pair(i, SEED, cfg, layout)[0].defect.kind
             for i in range(40) if synthetic.make_pair(i, SEED, cfg, layout)[0].defect}
    assert kinds == {"colour", "teleport", "noise"}
    bad = synthetic.synthetic_config(defect_kinds={"TA": ("blur",), "MQ": ("stall",),
                                                   "VQ": ("noise",)})
    with pytest.raises(ValueError, match="defect_kinds"):
        synthetic.generate(str(tmp_path / "x"), 2, SEED, bad)


def test_deterministic_per_seed(data, tmp_path):
    again = synthetic.generate(str(tmp_path / "a"), 4, SEED)
    rows = _read_jsonl(again["paths"]["train"]) + _read_jsonl(again["paths"]["heldout"])
    first = {r["id"]: r for r in data["rows"]}
    for r in rows:
        ref = first[r["id"]]
        strip = lambda x: {k: v for k, v in x.items() if k != "meta"}  # noqa: E731
        assert strip(r) == strip(ref)
        assert r["meta"]["defect"] == ref["meta"]["defect"]
        frames = video.read_frames(str(tmp_path / "a" / r["video_b"]), np.arange(32), seek=False)
        np.testing.assert_array_equal(frames, data["decoded"][r["id"]][1])
    other = synthetic.generate(str(tmp_path / "b"), 4, SEED + 1)
    prompts = [r["prompt"] for r in _read_jsonl(other["paths"]["train"])]
    assert prompts != [first[r["id"]]["prompt"] for r in rows][: len(prompts)]


def test_corpus_and_cli(tmp_path, capsys):
    rc = synthetic.main(["--out", str(tmp_path / "d"), "--num-pairs", "3", "--seed", "1",
                         "--tokenizer-vocab", "400"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pairs"] == 3
    corpus = synthetic.read_corpus(str(tmp_path / "d" / "corpus.txt"))
    assert PCFG.system_prompt in corpus
    assert any("<tool_call>" in line and "\n" in line for line in corpus)
    from data_pipelines import tokenizer

    tok = tokenizer.load_tokenizer(str(tmp_path / "d" / "tokenizer"))
    tok.check_special_tokens()
    for line in corpus:
        assert tok.decode(tok.encode(line)) == line
    rc = synthetic.main(["--out", str(tmp_path / "e"), "--num-pairs", "2", "--frames", "6"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err


def test_pair_bank_shows_defect_only_in_candidates(data):
    from data_pipelines import banks
    from vrthinker_jax.rollout import frame_bank

    n = PCFG.num_candidates
    np.testing.assert_array_equal(video.sample_indices(32, n), frame_bank.uniform_candidates(32, n))
    initial = protocol.initial_frames(PCFG)
    for r in data["rows"][:6]:
        bank = banks.load_pair_bank(os.path.join(data["out"], r["video_a"]),
                                    os.path.join(data["out"], r["video_b"]), n, (56, 56))
        assert bank.frames.shape == (2 * n, 56, 56, 3) and bank.frames.dtype == np.uint8
        assert bank.valid.all() and bank.num_frames == (32, 32)
        assert np.array_equal(bank.frames, banks.pair_bank(
            os.path.join(data["out"], r["video_a"]), os.path.join(data["out"], r["video_b"]), n,
            (56, 56)))
        diff = _block_diff(bank.frames[:n], bank.frames[n:])  # candidate c of A vs of B
        d = r["meta"]["defect"]
        shown = set(d["candidates"]) if d else set()
        assert {c + 1 for c in np.nonzero(diff > VISIBLE)[0]} == shown
        assert not shown & set(initial)


def test_bank_short_video_and_errors(tmp_path):
    from data_pipelines import banks

    frames = np.zeros((5, 64, 64, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(5)[:, None, None] * 50
    path = str(tmp_path / "short.mp4")
    video.write_video(path, frames, 8.0)
    bank = banks.load_pair_bank(path, path, 8, (28, 56))
    assert bank.frames.shape == (16, 28, 56, 3)
    assert bank.valid.tolist() == [True, False, True, True, False, True, True, False] * 2
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    with pytest.raises(banks.BankError, match="bad.mp4: cannot open"):
        banks.pair_bank(path, str(bad), 8, (56, 56))
    with pytest.raises(ValueError, match="multiples of 28"):
        banks.pair_bank(path, path, 8, (50, 56))


def test_frame_captions_describe_what_is_rendered(data):
    """One caption per candidate frame, in global order; a defect shows in its own video's
    captions at exactly its candidates (colour / effect), the clean video's read as clean."""
    cfg = synthetic.synthetic_config()
    layout = synthetic.make_layout(cfg.frames, PCFG, cfg.margin_frames)
    caps = {r["id"]: r["captions"] for r in
            _read_jsonl(os.path.join(data["out"], "captions_train.jsonl"))
            + _read_jsonl(os.path.join(data["out"], "captions_heldout.jsonl"))}
    assert set(caps) == {r["id"] for r in data["rows"]}
    n = PCFG.num_candidates
    for r in data["rows"]:
        c = caps[r["id"]]
        assert len(c) == 2 * n
        scene = r["meta"]["scene"]
        d = r["meta"]["defect"]
        bad = set(d["global_frames"]) if d else set()
        for g, text in enumerate(c, start=1):
            effect = d["kind"] if d is not None and g in bad else ""
            if effect == "missing":
                assert text == "No object.", (r["id"], g, text)
                continue
            colour = d["alt"] if effect == "colour" else scene["colour"]
            assert text.startswith(f"A {colour} "), (r["id"], g, text)
            want = {"noise": "heavy noise.", "blur": "blurred.", "dropout": "dropout.",
                    "smear": "smear."}.get(effect, "clean.")
            assert text.endswith(want), (r["id"], g, text)
    kinds = {r["meta"]["defect"]["kind"] for r in data["rows"] if r["meta"]["defect"]}
    assert kinds & {"missing", "dropout", "smear"}  # the default draw includes them
    # the position moves along the motion and jumps with a teleport
    pair = next(p for p in (synthetic.make_pair(i, SEED, cfg, layout)[0] for i in range(60))
                if p.defect is not None and p.defect.kind == "teleport")
    t = pair.defect.start
    clean = synthetic.frame_caption(pair.scene, cfg, None, t)
    moved = synthetic.frame_caption(pair.scene, cfg, pair.defect, t)
    assert clean != moved and clean.split(" at ")[0] == moved.split(" at ")[0]
    first = synthetic.frame_caption(pair.scene, cfg, None, 0)
    last = synthetic.frame_caption(pair.scene, cfg, None, cfg.frames - 1)
    assert first != last


def test_render_unchanged_by_the_caption_refactor():
    """render draws exactly frame_state: the object's pixels sit where the state says."""
    cfg = synthetic.synthetic_config()
    layout = synthetic.make_layout(cfg.frames, PCFG, cfg.margin_frames)
    pair, a, b = synthetic.make_pair(5, SEED, cfg, layout)
    pos = synthetic._positions(pair.scene, cfg)
    video = a if pair.defect is None or pair.defect.video == 1 else b
    for t in range(cfg.frames):
        fs = synthetic.frame_state(pair.scene, cfg, pair.defect, t, pos)
        if fs.effect:
            continue
        y, x = (int(round(v)) for v in fs.top_left)
        o = cfg.object_size
        inside = synthetic._shape_mask(fs.shape, o)
        patch = video[t, y:y + o, x:x + o][inside]
        assert np.all(patch == np.asarray(synthetic.COLOURS[fs.colour], np.uint8))


SINGLE_FRAME_KINDS = {"TA": ("missing",), "MQ": ("smear",), "VQ": ("dropout",)}
VIDEO_PCFG = protocol.ProtocolConfig(num_candidates=16, num_initial_frames=4, max_turns=3,
                                     max_frames_per_call=9, memory_window=20)


@pytest.mark.parametrize("variant", ["object colours", "colours no prompt uses"])
def test_single_frame_defects_show_in_the_defective_frame_alone(variant):
    """missing: no pixel of the object's colour; colour: the object in a defect colour; dropout:
    the corner square farthest from the object is one flat colour (`dropout_colour`); smear: a
    band crosses the whole frame along the motion (the object's colour, or `smear_colour`).
    Clean frames show none of these; with colours no prompt uses, no clean frame has a pixel of
    the defect colours at all."""
    if variant == "object colours":
        cfg = synthetic.synthetic_config(defect_kinds=SINGLE_FRAME_KINDS)
    else:
        cfg = synthetic.synthetic_config(
            defect_kinds={"TA": ("colour",), "MQ": ("smear",), "VQ": ("dropout",)},
            colours=("red", "green", "blue"), defect_colours=("cyan",), smear_colour="white",
            dropout_colour="magenta")
    layout = synthetic.make_layout(cfg.frames, PCFG, cfg.margin_frames)
    s, o = cfg.size, cfg.object_size
    seen = set()
    for i in range(40):
        pair, _, _ = synthetic.make_pair(i, SEED, cfg, layout)
        if pair.defect is None:
            continue
        d = pair.defect
        assert pair.scene.colour in cfg.colours
        rendered = synthetic.render(pair.scene, cfg, d, np.random.default_rng(0))
        colour = np.asarray(synthetic.COLOURS[pair.scene.colour], np.uint8)
        streak = np.asarray(synthetic.COLOURS[cfg.smear_colour or pair.scene.colour], np.uint8)
        pos = synthetic._positions(pair.scene, cfg)
        dy, _ = synthetic.DIRECTIONS[pair.scene.direction]
        for t in range(cfg.frames):
            frame = rendered[t]
            is_colour = np.all(frame == colour, axis=-1)
            is_streak = np.all(frame == streak, axis=-1) | is_colour  # the object on top
            cy, cx = (v + o / 2 for v in pos[t])
            k = int(round(cfg.dropout_fraction * s))
            top, left = (0 if c >= s / 2 else s - k for c in (cy, cx))
            corner = frame[top:top + k, left:left + k]
            band = is_streak.all(axis=1).any() if dy == 0 else is_streak.all(axis=0).any()
            bad = d.start <= t < d.stop
            kind = d.kind if bad else ""
            assert (not is_colour.any()) == (kind in ("missing", "colour")), (i, t)
            lost = np.all(corner == synthetic.COLOURS[cfg.dropout_colour])
            assert lost == (kind == "dropout"), (i, t)
            assert band == (kind == "smear"), (i, t)
            if variant != "object colours":
                for name, shows in (("cyan", "colour"), ("white", "smear"), ("magenta", "dropout")):
                    shown = np.all(frame == synthetic.COLOURS[name], axis=-1).any()
                    assert shown == (kind == shows), (i, t, name)
            caption = synthetic.frame_caption(pair.scene, cfg, d, t)
            if bad:
                seen.add(d.kind)
                want = {"missing": "No object.", "colour": f"A {d.alt} "}.get(
                    d.kind, f"; {d.kind}.")
                assert want in caption, caption
    assert seen == {k for ks in cfg.defect_kinds.values() for k in ks}


def test_colour_settings_are_checked(tmp_path):
    for bad, match in ((dict(colours=("red", "teal")), "colours"),
                       (dict(defect_colours=("teal",)), "defect_colours"),
                       (dict(smear_colour="teal"), "smear_colour"),
                       (dict(dropout_colour="teal"), "dropout_colour"),
                       (dict(colours=("red",)), "second colour")):
        with pytest.raises(ValueError, match=match):
            synthetic.generate(str(tmp_path / "x"), 2, SEED, synthetic.synthetic_config(**bad))


@pytest.mark.parametrize("pcfg,stride", [(VIDEO_PCFG, 1), (PCFG, 2)], ids=["demo", "default"])
def test_video_oracle_scans_one_video_per_call(pcfg, stride):
    """Video 1's scanned frames, then video 2's, one call each, every call made whatever an
    earlier one showed; the verdict after a call names the defect exactly when that call's
    frames show it; the final turn names the defect and the winner, and its answer is the
    labels. The demo's protocol scans every gap candidate; the default's (6 frames a call)
    every other one."""
    cfg = synthetic.synthetic_config(defect_kinds=SINGLE_FRAME_KINDS)
    layout = synthetic.make_layout(cfg.frames, pcfg, cfg.margin_frames)
    n = pcfg.num_candidates
    gaps = [c for c in range(1, n + 1) if c not in layout.initial
            and any(lo <= layout.candidate_frames[c - 1] <= hi for lo, hi in layout.gaps)]
    assert layout.scan == gaps[::stride] and layout.per_call == pcfg.max_frames_per_call
    found = {1: 0, 2: 0}
    for i in range(24):
        pair, _, _ = synthetic.make_pair(i, SEED, cfg, layout)
        turns = synthetic.oracle_turns(pair.defect, layout, pcfg)
        assistant = [t["content"] for t in turns if t["role"] == "assistant"]
        tools = [t["frames"] for t in turns if t["role"] == "tool"]
        assert tools == [layout.scan, [n + c for c in layout.scan]]
        assert all(protocol.turn_format_ok(t) for t in assistant)
        assert protocol.parse_final_answer(assistant[-1]) == pair.labels
        d = pair.defect
        if d is not None:
            assert d.video in (1, 2) and set(layout.candidates_in(d.frames)) & set(layout.scan)
        for v, after in zip((1, 2), assistant[1:], strict=True):
            syn = after.split("<synthesis>")[1].split("</synthesis>")[0]
            word = synthetic.KIND_WORD[d.kind] if d is not None and d.video == v else "clean"
            assert syn == f"Video {v}: {word}.", (i, syn)
        think = assistant[-1].split("<think>")[1].split("</think>")[0]
        word = {v: synthetic.KIND_WORD[d.kind] if d is not None and d.video == v else "clean"
                for v in (1, 2)}
        both = f"Video 1 {word[1]}, video 2 {word[2]}: "
        if d is None:
            assert think == both + "a tie."
        else:
            found[d.video] += 1
            assert think == both + f"{d.dimension} and OA go to video {3 - d.video}."
    assert found[1] and found[2]
    one_call = protocol.ProtocolConfig(**{**pcfg.__dict__, "max_turns": 2})
    with pytest.raises(ValueError, match="a call per video"):
        synthetic.make_layout(cfg.frames, one_call, cfg.margin_frames)


def test_config_rejects_unknown_fields():
    # a removed option (or a typo) must not silently fall back to the default behaviour
    with pytest.raises(ValueError, match="unknown config field.*oracle_text"):
        synthetic.synthetic_config(oracle_text="terse")
