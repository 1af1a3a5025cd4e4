"""Stage ii: rejection-sampling fine-tuning on self-generated, all-correct traces.

    python experiments/train.py --config experiments/configs/rft.py:tiny --workdir /tmp/rft \
        --config.train_data=pairs.jsonl --config.init_params=/tmp/sft/params
"""

from experiments.configs import common
from vrthinker_jax.rollout.sampler import sampling_config


def get_config(size: str = "tiny"):
    c = common.base(size)
    c.stage = "rft"
    c.train_data = ""  # video_pairs manifest (JSONL/CSV) of labelled training pairs
    c.samples_per_prompt = 4 if size in common.CPU_SIZES else 8  # K rollouts per training pair
    c.max_prompts = 64 if size in common.CPU_SIZES else 20000  # pairs to sample from
    c.one_trace_per_pair = True  # keep at most one accepted trace per pair (no easy-pair bias)
    c.steps = 150 if size in common.CPU_SIZES else 1000  # SFT steps on the accepted traces
    c.sampling = sampling_config(temperature=1.0)
    if size in common.CPU_SIZES:
        c.sampling.update(dict(max_len=2304, max_new_tokens=1024, max_turn_tokens=256,
                               prompt_buckets=(512, 1024)))
    else:
        c.sampling.update(dict(max_len=20480, max_new_tokens=3072, max_turn_tokens=768,
                               prompt_buckets=(3072, 4096),
                               # one prefill pass: a TPU prefill is compute-bound (chunks re-read
                               # the weights), and it is what tools/plan.py compiles
                               prefill_chunk=0))
        c.optimizer.lr = 5e-6
    return c
