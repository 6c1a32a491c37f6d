"""A sans-IO NBD server connection: fixed newstyle handshake, simple replies.

This module does no I/O (h11's rule, reference/style.md §2): the caller feeds received bytes with
`receive_data()`, pulls events with `next_event()`, and sends the bytes that events and encoders
hand back. Everything that decides what the protocol allows lives here, so the socket loop in
`server.py` only moves bytes and dispatches work.

Bulk data does not have to go through the codec's buffer. After NEED_DATA the caller asks:

- `payload_wanted()`: if > 0, a WRITE's payload is being collected and that many of its bytes
  are still to come; the caller receives up to that many into a buffer of its own (one copy,
  from the kernel) and hands it over with `receive_payload()`. A payload that arrives whole this
  way becomes the request's `data` as is, never copied or zero-filled by the codec;
- otherwise `receive_limit()`: the most bytes to pass to `receive_data()` next without pulling
  the start of a WRITE payload through the buffer (in transmission: the rest of the next request
  header). Receiving more is allowed, only slower: those payload bytes are then copied.

The protocol is NetworkBlockDevice/nbd doc/proto.md (reference/peers.md §5.3). We implement the
subset every client we care about negotiates (peers.md §5.4): the Linux kernel via nbd-client, and
libnbd's nbdinfo, nbdcopy and nbdfuse, and qemu:

- handshake: fixed newstyle (plain newstyle clients get NBD_OPT_EXPORT_NAME alone, as the spec
  allows them nothing else); options GO, INFO, EXPORT_NAME, LIST, ABORT; everything else
  (STARTTLS, STRUCTURED_REPLY, meta contexts, extended headers) is answered NBD_REP_ERR_UNSUP;
- transmission: READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES with simple replies only, so a reply
  is a 16-byte header plus, for a successful READ, exactly the requested bytes.

Events returned by `next_event()`:

- `OptionReply`: send `.data` and keep going (option haggling continues);
- `Ready`: send `.data`; the connection is now in transmission;
- `Aborted`: send `.data` (the ack of NBD_OPT_ABORT), then close;
- `Request`: a valid request; run it and send `encode_reply()` for its handle (except DISC:
  finish what is in flight, then close);
- `RequestError`: an invalid request; send `encode_reply(handle, error)`; the stream is intact (a
  refused WRITE's payload has been skipped by then, as nbdkit does: the reply never overtakes it);
- `ConnectionClosed`: the client closed at a message boundary, or the session is over;
- `NEED_DATA`: feed more bytes.

Anything that leaves the byte stream unparseable raises `RemoteProtocolError`: the caller must
close the connection (a hard disconnect, which the spec allows on a violation by the peer). Any
other exception from this module is a bug.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

from hastpy.errors import LocalProtocolError, RemoteProtocolError

# --- Magic numbers and fixed layouts (proto.md "Handshake", "Transmission") -------------------

NBDMAGIC = 0x4E42444D41474943  # b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # b"IHAVEOPT": greeting, and the prefix of every option
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length of option data
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length of reply data
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (then zeroes, maybe)
REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, command flags, type, handle, offset, length
SIMPLE_REPLY_HEADER = struct.Struct(">IIQ")  # magic, error, handle

# NBD_OPT_EXPORT_NAME's reply ends with reserved zeroes unless both sides agreed NO_ZEROES.
EXPORT_NAME_PADDING = 124

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option reply types; errors have bit 31 set.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8

# Information types carried by NBD_REP_INFO, requested in NBD_OPT_INFO/GO.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Request types (proto.md "Request types")."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


# Command flags.
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# NBD error values (proto.md "Error values"). They equal Linux errno values, so a client may
# raise OSError(error) with them directly.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108
NBD_ERRORS = frozenset(
    {NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN}
)

# Host errno -> NBD error. The spec asks for EDQUOT and EFBIG to be reported as ENOSPC, and for
# writes to a read-only export to fail with EPERM; anything unlisted is an I/O error.
_ERRNO_TO_NBD = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

# --- Limits, each with its reason ---------------------------------------------------------------

# The smallest I/O unit. 512 is what interoperable clients assume (proto.md "Block size
# constraints") and the kernel client's smallest block size (nbd-client -b, peers.md §5.4).
DEFAULT_MIN_BLOCK_SIZE = 512
# The spec allows an advertised minimum that is a power of two up to 64 KiB.
MAX_MIN_BLOCK_SIZE = 64 * 1024
# Preferred I/O size: a page, the kernel's and ext4/xfs' natural unit; smaller writes would make
# the provider read-modify-write.
PREFERRED_BLOCK_SIZE = 4096
# The largest READ or WRITE payload we accept. 32 MiB (2**25) is the largest the spec says an
# interoperable client may send without asking, and the kernel's hard limit for an nbd device
# (max_hw_sectors 65536 x 512). In practice the kernel splits bios at max_sectors_kb (hundreds of
# KiB to ~1 MiB by default), nbdcopy uses 256 KiB requests and hastd's own MAXPHYS is 1 MiB
# (hastpy.constants), so this bounds memory per request rather than shaping normal traffic.
DEFAULT_MAX_BLOCK_SIZE = 32 * 1024 * 1024
# An option we accept carries at most a 4-byte length, a name (the spec caps strings at 4096
# bytes), a 2-byte count and a few 2-byte info requests. Anything bigger is an extension we would
# refuse anyway or an attempt to make us buffer; we hang up rather than read it.
MAX_OPTION_LENGTH = 16 * 1024
# Export sizes travel as u64, but servers and clients (qemu, libnbd) treat them as signed.
MAX_EXPORT_SIZE = 2**63 - 1
# Strings (export name, description) in the spec MUST be no longer than this.
MAX_STRING_LENGTH = 4096
# The receive buffer is compacted (consumed bytes dropped) once at least this much has been
# consumed and it is at least half the buffer: small enough to bound the waste, large enough that
# compaction copies are amortised over many requests.
_COMPACT_THRESHOLD = 64 * 1024

# Raw request type -> Command, for the types we serve (a dict lookup, not an enum call).
_COMMANDS = {int(c): c for c in Command}

# Commands whose offset/length address export bytes, and so are range- and alignment-checked.
_RANGED_COMMANDS = frozenset({Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
# Commands that modify the export: refused with EPERM on a read-only export.
_WRITE_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
# Commands that carry (WRITE) or return (READ) a payload: bounded by the maximum block size. TRIM
# and WRITE_ZEROES carry none, and the kernel sends discards far larger than any payload limit.
_PAYLOAD_COMMANDS = frozenset({Command.READ, Command.WRITE})
# The flags each supported command accepts. FUA is valid on every command once SEND_FUA is
# advertised (proto.md: clients are known to set it anywhere); NO_HOLE only on WRITE_ZEROES.
_ALLOWED_FLAGS = {
    Command.READ: CMD_FLAG_FUA,
    Command.WRITE: CMD_FLAG_FUA,
    Command.DISC: CMD_FLAG_FUA,
    Command.FLUSH: CMD_FLAG_FUA,
    Command.TRIM: CMD_FLAG_FUA,
    Command.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
}


# --- Events ------------------------------------------------------------------------------------


class _Sentinel(type):
    """A class used as a unique marker value: compare with `is`; it prints as its name."""

    def __repr__(cls) -> str:
        return cls.__name__


class NEED_DATA(metaclass=_Sentinel):  # noqa: N801 - a sentinel, named like h11's
    """`next_event()` cannot make progress until more bytes are received."""


@dataclass(frozen=True, slots=True)
class OptionReply:
    """Reply bytes for one option during haggling; the handshake continues."""

    option: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """The client chose the export; send `data`, then the connection is in transmission."""

    option: int  # OPT_GO or OPT_EXPORT_NAME
    export_name: str
    size: int
    transmission_flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client sent NBD_OPT_ABORT: send `data` (best effort), then close."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Request:
    """A valid transmission request. `data` is the payload of a WRITE, else empty.

    A WRITE's `data` is a read-only bytes-like object owned by this event alone (the buffer the
    caller handed to receive_payload(), or one the codec assembled): the codec never touches it
    again, so it may be handed to other threads without copying.
    """

    kind: Command
    flags: int
    handle: int
    offset: int
    length: int
    data: bytes | memoryview = b""

    @property
    def fua(self) -> bool:
        """The reply must wait until this request's writes are on stable storage."""
        return bool(self.flags & CMD_FLAG_FUA)

    @property
    def may_trim(self) -> bool:
        """For WRITE_ZEROES: the zeroed range may be deallocated (NO_HOLE not set)."""
        return not self.flags & CMD_FLAG_NO_HOLE

    @property
    def reply_size(self) -> int:
        """Payload bytes the request holds now plus those its reply will carry."""
        return self.length if self.kind in _PAYLOAD_COMMANDS else 0


