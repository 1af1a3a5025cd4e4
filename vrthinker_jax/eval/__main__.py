"""Benchmark evaluation CLI.

    python -m vrthinker_jax.eval --benchmark {videogen_rewardbench,genai_bench_video,
        mjbench_video,video_pairs} (--checkpoint DIR | --predictions FILE) --out DIR
        [--subset N --seed S] [--data-dir DIR] [--length-buckets 0,4,8,16] [--failed-as-wrong]
        [--html-examples K] [--batch-size B --mesh data=-1 --temperature T --no-tools]

--predictions FILE rescores a saved predictions file with no model: writes OUT/metrics.json,
TensorBoard events under OUT/tb (metrics + run config as hparams), OUT/traces.html (the first K
traces; frames listed by number since no videos are loaded) and prints the table with counts.
--subset N keeps a fixed, seeded subset of N ids stratified by the OA label
(OUT/subset_ids.txt lists them).

--checkpoint DIR --data-dir RELEASE_DIR runs the model: DIR is a reward-model export
(`vrthinker_jax.checkpoints.export`: weights, tokenizer, and the protocol / sampling / frame size
the model was trained with). The benchmark is read through its TFDS builder, batches of pairs are
rolled out greedily (--temperature) over the data axis of a mesh of all devices with a progress
bar, predictions are written incrementally to OUT/predictions.jsonl (a re-run resumes; a corrupt
or missing video becomes a failed row with its reason), and the same reports follow, with the
frames the model chose embedded in traces.html. OUT/run_manifest.json records what made the rows:
the export's content hash, the release directory and a hash of its annotation files, and the
settings that change predictions (temperature, sampling seed, tools, split); every row's
meta.run says the same. A re-run with another model, data or setting refuses in one line naming
the difference (--overwrite starts over). The TFDS build is keyed by the release directory and
its content, so a changed --data-dir is built afresh.

Multi-process (a TPU slice, a GPU cluster): every process runs the same command with
`--coordinator_address HOST:PORT --num_processes N --process_id I` (or `--distributed auto`,
`vrthinker_jax.distributed`); the batch is split over every process's devices, each decodes only
its own rows' videos, and process 0 writes OUT (which must be reachable by process 0; the TFDS
build directory must be shared by all).

Errors (missing file, malformed line, bad option) print one line `eval: error: ...` to stderr
and exit with status 2; Ctrl-C prints how many rows are written and exits with status 130.
"""

from __future__ import annotations

import argparse
import os
import sys

from vrthinker_jax import distributed
from vrthinker_jax.cli import CliError, OneLineParser
from vrthinker_jax.eval import html_report, tb
from vrthinker_jax.eval import metrics as metrics_lib
from vrthinker_jax.eval import predictions as preds_lib
from vrthinker_jax.eval import report as report_lib

PROG = "python -m vrthinker_jax.eval"


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", required=True, choices=preds_lib.BENCHMARKS)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory of a trained model")
    src.add_argument("--predictions", help="a saved predictions JSONL file to rescore")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data-dir", default=None, help="benchmark release directory (--checkpoint)")
    p.add_argument("--split", default=None, help="benchmark split (default: test, ...)")
    p.add_argument(
        "--builder-config", default=None,
        help="TFDS builder config, e.g. paths_bothbad_excluded for genai_bench_video",
    )
    p.add_argument(
        "--tfds-dir", default=None, help="where the benchmark's TFDS dataset is built (OUT/tfds)"
    )
    p.add_argument("--subset", type=int, default=None, help="score N ids (stratified by OA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --subset draw")
    p.add_argument(
        "--length-buckets", default=None,
        help="comma-separated bucket edges in seconds (default: metrics_config's)",
    )
    p.add_argument(
        "--failed-as-wrong", action="store_true",
        help="count failed examples as wrong instead of leaving them out of the accuracies",
    )
    p.add_argument(
        "--overwrite", action="store_true",
        help="(--checkpoint) start over: delete OUT's predictions of an earlier run first",
    )
    p.add_argument(
        "--retry-failed", action="store_true",
        help="(--checkpoint) re-run examples whose earlier row failed instead of skipping them",
    )
    p.add_argument(
        "--batch-size", type=int, default=None,
        help="(--checkpoint) pairs per rollout batch, a multiple of the device count "
        "(default: one per device)",
    )
    p.add_argument(
        "--mesh", default="data=-1",
        help="(--checkpoint) device mesh, e.g. data=-1 (default: batch over every device, "
        "params replicated) or data=2,fsdp=4 (params sharded too)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0,
        help="(--checkpoint) sampling temperature; 0 = greedy (reproducible judgments)",
    )
    p.add_argument(
        "--no-tools", action="store_true",
        help="(--checkpoint) answer every select_frames call with 'tool use is disabled'",
    )
    p.add_argument("--html-examples", type=int, default=20, help="traces in traces.html (0: none)")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    distributed.add_arguments(p)
    return p


