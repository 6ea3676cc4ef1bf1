"""``shoal ratelimit`` end to end: a real ``redis-server``, real ``shoal ratelimit``
processes, a gRPC client calling ``envoy.service.ratelimit.v3.RateLimitService``.

Covers fixed windows, key-only vs. value-specific and nested descriptors, hits_addend,
unknown descriptors, shadow mode, two services sharing one budget through one Redis,
failing open while Redis is down, /stats, SIGHUP reload and SIGTERM.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.ratelimit.v3 import rls_pb2
from tests.conftest import free_port
from tests.integration.ratelimit_helpers import (
    OK,
    OVER_LIMIT,
    RateLimitService,
    RedisServer,
    descriptor,
    sleep_to_window_start,
)

SECOND = rls_pb2.RateLimitResponse.RateLimit.SECOND
MINUTE = rls_pb2.RateLimitResponse.RateLimit.MINUTE
MAX_UINT32 = 2**32 - 1

SHOP = """\
domain: shop
descriptors:
  - key: user                       # key only: a budget per distinct value
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: path
    value: /login                   # this value only
    rate_limit: {unit: minute, requests_per_unit: 2}
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 1}
  - key: path                       # any other path, per value
    rate_limit: {unit: minute, requests_per_unit: 4}
  - key: client
    rate_limit: {unit: minute, requests_per_unit: 10, name: client}
  - key: tenant
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: internal
    rate_limit: {unlimited: true}
"""

GLOBAL = """\
domain: global
descriptors:
  - key: generic_key
    value: all
    rate_limit: {unit: second, requests_per_unit: 100}
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def avoid_window_end(seconds: int = 60, needed: float = 3.0) -> None:
    """If the current window of ``seconds`` ends within ``needed`` seconds, wait for the
    next one, so a few calls on a per-minute limit all count in the same window."""
    left = seconds - time.time() % seconds
    if left < needed:
        time.sleep(left + 0.05)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ratelimit-config")
    (directory / "shop.yaml").write_text(SHOP)
    (directory / "global.yml").write_text(GLOBAL)
    (directory / "README.txt").write_text("not a config: ignored")
    return directory


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(
    config_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RateLimitService]:
    svc = RateLimitService([config_dir], redis_server.url, tmp_path_factory.mktemp("svc"))
    yield svc
    assert svc.stop() == 0, svc.output()


def codes(response: rls_pb2.RateLimitResponse) -> list[int]:
    return [status.code for status in response.statuses]


# --- limits and windows ------------------------------------------------------------------------


def test_limit_is_enforced_per_fixed_window(service: RateLimitService) -> None:
    user = unique("u")
    sleep_to_window_start()
    responses = [service.check("shop", [("user", user)]) for _ in range(5)]
    assert [r.overall_code for r in responses] == [OK, OK, OK, OVER_LIMIT, OVER_LIMIT]
    assert [r.statuses[0].limit_remaining for r in responses] == [2, 1, 0, 0, 0]
    status = responses[-1].statuses[0]
    assert status.code == OVER_LIMIT
    assert status.current_limit.requests_per_unit == 3
    assert status.current_limit.unit == SECOND
    assert 0 < status.duration_until_reset.ToNanoseconds() <= 1_000_000_000
    # another value of the same key has its own budget
    other = service.check("shop", [("user", unique("u"))])
    assert other.overall_code == OK and other.statuses[0].limit_remaining == 2
    # the next window starts from zero
    sleep_to_window_start()
    again = service.check("shop", [("user", user)])
    assert again.overall_code == OK and again.statuses[0].limit_remaining == 2


def test_counter_is_a_redis_key_per_window_with_an_expiry(
    service: RateLimitService, redis_server: RedisServer
) -> None:
    user = unique("u")
    sleep_to_window_start()
    window = int(time.time())
    service.check("shop", [("user", user)], hits_addend=2)
    client = redis_server.client()
    try:
        key = f"shop_user_{user}_{window}"  # the reference service's key format
        assert client.get(key) == b"2"
        assert 0 <= client.ttl(key) <= 1
    finally:
        client.close()


