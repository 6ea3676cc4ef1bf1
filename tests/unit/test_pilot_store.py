"""The config dir (ConfigDir.load and .watch) and the files registry, on real directories.

Files are written, renamed over and deleted the way editors and kubectl do it; the watcher
runs on a real event loop with a short poll interval.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from shoal.errors import ConfigError
from shoal.pilot.api.model import RuleSet
from shoal.pilot.api.store import ConfigDir
from shoal.pilot.model import Instance, RegistrySnapshot, Service, ServicePort
from shoal.pilot.registry.files import FilesRegistry

INTERVAL = 0.02


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def vs(name: str, host: str = "reviews", namespace: str = "default", **route: str) -> str:
    """A VirtualService document routing ``host`` to ``route['to']`` (default: ``host``),
    optionally to ``route['subset']``."""
    subset = f", subset: {route['subset']}" if "subset" in route else ""
    return textwrap.dedent(f"""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: {name}, namespace: {namespace}}}
        spec:
          hosts: [{host}]
          http:
          - route:
            - destination: {{host: {route.get("to", host)}{subset}}}
        """).lstrip()


def docs(*documents: str) -> str:
    return "---\n".join(documents)


def dr(name: str, host: str, *subsets: str, namespace: str = "default") -> str:
    listed = "".join(f"\n          - {{name: {s}, labels: {{version: {s}}}}}" for s in subsets)
    return textwrap.dedent(f"""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: {name}, namespace: {namespace}}}
        spec:
          host: "{host}"
          subsets: {"[]" if not subsets else ""}{listed}
        """).lstrip()


@pytest.fixture
def rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``rules`` directory, with the working directory set so sources read
    ``rules/<file>`` as they do for ``shoal analyze rules``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rules").mkdir()
    return Path("rules")


def names(ruleset: RuleSet) -> list[str]:
    every = (
        *ruleset.virtual_services,
        *ruleset.destination_rules,
        *ruleset.service_entries,
        *ruleset.workload_entries,
    )
    return sorted(f"{type(r).__name__}/{r.meta.name}@{r.meta.source}" for r in every)


# --- load ----------------------------------------------------------------------------------------


def test_reads_yaml_yml_json_lists_and_subdirectories(rules: Path) -> None:
    write(rules, "reviews.yaml", docs(vs("reviews"), dr("reviews", "reviews", "v1")))
    write(rules, "team/ratings.yml", vs("ratings", "ratings"))
    (rules / "vm.json").write_text(
        '{"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",'
        ' "metadata": {"name": "vm"}, "spec": {"address": "10.0.0.9"}}'
    )
    write(
        rules,
        "exported.yaml",
        """
        apiVersion: v1
        kind: List
        metadata: {resourceVersion: ""}
        items:
        - apiVersion: networking.istio.io/v1
          kind: ServiceEntry
          metadata: {name: api}
          spec: {hosts: [api.example.com], ports: [{number: 80, name: http}], resolution: DNS}
        - apiVersion: networking.istio.io/v1
          kind: ServiceEntry
          metadata: {name: db}
          spec: {hosts: [db.example.com], ports: [{number: 80, name: http}], resolution: DNS}
        """,
    )
    # Not read: hidden files and directories, editor leftovers, other extensions. Each would
    # be an error if it were.
    for junk in (".reviews.yaml.swp", "reviews.yaml~", ".#reviews.yaml", "#reviews.yaml#"):
        write(rules, junk, "not: [valid")
    write(rules, ".git/config.yaml", "not: [valid")
    write(rules, "notes.txt", "not: [valid")

    ruleset = ConfigDir(rules).load()

    assert ruleset.errors == ()
    assert names(ruleset) == [
        "DestinationRule/reviews@rules/reviews.yaml#1",
        "ServiceEntry/api@rules/exported.yaml#items[0]",
        "ServiceEntry/db@rules/exported.yaml#items[1]",
        "VirtualService/ratings@rules/team/ratings.yml",
        "VirtualService/reviews@rules/reviews.yaml#0",
        "WorkloadEntry/vm@rules/vm.json",
    ]


def test_one_bad_resource_does_not_reject_the_others(rules: Path) -> None:
    bad = vs("bad").replace("[reviews]", "reviews")
    write(rules, "mixed.yaml", docs(vs("one"), bad, vs("three", "three")))

    ruleset = ConfigDir(rules).load()

    assert names(ruleset) == [
        "VirtualService/one@rules/mixed.yaml#0",
        "VirtualService/three@rules/mixed.yaml#2",
    ]
    assert ruleset.errors == (
        "rules/mixed.yaml#1: VirtualService default/bad: spec.hosts: must be a list, not 'reviews'",
    )


def test_a_file_that_is_not_valid_yaml_is_one_error(rules: Path) -> None:
    write(rules, "a.yaml", vs("a", "a"))
    write(rules, "b.yaml", "spec:\n  hosts: [reviews\n")
    write(rules, "c.yaml", "a: 1\nb: 2\na: 3\n")
    (rules / "d.json").write_text('{"kind": }')
    (rules / "e.yaml").write_bytes(b"kind: \xff\xfe")
    (rules / "f.json").write_text('{"kind": "A", "kind": "B"}')

    ruleset = ConfigDir(rules).load()

    assert names(ruleset) == ["VirtualService/a@rules/a.yaml"]
    assert ruleset.errors == (
        "rules/b.yaml: invalid YAML at line 3, column 1: expected ',' or ']', but got "
        "'<stream end>'",
        "rules/c.yaml: invalid YAML at line 3, column 1: duplicate key 'a'",
        "rules/d.json: invalid JSON at line 1, column 10: Expecting value",
        "rules/e.yaml: not UTF-8 text: invalid start byte",
        "rules/f.json: invalid JSON: duplicate key 'kind'",
    )


def test_kinds_shoal_does_not_read_are_errors_not_crashes(rules: Path) -> None:
    write(
        rules,
        "all.yaml",
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        ---
        apiVersion: shoal.io/v1
        kind: RetryBudget
        metadata: {name: web, namespace: shop}
        ---
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: ingress}
        ---
        - just
        - a list
        ---
        """,
    )
    with (rules / "all.yaml").open("a") as file:
        file.write(vs("kept"))

    ruleset = ConfigDir(rules).load()

    assert names(ruleset) == ["VirtualService/kept@rules/all.yaml#4"]
    assert ruleset.errors == (
        "rules/all.yaml#0: Deployment default/web: unsupported kind Deployment (apps/v1); "
        "Shoal reads networking.istio.io and shoal.io/v1 resources",
        "rules/all.yaml#1: RetryBudget shop/web: kind: unknown kind 'RetryBudget' "
        "(Shoal's own: CircuitBreakerPolicy, RateLimitPolicy, BackupRequestPolicy, RpcRoute)",
        "rules/all.yaml#2: Gateway default/ingress: Gateway is not supported by Shoal",
        "rules/all.yaml#3: a resource must be a mapping, not a list",
    )


