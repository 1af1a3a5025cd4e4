"""Stage iii: GRPO over multi-turn, tool-using rollouts.

Per step: P prompts x G rollouts with the current policy (the rollout engine reads the learner's
parameter arrays on the mesh: no copy, no host round trip), rewards (format + accuracy +
exploration, `rewards.py`), group-relative advantages, reference log-probs from the frozen initial
policy (k3 KL), then `inner_updates` clipped-ratio updates on model-generated tokens only, with the
rollout's own log-probs as the old policy. Groups whose rewards are all equal carry no signal and
are dropped from the update (their rows get weight 0).

Step time is split into rollout / reference / update and logged with the rewards, accuracy per
dimension, KL, entropy, response length and tool calls.
"""

from __future__ import annotations

import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from vrthinker_jax import distributed, sharding
from vrthinker_jax.rollout import protocol
from vrthinker_jax.train import checkpointing, examples, losses, rewards, runtime, steps


def make_engine(cfg, rt: runtime.Runtime, tokenizer, params=None, sampling=None):
    """A rollout engine over the runtime's model on the 'rollout' role's mesh (the learner's
    unless `cfg.roles.rollout` names another; params are then resharded onto it)."""
    from vrthinker_jax.rollout import engine as engine_lib

    sampling = sampling if sampling is not None else cfg.sampling
    return engine_lib.RolloutEngine(
        rt.model(params), rt.model_cfg, tokenizer,
        protocol.ProtocolConfig.from_configdict(cfg.protocol),
        sampling, tuple(cfg.data.frame_size), mesh=rt.role_mesh("rollout"),
        cache_dtype=jnp.dtype(sampling.get("cache_dtype", "float32")),
    )


def reference_params(rt: runtime.Runtime):
    """The frozen reference: a copy of the initial params on the 'reference' role's mesh (a
    copy even on the learner's mesh, whose buffers each update donates)."""
    mesh = rt.role_mesh("reference")
    if mesh is rt.mesh:
        return jax.tree.map(jnp.copy, rt.params)
    return sharding.shard_state(rt.params, mesh)


def reference_logprobs(ref_fn, ref_params, host: dict, batch: dict, rt: runtime.Runtime):
    """Reference log-probs [b, s - 1] of a micro-batch, computed on the reference mesh and
    returned laid out like the learner's batch (`batch`: `host` already on the learner mesh)."""
    mesh = rt.role_mesh("reference")
    if mesh is rt.mesh:
        return ref_fn(ref_params, batch)
    out = ref_fn(ref_params, steps.put_batch(host, mesh))
    return jax.device_put(out, sharding.batch_sharding(rt.mesh, out.ndim, 0))


def micro_batches(host: dict, n: int) -> list[dict]:
    """Splits a host batch into n equal row slices, in order (rows at `steps.row_dim`)."""
    rows = len(host["weight"])
    if rows % n:
        raise ValueError(f"grpo: {rows} rows (prompts_per_step x group_size) are not divisible "
                         f"by optimizer.accum_steps={n}")
    m = rows // n
    return [{k: np.take(v, np.arange(j * m, (j + 1) * m), axis=steps.row_dim(k))
             for k, v in host.items()} for j in range(n)]


def prompt_dataset(cfg, pairs, prompts_per_step: int) -> grain.MapDataset:
    """Prompt batches (id, prompt, bank, labels [b, 4], failed) from a video_pairs manifest or
    records, through the Grain pipeline (videos decoded into candidate-frame banks)."""
    from data_pipelines import grain_pipelines

    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.batch_size = prompts_per_step
    return grain_pipelines.prompt_dataset(pairs, data_cfg,
                                          num_candidates=cfg.protocol.num_candidates)


def _collate_prompts(rows):
    return {
        "id": [r["id"] for r in rows],
        "prompt": [r["prompt"] for r in rows],
        "bank": np.stack([r["bank"] for r in rows]),
        "labels": np.stack([r["labels"] for r in rows]),
        "failed": np.zeros(len(rows), bool),
    }


