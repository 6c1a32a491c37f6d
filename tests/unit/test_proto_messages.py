"""Wire messages: bytes pinned against hastd's field names, types and order; strict decoding."""

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hastpy.constants import MAXPHYS, MAXPHYS_V2, PROTO_VERSION, SYNCSRC_PRIMARY, SYNCSRC_SECONDARY
from hastpy.errors import LocalProtocolError, RemoteProtocolError
from hastpy.nv import NvList, NvType
from hastpy.proto.frame import FrameReader, encode_frame
from hastpy.proto.messages import (
    ERRMSG_SPLIT_BRAIN,
    ERROR_FRAME_VERSION,
    HELLO_FRAME_VERSION,
    Cmd,
    ErrorReply,
    Hello,
    HelloReply,
    InHello,
    Reply,
    Request,
    SecondaryInfo,
    decode_handshake,
    decode_hello_reply,
    decode_secondary_info,
    from_wire_errno,
    negotiate_maxio,
    negotiate_version,
    to_wire_errno,
    validate_request,
)

TOKEN = bytes(range(16))
R = (NvType.STRING, "r")
T = (NvType.UINT8_ARRAY, TOKEN)
SEQ1 = (NvType.UINT64, 1)


def _frame(version, nv, payload=None) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(version, nv, payload))


def _r8(n: int) -> int:
    return (n + 7) & ~7


def _elem(typ: int, name: str, data: bytes) -> bytes:
    """One nv element spelled out by hand: type, namesize, dsize, padded name, padded data."""
    raw = name.encode() + b"\0"
    return (
        bytes([typ, len(raw)])
        + len(data).to_bytes(4, "little")
        + raw.ljust(_r8(len(raw)), b"\0")
        + data.ljust(_r8(len(data)), b"\0")
    )


def _le(value: int, size: int, signed=False) -> bytes:
    return value.to_bytes(size, "little", signed=signed)


def _nv(**fields) -> NvList:
    nv = NvList()
    for name, (typ, value) in fields.items():
        nv.add(name, typ, value)
    return nv


# -- handshake: exact bytes ---------------------------------------------------------------------


def test_hello_v3_frame_exact_bytes():
    hello = Hello("data", version=3, maxio=MAXPHYS)
    expected = bytes.fromhex(
        "01 4a000000"
        "11 09 05000000 7265736f7572636500 00000000000000 6461746100000000"  # resource="data"
        "02 08 01000000 76657273696f6e00 03 00000000000000"  # version=3
        "06 06 04000000 6d6178696f000000 00001000 00000000"  # maxio=1 MiB
    )
    assert _frame(HELLO_FRAME_VERSION, hello.to_nv()) == expected


def test_hello_v2_has_no_maxio():
    expected = bytes.fromhex(
        "01 34000000"
        "11 09 05000000 7265736f7572636500 00000000000000 6461746100000000"
        "02 08 01000000 76657273696f6e00 02 00000000000000"
    )
    assert _frame(HELLO_FRAME_VERSION, Hello("data", version=2).to_nv()) == expected


def test_hello_reply_frame_exact_bytes():
    expected = bytes.fromhex(
        "02 34000000"
        "02 08 01000000 76657273696f6e00 02 00000000000000"
        "0a 06 10000000 746f6b656e000000 000102030405060708090a0b0c0d0e0f"
    )
    assert _frame(2, HelloReply(2, TOKEN).to_nv()) == expected


def test_error_reply_bytes():
    text = "Remote node acts as primary for the resource and not as secondary."
    nv = ErrorReply(text, wait=True).to_nv()
    assert nv.encode() == _elem(17, "errmsg", text.encode() + b"\0") + _elem(2, "wait", b"\x01")
    refusal = ErrorReply("Token doesn't match.").to_nv().encode()
    assert refusal == _elem(17, "errmsg", b"Token doesn't match.\0")


def test_in_hello_bytes():
    msg = InHello("data", TOKEN, virgin=True, resuid=0x1122334455667788, localcnt=3, remotecnt=2)
    assert msg.to_nv().encode() == (
        _elem(17, "resource", b"data\0")
        + _elem(10, "token", TOKEN)
        + _elem(1, "virgin", b"\x01")
        + _elem(8, "resuid", _le(0x1122334455667788, 8))
        + _elem(8, "localcnt", _le(3, 8))
        + _elem(8, "remotecnt", _le(2, 8))
    )
    without = InHello("data", TOKEN, virgin=False, resuid=1, localcnt=0, remotecnt=0)
    assert not without.to_nv().exists("virgin")


