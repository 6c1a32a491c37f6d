"""Activemap: exact bitmap bytes, honest flush-needed results, the sync walk, and a model check."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hastpy.activemap import ActiveMap, SyncChunk, mapsize_for, nextents_for

SECTOR = 512
EXT = 1024  # two sectors per extent keeps the maps tiny


def make(nextents=10, tail=0, keepdirty=4, maxio=EXT, extentsize=EXT, premark=False):
    """A map of nextents extents, the last one ``tail`` bytes short. Sequential pre-marking is
    off unless asked: most tests here pin the plain keepdirty LRU."""
    return ActiveMap(nextents * extentsize - tail, extentsize, keepdirty, SECTOR, maxio, premark)


def bits(image: bytes) -> set[int]:
    return {i for i in range(len(image) * 8) if image[i >> 3] & (1 << (i & 7))}


def image_of(am: ActiveMap, exts) -> bytes:
    out = bytearray(am.mapsize)
    for ext in exts:
        out[ext >> 3] |= 1 << (ext & 7)
    return bytes(out)


def flush(am: ActiveMap) -> bytes:
    """A flush that may clear what is clearable: the primary's clear loop, once a flush of both
    nodes made the finished writes durable."""
    image = am.bitmap(clears(am))
    am.flushed(image)
    return image


def clears(am: ActiveMap) -> list:
    """A clear snapshot taken now, as a list for bitmap(): as if a flush of both nodes had begun
    and succeeded right away."""
    snap = am.clear_snapshot()
    return [snap] if snap else []


def flush_ahead(am: ActiveMap) -> bytes:
    """A flush that only adds bits: the primary's write-ahead flush."""
    image = am.bitmap()
    am.flushed(image)
    return image


def write_through(am: ActiveMap, offset: int, length: int) -> None:
    """One write from start to completion, flushing the bitmap whenever the map asks."""
    if am.write_start(offset, length):
        flush(am)
    if am.write_complete(offset, length):
        flush(am)


def ext_off(ext: int) -> int:
    return ext * EXT


# --- sizing and geometry --------------------------------------------------------------------------

GIB = 1 << 30


@pytest.mark.parametrize(
    "mediasize,nextents,mapsize",
    [
        (100 * GIB, 51200, 6656),  # hast.md §2: 100 GiB, 512 B sectors, 2 MiB extents
        (1024 * GIB, 524288, 64 * 1024),
        (10 * 1024 * GIB, 5242880, 640 * 1024),
    ],
)
def test_reference_sizes(mediasize, nextents, mapsize):
    size = mediasize - 4096
    assert nextents_for(size, 2 * 1024 * 1024) == nextents
    assert mapsize_for(size, 2 * 1024 * 1024, 512) == mapsize
    assert 100 * GIB - 4096 - 6656 == 107374171648  # the datasize hast.md quotes


def test_geometry_attributes():
    am = make(nextents=10, tail=512)
    assert am.nextents == 10
    assert am.mapsize == SECTOR
    assert am.mediasize == 10 * EXT - 512
    assert (am.extentsize, am.keepdirty, am.sectorsize, am.maxio) == (EXT, 4, SECTOR, EXT)
    assert am.bitmap() == bytes(SECTOR)


def test_mapsize_spills_into_second_sector():
    am = ActiveMap(4097 * EXT, EXT, 1, SECTOR, EXT)
    assert am.nextents == 4097
    assert am.mapsize == 2 * SECTOR


@pytest.mark.parametrize(
    "args",
    [
        (0, EXT, 4, SECTOR, EXT),  # empty media
        (-1, EXT, 4, SECTOR, EXT),
        (EXT, EXT, 4, 0, EXT),  # sector size zero
        (EXT, EXT, 4, 768, EXT),  # sector size not a power of 2
        (EXT, 256, 4, SECTOR, EXT),  # extent smaller than a sector
        (EXT, 1536, 4, SECTOR, EXT),  # extent not a power of 2
        (EXT, EXT, -1, SECTOR, EXT),  # negative keepdirty
        (EXT, EXT, 4, SECTOR, 0),  # no I/O size
        (EXT, EXT, 4, SECTOR, 700),  # I/O not sector aligned
    ],
)
def test_bad_geometry(args):
    with pytest.raises(ValueError):
        ActiveMap(*args)


def test_extent_of_and_extents_of():
    am = make(nextents=10, tail=512)
    assert am.extent_of(0) == 0
    assert am.extent_of(EXT - 1) == 0
    assert am.extent_of(EXT) == 1
    assert am.extent_of(am.mediasize - 1) == 9
    assert am.extents_of(EXT - 1, 2) == range(0, 2)
    assert am.extents_of(3 * EXT, 2 * EXT) == range(3, 5)
    assert am.extents_of(5, 0) == range(0)
    assert am.extents_of(am.mediasize, 0) == range(0)
    assert am.extent_range(0) == (0, EXT)
    assert am.extent_range(9) == (9 * EXT, EXT - 512)


@pytest.mark.parametrize("offset", [-1, 10 * EXT - 512])
def test_extent_of_outside(offset):
    with pytest.raises(ValueError):
        make(nextents=10, tail=512).extent_of(offset)


@pytest.mark.parametrize("offset,length", [(-1, 1), (0, -1), (10 * EXT - 512, 1), (0, 10 * EXT)])
def test_ranges_outside_media(offset, length):
    am = make(nextents=10, tail=512)
    for call in (am.extents_of, am.write_start, am.write_complete, am.need_sync):
        with pytest.raises(ValueError):
            call(offset, length)
    assert am.ndirty == 0


