"""Does a trained demo model read the frames? A teacher-forced probe on the held-out pairs (CPU).

For each held-out pair the probe scores the true oracle trace against counterfactual traces of
the same pair (same prompt, same frames, same tool calls) under the model, by the summed
log-prob of their assistant tokens:

* attribution (pairs with a defect): the true trace vs the *mirrored* one, which reports the same
  defect in the other video (and the other video as the winner) - a model that ignores the
  pixels cannot tell them apart (50%);
* detection: the true trace vs the trace of the other state (a pair with a defect vs the
  no-defect trace, a tie pair vs a trace reporting a defect of the same dimension mix at a
  scanned frame of a random video).

Each is also run with every frame blacked out (`blind`): the gap between `seen` and `blind` is
what the pixels contribute. Prints one JSON line.

    python -m experiments.demo --out /tmp/demo
    python experiments/benchmarks/verdict_probe.py --demo-dir /tmp/demo --stage sft

Reads the held-out split for scoring only (nothing is trained).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def _scene_defect(meta: dict):
    from data_pipelines import synthetic

    scene = synthetic.Scene(**{**meta["scene"], "background": tuple(meta["scene"]["background"])})
    d = meta.get("defect")
    if d is None:
        return scene, None
    frames = d["frames"]
    defect = synthetic.Defect(d["dimension"], d["kind"], int(d["video"]), int(frames[0]),
                              int(frames[-1]) + 1, d.get("alt", ""))
    return scene, defect


def counterfactuals(row: dict, layout, pcfg, syn_cfg, rng) -> dict[str, dict]:
    """{'true', 'mirrored' (defect pairs), 'other_state'} traces of one held-out pair."""
    from data_pipelines import synthetic

    scene, defect = _scene_defect(row["meta"])

    def trace(d):
        return {"id": row["id"], "prompt": row["prompt"], "video_a": row["video_a"],
                "video_b": row["video_b"], "labels": synthetic.labels_for(d),
                "num_candidates": pcfg.num_candidates,
                "turns": synthetic.oracle_turns(d, layout, pcfg)}

    out = {"true": trace(defect)}
    if defect is not None:
        out["mirrored"] = trace(dataclasses.replace(defect, video=3 - defect.video))
        out["other_state"] = trace(None)
    else:
        kinds = dict(syn_cfg.defect_kinds)
        dim = ("TA", "MQ", "VQ")[int(rng.integers(3))]
        c = int(layout.scan[int(rng.integers(len(layout.scan)))])
        f = int(layout.candidate_frames[c - 1])
        kind = kinds[dim][int(rng.integers(len(kinds[dim])))]
        out["other_state"] = trace(synthetic.Defect(dim, kind, int(rng.integers(1, 3)), f, f + 1,
                                                    "green" if scene.colour != "green" else "red"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", required=True, help="a finished `experiments.demo` --out dir")
    p.add_argument("--stage", default="sft", help="sft | rft | grpo | baseline_sft")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import numpy as np
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from data_pipelines import synthetic
    from experiments.demo import runs
    from vrthinker_jax.rollout import protocol
    from vrthinker_jax.train import examples

    try:
        res, demo, tok, ckpt_dir = runs.open_run(args.demo_dir, args.stage)
        scorer = runs.TeacherForcedScorer(demo, tok, ckpt_dir, batch=args.batch,
                                              seq_len=int(res["lengths"]["seq_len"]) + 64)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pcfg = protocol.ProtocolConfig.from_configdict(demo.protocol)
    syn_cfg = synthetic.synthetic_config(**demo.synthetic.to_dict())
    layout = synthetic.layout_for(syn_cfg, pcfg)
    heldout, banks = runs.load_heldout(args.demo_dir, demo)

    rng = np.random.default_rng(args.seed)
    items = []  # (pair index, variant name, trace)
    for i, row in enumerate(heldout):
        for name, tr in counterfactuals(row, layout, pcfg, syn_cfg, rng).items():
            items.append((i, name, tr))

    def score(blind: bool) -> dict[tuple[int, str], float]:
        def exs():
            for i, _, tr in items:
                bank = banks[heldout[i]["id"]]
                yield examples.trace_to_example(
                    tr, np.zeros_like(bank) if blind else bank, tok, pcfg=pcfg,
                    seq_len=scorer.seq_len, max_frames=int(demo.max_frames),
                    merged_grid=scorer.rt.merged_grid)

        return {(i, name): v for (i, name, _), v in zip(items, scorer(exs()), strict=True)}

    t0 = time.perf_counter()
    report = {"bench": "verdict_probe", "stage": args.stage, "pairs": len(heldout)}
    for view in ("seen", "blind"):
        sc = score(view == "blind")
        defect_rows = [i for i, r in enumerate(heldout) if r["meta"].get("defect")]
        attr = [sc[(i, "true")] > sc[(i, "mirrored")] for i in defect_rows]
        det = [sc[(i, "true")] > sc[(i, "other_state")] for i in range(len(heldout))]
        by_dim = {}
        for dim in ("TA", "MQ", "VQ"):
            rows = [k for k, i in enumerate(defect_rows)
                    if heldout[i]["meta"]["defect"]["dimension"] == dim]
            by_dim[dim] = {"n": len(rows),
                           "attribution": round(float(np.mean([attr[k] for k in rows])), 3)
                           if rows else None}
        report[view] = {
            "attribution": round(float(np.mean(attr)), 3) if attr else None,
            "n_attribution": len(attr),
            "detection": round(float(np.mean(det)), 3), "n_detection": len(det),
            "by_dimension": by_dim,
            "mean_logp_true": round(float(np.mean([sc[(i, "true")]
                                                   for i in range(len(heldout))])), 2),
        }
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