def _edges(text: str | None):
    if text is None:
        return None
    try:
        edges = tuple(float(x) for x in text.split(",") if x.strip())
        metrics_lib.bucket_names(edges)
    except ValueError as e:
        raise CliError(f"--length-buckets {text!r}: {e}") from None
    return edges


def _metrics_cfg(args):
    cfg = metrics_lib.metrics_config(failed_as_wrong=args.failed_as_wrong)
    edges = _edges(args.length_buckets)
    if edges is not None:
        cfg.length_bucket_edges_s = edges
    return cfg


def _run_config(args, cfg, manifest: dict | None = None) -> dict:
    manifest = manifest or {}
    return {
        "benchmark": args.benchmark,
        "source": os.path.abspath(args.predictions or args.checkpoint),
        "mode": "predictions" if args.predictions else "checkpoint",
        "subset": -1 if args.subset is None else args.subset,
        "seed": args.seed,
        "length_bucket_edges_s": list(cfg.length_bucket_edges_s),
        "failed_as_wrong": bool(cfg.failed_as_wrong),
        "split": args.split or "",
        "builder_config": args.builder_config or "",
        "temperature": float(getattr(args, "temperature", 0.0)) if args.checkpoint else 0.0,
        "tools_enabled": not getattr(args, "no_tools", False),
        "mesh": getattr(args, "mesh", "") if args.checkpoint else "",
        "batch_size": getattr(args, "batch_size", None) or -1,
        "model_id": preds_lib._get(manifest, "model.id") or "",
        "data_dir": preds_lib._get(manifest, "data.dir") or "",
        "data_annotations": preds_lib._get(manifest, "data.annotations") or "",
    }


def subset_rows(rows: list[dict], n: int, seed: int) -> tuple[list[dict], list[str]]:
    """The seeded OA-stratified subset of (deduplicated) rows, and the chosen ids."""
    ids = [r["id"] for r in rows]
    strata = [r["label"].get("OA", -1) for r in rows]
    chosen = metrics_lib.stratified_subset(ids, strata, n, seed)
    keep = set(chosen)
    return [r for r in rows if r["id"] in keep], chosen


def _finish(args, report: dict, rows: list[dict], run_config: dict, frame_loader=None) -> None:
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.json")
    report_lib.write_metrics_json(report, metrics_path)
    tb_dir = tb.log_eval(os.path.join(args.out, "tb"), report, run_config)
    html_path = None
    if args.html_examples > 0 and rows:
        html_path = html_report.write_html_report(
            rows[: args.html_examples], os.path.join(args.out, "traces.html"),
            title=f"{args.benchmark} traces", frame_loader=frame_loader,
        )
    if not args.quiet:
        print(report_lib.format_table(report))
        print(f"\nmetrics: {metrics_path}\ntensorboard: {tb_dir}")
        if html_path:
            print(f"traces: {html_path}")