def in_memory_prompts(cfg, records: list[dict], banks: list[np.ndarray],
                      prompts_per_step: int) -> grain.MapDataset:
    """Prompt batches from records ({id, prompt, labels}) whose banks are already in memory."""
    if len(records) != len(banks) or not records:
        raise ValueError(f"{len(records)} prompt records but {len(banks)} frame banks")

    def row(item):
        rec, bank = item
        labels = np.asarray([int(rec["labels"].get(k, -1)) for k in protocol.LABEL_KEYS],
                            np.int32)
        return {"id": rec["id"], "prompt": rec["prompt"], "bank": bank, "labels": labels}

    ds = grain.MapDataset.source(list(zip(records, banks)))
    if cfg.data.shuffle:
        ds = ds.shuffle(seed=int(cfg.data.seed))
    return ds.repeat(None).map(row).batch(prompts_per_step, drop_remainder=True,
                                          batch_fn=_collate_prompts)


def label_dict(labels_row) -> dict[str, int]:
    return {k: int(v) for k, v in zip(protocol.LABEL_KEYS, labels_row)}


def dimension_accuracy(trajs, labels: list[dict]) -> dict[str, float]:
    """Share of rows whose judgment of each labelled key is right (no answer = wrong)."""
    out = {}
    for k in protocol.LABEL_KEYS:
        hits = [(t.judgments or {}).get(k, -1) == lab[k] for t, lab in zip(trajs, labels)
                if lab[k] >= 0]
        if hits:
            out[k] = float(np.mean(hits))
    return out


def rollout_batch(trajs, banks, labels, cfg) -> tuple[dict, list[rewards.RewardParts], dict]:
    """Trajectories -> (host training batch, reward parts per row, rollout statistics).

    Rows that do not fit `data.seq_len` / `data.max_frames` keep their reward (they count in the
    group baseline) but get weight 0 in the update, and are counted.
    """
    g = cfg.grpo
    parts = [rewards.trajectory_reward(t.assistant_turns, t.judgments, lab, t.frames_selected,
                                       cfg.rewards) for t, lab in zip(trajs, labels)]
    total = np.asarray([p.total for p in parts], np.float32)
    adv, signal = losses.group_advantages(jnp.asarray(total), int(g.group_size),
                                          baseline=g.advantage_baseline, scale_std=g.scale_std)
    adv, signal = np.asarray(adv, np.float32), np.asarray(signal, bool)
    weight = signal.astype(np.float32) if g.drop_no_signal_groups else np.ones(len(trajs),
                                                                               np.float32)
    exs, too_long = [], 0
    seq_len, max_frames = int(cfg.data.seq_len), int(cfg.data.max_frames)
    for i, (t, bank) in enumerate(zip(trajs, banks)):
        try:
            exs.append(examples.from_trajectory(t, bank, seq_len=seq_len, max_frames=max_frames))
        except examples.ExampleTooLong:
            too_long += 1
            weight[i] = 0.0
            exs.append(examples.failed_example(seq_len, max_frames, bank.shape[1:]))
    batch = examples.collate(exs)
    batch["weight"] = weight
    batch["advantages"] = adv
    stats = {
        "rows_too_long": float(too_long),
        "groups_with_signal": float(signal.reshape(-1, g.group_size)[:, 0].sum()),
        "rows_in_update": float((weight > 0).sum()),
    }
    return batch, parts, stats


