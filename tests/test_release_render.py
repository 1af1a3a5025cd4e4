"""Presets and release rendering: our model inputs equal transformers' processor outputs on the
conversation the release builds (tests/release_reference.py), first turn and after two calls."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import tokenizer as tok_lib
from tests import release_reference as ref
from tests.test_tokenizer import QWEN25VL_TEMPLATE, write_bpe_tokenizer
from vrthinker_jax.rollout import presets, release, render

# frames at a multiple of 28 inside every budget, so no stage resizes them (see the reference's
# docstring on the video processor)
H, W = 56, 84


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    corpus = [presets.load("vr-thinker").first_turn.text, render.NOUS_TOOLS_BLOCK,
              "<synthesis>Video 1 flickers.</synthesis>\n<think>Check frames 12 and 60.</think>"]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return write_bpe_tokenizer(str(path), corpus * 20, 700)


def _small(preset_name: str) -> presets.Preset:
    """A shipped preset with pixel budgets that keep the test frames as they are."""
    import dataclasses

    p = presets.load(preset_name)
    px = dataclasses.replace(p.pixels, initial_min_pixels=H * W, initial_max_pixels=H * W,
                             video_min_pixels=28 * 28, video_max_pixels=H * W,
                             image_min_pixels=28 * 28, image_max_pixels=H * W,
                             square_side=0)
    return dataclasses.replace(p, pixels=px)


@pytest.fixture(scope="module")
def candidates():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (96, H, W, 3), dtype=np.uint8)


def _ours(preset, conv, tok_path, gen):
    tok = tok_lib.load_tokenizer(tok_path)
    return render.render(conv, preset, render.ChatTemplate(QWEN25VL_TEMPLATE), tok,
                         add_generation_prompt=gen).arrays()


def _assert_same(ours: dict, theirs: dict):
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        want = theirs.get(key, np.zeros((0,) + ours[key].shape[1:], ours[key].dtype))
        assert ours[key].shape == want.shape, key
        np.testing.assert_allclose(ours[key], want, rtol=0, atol=1e-6, err_msg=key)
    if "second_per_grid_ts" in theirs:
        np.testing.assert_allclose(ours["second_per_grid_ts"], theirs["second_per_grid_ts"])


def test_tools_block_matches_qwen_agent():
    preset = presets.load("vr-thinker")
    msgs = ref.release_first_messages("x", 8)
    want = "".join(item["text"] for item in msgs[0]["content"])
    assert render.system_text(preset) == want
    assert preset.tool.function() == ref.SELECT_FRAMES


def _reference_processor(preset, tok_path):
    px = preset.pixels
    return ref.make_processor(tok_path, QWEN25VL_TEMPLATE, image_min=px.image_min_pixels,
                              image_max=px.image_max_pixels, video_min=px.video_min_pixels,
                              video_max=px.video_max_pixels, fps=px.video_fps)


def test_first_turn_equals_transformers(tok_path, candidates):
    preset = _small("vr-thinker")
    prompt = "A cinematic shot of a waterfall in a lush forest."
    conv = release.first_turn(preset, prompt, candidates)
    ours = _ours(preset, conv, tok_path, preset.first_turn.generation_prompt)

    text = preset.first_turn.text.format(prompt=prompt, num_candidates=96, per_video=48,
                                         num_initial=8, frames="")
    proc = _reference_processor(preset, tok_path)
    msgs = ref.release_first_messages(text, 8)
    rendered = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    video = candidates[::12][:8]  # E:2270-2272
    theirs = ref.processor_inputs(proc, rendered, [], video)
    assert str(ours["text"]) == rendered
    _assert_same(ours, theirs)
    assert ours["video_grid_thw"].tolist() == [[4, H // 14, W // 14]]


def test_after_two_calls_strips_older_images(tok_path, candidates):
    preset = _small("vr-thinker")
    prompt = "a red fox jumps"
    conv = release.first_turn(preset, prompt, candidates)
    raw_turns = [
        "<|im_start|>assistant\n<synthesis>Both look fine.</synthesis>\n<think>Check more."
        "</think>\n<recommend answer>OA=1</recommend answer>\n<tool_call>\n"
        '{"name": "select_frames", "arguments": {"target_frames": [12, 16, 60]}}\n</tool_call>',
        "<synthesis>Video 2 blurs.</synthesis>\n<think>Look again.</think>\n<recommend answer>"
        'OA=1</recommend answer>\n<tool_call>{"name": "select_frames", "arguments": '
        '{"target_frames": [1, 49]}}</tool_call>\n\\boxed{1}<|im_end|>',
    ]
    history = []
    for raw in raw_turns:
        result = release.parse_call(preset, raw)
        assert result.error is None
        rsp = release.history_text(preset, raw)
        history.append((rsp, result.frames))
        conv.messages.append({"role": "assistant", "content": [{"type": "text", "text": rsp}]})
        conv.messages.append(release.response_message(preset, result, conv, candidates,
                                                      last=False))
    assert history[0][1] == (11, 15, 59) and history[1][1] == (0, 48)
    assert history[1][0].endswith("</tool_call>")  # the box after the call is dropped
    ours = _ours(preset, conv, tok_path, True)

    text = preset.first_turn.text.format(prompt=prompt, num_candidates=96, per_video=48,
                                         num_initial=8, frames="")
    proc = _reference_processor(preset, tok_path)
    msgs = ref.release_first_messages(text, 8)
    for rsp, frames in history:
        msgs += ref.tool_turn(rsp, len(frames))
    rendered = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    stripped = ref.strip_old(rendered)
    latest = [candidates[i] for i in history[-1][1]]
    theirs = ref.processor_inputs(proc, stripped, latest, candidates[::12][:8])
    assert str(ours["text"]) == stripped
    assert stripped.count("<|image_pad|>") == 2 and rendered.count("<|image_pad|>") == 5
    _assert_same(ours, theirs)


# --------------------------------------------------------------------------- the render CLI


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tok_path):
    """Two small videos and an HF-style directory (tokenizer.json + chat_template.json)."""
    import json
    import shutil

    from data_pipelines import video

    d = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        video.write_video(str(d / f"{name}.mp4"), rng.integers(0, 256, (60, H, W, 3),
                                                               dtype=np.uint8), qp=0, gop=1)
    ckpt = d / "hf"
    ckpt.mkdir()
    shutil.copy(tok_path, ckpt / "tokenizer.json")
    (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": QWEN25VL_TEMPLATE}))
    return d


def test_render_cli_writes_what_the_library_renders(pair, tmp_path, capsys):
    import json

    from data_pipelines import video
    from vrthinker_jax.tools import forward
    from vrthinker_jax.tools import render as render_cli

    preset_path = tmp_path / "small.toml"
    src = open(presets.resolve("vr-thinker")).read()
    for key, value in (("initial_min_pixels", H * W), ("initial_max_pixels", H * W),
                       ("video_max_pixels", H * W), ("image_max_pixels", H * W)):
        src = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line
                        for line in src.splitlines())
    preset_path.write_text(src)
    turns = tmp_path / "turns.json"
    call = '<tool_call>{"name": "select_frames", "arguments": {"target_frames": [3, 50]}}'
    turns.write_text(json.dumps([f"<synthesis>a</synthesis><think>b</think><recommend answer>"
                                 f"OA=1</recommend answer>{call}</tool_call>"]))
    out = tmp_path / "in.npz"
    args = ["--checkpoint", str(pair / "hf"), "--preset", str(preset_path), "--prompt", "a fox",
            "--video-a", str(pair / "a.mp4"), "--video-b", str(pair / "b.mp4"),
            "--turns", str(turns), "--out", str(out)]
    assert render_cli.main(args) == 0
    assert "unverified" in capsys.readouterr().err  # the preset's open values are shown

    preset = presets.load(str(preset_path))
    cands = np.concatenate([video.read_frames(str(pair / f"{v}.mp4"), num_frames=48)
                            for v in ("a", "b")])
    conv, gen = release.replay(preset, "a fox", cands, json.loads(turns.read_text()))
    want = render.render(conv, preset, render.ChatTemplate(QWEN25VL_TEMPLATE),
                         tok_lib.load_tokenizer(str(pair / "hf")),
                         add_generation_prompt=gen).arrays()
    with np.load(out) as f:
        got = {k: f[k] for k in f.files}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got["image_grid_thw"].shape == (2, 3) and got["video_grid_thw"].shape == (1, 3)
    assert sorted(forward.read_inputs(str(out))) == sorted(set(forward.KNOWN) - {"attention_mask"})

    # a turn without a tool call ends the row: one line, exit 2
    turns.write_text(json.dumps(["<synthesis>a</synthesis><think>b</think>\\boxed{1}"]))
    capsys.readouterr()
    assert render_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("render: error: turn 1 does not end in a tool call")
    turns.write_text("{not json")
    assert render_cli.main(args) == 2
    assert "turns.json: cannot read turns" in capsys.readouterr().err


def test_release_call_rules():
    p = presets.load("vr-thinker")

    def call(args: str) -> release.CallResult:
        return release.parse_call(p, f'<tool_call>{{"name": "select_frames", "arguments": '
                                     f'{{"target_frames": {args}}}}}</tool_call>')

    assert call("[1, 96]").frames == (0, 95)
    assert call("[0]").frames == (95,)  # E:1193 indexes with frame - 1: 0 is the last frame
    assert call("[97]").error.startswith("There are 96 frames numbered in range [1,96]")
    assert call(str(list(range(1, 10)))).error.startswith("You have selected 9 frames")
    assert call("[]").error == "Execution error:\n{error_info}\n"  # the release's literal text
    assert call('["3"]').error == p.tool_response.execution_error
    assert release.parse_call(p, "<tool_call>{oops</tool_call>").error is not None
    assert release.parse_answer(p, "\\boxed{2} then \\boxed{1}") == {"OA": 1}
    assert release.parse_answer(p, "\\boxed{1} then \\boxed{7}") is None  # the last box decides
    assert release.parse_answer(p, "no box") is None
    raw = ("<|im_start|>assistant\nSure. <synthesis>x</synthesis>\n<think>y</think>"
           "<recommend answer>OA=1</recommend answer>\n<tool_call>{}</tool_call>\n\\boxed{1}"
           "<|im_end|>")
    assert release.history_text(p, raw) == (
        "<synthesis>x</synthesis>\n<think>y</think><recommend answer>OA=1</recommend answer>"
        "<tool_call>{}</tool_call>")


def test_presets_load_and_refuse_bad_files(tmp_path):
    assert set(presets.available()) == {"vr-thinker", "vrthinker", "vrthinker_jax"}
    for name in ("vr-thinker", "vrthinker"):
        p = presets.load(name)
        assert p.name == name and p.unverified  # every published preset says what is open
    own = presets.load("vrthinker_jax")
    assert isinstance(own, presets.ProjectPreset) and own.frame_size == (448, 448)
    assert own.protocol["num_candidates"] == 128 and own.protocol["memory_window"] == 32
    bad = tmp_path / "bad.toml"
    src = open(presets.resolve("vr-thinker")).read()
    bad.write_text(src.replace("max_per_call = 8", "max_per_call = 8\nmax_per_cal = 9"))
    with pytest.raises(presets.PresetError, match=r"bad.toml: \[frames\] has unknown keys"):
        presets.load(str(bad))
    bad.write_text(src.replace('rule = "last_boxed"', 'rule = "first_box"'))
    with pytest.raises(presets.PresetError, match=r"\[answer\].rule = 'first_box'"):
        presets.load(str(bad))
    with pytest.raises(presets.PresetError, match="neither a file nor one of"):
        presets.load("no-such-preset")


# --------------------------------------------------------------------------- the second preset


def _vrthinker_reference_messages(preset, prompt: str, turns: list[str], calls: list[list[int]]):
    """The `vrthinker` preset's conversation built by hand in Hugging Face's message format
    (qwen-agent renders its tools block): the 8 initial frames as images before the text, the
    model's turns verbatim, every tool response keeping its images (memory rule keep_all)."""
    msgs, images = ref.vrthinker_first_messages(preset, prompt)
    for turn, frames in zip(turns, calls):
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": turn}]})
        msgs.append({"role": "user", "content": [{"type": "text", "text": preset.tool_response.ok}]
                     + [{"type": "image"} for _ in frames]})
        images += [f - 1 for f in frames]
    return msgs, images


@pytest.mark.parametrize("n_turns", [0, 2])
def test_vrthinker_preset_equals_transformers(tok_path, n_turns):
    preset = _small("vrthinker")
    cands = np.random.default_rng(5).integers(0, 256, (256, H, W, 3), dtype=np.uint8)
    prompt = "a robot rides a unicorn"
    calls = [[3, 200], [129, 1, 256]][:n_turns]
    turns = [f'<think>look</think><tool_call>{{"name": "select_frames", "arguments": '
             f'{{"target_frames": {c}}}}}</tool_call>' for c in calls]
    conv, gen = release.replay(preset, prompt, cands, turns)
    ours = _ours(preset, conv, tok_path, gen)

    msgs, images = _vrthinker_reference_messages(preset, prompt, turns, calls)
    proc = _reference_processor(preset, tok_path)
    rendered = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    theirs = ref.processor_inputs(proc, rendered, [cands[i] for i in images], None)
    assert str(ours["text"]) == rendered
    _assert_same(ours, theirs)
    assert len(ours["image_grid_thw"]) == 8 + sum(len(c) for c in calls)
