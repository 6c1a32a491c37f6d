"""HAST name/value lists (FreeBSD sbin/hastd/nv.c), the encoding of metadata and wire headers.

An nv list is a sequence of elements, each::

    type:uint8  namesize:uint8  dsize:uint32le  name\\0 (padded to 8)  data (padded to 8)

All integers are little-endian on disk and on the wire, whatever hastd's comments call them. A zero
byte where a type is expected ends the list, so zero padding after the last element is allowed
(the 4096-byte metadata block relies on that). Lookup returns the first element with the name.

Pure: bytes in, values out. The only exception raised for bad input is NvError.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from hastpy.errors import NvError

# Bit 0x80 of the type byte marks "host order" in hastd's memory; on the wire it is 0. Decoding
# masks it off: on the little-endian hosts we run on both orders are the same bytes.
_ORDER_MASK = 0x80
_HEADER = struct.Struct("<BBI")
_ALIGN = 8
MAX_NAME_LEN = 254  # namesize is a uint8 that counts the terminating NUL


class NvType(enum.IntEnum):
    INT8 = 1
    UINT8 = 2
    INT16 = 3
    UINT16 = 4
    INT32 = 5
    UINT32 = 6
    INT64 = 7
    UINT64 = 8
    INT8_ARRAY = 9
    UINT8_ARRAY = 10
    INT16_ARRAY = 11
    UINT16_ARRAY = 12
    INT32_ARRAY = 13
    UINT32_ARRAY = 14
    INT64_ARRAY = 15
    UINT64_ARRAY = 16
    STRING = 17


# struct format letter of each scalar type and of each array's element.
_SCALAR_FMT = {
    NvType.INT8: "b",
    NvType.UINT8: "B",
    NvType.INT16: "h",
    NvType.UINT16: "H",
    NvType.INT32: "i",
    NvType.UINT32: "I",
    NvType.INT64: "q",
    NvType.UINT64: "Q",
}
_ARRAY_OF = {NvType(t + 8): t for t in _SCALAR_FMT}  # array type -> element type
_STRUCTS = {t: struct.Struct("<" + f) for t, f in _SCALAR_FMT.items()}


def _pad(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


# Raw type byte -> NvType, with the host-order bit masked off; absent: not a valid type.
_TYPE_OF_RAW = {t | order: t for t in NvType for order in (0, _ORDER_MASK)}


class NvField(NamedTuple):
    """One element. A tuple (cheap to build: a header decodes into a few of these per message)."""

    name: str
    type: NvType
    # int for scalars, str for STRING, bytes for UINT8_ARRAY, tuple[int, ...] for other arrays.
    value: object


def _type_mismatch(name: str, have: NvType, want: NvType) -> NvError:
    return NvError(f"field {name!r} is {have.name.lower()}, expected {NvType(want).name.lower()}")


class NvList:
    """An ordered nv list. Duplicate names are kept; lookups see the first."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[NvField] | None = None):
        self._fields: list[NvField] = list(fields or ())

    def __iter__(self) -> Iterator[NvField]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NvList) and self._fields == other._fields

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}:{f.type.name.lower()}={f.value!r}" for f in self._fields)
        return f"NvList({inner})"

    # -- building ---------------------------------------------------------------------------

    def add(self, name: str, typ: NvType, value: object) -> NvList:
        """Append a field after checking it can be encoded; returns self for chaining."""
        _encoded_name(name)  # NvError if it cannot be a name
        self._fields.append(NvField(name, NvType(typ), _checked_value(NvType(typ), value)))
        return self

    def add_uint8(self, name: str, value: int) -> NvList:
        return self.add(name, NvType.UINT8, value)

    def add_int8(self, name: str, value: int) -> NvList:
        return self.add(name, NvType.INT8, value)

    def add_int16(self, name: str, value: int) -> NvList:
        return self.add(name, NvType.INT16, value)

    def add_int32(self, name: str, value: int) -> NvList:
        return self.add(name, NvType.INT32, value)

    def add_uint32(self, name: str, value: int) -> NvList:
        return self.add(name, NvType.UINT32, value)

    def add_int64(self, name: str, value: int) -> NvList:
        return self.add(name, NvType.INT64, value)

    def add_uint64(self, name: str, value: int) -> NvList:
        return self.add(name, NvType.UINT64, value)

    def add_string(self, name: str, value: str) -> NvList:
        return self.add(name, NvType.STRING, value)

    def add_bytes(self, name: str, value: bytes) -> NvList:
        return self.add(name, NvType.UINT8_ARRAY, value)

    # -- lookup -----------------------------------------------------------------------------

    def find(self, name: str) -> NvField | None:
        for f in self._fields:
            if f.name == name:
                return f
        return None

    def exists(self, name: str) -> bool:
        return self.find(name) is not None

    def get(self, name: str, typ: NvType, default: object = None) -> object:
        """The first field called name. A field of another type is an error, as in nv.c."""
        f = self.find(name)
        if f is None:
            return default
        if f.type != typ:
            raise _type_mismatch(name, f.type, typ)
        return f.value

    def get_int(self, name: str, typ: NvType, default: int = 0) -> int:
        return self.get(name, typ, default)  # type: ignore[return-value]

    def layout_values(self) -> tuple[NvLayout, tuple[int, ...]] | None:
        """(layout, its values) if this list is exactly what a fixed NvLayout decoded, and still
        unchanged; else None. Lets a decoder of a known message read all its fields at once
        (messages.Request.from_nv, Reply.from_nv) instead of one lookup each."""
        return None

    def get_string(self, name: str, default: str | None = None) -> str | None:
        return self.get(name, NvType.STRING, default)  # type: ignore[return-value]

    def get_bytes(self, name: str, default: bytes | None = None) -> bytes | None:
        return self.get(name, NvType.UINT8_ARRAY, default)  # type: ignore[return-value]

    # -- codec ------------------------------------------------------------------------------

    def encode(self) -> bytes:
        return b"".join(_encode_field(f) for f in self._fields)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> NvList:
        """Parse an nv list; a zero type byte or the end of data ends it."""
        buf = memoryview(data).cast("B")
        fields: list[NvField] = []
        pos = 0
        end = len(buf)
        while pos < end and buf[pos] != 0:
            if end - pos < _HEADER.size:
                raise NvError(f"truncated element header at byte {pos}")
            rawtype, namesize, dsize = _HEADER.unpack_from(buf, pos)
            typ = _TYPE_OF_RAW.get(rawtype)
            if typ is None:
                raise NvError(f"unknown nv type {rawtype & ~_ORDER_MASK} at byte {pos}")
            name_start = pos + _HEADER.size
            data_start = name_start + _pad(namesize)
            elem_end = data_start + _pad(dsize)
            if namesize == 0 or elem_end > end:
                raise NvError(f"element at byte {pos} overruns the list")
            name = _decode_name(bytes(buf[name_start : name_start + namesize]), pos)
            st = _STRUCTS.get(typ)
            if st is not None and dsize == st.size:  # a well-formed scalar: the common case
                value = st.unpack_from(buf, data_start)[0]
            else:
                value = _decode_value(typ, bytes(buf[data_start : data_start + dsize]), name)
            fields.append(NvField(name, typ, value))
            pos = elem_end
        return cls(fields)


