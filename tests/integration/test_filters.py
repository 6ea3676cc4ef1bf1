"""HTTP filters before the router: fault injection and local rate limiting (Envoy's)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from tests.conftest import Echo, bootstrap, free_port, http_listener, raw_request, static_cluster

FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
RATELIMIT = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
ALWAYS = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}


def _proxy(
    make_proxy: Any,
    echo: Echo,
    filters: list[dict[str, Any]],
    routes: list[dict[str, Any]] | None = None,
    tmp_path: Any = None,
) -> Any:
    port = free_port()
    vhost = {
        "name": "all",
        "domains": ["*"],
        "routes": routes or [{"match": {"prefix": "/"}, "route": {"cluster": "a"}}],
    }
    log = str(tmp_path / "access.log") if tmp_path is not None else None
    listener = http_listener(port, [vhost], access_log=log)
    chain = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    chain[:0] = filters
    proxy = make_proxy(bootstrap([listener], [static_cluster("a", echo.port)], free_port()))
    proxy.port = port
    return proxy


def _get(port: int, path: str = "/", headers: bytes = b"") -> tuple[int, bytes, bytes]:
    response = raw_request(
        port,
        b"GET %s HTTP/1.1\r\nHost: s\r\n%sConnection: close\r\n\r\n" % (path.encode(), headers),
    )
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head.lower(), body


def _fault(**config: Any) -> dict[str, Any]:
    return {"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT, **config}}


def _ratelimit(**config: Any) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {"@type": RATELIMIT, "stat_prefix": "rl", **config},
    }


def test_fault_abort_answers_locally(make_proxy: Any, echo_a: Echo, tmp_path: Any) -> None:
    proxy = _proxy(make_proxy, echo_a, [_fault(abort={"http_status": 503})], tmp_path=tmp_path)
    status, _, body = _get(proxy.port)
    assert (status, body) == (503, b"fault filter abort")
    assert proxy.stats()["http.ingress.fault.aborts_injected"] == 1
    deadline = time.monotonic() + 3
    while (
        " 503 FI " not in (tmp_path / "access.log").read_text()
        if (tmp_path / "access.log").exists()
        else True
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_fault_delay_holds_the_request(make_proxy: Any, echo_a: Echo) -> None:
    proxy = _proxy(make_proxy, echo_a, [_fault(delay={"fixed_delay": "0.4s"})])
    started = time.monotonic()
    status, _, body = _get(proxy.port, "/slow")
    assert status == 200 and json.loads(body)["path"] == "/slow"
    assert time.monotonic() - started >= 0.4
    assert proxy.stats()["http.ingress.fault.delays_injected"] == 1


def test_header_controlled_abort_and_delay(make_proxy: Any, echo_a: Echo) -> None:
    proxy = _proxy(
        make_proxy, echo_a, [_fault(abort={"header_abort": {}}, delay={"header_delay": {}})]
    )
    assert _get(proxy.port)[0] == 200
    assert _get(proxy.port, headers=b"x-envoy-fault-abort-request: 418\r\n")[0] == 418
    started = time.monotonic()
    assert _get(proxy.port, headers=b"x-envoy-fault-delay-request: 300\r\n")[0] == 200
    assert time.monotonic() - started >= 0.3
    # the percentage header can only lower the share: 0% aborts nothing
    assert (
        _get(
            proxy.port,
            headers=b"x-envoy-fault-abort-request: 418\r\n"
            b"x-envoy-fault-abort-request-percentage: 0\r\n",
        )[0]
        == 200
    )


def test_fault_percentage_aborts_about_that_share(make_proxy: Any, echo_a: Echo) -> None:
    abort = {"http_status": 500, "percentage": {"numerator": 30, "denominator": "HUNDRED"}}
    proxy = _proxy(make_proxy, echo_a, [_fault(abort=abort)])
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: _get(proxy.port)[0], range(300)))
    aborted = statuses.count(500)
    assert 55 <= aborted <= 125, aborted  # 30% of 300 = 90, binomial sd ~8
    assert aborted + statuses.count(200) == 300


def test_max_active_faults_lets_the_overflow_through(make_proxy: Any, echo_a: Echo) -> None:
    proxy = _proxy(make_proxy, echo_a, [_fault(delay={"fixed_delay": "1s"}, max_active_faults=1)])
    first = threading.Thread(target=_get, args=(proxy.port, "/held"))
    first.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert _get(proxy.port, "/free")[0] == 200
    assert time.monotonic() - started < 0.5  # not delayed: the one active fault is taken
    first.join()
    stats = proxy.stats()
    assert stats["http.ingress.fault.faults_overflow"] == 1
    assert stats["http.ingress.fault.active_faults"] == 0


def test_fault_only_on_matching_headers_and_per_route(make_proxy: Any, echo_a: Echo) -> None:
    routes = [
        {
            "match": {"prefix": "/calm"},
            "route": {"cluster": "a"},
            "typed_per_filter_config": {"envoy.filters.http.fault": {"@type": FAULT}},
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "a"}},
    ]
    fault = _fault(
        abort={"http_status": 502},
        headers=[{"name": "x-chaos", "string_match": {"exact": "on"}}],
    )
    proxy = _proxy(make_proxy, echo_a, [fault], routes)
    assert _get(proxy.port, "/x")[0] == 200
    assert _get(proxy.port, "/x", b"x-chaos: on\r\n")[0] == 502
    assert _get(proxy.port, "/calm", b"x-chaos: on\r\n")[0] == 200  # route's empty fault


def test_local_rate_limit_token_bucket(make_proxy: Any, echo_a: Echo) -> None:
    limit = _ratelimit(
        token_bucket={"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "60s"},
        filter_enabled=ALWAYS,
        filter_enforced=ALWAYS,
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
        response_headers_to_add=[{"header": {"key": "x-limited", "value": "yes"}}],
    )
    proxy = _proxy(make_proxy, echo_a, [limit])
    results = [_get(proxy.port) for _ in range(8)]
    assert [status for status, _, _ in results] == [200] * 5 + [429] * 3
    _, head, body = results[-1]
    assert body == b"local_rate_limited"
    assert b"x-limited: yes" in head and b"x-ratelimit-limit: 5" in head
    stats = proxy.stats()
    assert stats["rl.http_local_rate_limit.ok"] == 5
    assert stats["rl.http_local_rate_limit.rate_limited"] == 3
    assert stats["rl.http_local_rate_limit.enforced"] == 3


def test_local_rate_limit_is_off_until_enabled(make_proxy: Any, echo_a: Echo) -> None:
    limit = _ratelimit(token_bucket={"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "60s"})
    proxy = _proxy(make_proxy, echo_a, [limit])
    assert [_get(proxy.port)[0] for _ in range(3)] == [200] * 3


def test_local_rate_limit_per_route(make_proxy: Any, echo_a: Echo) -> None:
    per_route = {
        "@type": RATELIMIT,
        "stat_prefix": "route_rl",
        "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "60s"},
        "filter_enabled": ALWAYS,
        "filter_enforced": ALWAYS,
    }
    routes = [
        {
            "match": {"prefix": "/limited"},
            "route": {"cluster": "a"},
            "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": per_route},
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "a"}},
    ]
    proxy = _proxy(make_proxy, echo_a, [_ratelimit()], routes)
    assert [_get(proxy.port, "/limited")[0] for _ in range(4)] == [200, 200, 429, 429]
    assert [_get(proxy.port, "/open")[0] for _ in range(4)] == [200] * 4


@pytest.mark.slow
def test_local_rate_limit_holds_100_rps_under_500_rps(make_proxy: Any, echo_a: Echo) -> None:
    """The issue's figure: a 100 rps limit within ±5% under 500 rps offered."""
    limit = _ratelimit(
        token_bucket={"max_tokens": 10, "tokens_per_fill": 10, "fill_interval": "0.1s"},
        filter_enabled=ALWAYS,
        filter_enforced=ALWAYS,
    )
    proxy = _proxy(make_proxy, echo_a, [limit])
    seconds, offered = 6.0, 500
    admitted: list[float] = []
    lock = threading.Lock()

    def client(offset: float) -> None:
        start = time.monotonic() + offset
        sent = 0
        while (now := time.monotonic()) < start_all + seconds:
            target = start + sent / (offered / 10)
            if now < target:
                time.sleep(target - now)
            sent += 1
            if _get(proxy.port)[0] == 200:
                with lock:
                    admitted.append(time.monotonic())

    start_all = time.monotonic()
    threads = [threading.Thread(target=client, args=(i / offered,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # the bucket starts full: measure the steady state, after the first second
    steady = [t for t in admitted if start_all + 1.0 <= t < start_all + seconds]
    rate = len(steady) / (seconds - 1.0)
    assert 95 <= rate <= 105, rate