@pytest.mark.parametrize("ext", [-1, 10])
def test_bad_extent_numbers(ext):
    am = make(nextents=10)
    for call in (am.extent_range, am.extent_complete, am.sync_failed):
        with pytest.raises(ValueError):
            call(ext)


# --- exact bitmap bytes ---------------------------------------------------------------------------


def test_bitmap_bit_layout():
    am = make(nextents=20, keepdirty=0)
    am.write_start(ext_off(0), 1)
    am.write_start(ext_off(7), EXT + 1)  # extents 7 and 8
    am.write_start(ext_off(19), 1)
    image = am.bitmap()
    assert len(image) == SECTOR
    assert image[:3] == bytes([0x81, 0x01, 0x08])
    assert image[3:] == bytes(SECTOR - 3)


def test_bitmap_includes_keepdirty_set_after_completion():
    am = make(nextents=10, keepdirty=2)
    am.write_start(ext_off(3), 10)
    am.write_complete(ext_off(3), 10)
    assert am.ndirty == 0
    assert am.bitmap() == image_of(am, {3})


# --- flush-needed results -------------------------------------------------------------------------


def test_write_start_flushes_only_when_the_bit_is_not_on_disk():
    am = make(keepdirty=4)
    assert am.write_start(0, 10) is True
    flush(am)
    assert am.write_start(0, 10) is False  # already on disk and on the keepdirty list
    assert am.write_start(5, 10) is False
    assert am.write_complete(0, 10) is False  # still two writes in flight
    assert am.write_complete(0, 10) is False
    assert am.write_complete(5, 10) is False  # now clean, but kept dirty on disk
    assert am.ndirty == 0
    assert am.write_start(0, 10) is False  # a kept-dirty extent costs no flush
    assert am.stat_updates == 1


def test_write_spanning_extents_flags_once_and_counts_once():
    am = make(keepdirty=4)
    assert am.write_start(EXT - 1, 2) is True
    assert am.stat_updates == 1
    assert am.ndirty == 2
    assert bits(flush(am)) == {0, 1}


def test_write_ahead_flushes_never_clear_a_bit():
    """Only the clear loop clears, once a flush of both nodes made the finished writes durable:
    an image for a write-ahead flush keeps every bit on disk, and clear_snapshot() says what may
    go."""
    am = make(nextents=10, keepdirty=2)
    for ext in (0, 1):
        am.write_start(ext_off(ext), 1)
        flush_ahead(am)
        am.write_complete(ext_off(ext), 1)
    assert am.clear_snapshot() is None
    assert am.write_start(ext_off(2), 1) is True  # needs 2, evicts 0
    assert bits(flush_ahead(am)) == {0, 1, 2}
    assert not am.flush_needed()
    snap = am.clear_snapshot()
    assert bits(snap.bits) == {0}
    assert am.flush_needed([snap])
    assert bits(am.bitmap([snap])) == {1, 2}


def test_a_snapshot_does_not_clear_an_extent_written_after_it():
    """The snapshot's flush covers only the writes finished before it began: an extent written
    again meanwhile keeps its bit, even once that write finished and the extent left the
    keepdirty list again."""
    am = make(nextents=10, keepdirty=1)
    for ext in (0, 1):  # 1 evicts 0
        am.write_start(ext_off(ext), 1)
        flush_ahead(am)
        am.write_complete(ext_off(ext), 1)
    snap = am.clear_snapshot()  # {0}; the flush of both nodes begins
    for ext in (0, 2):  # 0 written again and evicted again by 2, before the flush ends
        am.write_start(ext_off(ext), 1)
        flush_ahead(am)
        am.write_complete(ext_off(ext), 1)
    assert bits(snap.bits) == {0}
    image = am.bitmap([snap])
    am.flushed(image)
    assert bits(image) == {0, 1, 2}  # 0 kept; 1 was in no snapshot
    later = am.clear_snapshot()
    assert bits(later.bits) == {0, 1}
    assert bits(am.bitmap([later])) == {2}


def test_a_snapshot_does_not_clear_an_extent_premarked_and_written_after_it():
    """A pre-marked extent joins the keepdirty list without a write, and its first write then
    takes the inline path: joining the list must count as written for the snapshots taken
    before, or that write's bit could be cleared by a flush that did not cover it."""
    am = make(nextents=16, keepdirty=2, premark=True)

    def write(ext):  # as the primary: write-ahead flushes only add bits
        if am.write_start(ext_off(ext), 1):
            flush_ahead(am)
        am.write_complete(ext_off(ext), 1)

    for ext in (7, 0, 2, 5):  # 7 and 0 pushed off the list, their bits still on disk
        write(ext)
    snap = am.clear_snapshot()
    assert bits(snap.bits) == {0, 7}
    write(6)  # follows 5: 7 is pre-marked, back on the list without a write
    write(7)  # on the list and on disk: the inline path
    for ext in (10, 12):
        write(ext)  # 5, 6 and 7 off the list again
    image = am.bitmap([snap])
    assert 0 not in bits(image)  # not written since: the snapshot's flush covered it
    assert 7 in bits(image)  # written after the snapshot: its flush does not cover it


def test_need_sync_on_disk_marks_every_extent_whose_bit_is_on_disk():
    am = make(nextents=10, keepdirty=2)
    for ext in (0, 1, 2):  # 0 is evicted, its bit still on disk
        am.write_start(ext_off(ext), 1)
        flush_ahead(am)
        am.write_complete(ext_off(ext), 1)
    assert am.sync_pending_extents == 0
    assert am.need_sync_on_disk() is False  # every bit it needs is on disk already
    assert am.sync_pending_extents == 3
    assert am.marked_for_sync(0, 1) and am.marked_for_sync(ext_off(2), 1)
    assert not am.marked_for_sync(ext_off(3), EXT)
    assert am.clear_snapshot() is None  # marked extents keep their bits until synced


