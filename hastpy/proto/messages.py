"""HAST wire messages: the handshake (hastd.c listen_accept, primary.c/secondary.c init_remote) and
I/O requests and replies (primary.c remote_send/recv, secondary.c requnpack/send_thread).

Protocol version history (the `version` field of the first hello, and the frame header version):

    0  initial hastd
    1  hastd: HIO_KEEPALIVE added
    2  hastd: "memsync" request flag and "received" reply flag (memsync replication).
       HAST_PROTO_VERSION of every FreeBSD hastd since 9.1.
    3  hastpy: a `maxio:uint32` field in Hello (the largest I/O the primary wants) and in
       SecondaryInfo (the largest the secondary accepts). The I/O size is the smaller of the
       two; with a v2 peer it is MAXPHYS_V2 (128 KiB), which every hastd accepts.
    4  hastpy: a `syncdone:uint8=1` field in KEEPALIVE, sent by the primary when a
       synchronization has completed; the secondary then clears the `inconsistent` mark it put
       in its metadata when the handshake made it the target of that sync (metadata.py). Below
       4 the mark is never set, since nothing would ever clear it.

Negotiation: the primary offers PROTO_VERSION in Hello (hastd clamps anything above 2 to 2, and
ignores fields it does not know); the secondary answers min(offer, its own) and both frame every
later message with that version. The first hello is framed with version 1, as hastd does, and
hastd frames handshake errors with 2. Never send a v3 field or frame to a peer that negotiated 2:
Hello and SecondaryInfo enforce that for maxio.

Every message is a frozen dataclass with to_nv() and from_nv(nv). from_nv raises
RemoteProtocolError for anything missing, of the wrong type or out of range; to_nv raises
LocalProtocolError for values the protocol cannot carry. Field names, types and order are hastd's.
"""

from __future__ import annotations

import enum
import errno as _errno
from dataclasses import dataclass

from hastpy.constants import (
    HAST_PROTO_VERSION,
    MAXPHYS_V2,
    PROTO_VERSION,
    SYNCSRC_PRIMARY,
    SYNCSRC_SECONDARY,
    TOKEN_SIZE,
)
from hastpy.errors import LocalProtocolError, NvError, RemoteProtocolError
from hastpy.nv import NvLayout, NvList, NvType

PROTO_VERSION_MEMSYNC = 2  # first version with "memsync"/"received"
PROTO_VERSION_MAXIO = 3  # first version with "maxio"
PROTO_VERSION_SYNCDONE = 4  # first version with "syncdone"

# hastd's resources start at hr_version = 1 (parse.y), so the very first hello is framed with 1.
HELLO_FRAME_VERSION = 1
# hastd frames handshake errors with HAST_PROTO_VERSION whatever the peer offered (res == NULL).
ERROR_FRAME_VERSION = HAST_PROTO_VERSION

# Error messages a hastd secondary's parent sends (listen_accept); the primary logs them and the
# exact split-brain string makes it emit the split-brain event (primary.c init_remote).
ERRMSG_NOT_CONFIGURED = "Resource not configured."
ERRMSG_NO_ACCESS = "No access to the resource."
ERRMSG_WRONG_ROLE = "Remote node acts as {role} for the resource and not as secondary."
ERRMSG_TOKEN_MISMATCH = "Token doesn't match."
ERRMSG_SPLIT_BRAIN = "Split-brain condition!"

_SYNCSRCS = (SYNCSRC_PRIMARY, SYNCSRC_SECONDARY)


class Cmd(enum.IntEnum):
    """I/O commands (hast.h HIO_*). 0 is HIO_UNDEF, which a secondary answers with EINVAL."""

    READ = 1
    WRITE = 2
    DELETE = 3
    FLUSH = 4
    KEEPALIVE = 5


_CMDS = frozenset(int(c) for c in Cmd)
_RANGED = (Cmd.READ, Cmd.WRITE, Cmd.DELETE)  # commands that carry offset and length


