"""The primary worker: serve the resource over NBD, write every change to both nodes, resync.

Threads and where requests go (hastd's primary.c pipeline, with a pool where it had one thread):
- NBD receive (hastpy.nbd.server, one per client connection): decoded requests -> `submit`;
  a write takes its range lock and, if the activemap says so, writes the bitmap *before* the data;
- local pool (LOCAL_THREADS): pread/pwrite/discard/fdatasync on the provider -> `_local_done`;
- `Link.send` thread: remote requests -> the *out* connection (keepalive when idle);
- `Link.recv` thread: replies from the *in* connection -> `_remote_done` by seq;
- whichever thread completes a request's last part acks it to NBD and releases activemap and range;
- `sync` thread: copies dirty extents chunk by chunk, range-locked against user writes;
- `guard` thread: connects and reconnects to the secondary.

Safety rules (DESIGN.md §2.5): an extent's bit is on disk before any data write to it; it stays
dirty until both nodes confirmed the write; a write whose remote half did not positively succeed is
marked for resync; overlapping user writes never run at once (so both replicas apply them in the
same order); FLUSH and FUA mean durable on every connected node before the reply.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from hastpy import constants as const
from hastpy import localio, metadata, syncdecide
from hastpy.activemap import ActiveMap, ClearSnapshot
from hastpy.combiner import Combiner
from hastpy.config import Resource
from hastpy.errors import HastError, ProtocolError, ProviderError
from hastpy.nbd import codec as nbdcodec
from hastpy.nbd import server as nbdserver
from hastpy.proto import messages as msg
from hastpy.proto import pipeline
from hastpy.provider import open_provider
from hastpy.rangelock import LockKind, RangeLocks
from hastpy.transport import FrameStream, connect, recv_one, send_buffers, send_frame, set_timeout
from hastpy.worker import Channel, drop_privileges, fail_stop, run_or_exit, set_io_flusher

log = logging.getLogger("hastd")

LOCAL_THREADS = 8  # concurrent local disk I/Os; hastd has one (queue depth 1)
RECONNECT_INTERVAL = 1.0  # seconds between connect attempts while degraded (hastd: 10 s guard)
WAIT_RETRY = 1.0  # hastd: a peer that answers "wait" (still primary) is retried every 1 s
REFUSED_RETRY = 10.0  # hastd's guard interval: how often a peer that refused the pair (split-brain, mismatch) is retried
FIRST_CONNECT_TIMEOUT = 3.0  # bound on the first connect so a dead peer does not delay service
# Within it, the bound on the TCP connect alone. A live peer accepts or resets a connection at
# once; a host that is down or cut off answers nothing (or EHOSTUNREACH once ARP gives up, after
# about 3 s), and a promotion after a failover would wait for it before serving. 1.5 s still
# covers one lost SYN, which Linux sends again after 1 s.
FIRST_TCP_CONNECT_TIMEOUT = 1.5
SEND_QUEUE_MAX = 1024  # remote requests waiting for the send thread; bounds memory
KEEPALIVES_PER_TIMEOUT = 3  # with v3 peers: a lost keepalive or two does not end the link
NBD_MAX_BLOCK = 32 * 1024 * 1024  # largest NBD request accepted; split into maxio on the wire
# How long the bitmap writes that only clear bits wait to be coalesced (hastd writes one at
# every finished write). A bit left set meanwhile costs at most a resync of its extent after a
# crash (activemap.write_complete: not urgent).
CLEAR_FLUSH_DELAY = 0.05
# A bit is cleared only after a flush of both nodes made its extent's finished writes durable
# (clear_loop). Clients flush on their own (a filesystem at every journal commit, ext4 every
# 5 s), and a clear rides the next one; without one for this long, the clear loop flushes both
# disks itself. Linux writes dirty pages back after 30 s (dirty_expire_centisecs), so by then
# that flush costs little, where one per second cost a third of seqwrite's throughput. The
# price: a crash resyncs the extents written in up to this long without a flush.
FORCED_CLEAR_AFTER = 30.0
# How often a thread waiting for the secondary's answer checks whether the worker is stopping.
STOP_POLL = 1.0
# Writes of at most this many bytes, arriving on several NBD connections at once (multi-conn:
# nbdfuse spreads the kernel's requests over 4), are started together by whichever receive thread
# is already starting writes: one bitmap write and one send to the secondary for all of them.
# Their cost is per request (system calls, wake-ups); larger writes are worth their own thread
# (their copies overlap on several cores). The same bound as the NBD server's read-ahead: the
# writes it takes in runs are the ones worth combining.
COMBINE_MAX_LENGTH = nbdserver.READ_AHEAD_MAX_PAYLOAD
# Groups a receive thread starts for others before it hands the rest to the pool and goes back to
# its own connection: under steady load from the others it would otherwise never return.
COMBINE_MAX_ROUNDS = 4

SPLIT_BRAIN_ERRMSG = syncdecide.SPLIT_BRAIN_ERRMSG


def keepalive_interval(version: int, timeout: int) -> float:
    """Seconds of silence before a keepalive. hastd: 10 s, and its secondary gives up after 20 s.
    A v3 (hastpy) secondary gives up after `timeout`, so a dead link is noticed in `timeout`
    rather than 20 s: keepalives then go out three times per timeout."""
    if version >= msg.PROTO_VERSION_MAXIO:
        return min(const.KEEPALIVE_INTERVAL, timeout / KEEPALIVES_PER_TIMEOUT)
    return const.KEEPALIVE_INTERVAL


class RemoteError(Exception):
    """The peer refused the handshake or answered one we cannot use: carries the reason."""


class Link:
    """One connected pair of sockets to the secondary, and its send and receive threads.

    `pending` maps seq -> callback(error, received, data); it is guarded by `_lock`, as is
    `closed`. After `close()` every pending and every later request fails with ENOTCONN, exactly
    once, so each write's remote half is resolved and marked for resync if it did not succeed.
    """

    def __init__(self, primary: Primary, out: socket.socket, inn: socket.socket, version: int, maxio: int,
                 peer: tuple[str, str | None]):  # fmt: skip
        self.p = primary
        self.peer = peer  # (remote, source) it was connected with: a reload may change res's
        self.out = out
        self.inn = inn
        self.version = version
        self.maxio = maxio
        self._lock = threading.Lock()
        self.pending: dict[int, object] = {}
        self.closed = False
        # Requests for the send thread. Unbounded so that no thread ever blocks putting into it
        # (the receive thread queues FUA flushes: blocking it could deadlock the link); what is
        # in flight is bounded upstream, by the NBD window and the one-chunk-at-a-time sync.
        self.sendq: queue.SimpleQueue = queue.SimpleQueue()
        self._send_lock = threading.Lock()  # guards `out`: whole frames, never interleaved
        self._seq = itertools.count(2)  # seq 1 is hastd's sync seq; ours are unique
        self.last_send = time.monotonic()
        self.keepalive = keepalive_interval(version, primary.res.timeout)

    def set_timeout(self, timeout: int) -> None:
        set_timeout(self.out, timeout)
        set_timeout(self.inn, timeout)
        self.keepalive = keepalive_interval(self.version, timeout)

    def start(self) -> None:
        threading.Thread(target=fail_stop(self._send_loop), name="remote-send", daemon=True).start()
        threading.Thread(target=fail_stop(self._recv_loop), name="remote-recv", daemon=True).start()

    def submit(self, cmd: int, offset: int, length: int, data, memsync: bool, callback, inline: bool = False) -> None:
        """Send a request; callback(error_errno, received, data) runs on reply or failure.

        inline: send it from this thread (the NBD receive thread does, for user writes: one
        thread hand-off less per request) instead of queueing it for the send thread. Only a
        thread that nothing on the reply path waits for may do that: never the receive thread.
        A failed inline send closes the link, which fails every pending request, this one too.
        """
        if inline:
            self.submit_many([(cmd, offset, length, data, memsync, callback)])
            return
        seq = next(self._seq)
        with self._lock:
            closed = self.closed
            if not closed:
                self.pending[seq] = callback
        if closed:  # outside the lock: the callback may reply to the client
            callback(errno.ENOTCONN, False, None)
            return
        self.sendq.put((msg.Request(cmd=cmd, seq=seq, offset=offset, length=length, memsync=memsync), data))

    def submit_many(self, requests: list[tuple]) -> None:
        """submit(..., inline=True) for each (cmd, offset, length, data, memsync, callback), all
        the frames sent with one call."""
        frames = []
        with self._lock:
            closed = self.closed
            for cmd, offset, length, data, memsync, callback in [] if closed else requests:
                seq = next(self._seq)
                self.pending[seq] = callback
                frames.append((msg.Request(cmd=cmd, seq=seq, offset=offset, length=length, memsync=memsync), data))
        if closed:  # outside the lock: the callbacks may reply to the client
            for *_, callback in requests:
                callback(errno.ENOTCONN, False, None)
            return
        try:
            self._send(*frames)
        except (OSError, ProtocolError) as exc:
            self.close(f"send failed: {exc}")

    def _send(self, *frames: tuple[msg.Request, object]) -> None:
        """Send frames, each (request, payload), in one call."""
        res = self.p.res
        bufs = []
        for req, data in frames:
            bufs += pipeline.encode_io_frame(self.version, req, msg.encode_request_nv, data, res.compression, res.checksum)
        with self._send_lock:
            send_buffers(self.out, bufs)
            self.last_send = time.monotonic()

    def send_syncdone(self) -> None:
        """Tell a v4 secondary that the synchronization completed (it clears its inconsistent
        mark). Only after every sync write was answered; a failure closes the link."""
        if self.version < msg.PROTO_VERSION_SYNCDONE:
            return
        try:
            with self._send_lock:
                send_frame(self.out, self.version, msg.Request.keepalive(syncdone=True).to_nv())
                self.last_send = time.monotonic()
        except (OSError, ProtocolError) as exc:
            self.close(f"send failed: {exc}")

    def close(self, why: str) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            pending, self.pending = self.pending, {}
        for s in (self.out, self.inn):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.sendq.put(None)
        log.warning("Disconnected from %s: %s.", self.peer[0], why)
        for cb in pending.values():
            cb(errno.ENOTCONN, False, None)
        self.p.on_disconnect(self)

    def _send_loop(self) -> None:
        try:
            while not self.closed:
                try:
                    item = self.sendq.get(timeout=self.keepalive)
                except queue.Empty:
                    # Keepalive only if nothing at all went out (inline sends count) for that long.
                    if time.monotonic() - self.last_send >= self.keepalive:
                        with self._send_lock:
                            send_frame(self.out, self.version, msg.Request.keepalive().to_nv())
                            self.last_send = time.monotonic()
                    continue
                if item is None:
                    return
                self._send(item)
        except (OSError, ProtocolError) as exc:
            self.close(f"send failed: {exc}")

    def _recv_loop(self) -> None:
        # NBD replies completed here are held and sent together before this thread next waits
        # (the secondary's replies come several per receive when writes come in runs).
        nbdserver.hold_replies()
        try:
            self._receive_replies()
        finally:
            nbdserver.send_held_replies()

    def _receive_replies(self) -> None:
        stream = FrameStream(self.inn, self.version, self.maxio, msg.REPLY_LAYOUTS, on_wait=nbdserver.send_held_replies)
        try:
            while not self.closed:
                try:
                    frame = stream.recv()
                except TimeoutError:
                    with self._lock:
                        idle = not self.pending
                    if idle:
                        continue  # nothing outstanding: silence is fine
                    raise
                rep = msg.Reply.from_nv(frame.nv)
                with self._lock:
                    cb = self.pending.get(rep.seq) if rep.received else self.pending.pop(rep.seq, None)
                if cb is None:
                    raise ProtocolError(f"reply for unknown seq {rep.seq}")
                data = None
                if len(frame.payload) and not rep.error:
                    data = pipeline.decode_payload(frame.payload, frame.nv)
                cb(rep.error, rep.received, data)
        except TimeoutError:
            self.close(f"no reply within {self.p.res.timeout} s")
        except (OSError, ConnectionError, ProtocolError) as exc:
            self.close(f"receive failed: {exc}")


class Hio:
    """One user request in flight. Fields are written by the thread completing each part and
    read by whichever completes last, all under `lock`."""

    __slots__ = ("kind", "offset", "length", "data", "fua", "done", "lock", "parts", "local_err",
                 "remote_err", "remote_ok", "acked", "range_token", "settled", "remote_total")  # fmt: skip

    def __init__(self, kind, offset, length, data, fua, done):
        self.kind = kind
        self.offset = offset
        self.length = length
        self.data = data
        self.fua = fua
        self.done = done  # NBD reply callback: done(error_errno, data)
        self.lock = threading.Lock()
        self.parts = 0  # outstanding parts: 1 local + n remote chunks
        self.local_err = None  # None = not finished, 0 = ok, else errno
        self.remote_err = 0  # first remote error seen
        self.remote_ok = True  # every remote chunk positively succeeded
        self.acked = False
        self.range_token = None
        self.remote_total = 0  # remote chunks sent
        self.settled = 0  # remote chunks received (memsync early ack) or finished, once each


class Primary:
    def __init__(self, res: Resource, prov, md: metadata.Metadata, channel: Channel):
        self.res = res
        self.prov = prov
        self.fd = prov.fd
        self.channel = channel
        self.localoff = md.offset
        self.datasize = md.datasize
        self.mode = res.replication
        self._md_lock = threading.Lock()  # guards self.md and metadata writes
        self.md = md
        # Learned at each handshake; until the first one assume the peer was in step, so the first
        # write of an outage bumps localcnt once (hastd starts from 0 and never bumps then).
        self.peer = syncdecide.Counters(md.resuid, md.remotecnt, md.localcnt)
        self.syncsrc = syncdecide.SYNCSRC_UNDEF
        self.am = ActiveMap(md.datasize, md.extentsize, md.keepdirty, prov.sectorsize, const.MAXPHYS)
        self._am_lock = threading.Lock()  # guards self.am (in-memory state only, never held over I/O)
        self._flush_lock = threading.Lock()  # serializes bitmap writes: bitmap() .. write .. flushed()
        self._dsync_writes = hasattr(os, "RWF_DSYNC")  # per-write O_DSYNC for the bitmap (Linux 4.7+)
        self._data_sync = localio.StickyFlush(self.fd)  # every fdatasync of the provider
        self._ranges = RangeLocks()
        # _ranges_lock guards _ranges and _range_waiters. _ranges_cv, on the same lock, is waited
        # on and notified only when a range is contended: an uncontended user write takes the
        # plain lock and calls no Condition method (each of those is Python code).
        self._ranges_lock = threading.Lock()
        self._ranges_cv = threading.Condition(self._ranges_lock)
        self._range_waiters = 0
        self.pool = ThreadPoolExecutor(LOCAL_THREADS, thread_name_prefix="local")
        # Small writes from several connections' receive threads: one of them starts them all.
        self._combiner: Combiner[tuple] = Combiner(self._write_group, self._fail_writes, self._in_pool, COMBINE_MAX_ROUNDS)
        self._link_lock = threading.Lock()  # guards self.link and self.connected_since
        self.link: Link | None = None
        self._sync_wanted = threading.Event()
        self._clear_wanted = threading.Event()  # finished writes left bits to clear on disk
        # The latest clear snapshot of a FLUSH that succeeded on both nodes, for clear_loop (it
        # lets go of everything an earlier one would); under _am_lock.
        self._durable_clear: ClearSnapshot | None = None
        self._stop = threading.Event()
        self._guard_wake = threading.Event()  # a reload changed the peer: guard() acts now
        self._stats_lock = threading.Lock()
        self.stats = dict.fromkeys(("reads", "writes", "deletes", "flushes", "activemap_updates", "read_errors",
                                    "write_errors", "delete_errors", "flush_errors", "remote_errors",
                                    "synced_bytes"), 0)  # fmt: skip
        self.inflight = 0
        self.sync_state = "idle"
        self._connect_error = ""  # the last failed connection's reason, logged once per change
        self.nbd_clients = 0  # NBD connections being served; guarded by _stats_lock
        # Single-threaded here: no lock needed yet. Everything marked on disk gets resynced.
        self.am.copyin(metadata.read_bitmap(self.fd, self.am.mapsize))
        if self.am.sync_pending_extents:
            log.info("%d extents marked dirty on disk: they will be synchronized.", self.am.sync_pending_extents)

    def reconfigure(self, res: Resource) -> None:
        """A reload's new settings (supervisor.LIVE_FIELDS), taken while serving, as hastd's
        primary does. Safe at any moment: a write in flight is acknowledged by the mode in force
        when its next part completes (every mode still marks what the secondary did not confirm
        for resync), a frame is encoded with the checksum and compression of its send (the peer
        decodes each by its own header), and the link's sockets get the new timeout."""
        if res.metaflush and not self.res.metaflush:
            # Bits written with metaflush off may still be only in the page cache: durable
            # before the new promise holds (a write to an extent already marked adds no bitmap
            # write that would flush them).
            self._data_sync()
        old = self.res
        reconnect = (res.remote, res.source) != (old.remote, old.source)
        self.res = res
        self.mode = res.replication
        link = self.link
        if link is not None:
            link.set_timeout(res.timeout)
        if reconnect:
            # hastd's primary reconnects; here the guard thread does, as the only one that
            # makes links. Writes the old peer did not confirm are marked for resync as on any
            # disconnection, and the new peer gets them (or all, if it is new) by the sync.
            self._connect_error = ""  # a reason about the old address says nothing of the new
            change = _peer_change(res, (old.remote, old.source))
            log.info("%s%s: %s.", change[:1].upper(), change[1:], "disconnecting" if res.remote == const.REMOTE_NONE else "reconnecting")
            self._guard_wake.set()
        log.info("Configuration reloaded: replication %s, checksum %s, compression %s, timeout %d s, metaflush %s.",
                 res.replication, res.checksum, res.compression, res.timeout, "on" if res.metaflush else "off")  # fmt: skip

    def serve_client(self, conn: socket.socket, frontend: NbdFrontend, export: nbdserver.ExportConfig) -> None:
        """Serve one NBD connection to its end, counted in `nbd_clients` (leaving primary with
        `attach none` is refused while there are any)."""
        with self._stats_lock:
            self.nbd_clients += 1
        try:
            nbdserver.serve_connection(conn, frontend, export)
        finally:
            with self._stats_lock:
                self.nbd_clients -= 1

    # -- statistics -----------------------------------------------------------------------------

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def status(self) -> dict:
        with self._am_lock:
            dirty = self.am.dirty_bytes
            tosync = self.am.sync_pending_bytes
        link = self.link
        with self._stats_lock:
            stats = dict(self.stats)
        return {
            "role": "primary",
            "status": "complete" if link is not None and not link.closed else "degraded",
            "replication": self.mode,
            "extentsize": self.md.extentsize,
            "keepdirty": self.md.keepdirty,
            "dirty": dirty,
            "nbd_clients": self.nbd_clients,
            # "done" is the last pass's outcome; what was written alone since then is "needed".
            "sync": {"state": "needed" if self.sync_state == "done" and tosync else self.sync_state,
                     "pending": tosync, "synced": stats["synced_bytes"]},
            "statistics": stats,
            "queues": {
                "local": self.pool._work_queue.qsize(),
                "send": link.sendq.qsize() if link else 0,
                "recv": len(link.pending) if link else 0,
                "inflight": self.inflight,
            },
            "counters": {"resuid": self.md.resuid, "localcnt": self.md.localcnt, "remotecnt": self.md.remotecnt},
            "inconsistent": self.md.inconsistent,
            # Why the last attempt to reach the peer failed, while degraded (a refusal such as a
            # replica mismatch stays until an operator acts): None when connected or unknown.
            "connect_error": (self._connect_error or None) if link is None else None,
        }

    # -- metadata and bitmap --------------------------------------------------------------------

    def write_md(self, **changes) -> None:
        """Write the metadata with `changes`, durably; `self.md` takes them only once they are on
        disk. ProviderError (the path and the reason) if the disk refuses."""
        with self._md_lock:
            self._store_md(replace(self.md, **changes))

    def _store_md(self, md: metadata.Metadata) -> None:
        # Under _md_lock.
        self.prov.write_metadata(md)
        try:
            self.prov.sync()
        except ProviderError as exc:
            self._data_sync.lost(str(exc))
            raise
        self.md = md

    def flush_bitmap(self, ranges: Sequence[tuple[int, int]] | None = None, user: bool = False,
                     clears: Sequence[ClearSnapshot] = ()) -> None:  # fmt: skip
        """Write the activemap image. With ranges (offset, length): only if some of their
        extents are not on disk yet (another writer's flush may have carried them).

        Hazard: a write's data must not reach the disk before its extent's bit does, or a crash
        leaves a modified extent that no one resyncs. Callers pass the writes' ranges and wait.
        Hazard: a bit must not leave the disk before the data of the writes that finished on its
        extent is durable on both nodes (clear_loop): only what `clears` lets go is cleared.
        """
        with self._flush_lock:
            with self._am_lock:
                if ranges is not None and all(self.am.on_disk(off, ln) for off, ln in ranges):
                    return
                if ranges is None and not self.am.flush_needed(clears):
                    return
                image = self.am.bitmap(clears)
            self._write_bitmap(image)
            with self._am_lock:
                self.am.flushed(image)
        if user:
            self.count("activemap_updates")

    def _write_bitmap(self, image: bytes) -> None:
        """Write the bitmap image; with metaflush, durably before returning.

        Durable by a write with RWF_DSYNC (O_DSYNC for this write only): the kernel syncs just
        the bitmap's pages and flushes the disk cache. An fdatasync would also write back every
        dirty data page of the provider, which on a page-cached provider costs as much as the
        data itself, once per new extent (hastd's g_flush is a disk cache flush only).
        """
        if not self.res.metaflush:
            self._pwrite_bitmap(image)
            return
        if self._data_sync.failed:
            raise OSError(errno.EIO, self._data_sync.failed)
        if self._dsync_writes:
            view = memoryview(image)
            offset = metadata.BITMAP_OFFSET
            try:
                while len(view):
                    n = os.pwritev(self.fd, [view], offset, os.RWF_DSYNC)
                    view, offset = view[n:], offset + n
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._data_sync.lost(exc.strerror or str(exc))  # its sync may have taken a data write's error
                    raise
                log.debug("RWF_DSYNC writes not supported here (%s): using fdatasync.", exc.strerror)
                self._dsync_writes = False
        self._pwrite_bitmap(image)
        self._data_sync()

    def _pwrite_bitmap(self, image: bytes) -> None:
        # metadata raises ProviderError; every caller here handles (and counts) an OSError.
        try:
            metadata.write_bitmap(self.fd, image)
        except ProviderError as exc:
            raise OSError(errno.EIO, str(exc)) from exc

    # -- user I/O entry (called by the NBD server) ----------------------------------------------

    def submit(self, kind: str, offset: int, length: int, data, fua: bool, done) -> None:
        """Start one NBD request; done(error_errno, data) is called exactly once."""
        if kind == "read":
            self._read(offset, length, done)
        elif kind == "flush":
            self._flush(done)
        else:  # write, trim, zero: change data on both nodes
            self._write_run([(kind, offset, length, data, fua, done)])

    def submit_many(self, requests: Sequence[tuple]) -> None:
        """Start requests (submit's arguments each) that arrived together, in order. Runs of
        writes share one activemap write (group commit): with random writes over more extents
        than keepdirty, most writes need a bitmap write of their own otherwise."""
        run: list[tuple] = []
        for req in requests:
            if req[0] in ("read", "flush"):
                self._write_run(run)
                run = []
                self.submit(*req)
            else:
                run.append(req)
        self._write_run(run)

    def _write_run(self, run: list[tuple]) -> None:
        if run and all(req[2] <= COMBINE_MAX_LENGTH for req in run):
            self._combiner.submit(run)
        else:
            self._write_group(run)

    def _in_pool(self, fn, *args) -> None:
        """fn(*args) on a pool thread, through worker.run_or_exit."""
        self.pool.submit(run_or_exit, fn, *args)

    def _fail_writes(self, requests: list[tuple], exc: BaseException) -> None:
        """The combiner's group failed to start (a bug): fail each request not yet answered."""
        log.error("Starting %d writes failed.", len(requests), exc_info=exc)
        for *_, done in requests:
            with contextlib.suppress(Exception):  # a request may have completed already
                done(errno.EIO, None)

    def _lock_range(self, kind: LockKind, offset: int, length: int):
        with self._ranges_lock:
            token = self._ranges.try_lock(kind, offset, length)
            if token is None:
                self._range_waiters += 1
                try:
                    while (token := self._ranges.try_lock(kind, offset, length)) is None:
                        self._ranges_cv.wait()
                finally:
                    self._range_waiters -= 1
            return token

    def _unlock_range(self, token) -> None:
        with self._ranges_lock:
            self._ranges.unlock(token)
            if self._range_waiters:
                self._ranges_cv.notify_all()

    def _write(self, kind, offset, length, data, fua, done) -> None:
        hio = Hio(kind, offset, length, data, fua, done)
        hio.range_token = self._lock_range(LockKind.REGULAR, offset, length)
        with self._am_lock:
            needs_flush = self.am.write_start(offset, length)
        if self._marked([hio], needs_flush):
            self._dispatch_writes([hio])

    def _write_group(self, requests: list[tuple]) -> None:
        """_write for each request, with one bitmap write for all: each takes its range lock
        and activemap reference, then one flush covers them, then each is dispatched. A request
        whose range is locked (an overlapping write, or a sync chunk) ends the group and waits,
        as _write would, once the group is on its way."""
        if len(requests) < 2:
            for req in requests:
                self._write(*req)
            return
        group: list[Hio] = []
        needs_flush = False
        for i, req in enumerate(requests):
            with self._ranges_lock:
                token = self._ranges.try_lock(LockKind.REGULAR, req[1], req[2])
            if token is None:
                break
            hio = Hio(*req)
            hio.range_token = token
            with self._am_lock:
                needs_flush |= self.am.write_start(hio.offset, hio.length)
            group.append(hio)
        else:
            i = len(requests)
        if self._marked(group, needs_flush):
            self._dispatch_writes(group)
        for req in requests[i:]:
            self._write(*req)

    def _marked(self, hios: list[Hio], needs_flush: bool) -> bool:
        """Make the writes' activemap bits durable if write_start asked for it. On failure every
        write fails with EIO, nothing of it dispatched, and False is returned."""
        if not needs_flush or not hios:
            return True
        try:
            self.flush_bitmap([(h.offset, h.length) for h in hios], user=True)
            self._clear_wanted.set()  # an extent this evicted keeps its bit: clear_loop's
            return True
        except OSError as exc:
            log.error("Unable to write the activemap: %s.", exc.strerror)
        for hio in hios:
            self.count("write_errors")
            with self._am_lock:
                self.am.write_complete(hio.offset, hio.length)
            self._unlock_range(hio.range_token)
            hio.done(errno.EIO, None)
        return False

    def _dispatch_writes(self, hios: list[Hio]) -> None:
        """Send writes, whose activemap bits are on disk, to both disks: the remote requests of
        all of them with one send, then the local writes.

        A plain write goes to the local disk from this thread, after its remote half is on its
        way, so the two overlap: a page-cache write takes less than a thread hand-off. A trim
        (BLKZEROOUT can take long) and an FUA write (an fdatasync) go to the pool, also only
        once their remote halves are sent: in async mode the local half alone acknowledges a
        write, and a FLUSH the client sends after that must reach the secondary behind it."""
        link = self.link
        remote: list[tuple] = []
        pooled: list[Hio] = []
        for hio in hios:
            with self._stats_lock:
                self.stats["writes" if hio.kind == "write" else "deletes"] += 1
                self.inflight += 1
            chunks = self._remote_chunks(hio.offset, hio.length, link) if link else []
            # Without a link the remote half is one part that fails at once (and marks the range).
            hio.remote_total = len(chunks) if link else 1
            hio.parts = 1 + hio.remote_total
            if hio.kind != "write" or hio.fua:
                pooled.append(hio)
            if not link:
                self._remote_part_done(hio, errno.ENOTCONN)
                continue
            cmd = msg.Cmd.WRITE if hio.kind == "write" else msg.Cmd.DELETE
            memsync = self.mode == "memsync" and link.version >= 2 and hio.kind == "write"
            for off, ln in chunks:
                payload = None
                if hio.kind == "write":
                    payload = memoryview(hio.data)[off - hio.offset : off - hio.offset + ln]
                # One callback per chunk: each tracks whether its own memsync "received" came.
                remote.append((cmd, off, ln, payload, memsync, self._remote_callback(hio)))
        if remote:
            link.submit_many(remote)
        for hio in pooled:
            self._in_pool(self._local_write, hio)
        for hio in hios:
            if hio.kind == "write" and not hio.fua:
                self._local_write(hio)

    @staticmethod
    def _remote_chunks(offset: int, length: int, link: Link) -> list[tuple[int, int]]:
        step = link.maxio
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    def _remote_callback(self, hio: Hio):
        seen_received = False

        def cb(error, received, _data):
            nonlocal seen_received
            if received:
                seen_received = True
                self._remote_received(hio)
            else:
                self._remote_part_done(hio, error, settled=not seen_received)

        return cb

    def _local_write(self, hio: Hio) -> None:
        err = 0
        try:
            if hio.kind == "write":
                localio.pwrite_full(self.fd, hio.data, self.localoff + hio.offset)
            else:
                localio.discard(self.fd, self.localoff + hio.offset, hio.length)
            if hio.fua:
                self._data_sync()
        except OSError as exc:
            err = exc.errno or errno.EIO
            self.count("write_errors" if hio.kind == "write" else "delete_errors")
            log.error("Local %s at %d failed: %s.", hio.kind, hio.offset, exc.strerror)
        with hio.lock:
            hio.local_err = err
            hio.parts -= 1
            last = hio.parts == 0
            ack = self._ack_due(hio)
        self._after_part(hio, last, ack)

    def _remote_received(self, hio: Hio) -> None:
        with hio.lock:
            hio.settled += 1
            ack = self._ack_due(hio)
        self._after_part(hio, False, ack)

    def _remote_part_done(self, hio: Hio, error: int, settled: bool = True) -> None:
        with hio.lock:
            hio.settled += settled
            if error:
                hio.remote_ok = False
                hio.remote_err = hio.remote_err or error
            hio.parts -= 1
            last = hio.parts == 0
            ack = self._ack_due(hio)
        self._after_part(hio, last, ack)

    def _ack_due(self, hio: Hio) -> bool:
        """Whether this request may be acknowledged now (call under hio.lock); marks it acked.

        fullsync: local done and every remote chunk answered (or failed); memsync: local done and
        every chunk at least received; async: local done. FUA waits for everything (then flushes).
        """
        if hio.acked or hio.local_err is None:
            return False
        if hio.fua or self.mode == "fullsync" or self.syncsrc == syncdecide.SYNCSRC_SECONDARY:
            # (The stale side waits for the peer whatever the mode: see _reply_write.)
            due = hio.parts == 0  # local is done, so every part left is remote
        elif self.mode == "memsync":
            due = hio.settled >= hio.remote_total
        else:
            due = True
        if due:
            hio.acked = True
        return due

    def _after_part(self, hio: Hio, last: bool, ack: bool) -> None:
        if ack and not hio.fua:
            self._reply_write(hio)
        if last:
            self._finish_write(hio)

    def _reply_write(self, hio: Hio, err: int = 0) -> None:
        """Acknowledge a write (err: a failed FUA flush). It succeeds if the local disk took it;
        a local failure is reported even when the remote succeeded (our local copy would be
        stale, and reads are served locally).

        While this node is the stale side (syncing from the secondary) a write the peer did not
        take fails instead: acknowledged on our older disk alone it would be copied over by that
        sync (its extent is marked for it), or, with localcnt bumped, turn the next handshake
        into a split-brain. Reads fail the same way then (_read)."""
        if not hio.remote_ok and self.syncsrc == syncdecide.SYNCSRC_SECONDARY:
            hio.done(hio.local_err or errno.EIO, None)
            return
        if not hio.remote_ok or self.link is None:
            try:
                recorded = self._bump_localcnt_if_first()
            except HastError as exc:
                # Acknowledged, the write would be on this disk alone with nothing on it to tell
                # the next handshake so: a failover would then lose it without a split-brain.
                log.error("Unable to record a write the peer lacks, failing it: %s", exc)
                if not hio.local_err:
                    self.count("write_errors" if hio.kind == "write" else "delete_errors")
                recorded = False
            if not recorded:
                hio.done(hio.local_err or errno.EIO, None)
                return
        hio.done(hio.local_err or err or 0, None)

    def _finish_write(self, hio: Hio) -> None:
        """Both halves are resolved: release the activemap reference and the range."""
        remote_ok = hio.remote_ok and not hio.local_err
        if not hio.remote_ok:
            self.count("remote_errors")
        with self._am_lock:
            if not remote_ok:
                self.am.need_sync(hio.offset, hio.length)
            flush = self.am.write_complete(hio.offset, hio.length)
        self._unlock_range(hio.range_token)
        with self._stats_lock:
            self.inflight -= 1
        if not remote_ok:
            self._sync_wanted.set()
        if hio.fua:
            self._flush(lambda err, _d: self._reply_write(hio, err))
        if flush:
            self._clear_wanted.set()  # clear_loop writes it, together with others

    def _bump_localcnt_if_first(self) -> bool:
        """hast.md §7.2: the first write acknowledged without the peer bumps localcnt, durably,
        before the ack, so the next handshake knows this node has data the peer lacks.
        ProviderError if the disk refuses; localcnt stays, so the next such write tries again.
        False, and nothing changed, if a handshake made this node the stale side since the
        caller looked (_reply_write): such a write must fail. The handshake decides under the
        same lock, from the localcnt it sent (handshake)."""
        with self._md_lock:
            if self.syncsrc == syncdecide.SYNCSRC_SECONDARY:
                return False
            new = syncdecide.localcnt_after_write(self.md.localcnt, self.peer.remotecnt)
            if new == self.md.localcnt:
                return True
            self._store_md(replace(self.md, localcnt=new))
        log.info("Increasing localcnt to %d.", new)
        return True

    def _read(self, offset: int, length: int, done) -> None:
        self.count("reads")
        link = self.link
        if self.syncsrc == syncdecide.SYNCSRC_SECONDARY:
            # This node is the stale side until the sync completes: read the peer's data (§6).
            if link is None:
                done(errno.ENOTCONN, None)
                return
            self._remote_read(link, offset, length, done)
            return

        def local():
            try:
                data = localio.pread_full(self.fd, length, self.localoff + offset)
            except OSError as exc:
                self.count("read_errors")
                link = self.link
                with self._am_lock:
                    # The peer's copy of an extent marked for resync may lack acknowledged writes.
                    stale = self.am.marked_for_sync(offset, length)
                if link is None or stale:
                    log.error("Local read at %d failed: %s.", offset, exc.strerror)
                    done(exc.errno or errno.EIO, None)
                else:
                    log.error("Local read at %d failed: %s; trying the remote.", offset, exc.strerror)
                    self._remote_read(link, offset, length, done)
                return
            done(0, data)

        self._in_pool(local)

    def _remote_read(self, link: Link, offset: int, length: int, done) -> None:
        chunks = self._remote_chunks(offset, length, link)
        parts: dict[int, bytes] = {}
        state = {"left": len(chunks), "err": 0}
        lock = threading.Lock()

        def cb_for(off):
            def cb(error, _received, data):
                with lock:
                    if error:
                        state["err"] = state["err"] or error
                    else:
                        parts[off] = data
                    state["left"] -= 1
                    finished = state["left"] == 0
                if finished:
                    if state["err"]:
                        done(state["err"], None)
                    else:
                        done(0, b"".join(parts[o] for o, _ in chunks))

            return cb

        for off, ln in chunks:
            link.submit(msg.Cmd.READ, off, ln, None, False, cb_for(off))

    def _flush(self, done, user: bool = True) -> None:
        """Durable on every connected node: local fdatasync and remote FLUSH, both answered.
        One that succeeded on both also lets the clear loop clear the bits that were clearable
        when it began (clear_loop). user: a client's, counted in the statistics."""
        if user:
            self.count("flushes")
        link = self.link
        state = {"left": 2 if link else 1, "err": 0, "remote_ok": False}
        lock = threading.Lock()
        snap = None
        if link:
            with self._am_lock:
                snap = self.am.clear_snapshot()

        def part(err, _received=False, _data=None):
            with lock:
                state["left"] -= 1
                if err and not state["err"]:
                    state["err"] = err
                finished = state["left"] == 0
            if not finished:
                return
            if snap is not None and state["remote_ok"] and not state["err"]:
                with self._am_lock:
                    if self._durable_clear is None or snap.epoch > self._durable_clear.epoch:
                        self._durable_clear = snap
                self._clear_wanted.set()
            done(state["err"], None)

        def local():
            try:
                self._data_sync()
                part(0)
            except OSError as exc:
                self.count("flush_errors")
                part(exc.errno or errno.EIO)

        def remote(err, _received, _data):
            self._remote_flush_done(link, err)
            state["remote_ok"] = not err  # read by the last part, after the lock
            part(0)

        self._in_pool(local)
        if link:
            # A remote that fails here is disconnected (_remote_flush_done): its extents are
            # marked for resync, so the flush only has to be durable locally.
            link.submit(msg.Cmd.FLUSH, 0, 0, None, False, remote)

    @staticmethod
    def _remote_flush_done(link: Link, err: int) -> None:
        """A FLUSH the secondary answered with an error: its disk lost writes it acknowledged,
        or may have (and its next flush may succeed all the same: localio.StickyFlush). End the
        link: on_disconnect marks every extent on disk for resync."""
        if err and err != errno.ENOTCONN:
            link.close(f"flush failed on the secondary: {os.strerror(err)}")

    # -- connection management ------------------------------------------------------------------

    def on_disconnect(self, link: Link) -> None:
        with self._link_lock:
            if self.link is link:
                self.link = None
        with self._am_lock:
            # The secondary answered writes once they were in its page cache; those since its
            # last flush (clear_loop's, or a user's) die with it if it crashed. Their extents
            # still have their bits on disk (clear_loop clears none before such a flush), and
            # nothing but a resync of them all is sure to bring it the writes it lost.
            self.am.need_sync_on_disk()
        self._sync_wanted.set()
        self.channel.event("disconnect")

    def handshake(self, timeout: float, res: Resource, connect_timeout: float | None = None) -> Link:
        """§4.1 from the primary's side, with res (self.res when the attempt began). Raises
        RemoteError / HastError with hastd's messages. connect_timeout: see transport.connect."""
        out = connect(res.remote, res.source, timeout, connect_timeout)
        inn = None
        try:
            hello = msg.Hello(resource=res.name, version=msg.PROTO_VERSION, maxio=const.MAXPHYS)
            send_frame(out, msg.HELLO_FRAME_VERSION, hello.to_nv())
            reply = msg.decode_hello_reply(recv_one(out, msg.PROTO_VERSION).nv)
            if isinstance(reply, msg.ErrorReply):
                raise WaitForPeer(reply.errmsg) if reply.wait else RemoteError(reply.errmsg)
            version = reply.version
            virgin = self.md.resuid == 0
            resuid = self.md.resuid or (secrets.randbits(64) or 1)
            inn = connect(res.remote, res.source, timeout, connect_timeout)
            # hastpy's fields go to hastpy peers only (v4), as everything else of ours.
            ours = {"replicaid": self.md.replicaid, "peerid": self.md.peerid, "inconsistent": self.md.inconsistent}
            sent_localcnt = self.md.localcnt
            inhello = msg.InHello(resource=res.name, token=reply.token, virgin=virgin, resuid=resuid,
                                  localcnt=sent_localcnt, remotecnt=self.md.remotecnt,
                                  **(ours if version >= msg.PROTO_VERSION_SYNCDONE else {}))  # fmt: skip
            send_frame(inn, version, inhello.to_nv())
            frame = recv_one(out, version)
            info = msg.decode_secondary_info(frame.nv)
            if isinstance(info, msg.ErrorReply):
                if info.errmsg == SPLIT_BRAIN_ERRMSG:
                    log.error("Split-brain detected on the secondary: refusing to synchronize.")
                    self.channel.event("split-brain")
                raise (Refused if syncdecide.is_decision_refusal(info.errmsg) else RemoteError)(info.errmsg)
            if info.datasize != self.datasize or info.extentsize != self.md.extentsize:
                raise RemoteError(f"Data size differs between nodes (local={self.datasize}, remote={info.datasize}).")
            if self.md.inconsistent and info.syncsrc != syncdecide.SYNCSRC_SECONDARY:
                # Only the copy this one was being synchronized from can finish that: copying
                # our half-old data to another (a fresh disk) would pass the damage on. A hastpy
                # secondary refuses first (we sent the mark), before it adopts anything.
                raise Refused(syncdecide.STALE_SOURCE_ERRMSG)
            bitmap = b""
            if len(frame.payload):
                bitmap = pipeline.decode_payload(frame.payload, frame.nv)
            maxio = msg.negotiate_maxio(version, const.MAXPHYS, info.maxio)
            # Adopt what the handshake decided; a disk that refuses to record it fails the
            # attempt, and nothing of it is left open.
            if virgin:
                self.write_md(resuid=resuid)
            if info.replicaid and info.replicaid != self.md.peerid:
                # Before the first write goes to it: from here on the copy we last replicated with,
                # if another, misses writes, and its handshake is refused (syncdecide).
                log.info("Replicating with copy %016x from now on (was %s).", info.replicaid,
                         f"copy {self.md.peerid:016x}" if self.md.peerid else "none known")  # fmt: skip
                self.write_md(peerid=info.replicaid)
            with self._md_lock:
                if self.md.localcnt != sent_localcnt:
                    # A write without the peer, acknowledged meanwhile, bumped it: the secondary
                    # decided without knowing, and a sync from it could overwrite that write, or
                    # hide a split-brain. Ask again with the new count.
                    raise RemoteError("A write without the peer changed localcnt during the handshake.")
                self.peer = syncdecide.Counters(resuid, info.localcnt, info.remotecnt)
                self.syncsrc = info.syncsrc
            if info.syncsrc == syncdecide.SYNCSRC_SECONDARY and not self.md.inconsistent:
                # Our data is the older copy until the sync from the secondary completes: if this
                # worker dies before then, a restart without the peer must not serve it.
                log.warning("Local data is older than the secondary's: marked inconsistent until the synchronization completes.")
                self.write_md(inconsistent=True)
            with self._am_lock:
                if bitmap:
                    # The peer sizes its map from its own provider (hast.md §11 caveat 6); only the
                    # bits of extents we have matter, so fit it to our map.
                    self.am.merge(bytes(bitmap[: self.am.mapsize]).ljust(self.am.mapsize, b"\0"))
                self.am.sync_rewind()
            self.flush_bitmap()
        except BaseException:
            out.close()
            if inn is not None:
                inn.close()
            raise
        set_timeout(out, res.timeout)
        set_timeout(inn, res.timeout)
        return Link(self, out, inn, version, maxio, (res.remote, res.source))

    def try_connect(self, timeout: float, connect_timeout: float | None = None) -> str:
        """"connected", "wait" (the peer is still primary), "split-brain", "refused" (the
        handshake's decision said no: syncdecide.is_decision_refusal, or our stale-source check)
        or "failed"."""
        res = self.res  # a reload may replace self.res meanwhile: say where this attempt went
        try:
            link = self.handshake(timeout, res, connect_timeout)
        except WaitForPeer as exc:
            log.info("%s Waiting.", exc)
            return "wait"
        except (OSError, HastError, RemoteError) as exc:
            # Retried every few seconds while the peer is away: said once for each new reason
            # (a refusal such as a resource unique ID mismatch must be seen without -d).
            reason = str(exc)
            level = logging.WARNING if reason != self._connect_error else logging.DEBUG
            log.log(level, "Unable to connect to %s: %s", res.remote, reason)
            self._connect_error = reason
            if isinstance(exc, Refused):
                return "split-brain" if reason == SPLIT_BRAIN_ERRMSG else "refused"
            return "failed"
        self._connect_error = ""
        # Said before the link is visible: the sync thread may start a pass on it at once.
        log.info("Connected to %s (protocol %d, %s).", link.peer[0], link.version,
                 "syncsrc=secondary" if self.syncsrc == syncdecide.SYNCSRC_SECONDARY else "syncsrc=primary")  # fmt: skip
        with self._link_lock:
            self.link = link
        link.start()
        self.channel.event("connect")
        self._sync_wanted.set()
        return "connected"

    def guard(self) -> None:
        """Keeps the link to the configured peer: connects while there is none, and replaces
        one made to an address a reload changed (the only thread that makes links, so a
        handshake begun with the old address is dropped here too, on the next round)."""
        while not self._stop.is_set():
            wait = RECONNECT_INTERVAL
            res, link = self.res, self.link
            if link is not None and link.peer != (res.remote, res.source):
                link.close(_peer_change(res, link.peer))
                link = None
            if link is None and res.remote != const.REMOTE_NONE and self.try_connect(res.timeout) in ("split-brain", "refused"):
                # The secondary's decision stays the same until an operator acts, and each
                # attempt logs an error there (and fires the split-brain hook on both nodes):
                # retry at hastd's pace (its guard runs every 10 s), not every second.
                wait = REFUSED_RETRY
            self._guard_wake.wait(wait)
            self._guard_wake.clear()

    # -- synchronization ------------------------------------------------------------------------

    def sync_loop(self) -> None:
        while not self._stop.is_set():
            self._sync_wanted.wait()
            self._sync_wanted.clear()
            link = self.link
            if link is None:
                continue
            self.sync_pass(link)

    def sync_pass(self, link: Link) -> None:
        with self._am_lock:
            self.am.sync_rewind()
            todo = self.am.sync_pending_bytes
        if todo == 0:
            self._sync_complete(link, 0, 0.0)
            return
        log.info("Synchronization started. %d bytes to go.", todo)
        self.channel.event("syncstart")
        self.sync_state = "running"
        started = time.monotonic()
        synced = 0
        from_secondary = self.syncsrc == syncdecide.SYNCSRC_SECONDARY
        while True:
            if link.closed or self._stop.is_set():
                log.warning("Synchronization interrupted after %d bytes synchronized so far.", synced)
                self.sync_state = "interrupted"
                self.channel.event("syncintr")
                return
            with self._am_lock:
                chunk = self.am.sync_next()
            if chunk is None:
                break
            token = self._lock_range(LockKind.SYNC, chunk.offset, chunk.length)
            try:
                ok = self._copy_chunk(link, chunk.offset, chunk.length, from_secondary)
            finally:
                self._unlock_range(token)
            with self._am_lock:
                if not ok:
                    self.am.sync_failed(chunk.extent)
                    flush = False
                else:
                    flush = chunk.last and self.am.extent_complete(chunk.extent)
            if ok:
                synced += chunk.length
                self.count("synced_bytes", chunk.length)
            if flush:
                self._clear_wanted.set()  # once the copies are durable on both nodes
        self._sync_complete(link, synced, time.monotonic() - started)

    def _copy_chunk(self, link: Link, offset: int, length: int, from_secondary: bool) -> bool:
        result = {}
        ev = threading.Event()

        def cb(error, _received, data):
            if _received:
                return
            result["err"], result["data"] = error, data
            ev.set()

        try:
            if from_secondary:
                link.submit(msg.Cmd.READ, offset, length, None, False, cb)
                ev.wait()
                if result["err"]:
                    return False
                data = result["data"]
                if data is None or len(data) != length:
                    link.close(f"a read of {length} bytes at {offset} answered with {len(data or b'')}")
                    return False
                localio.pwrite_full(self.fd, data, self.localoff + offset)
            else:
                data = localio.pread_full(self.fd, length, self.localoff + offset)
                link.submit(msg.Cmd.WRITE, offset, length, data, False, cb)
                ev.wait()
                if result["err"]:
                    return False
        except OSError as exc:
            log.error("Synchronization of %d+%d failed locally: %s.", offset, length, exc.strerror)
            return False
        return True

    def _sync_complete(self, link: Link, synced: int, seconds: float) -> None:
        with self._am_lock:
            if self.am.sync_pending_extents:
                return  # some chunks failed; the next pass retries them
        if synced:
            rate = synced / seconds if seconds > 0 else 0
            log.info("Synchronization complete. %d bytes synchronized in %.1f s (%d bytes/sec).", synced, seconds, rate)
            self.channel.event("syncdone")
        else:
            log.info("Nodes are in sync.")
        if link.closed:
            return
        # Only a pass from the secondary brings our data up to date (handshake() refuses to be
        # the source while marked; this keeps the mark if that ever changed).
        was_stale = self.md.inconsistent and self.syncsrc == syncdecide.SYNCSRC_SECONDARY
        self.syncsrc = syncdecide.SYNCSRC_UNDEF
        self.sync_state = "done"
        after = syncdecide.counters_after_sync(syncdecide.Counters(self.md.resuid, self.md.localcnt, self.md.remotecnt), self.peer)
        try:
            if was_stale:
                self._data_sync()  # the synced data durable before the mark goes
            if was_stale or (after.localcnt, after.remotecnt) != (self.md.localcnt, self.md.remotecnt):
                self.write_md(localcnt=after.localcnt, remotecnt=after.remotecnt,
                              inconsistent=self.md.inconsistent and not was_stale)  # fmt: skip
        except (HastError, OSError) as exc:
            # The counters (and our mark) stay as they were: the next handshake decides from
            # them again and syncs what is still marked. No syncdone: the secondary keeps its
            # mark too until a sync is recorded on both sides.
            log.error("Unable to record the synchronization: %s", exc)
            return
        if was_stale:
            log.info("Local data is up to date again.")
        link.send_syncdone()

    # -- life cycle -----------------------------------------------------------------------------

    def clear_loop(self) -> None:
        """Write the bitmap that clears bits, off the reply path, at most once per
        CLEAR_FLUSH_DELAY, and only for extents whose finished writes a flush of both nodes made
        durable: the snapshot of a successful FLUSH (_flush), the client's, or after
        FORCED_CLEAR_AFTER without one, this loop's own. Both providers may be page-cached, so a
        write that finished is not yet on either disk: a bit cleared before a flush could
        outlive the data across a power loss, leaving an extent that differs between the nodes
        with nothing marking it."""
        waiting_since = None  # since when bits have waited for a flush of both nodes
        while not self._stop.is_set():
            self._clear_wanted.wait(FORCED_CLEAR_AFTER)
            self._stop.wait(CLEAR_FLUSH_DELAY)
            self._clear_wanted.clear()
            with self._am_lock:
                snap, self._durable_clear = self._durable_clear, None
                waiting = snap is None and self.am.clear_snapshot() is not None
            if snap is not None:
                try:
                    self.flush_bitmap(user=True, clears=[snap])
                    waiting_since = None
                except OSError as exc:
                    log.error("Unable to write the activemap: %s.", exc.strerror)
                continue
            if not waiting:
                waiting_since = None
                continue
            waiting_since = waiting_since or time.monotonic()
            if time.monotonic() - waiting_since >= FORCED_CLEAR_AFTER and self.link is not None:
                # One of our own; when it succeeds it hands its snapshot here, as a client's does.
                flushed = threading.Event()
                self._flush(lambda _err, _data: flushed.set(), user=False)
                while not flushed.wait(STOP_POLL) and not self._stop.is_set():
                    pass

    def start_threads(self) -> None:
        threading.Thread(target=fail_stop(self.guard), name="guard", daemon=True).start()
        threading.Thread(target=fail_stop(self.sync_loop), name="sync", daemon=True).start()
        threading.Thread(target=fail_stop(self.clear_loop), name="activemap-clear", daemon=True).start()


