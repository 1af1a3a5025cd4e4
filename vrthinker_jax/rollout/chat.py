"""Segments -> token ids, shared by rollout and training so both see the same tokens.

A frame becomes `<|vision_start|>` + `tokens_per_frame` x `<|image_pad|>` + `<|vision_end|>`.
Text is encoded piece by piece (one `encode` call per segment), which is also how the rollout
engine appends environment responses, so training on a trace reproduces rollout tokenisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from vrthinker_jax.rollout import memory, protocol

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


@dataclasses.dataclass(frozen=True)
class VisionTokens:
    """Ids of the tokens that frame a picture in the text."""

    start: int
    end: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> VisionTokens:
        return cls(
            tokenizer.token_to_id(VISION_START),
            tokenizer.token_to_id(VISION_END),
            tokenizer.token_to_id(IMAGE_PAD),
        )


STRUCTURAL = (VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, "<|video_pad|>")


def structural_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the vision markers and pads the tokenizer has: the environment writes them, the
    model never may (a sampled `<|image_pad|>` would be taken for a frame by a learner that
    looks for pads, and shifts every later frame of its row). A tokenizer without one of them
    cannot produce it."""
    out = []
    for t in STRUCTURAL:
        try:
            tid = tokenizer.token_to_id(t)
        except KeyError:
            continue
        if tid is not None:
            out.append(int(tid))
    return tuple(out)


@dataclasses.dataclass
class Tokenized:
    """A tokenised conversation (one row, unpadded).

    ids: int32 [n]; trainable: bool [n] (model-produced tokens, the loss mask);
    frame_of_token: int32 [n] (frame occurrence id for image-pad tokens, -1 otherwise);
    frames: global frame number of each occurrence; event_starts: token index where each event
    (first prompt, then each environment response) starts; frames_per_event: frames it brought.
    """

    ids: np.ndarray
    trainable: np.ndarray
    frame_of_token: np.ndarray
    frames: list[int]
    event_starts: list[int]
    frames_per_event: list[int]
    # bool [n]: model-produced tokens inside <synthesis>...</synthesis> (what the model reports
    # of the frames it has seen; SFT may weight them: data.synthesis_weight)
    in_synthesis: np.ndarray | None = None

    def loss_weights(self, synthesis_weight: float = 1.0) -> np.ndarray:
        """float32 [n]: 1 on trainable tokens (`synthesis_weight` inside a synthesis), else 0."""
        w = self.trainable.astype(np.float32)
        if synthesis_weight != 1.0 and self.in_synthesis is not None:
            w[self.in_synthesis & self.trainable] = synthesis_weight
        return w

    def visible_until(self, window: int) -> np.ndarray:
        return memory.visible_until(
            self.frame_of_token, self.event_starts, self.frames_per_event, window
        )

    def positions(self, merged_grid: tuple[int, int], start: int = 0) -> tuple[np.ndarray, int]:
        """M-RoPE positions of this piece; see `mrope_positions`."""
        return mrope_positions(self.frame_of_token, merged_grid, start)


def tokenize_segments(
    tokenizer, segments: Sequence[protocol.Segment], tokens_per_frame: int
) -> Tokenized:
    vt = VisionTokens.from_tokenizer(tokenizer)
    ids: list[int] = []
    trainable: list[bool] = []
    frame_of: list[int] = []
    frames: list[int] = []
    event_starts = [0]
    per_event = [0]
    in_syn: list[bool] = []
    for seg in segments:
        if isinstance(seg, protocol.Frame):
            occ = len(frames)
            frames.append(seg.index)
            per_event[-1] += 1
            ids += [vt.start] + [vt.pad] * tokens_per_frame + [vt.end]
            trainable += [False] * (tokens_per_frame + 2)
            in_syn += [False] * (tokens_per_frame + 2)
            frame_of += [-1] + [occ] * tokens_per_frame + [-1]
            continue
        if seg.starts_event:
            event_starts.append(len(ids))
            per_event.append(0)
        piece = list(tokenizer.encode(seg.text)) if seg.text else []
        if seg.trainable:
            in_syn += _inside(tokenizer, piece, seg.text, protocol.SYNTHESIS_TAGS)
        else:
            in_syn += [False] * len(piece)
        ids += piece
        trainable += [seg.trainable] * len(piece)
        frame_of += [-1] * len(piece)
    return Tokenized(
        ids=np.asarray(ids, np.int32),
        trainable=np.asarray(trainable, bool),
        frame_of_token=np.asarray(frame_of, np.int32),
        frames=frames,
        event_starts=event_starts,
        frames_per_event=per_event,
        in_synthesis=np.asarray(in_syn, bool),
    )


