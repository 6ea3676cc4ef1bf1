"""Just enough Hessian 2.0 for Dubbo framing: read the routing strings and attachments,
step over everything else without building it, and write small replies.

A proxy never needs the arguments of a call, only where they end, so :meth:`skip` walks any
value (objects, lists, maps, binary, ...) by its tags and lengths alone. Grammar:
http://hessian.caucho.com/doc/hessian-serialization.html (section "Bytecode map").

:meth:`Hessian2Reader.read_object_fields` reads the routing fields of a SOFA-RPC request
object (Bolt), which comes in two dialects: Hessian 2.0 as above, and the Hessian 2 draft
that Hessian 3.x and hessian.js 1.x write (sofa-hessian-node's default, so sofa-rpc-node's).
The draft defines a class with ``O`` (name length, name, field count, field names) and
writes an instance as ``o`` and a class number; strings are ``0x00-0x1f``, ``S`` and ``s``
chunks; lists are ``V`` (type, ``n``/``l`` length, values, ``z``) or ``v`` (type number,
length, values); maps ``M`` (type) or ``H`` up to ``z``; ``J``/``K``/``R`` are references;
``0x77`` is a 32-bit long, ``0x67-0x6b`` compact doubles and ``d`` a date (see hessian.js
1.x's ``lib/v2``).

Strings count UTF-16 units and are written the way Java writes them: UTF-8 per unit, so a
character outside the BMP is two 3-byte surrogates (CESU-8). Reading turns such pairs back
into one character; a lone surrogate is kept as is, since Java allows it.

Every malformed input (unknown tag, truncation, bad UTF-8, a reference to an undefined
class, nesting deeper than :data:`MAX_DEPTH`) raises :class:`RpcProtocolError`, nothing else.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Set

from shoal.codec.rpc.base import RpcProtocolError

MAX_DEPTH = 64  # nested lists/maps/objects; real payloads stay far below, bombs do not

_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")


def _table(*spans: tuple[int, int, int]) -> bytearray:
    """A 256-entry lookup by tag, from (first tag, last tag, value) spans."""
    table = bytearray(256)
    for first, last, value in spans:
        table[first : last + 1] = bytes([value]) * (last - first + 1)
    return table


# Total size (tag included) of each value whose tag alone tells it; 0 = it does not.
_FIXED = _table(
    (0x4E, 0x4E, 1), (0x54, 0x54, 1), (0x46, 0x46, 1),  # null, true, false
    (0x80, 0xBF, 1), (0xC0, 0xCF, 2), (0xD0, 0xD7, 3), (0x49, 0x49, 5),  # int
    (0xD8, 0xEF, 1), (0xF0, 0xFF, 2), (0x38, 0x3F, 3), (0x59, 0x59, 5), (0x4C, 0x4C, 9),  # long
    (0x5B, 0x5C, 1), (0x5D, 0x5D, 2), (0x5E, 0x5E, 3), (0x5F, 0x5F, 5), (0x44, 0x44, 9),  # double
    (0x4A, 0x4A, 9), (0x4B, 0x4B, 5),  # date: millis, minutes
    *[(tag, tag, 1 + tag - 0x20) for tag in range(0x20, 0x30)],  # binary of 0-15 bytes
)  # fmt: skip

# The same for the Hessian 2 draft.
_DRAFT_FIXED = _table(
    (0x4E, 0x4E, 1), (0x54, 0x54, 1), (0x46, 0x46, 1),  # null, true, false
    (0x80, 0xBF, 1), (0xC0, 0xCF, 2), (0xD0, 0xD7, 3), (0x49, 0x49, 5),  # int
    (0xD8, 0xEF, 1), (0xF0, 0xFF, 2), (0x38, 0x3F, 3), (0x77, 0x77, 5), (0x4C, 0x4C, 9),  # long
    (0x67, 0x68, 1), (0x69, 0x69, 2), (0x6A, 0x6A, 3), (0x6B, 0x6B, 5), (0x44, 0x44, 9),  # double
    (0x64, 0x64, 9),  # date
    (0x4A, 0x4A, 2), (0x4B, 0x4B, 3), (0x52, 0x52, 5),  # reference to an earlier value
    *[(tag, tag, 1 + tag - 0x20) for tag in range(0x20, 0x30)],  # binary of 0-15 bytes
)  # fmt: skip

_STRING, _INT = 1, 2
_KIND = _table(
    (0x00, 0x1F, _STRING), (0x30, 0x33, _STRING), (0x52, 0x53, _STRING),
    (0x80, 0xD7, _INT), (0x49, 0x49, _INT),
    (0xD8, 0xFF, _INT), (0x38, 0x3F, _INT), (0x59, 0x59, _INT), (0x4C, 0x4C, _INT),
)  # fmt: skip

# Raw patterns, the escapes left to re: mypyc refuses surrogates in string literals.
_ASTRAL = re.compile(r"[\U00010000-\U0010ffff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _pair_surrogates(text: str) -> str:
    """Java's surrogate pairs as one character each (lone surrogates stay)."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def _truncated() -> RpcProtocolError:
    return RpcProtocolError("hessian2: value runs past the end of the body")


