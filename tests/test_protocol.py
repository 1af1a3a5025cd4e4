"""The turn protocol: formatting round trips, tool-call errors, and a parser that never raises."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrthinker_jax.rollout import memory, protocol

CFG = protocol.ProtocolConfig(
    num_candidates=16, num_initial_frames=4, max_turns=4, max_frames_per_call=6, memory_window=12
)


def test_initial_frames_uniform_and_in_range():
    assert protocol.initial_frame_indices(16, 4) == [3, 7, 11, 15]
    assert protocol.initial_frame_indices(128, 4) == [17, 49, 81, 113]
    assert protocol.initial_frame_indices(3, 3) == [1, 2, 3]
    assert protocol.initial_frames(CFG) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert protocol.frame_video(17, CFG) == (2, 1)
    assert protocol.frame_video(16, CFG) == (1, 16)


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="memory_window"):
        protocol.ProtocolConfig(num_candidates=16, memory_window=4)
    with pytest.raises(ValueError, match="unknown fields"):
        protocol.ProtocolConfig.from_configdict({"num_candidate": 3})
    cd = protocol.protocol_config(num_candidates=16, memory_window=16)
    assert protocol.ProtocolConfig.from_configdict(cd).num_candidates == 16


def test_tool_turn_round_trip():
    turn = protocol.format_tool_turn(
        "frames look fine", "check the middle", {"TA": 0, "MQ": 1, "VQ": 0, "OA": 1}, [5, 20]
    )
    assert protocol.turn_kind(turn) == "tool"
    assert protocol.turn_format_ok(turn)
    call = protocol.parse_tool_call(turn, CFG)
    assert call.ok and call.frames == (5, 20)


def test_final_turn_round_trip_and_box_wins():
    j = {"TA": 1, "MQ": 2, "VQ": 0, "OA": 2}
    turn = protocol.format_final_turn("s", "t", j)
    assert protocol.turn_kind(turn) == "final"
    assert protocol.turn_format_ok(turn)
    assert protocol.parse_final_answer(turn) == j
    conflicting = turn.replace("\\boxed{2}", "\\boxed{1}")
    assert protocol.parse_final_answer(conflicting)["OA"] == 1
    assert protocol.parse_final_answer("no answer here") is None
    partial = protocol.parse_final_answer("<final answer>TA: 1, VQ: 7</final answer>")
    assert partial == {"TA": 1, "MQ": -1, "VQ": -1, "OA": -1}


@pytest.mark.parametrize(
    "body, expect",
    [
        ('{"name": "select_frames", "arguments": {"target_frames": [40]}}', "out of range"),
        ('{"name": "select_frames", "arguments": {"target_frames": [0, 1]}}', "out of range"),
        ('{"name": "select_frames", "arguments": {"target_frames": [1,2,3,4,5,6,7]}}', "at most 6"),
        ('{"name": "zoom", "arguments": {"target_frames": [1]}}', "Unknown tool"),
        ('{"name": "select_frames", "arguments": {"target_frames": []}}', "non-empty"),
        ('{"name": "select_frames", "arguments": {"target_frames": ["a"]}}', "integers"),
        ('{"name": "select_frames", "arguments": {}}', "target_frames"),
        ('{"name": "select_frames"', "not valid JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_tool_call_errors_become_messages(body, expect):
    call = protocol.parse_tool_call(f"<think>x</think><tool_call>{body}</tool_call>", CFG)
    assert not call.ok and call.frames == ()
    assert expect in call.error
    segs = protocol.tool_response_segments(call, CFG, calls_done=1)
    assert not protocol.frames_in(segs)
    assert any(expect in s.text for s in segs if isinstance(s, protocol.Text))


def test_duplicates_dropped_with_note_and_per_video_syntax():
    call = protocol.parse_tool_call(protocol.format_tool_call([4, 4, 9, 4]), CFG)
    assert call.frames == (4, 9) and call.note
    body = json.dumps({"name": "select_frames", "arguments": {"video": 2, "frames": [1, 16]}})
    call = protocol.parse_tool_call(f"<tool_call>{body}</tool_call>", CFG)
    assert call.frames == (17, 32)
    body = json.dumps({"name": "select_frames", "arguments": {"video": 2, "frames": [17]}})
    assert "out of range" in protocol.parse_tool_call(f"<tool_call>{body}</tool_call>", CFG).error


def test_last_tool_call_asks_for_final_answer():
    call = protocol.parse_tool_call(protocol.format_tool_call([1]), CFG)
    last = protocol.tool_response_segments(call, CFG, calls_done=CFG.max_tool_calls)
    assert any(protocol.LAST_TURN_NOTE in s.text for s in last if isinstance(s, protocol.Text))
    early = protocol.tool_response_segments(call, CFG, calls_done=1)
    assert not any(protocol.LAST_TURN_NOTE in s.text for s in early if isinstance(s, protocol.Text))


def test_turn_format_rejects_misordered_and_repeated_tags():
    good = protocol.format_final_turn("s", "t", {"TA": 1, "MQ": 1, "VQ": 1, "OA": 1})
    assert not protocol.turn_format_ok(good.replace("<think>t</think>", "") + "<think>t</think>")
    assert not protocol.turn_format_ok(good + "\\boxed{1}")
    assert not protocol.turn_format_ok("<synthesis>a</synthesis><synthesis>b</synthesis>" + good)
    assert not protocol.turn_format_ok("plain text")


def _trace():
    t1 = protocol.format_tool_turn("a", "b", {"TA": 0, "MQ": 0, "VQ": 0, "OA": 0}, [1, 2, 3])
    t2 = protocol.format_tool_turn("c", "d", {"TA": 0, "MQ": 0, "VQ": 1, "OA": 1}, [20, 21])
    t3 = protocol.format_final_turn("e", "f", {"TA": 0, "MQ": 0, "VQ": 1, "OA": 1})
    return {
        "id": "x",
        "prompt": "a red circle moving right",
        "turns": [
            {"role": "assistant", "content": t1},
            {"role": "tool", "frames": [1, 2, 3]},
            {"role": "assistant", "content": t2},
            {"role": "tool", "frames": [20, 21]},
            {"role": "assistant", "content": t3},
        ],
    }


def test_trace_segments_layout():
    segs = protocol.trace_segments(_trace(), CFG)
    assert protocol.frames_in(segs) == protocol.initial_frames(CFG) + [1, 2, 3, 20, 21]
    trainable = "".join(s.text for s in segs if isinstance(s, protocol.Text) and s.trainable)
    assert trainable.count("<synthesis>") == 3 and trainable.endswith(protocol.IM_END)
    assert sum(isinstance(s, protocol.Text) and s.starts_event for s in segs) == 2


def test_trace_with_inconsistent_frames_is_rejected():
    trace = _trace()
    trace["turns"][1]["frames"] = [1, 2]
    with pytest.raises(ValueError, match="records frames"):
        protocol.trace_segments(trace, CFG)


def test_memory_eviction_fifo():
    # 8 initial frames, window 12: a call with 6 evicts the 2 oldest; next call with 3 evicts 3.
    ev = memory.eviction_events([8, 6, 0, 3], 12)
    assert ev[:2] == [1, 1] and ev[2:5] == [3, 3, 3] and ev[5:] == [None] * 12
    frame_of_token = np.array([-1, 0, 0, -1, 1, -1, 2])
    until = memory.visible_until(frame_of_token, [0, 5], [2, 1], window=2)
    assert until.tolist()[1:3] == [5, 5] and until[4] == memory.NEVER
    with pytest.raises(ValueError, match="more than the window"):
        memory.eviction_events([13], 12)


def test_attention_mask_from_visible_until():
    until = np.array([[memory.NEVER, 2, memory.NEVER, memory.NEVER]], np.int32)
    valid = np.array([[True, True, True, False]])
    m = np.asarray(memory.attention_mask(until, valid))[0]
    assert m[1, 1] and not m[2, 1] and m[2, 0] and not m[3].any() and not m[0, 1]


_ALPHABET = st.sampled_from(
    list("0123456789[]{}\",: abc-.\\\n")
    + ["<tool_call>", "</tool_call>", '"target_frames"', '"name"', '"select_frames"',
       '"arguments"', "<final answer>", "</final answer>", "\\boxed{", "TA:", "OA=", "<think>"]
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ALPHABET, max_size=60).map("".join))
def test_parsers_never_raise_on_random_model_output(text):
    call = protocol.parse_tool_call(text, CFG)
    assert call.ok == (call.error is None)
    if call.ok:
        assert 1 <= len(call.frames) <= CFG.max_frames_per_call
        assert all(1 <= f <= CFG.total_frames for f in call.frames)
        assert len(set(call.frames)) == len(call.frames)
    answer = protocol.parse_final_answer(text)
    if answer is not None:
        assert set(answer) == set(protocol.LABEL_KEYS)
        assert all(v in (-1, 0, 1, 2) for v in answer.values())
    protocol.turn_kind(text)
    protocol.turn_format_ok(text)


@settings(max_examples=3000, deadline=None)
@given(st.text(max_size=200))
def test_parsers_never_raise_on_unicode(text):
    protocol.parse_tool_call(text, CFG)
    protocol.parse_tool_call(f"<tool_call>{text}</tool_call>", CFG)
    protocol.parse_final_answer(f"<final answer>{text}</final answer>\\boxed{{{text}}}")
    protocol.turn_format_ok(text)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.integers(min_value=-5, max_value=40), min_size=1, max_size=10),
    st.sampled_from(["target_frames", "frames"]),
)
def test_parse_structured_calls(frames, key):
    args = {key: frames} if key == "target_frames" else {"video": 1, "frames": frames}
    call = protocol.parse_tool_call(
        "<tool_call>" + json.dumps({"name": "select_frames", "arguments": args}) + "</tool_call>",
        CFG,
    )
    limit = CFG.total_frames if key == "target_frames" else CFG.num_candidates
    unique = list(dict.fromkeys(frames))
    valid = all(1 <= f <= limit for f in frames) and len(unique) <= CFG.max_frames_per_call
    assert call.ok == valid
    if valid:
        assert list(call.frames) == unique


def test_caption_segments_show_each_frame_after_its_label_and_train_on_the_text_only():
    segs = protocol.caption_segments([4, 20], "4 vs 20: same.")
    assert protocol.frames_in(segs) == [4, 20]
    texts = [s for s in segs if isinstance(s, protocol.Text)]
    assert [s.text for s in texts if s.trainable] == ["4 vs 20: same.", protocol.IM_END]
    shown = "".join(s.text if isinstance(s, protocol.Text) else f"<{s.index}>" for s in segs)
    assert "\nFrame 4: <4>\nFrame 20: <20>" in shown
    assert protocol.frames_in(protocol.caption_segments(7, "x")) == [7]
    with pytest.raises(ValueError, match="no frames"):
        protocol.caption_segments([], "x")