# -- helpers ------------------------------------------------------------------------------------


def _field(nv: NvList, name: str, typ: NvType, what: str) -> object:
    """A required field; absence or a wrong type is the peer's fault."""
    try:
        value = nv.get(name, typ)
    except NvError as exc:
        raise RemoteProtocolError(f"{what}: {exc}") from exc
    if value is None:
        raise RemoteProtocolError(f"{what}: missing field {name!r}")
    return value


def _optional(nv: NvList, name: str, typ: NvType, what: str, default: object = None) -> object:
    try:
        return nv.get(name, typ, default)
    except NvError as exc:
        raise RemoteProtocolError(f"{what}: {exc}") from exc


def _build(what: str, fields: list[tuple[str, NvType, object]]) -> NvList:
    """Encode fields in order; a value nv cannot carry is our bug."""
    nv = NvList()
    try:
        for name, typ, value in fields:
            nv.add(name, typ, value)
    except NvError as exc:
        raise LocalProtocolError(f"{what}: {exc}") from exc
    return nv


def _token(nv: NvList, what: str) -> bytes:
    token = _field(nv, "token", NvType.UINT8_ARRAY, what)
    assert isinstance(token, bytes)
    if len(token) != TOKEN_SIZE:
        raise RemoteProtocolError(f"{what}: token of {len(token)} bytes, expected {TOKEN_SIZE}")
    return token


def _check_token(token: bytes, what: str) -> None:
    if not isinstance(token, bytes) or len(token) != TOKEN_SIZE:
        raise LocalProtocolError(f"{what}: token must be {TOKEN_SIZE} bytes")


def _peer_version(nv: NvList, what: str) -> int:
    # A missing or zero version means protocol 1 (hastd: "If no version is sent ...").
    version = _optional(nv, "version", NvType.UINT8, what, 0)
    assert isinstance(version, int)
    return version or 1


def _maxio(nv: NvList, what: str) -> int | None:
    maxio = _optional(nv, "maxio", NvType.UINT32, what)
    if maxio is not None and maxio < MAXPHYS_V2:  # type: ignore[operator]
        raise RemoteProtocolError(f"{what}: maxio {maxio} is below the v2 minimum {MAXPHYS_V2}")
    return maxio  # type: ignore[return-value]


def _check_maxio(maxio: int | None, version: int, what: str) -> None:
    if maxio is None:
        return
    if version < PROTO_VERSION_MAXIO:
        raise LocalProtocolError(
            f"{what}: maxio needs protocol {PROTO_VERSION_MAXIO}, not {version}"
        )
    if maxio < MAXPHYS_V2:
        raise LocalProtocolError(f"{what}: maxio {maxio} is below {MAXPHYS_V2}")


def negotiate_version(peer_version: int, ours: int = PROTO_VERSION) -> int:
    """The version a secondary answers a hello with: min(peer, ours), where 0 means 1."""
    return min(peer_version or 1, ours)


def negotiate_maxio(version: int, primary_maxio: int | None, secondary_maxio: int | None) -> int:
    """The largest I/O both sides accept. Below v3, or if either side did not say, MAXPHYS_V2."""
    if version < PROTO_VERSION_MAXIO or primary_maxio is None or secondary_maxio is None:
        return MAXPHYS_V2
    return max(min(primary_maxio, secondary_maxio), MAXPHYS_V2)


