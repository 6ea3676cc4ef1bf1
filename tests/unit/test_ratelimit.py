"""The rate limit service without Redis: config parsing, descriptor lookup (the reference
service's rules), the limiter's statuses and stats arithmetic, fail-open, stats output."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from shoal.errors import ConfigError
from shoal.ratelimit.config import (
    RateLimitConfig,
    load_config,
    parse_domain,
    wildcard_match,
)
from shoal.ratelimit.limiter import RateLimiter, RequestError, redis_key, window_start
from shoal.ratelimit.service import RateLimitServicer
from shoal.ratelimit.stats import ServiceStats, sanitize

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
NS = 1_000_000_000

CONFIG = """\
domain: shop
descriptors:
  - key: user
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: path
    value: /login
    rate_limit: {unit: minute, requests_per_unit: 2}
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 1}
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 50}
  - key: path
    value: /img/*/thumb*
    rate_limit: {unit: minute, requests_per_unit: 60}
  - key: path
    rate_limit: {unit: day, requests_per_unit: 3}
  - key: version
    value: "010"
    rate_limit: {unit: second, requests_per_unit: 5}
  - key: tenant
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: ip
    detailed_metric: true
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: region
    value_to_metric: true
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: internal
    rate_limit: {unlimited: true}
  - key: broad
    rate_limit: {unit: second, requests_per_unit: 1, name: broad}
  - key: narrow
    rate_limit:
      unit: second
      requests_per_unit: 100
      name: narrow
      replaces: [{name: broad}]
"""


def config(text: str = CONFIG) -> RateLimitConfig:
    domain, root = parse_domain(text, "test.yaml")
    return RateLimitConfig({domain: root}, ["test.yaml"])


def lookup(*entries: tuple[str, str], cfg: RateLimitConfig | None = None) -> Any:
    return (cfg or config()).limit_for("shop", entries)


# --- config -----------------------------------------------------------------------------------


def test_lookup_prefers_value_then_wildcard_then_key() -> None:
    login = lookup(("path", "/login"))
    assert (login.requests_per_unit, login.unit) == (2, "minute")
    assert lookup(("path", "/api/users")).requests_per_unit == 50
    assert lookup(("path", "/img/a/thumb.png")).requests_per_unit == 60
    assert lookup(("path", "/img/a/full.png")).requests_per_unit == 3  # key only
    assert lookup(("path", "/other")).stats_key == ("shop", "path")
    assert lookup(("version", "010")).requests_per_unit == 5  # YAML text, not octal 8
    assert lookup(("user", "")).requests_per_unit == 10


def test_lookup_needs_the_config_depth() -> None:
    nested = lookup(("path", "/login"), ("user", "alice"))
    assert (nested.requests_per_unit, nested.unit) == (1, "hour")
    assert nested.stats_key == ("shop", "path_/login", "user")
    assert lookup(("path", "/login"), ("user", "a"), ("more", "x")) is None
    assert lookup(("path", "/other"), ("user", "alice")) is None  # "path" has no children
    assert lookup(("nothing", "x")) is None
    assert lookup() is None
    assert config().limit_for("other-domain", [("user", "a")]) is None


def test_metric_keys() -> None:
    assert lookup(("path", "/api/x")).stats_key == ("shop", "path_/api/*")
    assert lookup(("ip", "10.0.0.1")).stats_key == ("shop", "ip_10.0.0.1")
    assert lookup(("region", "eu")).stats_key == ("shop", "region_eu")
    assert lookup(("user", "bob")).stats_key == ("shop", "user")


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("a*", "abc", True),
        ("a*", "a", True),
        ("a*", "ba", False),
        ("a*c", "abbc", True),
        ("a*c", "ac", True),
        ("a*c", "acb", False),
        ("a*b*c", "a-b-c", True),
        ("a*b*c", "abc", True),
        ("a*b*c", "ac", False),
        ("ab*ba", "aba", False),
        ("*", "", True),
        ("x", "x", True),
    ],
)
def test_wildcard_match(pattern: str, text: str, matches: bool) -> None:
    assert wildcard_match(tuple(pattern.split("*")), text) is matches


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("descriptors: []\n", "domain: the domain must be a non-empty string"),
        ("domain: d\nextra: 1\n", "extra: unknown key"),
        (
            "domain: d\ndescriptors:\n  - key: k\n    quota_mode: true\n",
            "descriptors[0].quota_mode: not supported",
        ),
        ("domain: d\ndescriptors:\n  - value: v\n", "descriptors[0].key: the descriptor has"),
        (
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight}\n",
            "descriptors[0].rate_limit.unit: invalid unit",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n"
            "    rate_limit: {unit: second, requests_per_unit: -1}\n",
            "requests_per_unit: expected an integer",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n"
            "    rate_limit: {unlimited: true, unit: second}\n",
            "unlimited rate limit has no unit",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n  - key: k\n",
            "duplicate descriptor 'd.k'",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n    shadow_mode: maybe\n",
            "shadow_mode: expected true or false",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: second\n"
            "      name: a\n      replaces: [{name: a}]\n",
            "cannot replace itself",
        ),
        ("domain: [d\n", "invalid YAML"),
        ("- 1\n", "must be a mapping"),
    ],
)
def test_config_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_domain(text, "f.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("f.yaml")


def test_load_directory_and_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("domain: a\n")
    (tmp_path / "b.yml").write_text("domain: b\n")
    (tmp_path / ".hidden.yaml").write_text("domain: a\n")
    (tmp_path / "notes.txt").write_text("x")
    extra = tmp_path.parent / f"{tmp_path.name}-c.yaml"
    extra.write_text("domain: c\n")
    loaded = load_config([str(tmp_path), str(extra)])
    assert loaded.domains == ("a", "b", "c")
    (tmp_path / "c.yaml").write_text("domain: c\n")
    with pytest.raises(ConfigError, match="duplicate domain 'c'"):
        load_config([str(tmp_path), str(extra)])
    with pytest.raises(ConfigError, match="no such file"):
        load_config([str(tmp_path / "missing.yaml")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no \.yaml or \.yml files"):
        load_config([str(empty)])


# --- limiter ----------------------------------------------------------------------------------


class MemoryStore:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.ttls: dict[str, int] = {}
        self.fail: BaseException | None = None

    async def increment(self, items: Sequence[tuple[str, int, int]]) -> list[int]:
        if self.fail is not None:
            raise self.fail
        out = []
        for key, hits, ttl in items:
            self.counts[key] = self.counts.get(key, 0) + hits
            self.ttls[key] = ttl
            out.append(self.counts[key])
        return out

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass


def request(*descriptors: Any, domain: str = "shop", hits_addend: int = 0) -> Any:
    out = []
    for d in descriptors:
        if isinstance(d, ratelimit_pb2.RateLimitDescriptor):
            out.append(d)
        else:
            out.append(
                ratelimit_pb2.RateLimitDescriptor(
                    entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in d]
                )
            )
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=out, hits_addend=hits_addend)


class Harness:
    def __init__(self, **kwargs: Any) -> None:
        self.stats = ServiceStats()
        self.limiter = RateLimiter(config(), self.stats, **kwargs)
        self.store = MemoryStore()
        self.now_ns = 1_700_000_000 * NS + 250_000_000  # .25 s into a second

    def check(self, req: Any) -> Any:
        plan = self.limiter.plan(req, self.now_ns)
        counts = asyncio.run(self.store.increment(plan.increments())) if plan.checks else []
        return self.limiter.respond(plan, counts)


def test_statuses_and_windows() -> None:
    h = Harness()
    responses = [h.check(request([("user", "a")])) for _ in range(11)]
    assert [r.statuses[0].limit_remaining for r in responses[:10]] == list(range(9, -1, -1))
    assert responses[9].overall_code == OK and responses[10].overall_code == OVER
    status = responses[10].statuses[0]
    assert status.current_limit.requests_per_unit == 10
    assert status.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.SECOND
    assert status.duration_until_reset.ToNanoseconds() == 750_000_000
    assert h.store.counts == {"shop_user_a_1700000000": 11}
    assert h.store.ttls == {"shop_user_a_1700000000": 1}
    h.now_ns += NS  # the next window
    assert h.check(request([("user", "a")])).statuses[0].limit_remaining == 9
    day = h.check(request([("path", "/x")])).statuses[0]
    assert day.duration_until_reset.seconds == 86400 - 1_700_000_001 % 86400 - 1


def test_stats_follow_the_reference_arithmetic() -> None:
    h = Harness()
    # limit 10, near threshold 8: 7 within; then +3 → 10 (2 near); then +5 → 15 (5 over)
    h.check(request([("user", "a")], hits_addend=7))
    h.check(request([("user", "a")], hits_addend=3))
    over = h.check(request([("user", "a")], hits_addend=5))
    assert over.overall_code == OVER
    s = h.stats.limits[("shop", "user")]
    assert (s.total_hits, s.within_limit, s.near_limit, s.over_limit) == (15, 10, 2, 5)
    # crossing both thresholds at once: 0 → 12 counts 2 near (8..10) and 2 over
    h.check(request([("user", "b")], hits_addend=12))
    assert (s.near_limit, s.over_limit) == (4, 7)


def test_shadow_unlimited_replaces_and_global_shadow() -> None:
    h = Harness()
    h.check(request([("tenant", "t")]))
    shadow = h.check(request([("tenant", "t")]))
    assert shadow.overall_code == OK and shadow.statuses[0].code == OK
    s = h.stats.limits[("shop", "tenant")]
    assert (s.shadow_mode, s.over_limit) == (1, 1)

    unlimited = h.check(request([("internal", "x")]))
    assert unlimited.statuses[0].limit_remaining == 2**32 - 1
    assert not h.store.counts.get("shop_internal_x_1700000000")

    # "narrow" replaces "broad": only narrow is counted
    both = h.check(request([("broad", "x")], [("narrow", "x")], hits_addend=5))
    assert both.overall_code == OK
    assert not both.statuses[0].HasField("current_limit")
    assert both.statuses[1].limit_remaining == 95

    g = Harness(shadow_mode=True)
    r = g.check(request([("user", "a")], hits_addend=11))
    assert r.overall_code == OK and r.statuses[0].code == OVER
    assert g.stats.global_shadow_mode == 1


def test_hits_addend_precedence_and_limit_override() -> None:
    h = Harness()
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="user", value="a")]
    )
    d.hits_addend.value = 0
    r = h.check(request(d, hits_addend=9))
    assert r.statuses[0].limit_remaining == 10  # peeked, not counted
    o = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="anything", value="v")]
    )
    o.limit.requests_per_unit = 2
    o.limit.unit = rls_pb2.RateLimitResponse.RateLimit.MINUTE
    assert [h.check(request(o)).overall_code for _ in range(3)] == [OK, OK, OVER]
    assert ("shop", "anything_v") in h.stats.limits
    # an override in an unknown domain is ignored, as the reference does
    assert h.check(request(o, domain="nope")).overall_code == OK
    assert h.stats.domain_not_found == {"nope": 1}


def test_bad_requests() -> None:
    h = Harness()
    with pytest.raises(RequestError, match="domain"):
        h.limiter.plan(request([("user", "a")], domain=""), h.now_ns)
    with pytest.raises(RequestError, match="descriptor"):
        h.limiter.plan(request(), h.now_ns)


def test_key_and_window_helpers() -> None:
    assert redis_key("p:", "d", [("k", "v"), ("k2", "")], 60) == "p:d_k_v_k2__60"
    assert window_start(3599 * NS + 5, 3600) == 0
    assert window_start(3600 * NS, 3600) == 3600


# --- the servicer: fail open ------------------------------------------------------------------


class AbortedError(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.code: Any = None

    async def abort(self, code: Any, details: str) -> None:
        self.code = code
        raise AbortedError(details)


def test_servicer_fails_open_and_counts_redis_errors() -> None:
    import grpc

    h = Harness()
    servicer = RateLimitServicer(h.limiter, h.store, h.stats)
    h.store.fail = ConnectionError("refused")

    async def call(req: Any, context: Any = None) -> Any:
        return await servicer.ShouldRateLimit(req, context or FakeContext())

    response = asyncio.run(call(request([("user", "a")], hits_addend=100)))
    assert response.overall_code == OK
    assert not response.statuses[0].HasField("current_limit")
    assert h.stats.redis_error == 1
    h.store.fail = None
    assert asyncio.run(call(request([("user", "a")]))).statuses[0].limit_remaining == 9

    strict = RateLimitServicer(h.limiter, h.store, h.stats, on_redis_error="unavailable")
    h.store.fail = TimeoutError()
    context = FakeContext()
    with pytest.raises(AbortedError):
        asyncio.run(strict.ShouldRateLimit(request([("user", "a")]), context))
    assert context.code == grpc.StatusCode.UNAVAILABLE
    context = FakeContext()
    with pytest.raises(AbortedError):
        asyncio.run(call(request(domain="shop"), context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert h.stats.service_error == 1


# --- stats output -----------------------------------------------------------------------------


def test_stats_names_and_prometheus_labels() -> None:
    assert sanitize("remote_address_10.0.0.1") == "remote_address_10_0_0_1"
    assert sanitize("a:b|c") == "a_b_c"
    h = Harness()
    h.check(request([("path", "/login"), ("user", "x")]))
    h.check(request([("ip", "192.168.1.2")]))
    text = h.stats.render_text()
    assert "ratelimit.service.rate_limit.shop.path_/login.user.total_hits: 1\n" in text
    assert "ratelimit.service.rate_limit.shop.ip_192_168_1_2.within_limit: 1\n" in text
    prom = h.stats.render_prometheus()
    assert (
        'ratelimit_service_rate_limit_total_hits{domain="shop",key1="path_/login",key2="user"} 1'
        in prom
    )
    assert 'ratelimit_service_rate_limit_total_hits{domain="shop",key1="user"} 0' in prom


def test_wildcard_counters_are_per_actual_value() -> None:
    h = Harness()
    h.check(request([("path", "/api/a")]))
    h.check(request([("path", "/api/b")]))
    assert sorted(h.store.counts) == ["shop_path_/api/a_1699999980", "shop_path_/api/b_1699999980"]
    assert h.stats.limits[("shop", "path_/api/*")].total_hits == 2


def test_the_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "ratelimit.yaml"
    loaded = load_config([str(example)])
    limit = loaded.limit_for("shop", [("path", "/login"), ("user", "u")])
    assert limit is not None and (limit.requests_per_unit, limit.unit) == (5, "hour")
