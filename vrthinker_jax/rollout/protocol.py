"""The VR-Thinker turn protocol: conversation layout, `select_frames` syntax, answer parsing.

One module owns the text format so that rollout, training and the synthetic data generator agree
token for token. Decisions where the paper's release is open (documented in the README):

* Frame numbering: one global 1-based list over both videos' candidates. 1..N are video 1's
  candidate frames in time order, N+1..2N video 2's (N = `num_candidates`, uniformly spaced over
  each video). The released `{"target_frames": [...]}` syntax is the canonical tool call;
  `{"video": v, "frames": [...]}` with per-video numbers is accepted as input too.
* Initial frames: `num_initial_frames` uniformly spaced candidates per video
  (:func:`initial_frame_indices`).
* Every frame is shown to the model as an image (one frame, repeated to the temporal patch), with
  a short text label `Frame k:` before it so the model knows which frame it is looking at.
* Per-dimension answer syntax: `TA: 1, MQ: 2, VQ: 0, OA: 1` inside `<final answer>`, then
  `\\boxed{OA}`. 1 = video 1 better, 2 = video 2 better, 0 = tie.
* Turn budget: at most `max_turns` assistant turns; tool calls are allowed in the first
  `max_turns - 1`, and the tool response that spends the budget asks for the final answer. A tool
  call in the last turn ends the row with no answer.
* Duplicated frame numbers in one call are dropped (keeping the first) and the response says so;
  out-of-range numbers, too many frames, a wrong tool or unparsable JSON are errors answered with
  a message and no frames.

Nothing here raises on model output: parsers return result objects. Which response a finished
turn gets (the turn budget, tools off, scripted calls) is decided by the tool environment
(`environment.py`), which builds it from the texts here; the training-data builder
(`trace_segments`) re-derives the same responses from the same functions.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

import ml_collections

DIMENSIONS = ("TA", "MQ", "VQ")
LABEL_KEYS = ("TA", "MQ", "VQ", "OA")
DIMENSION_NAMES = {
    "TA": "text alignment",
    "MQ": "motion quality",
    "VQ": "visual quality",
    "OA": "overall",
}
NO_ANSWER = -1

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TURN_TAGS = ("synthesis", "think", "recommend answer", "final answer")
SYNTHESIS_TAGS = ("<synthesis>", "</synthesis>")

DEFAULT_SYSTEM_PROMPT = (
    "You are a video reward model. You compare two generated videos for a text prompt on text "
    "alignment (TA), motion quality (MQ) and visual quality (VQ), and overall (OA). You see a few "
    "frames of each video. To look at more frames, call select_frames with frame numbers. "
    "Structure every turn as <synthesis>...</synthesis><think>...</think>, then either "
    "<recommend answer>...</recommend answer> and a tool call, or "
    "<final answer>...</final answer> followed by \\boxed{} with the overall winner. "
    "Answer 1 for video 1, 2 for video 2, 0 for a tie."
)

TOOL_RESPONSE_OK = "After selecting frames: here are the selected frames."
LAST_TURN_NOTE = "No more tool calls are allowed: give your final answer now."


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """The rollout protocol's knobs (see `protocol_config` for their meaning)."""

    num_candidates: int = 128
    num_initial_frames: int = 4
    max_turns: int = 6
    max_frames_per_call: int = 12
    memory_window: int = 32
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    tool_name: str = "select_frames"

    def __post_init__(self):
        if self.num_initial_frames > self.num_candidates:
            raise ValueError(
                f"protocol: num_initial_frames={self.num_initial_frames} exceeds "
                f"num_candidates={self.num_candidates}"
            )
        if self.max_turns < 1:
            raise ValueError(f"protocol: max_turns must be >= 1, got {self.max_turns}")
        if self.memory_window < max(2 * self.num_initial_frames, self.max_frames_per_call):
            raise ValueError(
                "protocol: memory_window must hold the initial frames of both videos and one "
                f"full tool call; got memory_window={self.memory_window}, "
                f"initial={2 * self.num_initial_frames}, per call={self.max_frames_per_call}"
            )

    @property
    def total_frames(self) -> int:
        """Size of the global frame numbering (both videos)."""
        return 2 * self.num_candidates

    @property
    def max_tool_calls(self) -> int:
        return self.max_turns - 1

    @property
    def max_frames_shown(self) -> int:
        """Upper bound on frame occurrences in one conversation (initial + every tool call)."""
        return 2 * self.num_initial_frames + self.max_tool_calls * self.max_frames_per_call

    @classmethod
    def from_configdict(cls, cd: ml_collections.ConfigDict | dict) -> ProtocolConfig:
        d = dict(cd)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"protocol config: unknown fields {sorted(unknown)}")
        return cls(**d)


