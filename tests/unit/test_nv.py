"""nv codec: exact bytes, validation, and "never raises anything but NvError"."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hastpy.errors import NvError
from hastpy.nv import NvList, NvType

# The keepalive request of reference §5: nv {cmd:uint8=5}, after the 5-byte frame header.
KEEPALIVE_NV = bytes.fromhex("02 04 01000000 636d6400 00000000 05 00000000000000")


def test_keepalive_exact_bytes():
    assert NvList().add_uint8("cmd", 5).encode() == KEEPALIVE_NV
    assert len(KEEPALIVE_NV) == 22


def test_keepalive_decodes():
    nv = NvList.decode(KEEPALIVE_NV)
    assert nv.get_int("cmd", NvType.UINT8) == 5


@pytest.mark.parametrize(
    "typ,value,data",
    [
        (NvType.INT8, -2, b"\xfe"),
        (NvType.UINT8, 200, b"\xc8"),
        (NvType.INT16, -2, b"\xfe\xff"),
        (NvType.UINT16, 0x1234, b"\x34\x12"),
        (NvType.INT32, -1, b"\xff" * 4),
        (NvType.UINT32, 0x01020304, b"\x04\x03\x02\x01"),
        (NvType.INT64, -3, struct.pack("<q", -3)),
        (NvType.UINT64, 107374171648, struct.pack("<Q", 107374171648)),
        (NvType.UINT8_ARRAY, bytes(range(16)), bytes(range(16))),
        (NvType.UINT32_ARRAY, (1, 2, 3), struct.pack("<3I", 1, 2, 3)),
        (NvType.INT16_ARRAY, (-1,), b"\xff\xff"),
        (NvType.STRING, "data", b"data\0"),
    ],
)
def test_scalar_and_array_layout(typ, value, data):
    raw = NvList().add("resource", typ, value).encode()
    pad = (-len(data)) % 8
    assert raw == struct.pack("<BBI", typ, 9, len(data)) + b"resource\0" + b"\0" * 7 + data + b"\0" * pad
    assert NvList.decode(raw).get("resource", typ) == value


def test_metadata_header_layout_pinned():
    nv = (
        NvList()
        .add_string("resource", "data")
        .add_uint64("datasize", 104722432)
        .add_uint32("extentsize", 2097152)
        .add_uint32("keepdirty", 64)
        .add_uint64("offset", 4608)
        .add_uint64("resuid", 0)
        .add_uint64("localcnt", 0)
        .add_uint64("remotecnt", 0)
        .add_string("prevrole", "init")
    )
    raw = nv.encode()
    assert raw[:30] == bytes.fromhex("11 09 05000000") + b"resource\0" + b"\0" * 7 + b"data\0\0\0\0"
    assert raw[30:44] == bytes.fromhex("08 09 08000000") + b"datasize"
    # 9 headers of 6 bytes; names padded to 16 except offset/resuid (8); every value pads to 8.
    assert len(raw) == 9 * 6 + (7 * 16 + 2 * 8) + 9 * 8
    # Zero padding after the list (the metadata block is 4096 bytes) is the end, not an error.
    assert NvList.decode(raw + bytes(4096 - len(raw))) == nv


def test_first_match_wins_and_missing_default():
    nv = NvList().add_uint8("x", 1).add_uint8("x", 2)
    assert nv.get("x", NvType.UINT8) == 1
    assert nv.get("y", NvType.UINT8) is None
    assert nv.get_int("y", NvType.UINT64) == 0
    assert nv.exists("x") and not nv.exists("y")
    assert len(nv) == 2 and [f.value for f in nv] == [1, 2]
    assert "x:uint8=1" in repr(nv)


def test_type_mismatch_is_error():
    nv = NvList().add_uint8("cmd", 1)
    with pytest.raises(NvError, match="uint8, expected uint64"):
        nv.get("cmd", NvType.UINT64)


def test_host_order_bit_is_masked():
    raw = bytearray(KEEPALIVE_NV)
    raw[0] |= 0x80
    assert NvList.decode(bytes(raw)).get("cmd", NvType.UINT8) == 5


@pytest.mark.parametrize(
    "typ,value",
    [
        (NvType.UINT8, 256),
        (NvType.INT8, -129),
        (NvType.UINT64, -1),
        (NvType.UINT32, "1"),
        (NvType.UINT8, True),
        (NvType.STRING, "a\0b"),
        (NvType.STRING, 3),
        (NvType.UINT8_ARRAY, b""),
        (NvType.UINT8_ARRAY, "abc"),
        (NvType.UINT16_ARRAY, ()),
        (NvType.UINT16_ARRAY, (1, 70000)),
    ],
)
def test_unencodable_values_rejected(typ, value):
    with pytest.raises(NvError):
        NvList().add("n", typ, value)


@pytest.mark.parametrize("name", ["", "a\0b", "x" * 255])
def test_bad_names_rejected(name):
    with pytest.raises(NvError):
        NvList().add_uint8(name, 1)


def _elem(typ, name, data, namesize=None, dsize=None):
    n = name + b"\0"
    ns = len(n) if namesize is None else namesize
    ds = len(data) if dsize is None else dsize
    return struct.pack("<BBI", typ, ns, ds) + n.ljust((len(n) + 7) & ~7, b"\0") + data.ljust((len(data) + 7) & ~7, b"\0")


@pytest.mark.parametrize(
    "raw,why",
    [
        (b"\x02\x04\x01", "truncated element header"),
        (_elem(99, b"x", b"\1"), "unknown nv type 99"),
        (_elem(2, b"cmd", b"\5")[:-1], "overruns"),
        (_elem(2, b"cmd", b"\5", namesize=0), "overruns"),
        (_elem(2, b"cmd", b"\5", namesize=3), "malformed name"),
        (_elem(2, b"", b"\5"), "malformed name"),
        (_elem(2, b"cmd", b"", dsize=0), "no data"),
        (_elem(2, b"cmd", b"\5\5"), "uint8 of 2 bytes"),
        (_elem(17, b"s", b"abc"), "NUL-terminated"),
        (_elem(17, b"s", b"a\0c\0"), "NUL-terminated"),
        (_elem(12, b"a", b"\1\2\3"), "not a multiple of 2"),
    ],
)
def test_invalid_encodings(raw, why):
    with pytest.raises(NvError, match=why):
        NvList.decode(raw)


def test_arrays_decode_as_tuples():
    raw = _elem(16, b"a", struct.pack("<2Q", 1, 2**64 - 1))
    assert NvList.decode(raw).get("a", NvType.UINT64_ARRAY) == (1, 2**64 - 1)


_names = st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(
    lambda s: len(s.encode()) <= 254
)
_ranges = {
    NvType.INT8: (-(2**7), 2**7 - 1),
    NvType.UINT8: (0, 2**8 - 1),
    NvType.INT16: (-(2**15), 2**15 - 1),
    NvType.UINT16: (0, 2**16 - 1),
    NvType.INT32: (-(2**31), 2**31 - 1),
    NvType.UINT32: (0, 2**32 - 1),
    NvType.INT64: (-(2**63), 2**63 - 1),
    NvType.UINT64: (0, 2**64 - 1),
}


@st.composite
def _fields(draw):
    typ = draw(st.sampled_from(list(NvType)))
    if typ == NvType.STRING:
        value = draw(st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30))
    elif typ == NvType.UINT8_ARRAY:
        value = draw(st.binary(min_size=1, max_size=40))
    elif typ in _ranges:
        value = draw(st.integers(*_ranges[typ]))
    else:
        lo, hi = _ranges[NvType(typ - 8)]
        value = tuple(draw(st.lists(st.integers(lo, hi), min_size=1, max_size=6)))
    return draw(_names), typ, value


@given(st.lists(_fields(), max_size=8))
def test_roundtrip(fields):
    nv = NvList()
    for name, typ, value in fields:
        nv.add(name, typ, value)
    raw = nv.encode()
    assert len(raw) % 8 == (6 * len(fields)) % 8
    assert NvList.decode(raw) == nv


@given(st.binary(max_size=200))
def test_decode_random_bytes_only_raises_nverror(data):
    try:
        NvList.decode(data)
    except NvError:
        pass


@given(st.lists(_fields(), min_size=1, max_size=4), st.integers(0, 10_000), st.integers(0, 255))
def test_decode_mutated_lists_only_raises_nverror(fields, where, byte):
    nv = NvList()
    for name, typ, value in fields:
        nv.add(name, typ, value)
    raw = bytearray(nv.encode())
    raw[where % len(raw)] = byte
    try:
        NvList.decode(bytes(raw))
    except NvError:
        pass


# --- NvLayout: the precomputed encoder/decoder must be the generic codec, only faster -------------

from hastpy.nv import NvLayout  # noqa: E402

SCALARS = [NvType.INT8, NvType.UINT8, NvType.INT16, NvType.UINT16, NvType.INT32, NvType.UINT32,
           NvType.INT64, NvType.UINT64]  # fmt: skip
_RANGE = {
    NvType.INT8: (-(2**7), 2**7 - 1), NvType.UINT8: (0, 2**8 - 1),
    NvType.INT16: (-(2**15), 2**15 - 1), NvType.UINT16: (0, 2**16 - 1),
    NvType.INT32: (-(2**31), 2**31 - 1), NvType.UINT32: (0, 2**32 - 1),
    NvType.INT64: (-(2**63), 2**63 - 1), NvType.UINT64: (0, 2**64 - 1),
}  # fmt: skip

layout_names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1, max_size=20)


@st.composite
def layouts_and_values(draw):
    names = draw(st.lists(layout_names, min_size=1, max_size=6, unique=True))
    types = [draw(st.sampled_from(SCALARS)) for _ in names]
    values = [draw(st.integers(*_RANGE[t])) for t in types]
    return list(zip(names, types)), values


def generic(fields, values) -> NvList:
    nv = NvList()
    for (name, typ), value in zip(fields, values):
        nv.add(name, typ, value)
    return nv


@given(layouts_and_values())
def test_layout_encode_is_byte_equal_to_generic(case):
    fields, values = case
    layout = NvLayout(fields)
    encoded = layout.encode(*values)
    assert encoded == generic(fields, values).encode()
    assert layout.size == len(encoded)


@given(layouts_and_values())
def test_layout_decode_round_trips_and_equals_generic(case):
    fields, values = case
    layout = NvLayout(fields)
    encoded = layout.encode(*values)
    assert layout.values(encoded) == tuple(values)
    assert layout.decode(encoded) == NvList.decode(encoded) == generic(fields, values)
    assert layout.decode(bytearray(encoded)) == NvList.decode(encoded)


@given(layouts_and_values(), st.data())
def test_layout_decode_refuses_anything_else(case, data):
    """Any other bytes: None (the generic decoder then decides), never a wrong answer."""
    fields, values = case
    layout = NvLayout(fields)
    encoded = bytearray(layout.encode(*values))
    assert layout.decode(bytes(encoded) + b"\0" * 8) is None  # trailing terminator: generic path
    assert layout.decode(bytes(encoded[:-1])) is None
    pos = data.draw(st.integers(0, len(encoded) - 1))
    encoded[pos] ^= data.draw(st.integers(1, 255))
    got = layout.decode(bytes(encoded))
    if got is not None:  # only a value byte or value padding was changed: same as generic
        assert got == NvList.decode(bytes(encoded))


def _lookups(nv: NvList, names, types) -> list:
    """Every answer nv's lookups give for these names, each asked with every type."""
    out = []
    for name in names:
        out += [nv.find(name), nv.exists(name)]
        for typ in types:
            try:
                out.append(nv.get(name, typ, "default"))
            except NvError as exc:
                out.append(str(exc))
    return out


