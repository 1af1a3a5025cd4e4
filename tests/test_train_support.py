"""Shared fixtures-as-functions for the training tests (no tests here).

A byte-level tokenizer with the Qwen special tokens at the tiny model's ids, synthetic
vrthinker_cot traces built with the protocol's own formatters, and random frame banks.
"""

from __future__ import annotations

import os
import re
import sys

import ml_collections
import numpy as np

from vrthinker_jax.rollout import protocol
from vrthinker_jax.train import steps

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if REPO not in sys.path:  # experiments/ is not an installed package
    sys.path.insert(0, REPO)

# One static shape and optimizer for every tiny-model training test, so they share one compile
# (steps.step_fn caches per graph, spec, optimizer config and shapes).
SEQ_LEN, MAX_FRAMES, BATCH = 704, 6, 4
# eps 1e-3: Adam's update is then Lipschitz in the gradient, so reduction-order noise between
# the sharded and single-device programs cannot flip the sign of a near-zero element's update.
OPT = steps.optimizer_config(lr=3e-3, warmup_steps=0, total_steps=100, eps=1e-3)

SPECIALS = {
    "<|im_start|>": 500,
    "<|im_end|>": 501,
    "<|vision_start|>": 502,
    "<|vision_end|>": 503,
    "<|endoftext|>": 504,
    "<|image_pad|>": 505,
    "<|video_pad|>": 506,
}
_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; special tokens are single ids (the tiny model's vocab 512)."""

    vocab_size = 512

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in _SPLIT.split(text):
            if piece in SPECIALS:
                out.append(SPECIALS[piece])
            elif piece:
                out += list(piece.encode("utf-8"))
        return out

    def decode(self, ids) -> str:
        inv = {v: k for k, v in SPECIALS.items()}
        buf, out = bytearray(), []
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode("utf-8", "replace") + inv.get(i, ""))
                buf = bytearray()
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> int:
        return SPECIALS[token]


def tiny_protocol(**kw) -> protocol.ProtocolConfig:
    args = dict(num_candidates=8, num_initial_frames=2, max_turns=3, max_frames_per_call=3,
                memory_window=6, system_prompt="Judge.")
    args.update(kw)
    return protocol.ProtocolConfig(**args)


def stage_config(stage: str):
    """The tiny config of `stage` ('sft' | 'rft' | 'grpo') with the tests' protocol (memory
    window 4), sequence and frame sizes, optimizer, and a single-device mesh (the compiled step
    is shared across test files). Returns (ConfigDict, ProtocolConfig)."""
    import importlib

    cfg = importlib.import_module(f"experiments.configs.{stage}").get_config("tiny")
    pcfg = tiny_protocol(memory_window=4)
    cfg.protocol = ml_collections.ConfigDict(
        {f: getattr(pcfg, f) for f in pcfg.__dataclass_fields__})
    cfg.data.update(dict(seq_len=SEQ_LEN, max_frames=MAX_FRAMES))
    cfg.optimizer = OPT.copy_and_resolve_references()
    cfg.mesh.ici = {}
    cfg.progress = False
    return cfg, pcfg


def make_trace(rng: np.random.Generator, pcfg: protocol.ProtocolConfig, idx: int,
               tool_calls: int = 1) -> dict:
    """A well-formed trace with `tool_calls` select_frames calls and a final answer."""
    labels = {k: int(rng.integers(0, 3)) for k in protocol.LABEL_KEYS}
    turns = []
    for _ in range(tool_calls):
        frames = sorted(rng.choice(pcfg.total_frames, size=2, replace=False) + 1)
        turns.append({"role": "assistant",
                      "content": protocol.format_tool_turn("s", "t", labels, frames)})
        turns.append({"role": "tool", "frames": [int(f) for f in frames]})
    turns.append({"role": "assistant", "content": protocol.format_final_turn("s", "t", labels)})
    return {"id": f"t{idx}", "prompt": f"cat {idx}", "video_a": "a.mp4", "video_b": "b.mp4",
            "labels": labels, "num_candidates": pcfg.num_candidates, "turns": turns}


def make_bank(rng: np.random.Generator, pcfg: protocol.ProtocolConfig,
              frame_size=(56, 56)) -> np.ndarray:
    return rng.integers(0, 256, (pcfg.total_frames, *frame_size, 3), dtype=np.uint8)


def make_batch(rng: np.random.Generator, pcfg: protocol.ProtocolConfig, tok,
               n: int = BATCH) -> dict:
    """A collated host batch of n one-call traces (SEQ_LEN tokens, MAX_FRAMES frames)."""
    from vrthinker_jax.train import examples

    return examples.collate([
        examples.trace_to_example(make_trace(rng, pcfg, i), make_bank(rng, pcfg), tok,
                                  pcfg=pcfg, seq_len=SEQ_LEN, max_frames=MAX_FRAMES,
                                  merged_grid=(2, 2))
        for i in range(n)
    ])