def test_a_bad_list_is_an_error(rules: Path) -> None:
    write(rules, "list.yaml", "apiVersion: v1\nkind: List\nitems: {a: 1}\n")
    write(rules, "other.yaml", "apiVersion: v1\nkind: List\nitem: []\n")

    assert ConfigDir(rules).load().errors == (
        "rules/list.yaml: List: items: must be a list",
        "rules/other.yaml: List: item: unknown field",
    )


def test_empty_files_and_documents_are_nothing(rules: Path) -> None:
    write(rules, "empty.yaml", "")
    write(rules, "separators.yaml", "---\n---\n" + vs("only") + "---\n")

    ruleset = ConfigDir(rules).load()

    assert ruleset.errors == ()
    assert names(ruleset) == ["VirtualService/only@rules/separators.yaml"]


def test_the_later_of_two_resources_with_one_name_is_rejected(rules: Path) -> None:
    write(rules, "a.yaml", vs("reviews"))
    write(rules, "b.yaml", vs("reviews", "other"))
    write(rules, "c.yaml", docs(vs("reviews", "third", namespace="prod"), dr("reviews", "x")))

    ruleset = ConfigDir(rules).load()

    assert ruleset.errors == (
        "rules/b.yaml: VirtualService default/reviews: already defined in rules/a.yaml",
    )
    assert names(ruleset) == [
        "DestinationRule/reviews@rules/c.yaml#1",
        "VirtualService/reviews@rules/a.yaml",
        "VirtualService/reviews@rules/c.yaml#0",
    ]