def protocol_config(**overrides) -> ml_collections.ConfigDict:
    """Release defaults (the model card's inference setup), as a ConfigDict for experiments."""
    cd = ml_collections.ConfigDict()
    cd.num_candidates = 128  # candidate frames per video, uniformly spaced over its duration
    cd.num_initial_frames = 4  # frames per video shown in the first prompt
    cd.max_turns = 6  # assistant turns per rollout; tool calls allowed in all but the last
    cd.max_frames_per_call = 12  # frames one select_frames call may ask for
    cd.memory_window = 32  # frames visible at once; older ones are masked out (FIFO)
    cd.system_prompt = DEFAULT_SYSTEM_PROMPT
    cd.tool_name = "select_frames"
    cd.update(overrides)
    return cd


# --------------------------------------------------------------------------- frame numbering


def initial_frame_indices(num_candidates: int, num_initial: int) -> list[int]:
    """Per-video 1-based candidate numbers of the initial frames, uniformly spaced.

    Frame i of `num_initial` sits at the centre of the i-th equal part of the video, so neither
    the first nor the last candidate is favoured: round((i + 0.5) * N / n) + 1, clipped.
    """
    if num_initial <= 0:
        return []
    step = num_candidates / num_initial
    return [min(num_candidates, int((i + 0.5) * step) + 1) for i in range(num_initial)]


def initial_frames(cfg: ProtocolConfig) -> list[int]:
    """Global 1-based frame numbers of the first prompt: video 1's, then video 2's."""
    per_video = initial_frame_indices(cfg.num_candidates, cfg.num_initial_frames)
    return per_video + [cfg.num_candidates + i for i in per_video]


def frame_video(global_index: int, cfg: ProtocolConfig) -> tuple[int, int]:
    """Global 1-based frame number -> (video 1 or 2, per-video 1-based number)."""
    if global_index <= cfg.num_candidates:
        return 1, global_index
    return 2, global_index - cfg.num_candidates


# --------------------------------------------------------------------------- formatting


def format_judgments(judgments: dict[str, int]) -> str:
    """`TA: 1, MQ: 2, VQ: 0, OA: 1` (keys in LABEL_KEYS order)."""
    return ", ".join(f"{k}: {int(judgments[k])}" for k in LABEL_KEYS)


def format_tool_call(frames: Sequence[int]) -> str:
    args = {"target_frames": [int(f) for f in frames]}
    body = json.dumps({"name": "select_frames", "arguments": args})
    return f"{TOOL_CALL_START}{body}{TOOL_CALL_END}"


def format_tool_turn(
    synthesis: str, think: str, recommend: dict[str, int], frames: Sequence[int]
) -> str:
    """An assistant turn that ends in a `select_frames` call (the turn stops at `</tool_call>`)."""
    return (
        f"<synthesis>{synthesis}</synthesis>\n<think>{think}</think>\n"
        f"<recommend answer>{format_judgments(recommend)}</recommend answer>\n"
        f"{format_tool_call(frames)}"
    )


def format_final_turn(synthesis: str, think: str, judgments: dict[str, int]) -> str:
    """The last assistant turn: per-dimension judgments and the boxed overall winner."""
    return (
        f"<synthesis>{synthesis}</synthesis>\n<think>{think}</think>\n"
        f"<final answer>{format_judgments(judgments)}</final answer>\n"
        f"\\boxed{{{int(judgments['OA'])}}}"
    )


# --------------------------------------------------------------------------- parsing

