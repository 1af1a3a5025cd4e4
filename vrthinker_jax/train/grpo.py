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

import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from vrthinker_jax import distributed, sharding
from vrthinker_jax.rollout import protocol, shapes
from vrthinker_jax.train import examples, loop, losses, rewards, rollouts, runtime, steps


def reference_params(rt: runtime.Runtime):
    """The frozen reference: a copy of the initial params on the 'reference' role's mesh (a
    copy even on the learner's mesh, whose buffers each update donates)."""
    mesh = rt.role_mesh("reference")
    if mesh is rt.mesh:
        return jax.tree.map(jnp.copy, rt.params)
    return sharding.shard_state(rt.params, mesh, rt.role_rules("reference"))


def reference_logprobs(ref_fn, ref_params, host: dict, batch: dict, rt: runtime.Runtime):
    """Reference log-probs [b, s - 1] of a micro-batch, computed on the reference mesh and
    returned laid out like the learner's batch (`batch`: `host` already on the learner mesh)."""
    mesh = rt.role_mesh("reference")
    if mesh is rt.mesh:
        return ref_fn(ref_params, batch)
    out = ref_fn(ref_params, steps.put_batch(host, mesh, rt.role_rules("reference")))
    return jax.device_put(out, sharding.batch_sharding(rt.mesh, out.ndim, 0, rt.rules))


def micro_batches(host: dict, n: int) -> list[dict]:
    """Splits a host batch into n equal row slices, in order (rows at `steps.row_dim`)."""
    rows = len(host["weight"])
    if rows % n:
        raise ValueError(f"grpo: {rows} rows (prompts_per_step x group_size) are not divisible "
                         f"by optimizer.accum_steps={n}")
    m = rows // n
    return [{k: np.take(v, np.arange(j * m, (j + 1) * m), axis=steps.row_dim(k))
             for k, v in host.items()} for j in range(n)]


def dimension_accuracy(trajs, labels: list[dict]) -> dict[str, float]:
    """Share of rows whose judgment of each labelled key is right (no answer = wrong)."""
    out = {}
    for k in protocol.LABEL_KEYS:
        hits = [(t.judgments or {}).get(k, -1) == lab[k] for t, lab in zip(trajs, labels)
                if lab[k] >= 0]
        if hits:
            out[k] = float(np.mean(hits))
    return out


