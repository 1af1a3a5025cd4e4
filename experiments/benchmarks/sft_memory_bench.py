"""Peak host memory of an SFT run at 448 px frames, before and after issue 18's fix.

Before the fix every stage built its data iterator with a bare `dataset.to_iter_dataset()`, so
Grain's default ReadOptions ran (16 threads, a prefetch buffer of 500 batches) whatever the data
config said; now `train/loop.py: train` calls `grain_pipelines.make_iterator(dataset, cfg.data)`,
which honours `data.read_threads` and `data.prefetch_batches`.

The benchmark writes synthetic needle pairs (real mp4s, `data_pipelines.synthetic.generate`) and
their sentencepiece tokenizer, then runs the same real SFT run twice (`train.sft.sft_dataset` ->
`train.sft.run_sft`: the tiny model of `experiments/configs/sft.py:tiny` on one device, frames
decoded through Grain and resized to `data.frame_size` = 448 x 448, `data.seq_len` /
`data.max_frames` set from a scan of the traces so that every row fits), each in its own
subprocess so that peak RSS is per run:

  after:  the code as it is (the config's read_threads / prefetch_batches);
  before: `grain_pipelines.make_iterator` replaced in that subprocess by the old
          `lambda ds, cfg: iter(ds.to_iter_dataset())`.

Peak RSS is the child's `ru_maxrss` (from `os.wait4`) and the parent's sampled VmRSS. A child
past `--rss-cap-gib` is killed (then its peak is a lower bound and `*_capped` is true) so the
benchmark cannot take the machine's memory; `peak_rss_mib_after_same_wall` is then the fair
comparison (the 'after' run's peak over as many seconds), and `step_s_before` is null if it was
killed before its second step. Step times are medians without step 0 (it compiles). Prints one
JSON line.

    .venv/bin/python experiments/benchmarks/sft_memory_bench.py --steps 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ("before", "after")
MIB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8,
                   help="SFT steps per run; the 'before' run needs enough of them for Grain's "
                        "prefetch to fill (it fills while the first step compiles and runs)")
    p.add_argument("--batch-size", type=int, default=2, help="data.batch_size (rows per step)")
    p.add_argument("--frame-size", type=int, default=448,
                   help="data.frame_size side in pixels (a multiple of patch x merge = 28)")
    p.add_argument("--pairs", type=int, default=16, help="synthetic needle pairs to generate")
    p.add_argument("--video-size", type=int, default=64,
                   help="side of the synthetic mp4s (pixels); frames are resized to --frame-size")
    p.add_argument("--seq-round", type=int, default=256,
                   help="data.seq_len = the longest trace's tokens rounded up to this multiple")
    p.add_argument("--rss-cap-gib", type=float, default=6.0,
                   help="kill a run whose RSS passes this (its peak is then a lower bound)")
    p.add_argument("--run-timeout-s", type=float, default=1200.0,
                   help="kill a run that takes longer than this")
    p.add_argument("--sample-s", type=float, default=0.2, help="RSS sampling interval (s)")
    p.add_argument("--out", default="", help="work directory (default: a temporary one)")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)  # the child's run settings (JSON file)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- parent


def prepare(args, out: str) -> dict:
    """Synthetic data + tokenizer under `out`, and the run settings both children share."""
    from data_pipelines import grain_pipelines as gp
    from data_pipelines import synthetic
    from data_pipelines import tokenizer as tok_lib
    from experiments.configs import sft as sft_config
    from vrthinker_jax.rollout import protocol
    from vrthinker_jax.train import runtime

    data_dir = os.path.join(out, "data")
    info = synthetic.generate(data_dir, args.pairs, seed=0, cfg=synthetic.synthetic_config(
        heldout_fraction=0.0, size=args.video_size))
    tok_path = tok_lib.train_sentencepiece(synthetic.read_corpus(info["paths"]["corpus"]),
                                           os.path.join(data_dir, "tokenizer"), 500)
    cfg = sft_config.get_config("tiny")
    tok = tok_lib.load_tokenizer(tok_path)
    runtime.align_model_config(cfg.model, tok)
    size = (args.frame_size, args.frame_size)
    grid = gp.merged_grid(cfg.model, size)
    pcfg = protocol.ProtocolConfig.from_configdict(cfg.protocol)
    traces = info["paths"]["cot_train"]
    scan = gp.scan_traces(gp.read_records(traces), tok, pcfg, grid, seq_len=sys.maxsize,
                          max_frames=sys.maxsize)
    seq_len = -(-scan.max_tokens // args.seq_round) * args.seq_round
    return {"traces": traces, "tokenizer": tok_path, "frame_size": list(size),
            "tokens_per_frame": grid[0] * grid[1], "seq_len": seq_len,
            "max_frames": scan.max_frames, "batch_size": args.batch_size, "steps": args.steps,
            "trace_count": scan.total, "longest_trace_tokens": scan.max_tokens}


def vm_rss(pid: int) -> int:
    """Resident set size of `pid` in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_child(args, mode: str, plan_path: str, out: str) -> dict:
    """One SFT run in a subprocess, its RSS sampled; killed past the cap or the timeout."""
    run_dir = os.path.join(out, mode)
    os.makedirs(run_dir, exist_ok=True)
    log = open(os.path.join(run_dir, "child.log"), "w")  # noqa: SIM115
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--plan", plan_path,
           "--out", run_dir]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    cap = int(args.rss_cap_gib * (1 << 30))
    sampled, killed = 0, ""
    trace = []  # (seconds since start, RSS bytes)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        trace.append((time.perf_counter() - t0, vm_rss(proc.pid)))
        sampled = max(sampled, trace[-1][1])
        if not killed and sampled > cap:
            killed = f"rss {sampled / MIB:.0f} MiB > cap {cap / MIB:.0f} MiB"
        elif not killed and time.perf_counter() - t0 > args.run_timeout_s:
            killed = f"timeout {args.run_timeout_s:.0f} s"
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(args.sample_s)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    log.close()
    wall = time.perf_counter() - t0
    result_path = os.path.join(run_dir, "result.json")
    result = json.load(open(result_path)) if os.path.exists(result_path) else {}
    if not killed and proc.returncode != 0:
        tail = open(os.path.join(run_dir, "child.log")).read()[-2000:]
        raise RuntimeError(f"{mode} run failed (exit {proc.returncode}); log tail:\n{tail}")
    records = read_metrics(os.path.join(run_dir, "tb", "metrics.jsonl"))
    times = [r["sft/step_time_s"] for r in records[1:]]  # step 0 compiles
    return {
        "peak_rss_mib": max(usage.ru_maxrss * 1024, sampled) / MIB,  # ru_maxrss: KiB
        "ru_maxrss_mib": usage.ru_maxrss / 1024, "sampled_peak_mib": sampled / MIB,
        "killed": killed, "steps_done": len(records),
        "step_s": statistics.median(times) if times else None,
        "first_step_s": records[0]["sft/step_time_s"] if records else None,
        "failed_rows": result.get("failed_rows"), "wall_s": wall, "trace": trace,
    }


