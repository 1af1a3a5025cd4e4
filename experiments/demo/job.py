"""The whole demo job: data, tokenizer, pretraining, the baseline, SFT, RFT, GRPO, evaluation
after each, the final model with its tool disabled, the reward-model export, the HTML trace
report and `results.json` (rewritten after every stage, so a stopped run keeps its numbers)."""

from __future__ import annotations

import json
import os
import time
import traceback

from experiments.demo import data as data_lib
from experiments.demo import evaluation, stages


class Timer:
    """Wall and process CPU seconds per named phase."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                timer.wall[name] = timer.wall.get(name, 0.0) + time.perf_counter() - self.w
                timer.cpu[name] = timer.cpu.get(name, 0.0) + time.process_time() - self.c

        return _Phase()


class Job:
    """One run's state between its steps: the results dict, the table of evaluated models, the
    timer, the loggers and the held-out evaluator."""

    def __init__(self, demo, out_dir: str):
        self.demo, self.out_dir = demo, out_dir
        self.timer = Timer()
        self.t_start = time.perf_counter()
        self.table: list[dict] = []
        self.results: dict = {"preset": demo.preset, "out": os.path.abspath(out_dir),
                              "config": demo.to_dict(), "stages": {}}

    def save_partial(self) -> None:
        """results.json after each stage (`complete: false`)."""
        partial = {**self.results, "table": self.table, "complete": False,
                   "time_wall_s": {k: round(v, 1) for k, v in self.timer.wall.items()}}
        with open(os.path.join(self.out_dir, "results.json"), "w") as f:
            json.dump(partial, f, indent=1)

    def evaluate(self, name: str, stage: str, params, pcfg, *, run_name: str = "",
                 **kw) -> dict:
        """A table row: `stage`'s params judged on the held-out pairs (written under
        eval/<run_name or stage>)."""
        with self.timer("eval"):
            row = {"name": name, "stage": stage,
                   **self.evaluator.run(run_name or stage, params, pcfg, **kw)}
        self.table.append(row)
        return row

    def stage_done(self, step: int) -> None:
        """The last table row as TensorBoard scalars at `step` (SFT 0, RFT 1, GRPO 2), and
        results.json so far."""
        self.stage_log.scalars(step, evaluation.stage_scalars(self.table[-1]))
        self.save_partial()

    def tool_stage(self, step: int, stage: str, name: str, failed_name: str, fn, rt):
        """RFT or GRPO: a failed stage is reported in the table and the job goes on with the
        runtime it had."""
        try:
            with self.timer(stage):
                rt, stats = fn(self.demo, self.data, rt, self.out_dir, self.logger)
            self.results["stages"][stage] = stats
            self.evaluate(name, stage, rt.params, self.data.pcfg)
        except Exception as e:  # noqa: BLE001 -- a failed stage is reported, the job goes on
            traceback.print_exc()
            self.results["stages"][stage] = {"error": f"{type(e).__name__}: {e}"}
            self.table.append({"name": failed_name, "stage": stage,
                               "not_run": f"{type(e).__name__}"})
        self.stage_done(step)
        return rt

    def prepare(self):
        """Data, tokenizer, lengths, the tool-using model's runtime and the evaluator; returns
        the runtime."""
        import jax

        from data_pipelines import tokenizer as tok_lib
        from vrthinker_jax.rollout import protocol
        from vrthinker_jax.rollout.sampler import sampling_config
        from vrthinker_jax.train import runtime

        demo, out_dir, res = self.demo, self.out_dir, self.results
        self.pcfg = protocol.ProtocolConfig.from_configdict(demo.protocol)
        with self.timer("data"):
            self.split = split = data_lib.generate(demo, os.path.join(out_dir, "data"), self.pcfg)
        res["data"] = {"dir": os.path.abspath(split.data_dir),
                       "train_ids": sorted(r["id"] for r in split.train_pairs),
                       "heldout_ids": sorted(r["id"] for r in split.heldout),
                       "ties_total": split.ties}
        res["heldout_pairs"] = len(split.heldout)
        print(f"[demo] data: {len(split.train_pairs)} training pairs, {len(split.heldout)} "
              f"held-out pairs ({split.ties} ties in all) in {split.data_dir}", flush=True)
        with self.timer("tokenizer"):
            self.tok_path = data_lib.split_tokenizer(split, self.pcfg,
                                                     os.path.join(out_dir, "tokenizer"),
                                                     int(demo.tokenizer_vocab))
            tok = tok_lib.load_tokenizer(self.tok_path)
        res["lengths"] = lengths = data_lib.stage_lengths(
            demo, tok, self.pcfg, split.train_traces, split.train_pairs + split.heldout)
        self.save_partial()  # a stopped run keeps its config and lengths
        self.data = data_lib.StageData.build(demo, tok, self.pcfg, lengths, split.train_pairs,
                                             split.train_traces, split.banks)
        self.logger = runtime.TrainLogger(os.path.join(out_dir, "tb", "train"))
        self.stage_log = runtime.TrainLogger(os.path.join(out_dir, "tb", "stages"))
        self.sft_cfg = stages.sft_config(demo, tok, seq_len=lengths["seq_len"])
        rt = runtime.setup(self.sft_cfg, tok)
        n_params = sum(int(x.size) for x in jax.tree.leaves(rt.params))
        res["model"] = {"params": n_params, "config": self.sft_cfg.model.to_dict()}
        print(f"[demo] model: {n_params / 1e6:.2f}M parameters; tokenizer vocab "
              f"{tok.vocab_size}; rows of {lengths['seq_len']} tokens", flush=True)
        self.evaluator = evaluation.Evaluator(
            demo, tok, rt, split.heldout, split.banks, out_dir,
            sampling_config(temperature=0.0, **self.data.sampling))
        return rt

    def export(self, rt, final_stage: str) -> str:
        """The final model as a reward-model export (score / eval --checkpoint read it)."""
        from vrthinker_jax.checkpoints import export as export_lib
        from vrthinker_jax.rollout.sampler import sampling_config

        with self.timer("export"):
            return export_lib.export_reward_model(
                os.path.join(self.out_dir, "export"), model=rt.model(rt.params),
                tokenizer_path=self.tok_path, protocol_cfg=self.data.proto,
                sampling_cfg=sampling_config(temperature=0.0, **self.data.sampling),
                frame_size=tuple(self.demo.frame_size),
                info={"source": "experiments.demo", "demo_preset": self.demo.preset,
                      "stage": final_stage})

    def finish(self, final_stage: str, export_dir: str) -> dict:
        """The HTML trace report, the paths and times; writes the complete results.json."""
        from vrthinker_jax.eval import html_report

        out_dir, res = self.out_dir, self.results
        html_path = os.path.join(out_dir, "trace_report.html")
        rows = self.evaluator.rows[final_stage][: int(self.demo.eval.html_examples)]
        banks = self.split.banks

        def frame_loader(row, frames):
            return [banks[row["id"]][f - 1] for f in frames]

        html_report.write_html_report(
            rows, html_path, frame_loader,
            title=f"VR-Thinker demo: held-out judgments ({final_stage})")
        self.logger.close()
        self.stage_log.close()
        res["table"] = self.table
        res["paths"] = {
            "results_json": os.path.abspath(os.path.join(out_dir, "results.json")),
            "tensorboard": os.path.abspath(os.path.join(out_dir, "tb")),
            "html_report": os.path.abspath(html_path),
            "predictions": os.path.abspath(os.path.join(out_dir, "eval")),
            "export": export_dir,
        }
        self.timer.wall["total"] = time.perf_counter() - self.t_start
        res["time_wall_s"] = {k: round(v, 1) for k, v in self.timer.wall.items()}
        res["time_cpu_s"] = {k: round(v, 1) for k, v in self.timer.cpu.items()}
        res["complete"] = True
        with open(res["paths"]["results_json"], "w") as f:
            json.dump(res, f, indent=1)
        return res


def run(demo, out_dir: str) -> dict:
    """Runs the whole job; returns the results dict (also written to out_dir/results.json)."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    os.makedirs(out_dir, exist_ok=True)
    job = Job(demo, out_dir)
    rt = job.prepare()
    with job.timer("pretrain"):
        rt, pre = stages.pretrain_stages(demo, job.split, job.data, rt, out_dir, job.logger)
    job.results["stages"].update(pre)
    with job.timer("baseline"):
        brt, bpcfg, job.results["stages"]["baseline_sft"] = stages.baseline_stage(
            demo, job.data, rt, job.split.data_dir, out_dir, job.logger)
    base = job.evaluate("initial frames only (max_turns=1)", "baseline", brt.params, bpcfg,
                        run_name="initial_frames_only")
    del brt
    with job.timer("sft"):
        rt, job.results["stages"]["sft"] = stages.sft_stage(demo, job.data, job.sft_cfg, rt,
                                                            out_dir, job.logger)
    job.evaluate("after SFT (tools on)", "sft", rt.params, job.pcfg)
    job.stage_done(0)
    rt = job.tool_stage(1, "rft", "after RFT (tools on)", "after RFT", stages.rft_stage, rt)
    if job.table[-1]["stage"] == "rft" and not job.table[-1].get("not_run") and not (
            job.results["stages"]["rft"].get("accepted_traces")):
        job.table[-1]["name"] += " [0 traces accepted: RFT's SFT skipped]"
    rt = job.tool_stage(2, "grpo", "after GRPO = final (tools on)", "after GRPO",
                        stages.grpo_stage, rt)
    final = next(t for t in reversed(job.table) if not t.get("not_run"))
    # the final model with its tool disabled (same prompt, every call refused)
    job.evaluate("final, tool disabled", "final_tool_disabled", rt.params, job.pcfg,
                 tools_enabled=False)
    export_dir = job.export(rt, final["stage"])
    job.results["gain"] = evaluation.gain(final, base, float(demo.goal_points))
    return job.finish(final["stage"], export_dir)
