"""Stage iii: GRPO with format, accuracy and exploration rewards.

    python experiments/train.py --config experiments/configs/grpo.py:tiny --workdir /tmp/grpo \
        --config.train_data=pairs.jsonl --config.init_params=/tmp/rft/params
"""

import ml_collections

from experiments.configs import common
from vrthinker_jax.train.rewards import rewards_config


def get_config(size: str = "tiny"):
    c = common.base(size)
    c.stage = "grpo"
    c.train_data = ""  # video_pairs manifest (JSONL/CSV) of labelled training pairs
    c.rewards = rewards_config()
    c.grpo = ml_collections.ConfigDict(dict(
        group_size=4 if size in common.CPU_SIZES else 8,  # rollouts per prompt (G)
        prompts_per_step=4 if size in common.CPU_SIZES else 32,  # prompts per rollout batch
        inner_updates=1,  # optimizer updates per rollout batch (old log-probs stay fixed)
        clip_eps=0.2,  # lower clip of the ratio
        clip_eps_high=0.28,  # upper clip (DAPO-style clip-higher)
        kl_coef=0.01,  # k3 KL to the frozen reference (0 skips the reference forward)
        # the push-down half of the update (rows with a negative advantage), which can break the
        # format every row shares on a near-deterministic policy with few rollouts per prompt:
        # negative advantages are multiplied by neg_adv_scale (1 = plain GRPO, 0 = learn from
        # better-than-average rows only). 1 by measurement: on the demo's stage3 preset (8
        # rollouts per prompt) plain GRPO did as well as 0.25 with neg_prob_cap 0.9, or better
        # (docs/measurements.md, "2026-12-05: stage iii")
        neg_adv_scale=1.0,
        # in negative-advantage rows, tokens sampled with a probability above this are not
        # pushed down (the shared tags and template sit near 1, the wrong decisions do not);
        # 1 = every token pushed down
        neg_prob_cap=1.0,
        advantage_baseline="mean",  # "mean" (GRPO) or "rloo"
        scale_std=True,  # divide advantages by the group std
        drop_no_signal_groups=True,  # groups whose rewards are all equal carry no signal
        # rows per rollout-engine call (0 = all prompts_per_step x group_size at once): bounds
        # the KV cache on the rollout mesh
        rollout_batch=0 if size in common.CPU_SIZES else 64,
    ))
    c.sampling = common.rollout_sampling(size)
    if size in common.CPU_SIZES:
        # experiments/benchmarks/grpo_step_probe.py on a trained tiny policy: one Adam step at
        # 2e-4 halves the format reward, 5e-4 zeroes it; the warm-up lets Adam's moments average
        # the noisy gradients before full-size steps (README: "GRPO from a trained model")
        c.optimizer.lr = 3e-5
        c.optimizer.warmup_steps = 10
        c.steps = 30
        c.ckpt_every = 10
        c.log_every = 1
    else:
        c.sampling.cache_dtype = "bfloat16"  # the rollout's KV cache (half the HBM)
        c.steps = 500
        c.ckpt_every = 20
    return c
