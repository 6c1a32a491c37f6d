"""The NBD export over a real unix socket: our client, backends, and real clients (libnbd, qemu)."""

import errno
import gc
import hashlib
import json
import logging
import os
import queue
import random
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
import weakref

import pytest

from hastpy.errors import LocalProtocolError, RemoteProtocolError
from hastpy.nbd import Command, ExportConfig, FileBackend, Request, serve_unix
from hastpy.nbd.client import NBDClient, OptionRefused
from hastpy.nbd.server import (
    READ_AHEAD_MAX_PAYLOAD,
    RECV_BUFFER_SIZE,
    InFlightWindow,
    UnixServer,
    hold_replies,
    next_read_ahead,
    send_held_replies,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SIZE = 64 * MiB
TIMEOUT = 10  # seconds any single client operation may take before the test fails


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)  # sparse
    return path


@pytest.fixture
def backend(disk):
    with FileBackend(disk) as fb:
        yield fb


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "nbd.sock")


@pytest.fixture
def server(sock_path, backend):
    with serve_unix(sock_path, lambda: backend, ExportConfig(name="data")) as srv:
        yield srv


def connect(path, name="data"):
    return NBDClient.connect_unix(path, name, timeout=TIMEOUT)


def uri(path, name=""):
    return f"nbd+unix:///{name}?socket={path}"


def wait_until(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --- our client against a file -------------------------------------------------------------------


def test_random_writes_read_back(server, sock_path, disk):
    rng = random.Random(1)
    with connect(sock_path) as client:
        assert client.size == SIZE
        assert client.block_sizes == (512, 4096, 32 * MiB)
        for _ in range(50):
            length = rng.randrange(1, 257) * 512
            offset = rng.randrange(0, (SIZE - length) // 512) * 512
            data = rng.randbytes(length)
            client.pwrite(offset, data, fua=rng.random() < 0.2)
            assert client.pread(offset, length) == data
        client.flush()
    with open(disk, "rb") as f:  # later writes may overlap earlier ones: check the last one
        f.seek(offset)
        assert f.read(length) == data


def test_largest_block_round_trips(server, sock_path):
    data = os.urandom(32 * MiB)
    with connect(sock_path) as client:
        client.pwrite(0, data)
        assert client.pread(0, 32 * MiB) == data


def test_pipelined_requests(server, sock_path):
    blocks = {i: os.urandom(64 * 1024) for i in range(128)}
    with connect(sock_path) as client:
        handles = [client.submit(Command.WRITE, i * 64 * 1024, data=d) for i, d in blocks.items()]
        assert client.in_flight == 128
        assert all(client.reply(h).error == 0 for h in handles)
        reads = {client.submit(Command.READ, i * 64 * 1024, 64 * 1024): i for i in blocks}
        for handle, i in reads.items():
            assert client.reply(handle).check() == blocks[i]


def test_trim_and_write_zeroes(server, sock_path, disk):
    with connect(sock_path) as client:
        client.pwrite(0, b"\xff" * 4 * MiB)
        client.flush()
        allocated = os.stat(disk).st_blocks
        client.trim(0, 2 * MiB, fua=True)
        assert os.stat(disk).st_blocks < allocated  # a punched hole
        client.write_zeroes(2 * MiB, MiB, may_trim=False)
        client.write_zeroes(3 * MiB, MiB, fua=True)
        assert client.pread(2 * MiB, 2 * MiB) == bytes(2 * MiB)


def test_refused_requests_keep_the_connection(server, sock_path):
    with connect(sock_path) as client:
        with pytest.raises(OSError) as unaligned:
            client.pread(1, 512)
        assert unaligned.value.errno == errno.EINVAL
        with pytest.raises(OSError) as past_end:
            client.pwrite(SIZE, b"x" * 512)
        assert past_end.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as unknown:
            client.reply(client.submit(Command.CACHE, 0, 512)).check()
        assert unknown.value.errno == errno.EINVAL
        client.pwrite(0, b"y" * 512)
        assert client.pread(0, 512) == b"y" * 512


def test_unknown_export_is_refused(server, sock_path):
    with pytest.raises(OptionRefused) as refused:
        connect(sock_path, "nope")
    assert refused.value.reply_type == 0x80000006


def test_default_export_name(server, sock_path):
    with connect(sock_path, "") as client:
        assert client.size == SIZE


def test_read_only_export(sock_path, backend):
    with serve_unix(sock_path, lambda: backend, ExportConfig(read_only=True)):
        with connect(sock_path, "") as client:
            assert client.read_only
            with pytest.raises(OSError) as refused:
                client.pwrite(0, b"x" * 512)
            assert refused.value.errno == errno.EPERM
            assert client.pread(0, 512) == bytes(512)


def test_sparse_file_shorter_than_export_reads_zeroes(tmp_path, sock_path):
    path = tmp_path / "short.img"
    path.write_bytes(b"z" * 1000)
    with FileBackend(path, size=MiB) as fb, serve_unix(sock_path, lambda: fb):
        with connect(sock_path, "") as client:
            assert client.pread(0, 2048) == b"z" * 1000 + bytes(1048)


def test_bad_magic_closes_only_that_connection(server, sock_path):
    with connect(sock_path) as good:
        bad = connect(sock_path)
        bad._sock.sendall(b"\xde\xad\xbe\xef" + bytes(24))
        assert bad._sock.recv(1) == b""  # the server hung up
        bad.close()
        assert good.pread(0, 512) == bytes(512)


def test_client_that_leaves_mid_request(server, sock_path):
    client = connect(sock_path)
    client._sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 4096) + b"partial")
    client.close()
    wait_until(lambda: server.connection_count == 0)


