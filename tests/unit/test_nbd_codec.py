"""NBD server codec: exact bytes, h11's three-way reader check, validation, and fuzzing.

Expected bytes are spelled out from proto.md, not produced with the codec's own encoders, so a
wrong constant or layout in the codec cannot hide behind a matching wrong test.
"""

import errno
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hastpy.errors import LocalProtocolError, RemoteProtocolError
from hastpy.nbd import codec
from hastpy.nbd.codec import (
    NEED_DATA,
    Aborted,
    Command,
    ConnectionClosed,
    OptionReply,
    Ready,
    Request,
    RequestError,
    ServerConnection,
    State,
)

MiB = 1024 * 1024
SIZE = 64 * MiB
NAME = "data"

GREETING = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
REP_MAGIC = bytes.fromhex("0003e889045565a9")
# HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES = 1 + 4 + 8 + 32 + 64
FLAGS_RW = 0x6D
FLAGS_RO = 0x0F  # HAS_FLAGS | READ_ONLY | SEND_FLUSH | SEND_FUA

# --- helpers -------------------------------------------------------------------------------------


def option(opt: int, data: bytes = b"") -> bytes:
    return b"IHAVEOPT" + struct.pack(">II", opt, len(data)) + data


def go_data(name: bytes = NAME.encode(), infos: tuple[int, ...] = ()) -> bytes:
    count = len(infos)
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{count}H", count, *infos)


def rep(opt: int, reply_type: int, data: bytes = b"") -> bytes:
    return REP_MAGIC + struct.pack(">III", opt, reply_type, len(data)) + data


def request(kind, handle=1, offset=0, length=0, flags=0, data=b""):
    """One request message, spelled out from proto.md; a WRITE's length is its data's."""
    if kind == Command.WRITE and data:
        length = len(data)
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, handle, offset, length) + data


def new_conn(**kwargs) -> ServerConnection:
    kwargs.setdefault("export_name", NAME)
    kwargs.setdefault("size", SIZE)
    return ServerConnection(**kwargs)


def transmitting(**kwargs) -> ServerConnection:
    """A connection that has finished NBD_OPT_GO (client flags FIXED_NEWSTYLE | NO_ZEROES)."""
    conn = new_conn(**kwargs)
    conn.receive_data(b"\x00\x00\x00\x03" + option(7, go_data()))
    assert isinstance(conn.next_event(), Ready)
    assert conn.state is State.TRANSMISSION
    return conn


def drain(conn: ServerConnection) -> list:
    """Every event available now, up to NEED_DATA or the end of the session."""
    events = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def normalise(events: list) -> list:
    """Payload memoryviews compare by content, but make failures readable as bytes."""
    out = []
    for event in events:
        if isinstance(event, Request):
            event = Request(
                event.kind, event.flags, event.handle, event.offset, event.length, bytes(event.data)
            )
        out.append(event)
    return out


def three_way(make_conn, data: bytes, expected: list) -> None:
    """h11's reader check: the same events whether `data` arrives whole, a byte at a time, or
    followed by the start of another message, which must stay buffered and intact."""
    whole = make_conn()
    whole.receive_data(data)
    assert normalise(drain(whole)) == expected

    trickle = make_conn()
    got = []
    for i in range(len(data)):
        trickle.receive_data(data[i : i + 1])
        got += drain(trickle)
    assert normalise(got) == expected

    follower = request(Command.FLUSH, handle=0xFEED)
    trailing = make_conn()
    trailing.receive_data(data + follower[:-3])
    assert normalise(drain(trailing)) == expected
    if trailing.state is State.TRANSMISSION:
        trailing.receive_data(follower[-3:])
        assert drain(trailing) == [Request(Command.FLUSH, 0, 0xFEED, 0, 0)]


# --- handshake ------------------------------------------------------------------------------------


def test_greeting_exact_bytes():
    assert new_conn().greeting() == GREETING
    assert len(GREETING) == 18


