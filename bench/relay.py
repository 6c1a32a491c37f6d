#!/usr/bin/env python3
"""The least a replicating NBD server written in Python can do: the benchmarks' floor for hast.

    .venv/bin/python bench/relay.py peer --file FILE [--ready PATH]
    .venv/bin/python bench/relay.py primary --socket PATH --file FILE --size BYTES --peer HOST:PORT
                                    [--name EXPORT] [--keepdirty N] [--ready PATH]

Not a product: no handshake with the peer, no resync, no errors worth the name. It keeps only
what every write of a replicating server must do, with as little Python as that takes, so that
devwrite.py and seqwrite.py (--floor) can show how far behind nbdkit any Python server of this
design lands on this machine, and how much of hast's distance is its own.

primary: an NBD server (hastpy's codec for the handshake only; multi-conn advertised, as hast's
export) on a unix socket. Each NBD connection gets its own TCP connection to the peer and two
threads, as hast's pipeline has: the receive thread takes a request, writes it to FILE, queues
its handle and sends it to the peer; the reply thread takes the peer's acknowledgements, which
come in order, and sends the NBD replies. A write is acknowledged once both copies have it, as
in fullsync. READ is served from FILE.

With --keepdirty N (> 0) it also keeps an activemap as hastd's metaflush does: a write to an
extent (2 MiB) that is not among the N most recently written ones first waits for a 512-byte
"bitmap" block written with RWF_DSYNC (see ActiveMap). Without it there is no bitmap at all.

There is no range lock either: two overlapping writes in flight at once (from two connections)
may reach the two copies in different orders, which hast's range lock prevents.

peer: listens on 127.0.0.1, prints nothing; writes its port into --ready once listening. Per
connection one thread: receive a command, write it to FILE (fdatasync for FLUSH and FUA), send
a 4-byte status.
"""

from __future__ import annotations

import argparse
import collections
import errno
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from hastpy.nbd.codec import NEED_DATA, Aborted, ConnectionClosed, OptionReply, Ready, ServerConnection

# NBD transmission (the protocol document; fixed newstyle, simple replies only).
NBD_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
NBD_REPLY = struct.Struct(">IIQ")  # magic, error, handle
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
FLAG_FUA = 1
# The peer's frame: command, FUA, offset, length; then length bytes for a write. Status: errno.
PEER_HEADER = struct.Struct(">BBQI")
PEER_STATUS = struct.Struct(">I")
# hast's default extent size; the bitmap block sits in front of the data, as hast's metadata.
EXTENT = 2 * 1024 * 1024
BITMAP_BLOCK = 512
# The codec refuses requests above this anyway; hast's export advertises the same.
MAX_REQUEST = 32 * 1024 * 1024
# The arms the benchmarks' --floor adds: name -> --keepdirty (0: no activemap; 64: hast's
# default, which with metaflush on, also hast's default, is what hast's arm runs).
RELAY_ARMS = {"relay": 0, "relay-am": 64}
# Both processes are up in a fraction of a second; this allows for a loaded machine.
READY_TIMEOUT = 30.0


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) != n:
        raise EOFError
    return data


# --- peer -----------------------------------------------------------------------------------------


def peer_connection(conn: socket.socket, fd: int) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            cmd, fua, offset, length = PEER_HEADER.unpack(recv_exact(conn, PEER_HEADER.size))
            err = 0
            try:
                if cmd == CMD_WRITE:
                    os.pwrite(fd, recv_exact(conn, length), offset)
                    if fua:
                        os.fdatasync(fd)
                else:
                    os.fdatasync(fd)
            except OSError as exc:
                err = exc.errno or errno.EIO
            conn.sendall(PEER_STATUS.pack(err))
    except (EOFError, OSError):
        conn.close()


def run_peer(args) -> int:
    fd = os.open(args.file, os.O_RDWR)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    _ready(args.ready, str(ls.getsockname()[1]))
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=peer_connection, args=(conn, fd), daemon=True).start()


# --- primary --------------------------------------------------------------------------------------