# --- the asynchronous backend interface -----------------------------------------------------------


class HeldBackend:
    """An AsyncBackend that parks requests until the test completes them."""

    size = SIZE

    def __init__(self):
        self.held: list[tuple[Request, object]] = []
        self.cond = threading.Condition()

    def submit(self, request, done):
        with self.cond:
            self.held.append((request, done))
            self.cond.notify_all()

    def wait_for(self, n):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.held) >= n, TIMEOUT)

    def complete(self, index, error=0, data=b"default"):
        with self.cond:
            request, done = self.held.pop(index)
        if data == b"default":
            is_read = request.kind == Command.READ
            data = bytes([request.handle % 256]) * request.length if is_read else b""
        done(error, data)


def test_replies_go_out_in_completion_order(sock_path):
    held = HeldBackend()
    with serve_unix(sock_path, lambda: held), connect(sock_path, "") as client:
        handles = [client.submit(Command.READ, i * 512, 512) for i in range(3)]
        held.wait_for(3)
        for _ in range(3):
            held.complete(-1)  # newest first
        replies = [client.next_reply() for _ in range(3)]
        assert [r.handle for r in replies] == handles[::-1]
        assert all(r.data == bytes([r.handle]) * 512 for r in replies)


def test_backpressure_bounds_requests_in_flight(sock_path):
    held = HeldBackend()
    with serve_unix(sock_path, lambda: held, max_in_flight=4), connect(sock_path, "") as client:
        handles = [client.submit(Command.FLUSH) for _ in range(10)]
        held.wait_for(4)
        time.sleep(0.2)
        assert len(held.held) == 4  # the receive loop is blocked, not queueing
        for _ in range(10):
            held.wait_for(1)
            held.complete(0)
        assert all(client.reply(h).error == 0 for h in handles)


def test_in_flight_window_counts_bytes():
    window = InFlightWindow(max_requests=10, max_bytes=1000)
    window.acquire(5000)  # an empty window admits any single request
    admitted = threading.Event()
    threading.Thread(target=lambda: (window.acquire(1), admitted.set()), daemon=True).start()
    assert not admitted.wait(0.1)
    window.release(5000)
    assert admitted.wait(TIMEOUT)
    window.release(1)
    assert window.wait_empty(0)


def test_disc_waits_for_requests_in_flight(sock_path):
    held = HeldBackend()
    with serve_unix(sock_path, lambda: held) as srv:
        client = connect(sock_path, "")
        handle = client.submit(Command.WRITE, 0, data=b"w" * 512)
        client.submit(Command.DISC)
        held.wait_for(1)
        time.sleep(0.1)
        assert srv.connection_count == 1  # still finishing the write
        held.complete(0)
        assert client.reply(handle).error == 0
        assert client._sock.recv(1) == b""
        client.close()