def test_go_replies_info_export_and_block_size():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + option(7, go_data(infos=(3,))))
    event = conn.next_event()
    export = rep(7, 3, b"\x00\x00" + struct.pack(">Q", SIZE) + b"\x00\x6d")
    block = rep(7, 3, b"\x00\x03" + bytes.fromhex("00000200 00001000 02000000"))
    assert event == Ready(7, NAME, SIZE, FLAGS_RW, export + block + rep(7, 1))
    assert event.data[:8] == REP_MAGIC
    assert conn.state is State.TRANSMISSION


def test_go_with_empty_name_selects_the_default_export():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x01" + option(7, go_data(b"")))
    assert isinstance(conn.next_event(), Ready)


def test_go_honours_name_and_description_and_ignores_unknown_infos():
    conn = new_conn(description="hast data")
    conn.receive_data(b"\x00\x00\x00\x03" + option(7, go_data(infos=(1, 2, 99, 1))))
    data = conn.next_event().data
    assert rep(7, 3, b"\x00\x01" + b"data") in data
    assert rep(7, 3, b"\x00\x02" + b"hast data") in data
    assert data.count(REP_MAGIC) == 5  # EXPORT, NAME (once), DESCRIPTION, BLOCK_SIZE, ACK


def test_description_is_not_sent_when_empty():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + option(6, go_data(infos=(2,))))
    assert conn.next_event().data.count(REP_MAGIC) == 3  # EXPORT, BLOCK_SIZE, ACK


def test_info_then_go():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + option(6, go_data()))
    info = conn.next_event()
    assert isinstance(info, OptionReply) and info.option == 6
    assert info.data.endswith(rep(6, 1))
    assert conn.state is State.OPTIONS
    conn.receive_data(option(7, go_data()))
    assert isinstance(conn.next_event(), Ready)


def test_go_unknown_export_name():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + option(7, go_data(b"other")))
    assert conn.next_event() == OptionReply(7, rep(7, 0x80000006, b"unknown export"))
    assert conn.state is State.OPTIONS


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00",  # shorter than a name length plus a count
        struct.pack(">I", 100) + b"data\x00\x00",  # name longer than the option
        go_data() + b"\x00",  # trailing garbage after the info requests
        go_data(infos=(3,))[:-1],  # an info request cut short
    ],
)
def test_go_malformed_is_err_invalid(data):
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + option(7, data))
    event = conn.next_event()
    assert isinstance(event, OptionReply)
    assert event.data == rep(7, 0x80000003, b"malformed NBD_OPT_INFO/GO data")


def test_abort_is_acked_then_done():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + option(2))
    assert conn.next_event() == Aborted(rep(2, 1))
    assert conn.state is State.DONE
    assert conn.next_event() == ConnectionClosed()


@pytest.mark.parametrize("opt", [5, 8, 9, 10, 11, 99, 0xFFFFFFFF])
def test_unsupported_options(opt):
    # STARTTLS, STRUCTURED_REPLY (we use simple replies only), meta contexts, extended headers.
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + option(opt, b"junk"))
    assert conn.next_event() == OptionReply(opt, rep(opt, 0x80000001, b"unsupported option"))
    assert conn.state is State.OPTIONS


def test_list_names_the_one_export():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + option(3))
    assert conn.next_event() == OptionReply(3, rep(3, 2, b"\x00\x00\x00\x04data") + rep(3, 1))


def test_list_with_data_is_invalid():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + option(3, b"x"))
    assert conn.next_event().data == rep(3, 0x80000003, b"NBD_OPT_LIST takes no data")


def test_export_name_with_zeroes():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x01" + option(1, b"data"))
    event = conn.next_event()
    assert event == Ready(1, NAME, SIZE, FLAGS_RW, struct.pack(">Q", SIZE) + b"\x00\x6d" + bytes(124))
    assert len(event.data) == 134


def test_export_name_without_zeroes():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + option(1, b""))
    assert conn.next_event().data == struct.pack(">Q", SIZE) + b"\x00\x6d"


