"""The demo's evaluation: greedy rollouts on the held-out pairs scored by the library's eval
runner (`eval.runner.run_model_eval`), one table row per model, the results table, and the
tool-using model's gain over the initial-frames-only baseline."""

from __future__ import annotations

import math
import os

from experiments.demo.data import LABEL_KEYS

BENCHMARK = "needle_heldout"


def frames_viewed(row: dict, initial: list[int]) -> int:
    """Distinct frames the model saw: the initial ones plus every frame a tool call returned."""
    return len(set(initial) | {int(f) for fr in row.get("frames_selected") or [] for f in fr})


def tool_calls(row: dict) -> int:
    """Tool calls the environment answered: every assistant turn but the last is followed by a
    tool response (the rollout engine opens a new turn only after answering a call)."""
    return max(0, len(row.get("trace") or []) - 1)


def summarise(report: dict, rows: list[dict], initial: list[int]) -> dict:
    """One table row: accuracy per key (diff = without ties, ties = with ties), tool use."""
    out = {"n_pairs": len(rows), "acc": {}}
    for k in LABEL_KEYS:
        m = report["by_dimension"].get(k, {})
        out["acc"][k] = {conv: (m.get(conv) or {}).get("accuracy") for conv in ("diff", "ties")}
        out["acc"][k]["n_diff"] = (m.get("diff") or {}).get("n", 0)
        out["acc"][k]["n_ties"] = (m.get("ties") or {}).get("n", 0)
        out["acc"][k]["no_answer"] = m.get("no_answer", 0)
    ok = [r for r in rows if not r.get("error")]
    out["failed"] = len(rows) - len(ok)
    out["mean_tool_calls"] = (sum(tool_calls(r) for r in ok) / len(ok) if ok else None)
    out["mean_frames_viewed"] = (sum(frames_viewed(r, initial) for r in ok) / len(ok)
                                 if ok else None)
    out["answered"] = (sum(all(int(r["pred"].get(k, -1)) >= 0 for k in LABEL_KEYS) for r in ok)
                       / len(ok) if ok else None)
    return out


