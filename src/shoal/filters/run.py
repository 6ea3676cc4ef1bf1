"""Running a filter chain on one request, for every protocol's request driver (the HTTP/1.1
exchange, the HTTP/2 stream): continue, answer locally, or hold the request for a delay or
for someone's answer (the rate limit service) and then go on with the rest of the chain."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Protocol

from shoal.filters.base import Delay, FilteredRequest, HttpFilter, LocalReply, Wait


class FilterDriven(FilteredRequest, Protocol):
    """A request the chain runs on, and what it does with the chain's outcome."""

    done: bool
    response_flags: str

    def filter_reply(self, reply: LocalReply) -> None:
        """A filter answered: reply locally."""

    def filters_passed(self) -> None:
        """Every filter let the request go on: route it upstream."""

    def cork(self) -> None: ...
    def uncork(self) -> None: ...


def run_filters(
    request: FilterDriven, filters: tuple[HttpFilter, ...], loop: asyncio.AbstractEventLoop
) -> bool:
    """Run ``filters`` in order; True when one answered or is holding the request (it goes
    on by itself later), False when all let it through."""
    now = loop.time()
    for index, http_filter in enumerate(filters):
        outcome = http_filter.on_request(request, now)
        if outcome is None:
            continue
        rest = filters[index + 1 :]
        if isinstance(outcome, LocalReply):
            request.filter_reply(outcome)
        elif isinstance(outcome, Wait):
            outcome.start(partial(_after_wait, request, rest, loop))
        else:
            loop.call_later(outcome.seconds, _after_delay, request, outcome, rest, loop)
        return True
    return False


def _after_delay(
    request: FilterDriven,
    delay: Delay,
    rest: tuple[HttpFilter, ...],
    loop: asyncio.AbstractEventLoop,
) -> None:
    if delay.ended is not None:
        delay.ended()
    if request.done:
        return
    request.response_flags = "DI"
    if delay.then is not None:
        request.filter_reply(delay.then)
    elif not (rest and run_filters(request, rest, loop)):
        request.filters_passed()


def _after_wait(
    request: FilterDriven,
    rest: tuple[HttpFilter, ...],
    loop: asyncio.AbstractEventLoop,
    result: LocalReply | None,
) -> None:
    """A filter that asked someone (the rate limit service) has its answer."""
    if request.done:
        return
    request.cork()  # the answer may be a whole response: one write
    try:
        if result is not None:
            request.filter_reply(result)
        elif not (rest and run_filters(request, rest, loop)):
            request.filters_passed()
    finally:
        request.uncork()
