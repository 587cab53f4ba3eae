#!/usr/bin/env bash
# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse .venv/ at the repo root and
# install the pinned, tested versions (constraints.txt). Idempotent and quick when up to date.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.p2p_photon-installed"
WANT="$(cat "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing pinned dependencies into .venv (first run takes a few minutes)"
  PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
  # torch first and pinned: an unpinned torch would pull several GB of CUDA packages
  $PIP install -c "$ROOT/constraints.txt" "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  $PIP install -c "$ROOT/constraints.txt" -e "$ROOT[test]" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import torch, hivemind, bitsandbytes, transformers, p2p_photon" \
    || { echo "[setup] installation failed: see the pip output above" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
