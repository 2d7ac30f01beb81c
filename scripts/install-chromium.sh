#!/usr/bin/env bash
# Installs Debian's chromium for the browser tests (planpipe_tests/browser), which drive
# the Dagster UI with Playwright against /usr/bin/chromium (`playwright install` cannot
# download browsers here). Idempotent: does nothing when chromium is already installed.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
present() { [[ -x "$CHROMIUM" ]]; }
version() { "$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM"; }

# shellcheck source=lib/apt-install.sh
source "$(dirname "$0")/lib/apt-install.sh"
apt_install_once chromium chromium
