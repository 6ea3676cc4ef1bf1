"""Hessian 2.0 reader/writer against bytes made by hessian.js 2.11.0 (the real encoder).

The golden constants below were printed by tests/unit/golden/dubbo_golden.js (run once with
Node; see that file) and are pasted here so these tests need no Node. Values over 300 bytes
are stored zlib-compressed and base64-encoded.
"""

from __future__ import annotations

import base64
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.codec.rpc.base import RpcProtocolError
from shoal.codec.rpc.hessian2 import (
    MAX_DEPTH,
    Hessian2Reader,
    write_int,
    write_null,
    write_string,
    write_string_map,
)

GOLDEN_VALUES: dict[str, str] = {
    "s_empty": "00",
    "s_one": "0161",
    "s_31": "1f78787878787878787878787878787878787878787878787878787878787878",
    "s_32": "30207878787878787878787878787878787878787878787878787878787878787878",
    "s_cjk": "05e4b8ade69687e5ad97e7aca6e4b8b2",
    "s_latin": "0b68c3a96c6c6f2077c3b6726c64",
    "s_emoji": "06686920eda0bdedb88021",
    "i_0": "90",
    "i_m16": "80",
    "i_47": "bf",
    "i_m17": "c7ef",
    "i_48": "c830",
    "i_m2048": "c000",
    "i_2047": "cfff",
    "i_m2049": "d3f7ff",
    "i_2048": "d40800",
    "i_m262144": "d00000",
    "i_262143": "d7ffff",
    "i_m262145": "49fffbffff",
    "i_262144": "4900040000",
    "i_max": "497fffffff",
    "i_min": "4980000000",
    "l_0": "e0",
    "l_m8": "d8",
    "l_15": "ef",
    "l_m9": "f7f7",
    "l_16": "f810",
    "l_m2048": "f000",
    "l_2047": "ffff",
    "l_m2049": "3bf7ff",
    "l_2048": "3c0800",
    "l_m262144": "380000",
    "l_262143": "3fffff",
    "l_m262145": "59fffbffff",
    "l_262144": "5900040000",
    "l_i32max": "597fffffff",
    "l_i32min": "5980000000",
    "l_2p31": "4c0000000080000000",
    "l_m2p31m1": "4cffffffff7fffffff",
    "l_2p53p1": "4c0020000000000001",
    "l_min": "4c8000000000000000",
    "l_max": "4c7fffffffffffffff",
    "null": "4e",
    "true": "54",
    "false": "46",
    "dbl_0": "5b",
    "dbl_1": "5c",
    "dbl_127": "5d7f",
    "dbl_m128": "5d80",
    "dbl_128": "5e0080",
    "dbl_m32768": "5e8000",
    "dbl_32768": "5f01f40000",
    "dbl_1_5": "5f000005dc",
    "dbl_pi": "44400921fb54442d18",
    "dbl_big": "447e37e43c8800759c",
    "date_minutes": "4b01ab3f00",
    "date_millis": "4a0000011f71fb04cb",
    "bin_0": "20",
    "bin_15": "2f010101010101010101010101010101",
    "bin_16": "341002020202020202020202020202020202",
    "list_empty": "78",
    "list_3": "7b910374776f5f00000dac",
    "list_4": "7c0161016201630164",
    "list_7": "7f91929394959697",
    "list_9": "5899919293949596979899",
    "list_nested": "7b79917a927a937a94799578",
    "list_typed_int": "73045b696e74919293",
    "list_typed_int_7": "77045b696e7491929394959697",
    "list_typed_long_10": "56055b6c6f6e679ae1e2e3e4e5e6e7e8e9ea",
    "list_typed_reuse": "7a71045b696e749172909293",
    "list_of_lists_typed": "720e6a6176612e7574696c2e4c6973747190016171900162",
    "map_untyped": "480161910162017801634e01647a9192016548016601675a5a",
    "map_typed": (
        "4d1f636f6d2e616c69626162612e666173746a736f6e2e4a534f4e4f626a656374016b0176016e925a"
    ),
    "map_int_keys": "4891036f6e65920374776f057468726565935a",
    "obj": "4310636f6d2e6578616d706c652e5573657292046e616d65036167656005616c696365ae",
    "obj_nested": (
        "4311636f6d2e6578616d706c652e4f7264657293026964056f776e6572056974656d7360f82a4310636f"
        "6d2e6578616d706c652e5573657292046e616d65036167656103626f62b97a6101639161016492"
    ),
    "obj_ref": "7a4310636f6d2e6578616d706c652e5573657292046e616d65036167656006736861726564975191",
    "exception": (
        "431a6a6176612e6c616e672e52756e74696d65457863657074696f6e910d64657461696c4d6573736167"
        "656004626f6f6d"
    ),
    "mixed": "58984e5446e15f000004e24b00000000226869026f6b",
}