_TOOL_RE = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.S)
_FINAL_RE = re.compile(r"<final answer>(.*?)</final answer>", re.S)
_BOXED_RE = re.compile(r"\\boxed\{\s*([0-9]+)\s*\}")
_JUDGMENT_RE = re.compile(r"\b(TA|MQ|VQ|OA)\s*[:=]\s*(-?[0-9]+)")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A parsed `select_frames` call. `frames` is empty exactly when `error` is set."""

    frames: tuple[int, ...]
    error: str | None = None
    note: str | None = None  # non-fatal remark for the response (dropped duplicates)

    @property
    def ok(self) -> bool:
        return self.error is None


def _as_int(x) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, str) and re.fullmatch(r"\s*-?[0-9]{1,9}\s*", x):
        return int(x)
    return None


def parse_tool_call(text: str, cfg: ProtocolConfig) -> ToolCall:
    """Parses the last `<tool_call>...</tool_call>` in an assistant turn. Never raises."""
    n_total = cfg.total_frames
    range_msg = (
        f"There are {n_total} frames numbered 1..{n_total} "
        f"(1..{cfg.num_candidates} are video 1, {cfg.num_candidates + 1}..{n_total} are video 2)"
    )
    matches = _TOOL_RE.findall(text)
    if not matches:
        return ToolCall((), error=f"No {TOOL_CALL_START}...{TOOL_CALL_END} call found.")
    body = matches[-1].strip()
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return ToolCall((), error="The tool call is not valid JSON.")
    if not isinstance(call, dict):
        return ToolCall((), error="The tool call must be a JSON object with name and arguments.")
    if call.get("name") != cfg.tool_name:
        name = str(call.get("name"))[:40]
        return ToolCall((), error=f"Unknown tool {name!r}; use {cfg.tool_name}.")
    args = call.get("arguments")
    if not isinstance(args, dict):
        return ToolCall((), error="The tool call needs an 'arguments' object.")
    if "target_frames" in args:
        raw = args["target_frames"]
        offset = 0
    elif "frames" in args and "video" in args:
        video = _as_int(args["video"])
        if video not in (1, 2):
            return ToolCall((), error="'video' must be 1 or 2.")
        raw = args["frames"]
        offset = 0 if video == 1 else cfg.num_candidates
        range_msg = f"Each video has {cfg.num_candidates} frames numbered 1..{cfg.num_candidates}"
        n_total = cfg.num_candidates
    else:
        return ToolCall((), error="The arguments need a 'target_frames' list of frame numbers.")
    if not isinstance(raw, list) or not raw:
        return ToolCall((), error="'target_frames' must be a non-empty list of frame numbers.")
    values = [_as_int(x) for x in raw]
    if any(v is None for v in values):
        return ToolCall((), error="Frame numbers must be integers.")
    bad = [v for v in values if not 1 <= v <= n_total]
    if bad:
        return ToolCall((), error=f"{range_msg}; your selection is out of range: {bad[:5]}.")
    unique = list(dict.fromkeys(values))
    if len(unique) > cfg.max_frames_per_call:
        return ToolCall(
            (),
            error=f"Select at most {cfg.max_frames_per_call} frames per call; you asked for "
            f"{len(unique)}.",
        )
    note = None
    if len(unique) < len(values):
        note = "Duplicate frame numbers were ignored."
    return ToolCall(tuple(v + offset for v in unique), note=note)


def parse_judgments(text: str) -> dict[str, int]:
    """`TA: 1, ...` -> dict; missing or invalid values are NO_ANSWER."""
    out = {k: NO_ANSWER for k in LABEL_KEYS}
    for key, value in _JUDGMENT_RE.findall(text):
        v = int(value)
        if out[key] == NO_ANSWER and v in (0, 1, 2):
            out[key] = v
    return out


def parse_final_answer(text: str) -> dict[str, int] | None:
    """Judgments from the last `<final answer>` block (+ `\\boxed{}` for OA). None if absent.

    The boxed value wins over an `OA:` entry when both exist, since the release scores the box.
    """
    blocks = _FINAL_RE.findall(text)
    if not blocks:
        return None
    judgments = parse_judgments(blocks[-1])
    tail = text[text.rfind("</final answer>") :]
    boxed = _BOXED_RE.findall(tail)
    if boxed and int(boxed[-1]) in (0, 1, 2):
        judgments["OA"] = int(boxed[-1])
    return judgments


def turn_kind(text: str) -> str:
    """'tool' if the turn ends with a complete tool call, 'final' if it has a final answer, else
    'malformed'."""
    stripped = text.rstrip()
    if stripped.endswith(TOOL_CALL_END) and TOOL_CALL_START in stripped:
        return "tool"
    if "<final answer>" in text and "</final answer>" in text:
        return "final"
    return "malformed"


def turn_format_ok(text: str) -> bool:
    """Tags present once each, in order: synthesis, think, then recommend+tool call or final+box."""
    kind = turn_kind(text)
    if kind == "malformed":
        return False
    wanted = ["synthesis", "think"] + (
        ["recommend answer"] if kind == "tool" else ["final answer"]
    )
    pos = 0
    for tag in wanted:
        open_t, close_t = f"<{tag}>", f"</{tag}>"
        if text.count(open_t) != 1 or text.count(close_t) != 1:
            return False
        start, end = text.find(open_t), text.find(close_t)
        if start < pos or end < start:
            return False
        pos = end
    other = [t for t in TURN_TAGS if t not in wanted]
    if any(f"<{t}>" in text for t in other):
        return False
    if kind == "tool":
        return text.count(TOOL_CALL_START) == 1
    return len(_BOXED_RE.findall(text[pos:])) == 1 and text.count(TOOL_CALL_START) == 0


# --------------------------------------------------------------------------- conversation


@dataclasses.dataclass(frozen=True)
class Text:
    """A piece of conversation text. `trainable` marks text the model itself produces."""

    text: str
    trainable: bool = False
    # True on the first segment of an environment response: frames evicted from the memory
    # window by that response stop being visible from this token on (rollout and training agree).
    starts_event: bool = False


@dataclasses.dataclass(frozen=True)
class Frame:
    """One frame shown as an image; `index` is its global 1-based number."""

    index: int


Segment = Text | Frame


def _frame_segments(frames: Sequence[int]) -> list[Segment]:
    out: list[Segment] = []
    for f in frames:
        out.append(Text(f"\nFrame {f}: "))
        out.append(Frame(f))
    return out


def prompt_segments(prompt: str, cfg: ProtocolConfig) -> list[Segment]:
    """System + first user turn (text prompt, initial frames of both videos) + assistant header."""
    n = cfg.num_candidates
    per_video = initial_frame_indices(n, cfg.num_initial_frames)
    segs: list[Segment] = [
        Text(f"{IM_START}system\n{cfg.system_prompt}{IM_END}\n{IM_START}user\n"),
        Text(
            f"Prompt: {prompt}\nEach video has {n} frames: video 1 is frames 1..{n}, "
            f"video 2 is frames {n + 1}..{2 * n}.\nVideo 1:"
        ),
    ]
    segs += _frame_segments(per_video)
    segs.append(Text("\nVideo 2:"))
    segs += _frame_segments([n + i for i in per_video])
    segs.append(Text(f"\nCompare the two videos.{IM_END}\n{IM_START}assistant\n"))
    return segs


def tool_response_segments(
    call: ToolCall, cfg: ProtocolConfig, *, calls_done: int
) -> list[Segment]:
    """The environment's answer to the `calls_done`-th tool call (1-based), closing the assistant
    turn and opening the next one. Frames are included only for a valid call."""
    last = calls_done >= cfg.max_tool_calls
    segs: list[Segment] = [Text(f"{IM_END}\n{IM_START}user\n", starts_event=True)]
    if call.ok:
        msg = TOOL_RESPONSE_OK + (f" {call.note}" if call.note else "")
        segs.append(Text(msg))
        segs += _frame_segments(call.frames)
    else:
        segs.append(Text(f"Tool error: {call.error}"))
    if last:
        segs.append(Text(f"\n{LAST_TURN_NOTE}"))
    segs.append(Text(f"{IM_END}\n{IM_START}assistant\n"))
    return segs


def caption_segments(frames: int | Sequence[int], caption: str) -> list[Segment]:
    """A captioning exchange (visual pretraining of a model that starts from random weights):
    the user shows `frames` (one frame number or several, each after its `Frame k:` label, as
    a tool response shows them), the assistant's whole turn is `caption`."""
    frames = [frames] if isinstance(frames, int) else list(frames)
    if not frames:
        raise ValueError("caption_segments: no frames")
    segs: list[Segment] = [Text(f"{IM_START}user")]
    for f in frames:
        segs += [Text(f"\nFrame {f}: "), Frame(int(f))]
    return segs + [
        Text(f"{IM_END}\n{IM_START}assistant\n"),
        Text(caption, trainable=True),
        final_turn_end(),
    ]


