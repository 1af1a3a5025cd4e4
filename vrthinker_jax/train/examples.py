"""Training rows: the one builder of every row a training step reads, and their batches.

Every row comes from `_row`, so a row from a trace on disk (the Grain pipeline), from a trace
whose frame bank is in memory (RFT, tests), from a rollout trajectory (GRPO) and a failed row
have the same keys, dtypes and shapes. One row (unbatched):

  tokens        int32 [seq]                  right-padded with `pad_id` (0)
  positions     int32 [3, seq]               M-RoPE positions (t, h, w), `chat.mrope_positions`:
                                             the rollout's own rule (transformers' rule for
                                             images, tests/test_rollout_units.py)
  valid         bool  [seq]                  real (non-padding) tokens
  loss_mask     bool  [seq]                  tokens the model produced (targets of the loss)
  loss_weight   float32 [seq]                SFT weight of each target token (0 off the mask;
                                             `synthesis_weight` inside a <synthesis>, else 1)
  visual        bool  [seq]                  a frame's visual tokens (the learner merges the
                                             frames there, never by the pad id)
  visible_until int32 [seq]                  memory-window visibility (rollout/memory.py)
  frames        uint8 [max_frames, H, W, 3]  the frame occurrences, in order
  frame_mask    bool  [max_frames]           slots holding a frame occurrence
  old_logp      float32 [seq]                rollout log-probs of generated tokens (0 elsewhere)
  weight        float32 []                   1, or 0 for a row that failed to build
  status        int32 []                     `OK` or why the row failed (`STATUS_NAMES`)
  failed        bool  []                     status != OK
  id            str                          the record's id ("" for padding)
  error         str                          why the row failed ("" when it did not)

A record that cannot become a row (it does not render, does not fit, its frames cannot be read)
becomes a failed row that trains on nothing and says why: it is counted and reported, never
dropped. `collate` stacks rows into a batch, positions as [3, batch, seq] (the model's layout)
and the strings as lists; `collate_prompts` does the same for GRPO / evaluation prompt rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from vrthinker_jax.rollout import chat, memory, protocol, sampler

# per-row status codes (row["status"]); failed = status != OK
OK = 0
DECODE_ERROR = 1  # a video could not be read, or a frame bank lacks the frames a record numbers
TOO_LONG = 2  # the conversation needs more than seq_len tokens or max_frames frames
INVALID_TRACE = 3  # the record does not render as a conversation under the protocol
PADDING = 4  # filler row that completes the last batch of a finite run
STATUS_NAMES = {OK: "ok", DECODE_ERROR: "decode_error", TOO_LONG: "too_long",
                INVALID_TRACE: "invalid_trace", PADDING: "padding"}

TEXT_KEYS = ("id", "error")  # per-row strings: lists in a batch, never sent to a device
PROMPT_TEXT_KEYS = ("id", "prompt", "error")


class ExampleTooLong(ValueError):
    """A conversation that does not fit the static sequence length (counted, not truncated)."""


class InvalidConversation(ValueError):
    """A record that does not render as a conversation under the protocol."""


class FramesUnavailable(ValueError):
    """The pixels of a conversation's frames cannot be had (undecodable video, short bank)."""


def _pad(x: np.ndarray, length: int, value=0, axis: int = -1) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return np.pad(x, pad, constant_values=value)


def _row(*, tokens, positions, loss_mask, loss_weight, visual, visible_until, old_logp,
         pixels: np.ndarray, seq_len: int, max_frames: int, status: int = OK, error: str = "",
         id: str = "") -> dict:  # noqa: A002
    """The one constructor of a row: unpadded arrays of length n (positions [3, n], pixels
    uint8 [k, H, W, 3]) padded to `seq_len` tokens and `max_frames` frame slots."""
    n, k = len(tokens), len(pixels)
    return {
        "tokens": _pad(np.asarray(tokens, np.int32), seq_len),
        "positions": _pad(np.asarray(positions, np.int32).reshape(3, n), seq_len),
        "valid": _pad(np.ones(n, bool), seq_len, False),
        "loss_mask": _pad(np.asarray(loss_mask, bool), seq_len, False),
        "loss_weight": _pad(np.asarray(loss_weight, np.float32), seq_len, 0.0),
        "visual": _pad(np.asarray(visual, bool), seq_len, False),
        "visible_until": _pad(np.asarray(visible_until, np.int32), seq_len, memory.NEVER),
        "frames": _pad(np.asarray(pixels, np.uint8), max_frames, 0, axis=0),
        "frame_mask": _pad(np.ones(k, bool), max_frames, False),
        "old_logp": _pad(np.asarray(old_logp, np.float32), seq_len),
        "weight": np.asarray(status == OK, np.float32),
        "status": np.asarray(status, np.int32),
        "failed": np.asarray(status != OK, bool),
        "id": str(id),
        "error": str(error),
    }


