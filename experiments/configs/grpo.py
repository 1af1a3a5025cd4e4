"""Stage iii: GRPO with format, accuracy and exploration rewards.

    python experiments/train.py --config experiments/configs/grpo.py:tiny --workdir /tmp/grpo \
        --config.train_data=pairs.jsonl --config.init_params=/tmp/rft/params
"""

import ml_collections

from experiments.configs import common
from vrthinker_jax.rollout.sampler import sampling_config
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
        advantage_baseline="mean",  # "mean" (GRPO) or "rloo"
        scale_std=True,  # divide advantages by the group std
        drop_no_signal_groups=True,  # groups whose rewards are all equal carry no signal
        # rows per rollout-engine call (0 = all prompts_per_step x group_size at once): bounds
        # the KV cache on the rollout mesh
        rollout_batch=0 if size in common.CPU_SIZES else 64,
    ))
    c.sampling = sampling_config(temperature=1.0)
    if size in common.CPU_SIZES:
        c.sampling.update(dict(max_len=2304, max_new_tokens=1024, max_turn_tokens=256,
                               prompt_buckets=(512, 1024)))
        # experiments/benchmarks/grpo_step_probe.py on a trained tiny policy: one Adam step at
        # 2e-4 halves the format reward, 5e-4 zeroes it; the warm-up lets Adam's moments average
        # the noisy gradients before full-size steps (README: "GRPO from a trained model")
        c.optimizer.lr = 3e-5
        c.optimizer.warmup_steps = 10
        c.steps = 30
        c.ckpt_every = 10
        c.log_every = 1
    else:
        c.sampling.update(dict(max_len=20480, max_new_tokens=3072, max_turn_tokens=768,
                               prompt_buckets=(3072, 4096), cache_dtype="bfloat16",
                               # one prefill pass: a TPU prefill is compute-bound (chunks re-read
                               # the weights), and it is what tools/plan.py compiles
                               prefill_chunk=0))
        c.steps = 500
        c.ckpt_every = 20
    return c
