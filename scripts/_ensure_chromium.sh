#!/usr/bin/env bash
# Installs Debian's chromium (for the dashboard browser test) when missing. Needs root/apt.
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup] chromium missing and cannot install it here (needs root + apt-get)" >&2
  exit 1
fi
echo "[setup] installing Debian's chromium for the dashboard test"
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || exit 1
