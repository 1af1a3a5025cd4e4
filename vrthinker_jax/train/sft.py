"""Supervised fine-tuning on traces: stage i (cold start) and the SFT half of stage ii (RFT).

Next-token loss on assistant tokens only (frames, tool responses and the prompt are masked).
Checkpoints every `cfg.ckpt_every` steps with the data iterator's state and the RNG, so a killed
run re-started on the same workdir continues exactly; TensorBoard gets loss, lr, grad norm,
target tokens, skipped (non-finite) steps, failed rows and step time; the console gets a tqdm bar
with ETA.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from vrthinker_jax.rollout import protocol
from vrthinker_jax.train import examples, loop, runtime, steps


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
    """(record, bank uint8 [2N, H, W, 3]) -> row (`examples.bank_example`: the builder of the
    on-disk pipeline's rows too); a record that does not render, fit or find its frames
    becomes a failed row (weight 0) with its status, error and id, counted by the loop.

    to_segments: (record, pcfg) -> conversation segments; None = a vrthinker_cot trace."""

    def __init__(self, tokenizer, pcfg, data_cfg, merged_grid, to_segments=None):
        self.tokenizer, self.pcfg, self.to_segments = tokenizer, pcfg, to_segments
        self.kw = dict(seq_len=int(data_cfg.seq_len), max_frames=int(data_cfg.max_frames),
                       merged_grid=tuple(merged_grid),
                       synthesis_weight=float(data_cfg.synthesis_weight))

    def map(self, item):
        record, bank = item
        return examples.bank_example(record, bank, self.tokenizer, pcfg=self.pcfg,
                                     to_segments=self.to_segments, **self.kw)


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


class SftStage(loop.Stage):
    """Next-token loss on a batch's assistant tokens. Counts rows that failed to build and
    target tokens trained over the whole run (resumes included: both are saved with each
    checkpoint), to refuse a run that learned nothing."""

    postfix = "loss"

    def __init__(self, cfg, rt: runtime.Runtime, tag: str = "sft"):
        self.cfg, self.rt, self.tag = cfg, rt, tag
        self.failed_total = 0
        self.tokens_total: int | None = 0  # None: restored from a checkpoint without the count
        self.first_errors: list[str] = []
        self.fn = None

    def restore(self, meta: dict) -> None:
        self.failed_total = int(meta.get("failed_total", 0))
        self.tokens_total = meta.get("target_tokens_total")

    def meta(self) -> dict:
        return {"failed_total": self.failed_total, "target_tokens_total": self.tokens_total}

    def _count_failed(self, host: dict) -> int:
        failed = int(np.sum(host["failed"]))
        self.failed_total += failed
        errors = [e for e in host["error"] if e]
        self.first_errors += errors[: max(0, 2 - len(self.first_errors))]
        if failed == len(host["tokens"]) and self.fn is None:
            print(f"[{self.tag}] warning: every row of the first batch failed to build: "
                  f"{errors[:2]}")
        return failed

    def step(self, state, host: dict, step: int):
        failed = self._count_failed(host)
        batch = steps.put_batch(host, self.rt.mesh, self.rt.rules)
        if self.fn is None:
            self.fn = steps.step_fn("sft", graphdef=self.rt.graphdef, spec=self.rt.spec,
                                    optimizer=self.cfg.optimizer, state=state,
                                    batch_like=batch, mesh=self.rt.mesh)
        lr = steps.lr_at(self.cfg.optimizer, int(state.step) - int(state.nonfinite))
        state, m = self.fn(state, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if self.tokens_total is not None:
            self.tokens_total += int(m["target_tokens"])
        return state, {**m, "lr": lr, "failed_rows": failed,
                       "failed_rows_total": self.failed_total}

    def check(self, steps_done: int) -> Exception | None:
        if self.tokens_total != 0:
            return None
        return runtime.NothingLearnedError(
            f"{self.tag}: {steps_done} steps without one target token: every row was rejected "
            f"({self.failed_total} failed to build; first errors: "
            f"{self.first_errors or 'none'}); nothing was learned")


def run_sft(
    cfg, workdir: str, dataset: grain.MapDataset, *, rt: runtime.Runtime, logger=None,
    stop_after: int | None = None, tag: str = "sft",
) -> tuple[runtime.Runtime, list[dict]]:
    """Trains up to `cfg.steps` micro-steps (resuming from `workdir/checkpoints` if present)
    through `loop.train`.

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
    stage = SftStage(cfg, rt, tag)
    rt, history = loop.train(cfg, workdir, dataset, stage, rt=rt, logger=logger,
                             stop_after=stop_after)
    if stage.failed_total:
        print(f"[{tag}] {stage.failed_total} rows failed to build (see {tag}/failed_rows_total)")
    return rt, history
