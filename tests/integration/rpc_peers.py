"""Real Dubbo and SOFA Bolt peers for the RPC tests: ``tests/rpc_peers/server.js`` and
``client.js``, Node.js programs on sofa-rpc-node (with sofa-bolt-node for Bolt and
dubbo-remoting for Dubbo, Hessian2 bodies for both) that ``make setup`` installs.

``RpcServer`` runs one server on a loopback port (a context manager; ``stop``/``start``
keep the port, for outage tests) and ``run_client`` runs one client invocation, which
makes ``count`` calls over one connection and reports them as a ``ClientReport``.
``whoami`` asks a server (directly or through a proxy) who answered and what arrived.

The server's methods (on ``com.example.Greeter`` unless told otherwise): ``sayHello(name)``
returns ``"<label>: hello <name>"``, ``echo(value)`` returns its argument, ``whoami()`` a
JSON string (label, version, group, the attachments / Bolt headers received, ...),
``slow(ms)`` answers after ``ms`` milliseconds, ``boom()`` fails with a remote error
(Dubbo status 80 / Bolt status 2), and ``appException()`` returns an application exception
inside an OK response, as Java providers do.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, NotRequired, TypedDict, cast

import pytest
from tests.conftest import stop_process

PEERS_DIR = Path(__file__).resolve().parent.parent / "rpc_peers"
SERVER_JS = PEERS_DIR / "server.js"
CLIENT_JS = PEERS_DIR / "client.js"

Protocol = Literal["dubbo", "bolt"]
PROTOCOLS: tuple[Protocol, ...] = ("dubbo", "bolt")
DEFAULT_INTERFACE = "com.example.Greeter"
DEFAULT_VERSION = "1.0.0"

# sofa-rpc-node's result codes, as client.js reports them in ClientError["code"].
CODE_APPLICATION = "01"  # the remote side failed the call (a thrown error, unknown service)
CODE_RPC = "02"  # an RPC-level failure: the connection closed, a frame could not be encoded
CODE_TIMEOUT = "03"  # no response within --timeout-ms
CODE_NO_PROVIDER = "04"  # could not connect to the address

_READY = re.compile(r"READY (\d+)")


class ClientError(TypedDict):
    index: int
    message: str
    name: str | None
    code: str | None
    status: int | None  # the response frame's status (Dubbo status byte / Bolt respstatus)


class Heartbeat(TypedDict, total=False):
    ok: bool
    rtt_ms: float
    error: str


class ClientReport(TypedDict):
    ok: int
    errors: list[ClientError]
    results: list[Any]
    latency_ms: list[float]
    heartbeat: NotRequired[Heartbeat]


def node_binary() -> str:
    """The ``node`` to run the peers with; fails the test (never skips) when the peers are
    not installed, since ``make setup`` installs them."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (Node.js 20) is not on PATH: run `make setup` to install the RPC peers")
    if not (PEERS_DIR / "node_modules" / "sofa-rpc-node").is_dir():
        pytest.fail(f"{PEERS_DIR}/node_modules is missing: run `make setup` (npm ci there)")
    return node


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class RpcServer:
    """``server.js`` on 127.0.0.1, stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        protocol: Protocol,
        label: str = "v1",
        *,
        port: int | None = None,
        interface: str = DEFAULT_INTERFACE,
        version: str = DEFAULT_VERSION,
        group: str = "",
        delay_ms: int = 0,
        fail_methods: Iterable[str] = (),
        ready_timeout: float = 15.0,
    ) -> None:
        self.protocol = protocol
        self.label = label
        self.interface = interface
        self.version = version
        self.group = group
        self.delay_ms = delay_ms
        self.fail_methods = tuple(fail_methods)
        self.ready_timeout = ready_timeout
        self._port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self._stderr: IO[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the RPC server has not started yet")
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        options = {
            "protocol": self.protocol,
            "port": self._port or 0,
            "label": self.label,
            "interface": self.interface,
            "version": self.version,
            "group": self.group,
            "delay-ms": self.delay_ms,
        }
        cmd = [
            node_binary(),
            str(SERVER_JS),
            *(f"--{name}={value}" for name, value in options.items()),
        ]
        return cmd + [f"--fail-method={method}" for method in self.fail_methods]

    def start(self) -> None:
        """Start the server (on the port it had before, if it ran already) and wait for it
        to print ``READY <port>``."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"the {self.protocol} server {self.label} is already running")
        self._close_stderr()
        # A file, not a pipe: nobody drains the server's stderr while the test runs.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__/start)
        self.stopped = False
        self.proc = subprocess.Popen(
            self.command(),
            cwd=PEERS_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            self._port = self._wait_ready(self.proc)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> int:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + self.ready_timeout
        seen = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"the {self.protocol} server {self.label} did not print READY within "
                        f"{self.ready_timeout}s\n{self.stderr()}"
                    )
                if not selector.select(remaining):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = proc.wait()
                    raise RuntimeError(
                        f"the {self.protocol} server {self.label} exited with {code} before "
                        f"it was ready:\n{self.stderr()}"
                    )
                seen += chunk
        line = seen.split(b"\n", 1)[0].decode(errors="replace")
        match = _READY.fullmatch(line.strip())
        if match is None:
            raise RuntimeError(f"unexpected first line from server.js: {line!r}\n{self.stderr()}")
        return int(match.group(1))

    def stderr(self) -> str:
        """What the server has written to stderr so far (its warnings and errors)."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def died(self) -> bool:
        """Whether the server exited on its own (not by ``stop``)."""
        return self.proc is not None and not self.stopped and self.proc.poll() is not None

    def check_alive(self) -> None:
        if self.died():
            assert self.proc is not None
            raise RuntimeError(
                f"the {self.protocol} server {self.label} died with {self.proc.returncode}:\n"
                f"{_tail(self.stderr())}"
            )

    def stop(self) -> None:
        """Stop the server by PID: SIGTERM, then SIGKILL after 5 s. The port is kept."""
        if self.proc is not None:
            stop_process(self.proc, timeout=5.0)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.stopped = True  # on purpose: not "died"

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> RpcServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        died = self.died()
        try:
            self.stop()
            if died:
                assert self.proc is not None
                report = (
                    f"the {self.protocol} server {self.label} died during the test with "
                    f"{self.proc.returncode}:\n{_tail(self.stderr())}"
                )
                if exc is None:
                    raise RuntimeError(report)
                exc.add_note(report)
        finally:
            self._close_stderr()


def run_client(
    protocol: Protocol,
    address: str | int,
    *,
    interface: str = DEFAULT_INTERFACE,
    method: str = "sayHello",
    args: Sequence[Any] = (),
    count: int = 1,
    concurrency: int = 1,
    timeout_ms: int = 3000,
    attachments: Mapping[str, str] | None = None,
    version: str = DEFAULT_VERSION,
    group: str = "",
    heartbeat: bool = False,
    plain_header: bool = False,
) -> ClientReport:
    """Run ``client.js`` once against ``address`` (``"host:port"``, or a port on
    127.0.0.1): ``count`` calls of ``method(*args)`` with at most ``concurrency`` in flight,
    over one connection. ``plain_header`` (Bolt) sends requests as an unmodified
    sofa-rpc-node client does, the method only in the content, not in the header map.
    Call failures are in the report's ``errors``; a client that cannot run (bad arguments,
    a crash, no report) raises with its stderr."""
    target = f"127.0.0.1:{address}" if isinstance(address, int) else address
    options = {
        "protocol": protocol,
        "address": target,
        "interface": interface,
        "version": version,
        "group": group,
        "method": method,
        "args": json.dumps(list(args)),
        "count": count,
        "concurrency": concurrency,
        "timeout-ms": timeout_ms,
    }
    # --name=value, so that values starting with a dash stay values.
    cmd = [node_binary(), str(CLIENT_JS), *(f"--{name}={value}" for name, value in options.items())]
    cmd += [f"--attachment={key}={value}" for key, value in (attachments or {}).items()]
    if heartbeat:
        cmd.append("--heartbeat")
    if plain_header:
        cmd.append("--plain-bolt-header")
    # Generous: node's start-up, the calls one batch after another, each up to its timeout.
    batches = -(-count // max(concurrency, 1))
    deadline = 20.0 + (batches + 1) * timeout_ms / 1000
    try:
        done = subprocess.run(
            cmd, cwd=PEERS_DIR, capture_output=True, text=True, timeout=deadline, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"client.js did not finish within {deadline:.0f}s: {err}") from err
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"client.js exited with {done.returncode}\nstdout: {done.stdout}\n"
            f"stderr: {_tail(done.stderr)}"
        )
    try:
        report = json.loads(lines[-1])
    except json.JSONDecodeError as err:
        raise RuntimeError(
            f"client.js printed no JSON report ({err})\nstdout: {done.stdout}\n"
            f"stderr: {_tail(done.stderr)}"
        ) from err
    return cast(ClientReport, report)


def whoami(protocol: Protocol, address: str | int, **options: Any) -> dict[str, Any]:
    """Call ``whoami()`` once and decode its answer: label, protocol, interface, version,
    group, port, pid, served, service, attachments, headers (Bolt) and timeout (Bolt)."""
    report = run_client(protocol, address, method="whoami", **options)
    if report["ok"] != 1:
        raise AssertionError(f"whoami failed: {report['errors']}")
    return cast(dict[str, Any], json.loads(report["results"][0]))
