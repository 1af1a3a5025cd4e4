"""GRPO from a trained tiny model: does the mean reward rise over a short run? (CPU)

Starts from the checkpoint a finished demo run wrote for a stage (`--from sft`, `rft`, or a
pretraining phase such as `pretrain_calls`), optionally followed by `--sft-steps` steps of the
demo's cold-start SFT (a policy that knows the format but not yet every defect: room to learn),
on that run's synthetic needle data and tokenizer, and runs `--steps` GRPO steps (G rollouts
per training prompt, group-normalised advantages, clipped ratio, k3 KL) with the demo's GRPO
settings unless overridden: the arguments below, and any field of the GRPO stage config with
`--config.FIELD=VALUE` (as `experiments/train.py` takes it), applied last.

The per-step training reward depends on which prompts a step draws, so the policy is also
scored on a fixed set of `--eval-prompts` training prompts (`--eval-samples` each, at the
GRPO temperature) before and after GRPO; `--train-prompts N` trains on the first N prompts
only, so that with N = `--eval-prompts` the per-step reward is measured on the fixed set too.
Prints exactly one JSON line: the fixed-set reward before and after (and its accuracy /
format parts), the per-step training reward and update metrics, the mean of the first and last
`--window` steps, the least-squares slope per step, and the rollout / update time split.

    python -m experiments.demo --out /tmp/demo              # writes /tmp/demo/<stage>/checkpoints
    python experiments/benchmarks/grpo_reward_bench.py --demo-dir /tmp/demo --steps 16
    # the README's 64-step runs (add --config.seed=1 for the second)
    python experiments/benchmarks/grpo_reward_bench.py --demo-dir /tmp/demo \
        --from pretrain_calls --sft-steps 100 --train-prompts 8 --eval-prompts 8 \
        --eval-samples 16 --prompts 8 --group 4 --steps 64 --window 8 --lr 3e-5 \
        --config.optimizer.warmup_steps=10

Nothing here reads the held-out split: prompts come from the run's training pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def _slope(ys: list[float]) -> float:
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2
                                                                    for i in range(n))


def add_start_args(p: argparse.ArgumentParser) -> None:
    """The arguments that pick the starting policy and the GRPO settings (shared with
    grpo_step_probe.py); `parse_start_args` parses them with the config overrides."""
    p.epilog = ("Any field of the GRPO stage config is overridden with --config.FIELD=VALUE\n"
                "(repeatable; applied after the arguments above), e.g.\n"
                "--config.optimizer.eps=1e-6 --config.grpo.inner_updates=2")
    p.add_argument("--demo-dir", required=True, help="a finished `experiments.demo` --out dir")
    p.add_argument("--from", dest="stage", default="sft",
                   help="start from this stage's checkpoint (sft, rft, pretrain_calls, ...)")
    p.add_argument("--sft-steps", type=int, default=0,
                   help="cold-start SFT steps on the run's training traces before GRPO")
    p.add_argument("--sft-workdir", default="",
                   help="the warm-up SFT's checkpoints (default: <workdir>/sft); a finished one "
                        "is restored, not rerun, so several GRPO runs can share one warm-up")
    p.add_argument("--prompts", type=int, default=0, help="prompts per step (0 = the demo's)")
    p.add_argument("--group", type=int, default=0, help="rollouts per prompt (0 = the demo's)")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate (0 = the demo's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = the demo's")
    p.add_argument("--workdir", default="", help="GRPO checkpoints (default: a temp dir)")


class StartError(Exception):
    """A missing demo run, an unknown argument or a bad override: printed as one line, exit
    status 2."""


def parse_start_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """p's arguments, with the `--config.FIELD=VALUE` overrides of the GRPO stage config in
    args.overrides; any other unknown argument raises StartError."""
    from vrthinker_jax import cli

    args, extra = p.parse_known_args(argv)
    args.overrides = cli.split_config_overrides(extra, StartError)
    return args


def start(args, steps: int):
    """The GRPO stage config, runtime (params = the starting policy), tokenizer, demo config,
    training prompt records and their frame banks (id -> uint8 [2N, H, W, 3]) of a demo run."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from experiments.configs import sft as sft_cfgs
    from experiments.demo import data as data_lib
    from experiments.demo import runs, stages
    from vrthinker_jax import cli
    from vrthinker_jax.rollout import protocol
    from vrthinker_jax.train import runtime, sft

    try:
        res, demo, tok, ckpt_dir = runs.open_run(args.demo_dir, args.stage)
    except FileNotFoundError as e:
        raise StartError(str(e)) from None
    data_dir = os.path.join(args.demo_dir, "data")
    train_pairs = data_lib.read_jsonl(os.path.join(data_dir, "train.jsonl"))
    banks = data_lib.load_banks(train_pairs, data_dir, int(demo.protocol.num_candidates),
                                demo.frame_size)
    records = [data_lib.label_record(r) for r in train_pairs]
    lengths = res["lengths"]
    # the run's GRPO settings with this bench's, then the demo's own GRPO stage config
    g = demo.grpo
    g.update(dict(steps=int(steps), lr=args.lr or float(g.lr),
                  temperature=args.temperature or float(g.temperature),
                  group_size=args.group or int(g.group_size),
                  prompts_per_step=args.prompts or int(g.prompts_per_step)))
    pcfg = protocol.ProtocolConfig.from_configdict(demo.protocol)
    cfg = stages.grpo_config(demo, data_lib.StageData.build(demo, tok, pcfg, lengths,
                                                            train_pairs, [], banks))
    cfg.progress = False
    # the config is built here, not read from a file: its overrides apply to it in memory
    cli.override_config(cfg, args.overrides, StartError)
    rt = runtime.setup(cfg, tok)
    rt.params = runs.restore_params(ckpt_dir, cfg, rt)
    if args.sft_steps > 0:
        s = demo.sft
        scfg = stages.stage_config(sft_cfgs, demo, tok, protocol=demo.protocol.to_dict(),
                                   steps=args.sft_steps, batch_size=s.batch_size, lr=s.lr,
                                   seq_len=int(lengths["seq_len"]), warmup=s.warmup_steps)
        scfg.progress = False
        traces = data_lib.read_jsonl(os.path.join(data_dir, "cot_train.jsonl"))
        srt = runtime.setup(scfg, tok, model=rt.model(rt.params))
        ds = sft.in_memory_dataset(scfg, traces, [banks[t["id"]] for t in traces], tok, srt)
        work = args.workdir or tempfile.mkdtemp(prefix="grpo_warm_")
        srt, _ = sft.run_sft(scfg, args.sft_workdir or os.path.join(work, "sft"), ds, rt=srt)
        rt.params = srt.params
    return cfg, rt, tok, demo, records, banks


