"""Qwen2 decoder layer: pre-RMSNorm, GQA attention with q/k/v biases and M-RoPE, SwiGLU MLP."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from vrthinker_jax.models import rope as rope_lib
from vrthinker_jax.models.layers import Dense, RMSNorm, masked_softmax, param


def write_stacked_cache(cache, new, layer, cache_index):
    """cache [layers, b, kv, max_len, hd] with new [b, s, kv, hd] written into layer `layer`
    (int, possibly traced) at row i from slot cache_index[i] (int32 [b]).

    One scatter that touches only the s new slots per row, so with a donated cache XLA updates it
    in place. (A vmap over the batch axis, which is not the leading one, made XLA transpose and
    copy the whole cache on every call: a decode step then cost time proportional to the cache.)
    Slots past max_len are dropped, never clamped onto earlier slots.
    """
    b, s, kv = new.shape[:3]
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(kv)[None, :, None]
    cols = (cache_index[:, None] + jnp.arange(s)[None])[:, None, :]
    vals = jnp.swapaxes(new, 1, 2).astype(cache.dtype)  # [b, kv, s, hd]
    return cache.at[layer, rows, heads, cols].set(vals, mode="drop")


def attend(q, k, v, mask, query_chunk: int = 0, dtype=jnp.float32):
    """Grouped-query attention. q [b, s, heads, hd]; k, v [b, kv_heads, t, hd]; mask bool
    [b, s, t] (nothing is added; a query that sees no key gets a uniform softmax, like
    transformers' eager path). Returns [b, s, heads, hd] in `dtype`.

    The scores are laid out heads-major, [b, kv_heads, group * s, t], and computed `query_chunk`
    query rows at a time when 0 < query_chunk < s (queries padded up to a multiple), each chunk
    rematerialised in the backward pass. The float32 scores are the biggest tensor in a long
    prefill; one chunk of them stays in cache on a CPU (a 256 x 2560 insert ran 4-5x faster than
    unchunked) and bounds a learner step's activation memory at long sequences on TPU.
    """
    b, s, h, hd = q.shape
    kv_heads, t = k.shape[1:3]
    g = h // kv_heads
    scale = hd ** -0.5
    kh, vh = k.astype(dtype), v.astype(dtype)

    def block(qc, mc):  # qc [b, c, heads, hd], mc [b, c, t] -> [b, c, heads, hd]
        c = qc.shape[1]
        qh = qc.reshape(b, c, kv_heads, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads,
                                                                                g * c, hd)
        scores = jnp.einsum("bkqd,bktd->bkqt", qh, kh, preferred_element_type=jnp.float32)
        m = jnp.broadcast_to(mc[:, None, None], (b, 1, g, c, t)).reshape(b, 1, g * c, t)
        p = masked_softmax(scores * scale, m).astype(dtype)
        o = jnp.einsum("bkqt,bktd->bkqd", p, vh)
        return o.reshape(b, kv_heads, g, c, hd).transpose(0, 3, 1, 2, 4).reshape(b, c, h, hd)

    if query_chunk <= 0 or s <= query_chunk:
        return block(q.astype(dtype), mask)
    n = -(-s // query_chunk)
    pad = n * query_chunk - s
    qp = jnp.pad(q.astype(dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))
    mp = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    qc = jnp.moveaxis(qp.reshape(b, n, query_chunk, h, hd), 1, 0)
    mc = jnp.moveaxis(mp.reshape(b, n, query_chunk, t), 1, 0)
    out = jax.lax.map(lambda a: jax.checkpoint(block)(*a), (qc, mc))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * query_chunk, h, hd)[:, :s]


class DecoderLayer(nnx.Module):
    def __init__(self, tc, *, dtype, param_dtype, rngs: nnx.Rngs, query_chunk: int = 0):
        d, h, kv, hd, f = (tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads,
                           tc.head_dim, tc.intermediate_size)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.dtype = dtype
        self.query_chunk = int(query_chunk)  # see `attend`
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(d, tc.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(d, tc.rms_norm_eps, **kw)
        self.q_kernel = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.q_bias = param(None, (h, hd), ("heads", "head_dim"), param_dtype, "zeros")
        self.k_kernel = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.k_bias = param(None, (kv, hd), ("kv_heads", "head_dim"), param_dtype, "zeros")
        self.v_kernel = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_bias = param(None, (kv, hd), ("kv_heads", "head_dim"), param_dtype, "zeros")
        self.o_kernel = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), param_dtype)
        self.gate = Dense(d, f, ("embed", "mlp"), bias=False, rngs=rngs, **kw)
        self.up = Dense(d, f, ("embed", "mlp"), bias=False, rngs=rngs, **kw)
        self.down = Dense(f, d, ("mlp", "embed"), bias=False, rngs=rngs, **kw)

    def _attend(self, q, k, v, mask):
        """q [b, s, heads, hd]; k, v [b, kv_heads, t, hd] (the cache layout); mask [b, s, t]."""
        return attend(q, k, v, mask, self.query_chunk, self.dtype)

    def __call__(self, x, cos, sin, mask, cache_k=None, cache_v=None, cache_index=None, *,
                 layer=None, kv_prefixes=None, kv_need=None):
        """x: [b, s, hidden]; cos/sin: [b, s, head_dim]; mask: bool [b, s, kv_len].

        Without a cache kv_len == s. With a cache, cache_k/cache_v are the whole stacked caches
        [layers, b, kv_heads, max_len, head_dim] and `layer` (int or traced int32 scalar) picks
        this layer's: the new keys/values are written at cache_index (only those slots) and
        attention runs over the first kv_len slots (kv_len <= max_len; the caller guarantees later
        slots are invisible to every query).
        kv_prefixes (static increasing ints, last <= kv_len) with kv_need (int32 scalar): with the
        stacked cache, attention reads only the shortest prefix >= kv_need (keys past it must be
        invisible to every query whose output matters), picked by a lax.switch.
        Returns (x, (cache_k, cache_v)) with the updated caches (None without a cache).
        """
        dt = self.dtype
        b, s, _ = x.shape
        y = self.input_layernorm(x)

        def proj(kernel, bias):
            return jnp.einsum("bsd,dhk->bshk", y, kernel[...].astype(dt)) + bias[...].astype(dt)

        q = proj(self.q_kernel, self.q_bias)
        k = proj(self.k_kernel, self.k_bias)
        v = proj(self.v_kernel, self.v_bias)
        q = rope_lib.apply_rotary(q, cos, sin)
        k = rope_lib.apply_rotary(k, cos, sin)
        kv_len = mask.shape[-1]
        if cache_k is not None:
            cache_k = write_stacked_cache(cache_k, k, layer, cache_index)
            cache_v = write_stacked_cache(cache_v, v, layer, cache_index)
            if kv_prefixes is not None and len(kv_prefixes) > 1:
                # The branches only read the (already written) cache, so no branch copies it;
                # each reads just its prefix of this layer.
                def attend_prefix(n, q, ck, cv, mask):
                    start = (layer, 0, 0, 0, 0)
                    size = (1, b, ck.shape[2], n, ck.shape[4])
                    kk = jax.lax.dynamic_slice(ck, start, size)[0].astype(dt)
                    vv = jax.lax.dynamic_slice(cv, start, size)[0].astype(dt)
                    return self._attend(q, kk, vv, mask[:, :, :n])

                branch = jnp.sum(kv_need > jnp.asarray(kv_prefixes[:-1], jnp.int32))
                o = jax.lax.switch(branch, [functools.partial(attend_prefix, n)
                                            for n in kv_prefixes], q, cache_k, cache_v, mask)
            else:
                k = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)
                v = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)
                o = self._attend(q, k[:, :, :kv_len], v[:, :, :kv_len], mask)
        else:
            o = self._attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask)
        x = x + jnp.einsum("bshk,hkd->bsd", o, self.o_kernel[...].astype(dt))
        y = self.post_attention_layernorm(x)
        x = x + self.down(jax.nn.silu(self.gate(y)) * self.up(y))
        return x, (cache_k, cache_v)