@given(layouts_and_values(), layout_names, st.integers(0, 255))
def test_layout_decoded_lookups_equal_generic_before_and_after_a_change(case, other, extra):
    """A layout-decoded list answers lookups from the layout's values until its field list is
    built; from then on (here: add()) from the fields. Both must be what the generic gives."""
    fields, values = case
    layout = NvLayout(fields)
    encoded = layout.encode(*values)
    names = [name for name, _ in fields] + [other]
    types = SCALARS + [NvType.STRING]
    fast, slow = layout.decode(encoded), NvList.decode(encoded)
    assert _lookups(fast, names, types) == _lookups(slow, names, types)
    fast.add_uint8(other, extra)
    slow.add_uint8(other, extra)
    assert _lookups(fast, names, types) == _lookups(slow, names, types)
    assert list(fast) == list(slow) and fast.encode() == slow.encode()


def test_layout_with_a_repeated_name_looks_up_the_first():
    layout = NvLayout([("seq", NvType.UINT64), ("x", NvType.UINT8), ("seq", NvType.UINT32)])
    encoded = layout.encode(7, 1, 9)
    fast = layout.decode(encoded)
    assert fast.get("seq", NvType.UINT64) == 7 == NvList.decode(encoded).get("seq", NvType.UINT64)
    with pytest.raises(NvError, match="is uint64, expected uint32"):
        fast.get("seq", NvType.UINT32)
    assert len(fast) == 3 and fast == NvList.decode(encoded)
    with pytest.raises(AttributeError):
        fast.no_such_attribute  # noqa: B018 - only `_fields` is built on demand


