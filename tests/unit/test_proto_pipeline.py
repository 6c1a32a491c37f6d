"""Payload pipeline: compression then checksum, exact bytes, hostile payloads, round trips."""

import hashlib
import os
import struct
import timeit
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hastpy.proto.pipeline as pipeline
from hastpy.errors import LocalProtocolError, RemoteProtocolError
from hastpy.nv import NvList
from hastpy.proto.frame import FrameReader, encode_frame
from hastpy.proto.messages import Cmd, Reply, Request, encode_reply_nv, encode_request_nv
from hastpy.proto.pipeline import (
    CHECKSUMS,
    COMPRESSIONS,
    LZF_COMPRESS_MIN,
    decode_payload,
    encode_payload,
    is_all_zero,
    pack,
    unpack,
)


def _lzf_reference_decode(data: bytes) -> bytes:
    """Raw LZF, decoded by hand: 000LLLLL + L+1 literals, or LLLooooo [L+] oooooooo back-refs."""
    out = bytearray()
    i = 0
    while i < len(data):
        ctrl = data[i]
        i += 1
        if ctrl < 32:
            out += data[i : i + ctrl + 1]
            i += ctrl + 1
            continue
        length = ctrl >> 5
        if length == 7:
            length += data[i]
            i += 1
        ref = len(out) - ((ctrl & 0x1F) << 8) - data[i] - 1
        i += 1
        for k in range(length + 2):
            out.append(out[ref + k])
    return bytes(out)


def _encode(data, compression="none", checksum="none"):
    nv = NvList()
    wire = encode_payload(data, compression, checksum, nv)
    return nv, wire


COMPRESSIBLE = b"HAST replicates blocks. " * 200
ABCABCAB = bytes.fromhex("02 616263 60 02")  # raw LZF: literals "abc", back 3 for 5 bytes


# -- send: exact bytes --------------------------------------------------------------------------


def test_hole_payload_exact_bytes():
    nv, wire = _encode(bytes(4096), "hole")
    assert bytes(wire) == bytes.fromhex("00100000")
    # compression:string="hole"
    assert nv.encode() == bytes.fromhex(
        "11 0c 05000000 636f6d7072657373696f6e00 00000000 686f6c6500000000"
    )


def test_crc32_hash_bytes():
    # The CRC-32 check value of "123456789" is 0xcbf43926; hastd stores it little-endian.
    nv, wire = _encode(b"123456789", checksum="crc32")
    assert bytes(wire) == b"123456789"
    assert nv.get_string("checksum") == "crc32"
    assert nv.get_bytes("hash") == bytes.fromhex("2639f4cb")
    assert [f.name for f in nv] == ["checksum", "hash"]


def test_sha256_hash_bytes():
    nv, _ = _encode(b"abc", checksum="sha256")
    assert nv.get_bytes("hash").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_checksum_covers_the_compressed_bytes_and_follows_compression():
    nv, wire = _encode(bytes(8192), "hole", "crc32")
    assert [f.name for f in nv] == ["compression", "checksum", "hash"]
    assert bytes(wire) == bytes.fromhex("00200000")
    assert nv.get_bytes("hash") == struct.pack("<I", zlib.crc32(bytes.fromhex("00200000")))


def test_lzf_output_is_length_plus_raw_liblzf():
    nv, wire = _encode(COMPRESSIBLE, "lzf")
    assert nv.get_string("compression") == "lzf"
    wire = bytes(wire)
    assert int.from_bytes(wire[:4], "little") == len(COMPRESSIBLE)
    assert len(wire) <= 4 + len(COMPRESSIBLE) - LZF_COMPRESS_MIN
    assert _lzf_reference_decode(wire[4:]) == COMPRESSIBLE


def test_lzf_known_stream_decodes():
    # 3 literals "abc", then a back-reference of 5 bytes at distance 3.
    nv = NvList().add_string("compression", "lzf")
    payload = (8).to_bytes(4, "little") + ABCABCAB
    assert bytes(decode_payload(payload, nv)) == b"abcabcab"


