#!/usr/bin/env bash
# Creates (or reuses) .venv with Python 3.11 and installs the project.
#   setup_env.sh          runtime dependencies only
#   setup_env.sh test     plus the test-only reference stack (torch CPU, transformers, pytest)
#   setup_env.sh tpu      a separate .venv-tpu: runtime dependencies + jax[tpu] (libtpu), for the
#                         AOT fit planner (`python -m vrthinker_jax.tools.plan`) or a TPU VM
# Idempotent: a stamp file records which requirement files were installed, so a second call is
# instant. Everything comes from pinned versions in requirements*.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
want=${1:-runtime}
py=${PYTHON:-}
if [ -z "$py" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then py=$cand; break; fi
  done
fi
if [ -z "$py" ]; then echo "setup_env.sh: no python3.11 found on PATH" >&2; exit 1; fi
if [ "$want" = tpu ]; then
  # its own venv: libtpu's jaxlib must not replace the CPU one the tests run on
  if [ ! -x .venv-tpu/bin/python ]; then
    echo "[setup] creating .venv-tpu with $($py --version)"
    "$py" -m venv .venv-tpu
    .venv-tpu/bin/python -m pip install -q --upgrade pip
  fi
  stamp=.venv-tpu/.installed-$(cat requirements.txt setup.cfg | cksum | cut -d' ' -f1)-tpu
  if [ ! -f "$stamp" ]; then
    echo "[setup] installing requirements.txt + jax[tpu]==0.10.2 (pinned) into .venv-tpu"
    # pytest (pinned as in requirements-test.txt) runs tests/test_plan.py's libtpu test
    .venv-tpu/bin/python -m pip install -q -r requirements.txt "jax[tpu]==0.10.2" pytest==9.2.0
    .venv-tpu/bin/python -m pip install -q --no-deps -e .
    touch "$stamp"
  fi
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($py --version)"
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
req=requirements.txt
[ "$want" = test ] && req=requirements-test.txt
stamp=.venv/.installed-$(cat requirements.txt requirements-test.txt setup.cfg | cksum | cut -d' ' -f1)-$want
if [ ! -f "$stamp" ]; then
  echo "[setup] installing $req (pinned) and the project in editable mode"
  .venv/bin/python -m pip install -q -r "$req"
  .venv/bin/python -m pip install -q --no-deps -e .
  # qwen-agent renders the release's tools block in tests; its own dependency list pulls API
  # clients the tests never import, so it goes in alone (json5, soundfile come from the file)
  if [ "$want" = test ]; then .venv/bin/python -m pip install -q --no-deps qwen-agent==0.0.34; fi
  touch "$stamp"
fi
