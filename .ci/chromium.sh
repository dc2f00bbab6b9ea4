#!/usr/bin/env bash
# Headless Chromium for the status page's browser test (tests/test_status_page.py).
#
#   bash .ci/chromium.sh
#
# Installs Debian's `chromium` package, plus fonts-liberation for legible
# screenshots, when no `chromium` (or `chromium-browser`) is on PATH. Other
# recommends (sandbox helper, GL, printing, ~100 packages) are skipped: the test
# runs headless with --no-sandbox. Idempotent and silent when Chromium is there;
# after an install it prints one line (version, seconds) to stderr. Needs root
# for apt-get; otherwise it says what to run and exits 1.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "chromium.sh: chromium is not installed and this is not root;" \
         "run: sudo apt-get update && sudo apt-get install -y chromium" >&2
    exit 1
fi

command -v apt-get >/dev/null 2>&1 || { echo "chromium.sh: no apt-get here; install Chromium by hand" >&2; exit 1; }

log=$(mktemp "${TMPDIR:-/tmp}/chromium-install.XXXXXX")
trap 'rm -f "$log"' EXIT
started=$(date +%s)
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation; } >"$log" 2>&1; then
    tail -30 "$log" >&2
    echo "chromium.sh: installing Debian's chromium package failed" >&2
    exit 1
fi
command -v chromium >/dev/null 2>&1 || { echo "chromium.sh: chromium installed but not on PATH" >&2; exit 1; }
echo "chromium.sh: installed $(chromium --version 2>/dev/null | head -1) in $(( $(date +%s) - started ))s" >&2
