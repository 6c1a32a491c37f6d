"""The on-disk metadata of a HAST provider, `hastctl create` sizing, and `hastctl dump` output.

Layout of a provider (reference/hast.md §2, FreeBSD sbin/hastd/metadata.c, hastctl.c)::

    offset 0        METADATA_SIZE (4096) bytes: an nv list (hastpy.nv), zero padded
    offset 4096     the activemap bitmap, ``mapsize`` bytes (a multiple of the sector size)
    offset localoff the data area, ``datasize`` bytes; localoff = 4096 + mapsize

Everything here is pure except ``read_metadata``, ``write_metadata``, ``read_bitmap`` and
``write_bitmap``, which do positioned I/O on a file descriptor the caller opened (see
hastpy.provider). A ``Metadata`` value is always valid: the constructor checks every field, so
bytes from disk and values built in code pass the same gate.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
from dataclasses import dataclass

from hastpy.constants import (
    DEFAULT_EXTENTSIZE,
    DEFAULT_KEEPDIRTY,
    MAX_NAME_LEN,
    METADATA_SIZE,
    ROLE_NUMBERS,
)
from hastpy.errors import MetadataError, NvError, ProviderError, UsageError
from hastpy.nv import NvList, NvType

# -- limits -------------------------------------------------------------------------------------

# hastd keeps extentsize and keepdirty in C ints and prints them with %d, and it numbers extents
# with an int (activemap.c am_nextents): anything above INT32_MAX would wrap on a FreeBSD peer.
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
# Offsets and sizes are off_t on both systems.
MAX_OFF = 2**63 - 1
# The largest power of two that fits hastd's signed int extentsize.
MAX_EXTENTSIZE = 2**30
MAX_KEEPDIRTY = INT32_MAX
MAX_NEXTENTS = INT32_MAX
# Sector sizes we accept. No real disk has fewer than 512 bytes per sector, and the data area
# (localoff = 4096 + a multiple of the sector size) is sector aligned only when the sector size
# divides 4096. Linux allows logical blocks up to the page size, so only devices on hosts with
# pages over 4 KiB (some arm64, ppc64) can be refused for this.
MIN_SECTORSIZE = 512
MAX_SECTORSIZE = METADATA_SIZE
# The smallest extent: one sector of the smallest sector size.
MIN_EXTENTSIZE = MIN_SECTORSIZE
# The data area must hold at least this many whole extents. hastd accepts less, but a resource
# smaller than one extent is always a mistake (typically a size given without its unit).
MIN_DATA_EXTENTS = 1

BITMAP_OFFSET = METADATA_SIZE  # the activemap bitmap starts right after the metadata block

# humanize_number(3) as hastd's %N calls it: a 5-byte buffer (4 characters and the NUL).
_HN_BUFLEN = 5
_HN_MAXSCALE = 6  # up to E
_HN_DIVISOR = 1024
_HN_DECCUT = 973  # ceil(0.95 * 1024): from here x.9 would round up to 10
_HN_PREFIXES = ("", "K", "M", "G", "T", "P", "E")


# -- the metadata record ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Metadata:
    """The nine fields hastd stores, under hastd's nv names except ``offset`` (hastd's localoff),
    and three of hastpy's.

    resuid 0 means the resource never connected to a peer; localcnt/remotecnt are the generation
    counters of reference §7.2; prevrole is informational ("init", "primary" or "secondary").

    inconsistent (hastpy): this provider is the target of a synchronization that has not
    finished, so its data is older than the peer's and may not even be a consistent image. Set at
    the handshake that starts such a sync, cleared when it completes; a node with it set does not
    serve its data on its own (hastctl role --force overrides). Stored as an extra nv field only
    while set, so that a block without it is byte for byte what hastd writes (hastd ignores
    fields it does not read).

    replicaid, peerid (hastpy): this copy's own random ID (0 until its first worker start), and
    the ID of the copy it last replicated with (0: none yet). The counters say how two copies
    stand to each other only if each is the other's peer; a primary that replicated to a third
    copy since (a replaced secondary) has moved on without the old one, which then has the same
    resuid and counters as if it were in step. The handshake refuses such a pair
    (syncdecide.REPLICA_MISMATCH_ERRMSG). Stored like `inconsistent`, only when not 0.
    """

    resource: str
    datasize: int
    extentsize: int
    keepdirty: int
    offset: int
    resuid: int = 0
    localcnt: int = 0
    remotecnt: int = 0
    prevrole: str = "init"
    inconsistent: bool = False
    replicaid: int = 0
    peerid: int = 0

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def localoff(self) -> int:
        """Where the data area starts (hastd's hr_localoff); the nv field is called offset."""
        return self.offset

    @property
    def mapsize(self) -> int:
        """Bytes reserved for the bitmap between the metadata block and the data area."""
        return self.offset - BITMAP_OFFSET

    @property
    def nextents(self) -> int:
        """Extents of the data area, as a running hastd's activemap counts them."""
        return nextents_for(self.datasize, self.extentsize)

    def with_(self, **changes: object) -> Metadata:
        """A copy with some fields changed, validated like any other Metadata."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def encode(self) -> bytes:
        """The 4096-byte block, fields in hastd's write order (metadata.c metadata_write)."""
        nv = (
            NvList()
            .add_string("resource", self.resource)
            .add_uint64("datasize", self.datasize)
            .add_uint32("extentsize", self.extentsize)
            .add_uint32("keepdirty", self.keepdirty)
            .add_uint64("offset", self.offset)
            .add_uint64("resuid", self.resuid)
            .add_uint64("localcnt", self.localcnt)
            .add_uint64("remotecnt", self.remotecnt)
            .add_string("prevrole", self.prevrole)
        )
        if self.inconsistent:
            nv.add_uint8(INCONSISTENT_FIELD, 1)
        for name in REPLICA_FIELDS:
            if getattr(self, name):
                nv.add_uint64(name, getattr(self, name))
        raw = nv.encode()
        # hastd asserts the list is strictly shorter than the block; the resource name limit
        # keeps us far below it, so this only guards against a future field.
        if len(raw) >= METADATA_SIZE:
            raise MetadataError(f"encoded metadata is {len(raw)} bytes, more than fits in {METADATA_SIZE}")
        return raw + bytes(METADATA_SIZE - len(raw))

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview) -> Metadata:
        """Parse a 4096-byte block. Anything wrong with it is a MetadataError, nothing else."""
        raw = bytes(raw)
        if len(raw) != METADATA_SIZE:
            raise MetadataError(f"metadata block is {len(raw)} bytes, expected {METADATA_SIZE}")
        if not any(raw):
            raise MetadataError(NO_METADATA)
        try:
            nv = NvList.decode(raw)
        except NvError as e:
            raise MetadataError(f"metadata is damaged: {e}") from None
        if len(nv) == 0:
            raise MetadataError("metadata is damaged: the block is not empty but holds no fields")
        fields = {name: _field(nv, name, typ) for name, typ in _FIELDS}
        try:
            flag = nv.get(INCONSISTENT_FIELD, NvType.UINT8)
            ids = {name: nv.get(name, NvType.UINT64) or 0 for name in REPLICA_FIELDS}
        except NvError as e:
            raise MetadataError(f"metadata is damaged: {e}") from None
        return cls(**fields, inconsistent=bool(flag), **ids)