# -- handshake ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Primary -> secondary, first message on the first connection ("out"): {resource, version}.

    maxio (v3) is sent only when version >= 3; a hastd secondary ignores it.
    """

    resource: str
    version: int = PROTO_VERSION
    maxio: int | None = None

    def to_nv(self) -> NvList:
        _check_maxio(self.maxio, self.version, "hello")
        if not self.resource:
            raise LocalProtocolError("hello: empty resource name")
        fields: list[tuple[str, NvType, object]] = [
            ("resource", NvType.STRING, self.resource),
            ("version", NvType.UINT8, self.version),
        ]
        if self.maxio is not None:
            fields.append(("maxio", NvType.UINT32, self.maxio))
        return _build("hello", fields)

    @classmethod
    def from_nv(cls, nv: NvList) -> Hello:
        resource = _field(nv, "resource", NvType.STRING, "hello")
        if nv.exists("token"):
            raise RemoteProtocolError("hello: unexpected token (that is the second connection)")
        if not resource:
            raise RemoteProtocolError("hello: empty resource name")
        version = _peer_version(nv, "hello")
        maxio = _maxio(nv, "hello") if version >= PROTO_VERSION_MAXIO else None
        return cls(resource, version, maxio)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class HelloReply:
    """Secondary -> primary on the first connection: {version, token[16]}."""

    version: int
    token: bytes

    def to_nv(self) -> NvList:
        _check_token(self.token, "hello reply")
        return _build(
            "hello reply",
            [("version", NvType.UINT8, self.version), ("token", NvType.UINT8_ARRAY, self.token)],
        )

    @classmethod
    def from_nv(cls, nv: NvList) -> HelloReply:
        version = _peer_version(nv, "hello reply")
        if version > PROTO_VERSION:
            raise RemoteProtocolError(f"hello reply: version {version} is above {PROTO_VERSION}")
        return cls(version, _token(nv, "hello reply"))


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A refused handshake step: {errmsg, [wait:uint8=1]}. wait: the peer is still primary."""

    errmsg: str
    wait: bool = False

    @property
    def split_brain(self) -> bool:
        return self.errmsg == ERRMSG_SPLIT_BRAIN

    def to_nv(self) -> NvList:
        fields: list[tuple[str, NvType, object]] = [("errmsg", NvType.STRING, self.errmsg)]
        if self.wait:
            fields.append(("wait", NvType.UINT8, 1))
        return _build("error reply", fields)

    @classmethod
    def from_nv(cls, nv: NvList) -> ErrorReply:
        errmsg = _field(nv, "errmsg", NvType.STRING, "error reply")
        return cls(errmsg, nv.exists("wait"))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class InHello:
    """Primary -> secondary, first message on the second connection ("in").

    {resource, token[16], [virgin:int8=1], resuid:uint64, localcnt:uint64, remotecnt:uint64,
    [replicaid:uint64, peerid:uint64, inconsistent:uint8=1 (hastpy)]}.
    virgin: the primary generated resuid just now, so nothing was written yet. replicaid and
    peerid: the primary's copy and the copy it last replicated with (metadata.Metadata), sent
    when not 0; inconsistent: its data is marked so, sent only when set. hastd neither sends nor
    reads them, and 0 stands for absent.
    """

    resource: str
    token: bytes
    virgin: bool
    resuid: int
    localcnt: int
    remotecnt: int
    replicaid: int = 0
    peerid: int = 0
    inconsistent: bool = False

    def to_nv(self) -> NvList:
        _check_token(self.token, "in-hello")
        if self.resuid == 0:
            raise LocalProtocolError("in-hello: resuid 0 means 'never connected'")
        fields: list[tuple[str, NvType, object]] = [
            ("resource", NvType.STRING, self.resource),
            ("token", NvType.UINT8_ARRAY, self.token),
        ]
        if self.virgin:
            fields.append(("virgin", NvType.INT8, 1))
        fields += [
            ("resuid", NvType.UINT64, self.resuid),
            ("localcnt", NvType.UINT64, self.localcnt),
            ("remotecnt", NvType.UINT64, self.remotecnt),
        ]
        fields += [(name, NvType.UINT64, v) for name, v in (("replicaid", self.replicaid), ("peerid", self.peerid)) if v]
        if self.inconsistent:
            fields.append(("inconsistent", NvType.UINT8, 1))
        return _build("in-hello", fields)

    @classmethod
    def from_nv(cls, nv: NvList) -> InHello:
        what = "in-hello"
        resource = _field(nv, "resource", NvType.STRING, what)
        token = _token(nv, what)
        resuid = _field(nv, "resuid", NvType.UINT64, what)
        if resuid == 0:
            raise RemoteProtocolError(f"{what}: resuid is 0")
        return cls(
            resource,  # type: ignore[arg-type]
            token,
            nv.exists("virgin"),
            resuid,  # type: ignore[arg-type]
            _field(nv, "localcnt", NvType.UINT64, what),  # type: ignore[arg-type]
            _field(nv, "remotecnt", NvType.UINT64, what),  # type: ignore[arg-type]
            _optional(nv, "replicaid", NvType.UINT64, what) or 0,  # type: ignore[arg-type]
            _optional(nv, "peerid", NvType.UINT64, what) or 0,  # type: ignore[arg-type]
            bool(_optional(nv, "inconsistent", NvType.UINT8, what)),
        )