GOLDEN_VALUES_ZLIB: dict[str, str] = {
    "s_1023": "eNoz/l85CkbBKBipAAATKOTJ",
    "s_1024": "eNoLZmGoHAWjYBSMWAAAi9rkZw==",
    "s_32768": "eNrtwTEBAAAMAiA72sZr0VcE6GUAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAwB5XXwRn",
    "s_32769": "eNrtwTEBAAAIAyCtaJxdi24R4DoBAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAALJ54JUE4Q==",
    "s_70000": (
        "eNrt0DEBgCAQAEAqWA0SqPCgkxGITgk3brv58kznddcWfTwvERERERERERERERERERERERERERERERERERER"
        "ERERERERERERERERERERERERERERERERERERERERERERERHRvsozaSAiIiIiIiIiIiIiIiIiIiIiIiIiIiIi"
        "IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiImpRjk8DEREREREREdG/WpCNcrU="
    ),
    "s_cjk_1023": "eNrtwjERAAAIBKBQ5nY30PfQIMJRm2lVVfXDA5w9I3E=",
    "s_pair_at_chunk_end": (
        "eNrtwSERACAQADBHQBq85A6JhyjEwBDpM0CRbXW+AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABK"
        "7ptnjWj9Aw2hil8="
    ),
    "s_cjk_40000": (
        "eNrt0DEBABAQAEBBhJHhFbJKIIXhQ5FDAg1uuQAXo9ycZy+SJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmS"
        "JEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmS"
        "JEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSJEmSZK9NAkmSJEmSJEmS"
        "JEmSJEmSJEmSJEmSJEmSJEmSJEmSJMmfD01E3DQ="
    ),
    "bin_1023": "eNoz/888CkbBKBipAADX3A00",
    "bin_1024": "eNpzYmFgGQWjYBSMWAAAJsAQRw==",
    "bin_10000": "eNrt16ENADAIAEFFKnHdh+6/UhMUS5C7Ed595Q8AAABgt/L/AAAAsN47VwQAGA10aMZK",
    "obj_17_classes": (
        "eNpdz7sRgkAYReGhAemEQVCEeAswJRRxVZR1iRjLEN8vEDv1/qE3/aJz0q8a5NZ4ep+ZqtSe8hunnh0Ih8Cs"
        "IQyA8yNhCMxPhCPg4kw4BuoLYQRcXgknwNWNMAau74QJsHgo9z9eljZPVnnavlhlqnyzypVpWWVr17HKl/2w"
        "yti073/D1H+c"
    ),
    "obj_17_reused": (
        "eNpdz0sSwUAYReGyAXaSQhDGvYBMDXVae6bFSGUZGvEmXVZjWe4/dKff6JzxRzVN4SJbarfNbaTavrGb7Ak7"
        "QO0Ju8DsQBgDzZGwB5yeCPtAWxEOgLMzYQKcXwiHwMWVcARc3lTrP16WVndWeVo/WGUqf7LKlXuxytbmzSpf"
        "Rc0qY2kIafiaH8jjgbc="
    ),
}


def golden(name: str) -> bytes:
    if name in GOLDEN_VALUES:
        return bytes.fromhex(GOLDEN_VALUES[name])
    return zlib.decompress(base64.b64decode(GOLDEN_VALUES_ZLIB[name]))


ALL_VALUES = sorted([*GOLDEN_VALUES, *GOLDEN_VALUES_ZLIB])