def test_export_name_unknown_hangs_up():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + option(1, b"nope"))
    with pytest.raises(RemoteProtocolError, match="unknown export"):
        conn.next_event()
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="already failed"):
        conn.next_event()


def test_read_only_and_multi_conn_flags():
    conn = new_conn(read_only=True, multi_conn=True)
    conn.receive_data(b"\x00\x00\x00\x03" + option(1, b""))
    assert conn.next_event().data == struct.pack(">QH", SIZE, FLAGS_RO | 0x100)


@pytest.mark.parametrize("flags,padding", [(0, 124), (2, 0)])
def test_plain_newstyle_client_gets_export_name_only(flags, padding):
    """A client without FIXED_NEWSTYLE may only send NBD_OPT_EXPORT_NAME; any other option
    cannot be answered (it would not expect a reply), so the connection ends."""
    conn = new_conn()
    conn.receive_data(struct.pack(">I", flags) + option(1, NAME.encode()))
    ready = conn.next_event()
    assert isinstance(ready, Ready) and ready.data == struct.pack(">QH", SIZE, FLAGS_RW) + bytes(padding)
    conn = new_conn()
    conn.receive_data(struct.pack(">I", flags) + option(7, go_data()))
    with pytest.raises(RemoteProtocolError, match="without fixed newstyle"):
        conn.next_event()


@pytest.mark.parametrize("flags", [4, 0x80000001])
def test_bad_client_flags(flags):
    conn = new_conn()
    conn.receive_data(struct.pack(">I", flags))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_bad_option_magic():
    conn = new_conn()
    conn.receive_data(b"\x00\x00\x00\x03" + b"IHAVEOPX" + bytes(8))
    with pytest.raises(RemoteProtocolError, match="option magic"):
        conn.next_event()


def test_oversized_option_is_refused_before_buffering():
    conn = new_conn()
    too_long = codec.MAX_OPTION_LENGTH + 1
    conn.receive_data(b"\x00\x00\x00\x03" + b"IHAVEOPT" + struct.pack(">II", 7, too_long))
    with pytest.raises(RemoteProtocolError, match="over"):
        conn.next_event()


def test_handshake_three_way():
    data = b"\x00\x00\x00\x03" + option(3) + option(6, go_data()) + option(7, go_data(infos=(3,)))
    reference = new_conn()
    reference.receive_data(data)
    expected = drain(reference)
    assert [type(e) for e in expected] == [OptionReply, OptionReply, Ready]
    three_way(new_conn, data, expected)


# --- transmission ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,offset,length,flags",
    [
        (Command.READ, 4096, 8192, 0),
        (Command.FLUSH, 0, 0, 0),
        (Command.FLUSH, 0, 0, 1),  # FUA on FLUSH: clients do it, the spec says accept it
        (Command.TRIM, 0, 1 * MiB, 0),
        (Command.TRIM, 512, 512, 1),
        (Command.WRITE_ZEROES, SIZE - 4096, 4096, 0),
        (Command.WRITE_ZEROES, 0, SIZE, 3),  # FUA | NO_HOLE; no payload, so no size limit
    ],
)
def test_requests_without_payload(kind, offset, length, flags):
    data = request(kind, 0x1122334455667788, offset, length, flags)
    three_way(transmitting, data, [Request(kind, flags, 0x1122334455667788, offset, length)])


def test_request_properties():
    assert Request(Command.WRITE, 1, 0, 0, 512).fua
    assert not Request(Command.WRITE, 0, 0, 0, 512).fua
    assert Request(Command.WRITE_ZEROES, 0, 0, 0, 512).may_trim
    assert not Request(Command.WRITE_ZEROES, 2, 0, 0, 512).may_trim
    assert Request(Command.READ, 0, 0, 0, 512).reply_size == 512
    assert Request(Command.TRIM, 0, 0, 0, 512).reply_size == 0


@pytest.mark.parametrize("flags", [0, 1])
def test_write_three_way(flags):
    payload = bytes(range(256)) * 8
    data = request(Command.WRITE, 9, 1024, flags=flags, data=payload)
    three_way(transmitting, data, [Request(Command.WRITE, flags, 9, 1024, 2048, payload)])