@pytest.mark.parametrize(
    "error,data,expected",
    [
        (errno.ENOSPC, b"", errno.ENOSPC),
        (errno.ENOENT, b"", errno.EIO),  # not an NBD error: mapped
        (0, b"short", errno.EIO),  # a READ reply of the wrong length is never sent
        (0, None, errno.EIO),
    ],
)
def test_backend_errors_become_nbd_errors(sock_path, error, data, expected):
    held = HeldBackend()
    with serve_unix(sock_path, lambda: held), connect(sock_path, "") as client:
        handle = client.submit(Command.READ, 0, 512)
        held.wait_for(1)
        held.complete(0, error, data)
        assert client.reply(handle).error == expected


def test_blocking_backend_exceptions(sock_path):
    class Broken:
        size = SIZE

        def pread(self, offset, length):
            raise ValueError("bug")

        def flush(self):
            raise OSError(errno.EROFS, "read-only file system")

    with serve_unix(sock_path, Broken, workers=0), connect(sock_path, "") as client:
        assert client.reply(client.submit(Command.READ, 0, 512)).error == errno.EIO
        assert client.reply(client.submit(Command.FLUSH)).error == errno.EPERM


def test_completing_twice_is_a_bug(sock_path):
    held = HeldBackend()
    with serve_unix(sock_path, lambda: held), connect(sock_path, "") as client:
        client.submit(Command.FLUSH)
        held.wait_for(1)
        request, done = held.held[0]
        done(0)
        with pytest.raises(LocalProtocolError, match="completed twice"):
            done(0)


# --- the listener ----------------------------------------------------------------------------------


def test_stop_disconnects_clients_and_removes_the_socket(sock_path, backend):
    srv = UnixServer(sock_path, lambda: backend).start()
    client = connect(sock_path, "")
    wait_until(lambda: srv.connection_count == 1)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 5
    assert not os.path.exists(sock_path)
    with pytest.raises((RemoteProtocolError, OSError)):
        client.pread(0, 512)
    client.close()


def test_stale_socket_is_replaced_other_files_are_not(sock_path, backend):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()
    with serve_unix(sock_path, lambda: backend), connect(sock_path, "") as client:
        assert client.size == SIZE
    with open(sock_path, "w") as f:
        f.write("not a socket")
    with pytest.raises(FileExistsError):
        serve_unix(sock_path, lambda: backend)


def test_socket_mode(sock_path, backend):
    with serve_unix(sock_path, lambda: backend, mode=0o660):
        assert os.stat(sock_path).st_mode & 0o777 == 0o660


def test_many_clients_at_once(server, sock_path):
    def worker(i):
        with connect(sock_path) as client:
            data = bytes([i]) * 4096
            client.pwrite(i * 4096, data)
            assert client.pread(i * 4096, 4096) == data

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    wait_until(lambda: server.connection_count == 0)


# --- real clients ------------------------------------------------------------------------------------


def need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def run(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_nbdinfo_json(server, sock_path):
    need("nbdinfo")
    info = json.loads(run("nbdinfo", "--json", uri(sock_path)))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is False
    (export,) = info["exports"]
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is False
    assert export["can_flush"] and export["can_fua"] and export["can_trim"] and export["can_zero"]
    assert export["can_multi_conn"] is False
    assert (export["block_size_minimum"], export["block_size_preferred"]) == (512, 4096)
    assert export["block_size_maximum"] == 32 * MiB


def test_nbdinfo_read_only_and_multi_conn(sock_path, backend):
    need("nbdinfo")
    config = ExportConfig(name="data", read_only=True, multi_conn=True)
    with serve_unix(sock_path, lambda: backend, config):
        (export,) = json.loads(run("nbdinfo", "--json", uri(sock_path, "data")))["exports"]
    assert export["is_read_only"] is True
    assert export["can_multi_conn"] is True


def test_nbdinfo_list(server, sock_path):
    need("nbdinfo")
    assert 'export="data"' in run("nbdinfo", "--list", uri(sock_path))


def test_nbdcopy_round_trip(server, sock_path, tmp_path, disk):
    need("nbdcopy")
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    src.write_bytes(os.urandom(SIZE))
    run("nbdcopy", str(src), uri(sock_path))
    run("nbdcopy", uri(sock_path), str(out))
    assert sha256(src) == sha256(out) == sha256(disk)


def test_qemu_img_convert_and_compare(server, sock_path, tmp_path):
    need("qemu-img")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB) + bytes(SIZE - 8 * MiB))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(sock_path))
    info = json.loads(run("qemu-img", "info", "--output=json", uri(sock_path)))
    assert info["virtual-size"] == SIZE
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri(sock_path))


