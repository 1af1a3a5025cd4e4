"""Train one stage from an ml-collections config.

    python experiments/train.py --config experiments/configs/sft.py:tiny --workdir /tmp/run \\
        --config.train_data=/data/needle/cot_train.jsonl \\
        --config.tokenizer=/data/needle/tokenizer --config.optimizer.lr=2e-5

`train_data`: a vrthinker_cot JSONL (sft) or a video_pairs JSONL/CSV manifest (rft, grpo), video
paths relative to the file. `tokenizer`: a tokenizer.json (Qwen) or a sentencepiece .model (or a
directory holding one). `init_params`: the previous stage's `<workdir>/params`.
Re-running with the same --workdir resumes from its last checkpoint. Writes TensorBoard events
and metrics.jsonl under <workdir>/tb and the final params under <workdir>/params.

A run that learned nothing (SFT: no target token in any step; RFT: no trace accepted; GRPO: no
row in any update) exits 2 with one line and writes no params or export; so do step counts
below 1, an unknown `--config.KEY` and any other bad flag.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file[:size]")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, TensorBoard)")


def run(cfg, workdir: str) -> dict:
    from data_pipelines.tokenizer import load_tokenizer
    from vrthinker_jax.checkpoints import export as export_lib
    from vrthinker_jax.rollout.sampler import sampling_config
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
    logger = runtime.TrainLogger(os.path.join(workdir, "tb"))
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
        logger.close()
    summary["params"] = runtime.export_params(os.path.join(workdir, "params"), rt.params)
    # a self-contained reward-model directory for `vrthinker_jax.score` / `vrthinker_jax.eval`
    summary["export"] = export_lib.export_reward_model(
        os.path.join(workdir, "export"), model=rt.model(), tokenizer_path=cfg.tokenizer,
        protocol_cfg=cfg.protocol, sampling_cfg=cfg.get("sampling") or sampling_config(),
        frame_size=tuple(cfg.data.frame_size), info={"stage": cfg.stage}, overwrite=True)
    return summary


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

    try:
        summary = run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)
