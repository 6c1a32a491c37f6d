"""Replication end to end: real hastd pairs, NBD clients, providers compared byte for byte."""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from harness import MiB, sha, wait_for
from hastpy import config, metadata
from hastpy import constants as const
from hastpy import primary as primary_mod
from hastpy.proto import messages as msg
from hastpy.provider import open_provider
from hastpy.secondary import Secondary
from hastpy.worker import Channel

pytestmark = pytest.mark.integration


def _random_writes(client, size, count, seed, max_len=256 * 1024):
    rng = random.Random(seed)
    written = []
    for _ in range(count):
        length = rng.randrange(1, max_len // 512 + 1) * 512
        offset = rng.randrange(0, (size - length) // 512 + 1) * 512
        data = rng.randbytes(length)
        client.pwrite(offset, data)
        written.append((offset, data))
    return written


def test_random_writes_land_on_both_disks(make_pair):
    pair = make_pair().start()
    c = pair.a.client()
    _random_writes(c, c.size, 200, seed=1)
    c.flush()
    c.disconnect()
    a, b = pair.a.data(), pair.b.data()
    assert sha(a) == sha(b)
    st = pair.a.status()
    assert st["statistics"]["writes"] == 200
    assert st["statistics"]["flushes"] == 1
    assert st["status"] == "complete"


@pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="nbdcopy (libnbd-bin) not installed")
def test_nbdcopy_round_trip(make_pair, tmp_path):
    pair = make_pair().start()
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(24 * MiB))
    uri = f"nbd+unix:///data?socket={pair.a.nbd_socket}"
    subprocess.run(["nbdcopy", str(src), uri], check=True, timeout=120)
    back = tmp_path / "back.img"
    subprocess.run(["nbdcopy", "--flush", uri, str(back)], check=True, timeout=120)
    assert back.read_bytes()[: 24 * MiB] == src.read_bytes()
    assert pair.b.data()[: 24 * MiB] == src.read_bytes()
    info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, check=True).stdout)
    datasize = json.loads(pair.a.hastctl("dump", "--json").stdout)[0]["datasize"]
    export = info["exports"][0]
    assert export["export-size"] == datasize
    assert export["can_flush"] and export["can_fua"] and export["can_trim"] and export["can_zero"]


def _secondary_worker(pair):
    return wait_for(lambda: pair.b.worker_pids(), what="secondary worker")[0]


@pytest.mark.parametrize("mode,acks_without_secondary", [("fullsync", False), ("memsync", False), ("async", True)])
def test_ack_point_per_mode(make_pair, mode, acks_without_secondary):
    """The secondary's worker is stopped (SIGSTOP): only async may acknowledge a write."""
    pair = make_pair(replication=mode).start()
    c = pair.a.client()
    c.pwrite(0, b"x" * 4096)  # warm up: extent marked, connection busy-path exercised
    pid = _secondary_worker(pair)
    os.kill(pid, signal.SIGSTOP)
    try:
        waiter = _ReplyWaiter(c, c.submit(c_kind_write(), 8192, 4096, b"y" * 4096))
        acked = waiter.within(1.5)
        assert acked == acks_without_secondary
    finally:
        os.kill(pid, signal.SIGCONT)
    assert waiter.within(10)
    c.disconnect()
    assert pair.b.data()[8192:12288] == b"y" * 4096


def c_kind_write():
    from hastpy.nbd.codec import Command

    return Command.WRITE


class _ReplyWaiter:
    """Waits for one reply on its own thread, so a test can ask "acked yet?" more than once."""

    def __init__(self, client, handle):
        self.box = {}
        self.thread = threading.Thread(target=lambda: self.box.update(reply=client.reply(handle)), daemon=True)
        self.thread.start()

    def within(self, seconds: float) -> bool:
        self.thread.join(seconds)
        if self.thread.is_alive():
            return False
        self.box["reply"].check()
        return True