def test_several_requests_in_one_chunk():
    payload = b"\xab" * 512
    data = (
        request(Command.WRITE, 1, 0, data=payload)
        + request(Command.READ, 2, 0, 512)
        + request(Command.FLUSH, 3)
    )
    three_way(
        transmitting,
        data,
        [
            Request(Command.WRITE, 0, 1, 0, 512, payload),
            Request(Command.READ, 0, 2, 0, 512),
            Request(Command.FLUSH, 0, 3, 0, 0),
        ],
    )


def test_disc_ends_the_session():
    conn = transmitting()
    conn.receive_data(request(Command.DISC, 5) + b"ignored: the client must not send more")
    assert conn.next_event() == Request(Command.DISC, 0, 5, 0, 0)
    assert conn.state is State.DONE
    assert conn.next_event() == ConnectionClosed()


def test_large_write_parses_in_linear_time():
    # 32 MiB in 16 KiB chunks. A buffer that re-copies what it holds on every chunk would move
    # 2048 x 16 MiB = 32 GiB here and take many seconds; a linear one takes a fraction of one.
    chunk = 16 * 1024
    payload = bytes(range(256)) * (32 * MiB // 256)
    stream = request(Command.WRITE, 7, 0, data=payload) + request(Command.FLUSH, 8)
    conn = transmitting()
    started = time.monotonic()
    events = []
    for i in range(0, len(stream), chunk):
        conn.receive_data(memoryview(stream)[i : i + chunk])
        events += drain(conn)
    assert time.monotonic() - started < 2.0
    write, flush = events
    assert isinstance(write.data, memoryview) and write.data.readonly
    assert write.data == payload and write.length == 32 * MiB
    assert flush == Request(Command.FLUSH, 0, 8, 0, 0)


def test_many_small_requests_compact_the_buffer():
    stream = b"".join(request(Command.READ, h, 0, 512) for h in range(10_000))
    conn = transmitting()
    conn.receive_data(stream)
    events = drain(conn)
    assert [e.handle for e in events] == list(range(10_000))


def test_receive_buffer_may_be_reused_by_the_caller():
    buffer = bytearray(request(Command.WRITE, 1, 0, data=b"a" * 512))
    conn = transmitting()
    conn.receive_data(memoryview(buffer)[:100])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(memoryview(buffer)[100:])
    buffer[:] = bytes(len(buffer))  # the caller recycles its recv buffer
    assert conn.next_event().data == b"a" * 512


# --- refused requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,offset,length,flags,error",
    [
        (Command.READ, SIZE - 512, 1024, 0, 22),  # past the end
        (Command.READ, SIZE, 512, 0, 22),
        (Command.TRIM, SIZE, 512, 0, 28),  # write-type commands past the end: ENOSPC
        (Command.WRITE_ZEROES, 2**64 - 512, 512, 0, 28),
        (Command.READ, 100, 512, 0, 22),  # unaligned offset
        (Command.READ, 0, 100, 0, 22),  # unaligned length
        (Command.TRIM, 0, 0, 0, 22),  # zero length
        (Command.READ, 0, 32 * MiB + 512, 0, 22),  # over the maximum block size
        (Command.READ, 0, 512, 2, 22),  # NO_HOLE is for WRITE_ZEROES only
        (Command.READ, 0, 512, 4, 22),  # DF without structured replies
        (Command.WRITE_ZEROES, 0, 512, 16, 22),  # FAST_ZERO was not advertised
        (Command.CACHE, 0, 512, 0, 22),  # not advertised
        (Command.BLOCK_STATUS, 0, 512, 0, 22),
        (99, 0, 0, 0, 22),  # unknown command
    ],
)
def test_invalid_requests_are_refused(kind, offset, length, flags, error):
    event = RequestError(kind, flags, 3, offset, length, error, "")
    conn = transmitting()
    conn.receive_data(request(kind, 3, offset, length, flags))
    got = conn.next_event()
    assert isinstance(got, RequestError) and got.reason
    assert (got.kind, got.flags, got.handle, got.offset, got.length, got.error) == (
        event.kind,
        event.flags,
        event.handle,
        event.offset,
        event.length,
        event.error,
    )
    assert conn.state is State.TRANSMISSION


