"""Stage iii per seed: does RFT + GRPO lift a partly trained policy's held-out accuracy? (CPU)

Runs the demo's `stage3` preset (`experiments/configs/demo.py`: a short cold-start SFT, RFT,
a longer GRPO) from the pretraining of a finished demo run (`--base-dir`, whose data,
tokenizer and `pretrain_calls` checkpoint every seed shares: the pretraining is two thirds of a
demo's wall time, and seeds then differ in SFT's row order and rehearsal rows, RFT's and GRPO's
samples). After each stage the held-out pairs are judged greedily (the demo's `Evaluator`); the
format reward is scored before and after GRPO on `--format-prompts` held-out prompts x
`--format-samples` samples at the GRPO temperature. Prints exactly one JSON line:

    {"bench": "stage3", "seed": s, "oa_diff_sft": ..., "oa_diff_rft": ..., "oa_diff_grpo": ...,
     "format_before_grpo": ..., "format_after_grpo": ..., "wall_s": ...}

(OA diff in %: held-out OA accuracy without ties, the demo table's "OA diff").

    python -m experiments.demo --out /tmp/base     # any preset with the same data and model
    python experiments/benchmarks/stage3_bench.py --base-dir /tmp/base --out /tmp/s3-0
    python experiments/benchmarks/stage3_bench.py --base-dir /tmp/base --out /tmp/s3-1 \\
        --config.seed=1
    # another GRPO setting from the same SFT + RFT (no retraining)
    python experiments/benchmarks/stage3_bench.py --base-dir /tmp/base --out /tmp/s3-0b \\
        --reuse /tmp/s3-0 --config.grpo.neg_adv_scale=1.0

The run is the demo config `--config` (default experiments/configs/demo.py:stage3) with any
`--config.FIELD=VALUE` overrides (its seed: `--config.seed`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the config blocks a shared pretraining fixes: the stage3 preset must agree with the base run
STAGE3 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                      "demo.py") + ":stage3"
SHARED = ("num_pairs", "synthetic", "protocol", "frame_size", "tokenizer_vocab", "model",
          "pretrain", "max_frames")


class BenchError(Exception):
    """A missing or mismatched base run, or a bad override: one line, exit status 2."""


def _plain(v):
    """A config value as plain JSON (tuples and lists compare equal)."""
    return json.loads(json.dumps(v.to_dict() if hasattr(v, "to_dict") else v))


def _differs(now, then) -> bool:
    """Whether a config block differs from a recorded run's (`runs.open_run` has dropped the
    recorded fields today's code no longer has)."""
    return _plain(now) != _plain(then)


def load_start(args):
    """(demo config, StageData, held-out rows, banks by id, lengths, pretraining ckpt dir)."""
    from experiments.demo import data as data_lib
    from experiments.demo import runs
    from vrthinker_jax import cli
    from vrthinker_jax.rollout import protocol

    try:
        res, base, tok, ckpt_dir = runs.open_run(args.base_dir, "pretrain_calls")
    except FileNotFoundError as e:
        raise BenchError(str(e)) from None
    try:
        demo = cli.load_config(args.config, args.overrides)
    except cli.CliError as e:
        raise BenchError(str(e)) from None
    demo.progress = False
    for k in SHARED:
        if _differs(demo[k], base[k]):
            raise BenchError(f"{args.base_dir}/results.json: config.{k} differs from "
                             f"{args.config}'s; the shared pretraining needs the same")
    data_dir = os.path.join(args.base_dir, "data")
    train_pairs = data_lib.read_jsonl(os.path.join(data_dir, "train.jsonl"))
    heldout = data_lib.read_jsonl(os.path.join(data_dir, "heldout.jsonl"))
    traces = data_lib.read_jsonl(os.path.join(data_dir, "cot_train.jsonl"))
    pcfg = protocol.ProtocolConfig.from_configdict(demo.protocol)
    banks = data_lib.load_banks(train_pairs + heldout, data_dir, pcfg.num_candidates,
                                demo.frame_size)
    lengths = res["lengths"]
    data = data_lib.StageData.build(demo, tok, pcfg, lengths, train_pairs, traces, banks)
    return demo, data, heldout, banks, lengths, ckpt_dir


