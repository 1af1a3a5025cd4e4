"""The frame bank: every candidate frame of both videos, kept as uint8 pixels on device.

Frames are stored already resized to the protocol's frame size (the data pipeline does the
smart-resize on the host), and turned into Qwen2.5-VL patches only when a tool call gathers them.
Keeping uint8 [frames, H, W, 3] instead of float patches [frames, patches, 1176] is 4 x 2 x 1176 /
(14 * 14 * 3) = 32x smaller, which is what lets 2 x 128 candidates at 448 px sit on a chip.

Every frame is one Qwen2.5-VL *image*: the frame repeated over the temporal patch, grid
(1, H / patch, W / patch), encoded by `encode_frames`. The rollout and the learner then put a
row's frames at the positions where its builder wrote frame tokens (the sampler from its
segments' frame offsets, the learner from the row's `visual` mask, which is the rollout's
`sampler.VISUAL` kind), never where a pad id happens to be, through the one merge
`models.model.merge_visual_at`: the rollout's insert via `embed_with_frames` (all rows' frames
in one vision-tower chunk), the learner via `train/steps.embed_inputs` (the tower per row, for
its sharding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vrthinker_jax.models import model as model_lib

# CLIP normalisation used by the Qwen2-VL processors (after scaling pixels to [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """How frames become vision-tower patches (values of the model's vision config)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2

    @classmethod
    def from_model_config(cls, cfg) -> PatchSpec:
        v = cfg.vision
        return cls(int(v.patch_size), int(v.temporal_patch_size), int(v.spatial_merge_size))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(grid_h, grid_w) in patches; raises when the size is not a multiple of patch x merge."""
        factor = self.patch_size * self.merge_size
        if height % factor or width % factor:
            raise ValueError(
                f"frame size {height}x{width} is not a multiple of {factor} (patch x merge); "
                "resize frames with the processor's smart_resize first"
            )
        return height // self.patch_size, width // self.patch_size

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """The (t, h, w) grid of one frame shown as an image."""
        return (1,) + self.grid(height, width)

    def merged_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the frame's visual tokens after the 2x2 merge."""
        gh, gw = self.grid(height, width)
        return gh // self.merge_size, gw // self.merge_size

    def tokens_per_frame(self, height: int, width: int) -> int:
        gh, gw = self.merged_grid(height, width)
        return gh * gw

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2


def normalize(frames: jax.Array) -> jax.Array:
    """uint8 [..., 3] -> float32 CLIP-normalised pixels."""
    x = frames.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def patchify(frames: jax.Array, spec: PatchSpec) -> jax.Array:
    """uint8 [n, H, W, 3] -> float32 [n, patches, 3 * T * p * p] in Qwen2-VL's patch order.

    Each frame is one image, repeated `temporal_patch_size` times. Patches are ordered merge group
    by merge group (row-major), and each patch's values in (channel, time, y, x) order, as the
    transformers image processor flattens them.
    """
    n, height, width, channels = frames.shape
    gh, gw = spec.grid(height, width)
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    x = jnp.transpose(normalize(frames), (0, 3, 1, 2))  # [n, C, H, W]
    x = x.reshape(n, channels, gh // m, m, p, gw // m, m, p)
    # -> [n, gh/m, gw/m, m, m, C, p, p]
    x = jnp.transpose(x, (0, 2, 5, 3, 6, 1, 4, 7))
    x = jnp.broadcast_to(x[:, :, :, :, :, :, None], x.shape[:6] + (t, p, p))
    return x.reshape(n, gh * gw, channels * t * p * p)


def patchify_numpy(frames: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """Host (numpy) twin of `patchify`, for building transformers inputs in tests/benchmarks."""
    return np.asarray(patchify(jnp.asarray(frames), spec))


def gather_frames(bank: jax.Array, frame_ids: jax.Array) -> jax.Array:
    """bank uint8 [b, total, H, W, 3], frame ids int32 [b, k] (1-based, 0 = none) -> uint8
    [b, k, H, W, 3].

    Empty requests (0) gather frame 1; their embeddings are never written into the sequence.
    """
    idx = jnp.clip(frame_ids - 1, 0, bank.shape[1] - 1)
    return jnp.take_along_axis(bank, idx[:, :, None, None, None], axis=1)


def uniform_candidates(num_frames: int, num_candidates: int) -> np.ndarray:
    """0-based indices of `num_candidates` frames spread uniformly over `num_frames`."""
    if num_frames <= 0:
        raise ValueError("a video with no frames has no candidates")
    return np.floor((np.arange(num_candidates) + 0.5) * num_frames / num_candidates).astype(int)


def encode_frames(model, frames: jax.Array, spec: PatchSpec, constrain=None) -> jax.Array:
    """uint8 [n, H, W, 3] -> visual tokens [n, tokens_per_frame, hidden] (one fixed-size chunk).

    The vision tower sees n images of grid (1, h, w): a static grid tuple, so one compile per n.
    constrain: passed to the vision tower (a sharding constraint on its patch stream).
    """
    n, height, width = frames.shape[:3]
    patches = patchify(frames, spec)  # [n, P, D]
    grid = (spec.grid_thw(height, width),) * n
    vis = model.encode_vision(patches.reshape(-1, patches.shape[-1]), grid, constrain)
    return vis.reshape(n, spec.tokens_per_frame(height, width), -1)


def embed_with_frames(
    model, tokens: jax.Array, frames: jax.Array, spec: PatchSpec, visual: jax.Array
) -> jax.Array:
    """Token embeddings with the frames' visual tokens merged at the marked positions.

    Args:
      model: a `Qwen25VL` (uses `embed` and `encode_vision`).
      tokens: int32 [b, s].
      frames: uint8 [b, f, H, W, 3]; rows with fewer frames than f pad with anything (their
        embeddings are never selected).
      spec: how frames become patches.
      visual: bool [b, s], the positions of frame tokens (from how the row was built): the i-th
        run of `tokens_per_frame` marked positions of a row takes its i-th frame.
    Returns:
      [b, s, hidden] in the model's compute dtype.
    """
    embeds = model.embed(tokens)
    b, f = frames.shape[:2]
    if f == 0:
        return embeds
    per_frame = spec.tokens_per_frame(frames.shape[2], frames.shape[3])
    vis = encode_frames(model, frames.reshape((b * f,) + frames.shape[2:]), spec)
    return model_lib.merge_visual_at(embeds, visual, vis.reshape(b, f * per_frame, -1))