@pytest.mark.parametrize(
    "offset,length,flags,error",
    [
        (SIZE, 512, 0, 28),  # past the end: ENOSPC
        (3, 512, 0, 22),
        (0, 512, 16, 22),
        (0, 33 * MiB, 0, 22),  # over the maximum: its payload is skipped, never buffered whole
    ],
)
def test_refused_write_payload_is_skipped(offset, length, flags, error):
    payload = b"\x55" * length
    data = request(Command.WRITE, 4, offset, length, flags) + payload + request(Command.FLUSH, 5)
    conn = transmitting()
    events = []
    for i in range(0, len(data), MiB):
        conn.receive_data(data[i : i + MiB])
        events += drain(conn)
    assert [(type(e), e.handle) for e in events] == [(RequestError, 4), (Request, 5)]
    assert events[0].error == error


@pytest.mark.parametrize("length", [512, 33 * MiB])
def test_refused_write_is_answered_only_after_its_payload(length):
    """A client may still be sending the payload of a WRITE we refuse: its reply must not
    overtake it (libnbd drops a connection whose reply arrives while it is still writing)."""
    conn = transmitting()
    conn.receive_data(request(Command.WRITE, 4, SIZE, length))
    payload = b"\x55" * length
    for i in range(0, length - 1, MiB):
        assert conn.next_event() is NEED_DATA
        conn.receive_data(payload[i : min(i + MiB, length - 1)])
    assert conn.next_event() is NEED_DATA  # one byte of the payload still to come
    conn.receive_data(payload[-1:] + request(Command.FLUSH, 5))
    refused, flush = drain(conn)
    assert isinstance(refused, RequestError) and refused.handle == 4
    assert flush == Request(Command.FLUSH, 0, 5, 0, 0)


def test_refused_write_three_way():
    data = request(Command.WRITE, 4, SIZE, 512) + b"\x55" * 512
    reference = transmitting()
    reference.receive_data(data)
    expected = drain(reference)
    assert len(expected) == 1 and expected[0].error == 28
    three_way(transmitting, data, expected)


@pytest.mark.parametrize("kind", [Command.WRITE, Command.TRIM, Command.WRITE_ZEROES])
def test_read_only_refuses_writes_with_eperm(kind):
    conn = transmitting(read_only=True)
    conn.receive_data(request(kind, 6, 0, 512, data=b"w" * 512 if kind == Command.WRITE else b""))
    conn.receive_data(request(Command.READ, 7, 0, 512))
    first, second = drain(conn)
    assert isinstance(first, RequestError) and first.error == 1
    assert second == Request(Command.READ, 0, 7, 0, 512)


def test_bad_request_magic_is_fatal():
    conn = transmitting()
    conn.receive_data(b"\x25\x60\x95\x14" + bytes(24))
    with pytest.raises(RemoteProtocolError, match="request magic"):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_custom_block_sizes():
    conn = transmitting(min_block_size=4096, max_block_size=1 * MiB)
    conn.receive_data(request(Command.READ, 1, 512, 4096) + request(Command.READ, 2, 0, 2 * MiB))
    conn.receive_data(request(Command.READ, 3, 4096, 1 * MiB))
    errors = drain(conn)
    assert [getattr(e, "error", 0) for e in errors] == [22, 22, 0]
    assert conn.preferred_block_size == 4096


# --- end of stream -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,data",
    [
        (new_conn, b""),  # a probe that connects and leaves
        (new_conn, b"\x00\x00\x00\x03"),  # between options
        (transmitting, b""),
        (transmitting, request(Command.READ, 1, 0, 512)),
    ],
)
def test_eof_between_messages_is_clean(make, data):
    conn = make()
    if data:
        conn.receive_data(data)
    conn.receive_data(b"")
    assert drain(conn)[-1] == ConnectionClosed()
    assert conn.state is State.DONE