def test_keepdirty_lru_eviction():
    am = make(nextents=10, keepdirty=2)
    for ext in (0, 1):
        assert am.write_start(ext_off(ext), 1) is True
        flush(am)
        assert am.write_complete(ext_off(ext), 1) is False
    # Extent 0 is least recent: writing 2 evicts it, clearing its bit in the same flush.
    assert am.write_start(ext_off(2), 1) is True
    assert bits(flush(am)) == {1, 2}
    # Touching 1 makes it most recent, so 3 evicts 2, which still has a write in flight.
    assert am.write_start(ext_off(1), 1) is False
    assert am.write_start(ext_off(3), 1) is True
    assert bits(flush(am)) == {1, 2, 3}
    # 2 is off the list: completing its write must clear its on-disk bit.
    assert am.write_complete(ext_off(2), 1) is True
    assert bits(flush(am)) == {1, 3}
    assert am.stat_updates == 5


def test_eviction_of_a_clean_extent_alone_is_a_change():
    # The new extent is already on disk (it has a write in flight), but the evicted one must clear.
    am = make(nextents=10, keepdirty=1)
    am.write_start(ext_off(0), 1)
    flush(am)
    am.write_start(ext_off(1), 1)  # evicts 0, which stays set: its write is in flight
    flush(am)
    am.write_complete(ext_off(1), 1)  # 1 stays kept dirty
    assert am.write_start(ext_off(0), 1) is True  # 0 is on disk; evicting 1 clears it
    assert bits(flush(am)) == {0}


def test_keepdirty_zero_flushes_on_every_start_and_finish():
    am = make(nextents=4, keepdirty=0)
    for _ in range(3):
        assert am.write_start(0, 1) is True
        flush(am)
        assert am.write_complete(0, 1) is True
        assert flush(am) == bytes(SECTOR)
    assert am.stat_updates == 6


def test_updates_much_fewer_than_writes_inside_keepdirty():
    am = make(nextents=64, keepdirty=8)
    writes = 0
    for i in range(2000):
        offset = ext_off((i * 7) % 8) + (i % 3) * 100
        write_through(am, offset, 100)
        writes += 1
    assert am.stat_updates == 8  # one per extent of the working set, on first touch
    assert writes == 2000


def test_updates_track_writes_beyond_keepdirty():
    am = make(nextents=64, keepdirty=8)
    for i in range(1000):
        offset = ext_off(i % 16)
        write_through(am, offset, 1)
    assert am.stat_updates >= 1000  # every write evicts, so every write rewrites the map


def test_write_complete_without_start_is_rejected_and_changes_nothing():
    am = make()
    am.write_start(0, 1)
    flush(am)
    with pytest.raises(ValueError):
        am.write_complete(0, EXT + 1)  # extent 1 never started
    assert am.ndirty == 1
    assert am.write_complete(0, 1) is False


def test_zero_length_write_is_a_no_op():
    am = make()
    assert am.write_start(EXT, 0) is False
    assert am.write_complete(EXT, 0) is False
    assert am.need_sync(EXT, 0) is False
    assert am.ndirty == 0


def test_dirty_bytes_counts_whole_extents():
    am = make(nextents=4, tail=512)
    am.write_start(0, 3 * EXT + 1)
    assert am.ndirty == 4
    assert am.dirty_bytes == 4 * EXT


# --- the two-phase flush --------------------------------------------------------------------------


def test_bit_is_not_on_disk_until_flushed():
    am = make()
    assert am.write_start(0, 1) is True
    image = am.bitmap()
    # Another writer arrives while the image is being written: it must wait for a flush too.
    assert am.write_start(0, 1) is True
    am.flushed(image)
    assert am.write_start(0, 1) is False
    assert not am.flush_needed()


def test_bits_an_in_flight_image_clears_count_as_gone():
    am = make(nextents=4, keepdirty=0)
    am.write_start(0, 1)
    flush(am)
    assert am.write_complete(0, 1) is True
    am.bitmap(clears(am))  # the clearing image is computed ...
    # ... and before it is reported flushed a new write to extent 0 arrives: the disk may already
    # have lost the bit, so a flush is needed.
    assert am.write_start(0, 1) is True


def test_on_disk_follows_flushed_images():
    am = make(nextents=4, keepdirty=0)
    am.write_start(0, EXT + 1)
    assert not am.on_disk(0, EXT + 1)
    image = am.bitmap()
    assert not am.on_disk(0, 1)  # in flight is not durable
    am.flushed(image)
    assert am.on_disk(0, EXT + 1)
    assert not am.on_disk(0, 2 * EXT + 1)
    assert am.on_disk(0, 0)  # nothing to be on disk


def test_failed_flush_leaves_the_map_conservative():
    am = make()
    am.write_start(0, 1)
    am.bitmap()  # the pwrite fails: flushed() is never called
    assert am.flush_needed()
    assert am.write_start(0, 1) is True
    flush(am)
    assert not am.flush_needed()


def test_out_of_order_flushed_keeps_only_common_bits():
    am = make(nextents=4, keepdirty=0)
    am.write_start(0, 1)
    first = am.bitmap()  # {0}
    am.write_complete(0, 1)
    am.write_start(ext_off(1), 1)
    second = am.bitmap()  # {1}
    am.flushed(first)
    assert am.write_start(ext_off(1), 1) is True  # only in the newer image, not yet durable
    assert am.write_start(0, 1) is True
    am.write_complete(0, 1)
    am.write_complete(ext_off(1), 1)
    am.flushed(second)
    assert am.write_start(ext_off(1), 1) is False