def decode_handshake(nv: NvList) -> Hello | InHello:
    """The first message on an accepted connection: a token marks the second connection."""
    return InHello.from_nv(nv) if nv.exists("token") else Hello.from_nv(nv)


def decode_hello_reply(nv: NvList) -> HelloReply | ErrorReply:
    return ErrorReply.from_nv(nv) if nv.exists("errmsg") else HelloReply.from_nv(nv)


@dataclass(frozen=True, slots=True)
class SecondaryInfo:
    """The secondary worker's answer, on the first connection, with its activemap as payload.

    {datasize:int64, extentsize:int32, localcnt:uint64, remotecnt:uint64, [virgin:int8=1],
    syncsrc:uint8, mapsize:uint32, [maxio:uint32 (v3)], [replicaid:uint64 (hastpy)]}. mapsize is
    the uncompressed bitmap size; 0 (virgin) means no payload. syncsrc is SYNCSRC_PRIMARY or
    SYNCSRC_SECONDARY. replicaid: the secondary's copy (as in InHello; 0 stands for absent).
    """

    datasize: int
    extentsize: int
    localcnt: int
    remotecnt: int
    virgin: bool
    syncsrc: int
    mapsize: int
    maxio: int | None = None
    replicaid: int = 0

    def to_nv(self, version: int) -> NvList:
        """version: the negotiated one; maxio must be None below v3 (the caller decides, not us)."""
        what = "secondary info"
        _check_maxio(self.maxio, version, what)
        if self.syncsrc not in _SYNCSRCS:
            raise LocalProtocolError(f"{what}: syncsrc {self.syncsrc} is not primary/secondary")
        fields: list[tuple[str, NvType, object]] = [
            ("datasize", NvType.INT64, self.datasize),
            ("extentsize", NvType.INT32, self.extentsize),
            ("localcnt", NvType.UINT64, self.localcnt),
            ("remotecnt", NvType.UINT64, self.remotecnt),
        ]
        if self.virgin:
            fields.append(("virgin", NvType.INT8, 1))
        fields += [
            ("syncsrc", NvType.UINT8, self.syncsrc),
            ("mapsize", NvType.UINT32, self.mapsize),
        ]
        if self.maxio is not None:
            fields.append(("maxio", NvType.UINT32, self.maxio))
        if self.replicaid:
            fields.append(("replicaid", NvType.UINT64, self.replicaid))
        return _build(what, fields)

    @classmethod
    def from_nv(cls, nv: NvList) -> SecondaryInfo:
        what = "secondary info"
        datasize = _field(nv, "datasize", NvType.INT64, what)
        extentsize = _field(nv, "extentsize", NvType.INT32, what)
        if datasize <= 0 or extentsize <= 0:  # type: ignore[operator]
            raise RemoteProtocolError(f"{what}: datasize {datasize} / extentsize {extentsize}")
        syncsrc = _field(nv, "syncsrc", NvType.UINT8, what)
        if syncsrc not in _SYNCSRCS:
            raise RemoteProtocolError(f"{what}: invalid syncsrc {syncsrc}")
        virgin = nv.exists("virgin")
        if virgin and syncsrc != SYNCSRC_PRIMARY:  # hastd's primary asserts this
            raise RemoteProtocolError(f"{what}: virgin secondary must sync from the primary")
        return cls(
            datasize,  # type: ignore[arg-type]
            extentsize,  # type: ignore[arg-type]
            _field(nv, "localcnt", NvType.UINT64, what),  # type: ignore[arg-type]
            _field(nv, "remotecnt", NvType.UINT64, what),  # type: ignore[arg-type]
            virgin,
            syncsrc,  # type: ignore[arg-type]
            _field(nv, "mapsize", NvType.UINT32, what),  # type: ignore[arg-type]
            _maxio(nv, what),
            _optional(nv, "replicaid", NvType.UINT64, what) or 0,  # type: ignore[arg-type]
        )