def _stale_data_refusal(p: Primary, force: bool) -> str | None:
    """Why a primary whose local data is marked inconsistent must not serve it, or None.

    Served only while connected to a secondary with the newer copy (reads then go to it until
    the sync completes), or when forced (the mark is dropped: the operator chose this copy)."""
    if p.link is not None and p.syncsrc == syncdecide.SYNCSRC_SECONDARY:
        return None
    if force:
        log.warning("Forced: serving local data that a synchronization to this node did not finish.")
        p.write_md(inconsistent=False)
        return None
    where = "the peer is not connected" if p.link is None else "the peer would synchronize from it"
    return (f"local data is inconsistent (a synchronization to this node did not finish) and {where}: "
            f"not serving it. Make the peer primary, or use this copy anyway with "
            f"'hastctl role --force primary {p.res.name}'.")  # fmt: skip


def _peer_change(res: Resource, old: tuple[str, str | None]) -> str:
    """What a reload changed of the peer's address or ours, from `old` (remote, source), for
    the log."""
    if res.remote != old[0]:
        return f"remote address changed to {res.remote}"
    return f"source address changed to {res.source or 'any'}"


class Refused(RemoteError):
    """The handshake's decision refused the pair (hast.md §7.2 and hastpy's own): it stays so
    until an operator acts."""