def test_flushed_without_bitmap_trusts_the_caller():
    am = make(nextents=4, keepdirty=0)
    am.flushed(image_of(am, {2}))
    assert am.write_start(ext_off(2), 1) is False
    assert am.write_complete(ext_off(2), 1) is True


def test_flushed_rejects_wrong_size():
    with pytest.raises(ValueError):
        make().flushed(b"\0" * 10)


# --- need_sync and extent_complete ----------------------------------------------------------------


def test_need_sync_marks_and_survives_write_complete():
    am = make(nextents=10, keepdirty=0)
    am.write_start(ext_off(2), 10)
    flush(am)
    assert am.need_sync(ext_off(2), 10) is False  # the write already put the bit on disk
    assert am.write_complete(ext_off(2), 10) is False  # still needs sync: the bit stays
    assert am.ndirty == 1
    assert am.sync_pending_extents == 1
    assert am.sync_pending_bytes == EXT
    assert am.need_sync(ext_off(2), 10) is False  # already marked: no double accounting
    am.sync_rewind()
    assert am.sync_next() == SyncChunk(ext_off(2), EXT, 2, True)
    assert am.extent_complete(2) is True  # clean now, not kept dirty: clear on disk
    assert am.ndirty == 0
    assert am.sync_pending_bytes == 0
    assert flush(am) == bytes(SECTOR)
    assert am.sync_next() is None


def test_need_sync_without_a_write_needs_a_flush():
    am = make()
    assert am.need_sync(ext_off(1), 2 * EXT) is True
    assert bits(flush(am)) == {1, 2}
    assert am.stat_updates == 0  # only write_start/write_complete count as activemap updates


def test_extent_complete_keeps_extent_with_writes_in_flight():
    am = make(keepdirty=0)
    am.write_start(0, 1)
    am.need_sync(0, 1)
    flush(am)
    chunk = am.sync_next()
    assert chunk.last
    assert am.extent_complete(0) is False  # a write is still in flight: stays dirty
    assert am.ndirty == 1
    assert am.write_complete(0, 1) is True
    assert am.ndirty == 0


def test_sync_pending_bytes_counts_short_last_extent():
    am = make(nextents=4, tail=512)
    am.need_sync(0, am.mediasize)
    assert am.sync_pending_extents == 4
    assert am.sync_pending_bytes == am.mediasize
    assert am.dirty_bytes == 4 * EXT


# --- copyin and merge -----------------------------------------------------------------------------


def test_copyin_resyncs_everything_marked():
    am = make(nextents=12, tail=512)
    ondisk = image_of(am, {0, 5, 11})
    am.copyin(ondisk)
    assert am.ndirty == 3
    assert am.sync_pending_bytes == 2 * EXT + EXT - 512
    assert not am.flush_needed()  # the image is what we just read
    assert am.write_start(ext_off(5), 1) is False  # already on disk
    am.sync_rewind()
    walked = []
    while (chunk := am.sync_next()) is not None:
        walked.append(chunk)
        if chunk.last:
            am.extent_complete(chunk.extent)
    assert walked == [
        SyncChunk(0, EXT, 0, True),
        SyncChunk(5 * EXT, EXT, 5, True),
        SyncChunk(11 * EXT, EXT - 512, 11, True),
    ]
    assert am.ndirty == 1  # extent 5 still has its write in flight
    assert am.sync_pending_extents == 0


def test_copyin_ignores_padding_bits():
    am = make(nextents=10)
    ondisk = bytearray(image_of(am, {9}))
    ondisk[1] |= 0x80  # bit 15: past the last extent
    ondisk[100] = 0xFF
    am.copyin(bytes(ondisk))
    assert am.ndirty == 1
    assert not am.flush_needed()  # a write-ahead flush keeps what the disk has ...
    assert am.flush_needed(clears(am))  # ... and a clearing one drops the junk
    assert flush(am) == image_of(am, {9})


def test_copyin_wrong_size_and_late_copyin_are_rejected():
    am = make()
    with pytest.raises(ValueError):
        am.copyin(b"\xff" * (SECTOR + 1))
    am.write_start(0, 1)
    with pytest.raises(RuntimeError):
        am.copyin(bytes(SECTOR))


def test_merge_adds_remote_dirty_extents_and_rewinds():
    am = make(nextents=10, keepdirty=0)
    am.need_sync(ext_off(1), 1)
    flush(am)
    assert am.sync_next().extent == 1  # a walk in progress is abandoned by the merge
    assert am.merge(image_of(am, {1, 4, 6})) is True
    assert am.sync_pending_extents == 3
    assert am.ndirty == 3
    assert bits(flush(am)) == {1, 4, 6}
    assert am.merge(image_of(am, {4})) is False  # nothing new
    walked = []
    while (chunk := am.sync_next()) is not None:
        walked.append(chunk.extent)
        assert am.extent_complete(chunk.extent) is True
        flush(am)
    assert walked == [1, 4, 6]
    assert am.ndirty == 0


def test_merge_of_all_ones_is_a_full_sync():
    am = make(nextents=10, tail=512)
    assert am.merge(b"\xff" * am.mapsize) is True
    assert am.sync_pending_bytes == am.mediasize
    assert flush(am) == image_of(am, range(10))