def test_memsync_acks_after_receipt_before_disk_write(make_pair):
    """With the secondary's disk writes held (test hook), memsync acks and fullsync does not."""
    for mode, expect in (("memsync", True), ("fullsync", False)):
        pair = make_pair(replication=mode)
        gate = pair.b.dir / "hold-disk"
        pair.b.params["env"] = {"HASTPY_TEST_HOLD_DISK": str(gate)}
        pair.start()
        c = pair.a.client()
        gate.touch()
        try:
            waiter = _ReplyWaiter(c, c.submit(c_kind_write(), 0, 4096, b"m" * 4096))
            assert waiter.within(1.5) == expect, mode
        finally:
            gate.unlink()
        assert waiter.within(10)
        c.disconnect()
        pair.stop()


@pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="nbdinfo (libnbd-bin) not installed")
def test_multi_conn_flush_covers_writes_of_other_connections(make_pair):
    """The export advertises CAN_MULTI_CONN, so a client may spread its writes over several
    connections and flush on any one of them: that FLUSH must cover writes acknowledged on the
    others. async acknowledges before the secondary's disk write (held here by the test hook), so
    a FLUSH on a second connection must wait for it and return only once the secondary has it."""
    from hastpy.nbd.codec import Command

    pair = make_pair(replication="async")
    gate = pair.b.dir / "hold-disk"
    pair.b.params["env"] = {"HASTPY_TEST_HOLD_DISK": str(gate)}
    pair.start()
    uri = f"nbd+unix:///data?socket={pair.a.nbd_socket}"
    info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, check=True).stdout)
    assert info["exports"][0]["can_multi_conn"] is True
    writer, flusher = pair.a.client(), pair.a.client()
    gate.touch()
    try:
        writer.pwrite(1 * MiB, b"k" * 65536)  # async: acknowledged with the secondary's disk held
        waiter = _ReplyWaiter(flusher, flusher.submit(Command.FLUSH))
        assert not waiter.within(1.5), "FLUSH on another connection returned before the secondary wrote"
    finally:
        gate.unlink()
    assert waiter.within(10)
    assert pair.b.data()[1 * MiB : 1 * MiB + 65536] == b"k" * 65536
    writer.disconnect()
    flusher.disconnect()


def test_a_client_that_stops_reading_does_not_stall_the_others(make_pair):
    """The primary's pipeline threads send every connection's replies: a client that sends
    requests and never reads the replies (a wedged VM, a stopped process) must hold up only
    itself, not the filesystem on /dev/hast/<name> next to it. Its replies wait for its
    connection's own sender thread."""
    from hastpy.nbd.codec import Command

    pair = make_pair().start()
    stuck, other = pair.a.client(), pair.a.client()
    for _ in range(64):
        stuck.submit(Command.READ, 0, MiB)  # 64 MiB of replies, never read
        stuck.submit(Command.WRITE, 2 * MiB, 4096, b"s" * 4096)
    writes = [_ReplyWaiter(other, other.submit(Command.WRITE, 4 * MiB, 4096, b"o" * 4096))]
    assert writes[0].within(10), "a write on another connection waited for the client that does not read"
    assert other.pread(4 * MiB, 4096) == b"o" * 4096
    other.flush()
    assert pair.a.status()["status"] == "complete"
    other.disconnect()
    stuck.close()
    after = pair.a.client()
    wait_for(lambda: after.pread(2 * MiB, 4096) == b"s" * 4096, what="the stuck client's writes")
    after.disconnect()
    pair.wait_complete()
    assert sha(pair.a.data()) == sha(pair.b.data())