def test_value_specific_and_key_only_descriptors(service: RateLimitService) -> None:
    avoid_window_end()
    login = service.check("shop", [("path", "/login")])
    assert login.statuses[0].current_limit.requests_per_unit == 2
    assert login.statuses[0].current_limit.unit == MINUTE
    # any other value falls back to the key-only descriptor, with a budget per value
    a, b = unique("/a"), unique("/b")
    for expected in (3, 2, 1, 0):
        response = service.check("shop", [("path", a)])
        assert response.overall_code == OK
        assert response.statuses[0].current_limit.requests_per_unit == 4
        assert response.statuses[0].limit_remaining == expected
    assert service.check("shop", [("path", a)]).overall_code == OVER_LIMIT
    assert service.check("shop", [("path", b)]).statuses[0].limit_remaining == 3


def test_nested_descriptors(service: RateLimitService) -> None:
    avoid_window_end()
    alice, bob = unique("alice"), unique("bob")
    first = service.check("shop", [("path", "/login"), ("user", alice)])
    assert first.overall_code == OK
    assert first.statuses[0].current_limit.requests_per_unit == 1
    assert service.check("shop", [("path", "/login"), ("user", alice)]).overall_code == OVER_LIMIT
    assert service.check("shop", [("path", "/login"), ("user", bob)]).overall_code == OK
    # the key-only "path" node has no children: (path=/x, user=...) has no limit
    unmatched = service.check("shop", [("path", "/x"), ("user", alice)])
    assert unmatched.overall_code == OK
    assert not unmatched.statuses[0].HasField("current_limit")
    # deeper than the config: no limit either (the depth must match)
    deeper = service.check("shop", [("path", "/login"), ("user", alice), ("extra", "1")])
    assert deeper.overall_code == OK and not deeper.statuses[0].HasField("current_limit")
    stats = service.stats()
    assert stats["ratelimit.service.rate_limit.shop.path_/login.user.over_limit"] >= 1


def test_hits_addend(service: RateLimitService, redis_server: RedisServer) -> None:
    avoid_window_end()
    client_id = unique("c")
    remaining = [
        service.check("shop", [("client", client_id)], hits_addend=4).statuses[0].limit_remaining
        for _ in range(2)
    ]
    assert remaining == [6, 2]
    third = service.check("shop", [("client", client_id)], hits_addend=4)
    assert third.overall_code == OVER_LIMIT  # 12 > 10
    # a descriptor's own hits_addend wins over the request's; 0 checks without counting
    peek = service.check("shop", descriptor(("client", client_id), hits_addend=0), hits_addend=5)
    assert peek.overall_code == OVER_LIMIT
    window = int(time.time()) // 60 * 60
    client = redis_server.client()
    try:
        assert client.get(f"shop_client_{client_id}_{window}") == b"12"
    finally:
        client.close()
    fresh = unique("c")
    response = service.check("shop", descriptor(("client", fresh), hits_addend=0))
    assert response.statuses[0].limit_remaining == 10
    assert response.statuses[0].current_limit.name == "client"


def test_unknown_descriptors_and_domains_are_ok_without_a_limit(
    service: RateLimitService,
) -> None:
    before = service.stats()
    response = service.check("shop", [("nothing", "here")], [("user", "x"), ("deeper", "y")])
    assert response.overall_code == OK
    assert codes(response) == [OK, OK]
    assert not any(s.HasField("current_limit") for s in response.statuses)
    unknown = service.check("no-such-domain", [("user", "x")])
    assert unknown.overall_code == OK and codes(unknown) == [OK]
    after = service.stats()
    name = "ratelimit.service.rate_limit.no-such-domain.domain_not_found"
    assert after[name] == before.get(name, 0) + 1


def test_one_descriptor_over_makes_the_request_over(service: RateLimitService) -> None:
    avoid_window_end()
    who = unique("m")
    response = service.check("shop", [("user", who)], [("client", who)], hits_addend=4)
    assert response.overall_code == OVER_LIMIT
    assert codes(response) == [OVER_LIMIT, OK]
    assert response.statuses[1].limit_remaining == 6


