"""Model-driven evaluation loop: examples -> predict_batch -> predictions file -> metrics.

`run_model_eval` knows nothing about the model: it takes any `predict_batch(examples) -> rows`
callable (the rollout engine wrapped by the CLI, or a fake in tests). It

* resumes: ids already in the predictions file are not predicted again (but are scored);
* writes each row as soon as its batch returns (append + flush), so a killed run keeps its work;
* never loses an example: one whose loader already failed (`example["error"]`, e.g. a corrupt
  video), or whose prediction raised, becomes a row with `error` set, counted under
  counts.failed with its reason;
* shows a tqdm progress bar, then scores the rows of this run's examples.

Sharding is predict_batch's business: it gets at most `batch_size` examples and pads to its own
static batch (a multiple of the data-axis size) itself.

In a run of P processes every process walks the same examples and calls predict_batch on the
same batches (each rolls out the rows its devices hold, `make_predict_batch(rows_here=...)`, and
gets every row back); process 0 alone reads the resume state and writes the file and the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from vrthinker_jax import distributed
from vrthinker_jax.eval import metrics as metrics_lib
from vrthinker_jax.eval import predictions as preds_lib
from vrthinker_jax.eval import report as report_lib
from vrthinker_jax.rollout import protocol

PredictBatch = Callable[[list[dict]], Sequence[dict]]


def example_label(ex: dict) -> dict[str, int]:
    """Labels of an example: `label` / `labels` dict, or top-level TA/MQ/VQ/OA (manifest rows)."""
    src = ex.get("label") or ex.get("labels")
    if src is None:
        src = {k: ex[k] for k in protocol.LABEL_KEYS if k in ex}
    return {k: int(src.get(k, -1)) for k in protocol.LABEL_KEYS}


def _complete_row(ex: dict, result: dict, benchmark: str) -> dict:
    """A predict_batch result (possibly partial) -> a full row carrying the example's label/meta."""
    if not isinstance(result, dict):
        raise TypeError(f"predict_batch returned {type(result).__name__} for {ex['id']!r}")
    if result.get("id") not in (None, ex["id"]):
        raise ValueError(
            f"predict_batch returned row {result.get('id')!r} in the place of {ex['id']!r} "
            "(rows must come back in the order of the examples)"
        )
    row = preds_lib.make_row(
        ex["id"], benchmark,
        pred=result.get("pred"),
        label=result.get("label") or example_label(ex),
        trace=result.get("trace"),
        frames_selected=result.get("frames_selected"),
        error=result.get("error") or None,
        meta={**(ex.get("meta") or {}), **(result.get("meta") or {})},
        scores=result.get("scores"),
        prompt=result.get("prompt", ex.get("prompt")),
    )
    return row


def _failed(ex: dict, benchmark: str, reason: str) -> dict:
    return preds_lib.failed_row(
        ex["id"], benchmark, reason, label=example_label(ex), meta=ex.get("meta"),
        prompt=ex.get("prompt"),
    )


def _predict_isolating(batch: list[dict], predict_batch: PredictBatch, benchmark: str):
    """Rows for `batch`; if the batch call raises, retries one by one so a single bad example
    fails alone (its row says why) and the others still get predictions."""
    try:
        results = list(predict_batch(batch))
    except Exception as e:  # noqa: BLE001 -- any failure of one example must not stop the run
        if len(batch) == 1:
            return [_failed(batch[0], benchmark, f"predict_batch raised {type(e).__name__}: {e}")]
        out = []
        for ex in batch:
            out += _predict_isolating([ex], predict_batch, benchmark)
        return out
    if len(results) != len(batch):
        raise ValueError(
            f"predict_batch returned {len(results)} rows for {len(batch)} examples"
        )
    return [_complete_row(ex, r, benchmark) for ex, r in zip(batch, results)]


@dataclasses.dataclass
class RunStats:
    evaluated_now: int = 0  # rows written by this call (including failed ones)
    failed_now: int = 0
    resumed: int = 0  # examples skipped because their id was already in the file
    partial_line_dropped: bool = False  # the file ended in a half-written row (re-done)


