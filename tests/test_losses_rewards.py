"""Loss and reward math on hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrthinker_jax.rollout import protocol
from vrthinker_jax.train import losses, rewards


def test_token_logprobs_alignment_and_sft_mask():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    tokens = jnp.array([[0, 0, 1]])
    lp = losses.token_logprobs(logits, tokens)
    np.testing.assert_allclose(lp, np.log([[0.5, 0.1]]), rtol=1e-6)
    loss, n = losses.sft_loss(logits, tokens, jnp.array([[False, False, True]]))
    assert n == 1 and np.isclose(loss, -np.log(0.1), rtol=1e-6)
    ent = losses.token_entropy(logits)
    np.testing.assert_allclose(ent[0, 0], np.log(2), rtol=1e-6)


@pytest.mark.parametrize("chunk", [0, 3, 4, 50])
def test_chunked_token_stats_match_full_logits_values_and_gradients(chunk):
    """The chunked vocabulary projection (lm_head_chunk) gives the full-logits log-probs and
    entropies, and the same gradients (a chunk of 3 over 9 predictions divides evenly, 4 pads)."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 10, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 11)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 11, (2, 10)), jnp.int32)

    def full(h, w):
        logits = jnp.einsum("bsd,dv->bsv", h, w) / 0.7
        return losses.token_logprobs(logits, tokens), losses.token_entropy(logits)

    def chunked(h, w):
        return losses.chunked_token_stats(h, tokens, lambda x: jnp.einsum("bsd,dv->bsv", x, w),
                                          chunk, temperature=0.7, entropy=True)

    (lp0, ent0), (lp1, ent1) = full(h, w), chunked(h, w)
    np.testing.assert_allclose(lp1, lp0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent1, ent0, rtol=1e-5, atol=1e-6)
    g0 = jax.grad(lambda h, w: jnp.sum(full(h, w)[0] * tokens[:, 1:]), (0, 1))(h, w)
    g1 = jax.grad(lambda h, w: jnp.sum(chunked(h, w)[0] * tokens[:, 1:]), (0, 1))(h, w)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert losses.chunked_token_stats(h, tokens, lambda x: x @ w, chunk)[1] is None


def test_weighted_sft_loss_uses_token_weights():
    from vrthinker_jax.train import steps

    lp = jnp.array([[-1.0, -2.0, -4.0]])
    batch = {"loss_mask": jnp.array([[False, True, True, True]]),
             "valid": jnp.array([[True, True, True, False]]),
             "weight": jnp.array([1.0])}
    loss, n = steps.weighted_sft_loss(lp, batch)
    assert n == 2 and np.isclose(loss, 1.5)  # the padded 4th token never counts
    batch["loss_weight"] = jnp.array([[0.0, 1.0, 3.0, 3.0]])
    loss, n = steps.weighted_sft_loss(lp, batch)
    assert n == 2 and np.isclose(loss, (1.0 + 3 * 2.0) / 4)


