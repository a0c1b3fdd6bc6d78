#!/usr/bin/env bash
# Render an artifact's report/index.html in headless Chromium to a PNG, to see that it displays.
#   bench/render_report.sh ARTIFACT [OUT.png]
# Needs Debian's chromium (apt-get install chromium); the flags keep it off the network.
set -euo pipefail
artifact=${1:?usage: bench/render_report.sh ARTIFACT [OUT.png]}
out=${2:-report.png}
page=$(realpath "$artifact/report/index.html")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1360,3600 --screenshot="$(realpath -m "$out")" "file://$page" 2>/dev/null
echo "wrote $out"
