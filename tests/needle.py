"""Synthetic needle traces (the tiny config's protocol) and their sentencepiece, for the tests
that run `experiments/train.py`."""

from __future__ import annotations

import os


def make(out: str, n: int) -> dict:
    """n pairs under `out`; returns {"traces": their vrthinker_cot traces, "pairs": their
    video_pairs manifest, "tokenizer": path, "dir": out}."""
    from data_pipelines import synthetic
    from data_pipelines import tokenizer as tok_lib

    info = synthetic.generate(out, n, seed=0,
                              cfg=synthetic.synthetic_config(heldout_fraction=0.0))
    tok = tok_lib.train_sentencepiece(synthetic.read_corpus(info["paths"]["corpus"]),
                                      os.path.join(out, "tokenizer"), 500)
    return {"traces": info["paths"]["cot_train"], "pairs": info["paths"]["train"],
            "tokenizer": tok, "dir": out}
