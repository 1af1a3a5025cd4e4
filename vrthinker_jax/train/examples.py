"""Fixed-shape training examples from traces (SFT, RFT) and from rollout trajectories (GRPO).

Both paths produce the same dict of numpy arrays, so every stage runs the same forward
(`steps.sequence_token_stats`). One example (unbatched):

  tokens        int32 [seq]                  right-padded with `pad_id` (0)
  positions     int32 [3, seq]               M-RoPE positions (t, h, w)
  valid         bool  [seq]                  real (non-padding) tokens
  loss_mask     bool  [seq]                  tokens the model produced (targets of the loss)
  loss_weight   float32 [seq]                SFT weight of each target token (0 off the mask;
                                             `synthesis_weight` inside a <synthesis>, else 1)
  visible_until int32 [seq]                  memory-window visibility (rollout/memory.py)
  frames        uint8 [max_frames, H, W, 3]  the frame occurrences, in order
  old_logp      float32 [seq]                rollout log-probs of generated tokens (0 elsewhere)
  weight        float32 []                   1, or 0 for an example that failed to build

`collate` stacks them into a batch, with positions as [3, batch, seq] (the model's layout).
"""

from __future__ import annotations

import numpy as np

from vrthinker_jax.rollout import chat, memory, protocol, sampler


class ExampleTooLong(ValueError):
    """A conversation that does not fit the static sequence length (counted, not truncated)."""


def _pad(x: np.ndarray, length: int, value=0, axis: int = -1) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return np.pad(x, pad, constant_values=value)


def from_tokenized(
    t: chat.Tokenized,
    frame_pixels: np.ndarray,
    *,
    seq_len: int,
    max_frames: int,
    window: int,
    merged_grid: tuple[int, int],
    synthesis_weight: float = 1.0,
) -> dict[str, np.ndarray]:
    """An SFT example from a tokenised conversation.

    Args:
      frame_pixels: uint8 [len(t.frames), H, W, 3], the frame occurrences in order.
      merged_grid: (rows, cols) of a frame's visual tokens after the spatial merge.
      synthesis_weight: loss weight of the synthesis tokens (`data.synthesis_weight`).
    """
    n = len(t.ids)
    if n > seq_len:
        raise ExampleTooLong(f"conversation has {n} tokens, more than seq_len={seq_len}")
    if len(t.frames) > max_frames:
        raise ExampleTooLong(
            f"conversation shows {len(t.frames)} frames, more than max_frames={max_frames}"
        )
    if frame_pixels.shape[0] != len(t.frames):
        raise ValueError(
            f"{frame_pixels.shape[0]} frame images for {len(t.frames)} frame occurrences"
        )
    pos, _ = chat.mrope_positions(t.frame_of_token, merged_grid)
    return {
        "tokens": _pad(t.ids.astype(np.int32), seq_len),
        "positions": _pad(pos.astype(np.int32), seq_len),
        "valid": _pad(np.ones(n, bool), seq_len, False),
        "loss_mask": _pad(t.trainable, seq_len, False),
        "loss_weight": _pad(t.loss_weights(synthesis_weight), seq_len, 0.0),
        "visual": _pad(t.frame_of_token >= 0, seq_len, False),
        "visible_until": _pad(t.visible_until(window), seq_len, memory.NEVER),
        "frames": _pad(frame_pixels.astype(np.uint8), max_frames, 0, axis=0),
        "old_logp": np.zeros(seq_len, np.float32),
        "weight": np.ones((), np.float32),
    }


def trace_to_example(
    trace: dict, bank: np.ndarray, tokenizer, *, pcfg: protocol.ProtocolConfig, seq_len: int,
    max_frames: int, merged_grid: tuple[int, int], synthesis_weight: float = 1.0,
) -> dict[str, np.ndarray]:
    """A vrthinker_cot trace + its candidate-frame bank uint8 [2N, H, W, 3] -> example."""
    if bank.shape[0] != pcfg.total_frames:
        raise ValueError(
            f"trace {trace.get('id')!r}: bank has {bank.shape[0]} frames, the protocol numbers "
            f"{pcfg.total_frames} (2 x num_candidates)"
        )
    return segments_to_example(
        protocol.trace_segments(trace, pcfg), bank, tokenizer, pcfg=pcfg, seq_len=seq_len,
        max_frames=max_frames, merged_grid=merged_grid, synthesis_weight=synthesis_weight)


