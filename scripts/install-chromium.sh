#!/usr/bin/env bash
# Installs Debian's chromium for the browser tests (planpipe_tests/browser), which drive
# the Dagster UI with Playwright against /usr/bin/chromium (`playwright install` cannot
# download browsers here). Idempotent: does nothing when chromium is already installed.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
    echo "chromium already installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
    exit 0
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install-chromium.sh: must run as root (or with sudo available)" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends chromium

if [[ ! -x "$CHROMIUM" ]]; then
    echo "install-chromium.sh: apt-get finished but $CHROMIUM is missing" >&2
    exit 1
fi
echo "chromium installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
