"""Generic netlink messages for the Linux NBD driver: pure encoders and decoders, no I/O.

The kernel's nbd driver is configured over generic netlink (family "nbd", since Linux 4.12); this
module builds the few requests hastpy sends and reads the replies, so that every byte is pinned by
unit tests on a machine without the driver. The socket work is in `hastpy.attach.kernel`.

Wire layout (include/uapi/linux/netlink.h, genetlink.h, nbd-netlink.h):

    nlmsghdr   u32 length (whole message), u16 type (family id), u16 flags, u32 seq, u32 port id
    genlmsghdr u8 cmd, u8 version, u16 reserved
    nlattr...  u16 length (header + payload, unpadded), u16 type; payload padded to 4 bytes

Netlink integers are in host byte order (struct "=" here), unlike NBD's big-endian wire. A nested
attribute carries NLA_F_NESTED in its type, as current kernels expect from new code (the nbd driver
parses with the lenient "deprecated" parser and accepts either).

Contract of the decoders: they raise `NetlinkDecodeError` on bytes that cannot be a netlink
message (truncated headers, lengths pointing past the data) and never read past the buffer.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hastpy.errors import HastError

# --- netlink.h --------------------------------------------------------------------------------

NETLINK_GENERIC = 16  # the protocol number of AF_NETLINK sockets carrying generic netlink
NLMSG_ALIGNTO = 4
NLA_ALIGNTO = 4

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_CAPPED = 0x100  # an error message carries only the header of our request, not its payload
NLM_F_ACK_TLVS = 0x200  # an error message has extended-ack attributes after the request copy

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3

NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

NLMSGERR_ATTR_MSG = 1  # extended ack: a human-readable reason (NUL-terminated string)

SOL_NETLINK = 270
NETLINK_EXT_ACK = 11  # setsockopt: ask the kernel for extended-ack reasons in error replies

NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
NLA_HDR = struct.Struct("=HH")  # length, type
NLMSGERR = struct.Struct("=i")  # the error field of struct nlmsgerr (negative errno, 0 = ack)

# --- genetlink.h ------------------------------------------------------------------------------

GENL_HDR = struct.Struct("=BBH")  # cmd, version, reserved
GENL_ID_CTRL = 0x10  # the controller family is always NLMSG_MIN_TYPE
CTRL_VERSION = 2  # the controller's genl version (what libnl and iproute2 send)
CTRL_CMD_NEWFAMILY = 1
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1  # u16
CTRL_ATTR_FAMILY_NAME = 2  # NUL-terminated string

# --- nbd-netlink.h ----------------------------------------------------------------------------

NBD_GENL_FAMILY_NAME = "nbd"
NBD_GENL_VERSION = 1

NBD_ATTR_INDEX = 1  # u32
NBD_ATTR_SIZE_BYTES = 2  # u64
NBD_ATTR_BLOCK_SIZE_BYTES = 3  # u64
NBD_ATTR_TIMEOUT = 4  # u64, seconds; 0: no request timeout (kernels >= 5.x keep waiting)
NBD_ATTR_SERVER_FLAGS = 5  # u64, the NBD transmission flags from the handshake
NBD_ATTR_CLIENT_FLAGS = 6  # u64, NBD_CFLAG_*
NBD_ATTR_SOCKETS = 7  # nested: NBD_SOCK_ITEM { NBD_SOCK_FD }
NBD_ATTR_DEAD_CONN_TIMEOUT = 8  # u64, seconds I/O waits for a reconnect when every socket died
NBD_ATTR_DEVICE_LIST = 9
NBD_ATTR_BACKEND_IDENTIFIER = 10  # string (Linux >= 5.14: /sys/block/nbdN/backend)

NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1  # u32, a file descriptor number in the sending process

NBD_CFLAG_DESTROY_ON_DISCONNECT = 1 << 0
NBD_CFLAG_DISCONNECT_ON_CLOSE = 1 << 1

NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
NBD_CMD_LINK_DEAD = 4
NBD_CMD_STATUS = 5

_U8 = struct.Struct("=B")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


class NetlinkError(HastError):
    """The kernel refused a netlink request (its errno), or we could not talk to it."""

    exit_code = os.EX_OSERR

    def __init__(self, error: int, reason: str | None = None, what: str = "netlink request") -> None:
        self.errno = error
        self.reason = reason
        text = f"{what} failed: {os.strerror(error)} (errno {error})"
        if reason:
            text += f": {reason}"
        super().__init__(text)


class NetlinkDecodeError(NetlinkError):
    """Bytes from the kernel that are not a well-formed netlink message."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EPROTO, reason, "decoding a netlink reply")


def align(length: int) -> int:
    """Round up to the 4-byte netlink alignment (NLMSG_ALIGN and NLA_ALIGN are the same)."""
    return (length + NLA_ALIGNTO - 1) & ~(NLA_ALIGNTO - 1)


def _pad(data: bytes) -> bytes:
    return data + bytes(align(len(data)) - len(data))


