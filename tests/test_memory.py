"""The frame-memory window (rollout/memory.py): the in-jit window the sampler updates agrees with
the host-side reference that training rows are built with, and reads back oldest first."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrthinker_jax.rollout import memory


def _random_conversation(rng, window, max_per_call, tpf, n_events):
    """Token layout of one conversation: events with text, frames and generated text."""
    frame_of, starts, per_event, frame_starts = [], [], [], []
    occ = 0
    for e in range(n_events):
        starts.append(len(frame_of))
        hi = window if e == 0 else max_per_call
        count = int(rng.integers(1 if e == 0 else 0, hi + 1))
        per_event.append(count)
        frame_of += [-1] * int(rng.integers(1, 4))
        evs = []
        for _ in range(count):
            frame_of += [-1] * int(rng.integers(0, 3))
            evs.append(len(frame_of))
            frame_of += [occ] * tpf
            occ += 1
        frame_starts.append(evs)
        frame_of += [-1] * int(rng.integers(1, 5))  # the model's turn
    return np.asarray(frame_of, np.int32), starts, per_event, frame_starts


@pytest.mark.parametrize("seed", [0, 1])
def test_window_update_agrees_with_host_reference(seed):
    """Random conversations (events of 0..max frames, rows of different lengths) through the
    in-jit `window_update`, event by event: the same visible_until as `memory.visible_until`,
    and the window holds the last W occurrences, oldest first."""
    window, max_per_call, tpf, b = 5, 4, 3, 16
    rng = np.random.default_rng(seed)
    convs = [_random_conversation(rng, window, max_per_call, tpf, int(rng.integers(1, 7)))
             for _ in range(b)]
    size = max(len(c[0]) for c in convs) + 1
    n_events = max(len(c[1]) for c in convs)
    update = jax.jit(memory.window_update, static_argnums=(6,))
    mem = memory.FrameMemory.empty(b, window)
    until = jnp.full((b, size), memory.NEVER, jnp.int32)
    frames_seen = [[] for _ in range(b)]
    for e in range(n_events):
        n_new = np.zeros(b, np.int32)
        new_frames = np.zeros((b, window), np.int32)
        new_starts = np.zeros((b, window), np.int32)
        event_slot = np.zeros(b, np.int32)
        for i, (_, starts, per_event, fstarts) in enumerate(convs):
            if e >= len(starts):
                continue
            n_new[i] = per_event[e]
            ids = rng.integers(1, 50, size=per_event[e])
            new_frames[i, : per_event[e]] = ids
            frames_seen[i] += ids.tolist()
            new_starts[i, : per_event[e]] = fstarts[e]
            event_slot[i] = starts[e]
        mem, until = update(mem, until, jnp.asarray(n_new), jnp.asarray(new_frames),
                            jnp.asarray(new_starts), jnp.asarray(event_slot), tpf)
    until = np.asarray(until)
    slot_frame, count = np.asarray(mem.slot_frame), np.asarray(mem.count)
    for i, (frame_of, starts, per_event, _) in enumerate(convs):
        ref = memory.visible_until(frame_of, starts, per_event, window)
        np.testing.assert_array_equal(until[i, : len(frame_of)], ref)
        assert int(count[i]) == sum(per_event)
        assert memory.window_frames(slot_frame[i], int(count[i])) == frames_seen[i][-window:]
        # slots past the conversation (the sampler's scratch) are never masked
        assert (until[i, len(frame_of):] == memory.NEVER).all()


def test_eviction_is_first_in_first_out_over_occurrences():
    # window 3: the prompt's 2 frames, then 2 (evicts occurrence 0), then 3 (evicts 1, 2, 3)
    assert memory.eviction_events([2, 2, 3], 3) == [1, 2, 2, 2, None, None, None]
    # a failed call brings nothing and evicts nothing
    assert memory.eviction_events([3, 0, 1], 3) == [2, None, None, None]
    with pytest.raises(ValueError, match="more than the window"):
        memory.eviction_events([4], 3)


def test_window_frames_reads_oldest_first():
    # W = 3 after 5 occurrences a, b, c, d, e: slots hold [d, e, c]; the window is c, d, e
    assert memory.window_frames(np.asarray([4, 5, 3]), 5) == [3, 4, 5]
    assert memory.window_frames(np.asarray([7, 8, 0]), 2) == [7, 8]
    assert memory.window_frames(np.asarray([0, 0, 0]), 0) == []
