"""A threaded HTTP/1.1 upstream for the health-checking and outlier-detection tests, whose
behaviour the test flips while a real proxy sends it traffic.

``/healthz`` answers ``health`` (a status, or ``"hang"`` to never answer); every other path
answers ``status`` with ``x-served-by: <name>``. ``stop()`` closes the listener and every
connection (connections are then refused), ``start()`` listens again on the same port.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable


class FlakyUpstream:
    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.health: int | str = 200
        self.status = 200
        self.hits: Counter[str] = Counter()  # "traffic" and "health" requests
        self.lock = threading.Lock()
        self.port = port
        self.listener: socket.socket | None = None
        self.open: list[socket.socket] = []
        self.stopping = threading.Event()
        self.start()

    def start(self) -> None:
        self.stopping = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", self.port), backlog=128)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.acceptor = threading.Thread(
            target=self._accept, args=(self.listener, self.stopping), daemon=True
        )
        self.acceptor.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.listener is not None:
            # stop listening at once: a close alone leaves the socket listening until the
            # accept thread lets go of it, and connections made meanwhile get reset later
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
            self.acceptor.join(5)
        with self.lock:
            for conn in self.open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self.open.clear()

    def count(self, kind: str) -> int:
        with self.lock:
            return self.hits[kind]

    def _accept(self, listener: socket.socket, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self.lock:
                self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn, stopping), daemon=True).start()

    def _serve(self, conn: socket.socket, stopping: threading.Event) -> None:
        reader = conn.makefile("rb")
        try:
            while not stopping.is_set():
                line = reader.readline()
                if not line:
                    return
                target = line.split(b" ")[1].decode()
                length = 0
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    reader.read(length)
                health = target.startswith("/healthz")
                with self.lock:
                    self.hits["health" if health else "traffic"] += 1
                answer = self.health if health else self.status
                if answer == "hang":
                    while not stopping.is_set():
                        time.sleep(0.05)
                    return
                body = self.name.encode()
                conn.sendall(
                    b"HTTP/1.1 %d X\r\ncontent-length: %d\r\nx-served-by: %s\r\n\r\n%s"
                    % (int(answer), len(body), body, body)
                )
        except OSError:
            return
        finally:
            reader.close()
            conn.close()


def served_by(port: int, count: int) -> Counter[str]:
    """``count`` requests, each on its own connection: who served each (or the status)."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": "svc"})
            response = conn.getresponse()
            response.read()
            seen[response.getheader("x-served-by") or str(response.status)] += 1
        finally:
            conn.close()
    return seen


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until ``condition`` held (fails after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
    return time.monotonic() - start