# Decoded names: a peer uses a handful of names over and over. Bounded: a hostile peer could
# send a new name in every element, so past this many entries names are decoded, not cached.
_NAME_CACHE_MAX = 256
_names: dict[bytes, str] = {}


def _decode_name(raw: bytes, pos: int) -> str:
    name = _names.get(raw)
    if name is not None:
        return name
    # namesize must be exactly strlen(name) + 1.
    if raw[-1] != 0 or 0 in raw[:-1] or len(raw) == 1:
        raise NvError(f"malformed name at byte {pos}")
    name = raw[:-1].decode("utf-8", "surrogateescape")
    if len(_names) < _NAME_CACHE_MAX:
        _names[raw] = name
    return name


def _decode_value(typ: NvType, raw: bytes, name: str) -> object:
    if not raw:
        raise NvError(f"field {name!r} has no data")
    if typ == NvType.STRING:
        if raw[-1] != 0 or 0 in raw[:-1]:
            raise NvError(f"field {name!r} is not a NUL-terminated string")
        return raw[:-1].decode("utf-8", "surrogateescape")
    if typ in _STRUCTS:  # decode() unpacks a scalar of the right size itself
        raise NvError(f"field {name!r}: {typ.name.lower()} of {len(raw)} bytes")
    if typ == NvType.UINT8_ARRAY:
        return raw
    elem = _STRUCTS[_ARRAY_OF[typ]]
    if len(raw) % elem.size:
        raise NvError(f"field {name!r}: array of {len(raw)} bytes is not a multiple of {elem.size}")
    return tuple(v for (v,) in elem.iter_unpack(raw))


