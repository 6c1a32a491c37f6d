"""The activemap: which extents of the data area may differ between the two nodes (hast.md §3).

One bit per extent. The primary sets an extent's bit on disk *before* it dispatches a write to that
extent and clears it only after both nodes have the data, so after a crash or an outage every extent
that may hold a write the other node lacks is found in the bitmap and resynchronized.

This module is pure state: it never touches a disk. The caller (the primary) owns the I/O:

* ``write_start`` / ``write_complete`` / ``need_sync`` / ``extent_complete`` / ``merge`` return
  True when the bitmap image differs from what is on disk for the extents they touched. The caller
  then flushes: ``image = am.bitmap()``, pwrite(image, METADATA_SIZE), fsync if metaflush, and on
  success ``am.flushed(image)``. A True from ``write_start`` means the flush must be durable before
  the data write is dispatched (write-ahead): otherwise a crash can leave a modified extent
  unmarked.
* Hold one lock (the "flush lock") across ``bitmap()``, the write and ``flushed()``, so images reach
  the disk in the order they were computed; a later image may clear a bit an earlier one set.
* The map is not thread-safe; every call must be made under the caller's map lock. The flush lock
  may be held while other threads keep calling the map (FreeBSD's hr_amp_diskmap_lock): the
  two-phase ``bitmap()``/``flushed()`` contract keeps that safe, because a bit counts as on disk
  only once the image carrying it is reported flushed.

Differences from activemap.c, all deliberate:

* Flush-needed is computed by comparing the image bits of the touched extents with the bits known
  to be on disk, not from keepdirty insertions. In steady state the answers agree; this one never
  asks for a flush that would change nothing, and never skips one a failed flush left owing.

* FreeBSD folds a sync mark into memtab as ``ext2reqs`` extra references. Here memtab counts only
  in-flight writes and the sync mark is the syncmap bit; the extent is dirty while either holds.
  This is equivalent, and lets ``write_complete`` reject a call with no matching ``write_start``.
* A ``need_sync`` that lands on the extent the sync walk is currently copying makes that walk not
  count: the extent stays marked and is walked again. (FreeBSD only calls need_sync while the link
  is down, so it never meets a walk in progress; we call it whenever the remote half of a write did
  not positively succeed, hast.md §11 caveat 1.)
* A chunk that failed to copy can be handed back with ``sync_failed``: the walk moves on, the extent
  stays dirty and is retried at the next ``sync_rewind``. FreeBSD skips the chunk and marks the
  extent clean.
* Sequential pre-marking (``premark``, on unless keepdirty < 2): when a write needs a flush for a
  new extent and the extent before it is on the keepdirty list (the write stream moves forward),
  the extent after the write joins the list too, so the same bitmap write carries it and the
  stream's next extent costs no synchronous flush: half the bitmap writes of a sequential stream.
  The pre-marked extent is an extra: it evicts nothing (the list may hold keepdirty + 1 extents;
  the next new extent brings it back to keepdirty), so a working set that fits keepdirty is never
  pushed out by a guess. Only bits are added, and only to a flush that happens anyway, so the
  write-ahead rule is untouched; the price is one more extent to resync after a crash. With
  keepdirty 1 (the smallest dirty set asked for) that would double it, so it is off.
"""

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

# Sequential pre-marking needs the written extent and the pre-marked one on the keepdirty list
# at once: with fewer, marking the next extent would evict the current one.
PREMARK_MIN_KEEPDIRTY = 2

# A run of zero bytes is skipped at C speed; Python only looks at bytes with a bit set.
_NONZERO = re.compile(rb"[^\x00]")