def test_small_writes_on_several_connections_land_on_both_disks(make_pair):
    """Small writes arriving on several connections at once are started together by one
    receive thread (primary.COMBINE_MAX_LENGTH): every one of them is acknowledged, and both
    disks end with the same, expected bytes."""
    from hastpy.nbd.codec import Command

    pair = make_pair(size=64 * MiB).start()
    clients = [pair.a.client() for _ in range(4)]
    size = clients[0].size
    expected = bytearray(size)
    errors = []

    def writer(i, c):
        rng = random.Random(i)
        quarter = size // 4 // 4096
        try:
            for _ in range(20):
                batch = []
                for _ in range(16):  # 16 in flight: the threads' requests meet in the primary
                    blocks = rng.randrange(1, 17)
                    off = (i * quarter + rng.randrange(0, quarter - blocks)) * 4096
                    data = rng.randbytes(blocks * 4096)
                    batch.append((off, data, c.submit(Command.WRITE, off, len(data), data)))
                for _, _, handle in batch:
                    c.reply(handle).check()
                # Overlapping writes in flight together may land in either order (NBD orders
                # nothing in flight): one at a time again, so that the last one is the content.
                for off, data, _ in batch:
                    c.pwrite(off, data)
                    expected[off : off + len(data)] = data
        except Exception as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "writes left unacknowledged"
    assert not errors
    clients[0].flush()
    for c in clients:
        c.disconnect()
    a, b = pair.a.data(), pair.b.data()
    assert a[:size] == bytes(expected)
    assert sha(a) == sha(b)
    st = pair.a.status()
    assert st["statistics"]["writes"] == 4 * 20 * 16 * 2
    assert st["status"] == "complete" and st["statistics"]["remote_errors"] == 0


def test_resync_moves_only_dirty_extents(make_pair):
    pair = make_pair(size=256 * MiB).start()
    pair.b.role("init")  # the secondary goes away
    wait_for(lambda: pair.a.status()["status"] == "degraded", what="degraded")
    c = pair.a.client()
    extent = pair.a.status()["extentsize"]
    # Three extents' worth of writes in three distinct extents far apart.
    for i, ext in enumerate((3, 40, 99)):
        c.pwrite(ext * extent + 4096, os.urandom(64 * 1024))
    c.flush()
    st = pair.a.status()
    assert st["sync"]["pending"] == 3 * extent
    pair.b.role("secondary")
    st = pair.wait_synced()
    assert st["sync"]["synced"] == 3 * extent
    c.disconnect()
    assert sha(pair.a.data()) == sha(pair.b.data())


def test_writes_a_lost_secondary_may_not_have_flushed_are_resynced(make_pair):
    """The secondary answers a write once its page cache has it, so a secondary that crashes
    loses what it had not flushed. When the link drops, the primary marks for resync every
    extent whose bit is still on its disk (the keepdirty set, and bits not cleared yet, which
    it clears only after a flush on both nodes), not only the writes made while the peer is
    away. The loss is played by zeroing the written ranges on the secondary's disk."""
    pair = make_pair(size=256 * MiB).start()
    c = pair.a.client()
    extent = pair.a.status()["extentsize"]
    exts = (3, 40, 99)
    for ext in exts:
        c.pwrite(ext * extent + 4096, os.urandom(64 * 1024))
    assert pair.a.status()["sync"]["pending"] == 0
    pair.b.role("init")  # the secondary goes away
    wait_for(lambda: pair.a.status()["status"] == "degraded", what="degraded")
    localoff = json.loads(pair.b.hastctl("dump", "--json", "data").stdout)[0]["localoff"]
    with open(pair.b.disk_of(), "r+b") as f:
        for ext in exts:
            os.pwrite(f.fileno(), bytes(64 * 1024), localoff + ext * extent + 4096)
    assert pair.a.status()["sync"]["pending"] >= len(exts) * extent
    pair.b.role("secondary")
    st = pair.wait_synced()
    assert st["sync"]["synced"] >= len(exts) * extent
    c.disconnect()
    assert sha(pair.a.data()) == sha(pair.b.data())