def score(cfg, engine, params, records: list[dict], banks: dict, rows: list[int], key) -> dict:
    """Mean reward parts of one rollout per entry of `rows` (indices into `records`, repeated
    for several samples of a prompt) under `params`, prompts_per_step x group_size rows per
    call of `engine` (one engine for every policy scored: its compiled functions are reused)."""
    import jax
    import numpy as np

    from vrthinker_jax.train import rewards

    engine.update_params(params)
    parts = []
    per_call = int(cfg.grpo.prompts_per_step) * int(cfg.grpo.group_size)
    for j in range(0, len(rows), per_call):
        chunk = rows[j:j + per_call]
        trajs = engine.rollout([records[i]["prompt"] for i in chunk],
                               np.stack([banks[records[i]["id"]] for i in chunk]),
                               jax.random.fold_in(key, j))
        parts += [rewards.trajectory_reward(t.assistant_turns, t.judgments,
                                            records[i]["labels"], t.frames_selected,
                                            cfg.rewards) for t, i in zip(trajs, chunk)]
    return {k: round(float(np.mean([getattr(p, k) for p in parts])), 4)
            for k in ("total", "accuracy", "format")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_start_args(p)
    p.add_argument("--eval-prompts", type=int, default=32,
                   help="fixed training prompts scored before and after GRPO (0 = none)")
    p.add_argument("--eval-samples", type=int, default=0,
                   help="samples per fixed prompt (0 = the group size); more samples, less "
                        "noise in the before / after numbers")
    p.add_argument("--train-prompts", type=int, default=0,
                   help="train on the first N training prompts only (0 = all); with "
                        "--eval-prompts N the per-step reward is measured on the fixed set "
                        "itself, free of the draw of prompts")
    p.add_argument("--steps", type=int, default=16, help="GRPO steps (rollout batches)")
    p.add_argument("--window", type=int, default=4, help="steps averaged at each end")

    try:
        args = parse_start_args(p, argv)
        cfg, rt, tok, demo, records, banks = start(args, args.steps)
    except StartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    from vrthinker_jax.train import grpo, rollouts

    prompts_per_step, group = int(cfg.grpo.prompts_per_step), int(cfg.grpo.group_size)
    temperature = float(cfg.sampling.temperature)
    work = args.workdir or tempfile.mkdtemp(prefix="grpo_reward_")
    fixed = list(range(min(args.eval_prompts, len(records))))
    eval_samples = args.eval_samples or group
    fixed_rows = [i for i in fixed for _ in range(eval_samples)]
    key = jax.random.key(int(demo.seed) + 11)
    engine = rollouts.make_engine(cfg, rt, tok, params=rt.params)

    def fixed_reward(params) -> dict:
        return score(cfg, engine, params, records, banks, fixed_rows, key) if fixed else {}

    before = fixed_reward(rt.params)
    pool = records[:args.train_prompts] if args.train_prompts > 0 else records
    prompts = rollouts.in_memory_prompts(cfg, pool, [banks[r["id"]] for r in pool],
                                         prompts_per_step)
    t0 = time.perf_counter()
    rt, hist = grpo.run_grpo(cfg, work, None, tok, rt=rt, dataset=prompts)
    wall = time.perf_counter() - t0
    jax.block_until_ready(rt.params)
    after = fixed_reward(rt.params)

    reward = [round(h["reward"], 4) for h in hist]
    w = max(1, min(args.window, len(reward) // 2))
    first, last = sum(reward[:w]) / w, sum(reward[-w:]) / w
    out = {
        "bench": "grpo_reward", "device": jax.devices()[0].platform, "from": args.stage,
        "sft_steps": args.sft_steps, "train_prompts": len(pool), "steps": len(hist),
        "prompts_per_step": prompts_per_step,
        "group_size": group, "lr": float(cfg.optimizer.lr), "temperature": temperature,
        "kl_coef": float(cfg.grpo.kl_coef), "warmup_steps": int(cfg.optimizer.warmup_steps),
        "inner_updates": int(cfg.grpo.inner_updates), "overrides": args.overrides,
        "fixed_prompts": len(fixed), "fixed_samples": eval_samples, "fixed_before": before,
        "fixed_after": after,
        "fixed_rise": (round(after["total"] - before["total"], 4) if fixed else None),
        "reward": reward,
        "reward_accuracy": [round(h["reward_accuracy"], 4) for h in hist],
        "reward_format": [round(h.get("reward_format", 0.0), 4) for h in hist],
        "rows_in_update": [h["rows_in_update"] for h in hist],
        # the update's own view: ratio ~1 and small KL mean the learner scores the rollout's
        # tokens as the rollout did; entropy shows whether the policy sharpens
        **{k: [round(h[k], 4) if k in h else None for h in hist]
           for k in ("ratio_mean", "clip_frac", "kl", "entropy", "grad_norm")},
        "first_mean": round(first, 4), "last_mean": round(last, 4),
        "rise": round(last - first, 4), "slope_per_step": round(_slope(reward), 5),
        "window": w, "wall_s": round(wall, 1),
        "rollout_s": round(sum(h.get("time_rollout_s", 0.0) for h in hist), 1),
        "update_s": round(sum(h.get("time_update_s", 0.0) for h in hist), 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