def step_record(trajs, parts, labels, rstats: dict) -> dict:
    """The step's rollout statistics over the rows of every process (each holds its own
    `trajs`, reward `parts` and `labels`; `rstats` are its row counts)."""
    local = {
        "total": [p.total for p in parts], "format": [p.format for p in parts],
        "accuracy": [p.accuracy for p in parts], "exploration": [p.exploration for p in parts],
        "answered": [t.judgments is not None for t in trajs],
        "tool_calls": [t.tool_calls for t in trajs],
        "frames_selected": [t.frames_selected for t in trajs],
        "response_tokens": [int(t.loss_mask.sum()) for t in trajs],
        "judgments": [t.judgments for t in trajs], "labels": labels,
    }
    rows = {k: [x for p in distributed.allgather_json(local) for x in p[k]] for k in local}

    class _Judged:  # what dimension_accuracy reads of a trajectory
        def __init__(self, judgments):
            self.judgments = judgments

    return {
        "reward": float(np.mean(rows["total"])),
        "reward_format": float(np.mean(rows["format"])),
        "reward_accuracy": float(np.mean(rows["accuracy"])),
        "reward_exploration": float(np.mean(rows["exploration"])),
        **{k: float(np.mean(rows[k])) for k in ("answered", "tool_calls", "frames_selected",
                                                 "response_tokens")},
        **distributed.sum_over_processes(rstats),
        **{f"accuracy_{k}": v for k, v in dimension_accuracy(
            [_Judged(j) for j in rows["judgments"]], rows["labels"]).items()},
    }


