#!/usr/bin/env bash
# Creates .venv-mergekit at the repo root, idempotently: a separate environment holding mergekit 0.1.5, used
# only as a reference implementation by benchmarks/mergekit_parity.py and benchmarks/merge_bench.py.
# torch is installed FIRST (the pinned CPU wheel): installing mergekit into an environment without torch would
# make pip resolve torch itself and pull gigabytes of CUDA wheels.
#   TORCH_SPEC      overrides the torch requirement (default torch==2.13.0)
#   MERGEKIT_SPEC   overrides the mergekit requirement (default mergekit==0.1.5)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MERGEKIT_SPEC="${MERGEKIT_SPEC:-mergekit==0.1.5}"
PYTHON="${PYTHON:-python3}"
VENV=.venv-mergekit

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.mergekit-installed"
want="$TORCH_SPEC $MERGEKIT_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup-mergekit] installing $TORCH_SPEC, then $MERGEKIT_SPEC into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q "$MERGEKIT_SPEC" 2>&1 | grep -v "is ignored" || true
  HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "import torch, mergekit.merge" \
    || { echo "[setup-mergekit] the environment is broken: see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "[setup-mergekit] ready: $VENV/bin/mergekit-yaml"
