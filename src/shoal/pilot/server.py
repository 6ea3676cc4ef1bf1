"""``shoal pilot``: registries and rules in, one debounced translation, xDS out.

Every source (each registry, the config dir, connected sidecars) reports "something
changed"; pilot waits for a quiet ``debounce`` (at most ``max_delay`` after the first
change), translates once and publishes the snapshot; the ADS sessions then send each client
only what changed for it. An invalid rule set is logged with its file, resource and field,
and the last valid one stays in force, so a typo never reaches a proxy.

The same HTTP address serves what the proxies report (:mod:`.telemetry`: metrics, the
merged tap) and the dashboard's files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import uvloop

from shoal.errors import ShoalError
from shoal.net import split_address
from shoal.pilot.api.model import (
    BackupRequestPolicy,
    CircuitBreakerPolicy,
    DestinationRule,
    RateLimitPolicy,
    RpcRoute,
    RuleSet,
    ServiceEntry,
    VirtualService,
    WorkloadEntry,
)
from shoal.pilot.api.parse import resource_id
from shoal.pilot.api.store import ConfigDir, source_file
from shoal.pilot.http import Handler, Reply, Routes, json_reply, serve_http, static_routes
from shoal.pilot.model import MergedRegistries, Registry
from shoal.pilot.registry.embedded import EmbeddedRegistry
from shoal.pilot.registry.files import FilesRegistry
from shoal.pilot.registry.proxies import ConnectedProxies
from shoal.pilot.rest import registry_routes, services_json
from shoal.pilot.telemetry import ProxyInfo, Telemetry, telemetry_routes
from shoal.pilot.translate import MeshSnapshot, Translator
from shoal.pilot.xds import AggregatedDiscovery, Mesh, add_to_server

log = logging.getLogger("shoal.pilot")

DEFAULT_REGISTRY_PATH = "~/.local/state/shoal/registry.db"
DASHBOARD = Path(__file__).parent / "dashboard" / "dist"


class StartError(ShoalError):
    """Pilot cannot start: an address in use, a bad registry spec."""


@dataclass(frozen=True, slots=True)
class Settings:
    config_dir: str
    xds_address: str = "127.0.0.1:15010"
    http_address: str = "127.0.0.1:15014"
    registries: tuple[str, ...] = ("embedded",)
    debounce: float = 0.1
    max_delay: float = 1.0
    watch_interval: float = 0.5
    grace: float = 1.0
    scrape_interval: float = 5.0
    metrics_retention: float = 900.0
    prometheus: str = ""  # answer the metrics API from this Prometheus, not the store


def _keep_last_valid(running: RuleSet, loaded: RuleSet) -> RuleSet:
    """``loaded``, plus the running resources of files that now have errors which the new
    load no longer has (by kind, namespace and name)."""
    present = {resource_id(r) for r in loaded.resources()}
    kept = [
        r
        for r in running.resources()
        if source_file(r) in loaded.failed_files and resource_id(r) not in present
    ]
    if not kept:
        return loaded
    return replace(
        loaded,
        **{
            name: getattr(loaded, name) + tuple(r for r in kept if isinstance(r, kind))
            for name, kind in _KINDS.items()
        },
    )


_KINDS = {
    "virtual_services": VirtualService,
    "destination_rules": DestinationRule,
    "service_entries": ServiceEntry,
    "workload_entries": WorkloadEntry,
    "circuit_breakers": CircuitBreakerPolicy,
    "rate_limits": RateLimitPolicy,
    "backup_requests": BackupRequestPolicy,
    "rpc_routes": RpcRoute,
}


def registry_from_spec(spec: str) -> Registry:
    """``embedded[:PATH]``, ``etcd://HOST:PORT[/PREFIX]``, ``zookeeper://HOSTS[/ROOT]``."""
    if spec == "embedded" or spec.startswith("embedded:"):
        path = Path(spec.partition(":")[2] or DEFAULT_REGISTRY_PATH).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return EmbeddedRegistry(str(path))
    scheme, sep, rest = spec.partition("://")
    if sep and scheme in ("etcd", "zookeeper"):
        where, slash, root = rest.partition("/")
        if scheme == "etcd":
            from shoal.pilot.registry.etcd import EtcdRegistry  # noqa: PLC0415 (optional client)

            return EtcdRegistry(where, f"/{root}" if slash else "/shoal")
        from shoal.pilot.registry.zookeeper import ZooKeeperRegistry  # noqa: PLC0415

        return ZooKeeperRegistry(where, f"/{root}" if slash else "/dubbo")
    raise StartError(
        f"unknown registry {spec!r} (use embedded[:PATH], etcd://HOST:PORT[/PREFIX] or "
        "zookeeper://HOST:PORT[,HOST:PORT...][/ROOT])"
    )