class WaitForPeer(Exception):
    """The peer is still primary for the resource (hastd's `wait` reply)."""


def run(res: Resource, spec: dict, channel: Channel) -> int:
    try:
        prov = open_provider(res.local)
        prov.lock()
        md = prov.read_metadata(res.name)
        if md.resuid == 0:
            md = replace(md, localcnt=0, remotecnt=0)
        md = replace(md, prevrole="primary", replicaid=md.replicaid or metadata.new_replica_id())
        prov.write_metadata(md)
        prov.sync()
    except HastError as exc:  # the provider: opening, locking, its metadata read or written
        log.error("%s", exc)
        channel.event("refused", reason=str(exc))  # for hastctl list and role primary
        return exc.exit_code
    set_io_flusher()
    p = Primary(res, prov, md, channel)
    if res.remote != const.REMOTE_NONE:
        deadline = time.monotonic() + res.timeout
        while (outcome := p.try_connect(min(res.timeout, FIRST_CONNECT_TIMEOUT), FIRST_TCP_CONNECT_TIMEOUT)) != "connected":
            # hastd: retry a peer that says "wait" for up to `timeout` s, then start anyway.
            if outcome != "wait" or time.monotonic() >= deadline:
                log.warning("Unable to connect to %s: starting degraded.", res.remote)
                break
            time.sleep(WAIT_RETRY)
    if p.md.inconsistent:
        code = const.STALE_DATA_EXIT
        try:
            refusal = _stale_data_refusal(p, bool(spec.get("force")))
        except HastError as exc:  # forced, and the disk refused to drop the mark
            refusal, code = str(exc), exc.exit_code
        if refusal is not None:
            log.error("%s", refusal)
            channel.event("refused", reason=refusal)
            if p.link is not None:
                p.link.close("refusing to serve inconsistent local data")
            return code
    listener = socket.socket(fileno=spec["fds"]["nbd"])
    channel.serve_status(p.status, p.reconfigure)
    drop_privileges()
    p.start_threads()
    channel.event("ready", socket=spec.get("nbd_path"), size=p.datasize)
    # CAN_MULTI_CONN promises that a FLUSH on any connection makes durable every write already
    # acknowledged on any other. It holds here: all connections share this Primary, its one
    # provider fd (the local fdatasync) and its one Link, which is ordered (the remote FLUSH
    # follows every remote write sent before it; async sends a write before acknowledging it).
    # nbdfuse and nbdcopy then open several connections, and the kernel's copies overlap.
    export = nbdserver.ExportConfig(name=res.name, multi_conn=True, max_block_size=NBD_MAX_BLOCK)
    frontend = NbdFrontend(p)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=p.serve_client, args=(conn, frontend, export), daemon=True).start()