# --- Encoders ---------------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute: header with the unpadded length, payload, zero padding to 4 bytes."""
    length = NLA_HDR.size + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"netlink attribute {kind} too long ({length} bytes)")
    return _pad(NLA_HDR.pack(length, kind) + payload)


def attr_u8(kind: int, value: int) -> bytes:
    return attr(kind, _U8.pack(value))


def attr_u16(kind: int, value: int) -> bytes:
    return attr(kind, _U16.pack(value))


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def attr_u64(kind: int, value: int) -> bytes:
    return attr(kind, _U64.pack(value))


def attr_str(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute (NLA_NUL_STRING / NLA_STRING both accept it)."""
    return attr(kind, value.encode() + b"\0")


def attr_nested(kind: int, children: Iterable[bytes]) -> bytes:
    """A container attribute: NLA_F_NESTED set, payload = the already-padded children."""
    return attr(kind | NLA_F_NESTED, b"".join(children))


def message(msg_type: int, flags: int, seq: int, payload: bytes, port: int = 0) -> bytes:
    """One netlink message; the length in the header covers the padded payload."""
    body = _pad(payload)
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), msg_type, flags, seq, port) + body


def genl_message(
    family: int,
    cmd: int,
    version: int,
    attrs: Iterable[bytes],
    seq: int,
    flags: int = NLM_F_REQUEST | NLM_F_ACK,
) -> bytes:
    """A generic netlink request. NLM_F_ACK by default, so every request ends with an ack or an
    error and the caller always knows when the kernel is done with it."""
    return message(family, flags, seq, GENL_HDR.pack(cmd, version, 0) + b"".join(attrs))


def get_family_request(name: str, seq: int) -> bytes:
    """CTRL_CMD_GETFAMILY: ask the controller for the numeric id of family `name`."""
    return genl_message(
        GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_VERSION, [attr_str(CTRL_ATTR_FAMILY_NAME, name)], seq
    )


def nbd_connect_request(
    family: int,
    seq: int,
    *,
    size: int,
    block_size: int,
    server_flags: int,
    timeout: int,
    dead_conn_timeout: int,
    sockets: Sequence[int],
    index: int | None = None,
    client_flags: int | None = None,
    backend_id: str | None = None,
) -> bytes:
    """NBD_CMD_CONNECT: hand connected, handshaken sockets (fds of the sending process) to the
    kernel. Without `index` the kernel picks a free device (or creates one) and says which in its
    reply. Attribute order follows the header's enum; the kernel does not care."""
    if not sockets:
        raise ValueError("NBD_CMD_CONNECT needs at least one socket")
    attrs = []
    if index is not None:
        attrs.append(attr_u32(NBD_ATTR_INDEX, index))
    attrs += [
        attr_u64(NBD_ATTR_SIZE_BYTES, size),
        attr_u64(NBD_ATTR_BLOCK_SIZE_BYTES, block_size),
        attr_u64(NBD_ATTR_TIMEOUT, timeout),
        attr_u64(NBD_ATTR_SERVER_FLAGS, server_flags),
    ]
    if client_flags is not None:
        attrs.append(attr_u64(NBD_ATTR_CLIENT_FLAGS, client_flags))
    items = [attr_nested(NBD_SOCK_ITEM, [attr_u32(NBD_SOCK_FD, fd)]) for fd in sockets]
    attrs.append(attr_nested(NBD_ATTR_SOCKETS, items))
    attrs.append(attr_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout))
    if backend_id is not None:
        attrs.append(attr_str(NBD_ATTR_BACKEND_IDENTIFIER, backend_id))
    return genl_message(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, attrs, seq)


def nbd_disconnect_request(family: int, seq: int, index: int) -> bytes:
    """NBD_CMD_DISCONNECT of device nbd<index>: the kernel sends NBD_CMD_DISC to the server,
    shuts the sockets down and fails I/O still queued; it does not wait for openers to close."""
    return genl_message(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, [attr_u32(NBD_ATTR_INDEX, index)], seq)


# --- Decoders ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One netlink message: header fields and the payload after the 16-byte header."""

    type: int
    flags: int
    seq: int
    port: int
    payload: bytes


def parse_messages(data: bytes) -> list[Message]:
    """Split one datagram into its messages (a datagram may hold several, e.g. reply + ack)."""
    messages = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < NLMSG_HDR.size:
            raise NetlinkDecodeError(f"{len(data) - offset} stray bytes after the last message")
        length, msg_type, flags, seq, port = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            raise NetlinkDecodeError(f"message length {length} at offset {offset} of {len(data)}")
        messages.append(Message(msg_type, flags, seq, port, bytes(data[offset + NLMSG_HDR.size : offset + length])))
        offset += align(length)
    return messages


def parse_attrs(data: bytes) -> list[tuple[int, bytes]]:
    """(type without flag bits, payload) for each attribute, in order; repeats are kept."""
    attrs = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < NLA_HDR.size:
            # The kernel never sends this, but a trailing pad shorter than a header is harmless.
            if any(data[offset:]):
                raise NetlinkDecodeError(f"{len(data) - offset} stray bytes after the last attribute")
            break
        length, kind = NLA_HDR.unpack_from(data, offset)
        if length < NLA_HDR.size or offset + length > len(data):
            raise NetlinkDecodeError(f"attribute length {length} at offset {offset} of {len(data)}")
        attrs.append((kind & NLA_TYPE_MASK, bytes(data[offset + NLA_HDR.size : offset + length])))
        offset += align(length)
    return attrs