class Pilot:
    def __init__(self, settings: Settings, registries: list[Registry]) -> None:
        self.settings = settings
        self.registries = registries
        self.rules = RuleSet()
        self.rule_errors: tuple[str, ...] = ()
        self.pushes = 0
        self.proxies = ConnectedProxies()
        self.files = FilesRegistry()
        self.merged = MergedRegistries([*self.registries, self.files, self.proxies])
        self.config_dir = ConfigDir(self.settings.config_dir)
        self.translator = Translator()
        self._load_rules(self.config_dir.load())
        self.mesh = Mesh(self._translate(()))
        self._timer: asyncio.TimerHandle | None = None
        self._first_change = 0.0
        self.ready = False
        try:
            self.telemetry = Telemetry(
                self.connected_proxies,
                interval=settings.scrape_interval,
                retention=settings.metrics_retention,
                prometheus=settings.prometheus or None,
                vhost_services=self.vhost_services,
            )
        except ValueError as exc:
            raise StartError(f"--prometheus: {exc}") from None

    def vhost_services(self) -> dict[str, str]:
        """The current snapshot's virtual hosts' services (the latest, not the one at start)."""
        return self.mesh.snapshot.vhost_services()

    def connected_proxies(self) -> list[ProxyInfo]:
        """Every client with an xDS stream, once (a proxy's workers each hold a stream)."""
        found: dict[tuple[str, tuple[str, int] | None], ProxyInfo] = {}
        for session in self.mesh.sessions:
            node = session.node
            if node is not None and (node.id, session.admin) not in found:
                found[node.id, session.admin] = ProxyInfo(
                    node=node.id,
                    service=node.service,
                    labels=node.labels,
                    admin=session.admin,
                    user_agent=node.user_agent,
                )
        return sorted(found.values(), key=lambda p: (p.node, p.admin_text or ""))

    # change handling ------------------------------------------------------------------------

    def changed(self) -> None:
        """Debounce: translate after ``debounce`` of quiet, or ``max_delay`` after the first
        change of a burst, whichever comes first."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._timer is None:
            self._first_change = now
        else:
            self._timer.cancel()
        delay = min(self.settings.debounce, self._first_change + self.settings.max_delay - now)
        self._timer = loop.call_later(max(delay, 0.0), self.push)

    def push(self) -> None:
        self._timer = None
        snapshot = self._translate(self.mesh.snapshot.errors)
        self.mesh.publish(snapshot)
        self.pushes += 1
        log.info(
            "push %d: %d services, %d clusters, %d clients",
            self.mesh.version,
            len(snapshot.services),
            len(snapshot.clusters),
            len(self.mesh.sessions),
        )

    def _translate(self, logged: tuple[str, ...]) -> MeshSnapshot:
        """Translate the mesh; log the rules it finds invalid that are not in ``logged``
        (an RpcRoute on a service without an RPC port: the services make it so)."""
        snapshot = self.translator.translate(self.merged.snapshot(), self.rules)
        for error in sorted(set(snapshot.errors) - set(logged)):
            log.error("rules rejected: %s", error)
        return snapshot

    def _load_rules(self, rules: RuleSet) -> bool:
        """Take a new rule set; returns whether it differs from the running one.

        A file with an error keeps its last valid resources (the rejected ones are logged
        with file, resource, field and reason and never reach a proxy); every other file
        applies as it is now, so one typo does not block unrelated changes."""
        self.rule_errors = rules.errors
        for error in rules.errors:
            log.error("rules rejected: %s", error)
        if rules.failed_files:
            rules = _keep_last_valid(self.rules, rules)
            log.error(
                "%d error(s) in %s: the last valid resources of %s stay in force",
                len(rules.errors),
                self.settings.config_dir,
                ", ".join(sorted(rules.failed_files)),
            )
        if rules == self.rules:
            return False
        self.rules = rules
        self.files.update(rules)
        return True

    def _rules_changed(self, rules: RuleSet) -> None:
        if self._load_rules(rules):
            self.changed()

    # serving --------------------------------------------------------------------------------

    def http_routes(self) -> Routes:
        async def ready(method: str, path: str, query: str, body: bytes) -> Reply:
            return (200 if self.ready else 503), "text/plain", b"LIVE\n" if self.ready else b"\n"

        async def debug(method: str, path: str, query: str, body: bytes) -> Reply:
            return json_reply(
                200,
                {
                    "version": self.mesh.version,
                    "pushes": self.pushes,
                    "nacks": self.mesh.nacks,
                    "clients": sorted(s.label() for s in self.mesh.sessions if s.node is not None),
                    "streams": sorted(
                        (s.status() for s in self.mesh.sessions if s.node is not None),
                        key=lambda status: (status["node"], status["peer"]),
                    ),
                    "rule_errors": [*self.rule_errors, *self.mesh.snapshot.errors],
                    "services": services_json(self.merged.snapshot()),
                },
            )

        routes: dict[tuple[str, str], Handler] = {
            ("GET", "/ready"): ready,
            ("GET", "/debug/mesh"): debug,
        }
        embedded = next((r for r in self.registries if isinstance(r, EmbeddedRegistry)), None)
        if embedded is not None:
            routes.update(registry_routes(embedded, self.merged.snapshot))
        routes.update(telemetry_routes(self.telemetry))
        routes.update(static_routes(DASHBOARD, "dashboard not built: run make setup"))
        return routes

    async def serve(self, stop: asyncio.Event) -> None:
        try:
            xds_host, xds_port = split_address(self.settings.xds_address)
            http_host, http_port = split_address(self.settings.http_address)
        except ValueError as exc:
            raise StartError(str(exc)) from None
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                # a fleet reconnecting at once (pilot restarted) must not be refused
                ("grpc.server.max_pending_requests", 20_000),
                ("grpc.server.max_pending_requests_hard_limit", 40_000),
            ]
        )
        add_to_server(
            server,
            AggregatedDiscovery(self.mesh, self.proxies.connected, self.proxies.disconnected),
        )
        try:
            bound = server.add_insecure_port(f"{xds_host}:{xds_port}")
        except RuntimeError:
            bound = 0
        if not bound:
            raise StartError(f"cannot listen on {self.settings.xds_address} (xDS)")
        try:
            http = await serve_http(http_host, http_port, self.http_routes())
        except OSError as exc:
            raise StartError(f"cannot listen on {self.settings.http_address}: {exc}") from exc
        await server.start()
        tasks = [asyncio.create_task(r.run(self.changed)) for r in self.merged.registries]
        tasks.append(
            asyncio.create_task(
                self.config_dir.watch(self._rules_changed, self.settings.watch_interval)
            )
        )
        if self.telemetry.scraper is not None:
            tasks.append(asyncio.create_task(self.telemetry.scraper.run()))
        self.ready = True
        log.info(
            "shoal pilot ready: xDS on %s:%d, HTTP on %s (pid %d)",
            xds_host,
            bound,
            self.settings.http_address,
            os.getpid(),
        )
        try:
            await stop.wait()
        finally:
            self.ready = False
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            http.close()
            await server.stop(self.settings.grace)
            for registry in self.registries:
                registry.close()


async def _main(settings: Settings) -> int:
    try:
        registries = [registry_from_spec(spec) for spec in settings.registries]
    except ValueError as exc:
        raise StartError(f"--registry: {exc}") from None
    pilot = Pilot(settings, registries)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await pilot.serve(stop)
    return 0


def run_pilot(settings: Settings) -> int:
    try:
        # uvloop: a push is thousands of small task switches and gRPC writes, and the loop's
        # own cost per switch is most of pilot's CPU at scale.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_main(settings))
    except (StartError, ShoalError, OSError) as exc:
        log.error("shoal pilot cannot start: %s", exc)
        return 1
