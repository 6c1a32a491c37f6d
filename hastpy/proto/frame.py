"""HAST wire framing (hast_proto.c): a 5-byte header, an nv list, then an optional payload.

    packed { uint8 version; uint32le size; }   size = length of the nv list in bytes
    nv list
    payload of nv["size"] bytes (uint32)       only when the field is present and > 0

The same framing carries the handshake, I/O requests and replies. Sans-IO: encode_frame returns
buffers for sendmsg(); FrameReader is fed bytes and hands out complete frames. The only exception
the reader raises for bad input is RemoteProtocolError; encode_frame raises LocalProtocolError for
anything a peer would reject.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

from hastpy.constants import MAXPHYS
from hastpy.errors import LocalProtocolError, NvError, RemoteProtocolError
from hastpy.nv import NvList, NvType

Buffer = Union[bytes, bytearray, memoryview]

HEADER = struct.Struct("<BI")
HEADER_SIZE = HEADER.size  # 5
SIZE_FIELD = "size"
UINT32_MAX = 0xFFFFFFFF

# Largest nv list accepted. hastd's largest over TCP is the handshake reply (a few hundred bytes);
# the 4 KiB metadata block is the largest nv anywhere. 64 KiB leaves room for growth while a
# hostile peer cannot make us buffer an arbitrary header.
MAX_NV_SIZE = 64 * 1024

# Largest payload of an I/O frame. A payload is compressed only when it shrinks (pipeline.py), so
# the wire never carries more than the raw I/O, which is at most the negotiated maxio <= MAXPHYS.
MAX_IO_PAYLOAD = MAXPHYS

# Largest payload of the handshake reply, which carries the secondary's activemap (one bit per
# extent, rounded up to sectors). At the default 2 MiB extent, 10 TiB needs 640 KiB and 64 TiB
# needs 4 MiB; 16 MiB covers 256 TiB at 2 MiB extents (or 8 TiB at 64 KiB extents).
MAX_HANDSHAKE_PAYLOAD = 16 * 1024 * 1024

# FrameReader drops consumed bytes once this many have piled up at the front of its buffer (or
# when they are more than half of it), so a long stream costs O(n) copying, not O(n^2).
_COMPACT_MIN = 64 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """One received frame. payload is empty when the frame has none; it is never copied again."""

    version: int
    nv: NvList
    payload: memoryview


def encode_frame(version: int, nv: NvList, payload: Buffer | None = None) -> list[Buffer]:
    """Frame nv (+ payload) for sendmsg(): [header+nv] or [header+nv, payload].

    The payload object itself is the second buffer, so a 1 MiB write is never copied here. When a
    non-empty payload is given the `size` field is appended to the encoded list (nv itself is not
    modified); the caller must not add one. An empty payload is the same as none, as in hastd.
    """
    if not 0 <= version <= 0xFF:
        raise LocalProtocolError(f"frame version {version} does not fit in uint8")
    if nv.exists(SIZE_FIELD):
        raise LocalProtocolError("nv already has a 'size' field; encode_frame sets it")
    body = nv.encode()
    nbytes = _nbytes(payload) if payload is not None else 0
    if nbytes > UINT32_MAX:
        raise LocalProtocolError(f"payload of {nbytes} bytes does not fit in a uint32 size")
    if nbytes:
        body += NvList().add_uint32(SIZE_FIELD, nbytes).encode()
    if len(body) > MAX_NV_SIZE:
        raise LocalProtocolError(f"nv header of {len(body)} bytes exceeds {MAX_NV_SIZE}")
    head = HEADER.pack(version, len(body)) + body
    return [head, payload] if nbytes else [head]  # type: ignore[list-item]


def encode_frame_nv(version: int, body: bytes, payload: Buffer | None = None) -> list[Buffer]:
    """encode_frame for an nv list the caller has already encoded, `size` field included when
    there is a payload (messages.encode_request_nv and encode_reply_nv do that). The caller
    vouches for body; only what the header itself needs is checked."""
    if len(body) > MAX_NV_SIZE:
        raise LocalProtocolError(f"nv header of {len(body)} bytes exceeds {MAX_NV_SIZE}")
    head = HEADER.pack(version, len(body)) + body
    return [head, payload] if payload is not None and _nbytes(payload) else [head]  # type: ignore[list-item]


def _nbytes(buf: Buffer) -> int:
    try:
        view = memoryview(buf)
    except TypeError:
        raise LocalProtocolError(f"payload must be bytes-like, not {type(buf).__name__}") from None
    if not view.c_contiguous:
        raise LocalProtocolError("payload must be a contiguous buffer")
    return view.nbytes


_WANT_HEADER, _WANT_NV, _WANT_PAYLOAD = range(3)


class FrameReader:
    """Sans-IO frame parser: feed() bytes, take frames with next_frame().

    needed() tells exactly how many more bytes the current step wants, so a blocking reader can
    recv that many and never read past a frame (the handshake hands sockets between processes).
    After the first error the reader is dead: every later next_frame() raises the same error.
    """

    def __init__(
        self,
        max_version: int,
        max_nv: int = MAX_NV_SIZE,
        max_payload: int = MAX_IO_PAYLOAD,
    ):
        self.max_version = max_version
        self.max_nv = max_nv
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed bytes in _buf
        self._state = _WANT_HEADER
        self._version = 0
        self._nvsize = 0
        self._nv: NvList | None = None
        # Writable view of the payload being received; feed() fills it in place. (Slice
        # assignment through a memoryview is a memcpy; through a bytearray it is ~15x slower.)
        self._payload: memoryview | None = None
        self._filled = 0
        self._error: RemoteProtocolError | None = None

    # -- input ------------------------------------------------------------------------------

    def feed(self, data: Buffer) -> None:
        if self._error is not None:
            return  # dead reader: the error is re-raised by next_frame()
        view = memoryview(data).cast("B")
        if self._payload is not None:
            take = min(len(view), len(self._payload) - self._filled)
            self._payload[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
        if len(view):
            self._compact()
            self._buf += view

    def needed(self) -> int:
        """Bytes still missing for the current step; 0 means next_frame() can progress now."""
        if self._error is not None:
            return 0
        if self._state == _WANT_PAYLOAD:
            assert self._payload is not None
            return len(self._payload) - self._filled
        want = HEADER_SIZE if self._state == _WANT_HEADER else self._nvsize
        return max(want - self._available(), 0)

    # -- output -----------------------------------------------------------------------------

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        try:
            return self._advance()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _advance(self) -> Frame | None:
        if self._state == _WANT_HEADER:
            if self._available() < HEADER_SIZE:
                return None
            self._read_header()
        if self._state == _WANT_NV:
            if self._available() < self._nvsize:
                return None
            self._read_nv()
        if self._state == _WANT_PAYLOAD:
            assert self._payload is not None
            if self._filled < len(self._payload):
                return None
            payload, self._payload = self._payload, None
            return self._emit(payload)
        return self._emit(memoryview(b""))

    def _read_header(self) -> None:
        version, size = HEADER.unpack_from(self._buf, self._pos)
        self._pos += HEADER_SIZE
        if version > self.max_version:
            # hastd answers this with ERPCMISMATCH.
            raise RemoteProtocolError(
                f"RPC version mismatch: peer framed version {version}, "
                f"we speak up to {self.max_version}"
            )
        if size > self.max_nv:
            raise RemoteProtocolError(f"nv header of {size} bytes exceeds the limit {self.max_nv}")
        self._version = version
        self._nvsize = size
        self._state = _WANT_NV

    def _read_nv(self) -> None:
        end = self._pos + self._nvsize
        # A copy (<= max_nv bytes): a view would pin _buf against resizing for as long as an
        # exception traceback keeps it alive.
        raw = bytes(self._buf[self._pos : end])
        self._pos = end
        try:
            nv = NvList.decode(raw)
            size = nv.get_int(SIZE_FIELD, NvType.UINT32, 0)
        except NvError as exc:
            raise RemoteProtocolError(f"bad nv header: {exc}") from exc
        self._nv = nv
        if size > self.max_payload:
            limit = self.max_payload
            raise RemoteProtocolError(f"payload of {size} bytes exceeds the limit {limit}")
        if size:
            self._start_payload(size)
        else:
            self._state = _WANT_HEADER

    def _start_payload(self, size: int) -> None:
        # Move whatever of the payload is already buffered; feed() writes the rest in place.
        take = min(size, self._available())
        payload = memoryview(bytearray(size))
        with memoryview(self._buf) as view:
            payload[:take] = view[self._pos : self._pos + take]
        self._pos += take
        self._payload = payload
        self._filled = take
        self._state = _WANT_PAYLOAD

    def _emit(self, payload: memoryview) -> Frame:
        assert self._nv is not None
        frame = Frame(self._version, self._nv, payload)
        self._nv = None
        self._state = _WANT_HEADER
        return frame

    # -- buffer -----------------------------------------------------------------------------

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _compact(self) -> None:
        pos = self._pos
        if pos == 0:
            return
        if pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif pos >= _COMPACT_MIN or pos * 2 >= len(self._buf):
            del self._buf[:pos]
            self._pos = 0
