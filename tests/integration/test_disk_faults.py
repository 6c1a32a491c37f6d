"""A worker whose disk refuses a metadata write: the secondary's after the handshake, and the
primary's at its start (the provider's error, path and reason, with exit 66, as when the
provider cannot be opened).

After the handshake the secondary writes metadata twice: it zeroes its bitmap at the first
request of each connection, and clears its inconsistent mark when a sync completes.

- Zeroing the bitmap may fail at no risk to data (the bits left set are merged again at the next
  handshake: a larger resync), so, as hastd, the worker warns and goes on serving.
- A mark that cannot be cleared would refuse failover to an up-to-date copy, so the worker says
  why (log and `hastctl list`, naming the provider) and disconnects; the next connection syncs
  and clears it. Never a traceback.

The failing disk of the first test is real I/O, not a mock: nbdkit's error filter over a file,
exposed by nbdfuse as the secondary's provider, fails every write with EIO while a trigger file
exists. The second needs a write that fails between a sync's last write and its end, which no
timing can place from outside: it runs a Secondary in this process, on socketpairs, over the
provider opened read-only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from harness import MiB, Pair, block_device_unavailable, sha, wait_for
from hastpy import config, control, syncdecide
from hastpy import constants as const
from hastpy.nbd.client import NBDClient
from hastpy.proto import messages as msg
from hastpy.primary import Link, Primary
from hastpy.provider import open_provider
from hastpy.secondary import Secondary
from hastpy.transport import send_frame
from hastpy.worker import Channel

pytestmark = pytest.mark.integration

REQUIRED_TOOLS = ("nbdkit", "nbdfuse", "fusermount3")
UNAVAILABLE = block_device_unavailable(REQUIRED_TOOLS)
UNAVAILABLE_LOOP = block_device_unavailable((*REQUIRED_TOOLS, "losetup"))
# nbdkit and nbdfuse start in well under a second; these only bound a hang.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# The worker's exit, and the primary's next connection attempt after the disk is back.
FAULT_TIMEOUT = 60.0
# A reply the worker owes: a write that hangs instead fails the test after this.
REPLY_TIMEOUT = 20.0


@contextlib.contextmanager
def failing_disk(disk: Path, trigger: Path):
    """Replace the provider file `disk` by the same bytes behind nbdkit's error filter and
    nbdfuse: every write fails with EIO while `trigger` exists. Restores the file on exit."""
    real = disk.with_name(disk.name + ".real")
    sock = disk.with_name("nbdkit.sock")
    mnt = disk.with_name("fuse")
    mnt.mkdir()
    disk.rename(real)
    kit = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "--filter=error", "file", str(real), "error-pwrite=EIO",
                            "error-pwrite-rate=100%", f"error-pwrite-file={trigger}"])  # fmt: skip
    fuse = None
    try:
        wait_for(sock.exists, START_TIMEOUT, what="nbdkit's socket")
        fuse = subprocess.Popen(["nbdfuse", str(mnt / "disk"), "--unix", str(sock)])
        wait_for(lambda: (mnt / "disk").exists(), START_TIMEOUT, what="nbdfuse's file")
        disk.symlink_to(mnt / "disk")
        yield
    finally:
        disk.unlink(missing_ok=True)
        if fuse is not None:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False, timeout=STOP_TIMEOUT)
            fuse.wait(STOP_TIMEOUT)
        kit.terminate()
        kit.wait(STOP_TIMEOUT)
        real.rename(disk)


@contextlib.contextmanager
def page_cached_block_device(disk: Path):
    """Point `disk` (the symlink failing_disk made) at a loop device over its target, without
    direct I/O: writes then land in the block device's page cache, and one the file below
    refuses is lost at write-back and reported by the next sync only, as on a real disk."""
    target = disk.resolve()
    dev = subprocess.run(["losetup", "--find", "--show", str(target)], check=True, capture_output=True, text=True,
                         timeout=START_TIMEOUT).stdout.strip()  # fmt: skip
    disk.unlink()
    disk.symlink_to(dev)
    try:
        yield
    finally:
        disk.unlink(missing_ok=True)
        disk.symlink_to(target)
        subprocess.run(["losetup", "-d", dev], check=False, timeout=STOP_TIMEOUT)


@pytest.mark.skipif(UNAVAILABLE_LOOP is not None, reason=UNAVAILABLE_LOOP or "")
def test_once_a_flush_failed_every_later_flush_fails(make_pair):
    """Linux reports a write the disk lost at write-back to one sync call only: a later sync
    succeeds as if nothing had been lost. So once a flush of the primary's disk failed, every
    later one fails too, and the client keeps hearing that its data is not durable (before:
    the second FLUSH succeeded)."""
    pair: Pair = make_pair(size=16 * MiB)
    a = pair.a
    trigger = a.dir / "disk-fails"
    with failing_disk(a.disk_of(), trigger), page_cached_block_device(a.disk_of()):
        try:
            pair.start()
            c = NBDClient.connect_unix(a.nbd_socket, timeout=REPLY_TIMEOUT)
            c.pwrite(0, os.urandom(64 * 1024))  # its extent's bit goes to disk now
            c.flush()
            trigger.touch()
            c.pwrite(64 * 1024, os.urandom(64 * 1024))  # acknowledged from the page cache
            for _ in range(2):  # the loss, and the flush after the disk is back
                with pytest.raises(OSError) as failed:
                    c.flush()
                assert failed.value.errno == errno.EIO
                trigger.unlink(missing_ok=True)
            c.disconnect()
            assert a.status()["statistics"]["flush_errors"] >= 2
            log = a.log.read_text()
            assert "writes it acknowledged may be lost, and every later flush fails" in log
            assert "Traceback" not in log
        finally:
            pair.stop()  # before the loop device and FUSE mount go: hastd holds the provider open


@pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
def test_a_secondary_whose_disk_refuses_to_zero_its_bitmap_warns_and_keeps_serving(make_pair):
    pair: Pair = make_pair(size=16 * MiB)
    a, b = pair.a, pair.b
    trigger = b.dir / "disk-fails"
    with failing_disk(b.disk_of(), trigger):
        try:
            pair.start()
            # A new connection: its worker has not zeroed its bitmap yet (no request so far).
            b.role("init")
            b.role("secondary")
            pair.wait_complete()
            (worker,) = b.worker_pids()

            trigger.touch()
            c = a.client()
            first, second = os.urandom(MiB), os.urandom(MiB)
            c.pwrite(MiB, first)  # acknowledged: A's disk took it; B's failed and is resynced
            wait_for(lambda: "Local write at offset" in b.log.read_text(), FAULT_TIMEOUT, what="B's failed write")
            trigger.unlink()
            c.pwrite(4 * MiB, second)
            c.disconnect()

            st = pair.wait_complete(FAULT_TIMEOUT)
            assert st["statistics"]["remote_errors"] >= 1
            assert b.worker_pids() == [worker]  # the same connection all along
            assert b.status()["statistics"]["write_errors"] >= 1
            assert b.status()["connect_error"] is None
            log = b.log.read_text()
            assert f"{b.disk_of()}: Unable to write at offset 4096: Input/output error. The bitmap keeps its bits" in log
            assert "Traceback" not in log
            assert sha(a.data()) == sha(b.data())
            assert a.data()[MiB : 2 * MiB] == first and a.data()[4 * MiB : 5 * MiB] == second
        finally:
            pair.stop()  # before the FUSE mount goes: hastd holds the provider open


def test_a_secondary_that_cannot_clear_its_inconsistent_mark_says_why_and_disconnects(make_pair):
    pair: Pair = make_pair(size=16 * MiB)  # not started: its config and B's provider are used here
    res = config.load(str(pair.b.conf), (pair.b.name,)).resource(pair.b.res)
    prov = open_provider(res.local, writable=False)  # every write fails (EBADF)
    md = replace(prov.read_metadata(res.name), inconsistent=True)
    to_secondary, requests = socket.socketpair()
    to_primary, replies = socket.socketpair()
    supervisor, worker = socket.socketpair()
    with prov, to_secondary, requests, to_primary, replies, supervisor, worker:
        sec = Secondary(res, prov, md, requests, replies, msg.PROTO_VERSION, const.MAXPHYS, Channel(worker))
        send_frame(to_secondary, msg.PROTO_VERSION, msg.Request.keepalive(syncdone=True).to_nv())
        assert sec.serve() == os.EX_NOINPUT
        events = control.LineReader(supervisor)
        refused, disconnect = events.read(), events.read()
    assert refused["event"] == "refused" and disconnect == {"event": "disconnect"}
    assert refused["reason"] == f"{res.local}: Unable to write at offset 0: Bad file descriptor."


@pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
def test_a_primary_whose_disk_refuses_its_start_up_metadata_write_goes_back_to_init_and_says_why(make_pair):
    """The primary worker records its role in the metadata before it serves; a disk that refuses
    that write is the provider's error (path and reason, exit 66), not a traceback."""
    pair: Pair = make_pair(size=16 * MiB)
    a = pair.a
    trigger = a.dir / "disk-fails"
    with failing_disk(a.disk_of(), trigger):
        try:
            pair.start(connect=False)
            trigger.touch()
            cp = a.hastctl("role", "primary", a.res, check=False)
            assert cp.returncode == os.EX_NOINPUT, cp
            st = a.status()
            assert (st["role"], st["workerpid"]) == ("init", 0)
            assert st["worker_error"] == f"{a.disk_of()}: Unable to write at offset 0: Input/output error."
            assert "Traceback" not in a.log.read_text()
        finally:
            pair.stop()  # before the FUSE mount goes: hastd holds the provider open


@pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
def test_a_write_that_neither_disk_takes_fails_when_the_primary_cannot_record_it(make_pair):
    """A write the secondary did not take must bump localcnt (durably) before it is answered;
    that bump is made by the thread that receives the secondary's replies. If the primary's disk
    refuses it, the write fails with EIO, said in the log with the path, and the same worker
    goes on serving (before: the reply thread died with a traceback and every later write hung)."""
    pair: Pair = make_pair(size=16 * MiB)
    a, b = pair.a, pair.b
    a_fails, b_fails = a.dir / "disk-fails", b.dir / "disk-fails"
    with failing_disk(a.disk_of(), a_fails), failing_disk(b.disk_of(), b_fails):
        try:
            pair.start()
            (worker,) = a.worker_pids()
            c = NBDClient.connect_unix(a.nbd_socket, timeout=REPLY_TIMEOUT)
            first, second, third = os.urandom(64 * 1024), os.urandom(64 * 1024), os.urandom(64 * 1024)
            # Its extent's bit goes to disk now, so the failing write below needs no bitmap
            # write first (that one would fail it before it went anywhere).
            c.pwrite(0, first)

            a_fails.touch()
            b_fails.touch()
            with pytest.raises(OSError) as failed:
                c.pwrite(0, second)
            assert failed.value.errno == errno.EIO
            a_fails.unlink()
            b_fails.unlink()

            c.pwrite(64 * 1024, third)  # answered: the reply thread is alive
            assert c.pread(64 * 1024, len(third)) == third
            c.disconnect()
            assert a.worker_pids() == [worker]
            assert a.status()["statistics"]["write_errors"] >= 1
            log = a.log.read_text()
            assert f"Unable to record a write the peer lacks, failing it: {a.disk_of()}: Unable to write at offset 0: Input/output error." in log
            assert "Traceback" not in log
        finally:
            pair.stop()  # before the FUSE mounts go: hastd holds the providers open


