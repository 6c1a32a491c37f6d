"""Entry point of a hastd worker process: `python -m hastpy.worker`, started by the supervisor.

The supervisor execs a fresh interpreter per worker (its last argument is "hastd: <res> (<role>)",
the title hastd's failover scripts look for) and passes one socketpair end, whose fd number is
argv[1], plus any replication sockets. The first line on it is the worker's spec (JSON): role, resource, fds,
handshake data. After that the same socket carries status requests from the supervisor and events
to it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import pwd
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import fields

from hastpy import control
from hastpy.config import Resource

log = logging.getLogger("hastd")

HAST_USER = "hast"
PR_SET_NO_NEW_PRIVS = 38
PR_SET_IO_FLUSHER = 57
M_TRIM_THRESHOLD = -1  # mallopt(3) parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
# Payloads (up to 1 MiB each from the kernel and nbdfuse, 32 MiB at most) are allocated and freed
# at every request, on many threads. By default glibc serves blocks above 128 KiB with a fresh
# mmap, and gives a thread arena's free top back to the kernel once it exceeds 128 KiB (madvise):
# so every 1 MiB write faulted 256 new zeroed pages in, on both workers. Fixed thresholds keep
# freed payload memory for the next request:
# - mmap only above glibc's largest allowed threshold (32 MiB on 64-bit, the largest NBD request);
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
# - trim an arena only when more than this is free at its top: room for the payloads of a busy
#   queue (the kernel's and nbdfuse's 16 to 128 requests of 1 MiB) without a fault, while what a
#   burst leaves unused beyond it still goes back.
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024


class Channel:
    """The worker's end of the supervisor socketpair. Sends are serialized by a lock."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = control.LineReader(sock)
        self._send_lock = threading.Lock()

    def send(self, obj: dict) -> None:
        with self._send_lock:
            try:
                control.send(self.sock, obj)
            except OSError:
                pass  # the supervisor is gone; serve_status notices and exits

    def event(self, name: str, **extra) -> None:
        self.send({"event": name, **extra})

    def serve_status(self, status_fn, reconfigure_fn) -> None:
        """Answer status requests and take reloaded settings (supervisor.LIVE_FIELDS) until
        the supervisor goes away, then end the worker."""

        def loop():
            try:
                while (req := self.reader.read()) is not None:
                    if req.get("cmd") == "status":
                        # Echo the request's id: the supervisor matches replies to requests
                        # and drops one that comes after it stopped waiting.
                        self.send({"reply": status_fn(), "id": req.get("id")})
                    elif req.get("cmd") == "reconfigure":
                        reconfigure_fn(resource_from_dict(req["resource"]))
            except Exception as exc:  # noqa: BLE001 - any failure here means the parent is gone
                log.error("Control channel failed: %s", exc)
            log.warning("Supervisor went away, exiting.")
            os._exit(os.EX_SOFTWARE)

        threading.Thread(target=loop, name="control", daemon=True).start()


def run_or_exit(fn: Callable[..., object], *args) -> None:
    """fn(*args), in a thread or pool task the worker cannot do without (replication, sync,
    bitmap clearing, local I/O). An exception fn does not handle itself is a bug: it is logged
    with its traceback and the worker exits with EX_TEMPFAIL, on which the supervisor restarts a
    primary worker, as hastd does. Left to itself the thread would just stop (or the pool would
    keep the exception in a Future no one reads), and every request waiting for it would hang
    with the worker still up: no failover either."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - what fn left unhandled, whatever it is
        log.critical("Internal error in thread %s: exiting.", threading.current_thread().name, exc_info=True)
        os._exit(os.EX_TEMPFAIL)


def fail_stop(fn: Callable[..., object]) -> Callable[..., None]:
    """fn, run through run_or_exit: a thread target."""
    return functools.partial(run_or_exit, fn)


def resource_from_dict(d: dict) -> Resource:
    names = {f.name for f in fields(Resource)}
    return Resource(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


def _prctl(option: int, arg: int) -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.prctl(option, arg, 0, 0, 0) == 0


def keep_freed_memory() -> None:
    """Reuse freed payload memory instead of faulting new pages in (see MALLOC_TRIM_THRESHOLD).
    Before the first payload is allocated; a C library without mallopt keeps its defaults."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not (mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)):
        log.debug("mallopt not available: freed memory goes back to the kernel at once.")


def set_io_flusher() -> None:
    """Mark the process serving the block device as an I/O flusher (peers.md §5.5): memory
    reclaim triggered by our own allocations must not wait on writeback through our device."""
    if not _prctl(PR_SET_IO_FLUSHER, 1):
        log.debug("PR_SET_IO_FLUSHER not available (needs CAP_SYS_RESOURCE).")


def drop_privileges() -> None:
    """After every file and socket is open: become user `hast` (if it exists) with no new privileges.

    What the worker can still do: read/write its open provider fd and sockets, connect out over
    TCP (the primary reconnects itself), and create files only where user `hast` may.
    """
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if os.getuid() != 0:
        return
    try:
        pw = pwd.getpwnam(HAST_USER)
    except KeyError:
        log.debug("No user %s; the worker keeps running as root.", HAST_USER)
        return
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    log.debug("Privileges dropped to %s.", HAST_USER)


def main() -> None:
    # The supervisor ends a secondary worker with SIGINT when its primary reconnects (hastd does
    # the same): die of it as hastd's worker does, not with a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sock = socket.socket(fileno=int(sys.argv[1]))
    channel = Channel(sock)
    spec = channel.reader.read()
    if spec is None:
        sys.exit(os.EX_SOFTWARE)
    res = resource_from_dict(spec["resource"])
    logging.basicConfig(
        level=logging.DEBUG if spec.get("debug") else logging.INFO,
        format=f"%(asctime)s hastd[%(process)d] [{res.name}] ({spec['role']}) %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    keep_freed_memory()
    if spec["role"] == "primary":
        from hastpy.primary import run
    else:
        from hastpy.secondary import run
    sys.exit(run(res, spec, channel))


if __name__ == "__main__":
    main()
