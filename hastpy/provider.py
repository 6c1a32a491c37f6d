"""The local provider: opening, sizing and locking it, and `hastctl create`.

A provider is a regular file (treated as having 512-byte sectors, like hastd's subr.c provinfo)
or a block device (size and logical sector size from the kernel). Anything else is refused.

Exclusion, in two layers:
- every writer takes ``flock(LOCK_EX | LOCK_NB)`` on its descriptor (hastd does the same), so a
  second hastd worker or a `hastctl create` fails while one is running;
- a block device opened for writing is opened O_EXCL, so Linux refuses it while it is mounted or
  claimed by another driver (md, LVM, another O_EXCL opener), and nothing can mount it under us.
Both are per open file, so a process must share one Provider, not open the path twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from hastpy.constants import DEFAULT_EXTENTSIZE, DEFAULT_KEEPDIRTY, DEFAULT_SECTORSIZE
from hastpy.errors import MetadataError, ProviderError
from hastpy.metadata import (
    Metadata,
    check_fits,
    check_requested_mediasize,
    check_resource,
    plan,
    read_bitmap,
    read_metadata,
    write_bitmap,
    write_metadata,
)

log = logging.getLogger(__name__)

# linux/fs.h block device ioctls.
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): size in bytes, u64
BLKSSZGET = 0x1268  # _IO(0x12, 104): logical sector size, int


@dataclass(eq=False)
class Provider:
    """An open provider. Close it (or use it as a context manager); closing drops the lock."""

    path: str
    fd: int
    mediasize: int
    sectorsize: int
    is_block: bool
    writable: bool
    locked: bool = False

    def fileno(self) -> int:
        return self.fd

    def lock(self) -> None:
        """Take the exclusive lock or raise ProviderError; hastd's rules (metadata.c)."""
        if self.locked:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProviderError(f"Unable to lock {self.path}: already in use.") from None
        except OSError as e:
            # hastd carries on where locking is unsupported; so do we, loudly.
            if e.errno != errno.EOPNOTSUPP:
                raise ProviderError(f"Unable to lock {self.path}: {e.strerror}.") from None
            log.warning("Unable to lock %s (operation not supported), but continuing.", self.path)
        self.locked = True

    def read_metadata(self, resource: str | None = None) -> Metadata:
        """The provider's metadata, checked against its size and, if given, the resource name."""
        with _about(self.path):
            md = read_metadata(self.fd)
            check_fits(md, self.mediasize, self.sectorsize)
        if resource is not None:
            check_resource(md, resource, self.path)
        return md

    def write_metadata(self, md: Metadata) -> None:
        with _about(self.path):
            write_metadata(self.fd, md)

    def read_bitmap(self, mapsize: int) -> bytes:
        with _about(self.path):
            return read_bitmap(self.fd, mapsize)

    def write_bitmap(self, image: bytes | bytearray | memoryview) -> None:
        with _about(self.path):
            write_bitmap(self.fd, image)

    def sync(self) -> None:
        """fsync: what was written is on stable storage when this returns."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise ProviderError(f"Unable to flush {self.path}: {e.strerror}.") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.locked = False

    def __enter__(self) -> Provider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _about(path: str) -> Iterator[None]:
    """Name the provider in metadata and I/O errors raised by the path-less metadata layer."""
    try:
        yield
    except (MetadataError, ProviderError) as e:
        raise type(e)(f"{path}: {e}") from e


def open_provider(path: str, writable: bool = True) -> Provider:
    """Open and size a provider. Read-only opens (hastctl dump) take no lock and no O_EXCL."""
    fd = _open(path, writable)
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            mediasize = _ioctl_number(fd, BLKGETSIZE64, "Q", path, "mediasize")
            sectorsize = _ioctl_number(fd, BLKSSZGET, "i", path, "sectorsize")
        elif stat.S_ISREG(st.st_mode):
            mediasize, sectorsize = st.st_size, DEFAULT_SECTORSIZE
        else:
            raise ProviderError(_NEITHER.format(path=path))
        if mediasize == 0:
            raise ProviderError(f"Provider {path} is empty (0 bytes).")
    except BaseException:
        os.close(fd)
        raise
    return Provider(path, fd, mediasize, sectorsize, stat.S_ISBLK(st.st_mode), writable)


_NEITHER = "{path} is neither a block device nor a regular file."


def _open(path: str, writable: bool) -> int:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        # O_EXCL on a block device means "not mounted, not claimed"; on a file it would mean
        # "create", so only add it once we know what path is.
        if writable and stat.S_ISBLK(os.stat(path).st_mode):
            flags |= os.O_EXCL
        return os.open(path, flags)
    except IsADirectoryError:
        raise ProviderError(_NEITHER.format(path=path)) from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise ProviderError(
                f"Unable to open {path}: the device is in use "
                "(mounted, or held by another driver or process)."
            ) from None
        raise ProviderError(f"Unable to open {path}: {e.strerror}.") from None


def _ioctl_number(fd: int, request: int, fmt: str, path: str, what: str) -> int:
    buf = bytearray(struct.calcsize(fmt))
    try:
        fcntl.ioctl(fd, request, buf, True)
    except OSError as e:
        raise ProviderError(f"Unable to obtain provider {path} {what}: {e.strerror}.") from None
    return struct.unpack(fmt, buf)[0]


def create(
    path: str,
    resource: str,
    extentsize: int = DEFAULT_EXTENTSIZE,
    keepdirty: int = DEFAULT_KEEPDIRTY,
    mediasize: int | None = None,
) -> Metadata:
    """`hastctl create` for one resource: size, then write a zeroed bitmap and fresh metadata.

    mediasize None uses the whole provider. The data area is not touched. Unlike hastctl, the
    provider is locked first, so a resource whose hastd worker is running is refused.
    """
    with open_provider(path, writable=True) as p:
        p.lock()
        layout = plan(
            resource,
            check_requested_mediasize(mediasize, p.mediasize, path),
            p.sectorsize,
            extentsize,
            keepdirty,
        )
        md = layout.metadata()
        # Bitmap before metadata: once valid metadata is visible, its bitmap is the zeroed one
        # (a crash in between leaves the previous metadata, if any: run create again).
        p.write_bitmap(bytes(layout.mapsize))
        p.sync()
        p.write_metadata(md)
        p.sync()
    return md
