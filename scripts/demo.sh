#!/usr/bin/env bash
# README's main command: set up .venv, then run a local swarm on 127.0.0.1 — a bootstrap node,
# 3 peers on non-IID silos of the embedded corpus (Python's standard library) — for a few
# rounds, and print the held-out perplexity of the final global model vs the initial one.
# Options go to scripts/local_swarm.py, e.g. ./scripts/demo.sh --peers 4 --rounds 12
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
exec python scripts/local_swarm.py "$@"