def rss_at(trace: list[tuple[float, int]], seconds: float) -> float:
    """The highest sampled RSS (MiB) up to `seconds` into a run."""
    return max((rss for t, rss in trace if t <= seconds), default=0) / MIB


def read_metrics(path: str) -> list[dict]:
    """The run's per-step records (the logger flushes each line; a kill may cut the last)."""
    out = []
    if os.path.exists(path):
        for line in open(path):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "sft/step_time_s" in rec:
                out.append(rec)
    return out


def main(args) -> None:
    t0 = time.perf_counter()
    out = args.out or tempfile.mkdtemp(prefix="sft_memory_bench_")
    os.makedirs(out, exist_ok=True)
    plan = prepare(args, out)
    plan_path = os.path.join(out, "plan.json")
    with open(plan_path, "w") as f:
        json.dump(plan, f)
    runs = {mode: run_child(args, mode, plan_path, out) for mode in ("after", "before")}
    b, a = runs["before"], runs["after"]
    import grain

    frames_mib = (plan["batch_size"] * plan["max_frames"] * plan["frame_size"][0]
                  * plan["frame_size"][1] * 3 / MIB)
    default_buffer = int(grain.ReadOptions().prefetch_buffer_size)
    print(json.dumps({
        "bench": f"sft_memory_{args.frame_size}", "frame_size": args.frame_size,
        "steps": args.steps, "batch_size": args.batch_size, "max_frames": plan["max_frames"],
        "seq_len": plan["seq_len"], "tokens_per_frame": plan["tokens_per_frame"],
        "batch_frames_mib": round(frames_mib, 1),
        # frame bytes of the batches Grain's default ReadOptions keep ready (the old behaviour)
        "grain_default_buffer_batches": default_buffer,
        "grain_default_buffer_frames_mib": round(default_buffer * frames_mib),
        "peak_rss_mib_before": round(b["peak_rss_mib"]),
        "peak_rss_mib_after": round(a["peak_rss_mib"]),
        "ratio_after_over_before": round(a["peak_rss_mib"] / b["peak_rss_mib"], 3),
        "before_capped": bool(b["killed"]), "after_capped": bool(a["killed"]),
        # the 'after' run's peak over the same time the 'before' run ran (fair when it was killed)
        "peak_rss_mib_after_same_wall": round(rss_at(a["trace"], b["wall_s"])),
        "killed_before": b["killed"], "killed_after": a["killed"],
        "steps_done_before": b["steps_done"], "steps_done_after": a["steps_done"],
        "step_s_before": b["step_s"] and round(b["step_s"], 2),
        "step_s_after": a["step_s"] and round(a["step_s"], 2),
        "failed_rows_before": b["failed_rows"], "failed_rows_after": a["failed_rows"],
        "traces": plan["trace_count"], "run_wall_s_before": round(b["wall_s"], 1),
        "run_wall_s_after": round(a["wall_s"], 1), "wall_s": round(time.perf_counter() - t0, 1),
        "date": datetime.date.today().isoformat(),
    }))