def attrs_dict(data: bytes) -> dict[int, bytes]:
    """Attributes by type; the last one wins, as in the kernel's nla_parse."""
    return dict(parse_attrs(data))


def _int(payload: bytes, codec: struct.Struct, what: str) -> int:
    if len(payload) < codec.size:
        raise NetlinkDecodeError(f"{what}: {len(payload)} bytes, need {codec.size}")
    return codec.unpack_from(payload)[0]


def u16(payload: bytes, what: str = "u16 attribute") -> int:
    return _int(payload, _U16, what)


def u32(payload: bytes, what: str = "u32 attribute") -> int:
    return _int(payload, _U32, what)


def u64(payload: bytes, what: str = "u64 attribute") -> int:
    return _int(payload, _U64, what)


def string(payload: bytes) -> str:
    """A string attribute without its terminating NUL (and anything after it)."""
    return payload.split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An NLMSG_ERROR message: `error` is a positive errno, 0 for an ack."""

    error: int
    reason: str | None = None


def parse_error(msg: Message) -> ErrorReply:
    """Decode NLMSG_ERROR: a negative errno (0: ack), a copy of our request's header (and its
    payload unless NLM_F_CAPPED), then, with NLM_F_ACK_TLVS, extended-ack attributes."""
    if msg.type != NLMSG_ERROR:
        raise ValueError(f"not an error message (type {msg.type})")
    payload = msg.payload
    error = -_int(payload, NLMSGERR, "nlmsgerr")
    reason = None
    if msg.flags & NLM_F_ACK_TLVS:
        offset = NLMSGERR.size
        if len(payload) >= offset + NLMSG_HDR.size:
            inner_length = NLMSG_HDR.unpack_from(payload, offset)[0]
            offset += NLMSG_HDR.size if msg.flags & NLM_F_CAPPED else align(inner_length)
            for kind, value in parse_attrs(payload[offset:]):
                if kind == NLMSGERR_ATTR_MSG:
                    reason = string(value)
    return ErrorReply(error, reason)


@dataclass(frozen=True, slots=True)
class GenlReply:
    cmd: int
    version: int
    attrs: dict[int, bytes]


def parse_genl(msg: Message) -> GenlReply:
    if len(msg.payload) < GENL_HDR.size:
        raise NetlinkDecodeError(f"generic netlink payload of {len(msg.payload)} bytes")
    cmd, version, _ = GENL_HDR.unpack_from(msg.payload)
    return GenlReply(cmd, version, attrs_dict(msg.payload[GENL_HDR.size :]))


def collect_replies(messages: Iterable[Message], seq: int, what: str = "netlink request") -> tuple[list[Message], bool]:
    """Sort one datagram's messages for the request numbered `seq`.

    Returns (replies to keep, finished). The request is finished by its ack (NLMSG_ERROR with 0)
    or by NLMSG_DONE; an NLMSG_ERROR with an errno raises NetlinkError. Messages for other
    sequence numbers (late answers to an earlier, abandoned request) and NOOPs are dropped.
    """
    replies = []
    for msg in messages:
        if msg.seq != seq or msg.type == NLMSG_NOOP:
            continue
        if msg.type == NLMSG_ERROR:
            err = parse_error(msg)
            if err.error:
                raise NetlinkError(err.error, err.reason, what)
            return replies, True
        if msg.type == NLMSG_DONE:
            return replies, True
        replies.append(msg)
    return replies, False


def family_id(replies: Iterable[Message]) -> int:
    """The family id from a CTRL_CMD_GETFAMILY answer (CTRL_CMD_NEWFAMILY)."""
    for msg in replies:
        if msg.type != GENL_ID_CTRL:
            continue
        reply = parse_genl(msg)
        if reply.cmd == CTRL_CMD_NEWFAMILY and CTRL_ATTR_FAMILY_ID in reply.attrs:
            return u16(reply.attrs[CTRL_ATTR_FAMILY_ID], "CTRL_ATTR_FAMILY_ID")
    raise NetlinkDecodeError("no CTRL_ATTR_FAMILY_ID in the controller's answer")


def connect_index(replies: Iterable[Message], family: int) -> int:
    """The device index from the kernel's answer to NBD_CMD_CONNECT (nbd_connect_reply)."""
    for msg in replies:
        if msg.type != family:
            continue
        reply = parse_genl(msg)
        if reply.cmd == NBD_CMD_CONNECT and NBD_ATTR_INDEX in reply.attrs:
            return u32(reply.attrs[NBD_ATTR_INDEX], "NBD_ATTR_INDEX")
    raise NetlinkDecodeError("no NBD_ATTR_INDEX in the answer to NBD_CMD_CONNECT")