def test_secondary_info_bytes_v2_and_v3():
    info = SecondaryInfo(
        datasize=10 * 2**30, extentsize=2 * 2**20, localcnt=4, remotecnt=5,
        virgin=False, syncsrc=SYNCSRC_SECONDARY, mapsize=4096,
    )  # fmt: skip
    v2 = (
        _elem(7, "datasize", _le(10 * 2**30, 8))
        + _elem(5, "extentsize", _le(2 * 2**20, 4))
        + _elem(8, "localcnt", _le(4, 8))
        + _elem(8, "remotecnt", _le(5, 8))
        + _elem(2, "syncsrc", b"\x02")
        + _elem(6, "mapsize", _le(4096, 4))
    )
    assert info.to_nv(2).encode() == v2
    v3 = SecondaryInfo(**{**_fields(info), "maxio": MAXPHYS})
    assert v3.to_nv(3).encode() == v2 + _elem(6, "maxio", _le(MAXPHYS, 4))


def test_replica_ids_are_extra_fields_only_when_known():
    """hastpy's copy IDs follow hastd's fields, and a message without them is hastd's."""
    bare = InHello("data", TOKEN, virgin=False, resuid=5, localcnt=1, remotecnt=1)
    ids = InHello("data", TOKEN, virgin=False, resuid=5, localcnt=1, remotecnt=1, replicaid=0xA1, peerid=0xB2)
    assert ids.to_nv().encode() == bare.to_nv().encode() + _elem(8, "replicaid", _le(0xA1, 8)) + _elem(8, "peerid", _le(0xB2, 8))
    assert InHello.from_nv(ids.to_nv()) == ids
    assert InHello.from_nv(bare.to_nv()) == bare and (bare.replicaid, bare.peerid, bare.inconsistent) == (0, 0, False)
    marked = InHello("data", TOKEN, virgin=False, resuid=5, localcnt=1, remotecnt=1, inconsistent=True)
    assert marked.to_nv().encode() == bare.to_nv().encode() + _elem(2, "inconsistent", b"\x01")
    assert InHello.from_nv(marked.to_nv()) == marked
    info = SecondaryInfo(1 << 30, 1 << 21, 1, 2, False, SYNCSRC_PRIMARY, 64, maxio=MAXPHYS, replicaid=0xC3)
    assert info.to_nv(3).encode() == SecondaryInfo(**{**_fields(info), "replicaid": 0}).to_nv(3).encode() + _elem(
        8, "replicaid", _le(0xC3, 8))  # fmt: skip
    assert SecondaryInfo.from_nv(info.to_nv(3)) == info
    bad = InHello("data", TOKEN, False, 5, 1, 1, replicaid=0xA1).to_nv().add_string("peerid", "x")
    with pytest.raises(RemoteProtocolError, match="peerid"):
        InHello.from_nv(bad)


def test_secondary_info_virgin_sits_before_syncsrc():
    info = SecondaryInfo(1 << 20, 1 << 21, 0, 0, virgin=True, syncsrc=SYNCSRC_PRIMARY, mapsize=0)
    names = [f.name for f in info.to_nv(2)]
    assert names == [
        "datasize", "extentsize", "localcnt", "remotecnt", "virgin", "syncsrc", "mapsize"
    ]  # fmt: skip


def _fields(obj) -> dict:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


# -- handshake: round trips and decoding --------------------------------------------------------


def test_handshake_round_trips():
    for msg in (
        Hello("r0"),
        Hello("r0", version=2),
        HelloReply(3, TOKEN),
        ErrorReply(ERRMSG_SPLIT_BRAIN),
        ErrorReply("x", wait=True),
        InHello("r0", TOKEN, True, 7, 1, 2),
    ):
        assert type(msg).from_nv(msg.to_nv()) == msg
    info = SecondaryInfo(1 << 30, 1 << 21, 1, 2, False, SYNCSRC_PRIMARY, 64, maxio=MAXPHYS)
    assert SecondaryInfo.from_nv(info.to_nv(3)) == info