# --- failure paths ---------------------------------------------------------------------------------


class BatchRecorder(HeldBackend):
    """A BatchBackend that records how requests arrived; the first submit waits for `go`, so
    that what the client sends meanwhile piles up in the socket."""

    def __init__(self):
        super().__init__()
        self.calls: list[list[int]] = []  # handles per call, in call order
        self.go = threading.Event()

    def submit(self, request, done):
        if not self.calls:
            self.calls.append([request.handle])
            assert self.go.wait(TIMEOUT)
        else:
            self.calls.append([request.handle])
        super().submit(request, done)

    def submit_many(self, items):
        self.calls.append([r.handle for r, _ in items])
        for item in items:
            super().submit(*item)


def test_small_requests_received_together_reach_the_backend_together(sock_path):
    rec = BatchRecorder()
    with serve_unix(sock_path, lambda: rec), connect(sock_path, "") as client:
        first = client.submit(Command.WRITE, 0, data=os.urandom(4096))
        rec.wait_for(0)
        wait_until(lambda: rec.calls)
        handles = [client.submit(Command.WRITE, (i + 1) * 4096, data=os.urandom(4096)) for i in range(10)]
        handles.append(client.submit(Command.FLUSH))
        time.sleep(0.2)  # all of it is in the socket before the receive loop reads again
        rec.go.set()
        rec.wait_for(12)
        assert rec.calls == [[first], handles]  # one receive, one call, in arrival order
        for _ in range(12):
            rec.complete(0)
        assert all(client.reply(h).error == 0 for h in [first, *handles])


class RecordingSocket:
    """A socket whose receives are logged as (call, bytes asked for)."""

    def __init__(self, sock):
        self._sock = sock
        self.log: list[tuple[str, int]] = []

    def recv_into(self, buffer, nbytes=0, flags=0):
        self.log.append(("recv_into", nbytes))
        return self._sock.recv_into(buffer, nbytes, flags)

    def recv(self, bufsize, flags=0):
        self.log.append(("recv", bufsize))
        return self._sock.recv(bufsize, flags)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_large_writes_are_not_read_ahead(backend):
    """After a WRITE above READ_AHEAD_MAX_PAYLOAD the server receives one header at a time, so
    that the next large payload lands in its own buffer; a FLUSH between large writes (as
    filesystems send) does not turn read-ahead back on."""
    from hastpy.nbd.server import serve_connection

    ours, theirs = socket.socketpair()
    recording = RecordingSocket(ours)
    thread = threading.Thread(target=serve_connection, args=(recording, backend), kwargs={"workers": 1})
    thread.start()
    client = NBDClient(theirs)
    big = 256 * 1024
    handles = [client.submit(Command.WRITE, 0, data=b"s" * 4096)]  # small: read-ahead on
    for i in range(3):
        handles.append(client.submit(Command.WRITE, (i + 1) * big, data=os.urandom(big)))
        handles.append(client.submit(Command.FLUSH))
    assert all(client.reply(h).error == 0 for h in handles)
    client.disconnect()
    thread.join(TIMEOUT)
    first_payload = next(i for i, (call, n) in enumerate(recording.log) if call == "recv" and n > READ_AHEAD_MAX_PAYLOAD)
    after = [n for call, n in recording.log[first_payload + 1 :] if call == "recv_into"]
    assert after and max(after) <= 28  # request headers only, FLUSH or not
    assert any(call == "recv_into" and n == RECV_BUFFER_SIZE for call, n in recording.log[:first_payload])


