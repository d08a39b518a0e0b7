#!/usr/bin/env bash
# Sets up everything hf_atm needs on a fresh Debian machine, idempotently:
#   - the Debian packages the offline task suites read (Fashion-MNIST, WordNet, fortunes);
#   - the virtual environment .venv at the repo root, with PyTorch and hf_atm (editable) in it.
# PyTorch: TORCH_SPEC overrides the pinned CPU build, e.g. TORCH_SPEC="torch==2.5.1" with your
# own --index-url in PIP_EXTRA_INDEX_URL for a CUDA build. timm and torchvision are never installed.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
DEBIAN_PACKAGES=(dataset-fashion-mnist wordnet-base fortunes fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-ru)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "[setup] warning: Debian packages missing (the offline suites need them): ${missing[*]}" >&2
    echo "[setup]          install them with: sudo apt-get install ${missing[*]}" >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.hf_atm-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing $TORCH_SPEC and hf_atm[dev,federated] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q -e ".[dev,federated]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import torch, transformers, peft, accelerate, hf_atm" \
    || { echo "[setup] the environment is broken: see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "[setup] ready: .venv/bin/python, .venv/bin/hf-atm, .venv/bin/accelerate"
