"""The training loop of all three stages.

One loop places the train state on the mesh, builds the data iterator with the data config's
knobs (`grain_pipelines.make_iterator`: read threads, prefetch, worker processes), restores the
latest checkpoint (state, data position and the stage's host counters), runs steps with a tqdm
bar, logs to TensorBoard and saves every `cfg.ckpt_every` steps and at the end. What differs
between SFT, RFT's SFT half and GRPO is a `Stage`: how a host batch becomes an update.

A loop step may apply several optimizer micro-steps (GRPO: `inner_updates x accum_steps` per
rollout batch); `Stage.micro_steps` says how many, so a resumed run knows which loop step it is
at from `state.step` alone.
"""

from __future__ import annotations

import os
import time

import grain
from tqdm.auto import tqdm

from vrthinker_jax.train import checkpointing, runtime, steps


class Stage:
    """What one stage does with a host batch. Subclasses override `step`; the other hooks are
    optional.

    Attributes:
      tag: TensorBoard prefix, tqdm label and error prefix ("sft", "grpo", "rft_sft").
      micro_steps: optimizer micro-steps (`state.step` increments) per loop step.
      postfix: the record key shown on the progress bar.
    """

    tag = "train"
    micro_steps = 1
    postfix = "loss"

    def begin(self, state: steps.TrainState) -> None:
        """Called once the state is placed and restored, before the first step."""

    def step(self, state: steps.TrainState, host: dict, step: int
             ) -> tuple[steps.TrainState, dict]:
        """One loop step on this process's host rows; returns (state, JSON-able record)."""
        raise NotImplementedError

    def log(self, logger: runtime.TrainLogger, step: int) -> None:
        """Extra TensorBoard output (text, images) at a logged step."""

    def meta(self) -> dict:
        """Host-side counters saved with each checkpoint (JSON-able)."""
        return {}

    def restore(self, meta: dict) -> None:
        """Takes the counters of `meta()` back from a checkpoint."""

    def check(self, steps_done: int) -> Exception | None:
        """An error to raise before the final save (e.g. nothing was learned), or None."""
        return None


def train(
    cfg, workdir: str, dataset: grain.MapDataset, stage: Stage, *, rt: runtime.Runtime,
    logger: runtime.TrainLogger | None = None, stop_after: int | None = None,
) -> tuple[runtime.Runtime, list[dict]]:
    """Runs `stage` for up to `cfg.steps` loop steps, resuming from `workdir/checkpoints`.

    Args:
      dataset: this process's batches (a Grain MapDataset; each element one host batch).
      rt: the runtime; `rt.params` are donated to the first step (copy them first to keep
        them) and replaced by the trained params on return.
      stop_after: stop after this many steps of this call without a final save (simulates a
        kill, for resume tests).
    Returns:
      (rt, one record per step run by this call).
    Raises:
      ValueError: bad step counts; whatever `stage.check` returns at the last step (before the
        final save, so a re-run checks again).
    """
    from data_pipelines import grain_pipelines

    runtime.check_run_counts(cfg, stage.tag)
    tx = steps.make_optimizer(cfg.optimizer)
    state = steps.place_state(steps.init_train_state(rt.params, tx, int(cfg.seed)), rt.mesh,
                              rt.rules)
    it = grain_pipelines.make_iterator(dataset, cfg.data)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      save_every=cfg.ckpt_every, keep=cfg.keep_checkpoints)
    restored = ckpt.restore(state)
    if restored is not None:
        state, meta = restored
        grain_pipelines.restore_iterator(it, meta.pop("data"))
        stage.restore(meta)
    start = int(state.step) // stage.micro_steps
    stage.begin(state)
    if logger is not None and start:
        logger.rewind(stage.tag, start)  # the steps after the checkpoint are redone: log once
    history: list[dict] = []
    bar = tqdm(total=cfg.steps, initial=start, desc=stage.tag, dynamic_ncols=True,
               disable=not cfg.progress)
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            state, record = stage.step(state, next(it), step)
            record = {"step": step, **record, "step_time_s": time.perf_counter() - t0}
            history.append(record)
            bar.update(1)
            if stage.postfix in record:
                bar.set_postfix({stage.postfix: f"{record[stage.postfix]:.4f}"})
            if logger is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                logger.scalars(step, {f"{stage.tag}/{k}": v for k, v in record.items()
                                      if k != "step"})
                stage.log(logger, step)
            done = step + 1
            if stop_after is not None and done - start >= stop_after:
                break  # simulated kill: nothing more is written
            error = stage.check(done) if done == cfg.steps else None
            if error is not None:
                raise error
            if ckpt.should_save(done) or done == cfg.steps:
                ckpt.save(done, state, {"data": it.get_state(), **stage.meta()})
    finally:
        bar.close()
        ckpt.close()
    rt.params = state.params
    return rt, history
