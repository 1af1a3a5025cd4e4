"""The published checkpoints' environment, driven by a preset: first turn, tool responses, the
model's turns as fed back, and the verdict.

Where the release code has a quirk that changes what the model sees, it is reproduced and the
line of `experiment_maker.py` (E) named, because the published weights were trained on it:
frame numbers are used as Python list indices after subtracting 1 (0 picks the last
candidate), the execution-error text carries the literal `{error_info}` (a missing f-string),
and each assistant turn is rebuilt from its tags (`process`, E:2377-2420) before it is fed back.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np

from vrthinker_jax.rollout import presets, render

TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
IM_END = "<|im_end|>"


# --------------------------------------------------------------------------- frames


def initial_indices(preset: presets.Preset) -> list[int]:
    """0-based candidate indices of the initial frames (video 1's first).

    release_step: `frames[::max(1, n // k)][:k]` over the pair's n candidates (E:2266-2272);
    centres: per video, the centre of each of k equal parts.
    """
    f = preset.frames
    n, k = preset.total_candidates, preset.num_initial
    if f.initial_rule == "release_step":
        return list(range(0, n, max(1, n // k)))[:k]
    per = f.candidates_per_video
    step = per / f.initial_per_video
    one = [min(per - 1, int((i + 0.5) * step)) for i in range(f.initial_per_video)]
    return one + [per + i for i in one]


def pair_candidates(preset: presets.Preset, video_a, video_b) -> np.ndarray:
    """uint8 [2 * candidates_per_video, H, W, 3]: each video's candidates (paths or encoded
    bytes) at the centres of equal parts, video A's first. The initial frames of both videos
    form one video item, which needs one frame size: video B's frames are resized (PIL bicubic)
    to video A's when they differ (the release's data loader is not published; benchmark pairs
    share a size). A bad video raises `data_pipelines.video.VideoError` naming the file."""
    from data_pipelines import processor, video

    n = preset.frames.candidates_per_video
    a, b = (video.read_frames(v, num_frames=n) for v in (video_a, video_b))
    if a.shape[1:] != b.shape[1:]:
        b = np.stack([processor.resize_uint8(f, a.shape[1:3]) for f in b])
    return np.concatenate([a, b])


def first_turn(preset: presets.Preset, prompt: str, candidates: np.ndarray
               ) -> render.Conversation:
    """System turn + the first user turn (initial frames and the task text).

    candidates: uint8 [2 * candidates_per_video, H, W, 3], video 1's then video 2's.
    """
    want = preset.total_candidates
    if candidates.ndim != 4 or candidates.shape[0] != want or candidates.dtype != np.uint8:
        raise ValueError(f"first_turn: candidates must be uint8 [{want}, H, W, 3], got "
                         f"{candidates.dtype} {candidates.shape}")
    ft = preset.first_turn
    conv = render.Conversation(
        [{"role": "system", "content": [{"type": "text", "text": render.system_text(preset)}]}],
        [])
    idx = initial_indices(preset)
    frames = [render.prepare_frame(candidates[i], preset, initial=True) for i in idx]
    if ft.initial_as == "video":
        conv.video = np.stack(frames)
        visual = [{"type": "video", "video": 0}]
    else:
        visual = []
        for i, frame in zip(idx, frames):
            if ft.image_label:
                visual.append({"type": "text", "text": ft.image_label.format(index=i + 1)})
            visual.append(conv.add_image(frame))
    before, after = ft.text.format(
        prompt=prompt, num_candidates=want, per_video=preset.frames.candidates_per_video,
        num_initial=preset.num_initial, frames=_FRAMES).split(_FRAMES)
    text = [[{"type": "text", "text": t}] if t else [] for t in (before, after)]
    conv.messages.append({"role": "user", "content": text[0] + visual + text[1]})
    return conv


_FRAMES = "\x00frames\x00"  # stands for {frames} while the template is filled in


# --------------------------------------------------------------------------- tool calls


@dataclasses.dataclass(frozen=True)
class CallResult:
    """The environment's reading of one tool call: 0-based candidate indices, or an error
    message (then `frames` is empty)."""

    frames: tuple[int, ...]
    error: str | None = None


def parse_call(preset: presets.Preset, turn: str) -> CallResult:
    """The last `<tool_call>` of a turn, read as the release does (E:1146, 1171-1193)."""
    n = preset.total_candidates
    texts = preset.tool_response
    try:
        call = json.loads(turn.split(TOOL_START)[-1].split(TOOL_END)[0])
        if call["name"] != preset.tool.name:
            raise ValueError("wrong tool")
        target = call["arguments"]["target_frames"]
        if len(target) > preset.frames.max_per_call and preset.frames.too_many == "error":
            return CallResult((), texts.too_many.format(n=len(target),
                                                        max=preset.frames.max_per_call))
        target = target[: preset.frames.max_per_call]
        if max(target) > n:
            return CallResult((), texts.out_of_range.format(total=n))
        # Python indexing of frame - 1: 0 and negative numbers wrap around (E:1193)
        picked = tuple(range(n))
        return CallResult(tuple(picked[x - 1] for x in target))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return CallResult((), texts.execution_error)


def response_message(preset: presets.Preset, result: CallResult, conv: render.Conversation,
                     candidates: np.ndarray, *, last: bool) -> dict:
    """The user turn answering a call (E:2566-2588); its frames are added to `conv.images`."""
    texts = preset.tool_response
    if result.error is not None:
        body = texts.error_prefix + result.error
        if last and texts.final_note:
            body += texts.final_note
        return {"role": "user", "content": [{"type": "text", "text": body}]}
    content = [{"type": "text", "text": texts.ok}]
    for i in result.frames:
        if texts.image_label:
            content.append({"type": "text", "text": texts.image_label.format(index=i + 1)})
        content.append(conv.add_image(render.prepare_frame(candidates[i], preset,
                                                           initial=False)))
    if last and texts.final_note:
        content.append({"type": "text", "text": texts.final_note})
    return {"role": "user", "content": content}


# --------------------------------------------------------------------------- the model's turns


_STOP_SUFFIXES = tuple(f"</tool_call>{gap}\\boxed{{{v}}}<|im_end|>" for v in (1, 2)
                       for gap in ("\n", "\n\n"))


def clean_turn(raw: str) -> str:
    """A generated turn as the release first cleans it (E:2355-2364): stripped, a box after a
    tool call dropped, everything after the first `</tool_call>` dropped."""
    text = raw.strip().replace("</tool_call>\n<|im_end|>", TOOL_END)
    for suffix in _STOP_SUFFIXES:
        text = text.replace(suffix, TOOL_END)
    if TOOL_END in text:
        text = text[: text.find(TOOL_END) + len(TOOL_END)]
    return text


_TAG_SETS = (("synthesis", "think", "recommend answer"),
             ("synthesis", "think", "recommended answer"),
             ("synthesis", "think", "final answer"))
_STRIP = " \n\b#<>"


def release_process(text: str) -> tuple[str, bool]:
    """E:2377-2420: rebuild a turn from its tags; returns (text, whether a tag set matched)."""
    lower = text.lower()
    for tags in _TAG_SETS:
        if not all(t in lower for t in tags):
            continue
        text = text.replace("</synthesis>", "").replace("</think>", "")
        lower = text.lower()
        pos = [(lower.find(t), lower.find(t) + len(t)) for t in tags]
        out = ("<synthesis>" + text[pos[0][1]:pos[1][0]].strip(_STRIP) + "</synthesis>\n"
               "<think>" + text[pos[1][1]:pos[2][0]].strip(_STRIP) + "</think>")
        if tags[2] == "final answer":
            text = text.split("</final answer>")[0]
            return out + "<final answer>" + text[pos[2][1]:].strip(_STRIP) + "</final answer>", True
        text = text.replace("</recommend answer>", "")
        call = text.lower().find(TOOL_START)
        if call == -1:
            return out, False
        return (out + "<recommend answer>" + text[pos[2][1]:call].strip(_STRIP)
                + "</recommend answer>" + text[call:]), True
    return text, False


@dataclasses.dataclass(frozen=True)
class TurnReading:
    """What the environment reads from one generated turn: `history`, the text fed back in
    later prompts; `wants_tool`, whether it ends in `</tool_call>` once cleaned (E:2509);
    `format_ok`, whether it passes the release's format check (in effect, whether `process`
    found a tag set: E:2446-2505 reset the flag, then `or` it with process's; a failed row
    ends)."""

    history: str
    wants_tool: bool
    format_ok: bool


def read_turn(preset: presets.Preset, raw: str) -> TurnReading:
    """The preset's reading of a generated turn (one pass of the release's rewrite)."""
    if preset.history.rule == "verbatim":
        return TurnReading(raw, raw.rstrip().endswith(TOOL_END), True)
    text, ok = release_process(clean_turn(raw).replace(IM_END, ""))
    at = text.find("<synthesis>")
    text = text[at:] if at >= 0 else text
    return TurnReading(text, text.endswith(TOOL_END), ok)


def history_text(preset: presets.Preset, raw: str) -> str:
    """The assistant turn as it is fed back in later prompts."""
    return read_turn(preset, raw).history


# --------------------------------------------------------------------------- verdict


_BOXED = re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}")
_LABEL = re.compile(r"\b(TA|MQ|VQ|OA)\s*[:=]\s*([0-2])\b")


def parse_answer(preset: presets.Preset, trajectory: str) -> dict[str, int] | None:
    """The verdict of a whole trajectory (every assistant turn's text, in order).

    last_boxed: the last `\\boxed{}` anywhere is OA (1 = video 1, 2 = video 2, 0 = tie);
    final_answer_labels: the last `TA: x, ...` labels, OA from the last box when present.
    None when nothing parses.
    """
    boxes = _BOXED.findall(trajectory)
    out: dict[str, int] = {}
    if preset.answer.rule == "final_answer_labels":
        for key, value in _LABEL.findall(trajectory):
            if key in preset.answer.labels:
                out[key] = int(value)
    if boxes and boxes[-1] in ("0", "1", "2"):  # the last box decides, valid or not
        out["OA"] = int(boxes[-1])
    elif boxes:
        out.pop("OA", None)
    return out or None


# --------------------------------------------------------------------------- replay


def replay(preset: presets.Preset, prompt: str, candidates: np.ndarray, turns: list[str]
           ) -> tuple[render.Conversation, bool]:
    """The conversation the model sees after these assistant turns and the environment's
    answers to them; returns it with whether its prompt ends in the generation prompt.

    Every turn but none of the last must ask for the tool within the call budget: a turn that
    does not ends the row, so nothing could follow it (ValueError naming the turn).
    """
    conv = first_turn(preset, prompt, candidates)
    if len(turns) > preset.budget.max_tool_calls:
        raise ValueError(f"{len(turns)} turns given; the preset serves at most "
                         f"{preset.budget.max_tool_calls} tool calls, so at most that many "
                         "turns can be followed by a prompt")
    for k, raw in enumerate(turns):
        turn = read_turn(preset, raw)
        if not turn.wants_tool:
            raise ValueError(f"turn {k + 1} does not end in a tool call, so the row ends there")
        conv.messages.append({"role": "assistant",
                              "content": [{"type": "text", "text": turn.history}]})
        result = parse_call(preset, raw)
        last = k + 1 == preset.budget.max_tool_calls
        conv.messages.append(response_message(preset, result, conv, candidates, last=last))
    return conv, bool(turns) or preset.first_turn.generation_prompt
