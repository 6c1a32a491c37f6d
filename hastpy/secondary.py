"""The secondary worker: answer the primary's handshake, then apply its requests to the local disk.

Threads and where requests go:
- `recv` (this module's main loop): frames from the primary's *out* connection -> validated
  requests -> memsync early ack (if asked) -> the disk pool;
- disk pool (DISK_THREADS): pread/pwrite/discard/fdatasync on the provider -> final reply;
- replies leave on the primary's *in* connection, serialized by `_send_lock`, in completion order
  (the primary matches them by seq).

Ordering contract: the primary never has two overlapping writes in flight (its range lock), so
the pool may reorder writes; a FLUSH is a barrier: it waits for every write received before it.
The secondary never serves I/O to anyone but its primary.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from hastpy import constants as const
from hastpy import localio, metadata, syncdecide
from hastpy.config import Resource
from hastpy.errors import HastError, ProviderError, RemoteProtocolError
from hastpy.proto import messages as msg
from hastpy.proto import pipeline
from hastpy.provider import open_provider
from hastpy.transport import PAYLOAD_READ_AHEAD, FrameStream, send_buffers, send_frame, set_timeout
from hastpy.worker import Channel, drop_privileges, run_or_exit

log = logging.getLogger("hastd")

# Concurrent disk I/Os; hastd has one disk thread (queue depth 1), which caps throughput.
DISK_THREADS = 8
# hast.md §4.2: the secondary's receive socket times out after twice the keepalive interval
# (a hastd primary sends one every 10 s). A v3 (hastpy) primary keeps the link busier, and its
# secondary gives up after the resource's `timeout` instead (primary.keepalive_interval).
HASTD_RECV_TIMEOUT = 2 * const.KEEPALIVE_INTERVAL
# Fault injection for tests of the acknowledgement point and of held synchronizations: while the
# file this variable names exists, disk writes (after the memsync "received" ack has gone out)
# and reads wait. Unset in production.
TEST_HOLD_ENV = "HASTPY_TEST_HOLD_DISK"
_HOLD_POLL = 0.01


class Secondary:
    def __init__(self, res: Resource, prov, md: metadata.Metadata, reqsock, repsock, version: int, maxio: int, channel: Channel):
        self.res = res
        self.prov = prov
        self.fd = prov.fd
        self.md = md
        self.localoff = md.offset
        self.reqsock = reqsock
        self.repsock = repsock
        self.version = version
        self.maxio = maxio
        self.channel = channel
        self._send_lock = threading.Lock()  # guards repsock: whole frames, never interleaved
        # Reply frames of the receive thread's writes, not sent yet: they go out together, in
        # one call, before the receive thread next waits for the primary (_send_held), so a run
        # of requests received at once costs one send and one wake-up of the primary.
        self._held: list = []
        self._inflight_cv = threading.Condition()  # guards _inflight (writes/deletes on the pool)
        self._inflight = 0
        self._queued = 0  # requests on the pool, for `queues: local`
        self._bitmap_cleared = False
        # Every fdatasync of the provider: once one failed, every FLUSH fails, or a later one
        # would tell the primary that writes the disk lost are durable.
        self._data_sync = localio.StickyFlush(self.fd)
        self.stats = {k: 0 for k in ("reads", "writes", "deletes", "flushes", "read_errors", "write_errors", "delete_errors", "flush_errors")}
        self.pool = ThreadPoolExecutor(DISK_THREADS, thread_name_prefix="disk")
        self._hold = _open_hold(os.environ.get(TEST_HOLD_ENV))

    def reconfigure(self, res: Resource) -> None:
        """A reload's new settings (supervisor.LIVE_FIELDS): replies are encoded with the new
        checksum and compression, and the sockets get the new timeout (a hastd peer's fixed
        receive timeout stays, see serve)."""
        self.res = res
        if self.version >= msg.PROTO_VERSION_MAXIO:
            set_timeout(self.reqsock, res.timeout)
        set_timeout(self.repsock, res.timeout)
        log.info("Configuration reloaded: checksum %s, compression %s, timeout %d s.", res.checksum, res.compression, res.timeout)

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "role": "secondary",
            "status": "complete",
            "statistics": dict(self.stats),
            "queues": {"local": self._queued, "send": 0, "recv": 0, "done": 0, "idle": 0},
            "extentsize": self.md.extentsize,
            "keepdirty": self.md.keepdirty,
            "dirty": 0,
            "inconsistent": self.md.inconsistent,
        }

    # -- replies --------------------------------------------------------------------------------

    def reply(self, seq: int, error: int = 0, received: bool = False, data: bytes | None = None, hold: bool = False) -> None:
        """Send a reply; with hold (the receive thread only), at its next _send_held."""
        rep = msg.Reply(seq=seq, error=error, received=received)
        payload = None if error else data  # a failed request's reply carries no data
        bufs = pipeline.encode_io_frame(self.version, rep, msg.encode_reply_nv, payload, self.res.compression, self.res.checksum)
        if hold:
            self._held.extend(bufs)
            return
        with self._send_lock:
            send_buffers(self.repsock, bufs)

    def _send_held(self) -> None:
        """The receive thread is about to wait for the primary, which may be waiting for these."""
        if not self._held:
            return
        bufs, self._held = self._held, []
        try:
            with self._send_lock:
                send_buffers(self.repsock, bufs)
        except OSError as exc:
            self._reply_failed(exc)

    def _reply_failed(self, exc: OSError) -> None:
        # Not sent, or only partly: the stream to the primary is unusable. Shut it down; the
        # receive loop then ends the worker (disconnect), and the primary reconnects.
        log.warning("Unable to send a reply to the primary: %s.", exc)
        for sock in (self.reqsock, self.repsock):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- disk work (pool threads) ---------------------------------------------------------------

    def _done_inflight(self) -> None:
        with self._inflight_cv:
            self._inflight -= 1
            self._inflight_cv.notify_all()

    def _io(self, req: msg.Request, data) -> None:
        """A pool thread: a READ, DELETE or FLUSH."""
        self._queued -= 1
        try:
            self._execute(req, data)
        finally:
            if req.cmd == msg.Cmd.DELETE:
                self._done_inflight()

    def _execute(self, req: msg.Request, data, hold: bool = False) -> None:
        """Run one request on the local disk and send (or hold, see reply) its final reply."""
        error, out = 0, None
        try:
            if req.cmd == msg.Cmd.READ:
                self._test_hold()
                out = localio.pread_full(self.fd, req.length, self.localoff + req.offset)
            elif req.cmd == msg.Cmd.WRITE:
                self._test_hold()
                localio.pwrite_full(self.fd, data, self.localoff + req.offset)
            elif req.cmd == msg.Cmd.DELETE:
                localio.discard(self.fd, self.localoff + req.offset, req.length)
            else:
                self._data_sync()
        except OSError as exc:
            error = exc.errno or errno.EIO
            kind = {msg.Cmd.READ: "read", msg.Cmd.WRITE: "write", msg.Cmd.DELETE: "delete"}.get(req.cmd, "flush")
            self.stats[f"{kind}_errors"] += 1
            log.error("Local %s at offset %d failed: %s.", kind, req.offset, exc.strerror)
        try:
            self.reply(req.seq, error, data=out, hold=hold)
        except OSError as exc:
            self._reply_failed(exc)

    def _test_hold(self) -> None:
        while self._hold is not None and _exists_at(*self._hold):
            time.sleep(_HOLD_POLL)

    # -- receive loop ---------------------------------------------------------------------------

    def _clear_bitmap_once(self) -> None:
        # hastd zeroes the secondary's bitmap at the first request after a connect: from then on
        # the primary owns the dirty state (it merged our bitmap at the handshake). If the disk
        # refuses, bits stay set that the next handshake merges again: a larger resync, no data
        # at risk. So, as in hastd, a warning and the request goes on; tried once per connection
        # (a bad sector would otherwise make every request wait for the disk's retries).
        if self._bitmap_cleared:
            return
        self._bitmap_cleared = True
        try:
            self.prov.write_bitmap(bytes(self.localoff - const.METADATA_SIZE))
        except HastError as exc:
            log.warning("%s The bitmap keeps its bits: the next connection resyncs their extents too.", exc)
            return
        try:
            self.prov.sync()
        except HastError as exc:
            self._data_sync.lost(str(exc))

    def _sync_done(self) -> None:
        """The primary completed a synchronization: every extent it copied here was answered.
        Clear the inconsistent mark, but only once those writes are durable: the mark must
        outlive any of them that a crash could still lose."""
        if not self.md.inconsistent:
            return
        with self._inflight_cv:  # trims run on the pool
            self._inflight_cv.wait_for(lambda: self._inflight == 0)
        try:
            self._data_sync()
        except OSError as exc:
            raise ProviderError(f"Unable to flush {self.prov.path}: {exc.strerror}.") from None
        self.md = replace(self.md, inconsistent=False)
        self.prov.write_metadata(self.md)
        self.prov.sync()
        log.info("Synchronization from the primary complete: local data is up to date.")

    def handle(self, frame) -> None:
        req = msg.Request.from_nv(frame.nv)
        if req.cmd == msg.Cmd.KEEPALIVE:
            if req.syncdone:
                self._sync_done()
            return
        if req.seq == 0:
            # The reply could not say which request it answers (seq 0 is "absent" on the wire),
            # so this is a broken primary: end the connection, as for any unusable header.
            raise RemoteProtocolError(f"request without a seq (cmd={req.cmd})")
        err = msg.validate_request(req, self.md.datasize, self.prov.sectorsize, self.maxio)
        if err:
            log.warning("Invalid request (cmd=%d offset=%d length=%d): replying EINVAL.", req.cmd, req.offset, req.length)
            self.reply(req.seq, err)
            return
        self._clear_bitmap_once()
        data = None
        if req.cmd == msg.Cmd.WRITE:
            data = pipeline.decode_payload(frame.payload, frame.nv)
            if len(data) != req.length:
                self.reply(req.seq, errno.EINVAL)
                return
            self.stats["writes"] += 1
            if req.memsync:
                self.reply(req.seq, received=True)  # at once: it must not wait for the disk
            # Written and answered here, on the receive thread, as hastd's single disk thread
            # would: a page-cache write is quicker than handing it to another thread and back.
            self._execute(req, data, hold=True)
            return
        elif req.cmd == msg.Cmd.READ:
            self.stats["reads"] += 1
        elif req.cmd == msg.Cmd.DELETE:
            self.stats["deletes"] += 1
        else:
            self.stats["flushes"] += 1
            with self._inflight_cv:  # FLUSH is a barrier behind every earlier write
                self._inflight_cv.wait_for(lambda: self._inflight == 0)
        if req.cmd == msg.Cmd.DELETE:
            with self._inflight_cv:
                self._inflight += 1
        self._queued += 1
        self.pool.submit(run_or_exit, self._io, req, data)

    def serve(self) -> int:
        stream = FrameStream(self.reqsock, self.version, self.maxio, msg.REQUEST_LAYOUTS, PAYLOAD_READ_AHEAD, self._send_held)
        recv_timeout = self.res.timeout if self.version >= msg.PROTO_VERSION_MAXIO else HASTD_RECV_TIMEOUT
        set_timeout(self.reqsock, recv_timeout)
        status = os.EX_TEMPFAIL
        try:
            while True:
                self.handle(stream.recv())
        except TimeoutError:
            log.warning("No request from the primary for %d s: disconnecting.", recv_timeout)
        except (ConnectionError, OSError) as exc:
            log.warning("Connection to the primary lost: %s.", exc)
        except RemoteProtocolError as exc:
            log.error("Protocol error from the primary: %s; disconnecting.", exc)
        except HastError as exc:
            # The inconsistent mark could not be cleared (_sync_done). Kept, it refuses failover
            # to an up-to-date copy: disconnect, so that the next connection syncs and tries again.
            log.error("%s Disconnecting.", exc)
            self.channel.event("refused", reason=str(exc))  # why this copy is not serving, for hastctl list
            status = exc.exit_code
        self.channel.event("disconnect")
        self.pool.shutdown(wait=True)
        return status


def _open_hold(path: str | None) -> tuple[int, str] | None:
    """The test hook's file as (directory fd, name). The directory is opened now, before the
    worker drops privileges: user `hast` may not be able to reach it by path (a test's 0700
    temporary directories), but it can still look the name up in a directory it holds open."""
    if not path:
        return None
    directory, name = os.path.split(os.path.abspath(path))
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), name


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False


def _handshake(res: Resource, prov, md: metadata.Metadata, hs: dict, reqsock, version: int, channel: Channel):
    """Decide the sync direction (hast.md §7.2), answer the primary; None when refused.
    ProviderError if the provider's metadata cannot be written."""
    if not md.replicaid:
        # Before deciding: a copy from before the IDs (or whose ID an older hastpy dropped) must
        # not pass as "unknown" a primary that has moved on to another copy. The price: such a
        # copy is refused by a primary that still names its old ID, and is recreated (README,
        # split-brain). Durable at once, refused or not: a copy keeps one ID, which the logs of
        # every later attempt name.
        md = replace(md, replicaid=metadata.new_replica_id())
        prov.write_metadata(md)
        prov.sync()
    d = syncdecide.decide(
        secondary=syncdecide.Counters(md.resuid, md.localcnt, md.remotecnt, md.replicaid, md.peerid),
        primary=syncdecide.Counters(hs["resuid"], hs["localcnt"], hs["remotecnt"], hs.get("replicaid", 0),
                                    hs.get("peerid", 0)),  # fmt: skip
        virgin=hs.get("virgin", False),
        primary_inconsistent=hs.get("inconsistent", False),
        secondary_inconsistent=md.inconsistent,
    )
    if d.refused:
        if d.outcome == syncdecide.Outcome.SPLIT_BRAIN:
            log.error(syncdecide.SPLIT_BRAIN_LOG)
            channel.event("split-brain")
        else:
            log.error("%s", d.errmsg)
        channel.event("refused", reason=d.errmsg)  # for hastctl list here, as the primary shows it
        send_frame(reqsock, version, msg.ErrorReply(d.errmsg).to_nv())
        return None
    if d.adopt_resuid:
        md = replace(md, resuid=d.adopt_resuid)
    if d.stale_side == "secondary" and version >= msg.PROTO_VERSION_SYNCDONE:
        # Durable before the first sync write can land: from here until the primary says the
        # sync is done (msg.Request.syncdone), this disk is not a copy to fail over to.
        log.warning("Local data is older than the primary's: it is marked inconsistent until the synchronization completes.")
        md = replace(md, inconsistent=True)
    # From the first request on this copy replicates with that primary's: durable before it.
    md = replace(md, prevrole="secondary", peerid=hs.get("replicaid", 0) or md.peerid)
    mapsize = md.offset - const.METADATA_SIZE
    if d.bitmap == syncdecide.BitmapReply.NONE:
        bitmap = b""
    elif d.bitmap == syncdecide.BitmapReply.ALL_ONES:
        bitmap = b"\xff" * mapsize
        # On disk too, with the new metadata: the primary makes the merged map durable only
        # after this reply (and before its first request, at which this copy zeroes its map).
        # A primary that dies in between would otherwise come back to two clean maps and
        # counters that may say "in sync", and finish a "sync" that copies nothing.
        prov.write_bitmap(bitmap)
        prov.sync()  # before the metadata that says a sync started: never one without it
    else:
        bitmap = prov.read_bitmap(mapsize)
    prov.write_metadata(md)
    prov.sync()
    maxio = msg.negotiate_maxio(version, hs.get("maxio"), const.MAXPHYS)
    info = msg.SecondaryInfo(
        datasize=md.datasize,
        extentsize=md.extentsize,
        localcnt=md.localcnt,
        remotecnt=md.remotecnt,
        virgin=d.reply_virgin,
        syncsrc=d.syncsrc,
        mapsize=len(bitmap),
        maxio=const.MAXPHYS if version >= msg.PROTO_VERSION_MAXIO else None,
        replicaid=md.replicaid if version >= msg.PROTO_VERSION_SYNCDONE else 0,  # to hastpy peers only
    )
    nv = info.to_nv(version)
    payload = pipeline.encode_payload(bitmap, res.compression, res.checksum, nv) if bitmap else None
    send_frame(reqsock, version, nv, payload)
    log.info("Connected to the primary (syncsrc=%s).", {1: "primary", 2: "secondary"}.get(d.syncsrc, "undef"))
    return md, maxio