def failed_example(seq_len: int, max_frames: int, frame_shape: tuple[int, ...], *,
                   status: int = TOO_LONG, error: str = "", id: str = "") -> dict:  # noqa: A002
    """A row that trains on nothing (weight 0, no valid token) and says why: keeps the batch
    static and the failure counted.

    frame_shape: (H, W, 3) of a frame. status: why (default TOO_LONG, GRPO's over-long
    trajectories); error: the message; id: the record's id.
    """
    if status == OK:
        raise ValueError("failed_example: status OK is not a failure")
    empty = np.zeros(0)
    return _row(tokens=empty, positions=np.zeros((3, 0)), loss_mask=empty, loss_weight=empty,
                visual=empty, visible_until=empty, old_logp=empty,
                pixels=np.zeros((0, *frame_shape), np.uint8), seq_len=seq_len,
                max_frames=max_frames, status=status, error=error, id=id)


def check_fits(n_tokens: int, n_frames: int, *, seq_len: int, max_frames: int,
               what: str = "conversation") -> None:
    """Raises ExampleTooLong for a conversation over the static token or frame count."""
    if n_tokens > seq_len:
        raise ExampleTooLong(f"{what} has {n_tokens} tokens, more than seq_len={seq_len}")
    if n_frames > max_frames:
        raise ExampleTooLong(
            f"{what} shows {n_frames} frames, more than max_frames={max_frames}")


# --------------------------------------------------------------------------- traces -> rows


def trace_protocol(trace: Mapping, pcfg: protocol.ProtocolConfig) -> protocol.ProtocolConfig:
    """The protocol a trace was written under: `pcfg` with the trace's own `num_candidates`
    (its global frame numbers count that many candidates per video)."""
    n = int(trace.get("num_candidates") or pcfg.num_candidates)
    return pcfg if n == pcfg.num_candidates else dataclasses.replace(pcfg, num_candidates=n)


def _tokenize(segments: Callable[[], list], tokenizer,
              merged_grid: tuple[int, int]) -> chat.Tokenized:
    try:
        return chat.tokenize_segments(tokenizer, segments(), merged_grid[0] * merged_grid[1])
    except (ValueError, KeyError, TypeError) as e:  # what a malformed record raises
        raise InvalidConversation(str(e)) from e


def tokenize_trace(trace: Mapping, tokenizer, pcfg: protocol.ProtocolConfig,
                   merged_grid: tuple[int, int]) -> chat.Tokenized:
    """A vrthinker_cot trace as tokens (raises InvalidConversation if it does not render)."""
    return _tokenize(lambda: protocol.trace_segments(trace, trace_protocol(trace, pcfg)),
                     tokenizer, merged_grid)


def bank_pixels(bank: np.ndarray, total_frames: int) -> Callable[[Sequence[int]], np.ndarray]:
    """Pixels of global frame numbers (1-based, repeats allowed) looked up in a frame bank
    uint8 [total_frames, H, W, 3]; raises FramesUnavailable for a bank of another size."""

    def pixels_of(frames: Sequence[int]) -> np.ndarray:
        if bank.shape[0] != total_frames:
            raise FramesUnavailable(f"the frame bank has {bank.shape[0]} frames, the protocol "
                                    f"numbers {total_frames} (2 x num_candidates)")
        return bank[np.asarray(frames, np.int64) - 1]

    return pixels_of


def from_tokenized(
    t: chat.Tokenized, frame_pixels: np.ndarray, *, seq_len: int, max_frames: int, window: int,
    merged_grid: tuple[int, int], synthesis_weight: float = 1.0, id: str = "",  # noqa: A002
) -> dict[str, np.ndarray]:
    """A row from a tokenised conversation (raises ExampleTooLong when it does not fit).

    Args:
      frame_pixels: uint8 [len(t.frames), H, W, 3], the frame occurrences in order.
      window: the protocol's memory window (frames visible at once).
      merged_grid: (rows, cols) of a frame's visual tokens after the spatial merge.
      synthesis_weight: loss weight of the synthesis tokens (`data.synthesis_weight`).
    """
    check_fits(len(t.ids), len(t.frames), seq_len=seq_len, max_frames=max_frames)
    if frame_pixels.shape[0] != len(t.frames):
        raise ValueError(
            f"{frame_pixels.shape[0]} frame images for {len(t.frames)} frame occurrences"
        )
    pos, _ = chat.mrope_positions(t.frame_of_token, merged_grid)
    return _row(tokens=t.ids, positions=pos, loss_mask=t.trainable,
                loss_weight=t.loss_weights(synthesis_weight), visual=t.frame_of_token >= 0,
                visible_until=t.visible_until(window), old_logp=np.zeros(len(t.ids)),
                pixels=frame_pixels, seq_len=seq_len, max_frames=max_frames, id=id)


