"""The select_frames tool environment: what a finished assistant turn gets back.

The trajectory engine (`engine.RolloutEngine`) drives generation; whenever a row's turn ends it
hands the turn's text to an environment, which says whether the row goes on and with which
context (the tool's response: the call's frames with their labels, or an error message, and the
next assistant header), or why the row ends (the turn budget, a turn without a call). The
environment works in text and frames (`protocol.Segment`); the engine tokenises, checks that the
response fits the KV cache, and prefills it.

* `ToolEnvironment`: the protocol's environment (turn budget, parse errors, a tools-off mode).
* `ScriptedEnvironment`: every row makes exactly K calls (benchmarks, tests): a turn that ends
  without a call before the K-th gets a canonical call injected as environment text (never in
  the loss mask), and the first turn end after K calls ends the row.
* `max_response_len`: the longest response either can give, in tokens: the engine's static
  response-insert length (`RolloutEngine.resp_len`).

The text of calls and responses is `protocol.py`'s (`parse_tool_call`, `tool_response_segments`),
which the training-data builder (`protocol.trace_segments`) uses too.

The published checkpoints' environment is `release.py`, on purpose a separate module: it
reproduces what those weights were trained to see (the release's message rendering, its
quirks, its memory rule that drops earlier images from the middle of the prompt) and is driven
by `preset_engine.py`, which re-renders and re-prefills each turn. This module's environment
appends to an explicit frame window and is what our own stages train and roll out with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from vrthinker_jax.rollout import chat, protocol

TOOLS_DISABLED = "Tool use is disabled for this evaluation: give your final answer now."

# how a turn ended (the engine reads it from the sampler's row status)
TOOL_CALL = "tool_call"  # at the tool-call stop (</tool_call>)
END = "end"  # at an end-of-conversation token
CAPPED = "capped"  # at the turn's or the rollout's token budget

# the static response length (`max_response_len`) is rounded up to a multiple of this, so
# nearby protocol settings share one shape
RESPONSE_LEN_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class Reply:
    """The environment's answer to one finished turn.

    stop: None when the row goes on; else why it ends: "done" (the turn ended without a call:
      the engine reads its answer), "capped" (the turn hit a token budget), "tool_budget" (a
      call after the last one allowed).
    call: the call served (None when the row ends); its frames are empty for a failed call.
    segments: the response to prefill (empty when the row ends).
    """

    stop: str | None
    call: protocol.ToolCall | None = None
    segments: tuple[protocol.Segment, ...] = ()


class ToolEnvironment:
    """The protocol's select_frames environment.

    Args:
      cfg: the protocol (frame numbering, frames per call, turn budget).
      tools_enabled: False answers every call with TOOLS_DISABLED and no frames (evaluation
        without tools).
    """

    def __init__(self, cfg: protocol.ProtocolConfig, *, tools_enabled: bool = True):
        self.cfg = cfg
        self.tools_enabled = tools_enabled

    def reply(self, row: int, text: str, turn_end: str, calls_done: int) -> Reply:
        """The answer to row `row`'s turn `text`, which ended as `turn_end` (TOOL_CALL / END /
        CAPPED) after `calls_done` calls were served."""
        if turn_end != TOOL_CALL:
            return Reply(stop="capped" if turn_end == CAPPED else "done")
        if calls_done >= self.cfg.max_tool_calls:
            return Reply(stop="tool_budget")
        if self.tools_enabled:
            call = protocol.parse_tool_call(text, self.cfg)
        else:
            call = protocol.ToolCall((), error=TOOLS_DISABLED)
        return self.respond(call, calls_done)

    def respond(self, call: protocol.ToolCall, calls_done: int,
                prefix: Sequence[protocol.Segment] = ()) -> Reply:
        """Serves `call` as call number calls_done + 1, after the environment text `prefix`."""
        segs = protocol.tool_response_segments(call, self.cfg, calls_done=calls_done + 1)
        return Reply(stop=None, call=call, segments=tuple(prefix) + tuple(segs))


def consecutive_frames(cfg: protocol.ProtocolConfig) -> Callable[[int, int], list[int]]:
    """(row, calls_done) -> frames of an injected call: consecutive windows of
    `max_frames_per_call` frames over all frames, the same for every row."""
    m, total = cfg.max_frames_per_call, cfg.total_frames

    def frames(row: int, calls_done: int) -> list[int]:
        del row
        return [((calls_done * m + k) % total) + 1 for k in range(m)]

    return frames


class ScriptedEnvironment(ToolEnvironment):
    """Every row makes exactly `calls` tool calls (unless its cache fills).

    A turn that ends without a call before the calls-th gets the canonical call for
    `frames(row, calls_done)` injected (environment text: the model did not write it) and
    served; a turn the model ends with its own call is served as `ToolEnvironment` serves it;
    the first turn end after `calls` calls ends the row ("done" or "capped").

    Args:
      cfg: the protocol; calls: K, at most `cfg.max_tool_calls`.
      frames: (row, calls_done) -> frames of an injected call (default `consecutive_frames`).
      tools_enabled: as in `ToolEnvironment`, for the model's own calls.
    """

    def __init__(self, cfg: protocol.ProtocolConfig, calls: int,
                 frames: Callable[[int, int], Sequence[int]] | None = None, *,
                 tools_enabled: bool = True):
        super().__init__(cfg, tools_enabled=tools_enabled)
        if not 0 <= calls <= cfg.max_tool_calls:
            raise ValueError(f"scripted environment: calls={calls} must be in 0..the protocol's "
                             f"max_turns - 1 = {cfg.max_tool_calls}")
        self.calls = calls
        self.frames = frames or consecutive_frames(cfg)

    def reply(self, row: int, text: str, turn_end: str, calls_done: int) -> Reply:
        if calls_done >= self.calls:  # the script is done: no further call is served
            return super().reply(row, text, CAPPED if turn_end == CAPPED else END, calls_done)
        if turn_end == TOOL_CALL:
            return super().reply(row, text, turn_end, calls_done)
        call_text = protocol.format_tool_call(self.frames(row, calls_done))
        call = protocol.parse_tool_call(call_text, self.cfg)
        return self.respond(call, calls_done, prefix=(protocol.Text(call_text),))


def max_response_len(tokenizer, cfg: protocol.ProtocolConfig, tokens_per_frame: int) -> int:
    """Longest reply of either environment in tokens: the engine's static response length.

    The worst of a full call's frames (with the duplicates note) and the longest error message
    (malformed, out of range, too many frames, unknown tool, tools off), each with and without
    the last-turn note, plus a scripted call injected before it (so one engine, one compile,
    serves both environments), rounded up to a multiple of RESPONSE_LEN_MULTIPLE.
    """
    m, total = cfg.max_frames_per_call, cfg.total_frames
    worst = protocol.ToolCall(
        tuple(total - i for i in range(m)), note="Duplicate frame numbers were ignored."
    )
    bad_calls = [
        '{"name": "select_frames", "arguments": {"target_frames": [100000000]}}',
        '{"name": "select_frames", "arguments": {"target_frames": '
        + str(list(range(1, m + 2))) + "}}",
        '{"name": "' + "x" * 40 + '", "arguments": {}}',
        "{",
    ]
    calls = [worst, protocol.ToolCall((), error=TOOLS_DISABLED)] + [
        protocol.parse_tool_call(f"{protocol.TOOL_CALL_START}{body}{protocol.TOOL_CALL_END}", cfg)
        for body in bad_calls
    ]
    env = ToolEnvironment(cfg)
    longest = max(
        len(chat.tokenize_segments(tokenizer, env.respond(c, n - 1).segments,
                                   tokens_per_frame).ids)
        for c in calls for n in (1, cfg.max_turns)
    )
    injected = len(tokenizer.encode(protocol.format_tool_call(worst.frames)))
    return int(math.ceil((longest + injected) / RESPONSE_LEN_MULTIPLE) * RESPONSE_LEN_MULTIPLE)