def test_a_route_to_an_undefined_subset_rejects_the_virtual_service(rules: Path) -> None:
    write(rules, "dr.yaml", dr("reviews", "reviews", "v1", "v2"))
    write(rules, "good.yaml", vs("good", subset="v2"))
    write(rules, "bad.yaml", vs("bad", "bad.example.com", to="reviews", subset="v3"))
    write(rules, "none.yaml", vs("none", "ratings", subset="v1"))

    ruleset = ConfigDir(rules).load()

    assert [v.meta.name for v in ruleset.virtual_services] == ["good"]
    assert [d.meta.name for d in ruleset.destination_rules] == ["reviews"]
    assert ruleset.errors == (
        "rules/bad.yaml: VirtualService default/bad: spec.http[0].route[0].destination.subset: "
        "subset 'v3' is not defined by DestinationRule default/reviews",
        "rules/none.yaml: VirtualService default/none: spec.http[0].route[0].destination.subset: "
        "subset 'v1': no DestinationRule for host ratings.default.svc.cluster.local",
    )


def test_a_rejected_destination_rule_defines_no_subsets(rules: Path) -> None:
    write(rules, "dr.yaml", dr("reviews", "reviews", "v1").replace("version: v1", "version: 1"))
    write(rules, "vs.yaml", vs("reviews", subset="v1"))

    ruleset = ConfigDir(rules).load()

    assert ruleset.virtual_services == ruleset.destination_rules == ()
    assert len(ruleset.errors) == 2


def test_subsets_follow_istio_host_rules(rules: Path) -> None:
    # Short names are qualified with the resource's namespace: this rule is for
    # reviews.prod.svc.cluster.local, not for the default namespace's reviews.
    write(rules, "prod.yaml", dr("reviews", "reviews", "v1", namespace="prod"))
    write(rules, "short.yaml", vs("short", subset="v1"))
    # A fully qualified host in the rule covers a short name in the route.
    write(rules, "fq.yaml", dr("ratings", "ratings.default.svc.cluster.local", "v1"))
    write(rules, "ratings.yaml", vs("ratings", "ratings", subset="v1"))
    # Wildcard rules apply, but the most specific host wins.
    write(rules, "wild.yaml", dr("wild", "*.example.com", "v1", "v2"))
    write(rules, "exact.yaml", dr("exact", "api.example.com", "v1"))
    write(rules, "api-v1.yaml", vs("api-v1", "api.example.com", subset="v1"))
    write(rules, "api-v2.yaml", vs("api-v2", "api.example.com", subset="v2"))
    write(rules, "web-v2.yaml", vs("web-v2", "web.example.com", subset="v2"))
    # Mirrors are checked like routes.
    write(
        rules,
        "mirror.yaml",
        vs("mirror", "ratings") + "    mirror: {host: ratings, subset: v9}\n",
    )

    ruleset = ConfigDir(rules).load()

    assert sorted(v.meta.name for v in ruleset.virtual_services) == [
        "api-v1",
        "ratings",
        "web-v2",
    ]
    assert sorted(ruleset.errors) == [
        "rules/api-v2.yaml: VirtualService default/api-v2: spec.http[0].route[0].destination."
        "subset: subset 'v2' is not defined by DestinationRule default/exact",
        "rules/mirror.yaml: VirtualService default/mirror: spec.http[0].mirror.subset: "
        "subset 'v9' is not defined by DestinationRule default/ratings",
        "rules/short.yaml: VirtualService default/short: spec.http[0].route[0].destination."
        "subset: subset 'v1': no DestinationRule for host reviews.default.svc.cluster.local",
    ]


