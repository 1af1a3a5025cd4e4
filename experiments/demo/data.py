"""The demo's data: the synthetic pairs and their frame banks, the tokenizer trained on the
training split, the static lengths a run compiles for, and `StageData` (what the stages read)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

LABEL_KEYS = ("TA", "MQ", "VQ", "OA")


def round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def label_record(pair: dict) -> dict:
    """{id, prompt, labels}: a pair as the RFT / GRPO prompt datasets take it."""
    return {"id": pair["id"], "prompt": pair["prompt"],
            "labels": {k: int(pair[k]) for k in LABEL_KEYS}}


def direct_answer_trace(trace: dict) -> dict:
    """The baseline's training trace: one final turn from what the initial frames show, with the
    pair's true labels (the best a model without the tool can learn is the label prior)."""
    from vrthinker_jax.rollout import protocol

    synthesis = trace["turns"][0]["content"].split("</synthesis>")[0]
    synthesis = synthesis.replace("<synthesis>", "")
    think = "I can only judge from the initial frames of both videos."
    return {**trace, "turns": [{"role": "assistant", "content": protocol.format_final_turn(
        synthesis, think, {k: int(trace["labels"][k]) for k in LABEL_KEYS})}]}


def tokens_per_frame(demo) -> int:
    """Visual tokens of one bank frame (one image of demo.frame_size: 28 x 28 px per token)."""
    from data_pipelines import processor

    h, w = (int(v) for v in demo.frame_size)
    return processor.tokens_per_image((1, h // 14, w // 14))


def load_banks(records: list[dict], data_dir: str, num_candidates: int, size) -> dict:
    """id -> uint8 [2N, H, W, 3] candidate frames of both videos (decoded once, kept in memory)."""
    from data_pipelines import banks

    out = {}
    for r in records:
        a, b = (os.path.join(data_dir, r[k]) for k in ("video_a", "video_b"))
        out[r["id"]] = banks.pair_bank(a, b, num_candidates, tuple(size))
    return out


@dataclasses.dataclass
class Split:
    """A generated dataset: the pairs of each split, the oracle traces and frame captions of
    the training split, and every pair's frame bank."""

    data_dir: str
    train_pairs: list
    heldout: list
    train_traces: list
    train_captions: list
    banks: dict  # id -> uint8 [2N, H, W, 3]
    ties: int


def generate(demo, data_dir: str, pcfg) -> Split:
    """The synthetic needle pairs (`data_pipelines.synthetic`) under data_dir, read back; the
    held-out split must share no id with anything trained on."""
    from data_pipelines import synthetic

    syn_cfg = synthetic.synthetic_config(**demo.synthetic.to_dict())
    info = synthetic.generate(data_dir, int(demo.num_pairs), int(demo.seed), syn_cfg, pcfg)
    train_pairs = read_jsonl(info["paths"]["train"])
    heldout = read_jsonl(info["paths"]["heldout"])
    traces = read_jsonl(info["paths"]["cot_train"])
    held_ids = {r["id"] for r in heldout}
    if {r["id"] for r in train_pairs} & held_ids or {t["id"] for t in traces} & held_ids:
        raise RuntimeError("held-out ids overlap the training ids")
    banks = load_banks(train_pairs + heldout, data_dir, pcfg.num_candidates, demo.frame_size)
    return Split(data_dir, train_pairs, heldout, traces,
                 read_jsonl(info["paths"]["captions_train"]), banks, int(info["ties"]))


def train_tokenizer(corpus: list[str], out_dir: str, vocab: int) -> str:
    """sentencepiece on `corpus`; a vocabulary larger than a small corpus supports is lowered
    to the largest size sentencepiece accepts (it names it in its error)."""
    import re

    from data_pipelines import tokenizer as tok_lib

    try:
        return tok_lib.train_sentencepiece(corpus, out_dir, vocab)
    except RuntimeError as e:
        m = re.search(r"<= (\d+)", str(e))
        if "too high" not in str(e) or not m:
            raise
        return tok_lib.train_sentencepiece(corpus, out_dir, int(m.group(1)))


def split_tokenizer(split: Split, pcfg, out_dir: str, vocab: int) -> str:
    """The tokenizer trained on the training split's text only (traces and captions)."""
    from data_pipelines import synthetic

    corpus = synthetic.text_corpus(split.train_traces, pcfg) + list(dict.fromkeys(
        c for r in split.train_captions for c in r["captions"]))
    return train_tokenizer(corpus, out_dir, vocab)


def stage_lengths(demo, tok, pcfg, traces: list[dict], pairs: list[dict]) -> dict:
    """The static lengths a run compiles for, from its data: the longest oracle trace and
    prompt, the SFT row (`seq_len`) and the rollout row (`max_len`: rollouts may run a little
    longer than the oracle's traces; RFT / GRPO rows hold a whole one)."""
    from vrthinker_jax.rollout import chat, protocol

    vt = tokens_per_frame(demo)
    trace_lens = [len(chat.tokenize_segments(tok, protocol.trace_segments(t, pcfg), vt).ids)
                  for t in traces]
    prompt_len = max(len(chat.tokenize_segments(tok, protocol.prompt_segments(r["prompt"], pcfg),
                                                vt).ids) for r in pairs)
    return {"trace_max": max(trace_lens), "prompt_max": prompt_len,
            "seq_len": round_up(max(trace_lens) + 16, 64),
            "max_len": max(int(demo.eval.max_len), round_up(max(trace_lens) + 160, 128)),
            "vocab": tok.vocab_size}


def rollout_sampling(demo, lengths: dict) -> dict:
    """The rollout sampling block every stage and evaluation shares (without temperature)."""
    return dict(max_len=int(lengths["max_len"]), max_new_tokens=int(demo.eval.max_new_tokens),
                max_turn_tokens=int(demo.eval.max_turn_tokens),
                prompt_buckets=(round_up(int(lengths["prompt_max"]), 64),))


@dataclasses.dataclass
class StageData:
    """What the tool-using model's stages read: the tokenizer, protocol, rollout sampling
    (without temperature), the longest row, and the training split (records, traces, banks)."""

    tok: object
    proto: dict
    pcfg: object  # protocol.ProtocolConfig of proto
    sampling: dict
    max_len: int
    train_pairs: list
    train_records: list  # {id, prompt, labels}
    train_banks: list  # uint8 [2N, H, W, 3] per train_records row
    train_traces: list
    trace_banks: list

    @classmethod
    def build(cls, demo, tok, pcfg, lengths: dict, train_pairs, traces, banks: dict):
        return cls(tok=tok, proto=demo.protocol.to_dict(), pcfg=pcfg,
                   sampling=rollout_sampling(demo, lengths), max_len=int(lengths["max_len"]),
                   train_pairs=train_pairs,
                   train_records=[label_record(r) for r in train_pairs],
                   train_banks=[banks[r["id"]] for r in train_pairs], train_traces=traces,
                   trace_banks=[banks[t["id"]] for t in traces])