def decode_secondary_info(nv: NvList) -> SecondaryInfo | ErrorReply:
    return ErrorReply.from_nv(nv) if nv.exists("errmsg") else SecondaryInfo.from_nv(nv)


# -- I/O ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """Primary -> secondary on "out": {cmd:uint8, seq:uint64, offset:uint64, length:uint64,
    [memsync:uint8=1]}. KEEPALIVE carries only cmd, and from v4 on may carry syncdone:uint8=1
    (never send it below PROTO_VERSION_SYNCDONE); FLUSH carries offset = length = 0.

    WRITE data travels as the frame payload. memsync (v2+) asks for an early "received" ack; the
    caller must not set it for a peer below PROTO_VERSION_MEMSYNC (hastd falls back to fullsync).
    """

    cmd: int
    seq: int = 0
    offset: int = 0
    length: int = 0
    memsync: bool = False
    syncdone: bool = False

    @classmethod
    def keepalive(cls, syncdone: bool = False) -> Request:
        return cls(Cmd.KEEPALIVE, syncdone=syncdone)

    def to_nv(self) -> NvList:
        self._check()
        fields: list[tuple[str, NvType, object]] = [("cmd", NvType.UINT8, int(self.cmd))]
        if self.cmd != Cmd.KEEPALIVE:
            fields += [
                ("seq", NvType.UINT64, self.seq),
                ("offset", NvType.UINT64, self.offset),
                ("length", NvType.UINT64, self.length),
            ]
        if self.memsync:
            fields.append(("memsync", NvType.UINT8, 1))
        if self.syncdone:
            fields.append(("syncdone", NvType.UINT8, 1))
        return _build("request", fields)

    def _check(self) -> None:
        if self.cmd not in _CMDS:
            raise LocalProtocolError(f"request: unknown command {self.cmd}")
        if self.memsync and self.cmd != Cmd.WRITE:
            raise LocalProtocolError("request: memsync applies to WRITE only")
        if self.syncdone and self.cmd != Cmd.KEEPALIVE:
            raise LocalProtocolError("request: syncdone applies to KEEPALIVE only")
        if self.cmd == Cmd.KEEPALIVE:
            if self.seq or self.offset or self.length:
                raise LocalProtocolError("request: KEEPALIVE carries no seq, offset or length")
            return
        if self.seq == 0:
            raise LocalProtocolError("request: seq 0 means 'absent' on the wire")
        if self.cmd == Cmd.FLUSH and (self.offset or self.length):
            raise LocalProtocolError("request: FLUSH has offset = length = 0")

    @classmethod
    def from_nv(cls, nv: NvList) -> Request:
        """Structural decode only; validate_request() makes the secondary's value checks.

        A header this rejects cannot be answered (no usable cmd or seq) and should end the
        connection; hastd answers some of these with EINVAL instead, then mis-parses a WRITE's
        unread payload as the next header.
        """
        fixed = nv.layout_values()
        if fixed is not None:  # every field present with its type: read them at once
            layout, values = fixed
            if layout in REQUEST_LAYOUTS and values[0] != Cmd.KEEPALIVE:  # each starts with _REQUEST_FIELDS
                cmd, seq, offset, length = values[:4]
                return cls(cmd, seq, offset, length, cmd == Cmd.WRITE and "memsync" in layout.index)
        what = "request"
        cmd = _field(nv, "cmd", NvType.UINT8, what)
        if cmd == Cmd.KEEPALIVE:
            return cls(Cmd.KEEPALIVE, syncdone=nv.exists("syncdone"))
        seq = _field(nv, "seq", NvType.UINT64, what)
        if cmd in _RANGED:
            offset = _field(nv, "offset", NvType.UINT64, what)
            length = _field(nv, "length", NvType.UINT64, what)
        else:  # FLUSH ignores them; an unknown cmd is answered with EINVAL
            offset = _optional(nv, "offset", NvType.UINT64, what, 0)
            length = _optional(nv, "length", NvType.UINT64, what, 0)
        memsync = cmd == Cmd.WRITE and nv.exists("memsync")  # hastd: nv_exists, any type
        return cls(cmd, seq, offset, length, memsync)  # type: ignore[arg-type]


def validate_request(req: Request, datasize: int, sectorsize: int, maxio: int) -> int:
    """The secondary's requnpack checks: 0 if req may run, else the (Linux) errno to reply with."""
    if req.cmd not in _CMDS:
        return _errno.EINVAL  # includes 0, HIO_UNDEF
    if req.cmd == Cmd.KEEPALIVE:
        return 0
    if req.seq == 0:
        return _errno.EINVAL
    if req.cmd == Cmd.FLUSH:
        return 0
    if req.length == 0:
        return _errno.EINVAL
    if req.cmd != Cmd.DELETE and req.length > maxio:
        return _errno.EINVAL
    if req.offset % sectorsize or req.length % sectorsize:
        return _errno.EINVAL
    if req.offset + req.length > datasize:
        return _errno.EINVAL
    return 0