def rescore(args) -> int:
    cfg = _metrics_cfg(args)
    try:
        read = preds_lib.read_predictions(args.predictions, benchmark=args.benchmark)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    except preds_lib.PredictionFormatError as e:
        raise CliError(str(e)) from None
    if read.truncated_last_line:
        print(
            f"eval: warning: {args.predictions}: last line is truncated (an interrupted write); "
            "ignored", file=sys.stderr,
        )
    rows, duplicates = metrics_lib.dedupe_rows(read.rows)
    not_in_subset = 0
    if args.subset is not None:
        if args.subset < 0:
            raise CliError(f"--subset must be >= 0, got {args.subset}")
        kept, chosen = subset_rows(rows, args.subset, args.seed)
        not_in_subset = len(rows) - len(kept)
        rows = kept
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "subset_ids.txt"), "w") as f:
            f.write("".join(i + "\n" for i in chosen))
    m = metrics_lib.evaluate_rows(rows, cfg)
    skipped = m["counts"]["skipped"]
    skipped["duplicate_id"] = duplicates
    skipped["not_in_subset"] = not_in_subset
    skipped["truncated_line"] = int(read.truncated_last_line)
    m["counts"]["rows"] = len(read.rows)
    m["counts"]["unique_ids"] = len(read.rows) - duplicates
    try:  # a predictions file written by `eval --checkpoint` says what made it
        manifest = preds_lib.read_run_manifest(preds_lib.manifest_path(args.predictions))
    except preds_lib.PredictionFormatError:
        manifest = None
    run_config = _run_config(args, cfg, manifest)
    report = report_lib.build_report(
        m, benchmark=args.benchmark, source=args.predictions, run_config=run_config
    )
    _finish(args, report, rows, run_config)
    return 0


def _parse_mesh(text: str) -> dict[str, int]:
    """'data=-1' / 'data=2,fsdp=4' -> {'data': -1} / {'data': 2, 'fsdp': 4}."""
    from vrthinker_jax import sharding

    out = {}
    for part in text.split(","):
        name, sep, size = part.partition("=")
        name = name.strip()
        try:
            value = int(size)
        except ValueError:
            value = None
        if not sep or name not in sharding.MESH_AXES or value is None:
            raise CliError(f"--mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE] with AXIS in "
                           f"{sharding.MESH_AXES} (one size may be -1: the remaining devices)")
        out[name] = value
    return out


def _mesh_and_batch(batch_size: int | None, mesh_text: str = "data=-1"):
    """The device mesh (None on one device) and the global batch: `batch_size` (a multiple of
    the batch axes' size, data x fsdp) or one pair per slot of the batch axes. The default mesh
    puts every device on the data axis (params replicated); a model too large for one device's
    memory needs fsdp (or tensor) > 1."""
    import jax

    from vrthinker_jax import sharding

    axes = _parse_mesh(mesh_text)
    mesh = None
    if jax.device_count() > 1:
        try:
            mesh = sharding.make_mesh(axes)
        except ValueError as e:
            raise CliError(f"--mesh {mesh_text!r}: {e}") from None
    multiple = sharding.batch_size_multiple(mesh) if mesh is not None else 1
    if batch_size is None:
        return mesh, multiple
    if batch_size < 1 or batch_size % multiple:
        raise CliError(f"--batch-size {batch_size}: must be a positive multiple of the "
                       f"{multiple} devices of the batch axes (data x fsdp)")
    return mesh, batch_size


def load_engine(args):
    """Builds the model side from --checkpoint (a reward-model export,
    `vrthinker_jax.checkpoints.export`): returns (rollout, load_bank, batch_size,
    initial_frames, placement) for `runner.make_predict_batch`.

    rollout(prompts, banks, step) -> trajectories, greedy unless --temperature, rng folded from
    --seed and the batch counter; banks are split over the batch axes of the --mesh (default:
    every device on the data axis).
    load_bank(example) -> uint8 [2N, H, W, 3] from the example's embedded video bytes or paths;
    a corrupt or missing video raises BankError (a ValueError naming the file), which the runner
    turns into that example's failed row.
    placement: `make_predict_batch`'s rows_here / blank_bank in a multi-process run, else {}.
    """
    import jax
    import numpy as np

    from vrthinker_jax.checkpoints import export

    try:
        rm = export.load_reward_model(args.checkpoint)
    except (export.CheckpointError, ValueError, FileNotFoundError) as e:
        raise CliError(f"--checkpoint {e}") from None
    if rm.preset is not None and args.no_tools:
        raise CliError(f"--no-tools: {args.checkpoint} runs preset {rm.preset.name}, whose "
                       "protocol has no tools-off mode")
    if rm.preset is not None and jax.process_count() > 1:
        raise CliError(f"--checkpoint {args.checkpoint}: a preset export runs on one device; "
                       "run it as one process")
    if rm.preset is not None:  # a preset export runs on one device for now
        mesh, batch_size = None, args.batch_size or 4
        if batch_size < 1:
            raise CliError(f"--batch-size {batch_size}: must be positive")
    else:
        mesh, batch_size = _mesh_and_batch(args.batch_size, args.mesh)
    try:
        engine = rm.engine(mesh=mesh, temperature=args.temperature)
    except ValueError as e:
        raise CliError(f"--checkpoint {args.checkpoint}: {e}") from None
    key = jax.random.key(args.seed)
    tools_enabled = not args.no_tools

    def rollout(prompts, banks, step):
        return engine.rollout(prompts, banks, jax.random.fold_in(key, step),
                              tools_enabled=tools_enabled)

    def load_bank(ex):
        srcs = [ex.get(f"{k}_bytes") or ex[k] for k in ("video_a", "video_b")]
        return rm.load_bank(*srcs)

    placement = {}
    if jax.process_count() > 1:  # each process rolls out (and decodes) its rows of a batch
        placement = dict(
            rows_here=lambda total: distributed.rows_held(mesh, total),
            blank_bank=np.zeros((rm.protocol.total_frames, *rm.frame_size, 3), np.uint8))
    return rollout, load_bank, batch_size, rm.initial_frames, placement


