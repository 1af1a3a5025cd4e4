"""Stage ii: rejection-sampling fine-tuning on self-generated, all-correct traces.

    python experiments/train.py --config experiments/configs/rft.py:tiny --workdir /tmp/rft \
        --config.train_data=pairs.jsonl --config.init_params=/tmp/sft/params
"""

from experiments.configs import common


def get_config(size: str = "tiny"):
    c = common.base(size)
    c.stage = "rft"
    c.train_data = ""  # video_pairs manifest (JSONL/CSV) of labelled training pairs
    c.samples_per_prompt = 4 if size in common.CPU_SIZES else 8  # K rollouts per training pair
    c.max_prompts = 64 if size in common.CPU_SIZES else 20000  # pairs to sample from
    c.one_trace_per_pair = True  # keep at most one accepted trace per pair (no easy-pair bias)
    c.steps = 150 if size in common.CPU_SIZES else 1000  # SFT steps on the accepted traces
    c.sampling = common.rollout_sampling(size)
    if size not in common.CPU_SIZES:
        c.optimizer.lr = 5e-6
    return c
