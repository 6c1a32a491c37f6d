"""A small blocking NBD client: fixed newstyle, NBD_OPT_GO, simple replies.

For our tests and benchmarks, not for production: the kernel, nbdfuse and qemu are the real
clients. Besides one-request-at-a-time calls (pread, pwrite, flush, ...) it can keep many requests
in flight: `submit()` sends and returns the handle, `reply(handle)` collects that request's reply,
stashing others that arrive first (the server may reply in any order).

Not thread-safe. A pipelining caller must not keep more requests in flight than the server admits
(hastpy.nbd.server.MAX_IN_FLIGHT) without reading replies: the server then stops reading, and a
client that is itself blocked in send never reads the replies that would free it.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from hastpy.errors import ProtocolError, RemoteProtocolError
from hastpy.nbd.codec import (
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CLIENT_FLAGS,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_CAN_MULTI_CONN,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    FLAG_READ_ONLY,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    OPT_GO,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REP_ACK,
    REP_FLAG_ERROR,
    REP_INFO,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_HEADER,
    SIMPLE_REPLY_MAGIC,
    Command,
)
from hastpy.nbd.server import sendall_vectored

# Option replies larger than this are not something a server sends to a GO; refusing to buffer
# them keeps a broken server from making us allocate at will.
MAX_OPTION_REPLY = 64 * 1024


class OptionRefused(ProtocolError):
    """The server answered our option with an error reply (e.g. NBD_REP_ERR_UNKNOWN)."""

    def __init__(self, option: int, reply_type: int, message: str) -> None:
        self.option = option
        self.reply_type = reply_type
        self.message = message
        super().__init__(f"option {option} refused with {reply_type:#x}: {message}")


@dataclass(frozen=True, slots=True)
class Reply:
    """One simple reply: the request's handle, its NBD error (0: success) and a READ's data."""

    handle: int
    error: int
    data: bytes = b""

    def check(self) -> bytes:
        """The data, or OSError carrying the NBD error (NBD errors are Linux errno values)."""
        if self.error:
            raise OSError(self.error, os.strerror(self.error))
        return self.data


class NBDClient:
    """A connected client in transmission phase, created by `connect_unix()` or around a socket."""

    def __init__(self, sock: socket.socket, export_name: str = "") -> None:
        self._sock = sock
        self._next_handle = 1
        self._pending: dict[int, tuple[Command, int]] = {}  # handle -> (kind, length) awaiting reply
        self._stash: dict[int, Reply] = {}  # replies received before they were asked for
        self.size = 0
        self.transmission_flags = 0
        self.block_sizes: tuple[int, int, int] | None = None  # minimum, preferred, maximum
        self._handshake(export_name)

    @classmethod
    def connect_unix(
        cls, path: str | os.PathLike[str], export_name: str = "", timeout: float | None = None
    ) -> NBDClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
            return cls(sock, export_name)
        except BaseException:
            sock.close()
            raise

    @property
    def read_only(self) -> bool:
        return bool(self.transmission_flags & FLAG_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.transmission_flags & FLAG_CAN_MULTI_CONN)

    # -- handshake --

    def _handshake(self, export_name: str) -> None:
        magic, opt_magic, flags = GREETING.unpack(self._recv_exact(GREETING.size))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise RemoteProtocolError("not a newstyle NBD server")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise RemoteProtocolError("server does not offer fixed newstyle negotiation")
        client_flags = FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if flags & FLAG_NO_ZEROES else 0)
        name = export_name.encode()
        go = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        option = OPTION_HEADER.pack(IHAVEOPT, OPT_GO, len(go)) + go
        self._sock.sendall(CLIENT_FLAGS.pack(client_flags) + option)
        while self._read_go_reply():
            pass
        if not self.transmission_flags:
            raise RemoteProtocolError("server finished NBD_OPT_GO without NBD_INFO_EXPORT")

    def _read_go_reply(self) -> bool:
        """Read one reply to our GO; False once it is the final ACK."""
        header = self._recv_exact(OPTION_REPLY_HEADER.size)
        magic, option, reply_type, length = OPTION_REPLY_HEADER.unpack(header)
        if magic != OPTION_REPLY_MAGIC or option != OPT_GO or length > MAX_OPTION_REPLY:
            raise RemoteProtocolError(f"bad option reply ({magic:#x}, option {option}, {length} bytes)")
        data = bytes(self._recv_exact(length))
        if reply_type == REP_ACK:
            return False
        if reply_type & REP_FLAG_ERROR:
            raise OptionRefused(option, reply_type, data.decode(errors="replace"))
        if reply_type == REP_INFO and len(data) >= 2:
            self._take_info(data)
        return True

    def _take_info(self, data: bytes) -> None:
        (info,) = struct.unpack_from(">H", data)
        if info == INFO_EXPORT and len(data) == 12:
            self.size, self.transmission_flags = struct.unpack_from(">QH", data, 2)
        elif info == INFO_BLOCK_SIZE and len(data) == 14:
            self.block_sizes = struct.unpack_from(">III", data, 2)

    # -- pipelined requests --

    def submit(
        self,
        kind: Command,
        offset: int = 0,
        length: int = 0,
        data: bytes | memoryview = b"",
        flags: int = 0,
    ) -> int:
        """Send one request; return its handle. A WRITE's length is its data's."""
        if kind == Command.WRITE:
            length = len(data)
        handle = self._next_handle
        self._next_handle += 1
        header = REQUEST_HEADER.pack(REQUEST_MAGIC, flags, kind, handle, offset, length)
        sendall_vectored(self._sock, [header, data])
        if kind != Command.DISC:
            self._pending[handle] = (kind, length)
        return handle

    def submit_many(self, requests: Sequence[tuple[Command, int, bytes | memoryview]]) -> list[int]:
        """Send WRITEs, each (kind, offset, data), in one vectored send, so that they reach the
        server together; return their handles in order."""
        handles, buffers = [], []
        for kind, offset, data in requests:
            handle = self._next_handle
            self._next_handle += 1
            buffers += [REQUEST_HEADER.pack(REQUEST_MAGIC, 0, kind, handle, offset, len(data)), data]
            handles.append(handle)
        sendall_vectored(self._sock, buffers)
        for handle, (kind, _, data) in zip(handles, requests):
            self._pending[handle] = (kind, len(data))
        return handles

    def next_reply(self) -> Reply:
        """Receive whichever reply comes next."""
        magic, error, handle = SIMPLE_REPLY_HEADER.unpack(self._recv_exact(SIMPLE_REPLY_HEADER.size))
        if magic != SIMPLE_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad reply magic {magic:#x}")
        try:
            kind, length = self._pending.pop(handle)
        except KeyError:
            raise RemoteProtocolError(f"reply for unknown handle {handle:#x}") from None
        data = b""
        if kind == Command.READ and not error:
            data = bytes(self._recv_exact(length))
        return Reply(handle, error, data)

    def reply(self, handle: int) -> Reply:
        """The reply to `handle`, receiving (and stashing) others until it arrives."""
        while handle not in self._stash:
            if handle not in self._pending:
                raise KeyError(f"no request {handle:#x} in flight")
            got = self.next_reply()
            self._stash[got.handle] = got
        return self._stash.pop(handle)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- one request at a time --

    def pread(self, offset: int, length: int) -> bytes:
        return self.reply(self.submit(Command.READ, offset, length)).check()

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        flags = CMD_FLAG_FUA if fua else 0
        self.reply(self.submit(Command.WRITE, offset, data=data, flags=flags)).check()

    def flush(self) -> None:
        self.reply(self.submit(Command.FLUSH)).check()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.reply(self.submit(Command.TRIM, offset, length, flags=CMD_FLAG_FUA if fua else 0)).check()

    def write_zeroes(self, offset: int, length: int, fua: bool = False, may_trim: bool = True) -> None:
        flags = (CMD_FLAG_FUA if fua else 0) | (0 if may_trim else CMD_FLAG_NO_HOLE)
        self.reply(self.submit(Command.WRITE_ZEROES, offset, length, flags=flags)).check()

    # -- ending --

    def disconnect(self) -> None:
        """Collect outstanding replies (the spec asks clients to), send DISC, close."""
        try:
            while self._pending:
                got = self.next_reply()
                self._stash[got.handle] = got
            self.submit(Command.DISC)
        finally:
            self.close()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.disconnect()
        else:
            self.close()

    def _recv_exact(self, n: int) -> bytearray:
        buffer = bytearray(n)
        view = memoryview(buffer)
        got = 0
        while got < n:
            chunk = self._sock.recv_into(view[got:])
            if not chunk:
                raise RemoteProtocolError(f"server closed the connection ({got} of {n} bytes read)")
            got += chunk
        return buffer