def nextents_for(size: int, extentsize: int) -> int:
    """Extents needed to cover ``size`` bytes; the last one may be partial."""
    return -(-size // extentsize)


def mapsize_for(size: int, extentsize: int, sectorsize: int) -> int:
    """On-disk bitmap size for an area of ``size`` bytes: one bit per extent, whole sectors.

    The primary passes its datasize; the secondary passes mediasize - METADATA_SIZE, which is what
    ``hastctl create`` used (hast.md §11 caveat 6: with ``-m`` the two can differ).
    """
    nbytes = -(-nextents_for(size, extentsize) // 8)
    return -(-nbytes // sectorsize) * sectorsize


def _test(buf, ext: int) -> bool:
    return bool(buf[ext >> 3] & (1 << (ext & 7)))


def _set(buf: bytearray, ext: int) -> None:
    buf[ext >> 3] |= 1 << (ext & 7)


def _clear(buf: bytearray, ext: int) -> None:
    buf[ext >> 3] &= ~(1 << (ext & 7)) & 0xFF


def _and(a, b) -> bytearray:
    size = len(a)
    both = int.from_bytes(a, "little") & int.from_bytes(b, "little")
    return bytearray(both.to_bytes(size, "little"))


def _or(a, b) -> bytes:
    size = len(a)
    either = int.from_bytes(a, "little") | int.from_bytes(b, "little")
    return either.to_bytes(size, "little")


def _and_not(a, b) -> bytes:
    size = len(a)
    only_a = int.from_bytes(a, "little") & ~int.from_bytes(b, "little")
    return only_a.to_bytes(size, "little")


class ClearSnapshot(NamedTuple):
    """The bits that could be cleared when a flush of both nodes began (``clear_snapshot``).
    Once that flush succeeded, ``bitmap`` may clear them, except on extents written since."""

    epoch: int
    bits: bytes


class SyncChunk(NamedTuple):
    """One piece of the sync walk: copy [offset, offset+length) from the sync source to the target.

    ``last`` is True when this chunk ends its extent: after copying it (and every earlier chunk of
    the extent) successfully, call ``extent_complete(extent)``; if any chunk of the extent failed,
    call ``sync_failed(extent)`` instead.
    """

    offset: int
    length: int
    extent: int
    last: bool


class ActiveMap:
    """Dirty-extent tracking for one resource's data area (activemap.c).

    ``mediasize`` is the size of the area the map covers: the primary's datasize (the data area,
    after metadata and bitmap), not the provider size. ``maxio`` is the largest sync chunk, the
    negotiated maximum I/O size (hast.md §11 caveat 4).
    """

    def __init__(
        self,
        mediasize: int,
        extentsize: int,
        keepdirty: int,
        sectorsize: int,
        maxio: int,
        premark: bool = True,
    ):
        _check_geometry(mediasize, extentsize, keepdirty, sectorsize, maxio)
        # Sequential pre-marking (module doc); needs room for two extents on the keepdirty list.
        self.premark = premark and keepdirty >= PREMARK_MIN_KEEPDIRTY
        self.mediasize = mediasize
        self.extentsize = extentsize
        self.keepdirty = keepdirty
        self.sectorsize = sectorsize
        self.maxio = maxio
        self.nextents = nextents_for(mediasize, extentsize)
        self.mapsize = mapsize_for(mediasize, extentsize, sectorsize)
        self._shift = extentsize.bit_length() - 1
        # In-flight writes per extent; absent means none. A dict keeps memory O(in flight).
        self._memtab: dict[int, int] = {}
        # memmap bit <=> the extent has an in-flight write or a sync mark; ndirty is its popcount.
        self._memmap = bytearray(self.mapsize)
        self._ndirty = 0
        # Extents that must be copied to the peer before the nodes are in sync.
        self._syncmap = bytearray(self.mapsize)
        self._nsync = 0
        # Extents the current sync pass has still to visit (a subset of syncmap); all bytes below
        # _pass_hint are zero, so the lowest-bit search does not rescan the finished prefix.
        self._passmap = bytearray(self.mapsize)
        self._pass_hint = 0
        # The extent being walked, the offset of its next chunk (None once its last chunk has been
        # handed out), and whether a need_sync hit it during the walk (then the walk doesn't count).
        self._walk_ext: int | None = None
        self._walk_off: int | None = None
        self._walk_redo = False
        # Most recently written extents, least recent first; their bits stay set on disk so that a
        # hot working set does not rewrite the bitmap on every write.
        self._lru: OrderedDict[int, None] = OrderedDict()
        # The same extents as bits: every image is memmap | lrumap, made without a loop over them.
        self._lrumap = bytearray(self.mapsize)
        # Bits known to be on disk. Starts all-clear: claiming fewer bits than the disk has is safe
        # (at worst one extra flush); claiming more is not.
        self._diskmap = bytearray(self.mapsize)
        self._inflight: bytes | None = None
        # Clear snapshots taken so far, and for each extent the number taken before it last
        # joined the keepdirty list or was written off it: a snapshot's bit survives on an
        # extent written since (that write is not covered by the snapshot's flush). No snapshot
        # holds an extent on the list, and one joins it only by a recorded write or pre-mark, so
        # writes on the list (the inline path) need no record.
        self._epoch = 0
        self._written_at: dict[int, int] = {}
        self.stat_updates = 0

    # --- geometry -------------------------------------------------------------------------------

    def extent_of(self, offset: int) -> int:
        """The extent holding byte ``offset``; ValueError outside the media."""
        if not 0 <= offset < self.mediasize:
            raise ValueError(f"offset {offset} outside media of {self.mediasize} bytes")
        return offset >> self._shift

    def extents_of(self, offset: int, length: int) -> range:
        """The extents [offset, offset+length) touches; empty for length 0."""
        if offset < 0 or length < 0 or offset + length > self.mediasize:
            raise ValueError(f"range {offset}+{length} outside media of {self.mediasize} bytes")
        if length == 0:
            return range(0)
        return range(offset >> self._shift, ((offset + length - 1) >> self._shift) + 1)

    def extent_range(self, ext: int) -> tuple[int, int]:
        """(offset, length) of extent ``ext``; the last extent may be short."""
        self._check_extent(ext)
        start = ext << self._shift
        return start, min(self.extentsize, self.mediasize - start)

    # --- statistics -----------------------------------------------------------------------------

    @property
    def ndirty(self) -> int:
        """Extents with an in-flight write or a sync mark (not counting clean keepdirty ones)."""
        return self._ndirty

    @property
    def dirty_bytes(self) -> int:
        """ndirty x extentsize, as hastctl reports it (the short last extent counts whole)."""
        return self._ndirty * self.extentsize

    @property
    def sync_pending_extents(self) -> int:
        """Extents still to copy to the peer, including ones a failed pass left behind."""
        return self._nsync

    @property
    def sync_pending_bytes(self) -> int:
        """Exact bytes still to copy (the short last extent counts its real length)."""
        last = self.nextents - 1
        short = self.nextents * self.extentsize - self.mediasize
        return self._nsync * self.extentsize - (short if _test(self._syncmap, last) else 0)

    # --- the write path: O(extents touched) -----------------------------------------------------

    def write_start(self, offset: int, length: int) -> bool:
        """Account a user write before it is dispatched.

        Returns True if the bitmap must be flushed, durably, before the data write starts. False
        means every extent of the write is already set in an image reported by ``flushed``.
        """
        exts = self.extents_of(offset, length)
        if len(exts) == 1:
            # The common case, inlined: one extent of the keepdirty list whose bit is on disk.
            # Nothing to flush, nothing to pre-mark (that rides only a flush), nothing evicted.
            ext = exts[0]
            if ext in self._lru and self._diskmap[ext >> 3] & (1 << (ext & 7)):
                count = self._memtab.get(ext, 0)
                self._memtab[ext] = count + 1
                if count == 0:
                    self._mark(ext)
                self._lru.move_to_end(ext)
                return False
        touched = list(exts)
        for ext in exts:
            self._written_at[ext] = self._epoch
        sequential = self.premark and bool(exts) and exts[0] - 1 in self._lru
        # Pre-marking rides only a write-ahead flush (a bit of this write not yet on disk), never
        # one that only clears evicted bits: it could re-add the extent just evicted and leave
        # a flush that changes nothing.
        sets_bits = not all(_test(self._diskmap, ext) for ext in exts)
        for ext in exts:
            count = self._memtab.get(ext, 0)
            self._memtab[ext] = count + 1
            if count == 0:
                self._mark(ext)
            self._lru_touch(ext, touched)
        if sequential and sets_bits:
            self._premark(exts[-1] + 1, touched)
        return self._count_update(self._differs(touched))

    def write_complete(self, offset: int, length: int) -> bool:
        """Account a write that has finished on both nodes (or is marked with need_sync).

        Returns True if the on-disk image should be rewritten to clear bits; this flush is not
        urgent for safety. ValueError if an extent has no in-flight write (unbalanced call).
        """
        exts = self.extents_of(offset, length)
        for ext in exts:
            if ext not in self._memtab:
                raise ValueError(f"write_complete on extent {ext} without a pending write_start")
        for ext in exts:
            count = self._memtab.pop(ext) - 1
            if count:
                self._memtab[ext] = count
            else:
                self._release(ext)
        if len(exts) == 1:
            # The common case, inlined: an extent of the keepdirty list stays in the image, so if
            # its bit is on disk the image agrees with the disk there (what _differs would say).
            ext = exts[0]
            if ext in self._lru and self._diskmap[ext >> 3] & (1 << (ext & 7)):
                return False
        return self._count_update(self._differs(exts))

    def need_sync(self, offset: int, length: int) -> bool:
        """Mark a region for resync because its remote write did not positively succeed.

        Call it before ``write_complete`` for the same write, so the extent never looks clean in
        between. Returns True if the bitmap must be flushed to keep the mark across a crash.
        """
        exts = self.extents_of(offset, length)
        for ext in exts:
            self._want_sync(ext)
        return self._differs(exts)

    # --- start-up and connect -------------------------------------------------------------------

    def copyin(self, bitmap: bytes) -> None:
        """Load the on-disk bitmap at primary start-up; every extent set in it will be resynced.

        The bits may stand for writes the peer never got (a crash), so they are all treated as
        needing sync. Must come before any write, sync or flush: RuntimeError otherwise.
        """
        image = self._check_image(bitmap)
        if self._ndirty or self._lru or self._inflight is not None:
            raise RuntimeError("copyin must come before any other activemap operation")
        self._diskmap = bytearray(image)
        for ext in self._set_bits(image):
            self._want_sync(ext)

    def merge(self, bitmap: bytes) -> bool:
        """Add the peer's dirty extents (its bitmap, received at connect) and rewind the walk.

        Returns True if the bitmap must be flushed: the peer zeroes its own bitmap once the
        connection is up, so from then on only our disk remembers those extents.
        """
        image = self._check_image(bitmap)
        added = [ext for ext in self._set_bits(image) if not _test(self._syncmap, ext)]
        for ext in added:
            self._want_sync(ext)
        self.sync_rewind()
        return self._differs(added)

    # --- flushing -------------------------------------------------------------------------------

    def bitmap(self, clears: Sequence[ClearSnapshot] = ()) -> bytes:
        """The image to write at METADATA_SIZE: in-use extents, the keepdirty set and every bit
        already on disk, except those ``clears`` let go; mapsize bytes.

        An extent's bit may be cleared only once the writes that finished on it are durable on
        both nodes (page-cached providers hold them in memory until a flush): take a
        ``clear_snapshot()`` before a flush of both nodes, and pass it here once that flush
        succeeded. Without one, bits are only added (a write-ahead flush). Call it under the
        flush lock, then write the image and report it with ``flushed``. Until then none of its
        new bits count as on disk, and bits it clears count as gone already, since a failed or
        torn write may have cleared them.
        """
        result = self._image(clears)
        self._diskmap = _and(self._diskmap, result)
        self._inflight = result
        return result

    def clear_snapshot(self) -> ClearSnapshot | None:
        """The bits on disk that no in-flight write, sync mark or keepdirty extent needs now, or
        None if there are none. Take it before a flush of both nodes; once that succeeded, pass
        it to ``bitmap()`` (or ``flush_needed()``)."""
        spare = _and_not(self._diskmap, _or(self._memmap, self._lrumap))
        if not _NONZERO.search(spare):
            return None
        self._epoch += 1
        return ClearSnapshot(self._epoch, spare)

    def need_sync_on_disk(self) -> bool:
        """Mark for resync every extent whose bit is on disk: the writes that finished on it may
        not be durable on the peer (the link went down before a flush covered them). Returns
        flush-needed."""
        exts = list(self._set_bits(bytes(self._diskmap)))
        for ext in exts:
            self._want_sync(ext)
        return self._differs(exts)

    def flushed(self, image: bytes) -> None:
        """Report that ``image`` (from ``bitmap()``) is durably on disk (fsynced if metaflush)."""
        image = self._check_image(image)
        if self._inflight is None:
            self._diskmap = bytearray(image)
            return
        # An image computed after this one may already be on its way; keep only bits both carry.
        self._diskmap = _and(image, self._inflight)
        if image == self._inflight:
            self._inflight = None

    def on_disk(self, offset: int, length: int) -> bool:
        """Whether every extent of the range is set in an image reported by ``flushed``.

        The primary asks this under its flush lock after ``write_start`` returned True: a flush
        by a concurrent writer that finished while it waited for the lock may already carry its
        bits, and then it need not flush again. (``write_start`` returning False already implies
        this; the bits stay on disk while the write is in flight, as every image includes them.)
        """
        return all(_test(self._diskmap, ext) for ext in self.extents_of(offset, length))

    def marked_for_sync(self, offset: int, length: int) -> bool:
        """Whether any extent of the range is marked for resync: the peer's copy of it may be
        older than ours."""
        return any(_test(self._syncmap, ext) for ext in self.extents_of(offset, length))

    def flush_needed(self, clears: Sequence[ClearSnapshot] = ()) -> bool:
        """True if ``bitmap(clears)`` would differ from what is known to be on disk.
        O(mapsize)."""
        return self._image(clears) != self._diskmap

    def _image(self, clears: Sequence[ClearSnapshot]) -> bytes:
        kept = self._diskmap
        for snap in clears:
            # Only extents not written since the snapshot: their flush covered every write.
            lost = bytearray(snap.bits)
            for ext in self._set_bits(snap.bits):
                if self._written_at.get(ext, -1) >= snap.epoch:
                    _clear(lost, ext)
            kept = _and_not(kept, lost)
        return _or(_or(self._memmap, self._lrumap), kept)

    # --- the sync walk --------------------------------------------------------------------------

    def sync_rewind(self) -> None:
        """Start a new pass over every extent still needing sync (after each connect)."""
        self._passmap[:] = self._syncmap
        self._pass_hint = 0
        self._walk_ext = None
        self._walk_off = None
        self._walk_redo = False

    def sync_next(self) -> SyncChunk | None:
        """The next chunk to copy, or None when this pass has visited every marked extent.

        Walks the lowest marked extent from its start in chunks of at most ``maxio`` bytes, clipped
        to the extent end and the media end. Call this again only after resolving the previous
        chunk; an extent whose last chunk was handed out but that was neither completed nor failed
        is walked again from its start.
        """
        if self._walk_ext is None or self._walk_off is None:
            ext = self._lowest_in_pass()
            if ext is None:
                self._walk_ext = None
                return None
            self._walk_ext, self._walk_off, self._walk_redo = ext, ext << self._shift, False
        ext, start = self._walk_ext, self._walk_off
        ext_end = min((ext + 1) << self._shift, self.mediasize)
        end = min(start + self.maxio, ext_end)
        self._walk_off = end if end < ext_end else None
        return SyncChunk(start, end - start, ext, self._walk_off is None)

    def extent_complete(self, ext: int) -> bool:
        """Every chunk of ``ext`` was copied: clear its sync mark. Returns flush-needed.

        Only honoured for the extent whose last chunk ``sync_next`` just handed out; a stale call
        (after a rewind, say) or a walk a ``need_sync`` hit returns False and leaves ``ext``
        marked, so it is walked again rather than wrongly declared in sync.
        """
        self._check_extent(ext)
        if ext != self._walk_ext or self._walk_off is not None:
            return False
        self._walk_ext = None
        if self._walk_redo:
            return False
        _clear(self._syncmap, ext)
        _clear(self._passmap, ext)
        self._nsync -= 1
        self._release(ext)
        return self._differs((ext,))

    def sync_failed(self, ext: int) -> None:
        """A chunk of ``ext`` could not be copied: skip it for this pass, keep it marked.

        It stays dirty (and on disk) and is walked again after the next ``sync_rewind``, so one bad
        extent cannot stall the rest of the sync.
        """
        self._check_extent(ext)
        if ext == self._walk_ext:
            self._walk_ext = None
            self._walk_off = None
        _clear(self._passmap, ext)

    def clear_sync(self) -> bool:
        """Drop every sync mark, e.g. when the map is about to be discarded. Returns flush-needed.

        Hazard: extents dropped here are never resynced. O(nextents).
        """
        exts = list(self._set_bits(bytes(self._syncmap)))
        self._syncmap = bytearray(self.mapsize)
        self._nsync = 0
        self.sync_rewind()
        for ext in exts:
            self._release(ext)
        return self._differs(exts)

    # --- internals ------------------------------------------------------------------------------

    def _mark(self, ext: int) -> None:
        if not _test(self._memmap, ext):
            _set(self._memmap, ext)
            self._ndirty += 1

    def _release(self, ext: int) -> None:
        """Clear ext's memmap bit if nothing holds it any more."""
        if ext not in self._memtab and not _test(self._syncmap, ext):
            _clear(self._memmap, ext)
            self._ndirty -= 1

    def _want_sync(self, ext: int) -> None:
        if _test(self._syncmap, ext):
            if ext == self._walk_ext:
                self._walk_redo = True  # part of it may already have been copied
            return
        _set(self._syncmap, ext)
        self._nsync += 1
        _set(self._passmap, ext)
        self._pass_hint = min(self._pass_hint, ext >> 3)
        self._mark(ext)

    def _premark(self, ext: int, touched: list[int]) -> None:
        """Put ext, the extent after a forward-moving write, on the keepdirty list as an extra
        (evicting nothing), so the flush the write needs anyway carries its bit too."""
        if ext >= self.nextents or ext in self._lru:
            return
        self._lru[ext] = None
        _set(self._lrumap, ext)
        self._written_at[ext] = self._epoch  # its writes may take the inline path from now on
        touched.append(ext)

    def _lru_touch(self, ext: int, touched: list[int]) -> None:
        """Make ext the most recently written extent; append the extents evicted for it (at most
        two: one more when a pre-marked extra is on the list) to ``touched``."""
        lru = self._lru
        if ext in lru:
            lru.move_to_end(ext)
            return
        if self.keepdirty == 0:
            return
        while len(lru) >= self.keepdirty:
            evicted, _ = lru.popitem(last=False)
            _clear(self._lrumap, evicted)
            touched.append(evicted)
        lru[ext] = None
        _set(self._lrumap, ext)

    def _differs(self, exts) -> bool:
        """Whether the image bit of any of exts differs from the bit known on disk."""
        for ext in exts:
            in_image = _test(self._memmap, ext) or _test(self._lrumap, ext)
            if in_image != _test(self._diskmap, ext):
                return True
        return False

    def _count_update(self, flush: bool) -> bool:
        if flush:
            self.stat_updates += 1
        return flush

    def _lowest_in_pass(self) -> int | None:
        found = _NONZERO.search(self._passmap, self._pass_hint)
        if found is None:
            self._pass_hint = len(self._passmap)
            return None
        index = found.start()
        self._pass_hint = index
        byte = self._passmap[index]
        return (index << 3) + (byte & -byte).bit_length() - 1

    def _set_bits(self, image: bytes):
        """Extents set in image, ascending; padding bits past the last extent are ignored."""
        for found in _NONZERO.finditer(image):
            index = found.start()
            byte = image[index]
            while byte:
                low = byte & -byte
                ext = (index << 3) + low.bit_length() - 1
                if ext >= self.nextents:
                    return
                yield ext
                byte ^= low

    def _check_image(self, bitmap) -> bytes:
        image = bytes(bitmap)
        if len(image) != self.mapsize:
            raise ValueError(f"bitmap is {len(image)} bytes, expected {self.mapsize}")
        return image

    def _check_extent(self, ext: int) -> None:
        if not 0 <= ext < self.nextents:
            raise ValueError(f"extent {ext} outside 0..{self.nextents - 1}")


def _check_geometry(mediasize: int, extentsize: int, keepdirty: int, sectorsize: int, maxio: int):
    if mediasize <= 0:
        raise ValueError(f"mediasize must be positive, not {mediasize}")
    if sectorsize <= 0 or sectorsize & (sectorsize - 1):
        raise ValueError(f"sectorsize must be a power of 2, not {sectorsize}")
    # Extents are located by shifting, and hastctl create requires a power-of-2 multiple of sectors.
    if extentsize < sectorsize or extentsize & (extentsize - 1):
        raise ValueError(f"extentsize must be a power of 2 >= sectorsize, not {extentsize}")
    if keepdirty < 0:
        raise ValueError(f"keepdirty must not be negative, not {keepdirty}")
    # Sync chunks must stay sector-aligned for the provider.
    if maxio <= 0 or maxio % sectorsize:
        raise ValueError(f"maxio must be a positive multiple of sectorsize, not {maxio}")
