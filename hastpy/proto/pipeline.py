"""Payload pipeline (hast_proto.c, hast_compression.c, hast_checksum.c): compress, then checksum.

Send: compress with the sender's configured algorithm, adding `compression:string` only if the
payload shrank; then add `checksum:string` + `hash:uint8[]` computed over the bytes actually sent.
Receive: verify first, then decompress, driven only by the fields present (the receiver's own
settings do not matter). Applies to WRITE data, READ replies and the handshake bitmap.

    hole  an all-zero buffer travels as its length, uint32le
    lzf   hole first; else for buffers over 1024 bytes: uint32le original length + raw liblzf
          output, at most 4 + len - 1024 bytes in all; else uncompressed
    crc32 zlib's CRC-32 stored as 4 bytes, little-endian (hastd copies the host-order uint32)
    sha256 the 32-byte digest

LZF comes from python-neo-lzf (module `lzf`), a binding of liblzf that reads and writes raw LZF
with no header of its own; FreeBSD's hastd uses the same liblzf format.

Hot path: with compression none (or hole on non-zero data) and checksum none, encode_payload
hands back the caller's buffer untouched, and decode_payload returns the received one.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from types import ModuleType

from hastpy.errors import LocalProtocolError, NvError, RemoteProtocolError
from hastpy.nv import NvList
from hastpy.proto.frame import MAX_HANDSHAKE_PAYLOAD, Buffer, Frame, encode_frame, encode_frame_nv

try:
    import lzf as _lzf
except ImportError:  # pragma: no cover - a declared dependency; see _require_lzf
    _lzf = None

COMPRESSION_NONE = "none"
COMPRESSION_HOLE = "hole"
COMPRESSION_LZF = "lzf"
COMPRESSIONS = (COMPRESSION_NONE, COMPRESSION_HOLE, COMPRESSION_LZF)

CHECKSUM_NONE = "none"
CHECKSUM_CRC32 = "crc32"
CHECKSUM_SHA256 = "sha256"
CHECKSUMS = (CHECKSUM_NONE, CHECKSUM_CRC32, CHECKSUM_SHA256)

# Original length in front of hole and lzf data.
_ORIGSIZE = struct.Struct("<I")
# The nv fields encode_payload may add; decode_payload looks for them.
_PIPELINE_FIELDS = frozenset(("compression", "checksum", "hash"))
_UINT32_MAX = 0xFFFFFFFF

# hast_compression.c HAST_LZF_COMPRESS_MIN: smaller buffers are not worth compressing, and a
# compressed buffer must save at least this much to be sent compressed.
LZF_COMPRESS_MIN = 1024

# Compared against slices of the payload; bytearray == memoryview is a memcmp, whereas
# memoryview == memoryview goes element by element (50x slower). Never mutate.
_ZERO_CHUNK = bytearray(64 * 1024)


# -- send ---------------------------------------------------------------------------------------


def encode_payload(data: Buffer, compression: str, checksum: str, nv: NvList) -> Buffer:
    """The bytes to send for data; adds the pipeline's fields to nv (in hastd's order).

    Returns data itself when nothing changes it. Frame the result with encode_frame, which adds
    `size` after these fields.
    """
    _check_algorithms(compression, checksum)
    for name in ("compression", "checksum", "hash"):
        if nv.exists(name):
            raise LocalProtocolError(f"nv already has a {name!r} field")
    used, wire = _compress(data, compression)
    if used != COMPRESSION_NONE:
        nv.add_string("compression", used)
    if checksum != CHECKSUM_NONE:
        nv.add_string("checksum", checksum)
        nv.add_bytes("hash", _digest(checksum, wire))
    return wire


def _check_algorithms(compression: str, checksum: str) -> None:
    if compression not in COMPRESSIONS:
        raise LocalProtocolError(f"unknown compression {compression!r}")
    if checksum not in CHECKSUMS:
        raise LocalProtocolError(f"unknown checksum {checksum!r}")


def encode_io_frame(version: int, message, fast_nv, data: Buffer | None, compression: str, checksum: str) -> list[Buffer]:
    """The frame buffers of one I/O request or reply (a messages.Request or Reply) and its payload.

    fast_nv(message, payload_size) is the message's fixed-layout nv with the frame's size field
    (messages.encode_request_nv or encode_reply_nv), or None where it needs the generic encoder;
    it is used when the payload passes through the pipeline unchanged. Same bytes either way.
    """
    body = None
    if data is None:
        body = fast_nv(message, 0)
    elif passes_through(data, compression, checksum):
        body = fast_nv(message, memoryview(data).nbytes)
    if body is not None:  # the hot path: one struct pack
        return encode_frame_nv(version, body, data)
    nv = message.to_nv()
    payload = None if data is None else encode_payload(data, compression, checksum, nv)
    return encode_frame(version, nv, payload)


def passes_through(data: Buffer, compression: str, checksum: str) -> bool:
    """Whether encode_payload(data, compression, checksum, nv) would return data itself and add
    no field to nv: no checksum, and no compression that applies (hole: data is not all zeroes;
    lzf is not predicted, it always takes the generic path). The hot path's test: then the
    request's nv is a fixed layout (messages.encode_request_nv)."""
    if checksum != CHECKSUM_NONE:
        return False
    if compression == COMPRESSION_NONE:
        return True
    if compression != COMPRESSION_HOLE:
        return False
    size = memoryview(data).nbytes
    return size <= _ORIGSIZE.size or size > _UINT32_MAX or not is_all_zero(data)


