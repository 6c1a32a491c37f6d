"""Data I/O on an open local provider: full reads and writes, discard, flush.

The thin edge every worker uses for the data area; offsets here are provider offsets (the caller
adds localoff). Short reads and writes are retried until done; errors are OSError for the caller
to count and report.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct

log = logging.getLogger("hastd")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
ZERO_CHUNK = 1024 * 1024  # bounded memory for zero-filling where holes cannot be punched
BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a range of a block device, reads return zeros after


def pread_full(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            raise OSError(errno.EIO, f"short read at offset {offset + got}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def pwrite_full(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"short write at offset {offset}")
        view = view[n:]
        offset += n


def discard(fd: int, offset: int, length: int) -> None:
    """Deallocate a range so that it reads back as zeros on both replicas.

    A regular file gets a punched hole; a block device gets BLKZEROOUT rather than BLKDISCARD,
    because discarded blocks may read back as anything and the two replicas must stay equal.
    """
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EOPNOTSUPP:
            raise OSError(err, os.strerror(err))
        zero_fill(fd, offset, length)


def zero_fill(fd: int, offset: int, length: int) -> None:
    """Write zeros in bounded chunks (never a buffer the size of the range)."""
    zeros = bytes(min(length, ZERO_CHUNK))
    end = offset + length
    while offset < end:
        n = min(ZERO_CHUNK, end - offset)
        pwrite_full(fd, memoryview(zeros)[:n], offset)
        offset += n


def flush(fd: int) -> None:
    os.fdatasync(fd)


class StickyFlush:
    """fdatasync of one open provider that, once one has failed, fails every time after.

    Linux reports a write-back error (data the page cache acknowledged and the disk then lost)
    to one sync call only, whichever comes first: the bitmap's, a clear's, a client's FLUSH. A
    later sync that succeeded would call durable the writes the disk lost, so once one failed
    they all fail, and the client hears it at every FLUSH. A worker makes one per provider and
    reports through `lost` the failures of the syncs it makes otherwise."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.failed = ""  # why the data can no longer be made durable, or ""; never cleared

    def __call__(self) -> None:
        if self.failed:
            raise OSError(errno.EIO, self.failed)
        try:
            flush(self.fd)
        except OSError as exc:
            self.lost(exc.strerror or str(exc))
            raise

    def lost(self, why: str) -> None:
        if not self.failed:
            log.error("Flushing the local disk failed (%s): writes it acknowledged may be lost, and every "
                      "later flush fails.", why)  # fmt: skip
            self.failed = f"an earlier flush of the local disk failed: {why}"
