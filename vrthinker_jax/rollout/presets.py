"""Protocol presets: everything a checkpoint expects to see, as a TOML file a user can read.

A preset is data, not code: `vrthinker_jax/presets/<name>.toml` (shipped: `vr-thinker`, the
paper's checkpoint run as its release code runs it; `vrthinker`, the second published
checkpoint run as its card's `infer.py` runs it; `vrthinker_jax`, this project's own protocol,
which is `engine = "project"`: a [protocol] and a [sampling] table of the project's config
fields and a frame_size, run by the project's RolloutEngine; see :class:`ProjectPreset`).
Copy one, edit it, and pass its path wherever a preset name is accepted (`--preset PATH`).

Sections (every key is required; an unknown key is refused with the file and key named):

* `[system]` text, and how the tool schema reaches the system turn (`tools_block`: "nous" =
  the Hermes/Nous block qwen-agent's `NousFnCallPrompt` appends, "none" = not at all).
* `[tool]` name, description and JSON-schema parameters of `select_frames`.
* `[first_turn]` the user text template (`{prompt}` and the frame counts are filled in), whether
  the initial frames are one video item or images, where they go, and whether the first prompt
  ends with the assistant header (`generation_prompt`).
* `[frames]` candidate frames (per video or one list over the pair), which are shown first, the
  per-call limit, the numbering.
* `[pixels]` the pixel budgets of the initial frames and of the selected frames (Qwen
  `smart_resize`, aspect kept) and the seconds per frame of the initial video.
* `[tool_response]` the environment's texts; `[memory]` which images stay in the prompt;
  `[history]` how the model's own turns are fed back; `[budget]` turns and tokens; `[answer]`
  how the verdict is read; `[sampling]` decoding defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from typing import Any

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "presets")

INITIAL_AS = ("video", "images")
FRAME_LAYOUTS = ("pair", "per_video")
INITIAL_RULES = ("release_step", "centres")
TOOLS_BLOCKS = ("nous", "none")
MEMORY_RULES = ("latest_tool_images", "fifo_window", "keep_all")
HISTORY_RULES = ("release_process", "verbatim")
ANSWER_RULES = ("last_boxed", "final_answer_labels")
TOO_MANY_RULES = ("error", "truncate")


class PresetError(ValueError):
    """A preset file is missing, malformed or inconsistent (the message names file and key)."""


@dataclasses.dataclass(frozen=True)
class System:
    text: str
    tools_block: str  # TOOLS_BLOCKS


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments

    def function(self) -> dict:
        """The function dict qwen-agent's `BaseTool.function` gives (key order matters: it is
        rendered with json.dumps)."""
        return {"name": self.name, "description": self.description,
                "parameters": self.parameters}


@dataclasses.dataclass(frozen=True)
class FirstTurn:
    # the user turn; {frames} marks where the initial frames go; fields: {prompt},
    # {num_candidates}, {per_video}, {num_initial}
    text: str
    initial_as: str  # INITIAL_AS
    image_label: str  # text before each initial image ("" for none; "{index}" = its number)
    generation_prompt: bool  # the first prompt ends with "<|im_start|>assistant\n"


@dataclasses.dataclass(frozen=True)
class Frames:
    layout: str  # FRAME_LAYOUTS: "pair" = 1..N over both videos, video 1 first
    candidates_per_video: int
    initial_per_video: int
    initial_rule: str  # INITIAL_RULES
    max_per_call: int
    too_many: str  # TOO_MANY_RULES


@dataclasses.dataclass(frozen=True)
class Pixels:
    # the initial frames: first resized into [initial_min, initial_max] pixels (the data
    # loader's step), then by the processor's own budget for their kind (video or image)
    initial_min_pixels: int
    initial_max_pixels: int
    video_min_pixels: int
    video_max_pixels: int
    image_min_pixels: int
    image_max_pixels: int
    video_fps: float  # frames per second the initial video is said to have (second_per_grid)
    square_side: int  # > 0: every frame is first resized to this square (aspect not kept)


@dataclasses.dataclass(frozen=True)
class ToolResponse:
    ok: str  # text before the selected frames
    image_label: str  # text before each selected frame ("" for none; "{index}" = its number)
    error_prefix: str
    too_many: str  # fields: {n}, {max}
    out_of_range: str  # fields: {total}
    execution_error: str  # parse failures, wrong tool, empty selection
    final_note: str  # appended to the response that spends the call budget ("" for none)


@dataclasses.dataclass(frozen=True)
class Memory:
    rule: str  # MEMORY_RULES
    strip_marker: str  # latest_tool_images: the text that starts each tool response
    window: int  # fifo_window: frames visible at once


@dataclasses.dataclass(frozen=True)
class History:
    rule: str  # HISTORY_RULES


@dataclasses.dataclass(frozen=True)
class Budget:
    max_tool_calls: int
    max_new_tokens: int  # per assistant turn
    max_total_tokens: int  # a row stops once its prompt + turn exceed this
    max_images: int  # a row stops once it would hold more images than this


@dataclasses.dataclass(frozen=True)
class Answer:
    rule: str  # ANSWER_RULES
    labels: tuple[str, ...]  # the dimensions a verdict names (OA last)


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    checkpoint: str  # the published checkpoint this preset is for ("" for none)
    source: str  # where the values come from
    unverified: tuple[str, ...]  # values no source gives in full (shown as a warning)
    system: System
    tool: Tool
    first_turn: FirstTurn
    frames: Frames
    pixels: Pixels
    tool_response: ToolResponse
    memory: Memory
    history: History
    budget: Budget
    answer: Answer
    sampling: Sampling
    path: str = ""  # the file it was read from

    @property
    def total_candidates(self) -> int:
        return 2 * self.frames.candidates_per_video

    @property
    def num_initial(self) -> int:
        return 2 * self.frames.initial_per_video

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        d["unverified"] = list(self.unverified)
        d["answer"]["labels"] = list(self.answer.labels)
        return d


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Preset)}
_CLASSES = {"system": System, "tool": Tool, "first_turn": FirstTurn, "frames": Frames,
            "pixels": Pixels, "tool_response": ToolResponse, "memory": Memory,
            "history": History, "budget": Budget, "answer": Answer, "sampling": Sampling}
_CHOICES = {("system", "tools_block"): TOOLS_BLOCKS, ("first_turn", "initial_as"): INITIAL_AS,
            ("frames", "layout"): FRAME_LAYOUTS, ("frames", "initial_rule"): INITIAL_RULES,
            ("frames", "too_many"): TOO_MANY_RULES, ("memory", "rule"): MEMORY_RULES,
            ("history", "rule"): HISTORY_RULES, ("answer", "rule"): ANSWER_RULES}
_TOP = ("name", "description", "checkpoint", "source")


@dataclasses.dataclass(frozen=True)
class ProjectPreset:
    """This project's protocol as a preset (`engine = "project"`): the fields of
    `protocol.protocol_config`, `sampler.sampling_config` and the frame size."""

    name: str
    description: str
    checkpoint: str
    source: str
    unverified: tuple[str, ...]
    protocol: dict
    sampling: dict
    frame_size: tuple[int, int]
    path: str = ""


def available() -> list[str]:
    """Names of the shipped presets."""
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".toml"))


def resolve(name_or_path: str) -> str:
    """A shipped preset's name or a .toml path -> the file's path."""
    if os.path.isfile(name_or_path):
        return name_or_path
    path = os.path.join(PRESET_DIR, f"{name_or_path}.toml")
    if os.path.isfile(path):
        return path
    raise PresetError(f"preset {name_or_path!r}: neither a file nor one of {available()}")


def _section(path: str, key: str, raw: Any):
    cls = _CLASSES[key]
    if not isinstance(raw, dict):
        raise PresetError(f"{path}: [{key}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(raw) - set(fields)), sorted(set(fields) - set(raw))
    if unknown:
        raise PresetError(f"{path}: [{key}] has unknown keys {unknown}")
    if missing:
        raise PresetError(f"{path}: [{key}] is missing keys {missing}")
    values = {}
    for name, f in fields.items():
        v = raw[name]
        if name == "parameters":
            try:
                v = json.loads(v) if isinstance(v, str) else v
            except ValueError as e:
                raise PresetError(f"{path}: [{key}].{name} is not valid JSON ({e})") from None
        want = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict,
                "tuple[str, ...]": list}[f.type]
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise PresetError(f"{path}: [{key}].{name} must be {f.type}, got {v!r}")
        choices = _CHOICES.get((key, name))
        if choices and v not in choices:
            raise PresetError(f"{path}: [{key}].{name} = {v!r}, expected one of {choices}")
        values[name] = tuple(v) if f.type == "tuple[str, ...]" else (
            float(v) if f.type == "float" else v)
    return cls(**values)


def load(name_or_path: str) -> Preset | ProjectPreset:
    """Reads and checks a preset (a shipped name or a .toml path)."""
    path = resolve(name_or_path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PresetError(f"{path}: cannot read preset ({e})") from None
    engine = raw.pop("engine", "release")
    if engine == "project":
        return _load_project(path, raw)
    if engine != "release":
        raise PresetError(f"{path}: engine = {engine!r}, expected 'release' or 'project'")
    unknown = sorted(set(raw) - set(_SECTIONS) - {"path"})
    unverified = raw.get("unverified")
    if not (isinstance(unverified, list) and all(isinstance(u, str) for u in unverified)):
        raise PresetError(f"{path}: top-level 'unverified' must be a list of strings")
    if unknown:
        raise PresetError(f"{path}: unknown keys or sections {unknown}")
    for key in _TOP:
        if not isinstance(raw.get(key), str):
            raise PresetError(f"{path}: top-level {key!r} must be a string")
    missing = sorted(set(_CLASSES) - set(raw))
    if missing:
        raise PresetError(f"{path}: missing sections {missing}")
    preset = Preset(**{k: raw[k] for k in _TOP}, unverified=tuple(unverified),
                    **{k: _section(path, k, raw[k]) for k in _CLASSES}, path=path)
    _check(preset)
    return preset


def _load_project(path: str, raw: dict) -> ProjectPreset:
    from vrthinker_jax.rollout import protocol, sampler

    keys = set(_TOP) | {"unverified", "protocol", "sampling", "frame_size"}
    if sorted(set(raw) - keys):
        raise PresetError(f"{path}: unknown keys {sorted(set(raw) - keys)}")
    missing = sorted(keys - set(raw))
    if missing:
        raise PresetError(f"{path}: missing keys {missing}")
    try:
        pcfg = protocol.ProtocolConfig.from_configdict(protocol.protocol_config(**raw["protocol"]))
    except (TypeError, ValueError, AttributeError) as e:
        raise PresetError(f"{path}: [protocol]: {e}") from None
    sampling = dict(raw["sampling"])
    if "prompt_buckets" in sampling:
        sampling["prompt_buckets"] = tuple(sampling["prompt_buckets"])
    try:
        sampler.sampling_config(**sampling)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise PresetError(f"{path}: [sampling]: {e}") from None
    frame = raw["frame_size"]
    if not (isinstance(frame, list) and len(frame) == 2
            and all(isinstance(x, int) and x > 0 and x % 28 == 0 for x in frame)):
        raise PresetError(f"{path}: frame_size must be [H, W], positive multiples of 28")
    return ProjectPreset(**{k: raw[k] for k in _TOP}, unverified=tuple(raw["unverified"]),
                         protocol=dataclasses.asdict(pcfg), sampling=sampling,
                         frame_size=(frame[0], frame[1]), path=path)


def _check(p: Preset) -> None:
    f = p.frames
    if f.initial_per_video > f.candidates_per_video or f.initial_per_video < 1:
        raise PresetError(f"{p.path}: [frames] initial_per_video={f.initial_per_video} must be "
                          f"in 1..candidates_per_video={f.candidates_per_video}")
    if f.max_per_call < 1 or p.budget.max_tool_calls < 0:
        raise PresetError(f"{p.path}: [frames].max_per_call and [budget].max_tool_calls must be "
                          "positive")
    if p.memory.rule == "latest_tool_images" and not p.memory.strip_marker:
        raise PresetError(f"{p.path}: [memory] rule latest_tool_images needs a strip_marker")
    if p.memory.rule == "latest_tool_images" and not p.tool_response.ok.count(
            p.memory.strip_marker) == 1:
        raise PresetError(f"{p.path}: [tool_response].ok must contain [memory].strip_marker once")
    if p.first_turn.text.count("{frames}") != 1:
        raise PresetError(f"{p.path}: [first_turn].text must contain {{frames}} exactly once")
    if p.pixels.video_fps <= 0:
        raise PresetError(f"{p.path}: [pixels].video_fps must be positive")