@functools.lru_cache(maxsize=_NAME_CACHE_MAX)
def _encoded_name(name: str) -> tuple[int, bytes]:
    """(namesize on the wire: the encoded name plus its NUL, the name NUL-terminated and padded
    to 8); NvError if it cannot be a name. Cached: a program encodes the same few names over
    and over."""
    raw = name.encode("utf-8", "surrogateescape")
    if not raw or b"\0" in raw or len(raw) > MAX_NAME_LEN:
        raise NvError(f"invalid nv name {name!r}")
    raw += b"\0"
    return len(raw), raw.ljust(_pad(len(raw)), b"\0")


def _checked_value(typ: NvType, value: object) -> object:
    """Return value in canonical form or raise NvError; nothing unencodable enters a list."""
    if typ == NvType.STRING:
        if not isinstance(value, str) or "\0" in value:
            raise NvError(f"string value must be a str without NUL, not {value!r}")
        return value
    if typ == NvType.UINT8_ARRAY:
        if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) == 0:
            raise NvError("uint8 array value must be non-empty bytes")
        return bytes(value)
    if typ in _STRUCTS:
        _pack_checked(_STRUCTS[typ], value, typ)
        return value
    elem_type = _ARRAY_OF[typ]
    values = tuple(value)  # type: ignore[call-overload]
    if not values:
        raise NvError("array value must not be empty")
    for v in values:
        _pack_checked(_STRUCTS[elem_type], v, elem_type)
    return values


def _pack_checked(st: struct.Struct, value: object, typ: NvType) -> bytes:
    if not isinstance(value, int) or isinstance(value, bool):
        raise NvError(f"{typ.name.lower()} value must be an int, not {value!r}")
    try:
        return st.pack(value)
    except struct.error:
        raise NvError(f"{value} does not fit in {typ.name.lower()}") from None


def _encode_field(f: NvField) -> bytes:
    namesize, name = _encoded_name(f.name)
    st = _STRUCTS.get(f.type)
    if st is not None:  # a scalar: the common case, one pack and no padding arithmetic
        data = st.pack(f.value)
        return _HEADER.pack(f.type, namesize, st.size) + name + data.ljust(_ALIGN, b"\0")
    if f.type == NvType.STRING:
        data = f.value.encode("utf-8", "surrogateescape") + b"\0"  # type: ignore[union-attr]
    elif f.type == NvType.UINT8_ARRAY:
        data = f.value  # type: ignore[assignment]
    else:
        elem = _STRUCTS[_ARRAY_OF[f.type]]
        data = b"".join(elem.pack(v) for v in f.value)  # type: ignore[union-attr]
    return b"".join(
        (
            _HEADER.pack(int(f.type), namesize, len(data)),
            name,
            data.ljust(_pad(len(data)), b"\0"),  # type: ignore[union-attr]
        )
    )