@dataclass(frozen=True, slots=True)
class Reply:
    """Secondary -> primary on "in": {seq:uint64, [received:int8=1], [error:int16]}.

    error is a Linux errno here; the codec translates to and from FreeBSD's numbers on the wire.
    received marks a memsync early ack (sent before the disk write; the final reply follows). A
    successful READ's data travels as the frame payload.
    """

    seq: int
    error: int = 0
    received: bool = False

    def to_nv(self) -> NvList:
        if self.seq == 0:
            raise LocalProtocolError("reply: seq 0 means 'absent' on the wire")
        if self.received and self.error:
            raise LocalProtocolError("reply: a memsync ack carries no error")
        fields: list[tuple[str, NvType, object]] = [("seq", NvType.UINT64, self.seq)]
        if self.received:
            fields.append(("received", NvType.INT8, 1))
        if self.error:
            fields.append(("error", NvType.INT16, to_wire_errno(self.error)))
        return _build("reply", fields)

    @classmethod
    def from_nv(cls, nv: NvList) -> Reply:
        fixed = nv.layout_values()
        if fixed is not None and fixed[0] in REPLY_LAYOUTS and fixed[1][0]:
            # No error field in these layouts; seq 0 takes the generic path and its refusal.
            return cls(fixed[1][0], 0, "received" in fixed[0].index)
        seq = _field(nv, "seq", NvType.UINT64, "reply")
        if seq == 0:
            raise RemoteProtocolError("reply: seq is 0")
        error = _optional(nv, "error", NvType.INT16, "reply", 0)
        return cls(seq, from_wire_errno(error), nv.exists("received"))  # type: ignore[arg-type]


