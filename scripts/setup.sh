#!/usr/bin/env bash
# All set-up on a fresh Debian 12 machine, as root: system packages, uv, the Python workspace.
# Idempotent; safe to run again. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  make git ca-certificates python3 python3-venv python3-dev gcc
  iproute2 nftables iptables iputils-ping iperf3 tcpdump procps psmisc
  tinyproxy  # the HTTPS proxy of the TCP 443 transport tests (tests/netns/transport)
  wireguard-go wireguard-tools dnsutils redis-server postgresql-client
  chromium chromium-driver  # the web console's browser test (tests/integration/console)
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# uv in its own small venv, so the system Python stays untouched (PEP 668).
if ! command -v uv >/dev/null 2>&1 && [ ! -x .tools/bin/uv ]; then
  echo "setup: installing uv"
  python3 -m venv .tools
  .tools/bin/pip install -q "uv==0.13.9"
fi
UV=$(command -v uv || echo .tools/bin/uv)
"$UV" sync --frozen --python python3
echo "setup: done (workspace in .venv)"
