"""`make demo` runs the two-service mesh: requests cross two real shoal proxies."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_port, stop_process, wait_for_port


def test_demo_runs_a_mesh_on_pilot_and_splits_api_traffic() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shoal.demo", "--requests", "40", "--interval", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = re.findall(
        r"GET http://api/orders/\d+ → (\d+) from ([\w-]+) .*\(upstream (\d+) ms\)",
        result.stdout,
    )
    assert len(lines) == 40, result.stdout
    assert {status for status, _, _ in lines} == {"200"}
    served = [name for _, name, _ in lines]
    assert set(served) == {"api-v1", "api-v2"}, served  # the canary: both versions
    assert served.count("api-v1") > served.count("api-v2")
    assert "admin http://127.0.0.1:15113/stats" in result.stdout


def _abandon(port: int, request: bytes, *, reset: bool, wait: float = 0.05) -> None:
    """Send ``request`` and go away before the answer: FIN, or RST when ``reset``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(request)
    time.sleep(wait)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_echo_stays_quiet_when_the_client_gives_up_first(tmp_path: Path) -> None:
    """A proxy's timeout closes the upstream connection while the echo waits in /delay
    (or streams /bytes): the echo must not write to the closed transport, and must leave
    no 'Task exception was never retrieved' behind."""
    port = free_port()
    stderr = (tmp_path / "echo.err").open("w+b")
    echo = subprocess.Popen(
        [sys.executable, "-m", "shoal.demo.echo", "--port", str(port), "--name", "q"],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        wait_for_port(port)
        for reset in (False, True):
            _abandon(port, b"GET /delay/200 HTTP/1.1\r\nHost: e\r\n\r\n", reset=reset)
            # pipelined: /bytes is queued behind the delay
            two = b"GET /delay/200 HTTP/1.1\r\nHost: e\r\n\r\n"
            _abandon(port, two + b"GET /bytes/10 HTTP/1.1\r\nHost: e\r\n\r\n", reset=reset)
            # a large response stalled on backpressure
            stream = b"GET /bytes/100000000?chunked=1 HTTP/1.1\r\nHost: e\r\n\r\n"
            _abandon(port, stream, reset=reset, wait=0.3)
        time.sleep(0.5)  # every delay is over and has tried to answer
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/after", timeout=5) as response:
            assert response.status == 200
            assert json.loads(response.read())["service"] == "q"
    finally:
        stop_process(echo)
    assert echo.returncode == 0
    stderr.seek(0)
    assert stderr.read().decode(errors="replace") == ""