def test_lzf_tries_hole_first():
    nv, wire = _encode(bytes(4096), "lzf")
    assert nv.get_string("compression") == "hole" and bytes(wire) == bytes.fromhex("00100000")


@pytest.mark.parametrize("data", [b"a" * LZF_COMPRESS_MIN, os.urandom(4096)])
def test_lzf_sends_uncompressed_when_small_or_incompressible(data):
    nv, wire = _encode(data, "lzf")
    assert wire is data and not nv.exists("compression")


def test_lzf_must_save_at_least_the_minimum():
    # Compresses a little, but not by 1024 bytes: hastd's output buffer would not hold it.
    data = os.urandom(3000) + b"z" * 600
    assert len(pipeline._lzf.compress(data, len(data))) > len(data) - LZF_COMPRESS_MIN
    nv, wire = _encode(data, "lzf")
    assert wire is data and not nv.exists("compression")


def test_lzf_binding_overshoot_is_treated_as_incompressible(monkeypatch):
    class Overshoot:
        @staticmethod
        def compress(data, limit):
            return b"x" * (limit + 1)

        decompress = None

    monkeypatch.setattr(pipeline, "_lzf", Overshoot)
    nv, wire = _encode(COMPRESSIBLE, "lzf")
    assert wire is COMPRESSIBLE and not nv.exists("compression")


def test_lzf_missing_binding_is_a_local_error(monkeypatch):
    monkeypatch.setattr(pipeline, "_lzf", None)
    with pytest.raises(LocalProtocolError, match="python-neo-lzf"):
        _encode(COMPRESSIBLE, "lzf")
    nv = NvList().add_string("compression", "lzf")
    with pytest.raises(LocalProtocolError, match="python-neo-lzf"):
        decode_payload(b"\x08\x00\x00\x00\x00abc", nv)


def test_hole_skips_tiny_buffers():
    for data in (b"", b"\0" * 4):
        nv, wire = _encode(data, "hole")
        assert wire is data and len(nv) == 0


def test_hole_skips_buffers_beyond_uint32(monkeypatch):
    monkeypatch.setattr(pipeline, "_UINT32_MAX", 10)
    data = bytes(16)
    nv, wire = _encode(data, "hole")
    assert wire is data and len(nv) == 0


# -- send: hot path -----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "hole"])
def test_no_copy_without_compression_or_checksum(compression):
    data = memoryview(bytearray(b"\x01" * 1048576))
    nv, wire = _encode(data, compression)
    assert wire is data and len(nv) == 0


def test_zero_check_of_one_mib_is_fast():
    zero = memoryview(bytearray(1 << 20))
    seconds = min(timeit.repeat(lambda: is_all_zero(zero), number=20, repeat=3)) / 20
    assert seconds < 0.002  # ~25 us here; an element-wise compare takes over 1 ms