def test_layout_decode_of_another_layout_is_none():
    a = NvLayout([("seq", NvType.UINT64)])
    b = NvLayout([("seg", NvType.UINT64)])
    c = NvLayout([("seq", NvType.INT64)])
    assert b.decode(a.encode(7)) is None
    assert c.decode(a.encode(7)) is None
    assert a.decode(a.encode(7)) == NvList().add_uint64("seq", 7)


def test_layout_errors():
    with pytest.raises(NvError):
        NvLayout([])
    with pytest.raises(NvError):
        NvLayout([("s", NvType.STRING)])
    with pytest.raises(NvError):
        NvLayout([("", NvType.UINT8)])
    layout = NvLayout([("cmd", NvType.UINT8)])
    with pytest.raises(NvError):
        layout.encode(256)
    with pytest.raises(NvError):
        layout.encode(1, 2)


def test_decode_name_cache_is_bounded():
    from hastpy import nv as nvmod

    for i in range(nvmod._NAME_CACHE_MAX + 10):
        name = f"n{i}"
        assert NvList.decode(NvList().add_uint8(name, 1).encode()).get_int(name, NvType.UINT8) == 1
    assert len(nvmod._names) <= nvmod._NAME_CACHE_MAX


def test_decode_odd_sized_scalar_is_an_error():
    # A uint8 element whose dsize says 2 bytes: the fast scalar path must not take it.
    raw = bytes.fromhex("02 04 02000000 636d6400 00000000 0505 000000000000")
    with pytest.raises(NvError):
        NvList.decode(raw)


def test_typed_adders():
    nv = NvList().add_int8("a", -1).add_int16("b", -2).add_int32("c", -3).add_int64("d", -4)
    nv.add_uint32("e", 5)
    decoded = NvList.decode(nv.encode())
    assert [(f.name, f.type, f.value) for f in decoded] == [
        ("a", NvType.INT8, -1), ("b", NvType.INT16, -2), ("c", NvType.INT32, -3),
        ("d", NvType.INT64, -4), ("e", NvType.UINT32, 5),
    ]  # fmt: skip