def new_replica_id() -> int:
    """A random, non-zero Metadata.replicaid."""
    return secrets.randbits(64) or 1


def decode(raw: bytes | bytearray | memoryview) -> Metadata:
    """Module-level spelling of Metadata.decode."""
    return Metadata.decode(raw)


NO_METADATA = "no metadata found: the provider was never initialized; run 'hastctl create <name>'"

# Field name and nv type, in hastd's write order. All are required: hastd's metadata_read fails
# (ENOENT from nv_get_*) when any of them is missing.
_FIELDS = (
    ("resource", NvType.STRING),
    ("datasize", NvType.UINT64),
    ("extentsize", NvType.UINT32),
    ("keepdirty", NvType.UINT32),
    ("offset", NvType.UINT64),
    ("resuid", NvType.UINT64),
    ("localcnt", NvType.UINT64),
    ("remotecnt", NvType.UINT64),
    ("prevrole", NvType.STRING),
)


# hastpy's own field (see Metadata.inconsistent): optional, written only while set.
INCONSISTENT_FIELD = "inconsistent"
# hastpy's own uint64 fields (see Metadata.replicaid): optional, written only when not 0.
REPLICA_FIELDS = ("replicaid", "peerid")


def _field(nv: NvList, name: str, typ: NvType) -> object:
    try:
        value = nv.get(name, typ)
    except NvError as e:
        raise MetadataError(f"metadata is damaged: {e}") from None
    if value is None:
        raise MetadataError(f"metadata is damaged: field {name!r} is missing")
    return value