class NvLayout:
    """A precomputed encoder and decoder for one fixed list of scalar fields (a wire header whose
    names, types and order never change, such as an I/O request or reply).

    `encode(*values)` is byte-for-byte `NvList` with the same fields `.encode()`, in one
    `struct.Struct.pack`. `decode(data)` returns the NvList the generic `NvList.decode` would,
    when `data` is exactly this layout as `encode` writes it (same type bytes, names and sizes,
    zero name padding, nothing after the last element); otherwise None, and the caller falls
    back to `NvList.decode`, which also accepts everything else the format allows.

    Contract: encode's values must be ints; a value out of its type's range raises NvError, as
    the generic `NvList.add` does (bools are not refused here: callers pass ints of their own).
    """

    __slots__ = ("fields", "index", "size", "_struct", "_consts", "_n")

    def __init__(self, fields: Sequence[tuple[str, NvType]]):
        if not fields:
            raise NvError("a layout needs at least one field")
        fmt = ["<"]
        consts = []
        for name, typ in fields:
            typ = NvType(typ)
            st = _STRUCTS.get(typ)
            if st is None:
                raise NvError(f"layout field {name!r}: {typ.name.lower()} is not a scalar type")
            namesize, encoded = _encoded_name(name)
            head = _HEADER.pack(typ, namesize, st.size) + encoded
            consts.append(head)
            fmt.append(f"{len(head)}s{_SCALAR_FMT[typ]}{_ALIGN - st.size}x")
        self.fields = tuple((name, NvType(typ)) for name, typ in fields)
        self.index: dict[str, int] = {}  # name -> position of its first field (lookups see the first)
        for i, (name, _typ) in enumerate(self.fields):
            self.index.setdefault(name, i)
        self._struct = struct.Struct("".join(fmt))
        self._consts = tuple(consts)
        self._n = len(consts)
        self.size = self._struct.size

    def encode(self, *values: int) -> bytes:
        if len(values) != self._n:
            raise NvError(f"layout of {self._n} fields given {len(values)} values")
        args: list[object] = [None] * (2 * self._n)
        args[0::2] = self._consts
        args[1::2] = values
        try:
            return self._struct.pack(*args)
        except struct.error as exc:
            raise NvError(f"value does not fit the layout {self.fields}: {exc}") from None

    def values(self, data: bytes | bytearray | memoryview) -> tuple[int, ...] | None:
        """The field values if data is exactly this layout (see the class doc), else None."""
        if len(data) != self.size:
            return None
        unpacked = self._struct.unpack(data)
        if unpacked[0::2] != self._consts:
            return None
        return unpacked[1::2]

    def decode(self, data: bytes | bytearray | memoryview) -> NvList | None:
        values = self.values(data)
        if values is None:
            return None
        return _LayoutNvList(self, values)


class _LayoutNvList(NvList):
    """The NvList a layout decoded: equal to the generic one in every respect, but a lookup is
    an index into the layout's values, and the field list is built only if something asks for
    it (iteration, len, ==, encode, add). A request or reply header is looked up a few times
    and never iterated, and building its fields cost as much as the rest of its decoding.

    Hazard: once `_fields` exists it is the truth (add() appends to it), so the lookups below
    go through it from then on; `_values` is None exactly when it does.
    """

    __slots__ = ("_layout", "_values")

    def __init__(self, layout: NvLayout, values: tuple[int, ...]):
        self._layout = layout
        self._values: tuple[int, ...] | None = values

    def __getattr__(self, name: str) -> list[NvField]:
        # Reached only for a slot not set yet: `_fields`, the first time an NvList method uses it.
        if name != "_fields":
            raise AttributeError(name)
        fields = [NvField(n, t, v) for (n, t), v in zip(self._layout.fields, self._values)]
        self._fields = fields
        self._values = None
        return fields

    def layout_values(self) -> tuple[NvLayout, tuple[int, ...]] | None:
        if self._values is None:
            return None
        return self._layout, self._values

    def find(self, name: str) -> NvField | None:
        if self._values is None:
            return super().find(name)
        i = self._layout.index.get(name)
        if i is None:
            return None
        return NvField(*self._layout.fields[i], self._values[i])

    def get(self, name: str, typ: NvType, default: object = None) -> object:
        if self._values is None:
            return super().get(name, typ, default)
        i = self._layout.index.get(name)
        if i is None:
            return default
        have = self._layout.fields[i][1]
        if have != typ:
            raise _type_mismatch(name, have, typ)
        return self._values[i]