def run_grpo(
    cfg, workdir: str, pairs, tokenizer, *, rt: runtime.Runtime, logger=None,
    dataset: grain.MapDataset | None = None, stop_after: int | None = None, tag: str = "grpo",
) -> tuple[runtime.Runtime, list[dict]]:
    """Runs up to `cfg.steps` GRPO steps (resuming from `workdir/checkpoints`).

    Args:
      pairs: a video_pairs manifest path or records (ignored when `dataset` is given).
      rt: the runtime; its params are the initial policy and the frozen reference.
      dataset: prompt batches (e.g. `in_memory_prompts`); default: `prompt_dataset(pairs)`.
    Returns:
      (rt with the trained params, one record per step run).
    """
    runtime.check_run_counts(cfg, tag)
    g = cfg.grpo
    rows = int(g.prompts_per_step) * int(g.group_size)  # global: all processes together
    per_call = int(g.get("rollout_batch", 0) or rows)
    if rows % per_call:
        raise ValueError(f"grpo.rollout_batch={per_call} must divide prompts_per_step x "
                         f"group_size = {rows}")
    accum = max(int(cfg.optimizer.accum_steps), 1)
    if rows % accum:
        raise ValueError(f"grpo: prompts_per_step x group_size = {rows} is not divisible by "
                         f"optimizer.accum_steps={accum}")
    # optimizer micro-steps per rollout batch: each inner update is accum micro-batches
    micro_per_step = max(int(g.inner_updates), 1) * accum
    if dataset is None:
        dataset = prompt_dataset(cfg, pairs, int(g.prompts_per_step))
    tx = steps.make_optimizer(cfg.optimizer)
    # the frozen reference: a copy, since the learner's buffers are donated to each update
    ref_params = reference_params(rt) if g.kl_coef else None
    state = steps.place_state(steps.init_train_state(rt.params, tx, int(cfg.seed)), rt.mesh)
    it = iter(dataset.to_iter_dataset())
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      save_every=cfg.ckpt_every, keep=cfg.keep_checkpoints)
    restored = ckpt.restore(state)
    if restored is not None:
        state, meta = restored
        it.set_state(meta["data"])
    engine = make_engine(cfg, rt, tokenizer, params=state.params)
    if logger is not None and int(state.step):
        logger.rewind(tag, int(state.step) // micro_per_step)  # steps redone after the restore
    temperature = float(cfg.sampling.temperature) or 1.0
    ref_spec = rt.spec.replace(mesh=rt.role_mesh("reference"))
    ref_fn = jax.jit(lambda p, b: steps.sequence_logprobs(
        p, b, graphdef=rt.graphdef, spec=ref_spec, temperature=temperature))
    update_fn = None
    history: list[dict] = []
    start = int(state.step) // micro_per_step
    bar = tqdm(total=cfg.steps, initial=start, desc=tag, dynamic_ncols=True,
               disable=not cfg.get("progress", True))
    for step in range(start, cfg.steps):
        t_start = time.perf_counter()
        prompts_batch = next(it)
        gs = int(g.group_size)
        prompts = [p for p in prompts_batch["prompt"] for _ in range(gs)]
        banks = np.repeat(prompts_batch["bank"], gs, axis=0)
        labels = [label_dict(r) for r in np.repeat(prompts_batch["labels"], gs, axis=0)]
        # the rollout key comes from the checkpointed RNG, so a resumed run samples the same
        key = jax.random.fold_in(state.key, step)
        t0 = time.perf_counter()
        engine.update_params(state.params)
        # `grpo.rollout_batch` rows per engine call bounds the KV cache on the rollout mesh;
        # this process holds `len(prompts)` of the rows, the same share of each call
        trajs, share = [], len(prompts) / rows
        for i in range(0, rows, per_call):
            sub = key if i == 0 else jax.random.fold_in(key, i)
            lo, hi = int(i * share), int((i + per_call) * share)
            trajs += engine.rollout(prompts[lo:hi], banks[lo:hi], sub)
        t_rollout = time.perf_counter() - t0

        host, parts, rstats = rollout_batch(trajs, banks, labels, cfg)
        record = step_record(trajs, parts, labels, rstats)  # over every process's rows
        # optimizer.accum_steps micro-batches per update (optax.MultiSteps applies the update
        # after the last): the learner's activations scale with the micro-batch
        batches, t_ref = [], 0.0
        for mb in micro_batches(host, accum):
            batch = steps.put_batch(mb, rt.mesh)
            t1 = time.perf_counter()
            if ref_params is not None:
                batch["ref_logp"] = reference_logprobs(ref_fn, ref_params, mb, batch, rt)
                jax.block_until_ready(batch["ref_logp"])
            else:
                batch["ref_logp"] = steps.put_batch(  # this process's rows, like the batch's
                    {"ref_logp": np.zeros(mb["tokens"][:, 1:].shape, np.float32)},
                    rt.mesh)["ref_logp"]
            t_ref += time.perf_counter() - t1
            batches.append(batch)

        t2 = time.perf_counter()
        m: dict = {}
        if record["rows_in_update"] > 0:  # the same decision on every process
            if update_fn is None:
                update_fn = steps.step_fn(
                    "grpo", graphdef=rt.graphdef, spec=rt.spec, optimizer=cfg.optimizer,
                    state=state, batch_like=batches[0], mesh=rt.mesh, temperature=temperature,
                    loss=tuple(sorted(losses.grpo_loss_options(g).items())),
                )
            for _ in range(int(g.inner_updates)):
                for batch in batches:
                    state, m = update_fn(state, batch)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
        else:
            # no group carried signal: nothing to learn, but the data position still advances
            state = state.replace(step=state.step + micro_per_step)
        t_update = time.perf_counter() - t2

        record = {
            "step": step,
            **record,
            **{k: m[k] for k in ("loss", "kl", "entropy", "clip_frac", "ratio_mean",
                                 "grad_norm", "skipped", "nonfinite_total") if k in m},
            "time_rollout_s": t_rollout,
            "time_reference_s": t_ref,
            "time_update_s": t_update,
            "time_step_s": time.perf_counter() - t_start,
        }
        history.append(record)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}")
        if logger is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            logger.scalars(step, {f"{tag}/{k}": v for k, v in record.items() if k != "step"})
            logger.text(step, f"{tag}/sample_trace", "\n\n---\n\n".join(trajs[0].assistant_turns))
            chosen = [f for fr in trajs[0].tool_frames for f in fr][:4]
            for j, f in enumerate(chosen):
                logger.image(step, f"{tag}/selected_frame_{j}", banks[0][f - 1])
        done = step + 1
        if stop_after is not None and done - start >= stop_after:
            break
        if ckpt.should_save(done) or done == cfg.steps:
            ckpt.save(done, state, {"data": it.get_state()})
    bar.close()
    ckpt.close()
    rt.params = state.params
    return rt, history