def test_a_dangling_symlink_is_an_error(rules: Path) -> None:
    write(rules, "a.yaml", vs("a", "a"))
    (rules / "gone.yaml").symlink_to("nowhere.yaml")

    ruleset = ConfigDir(rules).load()

    assert names(ruleset) == ["VirtualService/a@rules/a.yaml"]
    assert ruleset.errors == ("rules/gone.yaml: cannot read: No such file or directory",)


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing: not a directory"):
        ConfigDir(tmp_path / "missing").load()


# --- watch ---------------------------------------------------------------------------------------


class Watcher:
    """ConfigDir.watch running as a task, with every RuleSet it reports."""

    def __init__(self, config: ConfigDir) -> None:
        self.seen: list[RuleSet] = []
        self.task = asyncio.create_task(config.watch(self.seen.append, INTERVAL))

    async def next(self, count: int, timeout: float = 5.0) -> RuleSet:
        """Wait until ``count`` RuleSets have been reported; the last one."""
        async with asyncio.timeout(timeout):
            while len(self.seen) < count:
                await asyncio.sleep(INTERVAL / 2)
        assert len(self.seen) == count
        return self.seen[-1]

    async def quiet(self, count: int) -> None:
        """Several polls pass and still only ``count`` RuleSets were reported."""
        await asyncio.sleep(INTERVAL * 10)
        assert len(self.seen) == count

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