# The same values as in dubbo_golden.js.
STRINGS = {
    "s_empty": "",
    "s_one": "a",
    "s_31": "x" * 31,
    "s_32": "x" * 32,
    "s_1023": "y" * 1023,
    "s_1024": "y" * 1024,
    "s_32768": "z" * 0x8000,
    "s_32769": "z" * 0x8001,
    "s_70000": "abcdefghij" * 7000,
    "s_cjk": "中文字符串",
    "s_cjk_1023": "中" * 1023,
    "s_latin": "héllo wörld",
    "s_emoji": "hi 😀!",
    "s_pair_at_chunk_end": "a" * 0x7FFF + "😀" + "tail",
    "s_cjk_40000": "汉字" * 20000,
}
INTS = {
    "i_0": 0, "i_m16": -16, "i_47": 47, "i_m17": -17, "i_48": 48, "i_m2048": -2048,
    "i_2047": 2047, "i_m2049": -2049, "i_2048": 2048, "i_m262144": -262144,
    "i_262143": 262143, "i_m262145": -262145, "i_262144": 262144, "i_max": 2**31 - 1,
    "i_min": -(2**31),
}  # fmt: skip
LONGS = {
    "l_0": 0, "l_m8": -8, "l_15": 15, "l_m9": -9, "l_16": 16, "l_m2048": -2048,
    "l_2047": 2047, "l_m2049": -2049, "l_2048": 2048, "l_m262144": -262144,
    "l_262143": 262143, "l_m262145": -262145, "l_262144": 262144, "l_i32max": 2**31 - 1,
    "l_i32min": -(2**31), "l_2p31": 2**31, "l_m2p31m1": -(2**31) - 1,
    "l_2p53p1": 2**53 + 1, "l_min": -(2**63), "l_max": 2**63 - 1,
}  # fmt: skip


def test_every_golden_form_is_covered() -> None:
    """The compact forms the tests rely on really are in the golden bytes."""
    first = {golden(name)[0] for name in ALL_VALUES}
    for tag in (0x00, 0x1F, 0x30, 0x33, 0x52, 0x53):  # strings
        assert tag in first
    for tag in (0x80, 0xBF, 0xC0, 0xCF, 0xD0, 0xD7, 0x49):  # ints
        assert tag in first
    for tag in (0xD8, 0xEF, 0xF0, 0xFF, 0x38, 0x3F, 0x59, 0x4C):  # longs
        assert tag in first
    for tag in (0x5B, 0x5C, 0x5D, 0x5E, 0x5F, 0x44, 0x4A, 0x4B):  # doubles, dates
        assert tag in first
    for tag in (0x20, 0x2F, 0x34, 0x37, 0x41, 0x42):  # binary
        assert tag in first
    for tag in (0x78, 0x7B, 0x7C, 0x7F, 0x58, 0x72, 0x73, 0x77, 0x56, 0x7A):  # lists
        assert tag in first
    for tag in (0x48, 0x4D, 0x43, 0x4E, 0x54, 0x46):  # maps, objects, null, booleans
        assert tag in first
    assert b"\x51" in golden("obj_ref")  # a back-reference
    assert b"\x4f" in golden("obj_17_classes")  # an object by 'O' int (class #16)


@pytest.mark.parametrize("name", sorted(STRINGS))
def test_read_string(name: str) -> None:
    data = golden(name)
    reader = Hessian2Reader(data)
    assert reader.read_string() == STRINGS[name]
    assert reader.pos == len(data)


@pytest.mark.parametrize("name", sorted(STRINGS))
def test_write_string_is_byte_identical_to_hessian_js(name: str) -> None:
    out = bytearray()
    write_string(out, STRINGS[name])
    assert bytes(out) == golden(name)


@pytest.mark.parametrize("name", sorted(INTS))
def test_int_forms(name: str) -> None:
    data = golden(name)
    reader = Hessian2Reader(data)
    assert reader.read_int() == INTS[name]
    assert reader.pos == len(data)
    out = bytearray()
    write_int(out, INTS[name])
    assert bytes(out) == data


@pytest.mark.parametrize("name", sorted(LONGS))
def test_long_forms(name: str) -> None:
    data = golden(name)
    reader = Hessian2Reader(data)
    assert reader.read_int() == LONGS[name]
    assert reader.pos == len(data)


@pytest.mark.parametrize("name", ALL_VALUES)
def test_skip_stops_exactly_at_the_end_of_every_value(name: str) -> None:
    data = golden(name)
    reader = Hessian2Reader(data + b"\x4e")  # a trailing null must remain unread
    reader.skip()
    assert reader.pos == len(data)
    reader.skip()
    assert reader.pos == len(data) + 1


def test_skip_values_one_after_another_in_one_stream() -> None:
    names = [n for n in ALL_VALUES if not golden(n).count(b"\x43")]  # no class definitions
    stream = b"".join(golden(n) for n in names)
    reader = Hessian2Reader(stream)
    for _ in names:
        reader.skip()
    assert reader.pos == len(stream)