@dataclass(frozen=True, slots=True)
class RequestError:
    """A well-framed request that must be refused: reply `error` to `handle`, keep serving."""

    kind: int  # the raw type: an unknown command has no Command member
    flags: int
    handle: int
    offset: int
    length: int
    error: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed the connection at a message boundary, or the session has ended."""


Event = OptionReply | Ready | Aborted | Request | RequestError | ConnectionClosed


# --- Pure encoders and helpers -----------------------------------------------------------------


def nbd_error(err: int | None) -> int:
    """Map a host errno value to the NBD error the client should see."""
    if err is None:
        return NBD_EIO
    return _ERRNO_TO_NBD.get(err, NBD_EIO)


def nbd_error_from_exception(exc: BaseException) -> int:
    """The NBD error for an exception raised while serving a request."""
    if isinstance(exc, OSError):
        return nbd_error(exc.errno)
    if isinstance(exc, MemoryError):
        return NBD_ENOMEM
    return NBD_EIO


def encode_reply_header(handle: int, error: int = 0) -> bytes:
    """The 16-byte simple reply header. A successful READ's data follows it on the wire."""
    if error and error not in NBD_ERRORS:
        raise LocalProtocolError(f"{error} is not an NBD error value; map it with nbd_error()")
    return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, handle)


