"""HPACK (RFC 7541): header compression for HTTP/2, written for the proxy's hot path.

Why not the ``hpack`` package: measured on a steady connection (bench/h2codec.py), it
costs ~23 µs to decode an 8-field request and ~7 µs to encode a 5-field response, three
times the whole per-request budget of the HTTP/2 codec. This module does the same work
with flat tables and no per-field objects beyond the ``(name, value)`` tuples it returns.

Wire summary (RFC 7541 §6), by the first byte of each field representation:

    1xxxxxxx  indexed field: index (7-bit prefix) into static (1-61) + dynamic table
    01xxxxxx  literal, incremental indexing: name index (6-bit prefix, 0 = literal name)
    001xxxxx  dynamic table size update (5-bit prefix); only at the start of a block
    0000xxxx  literal without indexing (4-bit name index)
    0001xxxx  literal never indexed (4-bit name index)

Strings are a length (7-bit prefix; top bit = Huffman coded) and the octets. Integers use
the prefix-then-7-bits-per-octet scheme of §5.1.

Decoding also checks each field against RFC 9113 §8.2.1 (lower-case token names, values
without NUL/CR/LF or surrounding whitespace) and reports a bad one in ``Decoder.invalid``
instead of raising: that is a *stream* error (the caller resets one stream), while a
broken encoding is a *connection* error (:class:`HPACKError`, COMPRESSION_ERROR). Entries
keep their verdict in the dynamic table, so a later reference to a bad field is caught too.
"""

from __future__ import annotations

import re
from typing import Final

from shoal.codec.h2.tables import HUFFMAN_CODES, HUFFMAN_LENGTHS, STATIC_TABLE
from shoal.errors import RemoteProtocolError

Header = tuple[bytes, bytes]

# RFC 7541 §4.1: an entry's size is its name and value lengths plus 32.
ENTRY_OVERHEAD: Final = 32
DEFAULT_TABLE_SIZE: Final = 4096
# A decoded integer above this is an attack or garbage: no table, string or size
# update in HTTP/2 needs more (max frame size is 2^24-1, table sizes are 32-bit).
_MAX_INT: Final = (1 << 32) - 1


class HPACKError(RemoteProtocolError):
    """The peer's header block cannot be decoded: a connection COMPRESSION_ERROR."""


# --- validation (RFC 9113 §8.2.1) ------------------------------------------------------------

# A name is a token without upper-case letters; a pseudo-header adds one leading colon.
_NAME_OK: Final = re.compile(rb":?[!-9;-@\[-~]+")
# Names already checked, so the regex runs once per distinct name per process. Bounded:
# names past the cap are checked every time (correct, only slower).
_GOOD_NAMES: Final[set[bytes]] = {name for name, _ in STATIC_TABLE[1:]}
_GOOD_NAMES_CAP: Final = 4096


def valid_field(name: bytes, value: bytes) -> bool:
    """True when ``name: value`` may appear in an HTTP/2 field section (RFC 9113 §8.2.1)."""
    if name not in _GOOD_NAMES:
        if _NAME_OK.fullmatch(name) is None:
            return False
        if len(_GOOD_NAMES) < _GOOD_NAMES_CAP:
            _GOOD_NAMES.add(name)
    size = len(value)
    if not size:
        return True
    # no SP/HTAB at either end; no NUL, CR or LF anywhere (three C-level scans beat a regex;
    # find() and int compares stay native when compiled, where ``in`` would not)
    first, last = value[0], value[size - 1]
    if first == 0x20 or first == 0x09 or last == 0x20 or last == 0x09:  # noqa: PLR1714
        return False
    return value.find(b"\n") < 0 and value.find(b"\r") < 0 and value.find(b"\x00") < 0


