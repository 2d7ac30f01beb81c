#!/usr/bin/env bash
# Installs Debian's redis-server for the agent's last-resort queue (runbook fallback 3) and its
# tests: `planpipe up` starts it when PLANPIPE_REDIS=1. Idempotent: does nothing when
# redis-server is already installed. Only the binary is wanted: the package's own service is
# stopped and disabled so it never holds port 6379 behind planpipe's back.
set -euo pipefail

present() { command -v redis-server >/dev/null 2>&1; }
version() { redis-server --version; }

# shellcheck source=lib/apt-install.sh
source "$(dirname "$0")/lib/apt-install.sh"
apt_install_once redis-server redis-server --no-service