def run(res: Resource, spec: dict, channel: Channel) -> int:
    fds = spec["fds"]
    reqsock = socket.socket(fileno=fds["out"])
    repsock = socket.socket(fileno=fds["in"])
    # Blocking, with hastd's timeouts, whatever mode the supervisor left the descriptors in: a
    # reply (a 1 MiB READ, the handshake's bitmap) must wait for room in the socket buffer,
    # never fail half-sent with EAGAIN.
    set_timeout(reqsock, res.timeout)
    set_timeout(repsock, res.timeout)
    version = spec["version"]
    try:
        prov = open_provider(res.local)
        prov.lock()
        md = prov.read_metadata(res.name)
        done = _handshake(res, prov, md, spec["handshake"], reqsock, version, channel)
    except HastError as exc:  # the provider: opening, locking, its metadata read or written
        log.error("%s", exc)
        channel.event("refused", reason=str(exc))
        with contextlib.suppress(OSError):  # the primary may be gone: it only misses the reason
            send_frame(reqsock, version, msg.ErrorReply(str(exc)).to_nv())
        return exc.exit_code
    if done is None:
        return os.EX_CONFIG
    md, maxio = done
    channel.event("connect")
    sec = Secondary(res, prov, md, reqsock, repsock, version, maxio, channel)
    channel.serve_status(sec.status, sec.reconfigure)
    drop_privileges()
    return sec.serve()
