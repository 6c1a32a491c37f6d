"""provider: open/size/lock and `hastctl create` on real sparse files (and loop devices as root)."""

import errno
import fcntl
import os
import shutil
import subprocess

import pytest

from hastpy import provider as provider_mod
from hastpy.errors import MetadataError, ProviderError, UsageError
from hastpy.metadata import NO_METADATA, Metadata
from hastpy.provider import BLKGETSIZE64, Provider, create, open_provider

from test_metadata import DUMP_100M, EXPECTED_HEADER, MD_100M, MEDIASIZE_100M

MiB = 1024 * 1024


def sparse(tmp_path, size=MEDIASIZE_100M, name="disk.img"):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


# -- create ---------------------------------------------------------------------------------------


def test_create_100mib_exact_bytes(tmp_path):
    path = sparse(tmp_path)
    # Old contents where the bitmap goes, and data markers create must leave alone.
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * 512)
        f.seek(4608)
        f.write(b"DATA-START")
        f.seek(MEDIASIZE_100M - 8)
        f.write(b"DATA-END")
    md = create(path, "test")
    assert md == MD_100M
    with open(path, "rb") as f:
        assert f.read(4096) == EXPECTED_HEADER
        assert f.read(512) == bytes(512)
        assert f.read(10) == b"DATA-START"
        f.seek(MEDIASIZE_100M - 8)
        assert f.read() == b"DATA-END"
    assert os.path.getsize(path) == MEDIASIZE_100M


def test_create_leaves_file_sparse(tmp_path):
    path = sparse(tmp_path)
    create(path, "test")
    # Only the header and bitmap were written; the 100 MiB data area is still a hole.
    assert os.stat(path).st_blocks * 512 < MiB


def test_create_then_read_back(tmp_path):
    path = sparse(tmp_path)
    create(path, "test", extentsize=64 * 1024, keepdirty=128)
    with open_provider(path, writable=False) as p:
        md = p.read_metadata("test")
        # ceil((104857600 - 4096) / 65536) = 1600 extents = 200 bytes, one sector of bitmap.
        assert (md.extentsize, md.keepdirty, md.offset, md.datasize) == (65536, 128, 4608, 104852992)
        assert p.read_bitmap(md.mapsize) == bytes(512)
        assert not p.writable and not p.locked


def test_create_with_mediasize(tmp_path):
    path = sparse(tmp_path)
    md = create(path, "test", mediasize=50 * MiB)
    assert md.offset + md.datasize == 50 * MiB
    with pytest.raises(UsageError) as exc:
        create(path, "test", mediasize=MEDIASIZE_100M + 512)
    assert str(exc.value) == f"Provided mediasize is larger than provider {path} size."


def test_create_too_small(tmp_path):
    path = sparse(tmp_path, size=MiB)
    with pytest.raises(UsageError, match="too small"):
        create(path, "test")
    create(path, "test", extentsize=64 * 1024)


def test_create_refused_while_locked(tmp_path):
    path = sparse(tmp_path)
    create(path, "test")
    with open_provider(path) as running:
        running.lock()
        with pytest.raises(ProviderError) as exc:
            create(path, "other")
        assert str(exc.value) == f"Unable to lock {path}: already in use."
        assert running.read_metadata("test") == MD_100M
    create(path, "other")


# -- reading metadata through a provider ----------------------------------------------------------


def test_never_created(tmp_path):
    path = sparse(tmp_path)
    with open_provider(path, writable=False) as p, pytest.raises(MetadataError) as exc:
        p.read_metadata("test")
    assert str(exc.value) == f"{path}: {NO_METADATA}"


def test_resource_mismatch_message(tmp_path):
    path = sparse(tmp_path)
    create(path, "test")
    with open_provider(path, writable=False) as p, pytest.raises(MetadataError) as exc:
        p.read_metadata("shared")
    assert str(exc.value) == f"Provider {path} is not part of resource shared."


def test_shrunk_provider(tmp_path):
    path = sparse(tmp_path)
    create(path, "test")
    os.truncate(path, MEDIASIZE_100M - 512)
    with open_provider(path, writable=False) as p, pytest.raises(MetadataError, match="was it shrunk"):
        p.read_metadata()


def test_write_through_read_only_provider(tmp_path):
    path = sparse(tmp_path)
    with open_provider(path, writable=False) as p:
        with pytest.raises(ProviderError, match=f"^{path}: Unable to write at offset 0: Bad file descriptor"):
            p.write_metadata(MD_100M)


def test_metadata_roundtrip_through_provider(tmp_path):
    path = sparse(tmp_path)
    create(path, "test")
    with open_provider(path) as p:
        p.lock()
        md = p.read_metadata("test").with_(resuid=42, localcnt=3, prevrole="primary")
        p.write_metadata(md)
        p.write_bitmap(b"\x80" + bytes(511))
        p.sync()
    with open_provider(path, writable=False) as p:
        assert p.read_metadata("test") == md
        assert p.read_metadata() == md  # no name to check against
        assert p.read_bitmap(512)[0] == 0x80


# -- opening --------------------------------------------------------------------------------------


def test_open_regular_file(tmp_path):
    path = sparse(tmp_path)
    p = open_provider(path)
    assert (p.mediasize, p.sectorsize, p.is_block, p.writable) == (MEDIASIZE_100M, 512, False, True)
    assert p.fileno() == p.fd >= 0
    p.close()
    assert p.fd == -1
    p.close()  # idempotent