def test_shadow_mode_counts_but_answers_ok(service: RateLimitService) -> None:
    avoid_window_end()
    tenant = unique("t")
    before = service.stats()
    responses = [service.check("shop", [("tenant", tenant)]) for _ in range(3)]
    assert [r.overall_code for r in responses] == [OK, OK, OK]
    assert responses[-1].statuses[0].limit_remaining == 0
    after = service.stats()
    for counter, added in (("shadow_mode", 2), ("over_limit", 2), ("within_limit", 1)):
        name = f"ratelimit.service.rate_limit.shop.tenant.{counter}"
        assert after[name] - before[name] == added


def test_unlimited_descriptor(service: RateLimitService) -> None:
    response = service.check("shop", [("internal", "batch")])
    assert response.overall_code == OK
    assert response.statuses[0].limit_remaining == MAX_UINT32
    assert not response.statuses[0].HasField("current_limit")


def test_invalid_requests_are_rejected(service: RateLimitService) -> None:
    before = service.stats()["ratelimit.service.call.should_rate_limit.service_error"]
    with pytest.raises(grpc.RpcError) as err:
        service.check("", [("user", "x")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        service.check("shop")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = service.stats()["ratelimit.service.call.should_rate_limit.service_error"]
    assert after == before + 2


def test_stats_ready_and_healthcheck(service: RateLimitService) -> None:
    sleep_to_window_start()
    user = unique("s")
    for _ in range(5):
        service.check("shop", [("user", user)])
    status, text = service.http("/stats")
    assert status == 200
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)", line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[match[1] + (match[2] or "")] = float(match[3])
    assert samples["ratelimit_service_config_load_success"] == 1
    assert samples['ratelimit_service_should_rate_limit_error{err_type="redis_error"}'] == 0
    labels = '{domain="shop",key1="user"}'
    assert samples[f"ratelimit_service_rate_limit_total_hits{labels}"] >= 5
    assert samples[f"ratelimit_service_rate_limit_over_limit{labels}"] >= 2
    assert samples['ratelimit_service_total_requests{grpc_method="ShouldRateLimit"}'] >= 5
    assert "ratelimit_service_response_time_seconds_bucket" in text
    # configured limits show from the start, at zero if unused
    assert 'ratelimit_service_rate_limit_total_hits{domain="global",key1="generic_key_all"}' in (
        text
    )
    assert service.http("/ready") == (200, "LIVE\n")
    assert service.http("/healthcheck") == (200, "OK\n")
    assert service.http("/nope")[0] == 404


# --- one budget, two services ------------------------------------------------------------------


def test_two_services_share_one_budget(
    config_dir: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two services (as two proxies would each use their own) on one Redis: 100 per
    second admitted in total, exactly, in every window both hammer through."""
    services = [
        RateLimitService([config_dir], redis_server.url, tmp_path / f"svc{i}") for i in range(2)
    ]
    admitted: list[Counter[int]] = [Counter(), Counter()]
    rejected = [0, 0]
    errors: list[BaseException] = []
    sleep_to_window_start()
    deadline = time.time() + 3.0

    def hammer(i: int) -> None:
        try:
            while time.time() < deadline:
                sent = time.time()
                response = services[i].check("global", [("generic_key", "all")])
                status = response.statuses[0]
                # the window this answer counted in: its end, from the reset duration
                end = round(sent + status.duration_until_reset.ToNanoseconds() / 1e9)
                if response.overall_code == OK:
                    admitted[i][end] += 1
                else:
                    rejected[i] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        for svc in services:
            svc.stop()
    assert not errors, errors
    total = admitted[0] + admitted[1]
    windows = sorted(total)
    assert len(windows) >= 3, total
    for window in windows:
        assert total[window] <= 100, total
    # every window the run covered from start to end admitted exactly the limit
    for window in windows[:-1]:
        assert total[window] == 100, total
    assert all(admitted[i][windows[0]] > 0 for i in range(2)), admitted  # both got a share
    assert rejected[0] + rejected[1] > 0


# --- Redis outages -----------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def test_fails_open_while_redis_is_down_and_recovers(
    config_dir: Path, own_redis: RedisServer, tmp_path: Path
) -> None:
    svc = RateLimitService([config_dir], own_redis.url, tmp_path / "svc", "--redis-timeout", "0.5")
    try:
        avoid_window_end()
        login = [("path", "/login"), ("user", "eve")]
        assert svc.check("shop", login).overall_code == OK
        assert svc.check("shop", login).overall_code == OVER_LIMIT
        own_redis.stop()
        started = time.monotonic()
        down = [svc.check("shop", login) for _ in range(3)]
        assert time.monotonic() - started < 2.0
        assert [r.overall_code for r in down] == [OK, OK, OK]
        assert not down[0].statuses[0].HasField("current_limit")
        assert svc.stats()["ratelimit.service.call.should_rate_limit.redis_error"] == 3
        assert "redis is unreachable" in svc.output()
        # back, empty: counting starts again
        own_redis.start()
        avoid_window_end()
        assert svc.check("shop", login).overall_code == OK
        assert svc.check("shop", login).overall_code == OVER_LIMIT
        assert svc.stats()["ratelimit.service.call.should_rate_limit.redis_error"] == 3
        assert "redis is reachable again" in svc.output()
    finally:
        assert svc.stop() == 0


def test_redis_down_can_answer_unavailable(config_dir: Path, tmp_path: Path) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    svc = RateLimitService([config_dir], nowhere, tmp_path, "--on-redis-error", "unavailable")
    try:
        with pytest.raises(grpc.RpcError) as err:
            svc.check("shop", [("user", "x")])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # nothing to count: no Redis needed, OK as usual
        assert svc.check("shop", [("nothing", "x")]).overall_code == OK
        assert svc.stats()["ratelimit.service.call.should_rate_limit.redis_error"] == 1
    finally:
        svc.stop()


# --- lifecycle ---------------------------------------------------------------------------------


def test_sighup_reloads_and_a_bad_reload_keeps_the_config(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    path = tmp_path / "limits.yaml"
    limit = (
        "domain: d\ndescriptors:\n"
        "  - key: k\n    rate_limit: {{unit: minute, requests_per_unit: {}}}\n"
    )
    path.write_text(limit.format(1))
    svc = RateLimitService([path], own_redis.url, tmp_path / "svc")
    try:

        def current(value: str) -> int:
            status = svc.check("d", [("k", value)]).statuses[0]
            return int(status.current_limit.requests_per_unit)

        assert current("a") == 1
        path.write_text(limit.format(7))
        svc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while svc.stats()["ratelimit.service.config_load_success"] < 2:
            assert time.monotonic() < deadline, svc.output()
            time.sleep(0.05)
        assert current("b") == 7
        path.write_text("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight}\n")
        svc.proc.send_signal(signal.SIGHUP)
        while svc.stats()["ratelimit.service.config_load_error"] < 1:
            assert time.monotonic() < deadline, svc.output()
            time.sleep(0.05)
        assert current("c") == 7
        assert "reload rejected" in svc.output()
    finally:
        started = time.monotonic()
        assert svc.stop() == 0
        assert time.monotonic() - started < 5


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", "ratelimit", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_invalid_config_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight}\n")
    result = run_cli("--config", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "descriptors[0].rate_limit.unit" in result.stderr
    twice = tmp_path / "dir"
    twice.mkdir()
    (twice / "a.yaml").write_text("domain: d\n")
    (twice / "b.yaml").write_text("domain: d\n")
    result = run_cli("--config", str(twice))
    assert result.returncode == 2 and "duplicate domain" in result.stderr


def test_address_in_use_exits_1(config_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "--config",
            str(config_dir),
            "--grpc-address",
            f"127.0.0.1:{port}",
            "--http-address",
            f"127.0.0.1:{free_port()}",
        )
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
