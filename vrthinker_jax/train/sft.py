"""Supervised fine-tuning on traces: stage i (cold start) and the SFT half of stage ii (RFT).

Next-token loss on assistant tokens only (frames, tool responses and the prompt are masked).
Checkpoints every `cfg.ckpt_every` steps with the data iterator's state and the RNG, so a killed
run re-started on the same workdir continues exactly; TensorBoard gets loss, lr, grad norm,
target tokens, skipped (non-finite) steps, failed rows and step time; the console gets a tqdm bar
with ETA.
"""

from __future__ import annotations

import os
import time

import grain
import jax
import numpy as np
from tqdm.auto import tqdm

from vrthinker_jax.rollout import protocol
from vrthinker_jax.train import checkpointing, examples, runtime, steps


def sft_dataset(cfg, traces, tokenizer, rt: runtime.Runtime) -> grain.MapDataset:
    """Batches from vrthinker_cot traces (a JSONL path or records) via the Grain pipeline
    (frames decoded from the traces' videos)."""
    from data_pipelines import grain_pipelines

    pcfg = protocol.ProtocolConfig.from_configdict(cfg.protocol)
    return grain_pipelines.sft_dataset(traces, cfg.data, tokenizer=tokenizer, pcfg=pcfg,
                                       model_cfg=rt.model_cfg)


def _caption_segments(item: dict, pcfg) -> list[protocol.Segment]:
    return protocol.caption_segments([int(f) for f in item["frames"]], item["text"])


class _BankExample(grain.transforms.Map):
    """(trace, bank) -> example; a trace that does not fit or render becomes a weight-0 row.

    to_segments: (record, pcfg) -> conversation segments; None = a vrthinker_cot trace."""

    def __init__(self, tokenizer, pcfg, data_cfg, merged_grid, to_segments=None):
        self.tokenizer, self.pcfg, self.data_cfg, self.merged_grid = (
            tokenizer, pcfg, data_cfg, tuple(merged_grid))
        self.to_segments = to_segments

    def map(self, item):
        trace, bank = item
        kw = dict(pcfg=self.pcfg, seq_len=int(self.data_cfg.seq_len),
                  max_frames=int(self.data_cfg.max_frames), merged_grid=self.merged_grid,
                  synthesis_weight=float(self.data_cfg.get("synthesis_weight", 1.0)))
        try:
            if self.to_segments is None:
                ex = examples.trace_to_example(trace, bank, self.tokenizer, **kw)
            else:
                ex = examples.segments_to_example(self.to_segments(trace, self.pcfg), bank,
                                                  self.tokenizer, **kw)
            ex["failed"] = np.bool_(False)
        except ValueError:
            ex = examples.failed_example(int(self.data_cfg.seq_len),
                                         int(self.data_cfg.max_frames), bank.shape[1:])
            ex["failed"] = np.bool_(True)
        return ex


def in_memory_dataset(cfg, traces: list[dict], banks: list[np.ndarray], tokenizer,
                      rt: runtime.Runtime, *, to_segments=None) -> grain.MapDataset:
    """Batches from traces whose frame banks (uint8 [2N, H, W, 3] each) are already in memory
    (RFT's freshly sampled traces; tests). Shuffled with `data.seed`, repeated forever.
    to_segments: see `_BankExample` (records other than traces, e.g. `caption_dataset`)."""
    if len(traces) != len(banks):
        raise ValueError(f"{len(traces)} traces but {len(banks)} frame banks")
    if not traces:
        raise ValueError("no traces to train on")
    pcfg = protocol.ProtocolConfig.from_configdict(cfg.protocol)
    ds = grain.MapDataset.source(list(zip(traces, banks)))
    if cfg.data.shuffle:
        ds = ds.shuffle(seed=int(cfg.data.seed))
    ds = ds.repeat(None).map(_BankExample(tokenizer, pcfg, cfg.data, rt.merged_grid,
                                          to_segments))
    return ds.batch(int(cfg.data.batch_size), drop_remainder=True, batch_fn=examples.collate)


def frame_text_dataset(cfg, items: list[dict], banks: list[np.ndarray], tokenizer,
                       rt: runtime.Runtime) -> grain.MapDataset:
    """Visual-pretraining batches: a few frames and a text about them per row (`protocol.
    caption_segments`). items: {"id", "frames": 1-based global frame numbers, "text"}; banks:
    each item's pair frame bank (uint8 [2N, H, W, 3]); data.max_frames >= the most frames of
    an item."""
    for it, bank in zip(items, banks, strict=True):
        bad = [g for g in it["frames"] if not 1 <= int(g) <= bank.shape[0]]
        if bad or not it["frames"]:
            raise ValueError(f"pretraining item of {it.get('id')!r}: frames {it['frames']} "
                             f"must be a non-empty subset of 1..{bank.shape[0]}")
    return in_memory_dataset(cfg, items, banks, tokenizer, rt, to_segments=_caption_segments)


def caption_dataset(cfg, captions: list[dict], banks: list[np.ndarray], tokenizer,
                    rt: runtime.Runtime) -> grain.MapDataset:
    """One frame and its caption per row (data.max_frames = 1). captions: per pair {"id",
    "captions": one caption per global frame, in order} (`data_pipelines.synthetic` writes
    them); banks: the pairs' frame banks, in the same order."""
    if len(captions) != len(banks):
        raise ValueError(f"{len(captions)} caption records but {len(banks)} frame banks")
    items, item_banks = [], []
    for rec, bank in zip(captions, banks, strict=True):
        if len(rec["captions"]) != bank.shape[0]:
            raise ValueError(f"captions of {rec.get('id')!r}: {len(rec['captions'])} captions "
                             f"for {bank.shape[0]} frames")
        for g, text in enumerate(rec["captions"], start=1):
            items.append({"id": rec.get("id"), "frames": [g], "text": text})
            item_banks.append(bank)
    return frame_text_dataset(cfg, items, item_banks, tokenizer, rt)


