"""Fixed-window counters in Redis: ``INCRBY key hits`` then ``EXPIRE key window`` for each
limited descriptor of a request, all in one ``MULTI``/``EXEC`` round trip, so a counter is
never left without its expiry and the counts of one request are consistent."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# What "the store cannot be reached" looks like: the service answers OK (fail open).
STORE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.RedisError,
    OSError,
    TimeoutError,
)


class CounterStore(Protocol):
    async def increment(self, items: Sequence[tuple[str, int, int]]) -> list[int]:
        """Add ``hits`` to each ``(key, hits, ttl)`` counter, set its expiry to ``ttl``
        seconds; the counts after the increments, in order."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class RedisStore:
    """The counters in one Redis server (``redis://host:port/db``, ``rediss://``,
    ``unix://``)."""

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        self.url = url
        self.timeout = timeout
        # One immediate retry on a broken connection (a pooled connection Redis closed),
        # none on a timeout: a slow Redis must not make every answer wait twice.
        self.client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        )

    async def increment(self, items: Sequence[tuple[str, int, int]]) -> list[int]:
        async with asyncio.timeout(self.timeout), self.client.pipeline(transaction=True) as pipe:
            for key, hits, ttl in items:
                pipe.incrby(key, hits)
                pipe.expire(key, ttl)
            results = await pipe.execute()
        return [int(count) for count in results[0::2]]

    async def ping(self) -> None:
        async with asyncio.timeout(self.timeout):
            await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()