def test_dispatchers():
    assert decode_handshake(Hello("r").to_nv()) == Hello("r")
    in_hello = InHello("r", TOKEN, False, 9, 0, 0)
    assert decode_handshake(in_hello.to_nv()) == in_hello
    assert decode_hello_reply(HelloReply(2, TOKEN).to_nv()) == HelloReply(2, TOKEN)
    assert decode_hello_reply(ErrorReply("no", True).to_nv()) == ErrorReply("no", True)
    info = SecondaryInfo(512, 512, 0, 0, False, SYNCSRC_PRIMARY, 0)
    assert decode_secondary_info(info.to_nv(2)) == info
    refusal = decode_secondary_info(ErrorReply(ERRMSG_SPLIT_BRAIN).to_nv())
    assert isinstance(refusal, ErrorReply) and refusal.split_brain


def test_hello_from_hastd_without_version_is_version_1():
    hello = Hello.from_nv(_nv(resource=(NvType.STRING, "r")))
    assert hello.version == 1 and hello.maxio is None


def test_hello_ignores_maxio_below_v3():
    nv = _nv(resource=(NvType.STRING, "r"), version=(NvType.UINT8, 2), maxio=(NvType.UINT32, 5))
    assert Hello.from_nv(nv) == Hello("r", 2)


def test_hello_reply_without_version_is_version_1():
    assert HelloReply.from_nv(_nv(token=(NvType.UINT8_ARRAY, TOKEN))).version == 1


@pytest.mark.parametrize(
    "nv,match",
    [
        (_nv(version=(NvType.UINT8, 2)), "missing field 'resource'"),
        (_nv(resource=(NvType.UINT8, 2)), "resource"),
        (_nv(resource=(NvType.STRING, "")), "empty"),
        (_nv(resource=(NvType.STRING, "r"), token=(NvType.UINT8_ARRAY, TOKEN)), "token"),
        (_nv(resource=(NvType.STRING, "r"), version=(NvType.UINT16, 2)), "version"),
        (_nv(resource=R, version=(NvType.UINT8, 3), maxio=(NvType.UINT32, 4096)), "maxio"),
        (_nv(resource=R, version=(NvType.UINT8, 3), maxio=(NvType.UINT64, 1 << 20)), "maxio"),
    ],
)
def test_hello_rejects(nv, match):
    with pytest.raises(RemoteProtocolError, match=match):
        Hello.from_nv(nv)


@pytest.mark.parametrize(
    "nv,match",
    [
        (_nv(version=(NvType.UINT8, 2)), "token"),
        (_nv(version=(NvType.UINT8, 2), token=(NvType.UINT8_ARRAY, TOKEN[:15])), "15 bytes"),
        (_nv(version=(NvType.UINT8, PROTO_VERSION + 1), token=T), "above"),
    ],
)
def test_hello_reply_rejects(nv, match):
    with pytest.raises(RemoteProtocolError, match=match):
        HelloReply.from_nv(nv)


def test_error_reply_needs_errmsg():
    with pytest.raises(RemoteProtocolError, match="errmsg"):
        ErrorReply.from_nv(_nv(wait=(NvType.UINT8, 1)))


def _in_hello_nv(**override) -> NvList:
    fields = {
        "resource": (NvType.STRING, "r"),
        "token": (NvType.UINT8_ARRAY, TOKEN),
        "resuid": (NvType.UINT64, 5),
        "localcnt": (NvType.UINT64, 1),
        "remotecnt": (NvType.UINT64, 1),
    }
    fields.update(override)
    return _nv(**{k: v for k, v in fields.items() if v is not None})


@pytest.mark.parametrize(
    "override,match",
    [
        ({"resource": None}, "resource"),
        ({"token": (NvType.UINT8_ARRAY, b"\x01" * 17)}, "17 bytes"),
        ({"resuid": None}, "resuid"),
        ({"resuid": (NvType.UINT64, 0)}, "resuid is 0"),
        ({"localcnt": (NvType.INT64, 1)}, "localcnt"),
        ({"remotecnt": None}, "remotecnt"),
    ],
)
def test_in_hello_rejects(override, match):
    with pytest.raises(RemoteProtocolError, match=match):
        InHello.from_nv(_in_hello_nv(**override))


def _info_nv(**override) -> NvList:
    fields = {
        "datasize": (NvType.INT64, 1 << 30),
        "extentsize": (NvType.INT32, 1 << 21),
        "localcnt": (NvType.UINT64, 0),
        "remotecnt": (NvType.UINT64, 0),
        "virgin": None,
        "syncsrc": (NvType.UINT8, SYNCSRC_PRIMARY),
        "mapsize": (NvType.UINT32, 0),
    }
    fields.update(override)
    return _nv(**{k: v for k, v in fields.items() if v is not None})


