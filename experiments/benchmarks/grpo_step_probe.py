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


def parse_args(argv=None) -> tuple[argparse.Namespace, list[float]]:
    """The start arguments (grpo_reward_bench's, with the stage config's `--config.FIELD=VALUE`
    overrides) and the probe's, and the step sizes of --lrs; StartError on bad input."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_start_args(p)
    p.add_argument("--lrs", default="1e-5,3e-5,1e-4,5e-4",
                   help="comma-separated step sizes (Adam learning rates) to probe")
    p.add_argument("--eval-prompts", type=int, default=8,
                   help="training prompts, after the batch's, scored after each step")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per scored prompt")
    args = bench.parse_start_args(p, argv)
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        raise bench.StartError(f"--lrs {args.lrs!r}: expected comma-separated numbers") from None
    if not lrs or min(lrs) <= 0:
        raise bench.StartError(f"--lrs {args.lrs!r}: expected positive step sizes")
    return args, lrs


def setup(args):
    """The starting policy for one GRPO step: (cfg, rt, tok, demo, records, banks) as
    grpo_reward_bench.start gives them; StartError when the run has fewer training prompts
    than the batch and the scored prompts take."""
    cfg, rt, tok, demo, records, banks = bench.start(args, steps=1)
    n_prompts = int(cfg.grpo.prompts_per_step)
    if n_prompts + args.eval_prompts > len(records):
        raise bench.StartError(f"{n_prompts} batch + {args.eval_prompts} scored prompts, but "
                               f"the run has {len(records)} training prompts")
    return cfg, rt, tok, demo, records, banks


def rollout_batch(cfg, rt, tok, records: list[dict], banks: dict, key) -> dict:
    """The batch, records[:prompts_per_step] x group_size rows as run_grpo assembles it,
    rolled out by the starting policy: its engine, the batch on the mesh, the advantages, the
    rows the update uses, the reward parts and the update stats."""
    import numpy as np

    from vrthinker_jax.train import grpo, rollouts, steps

    n_prompts, group = int(cfg.grpo.prompts_per_step), int(cfg.grpo.group_size)
    idx = [i for i in range(n_prompts) for _ in range(group)]
    engine = rollouts.make_engine(cfg, rt, tok, params=rt.params)
    row_banks = [banks[records[i]["id"]] for i in idx]
    trajs = engine.rollout([records[i]["prompt"] for i in idx], np.stack(row_banks), key)
    labels = [records[i]["labels"] for i in idx]
    host, parts, stats = grpo.rollout_batch(trajs, row_banks, labels, cfg)
    return {"engine": engine, "batch": steps.put_batch(host, rt.mesh, rt.rules),
            "adv": np.asarray(host["advantages"]), "used": np.asarray(host["weight"]) > 0,
            "parts": parts, "stats": stats}


def objective(cfg, rt, batch):
    """(row_logp, grad), jitted over params: the summed log-prob of each row's
    model-generated tokens [b], and the gradient of the GRPO objective on the batch (at the
    rollout's policy the ratio is 1; the KL term, zero there, is left out)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vrthinker_jax.train import losses, steps

    temperature = float(cfg.sampling.temperature)
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

    return row_logp, grad


def probe(cfg, rt, demo, records: list[dict], banks: dict, rb: dict, lrs: list[float], args,
          key) -> dict:
    """The gradient's norm, the starting policy's reward on the scored prompts ('base'), and
    for each lr one fresh-Adam step along the gradient, against it and along a placebo sign
    pattern, each reported as the change of the positive / negative rows' log-prob and the
    reward on the scored prompts."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    row_logp, grad = objective(cfg, rt, rb["batch"])
    p0, n_prompts = rt.params, int(cfg.grpo.prompts_per_step)
    g = grad(p0)
    base_logp = np.asarray(row_logp(p0))
    eval_rows = [i for i in range(n_prompts, n_prompts + args.eval_prompts)
                 for _ in range(args.eval_samples)]
    eval_key = jax.random.fold_in(key, 1)

    def report(params) -> dict:
        d = np.asarray(row_logp(params)) - base_logp
        pos, neg = rb["used"] & (rb["adv"] > 0), rb["used"] & (rb["adv"] < 0)
        return {"dlogp_pos": round(float(d[pos].mean()), 3) if pos.any() else None,
                "dlogp_neg": round(float(d[neg].mean()), 3) if neg.any() else None,
                **bench.score(cfg, rb["engine"], params, records, banks, eval_rows, eval_key)}

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
    return {"grad_norm": round(float(optax.global_norm(g)), 4),
            "base": bench.score(cfg, rb["engine"], p0, records, banks, eval_rows, eval_key),
            "probes": probes}


def summary(args, cfg, rb: dict, probed: dict) -> dict:
    """The JSON line: the run's settings, the batch, and the probe's results."""
    import jax
    import numpy as np

    return {
        "bench": "grpo_step_probe", "device": jax.devices()[0].platform, "from": args.stage,
        "sft_steps": args.sft_steps, "prompts": int(cfg.grpo.prompts_per_step),
        "group_size": int(cfg.grpo.group_size),
        "temperature": float(cfg.sampling.temperature), "overrides": args.overrides,
        "batch_reward": round(float(np.mean([q.total for q in rb["parts"]])), 4),
        "rows_in_update": rb["stats"]["rows_in_update"],
        "grad_norm": probed["grad_norm"],
        "eval_prompts": args.eval_prompts, "eval_samples": args.eval_samples,
        "base": probed["base"], "probes": probed["probes"],
    }


def main(argv=None) -> int:
    try:
        args, lrs = parse_args(argv)
        cfg, rt, tok, demo, records, banks = setup(args)
    except bench.StartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    key = jax.random.key(int(demo.seed) + 23)
    rb = rollout_batch(cfg, rt, tok, records, banks, key)
    probed = probe(cfg, rt, demo, records, banks, rb, lrs, args, key)
    print(json.dumps(summary(args, cfg, rb, probed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
