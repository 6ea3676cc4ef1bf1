"""Build pilot's web dashboard: ``npm ci`` from the committed lockfile, type-check, bundle.

The sources are in ``src/shoal/pilot/dashboard`` (TypeScript, cytoscape and uPlot from
npm); the result is ``src/shoal/pilot/dashboard/dist/`` (``index.html``, ``app.js``,
``app.css``), which pilot serves at ``/`` and ``/static/*`` and which is not committed.
Run by ``make setup``. A no-op when nothing changed: a stamp in ``dist/`` records the hash
of the sources, the lockfile and this script, and ``node_modules`` is only reinstalled when
the lockfile changed.

    python scripts/build_dashboard.py            # build if needed
    python scripts/build_dashboard.py --force    # build anyway
    python scripts/build_dashboard.py --check    # exit 1 if dist/ is missing or stale
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "src" / "shoal" / "pilot" / "dashboard"
DIST = DASHBOARD / "dist"
STAMP = DIST / ".build-stamp"
LOCK = DASHBOARD / "package-lock.json"
INSTALLED_LOCK = DASHBOARD / "node_modules" / ".shoal-lock"
INPUTS = ("package.json", "package-lock.json", "tsconfig.json", "build.mjs", "index.html")


def source_hash() -> str:
    """The hash of everything the build reads (besides node_modules, pinned by the lock)."""
    files = [DASHBOARD / name for name in INPUTS]
    files += sorted(p for p in (DASHBOARD / "src").rglob("*") if p.is_file())
    files.append(Path(__file__).resolve())
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def up_to_date(want: str) -> bool:
    return (DIST / "index.html").is_file() and STAMP.is_file() and STAMP.read_text() == want


def run(*args: str) -> None:
    print("dashboard: $", " ".join(args), flush=True)
    subprocess.run(args, cwd=DASHBOARD, check=True)


def build(want: str) -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise SystemExit("dashboard: node and npm are needed to build it (apt-get install nodejs)")
    installed = INSTALLED_LOCK.read_bytes() if INSTALLED_LOCK.is_file() else None
    if installed != LOCK.read_bytes():
        run(npm, "ci", "--no-audit", "--no-fund", "--loglevel=error")
        shutil.copyfile(LOCK, INSTALLED_LOCK)
    run(npm, "run", "--silent", "check")  # tsc --noEmit: the types must hold
    run(npm, "run", "--silent", "build")  # esbuild: dist/index.html, dist/app.{js,css}
    STAMP.write_text(want)
    size = sum(p.stat().st_size for p in DIST.rglob("*") if p.is_file())
    print(f"dashboard: built {DIST.relative_to(ROOT)} ({size // 1024} KiB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="build even when up to date")
    parser.add_argument("--check", action="store_true", help="only say whether dist/ is current")
    args = parser.parse_args()
    want = source_hash()
    if args.check:
        current = up_to_date(want)
        print(f"dashboard: {'up to date' if current else 'missing or stale'}")
        return 0 if current else 1
    if args.force or not up_to_date(want):
        try:
            build(want)
        except subprocess.CalledProcessError as exc:
            print(f"dashboard: build failed ({exc})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
