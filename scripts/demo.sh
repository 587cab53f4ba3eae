#!/usr/bin/env bash
# README's main command: set up .venv, then train the nano model on the embedded default corpus
# (the Python standard library) for about a minute and print held-out perplexity before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
exec p2p-photon train --config peers/cpu_peer.toml --minutes "${DEMO_MINUTES:-1}" "$@"