def rollout_batch(trajs, banks, labels, cfg, *, failed=None
                  ) -> tuple[dict, list[rewards.RewardParts], dict]:
    """Trajectories -> (host training batch, reward parts per row, rollout statistics).

    Rows that do not fit `data.seq_len` / `data.max_frames` keep their reward (they count in the
    group baseline) but get weight 0 in the update, and are counted; so are the rows of
    prompts whose videos failed to load (`failed`: bool [rows]; their banks are blank).
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
    failed = np.zeros(len(trajs), bool) if failed is None else np.asarray(failed, bool)
    weight[failed] = 0.0
    exs, too_long = [], 0
    seq_len, max_frames = int(cfg.data.seq_len), int(cfg.data.max_frames)
    for i, (t, bank) in enumerate(zip(trajs, banks)):
        try:
            exs.append(examples.from_trajectory(t, bank, seq_len=seq_len, max_frames=max_frames))
        except examples.ExampleTooLong as e:
            too_long += 1
            weight[i] = 0.0
            exs.append(examples.failed_example(seq_len, max_frames, bank.shape[1:],
                                               error=str(e)))
    batch = examples.collate(exs)
    batch["weight"] = weight
    batch["advantages"] = adv
    stats = {
        "rows_too_long": float(too_long),
        "rows_failed_to_load": float(failed.sum()),
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


class GrpoStage(loop.Stage):
    """One GRPO step per prompt batch: rollouts with the current policy, rewards and
    advantages, reference log-probs, `grpo.inner_updates` updates of `optimizer.accum_steps`
    micro-batches each."""

    postfix = "reward"

    def __init__(self, cfg, rt: runtime.Runtime, tokenizer, tag: str = "grpo"):
        g = cfg.grpo
        self.cfg, self.rt, self.tokenizer, self.tag = cfg, rt, tokenizer, tag
        self.group_size = int(g.group_size)
        self.rows = int(g.prompts_per_step) * self.group_size  # global: every process's
        self.per_call = shapes.rows_per_call(cfg)  # the planner sizes the same engine call
        self.accum = max(int(cfg.optimizer.accum_steps), 1)
        if self.rows % self.accum:
            raise ValueError(f"grpo: prompts_per_step x group_size = {self.rows} is not "
                             f"divisible by optimizer.accum_steps={self.accum}")
        self.micro_steps = max(int(g.inner_updates), 1) * self.accum
        # the frozen reference: a copy, since the learner's buffers are donated to each update
        self.ref_params = reference_params(rt) if g.kl_coef else None
        self.temperature = float(cfg.sampling.temperature) or 1.0
        ref_spec = rt.spec.replace(mesh=rt.role_mesh("reference"),
                                   rules=rt.role_rules("reference"))
        self.ref_fn = jax.jit(lambda p, b: steps.sequence_logprobs(
            p, b, graphdef=rt.graphdef, spec=ref_spec, temperature=self.temperature))
        self.update_fn = None
        self.engine = None
        self.last = None  # (trajectories, banks) of the last step, for `log`

    def begin(self, state) -> None:
        self.engine = rollouts.make_engine(self.cfg, self.rt, self.tokenizer,
                                           params=state.params)

    def _rollouts(self, state, host: dict, step: int):
        """This process's prompts x G rollouts, their banks, labels and failed-prompt flags."""
        gs = self.group_size
        prompts = [p for p in host["prompt"] for _ in range(gs)]
        banks = np.repeat(host["bank"], gs, axis=0)
        labels = [rollouts.label_dict(r) for r in np.repeat(host["labels"], gs, axis=0)]
        failed = np.repeat(np.asarray(host["failed"], bool), gs)
        # the rollout key comes from the checkpointed RNG, so a resumed run samples the same
        key = jax.random.fold_in(state.key, step)
        self.engine.update_params(state.params)
        trajs = rollouts.rollout_rows(self.engine, prompts, banks, key, total_rows=self.rows,
                                      per_call=self.per_call)
        return trajs, banks, labels, failed

    def _learner_batches(self, host: dict) -> list[dict]:
        """`accum` micro-batches on the learner mesh, each with its reference log-probs."""
        batches = []
        for mb in micro_batches(host, self.accum):
            batch = steps.put_batch(mb, self.rt.mesh, self.rt.rules)
            if self.ref_params is not None:
                batch["ref_logp"] = reference_logprobs(self.ref_fn, self.ref_params, mb, batch,
                                                       self.rt)
                jax.block_until_ready(batch["ref_logp"])
            else:
                batch["ref_logp"] = steps.put_batch(  # this process's rows, like the batch's
                    {"ref_logp": np.zeros(mb["tokens"][:, 1:].shape, np.float32)},
                    self.rt.mesh, self.rt.rules)["ref_logp"]
            batches.append(batch)
        return batches

    def _update(self, state, batches: list[dict], rows_in_update: float):
        if rows_in_update == 0:  # the same decision on every process
            # no group carried signal: nothing to learn, but the data position still advances
            return state.replace(step=state.step + self.micro_steps), {}
        if self.update_fn is None:
            self.update_fn = steps.step_fn(
                "grpo", graphdef=self.rt.graphdef, spec=self.rt.spec,
                optimizer=self.cfg.optimizer, state=state, batch_like=batches[0],
                mesh=self.rt.mesh, temperature=self.temperature,
                loss=tuple(sorted(losses.grpo_loss_options(self.cfg.grpo).items())))
        m = {}
        for _ in range(self.micro_steps // self.accum):
            for batch in batches:
                state, m = self.update_fn(state, batch)
        return state, {k: float(v) for k, v in jax.device_get(m).items()}

    def step(self, state, host: dict, step: int):
        t0 = time.perf_counter()
        trajs, banks, labels, failed = self._rollouts(state, host, step)
        t1 = time.perf_counter()
        learner_host, parts, rstats = rollout_batch(trajs, banks, labels, self.cfg,
                                                    failed=failed)
        record = step_record(trajs, parts, labels, rstats)  # over every process's rows
        batches = self._learner_batches(learner_host)
        t2 = time.perf_counter()
        state, m = self._update(state, batches, record["rows_in_update"])
        self.last = (trajs, banks)
        return state, {
            **record,
            **{k: m[k] for k in ("loss", "kl", "entropy", "clip_frac", "ratio_mean",
                                 "grad_norm", "skipped", "nonfinite_total") if k in m},
            "time_rollout_s": t1 - t0, "time_reference_s": t2 - t1,
            "time_update_s": time.perf_counter() - t2,
        }

    def log(self, logger, step: int) -> None:
        trajs, banks = self.last
        logger.text(step, f"{self.tag}/sample_trace", "\n\n---\n\n".join(trajs[0].assistant_turns))
        chosen = [f for fr in trajs[0].tool_frames for f in fr][:4]
        for j, f in enumerate(chosen):
            logger.image(step, f"{self.tag}/selected_frame_{j}", banks[0][f - 1])


def run_grpo(
    cfg, workdir: str, pairs, tokenizer, *, rt: runtime.Runtime, logger=None,
    dataset: grain.MapDataset | None = None, stop_after: int | None = None, tag: str = "grpo",
) -> tuple[runtime.Runtime, list[dict]]:
    """Runs up to `cfg.steps` GRPO steps (resuming from `workdir/checkpoints`) through
    `loop.train`.

    Args:
      pairs: a video_pairs manifest path or records (ignored when `dataset` is given).
      rt: the runtime; its params are the initial policy and the frozen reference.
      dataset: prompt batches (e.g. `rollouts.in_memory_prompts`); default: the manifest's
        through `rollouts.prompt_dataset`.
    Returns:
      (rt with the trained params, one record per step run).
    """
    stage = GrpoStage(cfg, rt, tokenizer, tag)  # checks the sizes before any data loads
    if dataset is None:
        dataset = rollouts.prompt_dataset(cfg, pairs, int(cfg.grpo.prompts_per_step))
    return loop.train(cfg, workdir, dataset, stage, rt=rt, logger=logger, stop_after=stop_after)