# -- precomputed encoders and decoders for the hot I/O messages ----------------------------------
#
# Every user write is one Request and one Reply, so their nv headers are encoded and decoded with
# fixed layouts (one struct each) instead of field by field. Each layout is the exact field list
# to_nv() builds for the common case, plus the frame's `size` field (frame.encode_frame appends
# it after every other field when there is a payload). memsync, hastd's default mode, has its own:
# each write carries `memsync` and is answered twice, first with `received`. Anything else
# (keepalive, errors, pipeline fields from compression or checksums) takes the generic path,
# which tests/unit/test_proto_messages.py proves byte-equal where the layouts apply.

_REQUEST_FIELDS = [("cmd", NvType.UINT8), ("seq", NvType.UINT64), ("offset", NvType.UINT64), ("length", NvType.UINT64)]
_SIZE_FIELD = [("size", NvType.UINT32)]  # frame.SIZE_FIELD; frame imports nothing from here
REQUEST_LAYOUT = NvLayout(_REQUEST_FIELDS)
REQUEST_WITH_PAYLOAD_LAYOUT = NvLayout(_REQUEST_FIELDS + _SIZE_FIELD)
MEMSYNC_REQUEST_LAYOUT = NvLayout(_REQUEST_FIELDS + [("memsync", NvType.UINT8)] + _SIZE_FIELD)
REPLY_LAYOUT = NvLayout([("seq", NvType.UINT64)])
RECEIVED_REPLY_LAYOUT = NvLayout([("seq", NvType.UINT64), ("received", NvType.INT8)])
REPLY_WITH_PAYLOAD_LAYOUT = NvLayout([("seq", NvType.UINT64)] + _SIZE_FIELD)
# What a secondary receives and a primary receives, most frequent first (FrameStream tries them
# in order, each a length comparison when it does not apply, and decodes anything else field by
# field).
REQUEST_LAYOUTS = (REQUEST_WITH_PAYLOAD_LAYOUT, MEMSYNC_REQUEST_LAYOUT, REQUEST_LAYOUT)
REPLY_LAYOUTS = (REPLY_LAYOUT, RECEIVED_REPLY_LAYOUT, REPLY_WITH_PAYLOAD_LAYOUT)


def encode_request_nv(req: Request, payload_size: int) -> bytes | None:
    """req.to_nv().encode() followed by the `size` field encode_frame adds for a payload of
    payload_size bytes (none for 0), in one pack; None when req needs the generic path (a
    keepalive, a memsync write without a payload). The payload must go out unchanged by the
    pipeline (see pipeline.passes_through), since pipeline fields would sit before `size`."""
    if req.cmd == Cmd.KEEPALIVE or (req.memsync and not payload_size):
        return None
    req._check()  # noqa: SLF001 - the same checks as to_nv()
    if req.memsync:
        return MEMSYNC_REQUEST_LAYOUT.encode(req.cmd, req.seq, req.offset, req.length, 1, payload_size)
    if payload_size:
        return REQUEST_WITH_PAYLOAD_LAYOUT.encode(req.cmd, req.seq, req.offset, req.length, payload_size)
    return REQUEST_LAYOUT.encode(req.cmd, req.seq, req.offset, req.length)


def encode_reply_nv(rep: Reply, payload_size: int) -> bytes | None:
    """rep.to_nv().encode() plus the frame's `size` field, as encode_request_nv; None when rep
    needs the generic path (an error, a "received" ack with a payload)."""
    if rep.error or (rep.received and payload_size):
        return None
    if rep.seq == 0:
        raise LocalProtocolError("reply: seq 0 means 'absent' on the wire")
    if rep.received:
        return RECEIVED_REPLY_LAYOUT.encode(rep.seq, 1)
    if payload_size:
        return REPLY_WITH_PAYLOAD_LAYOUT.encode(rep.seq, payload_size)
    return REPLY_LAYOUT.encode(rep.seq)