def format_probe(demo, rt, data, heldout, banks, n_prompts: int, samples: int) -> dict:
    """Mean reward parts (total, accuracy, format) of `samples` rollouts of each of the first
    `n_prompts` held-out prompts at the GRPO temperature, under rt's params."""
    import grpo_reward_bench
    import jax

    from experiments.demo import data as data_lib
    from experiments.demo import stages
    from vrthinker_jax.train import rollouts

    gcfg = stages.grpo_config(demo, data)
    recs = [data_lib.label_record(r) for r in heldout[:n_prompts]]
    engine = rollouts.make_engine(gcfg, rt, data.tok, params=rt.params)
    rows = [i for i in range(len(recs)) for _ in range(samples)]
    return grpo_reward_bench.score(gcfg, engine, rt.params, recs, banks, rows,
                                   jax.random.key(int(demo.seed) + 31))


def reused_start(args, demo) -> tuple[dict, str]:
    """(oa_diff_sft, oa_diff_rft, rft_accepted, wall_s_sft_rft; the RFT checkpoint dir) of
    `--reuse`: an earlier `--out` of this bench, or a finished demo run whose seed, pretraining,
    SFT and RFT settings are this run's (its SFT and RFT are then this run's)."""
    from experiments.demo import runs

    keys = ("oa_diff_sft", "oa_diff_rft", "rft_accepted", "wall_s_sft_rft")
    bench_json = os.path.join(args.reuse, "stage3.json")
    if os.path.exists(bench_json):
        with open(bench_json) as f:
            prev = json.load(f)
        if prev["seed"] != int(demo.seed):
            raise BenchError(f"--reuse {args.reuse} is seed {prev['seed']}, not {demo.seed}")
        return {k: prev[k] for k in keys}, os.path.join(args.reuse, "rft_params")
    try:
        res, run_cfg, _, rft_ckpt = runs.open_run(args.reuse, "rft")
    except FileNotFoundError as e:
        raise BenchError(f"--reuse: {e}") from None
    for k in (*SHARED, "seed", "sft", "rft"):
        if _differs(demo[k], run_cfg[k]):
            raise BenchError(f"--reuse {args.reuse}: config.{k} differs from this run's")
    rows = {r["stage"]: r for r in res["table"]}
    t = res["time_wall_s"]
    return {"oa_diff_sft": oa_diff(rows["sft"]), "oa_diff_rft": oa_diff(rows["rft"]),
            "rft_accepted": res["stages"]["rft"].get("accepted_traces"),
            # training only: the demo times its evaluations together
            "wall_s_sft_rft": round(t["sft"] + t["rft"], 1)}, rft_ckpt


def oa_diff(summary: dict):
    v = summary["acc"]["OA"]["diff"]
    return None if v is None else round(100 * v, 1)


def run(args) -> dict:
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from experiments.demo import evaluation, runs, stages
    from vrthinker_jax.rollout.sampler import sampling_config
    from vrthinker_jax.train import runtime

    t0 = time.perf_counter()
    demo, data, heldout, banks, lengths, ckpt_dir = load_start(args)
    cfg = stages.sft_config(demo, data.tok, seq_len=int(lengths["seq_len"]))
    rt = runtime.setup(cfg, data.tok)
    ev = evaluation.Evaluator(demo, data.tok, rt, heldout, banks, args.out,
                              sampling_config(temperature=0.0, **data.sampling))
    out = {"bench": "stage3", "seed": int(demo.seed), "base_dir": args.base_dir,
           "config": args.config, "overrides": args.overrides,
           "sft_steps": int(demo.sft.steps)}
    # per-step training metrics: <out>/tb/train (TensorBoard and metrics.jsonl)
    logger = runtime.TrainLogger(os.path.join(args.out, "tb", "train"))
    try:
        if args.reuse:  # the SFT and RFT of an earlier run (same seed and settings)
            prev, rft_ckpt = reused_start(args, demo)
            out.update(prev)
            rt.params = runs.restore_params(rft_ckpt, cfg, rt)
        else:
            sft_ckpt = os.path.join(args.out, "sft", "checkpoints")
            if args.resume and os.path.isdir(sft_ckpt) and os.listdir(sft_ckpt):
                rt.params = runs.restore_params(sft_ckpt, cfg, rt)  # a finished SFT
            else:
                rt.params = runs.restore_params(ckpt_dir, cfg, rt)
                rt, _ = stages.sft_stage(demo, data, cfg, rt, args.out, logger)
            out["oa_diff_sft"] = oa_diff(ev.run("sft", rt.params, data.pcfg))
            rt, rft_stats = stages.rft_stage(demo, data, rt, args.out, logger)
            out["rft_accepted"] = rft_stats.get("accepted_traces")
            out["oa_diff_rft"] = oa_diff(ev.run("rft", rt.params, data.pcfg))
            save_params(rt, cfg, os.path.join(args.out, "rft_params"))
            out["wall_s_sft_rft"] = round(time.perf_counter() - t0, 1)
        if args.until == "grpo":
            grpo_and_eval(args, demo, data, rt, ev, heldout, banks, logger, out)
            # SFT + RFT (here or in the --reuse run) and GRPO with its probes and evaluation
            out["wall_s"] = round(out["wall_s_sft_rft"] + time.perf_counter() - t0, 1)
    finally:
        logger.close()
    with open(os.path.join(args.out, "stage3.json"), "w") as f:
        json.dump({**out, "summaries": ev.results}, f, indent=1)
    return out


