"""Grain pipelines on tiny generated mp4s: SFT rows from traces, GRPO/eval prompt banks,
determinism, per-process sharding, failure flagging and exact iterator-state restore."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_pipelines import grain_pipelines as gp
from data_pipelines import video as video_lib
from vrthinker_jax.models import config as model_config
from vrthinker_jax.models import rope
from vrthinker_jax.rollout import chat, frame_bank, protocol
from vrthinker_jax.train import examples

N = 8  # candidates per video
FRAMES = 12  # frames per test video
SIZE = (56, 56)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>")


class CharTokenizer:
    """The common.md tokenizer interface: one id per special token, one per byte otherwise."""

    def __init__(self):
        self._special = {s: 256 + i for i, s in enumerate(SPECIALS)}

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for s, sid in self._special.items():
                if text.startswith(s, i):
                    ids.append(sid)
                    i += len(s)
                    break
            else:
                ids += list(text[i].encode("utf-8"))
                i += 1
        return ids

    def decode(self, ids) -> str:
        inv = {v: k for k, v in self._special.items()}
        out, buf = [], []
        for t in ids:
            if int(t) in inv:
                out.append(bytes(buf).decode("utf-8", "replace"))
                out.append(inv[int(t)])
                buf = []
            else:
                buf.append(int(t))
        out.append(bytes(buf).decode("utf-8", "replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> int:
        return self._special[token]

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIALS)


def _level(video: int, frame: int) -> int:
    """Gray level of a test video's frame: identifies which frame was decoded."""
    return 20 + 18 * frame if video == 1 else 235 - 18 * frame


def _write_video(path: str, video: int) -> None:
    frames = np.stack([np.full((32, 48, 3), _level(video, i), np.uint8) for i in range(FRAMES)])
    video_lib.write_video(path, frames, fps=8.0)