# --- Huffman (RFC 7541 §5.2, appendix B) ---------------------------------------------------
#
# Decoding walks a 4-bit state machine (the approach of nghttp2): a state is an internal
# node of the code tree (256 of them, the root is 0) and each input nibble moves to another
# node, emitting at most one symbol (no code is shorter than 5 bits). One flat list entry per
# (state, nibble) packs: next state (bits 0-7), "a symbol was emitted" (bit 8), the symbol
# (bits 9-16), "EOS was decoded" (bit 17, an error), and "the new state may end the string"
# (bit 18: the bits since the last symbol are fewer than 8 and all ones, the EOS prefix that
# pads the last octet).

_EMIT: Final = 1 << 8
_FAIL: Final = 1 << 17
_ACCEPT: Final = 1 << 18


def _build_huffman_decoder() -> list[int]:
    # The code tree: node -> [child for bit 0, child for bit 1]; a child >= 0 is an internal
    # node id, a child < 0 is the leaf -(symbol + 1).
    children: list[list[int]] = [[0, 0]]
    for symbol in range(257):
        code, length = HUFFMAN_CODES[symbol], HUFFMAN_LENGTHS[symbol]
        node = 0
        for shift in range(length - 1, 0, -1):
            bit = (code >> shift) & 1
            nxt = children[node][bit]
            if nxt == 0:
                children.append([0, 0])
                nxt = len(children) - 1
                children[node][bit] = nxt
            node = nxt
        children[node][code & 1] = -(symbol + 1)
    # Nodes on the all-ones path at depth < 8 may end a string (padding is a EOS prefix).
    accepting = [False] * len(children)
    node, depth = 0, 0
    while node >= 0 and depth < 8:
        accepting[node] = True
        node = children[node][1]
        depth += 1
    table = [0] * (len(children) * 16)
    for state in range(len(children)):
        for nibble in range(16):
            node, entry = state, 0
            for shift in (3, 2, 1, 0):
                child = children[node][(nibble >> shift) & 1]
                if child < 0:
                    symbol = -child - 1
                    if symbol == 256:
                        entry |= _FAIL
                    else:
                        entry |= _EMIT | (symbol << 9)
                    node = 0
                else:
                    node = child
            table[state * 16 + nibble] = entry | node | (_ACCEPT if accepting[node] else 0)
    return table


_HUFFMAN_DECODE: Final = _build_huffman_decoder()


def huffman_decode(data: bytes) -> bytes:
    """Decode a Huffman-coded string; :class:`HPACKError` for EOS or bad padding."""
    table = _HUFFMAN_DECODE
    out: list[int] = []  # an index loop and a list of ints: twice as fast as bytearray
    entry = _ACCEPT  # the empty string is valid
    for i in range(len(data)):
        byte = data[i]
        entry = table[((entry & 0xFF) << 4) | (byte >> 4)]
        if entry & (_EMIT | _FAIL):
            if entry & _FAIL:
                raise HPACKError("EOS symbol in a Huffman string")
            out.append((entry >> 9) & 0xFF)
        entry = table[((entry & 0xFF) << 4) | (byte & 0x0F)]
        if entry & (_EMIT | _FAIL):
            if entry & _FAIL:
                raise HPACKError("EOS symbol in a Huffman string")
            out.append((entry >> 9) & 0xFF)
    if not entry & _ACCEPT:
        raise HPACKError("invalid Huffman padding")
    return bytes(out)


def huffman_encoded_length(data: bytes) -> int:
    """The length in octets of ``data`` Huffman coded (to choose the shorter form)."""
    lengths = HUFFMAN_LENGTHS
    bits = 0
    for i in range(len(data)):
        bits += lengths[data[i]]
    return (bits + 7) >> 3


def huffman_encode(data: bytes) -> bytes:
    """Huffman-code ``data``, padding the last octet with the EOS prefix (ones)."""
    codes, lengths = HUFFMAN_CODES, HUFFMAN_LENGTHS
    out = bytearray()
    acc = 0  # never more than 7 + 30 bits: whole octets are flushed after each symbol
    bits = 0
    for i in range(len(data)):
        byte = data[i]
        acc = (acc << lengths[byte]) | codes[byte]
        bits += lengths[byte]
        while bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
        acc &= (1 << bits) - 1
    if bits:
        out.append(((acc << (8 - bits)) | (0xFF >> bits)) & 0xFF)
    return bytes(out)


