#!/usr/bin/env bash
# Render a `python -m tune.compare --format html` page with headless Chromium and save a
# screenshot, to check that the page renders on its own (it needs no network: pictures are
# data URIs, the style is inline).
#
#   scripts/report_screenshot.sh REPORT.html OUT.png
#
# CHROMIUM (default `chromium`, Debian's package) and WINDOW_SIZE (default 1400,2600, the
# width and height of the screenshot in pixels) can be set. Fails if Chromium fails or the
# PNG is missing or under MIN_BYTES (default 30000: at the default size a blank page is 16 kB,
# a report of one run without pictures 93 kB).
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 REPORT.html OUT.png" >&2
    exit 2
fi
REPORT=$1
OUT=$2
CHROMIUM=${CHROMIUM:-chromium}
WINDOW_SIZE=${WINDOW_SIZE:-1400,2600}
MIN_BYTES=${MIN_BYTES:-30000}

if [ ! -f "$REPORT" ]; then
    echo "error: no such report: $REPORT" >&2
    exit 2
fi
if ! command -v "$CHROMIUM" >/dev/null; then
    echo "error: $CHROMIUM not found (Debian: apt-get install chromium)" >&2
    exit 2
fi

REPORT_URL="file://$(cd "$(dirname "$REPORT")" && pwd)/$(basename "$REPORT")"
OUT_PATH="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
PROFILE=$(mktemp -d)
LOG=$(mktemp)
trap 'rm -rf "$PROFILE" "$LOG"' EXIT
rm -f "$OUT_PATH"

# --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
# The background-networking flags keep Chromium itself off the network too.
if ! timeout 120 "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --no-first-run --disable-background-networking --disable-component-update \
    --disable-sync --disable-default-apps --user-data-dir="$PROFILE" \
    --virtual-time-budget=5000 --window-size="$WINDOW_SIZE" \
    --screenshot="$OUT_PATH" "$REPORT_URL" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "error: $CHROMIUM failed on $REPORT" >&2
    exit 1
fi
if [ ! -f "$OUT_PATH" ]; then
    cat "$LOG" >&2
    echo "error: $CHROMIUM wrote no screenshot $OUT_PATH" >&2
    exit 1
fi
BYTES=$(stat -c %s "$OUT_PATH")
if [ "$BYTES" -lt "$MIN_BYTES" ]; then
    echo "error: $OUT_PATH is only $BYTES bytes (under $MIN_BYTES): did the page render?" >&2
    exit 1
fi
echo "wrote $OUT_PATH ($BYTES bytes)"
