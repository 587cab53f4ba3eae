#!/usr/bin/env bash
# Volunteer launch script: join a run with your own hardware and your own data.
#
#   peers/run_peer.sh BOOTSTRAP_MADDR [CORPUS] [extra p2p-photon peer args...]
#
#   BOOTSTRAP_MADDR  the line the run's host gave you, e.g.
#                    /ip4/203.0.113.7/tcp/31337/p2p/12D3KooW...   (or a bootstrap maddrs .json file)
#   CORPUS           your private data: text files or a directory, .jsonl[.gz|.zst], .parquet, or a
#                    datasets save_to_disk directory; the run's settings, tokenizer and eval set come
#                    from the swarm. Without it: the shared corpus of CONFIG, silo SILO (the old way).
#
# Environment: CONFIG (with CORPUS: a file of your local settings only, e.g. [inner] device/batch_size,
# [checkpoint] dir; without: the run's config, default peers/cpu_peer.toml), RUN_ID (when the bootstrap hosts
# several runs), TEXT_FIELD (JSONL field / column, default text), SILO (without CORPUS), LISTEN (host
# multiaddr; default /ip4/127.0.0.1/tcp/0, loopback only: set e.g. LISTEN=/ip4/0.0.0.0/tcp/31338 so other
# machines can reach you), ANNOUNCE (your public multiaddr behind NAT with a forwarded port), CLIENT_MODE=1
# (behind NAT without port forwarding), RESUME=1 (continue from your last checkpoint), NPROC=N (one peer on
# N devices of this machine, without CORPUS: torch.distributed inside, one swarm identity; inner.batch_size
# is per device).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
BOOT="$1"; shift
CORPUS=""
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then CORPUS="$1"; shift; fi
source scripts/_venv.sh
ARGS=(peer --host-maddrs "${LISTEN:-/ip4/127.0.0.1/tcp/0}")
if [ -n "$CORPUS" ]; then  # the run's settings come from its spec: CONFIG holds only local ones, if any
  [ -n "${CONFIG:-}" ] && ARGS+=(--config "$CONFIG")
  ARGS+=(--data "$CORPUS" --text-field "${TEXT_FIELD:-text}")
  [ -n "${RUN_ID:-}" ] && ARGS+=(--run-id "$RUN_ID")
else
  ARGS+=(--config "${CONFIG:-peers/cpu_peer.toml}" --set "data.silo=${SILO:-0}")
fi
if [[ "$BOOT" == *.json ]]; then ARGS+=(--initial-peers-file "$BOOT"); else ARGS+=(--initial-peers "$BOOT"); fi
[ -n "${ANNOUNCE:-}" ] && ARGS+=(--announce-maddrs "$ANNOUNCE")
[ "${CLIENT_MODE:-0}" = 1 ] && ARGS+=(--set dht.client_mode=true)
[ "${RESUME:-0}" = 1 ] && ARGS+=(--resume)
[ "${NPROC:-1}" != 1 ] && ARGS+=(--nproc "$NPROC")
exec p2p-photon "${ARGS[@]}" "$@"
