"""The main job on the embedded default: synthetic needle pairs -> tiny VLM -> SFT, RFT, GRPO ->
held-out results table, all on CPU.

    python -m experiments.demo            # the default (< 30 min on 2 CPU cores)
    python -m experiments.demo --quick    # the test suite's end-to-end run (< 3 min)
    python -m experiments.demo --preset stage3   # a short SFT, then RFT and GRPO lift it

What it does (every number printed is measured by this run; nothing is hard-coded):

1. generates the synthetic needle video pairs (`data_pipelines.synthetic`): a defect hidden
   between the initial frames of one video, so only `select_frames` can find it; a held-out
   split that nothing is ever trained on (not the tokenizer, not any stage);
2. trains a sentencepiece tokenizer on the training split's text;
3. builds a tiny Qwen2.5-VL (`experiments/configs/demo.py`), pretrains it from random weights
   on the training pairs (`experiments/demo_pretraining.py`: frame captions, the traces' text,
   rows shaped like tool calls), and trains it through the three stages with the library's
   stage functions: cold-start SFT on the oracle traces
   (`train.sft.run_sft`), RFT (`train.rft.run_rft`: K rollouts per training pair, all-correct
   traces kept, SFT on them), GRPO (`train.grpo.run_grpo`);
4. trains the initial-frames-only baseline: the same model, same pairs and labels, SFT on
   one-turn answers under a protocol with `max_turns=1` (no tool call is possible);
5. evaluates on the held-out pairs after each stage and for the baseline (greedy rollouts,
   `eval.runner.run_model_eval`, accuracies from `eval.metrics` with their tie convention), and
   the final model with its tool disabled (every call answered "Tool use is disabled");
6. prints the results table and writes `results.json`, TensorBoard logs, an HTML trace
   report of a few held-out judgments and the final model as a reward-model export
   (`<out>/export`, what `python -m vrthinker_jax.score` and `vrthinker_jax.eval --checkpoint`
   read) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

from experiments import demo_pretraining

LABEL_KEYS = ("TA", "MQ", "VQ", "OA")
BENCHMARK = "needle_heldout"


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


class Timer:
    """Wall and process CPU seconds per named phase."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                timer.wall[name] = timer.wall.get(name, 0.0) + time.perf_counter() - self.w
                timer.cpu[name] = timer.cpu.get(name, 0.0) + time.process_time() - self.c

        return _Phase()


# --------------------------------------------------------------------------- data


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


def open_run(demo_dir: str, stage: str):
    """A finished run's (results dict, demo ConfigDict, tokenizer, checkpoint dir of `stage`);
    FileNotFoundError names what is missing (benchmarks that start from a demo run)."""
    import ml_collections

    from data_pipelines import tokenizer as tok_lib

    results_path = os.path.join(demo_dir, "results.json")
    ckpt_dir = os.path.join(demo_dir, stage, "checkpoints")
    nested = os.path.join(demo_dir, stage, "sft", "checkpoints")  # RFT trains its SFT half there
    if not os.path.exists(ckpt_dir) and os.path.exists(nested):
        ckpt_dir = nested
    for path in (results_path, ckpt_dir):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: run `python -m experiments.demo --out "
                                    f"{demo_dir}` first")
    with open(results_path) as f:
        res = json.load(f)
    tok = tok_lib.load_tokenizer(os.path.join(demo_dir, "tokenizer"))
    return res, ml_collections.ConfigDict(res["config"]), tok, ckpt_dir


def restore_params(ckpt_dir: str, cfg, rt):
    """The params of the latest checkpoint in ckpt_dir (a stage's TrainState), shaped like
    rt's; FileNotFoundError when it holds none."""
    from vrthinker_jax.train import checkpointing, steps

    like = steps.init_train_state(rt.params, steps.make_optimizer(cfg.optimizer), 0)
    ckpt = checkpointing.Checkpointer(ckpt_dir, save_every=10**9, keep=10**9)
    try:
        restored = ckpt.restore(like)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint")
    return restored[0].params


