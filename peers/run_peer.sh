#!/usr/bin/env bash
# Volunteer launch script: join a swarm with your own hardware.
#
#   peers/run_peer.sh BOOTSTRAP_MADDR [CONFIG] [extra p2p-photon peer args...]
#
#   BOOTSTRAP_MADDR  the line the bootstrap host gave you, e.g.
#                    /ip4/203.0.113.7/tcp/31337/p2p/12D3KooW...   (or a bootstrap maddrs .json file)
#   CONFIG           peer config (default: peers/cpu_peer.toml; peers/gpu_peer.toml for a CUDA GPU)
#
# Environment: SILO (data silo / peer index, default 0), LISTEN (host multiaddr; default
# /ip4/127.0.0.1/tcp/0, loopback only: set e.g. LISTEN=/ip4/0.0.0.0/tcp/31338 so other machines can reach you),
# ANNOUNCE (your public multiaddr if you are behind NAT with a forwarded port), CLIENT_MODE=1
# (behind NAT without port forwarding), RESUME=1 (continue from your last checkpoint), NPROC=N (one peer
# on N devices of this machine: torch.distributed inside, one swarm identity; inner.batch_size is per device).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
BOOT="$1"; shift
CONFIG="${1:-peers/cpu_peer.toml}"; [ $# -gt 0 ] && shift
source scripts/_venv.sh
ARGS=(peer --config "$CONFIG" --set "data.silo=${SILO:-0}" --host-maddrs "${LISTEN:-/ip4/127.0.0.1/tcp/0}")
if [[ "$BOOT" == *.json ]]; then ARGS+=(--initial-peers-file "$BOOT"); else ARGS+=(--initial-peers "$BOOT"); fi
[ -n "${ANNOUNCE:-}" ] && ARGS+=(--announce-maddrs "$ANNOUNCE")
[ "${CLIENT_MODE:-0}" = 1 ] && ARGS+=(--set dht.client_mode=true)
[ "${RESUME:-0}" = 1 ] && ARGS+=(--resume)
[ "${NPROC:-1}" != 1 ] && ARGS+=(--nproc "$NPROC")
exec p2p-photon "${ARGS[@]}" "$@"
