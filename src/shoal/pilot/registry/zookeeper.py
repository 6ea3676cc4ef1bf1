"""ZooKeeper as a registry, in the layout Apache Dubbo writes: the providers of each
interface, so that Dubbo services join the mesh without changing how they register.

Dubbo keeps, under its root (``/dubbo``), one persistent node per interface and under it
``providers``, whose children are ephemeral nodes named by a URL-encoded provider URL::

    /dubbo/org.apache.dubbo.demo.DemoService/providers/
        dubbo%3A%2F%2F192.168.1.5%3A20880%2Forg.apache.dubbo.demo.DemoService%3F...

Each interface with providers becomes a service on Dubbo's default port, 20880, whatever
ports its providers listen on (protocol DUBBO when every provider speaks ``dubbo://``, TCP
for a mix of schemes); each provider becomes an instance at its own address and port. The
URL's scheme (``dubbo``, ``tri``, ...) and the parameters that select a subset
(``version``, ``group``, ``application``, ...) become labels, ``weight`` the instance
weight. ``consumers``, ``configurators`` and ``routers`` are not read.

kazoo runs its own threads: watches and connection states only note what to re-read and
wake the event loop (``call_soon_threadsafe``); reads run in the executor, and the view is
changed on the loop's thread only.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.protocol.states import EventType
from kazoo.retry import KazooRetry

from shoal.pilot.model import (
    AppProtocol,
    Instance,
    Registry,
    RegistrySnapshot,
    Service,
    ServicePort,
    labels_of,
)

log = logging.getLogger("shoal.pilot.registry.zookeeper")

DUBBO_PORT = 20880
DEFAULT_WEIGHT = 100
MAX_WEIGHT = 65535  # as the embedded registry: many endpoints still fit Envoy's uint32 sum
RETRY_DELAY = 5.0  # after a failed read on a live connection
LABEL_PARAMS = ("application", "version", "group", "side", "release", "dubbo.tag")


class ZooKeeperRegistry(Registry):
    """Dubbo providers registered in ZooKeeper, as services and instances."""

    def __init__(self, hosts: str = "127.0.0.1:2181", root: str = "/dubbo") -> None:
        self.name = f"zookeeper://{hosts}{root}"
        self._hosts = hosts
        self._base = "/" + root.strip("/") if root.strip("/") else ""  # child paths' prefix
        self._root = self._base or "/"
        self._interfaces: set[str] = set()  # the root's children, as last read
        self._providers: dict[str, tuple[Instance, ...]] = {}  # by interface
        self._snapshot: RegistrySnapshot | None = None
        # What to read next, noted by watches and connection states.
        self._wake = asyncio.Event()
        self._connected = False
        self._resync = True
        self._root_dirty = False
        self._dirty: set[str] = set()

    def snapshot(self) -> RegistrySnapshot:
        if self._snapshot is None:
            services = []
            instances: list[Instance] = []
            for interface in sorted(self._providers):
                providers = self._providers[interface]
                ports = (ServicePort(DUBBO_PORT, "dubbo", _protocol(providers)),)
                services.append(Service(interface, ports, source=self.name))
                instances.extend(providers)
            self._snapshot = RegistrySnapshot(tuple(services), tuple(instances))
        return self._snapshot

    async def run(self, changed: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()

        def on_state(state: str) -> None:
            loop.call_soon_threadsafe(self._on_state, state)

        def on_watch(event: Any) -> None:
            if event.type != EventType.NONE:  # NONE: a connection state, seen by on_state
                loop.call_soon_threadsafe(self._on_watch, event.path)

        # kazoo reconnects by itself, with this backoff, for as long as the client runs.
        retry = KazooRetry(max_tries=-1, delay=0.5, backoff=2, max_delay=5.0)
        client = KazooClient(hosts=self._hosts, connection_retry=retry)
        client.add_listener(on_state)
        try:
            await loop.run_in_executor(None, client.start_async)
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._connected:
                    continue
                try:
                    updated = await self._sync(client, on_watch)
                except KazooException as exc:
                    # Mostly a dropped connection, whose return wakes a full read; anything
                    # else (say, an ACL) is tried again later.
                    log.warning("%s: %r; keeping the last view", self.name, exc)
                    self._resync = True
                    loop.call_later(RETRY_DELAY, self._wake.set)
                    continue
                if updated:
                    changed()
        finally:
            client.remove_listener(on_state)  # a clean stop is no outage to report
            await loop.run_in_executor(None, _stop, client)

    def _on_state(self, state: str) -> None:
        self._connected = state == KazooState.CONNECTED
        if self._connected:
            # Watches may have been lost with the session, and events with the connection.
            self._resync = True
            self._wake.set()
        else:
            log.warning("%s: %s; keeping the last view", self.name, state.lower())

    def _on_watch(self, path: str) -> None:
        if path == self._root:
            self._root_dirty = True
        else:  # <root>/<interface>/providers
            self._dirty.add(path.removeprefix(self._base + "/").removesuffix("/providers"))
        self._wake.set()

    async def _sync(self, client: KazooClient, watch: Callable[[Any], None]) -> bool:
        """Read what watches or a reconnection marked; returns whether the view changed."""
        loop = asyncio.get_running_loop()
        full, self._resync = self._resync, False
        read_root, self._root_dirty = full or self._root_dirty, False
        dirty, self._dirty = self._dirty, set()
        if read_root:
            children = await loop.run_in_executor(None, _children, client, self._root, watch)
            interfaces = set(children)
            dirty |= interfaces if full else interfaces - self._interfaces
            self._interfaces = interfaces
        stale = [interface for interface in self._providers if interface not in self._interfaces]
        wanted = sorted(dirty & self._interfaces)
        paths = [f"{self._base}/{interface}/providers" for interface in wanted]
        nodes = await asyncio.gather(
            *(loop.run_in_executor(None, _children, client, path, watch) for path in paths)
        )
        before = self.snapshot()
        for interface in stale:
            del self._providers[interface]
        for interface, names in zip(wanted, nodes, strict=True):
            instances = self._parse_providers(interface, names)
            if instances:
                self._providers[interface] = instances
            else:
                self._providers.pop(interface, None)
        self._snapshot = None
        return self.snapshot() != before

    def _parse_providers(self, interface: str, names: Iterable[str]) -> tuple[Instance, ...]:
        instances = []
        for name in sorted(names):
            try:
                instances.append(parse_provider(interface, name, self.name))
            except ValueError as exc:
                log.warning("%s: ignoring provider %s of %s: %s", self.name, name, interface, exc)
        return tuple(instances)


def _protocol(providers: Iterable[Instance]) -> AppProtocol:
    """DUBBO when every provider speaks Dubbo's own protocol: the proxy then routes its calls
    by method. Other schemes (``tri://``, ``rest://``, ...) speak something else on the same
    port, so a mix stays TCP, proxied as bytes."""
    dubbo = all(dict(p.labels).get("protocol") == "dubbo" for p in providers)
    return "DUBBO" if dubbo else "TCP"


def parse_provider(interface: str, node: str, source: str) -> Instance:
    """The instance a provider node stands for. Decoded as Dubbo does: the node name once
    (Java's URLEncoder, so ``+`` is a space), the parameters then taken as they are."""
    url = urllib.parse.urlsplit(urllib.parse.unquote_plus(node))
    if not url.scheme or not url.hostname or not url.port:
        raise ValueError("not a provider URL with a host and port")
    params = dict(pair.partition("=")[::2] for pair in url.query.split("&"))
    labels = {"protocol": url.scheme} | {k: params[k] for k in LABEL_PARAMS if params.get(k)}
    weight = params.get("weight", str(DEFAULT_WEIGHT))
    if not (weight.isascii() and weight.isdigit()):
        raise ValueError(f"weight {weight!r} is not a non-negative integer")
    return Instance(
        host=interface,
        service_port=DUBBO_PORT,
        address=url.hostname,
        port=url.port,
        labels=labels_of(labels),
        # Dubbo sends a weight-0 provider nothing (while others have weight): unhealthy
        # says the same to the proxies, which need a weight of at least 1.
        weight=min(max(int(weight), 1), MAX_WEIGHT),
        healthy=int(weight) > 0,
        source=source,
    )


def _children(client: KazooClient, path: str, watch: Callable[[Any], None]) -> list[str]:
    """The children of ``path``, watched for change; none for a missing path, watched for
    its creation (a consumer may create an interface node before any provider comes)."""
    while True:
        try:
            children: list[str] = client.get_children(path, watch=watch)
            return children
        except NoNodeError:
            if client.exists(path, watch=watch) is None:
                return []


def _stop(client: KazooClient) -> None:
    client.stop()
    client.close()
