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


def generate_turn(hf_model, proc, text: str, images, video, *, max_new_tokens: int,
                  stop_ids: list[int], suppress: list[int]) -> np.ndarray:
    """One greedy turn with transformers' `generate` on a fully re-rendered prompt (the
    release's loop, which re-prefills the whole prompt every turn). Returns the new ids (the stop
    token included)."""
    kw = {"text": [text], "return_tensors": "pt"}
    if images:
        kw["images"] = list(images)
    if video is not None:
        kw["videos"] = [list(video)]
    inputs = dict(proc(**kw))
    inputs.pop("video_metadata", None)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stop_ids, pad_token_id=stop_ids[-1],
                                suppress_tokens=suppress)
    return out[0, n:].numpy()


# --------------------------------------------------------------------------- a tiny release setup

TINY_H, TINY_W = 56, 84  # frames at a multiple of 28: no processor stage resizes them
# the tiny config's vision ids (502, 503, 505, 506) fix where Qwen's special tokens sit
SPECIALS_AT_500 = ("<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                   "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|im_end|>",
                   "<tool_call>", "</tool_call>")
CALLS = ([12, 60, 3], [1, 49], [96, 48, 30, 2])  # the scripted select_frames calls


def tiny_tokenizer_json(path: str, corpus: list[str]) -> str:
    """A byte-level BPE tokenizer.json with Qwen's special tokens at the tiny config's ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel
                                  .alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 30, trainer)
    tok.add_tokens([f"<|fill_{i}|>" for i in range(500 - tok.get_vocab_size())])
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS_AT_500])
    assert tok.token_to_id("<|image_pad|>") == 505 and tok.token_to_id("<|video_pad|>") == 506
    tok.save(path)
    return path


def tiny_release_checkpoint(directory: str, chat_template: str, seed: int = 7):
    """A random tiny Qwen2.5-VL saved as a Hugging Face directory with a tokenizer.json and the
    chat template; returns the transformers model."""
    import json as _json

    from tests import hf_reference
    from vrthinker_jax.models import config as config_lib
    from vrthinker_jax.rollout import presets, render

    hf = hf_reference.build_hf_model(config_lib.get_config("tiny"), seed=seed)
    hf.save_pretrained(directory)
    tiny_tokenizer_json(os.path.join(directory, "tokenizer.json"),
                        [presets.load("vr-thinker").first_turn.text, render.NOUS_TOOLS_BLOCK])
    with open(os.path.join(directory, "chat_template.json"), "w") as f:
        _json.dump({"chat_template": chat_template}, f)
    return hf


def tiny_preset(turn_tokens: int, name: str = "vr-thinker"):
    """A shipped preset with pixel budgets that keep TINY_H x TINY_W frames as they are."""
    import dataclasses

    from vrthinker_jax.rollout import presets

    p = presets.load(name)
    px = dataclasses.replace(p.pixels, initial_min_pixels=TINY_H * TINY_W,
                             initial_max_pixels=TINY_H * TINY_W, square_side=0,
                             video_max_pixels=TINY_H * TINY_W, image_max_pixels=TINY_H * TINY_W)
    return dataclasses.replace(p, pixels=px, budget=dataclasses.replace(
        p.budget, max_new_tokens=turn_tokens))


def script(row: int, turn: int, text: str) -> str:
    """A random model never calls the tool: its text is wrapped into a well-formed turn with a
    scripted call (CALLS[turn]); the turn after the last call answers \\boxed{row + 1}."""
    import json as _json

    head = f"<synthesis>{text}</synthesis>\n<think>row {row} turn {turn}</think>"
    if turn < len(CALLS):
        call = _json.dumps({"name": "select_frames", "arguments": {"target_frames": CALLS[turn]}})
        return f"{head}<recommend answer>OA=1</recommend answer><tool_call>{call}</tool_call>"
    return f"{head}<final answer>TA=1, VQ=2, MQ=0, OA=2</final answer>\\boxed{{{row + 1}}}"


def release_loop(hf_model, proc, preset, tok, prompt: str, cands, row: int, *,
                 banned: list[int]) -> list[np.ndarray]:
    """The release's loop in transformers: every turn re-rendered from qwen-agent messages, the
    older tool images stripped, the processor call, greedy `generate`; scripted calls. Returns
    the generated ids of each turn. (The turn rewrite is `release.history_text`, whose rules
    are tested on their own.)"""
    from vrthinker_jax.rollout import release

    text = preset.first_turn.text.format(prompt=prompt, num_candidates=96, per_video=48,
                                         num_initial=8, frames="")
    msgs = release_first_messages(text, 8)
    video, latest, gen_prompt, out = cands[::12][:8], [], False, []
    stop = [tok.token_to_id(t) for t in ("</tool_call>", "<|im_end|>", "<|endoftext|>")]
    for turn in range(len(CALLS) + 1):
        rendered = strip_old(proc.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=gen_prompt))
        ids = generate_turn(hf_model, proc, rendered, latest, video,
                            max_new_tokens=preset.budget.max_new_tokens, stop_ids=stop,
                            suppress=banned)
        out.append(ids)
        if turn == len(CALLS):
            break
        rsp = release.history_text(preset, script(row, turn, tok.decode([int(i) for i in ids])))
        frames = [f - 1 for f in CALLS[turn]]
        msgs += tool_turn(rsp, len(frames))
        latest, gen_prompt = [cands[f] for f in frames], True
    return out


def preset_processor(preset, tokenizer_json: str, chat_template: str):
    px = preset.pixels
    return make_processor(tokenizer_json, chat_template, image_min=px.image_min_pixels,
                          image_max=px.image_max_pixels, video_min=px.video_min_pixels,
                          video_max=px.video_max_pixels, fps=px.video_fps)


def vrthinker_first_messages(preset, prompt: str) -> tuple[list[dict], list[int]]:
    """The `vrthinker` preset's first prompt built by hand in Hugging Face's message format:
    qwen-agent's tools block after the system text, the 8 initial frames as images before the
    text. Returns the messages and the 0-based candidates of those images."""
    nous, schema = qwen_agent_modules()
    system = nous.NousFnCallPrompt().preprocess_fncall_messages(
        messages=[schema.Message(role="system",
                                 content=[schema.ContentItem(text=preset.system.text)])],
        functions=[preset.tool.function()], lang=None)[0].model_dump()
    images = [16, 48, 80, 112, 144, 176, 208, 240]  # centres of 4 parts of each 128
    return [system, {"role": "user", "content": [{"type": "image"} for _ in images]
                     + [{"type": "text", "text": f"Text prompt: {prompt}"}]}], images


def keep_all_loop(hf_model, proc, preset, tok, prompt: str, cands, row: int, *,
                  banned: list[int]) -> list[np.ndarray]:
    """The `vrthinker` preset's loop in transformers, built by hand from its (partly
    unverified) layout: qwen-agent's tools block in the system turn, the initial frames as
    images before the text, turns fed back verbatim, every response keeping its images; the
    whole prompt re-rendered and `generate`d each turn. Returns each turn's generated ids."""
    msgs, images = vrthinker_first_messages(preset, prompt)
    stop = [tok.token_to_id(t) for t in ("</tool_call>", "<|im_end|>", "<|endoftext|>")]
    out = []
    for turn in range(len(CALLS) + 1):
        rendered = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = generate_turn(hf_model, proc, rendered, [cands[i] for i in images], None,
                            max_new_tokens=preset.budget.max_new_tokens, stop_ids=stop,
                            suppress=banned)
        out.append(ids)
        if turn == len(CALLS):
            break
        text = script(row, turn, tok.decode([int(i) for i in ids]))
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        msgs.append({"role": "user", "content": [{"type": "text", "text": preset.tool_response.ok}]
                     + [{"type": "image"} for _ in CALLS[turn]]})
        images += [f - 1 for f in CALLS[turn]]
    return out
