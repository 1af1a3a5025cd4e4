"""Did the demo's visual pretraining teach the model to see the defects? A teacher-forced probe.

For every held-out pair (never trained on) the probe scores, under a demo run's checkpoint:

* judgments: for each defective moment and as many clean ones, the moment's two frames (video
  1's, video 2's) with every candidate verdict ("same", "video 1 <word>", "video 2 <word>" for
  each defect word); the pick is the verdict of highest log-prob (chance: 1 / candidates);
* captions: each defective frame and as many clean ones, with the true caption against the same
  caption under each other effect (clean / heavy noise / blurred) and each other colour.

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


def _alternatives(kind: str, text: str, n: int, c: int, words: list[str],
                  colours: list[str]) -> list[str]:
    """The candidate texts of one item, the true one first."""
    if kind == "judgment":
        head = f"{c} vs {n + c}: "
        alts = [f"{head}same."] + [f"{head}video {v} {w}." for v in (1, 2) for w in words]
    else:
        body, effect = text.rsplit("; ", 1)
        alts = [f"{body}; {e}." for e in ("clean", "heavy noise", "blurred")]
        colour = body.split(" ")[1]
        alts += [f"{body.replace(' ' + colour + ' ', ' ' + o + ' ', 1)}; {effect}"
                 for o in colours if o != colour]
    return [text] + [a for a in alts if a != text]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", required=True, help="a demo --out dir (results.json written)")
    p.add_argument("--stage", default="pretrain", help="pretrain | sft | rft | grpo")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-items", type=int, default=240, help="items per kind (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import numpy as np
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from data_pipelines import synthetic
    from experiments import demo as demo_lib
    from vrthinker_jax.rollout import protocol
    from vrthinker_jax.train import examples

    seq_len = 96  # a moment's two frames and the longest verdict or caption
    try:
        _, demo, tok, ckpt_dir = demo_lib.open_run(args.demo_dir, args.stage)
        scorer = demo_lib.TeacherForcedScorer(demo, tok, ckpt_dir, batch=args.batch,
                                              seq_len=seq_len)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pcfg = protocol.ProtocolConfig.from_configdict(demo.protocol)
    n = pcfg.num_candidates
    heldout, banks = demo_lib.load_heldout(args.demo_dir, demo)
    caps = {r["id"]: r for r in demo_lib._read_jsonl(
        os.path.join(args.demo_dir, "data", "captions_heldout.jsonl"))}
    words = sorted({synthetic._JUDGE_WORD[k] for ks in demo.synthetic.defect_kinds.values()
                    for k in ks})
    rng = np.random.default_rng(args.seed)
    items = {"judgment": [], "caption": []}  # (pair id, frames, true text, defect kind or "")
    for r in heldout:
        d = r["meta"].get("defect")
        bad = set(d["global_frames"]) if d else set()
        rec = caps[r["id"]]
        if "judgments" in rec:
            moments = [(c, d["kind"] if c in bad or n + c in bad else "")
                       for c in range(1, n + 1)]
            items["judgment"] += [(r["id"], [c, n + c], rec["judgments"][c - 1], b)
                                  for c, b in moments]
        items["caption"] += [(r["id"], [g], t, d["kind"] if g in bad else "")
                             for g, t in enumerate(rec["captions"], start=1)]
    for kind, its in items.items():  # every defective item, as many clean ones
        bad = [x for x in its if x[3]]
        clean = [its[i] for i in rng.permutation(len(its)) if not its[i][3]][:len(bad)]
        keep = bad + clean
        if args.max_items and len(keep) > args.max_items:
            keep = [keep[i] for i in rng.permutation(len(keep))[:args.max_items]]
        items[kind] = keep

    colours = list(synthetic.COLOURS)
    t0 = time.perf_counter()
    report = {"bench": "pretrain_probe", "stage": args.stage, "pairs": len(heldout)}
    for view in ("seen", "blind"):
        report[view] = {}
        for kind, its in items.items():
            if not its:
                continue
            blind = view == "blind"
            # (item index, alternative index, pair id, frames, text) of each scored example
            rows = [(i, a, pid, frames, alt) for i, (pid, frames, text, _) in enumerate(its)
                    for a, alt in enumerate(_alternatives(kind, text, n, frames[0], words,
                                                          colours))]
            exs = (examples.segments_to_example(
                protocol.caption_segments(frames, alt),
                np.zeros_like(banks[pid]) if blind else banks[pid], tok, pcfg=pcfg,
                seq_len=seq_len, max_frames=2, merged_grid=scorer.rt.merged_grid)
                for _, _, pid, frames, alt in rows)
            scores: dict[int, dict[int, float]] = {}
            for (i, a, *_), v in zip(rows, scorer(exs), strict=True):
                scores.setdefault(i, {})[a] = v
            right = [max(sc, key=sc.get) == 0 for sc in (scores[i] for i in range(len(its)))]
            bad = [r for r, it in zip(right, its, strict=True) if it[3]]
            clean = [r for r, it in zip(right, its, strict=True) if not it[3]]
            by_kind = {}
            for k in sorted({it[3] for it in its if it[3]}):
                got = [r for r, it in zip(right, its, strict=True) if it[3] == k]
                by_kind[k] = {"n": len(got), "accuracy": round(float(np.mean(got)), 3)}
            report[view][kind] = {
                "items": len(its), "accuracy": round(float(np.mean(right)), 3),
                "defective": round(float(np.mean(bad)), 3) if bad else None,
                "clean": round(float(np.mean(clean)), 3) if clean else None,
                "by_kind": by_kind,
                "alternatives": len(_alternatives(kind, its[0][2], n, its[0][1][0], words,
                                                  colours)),
            }
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
