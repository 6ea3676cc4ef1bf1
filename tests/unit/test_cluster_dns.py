"""Which resolved addresses a DNS cluster uses, per Envoy's ``dns_lookup_family``."""

from __future__ import annotations

import pytest

from shoal.config.model import DnsLookupFamily
from shoal.upstream.cluster import select_addresses

V4 = ["10.0.0.1", "10.0.0.2"]
V6 = ["2001:db8::1", "2001:db8::2"]
MIXED = ["10.0.0.1", "2001:db8::1", "10.0.0.2", "2001:db8::2"]


@pytest.mark.parametrize(
    ("family", "addresses", "expected"),
    [
        # AUTO is "v6 preferred": IPv6 when there is any, else IPv4
        ("auto", MIXED, V6),
        ("auto", V4, V4),
        ("auto", V6, V6),
        ("auto", [], []),
        # V4_PREFERRED: IPv4 when there is any, else IPv6
        ("v4_preferred", MIXED, V4),
        ("v4_preferred", V6, V6),
        ("v4_preferred", V4, V4),
        # ALL: both families, IPv6 first (Envoy's getaddrinfo resolver)
        ("all", MIXED, V6 + V4),
        ("all", V4, V4),
        ("all", V6, V6),
        # V4_ONLY / V6_ONLY: only that family, even when that leaves nothing
        ("v4_only", MIXED, V4),
        ("v4_only", V6, []),
        ("v6_only", MIXED, V6),
        ("v6_only", V4, []),
    ],
)
def test_strict_dns_uses_every_address_of_the_chosen_family(
    family: DnsLookupFamily, addresses: list[str], expected: list[str]
) -> None:
    assert select_addresses(family, addresses) == expected


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("auto", ["2001:db8::1"]),
        ("v4_preferred", ["10.0.0.1"]),
        ("all", ["2001:db8::1"]),
        ("v4_only", ["10.0.0.1"]),
        ("v6_only", ["2001:db8::1"]),
    ],
)
def test_logical_dns_uses_only_the_first_chosen_address(
    family: DnsLookupFamily, expected: list[str]
) -> None:
    assert select_addresses(family, MIXED, logical=True) == expected


def test_logical_dns_with_nothing_of_the_family_uses_nothing() -> None:
    assert select_addresses("v6_only", V4, logical=True) == []


def test_duplicates_dropped_and_resolver_order_kept_within_a_family() -> None:
    # getaddrinfo repeats an address per socket type / source; the order it sorted is kept
    resolved = ["10.0.0.9", "10.0.0.1", "10.0.0.9", "::1", "10.0.0.1", "fe80::1%eth0"]
    assert select_addresses("v4_only", resolved) == ["10.0.0.9", "10.0.0.1"]
    assert select_addresses("auto", resolved) == ["::1", "fe80::1%eth0"]
    assert select_addresses("all", resolved) == ["::1", "fe80::1%eth0", "10.0.0.9", "10.0.0.1"]