def model_identity(checkpoint: str) -> str:
    """The export's content hash (`export.content_hash`); CliError when it is not an export."""
    from vrthinker_jax.checkpoints import export

    try:
        return export.content_hash(checkpoint)
    except (export.CheckpointError, OSError) as e:
        raise CliError(f"--checkpoint {e}") from None


def run_manifest(args, model_id: str, fingerprint: dict) -> dict:
    """What makes this run's rows what they are (see predictions.RESUME_KEYS)."""
    return {
        "benchmark": args.benchmark,
        "model": {"checkpoint": os.path.abspath(args.checkpoint), "id": model_id},
        "data": {**fingerprint, "split": args.split or "",
                 "builder_config": args.builder_config or ""},
        # the seed only draws samples when the temperature is above 0
        "settings": {"temperature": float(args.temperature), "tools_enabled": not args.no_tools,
                     "sampling_seed": args.seed if args.temperature > 0 else None},
    }


def claim_out_dir(args, predictions_path: str, manifest: dict) -> None:
    """Writes OUT's run manifest, first refusing to add rows to predictions that another model,
    data or setting made (--overwrite deletes them instead)."""
    mpath = preds_lib.manifest_path(predictions_path)
    has_rows = os.path.exists(predictions_path) and os.path.getsize(predictions_path) > 0
    if args.overwrite:
        for path in (predictions_path, mpath):
            if os.path.exists(path):
                os.remove(path)
    elif has_rows:
        try:
            old = preds_lib.read_run_manifest(mpath)
        except preds_lib.PredictionFormatError as e:
            raise CliError(f"{e}; pass --overwrite to start over") from None
        if old is None:
            raise CliError(f"--out {args.out}: predictions.jsonl has no {preds_lib.MANIFEST_FILE} "
                           "saying which model and data made its rows; pass --overwrite to "
                           "start over or choose another --out")
        diffs = preds_lib.manifest_differences(old, manifest)
        if diffs:
            raise CliError(f"--out {args.out} holds predictions of another run: "
                           + "; ".join(diffs) + "; pass --overwrite to start over or choose "
                           "another --out")
    preds_lib.write_run_manifest(mpath, manifest)


def _check_model_args(args) -> None:
    if not os.path.isdir(args.checkpoint):
        raise CliError(f"--checkpoint {args.checkpoint}: no such directory")
    if args.data_dir is None:
        raise CliError("--checkpoint needs --data-dir (the benchmark's release directory)")
    if not os.path.isdir(args.data_dir):
        raise CliError(f"--data-dir {args.data_dir}: no such directory")
    if not os.listdir(args.data_dir):
        raise CliError(f"--data-dir {args.data_dir}: the directory is empty (expected the "
                       f"{args.benchmark} release: its annotation files and videos)")
    if args.subset is not None and args.subset < 0:
        raise CliError(f"--subset must be >= 0, got {args.subset}")