def test_a_full_window_splits_a_batch_without_deadlock(sock_path):
    """Ten requests arrive together into a window of four, one of them already taken: the
    admitted ones are submitted before the receive loop waits for room. (The first is a small
    WRITE: after it the server reads ahead.)"""
    rec = BatchRecorder()
    with serve_unix(sock_path, lambda: rec, max_in_flight=4), connect(sock_path, "") as client:
        handles = [client.submit(Command.WRITE, 0, data=b"w" * 512)]
        wait_until(lambda: rec.calls)
        handles += [client.submit(Command.FLUSH) for _ in range(9)]
        time.sleep(0.2)
        rec.go.set()
        rec.wait_for(4)
        time.sleep(0.1)
        assert len(rec.held) == 4
        assert rec.calls[:2] == [handles[:1], handles[1:4]]
        for _ in range(10):
            rec.wait_for(1)
            rec.complete(0)
        assert all(client.reply(h).error == 0 for h in handles)
        assert sum(len(c) for c in rec.calls) == 10


def test_a_batch_that_finds_the_window_full_waits_quietly(sock_path, caplog):
    """Requests that arrive while the window is already full wait for room; the backend is
    handed nothing meanwhile (an empty batch), and nothing is logged."""
    caplog.set_level(logging.WARNING)
    rec = BatchRecorder()
    rec.go.set()
    with serve_unix(sock_path, lambda: rec, max_in_flight=2), connect(sock_path, "") as client:
        handles = [client.submit(Command.FLUSH) for _ in range(2)]
        rec.wait_for(2)  # the window is full
        handles += [client.submit(Command.FLUSH) for _ in range(2)]
        time.sleep(0.2)  # both received, the first of them waiting for room
        for _ in range(4):
            rec.wait_for(1)
            rec.complete(0)
        assert [client.reply(h).error for h in handles] == [0, 0, 0, 0]
        assert all(rec.calls) and sum(len(c) for c in rec.calls) == 4
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_read_ahead_follows_the_last_write():
    def req(kind, length=0):
        return Request(kind=kind, flags=0, handle=1, offset=0, length=length)

    small, big = req(Command.WRITE, READ_AHEAD_MAX_PAYLOAD), req(Command.WRITE, READ_AHEAD_MAX_PAYLOAD + 512)
    assert next_read_ahead(0, small) == RECV_BUFFER_SIZE
    assert next_read_ahead(RECV_BUFFER_SIZE, big) == 0
    for kind in (Command.FLUSH, Command.TRIM, Command.READ, Command.WRITE_ZEROES):
        # A FLUSH between large writes must not pull the next one's payload through the buffer.
        assert next_read_ahead(0, req(kind, 4096)) == 0
        assert next_read_ahead(RECV_BUFFER_SIZE, req(kind, 4096)) == RECV_BUFFER_SIZE


def test_window_try_acquire():
    window = InFlightWindow(max_requests=2, max_bytes=1000)
    assert window.try_acquire(5000)  # an empty window admits any single request
    assert not window.try_acquire(1)  # over the byte budget: nothing taken
    assert (window.requests, window.bytes) == (1, 5000)
    window.release(5000)
    assert window.try_acquire(600) and not window.try_acquire(600) and window.try_acquire(400)
    assert not window.try_acquire(0)  # two requests: the count is full
    window.release(600)
    window.release(400)
    assert window.wait_empty(0)


def test_submit_many_raising_fails_every_request_of_the_call(sock_path):
    class Raising(BatchRecorder):
        def submit_many(self, items):
            items[0][1](0)  # one completed before the bug: it keeps its reply
            raise RuntimeError("backend bug")

    rec = Raising()
    with serve_unix(sock_path, lambda: rec), connect(sock_path, "") as client:
        first = client.submit(Command.WRITE, 0, data=b"w" * 512)
        wait_until(lambda: rec.calls)
        handles = [client.submit(Command.FLUSH) for _ in range(3)]
        time.sleep(0.2)
        rec.go.set()
        rec.wait_for(1)
        rec.complete(0)
        assert client.reply(first).error == 0
        assert [client.reply(h).error for h in handles] == [0, errno.EIO, errno.EIO]


