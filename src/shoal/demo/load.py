"""The demo's shoppers: a steady stream of requests to the frontend, through its sidecar.

A mix a real shop would see, so that success rates, latencies and the canary split have
something to show: mostly product pages (each one crosses catalog, reviews and ratings),
some unknown products (404), and checkouts (catalog, then payments over Dubbo), a quarter
of them with a card that payments declines (402). Every ``report_every`` seconds it prints
one line: the answers by status, the catalog versions that served the pages, and how many
pages came with their reviews (the frontend leaves them out when reviews fail).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

GOOD_CARD = "4242-4242-4242-4242"
DECLINED_CARD = "4000-0000-0000-0002"  # payments.js declines cards ending in 0002


class Shop:
    """One keep-alive HTTP connection to the frontend's sidecar; reconnects after a failure."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        """The status and JSON body; status 0 when the request got no answer.

        A GET sent on a kept-alive connection that the sidecar closed meanwhile (idle, or
        drained by a config change) is sent once more on a new one, as browsers and HTTP
        libraries do: the race is HTTP/1.1's, and counting it would blame the mesh."""
        reused = self.conn is not None
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, headers={"Host": "frontend"})
            response = self.conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            closed = isinstance(exc, ConnectionResetError | BrokenPipeError)
            if reused and closed and method == "GET":
                return self.request(method, path)
            return 0, {"error": str(exc)}
        try:
            value = json.loads(body)
        except ValueError:  # the sidecar's own answers (a breaker, a fault) are plain text
            value = {"error": body.decode(errors="replace")}
        return response.status, value if isinstance(value, dict) else {"value": value}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def next_request(rng: random.Random, checkout: bool) -> tuple[str, str]:
    """One shopper's request, (method, path): 10% unknown products, 20% checkouts (when
    payments runs), the rest product pages."""
    roll = rng.random()
    product = rng.randint(1, 5)
    if roll < 0.1:
        return "GET", f"/products/{rng.randint(6, 99)}"  # no such product
    if checkout and roll < 0.3:
        card = DECLINED_CARD if rng.random() < 0.25 else GOOD_CARD
        return "POST", f"/checkout/{product}?card={card}"
    return "GET", f"/products/{product}"


class Load(threading.Thread):
    """``rate`` requests a second until ``stop`` is set; a summary line every
    ``report_every`` seconds through ``report``."""

    def __init__(
        self,
        port: int,
        rate: float,
        *,
        checkout: bool,
        report: Callable[[str], None],
        report_every: float = 10.0,
    ) -> None:
        super().__init__(name="shoal-demo-load", daemon=True)
        self.shop = Shop(port)
        self.interval = 1.0 / rate
        self.checkout = checkout
        self.report = report
        self.report_every = report_every
        self.stop = threading.Event()
        self.rng = random.Random()

    def run(self) -> None:
        statuses: Counter[str] = Counter()
        versions: Counter[str] = Counter()
        pages = with_reviews = 0
        next_report = time.monotonic() + self.report_every
        while not self.stop.is_set():
            started = time.monotonic()
            status, body = self.shop.request(*next_request(self.rng, self.checkout))
            statuses[str(status) if status else "no answer"] += 1
            if status == 200 and "reviews" in body:  # a product page
                pages += 1
                versions[body["product"]["version"]] += 1
                with_reviews += body["reviews"] is not None
            if started >= next_report:
                self.report(summary(statuses, versions, pages, with_reviews, self.report_every))
                statuses.clear()
                versions.clear()
                pages = with_reviews = 0
                next_report = started + self.report_every
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        self.shop.close()


def summary(
    statuses: Counter[str], versions: Counter[str], pages: int, with_reviews: int, every: float
) -> str:
    """``load: 50 requests in 10s (200: 41, 402: 3, 404: 6)  catalog v1 100%  reviews on
    100% of pages``"""
    total = sum(statuses.values())
    answers = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
    line = f"load: {total} requests in {every:.0f}s ({answers})"
    if pages:
        split = " ".join(f"{v} {100 * n / pages:.0f}%" for v, n in sorted(versions.items()))
        line += f"  catalog {split}  reviews on {100 * with_reviews / pages:.0f}% of pages"
    return line