def run_model_eval(
    examples: Iterable[dict],
    predict_batch: PredictBatch,
    *,
    predictions_path: str,
    benchmark: str,
    batch_size: int = 8,
    metrics_cfg=None,
    retry_failed: bool = False,
    progress: bool = True,
    run_config: dict | None = None,
    row_meta: dict | None = None,
) -> dict:
    """Predicts every example not yet in `predictions_path`, then scores this run's examples.

    examples: dicts with "id" (unique str), labels ("label"/"labels" dict or top-level keys),
      optional "prompt", "meta" and "error" (set by a loader that could not decode a video).
    predict_batch: list of <= batch_size examples -> one row (or partial row: pred, trace,
      frames_selected, scores, error, meta) per example, in order.
    retry_failed: re-run ids whose earlier row has an error (the new row wins when scoring).
    row_meta: added to every written row's meta (failed ones too), e.g. the model's id and the
      sampling settings, so each row says what made it.
    Returns the report (report.build_report) with counts["run"] describing this call; None on
    processes other than 0 of a multi-process run (they write nothing).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    writes = distributed.is_writer()
    done = _resume_ids(predictions_path, retry_failed=retry_failed, writes=writes)
    stats = RunStats()
    seen: set[str] = set()  # ids of this run's examples, done or not: the ones scored
    total = len(examples) if hasattr(examples, "__len__") else None
    bar = tqdm(total=total, desc=f"eval {benchmark}", disable=not (progress and writes),
               unit="ex")
    opened = (preds_lib.PredictionWriter(predictions_path) if writes
              else contextlib.nullcontext())
    with opened as writer:
        stats.partial_line_dropped = bool(writes and writer.dropped_partial_line)
        for batch in _batches(_pending(examples, done, seen, stats, bar), batch_size):
            for row in _batch_rows(batch, predict_batch, benchmark):
                row["meta"].update(row_meta or {})
                if writes:
                    writer.write(row)
                stats.evaluated_now += 1
                stats.failed_now += bool(row["error"])
            bar.update(len(batch))
    bar.close()
    if not writes:
        return None
    return _score_run(predictions_path, seen, stats, benchmark=benchmark,
                      metrics_cfg=metrics_cfg, run_config=run_config)


def _resume_ids(predictions_path: str, *, retry_failed: bool, writes: bool) -> set[str]:
    """Ids already in the predictions file (failed ones too unless `retry_failed`).

    Every process skips the same ids (process 0's reading of the file, broadcast): all must
    call predict_batch on the same batches, since the rollout is one program over all of them.
    """
    return set(distributed.from_process_0(
        sorted(preds_lib.done_ids(predictions_path, include_failed=not retry_failed))
        if writes else None))


def _pending(examples: Iterable[dict], done: set[str], seen: set[str], stats: RunStats,
             bar) -> Iterator[dict]:
    """The examples still to predict, lazily (a bad id fails only when the walk reaches it).

    Checks each id is a non-empty str seen once, adds it to `seen`; an id in `done` is skipped
    and counted in stats.resumed (and on the progress bar).
    """
    for ex in examples:
        ex_id = ex.get("id")
        if not isinstance(ex_id, str) or not ex_id:
            raise ValueError(f"example without a string 'id': {str(ex)[:200]}")
        if ex_id in seen:
            raise ValueError(f"duplicate example id {ex_id!r}")
        seen.add(ex_id)
        if ex_id in done:
            stats.resumed += 1
            bar.update(1)
            continue
        yield ex


def _batches(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive lists of `size` items (the last may be shorter). Each batch is yielded as
    soon as it fills, before the next item is drawn, so its rows are written before a later
    example can fail the walk."""
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _batch_rows(batch: list[dict], predict_batch: PredictBatch, benchmark: str) -> list[dict]:
    """Rows of one batch: a failed row for each example whose loader already failed (corrupt /
    missing video; the model never sees it), then predict_batch's rows for the others."""
    rows = [_failed(ex, benchmark, str(ex["error"])) for ex in batch if ex.get("error")]
    todo = [ex for ex in batch if not ex.get("error")]
    if todo:
        rows += _predict_isolating(todo, predict_batch, benchmark)
    return rows


def _score_run(predictions_path: str, seen: set[str], stats: RunStats, *, benchmark: str,
               metrics_cfg, run_config: dict | None) -> dict:
    """The report over the file's rows of this run's examples (`seen`); rows of other ids in
    the file are counted under counts.skipped.not_in_this_run, this call under counts.run."""
    read = preds_lib.read_predictions(predictions_path)
    rows = [r for r in read.rows if r["id"] in seen]
    other = len({r["id"] for r in read.rows} - seen)
    m = metrics_lib.evaluate_rows(rows, metrics_cfg)
    m["counts"]["skipped"]["not_in_this_run"] = other
    m["counts"]["run"] = dataclasses.asdict(stats)
    return report_lib.build_report(
        m, benchmark=benchmark, source=predictions_path, run_config=run_config
    )


def row_from_trajectory(ex: dict, traj, benchmark: str) -> dict:
    """A rollout trajectory (duck-typed: `assistant_turns`, `tool_frames`, `judgments`, `stop`,
    optional `frames`) -> a prediction row. frames_selected[i] is what turn i's call returned."""
    turns = list(traj.assistant_turns)
    frames = [list(f) for f in traj.tool_frames]
    # the call count is stored: frames_selected is padded to the turn count and cannot tell a
    # failed call (no frames) from a final turn
    meta = {**(ex.get("meta") or {}), "stop": getattr(traj, "stop", None),
            "tool_calls": len(frames)}
    return preds_lib.make_row(
        ex["id"], benchmark,
        pred=traj.judgments or {},
        label=example_label(ex),
        trace=turns,
        frames_selected=frames[: len(turns)],
        meta=meta,
        prompt=ex.get("prompt"),
    )


def make_predict_batch(
    rollout: Callable[[list[str], np.ndarray, int], Sequence],
    load_bank: Callable[[dict], np.ndarray],
    *,
    batch_size: int,
    benchmark: str,
    initial_frames: Sequence[int] | None = None,
    rows_here: Callable[[int], Sequence[int]] | None = None,
    blank_bank: np.ndarray | None = None,
) -> PredictBatch:
    """Wraps a rollout engine as `predict_batch` for `run_model_eval`.

    rollout(prompts, banks, step) -> one trajectory per row: prompts list[str], banks uint8
      [rows, 2N, H, W, 3] (a list of [2N, H, W, 3] when the rows differ in frame size: a preset
      export), step a counter the caller folds into its rng; rows = `batch_size`, or this
      process's share of it (`rows_here`). Trajectories are duck-typed as in
      `row_from_trajectory`.
    load_bank(example) -> uint8 [2N, H, W, 3]; raises ValueError / OSError naming the file for a
      corrupt or missing video, which becomes that example's error row (the others still run).
    rows_here(batch_size) -> the batch positions this process rolls out (a multi-process run:
      `distributed.rows_held`); None = all. Each process then loads only its examples' videos
      and the rows come back to every process (`distributed.allgather_json`).
    blank_bank: uint8 [2N, H, W, 3] filler for a process none of whose rows of a batch loaded.
    Unused rows are filled with copies of the last good pair (static shapes for the compiled
    engine; their results are dropped). `initial_frames` (global numbers) is stored in each
    row's meta for the HTML report.
    """
    steps = itertools.count()

    def predict_batch(examples: list[dict]) -> list[dict]:
        if len(examples) > batch_size:
            raise ValueError(f"{len(examples)} examples for a batch of {batch_size}")
        mine = list(range(batch_size)) if rows_here is None else list(rows_here(batch_size))
        out: list[dict | None] = [None] * len(examples)
        good, banks = [], []
        for i in (i for i in mine if i < len(examples)):
            try:
                banks.append(np.asarray(load_bank(examples[i])))
                good.append(i)
            except (ValueError, OSError) as e:
                out[i] = {"error": str(e) or type(e).__name__}
        # the rollout is one compiled program over every process's rows: all run it or none
        if good if rows_here is None else distributed.any_process(bool(good)):
            _rollout_rows(examples, good, banks, len(mine), rollout, next(steps), out,
                          blank_bank, benchmark, initial_frames)
        if rows_here is not None:  # every process gets every row
            for part in distributed.allgather_json({str(i): out[i] for i in mine
                                                    if i < len(examples)}):
                for i, row in part.items():
                    out[int(i)] = row
        return out

    return predict_batch


def _rollout_rows(examples, good, banks, rows, rollout, step, out, blank_bank, benchmark,
                  initial_frames) -> None:
    """Rolls out `rows` rows: the `good` examples (with their `banks`) first, then fillers;
    writes the good examples' rows into `out`."""
    pad = rows - len(good)
    prompts = [examples[i].get("prompt", "") for i in good]
    if not good and blank_bank is None:
        raise ValueError("make_predict_batch: a process with no row of a batch needs blank_bank")
    prompts += [prompts[-1] if prompts else ""] * pad
    padded = banks + [banks[-1] if banks else blank_bank] * pad
    # one array when the rows' frames share a shape (always for a bank); a preset's
    # candidates keep each video's own size, so rows may differ
    same = all(b.shape == padded[0].shape for b in padded)
    trajs = list(rollout(prompts, np.stack(padded) if same else padded, step))
    if len(trajs) < len(good):
        raise ValueError(f"rollout returned {len(trajs)} rows for {len(good)} pairs")
    for i, traj in zip(good, trajs):
        row = row_from_trajectory(examples[i], traj, benchmark)
        if initial_frames is not None:
            row["meta"]["initial_frames"] = [int(f) for f in initial_frames]
        out[i] = row


SPLIT_PREFERENCE = ("test", "test_v1", "validation", "val", "dev", "train")


def benchmark_examples(
    benchmark: str, manual_dir: str, *, tfds_dir: str, split: str | None = None, config=None,
    fingerprint: dict | None = None,
) -> list[dict]:
    """Examples of a benchmark release directory, via its TFDS builder (built on first use
    into a folder of `tfds_dir` keyed by the directory and its content,
    `tfds_builders.cache_dir`, then reused; a changed release is built afresh). `fingerprint`:
    `tfds_builders.source_fingerprint(manual_dir)` when the caller has it.

    Each example is `data_pipelines.schema.decode`'s record (id, prompt, video_a, video_b,
    labels, meta, ...). An example whose video files the builder could not find
    (meta["missing_videos"]) gets `error` set, so the runner writes it as a failed row instead of
    calling the model. `split` defaults to the first of SPLIT_PREFERENCE that exists.
    """
    from data_pipelines import schema, tfds_builders

    fingerprint = fingerprint or tfds_builders.source_fingerprint(manual_dir)
    builder = tfds_builders.build(benchmark, manual_dir=manual_dir, config=config,
                                  data_dir=tfds_builders.cache_dir(tfds_dir, fingerprint))
    splits = list(builder.info.splits.keys())
    if split is None:
        split = next((s for s in SPLIT_PREFERENCE if s in splits), None)
        if split is None:
            raise ValueError(f"{manual_dir}: no split among {SPLIT_PREFERENCE}; found {splits}")
    elif split not in splits:
        raise ValueError(f"{manual_dir}: {benchmark} has no split {split!r}; found {splits}")
    source = builder.as_data_source(split=split)
    out = []
    for i in range(len(source)):
        ex = schema.decode(source[i])
        missing = ex["meta"].get("missing_videos")
        if missing:
            ex["error"] = "missing video files: " + ", ".join(map(str, missing))
        out.append(ex)
    return out