class NbdFrontend:
    """The primary as the NBD server's BatchBackend: NBD requests in, NBD errors out."""

    def __init__(self, p: Primary):
        self.p = p
        self.size = p.datasize

    def submit(self, request, done) -> None:
        args = self._primary_args(request, done)
        if args is not None:
            self.p.submit(*args)

    def submit_many(self, items) -> None:
        args = [self._primary_args(request, done) for request, done in items]
        self.p.submit_many([a for a in args if a is not None])

    @staticmethod
    def _primary_args(request, done) -> tuple | None:
        """Primary.submit's arguments for an NBD request; None if it was answered here. The NBD
        server's `done(error, data)` takes the errno values the Primary reports as they are (it
        turns them into NBD errors itself), so it is passed on unwrapped."""
        kind = request.kind
        Command = nbdcodec.Command
        if kind == Command.WRITE:
            return ("write", request.offset, request.length, request.data, request.fua, done)
        if kind == Command.READ:
            return ("read", request.offset, request.length, None, False, done)
        if kind in (Command.TRIM, Command.WRITE_ZEROES):
            # Both zero the range on both nodes (localio.discard guarantees zeros), so replicas
            # stay equal whatever the client asked to be deallocated.
            return ("trim", request.offset, request.length, None, request.fua, done)
        if kind == Command.FLUSH:
            return ("flush", 0, 0, None, False, done)
        done(errno.EINVAL)
        return None
