#!/usr/bin/env bash
# Serve the site with `mkdocs serve` and screenshot pages in headless Chromium: the check that the site renders in a
# real browser (home page, an API page, a tutorial with its plots), not only that `mkdocs build` succeeds.
#
#   bash docs/scripts/screenshot_site.sh [OUT_DIR] [PAGE ...]      (default OUT_DIR runs/screenshots)
#
# Execute the tutorials first (see .ci/run) so their pages carry outputs. Needs `chromium` on PATH (Debian:
# apt-get install chromium). MathJax comes from a CDN: on a machine without internet the formulas stay in TeX.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-runs/screenshots}
shift || true
pages=("$@")
[ ${#pages[@]} -gt 0 ] || pages=("" "api/kv_cache/" "tutorials/05_cache_aware_video/")
port=${PORT:-8765}
mkdir -p "$out"

NO_MKDOCS_2_WARNING=1 mkdocs serve --no-livereload -a "127.0.0.1:$port" >"$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/" >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "mkdocs serve exited; see $out/serve.log" >&2; exit 1; }
  sleep 2
done

for page in "${pages[@]}"; do
  name=${page%/}; name=${name//\//_}; name=${name:-home}
  url="http://127.0.0.1:$port/$page"
  curl -sf "$url" >/dev/null || { echo "not served: $url" >&2; exit 1; }
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,${HEIGHT:-2000} \
    --virtual-time-budget=8000 --screenshot="$out/$name.png" "$url" 2>>"$out/chromium.log"
  echo "$url -> $out/$name.png"
done