def model_eval(args) -> int:
    """--checkpoint: benchmark examples -> rollout engine -> predictions.jsonl -> reports."""
    from data_pipelines import tfds_builders
    from vrthinker_jax.eval import runner

    _check_model_args(args)
    cfg = _metrics_cfg(args)
    predictions_path = os.path.join(args.out, "predictions.jsonl")
    # identities first: a refused resume costs no model load
    fingerprint = tfds_builders.source_fingerprint(args.data_dir)
    manifest = run_manifest(args, model_identity(args.checkpoint), fingerprint)
    # process 0 owns OUT; its refusal stops every process
    _on_process_0(lambda: claim_out_dir(args, predictions_path, manifest))
    rollout, load_bank, batch_size, initial_frames, placement = load_engine(args)
    tfds_dir = args.tfds_dir or os.path.join(args.out, "tfds")
    if args.quiet:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()  # TFDS's build bars on stderr

    def read_examples():
        try:
            return runner.benchmark_examples(
                args.benchmark, args.data_dir, tfds_dir=tfds_dir, split=args.split,
                config=args.builder_config, fingerprint=fingerprint,
            )
        except (ValueError, OSError) as e:
            raise CliError(f"--data-dir {args.data_dir}: {e}") from None

    # process 0 builds the TFDS dataset; the others then read the built one
    examples = _on_process_0(read_examples)
    if not distributed.is_writer():
        examples = read_examples()
    if args.subset is not None:
        ids = [ex["id"] for ex in examples]
        strata = [runner.example_label(ex)["OA"] for ex in examples]
        keep = set(metrics_lib.stratified_subset(ids, strata, args.subset, args.seed))
        examples = [ex for ex in examples if ex["id"] in keep]
        if distributed.is_writer():
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "subset_ids.txt"), "w") as f:
                f.write("".join(i + "\n" for i in sorted(keep)))
    predict_batch = runner.make_predict_batch(
        rollout, load_bank, batch_size=batch_size, benchmark=args.benchmark,
        initial_frames=initial_frames, **placement,
    )
    run_config = _run_config(args, cfg, manifest)
    row_meta = {"run": {"model_id": manifest["model"]["id"], **manifest["settings"]}}
    before = _rows_in(predictions_path)
    try:
        report = runner.run_model_eval(
            examples, predict_batch, predictions_path=predictions_path,
            benchmark=args.benchmark, batch_size=batch_size, metrics_cfg=cfg,
            progress=not args.quiet, run_config=run_config, retry_failed=args.retry_failed,
            row_meta=row_meta,
        )
    except preds_lib.PredictionFormatError as e:  # an unreadable file from an earlier run
        raise CliError(str(e)) from None
    except KeyboardInterrupt:
        n = _rows_in(predictions_path)
        raise Stopped(f"stopped, {n} rows written to {predictions_path} ({n - before} by this "
                      "run); re-run the same command to resume") from None
    if report is None:  # not process 0: it writes the reports
        return 0
    by_id = {ex["id"]: ex for ex in examples}
    rows, _ = metrics_lib.dedupe_rows(
        r for r in preds_lib.read_predictions(predictions_path).rows if r["id"] in by_id
    )

    def frame_loader(row, frames):  # re-decodes the pair for the trace report
        bank = load_bank(by_id[row["id"]])
        return [bank[f - 1] for f in frames]

    _finish(args, report, rows, run_config, frame_loader=frame_loader)
    return 0


def _on_process_0(fn):
    """fn() on process 0 (the one that writes OUT); its CliError is raised on every process,
    so a refusal stops the run everywhere. Returns fn's result on process 0, None elsewhere."""
    result, error = None, None
    if distributed.is_writer():
        try:
            result = fn()
        except CliError as e:
            error = str(e)
    error = distributed.from_process_0(error)
    if error:
        raise CliError(error)
    return result


class Stopped(Exception):
    """Ctrl-C: the message says what is kept (exit status 130, no traceback)."""


def _rows_in(path: str) -> int:
    try:
        return len(preds_lib.read_predictions(path).rows)
    except (FileNotFoundError, preds_lib.PredictionFormatError):
        return 0


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        distributed.initialize_from_args(args, CliError)  # before any JAX computation
        if args.predictions:  # no model: process 0 rescores, the others have nothing to do
            return rescore(args) if distributed.is_writer() else 0
        return model_eval(args)
    except CliError as e:
        print("eval: error: " + " ".join(str(e).split("\n")), file=sys.stderr)  # one line
        return 2
    except Stopped as e:
        print(f"eval: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before any row was written (loading, building the dataset)
        print("eval: stopped before this run wrote a prediction; re-run the same command to "
              "resume", file=sys.stderr)
        return 130
    except OSError as e:  # unwritable --out and the like
        print(f"eval: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