def test_class_definitions_are_per_stream() -> None:
    """An instance (0x60) is skipped by the field count its definition gave earlier."""
    data = golden("obj_nested")  # Order{id, owner: User{name, age}, items: [User, User]}
    reader = Hessian2Reader(data)
    reader.skip()
    assert reader.pos == len(data)
    instance_only = data[data.rindex(b"\x60") :]  # the definitions are not in this slice
    with pytest.raises(RpcProtocolError, match="undefined class"):
        Hessian2Reader(instance_only).skip()


def test_bool_and_null() -> None:
    assert Hessian2Reader(golden("true")).read_bool() is True
    assert Hessian2Reader(golden("false")).read_bool() is False
    assert Hessian2Reader(golden("null")).read_string() == ""
    assert Hessian2Reader(golden("null")).read_string_map() == {}
    out = bytearray()
    write_null(out)
    assert bytes(out) == golden("null")
    with pytest.raises(RpcProtocolError, match="boolean"):
        Hessian2Reader(golden("null")).read_bool()


def test_read_string_map_keeps_strings_and_skips_the_rest() -> None:
    # {a: 1, b: 'x', c: null, d: [1, 2], e: {f: 'g'}}
    numbers: dict[str, int] = {}
    data = golden("map_untyped")
    reader = Hessian2Reader(data)
    assert reader.read_string_map(numbers) == {"b": "x"}
    assert numbers == {"a": 1}
    assert reader.pos == len(data)
    assert Hessian2Reader(data).read_string_map() == {"b": "x"}
    # typed 'M' map (com.alibaba.fastjson.JSONObject){k: 'v', n: 2}
    numbers = {}
    assert Hessian2Reader(golden("map_typed")).read_string_map(numbers) == {"k": "v"}
    assert numbers == {"n": 2}
    # {1: 'one', 2: 'two', 'three': 3}: non-string keys are skipped with their values
    numbers = {}
    assert Hessian2Reader(golden("map_int_keys")).read_string_map(numbers) == {}
    assert numbers == {"three": 3}


def test_write_string_map_round_trip() -> None:
    mapping = {"group": "blue", "x-cn": "中文 😀", "": "empty key", "long": "v" * 5000}
    out = bytearray()
    write_string_map(out, mapping)
    reader = Hessian2Reader(bytes(out))
    assert reader.read_string_map() == mapping
    assert reader.pos == len(out)


# Spec forms hessian.js never writes, built by hand from the grammar.
SPEC_VALUES = {
    "variable typed list": b"\x55\x04[int\x91\x92\x5a",
    "variable untyped list": b"\x57\x91\x01a\x57\x5a\x5a",
    "typed list by type ref": b"\x72\x04[int\x91\x92" + b"\x71\x90\x93",
    "typed map by type ref": b"\x4d\x03Foo\x5a" + b"\x4d\x90\x01a\x01b\x5a",
    "binary chunk then compact": b"\x41\x00\x02ab\x34\x03xyz",
    "binary chunk then short": b"\x41\x00\x02ab\x22cd",
    "class def before a list": b"\x43\x01T\x91\x01v\x79\x60\x91",
    "date minutes": b"\x4b\x00\x00\x00\x01",
    "double as float bits": b"\x5f\x3f\xc0\x00\x00",
}


@pytest.mark.parametrize("name", sorted(SPEC_VALUES))
def test_skip_spec_forms(name: str) -> None:
    data = SPEC_VALUES[name]
    reader = Hessian2Reader(data)
    while reader.pos < len(data):
        reader.skip()
    assert reader.pos == len(data)


def test_map_type_may_be_a_reference() -> None:
    reader = Hessian2Reader(SPEC_VALUES["typed map by type ref"])
    assert reader.read_string_map() == {}
    assert reader.read_string_map() == {"a": "b"}


