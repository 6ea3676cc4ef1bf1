"""The issue's figure: two proxies sharing a global limit of 100 rps (through one
`shoal ratelimit` on one Redis) together admit 100 ± 5 requests a second."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import Echo, raw_request
from tests.integration.ratelimit_helpers import (
    RateLimitService,
    RedisServer,
    rate_limited_proxy_config,
)


def _proxy(make_proxy: Any, echo: Echo, rls_port: int) -> Any:
    config, port = rate_limited_proxy_config(
        echo.port,
        rls_port,
        [{"actions": [{"generic_key": {"descriptor_value": "everyone"}}]}],
        timeout="0.5s",
    )
    proxy = make_proxy(config)
    proxy.port = port
    return proxy


@pytest.mark.slow
def test_two_proxies_share_a_100_rps_budget(make_proxy: Any, echo_a: Echo, tmp_path: Path) -> None:
    config = tmp_path / "shop.yaml"
    config.write_text(
        "domain: shop\n"
        "descriptors:\n"
        "  - key: generic_key\n"
        "    value: everyone\n"
        "    rate_limit: {unit: second, requests_per_unit: 100}\n"
    )
    redis = RedisServer(tmp_path / "redis")
    service = RateLimitService([config], redis.url, tmp_path / "rls")
    try:
        proxies = [_proxy(make_proxy, echo_a, service.grpc_port) for _ in range(2)]
        admitted: Counter[int] = Counter()
        limited = [0]
        lock = threading.Lock()
        seconds, per_client = 4, 40  # 8 clients x 40 rps = 320 rps offered, 3.2x the limit
        start = int(time.time()) + 1
        time.sleep(start - time.time())

        def client(port: int) -> None:
            sent = 0
            while time.time() < start + seconds:
                target = start + sent / per_client
                if target > time.time():
                    time.sleep(target - time.time())
                sent += 1
                response = raw_request(
                    port, b"GET / HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
                )
                status = int(response.split(b" ", 2)[1])
                with lock:
                    if status == 200:
                        admitted[int(time.time())] += 1
                    elif status == 429:
                        limited[0] += 1

        threads = [
            threading.Thread(target=client, args=(proxy.port,))
            for proxy in proxies
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # whole one-second windows only (the service counts fixed windows)
        per_second = [admitted[start + i] for i in range(seconds)]
        print("admitted per second:", per_second, "limited:", limited[0])
        assert limited[0] > 0
        for count in per_second:
            assert 95 <= count <= 105, per_second
        assert all(proxy.stats()["cluster.rls.ratelimit.over_limit"] > 0 for proxy in proxies)
    finally:
        service.stop()
        redis.stop()