def test_held_replies_wait_for_send_held_replies(sock_path):
    """A thread that holds replies (the primary's reply thread) sends them when it says so,
    together; their window slots stay taken until then."""
    held = HeldBackend()
    with serve_unix(sock_path, lambda: held, max_in_flight=3), connect(sock_path, "") as client:
        handles = [client.submit(Command.FLUSH) for _ in range(4)]
        held.wait_for(3)  # the window is full: the fourth waits
        completed, go = threading.Event(), threading.Event()

        def completer():
            hold_replies()
            for _ in range(3):
                held.complete(0)
            completed.set()
            go.wait(TIMEOUT)
            send_held_replies()
            send_held_replies()  # nothing left: a no-op

        t = threading.Thread(target=completer, daemon=True)
        t.start()
        assert completed.wait(TIMEOUT)
        readable, _, _ = select.select([client._sock], [], [], 0.3)  # noqa: SLF001
        assert not readable  # nothing sent yet
        assert len(held.held) == 0  # and the fourth not admitted: the slots are still taken
        go.set()
        t.join(TIMEOUT)
        assert [client.reply(h).error for h in handles[:3]] == [0, 0, 0]
        held.wait_for(1)
        held.complete(0)
        assert client.reply(handles[3]).error == 0


def test_submit_raising_becomes_eio(sock_path):
    class Raising:
        size = SIZE

        def submit(self, request, done):
            raise RuntimeError("backend bug")

    with serve_unix(sock_path, Raising), connect(sock_path, "") as client:
        assert client.reply(client.submit(Command.FLUSH)).error == errno.EIO


def test_factory_failure_drops_only_that_connection(sock_path, backend):
    calls = []

    def factory():
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "provider not ready")
        return backend

    with serve_unix(sock_path, factory) as srv:
        with pytest.raises((RemoteProtocolError, OSError)):
            connect(sock_path, "")
        with connect(sock_path, "") as client:
            assert client.size == SIZE
        wait_until(lambda: srv.connection_count == 0)


def test_reply_to_a_departed_client_is_dropped(sock_path):
    held = HeldBackend()
    with serve_unix(sock_path, lambda: held) as srv:
        client = connect(sock_path, "")
        client.submit(Command.READ, 0, MiB)
        held.wait_for(1)
        client.close()
        wait_until(lambda: srv.connection_count == 1)
        held.complete(0)  # the send fails: logged, and the connection winds down
        wait_until(lambda: srv.connection_count == 0)


class OneCompleterBackend:
    """An AsyncBackend shared by every connection whose requests one thread completes in
    arrival order: the shape of the primary, whose pipeline threads send every connection's
    replies."""

    size = SIZE

    def __init__(self):
        self.queue = queue.Queue()
        self.submitted = 0
        threading.Thread(target=self._complete, daemon=True).start()

    def submit(self, request, done):
        self.submitted += 1
        self.queue.put((request, done))

    def _complete(self):
        while True:
            request, done = self.queue.get()
            done(0, bytes([request.handle % 256]) * request.length if request.kind == Command.READ else b"")
            del request, done  # hold nothing of a connection while waiting


def test_a_client_that_does_not_read_holds_up_only_itself(sock_path):
    """Replies that do not fit a client's socket wait for that connection's sender thread: the
    thread completing requests for everyone goes on, and the other client is served at once."""
    backend = OneCompleterBackend()
    with serve_unix(sock_path, lambda: backend), connect(sock_path, "") as stuck, connect(sock_path, "") as other:
        handles = [stuck.submit(Command.READ, 0, MiB) for _ in range(16)]  # far over a socket buffer
        wait_until(lambda: backend.submitted == 16)
        assert other.pread(4096, 512) == bytes([1]) * 512  # would hang behind `stuck` before
        other.flush()
        replies = [stuck.reply(h) for h in handles]  # everything held for it arrives, intact
        assert all(r.error == 0 and r.data == bytes([r.handle % 256]) * MiB for r in replies)


def test_replies_a_client_does_not_read_keep_their_window_slots(sock_path):
    """What waits for the sender thread is bounded by the connection's window: a client that
    stops reading stops being admitted, and nothing is lost when it reads again."""
    backend = OneCompleterBackend()
    with serve_unix(sock_path, lambda: backend, max_in_flight=4), connect(sock_path, "") as client:
        handles = [client.submit(Command.READ, 0, MiB) for _ in range(10)]
        wait_until(lambda: backend.submitted == 4)
        time.sleep(0.3)
        assert backend.submitted == 4  # the unsent replies hold their slots
        replies = [client.reply(h) for h in handles]
        assert [r.error for r in replies] == [0] * 10 and backend.submitted == 10


