"""ZooKeeperRegistry against a real ZooKeeper, with the nodes written as Dubbo writes them:
persistent interface and category nodes, one ephemeral URL-encoded node per provider."""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from tests.integration.registry_servers import Running, ZooKeeperServer, start_zookeeper

from shoal.pilot.model import Instance, RegistrySnapshot, Service, ServicePort
from shoal.pilot.registry.zookeeper import ZooKeeperRegistry

DEMO = "org.apache.dubbo.demo.DemoService"
DEMO_PROVIDER = (
    "dubbo://192.168.1.5:20880/org.apache.dubbo.demo.DemoService?anyhost=true"
    "&application=demo-provider&interface=org.apache.dubbo.demo.DemoService"
    "&methods=sayHello,sayHelloAsync&side=provider&version=1.0.0&group=g1&weight=100"
)


@pytest.fixture(scope="module")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with start_zookeeper(tmp_path_factory.mktemp("zookeeper")) as hosts:
        yield hosts


@pytest.fixture
def root(request: pytest.FixtureRequest) -> str:
    """Each test its own Dubbo root on the shared server."""
    return f"/{request.node.name}"


class DubboProcess:
    """What a Dubbo application does in ZooKeeper: its own session, persistent interface
    and category nodes, an ephemeral node per registered URL."""

    def __init__(self, hosts: str, root: str) -> None:
        self.root = root
        self.client = KazooClient(hosts=hosts)
        self.client.start(timeout=10)

    def register(self, url: str, category: str = "providers") -> str:
        interface = urllib.parse.urlsplit(url).path.strip("/")
        parent = f"{self.root}/{interface}/{category}"
        self.client.ensure_path(parent)
        for other in ("configurators", "routers"):
            self.client.ensure_path(f"{self.root}/{interface}/{other}")
        path = f"{parent}/{urllib.parse.quote_plus(url, safe='')}"  # as Java's URLEncoder
        self.client.create(path, ephemeral=True)
        return path

    def unregister(self, path: str) -> None:
        self.client.delete(path)

    def exit(self) -> None:
        """Close the session, as a process that exits does; ZooKeeper drops its nodes."""
        self.client.stop()
        self.client.close()


def provider(
    ip: str = "192.168.1.5", port: int = 20880, scheme: str = "dubbo", **params: str
) -> str:
    query = {
        "anyhost": "true",
        "application": "demo-provider",
        "interface": DEMO,
        "methods": "sayHello,sayHelloAsync",
        "side": "provider",
        "version": "1.0.0",
        "group": "g1",
        "weight": "100",
        "timestamp": "1700000000000",
        "pid": "4242",
    } | params
    # Dubbo writes parameter values as they are (methods=a,b), and encodes the whole URL.
    return f"{scheme}://{ip}:{port}/{DEMO}?" + "&".join(f"{k}={v}" for k, v in query.items())


def scenario(registry: ZooKeeperRegistry, test: Callable[[Running], Awaitable[None]]) -> None:
    """Run ``test`` with ``registry`` running, in a fresh event loop (the project runs async
    tests with ``asyncio.run``). Blocking kazoo calls in ``test`` stall the loop only briefly."""

    async def main() -> None:
        async with Running(registry) as running:
            await asyncio.wait_for(test(running), 20)

    asyncio.run(main())


def test_dubbo_providers_become_a_service_and_instances(zookeeper: str) -> None:
    root = "/dubbo"
    registry = ZooKeeperRegistry(zookeeper)
    assert registry.name == f"zookeeper://{zookeeper}/dubbo"
    app = DubboProcess(zookeeper, root)

    async def test(running: Running) -> None:
        # The registry starts before Dubbo has created its root.
        await asyncio.sleep(0.3)
        app.register(provider(scheme="consumer", side="consumer"), "consumers")  # not read
        app.register(DEMO_PROVIDER)
        app.register(provider("192.168.1.6", 50051, scheme="tri", version="2.0.0", weight="300"))
        view = await running.until(lambda s: len(s.instances) == 2)
        assert running.changes >= 1
        assert view.services == (
            Service(DEMO, (ServicePort(20880, "dubbo", "TCP"),), source=registry.name),
        )
        dubbo, tri = sorted(view.instances, key=lambda i: i.port)
        assert dubbo == Instance(
            host=DEMO,
            service_port=20880,
            address="192.168.1.5",
            port=20880,
            labels=(
                ("application", "demo-provider"),
                ("group", "g1"),
                ("protocol", "dubbo"),
                ("side", "provider"),
                ("version", "1.0.0"),
            ),
            weight=100,
            source=registry.name,
        )
        assert (tri.address, tri.port, tri.service_port, tri.weight) == (
            "192.168.1.6",
            50051,
            20880,
            300,
        )
        assert tri.label_map()["protocol"] == "tri"
        assert tri.label_map()["version"] == "2.0.0"

    try:
        scenario(registry, test)
    finally:
        app.exit()