# --- integers and strings (RFC 7541 §5) ----------------------------------------------------


def _encode_int(out: bytearray, first: int, value: int, prefix_max: int) -> None:
    """Append ``value`` with an N-bit prefix; ``first`` holds the representation's flag bits
    and ``prefix_max`` is 2^N - 1."""
    if value < prefix_max:
        out.append(first | value)
        return
    out.append(first | prefix_max)
    value -= prefix_max
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _encode_string(out: bytearray, data: bytes) -> None:
    """Append a string literal, Huffman coded when that is shorter (as nghttp2 does)."""
    size = len(data)
    if size > 2:
        coded_size = huffman_encoded_length(data)
        if coded_size < size:
            _encode_int(out, 0x80, coded_size, 0x7F)
            out += huffman_encode(data)
            return
    _encode_int(out, 0, size, 0x7F)
    out += data


class _Cursor:
    """Where decoding stands in a block; integers and strings advance ``pos``."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)

    def integer(self, value: int) -> int:
        """Finish an integer whose prefix was all ones (``value`` = the prefix max)."""
        data = self.data
        shift = 0
        while True:
            if self.pos >= self.end:
                raise HPACKError("truncated integer")
            byte = data[self.pos]
            self.pos += 1
            value += (byte & 0x7F) << shift
            if value > _MAX_INT:
                raise HPACKError("integer too large")
            if not byte & 0x80:
                return value
            shift += 7

    def string(self) -> bytes:
        if self.pos >= self.end:
            raise HPACKError("truncated string")
        first = self.data[self.pos]
        self.pos += 1
        length = first & 0x7F
        if length == 0x7F:
            length = self.integer(length)
        start = self.pos
        stop = start + length
        if stop > self.end:
            raise HPACKError("string runs past the header block")
        self.pos = stop
        if first & 0x80:
            return huffman_decode(self.data[start:stop])
        return self.data[start:stop]


# --- the decoder ---------------------------------------------------------------------------


class Decoder:
    """Decodes header blocks from one peer; owns the dynamic table that peer fills.

    ``decode`` stops *collecting* fields once their size (RFC 9113 §6.5.2: name + value +
    32 each) passes ``limit``, and sets ``oversized``; it still walks the rest of the block,
    which is bounded by the caller's block-size cap, so the dynamic table stays in step with
    the peer's encoder (RFC 9113 §10.5.1) and an HPACK bomb (a small block naming one big
    entry many times) is never materialized.
    """

    __slots__ = (
        "_entries",
        "_flags",
        "_max_size",
        "_settings_max",
        "_size",
        "_update_required",
        "invalid",
        "oversized",
    )

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        self._entries: list[Header] = []  # newest first: dynamic index 62 is _entries[0]
        self._flags: list[bool] = []  # per entry: the field is valid HTTP/2
        self._size = 0
        self._max_size = max_table_size  # the size the peer's encoder chose (≤ settings)
        self._settings_max = max_table_size  # our SETTINGS_HEADER_TABLE_SIZE
        self._update_required = False
        self.oversized = False
        self.invalid = False

    @property
    def table_size(self) -> int:
        """Bytes the dynamic table holds now, by RFC 7541's accounting."""
        return self._size

    def set_settings_max(self, size: int) -> None:
        """Our SETTINGS_HEADER_TABLE_SIZE took effect (the peer acknowledged it). When it
        shrinks below the size in use, the peer's next block must start with a size update
        (RFC 7541 §4.2)."""
        self._settings_max = size
        if size < self._max_size:
            self._update_required = True
            self._resize(size)

    def _resize(self, size: int) -> None:
        self._max_size = size
        entries, flags = self._entries, self._flags
        while self._size > size:
            name, value = entries.pop()
            flags.pop()
            self._size -= len(name) + len(value) + ENTRY_OVERHEAD

    def _add(self, header: Header, valid: bool) -> None:
        name, value = header
        size = len(name) + len(value) + ENTRY_OVERHEAD
        if size > self._max_size:  # §4.4: an entry larger than the table empties it
            self._entries.clear()
            self._flags.clear()
            self._size = 0
            return
        self._resize_for(size)
        self._entries.insert(0, header)
        self._flags.insert(0, valid)
        self._size += size

    def _resize_for(self, size: int) -> None:
        entries, flags = self._entries, self._flags
        limit = self._max_size - size
        while self._size > limit:
            name, value = entries.pop()
            flags.pop()
            self._size -= len(name) + len(value) + ENTRY_OVERHEAD

    def _lookup(self, index: int) -> Header:
        if index < 62:
            if index == 0:
                raise HPACKError("index 0")
            return STATIC_TABLE[index]
        index -= 62
        if index >= len(self._entries):
            raise HPACKError("index past the dynamic table")
        if not self._flags[index]:
            self.invalid = True
        return self._entries[index]

    def _name(self, index: int) -> bytes:
        """The name at ``index`` (validity is judged with the new value, by the caller)."""
        if index < 62:
            return STATIC_TABLE[index][0]
        index -= 62
        if index >= len(self._entries):
            raise HPACKError("index past the dynamic table")
        return self._entries[index][0]

    def decode(self, data: bytes, limit: int) -> list[Header]:
        """Decode one complete header block into ``(name, value)`` pairs, in order.

        Raises :class:`HPACKError` when the block is not valid HPACK. Afterwards
        ``oversized`` tells whether the fields passed ``limit`` (the list returned is then
        incomplete and must not be used) and ``invalid`` whether a field broke RFC 9113
        §8.2.1.
        """
        headers: list[Header] = []
        cur = _Cursor(data)
        end = cur.end
        size = 0
        self.oversized = False
        self.invalid = False
        at_start = True
        while cur.pos < end:
            byte = data[cur.pos]
            cur.pos += 1
            if byte & 0x80:  # indexed field
                index = byte & 0x7F
                if index == 0x7F:
                    index = cur.integer(index)
                header = self._lookup(index)
            elif byte & 0x40:  # literal with incremental indexing
                index = byte & 0x3F
                if index == 0x3F:
                    index = cur.integer(index)
                name = self._name(index) if index else cur.string()
                header = (name, cur.string())
                valid = valid_field(header[0], header[1])
                if not valid:
                    self.invalid = True
                self._add(header, valid)
            elif byte & 0x20:  # dynamic table size update
                if not at_start:
                    raise HPACKError("table size update after a field")
                new_size = byte & 0x1F
                if new_size == 0x1F:
                    new_size = cur.integer(new_size)
                if new_size > self._settings_max:
                    raise HPACKError("table size update above SETTINGS_HEADER_TABLE_SIZE")
                self._resize(new_size)
                self._update_required = False
                continue
            else:  # literal without indexing (0000) or never indexed (0001)
                index = byte & 0x0F
                if index == 0x0F:
                    index = cur.integer(index)
                name = self._name(index) if index else cur.string()
                header = (name, cur.string())
                if not valid_field(header[0], header[1]):
                    self.invalid = True
            if at_start:
                if self._update_required:
                    raise HPACKError("missing table size update")
                at_start = False
            size += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
            if size > limit:
                self.oversized = True
            else:
                headers.append(header)
        if at_start and self._update_required and end:
            raise HPACKError("missing table size update")
        return headers


