"""Stage i: cold-start SFT on visual chain-of-thought traces.

    python experiments/train.py --config experiments/configs/sft.py:tiny --workdir /tmp/sft \
        --config.train_data=traces.jsonl --config.tokenizer=tok.model
"""

from experiments.configs import common


def get_config(size: str = "tiny"):
    c = common.base(size)
    c.stage = "sft"
    c.train_data = ""  # vrthinker_cot JSONL (video paths relative to the file)
    if size not in common.CPU_SIZES:
        c.optimizer.lr = 1e-5
    return c
