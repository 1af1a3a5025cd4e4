"""The Qwen2.5-VL model (Flax NNX): vision tower + Qwen2 decoder with M-RoPE and a KV cache."""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vrthinker_jax.models import config as config_lib
from vrthinker_jax.models import rope as rope_lib
from vrthinker_jax.models.layers import RMSNorm, dtype_of, param
from vrthinker_jax.models.text import DecoderLayer
from vrthinker_jax.models.vision import VisionTower


@flax.struct.dataclass
class KVCache:
    """k, v: [layers, batch, kv_heads, max_len, head_dim].

    Heads before slots so attention reads each layer's keys in the layout its batched matmuls
    want: with slots before heads every decode step transposed (copied) the whole cache prefix.
    """

    k: jax.Array
    v: jax.Array


def init_cache(cfg, batch: int, max_len: int, dtype=None) -> KVCache:
    """An all-zero cache; dtype defaults to the compute dtype."""
    t = cfg.text
    shape = (t.num_hidden_layers, batch, t.num_key_value_heads, max_len, t.head_dim)
    dt = dtype_of(dtype if dtype is not None else cfg.dtype)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))


def merge_visual_embeds(embeds, input_ids, visual, token_ids):
    """Replace the embeddings of visual pad tokens by visual rows, in order.

    embeds: [b, s, d]; input_ids: int [b, s]; visual: [n, d]; token_ids: int or tuple of ints.
    The i-th visual row goes to the i-th position (row-major over the batch) whose id is in
    token_ids. Positions beyond n keep visual[n-1] (callers keep counts equal).
    """
    hit = jnp.zeros(input_ids.shape, bool)
    for t in np.atleast_1d(np.asarray(token_ids)).tolist():
        hit = hit | (input_ids == int(t))
    return merge_visual_at(embeds, hit, visual)


def merge_visual_at(embeds, is_visual, visual):
    """Replace the embeddings at the marked positions by visual rows, in order.

    The one merge of frames into text: the rollout's insert (`frame_bank.embed_with_frames`),
    the preset engine's re-prefill (`sampler.reprefill`), the learner
    (`train/steps.embed_inputs`) and the HF-style forward (`merge_visual_embeds`) all call it.

    embeds: [b, s, d]; is_visual: bool [b, s] (where the frames' tokens sit, known from how
    the sequence was built, not from its token ids: text may hold the pad token); visual:
    [b, n, d] per row (the i-th row of visual[r] goes to the i-th marked position of row r;
    rows with fewer marked positions pad with anything), or [n, d] for the whole batch (the
    i-th visual row goes to the i-th marked position, row-major). Returns [b, s, d].
    """
    b, s, d = embeds.shape
    if visual.ndim == 2:  # one stream for the whole batch: the batch read as one long row
        return merge_visual_at(embeds.reshape(1, b * s, d), is_visual.reshape(1, b * s),
                               visual[None]).reshape(b, s, d)
    slot = jnp.clip(jnp.cumsum(is_visual, axis=1) - 1, 0, visual.shape[1] - 1)
    rows = jnp.take_along_axis(visual.astype(embeds.dtype), slot[:, :, None], axis=1)
    return jnp.where(is_visual[:, :, None], rows, embeds)


