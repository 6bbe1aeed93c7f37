#!/usr/bin/env bash
# Debian's Chromium for the web editor's browser tests (tests/test_app.py), unless it is installed already.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
echo "installing Debian's chromium for the browser tests" >&2
$SUDO apt-get install -y -qq chromium > /dev/null || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium > /dev/null; }