def test_a_client_leaving_with_replies_unsent_frees_its_connection(sock_path):
    backend = OneCompleterBackend()
    with serve_unix(sock_path, lambda: backend) as srv:
        client = connect(sock_path, "")
        for _ in range(8):
            client.submit(Command.READ, 0, MiB)
        wait_until(lambda: backend.submitted == 8)
        client.close()  # the sender thread's send fails: the rest is dropped, the slots freed
        wait_until(lambda: srv.connection_count == 0)
        with connect(sock_path, "") as again:
            assert again.pread(0, 512) == bytes([1]) * 512


def test_a_connection_that_broke_with_replies_unsent_is_freed_at_once(sock_path):
    """Nothing of a connection whose client left with replies backlogged outlives it in a
    reference cycle (the failed send's traceback held the sender's frame, and with it up to a
    window of READ payloads, until a full collection of the garbage collector)."""
    backend = OneCompleterBackend()
    gc.disable()  # only reference counting frees what this test looks at
    try:
        with serve_unix(sock_path, lambda: backend) as srv:
            client = connect(sock_path, "")
            wait_until(lambda: srv.connection_count == 1)
            conn = weakref.ref(next(iter(srv._connections)))  # noqa: SLF001
            for _ in range(8):
                client.submit(Command.READ, 0, MiB)
            wait_until(lambda: backend.submitted == 8)
            client.close()
            wait_until(lambda: srv.connection_count == 0)
            wait_until(lambda: conn() is None)
    finally:
        gc.enable()


def test_serve_connection_on_a_socketpair(backend):
    from hastpy.nbd.server import serve_connection

    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=serve_connection, args=(ours, backend), kwargs={"workers": 0})
    thread.start()
    client = NBDClient(theirs)
    client.pwrite(512, b"p" * 512)
    assert client.pread(512, 512) == b"p" * 512
    client.disconnect()
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def test_file_backend_without_fallocate_writes_zeroes(disk, monkeypatch):
    with FileBackend(disk) as fb:
        monkeypatch.setattr(fb, "_fallocate", lambda mode, offset, length: False)
        fb.pwrite(0, b"\x01" * (3 * MiB), fua=False)
        fb.write_zeroes(512, 2 * MiB + 512, fua=True, may_trim=True)
        fb.trim(0, 512, fua=True)  # a hint that cannot be honoured: nothing happens
        data = fb.pread(0, 3 * MiB)
    assert data == b"\x01" * 512 + bytes(2 * MiB + 512) + b"\x01" * (MiB - 1024)


def test_file_backend_fallocate_errors_surface(disk):
    # "Not supported" falls back quietly; any other failure is the client's error reply.
    with FileBackend(disk, read_only=True) as fb:
        with pytest.raises(OSError) as err:
            fb.trim(0, 512, fua=False)
    assert err.value.errno == errno.EBADF


def test_file_backend_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        FileBackend(tmp_path / "absent")


@pytest.mark.parametrize(
    "canned,match",
    [
        (b"NBDMAGIC" + b"\x00" * 10, "newstyle"),
        (b"NBDMAGICIHAVEOPT\x00\x00", "fixed newstyle"),
        (b"NBDMAGICIHAVEOPT\x00\x03" + bytes(20), "bad option reply"),
        (
            b"NBDMAGICIHAVEOPT\x00\x03" + bytes.fromhex("0003e889045565a9 00000007 00000001 00000000"),
            "INFO_EXPORT",
        ),
        (b"NBDMAGICIHAVEOPT\x00", "closed"),
    ],
)
def test_client_rejects_broken_servers(canned, match):
    ours, theirs = socket.socketpair()
    ours.sendall(canned)
    ours.shutdown(socket.SHUT_WR)  # EOF after the canned bytes; the client can still send
    with pytest.raises(RemoteProtocolError, match=match):
        NBDClient(theirs)
    theirs.close()
    ours.close()
