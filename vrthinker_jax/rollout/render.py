"""Conversations rendered and tokenized the way Hugging Face does for a published checkpoint.

The text comes from the checkpoint's own chat template (jinja, read from its
`chat_template.jinja` / `chat_template.json` / `tokenizer_config.json`, rendered in a sandbox
with the options `apply_chat_template` uses); each `<|image_pad|>` / `<|video_pad|>`
placeholder is expanded to its item's merged patch count and the whole text is tokenized in
one pass, as `Qwen2_5_VLProcessor.__call__` does. Pixels go through `data_pipelines.processor`
(Qwen `smart_resize` within the preset's pixel budgets, aspect kept; an initial video through
the video path: temporal patch 2, `second_per_grid_ts` = 2 / fps).

Messages are Hugging Face chat messages: `{"role": ..., "content": [{"type": "text", "text":
...}, {"type": "image", "image": k}, {"type": "video", "video": 0}]}` where an image's value is
its index into `Conversation.images`. The release's memory rule ("only the latest tool response
keeps its images") is applied to the rendered text (:func:`strip_old_tool_images`), as the
release does it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from data_pipelines import processor as proc
from vrthinker_jax.rollout import presets

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
IMAGE_ITEM = VISION_START + IMAGE_PAD + VISION_END
VIDEO_ITEM = VISION_START + VIDEO_PAD + VISION_END

# qwen-agent's `NousFnCallPrompt` tools block (FN_CALL_TEMPLATE), which the release appends to
# the system turn after "\n\n"; tests compare it with qwen-agent's own rendering.
NOUS_TOOLS_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tool_descs}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


class TemplateError(ValueError):
    """A chat template is missing or does not render (the message names the file)."""


# --------------------------------------------------------------------------- chat template


def find_chat_template(directory: str) -> str:
    """The chat template of a checkpoint directory, looked up as transformers does: the
    processor's `chat_template.jinja`, then `chat_template.json`, then the tokenizer config."""
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
        except (OSError, ValueError, AttributeError) as e:
            raise TemplateError(f"{path}: cannot read chat_template ({e})") from None
        if isinstance(template, list):  # named templates: transformers takes "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
    raise TemplateError(f"{directory}: no chat template (looked for chat_template.jinja, "
                        "chat_template.json and tokenizer_config.json's chat_template)")


class ChatTemplate:
    """A jinja chat template rendered as `apply_chat_template` renders it (sandboxed
    environment, trim_blocks, lstrip_blocks, loop controls, `tojson`, `raise_exception`)."""

    def __init__(self, source: str, origin: str = "<template>"):
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(f"{origin}: the chat template raised: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        self.origin = origin
        self.source = source
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"{origin}: chat template does not parse ({e})") from None

    @classmethod
    def from_dir(cls, directory: str) -> ChatTemplate:
        return cls(find_chat_template(directory), origin=directory)

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
        return self._template.render(messages=list(messages),
                                     add_generation_prompt=add_generation_prompt)


# --------------------------------------------------------------------------- system turn


def nous_tools_block(functions: Sequence[dict]) -> str:
    """The Nous tools block for these function dicts (name, description, parameters)."""
    descs = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False)
                      for f in functions)
    return NOUS_TOOLS_BLOCK.format(tool_descs=descs)


def system_text(preset: presets.Preset) -> str:
    """The system turn's text: the preset's text, then the tools block if it has one."""
    if preset.system.tools_block == "nous":
        return preset.system.text + "\n\n" + nous_tools_block([preset.tool.function()])
    return preset.system.text


# --------------------------------------------------------------------------- conversation


@dataclasses.dataclass
class Conversation:
    """Chat messages and the pixels their visual items refer to.

    images: uint8 [H, W, 3] per image item, in order of appearance; video: uint8 [T, H, W, 3]
    (the initial frames shown as one video) or None.
    """

    messages: list[dict]
    images: list[np.ndarray]
    video: np.ndarray | None = None
    # preprocessed pixels by item ("video" or an image's index): a rollout renders the same
    # conversation again every turn, and its frames do not change
    patches: dict = dataclasses.field(default_factory=dict, repr=False)

    def add_image(self, frame: np.ndarray) -> dict:
        self.images.append(frame)
        return {"type": "image", "image": len(self.images) - 1}


def strip_old_tool_images(text: str, marker: str) -> tuple[str, list[bool]]:
    """The release's memory rule on rendered text: of the chunks that start with `marker` (one
    per tool response), all but the last lose their vision tokens; the text before the first
    marker keeps them. Returns the text and, per image placeholder of `text` in order, whether
    it is kept."""
    chunks = text.split(marker)
    keep: list[bool] = []
    for i, chunk in enumerate(chunks):
        n = chunk.count(IMAGE_ITEM)
        strip = 0 < i < len(chunks) - 1
        keep += [not strip] * n
        if strip:
            chunks[i] = (chunk.replace(IMAGE_PAD, "").replace(VISION_END, "")
                         .replace(VISION_START, ""))
    return marker.join(chunks), keep


# --------------------------------------------------------------------------- pixels


