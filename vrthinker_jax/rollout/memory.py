"""The frame-memory window: which frames the window holds and which tokens see which frames.

The rule (README "Protocol decisions"): the window is `W` slots filled first-in first-out with
frame *occurrences* (the initial frames count, and a frame selected twice occupies two slots). The
j-th occurrence of a row takes slot j % W, so it evicts occurrence j - W, the oldest one still
visible. Frames are never deleted from the KV cache or from a training sequence; an evicted
frame's tokens are masked out of attention for every token from the start of the environment
response that evicted it (key k is visible to query q iff k <= q < visible_until[k]). Shapes stay
static, rollout and training see the same visibility, and the cost is cache slots that stay
allocated (bounded by `ProtocolConfig.max_frames_shown`).

The rule lives here only, in two forms:
* `FrameMemory` + `window_update` (jnp): the in-jit window the sampler updates on every insert;
* `eviction_events` + `visible_until` (numpy): the host form that training rows are built with
  (`chat.Tokenized.visible_until`), a reference that `tests/test_memory.py` checks
  `window_update` against on random conversations.
`window_frames` reads a window back (oldest first) and `attention_mask` turns the per-token form
into the attention mask inside a training step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NEVER = np.iinfo(np.int32).max


# --------------------------------------------------------------------------- in jit


@struct.dataclass
class FrameMemory:
    """The window of a batch of rows: W slots filled first-in first-out with frame occurrences.

    slot_start: int32 [b, W] cache slot of the first visual token of the frame held in each slot,
      -1 when empty; slot_frame: int32 [b, W] its global frame number (0 = empty);
    count: int32 [b] frame occurrences inserted so far (the next one goes to slot count % W).
    """

    slot_start: jax.Array
    slot_frame: jax.Array
    count: jax.Array

    @classmethod
    def empty(cls, batch: int, window: int) -> FrameMemory:
        return cls(
            slot_start=jnp.full((batch, window), -1, jnp.int32),
            slot_frame=jnp.zeros((batch, window), jnp.int32),
            count=jnp.zeros((batch,), jnp.int32),
        )


def window_update(
    mem: FrameMemory,
    visible_until_: jax.Array,
    n_new: jax.Array,
    new_frames: jax.Array,
    new_starts: jax.Array,
    event_slot: jax.Array,
    tokens_per_frame: int,
) -> tuple[FrameMemory, jax.Array]:
    """Puts n_new frames into the FIFO window and masks the frames they push out.

    Args:
      mem: the window before the event.
      visible_until_: int32 [b, S] per cache slot (NEVER for slots never evicted).
      n_new: int32 [b] frames this event brings (0 for rows not served or failed calls).
      new_frames: int32 [b, F] their global numbers; new_starts: int32 [b, F] the cache slot of
        each one's first visual token (entries >= n_new are ignored).
      event_slot: int32 [b] slot where the event starts: evicted frames are visible to queries
        before it only.
      tokens_per_frame: visual tokens of one frame (static).
    Returns:
      (new window, new visible_until [b, S]). Agrees with `visible_until` (tested).
    """
    b, w = mem.slot_start.shape
    f = new_frames.shape[1]
    size = visible_until_.shape[1]
    rows = jnp.arange(b)[:, None]
    j = jnp.arange(f)[None]
    takes = j < n_new[:, None]  # [b, F]
    # the j-th new frame takes slot (count + j) % W, which holds the occurrence W frames older:
    # the oldest visible one, as FIFO requires
    target = jnp.where(takes, (mem.count[:, None] + j) % w, w)  # w = out of range: dropped
    evict = jnp.zeros((b, w + 1), bool).at[rows, target].set(True)[:, :w]
    evict &= mem.slot_start >= 0
    slots = jnp.arange(size)[None, None]
    starts = mem.slot_start[:, :, None]
    in_span = (slots >= starts) & (slots < starts + tokens_per_frame)  # [b, W, S]
    evicted = jnp.any(in_span & evict[:, :, None], axis=1)
    visible_until_ = jnp.where(evicted, event_slot[:, None], visible_until_)
    slot_start = jnp.concatenate([mem.slot_start, jnp.zeros((b, 1), jnp.int32)], 1)
    slot_start = slot_start.at[rows, target].set(new_starts)[:, :w]
    slot_frame = jnp.concatenate([mem.slot_frame, jnp.zeros((b, 1), jnp.int32)], 1)
    slot_frame = slot_frame.at[rows, target].set(new_frames)[:, :w]
    return FrameMemory(slot_start, slot_frame, mem.count + n_new), visible_until_


def window_frames(slot_frame: np.ndarray, count: int) -> list[int]:
    """The global frame numbers one row's window holds, oldest first.

    slot_frame: int [W] (a row of `FrameMemory.slot_frame`, on the host); count: occurrences
    inserted so far. Occurrence j sits in slot j % W and the window holds the last W of them.
    """
    w = len(slot_frame)
    return [int(slot_frame[j % w]) for j in range(max(0, count - w), count)]


def attention_mask(visible_until_: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """bool [batch, q, k] from visible_until [batch, seq] and valid [batch, seq] (padding False).

    Traceable (jnp), so training steps build the mask inside jit from the compact per-token form.
    """
    seq = visible_until_.shape[-1]
    q = jnp.arange(seq)[:, None]
    k = jnp.arange(seq)[None, :]
    causal = k <= q
    alive = q < visible_until_[:, None, :]
    return causal[None] & alive & valid[:, None, :] & valid[:, :, None]


# --------------------------------------------------------------------------- host reference


def eviction_events(frames_per_event: Sequence[int], window: int) -> list[int | None]:
    """For each frame occurrence (in arrival order), the event index that evicts it, or None.

    Args:
      frames_per_event: number of frames each event brings (event 0 = the first prompt, event k =
        the response to the k-th tool call; zero for a failed call).
      window: number of memory slots.
    """
    if window <= 0:
        raise ValueError(f"memory window must be positive, got {window}")
    evicted_at: list[int | None] = []
    visible: list[int] = []  # occurrence ids, oldest first
    for event, count in enumerate(frames_per_event):
        if count > window:
            raise ValueError(f"event {event} brings {count} frames, more than the window {window}")
        overflow = len(visible) + count - window
        for _ in range(max(0, overflow)):
            evicted_at[visible.pop(0)] = event
        for _ in range(count):
            visible.append(len(evicted_at))
            evicted_at.append(None)
    return evicted_at


def visible_until(
    frame_of_token: np.ndarray,
    event_start_tokens: Sequence[int],
    frames_per_event: Sequence[int],
    window: int,
) -> np.ndarray:
    """Per-token index from which the token is no longer visible (NEVER for text tokens).

    Args:
      frame_of_token: int32 [seq]; frame occurrence id of each visual token, -1 for text.
      event_start_tokens: token index where each event's segment starts (event 0 starts at 0).
      frames_per_event: as in `eviction_events`.
      window: memory slots.
    Returns:
      int32 [seq]; key k is visible to query q iff k <= q < visible_until[k].
    """
    evicted = eviction_events(frames_per_event, window)
    until = np.full(frame_of_token.shape, NEVER, dtype=np.int32)
    for occ, event in enumerate(evicted):
        if event is not None:
            until[frame_of_token == occ] = event_start_tokens[event]
    return until
