"""The three training stages on the tiny model and synthetic needle data, on CPU.

Generates needle pairs + oracle traces + a tiny sentencepiece tokenizer into a temp dir, then
runs cold-start SFT, RFT (K rollouts per pair, all-correct filter, SFT on the kept traces) and
GRPO with the rollout engine, and prints exactly one JSON line: SFT losses, step times, the RFT
acceptance rate, GRPO rewards per step and the rollout / reference / update time split.

    python experiments/benchmarks/train_pipeline.py --sft-steps 60 --grpo-steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def _parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pairs", type=int, default=24, help="synthetic pairs to generate")
    p.add_argument("--batch", type=int, default=4, help="SFT batch size")
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rft-prompts", type=int, default=4, help="pairs sampled by RFT (0 skips)")
    p.add_argument("--rft-k", type=int, default=2, help="rollouts per pair in RFT")
    p.add_argument("--rft-steps", type=int, default=4, help="SFT steps on accepted traces")
    p.add_argument("--grpo-steps", type=int, default=2, help="GRPO steps (0 skips)")
    p.add_argument("--workdir", default="", help="default: a fresh temp dir")
    return p.parse_args(argv)


def _needle_data(work: str, pairs: int):
    """Generates `pairs` needle pairs and their oracle traces under work/needle and trains a
    400-piece sentencepiece tokenizer on their corpus. Returns (synthetic.generate's info,
    tokenizer)."""
    from data_pipelines import synthetic, tokenizer

    data = os.path.join(work, "needle")
    info = synthetic.generate(data, pairs, seed=0)
    tok_path = tokenizer.train_sentencepiece(
        synthetic.read_corpus(info["paths"]["corpus"]), os.path.join(data, "tokenizer"), 400)
    return info, tokenizer.load_tokenizer(tok_path)


def _stage_config(cfg_lib, tok):
    """A stage's tiny config on one CPU device, aligned with the tokenizer's special ids, with
    no checkpoints and no progress bar (the benchmark prints one JSON line)."""
    from vrthinker_jax.train import runtime

    cfg = cfg_lib.get_config("tiny")
    runtime.align_model_config(cfg.model, tok)
    cfg.mesh.ici = {}
    cfg.ckpt_every, cfg.progress = 10**6, False
    return cfg


def _sft(args, work: str, info: dict, tok):
    """Cold-start SFT on the oracle traces. Returns (trained params, summary: losses and step
    times)."""
    from experiments.configs import sft as sft_cfg_lib
    from vrthinker_jax.train import runtime, sft

    cfg = _stage_config(sft_cfg_lib, tok)
    cfg.data.batch_size = args.batch
    cfg.steps, cfg.log_every = args.sft_steps, 1
    cfg.optimizer.update(dict(lr=args.lr, warmup_steps=3, total_steps=args.sft_steps))
    rt = runtime.setup(cfg, tok)
    t0 = time.perf_counter()
    rt, hist = sft.run_sft(cfg, os.path.join(work, "sft"),
                           sft.sft_dataset(cfg, info["paths"]["cot_train"], tok, rt), rt=rt)
    return rt.params, {
        "steps": len(hist), "batch": args.batch, "seq_len": cfg.data.seq_len,
        "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"],
        "loss_min": min(h["loss"] for h in hist),
        "first_step_s_incl_compile": hist[0]["step_time_s"],
        "median_step_s": _median([h["step_time_s"] for h in hist[1:]]),
        "wall_s": time.perf_counter() - t0,
    }


def _rft(args, work: str, info: dict, tok, params) -> dict:
    """RFT from the SFT params: K rollouts per pair, all-correct filter, SFT on the kept
    traces. Returns run_rft's stats (acceptance and losses) and the wall time."""
    import jax
    import jax.numpy as jnp

    from experiments.configs import rft as rft_cfg_lib
    from vrthinker_jax.train import rft, runtime

    rcfg = _stage_config(rft_cfg_lib, tok)
    rcfg.data.batch_size = args.rft_k * min(args.rft_prompts, 2)
    rcfg.samples_per_prompt, rcfg.max_prompts = args.rft_k, args.rft_prompts
    rcfg.steps = args.rft_steps
    rcfg.optimizer.update(dict(lr=args.lr / 2, warmup_steps=1, total_steps=args.rft_steps))
    rrt = runtime.setup(rcfg, tok)
    rrt.params = jax.tree.map(jnp.copy, params)  # the SFT below donates its buffers
    t0 = time.perf_counter()
    rrt, stats = rft.run_rft(rcfg, os.path.join(work, "rft"), info["paths"]["train"], tok,
                             rt=rrt)
    return {**stats, "wall_s": time.perf_counter() - t0}


def _grpo(args, work: str, info: dict, tok, params) -> dict:
    """GRPO from the SFT params (2 prompts x group of 2 per step). Returns rewards per step,
    the rollout / reference / update time split (first, compiling step excluded) and step
    times."""
    import jax
    import jax.numpy as jnp

    from experiments.configs import grpo as grpo_cfg_lib
    from vrthinker_jax.train import grpo, runtime

    gcfg = _stage_config(grpo_cfg_lib, tok)
    gcfg.steps = args.grpo_steps
    gcfg.grpo.update(dict(group_size=2, prompts_per_step=2))
    grt = runtime.setup(gcfg, tok)
    grt.params = jax.tree.map(jnp.copy, params)
    t0 = time.perf_counter()
    grt, ghist = grpo.run_grpo(gcfg, os.path.join(work, "grpo"), info["paths"]["train"],
                               tok, rt=grt)
    split = {k: sum(h[f"time_{k}_s"] for h in ghist[1:] or ghist)
             for k in ("rollout", "reference", "update")}
    total = sum(split.values()) or 1.0
    return {
        "steps": len(ghist), "rows_per_step": 4,
        "reward": [round(h["reward"], 4) for h in ghist],
        "answered": [h["answered"] for h in ghist],
        "response_tokens": [h["response_tokens"] for h in ghist],
        "time_share_excl_first_step": {k: round(v / total, 3) for k, v in split.items()},
        # step_time_s: the shared training loop's (train/loop.py) wall time of each step
        "first_step_s_incl_compile": ghist[0]["step_time_s"],
        "median_step_s": _median([h["step_time_s"] for h in ghist[1:]]),
        "wall_s": time.perf_counter() - t0,
    }


def main(argv=None) -> int:
    args = _parse_args(argv)

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    work = args.workdir or tempfile.mkdtemp(prefix="train_pipeline_")
    info, tok = _needle_data(work, args.pairs)
    out: dict = {"device": "cpu", "pairs": args.pairs}
    params, out["sft"] = _sft(args, work, info, tok)
    if args.rft_prompts:
        out["rft"] = _rft(args, work, info, tok, params)
    if args.grpo_steps:
        out["grpo"] = _grpo(args, work, info, tok, params)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
