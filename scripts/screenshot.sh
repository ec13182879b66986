#!/usr/bin/env bash
# Take a headless-Chromium screenshot of a page of a running Dagster UI.
#   scripts/screenshot.sh [URL] [OUT.png]
# URL defaults to the lifecycle job's page on http://127.0.0.1:3000 (start the UI first with
# `lifecycle-dagster dev`). Needs Debian's chromium (`apt-get install chromium`).
set -euo pipefail
url="${1:-http://127.0.0.1:3000/locations/lifecycle_dagster/jobs/lifecycle_v1__v1/runs}"
out="${2:-dagster-ui.png}"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1600,1000 --virtual-time-budget=15000 \
  --screenshot="$out" "$url"
echo "$out"