def grpo_and_eval(args, demo, data, rt, ev, heldout, banks, logger, out: dict) -> None:
    """GRPO from rt's params between two format probes, then the held-out evaluation; adds
    the numbers to `out`."""
    from experiments.demo import stages

    probe = (data, heldout, banks, args.format_prompts, args.format_samples)
    before = format_probe(demo, rt, *probe)
    rt, stats = stages.grpo_stage(demo, data, rt, args.out, logger)
    after = format_probe(demo, rt, *probe)
    final = ev.run("grpo", rt.params, data.pcfg)
    out.update({
        "oa_diff_grpo": oa_diff(final), "oa_ties_grpo": round(100 * final["acc"]["OA"]["ties"], 1),
        "format_before_grpo": before["format"], "format_after_grpo": after["format"],
        "probe_before_grpo": before, "probe_after_grpo": after,
        "grpo_reward": [round(x, 3) for x in stats["reward"]],
        "grpo_format": [round(x, 3) for x in stats["reward_format"]],
        "grpo_rows_in_update": stats["rows_in_update"],
        "answered_grpo": final["answered"], "grpo": demo.grpo.to_dict(),
    })


def save_params(rt, cfg, path: str) -> None:
    """rt's params as a stage checkpoint (`experiments.demo.runs.restore_params` reads it)."""
    from vrthinker_jax.train import checkpointing, steps

    state = steps.init_train_state(rt.params, steps.make_optimizer(cfg.optimizer), 0)
    ckpt = checkpointing.Checkpointer(path, save_every=1, keep=1)
    try:
        ckpt.save(1, state, {})
    finally:
        ckpt.close()


def main(argv=None) -> int:
    from vrthinker_jax import cli

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-dir", required=True,
                   help="a finished demo run (data, tokenizer, pretrain_calls checkpoint)")
    p.add_argument("--config", default=STAGE3,
                   help="the demo config and preset run (default: its stage3 preset; "
                        "experiments/configs/demo.py:quick for a smoke test on a quick run); "
                        "fields overridden with --config.FIELD=VALUE")
    p.add_argument("--out", required=True, help="this run's directory (new or empty)")
    p.add_argument("--reuse", default="",
                   help="an earlier --out of this bench (same seed): start GRPO from its RFT")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run in --out: a finished SFT is restored, finished "
                        "evaluations are read back")
    p.add_argument("--until", default="grpo", choices=("rft", "grpo"),
                   help="rft: stop after RFT (a later --reuse of this --out runs GRPO)")
    p.add_argument("--format-prompts", type=int, default=8,
                   help="held-out prompts scored before and after GRPO")
    p.add_argument("--format-samples", type=int, default=4, help="samples per scored prompt")
    args, extra = p.parse_known_args(argv)
    try:
        args.overrides = cli.split_config_overrides(extra)
    except cli.CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.resume:
        print(f"error: --out {args.out} exists and is not empty (--resume continues it)",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    try:
        out = run(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