def test_secondary_info_maxio_optional():
    assert SecondaryInfo.from_nv(_info_nv()).maxio is None
    assert SecondaryInfo.from_nv(_info_nv(maxio=(NvType.UINT32, MAXPHYS))).maxio == MAXPHYS


@pytest.mark.parametrize(
    "override,match",
    [
        ({"datasize": None}, "datasize"),
        ({"datasize": (NvType.INT64, 0)}, "datasize"),
        ({"extentsize": (NvType.INT32, -1)}, "extentsize"),
        ({"syncsrc": None}, "syncsrc"),
        ({"syncsrc": (NvType.UINT8, 0)}, "invalid syncsrc"),
        ({"virgin": (NvType.INT8, 1), "syncsrc": (NvType.UINT8, SYNCSRC_SECONDARY)}, "virgin"),
        ({"mapsize": None}, "mapsize"),
        ({"maxio": (NvType.UINT32, 1)}, "maxio"),
    ],
)
def test_secondary_info_rejects(override, match):
    with pytest.raises(RemoteProtocolError, match=match):
        SecondaryInfo.from_nv(_info_nv(**override))


def test_local_handshake_errors():
    with pytest.raises(LocalProtocolError, match="maxio needs protocol 3"):
        Hello("r", version=2, maxio=MAXPHYS).to_nv()
    with pytest.raises(LocalProtocolError, match="below"):
        Hello("r", maxio=4096).to_nv()
    with pytest.raises(LocalProtocolError, match="empty"):
        Hello("").to_nv()
    with pytest.raises(LocalProtocolError, match="uint8"):
        Hello("r", version=300).to_nv()
    with pytest.raises(LocalProtocolError, match="token"):
        HelloReply(2, b"short").to_nv()
    with pytest.raises(LocalProtocolError, match="resuid 0"):
        InHello("r", TOKEN, True, 0, 0, 0).to_nv()
    info = SecondaryInfo(512, 512, 0, 0, False, SYNCSRC_PRIMARY, 0, maxio=MAXPHYS)
    with pytest.raises(LocalProtocolError, match="maxio needs protocol 3"):
        info.to_nv(2)
    with pytest.raises(LocalProtocolError, match="syncsrc"):
        SecondaryInfo(512, 512, 0, 0, False, 0, 0).to_nv(2)


def test_negotiation():
    assert negotiate_version(0) == 1
    assert negotiate_version(2) == 2
    assert negotiate_version(9) == PROTO_VERSION
    assert negotiate_version(3, ours=2) == 2
    assert negotiate_maxio(2, MAXPHYS, MAXPHYS) == MAXPHYS_V2
    assert negotiate_maxio(3, MAXPHYS, None) == MAXPHYS_V2
    assert negotiate_maxio(3, None, MAXPHYS) == MAXPHYS_V2
    assert negotiate_maxio(3, MAXPHYS, 256 * 1024) == 256 * 1024
    assert negotiate_maxio(3, MAXPHYS, 4 * MAXPHYS) == MAXPHYS


# -- I/O: exact bytes ---------------------------------------------------------------------------


def test_keepalive_request_bytes():
    assert _frame(2, Request.keepalive().to_nv()) == bytes.fromhex(
        "02 16000000 02 04 01000000 636d6400 00000000 05 00000000000000"
    )


def test_syncdone_keepalive_bytes():
    # v4: hastd's keepalive element, then syncdone:uint8=1 (type 2, namesize 9, value size 1,
    # the name, padding to the 8-byte boundary, the value, padding).
    assert _frame(4, Request.keepalive(syncdone=True).to_nv()) == bytes.fromhex(
        "04 34000000"
        "02 04 01000000 636d6400 00000000 05 00000000000000"
        "02 09 01000000 73796e63646f6e6500 00000000000000 01 00000000000000"
    )


def test_write_request_frame_with_payload():
    payload = b"\xa5" * 512
    req = Request(Cmd.WRITE, seq=1, offset=4096, length=512, memsync=True)
    expected = bytes.fromhex(
        "02 84000000"
        "02 04 01000000 636d6400 00000000 02 00000000000000"  # cmd=2
        "08 04 08000000 73657100 00000000 0100000000000000"  # seq=1
        "08 07 08000000 6f666673657400 00 0010000000000000"  # offset=4096
        "08 07 08000000 6c656e67746800 00 0002000000000000"  # length=512
        "02 08 01000000 6d656d73796e6300 01 00000000000000"  # memsync=1
        "06 05 04000000 73697a6500 000000 00020000 00000000"  # size=512
    )
    buffers = encode_frame(2, req.to_nv(), payload)
    assert buffers[0] == expected and buffers[1] is payload


