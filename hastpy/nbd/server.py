"""Serve one NBD export over connected sockets: the I/O half of `hastpy.nbd`.

`ExportConnection` drives a `codec.ServerConnection` over one socket. Its receive loop runs the
handshake, then turns every request into a call `backend.submit(request, done)` (or the requests
one receive brought in into one `backend.submit_many`, see BatchBackend) and goes straight back
to reading: many requests can be in flight, and each reply is sent by whichever thread calls
`done`, in completion order (NBD matches replies to requests by handle). This is the shape of
hastd's ggate_recv -> ... -> ggate_send pipeline (reference/style.md §1), and the primary worker
plugs its pipeline in as an `AsyncBackend`. Plain blocking backends (a file, a disk) are wrapped
in `BlockingAdapter`, which runs them on a few threads.

Threads and what they own:
- the receive thread (one per connection) is the only user of the codec and of socket reads;
- any thread may send a reply, and never waits for the client to read it: a reply goes out at
  once while the socket has room, and what does not fit waits, in order, for the connection's own
  sender thread (`ExportConnection._transmit`). The threads that complete requests serve every
  connection (the primary's pipeline), so one client that stops reading must not stall the rest;
- `InFlightWindow` bounds the requests (and payload bytes) a connection holds: when it is full
  the receive thread stops reading, so the client's own queue absorbs the excess and our memory
  stays bounded, which matters for a server that may be on the kernel's reclaim path
  (reference/peers.md §5.5).

`UnixServer` / `serve_unix()` listen on a unix socket and serve each connection in a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from hastpy.constants import MAX_IOV
from hastpy.errors import LocalProtocolError, RemoteProtocolError
from hastpy.nbd.codec import (
    DEFAULT_MAX_BLOCK_SIZE,
    DEFAULT_MIN_BLOCK_SIZE,
    NBD_EIO,
    NEED_DATA,
    Aborted,
    Command,
    ConnectionClosed,
    OptionReply,
    Ready,
    Request,
    RequestError,
    ServerConnection,
    encode_reply_header,
    nbd_error,
    nbd_error_from_exception,
)

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

# --- Limits, each with its reason ---------------------------------------------------------------

# The buffer for everything but WRITE payloads (handshake messages, request headers, skipped
# payloads, and small requests read ahead with their payloads): the codec's receive_limit() never
# asks for more than an option (16 KiB + header), and after a large WRITE request headers are
# received one at a time so that none of its payload bytes pass through it.
RECV_BUFFER_SIZE = 64 * 1024
# After a WRITE whose payload is at most this, the next receive takes whatever the client has
# sent, up to RECV_BUFFER_SIZE: a queue of small requests then costs one receive for several of
# them, and they reach the backend together (BatchBackend.submit_many). After a larger WRITE, only
# the next header is received, so that a large payload lands in its own buffer without a copy (a
# payload partly read ahead costs a second copy of the rest). Requests without a payload (FLUSH,
# which a filesystem sends between large writes) leave the choice as it was.
READ_AHEAD_MAX_PAYLOAD = 64 * 1024
# Requests in flight per connection. hastd keeps HAST_HIO_MAX (160) requests in its pipeline and
# we must not be a narrower pipe than it; the kernel client queues at most 128 per connection, so
# it is never throttled by us, while a misbehaving client cannot make us hold unbounded work.
MAX_IN_FLIGHT = 256
# Payload bytes (WRITE data held, READ data to return) in flight per connection. Four maximum-size
# (32 MiB) requests, or the kernel's whole queue of 128 requests at 1 MiB each: bounded memory
# with room for full-speed streaming.
MAX_IN_FLIGHT_BYTES = 128 * 1024 * 1024
# Threads BlockingAdapter runs a blocking backend on. os.pread/os.pwrite release the GIL, so a few
# threads overlap device latency; many more only add contention on a single file or disk.
DEFAULT_WORKERS = 4
# Pending connections on the listening socket: `nbd-client -C N` opens N at once.
LISTEN_BACKLOG = 16
# How long UnixServer.stop() waits for each connection thread to finish its in-flight requests.
STOP_TIMEOUT = 10.0
# Zeroes are written in chunks of this size when they cannot be punched or zero-ranged.
ZERO_CHUNK = 1024 * 1024


# --- Backend interfaces ------------------------------------------------------------------------

DoneCallback = Callable[..., None]
"""`done(error=0, data=b"")`: complete a request exactly once, from any thread. `error` is an NBD
(or host) errno value, 0 for success; `data` is a successful READ's bytes, exactly `length` long."""