def test_open_missing(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(ProviderError) as exc:
        open_provider(path)
    assert str(exc.value) == f"Unable to open {path}: No such file or directory."


def test_open_directory(tmp_path):
    with pytest.raises(ProviderError) as exc:
        open_provider(str(tmp_path))
    assert str(exc.value) == f"{tmp_path} is neither a block device nor a regular file."
    with pytest.raises(ProviderError, match="neither a block device nor a regular file"):
        open_provider(str(tmp_path), writable=False)


def test_open_character_device():
    with pytest.raises(ProviderError) as exc:
        open_provider("/dev/null")
    assert str(exc.value) == "/dev/null is neither a block device nor a regular file."


def test_open_empty_file(tmp_path):
    path = sparse(tmp_path, size=0)
    with pytest.raises(ProviderError) as exc:
        open_provider(path)
    assert str(exc.value) == f"Provider {path} is empty (0 bytes)."


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_open_permission_denied(tmp_path):
    # tmp_path is root's 0700 directory: as nobody, opening anything under it is EACCES.
    path = sparse(tmp_path)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the message (or its absence) and leave without cleanup
        os.close(read_end)
        try:
            os.setgid(65534)
            os.setuid(65534)
            open_provider(path)
            message = "opened"
        except ProviderError as e:
            message = str(e)
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as r:
        message = r.read().decode()
    os.waitpid(pid, 0)
    assert message == f"Unable to open {path}: Permission denied."


def test_ioctl_failure_is_a_provider_error(tmp_path):
    # What a block device that does not answer BLKGETSIZE64 would give; a file answers ENOTTY.
    path = sparse(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ProviderError) as exc:
            provider_mod._ioctl_number(fd, BLKGETSIZE64, "Q", path, "mediasize")
    finally:
        os.close(fd)
    assert str(exc.value) == f"Unable to obtain provider {path} mediasize: Inappropriate ioctl for device."


# -- locking --------------------------------------------------------------------------------------


def test_lock_conflict_between_two_opens(tmp_path):
    path = sparse(tmp_path)
    with open_provider(path) as first, open_provider(path) as second:
        first.lock()
        first.lock()  # already held: no-op
        with pytest.raises(ProviderError) as exc:
            second.lock()
        assert str(exc.value) == f"Unable to lock {path}: already in use."
        assert first.locked and not second.locked
        first.close()
        second.lock()
        assert second.locked


def test_lock_unsupported_carries_on(tmp_path, monkeypatch, caplog):
    # hastd's rule for file systems without flock (metadata.c): warn and continue.
    def flock(fd, op):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    path = sparse(tmp_path)
    monkeypatch.setattr(fcntl, "flock", flock)
    with open_provider(path) as p:
        p.lock()
        assert p.locked
    assert "operation not supported), but continuing" in caplog.text


def test_lock_other_error(tmp_path, monkeypatch):
    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    path = sparse(tmp_path)
    monkeypatch.setattr(fcntl, "flock", flock)
    with open_provider(path) as p, pytest.raises(ProviderError) as exc:
        p.lock()
    assert str(exc.value) == f"Unable to lock {path}: No locks available."


def test_sync_error():
    # fsync on a pipe is EINVAL: the error path of a provider whose flush fails.
    r, w = os.pipe()
    p = Provider("/pipe", w, 1, 512, False, True)
    try:
        with pytest.raises(ProviderError) as exc:
            p.sync()
        assert str(exc.value) == "Unable to flush /pipe: Invalid argument."
    finally:
        p.close()
        os.close(r)


# -- block devices (loop) -------------------------------------------------------------------------


@pytest.fixture
def loopdev(tmp_path):
    """Attach a sparse file to a loop device; yields (device, sector size) factory results."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    attached = []

    def attach(size=MEDIASIZE_100M, sectorsize=512):
        backing = sparse(tmp_path, size, name=f"loop{len(attached)}.img")
        cmd = ["losetup", "-f", "--show", "--sector-size", str(sectorsize), backing]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"losetup failed: {done.stderr.strip()}")
        attached.append(done.stdout.strip())
        return attached[-1]

    yield attach
    for dev in attached:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.root
def test_loop_device_geometry_and_create(loopdev):
    dev = loopdev()
    with open_provider(dev) as p:
        assert (p.mediasize, p.sectorsize, p.is_block) == (MEDIASIZE_100M, 512, True)
    assert create(dev, "test") == MD_100M
    with open_provider(dev, writable=False) as p:
        assert p.read_metadata("test") == MD_100M


@pytest.mark.root
def test_loop_device_4k_sectors(loopdev):
    dev = loopdev(sectorsize=4096)
    md = create(dev, "test")
    # 50 extents still need 7 bytes, now rounded up to one 4096-byte sector.
    assert (md.offset, md.datasize) == (8192, MEDIASIZE_100M - 8192)
    with open_provider(dev, writable=False) as p:
        assert p.sectorsize == 4096
        assert p.read_metadata("test") == md


@pytest.mark.root
def test_loop_device_in_use_is_refused(loopdev):
    dev = loopdev()
    holder = os.open(dev, os.O_RDWR | os.O_EXCL)  # what a mount or another hastd holds
    try:
        with pytest.raises(ProviderError) as exc:
            create(dev, "test")
        assert "the device is in use" in str(exc.value)
        # Read-only access (hastctl dump) does not need exclusivity.
        with open_provider(dev, writable=False) as p:
            assert p.mediasize == MEDIASIZE_100M
    finally:
        os.close(holder)


def test_dump_of_created_provider(tmp_path):
    from hastpy.metadata import format_dump

    path = sparse(tmp_path)
    create(path, "test")
    with open_provider(path, writable=False) as p:
        assert format_dump(p.read_metadata("test")) == DUMP_100M
    assert Metadata.decode(EXPECTED_HEADER) == MD_100M
