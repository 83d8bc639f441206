#!/usr/bin/env bash
# Installs what the browser tests (tests/browser) need: Debian's Chromium.
# Idempotent. Playwright's own browser download does not work here, so the tests
# drive /usr/bin/chromium through Playwright's executable_path instead; never run
# `playwright install`. The `playwright` pip package comes from the test extras.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    echo "chromium already installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-liberation

"$CHROMIUM" --version
