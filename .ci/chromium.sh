#!/usr/bin/env bash
# Debian's headless chromium for the page test of `adl serve` (tests/test_serve_page.py drives it
# with the Python playwright package, pointed at /usr/bin/chromium: no browser download).
# Installs chromium if needed; rerunning it is harmless. Exits non-zero if it cannot.
set -euo pipefail
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium (apt-get)..." >&2
  $SUDO apt-get update -qq >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
fi
chromium --version >&2