def test_flush_request_carries_zero_offset_and_length():
    assert Request(Cmd.FLUSH, seq=3).to_nv().encode() == (
        _elem(2, "cmd", b"\x04")
        + _elem(8, "seq", _le(3, 8))
        + _elem(8, "offset", _le(0, 8))
        + _elem(8, "length", _le(0, 8))
    )


def test_read_reply_frame_with_payload():
    expected = bytes.fromhex(
        "02 2c000000"
        "08 04 08000000 73657100 00000000 0500000000000000"  # seq=5
        "06 05 04000000 73697a6500 000000 00020000 00000000"  # size=512
    )
    assert encode_frame(2, Reply(5).to_nv(), b"\x11" * 512)[0] == expected


def test_error_reply_carries_freebsd_errno():
    nv = Reply(5, error=errno.EOPNOTSUPP).to_nv()
    error_elem = bytes.fromhex("03 06 02000000 6572726f72000000 2d00 000000000000")  # 45
    assert nv.encode() == _elem(8, "seq", _le(5, 8)) + error_elem
    assert Reply.from_nv(nv).error == errno.EOPNOTSUPP


def test_memsync_ack_bytes():
    ack = Reply(9, received=True).to_nv().encode()
    assert ack == _elem(8, "seq", _le(9, 8)) + _elem(1, "received", b"\x01")


# -- I/O: decoding ------------------------------------------------------------------------------


@given(
    st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.DELETE]),
    st.integers(1, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.booleans(),
)
def test_request_round_trip(cmd, seq, offset, length, memsync):
    req = Request(cmd, seq, offset, length, memsync and cmd == Cmd.WRITE)
    assert Request.from_nv(req.to_nv()) == req


def test_keepalive_and_flush_round_trip():
    assert Request.from_nv(Request.keepalive().to_nv()) == Request(Cmd.KEEPALIVE)
    assert Request.from_nv(Request.keepalive(syncdone=True).to_nv()) == Request(Cmd.KEEPALIVE, syncdone=True)
    assert Request.from_nv(Request(Cmd.FLUSH, 8).to_nv()) == Request(Cmd.FLUSH, 8)


@given(
    st.integers(1, 2**64 - 1),
    st.sampled_from([0, errno.EIO, errno.ENOSPC, errno.ETIMEDOUT]),
    st.booleans(),
)
def test_reply_round_trip(seq, error, received):
    reply = Reply(seq, 0 if received else error, received)
    assert Reply.from_nv(reply.to_nv()) == reply


def test_flush_without_offset_and_length_decodes():
    req = Request.from_nv(_nv(cmd=(NvType.UINT8, 4), seq=(NvType.UINT64, 2)))
    assert req == Request(Cmd.FLUSH, 2)


def test_unknown_cmd_decodes_for_an_einval_reply():
    req = Request.from_nv(_nv(cmd=(NvType.UINT8, 9), seq=(NvType.UINT64, 2)))
    assert req.cmd == 9 and validate_request(req, 1 << 20, 512, MAXPHYS) == errno.EINVAL


def test_memsync_read_only_on_write():
    nv = _nv(
        cmd=(NvType.UINT8, 1),
        seq=(NvType.UINT64, 2),
        offset=(NvType.UINT64, 0),
        length=(NvType.UINT64, 512),
        memsync=(NvType.UINT8, 1),
    )
    assert Request.from_nv(nv).memsync is False


@pytest.mark.parametrize(
    "fields,match",
    [
        ({}, "cmd"),
        ({"cmd": (NvType.UINT16, 1)}, "cmd"),
        ({"cmd": (NvType.UINT8, 1)}, "seq"),
        ({"cmd": (NvType.UINT8, 1), "seq": (NvType.UINT64, 1)}, "offset"),
        ({"cmd": (NvType.UINT8, 3), "seq": SEQ1, "offset": (NvType.UINT64, 0)}, "length"),
        ({"cmd": (NvType.UINT8, 4), "seq": SEQ1, "offset": (NvType.UINT32, 0)}, "offset"),
    ],
)
def test_request_rejects(fields, match):
    with pytest.raises(RemoteProtocolError, match=match):
        Request.from_nv(_nv(**fields))


