"""metadata: exact on-disk bytes, hastctl create arithmetic, dump format, size parsing, and
"decode never raises anything but MetadataError"."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hastpy.errors import MetadataError, ProviderError, UsageError
from hastpy.metadata import (
    MAX_EXTENTSIZE,
    MAX_KEEPDIRTY,
    MAX_NEXTENTS,
    MAX_OFF,
    NO_METADATA,
    Layout,
    Metadata,
    bitstr_size,
    check_fits,
    check_requested_mediasize,
    check_resource,
    decode,
    dump_dict,
    format_dump,
    humanize,
    humanize_number,
    min_mediasize,
    new_replica_id,
    nextents_for,
    parse_size,
    plan,
    read_bitmap,
    read_metadata,
    write_bitmap,
    write_metadata,
)
from hastpy.nv import NvList, NvType

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB

# -- the pinned example: a 100 MiB sparse file, 512-byte sectors, defaults ------------------------

MEDIASIZE_100M = 104857600

# The header hastctl create writes for resource "test" on it, element by element:
# type:u8 namesize:u8 dsize:u32le, name NUL-padded to 8, value padded to 8.
EXPECTED_NV = bytes.fromhex(
    # resource: string "test"
    "11 09 05000000" "7265736f75726365 00 00000000000000" "7465737400 000000"
    # datasize: uint64 104852992 = 0x063fee00
    "08 09 08000000" "6461746173697a65 00 00000000000000" "00ee3f0600000000"
    # extentsize: uint32 2097152 = 0x00200000
    "06 0b 04000000" "657874656e7473697a65 00 0000000000" "00002000 00000000"
    # keepdirty: uint32 64
    "06 0a 04000000" "6b6565706469727479 00 000000000000" "40000000 00000000"
    # offset: uint64 4608 = 0x1200
    "08 07 08000000" "6f6666736574 00 00" "0012000000000000"
    # resuid: uint64 0
    "08 07 08000000" "726573756964 00 00" "0000000000000000"
    # localcnt: uint64 0
    "08 09 08000000" "6c6f63616c636e74 00 00000000000000" "0000000000000000"
    # remotecnt: uint64 0
    "08 0a 08000000" "72656d6f7465636e74 00 000000000000" "0000000000000000"
    # prevrole: string "init"
    "11 09 05000000" "70726576726f6c65 00 00000000000000" "696e697400 000000"
)
EXPECTED_HEADER = EXPECTED_NV + bytes(4096 - len(EXPECTED_NV))
MD_100M = Metadata("test", datasize=104852992, extentsize=2097152, keepdirty=64, offset=4608)

DUMP_100M = (
    "resource: test\n"
    "    datasize: 104852992 (100MB)\n"
    "    extentsize: 2097152 (2.0MB)\n"
    "    keepdirty: 64\n"
    "    localoff: 4608\n"
    "    resuid: 0\n"
    "    localcnt: 0\n"
    "    remotecnt: 0\n"
    "    prevrole: init\n"
)


def test_plan_100mib_numbers():
    # Recomputed by hand: ceil((104857600 - 4096) / 2097152) = ceil(49.998...) = 50 extents;
    # 50 bits = 7 bytes, rounded up to one 512-byte sector; the rest is data.
    assert -(-(MEDIASIZE_100M - 4096) // 2097152) == 50
    layout = plan("test", MEDIASIZE_100M, 512)
    assert (layout.nextents, layout.mapsize, layout.datasize, layout.localoff) == (50, 512, 104852992, 4608)
    assert layout.datasize == 104857600 - 4096 - 512
    assert (layout.extentsize, layout.keepdirty, layout.sectorsize) == (2097152, 64, 512)


def test_header_bytes_pinned():
    assert len(EXPECTED_NV) == 7 * 30 + 2 * 22
    md = plan("test", MEDIASIZE_100M, 512).metadata()
    assert md == MD_100M
    assert md.encode() == EXPECTED_HEADER
    assert Metadata.decode(EXPECTED_HEADER) == md
    assert decode(bytearray(EXPECTED_HEADER)) == md


def test_dump_100mib_exact():
    assert format_dump(MD_100M) == DUMP_100M


def test_dump_all_fields():
    md = MD_100M.with_(resuid=0x1234567890ABCDEF, localcnt=7, remotecnt=5, prevrole="primary", keepdirty=1024)
    assert format_dump(md).splitlines() == [
        "resource: test",
        "    datasize: 104852992 (100MB)",
        "    extentsize: 2097152 (2.0MB)",
        "    keepdirty: 1024",
        "    localoff: 4608",
        "    resuid: 1311768467294899695",
        "    localcnt: 7",
        "    remotecnt: 5",
        "    prevrole: primary",
    ]
    assert dump_dict(md) == {
        "resource": "test",
        "datasize": 104852992,
        "extentsize": 2097152,
        "keepdirty": 1024,
        "localoff": 4608,
        "resuid": 1311768467294899695,
        "localcnt": 7,
        "remotecnt": 5,
        "prevrole": "primary",
        "inconsistent": False,
        "replicaid": 0,
        "peerid": 0,
    }


def test_inconsistent_mark_is_an_extra_field_only_while_set():
    assert MD_100M.encode() == EXPECTED_HEADER  # hastd's block, byte for byte, without the mark
    marked = MD_100M.with_(inconsistent=True)
    raw = marked.encode()
    assert NvList.decode(raw).get("inconsistent", NvType.UINT8) == 1
    assert Metadata.decode(raw) == marked
    assert format_dump(marked).endswith("    inconsistent: yes (a synchronization to this node did not finish)\n")
    assert dump_dict(marked)["inconsistent"] is True
    # A zero value (never written by us, but possible) reads as not marked.
    assert Metadata.decode(_fields(inconsistent=("uint8", 0))) == MD_100M


def test_replica_ids_are_extra_fields_only_when_set():
    assert (MD_100M.replicaid, MD_100M.peerid) == (0, 0)  # hastd's block has neither
    both = MD_100M.with_(replicaid=0xFEDC_BA98_7654_3210, peerid=1, inconsistent=True)
    nv = NvList.decode(both.encode())
    assert [f.name for f in nv][-3:] == ["inconsistent", "replicaid", "peerid"]
    assert Metadata.decode(both.encode()) == both
    assert Metadata.decode(MD_100M.with_(replicaid=7).encode()).peerid == 0
    assert format_dump(both).endswith("    replicaid: fedcba9876543210\n    peerid: 0000000000000001\n")
    assert (dump_dict(both)["replicaid"], dump_dict(both)["peerid"]) == (0xFEDC_BA98_7654_3210, 1)
    with pytest.raises(MetadataError, match="peerid"):
        MD_100M.with_(peerid=-1)
    with pytest.raises(MetadataError, match="replicaid.*expected uint64"):
        Metadata.decode(_fields(replicaid=("string", "x")))
    assert new_replica_id() != 0


def test_inconsistent_mark_of_the_wrong_type_is_damage():
    with pytest.raises(MetadataError, match="inconsistent.*expected uint8"):
        Metadata.decode(_fields(inconsistent=("string", "yes")))


@pytest.mark.parametrize(
    "mediasize,nextents,mapsize,datasize",
    [
        # Handbook / reference §2 examples with 2 MiB extents and 512-byte sectors.
        (100 * GiB, 51200, 6656, 107374171648),
        (1 * TiB, 524288, 64 * 1024, 1 * TiB - 4096 - 64 * 1024),
        (10 * TiB, 5242880, 640 * 1024, 10 * TiB - 4096 - 640 * 1024),
    ],
)
def test_plan_handbook_examples(mediasize, nextents, mapsize, datasize):
    layout = plan("test", mediasize, 512)
    assert (layout.nextents, layout.mapsize, layout.datasize) == (nextents, mapsize, datasize)
    assert layout.localoff == 4096 + mapsize


def test_metadata_properties():
    assert MD_100M.localoff == 4608
    assert MD_100M.mapsize == 512
    # The running activemap counts extents of the data area: 104852992 / 2 MiB = 49.998 -> 50.
    assert MD_100M.nextents == 50
    assert nextents_for(4 * MiB, 2 * MiB) == 2 and nextents_for(4 * MiB + 1, 2 * MiB) == 3
    assert bitstr_size(0) == 0 and bitstr_size(1) == 1 and bitstr_size(8) == 1 and bitstr_size(9) == 2


# -- humanize_number ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0"),
        (512, "512"),
        (999, "999"),
        # 1000 >= 10**3 does not fit 3 digits: 1000/1024 = 0 rem 1000, tenths (10000+512)//1024 = 10.
        (1000, "1.0K"),
        (1024, "1.0K"),
        (4096, "4.0K"),
        (65536, "64K"),
        (2097152, "2.0M"),
        # 104852992 / 1024 = 102395 rem 512; / 1024 = 99 rem 1019; rounds to 100.
        (104852992, "100M"),
        (107374171648, "100G"),
        # 999 rem 600 after one division would round to 1000: divide once more.
        (999 * 1024 + 600, "1.0M"),
        (999 * 1024 + 511, "999K"),
        # 9 rem 972 keeps a decimal (9.9); 9 rem 973 (>= 0.95) rounds to the integer 10.
        (9 * 1024 + 972, "9.9K"),
        (9 * 1024 + 973, "10K"),
        (2**63 - 1, "8.0E"),
        # int64_t cast, and C's truncation to 4 characters.
        (2**64 - 1, "-1"),
        (-(9 * 1024 + 972), "-9.9"),
    ],
)
def test_humanize_number(n, text):
    assert humanize_number(n) == text
    assert humanize(n) == text + "B"


@given(st.integers(min_value=0, max_value=MAX_OFF))
def test_humanize_fits_and_scales(n):
    text = humanize_number(n)
    assert 1 <= len(text) <= 4
    if n < 1000:
        assert text == str(n)


# -- parse_size -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,value",
    [
        ("4096", 4096),
        ("0", 0),
        ("64k", 64 * 1024),
        ("64K", 64 * 1024),
        ("2M", 2 * MiB),
        ("2m", 2 * MiB),
        ("1G", GiB),
        ("1g", GiB),
        ("1T", TiB),
        ("1t", TiB),
        ("2p", 2 * 1024 * TiB),
        ("1E", 2**60),
        ("512b", 512),
        ("512B", 512),
        ("2MB", 2 * MiB),
        ("64KiB", 64 * 1024),
        ("0x1000", 4096),
        ("0X10k", 16 * 1024),
        ("010", 8),  # strtoumax base 0: a leading 0 is octal, as in hastctl
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text", ["", "k", "-1", "+1", " 1", "1 ", "1.5M", "2x", "2Mfoo", "08", "0x", "1kk", "1bb", "8E", "16E"]
)
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="Invalid extentsize"):
        parse_size(text, "extentsize")


# -- decode: errors -------------------------------------------------------------------------------


def _nv_block(nv: NvList) -> bytes:
    raw = nv.encode()
    return raw + bytes(4096 - len(raw))


def _fields(**override):
    fields = {
        "resource": ("string", "test"),
        "datasize": ("uint64", 104852992),
        "extentsize": ("uint32", 2097152),
        "keepdirty": ("uint32", 64),
        "offset": ("uint64", 4608),
        "resuid": ("uint64", 0),
        "localcnt": ("uint64", 0),
        "remotecnt": ("uint64", 0),
        "prevrole": ("string", "init"),
    }
    fields.update(override)
    nv = NvList()
    for name, spec in fields.items():
        if spec is not None:
            getattr(nv, f"add_{spec[0]}")(name, spec[1])
    return _nv_block(nv)


def test_decode_hand_built_block():
    assert Metadata.decode(_fields()) == MD_100M


def test_decode_all_zeros_says_create():
    with pytest.raises(MetadataError) as exc:
        Metadata.decode(bytes(4096))
    assert str(exc.value) == NO_METADATA
    assert "hastctl create" in str(exc.value)


@pytest.mark.parametrize("size", [0, 4095, 4097, 8192])
def test_decode_wrong_length(size):
    with pytest.raises(MetadataError, match="expected 4096"):
        Metadata.decode(bytes([1]) * size)


def test_decode_garbage():
    with pytest.raises(MetadataError, match="damaged"):
        Metadata.decode(b"\xff" * 4096)


def test_decode_empty_list_with_garbage_after():
    with pytest.raises(MetadataError, match="no fields"):
        Metadata.decode(b"\0" + b"\x01" * 4095)


FIELD_NAMES = ["resource", "datasize", "extentsize", "keepdirty", "offset", "resuid", "localcnt", "remotecnt"]


@pytest.mark.parametrize("name", FIELD_NAMES + ["prevrole"])
def test_decode_missing_field(name):
    with pytest.raises(MetadataError, match=f"field '{name}' is missing"):
        Metadata.decode(_fields(**{name: None}))


def test_decode_wrong_type():
    with pytest.raises(MetadataError, match="extentsize.*uint64, expected uint32"):
        Metadata.decode(_fields(extentsize=("uint64", 2097152)))


def test_decode_ignores_unknown_fields_and_trailing_garbage():
    nv = NvList.decode(EXPECTED_NV).add_string("future", "x")
    raw = nv.encode() + b"\0" + b"junk"
    assert Metadata.decode(raw + bytes(4096 - len(raw))) == MD_100M


@pytest.mark.parametrize(
    "override,message",
    [
        ({"extentsize": ("uint32", 3 * 1024 * 1024)}, "extentsize 3145728 is not a power of 2"),
        ({"extentsize": ("uint32", 256)}, "extentsize 256 is outside"),
        ({"extentsize": ("uint32", 2**31)}, "extentsize 2147483648 is outside"),
        ({"keepdirty": ("uint32", 0)}, "keepdirty 0 is outside"),
        ({"keepdirty": ("uint32", 2**31)}, "keepdirty 2147483648 is outside"),
        ({"datasize": ("uint64", 0)}, "datasize 0 is outside"),
        ({"datasize": ("uint64", 2**63)}, "datasize 9223372036854775808 is outside"),
        ({"offset": ("uint64", 4096)}, "offset 4096 is outside"),
        ({"offset": ("uint64", 2**63 - 100)}, "offset .* is outside"),
        ({"prevrole": ("string", "bogus")}, "prevrole 'bogus' is not init, primary or secondary"),
        ({"resource": ("string", "")}, "invalid resource name ''"),
        # 2**31 + 1 extents of 512 bytes: more than hastd's int can number.
        (
            {"extentsize": ("uint32", 512), "datasize": ("uint64", (2**31) * 512 + 1)},
            "2147483649 extents, more than hastd can count",
        ),
        # 100 GiB of data needs 6400 bytes of bitmap; 4096 + 512 leaves 512.
        (
            {"datasize": ("uint64", 100 * GiB)},
            "leaves 512 bytes for the bitmap of 51200 extents, which needs 6400",
        ),
    ],
)
def test_decode_invalid_values(override, message):
    with pytest.raises(MetadataError, match=message):
        Metadata.decode(_fields(**override))


# -- the constructor validates code-built values too ---------------------------------------------


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"datasize": True}, "datasize must be an integer"),
        ({"resuid": "1"}, "resuid must be an integer"),
        ({"resuid": -1}, "resuid -1 is outside"),
        ({"localcnt": 2**64}, "localcnt .* is outside"),
        ({"resource": "a\0b"}, "invalid resource name"),
        ({"resource": "a\nprevrole: primary"}, "invalid resource name"),
        ({"resource": "del\x7f"}, "invalid resource name"),
        ({"resource": 5}, "invalid resource name"),
        ({"resource": "x" * 256}, "longer than 255 bytes"),
        ({"prevrole": "Primary"}, "prevrole"),
        ({"inconsistent": 1}, "inconsistent must be a bool"),
        ({"prevrole": ["init"]}, "prevrole"),
    ],
)
def test_constructor_rejects(changes, message):
    with pytest.raises(MetadataError, match=message):
        MD_100M.with_(**changes)


def test_longest_resource_name_fits():
    md = MD_100M.with_(resource="é" * 127 + "x")  # 255 bytes of UTF-8
    assert Metadata.decode(md.encode()) == md


def test_encode_guards_block_size(monkeypatch):
    # No valid Metadata overflows the block today; the guard is for a future field.
    monkeypatch.setattr(NvList, "encode", lambda self: bytes(4096))
    with pytest.raises(MetadataError, match="more than fits"):
        MD_100M.encode()


# -- resource, fit and -m checks ------------------------------------------------------------------


def test_check_resource():
    check_resource(MD_100M, "test", "/dev/ada0")
    with pytest.raises(MetadataError) as exc:
        check_resource(MD_100M, "shared", "/dev/ada0")
    assert str(exc.value) == "Provider /dev/ada0 is not part of resource shared."
    with pytest.raises(MetadataError) as exc:
        check_resource(MD_100M, "shared")
    assert str(exc.value) == "Provider is not part of resource shared."


def test_check_fits():
    check_fits(MD_100M, MEDIASIZE_100M, 512)
    with pytest.raises(MetadataError, match="provider has only 104857599"):
        check_fits(MD_100M, MEDIASIZE_100M - 1, 512)
    # Created on 512-byte sectors, then seen through 4096-byte sectors.
    with pytest.raises(MetadataError, match="offset 4608 is not a multiple of the sector size 4096"):
        check_fits(MD_100M, MEDIASIZE_100M, 4096)
    # Only sectors larger than 4096 (64 KiB-page hosts) can misplace the bitmap: 10000 bytes fit
    # in the 12288 before offset 16384, but not in whole 8192-byte sectors.
    md = Metadata("t", datasize=80000 * 512, extentsize=512, keepdirty=1, offset=16384)
    with pytest.raises(MetadataError, match="whole 8192-byte sectors"):
        check_fits(md, 2**40, 8192)


def test_check_requested_mediasize():
    assert check_requested_mediasize(None, 1000, "/p") == 1000
    assert check_requested_mediasize(999, 1000, "/p") == 999
    assert check_requested_mediasize(1000, 1000, "/p") == 1000
    with pytest.raises(UsageError) as exc:
        check_requested_mediasize(1001, 1000, "/p")
    assert str(exc.value) == "Provided mediasize is larger than provider /p size."


# -- plan(): validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sectorsize": 1000}, r"Sector size 1000 is not supported"),
        ({"sectorsize": 256}, r"Sector size 256 is not supported"),
        ({"sectorsize": 8192}, r"Sector size 8192 is not supported"),
        ({"extentsize": 256}, r"Extent size \(256\) is less than sector size \(512\)\."),
        ({"extentsize": 1000}, r"Extent size \(1000\) is not multiple of sector size \(512\)\."),
        ({"extentsize": 1536}, r"Extent size \(1536\) is not a power of 2\."),
        ({"extentsize": 2**31}, r"Extent size \(2147483648\) is larger than"),
        ({"keepdirty": 0}, r"keepdirty \(0\) must be from 1"),
        ({"keepdirty": MAX_KEEPDIRTY + 1}, r"keepdirty \(2147483648\) must be from 1"),
        ({"mediasize": MAX_OFF + 1}, r"Media size \(9223372036854775808\) is larger than"),
        ({"mediasize": MEDIASIZE_100M + 1}, r"not a multiple of the sector size \(512\)"),
        ({"mediasize": 0}, r"Media size \(0\) is too small"),
        (
            {"mediasize": 4096 + 512 + 2 * MiB - 512},
            r"too small: .* at least one 2097152-byte extent, 2101760 bytes",
        ),
        ({"mediasize": 2**42, "extentsize": 512}, r"more than 2147483647 extents; use a larger extent size"),
        ({"resource": ""}, r"invalid resource name"),
    ],
)
def test_plan_rejects(kwargs, message):
    args = {"resource": "test", "mediasize": MEDIASIZE_100M, "sectorsize": 512} | kwargs
    with pytest.raises(UsageError, match=message):
        plan(**args)


def test_plan_minimum_is_exact():
    smallest = min_mediasize(2 * MiB, 512)
    assert smallest == 4096 + 512 + 2 * MiB
    layout = plan("test", smallest, 512)
    assert layout.datasize == 2 * MiB and layout.nextents == 2 and layout.mapsize == 512


def test_plan_largest_extent_and_custom_keepdirty():
    layout = plan("big", 4 * GiB, 4096, extentsize=MAX_EXTENTSIZE, keepdirty=MAX_KEEPDIRTY)
    assert layout.mapsize == 4096 and layout.nextents == 4
    assert layout.metadata().keepdirty == MAX_KEEPDIRTY


SECTORS = st.sampled_from([512, 1024, 2048, 4096])


@st.composite
def geometries(draw):
    sectorsize = draw(SECTORS)
    extentsize = sectorsize << draw(st.integers(0, (MAX_EXTENTSIZE // sectorsize).bit_length() - 1))
    low = min_mediasize(extentsize, sectorsize) // sectorsize
    high = min(2**50, 4096 + MAX_NEXTENTS * extentsize) // sectorsize
    sectors = draw(st.integers(low, high))
    return sectors * sectorsize, sectorsize, extentsize


@given(geometries(), st.integers(1, MAX_KEEPDIRTY))
def test_plan_invariants(geometry, keepdirty):
    mediasize, sectorsize, extentsize = geometry
    layout = plan("r", mediasize, sectorsize, extentsize, keepdirty)
    assert layout.localoff + layout.datasize == mediasize
    assert layout.localoff == 4096 + layout.mapsize
    assert layout.mapsize * 8 >= layout.nextents
    assert layout.mapsize % sectorsize == 0 and layout.mapsize - sectorsize < bitstr_size(layout.nextents)
    assert layout.nextents * extentsize >= mediasize - 4096 > (layout.nextents - 1) * extentsize
    assert layout.datasize >= extentsize and layout.datasize % sectorsize == 0
    md = layout.metadata()
    # The running activemap (sized from datasize) fits in what create reserved.
    assert md.nextents <= layout.nextents
    check_fits(md, mediasize, sectorsize)
    assert Metadata.decode(md.encode()) == md


@given(SECTORS, st.integers(0, 16), st.integers(0, 64 * 1024))
def test_plan_accepts_exactly_from_min_mediasize(sectorsize, shift, sectors):
    extentsize = sectorsize << shift
    mediasize = sectors * sectorsize
    if mediasize >= min_mediasize(extentsize, sectorsize):
        assert plan("r", mediasize, sectorsize, extentsize).datasize >= extentsize
    else:
        with pytest.raises(UsageError, match="too small"):
            plan("r", mediasize, sectorsize, extentsize)


# -- hypothesis: codec ----------------------------------------------------------------------------

NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1).filter(
    lambda s: len(s.encode()) <= 255
)
U64 = st.integers(0, 2**64 - 1)


@st.composite
def metadatas(draw):
    extentsize = 1 << draw(st.integers(9, 30))
    datasize = draw(st.integers(1, min(MAX_OFF // 2, MAX_NEXTENTS * extentsize)))
    need = bitstr_size(nextents_for(datasize, extentsize))
    offset = 4096 + need + draw(st.integers(0, 2**20))
    return Metadata(
        resource=draw(NAMES),
        datasize=datasize,
        extentsize=extentsize,
        keepdirty=draw(st.integers(1, MAX_KEEPDIRTY)),
        offset=offset,
        resuid=draw(U64),
        localcnt=draw(U64),
        remotecnt=draw(U64),
        prevrole=draw(st.sampled_from(["init", "primary", "secondary"])),
        inconsistent=draw(st.booleans()),
    )


@given(metadatas())
def test_roundtrip(md):
    raw = md.encode()
    assert len(raw) == 4096
    assert Metadata.decode(raw) == md
    assert format_dump(md).count("\n") == 9 + md.inconsistent


@st.composite
def blocks(draw):
    """4096 bytes: a random head (where the nv elements live) and a constant or random tail."""
    head = draw(st.binary(max_size=600))
    if draw(st.booleans()):
        tail = draw(st.randoms(use_true_random=False)).randbytes(4096 - len(head))
    else:
        tail = bytes([draw(st.integers(0, 255))]) * (4096 - len(head))
    return head + tail


@settings(max_examples=500)
@given(blocks())
def test_decode_random_blocks_only_metadata_error(raw):
    try:
        Metadata.decode(raw)
    except MetadataError:
        pass


@settings(max_examples=300)
@given(metadatas(), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), min_size=1, max_size=8))
def test_decode_damaged_blocks_only_metadata_error(md, edits):
    raw = bytearray(md.encode())
    for pos, value in edits:
        raw[pos] = value
    try:
        assert isinstance(Metadata.decode(raw), Metadata)
    except MetadataError:
        pass


# -- the thin I/O functions -----------------------------------------------------------------------


def test_io_roundtrip_on_fd_and_file_object(tmp_path):
    path = tmp_path / "p"
    path.write_bytes(bytes(8192))
    with open(path, "r+b") as f:
        write_metadata(f, MD_100M)
        write_bitmap(f.fileno(), b"\x01" + bytes(511))
        assert read_metadata(f.fileno()) == MD_100M
        assert read_metadata(f) == MD_100M
        assert read_bitmap(f, 512) == b"\x01" + bytes(511)
    raw = path.read_bytes()
    assert raw[:4096] == EXPECTED_HEADER and raw[4096:4097] == b"\x01"


def test_read_metadata_short_provider(tmp_path):
    path = tmp_path / "p"
    path.write_bytes(EXPECTED_HEADER[:1000])
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(MetadataError, match="only 1000 bytes"):
            read_metadata(fd)
        with pytest.raises(ProviderError, match="ends 4096 bytes early"):
            read_bitmap(fd, 4096)
        os.truncate(path, 5000)
        with pytest.raises(ProviderError, match="ends 3192 bytes early"):
            read_bitmap(fd, 4096)
    finally:
        os.close(fd)


def test_io_errors_are_provider_errors(tmp_path):
    path = tmp_path / "p"
    path.write_bytes(bytes(8192))
    wfd = os.open(path, os.O_WRONLY)
    rfd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ProviderError, match="Unable to read at offset 0: Bad file descriptor"):
            read_metadata(wfd)
        with pytest.raises(ProviderError, match="Unable to write at offset 4096: Bad file descriptor"):
            write_bitmap(rfd, bytes(512))
    finally:
        os.close(wfd)
        os.close(rfd)


def test_layout_is_a_plain_record():
    layout = Layout(50, 512, 104852992, 4608, "test", MEDIASIZE_100M, 512, 2 * MiB, 64)
    assert layout == plan("test", MEDIASIZE_100M, 512)