class ActiveMap:
    """The N most recently written extents, each marked on disk before data is written to it.

    As hast's: a write whose extents are all marked on disk goes ahead at once; one that needs a
    mark waits for a durable block write, and writes that need one while another is being made
    share the next (group commit); a write that needs one while the extent before it is resident
    (a stream moving forward) has the next extent marked with it, as an extra that evicts nothing
    (hast's pre-marking: half the bitmap writes of a sequential stream). Unlike hast's, marks
    are never cleared on disk (no clear writes), so this costs a server less than hast's
    activemap does: it stays a floor."""

    def __init__(self, fd: int, keepdirty: int, nextents: int):
        self.fd = fd
        self.keepdirty = keepdirty
        self.nextents = nextents
        self.resident: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.on_disk: set[int] = set()
        self.wanted: set[int] = set()
        self.lock = threading.Lock()  # guards resident, on_disk, wanted; never held for I/O
        self.flush_lock = threading.Lock()  # one durable block write at a time
        self.block = bytes(BITMAP_BLOCK)

    def mark(self, offset: int, length: int) -> None:
        exts = range(offset // EXTENT, (offset + max(length, 1) - 1) // EXTENT + 1)
        with self.lock:
            forward = exts[0] - 1 in self.resident
            for ext in exts:
                if ext in self.resident:
                    self.resident.move_to_end(ext)
                else:
                    while len(self.resident) >= self.keepdirty:
                        self.on_disk.discard(self.resident.popitem(last=False)[0])
                    self.resident[ext] = None
            missing = [e for e in exts if e not in self.on_disk]
            if not missing:
                return
            following = exts[-1] + 1
            if forward and following < self.nextents and following not in self.resident:
                self.resident[following] = None
                missing.append(following)
            self.wanted.update(missing)
        with self.flush_lock:
            with self.lock:
                if all(e in self.on_disk for e in exts):
                    return  # a write made while we waited carried our marks
                batch, self.wanted = self.wanted, set()
            os.pwritev(self.fd, [self.block], 0, os.RWF_DSYNC)
            with self.lock:
                self.on_disk |= {e for e in batch if e in self.resident}  # not one evicted meanwhile


class Connection:
    def __init__(self, sock: socket.socket, fd: int, base: int, name: str, size: int, peer: tuple[str, int],
                 am: ActiveMap | None):  # fmt: skip
        self.sock = sock
        self.name = name
        self.fd = fd
        self.base = base
        self.size = size
        self.am = am
        self.peer = socket.create_connection(peer)
        self.peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.handles: collections.deque[int] = collections.deque()  # sent to the peer, in order
        self.send_lock = threading.Lock()  # whole NBD replies on self.sock

    def handshake(self) -> bool:
        codec = ServerConnection(self.name, self.size, multi_conn=True, max_block_size=MAX_REQUEST)
        self.sock.sendall(codec.greeting())
        while True:
            event = codec.next_event()
            if event is NEED_DATA:
                # Never more than the codec can use: nothing of the transmission phase is read.
                data = self.sock.recv(codec.receive_limit())
                codec.receive_data(data)
            elif isinstance(event, OptionReply):
                self.sock.sendall(event.data)
            elif isinstance(event, Ready):
                self.sock.sendall(event.data)
                return True
            elif isinstance(event, (Aborted, ConnectionClosed)):
                return False
            else:
                raise RuntimeError(f"unexpected handshake event {event!r}")

    def reply(self, error: int, handle: int, data: bytes = b"") -> None:
        with self.send_lock:
            self.sock.sendmsg([NBD_REPLY.pack(REPLY_MAGIC, error, handle), data])

    def receive_loop(self) -> None:
        fd, base = self.fd, self.base
        while True:
            magic, flags, cmd, handle, offset, length = NBD_REQUEST.unpack(recv_exact(self.sock, NBD_REQUEST.size))
            if magic != REQUEST_MAGIC or cmd == CMD_DISC:
                return
            if offset + length > self.size or length > MAX_REQUEST:
                if cmd == CMD_WRITE:
                    recv_exact(self.sock, length)
                self.reply(errno.EINVAL, handle)
            elif cmd == CMD_WRITE:
                data = recv_exact(self.sock, length)
                if self.am is not None:
                    self.am.mark(offset, length)
                os.pwrite(fd, data, base + offset)
                if flags & FLAG_FUA:
                    os.fdatasync(fd)
                self.handles.append(handle)
                self.peer.sendmsg([PEER_HEADER.pack(CMD_WRITE, flags & FLAG_FUA, offset, length), data])
            elif cmd == CMD_FLUSH:
                os.fdatasync(fd)
                self.handles.append(handle)
                self.peer.sendall(PEER_HEADER.pack(CMD_FLUSH, 0, 0, 0))
            elif cmd == CMD_READ:
                self.reply(0, handle, os.pread(fd, length, base + offset))
            else:
                self.reply(errno.EINVAL, handle)

    def reply_loop(self) -> None:
        try:
            while True:
                (err,) = PEER_STATUS.unpack(recv_exact(self.peer, PEER_STATUS.size))
                self.reply(err, self.handles.popleft())
        except (EOFError, OSError):
            pass

    def serve(self) -> None:
        try:
            if not self.handshake():
                return
            replier = threading.Thread(target=self.reply_loop, daemon=True)
            replier.start()
            try:
                self.receive_loop()
            finally:
                # The peer closes once it answered everything sent; every reply is out then.
                self.peer.shutdown(socket.SHUT_WR)
                replier.join()
        except (EOFError, OSError):
            pass
        finally:
            self.peer.close()
            self.sock.close()


def run_primary(args) -> int:
    host, _, port = args.peer.rpartition(":")
    fd = os.open(args.file, os.O_RDWR)
    am = ActiveMap(fd, args.keepdirty, -(-args.size // EXTENT)) if args.keepdirty > 0 else None
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(args.socket)
    ls.listen()
    _ready(args.ready, str(os.getpid()))
    while True:
        conn, _ = ls.accept()
        c = Connection(conn, fd, BITMAP_BLOCK, args.name, args.size, (host, int(port)), am)
        threading.Thread(target=c.serve, daemon=True).start()


def _ready(path: str | None, text: str) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.rename(path + ".tmp", path)


# --- launching both, for the benchmarks ----------------------------------------------------------


class Relay:
    """This script's peer and primary as child processes, in directory `d` (created), serving
    export `name` of `size` bytes on the unix socket `self.socket`."""

    def __init__(self, d: Path, name: str, size: int, keepdirty: int):
        d.mkdir()
        self.socket = str(d / "nbd.sock")
        for f in ("primary.img", "peer.img"):
            with open(d / f, "wb") as fh:
                fh.truncate(BITMAP_BLOCK + size)
        cmd = [sys.executable, str(Path(__file__).resolve())]
        self.procs = [subprocess.Popen(cmd + ["peer", "--file", str(d / "peer.img"), "--ready", str(d / "port")])]
        try:
            port = _wait_ready(d / "port", self.procs[0])
            self.procs.append(subprocess.Popen(cmd + [
                "primary", "--socket", self.socket, "--file", str(d / "primary.img"), "--name", name,
                "--size", str(size), "--peer", f"127.0.0.1:{port}", "--keepdirty", str(keepdirty), "--ready", str(d / "pid"),
            ]))  # fmt: skip
            _wait_ready(d / "pid", self.procs[1])
        except BaseException:
            self.stop()
            raise

    @property
    def servers(self) -> dict[str, int]:
        """Label -> pid, for CPU accounting."""
        return {"relay": self.procs[1].pid, "peer": self.procs[0].pid}

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(30)


def _wait_ready(path: Path, proc: subprocess.Popen) -> str:
    end = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"relay.py exited with status {proc.returncode} before it was ready")
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        time.sleep(0.02)
    raise RuntimeError(f"relay.py not ready after {READY_TIMEOUT:.0f} s (no {path})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="relay.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("peer")
    p.add_argument("--file", required=True)
    p.add_argument("--ready")
    p = sub.add_parser("primary")
    p.add_argument("--socket", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--name", default="", help="the export's name")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--peer", required=True, help="HOST:PORT of the peer")
    p.add_argument("--keepdirty", type=int, default=0)
    p.add_argument("--ready")
    args = ap.parse_args(argv)
    return run_peer(args) if args.role == "peer" else run_primary(args)


if __name__ == "__main__":
    sys.exit(main())
