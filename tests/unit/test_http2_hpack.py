"""Shoal's HPACK (RFC 7541): the RFC's own examples, round trips with the ``hpack``
package both ways, Huffman edge cases, and the limits that stop an HPACK bomb."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.codec.h2.hpack import (
    Decoder,
    Encoder,
    HPACKError,
    huffman_decode,
    huffman_encode,
    valid_field,
)
from shoal.errors import RemoteProtocolError

Header = tuple[bytes, bytes]

REQUESTS: list[list[Header]] = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html")],
]
for _request, _extra in zip(
    REQUESTS,
    [[], [(b"cache-control", b"no-cache")], [(b"custom-key", b"custom-value")]],
    strict=True,
):
    _request.append((b":authority", b"www.example.com"))
    _request.extend(_extra)
DATE1, DATE2 = b"Mon, 21 Oct 2013 20:13:21 GMT", b"Mon, 21 Oct 2013 20:13:22 GMT"
LOCATION = (b"location", b"https://www.example.com")
COOKIE = b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
RESPONSES: list[list[Header]] = [
    [(b":status", b"302"), (b"cache-control", b"private"), (b"date", DATE1), LOCATION],
    [(b":status", b"307"), (b"cache-control", b"private"), (b"date", DATE1), LOCATION],
    [
        (b":status", b"200"),
        (b"cache-control", b"private"),
        (b"date", DATE2),
        LOCATION,
        (b"content-encoding", b"gzip"),
        (b"set-cookie", COOKIE),
    ],
]

# RFC 7541 appendix C: requests without (C.3) and with (C.4) Huffman coding, responses with
# a 256-byte table without (C.5) and with (C.6) Huffman coding; and the table size after.
RFC_EXAMPLES = [
    (
        "C.3",
        4096,
        REQUESTS,
        [
            "828684410f7777772e6578616d706c652e636f6d",
            "828684be58086e6f2d6361636865",
            "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
        ],
        164,
    ),
    (
        "C.4",
        4096,
        REQUESTS,
        [
            "828684418cf1e3c2e5f23a6ba0ab90f4ff",
            "828684be5886a8eb10649cbf",
            "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
        ],
        164,
    ),
    (
        "C.5",
        256,
        RESPONSES,
        [
            "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a32"
            "3120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
            "4803333037c1c0bf",
            "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a6970"
            "7738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d61"
            "67653d333630303b2076657273696f6e3d31",
        ],
        215,
    ),
    (
        "C.6",
        256,
        RESPONSES,
        [
            "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad"
            "171863c78f0b97c8e9ae82ae43d3",
            "4883640effc1c0bf",
            "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2"
            "e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
        ],
        215,
    ),
]


@pytest.mark.parametrize(("name", "size", "lists", "blocks", "final_size"), RFC_EXAMPLES)
def test_rfc_7541_examples_decode(
    name: str, size: int, lists: list[list[Header]], blocks: list[str], final_size: int
) -> None:
    decoder = Decoder(size)
    for headers, block in zip(lists, blocks, strict=True):
        assert decoder.decode(bytes.fromhex(block), 65536) == headers, name
        assert not decoder.oversized
        assert not decoder.invalid
    assert decoder.table_size == final_size


def test_huffman_strings_of_the_rfc() -> None:
    assert huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")) == b"www.example.com"
    assert huffman_encode(b"www.example.com") == bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")
    assert huffman_encode(b"no-cache") == bytes.fromhex("a8eb10649cbf")
    assert huffman_encode(b"") == b""


@given(st.binary(max_size=300))
def test_huffman_round_trip(data: bytes) -> None:
    assert huffman_decode(huffman_encode(data)) == data


@pytest.mark.parametrize(
    "coded",
    [
        bytes.fromhex("ffffffff"),  # EOS (30 ones) inside the string
        bytes.fromhex("f1e3c2e5f23a6ba0ab90f4fe"),  # padding with a zero bit
        bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ffff"),  # 8+ bits of padding
        b"\x00",  # '0' '0' then 6 bits: '000000' is not an EOS prefix
    ],
)
def test_bad_huffman_is_an_error(coded: bytes) -> None:
    with pytest.raises(HPACKError):
        huffman_decode(coded)


def test_hpack_error_is_a_remote_protocol_error() -> None:
    assert issubclass(HPACKError, RemoteProtocolError)


@pytest.mark.parametrize(
    "block",
    [
        b"\x80",  # index 0
        b"\xbe",  # index 62: the dynamic table is empty
        b"\xff\x80\x80\x80\x80\x80\x01",  # an integer past 2^32
        b"\x7f",  # truncated integer
        b"\x40\x85ab",  # string runs past the block
        b"\x40",  # literal without its name
        b"\x82\x20",  # size update after a field
        b"\x3f\xe2\x1f",  # size update to 4097, above the setting
    ],
)
def test_malformed_blocks(block: bytes) -> None:
    with pytest.raises(HPACKError):
        Decoder().decode(block, 65536)


def test_size_update_is_required_after_the_setting_shrinks() -> None:
    decoder = Decoder()
    decoder.decode(b"\x40\x01a\x01b", 65536)  # one entry in the table
    decoder.set_settings_max(0)
    with pytest.raises(HPACKError):
        decoder.decode(b"\x82", 65536)
    decoder = Decoder()
    decoder.set_settings_max(0)
    assert decoder.decode(b"\x20\x82", 65536) == [(b":method", b"GET")]


def test_hpack_bomb_stops_collecting_but_keeps_the_table_in_step() -> None:
    encoder = hpack.Encoder()
    decoder = Decoder()
    big = (b"x-bomb", b"b" * 4000)
    decoder.decode(encoder.encode([big]), 65536)
    block = encoder.encode([big] * 10_000 + [(b"x-after", b"1")])
    assert len(block) < 11_000  # 10,000 one-byte references: 40 MB once decoded
    headers = decoder.decode(block, 65536)
    assert decoder.oversized
    assert sum(len(n) + len(v) + 32 for n, v in headers) <= 65536  # only what fits
    # the literal after the bomb was still added to the table
    assert decoder.decode(encoder.encode([(b"x-after", b"1")]), 65536) == [(b"x-after", b"1")]


def test_invalid_fields_are_flagged_also_when_referenced_later() -> None:
    encoder = hpack.Encoder()
    decoder = Decoder()
    decoder.decode(encoder.encode([(b"Upper", b"v")]), 65536)
    assert decoder.invalid
    decoder.decode(encoder.encode([(b"ok", b"v")]), 65536)
    assert not decoder.invalid
    decoder.decode(encoder.encode([(b"Upper", b"v")]), 65536)  # an index this time
    assert decoder.invalid


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        (b"x", b"v", True),
        (b":path", b"/", True),
        (b"x", b"", True),
        (b"X", b"v", False),
        (b"", b"v", False),
        (b"a b", b"v", False),
        (b"::a", b"v", False),
        (b"a:", b"v", False),
        (b"\x7f", b"v", False),
        (b"x", b" v", False),
        (b"x", b"v\t", False),
        (b"x", b"a\nb", False),
        (b"x", b"a\x00", False),
        (b"x", b"a\rb", False),
        (b"x", b"a\x7fb\xff", True),  # obs-text is allowed in values
    ],
)
def test_field_validation(name: bytes, value: bytes, ok: bool) -> None:
    assert valid_field(name, value) is ok


def test_encoder_indexes_repeated_fields_and_never_indexes_secrets() -> None:
    encoder = Encoder()
    first = encoder.encode([(b"x-tenant", b"bench"), (b"authorization", b"secret")])
    second = encoder.encode([(b"x-tenant", b"bench"), (b"authorization", b"secret")])
    assert second[0] == 0xBE  # x-tenant is now dynamic index 62
    assert len(second) < len(first)
    assert second[1] & 0xF0 == 0x10  # authorization: literal never indexed (0001xxxx)
    decoder = hpack.Decoder()
    decoder.decode(first, raw=True)
    (_, secret) = decoder.decode(second, raw=True)
    assert isinstance(secret, hpack.NeverIndexedHeaderTuple)


def test_encoder_eviction_keeps_indices_right() -> None:
    encoder = Encoder()
    decoder = hpack.Decoder()
    for i in range(2000):
        headers = [(b"x-k%d" % (i % 50), b"v" * (i % 90)), (b"x-k%d" % (i % 7), b"w")]
        assert decoder.decode(encoder.encode(headers), raw=True) == headers


@pytest.mark.parametrize("sizes", [[0], [0, 4096], [100, 50, 300], [8192], [10, 0, 10]])
def test_encoder_table_size_changes(sizes: list[int]) -> None:
    encoder = Encoder()
    decoder = Decoder()
    headers = [(b"x-a", b"1" * 40), (b"x-b", b"2")]
    for size in sizes:
        encoder.set_max_table_size(size)
        decoder.set_settings_max(max(size, 4096))
        assert decoder.decode(encoder.encode(headers), 65536) == headers
        assert decoder.table_size <= min(size, 4096)


fields = st.tuples(
    st.sampled_from([b"x-a", b"x-b", b":path", b"cookie", b"authorization", b"user-agent"])
    | st.from_regex(rb"\A[a-z0-9-]{1,12}\Z"),
    st.binary(max_size=60),
)


@settings(max_examples=200)
@given(st.lists(st.lists(fields, max_size=8), max_size=12), st.integers(0, 4096))
def test_round_trips_with_the_hpack_package(lists: list[list[Header]], table: int) -> None:
    ours_out, theirs_in = Encoder(), hpack.Decoder()
    theirs_out, ours_in = hpack.Encoder(), Decoder()
    ours_out.set_max_table_size(table)
    theirs_in.header_table_size = table
    for headers in lists:
        assert [tuple(h) for h in theirs_in.decode(ours_out.encode(headers), raw=True)] == headers
        assert ours_in.decode(theirs_out.encode(headers), 1 << 30) == headers
