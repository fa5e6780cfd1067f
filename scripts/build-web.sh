#!/usr/bin/env bash
# Assembles the browser assets the hive serves that the repository does not carry: noVNC (the
# session page's desktop viewer) from npm, as web/package.json and web/package-lock.json pin it,
# into web/node_modules/. Idempotent: does nothing when it is there already. Needs npm (Debian:
# apt-get install npm); the hive runs without it, and its session page then says so.
set -euo pipefail
web="$(cd "$(dirname "$0")/../web" && pwd)"

if [ -f "$web/node_modules/@novnc/novnc/core/rfb.js" ]; then
    exit 0
fi
if ! command -v npm >/dev/null; then
    echo "build-web: npm is missing, so noVNC cannot be installed (the session page will show no desktop); install npm (apt-get install npm) and run scripts/build-web.sh again" >&2
    exit 1
fi
cd "$web"
# ci installs exactly the lock file's versions.
npm ci --no-audit --no-fund --loglevel=error
test -f node_modules/@novnc/novnc/core/rfb.js || { echo "build-web: npm ran but noVNC is not in $web/node_modules" >&2; exit 1; }
echo "build-web: noVNC installed in $web/node_modules/@novnc/novnc"
