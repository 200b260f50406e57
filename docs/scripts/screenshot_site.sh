#!/usr/bin/env bash
# Build the site, serve the built files on 127.0.0.1 and screenshot pages in headless Chromium with every
# address but 127.0.0.1 unresolvable (as offline or behind a firewall): the check that the site renders in a real
# browser (typeset maths on Concepts and a tutorial, an API page, a tutorial with its plots), not only that
# `mkdocs build` succeeds. Look at the PNGs.
#
#   bash docs/scripts/screenshot_site.sh [OUT_DIR] [PAGE ...]      (default OUT_DIR runs/screenshots)
#
# Execute the tutorials first (see .ci/run) so their pages carry outputs. Needs Chromium: `chromium`,
# `chromium-headless-shell`, `chromium-browser` or `google-chrome` on PATH, or CHROMIUM=/path/to/it (Debian:
# apt-get install chromium-headless-shell). OFFLINE=0 lets the browser reach the network. MathJax ships with the
# site (docs/javascripts/mathjax/), so the formulas typeset offline too; the build itself (docs/scripts/hooks.py)
# already fails if any page loads a script, stylesheet or font from the network.
# Without Chromium the script builds the site (and so runs those checks), says so, and exits 3; where `node` can
# load jsdom (NODE_PATH), it runs docs/scripts/typeset_check.js instead: MathJax in jsdom, network refused.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-runs/screenshots}
shift || true
pages=("$@")
[ ${#pages[@]} -gt 0 ] || pages=("" "concepts/" "tutorials/01_schedule_and_updates/" "api/kv_cache/"
                                  "tutorials/05_cache_aware_video/" "results/")
port=${PORT:-8765}
mkdir -p "$out"
mkdocs=mkdocs; [ -x .venv/bin/mkdocs ] && mkdocs=.venv/bin/mkdocs
python=python3; [ -x .venv/bin/python ] && python=.venv/bin/python

site="$out/site"
rm -rf "$site"
echo "building the site into $site"
NO_MKDOCS_2_WARNING=1 "$mkdocs" build --strict --site-dir "$site" >"$out/build.log" 2>&1 \
  || { tail -20 "$out/build.log" >&2; echo "mkdocs build --strict failed; see $out/build.log" >&2; exit 1; }

browser=${CHROMIUM:-}
if [ -z "$browser" ]; then
  for candidate in chromium chromium-headless-shell chromium-browser google-chrome; do
    if command -v "$candidate" >/dev/null; then browser=$candidate; break; fi
  done
fi
if [ -z "$browser" ]; then
  echo "no Chromium on this machine (apt-get install chromium-headless-shell, or set CHROMIUM): no screenshots." >&2
  if command -v node >/dev/null && node -e 'require("jsdom")' 2>/dev/null; then
    echo "typesetting offline in jsdom instead:" >&2
    node docs/scripts/typeset_check.js "$site" "${pages[@]}"
  fi
  exit 3
fi
offline=()
[ "${OFFLINE:-1}" = 0 ] || offline=(--host-resolver-rules="MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")

"$python" -m http.server "$port" --bind 127.0.0.1 --directory "$site" >"$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/" >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "the file server exited; see $out/serve.log" >&2; exit 1; }
  sleep 0.5
done

for page in "${pages[@]}"; do
  name=${page%/}; name=${name//\//_}; name=${name:-home}
  url="http://127.0.0.1:$port/$page"
  curl -sf "$url" >/dev/null || { echo "not served: $url" >&2; exit 1; }
  # Scrollbars stay visible: a code block or table that scrolls sideways must look like it does.
  "$browser" --headless --no-sandbox --disable-gpu "${offline[@]}" --window-size="${WIDTH:-1280},${HEIGHT:-2000}" \
    --virtual-time-budget=10000 --screenshot="$out/$name.png" "$url" 2>>"$out/chromium.log"
  echo "$url -> $out/$name.png"
done