def _trace(tid: str, calls) -> dict:
    labels = {"TA": 1, "MQ": 2, "VQ": 0, "OA": 1}
    turns = []
    for frames in calls:
        turns.append({"role": "assistant",
                      "content": protocol.format_tool_turn("seen", "more", labels, frames)})
        turns.append({"role": "tool", "frames": list(frames)})
    turns.append({"role": "assistant", "content": protocol.format_final_turn("s", "t", labels)})
    return {"id": tid, "prompt": f"prompt {tid}", "video_a": "a.mp4", "video_b": "b.mp4",
            "labels": labels, "num_candidates": N, "turns": turns}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("grain"))
    _write_video(os.path.join(root, "a.mp4"), 1)
    _write_video(os.path.join(root, "b.mp4"), 2)
    with open(os.path.join(root, "traces.jsonl"), "w") as f:
        f.write(json.dumps(_trace("t0", [[3, 12]])) + "\n")
        f.write(json.dumps(_trace("t1", [[1, 9, 16], [5]])) + "\n")
        f.write(json.dumps(_trace("t2", [[2]])) + "\n")
    pairs = []
    for i in range(10):
        pairs.append({"id": f"p{i}", "prompt": f"prompt {i}", "video_a": "a.mp4",
                      "video_b": "b.mp4", "TA": i % 3, "MQ": -1, "VQ": 1, "OA": (i + 1) % 3})
    pairs.append({"id": "broken", "prompt": "x", "video_a": "a.mp4", "video_b": "gone.mp4",
                  "TA": 1, "MQ": 1, "VQ": 1, "OA": 1})
    with open(os.path.join(root, "pairs.jsonl"), "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    tok = CharTokenizer()
    mcfg = model_config.get_config("tiny")
    mcfg.image_token_id = tok.token_to_id("<|image_pad|>")
    mcfg.video_token_id = tok.token_to_id("<|video_pad|>")
    mcfg.vision_start_token_id = tok.token_to_id("<|vision_start|>")
    mcfg.vision_end_token_id = tok.token_to_id("<|vision_end|>")
    pcfg = protocol.ProtocolConfig(num_candidates=N, num_initial_frames=2, max_turns=3,
                                   max_frames_per_call=3, memory_window=6,
                                   system_prompt="Compare.")
    return {"root": root, "tok": tok, "mcfg": mcfg, "pcfg": pcfg,
            "traces": gp.read_records(os.path.join(root, "traces.jsonl")),
            "pairs": gp.read_records(os.path.join(root, "pairs.jsonl"))}


def _sft(env, **cfg):
    c = gp.data_config(batch_size=3, frame_size=SIZE, seq_len=1200, max_frames=12,
                       shuffle=False, num_epochs=1)
    c.update(cfg)
    return gp.sft_dataset(env["traces"], c, tokenizer=env["tok"], pcfg=env["pcfg"],
                          model_cfg=env["mcfg"], process_index=0, process_count=1)


@pytest.fixture(scope="module")
def sft_batch(env):
    return next(iter(_sft(env)))


def test_sft_row_matches_its_definition(env, sft_batch):
    b = sft_batch
    assert b["tokens"].shape == (3, 1200) and b["positions"].shape == (3, 3, 1200)
    assert b["frames"].shape == (3, 12, 56, 56, 3) and b["frames"].dtype == np.uint8
    assert not b["failed"].any() and b["id"] == ["t0", "t1", "t2"]
    patch = frame_bank.PatchSpec.from_model_config(env["mcfg"])
    assert patch.tokens_per_frame(*SIZE) == 4 and patch.grid_thw(*SIZE) == (1, 4, 4)
    for r, trace in enumerate(env["traces"]):
        segs = protocol.trace_segments(trace, env["pcfg"])
        t = chat.tokenize_segments(env["tok"], segs, 4)
        n = len(t.ids)
        assert b["valid"][r].sum() == n and (b["tokens"][r, :n] == t.ids).all()
        # loss only on assistant text: exactly the trainable segments' tokens
        target = env["tok"].decode(b["tokens"][r][b["loss_mask"][r]])
        want = "".join(s.text for s in segs if isinstance(s, protocol.Text) and s.trainable)
        assert target == want
        assert not (b["loss_mask"][r] & ~b["valid"][r]).any()
        np.testing.assert_array_equal(b["visible_until"][r, :n], t.visible_until(6))
        pos, _ = rope.get_rope_index(env["mcfg"], t.ids[None],
                                     image_grid_thw=[patch.grid_thw(*SIZE)] * len(t.frames))
        np.testing.assert_array_equal(b["positions"][:, r, :n], pos[:, 0])
        assert b["frame_mask"][r].sum() == len(t.frames)
        # each frame slot shows the candidate its global number refers to
        cand = video_lib.sample_indices(FRAMES, N)
        for slot, g in enumerate(t.frames):
            video, k = protocol.frame_video(g, env["pcfg"])
            want_level = _level(video, int(cand[k - 1]))
            assert abs(float(b["frames"][r, slot].mean()) - want_level) < 6, (g, slot)
        assert not b["frames"][r, len(t.frames):].any()


def test_overlong_trace_is_flagged_and_counted(env):
    grid = gp.merged_grid(env["mcfg"], SIZE)
    lengths = [len(examples.tokenize_trace(t, env["tok"], env["pcfg"], grid).ids)
               for t in env["traces"]]
    limit = sorted(lengths)[1]  # the longest trace does not fit
    scan = gp.scan_traces(env["traces"], env["tok"], env["pcfg"], grid, seq_len=limit,
                          max_frames=12)
    assert scan.too_long == ["t1"] and scan.max_tokens == max(lengths)
    b = next(iter(_sft(env, seq_len=limit)))
    assert b["status"].tolist() == [examples.OK, examples.TOO_LONG, examples.OK]
    assert b["failed"][1] and not b["valid"][1].any() and not b["loss_mask"][1].any()
    assert "t1" in b["error"][1] and "seq_len" in b["error"][1]


def test_invalid_trace_and_missing_video_are_flagged(env):
    bad = dict(env["traces"][0], id="bad", turns=[dict(env["traces"][0]["turns"][0]),
                                                  {"role": "tool", "frames": [4]},
                                                  env["traces"][0]["turns"][2]])
    gone = dict(env["traces"][2], id="gone", video_b=os.path.join(env["root"], "none.mp4"))
    c = gp.data_config(batch_size=2, frame_size=SIZE, seq_len=1200, max_frames=12,
                       shuffle=False, num_epochs=1, scan_traces=False)
    ds = gp.sft_dataset([bad, gone], c, tokenizer=env["tok"], pcfg=env["pcfg"],
                        model_cfg=env["mcfg"], process_index=0, process_count=1)
    b = next(iter(ds))
    assert b["status"].tolist() == [examples.INVALID_TRACE, examples.DECODE_ERROR]
    assert "none.mp4" in b["error"][1]
    assert examples.count_status(b) == {"invalid_trace": 1, "decode_error": 1}


def _prompts(env, **cfg):
    c = gp.data_config(batch_size=4, frame_size=SIZE, shuffle=True, num_epochs=1, seed=3)
    c.update(cfg)
    return gp.prompt_dataset(env["pairs"], c, num_candidates=N)


def test_prompt_banks_labels_and_errors(env):
    ds = _prompts(env, process_index=0, process_count=1, shuffle=False)
    batches = list(ds)
    assert len(batches) == 3  # 11 pairs padded to 12
    b0 = batches[0]
    assert b0["bank"].shape == (4, 2 * N, 56, 56, 3) and b0["labels"].dtype == np.int32
    assert b0["labels"][1].tolist() == [1, -1, 1, 2]
    cand = video_lib.sample_indices(FRAMES, N)
    levels = b0["bank"][0].mean(axis=(1, 2, 3))
    want = [_level(1, int(c)) for c in cand] + [_level(2, int(c)) for c in cand]
    np.testing.assert_allclose(levels, want, atol=6)
    last = batches[-1]
    assert last["id"][2] == "broken" and last["status"][2] == examples.DECODE_ERROR
    assert "gone.mp4" in last["error"][2] and not last["bank"][2].any()
    assert last["status"][3] == examples.PADDING and last["labels"][3].tolist() == [-1] * 4


def _ids(ds) -> list[str]:
    return [i for b in ds for i in b["id"] if i]


def test_seeded_shuffle_is_deterministic_and_reshuffles_epochs(env):
    # skip frame decoding: ids only, via a pipeline over fake records that need no video
    recs = [{"id": f"r{i}", "prompt": "", "video_a": "", "video_b": "", "labels": {}}
            for i in range(10)]
    cfg = gp.data_config(batch_size=2, num_epochs=2, seed=7)
    rows = gp._rows(recs, cfg, process_index=0, process_count=1)
    first = [rows[i]["id"] for i in range(len(rows))]
    again = gp._rows(recs, cfg, process_index=0, process_count=1)
    assert first == [again[i]["id"] for i in range(len(again))]
    assert sorted(first[:10]) == sorted(first[10:]) == sorted(r["id"] for r in recs)
    assert first[:10] != first[10:]  # each epoch its own permutation
    other = gp._rows(recs, gp.data_config(batch_size=2, num_epochs=2, seed=8), process_index=0,
                     process_count=1)
    assert [other[i]["id"] for i in range(10)] != first[:10]


def test_process_shards_are_disjoint_and_equal(env):
    recs = [{"id": f"r{i}", "prompt": "", "video_a": "", "video_b": "", "labels": {}}
            for i in range(11)]
    cfg = gp.data_config(batch_size=4, num_epochs=1, seed=1)
    shards = [gp._rows(recs, cfg, process_index=i, process_count=2) for i in range(2)]
    got = [[s[j].get("id", "PAD") for j in range(len(s))] for s in shards]
    assert len(got[0]) == len(got[1]) == 6  # 11 padded to 12 = 2 processes x 2 rows x 3
    real = [i for g in got for i in g if i != "PAD"]
    assert sorted(real) == sorted(r["id"] for r in recs) and len(set(real)) == 11
    with pytest.raises(ValueError, match="not divisible"):
        gp._rows(recs, gp.data_config(batch_size=3), process_index=0, process_count=2)


def test_iterator_state_restores_exactly(env):
    cfg = gp.data_config(batch_size=2, frame_size=SIZE, num_epochs=-1, seed=5)
    ds = gp.prompt_dataset(env["pairs"], cfg, num_candidates=N, process_index=0,
                           process_count=1)
    it = gp.make_iterator(ds, cfg)
    for _ in range(3):
        next(it)
    state = gp.iterator_state(it)
    json.loads(state)  # plain JSON, stored beside the checkpoint
    want = [next(it) for _ in range(4)]  # crosses the first epoch boundary (11 rows)
    fresh = gp.make_iterator(
        gp.prompt_dataset(env["pairs"], cfg, num_candidates=N, process_index=0,
                          process_count=1), cfg)
    gp.restore_iterator(fresh, state)
    got = [next(fresh) for _ in range(4)]
    for w, g in zip(want, got):
        assert w["id"] == g["id"]
        np.testing.assert_array_equal(w["bank"], g["bank"])
        np.testing.assert_array_equal(w["labels"], g["labels"])


def test_sft_iterator_state_restores_exactly(env):
    c = gp.data_config(batch_size=1, frame_size=SIZE, seq_len=1200, max_frames=12,
                       num_epochs=-1, seed=2, scan_traces=False)

    def make():
        ds = gp.sft_dataset(env["traces"], c, tokenizer=env["tok"], pcfg=env["pcfg"],
                            model_cfg=env["mcfg"], process_index=0, process_count=1)
        return gp.make_iterator(ds, c)

    it = make()
    next(it)
    state = gp.iterator_state(it)
    want = [next(it) for _ in range(3)]
    fresh = make()
    gp.restore_iterator(fresh, state)
    for w in want:
        g = next(fresh)
        assert w["id"] == g["id"]
        for k in ("tokens", "positions", "loss_mask", "visible_until", "frames"):
            np.testing.assert_array_equal(w[k], g[k])


def test_reads_a_tfds_source_with_embedded_videos(env, tmp_path):
    import tensorflow_datasets as tfds

    from data_pipelines import tfds_builders as tb

    tfds.disable_progress_bar()
    manual = tmp_path / "m"
    manual.mkdir()
    with open(env["root"] + "/pairs.jsonl") as f:
        rows = [json.loads(line) for line in f][:2]
    for name in ("a.mp4", "b.mp4"):
        with open(os.path.join(env["root"], name), "rb") as src:
            (manual / name).write_bytes(src.read())
    with open(manual / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tb.build("video_pairs", manual_dir=str(manual), data_dir=str(tmp_path / "d"),
             config="embedded")
    for name in ("a.mp4", "b.mp4"):
        os.unlink(manual / name)  # the dataset is self-contained
    src = gp.tfds_source("video_pairs", "train", data_dir=str(tmp_path / "d"), config="embedded")
    cfg = gp.data_config(batch_size=2, frame_size=SIZE, shuffle=False, num_epochs=1)
    b = next(iter(gp.prompt_dataset(src, cfg, num_candidates=N, process_index=0,
                                    process_count=1)))
    assert sorted(b["id"]) == ["p0", "p1"] and not b["failed"].any()
    assert abs(float(b["bank"][0, 0].mean()) - _level(1, 0)) < 6


@pytest.mark.slow
def test_multiprocess_workers_match_in_process(env):
    cfg = gp.data_config(batch_size=2, frame_size=SIZE, num_epochs=1, seed=4)
    ds = gp.prompt_dataset(env["pairs"], cfg, num_candidates=N, process_index=0,
                           process_count=1)
    want = [b["id"] for b in gp.make_iterator(ds, cfg)]
    cfg.workers = 2
    it = gp.make_iterator(ds, cfg)
    got = [next(it)["id"] for _ in range(2)]
    state = gp.iterator_state(it)
    got += [b["id"] for b in it]
    assert got == want
    fresh = gp.make_iterator(ds, cfg)
    gp.restore_iterator(fresh, state)
    assert [b["id"] for b in fresh] == want[2:]


def test_sft_with_the_project_sentencepiece_tokenizer(env, tmp_path):
    from data_pipelines import tokenizer as tokenizer_lib

    lines = [protocol.DEFAULT_SYSTEM_PROMPT, "Compare."]
    for t in env["traces"]:
        lines += [turn["content"] for turn in t["turns"] if turn["role"] == "assistant"]
    tok = tokenizer_lib.load_tokenizer(
        tokenizer_lib.train_sentencepiece(lines * 10, str(tmp_path), 400)
    )
    mcfg = model_config.get_config("tiny")
    mcfg.image_token_id = tok.token_to_id("<|image_pad|>")
    c = gp.data_config(batch_size=3, frame_size=SIZE, seq_len=1200, max_frames=12,
                       shuffle=False, num_epochs=1)
    b = next(iter(gp.sft_dataset(env["traces"], c, tokenizer=tok, pcfg=env["pcfg"],
                                 model_cfg=mcfg, process_index=0, process_count=1)))
    assert not b["failed"].any()
    segs = protocol.trace_segments(env["traces"][1], env["pcfg"])
    want = "".join(s.text for s in segs if isinstance(s, protocol.Text) and s.trainable)
    assert tok.decode(b["tokens"][1][b["loss_mask"][1]].tolist()) == want
    image = b["tokens"] == tok.token_to_id("<|image_pad|>")
    assert image.sum(axis=1).tolist() == (b["frame_mask"].sum(axis=1) * 4).tolist()


def test_sft_reads_the_vrthinker_cot_tfds_dataset(env, tmp_path):
    import tensorflow_datasets as tfds

    from data_pipelines import tfds_builders as tb

    tfds.disable_progress_bar()
    data_dir = str(tmp_path / "d")
    tb.build("vrthinker_cot", manual_dir=env["root"], data_dir=data_dir)  # traces.jsonl
    src = gp.tfds_source("vrthinker_cot", "train", data_dir=data_dir)
    c = gp.data_config(batch_size=3, frame_size=SIZE, seq_len=1200, max_frames=12,
                       shuffle=False, num_epochs=1)
    b = next(iter(gp.sft_dataset(src, c, tokenizer=env["tok"], pcfg=env["pcfg"],
                                 model_cfg=env["mcfg"], process_index=0, process_count=1)))
    assert not b["failed"].any() and sorted(b["id"]) == ["t0", "t1", "t2"]
    assert b["frame_mask"].sum() == sum(
        len(protocol.frames_in(protocol.trace_segments(t, env["pcfg"]))) for t in env["traces"]
    )


def test_sft_and_prompts_on_synthetic_needle_data(tmp_path):
    from data_pipelines import synthetic
    from data_pipelines import tokenizer as tokenizer_lib

    out = str(tmp_path / "needle")
    synthetic.generate(out, 4, seed=2, cfg=synthetic.synthetic_config(heldout_fraction=0.0))
    tok = tokenizer_lib.load_tokenizer(tokenizer_lib.train_sentencepiece(
        synthetic.read_corpus(os.path.join(out, "corpus.txt")), str(tmp_path / "tok"), 500))
    mcfg = model_config.get_config("tiny")
    mcfg.image_token_id = tok.token_to_id("<|image_pad|>")
    pcfg = synthetic.default_protocol()
    c = gp.data_config(batch_size=4, frame_size=SIZE, seq_len=2048, max_frames=26, num_epochs=1,
                       process_index=0, process_count=1)
    traces = gp.read_records(os.path.join(out, "cot_train.jsonl"))
    b = next(iter(gp.sft_dataset(traces, c, tokenizer=tok, pcfg=pcfg, model_cfg=mcfg)))
    assert not b["failed"].any(), b["error"]
    assert (b["loss_mask"].sum(1) > 0).all() and (b["frame_mask"].sum(1) >= 8).all()
    p = next(iter(gp.prompt_dataset(os.path.join(out, "train.jsonl"), c,
                                    num_candidates=pcfg.num_candidates)))
    assert p["bank"].shape == (4, 32, 56, 56, 3) and not p["failed"].any()
    assert sorted(p["id"]) == sorted(t["id"] for t in traces)


def test_layout_mismatch_is_a_clear_error(env):
    c = gp.data_config(batch_size=1, frame_size=SIZE, process_index=0, process_count=1)
    kw = dict(tokenizer=env["tok"], pcfg=env["pcfg"], model_cfg=env["mcfg"])
    with pytest.raises(ValueError, match="tokens_per_frame=5"):
        gp.sft_dataset(env["traces"], c, tokens_per_frame=5, **kw)
    c.frame_size = (60, 56)
    with pytest.raises(ValueError,
                       match=r"data.frame_size=\(60, 56\).*not a multiple of 28 \(patch x merge\)"):
        gp.sft_dataset(env["traces"], c, **kw)
