# Sourced by scripts/run and scripts/test: make .venv (once) and install the project into it.
# $1: the pip extra to install ("" or "test"). Re-installs only when pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.13 python3.12 python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "comfy-gateway needs Python 3.11 or newer" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
extra="${1:-}"
stamp=".venv/.installed${extra:+-$extra}"
fresh() { [ -f "$1" ] && [ ! pyproject.toml -nt "$1" ]; }
# the test install includes the plain one
if fresh "$stamp" || { [ -z "$extra" ] && fresh .venv/.installed-test; }; then
  :
else
  echo "installing comfy-gateway${extra:+[$extra]} into .venv" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extra:+[$extra]}"
  touch "$stamp"
fi
# The page's browser libraries (@stomp/stompjs, pinned in web/package.json + lock) are copied from npm into
# web/static/vendor/ (gitignored). Without npm the gateway still runs; only the page at / cannot connect.
vendor="web/static/vendor"
if [ ! -f "$vendor/stomp.umd.min.js" ] || [ web/package-lock.json -nt "$vendor/stomp.umd.min.js" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "installing the page's browser libraries into $vendor" >&2
    (cd web && npm ci --silent --no-audit --no-fund >/dev/null)
    mkdir -p "$vendor"
    cp web/node_modules/@stomp/stompjs/bundles/stomp.umd.min.js web/node_modules/@stomp/stompjs/LICENSE "$vendor/"
  else
    echo "npm not found: the web page at / needs @stomp/stompjs from npm and will say so; the HTTP API and" \
         "the STOMP endpoint work without it. Install Node.js + npm and run scripts/run again to get the page." >&2
  fi
fi
