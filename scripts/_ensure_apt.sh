#!/usr/bin/env bash
# Installs a Debian package when its command is missing. Needs root/apt.
#   scripts/_ensure_apt.sh COMMAND PACKAGE PURPOSE   e.g. chromium chromium "the dashboard browser test"
set -uo pipefail
cmd=$1 pkg=$2 purpose=$3
command -v "$cmd" >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup] $cmd missing and cannot install it here (needs root + apt-get)" >&2
  exit 1
fi
echo "[setup] installing Debian's $pkg for $purpose"
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null) || exit 1