# --- the encoder ---------------------------------------------------------------------------


def _static_fields() -> dict[Header, int]:
    """Exact (name, value) pairs of the static table to their index."""
    return {header: index for index, header in enumerate(STATIC_TABLE) if header[1]}


def _static_names() -> dict[bytes, int]:
    """Names of the static table to their lowest index."""
    names: dict[bytes, int] = {}
    for index in range(len(STATIC_TABLE) - 1, 0, -1):  # backwards: the lowest index wins
        names[STATIC_TABLE[index][0]] = index
    return names


_STATIC_FIELDS: Final = _static_fields()
_STATIC_NAMES: Final = _static_names()

# Fields an intermediary must not let into a compression context (RFC 7541 §7.1): sent
# never-indexed. The flag a peer put on a field is not carried through the proxy as a bit
# (headers are plain tuples), so sensitivity is decided by name, as nghttp2 does.
_SENSITIVE: Final = frozenset({b"authorization", b"proxy-authorization", b"set-cookie"})
_SHORT_COOKIE: Final = 20  # cookie values shorter than this are guessable: never indexed


class Encoder:
    """Encodes header lists for one peer, indexing repeated fields in a dynamic table.

    Lookups are O(1): each field and each name maps to the *absolute* insertion number of
    its newest copy, and the wire index is derived from the count of insertions, so nothing
    is renumbered when an entry is added or evicted.
    """

    __slots__ = (
        "_by_field",
        "_by_name",
        "_entries",
        "_inserted",
        "_max_size",
        "_pending_updates",
        "_size",
    )

    def __init__(self) -> None:
        self._entries: list[Header] = []  # oldest first
        self._size = 0
        self._max_size = DEFAULT_TABLE_SIZE
        self._inserted = 0  # entries ever added; the newest has number _inserted - 1
        self._by_field: dict[Header, int] = {}
        self._by_name: dict[bytes, int] = {}
        self._pending_updates: list[int] = []

    def set_max_table_size(self, size: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE changed; we use at most 4096 (memory per
        connection stays bounded) and announce our size at the start of the next block."""
        size = min(size, DEFAULT_TABLE_SIZE)
        pending = self._pending_updates
        if size == self._max_size and not pending:
            return
        # §4.2: when the size changed more than once between blocks, announce the smallest
        # it went through, then the final one
        smallest = min(pending[0], size) if pending else size
        self._pending_updates = [smallest] if smallest == size else [smallest, size]
        self._max_size = size
        self._evict(0)

    def _evict(self, room: int) -> None:
        entries = self._entries
        limit = self._max_size - room
        while self._size > limit and entries:
            header = entries.pop(0)
            number = self._inserted - len(entries) - 1
            if self._by_field.get(header) == number:
                del self._by_field[header]
            if self._by_name.get(header[0]) == number:
                del self._by_name[header[0]]
            self._size -= len(header[0]) + len(header[1]) + ENTRY_OVERHEAD

    def encode(self, headers: list[Header]) -> bytes:
        out = bytearray()
        if self._pending_updates:
            for size in self._pending_updates:
                _encode_int(out, 0x20, size, 0x1F)
            self._pending_updates.clear()
        by_field = self._by_field
        for header in headers:
            index = _STATIC_FIELDS.get(header, 0)
            if index:
                out.append(0x80 | index)
                continue
            number = by_field.get(header, -1)
            if number >= 0:
                _encode_int(out, 0x80, 61 + self._inserted - number, 0x7F)
                continue
            name, value = header
            name_index = _STATIC_NAMES.get(name, 0)
            if not name_index:
                number = self._by_name.get(name, -1)
                if number >= 0:
                    name_index = 61 + self._inserted - number
            size = len(name) + len(value) + ENTRY_OVERHEAD
            if name in _SENSITIVE or (name == b"cookie" and len(value) < _SHORT_COOKIE):
                _encode_int(out, 0x10, name_index, 0x0F)
            elif size > self._max_size >> 1:  # would flush most of the table: don't index
                _encode_int(out, 0x00, name_index, 0x0F)
            else:
                _encode_int(out, 0x40, name_index, 0x3F)
                self._evict(size)
                self._entries.append(header)
                by_field[header] = self._inserted
                self._by_name[name] = self._inserted
                self._inserted += 1
                self._size += size
            if not name_index:
                _encode_string(out, name)
            _encode_string(out, value)
        return bytes(out)