def resize_to_budget(frame: np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] with (h, w) = smart_resize within the budget (PIL
    bicubic), as qwen_vl_utils' `fetch_image` resizes a frame before the processor sees it."""
    size = proc.smart_resize(*frame.shape[:2], 28, min_pixels, max_pixels)
    return proc.resize_uint8(frame, size)


def square(frame: np.ndarray, side: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [side, side, 3] (PIL bicubic; aspect not kept)."""
    return proc.resize_uint8(frame, (side, side))


def prepare_frame(frame: np.ndarray, preset: presets.Preset, *, initial: bool) -> np.ndarray:
    """The host-side resize a frame gets before the processor: the preset's square resize, or
    for an initial frame the data loader's pixel budget."""
    px = preset.pixels
    if px.square_side > 0:
        return square(frame, px.square_side)
    if initial:
        return resize_to_budget(frame, px.initial_min_pixels, px.initial_max_pixels)
    return frame


def processor_cfg(preset: presets.Preset):
    px = preset.pixels
    return proc.processor_config(min_pixels=px.image_min_pixels, max_pixels=px.image_max_pixels,
                                 video_min_pixels=px.video_min_pixels,
                                 video_max_pixels=px.video_max_pixels)


# --------------------------------------------------------------------------- model inputs


@dataclasses.dataclass
class ModelInputs:
    """What the model sees, under the transformers processor's names.

    input_ids int64 [1, L]; pixel_values float32 [patches, 3*2*14*14]; image_grid_thw int64
    [images, 3]; pixel_values_videos float32 [patches, 1176]; video_grid_thw int64 [videos, 3];
    second_per_grid_ts float32 [videos] (empty arrays where there are none); text: the rendered
    conversation (placeholders not expanded).
    """

    input_ids: np.ndarray
    pixel_values: np.ndarray
    image_grid_thw: np.ndarray
    pixel_values_videos: np.ndarray
    video_grid_thw: np.ndarray
    second_per_grid_ts: np.ndarray
    text: str

    def arrays(self) -> dict[str, np.ndarray]:
        d = dataclasses.asdict(self)
        d["text"] = np.asarray(self.text)
        return d


def _expand(text: str, pad: str, counts: Sequence[int]) -> str:
    pieces = text.split(pad)
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"render: {len(pieces) - 1} {pad} placeholders for {len(counts)} items")
    out = [pieces[0]]
    for n, piece in zip(counts, pieces[1:]):
        out += [pad * n, piece]
    return "".join(out)


def _patches(conv: Conversation, kept: Sequence[int], preset: presets.Preset):
    """(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts)
    of the kept images and the video, each item preprocessed once per conversation."""
    cfg = processor_cfg(preset)
    width = 3 * cfg.temporal_patch_size * cfg.patch_size**2
    for i in kept:
        if i not in conv.patches:
            conv.patches[i] = proc.preprocess_images([conv.images[i]], cfg)
    pv = np.concatenate([conv.patches[i][0] for i in kept] or [np.zeros((0, width), np.float32)])
    grid = np.concatenate([conv.patches[i][1] for i in kept] or [np.zeros((0, 3), np.int64)])
    if conv.video is None:
        return (pv, grid, np.zeros((0, width), np.float32), np.zeros((0, 3), np.int64),
                np.zeros((0,), np.float32))
    if "video" not in conv.patches:
        conv.patches["video"] = proc.preprocess_video(conv.video, preset.pixels.video_fps, cfg)
    return (pv, grid, *conv.patches["video"])


def encode(text: str, pixels: tuple, tokenizer, merge_size: int) -> ModelInputs:
    """Rendered text + its visual items' pixels (`_patches`) -> model inputs, as the processor
    call does: pads expanded to each item's merged patch count, one tokenization."""
    pv, grid, pvv, vgrid, seconds = pixels
    merge = merge_size**2
    expanded = _expand(text, IMAGE_PAD, [int(np.prod(g)) // merge for g in grid])
    expanded = _expand(expanded, VIDEO_PAD, [int(np.prod(g)) // merge for g in vgrid])
    ids = np.asarray([tokenizer.encode(expanded)], np.int64)
    return ModelInputs(ids, pv, grid, pvv, vgrid, seconds, text)


def render(
    conv: Conversation, preset: presets.Preset, template: ChatTemplate, tokenizer, *,
    add_generation_prompt: bool = True,
) -> ModelInputs:
    """The model inputs of a conversation under the preset (its memory rule applied)."""
    text = template.render(conv.messages, add_generation_prompt=add_generation_prompt)
    keep = [True] * text.count(IMAGE_ITEM)
    if preset.memory.rule == "latest_tool_images":
        text, keep = strip_old_tool_images(text, preset.memory.strip_marker)
    if len(keep) != len(conv.images):
        raise ValueError(f"render: the text has {len(keep)} images, the conversation "
                         f"{len(conv.images)} (a message text must not contain {IMAGE_ITEM})")
    kept = [i for i, k in enumerate(keep) if k]
    return encode(text, _patches(conv, kept, preset), tokenizer,
                  processor_cfg(preset).merge_size)