def _compress(data: Buffer, compression: str) -> tuple[str, Buffer]:
    """(algorithm actually used, bytes to send)."""
    if compression == COMPRESSION_NONE:
        return COMPRESSION_NONE, data
    view = memoryview(data).cast("B")
    size = len(view)
    if size > _UINT32_MAX:
        return COMPRESSION_NONE, data
    if size > _ORIGSIZE.size and is_all_zero(view):
        return COMPRESSION_HOLE, _ORIGSIZE.pack(size)
    if compression == COMPRESSION_LZF:
        packed = _lzf_compress(data, size)
        if packed is not None:
            return COMPRESSION_LZF, packed
    return COMPRESSION_NONE, data


def is_all_zero(data: Buffer) -> bool:
    """True if every byte is 0. About 25 us per MiB, and no copy."""
    view = memoryview(data).cast("B")
    size = len(view)
    if size == 0:
        return True
    # hastd's trick: most buffers are not zero, and first, middle or last byte says so at once.
    if view[0] or view[size // 2] or view[-1]:
        return False
    step = len(_ZERO_CHUNK)
    whole = size - size % step
    for off in range(0, whole, step):
        if _ZERO_CHUNK != view[off : off + step]:
            return False
    return whole == size or _ZERO_CHUNK[: size - whole] == view[whole:]


def _lzf_compress(data: Buffer, size: int) -> bytes | None:
    if size <= LZF_COMPRESS_MIN:
        return None
    lzf = _require_lzf()
    limit = size - LZF_COMPRESS_MIN  # hastd's output buffer: origsize - HAST_LZF_COMPRESS_MIN
    raw = lzf.compress(data if isinstance(data, bytes) else bytes(data), limit)
    # The binding may overshoot max_len by one byte; hastd's buffer would not hold it.
    if raw is None or len(raw) > limit:
        return None
    return _ORIGSIZE.pack(size) + raw


def _digest(checksum: str, data: Buffer) -> bytes:
    if checksum == CHECKSUM_CRC32:
        return struct.pack("<I", zlib.crc32(data))
    return hashlib.sha256(data).digest()


def pack(
    version: int,
    nv: NvList,
    data: Buffer | None = None,
    compression: str = COMPRESSION_NONE,
    checksum: str = CHECKSUM_NONE,
) -> list[Buffer]:
    """Pipeline + frame in one step: buffers for sendmsg(). No data (or empty) means no payload,
    and then no pipeline fields, as in hastd."""
    if data is None or memoryview(data).nbytes == 0:
        return encode_frame(version, nv, None)
    return encode_frame(version, nv, encode_payload(data, compression, checksum, nv))


# -- receive ------------------------------------------------------------------------------------


def decode_payload(
    payload: Buffer,
    nv: NvList,
    max_size: int = MAX_HANDSHAKE_PAYLOAD,
    expected_size: int | None = None,
) -> Buffer:
    """The original data of a received payload: verify the checksum, then decompress.

    max_size bounds the decoded length before anything is allocated (a 4-byte hole can claim
    4 GiB). expected_size, if given, must match exactly (READ length, WRITE length, mapsize).
    Returns payload itself when there is nothing to undo. An empty payload skips the pipeline,
    as in hastd. Every failure is a RemoteProtocolError.
    """
    fixed = nv.layout_values()
    if fixed is not None and _PIPELINE_FIELDS.isdisjoint(fixed[0].index):
        compression = checksum = digest = None  # a fixed layout without them: nothing to look up
    else:
        try:
            compression = nv.get_string("compression")
            checksum = nv.get_string("checksum")
            digest = nv.get_bytes("hash")
        except NvError as exc:
            raise RemoteProtocolError(f"bad pipeline field: {exc}") from exc
    data = payload
    if memoryview(payload).nbytes:
        if checksum is not None:
            _verify(payload, checksum, digest)
        if compression is not None:
            data = _decompress(payload, compression, max_size)
    size = memoryview(data).nbytes
    if size > max_size:
        raise RemoteProtocolError(f"payload of {size} bytes exceeds the limit of {max_size}")
    if expected_size is not None and size != expected_size:
        raise RemoteProtocolError(f"payload of {size} bytes, expected {expected_size}")
    return data


def unpack(
    frame: Frame, max_size: int = MAX_HANDSHAKE_PAYLOAD, expected_size: int | None = None
) -> Buffer:
    """decode_payload for a received frame."""
    return decode_payload(frame.payload, frame.nv, max_size, expected_size)


def _verify(payload: Buffer, checksum: str, digest: bytes | None) -> None:
    if checksum not in CHECKSUMS or checksum == CHECKSUM_NONE:
        raise RemoteProtocolError(f"unknown checksum algorithm {checksum!r}")
    if digest is None:
        raise RemoteProtocolError("checksum without hash")
    if _digest(checksum, payload) != digest:
        raise RemoteProtocolError(f"{checksum} checksum mismatch")


def _decompress(payload: Buffer, compression: str, max_size: int) -> bytes:
    view = memoryview(payload).cast("B")
    if compression == COMPRESSION_HOLE:
        if len(view) != _ORIGSIZE.size:
            raise RemoteProtocolError(f"hole payload of {len(view)} bytes, not {_ORIGSIZE.size}")
        return bytes(_origsize(view, max_size))
    if compression == COMPRESSION_LZF:
        if len(view) <= _ORIGSIZE.size:
            raise RemoteProtocolError(f"lzf payload of {len(view)} bytes is too short")
        return _lzf_decompress(view, _origsize(view, max_size))
    raise RemoteProtocolError(f"unknown compression algorithm {compression!r}")


def _origsize(view: memoryview, max_size: int) -> int:
    (size,) = _ORIGSIZE.unpack_from(view)
    if size == 0 or size > max_size:
        raise RemoteProtocolError(f"compressed payload claims {size} bytes (limit {max_size})")
    return size


def _lzf_decompress(view: memoryview, size: int) -> bytes:
    lzf = _require_lzf()
    try:
        out = lzf.decompress(bytes(view[_ORIGSIZE.size :]), size)
    except ValueError as exc:  # liblzf EINVAL: corrupt stream
        raise RemoteProtocolError(f"lzf: {exc}") from exc
    if out is None or len(out) != size:  # E2BIG or short output
        raise RemoteProtocolError(f"lzf data does not decompress to {size} bytes")
    return out


def _require_lzf() -> ModuleType:
    """The lzf binding. Missing (or another package's `lzf`) is a broken install, not the peer's
    fault, so it is a LocalProtocolError on both sides."""
    if _lzf is None or not hasattr(_lzf, "compress") or not hasattr(_lzf, "decompress"):
        raise LocalProtocolError("lzf compression needs the python-neo-lzf package (module 'lzf')")
    return _lzf
