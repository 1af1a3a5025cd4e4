#!/usr/bin/env bash
# The main job on the embedded default, on CPU: sets up the runtime environment (idempotent),
# then generates the synthetic needle pairs, trains the tiny VLM through SFT -> RFT -> GRPO and
# prints the held-out results table (see experiments/demo/).
#   bash experiments/launch/run_demo.sh            # the default (< 30 min on 2 CPU cores)
#   bash experiments/launch/run_demo.sh --config=experiments/configs/demo.py:quick   # < 3 min check
#   bash experiments/launch/run_demo.sh --config.seed=1   # any config field overridden
#   bash experiments/launch/run_demo.sh --out DIR  # where results, TensorBoard, HTML go
set -euo pipefail
cd "$(dirname "$0")/../.."
bash experiments/launch/setup_env.sh
JAX_PLATFORMS=cpu exec .venv/bin/python -m experiments.demo "$@"
