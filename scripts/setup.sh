#!/usr/bin/env bash
# Create .venv and install yume with its dev tools. Torch comes first, pinned, so that pip does
# not pull a multi-GB CUDA build where a CPU wheel is wanted; set TORCH_SPEC to choose another
# (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".[dev]"
echo "yume installed in $(pwd)/.venv"