def final_turn_end() -> Text:
    """What the model emits after a final answer to end its turn (trainable stop token)."""
    return Text(IM_END, trainable=True)


def trace_segments(trace: dict, cfg: ProtocolConfig) -> list[Segment]:
    """A whole `vrthinker_cot` trace as segments, re-deriving each tool response from the call.

    The stored `frames` of tool turns are checked against the parsed call, so a trace whose
    recorded frames disagree with its own tool call is rejected rather than trained on.
    """
    segs = prompt_segments(trace["prompt"], cfg)
    calls = 0
    turns = trace["turns"]
    for i, turn in enumerate(turns):
        role = turn.get("role")
        if role == "assistant":
            content = turn["content"]
            segs.append(Text(content, trainable=True))
            kind = turn_kind(content)
            if kind != "tool":
                segs.append(final_turn_end())
                if i != len(turns) - 1:
                    raise ValueError(
                        f"trace {trace.get('id')!r}: turn {i} has no tool call but is not last"
                    )
        elif role == "tool":
            calls += 1
            call = parse_tool_call(turns[i - 1]["content"] if i else "", cfg)
            recorded = tuple(int(f) for f in turn.get("frames", []))
            if recorded != call.frames:
                raise ValueError(
                    f"trace {trace.get('id')!r}: turn {i} records frames {list(recorded)} but the "
                    f"tool call yields {list(call.frames)}"
                )
            segs += tool_response_segments(call, cfg, calls_done=calls)
        else:
            raise ValueError(f"trace {trace.get('id')!r}: turn {i} has unknown role {role!r}")
    return segs


def frames_in(segments: Sequence[Segment]) -> list[int]:
    """Global frame numbers in order of appearance (one entry per occurrence)."""
    return [s.index for s in segments if isinstance(s, Frame)]
