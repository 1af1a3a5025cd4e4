"""Did the demo's visual pretraining teach the model to see the defects? A teacher-forced probe.

For every held-out pair (never trained on) the probe scores, under a demo run's checkpoint:

* calls: for each oracle tool call that shows the defect and as many that do not, the call's
  frames with every verdict the oracle states after that call in any pair ("Video 2: clean.",
  "Video 2: smear.", ...); the pick is the verdict of highest log-prob (chance: 1 / candidates);
* captions: each defective frame and as many clean ones, with the true caption against the same
  caption under each other effect (clean / heavy noise / blurred / dropout / smear), "No
  object." and each other colour.

Each is run with the frames seen and blacked out (`blind`). Prints one JSON line.

    python -m experiments.demo --out /tmp/demo
    python experiments/benchmarks/pretrain_probe.py --demo-dir /tmp/demo --stage pretrain
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def _caption_alternatives(text: str, clean_twin: str, colours: list[str]) -> list[str]:
    """The candidate captions of one frame, the true one first. clean_twin: the caption of the
    same moment in the other video (the body a "No object." frame would have had)."""
    from data_pipelines import synthetic

    body, effect = (clean_twin if text == "No object." else text).rsplit("; ", 1)
    alts = [f"{body}; {e}." for e in dict.fromkeys(synthetic.EFFECT_CAPTION.values())]
    alts.append("No object.")
    colour = body.split(" ")[1]
    alts += [f"{body.replace(' ' + colour + ' ', ' ' + o + ' ', 1)}; {effect}"
             for o in colours if o != colour]
    return [text] + [a for a in dict.fromkeys(alts) if a != text]


def _parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", required=True, help="a demo --out dir (results.json written)")
    p.add_argument("--stage", default="pretrain", help="pretrain | sft | rft | grpo")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-items", type=int, default=240, help="items per kind (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _oracle_verdicts(data_dir: str) -> dict[int, list[str]]:
    """Call index -> the distinct verdicts the oracle states after that call, over every pair
    (train and held-out), in first-seen order."""
    from experiments.demo import data as data_lib
    from experiments.demo import pretraining as demo_pretraining

    verdicts: dict[int, list[str]] = {}
    for split in ("train", "heldout"):
        for t in data_lib.read_jsonl(os.path.join(data_dir, f"cot_{split}.jsonl")):
            for k, (_, text) in enumerate(demo_pretraining.call_rows(t)):
                verdicts.setdefault(k, [])
                if text not in verdicts[k]:
                    verdicts[k].append(text)
    return verdicts


def _probe_items(heldout: list[dict], data_dir: str, n: int) -> dict[str, list[tuple]]:
    """Every candidate item of the held-out pairs, by kind ("call", "caption").

    An item is (pair id, frames (global numbers), candidate texts with the true one first,
    defect kind when the frames show the pair's defect, else ""). n: candidates per video.
    """
    from data_pipelines import synthetic
    from experiments.demo import data as data_lib
    from experiments.demo import pretraining as demo_pretraining

    caps = {r["id"]: r for r in data_lib.read_jsonl(
        os.path.join(data_dir, "captions_heldout.jsonl"))}
    traces = {t["id"]: t for t in data_lib.read_jsonl(
        os.path.join(data_dir, "cot_heldout.jsonl"))}
    verdicts = _oracle_verdicts(data_dir)
    items = {"call": [], "caption": []}
    colours = list(synthetic.COLOURS)
    for r in heldout:
        d = r["meta"].get("defect")
        bad = set(d["global_frames"]) if d else set()
        for k, (frames, text) in enumerate(demo_pretraining.call_rows(traces[r["id"]])):
            alts = [text] + [v for v in verdicts[k] if v != text]
            items["call"].append((r["id"], frames, alts, d["kind"] if bad & set(frames) else ""))
        texts = caps[r["id"]]["captions"]
        for g, text in enumerate(texts, start=1):
            twin = texts[(g - 1 + n) % (2 * n)]  # the same moment in the other video
            items["caption"].append((r["id"], [g], _caption_alternatives(text, twin, colours),
                                     d["kind"] if g in bad else ""))
    return items


def _balance(items: dict[str, list[tuple]], rng, max_items: int) -> dict[str, list[tuple]]:
    """Per kind: every defective item and as many clean ones drawn at random (clean items far
    outnumber defective ones, so accuracy would otherwise measure the clean ones); then at most
    `max_items` of those at random (0 = all)."""
    out = {}
    for kind, its in items.items():
        bad = [x for x in its if x[3]]
        clean = [its[i] for i in rng.permutation(len(its)) if not its[i][3]][:len(bad)]
        keep = bad + clean
        if max_items and len(keep) > max_items:
            keep = [keep[i] for i in rng.permutation(len(keep))[:max_items]]
        out[kind] = keep
    return out


def _seq_len(items: dict[str, list[tuple]], tok, demo) -> int:
    """Tokens of the longest (frames, candidate text) example, plus one; 16 with no items."""
    from experiments.demo import data as data_lib
    from vrthinker_jax.rollout import chat, protocol

    probe = [(frames, alt) for its in items.values() for _, frames, alts, _ in its
             for alt in alts]
    if not probe:
        return 16
    return max(len(chat.tokenize_segments(
        tok, protocol.caption_segments(frames, alt),
        data_lib.tokens_per_frame(demo)).ids) for frames, alt in probe) + 1


def _right_answers(its: list[tuple], scorer, banks, *, blind: bool, tok, pcfg, seq_len: int,
                   max_frames: int) -> list[bool]:
    """Per item: whether its true text (candidate 0) gets the highest log-prob under `scorer`.
    blind: the frames are replaced by black ones of the same shape."""
    import numpy as np

    from vrthinker_jax.rollout import protocol
    from vrthinker_jax.train import examples

    # (item index, alternative index, pair id, frames, text) of each scored example
    rows = [(i, a, pid, frames, alt) for i, (pid, frames, alts, _) in enumerate(its)
            for a, alt in enumerate(alts)]
    exs = (examples.segments_to_example(
        protocol.caption_segments(frames, alt),
        np.zeros_like(banks[pid]) if blind else banks[pid], tok, pcfg=pcfg,
        seq_len=seq_len, max_frames=max_frames, merged_grid=scorer.rt.merged_grid)
        for _, _, pid, frames, alt in rows)
    scores: dict[int, dict[int, float]] = {}
    for (i, a, *_), v in zip(rows, scorer(exs), strict=True):
        scores.setdefault(i, {})[a] = v
    return [max(sc, key=sc.get) == 0 for sc in (scores[i] for i in range(len(its)))]


def _accuracy(right: list[bool], its: list[tuple]) -> dict:
    """One kind's report: accuracy over all items, defective ones, clean ones and per defect
    kind, and the fewest alternatives any item had (chance is 1 / alternatives)."""
    import numpy as np

    bad = [r for r, it in zip(right, its, strict=True) if it[3]]
    clean = [r for r, it in zip(right, its, strict=True) if not it[3]]
    by_kind = {}
    for k in sorted({it[3] for it in its if it[3]}):
        got = [r for r, it in zip(right, its, strict=True) if it[3] == k]
        by_kind[k] = {"n": len(got), "accuracy": round(float(np.mean(got)), 3)}
    return {
        "items": len(its), "accuracy": round(float(np.mean(right)), 3),
        "defective": round(float(np.mean(bad)), 3) if bad else None,
        "clean": round(float(np.mean(clean)), 3) if clean else None,
        "by_kind": by_kind,
        "alternatives": min(len(it[2]) for it in its),
    }


def main(argv=None) -> int:
    args = _parse_args(argv)

    import numpy as np
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from experiments.demo import runs
    from vrthinker_jax.rollout import protocol

    try:
        _, demo, tok, ckpt_dir = runs.open_run(args.demo_dir, args.stage)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pcfg = protocol.ProtocolConfig.from_configdict(demo.protocol)
    heldout, banks = runs.load_heldout(args.demo_dir, demo)
    rng = np.random.default_rng(args.seed)
    items = _balance(_probe_items(heldout, os.path.join(args.demo_dir, "data"),
                                  pcfg.num_candidates), rng, args.max_items)
    max_frames = max([len(x[1]) for its in items.values() for x in its] or [1])
    seq_len = _seq_len(items, tok, demo)
    scorer = runs.TeacherForcedScorer(demo, tok, ckpt_dir, batch=args.batch,
                                          seq_len=seq_len)

    t0 = time.perf_counter()
    report = {"bench": "pretrain_probe", "stage": args.stage, "pairs": len(heldout)}
    for view in ("seen", "blind"):
        report[view] = {}
        for kind, its in items.items():
            if its:
                right = _right_answers(its, scorer, banks, blind=view == "blind", tok=tok,
                                       pcfg=pcfg, seq_len=seq_len, max_frames=max_frames)
                report[view][kind] = _accuracy(right, its)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
