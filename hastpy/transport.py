"""The one module that opens TCP sockets: connect, listen, socket options, blocking framed I/O.

Everything above it (primary, secondary, supervisor) gets connected sockets and sends or receives
whole frames through `send_frame` / `recv_frame`; the byte formats live in hastpy.proto.
"""

from __future__ import annotations

import socket

from hastpy.constants import DEFAULT_PORT
from hastpy.config import parse_tcp_address
from hastpy.errors import RemoteProtocolError
from hastpy.nv import NvList
from hastpy.proto.frame import MAX_HANDSHAKE_PAYLOAD, Frame, FrameReader, encode_frame

# proto_tcp.c: listeners get a backlog of 8; two connections per resource, few resources.
LISTEN_BACKLOG = 8
# Receive in chunks this large: one syscall per 1 MiB write payload instead of per TCP segment.
RECV_CHUNK = 1024 * 1024
# Kernel socket buffers big enough for several MiB of requests in flight on a fast link.
SOCKET_BUFFER = 4 * 1024 * 1024
# TCP keepalive: a peer that vanished without FIN/RST is noticed in ~KEEPIDLE + KEEPINTVL*KEEPCNT.
KEEPIDLE, KEEPINTVL, KEEPCNT = 10, 5, 3


def _resolve(addr: str, passive: bool = False, default_port: int = DEFAULT_PORT) -> tuple[int, tuple]:
    family_hint, host, port = parse_tcp_address(addr, default_port)
    flags = socket.AI_ADDRCONFIG | (socket.AI_PASSIVE if passive else 0)
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
    sock.settimeout(timeout)


def connect(remote: str, source: str | None, timeout: float) -> socket.socket:
    """A connected, tuned TCP socket to remote (optionally bound to source first, as hastd)."""
    family, sockaddr = _resolve(remote)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if source:
            # hastd binds the source to any port unless one is given.
            _, saddr = _resolve(source, passive=True, default_port=0)
            sock.bind(saddr)
        sock.settimeout(timeout)
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
    bufs = [memoryview(b).cast("B") for b in encode_frame(version, nv, payload) if len(b)]
    while bufs:
        sent = sock.sendmsg(bufs)
        while sent:
            if sent >= len(bufs[0]):
                sent -= len(bufs[0])
                bufs.pop(0)
            else:
                bufs[0] = bufs[0][sent:]
                sent = 0


class FrameStream:
    """Blocking reads of whole frames from a socket. Owned by one reader thread."""

    def __init__(self, sock: socket.socket, max_version: int, max_payload: int):
        self._sock = sock
        self._reader = FrameReader(max_version, max_payload=max_payload)

    def recv(self) -> Frame:
        """The next frame; ConnectionError at EOF, RemoteProtocolError on a malformed one."""
        while True:
            frame = self._reader.next_frame()
            if frame is not None:
                return frame
            chunk = self._sock.recv(max(RECV_CHUNK, self._reader.needed()))
            if not chunk:
                raise ConnectionError("connection closed by peer")
            self._reader.feed(chunk)


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
        chunk = sock.recv(want)
        if not chunk:
            raise ConnectionError("connection closed by peer")
        reader.feed(chunk)
