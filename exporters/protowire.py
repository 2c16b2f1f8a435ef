"""Protocol Buffers wire-format writing for the few OTLP messages built per call (spans, their attributes and events).

Building `opentelemetry.proto` message objects costs 77-135 us per GenAI span here (see
exporters/README.md); writing the same bytes directly costs a fraction of that, and the bytes of
attributes that repeat across calls (model, provider, app...) can be cached whole. What is built
here is checked against the `opentelemetry.proto` classes in the tests, which parse it back.

Field numbers used (from opentelemetry/proto/common/v1/common.proto):
AnyValue: string_value 1, bool_value 2, int_value 3, double_value 4, array_value 5;
ArrayValue: values 1; KeyValue: key 1, value 2.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

_ONE_BYTE = [bytes((i,)) for i in range(128)]
_pack_double = struct.Struct("<d").pack
_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5

AttrValue = str | bool | int | float | Sequence[str] | Sequence[bool] | Sequence[int] | Sequence[float]


def varint(n: int) -> bytes:
    """Unsigned LEB128; negative int64 values are written as their 64-bit two's complement (10 bytes)."""
    if 0 <= n < 128:
        return _ONE_BYTE[n]
    if 0 < n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if 0 < n < 0x200000:
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def length_delimited(tag_bytes: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    n = len(payload)
    return b"".join((tag_bytes, _ONE_BYTE[n] if n < 128 else varint(n), payload))


def fixed64(n: int) -> bytes:
    return _pack_fixed64(n)


def fixed32(n: int) -> bytes:
    return _pack_fixed32(n)


def double(x: float) -> bytes:
    return _pack_double(x)


_STR = tag(1, WIRE_LEN)
_BOOL_TRUE = tag(2, WIRE_VARINT) + b"\x01"
_BOOL_FALSE = tag(2, WIRE_VARINT) + b"\x00"
_INT = tag(3, WIRE_VARINT)
_DOUBLE = tag(4, WIRE_FIXED64)
_ARRAY = tag(5, WIRE_LEN)
_ARRAY_VALUE = tag(1, WIRE_LEN)
_KV_KEY = tag(1, WIRE_LEN)
_KV_VALUE = tag(2, WIRE_LEN)


def any_value(value: AttrValue) -> bytes:
    """The body of an AnyValue message holding a string, bool, int, float or a list of them."""
    if isinstance(value, str):
        return length_delimited(_STR, value.encode("utf-8", "replace"))
    if isinstance(value, bool):
        return _BOOL_TRUE if value else _BOOL_FALSE
    if isinstance(value, int):
        return _INT + varint(value)
    if isinstance(value, float):
        return _DOUBLE + _pack_double(value)
    if isinstance(value, (list, tuple)):
        inner = b"".join(length_delimited(_ARRAY_VALUE, any_value(v)) for v in value)
        return length_delimited(_ARRAY, inner)
    return length_delimited(_STR, str(value).encode("utf-8", "replace"))


def key_value(key: str, value: AttrValue) -> bytes:
    """The body of a KeyValue message."""
    return length_delimited(_KV_KEY, key.encode()) + length_delimited(_KV_VALUE, any_value(value))


class AttributeWriter:
    """Writes KeyValue fields under one field number (e.g. Span.attributes = 9), fast for the common shapes.

    For each key the bytes before the value are computed once, so a string attribute costs one
    join and an int attribute one concatenation.
    """

    def __init__(self, field: int) -> None:
        self._tag = tag(field, WIRE_LEN)
        self._key_field: dict[str, bytes] = {}
        self._int_prefix: dict[str, list[bytes]] = {}
        self._double_prefix: dict[str, bytes] = {}

    def _key(self, key: str) -> bytes:
        found = self._key_field.get(key)
        if found is None:
            found = self._key_field[key] = length_delimited(_KV_KEY, key.encode())
        return found

    def any(self, key: str, value: AttrValue) -> bytes:
        return length_delimited(self._tag, self._key(key) + length_delimited(_KV_VALUE, any_value(value)))

    def string(self, key: str, value: str) -> bytes:
        data = value.encode("utf-8", "replace")
        key_field = self._key(key)
        n = len(data)
        if n < 120 - len(key_field):  # every length below fits in one byte
            return b"".join((self._tag, _ONE_BYTE[len(key_field) + n + 4], key_field, b"\x12",
                             _ONE_BYTE[n + 2], b"\x0a", _ONE_BYTE[n], data))
        value_field = length_delimited(_KV_VALUE, length_delimited(_STR, data))
        return length_delimited(self._tag, key_field + value_field)

    def integer(self, key: str, value: int) -> bytes:
        encoded = varint(value)
        prefixes = self._int_prefix.get(key)
        if prefixes is None:
            prefixes = self._int_prefix[key] = self._int_prefixes(key)
        return prefixes[len(encoded)] + encoded

    def _int_prefixes(self, key: str) -> list[bytes]:
        """For each varint size 1..10, the field's bytes up to the value (index 0 unused)."""
        key_field = self._key(key)
        prefixes = [b""]
        for size in range(1, 11):
            whole = length_delimited(self._tag, key_field + b"\x12" + _ONE_BYTE[1 + size] + _INT + bytes(size))
            prefixes.append(whole[:-size])
        return prefixes

    def float(self, key: str, value: float) -> bytes:
        prefix = self._double_prefix.get(key)
        if prefix is None:
            whole = length_delimited(self._tag, self._key(key) + b"\x12\x09" + _DOUBLE + bytes(8))
            prefix = self._double_prefix[key] = whole[:-8]
        return prefix + _pack_double(value)