def _validate(md: Metadata) -> None:
    _check_resource_name(md.resource, MetadataError)
    _check_int("datasize", md.datasize, 1, MAX_OFF)
    _check_int("extentsize", md.extentsize, MIN_EXTENTSIZE, MAX_EXTENTSIZE)
    if not _is_power_of_2(md.extentsize):
        raise MetadataError(f"metadata is invalid: extentsize {md.extentsize} is not a power of 2")
    _check_int("keepdirty", md.keepdirty, 1, MAX_KEEPDIRTY)
    _check_int("offset", md.offset, BITMAP_OFFSET + 1, MAX_OFF - md.datasize)
    for name in ("resuid", "localcnt", "remotecnt", *REPLICA_FIELDS):
        _check_int(name, getattr(md, name), 0, UINT64_MAX)
    if not isinstance(md.inconsistent, bool):
        raise MetadataError(f"metadata is invalid: inconsistent must be a bool, not {md.inconsistent!r}")
    if not isinstance(md.prevrole, str) or md.prevrole not in ROLE_NUMBERS:
        raise MetadataError(
            f"metadata is invalid: prevrole {md.prevrole!r} is not init, primary or secondary"
        )
    nextents = nextents_for(md.datasize, md.extentsize)
    if nextents > MAX_NEXTENTS:
        raise MetadataError(
            f"metadata is invalid: {nextents} extents, more than hastd can count ({MAX_NEXTENTS})"
        )
    # The bitmap must have a bit for every extent of the data area, or the activemap would read
    # the data area as bitmap (and write bitmap over data).
    if bitstr_size(nextents) > md.mapsize:
        raise MetadataError(
            f"metadata is invalid: offset {md.offset} leaves {md.mapsize} bytes for the bitmap of "
            f"{nextents} extents, which needs {bitstr_size(nextents)}"
        )


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MetadataError(f"metadata is invalid: {name} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise MetadataError(f"metadata is invalid: {name} {value} is outside {lo}..{hi}")


def _check_resource_name(name: object, error: type[Exception]) -> None:
    # hast.conf cannot produce control characters in a name; refusing them keeps a damaged
    # name from forging lines in `hastctl dump` and in logs.
    if not isinstance(name, str) or not name or any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise error(f"invalid resource name {name!r}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_LEN:
        raise error(f"resource name is longer than {MAX_NAME_LEN} bytes")


def check_resource(md: Metadata, name: str, path: str | None = None) -> None:
    """Refuse a provider whose metadata belongs to another resource (hastd's message).

    Pass the provider's path when there is one: hastd names the provider, not the metadata.
    """
    if md.resource != name:
        provider = f"Provider {path}" if path is not None else "Provider"
        raise MetadataError(f"{provider} is not part of resource {name}.")


def check_fits(md: Metadata, mediasize: int, sectorsize: int) -> None:
    """Refuse metadata that does not fit the provider it was read from.

    Catches a provider that shrank since `create`, or metadata copied from a disk with another
    sector size: the data area must end inside the provider and start on a sector boundary, and
    the bitmap hastd reads (rounded up to whole sectors) must end before it.
    """
    if md.offset + md.datasize > mediasize:
        raise MetadataError(
            f"metadata describes {md.offset + md.datasize} bytes (data ends there) but the provider "
            f"has only {mediasize}; was it shrunk, or created with a larger -m?"
        )
    if md.offset % sectorsize:
        raise MetadataError(f"data area offset {md.offset} is not a multiple of the sector size {sectorsize}")
    if _roundup(bitstr_size(md.nextents), sectorsize) > md.mapsize:
        raise MetadataError(
            f"the bitmap does not fit in whole {sectorsize}-byte sectors before offset {md.offset}"
        )


# -- sizing (hastctl create) --------------------------------------------------------------------


def bitstr_size(nbits: int) -> int:
    """Bytes of a bitstring(3) of nbits bits."""
    return (nbits + 7) // 8


def nextents_for(size: int, extentsize: int) -> int:
    """Extents covering size bytes; the last one may be partial."""
    return -(-size // extentsize)


def _roundup(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def min_mediasize(extentsize: int, sectorsize: int) -> int:
    """The smallest provider plan() accepts: metadata, a one-sector bitmap, MIN_DATA_EXTENTS extents."""
    return METADATA_SIZE + sectorsize + MIN_DATA_EXTENTS * extentsize


@dataclass(frozen=True, slots=True)
class Layout:
    """Where `hastctl create` puts things on a provider, and the values it stores."""

    nextents: int  # extents the bitmap was sized for (of mediasize - 4096, as hastctl does)
    mapsize: int  # bitmap bytes on disk, a multiple of sectorsize
    datasize: int  # size of the data area, and of /dev/hast/<name>
    localoff: int  # offset of the data area
    resource: str
    mediasize: int
    sectorsize: int
    extentsize: int
    keepdirty: int

    def metadata(self) -> Metadata:
        """The metadata `create` writes: never connected, counters 0, prevrole init."""
        return Metadata(
            resource=self.resource,
            datasize=self.datasize,
            extentsize=self.extentsize,
            keepdirty=self.keepdirty,
            offset=self.localoff,
        )


def plan(
    resource: str,
    mediasize: int,
    sectorsize: int,
    extentsize: int = DEFAULT_EXTENTSIZE,
    keepdirty: int = DEFAULT_KEEPDIRTY,
) -> Layout:
    """hastctl create_one()'s arithmetic, with its checks and a few more (UsageError).

    mediasize is the part of the provider to use (all of it, or -m); checking it against the
    provider's real size is the caller's job (``check_requested_mediasize``).
    """
    _check_resource_name(resource, UsageError)
    _check_sectorsize(sectorsize)
    _check_extentsize(extentsize, sectorsize)
    _check_keepdirty(keepdirty)
    _check_mediasize(mediasize, extentsize, sectorsize)
    nextents = nextents_for(mediasize - METADATA_SIZE, extentsize)
    mapsize = _roundup(bitstr_size(nextents), sectorsize)
    datasize = mediasize - METADATA_SIZE - mapsize
    if nextents > MAX_NEXTENTS:
        raise UsageError(
            f"{mediasize} bytes in {extentsize}-byte extents is more than {MAX_NEXTENTS} extents; "
            "use a larger extent size (-e)"
        )
    return Layout(
        nextents=nextents,
        mapsize=mapsize,
        datasize=datasize,
        localoff=METADATA_SIZE + mapsize,
        resource=resource,
        mediasize=mediasize,
        sectorsize=sectorsize,
        extentsize=extentsize,
        keepdirty=keepdirty,
    )


def _check_sectorsize(sectorsize: int) -> None:
    if not _is_power_of_2(sectorsize) or not MIN_SECTORSIZE <= sectorsize <= MAX_SECTORSIZE:
        raise UsageError(
            f"Sector size {sectorsize} is not supported: it must be a power of 2 "
            f"from {MIN_SECTORSIZE} to {MAX_SECTORSIZE}."
        )


def _check_extentsize(extentsize: int, sectorsize: int) -> None:
    # hastctl's two messages first, then what activemap.c asserts (a power of 2) and our cap.
    if extentsize < sectorsize:
        raise UsageError(f"Extent size ({extentsize}) is less than sector size ({sectorsize}).")
    if extentsize % sectorsize:
        raise UsageError(f"Extent size ({extentsize}) is not multiple of sector size ({sectorsize}).")
    if not _is_power_of_2(extentsize):
        raise UsageError(f"Extent size ({extentsize}) is not a power of 2.")
    if extentsize > MAX_EXTENTSIZE:
        raise UsageError(f"Extent size ({extentsize}) is larger than {MAX_EXTENTSIZE} (1G).")


def _check_keepdirty(keepdirty: int) -> None:
    if not 1 <= keepdirty <= MAX_KEEPDIRTY:
        raise UsageError(f"keepdirty ({keepdirty}) must be from 1 to {MAX_KEEPDIRTY}.")


def _check_mediasize(mediasize: int, extentsize: int, sectorsize: int) -> None:
    if mediasize > MAX_OFF:
        raise UsageError(f"Media size ({mediasize}) is larger than {MAX_OFF}.")
    if mediasize % sectorsize:
        raise UsageError(
            f"Media size ({mediasize}) is not a multiple of the sector size ({sectorsize}); "
            "give -m rounded down to a whole sector."
        )
    smallest = min_mediasize(extentsize, sectorsize)
    if mediasize < smallest:
        raise UsageError(
            f"Media size ({mediasize}) is too small: it must hold {METADATA_SIZE} bytes of metadata, "
            f"the bitmap and at least one {extentsize}-byte extent, {smallest} bytes in all."
        )


def check_requested_mediasize(requested: int | None, provider_size: int, path: str) -> int:
    """The mediasize to plan with: the provider's size, or -m if it is not larger."""
    if requested is None:
        return provider_size
    if requested > provider_size:
        raise UsageError(f"Provided mediasize is larger than provider {path} size.")
    return requested


# Size arguments (-e, -k, -m) as expand_number(3) reads them: a number in C syntax (decimal,
# 0x hex, or octal with a leading 0, as strtoumax base 0) and an optional unit k, m, g, t, p or e
# in either case, each 1024 times the one before; b means bytes. Deliberately stricter than
# FreeBSD 11's expand_number, which ignores whatever follows the unit letter and wraps negative
# numbers: here signs, spaces and trailing junk are errors, except that "B" or "iB" may follow a
# unit ("2MB", "64KiB").
_SIZE_RE = re.compile(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)(?:([kmgtpeKMGTPE])(?:[iI]?[bB])?|[bB])?")
_SHIFTS = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str, what: str = "size") -> int:
    """'64k' -> 65536, '2M' -> 2097152, '0x1000' -> 4096; UsageError naming ``what`` otherwise."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise UsageError(
            f"Invalid {what} {text!r}: expected a number with an optional unit "
            "k, m, g, t, p or e (powers of 1024)"
        )
    digits, unit = m.groups()
    value = _c_integer(digits) << (_SHIFTS[unit.lower()] if unit else 0)
    if value > MAX_OFF:
        raise UsageError(f"Invalid {what} {text!r}: larger than {MAX_OFF}")
    return value


def _c_integer(digits: str) -> int:
    """strtoumax(..., 0) on text _SIZE_RE matched: a leading 0 means octal, 0x hex."""
    if len(digits) > 1 and digits[0] == "0":
        return int(digits, 16 if digits[1] in "xX" else 8)
    return int(digits)


# -- hastctl dump -------------------------------------------------------------------------------


def humanize_number(n: int) -> str:
    """What hastd's printf %N prints: humanize_number(buf, 5, n, "", HN_AUTOSCALE,
    HN_NOSPACE | HN_DECIMAL) from FreeBSD libutil (pjdlog.c, humanize_number.c, FreeBSD >= 10).

    Powers of 1024 with prefixes K M G T P E; at most 3 digits, or d.d below 10 once scaled;
    halves round up. Like the C code, n is taken as int64_t (so values >= 2**63 print negative)
    and the result is cut to 4 characters.
    """
    n = (n + 2**63) % 2**64 - 2**63  # C's (int64_t) cast
    sign = -1 if n < 0 else 1
    quotient = abs(n)
    # baselen: one digit, a sign if negative, no space, no suffix; the prefix letter is extra.
    baselen = 1 + (2 if sign < 0 else 1)
    limit = 10 ** (_HN_BUFLEN - baselen)
    remainder = 0
    scale = 0
    # Divide until it fits; once more if rounding 999.5+ would make it 1000.
    while scale < _HN_MAXSCALE and (
        quotient >= limit or (quotient == limit - 1 and remainder >= _HN_DIVISOR // 2)
    ):
        quotient, remainder = divmod(quotient, _HN_DIVISOR)
        scale += 1
    prefix = _HN_PREFIXES[scale]
    if scale > 0 and (quotient < 9 or (quotient == 9 and remainder < _HN_DECCUT)):
        tenths = (remainder * 10 + _HN_DIVISOR // 2) // _HN_DIVISOR
        text = f"{sign * (quotient + tenths // 10)}.{tenths % 10}{prefix}"
    else:
        text = f"{sign * (quotient + (remainder + _HN_DIVISOR // 2) // _HN_DIVISOR)}{prefix}"
    return text[: _HN_BUFLEN - 1]


def humanize(n: int) -> str:
    """hastctl's "%NB": humanize_number followed by a literal B, e.g. 2097152 -> "2.0MB"."""
    return humanize_number(n) + "B"


def format_dump(md: Metadata) -> str:
    """`hastctl dump` for one resource, byte for byte as hastctl.c dump_one() prints it.

    hastctl prints the configured name, which metadata_read has already checked equals the
    stored one; counters are printed from the primary set, which in role init holds the stored
    values.
    """
    return (
        f"resource: {md.resource}\n"
        f"    datasize: {md.datasize} ({humanize(md.datasize)})\n"
        f"    extentsize: {md.extentsize} ({humanize(md.extentsize)})\n"
        f"    keepdirty: {md.keepdirty}\n"
        f"    localoff: {md.offset}\n"
        f"    resuid: {md.resuid}\n"
        f"    localcnt: {md.localcnt}\n"
        f"    remotecnt: {md.remotecnt}\n"
        f"    prevrole: {md.prevrole}\n"
        + ("    inconsistent: yes (a synchronization to this node did not finish)\n" if md.inconsistent else "")
        + (f"    replicaid: {md.replicaid:016x}\n" if md.replicaid else "")  # hastpy: the copy IDs a
        + (f"    peerid: {md.peerid:016x}\n" if md.peerid else "")  # replica mismatch names
    )


def dump_dict(md: Metadata) -> dict[str, object]:
    """`hastctl dump --json`: the dump's keys (localoff, not offset) with plain integer values."""
    return {
        "resource": md.resource,
        "datasize": md.datasize,
        "extentsize": md.extentsize,
        "keepdirty": md.keepdirty,
        "localoff": md.offset,
        "resuid": md.resuid,
        "localcnt": md.localcnt,
        "remotecnt": md.remotecnt,
        "prevrole": md.prevrole,
        "inconsistent": md.inconsistent,
        "replicaid": md.replicaid,
        "peerid": md.peerid,
    }


# -- I/O on an open provider --------------------------------------------------------------------


def _fd(f: int | object) -> int:
    return f if isinstance(f, int) else f.fileno()  # type: ignore[attr-defined]


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read length bytes, or fewer only at end of file. OSError becomes ProviderError."""
    parts: list[bytes] = []
    got = 0
    try:
        while got < length:
            chunk = os.pread(fd, length - got, offset + got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise ProviderError(f"Unable to read at offset {offset + got}: {e.strerror}.") from e
    return b"".join(parts)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as e:
        raise ProviderError(f"Unable to write at offset {offset + done}: {e.strerror}.") from e


def read_metadata(f: int | object) -> Metadata:
    """Read and decode the metadata block of an open provider (fd or file object)."""
    raw = _pread_exact(_fd(f), METADATA_SIZE, 0)
    if len(raw) < METADATA_SIZE:
        raise MetadataError(
            f"no metadata found: the provider is only {len(raw)} bytes, less than {METADATA_SIZE}"
        )
    return Metadata.decode(raw)


def write_metadata(f: int | object, md: Metadata) -> None:
    """Write the whole 4096-byte block at offset 0. Durability (fsync) is the caller's call."""
    _pwrite_all(_fd(f), md.encode(), 0)


def read_bitmap(f: int | object, mapsize: int) -> bytes:
    """The mapsize bytes of bitmap after the metadata block."""
    image = _pread_exact(_fd(f), mapsize, BITMAP_OFFSET)
    if len(image) < mapsize:
        missing = mapsize - len(image)
        raise ProviderError(f"Unable to read the bitmap: the provider ends {missing} bytes early.")
    return image


def write_bitmap(f: int | object, image: bytes | bytearray | memoryview) -> None:
    """Write a bitmap image at offset 4096; its length must be the on-disk map size."""
    _pwrite_all(_fd(f), bytes(image), BITMAP_OFFSET)