class Hessian2Reader:
    """Reads one hessian2 stream (one Dubbo body) from ``buf``, starting at ``pos``.

    Class definitions are stream-scoped in Hessian, so one reader must see a body from its
    start for object instances to be skipped. ``pos`` is the offset of the next value.
    """

    __slots__ = ("_classes", "buf", "pos")

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self._classes: list[int] = []  # field count of each class definition, in order

    # The public methods translate the IndexError / struct.error that running off the end
    # raises deep inside into RpcProtocolError; the internals index freely.

    def read_string(self) -> str:
        """A string in any form; null reads as "" (Java writes an absent version as null)."""
        try:
            return self._string()
        except (IndexError, struct.error):
            raise _truncated() from None

    def read_int(self) -> int:
        """An int or a long, in any of their compact forms."""
        try:
            return self._int()
        except (IndexError, struct.error):
            raise _truncated() from None

    def read_bool(self) -> bool:
        try:
            tag = self.buf[self.pos]
        except IndexError:
            raise _truncated() from None
        if tag in {0x54, 0x46}:
            self.pos += 1
            return tag == 0x54
        raise RpcProtocolError(f"hessian2: expected a boolean, got tag 0x{tag:02x}")

    def read_string_map(self, numbers: dict[str, int] | None = None) -> dict[str, str]:
        """A map (typed 'M', untyped 'H' or null) keeping its string keys with string
        values; integer values go to ``numbers`` if given, every other entry is skipped."""
        try:
            return self._string_map(numbers)
        except (IndexError, struct.error):
            raise _truncated() from None

    def skip(self) -> None:
        """Step over one value of any type without building it."""
        try:
            self._skip(0)
        except (IndexError, struct.error):
            raise _truncated() from None
        if self.pos > len(self.buf):
            raise _truncated()

    def read_object_fields(self, class_name: str, wanted: Set[str]) -> dict[str, str]:
        """The string fields named in ``wanted`` of the object at ``pos``, which must be a
        ``class_name`` that starts with its class definition (as the first object of a
        stream does), in Hessian 2.0 (``C`` definition, ``O`` or ``0x60-0x6f`` instance)
        or in the Hessian 2 draft (``O`` definition, ``o`` instance).

        The fields are read in order and reading stops once every wanted one is read: the
        fields before are skipped without being built, and nothing after is looked at. A
        null field reads as ""; a wanted field the class does not have is left out.
        """
        try:
            fields = self._object_fields(class_name, wanted)
        except (IndexError, struct.error):
            raise _truncated() from None
        if self.pos > len(self.buf):
            raise _truncated()
        return fields

    # -- internals ----------------------------------------------------------------------

    def _int(self) -> int:
        buf = self.buf
        pos = self.pos
        tag = buf[pos]
        if 0x80 <= tag < 0xC0:
            self.pos = pos + 1
            return tag - 0x90
        if 0xC0 <= tag < 0xD0:
            self.pos = pos + 2
            return ((tag - 0xC8) << 8) + buf[pos + 1]
        if 0xD0 <= tag < 0xD8:
            self.pos = pos + 3
            return ((tag - 0xD4) << 16) + (buf[pos + 1] << 8) + buf[pos + 2]
        if tag in {0x49, 0x59}:
            self.pos = pos + 5
            return int(_I32.unpack_from(buf, pos + 1)[0])
        if 0xD8 <= tag < 0xF0:
            self.pos = pos + 1
            return tag - 0xE0
        if tag >= 0xF0:
            self.pos = pos + 2
            return ((tag - 0xF8) << 8) + buf[pos + 1]
        if 0x38 <= tag < 0x40:
            self.pos = pos + 3
            return ((tag - 0x3C) << 16) + (buf[pos + 1] << 8) + buf[pos + 2]
        if tag == 0x4C:
            self.pos = pos + 9
            return int(_I64.unpack_from(buf, pos + 1)[0])
        raise RpcProtocolError(f"hessian2: expected an int, got tag 0x{tag:02x}")

    def _count(self) -> int:
        """A length or reference: an int that must not be negative."""
        value = self._int()
        if value < 0:
            raise RpcProtocolError(f"hessian2: negative length or reference {value}")
        return value

    def _string(self) -> str:
        buf = self.buf
        pos = self.pos
        tag = buf[pos]
        if tag < 0x20:
            start = pos + 1
            count = tag
        elif 0x30 <= tag < 0x34:
            start = pos + 2
            count = ((tag - 0x30) << 8) + buf[pos + 1]
        elif tag == 0x53:
            start = pos + 3
            count = _U16.unpack_from(buf, pos + 1)[0]
        elif tag == 0x52:
            return self._chunked_string()
        elif tag == 0x4E:
            self.pos = pos + 1
            return ""
        else:
            raise RpcProtocolError(f"hessian2: expected a string, got tag 0x{tag:02x}")
        end = start + count
        try:  # inlined _chars: routing strings and attachments are the hot path
            text = buf[start:end].decode("ascii")
        except UnicodeDecodeError:
            return self._chars_slow(start, count)
        if len(text) != count:
            raise _truncated()
        self.pos = end
        return text

    def _chunked_string(self) -> str:
        buf = self.buf
        parts = []
        while buf[self.pos] == 0x52:
            parts.append(self._chars(self.pos + 3, _U16.unpack_from(buf, self.pos + 1)[0]))
        if _KIND[buf[self.pos]] != _STRING:  # the final chunk is any non-'R' string form
            raise RpcProtocolError("hessian2: string chunk not followed by a string")
        parts.append(self._string())
        return _pair_surrogates("".join(parts))

    def _chars(self, start: int, count: int) -> str:
        """``count`` UTF-16 units of string data from ``start`` on."""
        end = start + count
        try:  # the common case: ASCII, one byte per unit
            text = self.buf[start:end].decode("ascii")
        except UnicodeDecodeError:
            return self._chars_slow(start, count)
        if len(text) != count:
            raise _truncated()
        self.pos = end
        return text

    def _chars_slow(self, start: int, count: int) -> str:
        # No unit takes more than 3 bytes; decode up to the first invalid byte after `start`
        # (which may well belong to the next value) and keep the first `count` units.
        window = self.buf[start : start + 3 * count]
        try:
            text = window.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            text = window[: exc.start].decode("utf-8", "surrogatepass")
        text = text[:count]
        if len(text) < count:
            raise RpcProtocolError("hessian2: string data truncated or not valid UTF-8")
        if _ASTRAL.search(text) is not None:  # 4-byte UTF-8: Java writes surrogates instead
            raise RpcProtocolError("hessian2: 4-byte UTF-8 sequence in a string")
        self.pos = start + len(text.encode("utf-8", "surrogatepass"))
        return _pair_surrogates(text)

    def _skip_chars(self, start: int, count: int) -> None:
        end = start + count
        data = self.buf[start:end]
        if len(data) == count and data.isascii():
            self.pos = end
        else:
            self._chars_slow(start, count)

    def _skip_string(self) -> None:
        buf = self.buf
        tag = buf[self.pos]
        while tag == 0x52:
            self._skip_chars(self.pos + 3, _U16.unpack_from(buf, self.pos + 1)[0])
            tag = buf[self.pos]
        pos = self.pos
        if tag < 0x20:
            self._skip_chars(pos + 1, tag)
        elif 0x30 <= tag < 0x34:
            self._skip_chars(pos + 2, ((tag - 0x30) << 8) + buf[pos + 1])
        elif tag == 0x53:
            self._skip_chars(pos + 3, _U16.unpack_from(buf, pos + 1)[0])
        else:
            raise RpcProtocolError(f"hessian2: expected a string, got tag 0x{tag:02x}")

    def _skip_type(self) -> None:
        """A list or map type: a type name, or an int referring to an earlier one."""
        if _KIND[self.buf[self.pos]] == _STRING:
            self._skip_string()
        else:
            self._count()

    def _string_map(self, numbers: dict[str, int] | None) -> dict[str, str]:
        buf = self.buf
        tag = buf[self.pos]
        self.pos += 1
        if tag == 0x4E:
            return {}
        if tag == 0x4D:
            self._skip_type()
        elif tag != 0x48:
            raise RpcProtocolError(f"hessian2: expected a map, got tag 0x{tag:02x}")
        result: dict[str, str] = {}
        while (tag := buf[self.pos]) != 0x5A:
            if _KIND[tag] != _STRING:
                self._skip(1)
                self._skip(1)
                continue
            key = self._string()
            kind = _KIND[buf[self.pos]]
            if kind == _STRING:
                result[key] = self._string()
            elif kind == _INT and numbers is not None:
                numbers[key] = self._int()
            else:
                self._skip(1)
        self.pos += 1
        return result

    def _skip(self, depth: int) -> None:
        buf = self.buf
        tag = buf[self.pos]
        size = _FIXED[tag]
        if size:
            self.pos += size
            return
        if _KIND[tag] == _STRING:
            self._skip_string()
            return
        if tag in {0x41, 0x42} or 0x34 <= tag < 0x38:
            self._skip_binary()
            return
        if tag == 0x51:  # reference to an earlier list, map or object
            self.pos += 1
            self._count()
            return
        if depth >= MAX_DEPTH:
            raise RpcProtocolError(f"hessian2: values nested deeper than {MAX_DEPTH}")
        depth += 1
        self.pos += 1
        if tag == 0x43:  # class definition, then the value it precedes
            self._skip_string()
            fields = self._count()
            for _ in range(fields):
                self._skip_string()
            self._classes.append(fields)
            self._skip(depth)
        elif tag == 0x4F or 0x60 <= tag < 0x70:  # object instance: one value per field
            ref = self._count() if tag == 0x4F else tag - 0x60
            if ref >= len(self._classes):
                raise RpcProtocolError(f"hessian2: object of undefined class #{ref}")
            for _ in range(self._classes[ref]):
                self._skip(depth)
        elif 0x70 <= tag < 0x80:  # compact fixed-length list, typed below 0x78
            if tag < 0x78:
                self._skip_type()
            for _ in range(tag & 0x07):
                self._skip(depth)
        elif tag in {0x56, 0x58}:  # fixed-length list, typed or not
            if tag == 0x56:
                self._skip_type()
            for _ in range(self._count()):
                self._skip(depth)
        elif tag in {0x55, 0x57}:  # variable-length list up to 'Z', typed or not
            if tag == 0x55:
                self._skip_type()
            while buf[self.pos] != 0x5A:
                self._skip(depth)
            self.pos += 1
        elif tag in {0x48, 0x4D}:  # map up to 'Z', untyped or typed
            if tag == 0x4D:
                self._skip_type()
            while buf[self.pos] != 0x5A:
                self._skip(depth)
                self._skip(depth)
            self.pos += 1
        else:
            raise RpcProtocolError(f"hessian2: unknown tag 0x{tag:02x}")

    def _object_fields(self, class_name: str, wanted: Set[str]) -> dict[str, str]:
        buf = self.buf
        tag = buf[self.pos]
        self.pos += 1
        draft = tag == 0x4F
        if tag == 0x43:  # 'C' name field-count field-names
            name = self._string()
        elif draft:  # 'O' name-length name field-count field-names
            length = self._count()
            name = self._chars(self.pos, length)
        else:
            raise RpcProtocolError(f"hessian2: expected a {class_name}, got tag 0x{tag:02x}")
        if name != class_name:
            raise RpcProtocolError(f"hessian2: expected a {class_name}, got a {name}")
        count = self._count()
        wanted_at: dict[int, str] = {}  # field number -> name, for the wanted fields only
        for index in range(count):
            field = self._draft_string() if draft else self._string()
            if field in wanted:
                wanted_at[index] = field
        self._classes.append(count)
        tag = buf[self.pos]
        self.pos += 1
        if tag == (0x6F if draft else 0x4F):  # an instance: 'o' or 'O', then the class
            ref = self._count()
        elif not draft and 0x60 <= tag < 0x70:  # Hessian 2.0's compact instance
            ref = tag - 0x60
        else:
            ref = -1
        if ref != len(self._classes) - 1:
            raise RpcProtocolError(f"hessian2: no {class_name} instance after its definition")
        found: dict[str, str] = {}
        for index in range(count):
            wanted_name = wanted_at.get(index)
            if wanted_name is not None:
                found[wanted_name] = self._draft_string() if draft else self._string()
                if len(found) == len(wanted):
                    break
            elif draft:
                self._skip_draft(1)
            else:
                self._skip(1)
        return found

    def _draft_string(self) -> str:
        """A draft string: ``s`` chunks, then ``S`` or a short string; null reads as ""."""
        buf = self.buf
        tag = buf[self.pos]
        if tag < 0x20:
            return self._chars(self.pos + 1, tag)
        if tag == 0x53:
            return self._chars(self.pos + 3, _U16.unpack_from(buf, self.pos + 1)[0])
        if tag == 0x4E:
            self.pos += 1
            return ""
        if tag != 0x73:
            raise RpcProtocolError(f"hessian2: expected a string, got tag 0x{tag:02x}")
        parts = []
        while buf[self.pos] == 0x73:
            parts.append(self._chars(self.pos + 3, _U16.unpack_from(buf, self.pos + 1)[0]))
        if buf[self.pos] >= 0x20 and buf[self.pos] != 0x53:  # the final chunk: 'S' or short
            raise RpcProtocolError("hessian2: string chunk not followed by a string")
        parts.append(self._draft_string())
        return _pair_surrogates("".join(parts))

    def _skip_draft_type(self) -> None:
        """The optional type of a draft list or map: ``t`` and a name, or ``T``/``u`` and
        the number of an earlier one (hessian.js 1.x reads both)."""
        buf = self.buf
        tag = buf[self.pos]
        if tag == 0x74:
            self._skip_chars(self.pos + 3, _U16.unpack_from(buf, self.pos + 1)[0])
        elif tag in {0x54, 0x75}:
            self.pos += 1
            self._count()

    def _skip_draft(self, depth: int) -> None:
        """Step over one value of the Hessian 2 draft."""
        buf = self.buf
        tag = buf[self.pos]
        size = _DRAFT_FIXED[tag]
        if size:
            self.pos += size
            return
        if tag < 0x20 or tag in {0x53, 0x73}:
            self._draft_string()
            return
        if tag in {0x42, 0x62}:  # binary: 'b' chunks, then 'B' or a short one
            while buf[self.pos] == 0x62:
                self.pos += 3 + _U16.unpack_from(buf, self.pos + 1)[0]
            tag = buf[self.pos]
            if tag == 0x42:
                self.pos += 3 + _U16.unpack_from(buf, self.pos + 1)[0]
            elif 0x20 <= tag < 0x30:
                self.pos += 1 + tag - 0x20
            else:
                raise RpcProtocolError(f"hessian2: binary chunk followed by tag 0x{tag:02x}")
            return
        if depth >= MAX_DEPTH:
            raise RpcProtocolError(f"hessian2: values nested deeper than {MAX_DEPTH}")
        depth += 1
        self.pos += 1
        if tag == 0x4F:  # class definition, then the value it precedes
            length = self._count()
            self._skip_chars(self.pos, length)
            fields = self._count()
            for _ in range(fields):
                self._draft_string()
            self._classes.append(fields)
            self._skip_draft(depth)
        elif tag == 0x6F:  # object instance: one value per field
            ref = self._count()
            if ref >= len(self._classes):
                raise RpcProtocolError(f"hessian2: object of undefined class #{ref}")
            for _ in range(self._classes[ref]):
                self._skip_draft(depth)
        elif tag == 0x56:  # list: type, length (not checked), values up to 'z'
            self._skip_draft_type()
            if buf[self.pos] == 0x6E:
                self.pos += 2
            elif buf[self.pos] == 0x6C:
                self.pos += 5
            while buf[self.pos] != 0x7A:
                self._skip_draft(depth)
            self.pos += 1
        elif tag == 0x76:  # list of an earlier type: type number, length, values
            self._count()
            for _ in range(self._count()):
                self._skip_draft(depth)
        elif tag in {0x48, 0x4D}:  # map up to 'z', untyped or typed
            if tag == 0x4D:
                self._skip_draft_type()
            while buf[self.pos] != 0x7A:
                self._skip_draft(depth)
                self._skip_draft(depth)
            self.pos += 1
        else:
            raise RpcProtocolError(f"hessian2: unknown tag 0x{tag:02x}")

    def _skip_binary(self) -> None:
        buf = self.buf
        tag = buf[self.pos]
        while tag == 0x41:
            self.pos += 3 + _U16.unpack_from(buf, self.pos + 1)[0]
            tag = buf[self.pos]
        if tag == 0x42:
            self.pos += 3 + _U16.unpack_from(buf, self.pos + 1)[0]
        elif 0x34 <= tag < 0x38:
            self.pos += 2 + ((tag - 0x34) << 8) + buf[self.pos + 1]
        elif 0x20 <= tag < 0x30:
            self.pos += 1 + tag - 0x20
        else:
            raise RpcProtocolError(f"hessian2: binary chunk followed by tag 0x{tag:02x}")