@runtime_checkable
class Backend(Protocol):
    """A blocking store for the export's bytes. Methods raise OSError on failure."""

    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool) -> None: ...

    def flush(self) -> None: ...

    def trim(self, offset: int, length: int, fua: bool) -> None: ...

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None: ...


@runtime_checkable
class AsyncBackend(Protocol):
    """A store that accepts requests and completes them later, in any order, from any thread.

    `submit` must not block for long: it is called on the connection's receive thread. Requests
    arrive already validated (in range, aligned, permitted); FLUSH must cover every write whose
    reply was sent before the FLUSH arrived, and a request with `fua` must not complete before its
    data is durable (proto.md "Ordering of messages and writes").
    """

    size: int

    def submit(self, request: Request, done: DoneCallback) -> None: ...


@runtime_checkable
class BatchBackend(AsyncBackend, Protocol):
    """An AsyncBackend that also takes several requests at once, in arrival order: the requests
    one receive brought in. It may share work among them (one metadata write for all), and must
    treat each as `submit` would."""

    def submit_many(self, items: Sequence[tuple[Request, DoneCallback]]) -> None: ...


def execute(backend: Backend, request: Request) -> bytes:
    """Run one validated request against a blocking backend; return a READ's data, else b""."""
    kind = request.kind
    if kind == Command.READ:
        return backend.pread(request.offset, request.length)
    if kind == Command.WRITE:
        backend.pwrite(request.offset, request.data, request.fua)
    elif kind == Command.FLUSH:
        backend.flush()
    elif kind == Command.TRIM:
        backend.trim(request.offset, request.length, request.fua)
    elif kind == Command.WRITE_ZEROES:
        backend.write_zeroes(request.offset, request.length, request.fua, request.may_trim)
    else:
        raise LocalProtocolError(f"{kind!r} cannot be executed")
    return b""


class BlockingAdapter:
    """An AsyncBackend that runs a blocking Backend on `workers` threads (0: on the caller's).

    Requests in flight together may run in any order, which NBD allows: a client that needs an
    order waits for the reply first, and FLUSH only covers writes already replied to.
    """

    def __init__(self, backend: Backend, workers: int = DEFAULT_WORKERS) -> None:
        self.backend = backend
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="nbd-io") if workers else None

    @property
    def size(self) -> int:
        return self.backend.size

    def submit(self, request: Request, done: DoneCallback) -> None:
        if self._pool is None:
            self._run(request, done)
        else:
            self._pool.submit(self._run, request, done)

    def close(self) -> None:
        """Wait for queued requests, then stop the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _run(self, request: Request, done: DoneCallback) -> None:
        try:
            data = execute(self.backend, request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an NBD error reply
            if not isinstance(exc, OSError):
                log.exception("backend failed on %s", request.kind.name)
            done(nbd_error_from_exception(exc))
            return
        done(0, data)


# --- A file or block device as a Backend -------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


def _load_fallocate() -> Callable[..., int] | None:
    """glibc's fallocate(2) wrapper; os has no fallocate with a mode argument."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    func = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if func is None:  # pragma: no cover - every Linux libc has it
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