@pytest.mark.parametrize("size", [1, 7, 65536, 65536 * 3, 65536 * 2 + 100, 1 << 20])
def test_is_all_zero(size):
    assert is_all_zero(bytes(size))
    for pos in {0, size // 2, size - 1, size // 3, size // 5, max(size - 50, 0)}:
        data = bytearray(size)
        data[pos] = 1
        assert not is_all_zero(memoryview(data))
    assert is_all_zero(b"")


# -- send: local errors -------------------------------------------------------------------------


@pytest.mark.parametrize("compression,checksum", [("zstd", "none"), ("none", "md5")])
def test_unknown_algorithms_on_send(compression, checksum):
    with pytest.raises(LocalProtocolError, match="unknown"):
        _encode(b"x" * 100, compression, checksum)


@pytest.mark.parametrize("name", ["compression", "checksum", "hash"])
def test_nv_with_pipeline_fields_refused(name):
    nv = NvList().add_string(name, "x") if name != "hash" else NvList().add_bytes(name, b"x")
    with pytest.raises(LocalProtocolError, match=name):
        encode_payload(b"data", "none", "crc32", nv)


# -- receive ------------------------------------------------------------------------------------


def test_decode_without_fields_returns_the_payload_itself():
    payload = memoryview(b"plain")
    assert decode_payload(payload, NvList()) is payload


def test_empty_payload_skips_the_pipeline_like_hastd():
    nv = NvList().add_string("compression", "hole").add_string("checksum", "crc32")
    assert bytes(decode_payload(b"", nv)) == b""


def test_checksum_mismatch():
    nv, wire = _encode(b"x" * 512, checksum="crc32")
    with pytest.raises(RemoteProtocolError, match="checksum mismatch"):
        decode_payload(b"y" + bytes(wire)[1:], nv)


def test_checksum_is_verified_before_decompressing():
    nv, wire = _encode(COMPRESSIBLE, "lzf", "sha256")
    corrupt = bytearray(wire)
    corrupt[10] ^= 0xFF
    with pytest.raises(RemoteProtocolError, match="sha256 checksum mismatch"):
        decode_payload(corrupt, nv)


@pytest.mark.parametrize(
    "fields,payload,match",
    [
        ({"checksum": "crc32"}, b"abc", "without hash"),
        ({"checksum": "md5", "hash": b"\0" * 16}, b"abc", "unknown checksum"),
        ({"checksum": "none", "hash": b"\0"}, b"abc", "unknown checksum"),
        ({"checksum": "crc32", "hash": b"\0" * 32}, b"abc", "checksum mismatch"),
        ({"compression": "zstd"}, b"abcdef", "unknown compression"),
        ({"compression": "hole"}, b"\0" * 5, "hole payload of 5"),
        ({"compression": "hole"}, b"\0" * 4, "claims 0"),
        ({"compression": "hole"}, (2**32 - 1).to_bytes(4, "little"), "claims 4294967295"),
        ({"compression": "lzf"}, b"\x10\0\0\0", "too short"),
        ({"compression": "lzf"}, (8).to_bytes(4, "little") + b"\xff\xff\xff", "lzf"),
        ({"compression": "lzf"}, (9).to_bytes(4, "little") + ABCABCAB, "9 bytes"),
        ({"compression": "lzf"}, (4).to_bytes(4, "little") + ABCABCAB, "4 bytes"),
    ],
)
def test_decode_rejects(fields, payload, match):
    nv = NvList()
    for name, value in fields.items():
        nv.add_bytes(name, value) if name == "hash" else nv.add_string(name, value)
    with pytest.raises(RemoteProtocolError, match=match):
        decode_payload(payload, nv)


def test_decode_rejects_corrupt_lzf_stream_with_valueerror(monkeypatch):
    class Corrupt:
        compress = None

        @staticmethod
        def decompress(data, size):
            raise ValueError("error in compressed data")

    monkeypatch.setattr(pipeline, "_lzf", Corrupt)
    nv = NvList().add_string("compression", "lzf")
    with pytest.raises(RemoteProtocolError, match="error in compressed data"):
        decode_payload((8).to_bytes(4, "little") + b"\x00abc", nv)


def test_decode_rejects_wrong_field_types():
    nv = NvList().add_uint8("compression", 1)
    with pytest.raises(RemoteProtocolError, match="pipeline field"):
        decode_payload(b"abc", nv)


def test_max_size_bounds_the_decoded_length():
    hole = NvList().add_string("compression", "hole")
    with pytest.raises(RemoteProtocolError, match="limit 4096"):
        decode_payload((8192).to_bytes(4, "little"), hole, max_size=4096)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_payload(b"x" * 10, NvList(), max_size=9)


def test_expected_size():
    assert bytes(decode_payload(b"abc", NvList(), expected_size=3)) == b"abc"
    with pytest.raises(RemoteProtocolError, match="expected 4"):
        decode_payload(b"abc", NvList(), expected_size=4)


# -- round trips --------------------------------------------------------------------------------

DATA = st.one_of(
    st.binary(max_size=5000),
    st.integers(0, 5000).map(bytes),
    st.tuples(st.binary(min_size=1, max_size=40), st.integers(1, 300)).map(lambda t: t[0] * t[1]),
)


@settings(max_examples=200)
@given(DATA, st.sampled_from(COMPRESSIONS), st.sampled_from(CHECKSUMS))
def test_round_trip_all_combinations(data, compression, checksum):
    nv, wire = _encode(data, compression, checksum)
    if nv.exists("compression"):
        assert len(bytes(wire)) < len(data)
    assert bytes(decode_payload(wire, nv)) == data


@settings(max_examples=100)
@given(DATA.filter(len), st.sampled_from(COMPRESSIONS), st.sampled_from(CHECKSUMS))
def test_pack_unpack_through_a_frame(data, compression, checksum):
    req = Request(Cmd.WRITE, seq=1, offset=0, length=len(data))
    wire = b"".join(bytes(b) for b in pack(2, req.to_nv(), data, compression, checksum))
    reader = FrameReader(max_version=2)
    reader.feed(wire)
    frame = reader.next_frame()
    assert Request.from_nv(frame.nv) == req
    assert bytes(unpack(frame, expected_size=len(data))) == data


def test_pack_without_data_adds_no_fields():
    wire = pack(2, NvList().add_uint8("cmd", 5), None, "lzf", "sha256")
    assert len(wire) == 1 and b"hash" not in wire[0]
    assert pack(2, NvList().add_uint8("cmd", 5), b"", "lzf", "sha256") == wire


def test_one_mib_round_trip_every_combination():
    data = (hashlib.sha256(b"seed").digest() * 32768)[: 1 << 20]
    for compression in COMPRESSIONS:
        for checksum in CHECKSUMS:
            nv, wire = _encode(data, compression, checksum)
            assert decode_payload(wire, nv, expected_size=len(data)) == data
            assert nv.exists("compression") == (compression == "lzf")


@given(
    st.one_of(st.binary(max_size=64), st.integers(0, 70).map(bytes)),
    st.sampled_from(["none", "hole", "lzf"]),
    st.sampled_from(["none", "crc32", "sha256"]),
)
def test_passes_through_predicts_encode_payload(data, compression, checksum):
    """passes_through() True means encode_payload returns data itself and adds no field."""
    nv = NvList()
    wire = pipeline.encode_payload(data, compression, checksum, nv)
    untouched = wire is data and len(nv) == 0
    if pipeline.passes_through(data, compression, checksum):
        assert untouched
    elif compression != "lzf":  # lzf is never predicted; everything else exactly
        assert not untouched


@settings(max_examples=200)
@given(
    st.one_of(st.none(), st.binary(min_size=1, max_size=64), st.integers(1, 70).map(bytes)),
    st.sampled_from(["none", "hole", "lzf"]),
    st.sampled_from(["none", "crc32", "sha256"]),
    st.integers(1, 2**64 - 1),
    st.booleans(),
)
def test_io_frame_is_the_generic_frame_on_either_path(data, compression, checksum, seq, request):
    """encode_io_frame (fixed layout where the payload passes through) sends what to_nv() +
    encode_payload + encode_frame would, for requests and replies alike."""
    if request:
        message = Request(Cmd.WRITE if data else Cmd.FLUSH, seq, 0, len(data) if data else 0)
        fast = encode_request_nv
    else:
        message, fast = Reply(seq), encode_reply_nv
    got = b"".join(bytes(b) for b in pipeline.encode_io_frame(3, message, fast, data, compression, checksum))
    nv = message.to_nv()
    payload = None if data is None else pipeline.encode_payload(data, compression, checksum, nv)
    assert got == b"".join(bytes(b) for b in encode_frame(3, nv, payload))
