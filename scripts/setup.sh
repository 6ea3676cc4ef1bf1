#!/usr/bin/env bash
# Creates .venv with shoal and everything the tests, the demo and the benchmarks need.
# Quick when nothing changed: a stamp records the hash of what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# redis-server, etcd-server, zookeeper: the tests start their own servers on free loopback
# ports in temp dirs; the Debian services (systemd, default ports) are never used.
# chromium: the dashboard's browser test drives it headless through Playwright.
DEBS=(nginx wrk curl redis-server etcd-server zookeeper prometheus chromium nghttp2-client)

missing=()
for pkg in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: missing Debian packages (run as root to install): ${missing[*]}" >&2
    fi
fi

stamp=.venv/.shoal-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if ! [ -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev]'
    echo "$want" > "$stamp"
    echo "setup: .venv ready"
fi

# Real Dubbo and SOFA Bolt peers (Node.js) for the RPC tests, pinned by the lockfile.
peers=tests/rpc_peers
if command -v npm >/dev/null; then
    if ! cmp -s "$peers/package-lock.json" "$peers/node_modules/.shoal-lock" 2>/dev/null; then
        (cd "$peers" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
        cp "$peers/package-lock.json" "$peers/node_modules/.shoal-lock"
        echo "setup: RPC peers installed"
    fi
else
    echo "setup: npm not found; the RPC interop tests will fail (install nodejs)" >&2
fi

# Pilot's web dashboard (src/shoal/pilot/dashboard/dist), built from the npm lockfile; a
# no-op when its sources and lockfile are unchanged.
if command -v npm >/dev/null; then
    .venv/bin/python scripts/build_dashboard.py || echo "setup: WARNING: the dashboard build failed" >&2
else
    echo "setup: npm not found; pilot's dashboard is not built (install nodejs)" >&2
fi

# The hot-path modules compiled with mypyc (a no-op when they are up to date). Without a
# C compiler Shoal still runs, interpreted and slower.
if ! .venv/bin/python scripts/compile.py > .venv/compile.log 2>&1; then
    echo "setup: WARNING: mypyc compilation failed (see .venv/compile.log); running interpreted" >&2
    .venv/bin/python scripts/compile.py --clean
fi