def segments_to_example(
    segs: list, bank: np.ndarray, tokenizer, *, pcfg: protocol.ProtocolConfig, seq_len: int,
    max_frames: int, merged_grid: tuple[int, int], synthesis_weight: float = 1.0,
) -> dict[str, np.ndarray]:
    """Conversation segments (their frames numbered into `bank`, uint8 [2N, H, W, 3]) ->
    example."""
    t = chat.tokenize_segments(tokenizer, segs, merged_grid[0] * merged_grid[1])
    pixels = bank[np.asarray(t.frames, np.int64) - 1]
    return from_tokenized(
        t, pixels, seq_len=seq_len, max_frames=max_frames, window=pcfg.memory_window,
        merged_grid=merged_grid, synthesis_weight=synthesis_weight,
    )


def failed_example(seq_len: int, max_frames: int, frame_shape: tuple[int, ...]) -> dict:
    """A placeholder row with weight 0 (keeps the batch static; the loss ignores it)."""
    return {
        "tokens": np.zeros(seq_len, np.int32),
        "positions": np.zeros((3, seq_len), np.int32),
        "valid": np.zeros(seq_len, bool),
        "loss_mask": np.zeros(seq_len, bool),
        "loss_weight": np.zeros(seq_len, np.float32),
        "visual": np.zeros(seq_len, bool),
        "visible_until": np.full(seq_len, memory.NEVER, np.int32),
        "frames": np.zeros((max_frames, *frame_shape), np.uint8),
        "old_logp": np.zeros(seq_len, np.float32),
        "weight": np.zeros((), np.float32),
    }


def from_trajectory(traj, bank: np.ndarray, *, seq_len: int, max_frames: int) -> dict:
    """A GRPO example from a rollout trajectory, reproducing exactly what the rollout saw.

    Args:
      traj: a finished rollout row with unpadded arrays `tokens` int32 [n], `loss_mask` bool [n]
        (model-generated tokens), `kind` int8 [n] (`sampler.VISUAL` on the frames' tokens),
        `logp` float32 [n], `positions` int32 [3, n],
        `visible_until` int32 [n] and `frames` (global frame number of each occurrence).
      bank: uint8 [2N, H, W, 3] the row's candidate frames.
    """
    n = len(traj.tokens)
    if n > seq_len:
        raise ExampleTooLong(f"trajectory has {n} tokens, more than seq_len={seq_len}")
    if len(traj.frames) > max_frames:
        raise ExampleTooLong(
            f"trajectory shows {len(traj.frames)} frames, more than max_frames={max_frames}"
        )
    frames = np.asarray(traj.frames, np.int64)
    pixels = bank[frames - 1] if len(frames) else np.zeros((0,) + bank.shape[1:], np.uint8)
    return {
        "tokens": _pad(np.asarray(traj.tokens, np.int32), seq_len),
        "positions": _pad(np.asarray(traj.positions, np.int32), seq_len),
        "valid": _pad(np.ones(n, bool), seq_len, False),
        "loss_mask": _pad(np.asarray(traj.loss_mask, bool), seq_len, False),
        "loss_weight": _pad(np.asarray(traj.loss_mask, np.float32), seq_len, 0.0),
        # the frames' tokens are the ones the environment inserted as visual (sampler.VISUAL)
        "visual": _pad(np.asarray(traj.kind) == sampler.VISUAL, seq_len, False),
        "visible_until": _pad(np.asarray(traj.visible_until, np.int32), seq_len, memory.NEVER),
        "frames": _pad(pixels.astype(np.uint8), max_frames, 0, axis=0),
        "old_logp": _pad(np.asarray(traj.logp, np.float32), seq_len),
        "weight": np.ones((), np.float32),
    }


def collate(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks examples; positions become [3, b, seq] as the model expects."""
    if not examples:
        raise ValueError("collate: empty batch")
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    out["positions"] = np.ascontiguousarray(np.transpose(out["positions"], (1, 0, 2)))
    return out