@pytest.mark.parametrize(
    "req,match",
    [
        (Request(9, 1), "unknown command"),
        (Request(Cmd.READ, 1, 0, 512, memsync=True), "memsync"),
        (Request(Cmd.WRITE, 1, 0, 512, syncdone=True), "syncdone"),
        (Request(Cmd.KEEPALIVE, seq=1), "KEEPALIVE"),
        (Request(Cmd.WRITE, 0, 0, 512), "seq 0"),
        (Request(Cmd.FLUSH, 1, 0, 512), "FLUSH"),
        (Request(Cmd.READ, 1, -1, 512), "uint64"),
    ],
)
def test_request_local_errors(req, match):
    with pytest.raises(LocalProtocolError, match=match):
        req.to_nv()


@pytest.mark.parametrize(
    "nv,match",
    [
        (_nv(error=(NvType.INT16, 5)), "seq"),
        (_nv(seq=(NvType.UINT64, 0)), "seq is 0"),
        (_nv(seq=(NvType.UINT64, 1), error=(NvType.INT32, 5)), "error"),
    ],
)
def test_reply_rejects(nv, match):
    with pytest.raises(RemoteProtocolError, match=match):
        Reply.from_nv(nv)


def test_reply_local_errors():
    with pytest.raises(LocalProtocolError, match="seq 0"):
        Reply(0).to_nv()
    with pytest.raises(LocalProtocolError, match="memsync ack"):
        Reply(1, errno.EIO, received=True).to_nv()


def test_reply_received_is_existence_like_hastd():
    nv = _nv(seq=(NvType.UINT64, 1), received=(NvType.UINT8, 0))
    assert Reply.from_nv(nv).received is True


# -- validate_request ---------------------------------------------------------------------------

DATASIZE = 1 << 30


@pytest.mark.parametrize(
    "req,expected",
    [
        (Request(Cmd.KEEPALIVE), 0),
        (Request(0, 1, 0, 512), errno.EINVAL),
        (Request(6, 1, 0, 512), errno.EINVAL),
        (Request(Cmd.READ, 0, 0, 512), errno.EINVAL),
        (Request(Cmd.FLUSH, 1), 0),
        (Request(Cmd.FLUSH, 0), errno.EINVAL),
        (Request(Cmd.READ, 1, 0, 0), errno.EINVAL),
        (Request(Cmd.READ, 1, 0, 512), 0),
        (Request(Cmd.WRITE, 1, 0, MAXPHYS_V2), 0),
        (Request(Cmd.WRITE, 1, 0, MAXPHYS_V2 + 512), errno.EINVAL),
        (Request(Cmd.DELETE, 1, 0, DATASIZE), 0),  # DELETE has no size limit
        (Request(Cmd.READ, 1, 100, 512), errno.EINVAL),
        (Request(Cmd.READ, 1, 512, 100), errno.EINVAL),
        (Request(Cmd.WRITE, 1, DATASIZE - 512, 512), 0),
        (Request(Cmd.WRITE, 1, DATASIZE, 512), errno.EINVAL),
        (Request(Cmd.DELETE, 1, 512, DATASIZE), errno.EINVAL),
    ],
)
def test_validate_request(req, expected):
    assert validate_request(req, DATASIZE, 512, MAXPHYS_V2) == expected


# -- errno --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "linux,bsd",
    [
        (0, 0),
        (errno.EIO, 5),
        (errno.ENOMEM, 12),
        (errno.EINVAL, 22),
        (errno.ENOSPC, 28),
        (errno.EOPNOTSUPP, 45),
        (errno.ENOTCONN, 57),
        (errno.ETIMEDOUT, 60),
        (errno.ECONNRESET, 54),
        (errno.EAGAIN, 35),
        (errno.EDEADLK, 11),
        (errno.ENOSYS, 78),
        (errno.ENODATA, 87),
    ],
)
def test_errno_translation(linux, bsd):
    assert to_wire_errno(linux) == bsd
    assert from_wire_errno(bsd) == linux


def test_errno_without_equivalent_is_eio():
    assert to_wire_errno(errno.EREMOTEIO) == 5
    assert from_wire_errno(67) == errno.EIO  # EPROCLIM
    assert from_wire_errno(-3) == errno.EIO


def test_frame_versions():
    assert HELLO_FRAME_VERSION == 1 and ERROR_FRAME_VERSION == 2


