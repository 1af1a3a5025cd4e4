"""Stage i: cold-start SFT on visual chain-of-thought traces.

    python experiments/train.py --config experiments/configs/sft.py:tiny --workdir /tmp/sft \
        --config.train_data=traces.jsonl --config.tokenizer=tok.model
"""

from experiments.configs import common
from vrthinker_jax.rollout.sampler import sampling_config


def get_config(size: str = "tiny"):
    c = common.base(size)
    c.stage = "sft"
    c.train_data = ""  # vrthinker_cot JSONL (video paths relative to the file)
    # SFT rolls nothing out: these are the sampling settings written into the stage's
    # reward-model export (`experiments/train.py` export; eval and score run with them)
    c.sampling = sampling_config()
    if size not in common.CPU_SIZES:
        c.optimizer.lr = 1e-5
    return c