def encode_reply(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    """A whole simple reply. For big READ data prefer sending the header and data separately."""
    if error and data:
        raise LocalProtocolError("a failed request's simple reply carries no data")
    return encode_reply_header(handle, error) + bytes(data)


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """One fixed-newstyle option reply."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def transmission_flags(*, read_only: bool = False, multi_conn: bool = False) -> int:
    """The transmission flags we advertise.

    CAN_MULTI_CONN promises that FLUSH on one connection covers writes completed on every other;
    only the caller knows whether its backend keeps that promise, so it is off unless asked. A
    read-only export does not advertise the commands that would only ever fail with EPERM.
    """
    flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA
    if read_only:
        flags |= FLAG_READ_ONLY
    else:
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
    if multi_conn:
        flags |= FLAG_CAN_MULTI_CONN
    return flags


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- The receive buffer ------------------------------------------------------------------------


class _ReceiveBuffer:
    """Received bytes not yet parsed: a bytearray plus a read index.

    Consuming from the front only advances the index; consumed bytes are dropped in one compaction
    once they dominate the buffer. Every received byte is therefore copied a bounded number of
    times, so parsing is O(n) however the stream is chunked (no quadratic slicing).

    `data` is empty exactly when nothing is buffered (consuming the last byte clears it), so the
    owner tests `buffer.data` for "anything buffered" without a Python call per test.

    Hazard: a memoryview over `data` must not outlive the statement that makes it, because while
    one exists the bytearray cannot be resized (appending or compacting raises BufferError).
    """

    __slots__ = ("data", "_start")

    def __init__(self) -> None:
        self.data = bytearray()  # read-only outside this class
        self._start = 0

    def __len__(self) -> int:
        return len(self.data) - self._start

    def append(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def peek(self, n: int) -> bytes:
        """The next `n` bytes, not consumed; the caller has checked that they are buffered."""
        return bytes(memoryview(self.data)[self._start : self._start + n])

    def take(self, n: int) -> bytes | None:
        """The next `n` bytes, consumed; None (nothing consumed) if fewer are buffered."""
        end = self._start + n
        if len(self.data) < end:
            return None
        out = bytes(memoryview(self.data)[self._start : end])
        self._advance(end)
        return out

    def unpack(self, layout: struct.Struct) -> tuple | None:
        """The next `layout.size` bytes unpacked, consumed; None (nothing consumed) if fewer are
        buffered. No copy of the bytes is made."""
        data = self.data
        end = self._start + layout.size
        if len(data) < end:
            return None
        fields = layout.unpack_from(data, self._start)
        self._advance(end)
        return fields

    def take_into(self, target: memoryview) -> int:
        """Move up to len(target) buffered bytes into `target`; return how many."""
        n = min(len(self), len(target))
        end = self._start + n
        target[:n] = memoryview(self.data)[self._start : end]
        self._advance(end)
        return n

    def discard(self, n: int) -> int:
        """Drop up to `n` buffered bytes; return how many."""
        n = min(len(self), n)
        self._advance(self._start + n)
        return n

    def _advance(self, start: int) -> None:
        if start == len(self.data):
            self.data.clear()
            self._start = 0
        elif start >= _COMPACT_THRESHOLD and start * 2 >= len(self.data):
            del self.data[:start]
            self._start = 0
        else:
            self._start = start


# --- The connection ----------------------------------------------------------------------------


class State(enum.Enum):
    """Where the connection is. Transitions happen only inside ServerConnection's readers."""

    CLIENT_FLAGS = "client flags"  # greeting sent, waiting for the client's 32-bit flags
    OPTIONS = "options"  # option haggling
    TRANSMISSION = "transmission"
    DONE = "done"  # DISC, ABORT or EOF seen: nothing more will be parsed
    ERROR = "error"  # the peer broke the protocol: nothing more will be parsed


class ServerConnection:
    """The server side of one NBD connection, serving a single export.

    Not thread-safe: one thread (the receive loop) feeds it and pulls events. The encoders it uses
    for replies are module-level pure functions, safe to call from any thread.
    """

    def __init__(
        self,
        export_name: str,
        size: int,
        *,
        read_only: bool = False,
        multi_conn: bool = False,
        min_block_size: int = DEFAULT_MIN_BLOCK_SIZE,
        max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
        description: str = "",
    ) -> None:
        _check_export(export_name, size, min_block_size, max_block_size, description)
        self.export_name = export_name
        self.size = size
        self.read_only = read_only
        self.min_block_size = min_block_size
        self.preferred_block_size = max(PREFERRED_BLOCK_SIZE, min_block_size)
        self.max_block_size = max_block_size
        self.description = description
        self.transmission_flags = transmission_flags(read_only=read_only, multi_conn=multi_conn)
        self.state = State.CLIENT_FLAGS
        self.no_zeroes = False
        self.fixed_newstyle = True  # set from the client's flags
        self._buffer = _ReceiveBuffer()
        self._eof = False
        # A WRITE whose payload is still arriving: its header (flags, handle, offset, length),
        # its length, and the buffer it fills. The buffer is allocated only when the payload
        # arrives in pieces; a payload handed whole to receive_payload() becomes the request's
        # data as is.
        self._pending: tuple[int, int, int, int] | None = None
        self._payload: bytearray | None = None
        self._filled = 0
        self._whole: bytes | bytearray | memoryview | None = None  # a payload received in one piece
        # Bytes of a refused WRITE's payload still to be skipped (never buffered whole), and the
        # refusal, held until they are: a client may still be sending the payload and must not
        # see the reply first (libnbd then drops the connection: it cannot match the reply).
        self._discard = 0
        self._refusal: RequestError | None = None

    # -- public API --

    def greeting(self) -> bytes:
        """The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags."""
        return GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the client; b"" means the client closed its side (EOF).

        The bytes are copied before this returns, so the caller may reuse its receive buffer.
        """
        if self._eof:
            raise RuntimeError("received data after EOF")
        if not data:
            self._eof = True
            return
        data = memoryview(data).cast("B")
        if (self._pending is not None or self._discard) and not self._buffer.data:
            data = self._receive_direct(data)
        if data:
            self._buffer.append(data)

    def payload_wanted(self) -> int:
        """Bytes of a WRITE payload still expected that are not buffered yet; 0 when no payload
        is being collected. Valid after next_event() returned NEED_DATA."""
        if self._pending is None or self._buffer.data:
            return 0
        return self._pending[3] - self._filled

    def receive_payload(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes of the WRITE payload being collected: at least 1 and at most payload_wanted().

        The codec keeps `data` (it may become the request's payload without a copy): the caller
        must not modify or reuse it afterwards. EOF is reported with receive_data(b"").
        """
        wanted = self.payload_wanted()
        if not 0 < len(data) <= wanted:
            raise LocalProtocolError(f"receive_payload of {len(data)} bytes; {wanted} wanted")
        if self._filled == 0 and len(data) == wanted:
            self._whole = data  # the common case: the payload in one piece, kept as is
            self._filled = wanted
            return
        self._receive_direct(memoryview(data).cast("B"))

    def receive_limit(self, read_ahead: int = 0) -> int:
        """The most bytes worth receiving for receive_data() next (see the module doc).

        In transmission: the rest of the next request header, or the rest of a refused WRITE's
        payload that is being skipped; before that (handshake): MAX_OPTION_LENGTH plus an option
        header, a bound on what one message may need.

        read_ahead: between requests, the caller may take up to this many bytes at once, payload
        bytes included, which then pass through the buffer (a copy). Worth it for small requests:
        one receive for several of them instead of one per header and one per payload.
        """
        if self.state is State.TRANSMISSION:
            if self._discard:
                return self._discard
            return max(REQUEST_HEADER.size - len(self._buffer), 1, read_ahead)
        return OPTION_HEADER.size + MAX_OPTION_LENGTH

    def next_event(self) -> Event | type[NEED_DATA]:
        """The next event, or NEED_DATA. Raises RemoteProtocolError if the client broke the
        protocol; the connection is then dead and must be closed."""
        state = self.state
        try:
            if state is State.TRANSMISSION:  # every request: not through the table (an Enum hashes in Python)
                event = self._read_transmission()
            elif state is State.DONE:
                return ConnectionClosed()
            elif state is State.ERROR:
                raise RemoteProtocolError("the connection already failed")
            else:
                event = _READERS[state](self)
            if event is NEED_DATA and self._eof:
                return self._end_of_stream()
            return event
        except RemoteProtocolError:
            self.state = State.ERROR
            raise

    def _end_of_stream(self) -> ConnectionClosed:
        """The client has closed and nothing buffered makes an event: clean only between
        messages."""
        if self._buffer.data or self._pending is not None or self._discard:
            where = self.state.value
            raise RemoteProtocolError(f"connection closed in the middle of a message ({where})")
        self.state = State.DONE
        return ConnectionClosed()

    def _receive_direct(self, data: memoryview) -> memoryview:
        """Feed an in-progress WRITE payload (or a refused one) straight from `data`, sparing the
        receive buffer a copy of the bulk of every large write. Returns what is left over."""
        if self._pending is not None:
            n = min(self._pending[3] - self._filled, len(data))
            memoryview(self._payload_buffer())[self._filled : self._filled + n] = data[:n]
            self._filled += n
            return data[n:]
        n = min(self._discard, len(data))
        self._discard -= n
        return data[n:]

    def _payload_buffer(self) -> bytearray:
        """The buffer a payload arriving in pieces is assembled in, allocated on first use."""
        if self._payload is None:
            self._payload = bytearray(self._pending[3])  # type: ignore[index]
        return self._payload

    # -- handshake --

    def _read_client_flags(self) -> Event | type[NEED_DATA]:
        raw = self._buffer.take(CLIENT_FLAGS.size)
        if raw is None:
            return NEED_DATA
        (flags,) = CLIENT_FLAGS.unpack(raw)
        if flags & ~KNOWN_CLIENT_FLAGS:
            raise RemoteProtocolError(f"unknown client flags {flags:#x}")
        # A client without FIXED_NEWSTYLE (plain newstyle, nbd-client before 3.x) knows only
        # NBD_OPT_EXPORT_NAME, and cannot take a reply to anything else: see _read_option.
        self.fixed_newstyle = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.state = State.OPTIONS
        return self._read_option()

    def _read_option(self) -> Event | type[NEED_DATA]:
        if len(self._buffer) < OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = OPTION_HEADER.unpack(self._buffer.peek(OPTION_HEADER.size))
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            raise RemoteProtocolError(f"option {option} of {length} bytes is over {MAX_OPTION_LENGTH}")
        raw = self._buffer.take(OPTION_HEADER.size + length)
        if raw is None:
            return NEED_DATA
        if not self.fixed_newstyle and option != OPT_EXPORT_NAME:
            raise RemoteProtocolError(f"option {option} from a client without fixed newstyle negotiation")
        handler = _OPTION_HANDLERS.get(option, ServerConnection._option_unsupported)
        return handler(self, option, raw[OPTION_HEADER.size :])

    def _option_unsupported(self, option: int, data: bytes) -> Event:
        return OptionReply(option, encode_option_reply(option, REP_ERR_UNSUP, b"unsupported option"))

    def _option_abort(self, option: int, data: bytes) -> Event:
        self.state = State.DONE
        return Aborted(encode_option_reply(option, REP_ACK))

    def _option_list(self, option: int, data: bytes) -> Event:
        if data:
            return self._option_invalid(option, "NBD_OPT_LIST takes no data")
        name = self.export_name.encode()
        server = encode_option_reply(option, REP_SERVER, struct.pack(">I", len(name)) + name)
        return OptionReply(option, server + encode_option_reply(option, REP_ACK))

    def _option_export_name(self, option: int, data: bytes) -> Event:
        # This option cannot be refused with a reply: the spec says hang up.
        if not self._name_matches(data):
            raise RemoteProtocolError(f"NBD_OPT_EXPORT_NAME for unknown export {data[:64]!r}")
        reply = EXPORT_NAME_REPLY.pack(self.size, self.transmission_flags)
        if not self.no_zeroes:
            reply += bytes(EXPORT_NAME_PADDING)
        return self._ready(option, reply)

    def _option_info_or_go(self, option: int, data: bytes) -> Event:
        parsed = _parse_info_request(data)
        if parsed is None:
            return self._option_invalid(option, "malformed NBD_OPT_INFO/GO data")
        name, requests = parsed
        if not self._name_matches(name):
            return OptionReply(option, encode_option_reply(option, REP_ERR_UNKNOWN, b"unknown export"))
        reply = self._info_replies(option, requests) + encode_option_reply(option, REP_ACK)
        if option == OPT_INFO:
            return OptionReply(option, reply)
        return self._ready(option, reply)

    def _option_invalid(self, option: int, message: str) -> Event:
        return OptionReply(option, encode_option_reply(option, REP_ERR_INVALID, message.encode()))

    def _name_matches(self, name: bytes) -> bool:
        """The configured name or the empty (default) name selects our one export."""
        return name in (b"", self.export_name.encode())

    def _info_replies(self, option: int, requests: frozenset[int]) -> bytes:
        """NBD_REP_INFO replies: EXPORT always (the spec requires it), NAME and DESCRIPTION when
        asked, BLOCK_SIZE always (a server may send it unasked, and our constraints are not the
        defaults). Unknown info types are ignored, as the spec says."""
        infos = [struct.pack(">HQH", INFO_EXPORT, self.size, self.transmission_flags)]
        if INFO_NAME in requests:
            infos.append(struct.pack(">H", INFO_NAME) + self.export_name.encode())
        if INFO_DESCRIPTION in requests and self.description:
            infos.append(struct.pack(">H", INFO_DESCRIPTION) + self.description.encode())
        sizes = (self.min_block_size, self.preferred_block_size, self.max_block_size)
        infos.append(struct.pack(">HIII", INFO_BLOCK_SIZE, *sizes))
        return b"".join(encode_option_reply(option, REP_INFO, info) for info in infos)

    def _ready(self, option: int, data: bytes) -> Event:
        self.state = State.TRANSMISSION
        return Ready(option, self.export_name, self.size, self.transmission_flags, data)

    # -- transmission --

    def _read_transmission(self) -> Event | type[NEED_DATA]:
        """Every request passes here, several times: one function, few calls (each is Python)."""
        buffer = self._buffer
        if self._pending is not None:  # a WRITE's payload is being collected
            if buffer.data:
                self._filled += buffer.take_into(memoryview(self._payload_buffer())[self._filled :])
            if self._filled < self._pending[3]:
                return NEED_DATA
            return self._complete_write()
        if self._discard:  # a refused WRITE's payload is being skipped
            self._discard -= buffer.discard(self._discard)
            if self._discard:
                return NEED_DATA
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            return refusal
        header = buffer.unpack(REQUEST_HEADER)
        if header is None:
            return NEED_DATA
        magic, flags, kind, handle, offset, length = header
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        refused = self._refusal_for(kind, flags, offset, length)
        if refused is not None:
            refusal = RequestError(kind, flags, handle, offset, length, *refused)
            if kind != Command.WRITE or not length:
                return refusal
            self._discard = length  # the payload follows anyway; skip it as it arrives
            self._refusal = refusal
            return self._read_transmission()
        if kind == Command.WRITE:
            # The payload: taken at once if buffered (small writes read ahead), else collected.
            data = buffer.take(length) if buffer.data else None
            if data is not None:
                return Request(Command.WRITE, flags, handle, offset, length, data)
            self._pending = (flags, handle, offset, length)
            self._payload = None
            self._whole = None
            self._filled = 0
            return self._read_transmission() if buffer.data else NEED_DATA  # its start may be buffered
        if kind == Command.DISC:
            self.state = State.DONE
        return Request(_COMMANDS[kind], flags, handle, offset, length)

    def _complete_write(self) -> Event:
        pending, payload, whole = self._pending, self._payload, self._whole
        assert pending is not None
        self._pending = self._payload = self._whole = None
        if whole is None:
            assert payload is not None
            whole = memoryview(payload).toreadonly()
        return Request(Command.WRITE, *pending, whole)

    def _refusal_for(self, kind: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """None for a request we will run, else the NBD error to reply and why."""
        allowed = _ALLOWED_FLAGS.get(kind)
        if allowed is None:
            return NBD_EINVAL, f"unsupported command {kind}"
        if flags & ~allowed:
            return NBD_EINVAL, f"flags {flags:#x} not valid for {Command(kind).name}"
        if kind in _WRITE_COMMANDS and self.read_only:
            return NBD_EPERM, "export is read-only"
        if kind not in _RANGED_COMMANDS:
            return None
        if length == 0:
            return NBD_EINVAL, "zero-length request"
        if kind in _PAYLOAD_COMMANDS and length > self.max_block_size:
            return NBD_EINVAL, f"length {length} over the maximum block size {self.max_block_size}"
        if offset % self.min_block_size or length % self.min_block_size:
            return NBD_EINVAL, f"offset {offset} or length {length} unaligned to {self.min_block_size}"
        if offset + length > self.size:
            # The spec asks for ENOSPC when a write reaches past the end of the device.
            error = NBD_ENOSPC if kind in _WRITE_COMMANDS else NBD_EINVAL
            return error, f"range {offset}+{length} past the export size {self.size}"
        return None


def _parse_info_request(data: bytes) -> tuple[bytes, frozenset[int]] | None:
    """NBD_OPT_INFO/GO data: u32 name length, name, u16 count, count x u16 info type."""
    if len(data) < 6:
        return None
    (name_length,) = struct.unpack_from(">I", data)
    if name_length > len(data) - 6:
        return None
    name = data[4 : 4 + name_length]
    (count,) = struct.unpack_from(">H", data, 4 + name_length)
    if len(data) != 6 + name_length + 2 * count:
        return None
    requests = struct.unpack_from(f">{count}H", data, 6 + name_length)
    return name, frozenset(requests)


def _check_export(export_name: str, size: int, min_block: int, max_block: int, description: str) -> None:
    """Refuse an export configuration no client could use correctly."""
    if len(export_name.encode()) > MAX_STRING_LENGTH or len(description.encode()) > MAX_STRING_LENGTH:
        raise ValueError(f"export name and description are limited to {MAX_STRING_LENGTH} bytes")
    if not _is_power_of_two(min_block) or min_block > MAX_MIN_BLOCK_SIZE:
        raise ValueError(f"minimum block size {min_block}: not a power of two <= {MAX_MIN_BLOCK_SIZE}")
    if max_block < min_block or max_block % min_block or max_block > 0xFFFFFFFF:
        raise ValueError(f"maximum block size {max_block} is not a u32 multiple of {min_block}")
    if not 0 <= size <= MAX_EXPORT_SIZE or size % min_block:
        raise ValueError(f"export size {size} is not a multiple of the block size {min_block}")


# The reader for each handshake state (h11's table-driven dispatch); TRANSMISSION's is called
# directly, and DONE and ERROR never read.
_READERS = {
    State.CLIENT_FLAGS: ServerConnection._read_client_flags,
    State.OPTIONS: ServerConnection._read_option,
}

_OPTION_HANDLERS = {
    OPT_EXPORT_NAME: ServerConnection._option_export_name,
    OPT_ABORT: ServerConnection._option_abort,
    OPT_LIST: ServerConnection._option_list,
    OPT_INFO: ServerConnection._option_info_or_go,
    OPT_GO: ServerConnection._option_info_or_go,
}