@contextlib.contextmanager
def in_process_pair(pair):
    """pair's primary and secondary in this process, linked by socketpairs (not started as
    hastd): for a test that shortens a constant or reaches into the primary. Yields
    (primary, secondary)."""
    ra, rb = (config.load(str(n.conf), (n.name,)).resource(n.res) for n in (pair.a, pair.b))
    pa, pb = open_provider(ra.local), open_provider(rb.local)
    out, out_peer = socket.socketpair()
    inn, inn_peer = socket.socketpair()
    chans = [socket.socketpair() for _ in range(2)]
    sec = Secondary(rb, pb, pb.read_metadata(rb.name), out_peer, inn_peer, msg.PROTO_VERSION, const.MAXPHYS,
                    Channel(chans[0][1]))  # fmt: skip
    threading.Thread(target=sec.serve, daemon=True).start()
    p = primary_mod.Primary(ra, pa, pa.read_metadata(ra.name), Channel(chans[1][1]))
    p.link = primary_mod.Link(p, out, inn, msg.PROTO_VERSION, const.MAXPHYS, (ra.remote, ra.source))
    p.link.start()
    threading.Thread(target=p.clear_loop, daemon=True).start()
    try:
        yield p, sec
    finally:
        p._stop.set()  # noqa: SLF001 - the loop's own stop
        p.link.close("test over")
        for s in (out, out_peer, inn, inn_peer, *(x for c in chans for x in c)):
            s.close()
        p.pool.shutdown()
        pa.close()
        pb.close()


def _submit_and_wait(p, kind: str, offset: int, length: int, data=None) -> tuple[int, bytes | None]:
    answers = []
    p.submit(kind, offset, length, data, False, lambda err, out: answers.append((err, out)))
    return wait_for(lambda: answers and answers[0], what=f"{kind} answered")


def test_without_a_flush_for_a_while_the_primary_flushes_both_disks_before_clearing(make_pair, monkeypatch):
    """Bits are cleared after a flush of both nodes: a client's FLUSH, or, when none comes for
    FORCED_CLEAR_AFTER, one of the primary's own. In this process to shorten that wait:
    keepdirty 1, three extents written, no FLUSH."""
    monkeypatch.setattr(primary_mod, "FORCED_CLEAR_AFTER", 1.0)
    pair = make_pair(size=16 * MiB, create_args=["-k", "1"])  # not started: its configs and disks
    with in_process_pair(pair) as (p, sec):
        extent = p.md.extentsize
        for ext in (0, 2, 4):
            assert _submit_and_wait(p, "write", ext * extent, 4096, os.urandom(4096))[0] == 0

        def on_disk():
            image = metadata.read_bitmap(p.fd, p.am.mapsize)
            return {ext for ext in range(len(image) * 8) if image[ext >> 3] >> (ext & 7) & 1}

        assert on_disk() == {0, 2, 4}  # two evicted, kept until a flush of both nodes
        assert sec.stats["flushes"] == 0
        wait_for(lambda: on_disk() == {4}, timeout=10, what="the primary's own flush, then the clear")
        assert sec.stats["flushes"] == 1


def test_a_failed_local_read_of_an_extent_marked_for_resync_is_not_served_from_the_secondary(make_pair):
    """A local read that fails is retried on the secondary, except where the extent is marked
    for resync: the secondary's copy there may lack acknowledged writes, and the read fails
    instead. The primary's reads fail here because its descriptor is made write-only."""
    pair = make_pair(size=16 * MiB)
    with in_process_pair(pair) as (p, _sec):
        extent = p.md.extentsize
        data = os.urandom(4096)
        for ext in (0, 2):
            assert _submit_and_wait(p, "write", ext * extent, 4096, data)[0] == 0
        with p._am_lock:  # noqa: SLF001 - as a write whose remote half failed
            p.am.need_sync(0, 4096)
        readable, p.fd = p.fd, os.open(pair.a.disk_of(), os.O_WRONLY)
        try:
            assert _submit_and_wait(p, "read", 0, 4096)[0] == errno.EBADF  # the local error
            assert _submit_and_wait(p, "read", 2 * extent, 4096) == (0, data)
        finally:
            os.close(p.fd)
            p.fd = readable