@pytest.mark.parametrize(
    "make,data",
    [
        (new_conn, b"\x00\x00"),
        (new_conn, b"\x00\x00\x00\x03IHAVE"),
        (transmitting, request(Command.READ, 1, 0, 512)[:20]),
        (transmitting, request(Command.WRITE, 1, 0, data=b"x" * 4096)[:1000]),  # mid-payload
        (transmitting, request(Command.WRITE, 1, SIZE, 512) + b"x"),  # mid-skipped payload
    ],
)
def test_eof_mid_message_is_a_protocol_error(make, data):
    conn = make()
    conn.receive_data(data)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        drain(conn)


def test_data_after_eof_is_a_bug():
    conn = new_conn()
    conn.receive_data(b"")
    with pytest.raises(RuntimeError):
        conn.receive_data(b"x")


# --- replies and errors ------------------------------------------------------------------------


def test_reply_exact_bytes():
    header = codec.encode_reply_header(0x0102030405060708)
    assert header == bytes.fromhex("67446698 00000000 0102030405060708")
    assert codec.encode_reply_header(1, 22) == bytes.fromhex("67446698 00000016 0000000000000001")
    reply = codec.encode_reply(5, 0, b"abc")
    assert reply == bytes.fromhex("67446698 00000000 0000000000000005") + b"abc"
    assert codec.encode_reply(5, 28) == bytes.fromhex("67446698 0000001c 0000000000000005")


def test_reply_misuse_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        codec.encode_reply(1, 5, b"data")
    with pytest.raises(LocalProtocolError):
        codec.encode_reply_header(1, errno.ENOENT)


@pytest.mark.parametrize(
    "err,expected",
    [
        (errno.EPERM, 1),
        (errno.EACCES, 1),
        (errno.EROFS, 1),
        (errno.EIO, 5),
        (errno.ENOMEM, 12),
        (errno.EINVAL, 22),
        (errno.ENOSPC, 28),
        (errno.EDQUOT, 28),
        (errno.EFBIG, 28),
        (errno.EOVERFLOW, 75),
        (errno.EOPNOTSUPP, 95),
        (errno.ESHUTDOWN, 108),
        (errno.ENOENT, 5),
        (None, 5),
    ],
)
def test_errno_mapping(err, expected):
    assert codec.nbd_error(err) == expected
    assert expected in codec.NBD_ERRORS


def test_error_from_exception():
    assert codec.nbd_error_from_exception(OSError(errno.ENOSPC, "full")) == 28
    assert codec.nbd_error_from_exception(OSError("no errno")) == 5
    assert codec.nbd_error_from_exception(MemoryError()) == 12
    assert codec.nbd_error_from_exception(ValueError()) == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 1000},  # not a multiple of the block size
        {"size": -512},
        {"size": 2**63},
        {"min_block_size": 3},
        {"min_block_size": 128 * 1024},
        {"max_block_size": 256},
        {"max_block_size": 1000},
        {"max_block_size": 2**32},
        {"export_name": "x" * 4097},
        {"description": "x" * 4097},
    ],
)
def test_impossible_exports_are_refused(kwargs):
    with pytest.raises(ValueError):
        new_conn(**kwargs)


def test_sentinel_repr():
    assert repr(NEED_DATA) == "NEED_DATA"


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_fuzz_transmission_parses_or_raises_remote_protocol_error(data, chunk):
    """h11's fuzz invariant: any bytes either parse into events or raise RemoteProtocolError,
    whether they arrive whole or in chunks; and both ways give the same events."""
    outcomes = []
    for step in (len(data) or 1, chunk):
        conn = transmitting(size=1 * MiB)
        events: list = []
        try:
            for i in range(0, len(data), step):
                conn.receive_data(data[i : i + step])
                events += normalise(drain(conn))
            conn.receive_data(b"")
            events += normalise(drain(conn))
            outcomes.append(("ok", events))
        except RemoteProtocolError:
            outcomes.append(("error", events))
    for kind, events in outcomes:
        assert all(isinstance(e, (Request, RequestError, ConnectionClosed)) for e in events)
    assert outcomes[0][0] == outcomes[1][0]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_handshake_parses_or_raises_remote_protocol_error(data):
    conn = new_conn()
    try:
        conn.receive_data(data)
        drain(conn)
    except RemoteProtocolError:
        pass