class _RowTally:
    """Rows that failed to build and target tokens trained, over the whole run (resumes
    included: both are saved with each checkpoint), to refuse a run that learned nothing."""

    def __init__(self, tag: str, meta: dict | None = None):
        self.tag = tag
        self.failed_total = int((meta or {}).get("failed_total", 0))
        # None: a checkpoint written before the count existed (cannot be checked)
        self.tokens_total = 0 if meta is None else meta.get("target_tokens_total")
        self.first_errors: list[str] = []

    def batch(self, host: dict, first: bool) -> int:
        """Counts a host batch's failed rows (returned); warns when the first is all failed."""
        failed = int(np.sum(host.get("failed", 0)))
        self.failed_total += failed
        errors = [e for e in host.get("error", []) if e]
        self.first_errors += errors[: max(0, 2 - len(self.first_errors))]
        if failed == len(host["tokens"]) and first:
            print(f"[{self.tag}] warning: every row of the first batch failed to build: "
                  f"{errors[:2]}")
        return failed

    def step(self, metrics: dict) -> None:
        if self.tokens_total is not None:
            self.tokens_total += int(metrics.get("target_tokens", 0))

    def nothing_learned(self, steps_done: int) -> runtime.NothingLearnedError | None:
        if self.tokens_total != 0:
            return None
        return runtime.NothingLearnedError(
            f"{self.tag}: {steps_done} steps without one target token: every row was rejected "
            f"({self.failed_total} failed to build; first errors: "
            f"{self.first_errors or 'none'}); nothing was learned")

    def meta(self) -> dict:
        return {"failed_total": self.failed_total, "target_tokens_total": self.tokens_total}


def run_sft(
    cfg, workdir: str, dataset: grain.MapDataset, *, rt: runtime.Runtime, logger=None,
    stop_after: int | None = None, tag: str = "sft",
) -> tuple[runtime.Runtime, list[dict]]:
    """Trains up to `cfg.steps` micro-steps (resuming from `workdir/checkpoints` if present).

    Args:
      dataset: batches (see examples.py keys), e.g. `sft_dataset` or `in_memory_dataset`.
      rt: the runtime (model, mesh); its params are replaced by the trained ones on return.
        Their buffers are donated to the first step (no second copy of the weights in device
        memory): copy them first (`jax.tree.map(jnp.copy, ...)`) to keep the initial weights.
      stop_after: stop after this many steps of this call without a final save: simulates a
        kill (resume tests).
    Returns:
      (rt, one metrics dict per step run by this call).
    Raises:
      ValueError: for a step count or logging interval below 1.
      runtime.NothingLearnedError: when the run reaches `cfg.steps` without one target token
        (every row rejected: too long, unrenderable, undecodable), before the final save, so
        a re-run cannot skip the check and export the untrained weights.
    """
    runtime.check_run_counts(cfg, tag)
    tx = steps.make_optimizer(cfg.optimizer)
    state = steps.place_state(steps.init_train_state(rt.params, tx, int(cfg.seed)), rt.mesh)
    it = dataset.to_iter_dataset()
    if cfg.data.get("workers", 0) > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg.data.workers)))
    it = iter(it)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      save_every=cfg.ckpt_every, keep=cfg.keep_checkpoints)
    tally = _RowTally(tag)
    restored = ckpt.restore(state)
    if restored is not None:
        state, meta = restored
        it.set_state(meta["data"])
        tally = _RowTally(tag, meta)
    start = int(state.step)
    if logger is not None and start:
        logger.rewind(tag, start)  # the steps after the checkpoint are redone: log them once
    history: list[dict] = []
    fn = None
    bar = tqdm(total=cfg.steps, initial=start, desc=tag, dynamic_ncols=True,
               disable=not cfg.get("progress", True))
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        host = next(it)
        failed = tally.batch(host, first=not history)
        batch = steps.put_batch(host, rt.mesh)
        if fn is None:
            fn = steps.step_fn("sft", graphdef=rt.graphdef, spec=rt.spec,
                               optimizer=cfg.optimizer, state=state, batch_like=batch,
                               mesh=rt.mesh)
        lr = steps.lr_at(cfg.optimizer, int(state.step) - int(state.nonfinite))
        state, m = fn(state, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        tally.step(m)
        dt = time.perf_counter() - t0
        record = {"step": step, **m, "lr": lr, "failed_rows": failed,
                  "failed_rows_total": tally.failed_total, "step_time_s": dt}
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", skipped=int(m["nonfinite_total"]))
        if logger is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            logger.scalars(step, {f"{tag}/{k}": v for k, v in record.items() if k != "step"})
        done = step + 1
        if stop_after is not None and done - start >= stop_after:
            break  # simulated kill: nothing more is written
        error = tally.nothing_learned(done) if done == cfg.steps else None
        if error is not None:  # before the final save, so a re-run checks again
            ckpt.close()
            raise error
        if ckpt.should_save(done) or done == cfg.steps:
            ckpt.save(done, state, {"data": it.get_state(), **tally.meta()})
    bar.close()
    ckpt.close()
    rt.params = state.params
    if tally.failed_total:
        print(f"[{tag}] {tally.failed_total} rows failed to build (see {tag}/failed_rows_total)")
    return rt, history
