"""The one module that opens TCP sockets: connect, listen, socket options, blocking framed I/O.

Everything above it (primary, secondary, supervisor) gets connected sockets and sends or receives
whole frames through `send_frame` / `recv_frame`; the byte formats live in hastpy.proto.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from hastpy.constants import DEFAULT_PORT, MAX_IOV
from hastpy.config import parse_tcp_address
from hastpy.errors import NvError, RemoteProtocolError
from hastpy.nv import NvLayout, NvList, NvType
from hastpy.proto.messages import REQUEST_WITH_PAYLOAD_LAYOUT
from hastpy.proto.frame import (
    HEADER,
    HEADER_SIZE,
    MAX_HANDSHAKE_PAYLOAD,
    MAX_NV_SIZE,
    SIZE_FIELD,
    Frame,
    FrameReader,
    encode_frame,
)

# proto_tcp.c: listeners get a backlog of 8; two connections per resource, few resources.
LISTEN_BACKLOG = 8
# FrameStream's buffer for frame headers and nv lists: room for the largest nv list (64 KiB)
# and for a few thousand small replies per recv. Payloads above SMALL_PAYLOAD bypass it (recv_into
# their own buffer).
HEAD_BUFFER = 2 * MAX_NV_SIZE
# FrameStream's read-ahead on a stream of frames that carry large payloads (the secondary's
# requests), counted from a frame's start: exactly the frame header and nv list of a plain WRITE,
# so that nothing of its payload comes with them. A payload partly read ahead has to be assembled
# in a buffer of its own allocated zero-filled (a memset of the whole payload, up to maxio) before
# the rest is received into it; one with nothing read ahead is received whole into a buffer recv
# allocates unfilled. A longer header (memsync, hastd's default; checksum or compression fields)
# costs one more receive, never a payload byte.
PAYLOAD_READ_AHEAD = HEADER_SIZE + REQUEST_WITH_PAYLOAD_LAYOUT.size
# ... except after a frame whose payload was at most this: small frames come in runs (random 4 KiB
# writes), and one receive of the whole buffer then brings several of them, payloads included,
# for one system call instead of two per frame.
SMALL_PAYLOAD = 64 * 1024
# Kernel socket buffers big enough for several MiB of requests in flight on a fast link.
SOCKET_BUFFER = 4 * 1024 * 1024
# TCP keepalive: a peer that vanished without FIN/RST is noticed in ~KEEPIDLE + KEEPINTVL*KEEPCNT.
KEEPIDLE, KEEPINTVL, KEEPCNT = 10, 5, 3


def _resolve(addr: str, passive: bool = False, default_port: int = DEFAULT_PORT) -> tuple[int, tuple]:
    family_hint, host, port = parse_tcp_address(addr, default_port)
    # hastd passes AI_ADDRCONFIG; we do not: on a host whose only interface is loopback it makes
    # even 127.0.0.1 unresolvable.
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = socket.getaddrinfo(host or None, port, family_hint, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {addr}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]  # hastd uses the first result too
    return family, sockaddr


def tune(sock: socket.socket, timeout: float | None) -> None:
    """Options every replication socket gets (proto_tcp.c sets TCP_NODELAY; the rest is ours)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    set_timeout(sock, timeout)


def set_timeout(sock: socket.socket, timeout: float | None) -> None:
    """Make sock blocking, its sends and receives timing out after `timeout` s (None: never).

    Kernel timeouts (SO_SNDTIMEO/SO_RCVTIMEO, as hastd), not Python's: those cost a poll()
    before every call, and they live in the Python object only, so a descriptor handed to a
    worker arrived there non-blocking while the worker's socket object believed it blocking, and
    a send into a full buffer failed with EAGAIN instead of waiting. Kernel timeouts travel with
    the descriptor. A timeout surfaces as TimeoutError from send_frame, FrameStream and recv_one.
    """
    sock.settimeout(None)
    if timeout is None or timeout <= 0:
        tv = struct.pack("ll", 0, 0)  # 0: no timeout
    else:
        sec = int(timeout)
        tv = struct.pack("ll", sec, max(int((timeout - sec) * 1e6), 0 if sec else 1))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def connect(remote: str, source: str | None, timeout: float, connect_timeout: float | None = None) -> socket.socket:
    """A connected, tuned TCP socket to remote (optionally bound to source first, as hastd).
    timeout bounds each send and receive on it; connect_timeout, if given, the TCP connect
    alone (else timeout does)."""
    family, sockaddr = _resolve(remote)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if source:
            # hastd binds the source to any port unless one is given.
            _, saddr = _resolve(source, passive=True, default_port=0)
            sock.bind(saddr)
        sock.settimeout(timeout if connect_timeout is None else connect_timeout)
        sock.connect(sockaddr)
        tune(sock, timeout)
        return sock
    except BaseException:
        sock.close()
        raise