_request_strategy = st.one_of(
    st.tuples(st.just(Command.READ), st.integers(0, 2047), st.integers(1, 16)),
    st.tuples(st.just(Command.WRITE), st.integers(0, 2047), st.integers(1, 16)),
    st.tuples(st.just(Command.TRIM), st.integers(0, 2047), st.integers(1, 16)),
    st.tuples(st.just(Command.FLUSH), st.just(0), st.just(0)),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(_request_strategy, max_size=20), st.lists(st.integers(1, 3000), min_size=1, max_size=30))
def test_valid_streams_parse_identically_however_chunked(reqs, cuts):
    stream = b""
    expected = []
    for handle, (kind, block, count) in enumerate(reqs):
        offset, length = block * 512, count * 512
        if kind == Command.FLUSH:
            offset = length = 0
        if offset + length > SIZE:
            continue
        payload = bytes([handle % 256]) * length if kind == Command.WRITE else b""
        stream += request(kind, handle, offset, length, data=payload)
        expected.append(Request(kind, 0, handle, offset, length, payload))
    conn = transmitting()
    events = []
    position = 0
    for cut in cuts * (len(stream) // sum(cuts) + 1):
        if position >= len(stream):
            break
        conn.receive_data(stream[position : position + cut])
        position += cut
        events += drain(conn)
    assert normalise(events) == expected


# --- the edge's receive interface: payload_wanted / receive_payload / receive_limit -------------


def feed_like_the_edge(conn: ServerConnection, stream: bytes, cuts: list[int]) -> list:
    """Drive conn as server.py does: a payload into its own buffer, at most what the codec
    wants; everything else at most receive_limit() bytes at a time. `cuts` shortens receives
    (a socket may return less than asked)."""
    events, pos, i = [], 0, 0
    while True:
        events += drain(conn)
        if events and isinstance(events[-1], ConnectionClosed):
            return events
        if pos == len(stream):
            conn.receive_data(b"")
            return events + drain(conn)
        cut = cuts[i % len(cuts)] if cuts else 1 << 30
        i += 1
        wanted = conn.payload_wanted()
        if wanted:
            n = min(wanted, cut, len(stream) - pos)
            conn.receive_payload(bytes(stream[pos : pos + n]))
        else:
            n = min(conn.receive_limit(), cut, len(stream) - pos)
            conn.receive_data(stream[pos : pos + n])
        pos += n


def test_payload_received_whole_is_the_request_data_itself():
    conn = transmitting()
    payload = bytes(range(256)) * 1024
    conn.receive_data(request(Command.WRITE, 3, 4096, data=payload)[:28])
    assert conn.next_event() is NEED_DATA
    assert conn.payload_wanted() == len(payload)
    assert conn.receive_limit() == 28 - 0  # nothing buffered: a whole header is still wanted
    data = bytes(payload)
    conn.receive_payload(data)
    event = conn.next_event()
    assert event == Request(Command.WRITE, 0, 3, 4096, len(payload), payload)
    assert event.data is data  # no copy, no zero-filled buffer
    assert conn.payload_wanted() == 0
    assert conn.next_event() is NEED_DATA


def test_payload_in_pieces_and_with_a_buffered_prefix():
    payload = bytes(range(256)) * 16
    stream = request(Command.WRITE, 3, 0, data=payload)
    conn = transmitting()
    conn.receive_data(stream[:28 + 100])  # the edge read past the header: 100 payload bytes
    assert conn.next_event() is NEED_DATA
    assert conn.payload_wanted() == len(payload) - 100
    conn.receive_payload(stream[128:1000])
    assert conn.next_event() is NEED_DATA
    assert conn.payload_wanted() == len(stream) - 1000
    conn.receive_payload(stream[1000:])
    assert normalise(drain(conn)) == [Request(Command.WRITE, 0, 3, 0, len(payload), payload)]


def test_receive_payload_refuses_more_than_wanted():
    conn = transmitting()
    assert conn.payload_wanted() == 0
    with pytest.raises(LocalProtocolError):
        conn.receive_payload(b"x")  # no payload is being collected
    conn.receive_data(request(Command.WRITE, 3, 0, length=512))
    assert conn.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        conn.receive_payload(bytes(513))
    with pytest.raises(LocalProtocolError):
        conn.receive_payload(b"")


def test_eof_in_a_payload_received_by_the_edge():
    conn = transmitting()
    conn.receive_data(request(Command.WRITE, 3, 0, length=1024))
    assert conn.next_event() is NEED_DATA
    conn.receive_payload(bytes(512))
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_receive_limit_by_state():
    conn = new_conn()
    assert conn.receive_limit() == 16 + codec.MAX_OPTION_LENGTH  # handshake: any one option
    conn = transmitting()
    assert conn.receive_limit() == 28
    conn.receive_data(request(Command.READ, 1, 0, 512)[:10])
    assert conn.next_event() is NEED_DATA
    assert conn.receive_limit() == 18  # the rest of this header, never a payload byte
    conn = transmitting()
    conn.receive_data(request(Command.WRITE, 1, SIZE, length=4096))  # refused: past the end
    assert conn.next_event() is NEED_DATA
    assert conn.payload_wanted() == 0
    assert conn.receive_limit() == 4096  # the refused payload, skipped without buffering
    assert conn.receive_limit(65536) == 4096  # read-ahead never widens a skip


def test_receive_limit_read_ahead_between_requests():
    """With read_ahead the edge may take several small requests, payloads included, at once;
    the codec decodes them all from its buffer."""
    conn = transmitting()
    assert conn.receive_limit(65536) == 65536
    conn.receive_data(request(Command.READ, 1, 0, 512)[:10])
    assert conn.next_event() is NEED_DATA
    assert conn.receive_limit(65536) == 65536  # more than the rest of this header: allowed
    assert conn.receive_limit(4) == 18  # never less than the rest of the header
    assert new_conn().receive_limit(65536) == 16 + codec.MAX_OPTION_LENGTH  # not in handshake
    conn = transmitting()
    writes = [(i, bytes([i]) * 4096) for i in range(1, 6)]
    conn.receive_data(b"".join(request(Command.WRITE, h, h * 4096, data=p) for h, p in writes))
    for h, p in writes:
        event = conn.next_event()
        assert (event.kind, event.handle, bytes(event.data)) == (Command.WRITE, h, p)
    assert conn.next_event() is NEED_DATA


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([Command.WRITE, Command.READ, Command.FLUSH, Command.TRIM]),
            st.integers(0, 8),  # length in 512-byte blocks (0: refused, zero-length)
            st.booleans(),  # past the end of the export: refused
        ),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.integers(1, 5000), max_size=5),
)
def test_edge_receive_matches_receive_data(requests, cuts):
    """Model check: the edge's way of receiving gives exactly the events of feeding the whole
    stream through receive_data(), whatever the request mix and however receives are cut."""
    stream = b""
    for handle, (kind, blocks, past_end) in enumerate(requests, start=1):
        length = blocks * 512
        offset = SIZE if past_end else 512 * handle
        data = bytes([handle]) * length if kind == Command.WRITE else b""
        stream += request(kind, handle, offset, length, data=data)
    stream += request(Command.DISC, 99)
    reference = transmitting()
    reference.receive_data(stream)
    expected = normalise(drain(reference))
    assert normalise(feed_like_the_edge(transmitting(), stream, cuts)) == expected