def test_group_advantages_mean_rloo_and_signal():
    r = jnp.array([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv, sig = losses.group_advantages(r, 4, scale_std=False)
    np.testing.assert_allclose(adv, [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0], atol=1e-6)
    assert sig.tolist() == [True] * 4 + [False] * 4
    adv, _ = losses.group_advantages(r, 4, baseline="rloo", scale_std=False)
    # leave-one-out: 1 - mean(0, 1, 0) = 2/3
    np.testing.assert_allclose(adv[:2], [2 / 3, -2 / 3], atol=1e-6)
    adv, _ = losses.group_advantages(r, 4)
    np.testing.assert_allclose(adv[:4], [1, -1, 1, -1], atol=1e-4)
    with pytest.raises(ValueError, match="unknown advantage baseline"):
        losses.group_advantages(r, 4, baseline="median")


def test_grpo_loss_clipping_and_kl():
    old = jnp.zeros((2, 3))
    new = jnp.log(jnp.array([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]]))
    adv = jnp.array([1.0, -1.0])
    mask = jnp.array([[True, True, True], [True, True, False]])
    loss, m = losses.grpo_loss(new, old, new, adv, mask, clip_eps=0.2, kl_coef=0.1)
    # row 0 (A=+1): min(r, clip(r)) = [1.2, 1.0, 0.5]; row 1 (A=-1): min(-r, -clip(r)) = [-1.5, -1]
    expect = -(1.2 + 1.0 + 0.5 - 1.5 - 1.0) / 5
    assert np.isclose(loss, expect, atol=1e-6)
    assert np.isclose(m["kl"], 0.0, atol=1e-7)
    # only row 0 token 0 (ratio 1.5 > 1.2 with A > 0) has the clipped term active
    assert np.isclose(m["clip_frac"], 1 / 5, atol=1e-6)
    # k3 is non-negative and zero only at equality
    d = losses.kl_k3(jnp.array([0.0, -1.0]), jnp.array([-1.0, 0.0]))
    assert (d > 0).all()
    g = jax.grad(lambda lp: losses.grpo_loss(lp, old, None, adv, mask, clip_eps=0.2)[0])(old)
    # gradients only flow to unmasked tokens
    assert g[1, 2] == 0 and g[0, 0] != 0


def test_grpo_loss_negative_advantage_options():
    old = jnp.log(jnp.array([[0.99, 0.5], [0.99, 0.5], [0.99, 0.5]]))
    adv = jnp.array([1.0, -1.0, -2.0])
    mask = jnp.ones((3, 2), bool)

    def grad(**kw):
        return jax.grad(lambda lp: losses.grpo_loss(lp, old, None, adv, mask, clip_eps=0.2,
                                                    **kw)[0])(old)

    plain = grad()
    # neg_adv_scale scales only the rows with a negative advantage
    scaled = grad(neg_adv_scale=0.25)
    np.testing.assert_allclose(scaled[0], plain[0], atol=1e-7)
    np.testing.assert_allclose(scaled[1:], 0.25 * plain[1:], atol=1e-7)
    assert np.allclose(grad(neg_adv_scale=0.0)[1:], 0.0)
    # neg_prob_cap spares the sure tokens (p 0.99 > 0.9) of negative rows, nothing else
    capped = grad(neg_prob_cap=0.9)
    np.testing.assert_allclose(capped[0], plain[0], atol=1e-7)
    assert np.allclose(capped[1:, 0], 0.0) and np.allclose(capped[1:, 1], plain[1:, 1])
    _, m = losses.grpo_loss(old, old, None, adv, mask, clip_eps=0.2, neg_prob_cap=0.9)
    assert np.isclose(m["spared_frac"], 2 / 6)
    # the config block maps to these options
    from experiments.configs import grpo as grpo_cfgs

    opts = losses.grpo_loss_options(grpo_cfgs.get_config("tiny").grpo)
    assert {"neg_adv_scale", "neg_prob_cap"} <= set(opts)


def test_rewards():
    labels = {"TA": 1, "MQ": 0, "VQ": -1, "OA": 1}
    turn_ok = protocol.format_final_turn("s", "t", {"TA": 1, "MQ": 0, "VQ": 2, "OA": 1})
    assert rewards.format_reward([turn_ok]) == 1.0
    assert rewards.format_reward(["garbage", turn_ok]) == 0.0
    assert rewards.format_reward([]) == 0.0
    j = protocol.parse_final_answer(turn_ok)
    assert rewards.accuracy_reward(j, labels, 0.5) == 1.0
    assert rewards.accuracy_reward({**j, "MQ": 2}, labels, 0.5) == 0.75
    assert rewards.accuracy_reward(None, labels, 0.5) == 0.0
    assert rewards.accuracy_reward({"OA": 2}, {"TA": -1, "MQ": -1, "VQ": -1, "OA": 2}, 0.5) == 1.0
    cfg = rewards.rewards_config()
    parts = rewards.trajectory_reward([turn_ok], j, labels, frames_selected=3, cfg=cfg)
    full = cfg.format_weight + cfg.accuracy_weight + cfg.exploration_weight
    assert parts.total == pytest.approx(full)
    parts = rewards.trajectory_reward([turn_ok], j, labels, frames_selected=0, cfg=cfg)
    assert parts.exploration == 0.0
    assert rewards.all_correct(j, labels)
    assert not rewards.all_correct({**j, "TA": 0}, labels)
    assert not rewards.all_correct(None, labels)