def listen(addr: str) -> socket.socket:
    family, sockaddr = _resolve(addr, passive=True)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        return sock
    except BaseException:
        sock.close()
        raise


def peer_host(sock: socket.socket) -> str:
    """The peer's IP address as text (the port is not part of hastd's access check)."""
    return sock.getpeername()[0]


def send_frame(sock: socket.socket, version: int, nv: NvList, payload=None) -> None:
    """Send one frame without joining the payload to the header (no copy of a 1 MiB buffer)."""
    send_buffers(sock, encode_frame(version, nv, payload))


def send_buffers(sock: socket.socket, buffers) -> None:
    """Send every buffer in order (one frame from encode_frame or encode_frame_nv) with sendmsg;
    a kernel send timeout becomes TimeoutError."""
    bufs = [memoryview(b).cast("B") for b in buffers if len(b)]
    while bufs:
        try:
            sent = sock.sendmsg(bufs[:MAX_IOV])
        except BlockingIOError:
            raise TimeoutError("send timed out") from None
        while sent:
            if sent >= len(bufs[0]):
                sent -= len(bufs[0])
                bufs.pop(0)
            else:
                bufs[0] = bufs[0][sent:]
                sent = 0


class FrameStream:
    """Blocking reads of whole frames from a socket. Owned by one reader thread.

    Header and nv list come through a small buffer (many small frames per recv), and so do
    payloads of at most SMALL_PAYLOAD; a larger payload is received straight into its own buffer
    with recv_into: one copy, from the kernel, with the GIL released, instead of a recv into a
    temporary and a second copy under the GIL. The checks
    and errors are FrameReader's (hastpy.proto.frame).
    """

    def __init__(
        self,
        sock: socket.socket,
        max_version: int,
        max_payload: int,
        layouts: tuple[NvLayout, ...] = (),
        read_ahead: int = HEAD_BUFFER,
        on_wait: Callable[[], None] | None = None,
    ):
        """layouts: the fixed nv layouts this stream mostly carries (messages.REQUEST_LAYOUTS,
        REPLY_LAYOUTS), tried in order before the generic decoder; same result, less work.
        read_ahead: the most one receive for headers asks for. Bytes past the nv list that
        belong to a payload are copied out of the buffer; a stream of payload-carrying frames
        (the secondary's requests) uses PAYLOAD_READ_AHEAD so that almost all of a payload
        arrives straight in its own buffer, a stream of small frames (replies) the whole buffer;
        after a frame with 1 to SMALL_PAYLOAD bytes of payload the whole buffer either way.
        on_wait: called before every receive from the socket, i.e. before this thread may wait
        for the peer (a reader that holds back its own sends flushes them there)."""
        self._sock = sock
        self.max_version = max_version
        self.max_payload = max_payload
        self._layouts = layouts
        self._read_ahead = read_ahead
        self._ahead = read_ahead  # for the next header: read_ahead, or all after a small frame
        self._on_wait = on_wait
        self._buf = bytearray(HEAD_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # unconsumed bytes are _buf[_start:_end]
        self._end = 0

    def recv(self) -> Frame:
        """The next frame; ConnectionError at EOF, RemoteProtocolError on a malformed one."""
        version, nvsize = HEADER.unpack(self._take(HEADER_SIZE, self._ahead))
        if version > self.max_version:
            raise RemoteProtocolError(
                f"RPC version mismatch: peer framed version {version}, we speak up to {self.max_version}"
            )
        if nvsize > MAX_NV_SIZE:
            raise RemoteProtocolError(f"nv header of {nvsize} bytes exceeds the limit {MAX_NV_SIZE}")
        # The read-ahead counts from the frame's start: what it allowed for the header is spent.
        raw = self._take(nvsize, self._ahead - HEADER_SIZE)
        nv = None
        for layout in self._layouts:
            nv = layout.decode(raw)
            if nv is not None:
                break
        try:
            if nv is None:
                nv = NvList.decode(raw)
            size = nv.get_int(SIZE_FIELD, NvType.UINT32, 0)
        except NvError as exc:
            raise RemoteProtocolError(f"bad nv header: {exc}") from exc
        if size > self.max_payload:
            raise RemoteProtocolError(f"payload of {size} bytes exceeds the limit {self.max_payload}")
        if not size:  # a KEEPALIVE or FLUSH says nothing about the payloads coming next
            return Frame(version, nv, memoryview(b""))
        self._ahead = HEAD_BUFFER if size <= SMALL_PAYLOAD else self._read_ahead
        if size <= SMALL_PAYLOAD:  # through the buffer, with the frames behind it
            return Frame(version, nv, memoryview(self._take(size, self._ahead)))
        got = min(size, self._end - self._start)
        if not got:
            # The common case: nothing of it read ahead. One receive into a bytes that recv
            # allocates (not zero-filled, unlike a bytearray: that memset was 5 % of the
            # secondary's CPU); a short one (a signal) continues into a buffer below.
            if self._on_wait is not None:
                self._on_wait()
            try:
                data = self._sock.recv(size, socket.MSG_WAITALL)
            except BlockingIOError:
                raise TimeoutError("receive timed out") from None
            if len(data) == size:
                return Frame(version, nv, memoryview(data))
            if not data:
                raise ConnectionError("connection closed by peer")
        payload = memoryview(bytearray(size))
        if got:
            payload[:got] = self._view[self._start : self._start + got]
            self._start += got
        else:
            got = len(data)
            payload[:got] = data
        while got < size:
            n = self._recv_into(payload[got:], socket.MSG_WAITALL)
            if not n:
                raise ConnectionError("connection closed by peer")
            got += n
        return Frame(version, nv, payload)

    def _take(self, n: int, ahead: int) -> bytes:
        """The next n bytes (n <= HEAD_BUFFER); a receive asks for up to `ahead` bytes from here."""
        if self._end - self._start < n:
            if self._start:
                left = self._end - self._start
                self._view[:left] = self._view[self._start : self._end]
                self._start, self._end = 0, left
            while self._end < n:
                limit = min(HEAD_BUFFER, self._start + max(n, ahead))
                got = self._recv_into(self._view[self._end : limit])
                if not got:
                    raise ConnectionError("connection closed by peer")
                self._end += got
        out = bytes(self._view[self._start : self._start + n])
        self._start += n
        return out

    def _recv_into(self, view: memoryview, flags: int = 0) -> int:
        if self._on_wait is not None:
            self._on_wait()
        try:
            return self._sock.recv_into(view, 0, flags)
        except BlockingIOError:
            raise TimeoutError("receive timed out") from None


def recv_one(sock: socket.socket, max_version: int, max_payload: int = MAX_HANDSHAKE_PAYLOAD) -> Frame:
    """Read exactly one frame and nothing past it (handshakes: the reply may carry the bitmap)."""
    reader = FrameReader(max_version, max_payload=max_payload)
    while True:
        frame = reader.next_frame()
        if frame is not None:
            return frame
        want = reader.needed()
        if want <= 0:
            raise RemoteProtocolError("frame reader stalled")
        try:
            chunk = sock.recv(want)
        except BlockingIOError:
            raise TimeoutError("receive timed out") from None
        if not chunk:
            raise ConnectionError("connection closed by peer")
        reader.feed(chunk)
