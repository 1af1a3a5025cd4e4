"""`python -m experiments.demo`: the command line of the demo job (`job.run`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from experiments.demo import evaluation

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "demo.py")


def _parser() -> argparse.ArgumentParser:
    from experiments import demo
    from vrthinker_jax import cli

    p = cli.OneLineParser(
        prog="python -m experiments.demo", description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any field of the config is overridden with --config.FIELD=VALUE (as "
               "experiments/train.py takes it), e.g. --config.seed=1 --config.sft.steps=600 "
               "--config.progress=False.")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="the demo config and preset, experiments/configs/demo.py[:PRESET] "
                        "(default, quick, stage3; default: the default preset)")
    p.add_argument("--out", default="",
                   help="output directory (default: runs/demo-<UTC time>; must be new or empty)")
    return p


def _short(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, float):
            out[k] = round(v, 4)
        elif isinstance(v, list) and v and isinstance(v[0], float):
            out[k] = [round(x, 4) for x in v]
        else:
            out[k] = v
    return out


def _report(results: dict) -> None:
    print()
    print(evaluation.format_results(results))
    print()
    for stage, st in results["stages"].items():
        print(f"{stage}: {json.dumps(_short(st))}")
    print(f"wall time: {results['time_wall_s']}")
    paths = results["paths"]
    print(f"results JSON: {paths['results_json']}")
    print(f"TensorBoard:  tensorboard --logdir {paths['tensorboard']}")
    print(f"HTML traces:  {paths['html_report']}")
    print(f"export:       {paths['export']} (python -m vrthinker_jax.score --checkpoint ...)")


def main(argv=None) -> int:
    from vrthinker_jax import cli

    try:
        args, extra = _parser().parse_known_args(argv)
        demo = cli.load_config(args.config, cli.split_config_overrides(extra))
    except cli.CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", "demo-" + time.strftime("%Y%m%d-%H%M%S",
                                                                    time.gmtime()))
    if os.path.isdir(out) and os.listdir(out):
        print(f"error: --out {out} exists and is not empty (pick a new directory)",
              file=sys.stderr)
        return 2
    from experiments.demo import job

    try:
        results = job.run(demo, out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _report(results)
    return 0