class Evaluator:
    """Greedy rollouts on the held-out pairs, one compiled engine per protocol (params swapped
    in with `update_params`), scored by `eval.runner.run_model_eval`."""

    def __init__(self, demo, tok, rt, heldout: list[dict], banks: dict, out_dir: str,
                 sampling_base):
        self.demo, self.tok, self.rt = demo, tok, rt
        self.heldout, self.banks, self.out_dir = heldout, banks, out_dir
        self.sampling_base = sampling_base
        self.engines: dict = {}
        self.results: dict[str, dict] = {}
        self.rows: dict[str, list[dict]] = {}

    def _engine(self, pcfg, params):
        from vrthinker_jax.rollout import engine as engine_lib

        key = pcfg.max_turns
        if key not in self.engines:
            self.engines[key] = engine_lib.RolloutEngine(
                self.rt.model(params), self.rt.model_cfg, self.tok, pcfg, self.sampling_base,
                tuple(self.demo.frame_size))
        eng = self.engines[key]
        eng.update_params(params)
        return eng

    def run(self, name: str, params, pcfg, *, tools_enabled: bool = True) -> dict:
        import jax

        from vrthinker_jax.eval import predictions as preds_lib
        from vrthinker_jax.eval import report as report_lib
        from vrthinker_jax.eval import runner, tb
        from vrthinker_jax.rollout import protocol

        eng = self._engine(pcfg, params)
        key = jax.random.key(int(self.demo.seed) + 7)

        def rollout(prompts, banks, step):
            return eng.rollout(prompts, banks, jax.random.fold_in(key, step),
                               tools_enabled=tools_enabled)

        initial = protocol.initial_frames(pcfg)
        predict = runner.make_predict_batch(
            rollout, lambda ex: self.banks[ex["id"]], batch_size=int(self.demo.eval.batch_size),
            benchmark=BENCHMARK, initial_frames=initial)
        path = os.path.join(self.out_dir, "eval", name, "predictions.jsonl")
        run_config = {"model": name, "max_turns": pcfg.max_turns, "tools_enabled": tools_enabled,
                      "decoding": "greedy"}
        report = runner.run_model_eval(
            self.heldout, predict, predictions_path=path, benchmark=BENCHMARK,
            batch_size=int(self.demo.eval.batch_size), progress=bool(self.demo.progress),
            run_config=run_config)
        rows = preds_lib.read_predictions(path).rows
        report_lib.write_metrics_json(report, os.path.join(self.out_dir, "eval", name,
                                                           "metrics.json"))
        tb.log_eval(os.path.join(self.out_dir, "tb", "eval", name), report, run_config)
        summary = summarise(report, rows, initial)
        summary["metrics_path"] = os.path.join(self.out_dir, "eval", name, "metrics.json")
        self.results[name] = summary
        self.rows[name] = rows
        oa = summary["acc"]["OA"]
        print(f"[demo] eval {name}: OA diff {_pct(oa['diff'])} ties {_pct(oa['ties'])}, "
              f"tool calls {_num(summary['mean_tool_calls'])}", flush=True)
        return summary


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_results(results: dict) -> str:
    """The results table (accuracies in %, held-out pairs)."""
    rows = results["table"]
    header = ["model"]
    for k in LABEL_KEYS:
        header += [f"{k} diff", f"{k} ties"]
    header += ["calls", "frames", "answered", "pairs"]
    body = [header]
    for r in rows:
        if r.get("not_run"):
            body.append([r["name"], f"NOT RUN: {r['not_run']}"] + [""] * (len(header) - 2))
            continue
        line = [r["name"]]
        for k in LABEL_KEYS:
            line += [_pct(r["acc"][k]["diff"]), _pct(r["acc"][k]["ties"])]
        line += [_num(r["mean_tool_calls"]), _num(r["mean_frames_viewed"]),
                 _pct(r["answered"]), str(r["n_pairs"])]
        body.append(line)
    widths = [max(len(b[i]) for b in body if len(b) > i) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    lines.insert(1, "-" * len(lines[0]))
    first = rows[0] if rows else None
    n = (first or {}).get("acc", {}).get("OA", {})
    lines += [
        "",
        f"accuracy in %, on {results['heldout_pairs']} held-out pairs never trained on "
        f"(OA: {n.get('n_diff', '?')} with a winner, {n.get('n_ties', '?')} in all).",
        "diff = accuracy without ties (human/label ties excluded; a predicted tie or no answer "
        "is wrong) -- the convention VR-Thinker quotes;",
        "ties = accuracy with ties (exact 3-class agreement over labels 0/1/2; no answer is "
        "wrong). Conventions: vrthinker_jax/eval/metrics.py.",
        "calls = mean select_frames calls; frames = mean distinct frames viewed (initial + "
        "selected); answered = % of rollouts with a parsable final answer.",
    ]
    g = results.get("gain")
    if g:
        lines.append(
            f"tool-using model vs initial-frames-only: OA diff {g['oa_diff_points']:+.1f} "
            f"points, OA ties {g['oa_ties_points']:+.1f} points "
            f"(goal: >= +{g['goal_points']:g} overall; "
            f"{'met' if g['goal_met'] else 'NOT met'})")
        if g.get("oa_diff_vs_coin_flip") is not None:
            lines.append(
                f"tool-using model vs a coin flip between the videos (50.0 OA diff): "
                f"{g['oa_diff_vs_coin_flip']:+.1f} points; the 95% interval of its OA diff "
                f"over {g['n_oa_diff']} pairs is +/- {g['oa_diff_ci95']:.1f}")
    return "\n".join(lines)


def gain(final: dict, base: dict, goal_points: float) -> dict:
    """The final model's OA gain over the baseline (points of OA diff and OA ties), against a
    coin flip, and whether both gains reach `goal_points`."""
    fo, bo = final["acc"]["OA"], base["acc"]["OA"]
    d = 100 * ((fo["diff"] or 0.0) - (bo["diff"] or 0.0))
    t = 100 * ((fo["ties"] or 0.0) - (bo["ties"] or 0.0))
    # a model that only guesses may still fall below chance (e.g. by predicting ties, which
    # count as wrong without ties), so the table also compares with a coin flip
    n_diff = int(fo.get("n_diff") or 0)
    p = fo["diff"] or 0.0
    ci = 100 * 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / max(n_diff, 1))
    return {"final_stage": final["stage"], "oa_diff_points": d,
            "oa_diff_vs_coin_flip": 100 * p - 50.0, "n_oa_diff": n_diff, "oa_diff_ci95": ci,
            "oa_ties_points": t, "goal_points": float(goal_points),
            "goal_met": bool(d >= goal_points and t >= goal_points)}


def stage_scalars(row: dict) -> dict[str, float]:
    """A table row as TensorBoard scalars (`heldout/...`)."""
    if row.get("not_run"):
        return {}
    out = {}
    for k in LABEL_KEYS:
        for conv in ("diff", "ties"):
            v = row["acc"][k][conv]
            if v is not None:
                out[f"heldout/{k}_{conv}"] = v
    for k in ("mean_tool_calls", "mean_frames_viewed", "answered"):
        if row.get(k) is not None:
            out[f"heldout/{k}"] = row[k]
    return out