def load_heldout(demo_dir: str, demo) -> tuple[list[dict], dict]:
    """A finished run's held-out rows and their frame banks (for scoring only)."""
    data_dir = os.path.join(demo_dir, "data")
    heldout = _read_jsonl(os.path.join(data_dir, "heldout.jsonl"))
    return heldout, load_banks(heldout, data_dir, int(demo.protocol.num_candidates),
                               demo.frame_size)


class TeacherForcedScorer:
    """The summed log-prob of each example's trained (assistant) tokens under a demo run's
    stage checkpoint, `batch` rows per call of one compiled function (the last call padded
    with copies whose scores are dropped). The probes' scorer; FileNotFoundError when the
    checkpoint directory holds no checkpoint."""

    def __init__(self, demo, tok, ckpt_dir: str, *, batch: int, seq_len: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from experiments.configs import sft as sft_cfgs
        from vrthinker_jax.train import runtime, steps

        cfg = stage_config(sft_cfgs, demo, tok, protocol=demo.protocol.to_dict(), steps=1,
                           batch_size=batch, lr=1e-3, seq_len=seq_len)
        self.rt = runtime.setup(cfg, tok)
        self.params = restore_params(ckpt_dir, cfg, self.rt)
        self.batch, self.seq_len = int(batch), int(seq_len)
        graphdef, spec = self.rt.graphdef, self.rt.spec

        @jax.jit
        def seq_logp(params, batch):
            model = nnx.merge(graphdef, params)
            lp, _ = steps.sequence_token_stats(model, batch, spec)
            mask = (batch["loss_mask"][:, 1:] & batch["valid"][:, 1:]).astype(jnp.float32)
            return jnp.sum(lp * mask, axis=1)

        self._seq_logp = seq_logp

    def __call__(self, exs) -> list[float]:
        """exs: an iterable of examples (`train.examples`), consumed `batch` at a time."""
        import jax.numpy as jnp
        import numpy as np

        from vrthinker_jax.train import examples

        out, chunk = [], []

        def flush():
            n = len(chunk)
            chunk.extend([chunk[-1]] * (self.batch - n))
            batch = {k: jnp.asarray(v) for k, v in examples.collate(chunk).items()
                     if k not in ("id", "error")}
            out.extend(float(v) for v in np.asarray(self._seq_logp(self.params, batch))[:n])
            chunk.clear()

        for ex in exs:
            chunk.append(ex)
            if len(chunk) == self.batch:
                flush()
        if chunk:
            flush()
        return out


# --------------------------------------------------------------------------- stage configs


def stage_config(module, demo, tok, *, protocol: dict, steps: int, batch_size: int, lr: float,
                 seq_len: int, warmup: int = 2, sampling: dict | None = None):
    """A stage config (`experiments/configs/<stage>.py:tiny`) with the demo's model, protocol,
    data sizes and schedule, on one device."""
    import ml_collections

    from vrthinker_jax.train import runtime

    c = module.get_config("tiny")
    c.seed = int(demo.seed)
    c.model = demo.model.copy_and_resolve_references()
    runtime.align_model_config(c.model, tok)
    c.protocol = ml_collections.ConfigDict(dict(protocol))
    c.data.update(dict(batch_size=int(batch_size), frame_size=tuple(demo.frame_size),
                       seq_len=int(seq_len), max_frames=int(demo.max_frames),
                       seed=int(demo.seed),
                       synthesis_weight=float(demo.sft.get("synthesis_weight", 1.0))))
    c.mesh.ici = {}  # one device: the demo runs on CPU
    c.optimizer.update(dict(lr=float(lr), warmup_steps=int(min(warmup, max(steps - 1, 0))),
                            total_steps=max(int(steps), 1)))
    c.steps = int(steps)
    c.ckpt_every = 10**6  # only the final checkpoint (the demo is restarted, not resumed)
    c.log_every = 1
    c.progress = bool(demo.progress)
    if sampling is not None:
        c.sampling.update(sampling)
    return c


# --------------------------------------------------------------------------- evaluation


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
        from vrthinker_jax.eval import report as report_lib

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


# --------------------------------------------------------------------------- table


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
    gain = results.get("gain")
    if gain:
        lines.append(
            f"tool-using model vs initial-frames-only: OA diff {gain['oa_diff_points']:+.1f} "
            f"points, OA ties {gain['oa_ties_points']:+.1f} points "
            f"(goal: >= +{gain.get('goal_points', 20):g} overall; "
            f"{'met' if gain['goal_met'] else 'NOT met'})")
        if gain.get("oa_diff_vs_coin_flip") is not None:
            lines.append(
                f"tool-using model vs a coin flip between the videos (50.0 OA diff): "
                f"{gain['oa_diff_vs_coin_flip']:+.1f} points; the 95% interval of its OA diff "
                f"over {gain['n_oa_diff']} pairs is +/- {gain['oa_diff_ci95']:.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- stages i-iii


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
            "seq_len": _round_up(max(trace_lens) + 16, 64),
            "max_len": max(int(demo.eval.max_len), _round_up(max(trace_lens) + 160, 128)),
            "vocab": tok.vocab_size}


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


def sft_stage(demo, d: StageData, cfg, rt, out_dir: str, logger):
    """Cold-start SFT (`cfg`: the SFT stage config) on the oracle traces, with `sft.call_share`
    of the rows call rows drawn afresh (rehearsal). Returns (rt, stats)."""
    from experiments import demo_pretraining
    from vrthinker_jax.train import sft

    s, pt = demo.sft, demo.get("pretrain")
    call_share = float(s.get("call_share", 0.0))
    rehearsal = {}
    if call_share > 0:
        # fresh call rows among the traces (a seed apart from the call phase's rows)
        rows = int(s.steps) * int(s.batch_size)
        calls, rehearsal = demo_pretraining.call_items(
            d.train_pairs, d.pcfg.num_candidates, d.pcfg.max_frames_per_call,
            int(round(rows * call_share)), float(pt.call_defect_share) if pt else 0.5,
            int(demo.seed) + 1)
        recs, rbanks = demo_pretraining.rehearsal_mix(
            d.train_traces, d.trace_banks, calls, [d.train_banks[it["pair"]] for it in calls],
            rows, int(demo.seed))
        ds = sft.in_memory_dataset(cfg, recs, rbanks, d.tok, rt,
                                   to_segments=demo_pretraining.mixed_segments)
    else:
        ds = sft.in_memory_dataset(cfg, d.train_traces, d.trace_banks, d.tok, rt)
    rt, hist = sft.run_sft(cfg, os.path.join(out_dir, "sft"), ds, rt=rt, logger=logger,
                           tag="sft")
    return rt, {"steps": len(hist), "loss_first": hist[0]["loss"],
                "loss_last": hist[-1]["loss"], "traces": len(d.train_traces), **rehearsal}


def rft_stage(demo, d: StageData, rt, out_dir: str, logger):
    """RFT (`demo.rft`): K rollouts per training pair, all-correct traces kept, SFT on them.
    Returns (rt, stats of `rft.run_rft`)."""
    import jax
    import jax.numpy as jnp

    from experiments.configs import rft as rft_cfgs
    from vrthinker_jax.train import rft, rollouts

    r = demo.rft
    rcfg = stage_config(rft_cfgs, demo, d.tok, protocol=d.proto, steps=r.steps,
                        batch_size=r.batch_size, lr=r.lr, seq_len=d.max_len,
                        sampling={**d.sampling, "temperature": float(r.temperature)})
    rcfg.samples_per_prompt = int(r.samples_per_prompt)
    rcfg.max_prompts = min(int(r.max_prompts), len(d.train_records))
    per_batch = max(1, int(r.batch_size) // int(r.samples_per_prompt))
    prompts = rollouts.in_memory_prompts(rcfg, d.train_records, d.train_banks, per_batch)
    rt.params = jax.tree.map(jnp.copy, rt.params)  # the SFT half donates its buffers
    return rft.run_rft(rcfg, os.path.join(out_dir, "rft"), None, d.tok, rt=rt, logger=logger,
                       dataset=prompts)


def grpo_config(demo, d: StageData):
    """The GRPO stage config with the demo's `grpo` block (the objective's options included)."""
    from experiments.configs import grpo as grpo_cfgs

    g = demo.grpo
    gcfg = stage_config(grpo_cfgs, demo, d.tok, protocol=d.proto, steps=g.steps,
                        batch_size=g.prompts_per_step, lr=g.lr, seq_len=d.max_len,
                        warmup=int(g.warmup_steps),
                        sampling={**d.sampling, "temperature": float(g.temperature)})
    gcfg.grpo.update(dict(group_size=int(g.group_size), prompts_per_step=int(g.prompts_per_step),
                          kl_coef=float(g.kl_coef), neg_adv_scale=float(g.neg_adv_scale),
                          neg_prob_cap=float(g.neg_prob_cap)))
    return gcfg


def grpo_stage(demo, d: StageData, rt, out_dir: str, logger):
    """GRPO (`demo.grpo`) on the training prompts. Returns (rt, stats: per-step rewards)."""
    import jax
    import jax.numpy as jnp

    from vrthinker_jax.train import grpo, rollouts

    gcfg = grpo_config(demo, d)
    prompts = rollouts.in_memory_prompts(gcfg, d.train_records, d.train_banks,
                                     int(demo.grpo.prompts_per_step))
    rt.params = jax.tree.map(jnp.copy, rt.params)
    rt, ghist = grpo.run_grpo(gcfg, os.path.join(out_dir, "grpo"), None, d.tok, rt=rt,
                              logger=logger, dataset=prompts)
    return rt, {"steps": len(ghist), "reward": [h["reward"] for h in ghist],
                "reward_accuracy": [h["reward_accuracy"] for h in ghist],
                "reward_format": [h["reward_format"] for h in ghist],
                "rows_in_update": [h["rows_in_update"] for h in ghist]}


# --------------------------------------------------------------------------- the job


def run(demo, out_dir: str) -> dict:
    """Runs the whole job; returns the results dict (also written to out_dir/results.json)."""
    import jax
    import jax.numpy as jnp
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO

    from data_pipelines import synthetic
    from data_pipelines import tokenizer as tok_lib
    from experiments.configs import sft as sft_cfgs
    from vrthinker_jax.checkpoints import export as export_lib
    from vrthinker_jax.eval import html_report
    from vrthinker_jax.rollout import chat, protocol
    from vrthinker_jax.rollout.sampler import sampling_config
    from vrthinker_jax.train import runtime, sft

    timer = Timer()
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    results: dict = {"preset": demo.preset, "out": os.path.abspath(out_dir),
                     "config": demo.to_dict(), "stages": {}}

    # ---- 1. data
    data_dir = os.path.join(out_dir, "data")
    pcfg = protocol.ProtocolConfig.from_configdict(demo.protocol)
    with timer("data"):
        syn_cfg = synthetic.synthetic_config(**demo.synthetic.to_dict())
        info = synthetic.generate(data_dir, int(demo.num_pairs), int(demo.seed), syn_cfg, pcfg)
        train_pairs = _read_jsonl(info["paths"]["train"])
        heldout = _read_jsonl(info["paths"]["heldout"])
        train_traces = _read_jsonl(info["paths"]["cot_train"])
        train_ids, held_ids = {r["id"] for r in train_pairs}, {r["id"] for r in heldout}
        if train_ids & held_ids or {t["id"] for t in train_traces} & held_ids:
            raise RuntimeError("held-out ids overlap the training ids")
        banks = load_banks(train_pairs + heldout, data_dir, pcfg.num_candidates,
                           demo.frame_size)
    results["data"] = {"dir": os.path.abspath(data_dir), "train_ids": sorted(train_ids),
                       "heldout_ids": sorted(held_ids), "ties_total": info["ties"]}
    results["heldout_pairs"] = len(heldout)
    print(f"[demo] data: {len(train_pairs)} training pairs, {len(heldout)} held-out pairs "
          f"({info['ties']} ties in all) in {data_dir}", flush=True)

    # ---- 2. tokenizer, on the training split's text only
    train_captions = _read_jsonl(info["paths"]["captions_train"])
    with timer("tokenizer"):
        corpus = synthetic.text_corpus(train_traces, pcfg) + list(dict.fromkeys(
            c for r in train_captions for c in r["captions"]))
        tok_path = train_tokenizer(corpus, os.path.join(out_dir, "tokenizer"),
                                   int(demo.tokenizer_vocab))
        tok = tok_lib.load_tokenizer(tok_path)
    vt = tokens_per_frame(demo)
    results["lengths"] = stage_lengths(demo, tok, pcfg, train_traces, train_pairs + heldout)
    seq_len, max_len = results["lengths"]["seq_len"], results["lengths"]["max_len"]
    prompt_bucket = _round_up(results["lengths"]["prompt_max"], 64)
    _save_partial(out_dir, results, [], timer)  # a stopped run keeps its config and lengths
    sampling = dict(max_len=max_len, max_new_tokens=int(demo.eval.max_new_tokens),
                    max_turn_tokens=int(demo.eval.max_turn_tokens),
                    prompt_buckets=(prompt_bucket,))

    logger = runtime.TrainLogger(os.path.join(out_dir, "tb", "train"))
    stage_log = runtime.TrainLogger(os.path.join(out_dir, "tb", "stages"))
    train_records = [{"id": r["id"], "prompt": r["prompt"],
                      "labels": {k: int(r[k]) for k in LABEL_KEYS}} for r in train_pairs]
    train_banks = [banks[r["id"]] for r in train_pairs]
    trace_banks = [banks[t["id"]] for t in train_traces]
    proto = demo.protocol.to_dict()

    # ---- the tool-using model's runtime (its stages follow the baseline)
    s = demo.sft
    cfg = stage_config(sft_cfgs, demo, tok, protocol=proto, steps=s.steps,
                       batch_size=s.batch_size, lr=s.lr, seq_len=seq_len, warmup=s.warmup_steps)
    rt = runtime.setup(cfg, tok)
    n_params = sum(int(x.size) for x in jax.tree.leaves(rt.params))
    results["model"] = {"params": n_params, "config": cfg.model.to_dict()}
    print(f"[demo] model: {n_params / 1e6:.2f}M parameters; tokenizer vocab {tok.vocab_size}; "
          f"rows of {seq_len} tokens", flush=True)
    evaluator = Evaluator(demo, tok, rt, heldout, banks, out_dir,
                          sampling_config(temperature=0.0, **sampling))

    # ---- 2b. pretraining (both models start here), in order: one frame and its caption per
    # row; the traces' text without frames (reasoning from given syntheses: the format is then
    # known before SFT, whose first steps otherwise shook what the calls phase taught); rows of
    # one video's frames and the verdict on them, as the oracle's calls show them
    pt = demo.get("pretrain")
    phases = []  # (tag, steps, batch size, records, their banks, segments fn or None, counts)
    if pt is not None and int(pt.steps) > 0:
        items, counts = demo_pretraining.caption_items(
            train_pairs, train_captions, float(pt.get("defect_share", 0.0)))
        phases.append(("pretrain", int(pt.steps), int(pt.batch_size), items,
                       [train_banks[it["pair"]] for it in items], None, counts))
    if pt is not None and int(pt.get("reasoning_steps", 0)) > 0:
        phases.append(("pretrain_reasoning", int(pt.reasoning_steps),
                       int(pt.reasoning_batch_size), train_traces, trace_banks,
                       demo_pretraining.reasoning_segments, {"traces": len(train_traces)}))
    if pt is not None and int(pt.get("call_steps", 0)) > 0:
        items, counts = demo_pretraining.call_items(
            train_pairs, pcfg.num_candidates, pcfg.max_frames_per_call,
            int(pt.call_steps) * int(pt.call_batch_size), float(pt.call_defect_share),
            int(demo.seed))
        phases.append(("pretrain_calls", int(pt.call_steps), int(pt.call_batch_size), items,
                       [train_banks[it["pair"]] for it in items], None, counts))
    for tag, n_steps, batch_size, records, rec_banks, to_segments, counts in phases:
        segments = to_segments or demo_pretraining.mixed_segments  # items: frames + text
        # the longest row: items repeat (oversampling), so each distinct one is measured once
        distinct = {json.dumps(r, sort_keys=True): r for r in records}.values()
        lengths = [chat.tokenize_segments(tok, segments(r, pcfg), vt) for r in distinct]
        with timer("pretrain"):
            ccfg = stage_config(sft_cfgs, demo, tok, protocol=proto, steps=n_steps,
                                batch_size=batch_size, lr=pt.lr,
                                seq_len=_round_up(max(len(t.ids) for t in lengths) + 4, 16),
                                warmup=pt.warmup_steps)
            ccfg.data.max_frames = max(1, max(len(t.frames) for t in lengths))
            ds = (sft.in_memory_dataset(ccfg, records, rec_banks, tok, rt,
                                        to_segments=to_segments) if to_segments else
                  sft.frame_text_dataset(ccfg, records, rec_banks, tok, rt))
            rt, phist = sft.run_sft(ccfg, os.path.join(out_dir, tag), ds, rt=rt, logger=logger,
                                    tag=tag)
        results["stages"][tag] = {"steps": len(phist), "loss_first": phist[0]["loss"],
                                  "loss_last": phist[-1]["loss"], **counts}
        print(f"[demo] pretraining ({tag}): loss {phist[0]['loss']:.3f} -> "
              f"{phist[-1]['loss']:.3f} over {len(phist)} steps", flush=True)
    # ---- 3. baseline: initial frames only (max_turns=1), same pairs, same labels
    b = demo.baseline
    bproto = {**proto, "max_turns": 1}
    bpcfg = protocol.ProtocolConfig.from_configdict(bproto)
    direct = [direct_answer_trace(t) for t in train_traces]
    _write_jsonl(os.path.join(data_dir, "cot_train_initial_frames_only.jsonl"), direct)
    blen = max(len(chat.tokenize_segments(tok, protocol.trace_segments(t, bpcfg), vt).ids)
               for t in direct)
    with timer("baseline"):
        bcfg = stage_config(sft_cfgs, demo, tok, protocol=bproto, steps=b.steps,
                            batch_size=b.batch_size, lr=b.lr,
                            seq_len=_round_up(blen + 16, 64), warmup=s.warmup_steps)
        bcfg.data.max_frames = 2 * int(demo.protocol.num_initial_frames)
        # the same starting weights as the tool-using model (the SFT half donates rt's)
        brt = runtime.setup(bcfg, tok, model=rt.model(jax.tree.map(jnp.copy, rt.params)))
        bds = sft.in_memory_dataset(bcfg, direct, trace_banks, tok, brt)
        brt, bhist = sft.run_sft(bcfg, os.path.join(out_dir, "baseline_sft"), bds, rt=brt,
                                 logger=logger, tag="baseline_sft")
    results["stages"]["baseline_sft"] = {"steps": len(bhist), "loss_first": bhist[0]["loss"],
                                         "loss_last": bhist[-1]["loss"]}
    with timer("eval"):
        base = {"name": "initial frames only (max_turns=1)", "stage": "baseline",
                **evaluator.run("initial_frames_only", brt.params, bpcfg)}
    table: list[dict] = [base]
    del brt, bds

    # ---- 4. cold-start SFT
    data = StageData(tok=tok, proto=proto, pcfg=pcfg, sampling=sampling, max_len=max_len,
                     train_pairs=train_pairs, train_records=train_records,
                     train_banks=train_banks, train_traces=train_traces,
                     trace_banks=trace_banks)
    with timer("sft"):
        rt, results["stages"]["sft"] = sft_stage(demo, data, cfg, rt, out_dir, logger)
    with timer("eval"):
        table.append({"name": "after SFT (tools on)", "stage": "sft",
                      **evaluator.run("sft", rt.params, pcfg)})
    stage_log.scalars(0, _stage_scalars(table[-1]))
    _save_partial(out_dir, results, table, timer)

    # ---- 5. RFT
    try:
        with timer("rft"):
            rt, stats = rft_stage(demo, data, rt, out_dir, logger)
        results["stages"]["rft"] = stats
        with timer("eval"):
            table.append({"name": "after RFT (tools on)", "stage": "rft",
                          **evaluator.run("rft", rt.params, pcfg)})
        if not stats.get("accepted_traces"):
            table[-1]["name"] += " [0 traces accepted: RFT's SFT skipped]"
    except Exception as e:  # noqa: BLE001 -- a failed stage is reported, the job goes on
        traceback.print_exc()
        results["stages"]["rft"] = {"error": f"{type(e).__name__}: {e}"}
        table.append({"name": "after RFT", "stage": "rft", "not_run": f"{type(e).__name__}"})
    stage_log.scalars(1, _stage_scalars(table[-1]))
    _save_partial(out_dir, results, table, timer)

    # ---- 6. GRPO
    try:
        with timer("grpo"):
            rt, results["stages"]["grpo"] = grpo_stage(demo, data, rt, out_dir, logger)
        with timer("eval"):
            table.append({"name": "after GRPO = final (tools on)", "stage": "grpo",
                          **evaluator.run("grpo", rt.params, pcfg)})
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        results["stages"]["grpo"] = {"error": f"{type(e).__name__}: {e}"}
        table.append({"name": "after GRPO", "stage": "grpo", "not_run": f"{type(e).__name__}"})
    stage_log.scalars(2, _stage_scalars(table[-1]))
    _save_partial(out_dir, results, table, timer)
    final = next((t for t in reversed(table) if not t.get("not_run")), None)
    final_name = final["stage"] if final else "sft"
    final_params = rt.params

    # ---- 7. the final model with its tool disabled (same prompt, every call refused)
    with timer("eval"):
        table.append({"name": "final, tool disabled", "stage": "final_tool_disabled",
                      **evaluator.run("final_tool_disabled", final_params, pcfg,
                                      tools_enabled=False)})

    # ---- 8. the final model as a reward-model export (score / eval --checkpoint read it)
    with timer("export"):
        export_dir = export_lib.export_reward_model(
            os.path.join(out_dir, "export"), model=rt.model(final_params), tokenizer_path=tok_path,
            protocol_cfg=proto, sampling_cfg=sampling_config(temperature=0.0, **sampling),
            frame_size=tuple(demo.frame_size),
            info={"source": "experiments.demo", "demo_preset": demo.preset, "stage": final_name})

    # ---- 9. results
    results["table"] = table
    if final is not None:
        fo, bo = final["acc"]["OA"], base["acc"]["OA"]
        d = 100 * ((fo["diff"] or 0.0) - (bo["diff"] or 0.0))
        t = 100 * ((fo["ties"] or 0.0) - (bo["ties"] or 0.0))
        # a model that only guesses may still fall below chance (e.g. by predicting ties,
        # which count as wrong without ties), so the table also compares with a coin flip
        n_diff = int(fo.get("n_diff") or 0)
        p = fo["diff"] or 0.0
        ci = 100 * 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / max(n_diff, 1))
        results["gain"] = {"final_stage": final_name, "oa_diff_points": d,
                           "oa_diff_vs_coin_flip": 100 * p - 50.0, "n_oa_diff": n_diff,
                           "oa_diff_ci95": ci,
                           "oa_ties_points": t, "goal_points": float(demo.goal_points),
                           "goal_met": bool(d >= demo.goal_points and t >= demo.goal_points)}
    html_path = os.path.join(out_dir, "trace_report.html")
    rows = evaluator.rows[final_name][: int(demo.eval.html_examples)]

    def frame_loader(row, frames):
        bank = banks[row["id"]]
        return [bank[f - 1] for f in frames]

    html_report.write_html_report(rows, html_path, frame_loader,
                                  title=f"VR-Thinker demo: held-out judgments ({final_name})")
    logger.close()
    stage_log.close()
    results["paths"] = {
        "results_json": os.path.abspath(os.path.join(out_dir, "results.json")),
        "tensorboard": os.path.abspath(os.path.join(out_dir, "tb")),
        "html_report": os.path.abspath(html_path),
        "predictions": os.path.abspath(os.path.join(out_dir, "eval")),
        "export": export_dir,
    }
    timer.wall["total"] = time.perf_counter() - t_start
    results["time_wall_s"] = {k: round(v, 1) for k, v in timer.wall.items()}
    results["time_cpu_s"] = {k: round(v, 1) for k, v in timer.cpu.items()}
    results["complete"] = True
    with open(results["paths"]["results_json"], "w") as f:
        json.dump(results, f, indent=1)
    return results


def _save_partial(out_dir: str, results: dict, table: list[dict], timer: Timer) -> None:
    """results.json after each stage (`complete: false`), so a stopped run keeps its numbers."""
    partial = {**results, "table": table, "complete": False,
               "time_wall_s": {k: round(v, 1) for k, v in timer.wall.items()}}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(partial, f, indent=1)


def _stage_scalars(row: dict) -> dict[str, float]:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (< 3 min): checks the pipeline end to end, learns nothing")
    p.add_argument("--preset", default="",
                   help="a preset of experiments/configs/demo.py (default, quick, stage3); "
                        "--quick is --preset quick")
    p.add_argument("--out", default="",
                   help="output directory (default: runs/demo-<UTC time>; must be new or empty)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of experiments/configs/demo.py (e.g. sft.steps=600); "
                        "repeatable")
    args = p.parse_args(argv)

    from experiments.configs import demo as demo_configs
    from vrthinker_jax import cli

    if args.quick and args.preset not in ("", "quick"):
        print(f"error: --quick and --preset {args.preset} disagree", file=sys.stderr)
        return 2
    preset = "quick" if args.quick else (args.preset or "default")
    if preset not in demo_configs.PRESETS:
        print(f"error: --preset {preset!r}: expected one of {demo_configs.PRESETS}",
              file=sys.stderr)
        return 2
    demo = demo_configs.get_config(preset)
    if args.seed is not None:
        demo.seed = args.seed
    if args.no_progress:
        demo.progress = False
    try:
        cli.apply_overrides(demo, args.set)
    except cli.CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", "demo-" + time.strftime("%Y%m%d-%H%M%S",
                                                                    time.gmtime()))
    if os.path.isdir(out) and os.listdir(out):
        print(f"error: --out {out} exists and is not empty (pick a new directory)",
              file=sys.stderr)
        return 2
    try:
        results = run(demo, out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(format_results(results))
    print()
    for stage, st in results["stages"].items():
        print(f"{stage}: {json.dumps(_short(st))}")
    print(f"wall time: {results['time_wall_s']}")
    paths = results["paths"]
    print(f"results JSON: {paths['results_json']}")
    print(f"TensorBoard:  tensorboard --logdir {paths['tensorboard']}")
    print(f"HTML traces:  {paths['html_report']}")
    print(f"export:       {paths['export']} (python -m vrthinker_jax.score --checkpoint ...)")
    return 0


def _short(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, float):
            out[k] = round(v, 4)
        elif isinstance(v, list) and v and isinstance(v[0], float):
            out[k] = [round(x, 4) for x in v]
        else:
            out[k] = v
    return out


if __name__ == "__main__":
    sys.exit(main())