def _inside(tokenizer, ids: list[int], text: str, tags: tuple[str, str]) -> list[bool]:
    """Which tokens of `ids` (= encode(text)) fall inside a tags[0] ... tags[1] span of `text`
    (the tags themselves excluded): token k covers the characters its prefix decode adds."""
    open_tag, close_tag = tags
    spans, at = [], 0
    while (a := text.find(open_tag, at)) >= 0:
        b = text.find(close_tag, a)
        b = len(text) if b < 0 else b
        spans.append((a + len(open_tag), b))
        at = b + len(close_tag)
    if not spans:
        return [False] * len(ids)
    out, prev = [], 0
    for k in range(len(ids)):
        end = len(tokenizer.decode(ids[: k + 1]))
        out.append(any(prev < hi and end > lo for lo, hi in spans))
        prev = end
    return out


def mrope_positions(
    frame_of_token: np.ndarray, merged_grid: tuple[int, int], start: int = 0
) -> tuple[np.ndarray, int]:
    """M-RoPE (t, h, w) positions of a token run whose frames are images of one size.

    The rule of transformers' Qwen2.5-VL `get_rope_index` for images of grid (1, h, w): a text
    token takes the running index on all three axes; a frame whose visual tokens begin when the
    running index is s puts its merged token (i, j) at (s, s + i, s + j), and the text after it
    resumes at s + max(rows, cols). Positions of a piece appended to a conversation are the
    piece's own positions shifted by the conversation's next position, so the rollout computes
    each inserted segment alone with `start` = that row's next position.

    Args:
      frame_of_token: int32 [n]; frame occurrence id of each visual token, -1 for text. The
        tokens of one frame are contiguous (rows x cols of them).
      merged_grid: (rows, cols) of a frame's visual tokens after the spatial merge.
      start: position of the first token.
    Returns:
      (positions int32 [3, n], next position after the run).
    """
    rows, cols = merged_grid
    per_frame = rows * cols
    f = np.asarray(frame_of_token)
    n = f.shape[0]
    idx = np.arange(n)
    # runs of one occurrence id; each frame is per_frame consecutive tokens of its run
    # (vectorised: the rollout computes this for every served row of every insert)
    vis = f >= 0
    run_start = vis & np.concatenate([[True], f[1:] != f[:-1]])
    run_end = vis & np.concatenate([f[1:] != f[:-1], [True]])  # last token of a run
    starts, ends = np.nonzero(run_start)[0], np.nonzero(run_end)[0] + 1
    bad = (ends - starts) % per_frame != 0
    if bad.any():
        r = int(np.argmax(bad))
        i = int(starts[r] + (ends[r] - starts[r]) // per_frame * per_frame)
        raise ValueError(
            f"frame occurrence {f[i]} at token {i} does not have {per_frame} contiguous tokens"
        )
    k = (idx - np.maximum.accumulate(np.where(run_start, idx, 0))) % per_frame  # within frame
    # a text token advances the running index by 1, a frame by max(rows, cols) after its last
    # token; each token sits at the index before its own advance
    adv = np.where(vis, np.where(k == per_frame - 1, max(rows, cols), 0), 1)
    cur = int(start) + np.cumsum(adv) - adv
    pos = np.stack([cur, cur + np.where(vis, k // cols, 0), cur + np.where(vis, k % cols, 0)])
    return pos.astype(np.int32), int(start) + int(adv.sum())