def run(scenario: Callable[[], object]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_watch_reports_edits_new_files_and_deletions(rules: Path) -> None:
    reviews = write(rules, "reviews.yaml", vs("reviews"))
    config = ConfigDir(rules)
    config.load()

    async def scenario() -> None:
        watcher = Watcher(config)
        await watcher.quiet(0)  # nothing changed since load()

        reviews.write_text(textwrap.dedent(vs("reviews", "reviews.example.com")))
        first = await watcher.next(1)
        assert first.virtual_services[0].hosts == ("reviews.example.com",)

        write(rules, "sub/ratings.yaml", vs("ratings", "ratings"))
        assert len((await watcher.next(2)).virtual_services) == 2

        reviews.unlink()
        assert [v.meta.name for v in (await watcher.next(3)).virtual_services] == ["ratings"]
        await watcher.stop()

    run(scenario)


def test_watch_sees_a_file_replaced_by_rename_with_same_size_and_mtime(rules: Path) -> None:
    reviews = write(rules, "reviews.yaml", vs("reviews", "aaaa.example.com"))
    before = reviews.stat()
    config = ConfigDir(rules)
    config.load()

    async def scenario() -> None:
        watcher = Watcher(config)
        # What editors and kubectl do: write a temporary file, then rename it over the old.
        temporary = write(rules, ".reviews.yaml.tmp", vs("reviews", "bbbb.example.com"))
        os.utime(temporary, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert temporary.stat().st_size == before.st_size
        os.replace(temporary, reviews)
        assert (await watcher.next(1)).virtual_services[0].hosts == ("bbbb.example.com",)
        await watcher.stop()

    run(scenario)


def test_watch_is_silent_when_only_metadata_changes(rules: Path) -> None:
    reviews = write(rules, "reviews.yaml", vs("reviews"))
    config = ConfigDir(rules)
    config.load()

    async def scenario() -> None:
        watcher = Watcher(config)
        os.utime(reviews)  # touch
        reviews.write_text(reviews.read_text())  # rewritten, same content
        write(rules, "notes.txt", "not a rule")
        await watcher.quiet(0)
        await watcher.stop()

    run(scenario)


def test_watch_reports_new_errors_and_a_half_written_file_once_complete(rules: Path) -> None:
    write(rules, "reviews.yaml", vs("reviews"))
    config = ConfigDir(rules)
    config.load()
    full = textwrap.dedent(vs("ratings", "ratings"))

    async def scenario() -> None:
        watcher = Watcher(config)
        ratings = rules / "ratings.yaml"
        ratings.write_text(full[: full.index("http:")] + "  http:\n  - route:\n    - destin")
        half = await watcher.next(1)
        assert [v.meta.name for v in half.virtual_services] == ["reviews"]
        assert half.errors[0].startswith("rules/ratings.yaml: ")

        ratings.write_text(full)
        whole = await watcher.next(2)
        assert [v.meta.name for v in whole.virtual_services] == ["ratings", "reviews"]
        assert whole.errors == ()
        await watcher.stop()

    run(scenario)


def test_watch_without_load_reports_the_first_read(rules: Path) -> None:
    write(rules, "reviews.yaml", vs("reviews"))

    async def scenario() -> None:
        watcher = Watcher(ConfigDir(rules))
        assert len((await watcher.next(1)).virtual_services) == 1
        await watcher.quiet(1)
        await watcher.stop()

    run(scenario)


def test_watch_keeps_the_last_rules_while_the_directory_is_gone(rules: Path) -> None:
    write(rules, "reviews.yaml", vs("reviews"))
    config = ConfigDir(rules)
    config.load()

    async def scenario() -> None:
        watcher = Watcher(config)
        rules.rename("gone")
        await watcher.quiet(0)
        write(rules, "ratings.yaml", vs("ratings", "ratings"))
        assert [v.meta.name for v in (await watcher.next(1)).virtual_services] == ["ratings"]
        await watcher.stop()

    run(scenario)


def test_watch_survives_a_failing_consumer(rules: Path) -> None:
    reviews = write(rules, "reviews.yaml", vs("reviews"))
    config = ConfigDir(rules)
    config.load()
    seen: list[RuleSet] = []

    def changed(ruleset: RuleSet) -> None:
        seen.append(ruleset)
        if len(seen) == 1:
            raise RuntimeError("consumer bug")

    async def scenario() -> None:
        task = asyncio.create_task(config.watch(changed, INTERVAL))
        reviews.write_text(vs("reviews", "one.example.com"))
        async with asyncio.timeout(5):
            while not seen:
                await asyncio.sleep(INTERVAL)
        reviews.write_text(vs("reviews", "two.example.com"))
        async with asyncio.timeout(5):
            while len(seen) < 2:
                await asyncio.sleep(INTERVAL)
        assert seen[1].virtual_services[0].hosts == ("two.example.com",)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario)


# --- the files registry --------------------------------------------------------------------------


ENTRIES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: ext}
spec:
  hosts: [api.example.com, api.internal]
  ports:
  - {number: 80, name: http, targetPort: 8080}
  - {number: 9090, name: grpc, protocol: GRPC}
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, ports: {grpc: 9999}, labels: {version: v1}, weight: 2, locality: eu/a}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: ext}
spec:
  hosts: [vms.internal]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  resolution: NONE
  workloadSelector: {labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: ext}
spec: {address: 10.0.1.1, labels: {app: vm, zone: a}, ports: {tcp: 7001}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-2, namespace: ext}
spec: {address: 10.0.1.2, labels: {app: other}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-3, namespace: elsewhere}
spec: {address: 10.0.1.3, labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: search}
spec:
  hosts: [search.example.com]
  ports: [{number: 443, name: http, targetPort: 80}]
  resolution: DNS
