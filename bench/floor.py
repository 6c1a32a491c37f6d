#!/usr/bin/env python3
"""The least machine CPU a second copy of each MiB costs here, whatever the server's language.

    .venv/bin/python bench/floor.py [--mib 1024] [--area 512] [--runs 3] [--dir DIR]

A replicating server does what a plain one does (receive the client's write, write it to its
disk) plus, for every byte: a send over TCP, a receive on the peer, a write to the peer's disk
and that disk's writeback. This measures exactly that extra work with nothing else around it:
one thread sends 1 MiB buffers over loopback TCP (TCP_NODELAY, 4 MiB socket buffers, as hastd's
link), another receives each straight into one buffer with MSG_WAITALL and pwrites it into a
file in --dir, going round an --area that was written once before the clock starts (devwrite's
fio goes round its area the same way, so its provider pages are allocated and cached). The
figure is machine-wide busy time (/proc/stat: every process, kernel thread and interrupt) per
MiB copied, the median over --runs, so it means something on an otherwise idle machine only.
Writeback is left out on both sides: devwrite runs `sync -f` before each run, outside its
measure, and its runs are too short for the page cache to start writing back on its own.
Python's own cost is a few system calls per MiB, far below the copies'.

devwrite.py uses it to say how close any server behind its stack could come to nbdkit: if the
nbdkit arm spends M ms of machine CPU per MiB at a fraction B of the machine busy, a server that
also keeps a second copy needs at least M + F per MiB, so at the same B it reaches at most
M / (M + F) of nbdkit's rate, and at a fully busy machine M / ((M + F) * B).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading

MiB = 1024 * 1024
CHUNK = MiB  # devwrite's sequential request size
SOCKET_BUFFER = 4 * MiB  # hastpy.transport.SOCKET_BUFFER: the link's kernel buffers
# Busy = every /proc/stat column but idle (3) and iowait (4); guest time is already in user.
IDLE_COLUMNS = (3, 4)
GUEST_COLUMNS = (8, 9)


def busy_seconds() -> float:
    """Machine-wide CPU time spent so far, all CPUs (the first line of /proc/stat)."""
    with open("/proc/stat") as f:
        cols = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v for i, v in enumerate(cols) if i not in IDLE_COLUMNS + GUEST_COLUMNS)
    return busy / os.sysconf("SC_CLK_TCK")


def _receive_and_write(conn: socket.socket, fd: int, total: int, area: int, errors: list) -> None:
    try:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        done = 0
        while done < total:
            n = conn.recv_into(view, CHUNK, socket.MSG_WAITALL)
            if n == 0:
                raise ConnectionError(f"the sender closed after {done} of {total} bytes")
            os.pwrite(fd, view[:n], done % area)
            done += n
    except OSError as exc:
        errors.append(exc)


def second_copy_cost(mib: int, area_mib: int, directory: str | None) -> float:
    """Machine CPU ms per MiB for sending mib MiB over loopback TCP and writing them round a
    file's first area_mib MiB (already written once)."""
    data = os.urandom(CHUNK)
    fd, path = tempfile.mkstemp(prefix="floor-", dir=directory)
    listener = socket.socket()
    try:
        os.unlink(path)
        for i in range(area_mib):
            os.pwrite(fd, data, i * CHUNK)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        out = socket.create_connection(listener.getsockname())
        inn, _ = listener.accept()
        with out, inn:
            for s in (out, inn):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            errors: list = []
            t0 = busy_seconds()
            rx = threading.Thread(target=_receive_and_write, args=(inn, fd, mib * MiB, area_mib * MiB, errors))
            rx.start()
            for _ in range(mib):
                out.sendall(data)
            rx.join()
            spent = busy_seconds() - t0
        if errors:
            raise errors[0]
        return spent * 1000 / mib
    finally:
        listener.close()
        os.close(fd)


def median_cost(mib: int, area_mib: int, runs: int, directory: str | None) -> float:
    return statistics.median(second_copy_cost(mib, area_mib, directory) for _ in range(runs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="floor.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="MiB copied per run (default 1024)")
    ap.add_argument("--area", type=int, default=512, help="MiB of the file written round (default 512, devwrite's --mib)")
    ap.add_argument("--runs", type=int, default=3, help="runs; the median is printed (default 3)")
    ap.add_argument("--dir", default=None, help="where the receiving file lives (default: /tmp)")
    args = ap.parse_args(argv)
    if min(args.mib, args.area, args.runs) < 1:
        ap.error("--mib, --area and --runs must be at least 1")
    try:
        cost = median_cost(args.mib, args.area, args.runs, args.dir)
    except OSError as exc:
        print(f"floor.py: {exc}", file=sys.stderr)
        return os.EX_IOERR
    print(f"a second copy over loopback TCP: {cost:.3f} ms of machine CPU per MiB "
          f"(median of {args.runs} runs of {args.mib} MiB)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