# -- writing ------------------------------------------------------------------------------


def _split_astral(match: re.Match[str]) -> str:
    code = ord(match.group()) - 0x10000
    return chr(0xD800 + (code >> 10)) + chr(0xDC00 + (code & 0x3FF))


def write_null(out: bytearray) -> None:
    out.append(0x4E)


def write_int(out: bytearray, value: int) -> None:
    """The shortest int form; values beyond 32 bits become a long ('L')."""
    if -0x10 <= value <= 0x2F:
        out.append(0x90 + value)
    elif -0x800 <= value <= 0x7FF:
        out += bytes((0xC8 + (value >> 8), value & 0xFF))
    elif -0x40000 <= value <= 0x3FFFF:
        out += bytes((0xD4 + (value >> 16), (value >> 8) & 0xFF, value & 0xFF))
    elif -0x80000000 <= value <= 0x7FFFFFFF:
        out.append(0x49)
        out += _I32.pack(value)
    else:
        out.append(0x4C)
        out += _I64.pack(value)


def write_string(out: bytearray, value: str) -> None:
    """As Java writes it: chunks of at most 0x8000 UTF-16 units, never split in a pair."""
    units = value if value.isascii() else _ASTRAL.sub(_split_astral, value)
    start = 0
    while len(units) - start > 0x8000:
        end = start + 0x8000
        if 0xD800 <= ord(units[end - 1]) <= 0xDBFF:  # a high surrogate
            end -= 1
        out.append(0x52)
        out += _U16.pack(end - start)
        out += units[start:end].encode("utf-8", "surrogatepass")
        start = end
    length = len(units) - start
    if length < 0x20:
        out.append(length)
    elif length < 0x400:
        out += bytes((0x30 + (length >> 8), length & 0xFF))
    else:
        out.append(0x53)
        out += _U16.pack(length)
    out += units[start:].encode("utf-8", "surrogatepass")


def write_string_map(out: bytearray, mapping: Mapping[str, str]) -> None:
    """An untyped map ('H', Java's HashMap) of strings."""
    out.append(0x48)
    for key, value in mapping.items():
        write_string(out, key)
        write_string(out, value)
    out.append(0x5A)
