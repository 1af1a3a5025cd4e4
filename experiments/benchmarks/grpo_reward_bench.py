"""GRPO from a trained tiny model: does the mean reward rise over a short run? (CPU)

Starts from the checkpoint a finished demo run wrote for a stage (`--from sft` or `rft`), on that
run's synthetic needle data and tokenizer, and runs `--steps` GRPO steps (G rollouts per
training prompt, group-normalised advantages, clipped ratio, k3 KL) with the demo's GRPO
settings unless overridden. Prints exactly one JSON line: the mean reward (and its accuracy /
format parts) per step, the mean of the first and last `--window` steps, their difference, the
least-squares slope per step, and the rollout / update time split.

    python -m experiments.demo --out /tmp/demo              # writes /tmp/demo/sft/checkpoints
    python experiments/benchmarks/grpo_reward_bench.py --demo-dir /tmp/demo --steps 16

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", required=True, help="a finished `experiments.demo` --out dir")
    p.add_argument("--from", dest="stage", default="sft", choices=("sft", "rft"),
                   help="start from this stage's checkpoint")
    p.add_argument("--steps", type=int, default=16, help="GRPO steps (rollout batches)")
    p.add_argument("--prompts", type=int, default=0, help="prompts per step (0 = the demo's)")
    p.add_argument("--group", type=int, default=0, help="rollouts per prompt (0 = the demo's)")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate (0 = the demo's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = the demo's")
    p.add_argument("--window", type=int, default=4, help="steps averaged at each end")
    p.add_argument("--workdir", default="", help="GRPO checkpoints (default: a temp dir)")
    args = p.parse_args(argv)

    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from experiments import demo as demo_lib
    from experiments.configs import grpo as grpo_cfgs
    from vrthinker_jax.train import grpo, runtime

    try:
        res, demo, tok, ckpt_dir = demo_lib.open_run(args.demo_dir, args.stage)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = demo.grpo
    prompts_per_step = args.prompts or int(g.prompts_per_step)
    group = args.group or int(g.group_size)
    lr = args.lr or float(g.lr)
    temperature = args.temperature or float(g.temperature)
    data_dir = os.path.join(args.demo_dir, "data")
    train_pairs = demo_lib._read_jsonl(os.path.join(data_dir, "train.jsonl"))
    banks = demo_lib.load_banks(train_pairs, data_dir, int(demo.protocol.num_candidates),
                                demo.frame_size)
    records = [{"id": r["id"], "prompt": r["prompt"],
                "labels": {k: int(r[k]) for k in demo_lib.LABEL_KEYS}} for r in train_pairs]
    lengths = res["lengths"]
    sampling = dict(max_len=int(lengths["max_len"]), max_new_tokens=int(demo.eval.max_new_tokens),
                    max_turn_tokens=int(demo.eval.max_turn_tokens),
                    prompt_buckets=(demo_lib._round_up(int(lengths["prompt_max"]), 64),),
                    temperature=temperature)
    cfg = demo_lib.stage_config(grpo_cfgs, demo, tok, protocol=demo.protocol.to_dict(),
                                steps=args.steps, batch_size=prompts_per_step, lr=lr,
                                seq_len=int(lengths["max_len"]), warmup=1, sampling=sampling)
    cfg.grpo.update(dict(group_size=group, prompts_per_step=prompts_per_step,
                         kl_coef=float(g.kl_coef)))
    cfg.progress = False
    rt = runtime.setup(cfg, tok)
    rt.params = demo_lib.restore_params(ckpt_dir, cfg, rt)
    prompts = grpo.in_memory_prompts(cfg, records, [banks[r["id"]] for r in train_pairs],
                                     prompts_per_step)
    work = args.workdir or tempfile.mkdtemp(prefix="grpo_reward_")
    t0 = time.perf_counter()
    rt, hist = grpo.run_grpo(cfg, work, None, tok, rt=rt, dataset=prompts)
    wall = time.perf_counter() - t0
    jax.block_until_ready(rt.params)

    reward = [round(h["reward"], 4) for h in hist]
    w = max(1, min(args.window, len(reward) // 2))
    first, last = sum(reward[:w]) / w, sum(reward[-w:]) / w
    out = {
        "bench": "grpo_reward", "device": jax.devices()[0].platform, "from": args.stage,
        "steps": len(hist), "prompts_per_step": prompts_per_step, "group_size": group,
        "lr": lr, "temperature": temperature, "kl_coef": float(g.kl_coef),
        "reward": reward,
        "reward_accuracy": [round(h["reward_accuracy"], 4) for h in hist],
        "reward_format": [round(h.get("reward_format", 0.0), 4) for h in hist],
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