def test_full_handshake_through_frames():
    """Primary and secondary exchange every handshake message through encode_frame/FrameReader."""
    secondary_in = FrameReader(max_version=PROTO_VERSION)
    secondary_in.feed(_frame(HELLO_FRAME_VERSION, Hello("data", maxio=MAXPHYS).to_nv()))
    hello = decode_handshake(secondary_in.next_frame().nv)
    version = negotiate_version(hello.version)
    primary_out = FrameReader(max_version=PROTO_VERSION)
    primary_out.feed(_frame(version, HelloReply(version, TOKEN).to_nv()))
    reply = decode_hello_reply(primary_out.next_frame().nv)
    assert reply == HelloReply(PROTO_VERSION, TOKEN)
    info = SecondaryInfo(DATASIZE, 1 << 21, 0, 0, True, SYNCSRC_PRIMARY, 0, maxio=256 * 1024)
    primary_out.feed(_frame(version, info.to_nv(version)))
    got = decode_secondary_info(primary_out.next_frame().nv)
    assert negotiate_maxio(version, hello.maxio, got.maxio) == 256 * 1024


# -- hypothesis: hostile nv lists ---------------------------------------------------------------

_NAMES = [
    "resource", "version", "maxio", "token", "errmsg", "wait", "virgin", "resuid", "localcnt",
    "remotecnt", "datasize", "extentsize", "syncsrc", "mapsize", "cmd", "seq", "offset",
    "length", "memsync", "received", "error", "syncdone",
]  # fmt: skip
_VALUES = {
    NvType.INT8: st.integers(-(2**7), 2**7 - 1),
    NvType.UINT8: st.integers(0, 2**8 - 1),
    NvType.INT16: st.integers(-(2**15), 2**15 - 1),
    NvType.INT32: st.integers(-(2**31), 2**31 - 1),
    NvType.UINT32: st.integers(0, 2**32 - 1),
    NvType.INT64: st.integers(-(2**63), 2**63 - 1),
    NvType.UINT64: st.integers(0, 2**64 - 1),
    NvType.STRING: st.text(st.characters(blacklist_characters="\0"), max_size=8),
    NvType.UINT8_ARRAY: st.binary(min_size=1, max_size=20),
}
_DECODERS = [
    decode_handshake,
    decode_hello_reply,
    decode_secondary_info,
    Hello.from_nv,
    HelloReply.from_nv,
    ErrorReply.from_nv,
    InHello.from_nv,
    SecondaryInfo.from_nv,
    Request.from_nv,
    Reply.from_nv,
]


@st.composite
def _hostile_nv(draw) -> NvList:
    nv = NvList()
    for name in draw(st.lists(st.sampled_from(_NAMES), max_size=10)):
        typ = draw(st.sampled_from(sorted(_VALUES)))
        nv.add(name, typ, draw(_VALUES[typ]))
    return nv


@given(_hostile_nv())
def test_hostile_nv_gives_messages_or_remote_protocol_error(nv):
    for decode in _DECODERS:
        try:
            decode(nv)
        except RemoteProtocolError:
            pass


# --- precomputed encoders: byte-equal to to_nv() + encode_frame, and decoded the same way -----

from hypothesis import settings  # noqa: E402

from hastpy.proto import messages as _m  # noqa: E402
from hastpy.proto.pipeline import decode_payload  # noqa: E402
from hastpy.proto.frame import encode_frame_nv  # noqa: E402

_u64 = st.integers(1, 2**64 - 1)


def _frame_bytes(bufs) -> bytes:
    return b"".join(bytes(b) for b in bufs)


@settings(max_examples=300)
@given(
    st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.DELETE, Cmd.FLUSH]),
    _u64,
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
    st.booleans(),
)
def test_fast_request_encoding_is_generic(cmd, seq, offset, length, payload_size, version, memsync):
    if cmd == Cmd.FLUSH:
        offset = length = 0
    memsync = memsync and cmd == Cmd.WRITE and payload_size > 0  # hastd's default mode's writes
    req = Request(cmd, seq, offset, length, memsync=memsync)
    body = _m.encode_request_nv(req, payload_size)
    nv = req.to_nv()
    if payload_size:
        nv.add_uint32("size", payload_size)
    assert body == nv.encode()
    # And the frame around it, against encode_frame with a real payload.
    payload = b"\xa5" * min(payload_size, 3)
    if len(payload):
        assert _frame_bytes(encode_frame_nv(version, _m.encode_request_nv(req, len(payload)), payload)) == \
            _frame_bytes(encode_frame(version, req.to_nv(), payload))  # fmt: skip
    else:
        assert _frame_bytes(encode_frame_nv(version, _m.encode_request_nv(req, 0))) == \
            _frame_bytes(encode_frame(version, req.to_nv()))  # fmt: skip
    # Decoded by the layouts a secondary's FrameStream tries, it is the same request.
    decoded = next(d for d in (lay.decode(body) for lay in _m.REQUEST_LAYOUTS) if d is not None)
    assert decoded == NvList.decode(body)
    assert Request.from_nv(decoded) == req