"""


def test_files_registry_services_and_instances(rules: Path) -> None:
    write(rules, "entries.yaml", ENTRIES)
    ruleset = ConfigDir(rules).load()
    assert ruleset.errors == ()

    snapshot = FilesRegistry(ruleset).snapshot()

    http, grpc = ServicePort(80, "http", "HTTP"), ServicePort(9090, "grpc", "GRPC")
    assert snapshot.services == (
        Service("api.example.com", (http, grpc), "STATIC", "files"),
        Service("api.internal", (http, grpc), "STATIC", "files"),
        Service("search.example.com", (ServicePort(443, "http", "HTTP"),), "DNS", "files"),
        Service("vms.internal", (ServicePort(7000, "tcp", "TCP"),), "STATIC", "files"),
    )
    v1 = (("version", "v1"),)
    assert snapshot.instances == (
        # The endpoint names no http port: targetPort. It names grpc: its own port.
        Instance("api.example.com", 80, "10.0.0.1", 8080, v1, 2, "eu/a", source="files"),
        Instance("api.example.com", 9090, "10.0.0.1", 9999, v1, 2, "eu/a", source="files"),
        Instance("api.internal", 80, "10.0.0.1", 8080, v1, 2, "eu/a", source="files"),
        Instance("api.internal", 9090, "10.0.0.1", 9999, v1, 2, "eu/a", source="files"),
        # DNS without endpoints: the host is its own endpoint.
        Instance("search.example.com", 443, "search.example.com", 80, source="files"),
        # Selected WorkloadEntry: same namespace and matching labels only.
        Instance(
            "vms.internal", 7000, "10.0.1.1", 7001, (("app", "vm"), ("zone", "a")), source="files"
        ),
    )


def test_files_registry_merges_one_host_from_two_entries(rules: Path) -> None:
    entry = """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: {name}}}
        spec:
          hosts: [api.example.com]
          ports: [{{number: {port}, name: p{port}}}]
          resolution: {resolution}
          endpoints: [{{address: {address}}}]
        """
    write(rules, "a.yaml", entry.format(name="a", port=80, resolution="DNS", address="a.host"))
    write(rules, "b.yaml", entry.format(name="b", port=81, resolution="STATIC", address="1.2.3.4"))

    snapshot = FilesRegistry(ConfigDir(rules).load()).snapshot()

    assert snapshot.services == (
        Service(
            "api.example.com",
            (ServicePort(80, "p80"), ServicePort(81, "p81")),
            "DNS",  # the first entry's
            "files",
        ),
    )
    assert [(i.address, i.port) for i in snapshot.instances] == [("a.host", 80), ("1.2.3.4", 81)]


def test_files_registry_update_and_run(rules: Path) -> None:
    write(rules, "entries.yaml", ENTRIES)
    config = ConfigDir(rules)
    first = config.load()

    async def scenario() -> None:
        registry = FilesRegistry()
        assert registry.snapshot() == RegistrySnapshot()
        assert registry.update(first) is True  # not running yet: nobody to tell
        calls: list[None] = []
        task = asyncio.create_task(registry.run(lambda: calls.append(None)))
        await asyncio.sleep(0.05)
        assert calls == [None]  # run reports the view it starts with
        assert not task.done()

        assert registry.update(first) is False
        with_rule = write(rules, "vs.yaml", vs("api", "api.example.com"))
        assert registry.update(config.load()) is False  # rules alone change no endpoints
        with_rule.unlink()
        assert calls == [None]

        write(rules, "entries.yaml", ENTRIES.replace("10.0.0.1", "10.0.0.2"))
        assert registry.update(config.load()) is True
        assert calls == [None, None]
        assert {i.address for i in registry.snapshot().instances} >= {"10.0.0.2"}
        assert "10.0.0.1" not in {i.address for i in registry.snapshot().instances}

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        registry.update(first)
        assert calls == [None, None]  # stopped: no more callbacks

    run(scenario)
