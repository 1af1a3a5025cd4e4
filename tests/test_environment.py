"""The tool environment (rollout/environment.py) without a model: what each kind of turn end
gets back, the turn budget, tools off, the scripted environment, and the worst-case response
length the engine sizes its static insert with."""

from __future__ import annotations

import pytest
from test_rollout_helpers import make_tokenizer, tiny_protocol

from vrthinker_jax.rollout import chat, environment, protocol

CFG = tiny_protocol(max_turns=4)  # 3 tool calls, 16 frames, 3 per call
CALL = "<think>x</think>" + protocol.format_tool_call([3, 9, 3])


def _texts(reply):
    return "".join(s.text for s in reply.segments if isinstance(s, protocol.Text))


def _frames(reply):
    return protocol.frames_in(reply.segments)


def test_a_call_is_answered_with_its_frames_and_the_next_header():
    reply = environment.ToolEnvironment(CFG).reply(0, CALL, environment.TOOL_CALL, 0)
    assert reply.stop is None and reply.call.frames == (3, 9) and reply.call.ok
    assert _frames(reply) == [3, 9]
    assert reply.segments[0].starts_event  # frames it evicts are masked from here on
    assert list(reply.segments) == protocol.tool_response_segments(reply.call, CFG, calls_done=1)
    assert "Duplicate frame numbers were ignored." in _texts(reply)
    assert _texts(reply).endswith(f"{protocol.IM_START}assistant\n")


def test_errors_turn_ends_and_budget():
    env = environment.ToolEnvironment(CFG)
    bad = env.reply(1, protocol.format_tool_call([99]), environment.TOOL_CALL, 0)
    assert bad.stop is None and not bad.call.ok and _frames(bad) == []
    assert "Tool error:" in _texts(bad) and "out of range" in _texts(bad)
    assert env.reply(0, "<final answer>", environment.END, 0).stop == "done"
    assert env.reply(0, "<think>", environment.CAPPED, 0).stop == "capped"
    # the last allowed call's response asks for the answer; a call after it ends the row
    last = env.reply(0, CALL, environment.TOOL_CALL, CFG.max_tool_calls - 1)
    assert last.stop is None and protocol.LAST_TURN_NOTE in _texts(last)
    over = env.reply(0, CALL, environment.TOOL_CALL, CFG.max_tool_calls)
    assert over.stop == "tool_budget" and over.segments == () and over.call is None


def test_tools_off_answers_every_call_with_no_frames():
    reply = environment.ToolEnvironment(CFG, tools_enabled=False).reply(
        0, CALL, environment.TOOL_CALL, 0)
    assert reply.stop is None and reply.call.error == environment.TOOLS_DISABLED
    assert _frames(reply) == [] and environment.TOOLS_DISABLED in _texts(reply)


def test_scripted_environment_injects_calls_then_ends():
    table = {0: [2, 2, 5], 1: [16]}
    env = environment.ScriptedEnvironment(CFG, 2, lambda row, calls: table[calls])
    # a turn without a call gets the scripted call injected as environment text, before the
    # response (the model did not write it)
    first = env.reply(0, "<think>no call</think>", environment.CAPPED, 0)
    injected = protocol.format_tool_call([2, 2, 5])
    assert first.stop is None and first.call.frames == (2, 5)
    assert first.segments[0] == protocol.Text(injected) and not first.segments[0].trainable
    assert list(first.segments[1:]) == protocol.tool_response_segments(first.call, CFG,
                                                                        calls_done=1)
    # the model's own call is served as the protocol serves it
    own = env.reply(0, CALL, environment.TOOL_CALL, 1)
    assert own.call.frames == (3, 9) and _frames(own) == [3, 9]
    # after K calls the next turn end ends the row, a call included
    assert env.reply(0, CALL, environment.TOOL_CALL, 2).stop == "done"
    assert env.reply(0, "x", environment.CAPPED, 2).stop == "capped"
    with pytest.raises(ValueError, match="max_turns - 1"):
        environment.ScriptedEnvironment(CFG, CFG.max_tool_calls + 1)


def test_consecutive_frames_cover_every_frame():
    frames = environment.consecutive_frames(CFG)
    seen = [f for c in range(CFG.total_frames) for f in frames(0, c)]
    assert sorted(set(seen)) == list(range(1, CFG.total_frames + 1))
    assert frames(0, 1) == frames(5, 1) == [4, 5, 6]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_max_response_len_bounds_every_reply(tokenizer):
    """Every reply either environment gives fits the engine's static response length."""
    tpf = 4
    bound = environment.max_response_len(tokenizer, CFG, tpf)
    assert bound % environment.RESPONSE_LEN_MULTIPLE == 0
    turns = [CALL, protocol.format_tool_call(list(range(16, 0, -1))),
             protocol.format_tool_call([16, 15, 14, 14]), "<tool_call>{</tool_call>", "",
             '<tool_call>{"name": "' + "y" * 200 + '", "arguments": {}}</tool_call>']
    envs = [environment.ToolEnvironment(CFG), environment.ToolEnvironment(CFG,
                                                                          tools_enabled=False),
            environment.ScriptedEnvironment(CFG, CFG.max_tool_calls,
                                            lambda r, c: [16, 15, 14])]
    longest = 0
    for env in envs:
        for text in turns:
            for end in (environment.TOOL_CALL, environment.CAPPED):
                for done in range(CFG.max_tool_calls):
                    reply = env.reply(0, text, end, done)
                    if reply.stop is None:
                        n = len(chat.tokenize_segments(tokenizer, list(reply.segments), tpf).ids)
                        longest = max(longest, n)
    assert 0 < longest <= bound
