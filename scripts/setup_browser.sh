#!/usr/bin/env bash
# Debian's Chromium for the browser test (tests/test_browser.py), which drives it headless through
# Playwright's Python package (installed by setup_comfyui.sh from tests/requirements.txt). No browser
# is downloaded: `playwright install` is never run; the test points Playwright at /usr/bin/chromium.
# Idempotent: does nothing when Chromium is there. Installs it with apt-get when run as root (CI);
# otherwise says what to run. Without Chromium the browser test is skipped and says why.
#   LIKENESS_CHROMIUM   another Chromium binary to use instead of /usr/bin/chromium
set -euo pipefail
log() { printf '[setup-browser] %s\n' "$*" >&2; }

CHROMIUM="${LIKENESS_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  log "found $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "installing Debian's chromium with apt-get (once)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
  log "installed $(/usr/bin/chromium --version)"
else
  log "no Chromium at $CHROMIUM; the browser test will be skipped. Install it with:"
  log "  sudo apt-get install chromium     (or set LIKENESS_CHROMIUM=/path/to/chromium)"
fi
