"""Test-only reference: the release's prompt building (E = experience_maker.py of the
VR-Thinker release) with qwen-agent and transformers' Qwen2_5_VLProcessor, written from the
release code, independently of `vrthinker_jax.rollout.render`.

transformers' video processor imports torchvision, which this environment cannot load (the CPU
torch wheel has no matching torchvision), so the processor gets a stand-in video processor made
of transformers' own video `smart_resize` and `patchify` (read from its source) over frames
normalised by the PIL image processor: the same arithmetic, minus the torchvision resize kernel
(the tests feed frames already at a multiple of 28 within the budget, where no resize happens).
"""

from __future__ import annotations

import ast
import math
import os
import pathlib
import sys
import types

import numpy as np
import torch
import transformers

# The release's tool (E:47-67).
SELECT_FRAMES = {
    "name": "select_frames",
    "description": "Select frames from a video.",
    "parameters": {
        "type": "object",
        "properties": {
            "target_frames": {
                "type": "array",
                "description": "List of frame indices to select from the video (no more than 8 "
                               "frames in total).",
                "items": {"type": "integer", "description": "Frame index from 1 to 96."},
            }
        },
        "required": ["target_frames"],
    },
}
MARKER = "After selecting frames:"


def qwen_agent_modules():
    """qwen-agent's NousFnCallPrompt and schema, imported without the package __init__s (they
    pull in API clients this test does not need)."""
    import importlib.util

    if not getattr(sys.modules.get("qwen_agent"), "__stub__", False):
        spec = importlib.util.find_spec("qwen_agent")
        root = pathlib.Path(spec.submodule_search_locations[0])
        for name, sub in (("qwen_agent", ""), ("qwen_agent.llm", "llm"),
                          ("qwen_agent.llm.fncall_prompts", "llm/fncall_prompts")):
            mod = types.ModuleType(name)
            mod.__path__ = [str(root / sub) if sub else str(root)]
            mod.__stub__ = True
            sys.modules[name] = mod
    nous = importlib.import_module("qwen_agent.llm.fncall_prompts.nous_fncall_prompt")
    schema = importlib.import_module("qwen_agent.llm.schema")
    return nous, schema


def release_first_messages(prompt_text: str, n_frames: int) -> list[dict]:
    """E:1233-1265: system "You are a helpful assistant." + the Nous tools block, user [video,
    text]; returned as qwen-agent's model_dump gives them."""
    nous, schema = qwen_agent_modules()
    msgs = [schema.Message(role="system",
                           content=[schema.ContentItem(text="You are a helpful assistant.")]),
            schema.Message(role="user", content=[
                schema.ContentItem(video=[f"frame{i}.jpg" for i in range(n_frames)]),
                schema.ContentItem(text=prompt_text)])]
    msgs = nous.NousFnCallPrompt().preprocess_fncall_messages(
        messages=msgs, functions=[SELECT_FRAMES], lang=None)
    return [m.model_dump() for m in msgs]


def tool_turn(rsp: str, n_images: int) -> list[dict]:
    """E:2449-2588: the assistant turn (as rebuilt) and the user turn with the frames."""
    return [dict(role="assistant", content=[dict(type="text", text=rsp)]),
            dict(role="user", content=[dict(type="text", text="\n" + MARKER +
                                            " Here are the selected frames")]
                 + [dict(type="image", image=f"sel{i}.jpg") for i in range(n_images)])]


def strip_old(prompt: str) -> str:
    """E:2617-2622."""
    parts = prompt.split(MARKER)
    if len(parts) > 2:
        for i, chunk in enumerate(parts[1:-1]):
            parts[i + 1] = (chunk.replace("<|image_pad|>", "").replace("<|vision_end|>", "")
                            .replace("<|vision_start|>", ""))
        prompt = MARKER.join(parts)
    return prompt


def _video_source_functions():
    path = (pathlib.Path(transformers.__file__).parent / "models" / "qwen2_vl"
            / "video_processing_qwen2_vl.py")
    wanted = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == "smart_resize":
            wanted.append(node)
        if isinstance(node, ast.ClassDef) and node.name == "Qwen2VLVideoProcessor":
            wanted += [i for i in node.body
                       if isinstance(i, ast.FunctionDef) and i.name == "patchify"]
    assert len(wanted) == 2, "transformers' video processor source changed"
    ns = {"torch": torch, "math": math}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), ns)
    return ns["smart_resize"], ns["patchify"]


class StandInVideoProcessor:
    """transformers' video arithmetic without torchvision (see the module docstring)."""

    merge_size = 2
    temporal_patch_size = 2
    patch_size = 14

    def __init__(self, image_processor_cls, min_pixels: int, max_pixels: int, fps: float):
        self.image_processor_cls = image_processor_cls
        self.min_pixels, self.max_pixels, self.fps = min_pixels, max_pixels, fps
        self.resize, self.patchify = _video_source_functions()

    def __call__(self, videos, **kwargs):
        pixel, grids, meta = [], [], []
        for video in videos:
            frames = np.stack([np.asarray(f) for f in video])
            h, w = self.resize(frames.shape[1], frames.shape[2], 28, self.min_pixels,
                               self.max_pixels)
            assert (h, w) == frames.shape[1:3], "stand-in: frames must need no resize"
            ip = self.image_processor_cls(min_pixels=h * w, max_pixels=h * w)
            per_frame = []
            for f in frames:
                flat = ip(images=[f], return_tensors="np")["pixel_values"]
                g = flat.reshape(h // 28, w // 28, 2, 2, 3, 2, 14, 14)[:, :, :, :, :, 0]
                per_frame.append(g.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, h, w))
            x = np.stack(per_frame)
            if len(x) % 2:
                x = np.concatenate([x, x[-1:]])
            out, gt, gh, gw = self.patchify(None, torch.from_numpy(x[None]), patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
            pixel.append(out[0].numpy())
            grids.append([gt, gh, gw])
            meta.append(types.SimpleNamespace(sampled_fps=self.fps))
        return transformers.BatchFeature({"pixel_values_videos": np.concatenate(pixel),
                                          "video_grid_thw": np.asarray(grids, np.int64),
                                          "video_metadata": meta})


def make_processor(tokenizer_json: str, chat_template: str, *, image_min: int, image_max: int,
                   video_min: int, video_max: int, fps: float):
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)
    ip = Qwen2VLImageProcessorPil(min_pixels=image_min, max_pixels=image_max)
    vp = StandInVideoProcessor(Qwen2VLImageProcessorPil, video_min, video_max, fps)
    proc = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    # ProcessorMixin checks its sub-processors' classes; set the attributes it reads directly
    proc.image_processor, proc.tokenizer, proc.video_processor = ip, tok, vp
    proc.chat_template = chat_template
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    proc.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
    return proc


def processor_inputs(proc, text: str, images, video) -> dict:
    """The processor call on one rendered prompt: HF-named numpy arrays."""
    kw = {"text": [text], "return_tensors": "np"}
    if images:
        kw["images"] = list(images)
    if video is not None:
        kw["videos"] = [list(video)]
    out = proc(**kw)
    return {k: np.asarray(v) for k, v in out.items() if k != "video_metadata"}


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
