#!/usr/bin/env bash
# Creates .venv with shoal and everything the tests, the demo and the benchmarks need.
# Quick when nothing changed: stamps record what was installed and built.
#
#   scripts/setup.sh          everything (`make setup`, `make test`)
#   scripts/setup.sh --demo   what `make demo` needs: no Debian packages, no dev tools, no
#                             mypyc build (the demo runs interpreted), Node parts in parallel
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
MODE=full
[ "${1:-}" = "--demo" ] && MODE=demo

# redis-server, etcd-server, zookeeper: the tests start their own servers on free loopback
# ports in temp dirs; the Debian services (systemd, default ports) are never used.
# chromium: the dashboard's browser test drives it headless through Playwright.
DEBS=(nginx wrk curl redis-server etcd-server zookeeper prometheus chromium nghttp2-client)

if [ "$MODE" = full ]; then
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
fi

# The Node.js parts, run beside the Python install: the real Dubbo and SOFA Bolt peers
# (RPC tests, the demo's payments service), pinned by their lockfile, and pilot's web
# dashboard (src/shoal/pilot/dashboard/dist), built from its lockfile (a no-op when its
# sources and lockfile are unchanged).
node_parts() {
    if ! command -v npm >/dev/null; then
        echo "setup: npm not found: no RPC peers, no dashboard (install nodejs)" >&2
        return 0
    fi
    local peers=tests/rpc_peers
    if ! cmp -s "$peers/package-lock.json" "$peers/node_modules/.shoal-lock" 2>/dev/null; then
        (cd "$peers" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
        cp "$peers/package-lock.json" "$peers/node_modules/.shoal-lock"
        echo "setup: RPC peers installed"
    fi
    "$PYTHON" scripts/build_dashboard.py || echo "setup: WARNING: the dashboard build failed" >&2
}
node_parts &
node_pid=$!

want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
full_stamp=.venv/.shoal-setup
demo_stamp=.venv/.shoal-setup-demo
current() { [ -f "$1" ] && [ "$(cat "$1")" = "$want" ]; }
if [ "$MODE" = full ] && ! current "$full_stamp"; then
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev]'
    echo "$want" > "$full_stamp"
    echo "setup: .venv ready"
elif [ "$MODE" = demo ] && ! current "$full_stamp" && ! current "$demo_stamp"; then
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q -e .
    echo "$want" > "$demo_stamp"
    echo "setup: .venv ready for the demo"
fi

wait "$node_pid"

# The hot-path modules compiled with mypyc (a no-op when they are up to date). Without a
# C compiler Shoal still runs, interpreted and slower. The demo only drops stale builds.
if [ "$MODE" = demo ]; then
    .venv/bin/python scripts/compile.py --drop-stale
elif ! .venv/bin/python scripts/compile.py > .venv/compile.log 2>&1; then
    echo "setup: WARNING: mypyc compilation failed (see .venv/compile.log); running interpreted" >&2
    .venv/bin/python scripts/compile.py --clean
fi