# --------------------------------------------------------------------------- child


def child(args) -> None:
    """One SFT run (`args.child` says which iterator); writes result.json, exits hard (the
    old iterator's 16 prefetch threads would otherwise keep decoding at exit)."""
    from data_pipelines import grain_pipelines
    from data_pipelines.tokenizer import load_tokenizer
    from experiments.configs import sft as sft_config
    from vrthinker_jax.train import runtime, sft

    plan = json.load(open(args.plan))
    if args.child == "before":
        # the pre-fix iterator: Grain's default ReadOptions (16 threads, 500 batches ahead)
        grain_pipelines.make_iterator = lambda ds, cfg: iter(ds.to_iter_dataset())
    cfg = sft_config.get_config("tiny")
    cfg.data.update(dict(frame_size=tuple(plan["frame_size"]), seq_len=plan["seq_len"],
                         max_frames=plan["max_frames"], batch_size=plan["batch_size"]))
    cfg.mesh.ici = {}  # one device, as the tests run it
    cfg.steps, cfg.log_every, cfg.ckpt_every = plan["steps"], 1, plan["steps"]
    cfg.progress = False
    tok = load_tokenizer(plan["tokenizer"])
    runtime.align_model_config(cfg.model, tok)
    rt = runtime.setup(cfg, tok)
    ds = sft.sft_dataset(cfg, plan["traces"], tok, rt)
    logger = runtime.TrainLogger(os.path.join(args.out, "tb"))
    _, history = sft.run_sft(cfg, os.path.join(args.out, "work"), ds, rt=rt, logger=logger)
    logger.close()
    result = {"mode": args.child, "steps": len(history),
              "failed_rows": int(history[-1]["failed_rows_total"]),
              "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f)
    print(json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _args = parse_args()
    if _args.child:
        child(_args)
    else:
        main(_args)
