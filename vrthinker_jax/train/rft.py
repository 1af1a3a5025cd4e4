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

from data_pipelines import grain_pipelines
from vrthinker_jax import distributed
from vrthinker_jax.rollout import protocol, shapes
from vrthinker_jax.train import rewards, rollouts, runtime, sft

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


def _accepted(cfg, pcfg, batch: dict, rows: list[int], trajs, records_by_id: dict):
    """(local index, trace) of this process's all-correct, renderable rollouts of a batch,
    and the counts (all correct, unrenderable)."""
    out, n_correct, n_unrenderable = [], 0, 0
    for j, (r, traj) in enumerate(zip(rows, trajs)):
        labels = rollouts.label_dict(batch["labels"][r])
        if not rewards.all_correct(traj.judgments, labels):
            continue
        n_correct += 1
        rid = batch["id"][r]
        record = dict(records_by_id.get(rid, {}))
        record.update(id=rid, prompt=batch["prompt"][r], labels=labels)
        trace = trajectory_to_trace(traj, record, pcfg)
        try:
            protocol.trace_segments(trace, pcfg)
        except ValueError:
            n_unrenderable += 1
            continue
        out.append((j, trace))
    return out, n_correct, n_unrenderable


def sample_accepted(
    cfg, rt: runtime.Runtime, dataset: grain.MapDataset, tokenizer, *, num_batches: int,
    records_by_id: dict | None = None, out_path: str | None = None,
) -> tuple[list[dict], list[np.ndarray] | None, dict]:
    """K rollouts per prompt of `num_batches` prompt batches; keeps the all-correct ones.

    In a run of several processes each rolls out its shard of every batch; the accepted traces
    of all processes are gathered in global row order (the order one process would find them),
    so every process ends with the same traces and process 0 writes them to `out_path`.
    Returns (accepted traces, their frame banks (one process only; None with several: the
    banks stay where they were decoded), stats with the acceptance rate over all processes).
    """
    pcfg = protocol.ProtocolConfig.from_configdict(cfg.protocol)
    engine = rollouts.make_engine(cfg, rt, tokenizer)
    k = int(cfg.samples_per_prompt)
    key = jax.random.key(int(cfg.seed) + 1)
    it = grain_pipelines.make_iterator(dataset, cfg.data)
    one_process = jax.process_count() == 1
    traces: list[dict] = []
    banks: list[np.ndarray] = []
    seen: set[str] = set()
    counts = dict.fromkeys(("prompts", "prompts_failed_to_load", "rollouts", "all_correct",
                            "unrenderable"), 0)
    for b in tqdm(range(num_batches), desc="rft sampling", disable=not cfg.progress):
        batch = next(it)
        failed = np.asarray(batch["failed"], bool)
        counts["prompts_failed_to_load"] += int(failed.sum())
        counts["prompts"] += int((~failed).sum())
        # every row is rolled out (a failed prompt's on its blank bank), so each process holds
        # the same number of rows; only the loaded prompts' rollouts count
        rows = [i for i in range(len(batch["prompt"])) for _ in range(k)]
        row_banks = np.asarray(batch["bank"])[rows]
        trajs = engine.rollout([batch["prompt"][i] for i in rows], row_banks,
                               jax.random.fold_in(key, b))
        kept = [j for j, r in enumerate(rows) if not failed[r]]
        counts["rollouts"] += len(kept)
        local, n_correct, n_unrenderable = _accepted(
            cfg, pcfg, batch, [rows[j] for j in kept], [trajs[j] for j in kept],
            records_by_id or {})
        local = [(kept[j], trace) for j, trace in local]  # indices into row_banks
        counts["all_correct"] += n_correct
        counts["unrenderable"] += n_unrenderable
        gathered = distributed.allgather_json([t for _, t in local])
        for found in gathered:
            for n, trace in enumerate(found):
                if cfg.one_trace_per_pair and trace["id"] in seen:
                    continue
                seen.add(trace["id"])
                traces.append(trace)
                if one_process:
                    banks.append(row_banks[local[n][0]])
    counts = {n: int(v) for n, v in distributed.sum_over_processes(counts).items()}
    if out_path and distributed.is_writer():
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            for t in traces:
                f.write(json.dumps(t) + "\n")
    distributed.barrier("rft_traces_written")
    stats = {
        **counts,
        "acceptance_rate": counts["all_correct"] / max(1, counts["rollouts"]),
        "accepted_traces": len(traces),
        "pairs_with_accepted_trace": len(seen) / max(1, counts["prompts"]),
    }
    return traces, (banks if one_process else None), stats


def run_rft(
    cfg, workdir: str, pairs, tokenizer, *, rt: runtime.Runtime, logger=None,
    dataset: grain.MapDataset | None = None,
) -> tuple[runtime.Runtime, dict]:
    """Samples, filters, writes `<workdir>/rft_traces.jsonl`, then SFTs on the accepted traces
    (checkpoints under `<workdir>/sft`). Returns (rt, stats incl. the SFT's final loss).

    pairs: a video_pairs manifest or records with video paths; the SFT half then reads the
    written traces like any SFT data (videos decoded again, each process its shard). With a
    `dataset` of prompts whose frame banks are in memory (records without videos: the demo,
    tests), it trains on those banks instead, as one process.
    """
    runtime.check_run_counts(cfg, "rft")
    per_batch = shapes.rft_prompts_per_call(cfg)  # the planner sizes the same engine call
    records_by_id = {}
    if dataset is None:
        records = grain_pipelines.read_records(pairs) if isinstance(pairs, str) else list(pairs)
        records_by_id = {r["id"]: r for r in records}
        dataset = rollouts.prompt_dataset(cfg, records, per_batch, shuffle=False)
        num_pairs = len(records)
    elif jax.process_count() > 1:
        raise ValueError("rft: an in-memory prompt dataset runs as one process; give the "
                         "video_pairs manifest (pairs) to run on several")
    else:
        num_pairs = int(cfg.max_prompts)
    num_batches = max(1, min(int(cfg.max_prompts), num_pairs) // per_batch)
    out_path = os.path.join(workdir, "rft_traces.jsonl")
    traces, banks, stats = sample_accepted(
        cfg, rt, dataset, tokenizer, num_batches=num_batches, records_by_id=records_by_id,
        out_path=out_path)
    print(f"[rft] {stats['all_correct']} of {stats['rollouts']} rollouts all correct "
          f"(acceptance {100 * stats['acceptance_rate']:.1f}%); training on "
          f"{stats['accepted_traces']} traces")
    if logger is not None:
        logger.rewind("rft", 0)  # a re-run samples again: one record of the sampling
        logger.scalars(0, {f"rft/{k}": v for k, v in stats.items()})
    if not traces:
        print("[rft] no trace was accepted: the SFT half of stage ii is skipped")
        return rt, stats
    if records_by_id:
        ds = sft.sft_dataset(cfg, out_path, tokenizer, rt)
    else:
        ds = sft.in_memory_dataset(cfg, traces, banks, tokenizer, rt)
    rt, history = sft.run_sft(cfg, os.path.join(workdir, "sft"), ds, rt=rt, logger=logger,
                              tag="rft_sft")
    stats["sft_steps"] = len(history)
    stats["sft_final_loss"] = history[-1]["loss"] if history else None
    return rt, stats
