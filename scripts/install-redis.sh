#!/usr/bin/env bash
# Installs Debian's redis-server for the agent's last-resort queue (runbook fallback 3) and its
# tests: `planpipe up` starts it when PLANPIPE_REDIS=1. Idempotent: does nothing when
# redis-server is already installed. Only the binary is wanted: the package's own service is
# stopped and disabled so it never holds port 6379 behind planpipe's back.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    echo "redis-server already installed: $(redis-server --version)"
    exit 0
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install-redis.sh: must run as root (or with sudo available)" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d: no service may start during the install (containers have no init, hosts need none).
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [[ ! -e "$POLICY" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod +x "$POLICY"
    CREATED_POLICY=1
fi
cleanup() { if [[ "$CREATED_POLICY" == 1 ]]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT

"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends redis-server
if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    "${SUDO[@]}" systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

if ! command -v redis-server >/dev/null 2>&1; then
    echo "install-redis.sh: apt-get finished but redis-server is missing" >&2
    exit 1
fi
echo "redis-server installed: $(redis-server --version)"
