#!/usr/bin/env bash
# Debian's Chromium for the browser test (tests/test_browser.py), which drives it headless through
# Playwright's Python package (installed by setup_comfyui.sh from tests/requirements.txt). No browser
# is downloaded: `playwright install` is never run; the test points Playwright at /usr/bin/chromium.
# Idempotent: does nothing when Chromium is there. Installs it with apt-get when run as root or when
# password-less sudo works (CI); otherwise says what to run. Without Chromium the browser test is skipped
# and says why, unless LIKENESS_REQUIRE_BROWSER=1 (CI): then this script and the test fail instead.
#   LIKENESS_CHROMIUM         another Chromium binary to use instead of /usr/bin/chromium
#   LIKENESS_REQUIRE_BROWSER  1: a missing Chromium is an error (set by .ci/run)
set -euo pipefail
log() { printf '[setup-browser] %s\n' "$*" >&2; }

CHROMIUM="${LIKENESS_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  log "found $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
if { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; } && command -v apt-get >/dev/null 2>&1; then
  log "installing Debian's chromium with apt-get (once)"
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
  log "installed $(/usr/bin/chromium --version)"
  if [ ! -x "$CHROMIUM" ] && [ "${LIKENESS_REQUIRE_BROWSER:-0}" = 1 ]; then
    log "still no Chromium at $CHROMIUM (LIKENESS_CHROMIUM?) and LIKENESS_REQUIRE_BROWSER=1: failing"
    exit 1
  fi
else
  log "no Chromium at $CHROMIUM; the browser test will be skipped. Install it with:"
  log "  sudo apt-get install chromium     (or set LIKENESS_CHROMIUM=/path/to/chromium)"
  if [ "${LIKENESS_REQUIRE_BROWSER:-0}" = 1 ]; then
    log "LIKENESS_REQUIRE_BROWSER=1: failing"
    exit 1
  fi
fi