def _build(segments: Callable[[], list], pixels_of: Callable[[Sequence[int]], np.ndarray],
           tokenizer, *, pcfg: protocol.ProtocolConfig, seq_len: int, max_frames: int,
           merged_grid: tuple[int, int], synthesis_weight: float, id: str) -> dict:  # noqa: A002
    """segments -> tokens -> fit check -> pixels -> row; raises InvalidConversation,
    ExampleTooLong or FramesUnavailable. The fit is checked before the pixels are read, so
    an over-long trace never decodes its videos."""
    t = _tokenize(segments, tokenizer, merged_grid)
    check_fits(len(t.ids), len(t.frames), seq_len=seq_len, max_frames=max_frames)
    return from_tokenized(t, pixels_of(t.frames), seq_len=seq_len, max_frames=max_frames,
                          window=pcfg.memory_window, merged_grid=merged_grid,
                          synthesis_weight=synthesis_weight, id=id)


def example_or_failed(
    segments: Callable[[], list], pixels_of: Callable[[Sequence[int]], np.ndarray], tokenizer,
    *, pcfg: protocol.ProtocolConfig, seq_len: int, max_frames: int,
    merged_grid: tuple[int, int], frame_shape: tuple[int, ...], synthesis_weight: float = 1.0,
    id: str = "",  # noqa: A002
) -> dict:
    """A row, or a failed row saying why: what both the on-disk (Grain) and the in-memory
    pipelines call for each record, so their rows are the same.

    Args:
      segments: () -> the record's conversation segments (raising ValueError / KeyError /
        TypeError for a record that does not render: status INVALID_TRACE).
      pixels_of: global frame numbers -> uint8 [len, H, W, 3] (raising FramesUnavailable:
        status DECODE_ERROR). A conversation over seq_len / max_frames: status TOO_LONG.
      frame_shape: (H, W, 3) of a frame (the failed row's frame slots).
    """
    try:
        return _build(segments, pixels_of, tokenizer, pcfg=pcfg, seq_len=seq_len,
                      max_frames=max_frames, merged_grid=merged_grid,
                      synthesis_weight=synthesis_weight, id=id)
    except (InvalidConversation, ExampleTooLong, FramesUnavailable) as e:
        status = (INVALID_TRACE if isinstance(e, InvalidConversation) else
                  TOO_LONG if isinstance(e, ExampleTooLong) else DECODE_ERROR)
        return failed_example(seq_len, max_frames, frame_shape, status=status,
                              error=f"record {id!r}: {e}", id=id)


def bank_example(
    record: Mapping, bank: np.ndarray, tokenizer, *, pcfg: protocol.ProtocolConfig,
    seq_len: int, max_frames: int, merged_grid: tuple[int, int], synthesis_weight: float = 1.0,
    to_segments: Callable | None = None,
) -> dict:
    """A record whose frame bank uint8 [2N, H, W, 3] is in memory -> row or failed row.

    to_segments: (record, pcfg) -> conversation segments; None = a vrthinker_cot trace (under
    its own `num_candidates`, as the Grain pipeline reads it).
    """
    if to_segments is None:
        tp = trace_protocol(record, pcfg)
        segments = lambda: protocol.trace_segments(record, tp)  # noqa: E731
    else:
        tp = pcfg
        segments = lambda: to_segments(record, pcfg)  # noqa: E731
    rid = record.get("id")
    return example_or_failed(
        segments, bank_pixels(bank, tp.total_frames), tokenizer, pcfg=pcfg, seq_len=seq_len,
        max_frames=max_frames, merged_grid=merged_grid, frame_shape=bank.shape[1:],
        synthesis_weight=synthesis_weight, id="" if rid is None else str(rid))


def trace_to_example(
    trace: dict, bank: np.ndarray, tokenizer, *, pcfg: protocol.ProtocolConfig, seq_len: int,
    max_frames: int, merged_grid: tuple[int, int], synthesis_weight: float = 1.0,
) -> dict[str, np.ndarray]:
    """A vrthinker_cot trace + its candidate-frame bank uint8 [2N, H, W, 3] -> row.

    Raises InvalidConversation, ExampleTooLong or FramesUnavailable (all ValueErrors);
    `bank_example` returns a failed row instead.
    """
    tp = trace_protocol(trace, pcfg)
    return _build(lambda: protocol.trace_segments(trace, tp), bank_pixels(bank, tp.total_frames),
                  tokenizer, pcfg=pcfg, seq_len=seq_len, max_frames=max_frames,
                  merged_grid=merged_grid, synthesis_weight=synthesis_weight,
                  id=str(trace.get("id", "")))