def test_primary_kill9_mid_write_then_resync(make_pair):
    pair = make_pair(size=128 * MiB).start()
    stop = threading.Event()

    def writer():
        try:
            c = pair.a.client()
            rng = random.Random(7)
            while not stop.is_set():
                off = rng.randrange(0, 128 * MiB // 4096 - 64) * 4096
                c.pwrite(off, rng.randbytes(64 * 1024))
        except Exception:  # noqa: BLE001 - the server is killed under us
            pass

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(1.5)
    for pid in pair.a.worker_pids():
        os.kill(pid, signal.SIGKILL)  # the primary worker dies mid-write
    stop.set()
    t.join(5)
    # The supervisor restarts the worker; it resyncs what its on-disk activemap marked.
    wait_for(lambda: pair.a.status().get("workerpid"), what="primary restarted")
    pair.wait_synced()
    assert sha(pair.a.data()) == sha(pair.b.data())


def test_split_brain_detected_and_refused(make_pair, tmp_path):
    log = tmp_path / "hooks.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho \"$(hostname) $*\" >> {log}\n")
    hook.chmod(0o755)
    pair = make_pair(exec=str(hook)).start()
    c = pair.a.client()
    c.pwrite(0, b"1" * 4096)
    c.disconnect()
    # Apart: both become primary and both write.
    pair.b.role("init")
    wait_for(lambda: pair.a.status()["status"] == "degraded", what="degraded")
    pair.b.hastctl("role", "primary", "data")
    wait_for(lambda: pair.b.status().get("workerpid"), what="b primary")
    for node, byte in ((pair.a, b"A"), (pair.b, b"B")):
        cl = node.client()
        cl.pwrite(8192, byte * 4096)
        cl.flush()
        cl.disconnect()
    a_before, b_before = pair.a.data(), pair.b.data()
    pair.b.role("secondary")  # reconnect: the counters show both wrote alone
    wait_for(lambda: log.exists() and log.read_text().count("split-brain data") >= 2, what="split-brain hooks on both")
    assert pair.a.status()["status"] == "degraded"
    # Both nodes' hastctl say why they are apart.
    assert pair.a.status()["connect_error"].startswith("Split-brain")
    assert pair.b.status()["connect_error"].startswith("Split-brain")
    time.sleep(1)
    assert pair.a.data() == a_before and pair.b.data() == b_before


def test_a_primary_whose_peer_answers_nothing_serves_without_waiting_out_the_handshake_bound(make_pair):
    """After a failover the old primary is often down or cut off: its host answers no SYN. The
    new primary's first connection attempt gives up on the TCP connect after its own short
    bound instead of holding service for the whole first-handshake bound.

    The silent host: a listener on B's address whose accept queue is full (backlog 0, one
    connection queued, never accepted), so that Linux drops every further SYN."""
    pair = make_pair()
    a = pair.a
    silent = socket.socket()
    queued = socket.socket()
    with silent, queued:
        silent.bind((pair.ip_b, 8457))
        silent.listen(0)
        queued.connect((pair.ip_b, 8457))
        a.start()
        a.role("primary")  # returns once the worker serves
        st = a.status()
    assert st["status"] == "degraded" and st["serving"]
    # From the worker's start to its giving up, in hastd's own log: the connect's bound (and the
    # worker's start-up), well below the handshake's.
    started = _log_time(a.log, f"Worker started (pid={st['workerpid']}, primary)")
    gave_up = _log_time(a.log, f"Unable to connect to {pair.ip_b}: timed out")
    assert _log_time(a.log, "starting degraded") >= gave_up
    assert gave_up - started < primary_mod.FIRST_CONNECT_TIMEOUT, gave_up - started


def _log_time(log, text: str) -> float:
    """When hastd logged the first line containing text (seconds since the epoch)."""
    line = next(line for line in log.read_text().splitlines() if text in line)
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