@given(_u64, st.integers(0, 2**32 - 1), st.booleans())
def test_fast_reply_encoding_is_generic(seq, payload_size, received):
    if received:
        payload_size = 0  # a memsync "received" ack carries nothing
    rep = Reply(seq, received=received)
    body = _m.encode_reply_nv(rep, payload_size)
    nv = rep.to_nv()
    if payload_size:
        nv.add_uint32("size", payload_size)
    assert body == nv.encode()
    decoded = next(d for d in (lay.decode(body) for lay in _m.REPLY_LAYOUTS) if d is not None)
    assert decoded == NvList.decode(body)
    assert Reply.from_nv(decoded) == rep


def test_fast_encoders_leave_the_rest_to_the_generic_path():
    assert _m.encode_request_nv(Request.keepalive(), 0) is None
    assert _m.encode_request_nv(Request.keepalive(syncdone=True), 0) is None
    assert _m.encode_request_nv(Request(Cmd.WRITE, 5, 0, 0, memsync=True), 0) is None
    assert _m.encode_reply_nv(Reply(5, error=errno.EIO), 0) is None
    assert _m.encode_reply_nv(Reply(5, received=True), 8) is None
    with pytest.raises(LocalProtocolError):
        _m.encode_reply_nv(Reply(0), 0)
    with pytest.raises(LocalProtocolError):
        _m.encode_request_nv(Request(Cmd.WRITE, 0, 0, 512), 512)  # seq 0: to_nv's checks apply
    with pytest.raises(LocalProtocolError):
        encode_frame_nv(2, bytes(64 * 1024 + 8))


_INT_RANGES = {NvType.UINT8: (0, 255), NvType.INT8: (-128, 127), NvType.UINT32: (0, 2**32 - 1), NvType.UINT64: (0, 2**64 - 1)}


@st.composite
def _layout_body(draw, layouts):
    """Any values at all in one of the fixed layouts (any cmd, seq 0, a received flag of 0)."""
    layout = draw(st.sampled_from(layouts))
    values = []
    for _, typ in layout.fields:
        lo, hi = _INT_RANGES[typ]
        special = [v for v in (0, 1, *map(int, Cmd)) if lo <= v <= hi]  # commands, seq 0, flags
        values.append(draw(st.one_of(st.sampled_from(special), st.integers(lo, hi))))
    return layout.encode(*values)


def _outcome(decode, nv):
    try:
        return decode(nv)
    except RemoteProtocolError as exc:
        return ("refused", str(exc))


@settings(max_examples=500)
@given(_layout_body(_m.REQUEST_LAYOUTS + _m.REPLY_LAYOUTS), st.binary(max_size=8))
def test_decoders_read_a_layout_decoded_header_as_the_generic_decoder_does(body, payload):
    """Request.from_nv, Reply.from_nv and decode_payload read a header a layout decoded all at
    once; whatever its values, the outcome is the generic decoder's (result or refusal)."""
    fast = next(d for d in (lay.decode(body) for lay in _m.REQUEST_LAYOUTS + _m.REPLY_LAYOUTS) if d is not None)
    assert fast.layout_values() is not None
    generic = NvList.decode(body)
    assert generic.layout_values() is None
    for decode in (Request.from_nv, Reply.from_nv, lambda nv: bytes(decode_payload(payload, nv))):
        assert _outcome(decode, fast) == _outcome(decode, generic)


def test_a_changed_layout_decoded_header_is_read_field_by_field():
    body = _m.REPLY_LAYOUT.encode(7)
    nv = _m.REPLY_LAYOUT.decode(body)
    nv.add_int16("error", 5)  # FreeBSD's EIO
    assert nv.layout_values() is None
    assert Reply.from_nv(nv) == Reply(7, error=errno.EIO)
