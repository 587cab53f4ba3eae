#!/usr/bin/env bash
# Run a long-lived bootstrap node (helps peers find each other; training goes on without it).
#
#   bootstrap/run_bootstrap.sh [PORT] [extra p2p-photon bootstrap args...]
#
# Environment: IDENTITY (private key file, default ~/.p2p_photon/bootstrap.key, created on first
# start with mode 0600: keep it, it is what keeps your peer ID stable), LISTEN_IP (default 127.0.0.1:
# set LISTEN_IP=0.0.0.0 to accept volunteers from other machines),
# ANNOUNCE (public multiaddr, e.g. /ip4/203.0.113.7/tcp/31337, when behind NAT),
# MADDRS_FILE (default ~/.p2p_photon/bootstrap.json: the addresses to hand out to volunteers).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-31337}"; [ $# -gt 0 ] && shift
source scripts/_venv.sh
STATE="${HOME}/.p2p_photon"
mkdir -p "$STATE" && chmod 700 "$STATE"
ARGS=(bootstrap --identity-path "${IDENTITY:-$STATE/bootstrap.key}" --maddrs-file "${MADDRS_FILE:-$STATE/bootstrap.json}"
      --host-maddrs "/ip4/${LISTEN_IP:-127.0.0.1}/tcp/$PORT")
[ -n "${ANNOUNCE:-}" ] && ARGS+=(--announce-maddrs "$ANNOUNCE")
exec p2p-photon "${ARGS[@]}" "$@"
