"""Pure loss functions for SFT and GRPO. Shapes: b = batch rows, s = sequence, v = vocab.

Convention: `logits[:, t]` predicts `tokens[:, t + 1]`; every per-token quantity returned here is
aligned with the *predicted* token, i.e. has shape [b, s - 1] and index t refers to tokens[:, t+1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(tokens[:, t+1] | prefix) as float32 [b, s-1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of the next-token distribution, float32 [b, s-1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def chunked_token_stats(
    hidden: jax.Array, tokens: jax.Array, project, chunk: int, *, temperature: float = 1.0,
    entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """`token_logprobs` (and `token_entropy`) from the final hidden states, `chunk` positions
    at a time, so the float32 [b, s, vocab] logits never exist at once: each chunk's logits are
    made, reduced to two numbers per token and, in the backward pass, made again
    (`jax.checkpoint`). On a 20k-token row of a 152k vocabulary that is the difference between
    ~12 GB of logits (times the softmax and its gradient) and one chunk's worth.

    Args:
      hidden: [b, s, d] final (normed) hidden states; tokens: int32 [b, s].
      project: hidden [b, n, d] -> float32 logits [b, n, vocab] (the model's lm head).
      chunk: positions per chunk; 0 (or >= s - 1) projects the whole sequence at once.
    Returns:
      (logp float32 [b, s-1], entropy float32 [b, s-1] or None), aligned like token_logprobs;
      the entropy is a metric and carries no gradient.
    """
    h, tgt = hidden[:, :-1], tokens[:, 1:]
    b, n, d = h.shape

    def stats(h_c, t_c):
        logp = jax.nn.log_softmax(project(h_c).astype(jnp.float32) / temperature, axis=-1)
        lp = jnp.take_along_axis(logp, t_c[..., None], axis=-1)[..., 0]
        ent = (jax.lax.stop_gradient(-jnp.sum(jnp.exp(logp) * logp, axis=-1)) if entropy
               else jnp.zeros_like(lp))
        return lp, ent

    if chunk <= 0 or chunk >= n:
        lp, ent = stats(h, tgt)
    else:
        pad = -n % chunk
        hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        tp = jnp.pad(tgt, ((0, 0), (0, pad)))
        nc = (n + pad) // chunk
        hc = jnp.moveaxis(hp.reshape(b, nc, chunk, d), 1, 0)  # [nc, b, chunk, d]
        tc = jnp.moveaxis(tp.reshape(b, nc, chunk), 1, 0)
        lp, ent = jax.lax.map(lambda a: jax.checkpoint(stats)(*a), (hc, tc))
        lp = jnp.moveaxis(lp, 0, 1).reshape(b, nc * chunk)[:, :n]
        ent = jnp.moveaxis(ent, 0, 1).reshape(b, nc * chunk)[:, :n]
    return lp, (ent if entropy else None)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sft_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array):
    """Next-token cross entropy over tokens whose `loss_mask` is set (assistant text only).

    Args:
      logits: [b, s, v]; tokens: int32 [b, s]; loss_mask: bool [b, s] marking *target* tokens.
    Returns:
      (mean loss over target tokens, number of target tokens) - the count lets gradient
      accumulation weight micro-batches by tokens rather than by rows.
    """
    lp = token_logprobs(logits, tokens)
    mask = loss_mask[:, 1:].astype(jnp.float32)
    n = jnp.sum(mask)
    return -jnp.sum(lp * mask) / jnp.maximum(n, 1.0), n


def group_advantages(
    rewards: jax.Array, group_size: int, *, baseline: str = "mean", scale_std: bool = True,
    eps: float = 1e-6,
):
    """Group-relative advantages for GRPO.

    Args:
      rewards: float32 [n_groups * group_size], rows of one prompt contiguous.
      baseline: "mean" (GRPO: reward minus the group mean) or "rloo" (leave-one-out mean).
      scale_std: divide by the group's reward std (the GRPO paper) or not (Dr. GRPO).
    Returns:
      (advantages [n], has_signal bool [n]) - has_signal is False for rows of groups whose rewards
      are all equal; the protocol drops those groups from the update.
    """
    r = rewards.reshape(-1, group_size).astype(jnp.float32)
    mean = r.mean(axis=1, keepdims=True)
    if baseline == "mean":
        adv = r - mean
    elif baseline == "rloo":
        if group_size < 2:
            raise ValueError("rloo baseline needs group_size >= 2")
        adv = (r - mean) * group_size / (group_size - 1)
    else:
        raise ValueError(f"unknown advantage baseline {baseline!r} (mean | rloo)")
    std = r.std(axis=1, keepdims=True)
    if scale_std:
        adv = adv / (std + eps)
    signal = jnp.broadcast_to(std > eps, r.shape)
    return adv.reshape(-1), signal.reshape(-1)


def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1 with d = ref - pi >= 0."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def grpo_loss_options(grpo_cfg) -> dict:
    """The keyword options of `grpo_loss` from a config's `grpo` block: the one place that maps
    config values to the objective (the step, the planner and the probes all call this)."""
    hi = grpo_cfg.clip_eps_high  # None: the upper clip is clip_eps too
    return {
        "clip_eps": float(grpo_cfg.clip_eps),
        "clip_eps_high": None if hi is None else float(hi),
        "kl_coef": float(grpo_cfg.kl_coef),
        "neg_adv_scale": float(grpo_cfg.neg_adv_scale),
        "neg_prob_cap": float(grpo_cfg.neg_prob_cap),
    }


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    neg_adv_scale: float = 1.0,
    neg_prob_cap: float = 1.0,
):
    """Token-level clipped-ratio GRPO objective (to minimise) with a k3 KL penalty.

    Two options weaken the push-down half of the update (rows with a negative advantage), which
    on a near-deterministic policy breaks the format shared by every row (docs/measurements.md,
    "stage iii"):
      neg_adv_scale: negative advantages are multiplied by this (1 = plain GRPO, 0 = learn from
        the better-than-average rows only).
      neg_prob_cap: in negative-advantage rows, tokens the rollout policy sampled with a
        probability above this are not pushed down (their per-token term is dropped; the mean
        still counts them): the tokens every row shares (tags, the answer template) are near
        1, the decisions that made the row wrong are not. 1 = every token pushed down.

    Args:
      logp, old_logp, ref_logp: float32 [b, t] log-probs of the sampled tokens under the current,
        rollout-time and frozen reference policies (aligned with `mask`).
      advantages: float32 [b], one per row.
      mask: bool [b, t]; True on model-generated tokens only (tool-returned text and frames, and
        prompt tokens, are excluded).
      clip_eps / clip_eps_high: lower / upper clip range of the ratio (upper defaults to lower).
    Returns:
      (loss, metrics dict) with the loss averaged over all unmasked tokens of the batch.
    """
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = jnp.exp(logp - old_logp)
    negative = advantages < 0
    adv = jnp.where(negative, advantages * neg_adv_scale, advantages)[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + hi) * adv
    objective = jnp.minimum(unclipped, clipped)
    # [b, t]: tokens whose policy term counts (a sure token of a negative row does not)
    spared = negative[:, None] & (old_logp > jnp.log(neg_prob_cap)) if neg_prob_cap < 1.0 else (
        jnp.zeros_like(mask, dtype=bool))
    per_token = -jnp.where(spared, 0.0, objective)
    kl = jnp.zeros_like(logp) if ref_logp is None else kl_k3(logp, ref_logp)
    per_token = per_token + kl_coef * kl
    loss = masked_mean(per_token, mask)
    metrics = {
        "kl": masked_mean(kl, mask),
        # share of tokens where the clipped term is the active one (it has no gradient there)
        "clip_frac": masked_mean((clipped < unclipped).astype(jnp.float32), mask),
        "ratio_mean": masked_mean(ratio, mask),
        # share of the generated tokens that neg_prob_cap kept out of the push-down
        "spared_frac": masked_mean(spared.astype(jnp.float32), mask),
    }
    return loss, metrics