def test_change_and_removal(zookeeper: str, root: str) -> None:
    registry = ZooKeeperRegistry(zookeeper, root)
    app = DubboProcess(zookeeper, root)

    async def test(running: Running) -> None:
        first = app.register(provider())
        await running.until(lambda s: len(s.instances) == 1)
        changes = running.changes

        # Dubbo changes a provider by replacing its node: new version, weight and port.
        app.unregister(first)
        second = app.register(provider(port=20881, version="1.1.0", weight="50"))
        view = await running.until(lambda s: len(s.instances) == 1 and s.instances[0].port == 20881)
        assert view.instances[0].weight == 50
        assert view.instances[0].label_map()["version"] == "1.1.0"
        assert running.changes > changes

        # A weight-0 provider takes no traffic in Dubbo: unhealthy here.
        app.unregister(second)
        third = app.register(provider(weight="0"))
        view = await running.until(lambda s: bool(s.instances) and not s.instances[0].healthy)
        assert view.instances[0].weight == 1

        # The last provider gone, the service goes too.
        changes = running.changes
        app.unregister(third)
        await running.until(lambda s: s == RegistrySnapshot())
        assert running.changes == changes + 1

    try:
        scenario(registry, test)
    finally:
        app.exit()


def test_providers_vanish_with_their_session(zookeeper: str, root: str) -> None:
    registry = ZooKeeperRegistry(zookeeper, root)
    leaving = DubboProcess(zookeeper, root)
    staying = DubboProcess(zookeeper, root)

    async def test(running: Running) -> None:
        leaving.register(provider("10.0.0.1"))
        staying.register(provider("10.0.0.2"))
        await running.until(lambda s: len(s.instances) == 2)
        leaving.exit()
        view = await running.until(lambda s: len(s.instances) == 1)
        assert view.instances[0].address == "10.0.0.2"

    try:
        scenario(registry, test)
    finally:
        staying.exit()


def test_interface_known_from_a_consumer_before_any_provider(zookeeper: str, root: str) -> None:
    """A consumer may create the interface node first; the ``providers`` node that comes
    later must still be noticed."""
    registry = ZooKeeperRegistry(zookeeper, root)
    app = DubboProcess(zookeeper, root)
    app.register(provider(scheme="consumer", side="consumer"), "consumers")

    async def test(running: Running) -> None:
        await asyncio.sleep(0.3)
        assert registry.snapshot() == RegistrySnapshot()
        app.register(provider())
        await running.until(lambda s: len(s.instances) == 1)

    try:
        scenario(registry, test)
    finally:
        app.exit()


def test_malformed_providers_are_skipped_with_a_warning(
    zookeeper: str, root: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = ZooKeeperRegistry(zookeeper, root)
    app = DubboProcess(zookeeper, root)
    app.register(provider())
    app.client.create(f"{root}/{DEMO}/providers/garbage", ephemeral=True)
    app.register(provider("192.168.1.7", weight="heavy"))

    async def test(running: Running) -> None:
        view = await running.until(lambda s: len(s.instances) == 1)
        assert view.instances[0].address == "192.168.1.5"

    try:
        with caplog.at_level(logging.WARNING, logger="shoal.pilot.registry.zookeeper"):
            scenario(registry, test)
    finally:
        app.exit()
    assert "ignoring provider garbage" in caplog.text
    assert "weight 'heavy'" in caplog.text


@pytest.mark.slow
def test_server_restart_keeps_the_view_and_resyncs(tmp_path: Path) -> None:
    server = ZooKeeperServer(tmp_path / "zookeeper")
    registry = ZooKeeperRegistry(server.hosts)

    async def test(running: Running) -> None:
        app = DubboProcess(server.hosts, "/dubbo")
        try:
            app.register(provider("10.0.0.1"))
            before = await running.until(lambda s: len(s.instances) == 1)
            server.stop()
            await asyncio.sleep(1.0)
            assert registry.snapshot() == before
            await asyncio.get_running_loop().run_in_executor(None, server.start)
            # The session (and its ephemeral node) outlives a short outage; what changes
            # after it is seen.
            app.register(provider("10.0.0.2"))
            # both clients (ours and the app's) reconnect on their own back-off (up to 5 s
            # between tries) to a JVM that is still starting: 10 s was seen to be too tight
            await running.until(lambda s: len(s.instances) == 2, timeout=30.0)
        finally:
            app.exit()
        await running.until(lambda s: s == RegistrySnapshot())

    try:
        scenario(registry, test)
    finally:
        server.stop()
