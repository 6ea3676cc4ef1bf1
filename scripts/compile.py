"""Compile the proxy's hot-path modules with mypyc (the same typed Python, as C extensions).

Why: the per-request work is Python attribute access and small calls; mypyc turns the
strictly typed classes into native structs and direct calls, cutting the proxy's CPU per
request by about a third (bench/RESULTS.md). The modules stay plain Python: without this
step Shoal runs the same code interpreted.

Run by `make setup` when any listed module changed; `--clean` removes the built files;
`--drop-stale` (for `make demo`, which runs interpreted) removes them only if out of date.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
HOT_MODULES = [
    "shoal/codec/http1.py",
    "shoal/codec/rpc/base.py",
    "shoal/codec/rpc/hessian2.py",
    "shoal/codec/rpc/dubbo.py",
    "shoal/codec/rpc/bolt.py",
    "shoal/proxy/rpc.py",
    "shoal/transport/rpc.py",
    "shoal/codec/http2.py",
    "shoal/codec/h2/hpack.py",
    "shoal/codec/h2/tables.py",
    "shoal/proxy/routes.py",
    "shoal/proxy/hashing.py",
    "shoal/proxy/http.py",
    "shoal/proxy/h2.py",
    "shoal/transport/h2.py",
    "shoal/proxy/listeners.py",
    "shoal/transport/upstream.py",
    "shoal/upstream/cluster.py",
    "shoal/upstream/lb.py",
    "shoal/upstream/host.py",
    "shoal/upstream/outlier.py",
    "shoal/upstream/breaker.py",
    "shoal/upstream/backup.py",
    "shoal/observe/stats.py",
]
STAMP = SRC / "shoal" / ".compiled"


def source_hash() -> str:
    digest = hashlib.sha256()
    for module in HOT_MODULES:
        digest.update((SRC / module).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def built_files() -> list[Path]:
    return [*SRC.glob("*__mypyc*.so"), *(SRC / "shoal").rglob("*.so")]


def clean() -> None:
    for path in built_files():
        path.unlink()
    STAMP.unlink(missing_ok=True)
    shutil.rmtree(ROOT / "build", ignore_errors=True)


def compile_modules() -> None:
    from mypyc.build import mypycify  # noqa: PLC0415 (a dev tool: not needed to --drop-stale)
    from setuptools import setup  # noqa: PLC0415

    # Hash what is about to be compiled: a source edited during the build then leaves the
    # stamp stale, and the next run builds again instead of trusting an old module.
    built_from = source_hash()
    clean()
    setup(
        name="shoal-hot-path",
        ext_modules=mypycify([str(SRC / m) for m in HOT_MODULES], opt_level="3"),
        package_dir={"": "src"},
        script_args=["build_ext", "--inplace", "--build-temp", str(ROOT / "build")],
    )
    STAMP.write_text(built_from)


def main() -> int:
    # one build at a time: parallel test sessions may all find the modules stale
    with open(ROOT / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fresh = STAMP.exists() and STAMP.read_text() == source_hash() and built_files()
        if "--clean" in sys.argv:
            clean()
        elif "--drop-stale" in sys.argv:
            if not fresh:
                clean()  # run interpreted rather than on modules older than their source
        elif not fresh:
            compile_modules()
    return 0


if __name__ == "__main__":
    sys.exit(main())