# -- errno --------------------------------------------------------------------------------------

# FreeBSD errno numbers (sys/errno.h) by name. 1-34 are the same as Linux except EDEADLK (11 on
# FreeBSD, where Linux has EAGAIN); the rest differ. Names Linux lacks (EPROCLIM, EFTYPE, ...) are
# left out: they arrive as EIO.
_FREEBSD_ERRNO = {
    "EPERM": 1, "ENOENT": 2, "ESRCH": 3, "EINTR": 4, "EIO": 5, "ENXIO": 6, "E2BIG": 7,
    "ENOEXEC": 8, "EBADF": 9, "ECHILD": 10, "EDEADLK": 11, "ENOMEM": 12, "EACCES": 13,
    "EFAULT": 14, "ENOTBLK": 15, "EBUSY": 16, "EEXIST": 17, "EXDEV": 18, "ENODEV": 19,
    "ENOTDIR": 20, "EISDIR": 21, "EINVAL": 22, "ENFILE": 23, "EMFILE": 24, "ENOTTY": 25,
    "ETXTBSY": 26, "EFBIG": 27, "ENOSPC": 28, "ESPIPE": 29, "EROFS": 30, "EMLINK": 31,
    "EPIPE": 32, "EDOM": 33, "ERANGE": 34, "EAGAIN": 35, "EINPROGRESS": 36, "EALREADY": 37,
    "ENOTSOCK": 38, "EDESTADDRREQ": 39, "EMSGSIZE": 40, "EPROTOTYPE": 41, "ENOPROTOOPT": 42,
    "EPROTONOSUPPORT": 43, "ESOCKTNOSUPPORT": 44, "EOPNOTSUPP": 45, "EPFNOSUPPORT": 46,
    "EAFNOSUPPORT": 47, "EADDRINUSE": 48, "EADDRNOTAVAIL": 49, "ENETDOWN": 50,
    "ENETUNREACH": 51, "ENETRESET": 52, "ECONNABORTED": 53, "ECONNRESET": 54, "ENOBUFS": 55,
    "EISCONN": 56, "ENOTCONN": 57, "ESHUTDOWN": 58, "ETOOMANYREFS": 59, "ETIMEDOUT": 60,
    "ECONNREFUSED": 61, "ELOOP": 62, "ENAMETOOLONG": 63, "EHOSTDOWN": 64, "EHOSTUNREACH": 65,
    "ENOTEMPTY": 66, "EUSERS": 68, "EDQUOT": 69, "ESTALE": 70, "EREMOTE": 71, "ENOLCK": 77,
    "ENOSYS": 78, "EIDRM": 82, "ENOMSG": 83, "EOVERFLOW": 84, "ECANCELED": 85, "EILSEQ": 86,
    "ENODATA": 87,  # FreeBSD's ENOATTR
    "EBADMSG": 89, "EMULTIHOP": 90, "ENOLINK": 91, "EPROTO": 92, "ENOTRECOVERABLE": 95,
    "EOWNERDEAD": 96,
}  # fmt: skip
_TO_WIRE = {getattr(_errno, name): bsd for name, bsd in _FREEBSD_ERRNO.items()}
_FROM_WIRE = {bsd: linux for linux, bsd in _TO_WIRE.items()}
_WIRE_EIO = _FREEBSD_ERRNO["EIO"]


def to_wire_errno(linux_errno: int) -> int:
    """A Linux errno as FreeBSD numbers it; 0 stays 0, anything without an equivalent is EIO."""
    if linux_errno == 0:
        return 0
    return _TO_WIRE.get(linux_errno, _WIRE_EIO)


def from_wire_errno(bsd_errno: int) -> int:
    """A FreeBSD errno from the wire as Linux numbers it; 0 stays 0, unknown ones become EIO."""
    if bsd_errno == 0:
        return 0
    return _FROM_WIRE.get(bsd_errno, _errno.EIO)