def test_merge_rejects_wrong_size():
    with pytest.raises(ValueError):
        make().merge(b"")


# --- the sync walk --------------------------------------------------------------------------------


def walk(am: ActiveMap) -> list[SyncChunk]:
    chunks = []
    while (chunk := am.sync_next()) is not None:
        chunks.append(chunk)
        if chunk.last:
            am.extent_complete(chunk.extent)
    return chunks


def test_chunks_are_maxio_clipped_to_extent_and_media_end():
    extent = 4 * SECTOR
    am = ActiveMap(3 * extent - SECTOR, extent, 4, SECTOR, 3 * SECTOR)
    am.need_sync(0, am.mediasize)
    assert walk(am) == [
        SyncChunk(0, 3 * SECTOR, 0, False),
        SyncChunk(3 * SECTOR, SECTOR, 0, True),  # clipped to the extent end
        SyncChunk(4 * SECTOR, 3 * SECTOR, 1, False),
        SyncChunk(7 * SECTOR, SECTOR, 1, True),
        SyncChunk(8 * SECTOR, 3 * SECTOR, 2, True),  # the short last extent ends at the media end
    ]
    assert am.ndirty == 0


def test_last_extent_shorter_than_a_chunk_is_clipped_to_media_end():
    extent = 4 * SECTOR
    am = ActiveMap(2 * extent + SECTOR, extent, 4, SECTOR, 2 * SECTOR)
    am.need_sync(am.mediasize - 1, 1)
    assert walk(am) == [SyncChunk(2 * extent, SECTOR, 2, True)]


def test_maxio_larger_than_extent_gives_one_chunk_per_extent():
    am = make(nextents=3, maxio=8 * EXT)
    am.need_sync(0, am.mediasize)
    assert [c.length for c in walk(am)] == [EXT] * 3


def test_walk_takes_lowest_marked_extent_even_behind_the_cursor():
    am = make(nextents=30)
    am.need_sync(ext_off(13), 1)
    am.need_sync(ext_off(27), 1)
    first = am.sync_next()
    assert first.extent == 13
    am.extent_complete(13)
    am.need_sync(ext_off(2), 1)  # marked behind the cursor during the pass
    assert [c.extent for c in walk(am)] == [2, 27]
    am.need_sync(ext_off(3), 1)  # and after the pass ended
    assert [c.extent for c in walk(am)] == [3]


def test_need_sync_during_walk_of_the_same_extent_forces_a_rewalk():
    am = make(nextents=4, maxio=SECTOR)
    am.need_sync(ext_off(1), 1)
    first = am.sync_next()
    assert first == SyncChunk(EXT, SECTOR, 1, False)
    am.need_sync(ext_off(1), 1)  # a failed remote write lands in the part already copied
    last = am.sync_next()
    assert last.last
    assert am.extent_complete(1) is False
    assert am.sync_pending_extents == 1
    assert walk(am) == [SyncChunk(EXT, SECTOR, 1, False), SyncChunk(EXT + SECTOR, SECTOR, 1, True)]
    assert am.sync_pending_extents == 0


def test_stale_extent_complete_is_ignored():
    am = make(nextents=4, maxio=SECTOR)
    am.need_sync(0, 2 * EXT)
    chunk = am.sync_next()
    assert am.extent_complete(0) is False  # not all of it handed out yet
    assert am.extent_complete(1) is False  # not being walked
    am.sync_next()
    am.sync_rewind()  # e.g. a reconnect between the copy and the completion
    assert am.extent_complete(chunk.extent) is False
    assert am.sync_pending_extents == 2
    assert [c.extent for c in walk(am)] == [0, 0, 1, 1]


def test_unresolved_last_chunk_is_walked_again():
    am = make(nextents=4)
    am.need_sync(ext_off(3), 1)
    assert am.sync_next() == SyncChunk(3 * EXT, EXT, 3, True)
    assert am.sync_next() == SyncChunk(3 * EXT, EXT, 3, True)


def test_sync_failed_skips_until_rewind():
    am = make(nextents=4, maxio=SECTOR)
    am.need_sync(0, am.mediasize)
    chunk = am.sync_next()
    am.sync_failed(chunk.extent)  # the first chunk failed: give up on extent 0 for this pass
    assert [c.extent for c in walk(am)] == [1, 1, 2, 2, 3, 3]
    assert am.sync_next() is None
    assert am.sync_pending_extents == 1
    assert am.ndirty == 1
    am.sync_failed(2)  # not walked nor pending in this pass: harmless
    am.sync_rewind()
    assert [c.extent for c in walk(am)] == [0, 0]
    assert am.sync_pending_extents == 0


def test_need_sync_on_failed_extent_waits_for_the_rewind():
    am = make(nextents=4)
    am.need_sync(0, 1)
    flush(am)
    am.sync_failed(am.sync_next().extent)
    assert am.need_sync(0, 1) is False
    assert am.sync_next() is None
    am.sync_rewind()
    assert [c.extent for c in walk(am)] == [0]


def test_clear_sync_drops_marks():
    am = make(nextents=6, keepdirty=0)
    am.write_start(ext_off(1), 1)
    am.need_sync(ext_off(1), 3 * EXT)
    flush(am)
    am.sync_next()
    assert am.clear_sync() is True
    assert am.sync_pending_extents == 0
    assert am.ndirty == 1  # the write in flight still holds extent 1
    assert bits(flush(am)) == {1}
    assert am.sync_next() is None
    assert am.clear_sync() is False


