"""How large a GRPO step does a trained tiny policy take well? (CPU)

One rollout batch (`--prompts` training prompts x `--group` samples at the GRPO temperature)
from the starting policy (the same start arguments as grpo_reward_bench.py), its group
advantages and the gradient of the GRPO objective (at the rollout's own policy the ratio is 1
and nothing is clipped, so this is the gradient of GRPO's first update; the KL term is left
out: it is zero there). For each `--lrs` value, one step of a fresh Adam is taken three ways
(Adam's first step moves every parameter by lr x the sign of its gradient):

  - `along`: along the gradient, the step GRPO takes;
  - `against`: the opposite step;
  - `random`: a random sign pattern of the same size (a placebo).

Each reports the change of the summed log-prob of the batch's positive- and negative-advantage
rows, and the reward on `--eval-prompts` other training prompts (`--eval-samples` each). A step
that breaks the format both along and against the gradient, while the placebo leaves it whole,
is too large for this policy. Prints exactly one JSON line.

    python experiments/benchmarks/grpo_step_probe.py --demo-dir /tmp/demo \\
        --from pretrain_calls --sft-steps 100 --lrs 1e-5,3e-5,1e-4,5e-4
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpo_reward_bench as bench  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_start_args(p)
    p.add_argument("--lrs", default="1e-5,3e-5,1e-4,5e-4",
                   help="comma-separated step sizes (Adam learning rates) to probe")
    p.add_argument("--eval-prompts", type=int, default=8,
                   help="training prompts, after the batch's, scored after each step")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per scored prompt")
    args = p.parse_args(argv)
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        print(f"error: --lrs {args.lrs!r}: expected comma-separated numbers", file=sys.stderr)
        return 2
    if not lrs or min(lrs) <= 0:
        print(f"error: --lrs {args.lrs!r}: expected positive step sizes", file=sys.stderr)
        return 2

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from vrthinker_jax.train import grpo, losses, rollouts, steps

    try:
        cfg, rt, tok, demo, records, banks = bench.start(args, steps=1)
    except bench.StartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_prompts, group = int(cfg.grpo.prompts_per_step), int(cfg.grpo.group_size)
    if n_prompts + args.eval_prompts > len(records):
        print(f"error: {n_prompts} batch + {args.eval_prompts} scored prompts, but the run has "
              f"{len(records)} training prompts", file=sys.stderr)
        return 2
    temperature = float(cfg.sampling.temperature)
    key = jax.random.key(int(demo.seed) + 23)
    p0 = rt.params

    # the batch: records[:n_prompts] x group, as run_grpo assembles it
    idx = [i for i in range(n_prompts) for _ in range(group)]
    engine = rollouts.make_engine(cfg, rt, tok, params=p0)
    row_banks = [banks[records[i]["id"]] for i in idx]
    trajs = engine.rollout([records[i]["prompt"] for i in idx], np.stack(row_banks), key)
    labels = [records[i]["labels"] for i in idx]
    host, parts, stats = grpo.rollout_batch(trajs, row_banks, labels, cfg)
    batch = steps.put_batch(host, rt.mesh)
    adv = np.asarray(host["advantages"])
    used = np.asarray(host["weight"]) > 0
    mask = batch["loss_mask"][:, 1:] & batch["valid"][:, 1:] & (batch["weight"][:, None] > 0)
    old = batch["old_logp"][:, 1:]

    def row_logp_of(params):
        model = nnx.merge(rt.graphdef, params)
        logp, _ = steps.sequence_token_stats(model, batch, rt.spec, temperature=temperature)
        return logp

    @jax.jit
    def row_logp(params):
        """Summed log-prob of each row's model-generated tokens [b]."""
        return jnp.sum(jnp.where(mask, row_logp_of(params), 0.0), axis=1)

    @jax.jit
    def grad(params):
        def loss(params):
            val, _ = losses.grpo_loss(row_logp_of(params), old, None, batch["advantages"], mask,
                                      **{**losses.grpo_loss_options(cfg.grpo), "kl_coef": 0.0})
            return val
        return jax.grad(loss)(params)

    g = grad(p0)
    base_logp = np.asarray(row_logp(p0))
    eval_rows = [i for i in range(n_prompts, n_prompts + args.eval_prompts)
                 for _ in range(args.eval_samples)]
    eval_key = jax.random.fold_in(key, 1)

    def report(params) -> dict:
        d = np.asarray(row_logp(params)) - base_logp
        pos, neg = used & (adv > 0), used & (adv < 0)
        return {"dlogp_pos": round(float(d[pos].mean()), 3) if pos.any() else None,
                "dlogp_neg": round(float(d[neg].mean()), 3) if neg.any() else None,
                **bench.score(cfg, engine, params, records, banks, eval_rows, eval_key)}

    rng = np.random.default_rng(int(demo.seed))
    placebo = jax.tree.map(
        lambda x: jnp.asarray(rng.choice([-1.0, 1.0], size=x.shape), x.dtype), g)
    probes = []
    for lr in lrs:
        tx = optax.adam(lr)
        along = optax.apply_updates(p0, tx.update(g, tx.init(p0), p0)[0])
        against = optax.apply_updates(p0, tx.update(jax.tree.map(jnp.negative, g),
                                                    tx.init(p0), p0)[0])
        random = optax.apply_updates(p0, jax.tree.map(lambda s, lr=lr: -lr * s, placebo))
        probes.append({"lr": lr, "along": report(along), "against": report(against),
                       "random": report(random)})
    out = {
        "bench": "grpo_step_probe", "device": jax.devices()[0].platform, "from": args.stage,
        "sft_steps": args.sft_steps, "prompts": n_prompts, "group_size": group,
        "temperature": temperature, "set": args.set,
        "batch_reward": round(float(np.mean([q.total for q in parts])), 4),
        "rows_in_update": stats["rows_in_update"],
        "grad_norm": round(float(optax.global_norm(g)), 4),
        "eval_prompts": args.eval_prompts, "eval_samples": args.eval_samples,
        "base": bench.score(cfg, engine, p0, records, banks, eval_rows, eval_key),
        "probes": probes,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