def segments_to_example(
    segs: list, bank: np.ndarray, tokenizer, *, pcfg: protocol.ProtocolConfig, seq_len: int,
    max_frames: int, merged_grid: tuple[int, int], synthesis_weight: float = 1.0,
) -> dict[str, np.ndarray]:
    """Conversation segments (their frames numbered into `bank`, uint8 [2N, H, W, 3]) -> row.
    Raises like `trace_to_example`."""
    return _build(lambda: segs, bank_pixels(bank, pcfg.total_frames), tokenizer, pcfg=pcfg,
                  seq_len=seq_len, max_frames=max_frames, merged_grid=merged_grid,
                  synthesis_weight=synthesis_weight, id="")


# --------------------------------------------------------------------------- rollouts -> rows


def from_trajectory(traj, bank: np.ndarray, *, seq_len: int, max_frames: int,
                    id: str = "") -> dict:  # noqa: A002
    """A GRPO row from a rollout trajectory, reproducing exactly what the rollout saw (its
    positions were computed by `chat.mrope_positions`, like a trace row's).

    Args:
      traj: a finished rollout row with unpadded arrays `tokens` int32 [n], `loss_mask` bool [n]
        (model-generated tokens), `kind` int8 [n] (`sampler.VISUAL` on the frames' tokens),
        `logp` float32 [n], `positions` int32 [3, n],
        `visible_until` int32 [n] and `frames` (global frame number of each occurrence).
      bank: uint8 [2N, H, W, 3] the row's candidate frames.
    Raises:
      ExampleTooLong: a trajectory over seq_len tokens or max_frames frames.
    """
    check_fits(len(traj.tokens), len(traj.frames), seq_len=seq_len, max_frames=max_frames,
               what="trajectory")
    frames = np.asarray(traj.frames, np.int64)
    pixels = bank[frames - 1] if len(frames) else np.zeros((0,) + bank.shape[1:], np.uint8)
    return _row(tokens=traj.tokens, positions=traj.positions, loss_mask=traj.loss_mask,
                loss_weight=np.asarray(traj.loss_mask, np.float32),
                # the frames' tokens are the ones the environment inserted (sampler.VISUAL)
                visual=np.asarray(traj.kind) == sampler.VISUAL,
                visible_until=traj.visible_until, old_logp=traj.logp, pixels=pixels,
                seq_len=seq_len, max_frames=max_frames, id=id)


# --------------------------------------------------------------------------- batches


def _stack(rows: Sequence[Mapping], text_keys: Sequence[str], what: str) -> dict:
    if not rows:
        raise ValueError(f"{what}: empty batch")
    keys = list(rows[0])
    for i, r in enumerate(rows):
        if set(r) != set(keys):
            raise ValueError(f"{what}: row {i} has keys {sorted(r)}, row 0 has {sorted(keys)}")
    return {k: [r[k] for r in rows] if k in text_keys else np.stack([r[k] for r in rows])
            for k in keys}


def collate(examples: Sequence[dict]) -> dict:
    """Stacks rows (`_row`'s keys): arrays get a leading batch dim except positions, which
    become [3, batch, seq] as the model expects; `TEXT_KEYS` become lists of str."""
    out = _stack(examples, TEXT_KEYS, "collate")
    out["positions"] = np.ascontiguousarray(np.transpose(out["positions"], (1, 0, 2)))
    return out


def prompt_row(rid: str, prompt: str, bank: np.ndarray, labels: np.ndarray, *,
               status: int = OK, error: str = "") -> dict:
    """A GRPO / evaluation prompt row: bank uint8 [2N, H, W, 3], labels int32 [4] (TA, MQ, VQ,
    OA; -1 = unlabelled), status int32 [], failed bool [], id / prompt / error str."""
    return {"id": str(rid), "prompt": str(prompt), "bank": np.asarray(bank, np.uint8),
            "labels": np.asarray(labels, np.int32), "status": np.asarray(status, np.int32),
            "failed": np.asarray(status != OK, bool), "error": str(error)}


def collate_prompts(rows: Sequence[dict]) -> dict:
    """Prompt rows -> bank [b, 2N, H, W, 3], labels [b, 4], status [b], failed [b];
    id / prompt / error lists."""
    return _stack(rows, PROMPT_TEXT_KEYS, "collate_prompts")


def count_status(batch: Mapping) -> dict[str, int]:
    """{status name: rows} of one batch, for logging failed / padded rows."""
    values, counts = np.unique(np.asarray(batch["status"]), return_counts=True)
    return {STATUS_NAMES.get(int(v), str(v)): int(c) for v, c in zip(values, counts)}