def test_surrogates() -> None:
    # CESU-8 pair -> one character; a lone surrogate survives (Java strings allow it).
    assert Hessian2Reader(b"\x02\xed\xa0\xbd\xed\xb8\x80").read_string() == "😀"
    assert Hessian2Reader(b"\x01\xed\xa0\x80").read_string() == "\ud800"
    # A pair split across chunks is still joined.
    split = b"\x52\x00\x01\xed\xa0\xbd" + b"\x01\xed\xb8\x80"
    assert Hessian2Reader(split).read_string() == "😀"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "past the end"),
        (b"\x05abc", "past the end"),
        (b"\x05ab\xc3\xa9", "truncated or not valid UTF-8"),
        (b"\x30\x05abcd", "past the end"),
        (b"\x53\xff\xffabc", "past the end"),
        (b"\x52\x00\x01a", "past the end"),
        (b"\x52\x00\x01a\x4e", "not followed by a string"),
        (b"\x02\xff\xfe", "not valid UTF-8"),
        (b"\x02a\x80", "not valid UTF-8"),
        (b"\x02\xf0\x9f\x98\x80a", "4-byte UTF-8"),
        (b"\x91", "expected a string"),
    ],
)
def test_malformed_strings(data: bytes, message: str) -> None:
    with pytest.raises(RpcProtocolError, match=message):
        Hessian2Reader(data).read_string()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x40", "unknown tag"),
        (b"\x45", "unknown tag"),
        (b"\x47", "unknown tag"),
        (b"\x50", "unknown tag"),
        (b"\x5a", "unknown tag"),
        (b"\x60", "undefined class"),
        (b"\x4f\x90", "undefined class"),
        (b"\x4f\x8f", "negative"),
        (b"\x58\x8f", "negative"),
        (b"\x58\x49\x7f\xff\xff\xff\x91", "past the end"),
        (b"\x49\x00\x00", "past the end"),
        (b"\x4c\x00", "past the end"),
        (b"\x44\x00\x00", "past the end"),
        (b"\x2f\x00", "past the end"),
        (b"\x42\xff\xff\x00", "past the end"),
        (b"\x41\x00\x01a\x4e", "binary chunk followed"),
        (b"\x48\x01a", "past the end"),
        (b"\x57\x91", "past the end"),
        (b"\x43\x01T\x91", "past the end"),
        (b"\x43\x01T\x91\x91", "expected a string"),
        (b"\x51", "past the end"),
        (b"\x72\x4e", "expected an int"),
    ],
)
def test_malformed_values(data: bytes, message: str) -> None:
    with pytest.raises(RpcProtocolError, match=message):
        Hessian2Reader(data).skip()


@pytest.mark.parametrize("opener", [b"\x57", b"\x48\x01k", b"\x79", b"\x55\x01T"])
def test_nesting_is_capped(opener: bytes) -> None:
    with pytest.raises(RpcProtocolError, match="nested deeper"):
        Hessian2Reader(opener * 100_000).skip()


def test_nesting_up_to_the_cap_is_fine() -> None:
    data = b"\x79" * MAX_DEPTH + b"\x4e"  # 64 one-element lists around a null
    reader = Hessian2Reader(data)
    reader.skip()
    assert reader.pos == len(data)
    with pytest.raises(RpcProtocolError, match="nested deeper"):
        Hessian2Reader(b"\x79" + data).skip()


def test_read_errors() -> None:
    with pytest.raises(RpcProtocolError, match="expected an int"):
        Hessian2Reader(b"\x01a").read_int()
    with pytest.raises(RpcProtocolError, match="expected a map"):
        Hessian2Reader(golden("list_3")).read_string_map()
    with pytest.raises(RpcProtocolError, match="past the end"):
        Hessian2Reader(b"").read_bool()


@pytest.mark.parametrize("name", ALL_VALUES)
def test_every_truncation_raises(name: str) -> None:
    data = golden(name)
    cuts = range(len(data)) if len(data) < 2000 else range(0, len(data), 997)
    for cut in cuts:
        with pytest.raises(RpcProtocolError):
            Hessian2Reader(data[:cut]).skip()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    for read in ("skip", "read_string", "read_int", "read_bool", "read_string_map"):
        try:
            getattr(Hessian2Reader(data), read)()
        except RpcProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ALL_VALUES), st.data())
def test_mutated_golden_values_raise_only_protocol_errors(name: str, data: st.DataObject) -> None:
    value = bytearray(golden(name)[:3000])
    for _ in range(data.draw(st.integers(1, 4))):
        value[data.draw(st.integers(0, len(value) - 1))] = data.draw(st.integers(0, 255))
    try:
        Hessian2Reader(bytes(value)).skip()
    except RpcProtocolError:
        pass


@given(st.text())
def test_string_round_trip(text: str) -> None:
    out = bytearray()
    write_string(out, text)
    reader = Hessian2Reader(bytes(out))
    assert reader.read_string() == text
    assert reader.pos == len(out)
    skipper = Hessian2Reader(bytes(out))
    skipper.skip()
    assert skipper.pos == len(out)


@given(st.integers(-(2**63), 2**63 - 1))
def test_int_round_trip(value: int) -> None:
    out = bytearray()
    write_int(out, value)
    assert Hessian2Reader(bytes(out)).read_int() == value
