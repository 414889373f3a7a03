#!/usr/bin/env bash
# Idempotent set-up of ./.venv with flashmhf and its tuning/test/plotting/transformers/example extras.
# A machine whose python already has torch (e.g. a CUDA build) reuses it; otherwise torch 2.13.0 is
# installed first, so that pip does not pull a multi-GB CUDA build to satisfy `torch>=...`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
# pip warns about index locations of its configuration that do not exist on this machine: noise here.
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  quiet .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
quiet .venv/bin/pip install -q --disable-pip-version-check -e '.[tune,dev,examples]'
.venv/bin/python -c "import flashmhf_runtime, optuna, pytest, safetensors, matplotlib, importlib.util as u
assert u.find_spec('transformers'), 'transformers missing'" >/dev/null