def test_walk_over_a_large_sparse_map():
    am = ActiveMap(10 * 1024 * GIB, 2 * 1024 * 1024, 64, 512, 1024 * 1024)
    marked = list(range(0, am.nextents, am.nextents // 500))
    for ext in marked:
        am.need_sync(ext << 21, 1)
    seen = []
    while (chunk := am.sync_next()) is not None:
        if chunk.last:
            seen.append(chunk.extent)
            am.extent_complete(chunk.extent)
    assert seen == marked


# --- sequential pre-marking --------------------------------------------------------------------------


def sequential_updates(am: ActiveMap, nwrites: int, size: int) -> int:
    """Write [0, nwrites * size) in order, one write in flight at a time; bitmap writes made."""
    for i in range(nwrites):
        offset = i * size
        if am.write_start(offset, size):
            assert am.on_disk(offset, size) is False
            flush(am)
        assert am.on_disk(offset, size), "write-ahead: the write's extents are on disk first"
        if am.write_complete(offset, size):
            flush(am)
    return am.stat_updates


def test_premark_halves_bitmap_writes_of_a_sequential_stream():
    plain = sequential_updates(make(nextents=64, keepdirty=8), 64 * 4, EXT // 4)
    premarked = sequential_updates(make(nextents=64, keepdirty=8, premark=True), 64 * 4, EXT // 4)
    assert plain >= 64  # one per new extent (and evictions ride along)
    assert premarked <= plain // 2 + 1


def test_premark_marks_the_next_extent_in_the_same_flush():
    am = make(nextents=10, keepdirty=4, premark=True)
    assert am.write_start(ext_off(0), EXT) is True
    assert bits(flush(am)) == {0}  # a first write: nothing says the stream is sequential yet
    am.write_complete(ext_off(0), EXT)
    assert am.write_start(ext_off(1), EXT) is True
    assert bits(flush(am)) == {0, 1, 2}  # 0 came before: 2 rides along
    am.write_complete(ext_off(1), EXT)
    assert am.write_start(ext_off(2), EXT) is False  # already on disk: no synchronous write
    am.write_complete(ext_off(2), EXT)
    assert am.write_start(ext_off(3), EXT) is True
    assert bits(flush(am)) == {0, 1, 2, 3, 4}  # 4 is an extra on the full list: evicts nothing
    am.write_complete(ext_off(3), EXT)
    assert am.write_start(ext_off(4), EXT) is False
    am.write_complete(ext_off(4), EXT)
    assert am.write_start(ext_off(5), EXT) is True  # back to keepdirty: 0 and 1 go, 6 comes
    assert bits(flush(am)) == {2, 3, 4, 5, 6}
    assert am.stat_updates == 4


def test_premark_needs_a_flush_and_room():
    # No flush needed: nothing is pre-marked (pre-marking never adds a bitmap write).
    am = make(nextents=10, keepdirty=4, premark=True)
    for ext in (0, 1):
        am.write_start(ext_off(ext), 1)
        flush(am)
    assert am.bitmap() == image_of(am, {0, 1, 2})
    assert am.write_start(ext_off(1), 1) is False
    assert am.bitmap() == image_of(am, {0, 1, 2})
    # keepdirty 1 (the smallest dirty set asked for): no pre-marking at all.
    am = make(nextents=10, keepdirty=1, premark=True)
    assert am.premark is False
    # The last extent has no next one.
    am = make(nextents=2, keepdirty=4, premark=True)
    am.write_start(ext_off(0), 1)
    flush(am)
    assert am.write_start(ext_off(1), 1) is True
    assert bits(flush(am)) == {0, 1}


def test_premark_never_pushes_out_a_working_set_that_fits_keepdirty():
    # Round-robin over exactly keepdirty extents: pre-marking the one after the set must not
    # evict a member, or every lap would rewrite the bitmap.
    am = make(nextents=10, keepdirty=4, premark=True)
    for i in range(64):
        offset = ext_off(i % 4)
        write_through(am, offset, 1)
    assert am.stat_updates == 3  # 0, then 1 (with 2), then 3 (with 4); never again
    assert bits(am.bitmap()) == {0, 1, 2, 3, 4}


def test_premark_never_turns_an_eviction_flush_into_one_that_changes_nothing():
    # Found by the model check: a second lap over the same writes, all still in flight, evicts
    # the pre-marked extent 3; pre-marking it again in the same call used to leave a flush
    # requested whose image equals what is on disk.
    am = make(nextents=4, keepdirty=2, premark=True)
    ondisk = set()
    for offset, length in ((0, 1), (ext_off(1), EXT + 1), (0, 1), (ext_off(1), EXT + 1)):
        if am.write_start(offset, length):
            image = am.bitmap(clears(am))
            assert bits(image) != ondisk, "flush requested but the image did not change"
            am.flushed(image)
            ondisk = bits(image)
    assert ondisk == {0, 1, 2}  # 3 (pre-marked by the first lap) evicted and cleared


def test_random_writes_are_not_premarked():
    am = make(nextents=64, keepdirty=8, premark=True)
    for ext in (10, 30, 50, 20):
        am.write_start(ext_off(ext), 1)
        flush(am)
    assert bits(am.bitmap()) == {10, 30, 50, 20}


# --- model check ----------------------------------------------------------------------------------

M_SECTOR = 512
M_EXT = 4 * M_SECTOR


class ActiveMapModel(RuleBasedStateMachine):
    """Random operations against a naive model, with a caller that flushes whenever told to."""

    @initialize(
        nextents=st.integers(1, 20),
        tail=st.integers(0, 3),
        keepdirty=st.integers(0, 4),
        maxio_sectors=st.integers(1, 5),
        premark=st.booleans(),
        data=st.data(),
    )
    def setup(self, nextents, tail, keepdirty, maxio_sectors, premark, data):
        mediasize = nextents * M_EXT - tail * M_SECTOR
        self.am = ActiveMap(mediasize, M_EXT, keepdirty, M_SECTOR, maxio_sectors * M_SECTOR, premark)
        self.keepdirty = keepdirty
        self.premark = premark and keepdirty >= 2
        ondisk = data.draw(st.sets(st.integers(0, nextents - 1)))
        self.am.copyin(image_of(self.am, ondisk))
        self.inflight = []  # started, not completed writes
        self.needsync = set(ondisk)
        self.covered = {ext: [] for ext in ondisk}  # chunks handed out since the last mark
        self.lru = []  # least recent first
        self.disk = set(ondisk)
        self.updates = 0
        self.chunk = None  # the last chunk handed out, until resolved
        self.skipped = set()  # extents given up on in this pass
        self.clear_owed = False  # a write-ahead flush left bits to clear
        self.flushing = []  # (clear snapshot, extents written since it): flushes of both nodes under way

    # helpers

    def written(self) -> set[int]:
        return {ext for off, length in self.inflight for ext in self.am.extents_of(off, length)}

    def flush_if(self, needed: bool, clear: bool = True) -> None:
        """Flush if asked: clearing what a clear snapshot offers (the primary's clear loop, once
        a flush of both nodes made the finished writes durable), or only adding bits (its
        write-ahead flush)."""
        if needed:
            wanted = self.written() | self.needsync | set(self.lru)
            snaps = clears(self.am) if clear else []
            assert (bits(snaps[0].bits) if snaps else set()) == (self.disk - wanted if clear else set())
            image = self.am.bitmap(snaps)
            if clear:
                assert bits(image) != self.disk, "flush requested but the image did not change"
                assert bits(image) == wanted
            else:
                assert bits(image) == wanted | self.disk, "a write-ahead flush cleared a bit"
            self.am.flushed(image)
            self.disk = bits(image)

    @rule()
    def clear_loop(self):
        """The primary's clear loop, woken after a write-ahead flush: clears what it may."""
        self.flush_if(self.clear_owed and self.am.flush_needed(clears(self.am)))
        self.clear_owed = False

    def draw_range(self, data):
        size = self.am.mediasize
        offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, min(size - offset, 3 * M_EXT)))
        return offset, length

    def mark(self, exts) -> None:
        for ext in exts:
            self.needsync.add(ext)
            self.covered[ext] = []  # whatever was copied before may be stale now

    def full_coverage(self, ext) -> bool:
        start, length = self.am.extent_range(ext)
        pos = start
        for off, ln in sorted(self.covered[ext]):
            if off > pos:
                return False
            pos = max(pos, off + ln)
        return pos >= start + length

    # rules

    @rule(data=st.data(), clear=st.booleans())
    def start_write(self, data, clear):
        offset, length = self.draw_range(data)
        self.inflight.append((offset, length))
        self.start(offset, length, flush_works=True, clear=clear)

    @rule(data=st.data())
    def write_whose_flush_fails(self, data):
        """The bitmap write a write_start asked for fails: the primary fails the write at once
        (write_complete, no flush of its own), and a later flush that works catches up."""
        offset, length = self.draw_range(data)
        self.start(offset, length, flush_works=False)
        self.complete(offset, length)
        self.flush_if(self.am.flush_needed(clears(self.am)))

    def start(self, offset, length, flush_works: bool, clear: bool = False) -> None:
        exts = self.am.extents_of(offset, length)
        for _, since in self.flushing:
            since.update(exts)
        sequential = self.premark and exts[0] - 1 in self.lru
        sets_bits = not set(exts) <= self.disk
        flag = self.am.write_start(offset, length)
        if not flag:
            assert set(exts) <= self.disk, "write-ahead violated: bit not on disk"
        self.updates += flag
        for ext in exts:
            self.lru_touch(ext)
        # The pre-marked next extent joins the list as an extra (no eviction), in the same
        # flush, and only with a flush that sets a bit of this write (write-ahead).
        premarked = None
        if sets_bits and sequential and exts[-1] + 1 < self.am.nextents and exts[-1] + 1 not in self.lru:
            assert flag
            premarked = exts[-1] + 1
            self.lru.append(premarked)
        if flush_works:
            # The primary's write-ahead flush writes only if this write's bits are not on disk;
            # asked for one, the primary also wakes its clear loop (an eviction's bit is left
            # for it).
            self.flush_if(flag and (clear or sets_bits), clear)
            self.clear_owed |= flag and not clear
        elif flag:
            # Written and failed: flushed() never comes, and a torn write may have cleared
            # whatever the image clears (a write-ahead image clears nothing).
            self.disk &= bits(self.am.bitmap())
        assert premarked is None or not flush_works or premarked in self.disk, "the pre-marked extent must ride the same flush"
        assert len(self.lru) <= self.keepdirty + (1 if self.premark else 0)

    def lru_touch(self, ext):
        if ext in self.lru:
            self.lru.remove(ext)
        elif self.keepdirty:
            while len(self.lru) >= self.keepdirty:
                self.lru.pop(0)
        if self.keepdirty:
            self.lru.append(ext)

    @precondition(lambda self: self.inflight)
    @rule(data=st.data(), remote_failed=st.booleans())
    def complete_write(self, data, remote_failed):
        offset, length = data.draw(st.sampled_from(self.inflight))
        if remote_failed:
            self.mark(self.am.extents_of(offset, length))
            self.flush_if(self.am.need_sync(offset, length))
        self.inflight.remove((offset, length))
        self.flush_if(self.complete(offset, length))

    def complete(self, offset, length) -> bool:
        flag = self.am.write_complete(offset, length)
        if not flag:  # no flush asked: the image agrees with the disk on this write's extents
            image = self.written() | self.needsync | set(self.lru)
            for ext in self.am.extents_of(offset, length):
                assert (ext in image) == (ext in self.disk), "write_complete hid a change"
        self.updates += flag
        return flag

    @rule(data=st.data())
    def need_sync(self, data):
        offset, length = self.draw_range(data)
        self.mark(self.am.extents_of(offset, length))
        self.flush_if(self.am.need_sync(offset, length))

    @rule(data=st.data())
    def merge(self, data):
        remote = data.draw(st.sets(st.integers(0, self.am.nextents - 1)))
        self.mark(remote)
        self.flush_if(self.am.merge(image_of(self.am, remote)))
        self.skipped = set()

    @rule()
    def rewind(self):
        self.am.sync_rewind()
        self.skipped = set()

    @rule()
    def sync_step(self):
        self.chunk = self.am.sync_next()
        if self.chunk is not None:
            self.check_chunk(self.chunk)
        else:
            assert self.needsync <= self.skipped, "the pass ended with marked extents unvisited"

    @precondition(lambda self: self.chunk is not None)
    @rule(data=st.data())
    def need_sync_in_walked_extent(self, data):
        """A remote write fails inside the extent being copied, maybe in a part already copied."""
        start, length = self.am.extent_range(self.chunk.extent)
        offset = data.draw(st.integers(start, start + length - 1))
        self.mark([self.chunk.extent])
        self.flush_if(self.am.need_sync(offset, 1))

    @precondition(lambda self: self.chunk is not None)
    @rule(failed=st.booleans())
    def resolve_chunk(self, failed):
        if failed:
            self.am.sync_failed(self.chunk.extent)
            self.skipped.add(self.chunk.extent)
        elif self.chunk.last:
            self.complete_extent(self.chunk.extent)
        self.chunk = None

    @rule()
    def full_walk(self):
        self.chunk = None
        self.skipped = set()
        self.am.sync_rewind()
        for _ in range(self.am.nextents * (M_EXT // M_SECTOR) + 1):
            chunk = self.am.sync_next()
            if chunk is None:
                break
            self.check_chunk(chunk)
            if chunk.last:
                assert self.complete_extent(chunk.extent), "an undisturbed walk must complete"
        else:
            raise AssertionError("the walk did not terminate")
        assert not self.needsync
        assert self.am.sync_pending_extents == 0

    @rule()
    def check_image(self):
        image = self.am.bitmap(clears(self.am))
        assert bits(image) == self.written() | self.needsync | set(self.lru)
        self.am.flushed(image)
        self.disk = bits(image)

    @rule()
    def begin_clear_flush(self):
        """The clear loop (or a user's FLUSH) takes a snapshot, then flushes both nodes."""
        snap = self.am.clear_snapshot()
        wanted = self.written() | self.needsync | set(self.lru)
        assert (bits(snap.bits) if snap else set()) == self.disk - wanted
        if snap:
            self.flushing.append((snap, set()))

    @precondition(lambda self: self.flushing)
    @rule(data=st.data())
    def end_clear_flush(self, data):
        """That flush succeeded: the snapshot's bits go, except on extents in use now or written
        since it was taken (the flush does not cover those writes)."""
        snap, since = self.flushing.pop(data.draw(st.integers(0, len(self.flushing) - 1)))
        wanted = self.written() | self.needsync | set(self.lru)
        image = self.am.bitmap([snap])
        assert bits(image) == wanted | (self.disk - (bits(snap.bits) - since))
        self.am.flushed(image)
        self.disk = bits(image)
        self.clear_owed = True  # what was written since waits for a later flush

    @rule()
    def link_lost(self):
        """The link went down: every extent on disk may hold writes the peer never made durable."""
        self.mark(self.disk)
        self.flush_if(self.am.need_sync_on_disk())

    def check_chunk(self, chunk):
        start, length = self.am.extent_range(chunk.extent)
        assert chunk.extent in self.needsync
        assert 0 < chunk.length <= self.am.maxio
        assert start <= chunk.offset and chunk.offset + chunk.length <= start + length
        assert chunk.last == (chunk.offset + chunk.length == start + length)
        self.covered[chunk.extent].append((chunk.offset, chunk.length))

    def complete_extent(self, ext) -> bool:
        before = self.am.sync_pending_extents
        flag = self.am.extent_complete(ext)
        cleared = self.am.sync_pending_extents == before - 1
        if cleared:
            assert self.full_coverage(ext), "extent declared synced without being fully copied"
            self.needsync.discard(ext)
        else:
            assert self.am.sync_pending_extents == before
            assert not flag
        self.flush_if(flag)
        return cleared

    # invariants

    @invariant()
    def dirty_extents_are_on_disk(self):
        assert self.written() | self.needsync <= self.disk
        assert all(self.am.on_disk(offset, length) for offset, length in self.inflight)

    @invariant()
    def every_change_was_reported(self):
        assert not self.am.flush_needed()
        assert self.clear_owed or not self.am.flush_needed(clears(self.am))

    @invariant()
    def counts_match(self):
        assert self.am.ndirty == len(self.written() | self.needsync)
        assert self.am.sync_pending_extents == len(self.needsync)
        assert self.am.stat_updates == self.updates


TestActiveMapModel = ActiveMapModel.TestCase
TestActiveMapModel.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