class FileBackend:
    """A regular file or block device, opened by path. Used by tests, benchmarks and `none` mode.

    A sparse file shorter than `size` reads as zeroes past its end and grows when written.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, size: int | None = None, read_only: bool = False
    ) -> None:
        self.read_only = read_only
        self._fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            self.size = self._device_size() if size is None else size
        except BaseException:
            os.close(self._fd)
            raise

    def _device_size(self) -> int:
        st = os.fstat(self._fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(self._fd, 0, os.SEEK_END)
        return st.st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def pread(self, offset: int, length: int) -> bytes:
        chunks = []
        got = 0
        while got < length:  # a short read is retried; only end of file ends the loop early
            chunk = os.pread(self._fd, length - got, offset + got)
            if not chunk:  # past the end of a sparse file shorter than the export: zeroes
                chunks.append(bytes(length - got))
                break
            chunks.append(chunk)
            got += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        # TRIM is a hint: where holes cannot be punched (block devices, some filesystems) it is
        # simply not done, which the spec allows.
        if self._fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) and fua:
            os.fdatasync(self._fd)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE if may_trim else _FALLOC_FL_ZERO_RANGE
        if not self._fallocate(mode, offset, length):
            zeroes = bytes(min(length, ZERO_CHUNK))
            for start in range(offset, offset + length, ZERO_CHUNK):
                self.pwrite(start, zeroes[: min(ZERO_CHUNK, offset + length - start)], fua=False)
        if fua:
            os.fdatasync(self._fd)

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        """True if fallocate did it; False if the file or kernel does not support the mode."""
        if _fallocate is None:  # pragma: no cover
            return False
        if _fallocate(self._fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err))


# --- The per-connection machinery --------------------------------------------------------------


@dataclass(frozen=True)
class ExportConfig:
    """How the export is presented to clients (the codec's constructor arguments, minus size)."""

    name: str = ""
    read_only: bool = False
    multi_conn: bool = False
    min_block_size: int = DEFAULT_MIN_BLOCK_SIZE
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE
    description: str = ""


class InFlightWindow:
    """Counts the requests and payload bytes a connection holds, and blocks admission when full.

    A request is always admitted into an empty window, whatever its size, so one maximum-size
    request can never deadlock a small byte budget.
    """

    def __init__(self, max_requests: int = MAX_IN_FLIGHT, max_bytes: int = MAX_IN_FLIGHT_BYTES) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        # _lock guards requests, bytes and _waiters. _cond, on the same lock, is waited on and
        # notified only while someone waits: admitting and releasing a request (each request
        # does both) take the plain lock and call no Condition method (each is Python code).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiters = 0

    def acquire(self, nbytes: int) -> None:
        with self._lock:
            if not self._fits(nbytes):
                self._wait_for(lambda: self._fits(nbytes))
            self.requests += 1
            self.bytes += nbytes

    def try_acquire(self, nbytes: int) -> bool:
        """acquire() if the request fits now; False, and nothing taken, if it would wait."""
        with self._lock:
            if not self._fits(nbytes):
                return False
            self.requests += 1
            self.bytes += nbytes
            return True

    def release(self, nbytes: int, requests: int = 1) -> None:
        """Free `requests` slots holding `nbytes` payload bytes between them."""
        with self._lock:
            self.requests -= requests
            self.bytes -= nbytes
            if self._waiters:
                self._cond.notify_all()

    def wait_empty(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._wait_for(lambda: self.requests == 0, timeout)

    def _wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        # Under _lock.
        self._waiters += 1
        try:
            return self._cond.wait_for(predicate, timeout)
        finally:
            self._waiters -= 1

    def _fits(self, nbytes: int) -> bool:
        if self.requests == 0:
            return True
        return self.requests < self.max_requests and self.bytes + nbytes <= self.max_bytes


def next_read_ahead(current: int, request: Request) -> int:
    """How much to read ahead after `request` (see READ_AHEAD_MAX_PAYLOAD)."""
    if request.kind != Command.WRITE:
        return current
    return RECV_BUFFER_SIZE if request.length <= READ_AHEAD_MAX_PAYLOAD else 0


def sendall_vectored(sock: socket.socket, buffers: Sequence[Buffer]) -> None:
    """Send every buffer in order with sendmsg, without joining them into one big copy."""
    _send_views(sock, [memoryview(b).cast("B") for b in buffers if len(b)], 0)


def _send_views(sock: socket.socket, views: list[memoryview], flags: int) -> int:
    """sendmsg `views` in order, MAX_IOV at a time, consuming them; with MSG_DONTWAIT, stop
    where the socket is full, leaving in `views` what is left, the first view cut where the
    socket filled. Returns the bytes sent."""
    total = 0
    while views:
        try:
            sent = sock.sendmsg(views[:MAX_IOV], (), flags)
        except BlockingIOError:
            if not flags & socket.MSG_DONTWAIT:
                raise
            break
        total += sent
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]
    return total


_held = threading.local()  # .replies: {connection: [(buffers, cost)]} of a thread holding replies


def hold_replies() -> None:
    """Replies completed on this thread from now on wait for send_held_replies(), which sends
    each connection's in one call. For a thread that completes requests in runs (the primary's
    reply thread, which receives the secondary's replies several at a time): one send and one
    wake-up of the client per run instead of per request. The thread must call
    send_held_replies() before it waits for anything; each request keeps its window slot until
    its reply is sent."""
    _held.replies = {}


def send_held_replies() -> None:
    """Send the replies this thread holds (see hold_replies); nothing if it holds none."""
    replies = getattr(_held, "replies", None)
    if not replies:
        return
    _held.replies = {}
    for conn, items in replies.items():
        conn._send_replies(items)  # noqa: SLF001 - our own helper


class _Completion:
    """The `done` callback for one request: sends its reply (or holds it, see hold_replies),
    then frees its window slot."""

    __slots__ = ("_conn", "_request", "_cost", "_once")

    def __init__(self, conn: ExportConnection, request: Request, cost: int) -> None:
        self._conn = conn
        self._request = request
        self._cost = cost
        self._once = threading.Lock()  # held forever once the request has completed

    def __call__(self, error: int = 0, data: Buffer | None = b"") -> None:
        if not self._once.acquire(blocking=False):
            raise LocalProtocolError(f"request {self._request.handle:#x} completed twice")
        self._conn._reply(self._request, error, data, self._cost)  # noqa: SLF001 - our own helper

    @property
    def completed(self) -> bool:
        return self._once.locked()


class ExportConnection:
    """Serves one connected socket: handshake, then requests, until DISC, EOF, a protocol error
    or stop(). Every request admitted is completed (and its reply attempted) before run()
    returns, so the backend is never still working for a connection that is gone."""

    def __init__(
        self,
        sock: socket.socket,
        backend: Backend | AsyncBackend,
        config: ExportConfig = ExportConfig(),
        *,
        workers: int = DEFAULT_WORKERS,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_in_flight_bytes: int = MAX_IN_FLIGHT_BYTES,
    ) -> None:
        self._sock = sock
        self._config = config
        if isinstance(backend, AsyncBackend):
            self._backend: AsyncBackend = backend
            self._adapter: BlockingAdapter | None = None
        else:
            self._adapter = BlockingAdapter(backend, workers)
            self._backend = self._adapter
        self._batch = isinstance(self._backend, BatchBackend)
        self._window = InFlightWindow(max_in_flight, max_in_flight_bytes)
        # Guards the socket's send side and everything below it. Bytes reach the socket in the
        # order they were queued: directly while nothing waits in _backlog and the sender thread
        # is not sending, else appended to _backlog for the sender thread.
        self._send_cond = threading.Condition()
        self._broken = False  # a send failed: later replies are dropped
        self._backlog: list[memoryview] = []  # bytes that did not fit the socket, in order
        # The window slots freed once _backlog is sent: requests, and the bytes they hold.
        self._backlog_requests = 0
        self._backlog_held = 0
        self._sending = False  # the sender thread is sending a batch taken from _backlog
        self._sender: threading.Thread | None = None  # started when the socket first fills
        self._closing = False  # set by _finish(): the sender thread exits once idle
        self._queued = 0  # bytes ever handed to _transmit (a position in the stream)
        self._sent = 0  # of those, bytes on the wire
        self.export_name: str | None = None  # set once the client has entered transmission

    def run(self) -> None:
        try:
            self._serve()
        except RemoteProtocolError as exc:
            log.warning("nbd: closing connection: %s", exc)
        except OSError as exc:
            log.info("nbd: connection lost: %s", exc)
        finally:
            self._finish()

    def stop(self) -> None:
        """Ask run() to finish, from any thread: reads see EOF and in-flight replies are dropped."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    # -- the receive loop --

    def _serve(self) -> None:
        codec = ServerConnection(
            self._config.name,
            self._backend.size,
            read_only=self._config.read_only,
            multi_conn=self._config.multi_conn,
            min_block_size=self._config.min_block_size,
            max_block_size=self._config.max_block_size,
            description=self._config.description,
        )
        self._send([codec.greeting()])
        view = memoryview(bytearray(RECV_BUFFER_SIZE))
        read_ahead = 0
        batch: list[Request] = []  # requests decoded from what is already received
        while True:
            event = codec.next_event()
            if type(event) is Request and event.kind != Command.DISC:
                batch.append(event)
                read_ahead = next_read_ahead(read_ahead, event)
                continue
            if batch:  # before waiting for more bytes, or acting on anything else
                self._dispatch(batch)
                batch = []
            if event is NEED_DATA:
                self._receive(codec, view, read_ahead)
            elif type(event) is Request:  # DISC
                return
            elif isinstance(event, RequestError):
                log.debug("nbd: refusing request %#x: %s", event.handle, event.reason)
                self._send([encode_reply_header(event.handle, event.error)])
            elif isinstance(event, (OptionReply, Ready)):
                self._send([event.data])
                if isinstance(event, Ready):
                    self.export_name = event.export_name
            elif isinstance(event, Aborted):
                with contextlib.suppress(OSError):  # the client may not wait for the ack
                    self._send([event.data])
                return
            else:
                assert isinstance(event, ConnectionClosed)
                return

    def _receive(self, codec: ServerConnection, view: memoryview, read_ahead: int) -> None:
        """Receive what the codec needs next. A WRITE payload is received straight into a
        `bytes` of its own (allocated by recv, not zero-filled; MSG_WAITALL: the whole payload in
        one call, with the GIL released) that becomes the request's data without another copy.
        Memory stays bounded as before: a payload lives as long as its request, so at most the
        window's requests plus the one being received (<= max_block_size, checked by the codec
        before anything is allocated) hold payload bytes. Everything else goes through `view`,
        at most what the codec says it can use, with `read_ahead` (see READ_AHEAD_MAX_PAYLOAD)."""
        wanted = codec.payload_wanted()
        if wanted:
            data = self._sock.recv(wanted, socket.MSG_WAITALL)
            if data:
                codec.receive_payload(data)
            else:
                codec.receive_data(b"")  # EOF in the middle of a payload: the codec reports it
            return
        n = self._sock.recv_into(view, min(codec.receive_limit(read_ahead), len(view)))
        codec.receive_data(view[:n])

    def _dispatch(self, batch: list[Request]) -> None:
        """Hand requests to the backend; blocks while the window is full (backpressure). The
        requests admitted so far are submitted before waiting: they may be what frees the
        window."""
        admitted: list[tuple[Request, _Completion]] = []
        for request in batch:
            cost = request.reply_size
            if not self._window.try_acquire(cost):
                self._submit(admitted)
                admitted = []
                self._window.acquire(cost)
            admitted.append((request, _Completion(self, request, cost)))
        self._submit(admitted)

    def _submit(self, items: list[tuple[Request, _Completion]]) -> None:
        """Hand requests to the backend, all at once if it takes batches. A request the backend
        raised on (and did not complete) fails with EIO."""
        if not items:  # _dispatch found the window full before admitting anything
            return
        batches = (items,) if self._batch or len(items) == 1 else [[item] for item in items]
        for batch in batches:
            try:
                if len(batch) > 1:
                    self._backend.submit_many(batch)  # type: ignore[attr-defined]
                else:
                    self._backend.submit(*batch[0])
            except Exception:  # noqa: BLE001 - a backend bug must not kill the connection silently
                log.exception("nbd: backend refused %s", ", ".join(r.kind.name for r, _ in batch))
                for _, done in batch:
                    if not done.completed:
                        done(NBD_EIO)

    def _finish(self) -> None:
        """NBD_CMD_DISC and a clean shutdown both require finishing what is in flight first."""
        self._window.wait_empty()  # every reply with a window slot is sent, or dropped
        with self._send_cond:
            self._closing = True
            self._send_cond.notify_all()
            sender = self._sender
        if sender is not None:
            sender.join()
        if self._adapter is not None:
            self._adapter.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    # -- sending, from any thread --

    def _send(self, buffers: Sequence[Buffer]) -> None:
        """Send from the receive thread (handshake replies, refusals) and return once the bytes
        are on the wire, so that a client that does not read holds up only its own connection.
        Raises OSError if the connection broke first."""
        mark = self._transmit(buffers)
        with self._send_cond:
            self._send_cond.wait_for(lambda: self._sent >= mark or self._broken)
            if mark < 0 or self._sent < mark:
                raise BrokenPipeError("nbd: connection lost while sending")

    def _transmit(self, buffers: Sequence[Buffer], held: int = 0, requests: int = 0) -> int:
        """Queue `buffers` for the socket, as one contiguous run, without ever waiting for the
        client: what the socket takes now is sent now, the rest is left to the sender thread.
        The window slots of `requests` requests, holding `held` bytes, are freed once all of it
        is on the wire (or dropped with the connection). Returns the stream position just after
        these bytes."""
        views = []
        nbytes = 0
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            if view:
                views.append(view)
                nbytes += len(view)
        with self._send_cond:
            if self._broken:
                mark = -1
            else:
                self._queued += nbytes
                mark = self._queued
                if not self._backlog and not self._sending:
                    try:
                        sent = _send_views(self._sock, views, socket.MSG_DONTWAIT)
                    except OSError as exc:
                        self._break(exc, nbytes)
                    else:
                        self._sent += sent
                        if views:  # the socket is full: the rest goes to the sender thread
                            self._queue_backlog(views, held, requests)
                            requests = 0
                else:
                    self._queue_backlog(views, held, requests)
                    requests = 0
        if requests:  # sent, or dropped with a broken connection
            self._window.release(held, requests)
        return mark

    def _queue_backlog(self, views: list[memoryview], held: int, requests: int) -> None:
        """(Under _send_cond.) Leave `views` to the sender thread, which frees the window slots
        of `requests` requests holding `held` bytes."""
        self._backlog += views
        self._backlog_held += held
        self._backlog_requests += requests
        if self._sender is None:
            self._sender = threading.Thread(target=self._sender_loop, name="nbd sender", daemon=True)
            self._sender.start()
        self._send_cond.notify_all()

    def _sender_loop(self) -> None:
        """The one thread that may block on this socket: sends _backlog in order until the
        connection finishes. A client that does not read blocks it (and, through the window
        slots it holds, this connection's receive thread), and no other thread."""
        while self._send_backlog():
            pass

    def _send_backlog(self) -> bool:
        """Send what _backlog holds now, once there is some; False once the connection is
        finishing and nothing is left. A function of its own so that nothing of a batch (its
        payloads, a failed send's exception and traceback) outlives it while the thread waits."""
        with self._send_cond:
            self._send_cond.wait_for(lambda: self._backlog or self._closing)
            if not self._backlog:
                return False
            views, held, requests = self._backlog, self._backlog_held, self._backlog_requests
            self._backlog, self._backlog_held, self._backlog_requests = [], 0, 0
            self._sending = True
        nbytes = sum(len(v) for v in views)
        try:
            sendall_vectored(self._sock, views)
            failure = None
        except OSError as exc:
            failure = str(exc)
        with self._send_cond:
            self._sending = False
            if failure is None:
                self._sent += nbytes
                self._send_cond.notify_all()
            else:
                self._break(failure, nbytes)
                held += self._backlog_held  # dropped with the connection
                requests += self._backlog_requests
                self._backlog, self._backlog_held, self._backlog_requests = [], 0, 0
        if requests:
            self._window.release(held, requests)
        return True

    def _break(self, why: OSError | str, nbytes: int) -> None:
        """(Under _send_cond.) The client is gone: drop later replies, wake whoever waits for
        a send, and make the receive loop see EOF."""
        log.info("nbd: %d bytes of replies not sent: %s", nbytes, why)
        self._broken = True
        self._send_cond.notify_all()
        self.stop()

    def _reply(self, request: Request, error: int, data: Buffer | None, cost: int) -> None:
        """Send a request's reply, or hold it for send_held_replies(); then (once sent) free
        its window slot."""
        if not error and request.kind != Command.READ:  # most replies: a bare success header
            buffers: list[Buffer] = [encode_reply_header(request.handle)]
        else:
            try:
                buffers = self._reply_buffers(request, error, data)
            except BaseException:
                self._window.release(cost)
                raise
        held = getattr(_held, "replies", None)
        if held is not None:
            held.setdefault(self, []).append((buffers, cost))
        else:
            self._send_replies([(buffers, cost)])

    def _reply_buffers(self, request: Request, error: int, data: Buffer | None) -> list[Buffer]:
        error = nbd_error(error) if error else 0
        if request.kind != Command.READ or error:
            data = b""
        elif data is None or len(data) != request.length:
            # Sending a wrong-length payload would desynchronise the stream; report EIO instead.
            got = 0 if data is None else len(data)
            log.error("nbd: backend returned %d bytes for a %d-byte read", got, request.length)
            error, data = NBD_EIO, b""
        header = encode_reply_header(request.handle, error)
        return [header, data] if data else [header]

    def _send_replies(self, items: list[tuple[list[Buffer], int]]) -> None:
        """Send replies (their buffers, and window cost) as one run; free their slots once sent."""
        if len(items) == 1:
            self._transmit(items[0][0], items[0][1], 1)
        else:
            self._transmit([b for buffers, _ in items for b in buffers], sum(cost for _, cost in items), len(items))


def serve_connection(
    sock: socket.socket,
    backend: Backend | AsyncBackend,
    config: ExportConfig = ExportConfig(),
    **options: int,
) -> None:
    """Serve one connected socket until the client leaves; closes the socket."""
    ExportConnection(sock, backend, config, **options).run()


# --- Listening on a unix socket ----------------------------------------------------------------


class UnixServer:
    """Listens on a unix socket and serves each connection on its own thread.

    `backend_factory()` is called once per connection; the server never closes what it returns
    (a shared backend is the normal case). Use as a context manager, or start()/stop().
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        backend_factory: Callable[[], Backend | AsyncBackend],
        config: ExportConfig = ExportConfig(),
        *,
        mode: int = 0o600,
        workers: int = DEFAULT_WORKERS,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_in_flight_bytes: int = MAX_IN_FLIGHT_BYTES,
    ) -> None:
        self.path = os.fspath(path)
        self._factory = backend_factory
        self._config = config
        self._mode = mode
        self._options = {
            "workers": workers,
            "max_in_flight": max_in_flight,
            "max_in_flight_bytes": max_in_flight_bytes,
        }
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _connections and _threads
        self._connections: set[ExportConnection] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = False

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def start(self) -> UnixServer:
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            os.chmod(self.path, self._mode)  # no authentication in NBD: the mode is the guard
            listener.listen(LISTEN_BACKLOG)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"nbd-accept {self.path}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop accepting, disconnect every client, wait for their threads, remove the socket."""
        with self._lock:
            self._stopping = True
            connections = list(self._connections)
        self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        for conn in connections:
            conn.stop()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("nbd: %s did not finish within %.0f s", thread.name, timeout)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> UnixServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _remove_stale_socket(self) -> None:
        """A socket left by a dead server is replaced; any other file is an error, not ours."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.path} exists and is not a socket")
        os.unlink(self.path)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        with self._listener:
            while True:
                readable, _, _ = select.select([self._listener, self._wake_r], [], [])
                if self._wake_r in readable:
                    return
                try:
                    sock, _ = self._listener.accept()
                except OSError as exc:  # pragma: no cover - e.g. EMFILE; keep serving others
                    log.warning("nbd: accept failed: %s", exc)
                    continue
                self._start_connection(sock)

    def _start_connection(self, sock: socket.socket) -> None:
        thread = threading.Thread(
            target=self._serve_one, args=(sock,), name=f"nbd {self.path}", daemon=True
        )
        with self._lock:
            if self._stopping:
                sock.close()
                return
            self._threads.add(thread)
        thread.start()

    def _serve_one(self, sock: socket.socket) -> None:
        try:
            conn = ExportConnection(sock, self._factory(), self._config, **self._options)
        except Exception:  # noqa: BLE001 - one bad connection must not stop the listener
            log.exception("nbd: cannot serve a new connection")
            sock.close()
            with self._lock:
                self._threads.discard(threading.current_thread())
            return
        with self._lock:
            stopping = self._stopping
            self._connections.add(conn)
        if stopping:  # stop() took its snapshot before we registered: stop ourselves
            conn.stop()
        try:
            conn.run()
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())


def serve_unix(
    path: str | os.PathLike[str],
    backend_factory: Callable[[], Backend | AsyncBackend],
    config: ExportConfig = ExportConfig(),
    **options: int,
) -> UnixServer:
    """Start serving `path`; returns the running server (call stop(), or use it as a context)."""
    return UnixServer(path, backend_factory, config, **options).start()
