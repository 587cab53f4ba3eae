#!/usr/bin/env bash
# README's test command: set up .venv (pinned versions), then run the whole test suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -m "not swarm" -x
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
./scripts/_ensure_apt.sh chromium chromium "the dashboard browser test" || echo "[setup] chromium not available: the browser test will fail" >&2
./scripts/_ensure_apt.sh nft nftables "the emulated-WAN tests" || echo "[setup] nftables not available: the emulated-WAN tests will be skipped" >&2
# two workers: the swarm tests leave a core idle much of the time (start-ups, matchmaking waits); `-n 0` runs serially
exec python -m pytest -q -p no:cacheprovider --durations=15 -n 2 --dist load "$@"
