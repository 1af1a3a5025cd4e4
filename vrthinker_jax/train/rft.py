"""Stage ii: rejection-sampling fine-tuning.

Sample K rollouts per training pair from the current (cold-start) model, keep the trajectories
whose every labelled judgment (TA, MQ, VQ and OA) is right and that re-render under the protocol,
write them as a `vrthinker_cot` JSONL (the TFDS `vrthinker_cot` builder turns it into
array_record), report the acceptance rate, and run SFT on them.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import numpy as np
from tqdm.auto import tqdm

from vrthinker_jax.rollout import protocol
from vrthinker_jax.train import grpo, rewards, runtime, sft

_TURN_ENDS = (protocol.IM_END, "<|endoftext|>")


def trajectory_to_trace(traj, record: dict, pcfg: protocol.ProtocolConfig) -> dict:
    """A finished trajectory as a vrthinker_cot trace (the SFT format).

    The final turn's end token is dropped from its text: `protocol.trace_segments` appends it
    as its own trainable segment.
    """
    turns = []
    for i, text in enumerate(traj.assistant_turns):
        for end in _TURN_ENDS:
            if text.endswith(end):
                text = text[: -len(end)]
        turns.append({"role": "assistant", "content": text})
        if i < traj.tool_calls:
            turns.append({"role": "tool", "frames": [int(f) for f in traj.tool_frames[i]]})
    return {
        "id": record["id"],
        "prompt": record["prompt"],
        "video_a": record.get("video_a", ""),
        "video_b": record.get("video_b", ""),
        "labels": {k: int(v) for k, v in record["labels"].items()},
        "num_candidates": pcfg.num_candidates,
        "turns": turns,
    }


def sample_accepted(
    cfg, rt: runtime.Runtime, dataset: grain.MapDataset, tokenizer, *, num_batches: int,
    records_by_id: dict | None = None, out_path: str | None = None,
) -> tuple[list[dict], list[np.ndarray], dict]:
    """K rollouts per prompt of `num_batches` prompt batches; keeps the all-correct ones.

    Returns (accepted traces, their frame banks, stats with the acceptance rate).
    """
    pcfg = protocol.ProtocolConfig.from_configdict(cfg.protocol)
    engine = grpo.make_engine(cfg, rt, tokenizer)
    k = int(cfg.samples_per_prompt)
    key = jax.random.key(int(cfg.seed) + 1)
    it = iter(dataset.to_iter_dataset())
    traces: list[dict] = []
    banks: list[np.ndarray] = []
    seen: set[str] = set()
    n_rollouts = n_correct = n_unrenderable = n_prompts = n_failed = 0
    for b in tqdm(range(num_batches), desc="rft sampling", disable=not cfg.get("progress", True)):
        batch = next(it)
        ok = [i for i, f in enumerate(np.asarray(batch["failed"])) if not f]
        n_failed += len(batch["prompt"]) - len(ok)
        if not ok:
            continue
        n_prompts += len(ok)
        rows = [i for i in ok for _ in range(k)]
        row_banks = np.asarray(batch["bank"])[rows]
        trajs = engine.rollout([batch["prompt"][i] for i in rows], row_banks,
                               jax.random.fold_in(key, b))
        n_rollouts += len(trajs)
        for r, traj, bank in zip(rows, trajs, row_banks):
            labels = grpo.label_dict(batch["labels"][r])
            if not rewards.all_correct(traj.judgments, labels):
                continue
            n_correct += 1
            rid = batch["id"][r]
            if cfg.get("one_trace_per_pair", True) and rid in seen:
                continue
            record = dict((records_by_id or {}).get(rid, {}))
            record.update(id=rid, prompt=batch["prompt"][r], labels=labels)
            trace = trajectory_to_trace(traj, record, pcfg)
            try:
                protocol.trace_segments(trace, pcfg)
            except ValueError:
                n_unrenderable += 1
                continue
            seen.add(rid)
            traces.append(trace)
            banks.append(bank)
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            for t in traces:
                f.write(json.dumps(t) + "\n")
    stats = {
        "prompts": n_prompts,
        "prompts_failed_to_load": n_failed,
        "rollouts": n_rollouts,
        "all_correct": n_correct,
        "acceptance_rate": n_correct / max(1, n_rollouts),
        "accepted_traces": len(traces),
        "unrenderable": n_unrenderable,
        "pairs_with_accepted_trace": len(seen) / max(1, n_prompts),
    }
    return traces, banks, stats


def run_rft(
    cfg, workdir: str, pairs, tokenizer, *, rt: runtime.Runtime, logger=None,
    dataset: grain.MapDataset | None = None,
) -> tuple[runtime.Runtime, dict]:
    """Samples, filters, writes `<workdir>/rft_traces.jsonl`, then SFTs on the accepted traces
    (checkpoints under `<workdir>/sft`). Returns (rt, stats incl. the SFT's final loss)."""
    runtime.check_run_counts(cfg, "rft")
    per_batch = max(1, int(cfg.data.batch_size) // int(cfg.samples_per_prompt))
    records_by_id = {}
    if dataset is None:
        from data_pipelines import grain_pipelines

        records = grain_pipelines.read_records(pairs) if isinstance(pairs, str) else list(pairs)
        records_by_id = {r["id"]: r for r in records}
        prompts_cfg = cfg.copy_and_resolve_references()
        prompts_cfg.data.shuffle = False
        dataset = grpo.prompt_dataset(prompts_cfg, records, per_batch)
        num_pairs = len(records)
    else:
        num_pairs = int(cfg.max_prompts)
    num_batches = max(1, min(int(cfg.max_prompts), num_pairs) // per_batch)
    traces, banks, stats = sample_accepted(
        cfg, rt, dataset, tokenizer, num_batches=num_batches, records_by_id=records_by_id,
        out_path=os.path.join(workdir, "rft_traces.jsonl"),
    )
    print(f"[rft] {stats['all_correct']} of {stats['rollouts']} rollouts all correct "
          f"(acceptance {100 * stats['acceptance_rate']:.1f}%); training on "
          f"{stats['accepted_traces']} traces")
    if logger is not None:
        logger.rewind("rft", 0)  # a re-run samples again: one record of the sampling
        logger.scalars(0, {f"rft/{k}": v for k, v in stats.items()})
    if not traces:
        print("[rft] no trace was accepted: the SFT half of stage ii is skipped")
        return rt, stats
    ds = sft.in_memory_dataset(cfg, traces, banks, tokenizer, rt)
    rt, history = sft.run_sft(cfg, os.path.join(workdir, "sft"), ds, rt=rt, logger=logger,
                              tag="rft_sft")
    stats["sft_steps"] = len(history)
    stats["sft_final_loss"] = history[-1]["loss"] if history else None
    return rt, stats
