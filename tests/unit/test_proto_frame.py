"""Frame codec: exact bytes, the h11-style three-way feed check, limits, and hostile input."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hastpy.errors import LocalProtocolError, RemoteProtocolError
from hastpy.nv import NvList, NvType
from hastpy.proto.frame import (
    HEADER_SIZE,
    MAX_HANDSHAKE_PAYLOAD,
    MAX_IO_PAYLOAD,
    MAX_NV_SIZE,
    Frame,
    FrameReader,
    encode_frame,
)

# Reference §5: the keepalive request, 5-byte header + 22-byte nv.
KEEPALIVE_FRAME = bytes.fromhex("02 16000000" "02 04 01000000 636d6400 00000000 05 00000000000000")


def _join(buffers) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def _frame(version=2, payload=None, **fields) -> bytes:
    nv = NvList()
    for name, value in fields.items():
        nv.add_uint64(name, value)
    return _join(encode_frame(version, nv, payload))


def _read_all(reader: FrameReader) -> list[Frame]:
    frames = []
    while (frame := reader.next_frame()) is not None:
        frames.append(frame)
    return frames


def _summary(frames):
    return [(f.version, f.nv, bytes(f.payload)) for f in frames]


# -- encode -------------------------------------------------------------------------------------


def test_keepalive_frame_exact_bytes():
    buffers = encode_frame(2, NvList().add_uint8("cmd", 5))
    assert buffers == [KEEPALIVE_FRAME]


def test_payload_is_a_separate_buffer_and_not_copied():
    payload = bytearray(b"\xab" * 512)
    buffers = encode_frame(2, NvList().add_uint8("cmd", 2), payload)
    assert len(buffers) == 2
    assert buffers[1] is payload
    # size:uint32=512 appended after the caller's fields.
    size_elem = bytes.fromhex("06 05 04000000 73697a6500 000000 00020000 00000000")
    assert buffers[0].endswith(size_elem)
    assert buffers[0][:5] == bytes.fromhex("02 2c000000")  # 22 + 22 bytes of nv


def test_encode_does_not_modify_nv():
    nv = NvList().add_uint8("cmd", 2)
    encode_frame(2, nv, b"x" * 8)
    assert not nv.exists("size")


def test_empty_payload_is_no_payload():
    assert encode_frame(2, NvList().add_uint8("cmd", 5), b"") == [KEEPALIVE_FRAME]


def test_memoryview_payload_uses_nbytes():
    import array

    payload = memoryview(array.array("I", [1, 2, 3]))
    buffers = encode_frame(2, NvList(), payload)
    frame = _read_all(_reader_with(_join(buffers)))[0]
    assert frame.nv.get_int("size", NvType.UINT32) == 12


@pytest.mark.parametrize("version", [-1, 256])
def test_encode_rejects_bad_version(version):
    with pytest.raises(LocalProtocolError, match="version"):
        encode_frame(version, NvList())


def test_encode_rejects_caller_size_field():
    with pytest.raises(LocalProtocolError, match="size"):
        encode_frame(2, NvList().add_uint32("size", 3), b"abc")


def test_encode_rejects_non_buffer_payload():
    with pytest.raises(LocalProtocolError, match="bytes-like"):
        encode_frame(2, NvList(), "text")  # type: ignore[arg-type]


def test_encode_rejects_non_contiguous_payload():
    with pytest.raises(LocalProtocolError, match="contiguous"):
        encode_frame(2, NvList(), memoryview(b"abcdef")[::2])


def test_encode_rejects_oversized_nv():
    nv = NvList().add_bytes("blob", b"x" * MAX_NV_SIZE)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode_frame(2, nv)


def test_encode_rejects_payload_beyond_uint32(monkeypatch):
    import hastpy.proto.frame as frame_mod

    monkeypatch.setattr(frame_mod, "_nbytes", lambda buf: 1 << 32)
    with pytest.raises(LocalProtocolError, match="uint32"):
        encode_frame(2, NvList(), b"x")


# -- read: the three-way check ------------------------------------------------------------------


def _reader_with(data: bytes, **kw) -> FrameReader:
    reader = FrameReader(max_version=3, **kw)
    reader.feed(data)
    return reader


STREAM = (
    KEEPALIVE_FRAME
    + _frame(2, b"payload-one", seq=1, offset=0)
    + _frame(3, seq=2)
    + _frame(2, bytes(range(256)) * 40, seq=3)
)


def test_stream_fed_whole():
    frames = _read_all(_reader_with(STREAM))
    assert [f.version for f in frames] == [2, 2, 3, 2]
    assert frames[0].nv.get_int("cmd", NvType.UINT8) == 5
    assert bytes(frames[0].payload) == b""
    assert bytes(frames[1].payload) == b"payload-one"
    assert frames[2].nv.get_int("seq", NvType.UINT64) == 2
    assert bytes(frames[3].payload) == bytes(range(256)) * 40


def test_stream_fed_one_byte_at_a_time():
    reader = FrameReader(max_version=3)
    frames = []
    for i in range(len(STREAM)):
        reader.feed(STREAM[i : i + 1])
        frames += _read_all(reader)
    assert _summary(frames) == _summary(_read_all(_reader_with(STREAM)))


def test_frame_with_trailing_bytes_of_the_next():
    reader = FrameReader(max_version=3)
    first = len(KEEPALIVE_FRAME) + 7
    reader.feed(STREAM[:first])
    frames = _read_all(reader)
    assert len(frames) == 1 and frames[0].nv.get_int("cmd", NvType.UINT8) == 5
    reader.feed(STREAM[first:])
    frames += _read_all(reader)
    assert _summary(frames) == _summary(_read_all(_reader_with(STREAM)))


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), max_size=20))
def test_stream_fed_in_random_chunks(cuts):
    reader = FrameReader(max_version=3)
    frames = []
    points = sorted(set(cuts) | {len(STREAM)})
    start = 0
    for point in points:
        reader.feed(STREAM[start:point])
        frames += _read_all(reader)
        start = point
    assert _summary(frames) == _summary(_read_all(_reader_with(STREAM)))


def test_needed_reads_exactly_one_frame_at_a_time():
    # A blocking reader that recvs needed() bytes never reads past a frame.
    reader = FrameReader(max_version=3)
    pos = 0
    frames = []
    while pos < len(STREAM):
        want = reader.needed()
        assert want > 0
        reader.feed(STREAM[pos : pos + want])
        pos += want
        frame = reader.next_frame()
        if frame is not None:
            frames.append(frame)
            assert reader.needed() == HEADER_SIZE
    assert _summary(frames) == _summary(_read_all(_reader_with(STREAM)))


def test_needed_is_zero_when_a_step_can_progress():
    reader = _reader_with(KEEPALIVE_FRAME)
    assert reader.needed() == 0
    assert reader.next_frame() is not None


def test_payload_buffered_with_trailing_frame():
    data = _frame(2, b"abc", seq=1) + KEEPALIVE_FRAME
    reader = _reader_with(data)
    first = reader.next_frame()
    assert bytes(first.payload) == b"abc"
    assert reader.next_frame().nv.get_int("cmd", NvType.UINT8) == 5
    assert reader.next_frame() is None


def test_big_payload_streamed_in_place():
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = _frame(2, payload, seq=9)
    reader = FrameReader(max_version=2)
    for i in range(0, len(data), 65536):
        reader.feed(memoryview(data)[i : i + 65536])
        frame = reader.next_frame()
    assert frame is not None and frame.payload == payload


def test_many_big_frames_are_linear():
    # 64 frames of 1 MiB fed in 4 KiB pieces; compaction keeps the buffer small.
    payload = b"\x5a" * MAX_IO_PAYLOAD
    one = _frame(2, payload, seq=1)
    reader = FrameReader(max_version=2)
    count = 0
    for _ in range(64):
        view = memoryview(one)
        for i in range(0, len(one), 4096):
            reader.feed(view[i : i + 4096])
            while (frame := reader.next_frame()) is not None:
                assert len(frame.payload) == MAX_IO_PAYLOAD
                count += 1
        assert len(reader._buf) < 2 * 65536 + 4096
    assert count == 64


def test_compaction_of_a_large_consumed_prefix():
    data = KEEPALIVE_FRAME * 4000  # 108 KB of small frames fed at once
    reader = _reader_with(data[:-10])
    frames = _read_all(reader)
    reader.feed(data[-10:])
    frames += _read_all(reader)
    assert len(frames) == 4000
    assert len(reader._buf) <= len(KEEPALIVE_FRAME)


def test_empty_nv_frame():
    frame = _read_all(_reader_with(bytes.fromhex("02 00000000")))[0]
    assert len(frame.nv) == 0 and frame.payload == b""


def test_size_zero_means_no_payload():
    nv = NvList().add_uint8("cmd", 1).add_uint32("size", 0)
    data = bytes([2]) + len(nv.encode()).to_bytes(4, "little") + nv.encode() + KEEPALIVE_FRAME
    frames = _read_all(_reader_with(data))
    assert len(frames) == 2 and frames[0].payload == b""


# -- read: rejects ------------------------------------------------------------------------------


def test_version_above_max_is_rpc_mismatch():
    reader = FrameReader(max_version=2)
    reader.feed(b"\x03" + KEEPALIVE_FRAME[1:])
    with pytest.raises(RemoteProtocolError, match="RPC version mismatch"):
        reader.next_frame()


def test_oversized_nv_rejected_from_the_header_alone():
    reader = FrameReader(max_version=2, max_nv=1024)
    reader.feed(bytes.fromhex("02 01040000"))  # 1025 bytes announced, none sent
    with pytest.raises(RemoteProtocolError, match="nv header of 1025"):
        reader.next_frame()


def test_oversized_payload_rejected_before_it_arrives():
    header = _frame(2, b"x" * 100, seq=1)[:-100]
    reader = FrameReader(max_version=2, max_payload=99)
    reader.feed(header)
    with pytest.raises(RemoteProtocolError, match="payload of 100 bytes exceeds"):
        reader.next_frame()


def test_default_limits():
    reader = FrameReader(max_version=2)
    assert (reader.max_nv, reader.max_payload) == (MAX_NV_SIZE, MAX_IO_PAYLOAD)
    assert MAX_HANDSHAKE_PAYLOAD >= 4 * 1024 * 1024  # the activemap of a 64 TiB resource


def test_bad_nv_wrapped():
    reader = _reader_with(bytes.fromhex("02 08000000 63 00 00000000 0000"))  # unknown type 99
    with pytest.raises(RemoteProtocolError, match="bad nv header"):
        reader.next_frame()


def test_size_of_wrong_type_rejected():
    nv = NvList().add_uint64("size", 3)
    data = bytes([2]) + len(nv.encode()).to_bytes(4, "little") + nv.encode() + b"abc"
    with pytest.raises(RemoteProtocolError, match="size"):
        _reader_with(data).next_frame()


def test_reader_stays_dead_after_an_error():
    reader = FrameReader(max_version=1)
    reader.feed(KEEPALIVE_FRAME)
    with pytest.raises(RemoteProtocolError) as first:
        reader.next_frame()
    reader.feed(KEEPALIVE_FRAME)  # ignored
    assert reader.needed() == 0
    with pytest.raises(RemoteProtocolError) as again:
        reader.next_frame()
    assert again.value is first.value


# -- hypothesis: hostile input ------------------------------------------------------------------


def _drain(reader: FrameReader) -> None:
    try:
        while (frame := reader.next_frame()) is not None:
            assert isinstance(frame, Frame)
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64))
def test_random_bytes_give_frames_or_remote_protocol_error(data, chunk):
    reader = FrameReader(max_version=3, max_nv=256, max_payload=256)
    for i in range(0, len(data), chunk):
        reader.feed(data[i : i + chunk])
        _drain(reader)


@settings(max_examples=500)
@given(
    st.sampled_from(
        [
            KEEPALIVE_FRAME,
            _frame(2, b"hello world", seq=7, offset=4096, length=512),
            _frame(3, seq=1),
        ]
    ),
    st.lists(st.tuples(st.integers(min_value=0, max_value=200), st.integers(0, 255)), max_size=6),
    st.integers(min_value=0, max_value=8),
)
def test_mutated_frames_give_frames_or_remote_protocol_error(frame, flips, cut):
    data = bytearray(frame * 2)
    for pos, value in flips:
        data[pos % len(data)] = value
    reader = FrameReader(max_version=3, max_nv=512, max_payload=512)
    reader.feed(bytes(data[: len(data) - cut]))
    _drain(reader)
