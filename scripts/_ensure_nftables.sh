#!/usr/bin/env bash
# Installs Debian's nftables (the emulated-WAN tests' NAT routers, scripts/netemu.py) when missing. Needs root/apt.
set -uo pipefail
command -v nft >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup] nftables missing and cannot install it here (needs root + apt-get)" >&2
  exit 1
fi
echo "[setup] installing Debian's nftables for the emulated-WAN tests"
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null) || exit 1