def _stacked_layers(tc, rngs: nnx.Rngs, kw) -> DecoderLayer:
    """One DecoderLayer whose params carry a leading [layers] axis (logical name 'layers').

    Built eagerly layer by layer and stacked on the host, which is much faster on CPU than
    initialising under nnx.vmap (one compiled RNG kernel per shape) and draws the same values as
    the unstacked layout; structure and metadata come from the abstract vmapped module. Under
    tracing (eval_shape / jit) vmap is used directly.
    """
    n = tc.num_hidden_layers

    def make(r):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def build(r):
            return DecoderLayer(tc, rngs=r, **kw)

        return build(r)

    if isinstance(rngs.params.key[...], jax.core.Tracer):
        return make(rngs)
    per = [nnx.state(DecoderLayer(tc, rngs=rngs, **kw)) for _ in range(n)]
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    flats = [dict(nnx.to_flat_state(st)) for st in per]
    leaves = []
    for path, var in nnx.to_flat_state(abs_state):
        host = np.stack([np.asarray(f[path][...]) for f in flats])
        leaves.append((path, var.replace(jnp.asarray(host))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


class Qwen25VL(nnx.Module):
    """Qwen2.5-VL for conditional generation.

    Params (logical axes in brackets): visual.*; embed [vocab, embed]; layers (list, or one
    stacked module with a leading 'layers' axis when cfg.scan_layers); norm; lm_head
    [embed, vocab] unless cfg.text.tie_word_embeddings.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        # Frozen so the graphdef stays hashable (jit static argument).
        cfg = ml_collections.FrozenConfigDict(config_lib.validate(cfg))
        self.config = cfg
        tc = cfg.text
        self.dtype = dtype_of(cfg.dtype)
        pdt = dtype_of(cfg.param_dtype)
        self.scan_layers = bool(cfg.scan_layers)
        self.remat = bool(cfg.remat)
        self.visual = VisionTower(cfg, rngs=rngs)
        self.embed_tokens = param(rngs, (tc.vocab_size, tc.hidden_size), ("vocab", "embed"), pdt)
        kw = dict(dtype=self.dtype, param_dtype=pdt)
        lkw = dict(kw, query_chunk=int(cfg.attn_query_chunk))
        if self.scan_layers:
            self.layers = _stacked_layers(tc, rngs, lkw)
        else:
            self.layers = nnx.List([DecoderLayer(tc, rngs=rngs, **lkw)
                                    for _ in range(tc.num_hidden_layers)])
        self.norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps, **kw)
        self.lm_head = (None if tc.tie_word_embeddings else
                        param(rngs, (tc.hidden_size, tc.vocab_size), ("embed", "vocab"), pdt))

    # -- pieces ----------------------------------------------------------------------------------

    def encode_vision(self, pixel_values, grid_thw, constrain=None) -> jax.Array:
        """pixel_values [n_patches, C*T*P*P]; grid_thw static tuple of (t, h, w) per item.

        Returns [n_patches / merge^2, text hidden] in the compute dtype, items in order.
        constrain: see `VisionTower.__call__`.
        """
        return self.visual(pixel_values, grid_thw, constrain)

    def embed(self, input_ids) -> jax.Array:
        """input_ids int [b, s] -> [b, s, hidden] in the compute dtype."""
        return self.embed_tokens[...][input_ids].astype(self.dtype)

    def logits(self, x) -> jax.Array:
        """x [b, s, hidden] -> float32 logits [b, s, vocab]."""
        if self.lm_head is None:
            w = self.embed_tokens[...].astype(self.dtype)
            return jnp.einsum("bsd,vd->bsv", x, w, preferred_element_type=jnp.float32)
        w = self.lm_head[...].astype(self.dtype)
        return jnp.einsum("bsd,dv->bsv", x, w, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, positions, attn_mask, *, inputs_embeds=None, cache=None,
                 cache_index=None, logits_at=None, kv_prefixes=None, kv_need=None,
                 return_hidden=False, constrain=None):
        """Decoder forward.

        input_ids int32 [b, s]; positions int32 [3, b, s]; attn_mask bool [b, s, kv_len] (which
        keys each query sees; nothing is added); inputs_embeds [b, s, hidden] replaces the token
        embeddings; cache: KVCache written at cache_index int32 [b]. With a cache kv_len may be
        smaller than max_len: attention then reads only the first kv_len slots (the caller
        guarantees later slots are invisible to every query) while writes go anywhere.
        logits_at: optional int32 [b, n] query positions (0 <= . < s) whose logits are wanted;
        the others are never projected to the vocabulary (a prefill needs only its last token's).
        kv_prefixes: optional static increasing cache lengths (the last <= kv_len) with kv_need
        int32 scalar: each layer's attention reads only the shortest prefix >= kv_need (one
        executable with a lax.switch over the prefixes; keys past kv_need must be invisible to
        every query whose output the caller uses).
        return_hidden: return the final normed hidden states [b, s, hidden] instead of logits
        (training losses project them chunk by chunk: `losses.chunked_token_stats`).
        constrain: optional [b, s, hidden] -> same, applied to the hidden state after every
        layer (a sharding constraint: the training step keeps rows split over the batch axes).
        Returns (logits float32 [b, s, vocab] or [b, n, vocab] with logits_at, new KVCache or
        None).
        """
        tc = self.config.text
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        cos, sin = rope_lib.mrope_cos_sin(positions, tc.head_dim, tc.rope_theta,
                                          tc.mrope_section, self.dtype)
        mask = attn_mask.astype(bool)
        if cache is None:
            x, new_cache = self._layers_without_cache(x, cos, sin, mask, constrain), None
        else:
            cache_index, kv_prefixes, kv_need = _cache_args(mask, cache, cache_index,
                                                            kv_prefixes, kv_need)
            x, new_cache = self._layers_with_cache(x, cos, sin, mask, cache, cache_index,
                                                   kv_prefixes, kv_need)
        if logits_at is not None:
            idx = jnp.asarray(logits_at, jnp.int32)
            x = jnp.take_along_axis(x, idx[:, :, None], axis=1)
        x = self.norm(x)
        return (x if return_hidden else self.logits(x)), new_cache

    def _layers_without_cache(self, x, cos, sin, mask, constrain) -> jax.Array:
        """x [b, s, hidden] through every decoder layer (a training / scoring forward).

        cos, sin: the M-RoPE tables of `rope.mrope_cos_sin`; mask bool [b, s, s]; constrain as
        in `__call__`. Returns [b, s, hidden] before the final norm.
        """
        pin = constrain or (lambda x: x)

        def run(layer, x):
            return pin(layer(x, cos, sin, mask)[0])

        if self.remat:
            run = nnx.remat(run)
        if self.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(layer, x):
                return run(layer, x)

            return body(self.layers, x)
        for layer in self.layers:
            x = run(layer, x)
        return x

    def _layers_with_cache(self, x, cos, sin, mask, cache, cache_index, kv_prefixes,
                           kv_need) -> tuple[jax.Array, KVCache]:
        """x [b, s, hidden] through every decoder layer, writing each layer's keys and values.

        cos, sin: the M-RoPE tables; mask bool [b, s, kv_len]; cache, cache_index, kv_prefixes,
        kv_need as checked by `_cache_args`. Returns ([b, s, hidden] before the final norm, the
        cache with this call's slots written).
        """
        # The whole stacked cache travels through the layers and each layer writes only its
        # new slots (in place when the caller donates the cache), instead of every layer
        # returning a full copy that is stacked again.
        def run(layer, x, ck, cv, i):
            x, (ck, cv) = layer(x, cos, sin, mask, ck, cv, cache_index, layer=i,
                                kv_prefixes=kv_prefixes, kv_need=kv_need)
            return x, ck, cv

        if self.remat:
            run = nnx.remat(run)
        if self.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(layer, carry, i):
                return run(layer, *carry, i)

            x, ks, vs = body(self.layers, (x, cache.k, cache.v),
                             jnp.arange(self.config.text.num_hidden_layers))
            return x, KVCache(ks, vs)
        ks, vs = cache.k, cache.v
        for i, layer in enumerate(self.layers):
            x, ks, vs = run(layer, x, ks, vs, i)
        return x, KVCache(ks, vs)


def _cache_args(mask, cache: KVCache, cache_index, kv_prefixes, kv_need):
    """Checks and normalises a cached call's arguments (see `Qwen25VL.__call__`).

    mask bool [b, s, kv_len] must not cover more keys than the cache has slots; kv_prefixes
    (static) must increase and end at most at kv_len. Returns (cache_index int32 [b],
    kv_prefixes tuple of ints or None, kv_need int32 scalar, or as given without kv_prefixes).
    """
    cache_index = jnp.asarray(cache_index, jnp.int32)
    if mask.shape[-1] > cache.k.shape[3]:
        raise ValueError(f"attn_mask covers {mask.shape[-1]} keys but the cache has "
                         f"{cache.k.shape[3]} slots")
    if kv_prefixes is not None:
        kv_prefixes = tuple(int(n) for n in kv_prefixes)
        if list(kv_prefixes) != sorted(set(kv_prefixes)) or kv_prefixes[-1] > mask.shape[-1]:
            raise ValueError(f"kv_prefixes {kv_prefixes} must increase and end at most "
                             f"at the mask's {mask.shape[-1]} keys")
        kv_need = jnp.asarray(kv_need, jnp.int32)
    return cache_index, kv_prefixes, kv_need


# -- numpy-in, numpy-out forward like transformers' Qwen2_5_VLForConditionalGeneration ----------


def _grid_tuple(g):
    if g is None:
        return None
    return tuple(tuple(int(x) for x in row) for row in np.asarray(g).reshape(-1, 3))


@functools.partial(jax.jit, static_argnames=("graphdef", "image_grid", "video_grid"))
def _forward_pure(graphdef, state, input_ids, positions, attn_mask, pixel_values,
                  pixel_values_videos, *, image_grid, video_grid):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    embeds = model.embed(input_ids)
    if image_grid is not None:
        vis = model.encode_vision(pixel_values, image_grid)
        embeds = merge_visual_embeds(embeds, input_ids, vis, cfg.image_token_id)
    if video_grid is not None:
        vis = model.encode_vision(pixel_values_videos, video_grid)
        embeds = merge_visual_embeds(embeds, input_ids, vis, cfg.video_token_id)
    logits, _ = model(input_ids, positions, attn_mask, inputs_embeds=embeds)
    return logits


def prepare_inputs(cfg, input_ids, attention_mask=None, image_grid_thw=None,
                   video_grid_thw=None, second_per_grid_ts=None):
    """(positions int32 [3, b, s], attn_mask bool [b, s, s]) as transformers builds them.

    With visual inputs positions come from get_rope_index (padding-aware); text-only input uses
    arange(s) for every row (what transformers does when no grid is given). The mask is causal
    and hides padded keys.
    """
    ids = np.asarray(input_ids)
    b, s = ids.shape
    am = np.ones((b, s), bool) if attention_mask is None else np.asarray(attention_mask) != 0
    if image_grid_thw is not None or video_grid_thw is not None:
        pos, _ = rope_lib.get_rope_index(cfg, ids, image_grid_thw, video_grid_thw,
                                         second_per_grid_ts, am)
    else:
        pos = rope_lib.text_positions(batch=b, seq=s)
    causal = np.tril(np.ones((s, s), bool))
    mask = causal[None] & am[:, None, :]
    return pos.astype(np.int32), mask


def _check_visual(ids, cfg, token_id, n_rows, name):
    n_tok = int((ids == token_id).sum())
    if n_tok != n_rows:
        raise ValueError(f"forward: input_ids has {n_tok} {name} tokens but the visual encoder "
                         f"gives {n_rows}")


def forward(model, *, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None) -> np.ndarray:
    """HF-processor-style numpy inputs -> float32 logits [b, s, vocab] (padding included)."""
    cfg = model.config
    ids = np.asarray(input_ids).astype(np.int32)
    if ids.ndim != 2:
        raise ValueError(f"forward: input_ids must be [batch, seq], got shape {ids.shape}")
    image_grid, video_grid = _grid_tuple(image_grid_thw), _grid_tuple(video_grid_thw)
    merge2 = cfg.vision.spatial_merge_size ** 2
    if (pixel_values is None) != (image_grid is None):
        raise ValueError("forward: pixel_values and image_grid_thw go together")
    if (pixel_values_videos is None) != (video_grid is None):
        raise ValueError("forward: pixel_values_videos and video_grid_thw go together")
    if image_grid is not None:
        _check_visual(ids, cfg, cfg.image_token_id, sum(np.prod(g) for g in image_grid) // merge2,
                      "image")
    if video_grid is not None:
        _check_visual(ids, cfg, cfg.video_token_id, sum(np.prod(g) for g in video_grid) // merge2,
                      "video")
    pos, mask = prepare_inputs(cfg, ids, attention_mask, image_grid, video_grid,
                               second_per_grid_ts)
    graphdef, state = nnx.split(model)
    pv = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
    pvv = None if pixel_values_videos is None else jnp.asarray(pixel_values_videos, jnp.float32)
    logits = _forward_pure(graphdef, state, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask),
                           pv, pvv, image_grid=image_grid, video_grid=video_grid)
    return np.asarray(jax.device_get(logits), np.float32)