def test_a_primary_that_cannot_record_a_finished_sync_keeps_its_mark_and_sends_no_syncdone(make_pair, caplog):
    """A sync from the secondary brought this node's data up to date, and the metadata write
    that records it (counters, inconsistent mark dropped) fails: the worker says so and goes on,
    the mark stays (in memory as on disk), and the secondary is not told the sync is done
    (before: an uncaught ProviderError ended the sync thread). In this process, over the
    provider opened read-only, like the secondary's test above."""
    pair: Pair = make_pair(size=16 * MiB)  # not started
    res = config.load(str(pair.a.conf), (pair.a.name,)).resource(pair.a.res)
    prov = open_provider(res.local, writable=False)
    md = replace(prov.read_metadata(res.name), inconsistent=True)
    out, out_peer = socket.socketpair()
    inn, inn_peer = socket.socketpair()
    supervisor, worker = socket.socketpair()
    with prov, out, out_peer, inn, inn_peer, supervisor, worker:
        p = Primary(res, prov, md, Channel(worker))
        p.syncsrc = syncdecide.SYNCSRC_SECONDARY
        link = Link(p, out, inn, msg.PROTO_VERSION, const.MAXPHYS, (res.remote, res.source))
        p._sync_complete(link, MiB, 0.5)  # noqa: SLF001 - the step under test
        assert p.md.inconsistent
        out_peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            out_peer.recv(1)  # no syncdone, nothing at all
        p.pool.shutdown()
    assert f"Unable to record the synchronization: {res.local}: Unable to write at offset 0: Bad file descriptor." in caplog.text
