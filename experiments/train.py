"""Train one stage from an ml-collections config.

    python experiments/train.py --config experiments/configs/sft.py:tiny --workdir /tmp/run \\
        --config.train_data=/data/needle/cot_train.jsonl \\
        --config.tokenizer=/data/needle/tokenizer --config.optimizer.lr=2e-5

`train_data`: a vrthinker_cot JSONL (sft) or a video_pairs JSONL/CSV manifest (rft, grpo), video
paths relative to the file. `tokenizer`: a tokenizer.json (Qwen) or a sentencepiece .model (or a
directory holding one). `init_params`: the previous stage's `<workdir>/params`.
Re-running with the same --workdir resumes from its last checkpoint. Writes TensorBoard events
and metrics.jsonl under <workdir>/tb and the final params under <workdir>/params.

Multi-process (a TPU slice, a GPU cluster): every process runs the same command with
`--coordinator_address HOST:PORT --num_processes N --process_id I`, or `--distributed auto` where
`jax.distributed.initialize()` finds the cluster itself (`vrthinker_jax.distributed`). Each
process reads its own shard of the data; process 0 writes TensorBoard, metrics.jsonl and the
export's files; every process takes part in the orbax checkpoints, params and export weights.
--workdir must be the same shared directory on every process.

A run that learned nothing (SFT: no target token in any step; RFT: no trace accepted; GRPO: no
row in any update) exits 2 with one line and writes no params or export; so do step counts
below 1, an unknown `--config.KEY` and any other bad flag.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from vrthinker_jax import distributed  # noqa: E402 -- after the path insert above

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file[:size]")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, TensorBoard)")
FLAGS = flags.FLAGS
distributed.define_absl_flags(flags)  # --coordinator_address, --num_processes, ...


def run(cfg, workdir: str) -> dict:

    from data_pipelines.tokenizer import load_tokenizer
    from vrthinker_jax.train import runtime, sft

    if cfg.stage not in ("sft", "rft", "grpo"):
        raise ValueError(f"unknown stage {cfg.stage!r} (sft | rft | grpo)")
    runtime.check_run_counts(cfg, cfg.stage)  # before the tokenizer, model and data load
    if not cfg.train_data:
        raise ValueError("set --config.train_data (the stage's training file)")
    if not cfg.tokenizer:
        raise ValueError("set --config.tokenizer (tokenizer.json or sentencepiece .model)")
    if not os.path.exists(cfg.train_data):
        raise ValueError(f"train_data {cfg.train_data}: no such file")
    tokenizer = load_tokenizer(cfg.tokenizer)
    runtime.align_model_config(cfg.model, tokenizer)
    rt = runtime.setup(cfg, tokenizer)
    # shared files come from process 0 alone
    logger = runtime.TrainLogger(os.path.join(workdir, "tb")) if distributed.is_writer() else None
    if logger is not None:
        logger.text(0, "config", "```\n" + cfg.to_json_best_effort(indent=1) + "\n```")
    try:
        if cfg.stage == "sft":
            ds = sft.sft_dataset(cfg, cfg.train_data, tokenizer, rt)
            rt, history = sft.run_sft(cfg, workdir, ds, rt=rt, logger=logger)
            summary = {"steps_run": len(history),
                       "final_loss": history[-1]["loss"] if history else None}
        elif cfg.stage == "rft":
            from vrthinker_jax.train import rft

            rt, stats = rft.run_rft(cfg, workdir, cfg.train_data, tokenizer, rt=rt, logger=logger)
            summary = stats
            if not stats.get("accepted_traces"):
                raise runtime.NothingLearnedError(
                    f"rft: no trace was accepted ({stats['all_correct']} of {stats['rollouts']} "
                    f"rollouts all correct, {stats['prompts_failed_to_load']} prompts failed "
                    "to load): nothing was learned")
        elif cfg.stage == "grpo":
            from vrthinker_jax.train import grpo

            rt, history = grpo.run_grpo(cfg, workdir, cfg.train_data, tokenizer, rt=rt,
                                        logger=logger)
            summary = {"steps_run": len(history),
                       "final_reward": history[-1]["reward"] if history else None}
            # a resumed run that had nothing left to do (history empty) is not re-judged
            if history and not sum(h["rows_in_update"] for h in history):
                raise runtime.NothingLearnedError(
                    f"grpo: none of {len(history)} steps had a row in the update (every "
                    "group's rewards were equal, or every row too long): nothing was learned")
    finally:
        if logger is not None:
            logger.close()
    summary["params"] = runtime.export_params(os.path.join(workdir, "params"), rt.params)
    summary["export"] = export(cfg, os.path.join(workdir, "export"), rt)
    return summary


def export(cfg, directory: str, rt) -> str:
    """A self-contained reward-model directory for `vrthinker_jax.score` / `vrthinker_jax.eval`
    (replacing an earlier one). The weights are an orbax save every process takes part in;
    process 0 then writes the manifest and copies the tokenizer."""
    from vrthinker_jax import checkpoints
    from vrthinker_jax.checkpoints import export as export_lib

    model_dir = os.path.join(os.path.abspath(directory), export_lib.MODEL_DIR)
    if distributed.is_writer() and os.path.exists(model_dir):
        shutil.rmtree(model_dir)  # a re-run's export replaces the last one
    distributed.barrier("export_cleared")
    checkpoints.save_model(rt.model(), model_dir)
    distributed.barrier("export_weights")
    if distributed.is_writer():
        export_lib.export_reward_model(
            directory, model_dir=model_dir, tokenizer_path=cfg.tokenizer,
            protocol_cfg=cfg.protocol, sampling_cfg=cfg.sampling,
            frame_size=tuple(cfg.data.frame_size), info={"stage": cfg.stage}, overwrite=True)
    distributed.barrier("export_written")
    return os.path.abspath(directory)


def _flag_error(e: Exception, argv: list[str]) -> str:
    """One line for a flag error. ml_collections reports an unknown `--config.KEY` as a chain
    of KeyError / AttributeError holding only the key; name the flag it came from."""
    if isinstance(e, (KeyError, AttributeError)):
        hint = re.search(r"Did you mean \S+ instead", str(e))
        while e.__context__ is not None:  # the innermost KeyError holds the bare key
            e = e.__context__
        key = str(e.args[0]) if e.args else "?"
        given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                 and key in a.split("=")[0].split(".")]
        return (f"{given[0] if given else '--config'}: the config has no field {key!r}"
                + (f" ({hint.group(0)[:-len(' instead')]}?)" if hint else ""))
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # a config file's own error, not the parser's wrap
    lines = [x for x in str(e).splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 -- every bad flag is a one-line user error
        print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv
    import json

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO

    try:  # before any JAX computation
        joined = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id, FLAGS.distributed)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        summary = run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary))
    if joined:
        import jax

        jax.distributed.shutdown()  # every process leaves together


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)
