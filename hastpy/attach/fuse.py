"""The `fuse` attach method: nbdfuse exposes the NBD export as a file, a loop device makes it a
block device. For machines without the nbd driver (containers, CI: reference/lab.md §2).

    worker's unix socket <- nbdfuse (FUSE file statedir/<name>.fuse/<name>) <- /dev/loopN <- link

Make: start nbdfuse (own session, output to statedir/<name>.nbdfuse.log, readiness by its -P pid
file), `losetup --find --show --direct-io=on --sector-size 512` the file. Direct I/O keeps the
loop from caching the data a second time in the page cache and sends the filesystem's writes
straight to the export (lab.md measured it; the FUSE file accepts O_DIRECT).

Tear down, in the only order that cannot wedge (lab.md §2 "Failure modes"): loop first (a FUSE
mount under a live loop cannot be unmounted: EBUSY), then the FUSE mount, then nbdfuse, which
does not exit by itself after the unmount. If the server is hung rather than dead, loop I/O and
so `losetup -d` block inside FUSE; killing nbdfuse aborts the FUSE connection, every pending
request fails with ENOTCONN, and the detach completes. A loop that is still open (a filesystem
mounted on it) is only marked autoclear by `losetup -d`; the kernel frees it at the last close.

Identity: a loop device is ours only if its backing file lives on the FUSE mount at our mount
directory *in our mount namespace* (LOOP_GET_STATUS64's lo_device equals that mount's device
number), and an nbdfuse process only if it runs in our mount namespace with our file on its
command line (or is the pid and start time we recorded). Lab nodes share a kernel and may use
identical paths, so a path alone proves nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import re
import shutil
import struct
import subprocess
import time
import urllib.parse

from hastpy.attach.base import (
    _CMD_ENV,
    POLL_INTERVAL,
    SECTOR_SIZE,
    AttachError,
    Attachment,
    devnum,
    kill_now,
    list_pids,
    mount_ns,
    mounts_at,
    proc_alive,
    proc_cmdline,
    proc_start_time,
    register_child,
    run_command,
    save_state,
    terminate,
    wait_until,
)

log = logging.getLogger(__name__)

NBDFUSE = "nbdfuse"
LOSETUP = "losetup"
FUSERMOUNT = "fusermount3"

# --- Limits, each with its reason -------------------------------------------------------------

# nbdfuse connects and mounts in ~0.06 s (lab.md §2). 10 s absorbs a loaded CI machine and a
# worker slow to accept, and still fails an attach that cannot work well inside a promote's
# own deadline.
NBDFUSE_READY_TIMEOUT = 10.0
# losetup attach or detach is a few ioctls (~4 ms here). A detach that takes longer is blocked
# on loop I/O inside a hung FUSE daemon (see the module docstring): we then break the hang.
LOSETUP_TIMEOUT = 10.0
# fusermount3 -u is a umount(2) of a FUSE mount; it does not wait for the daemon, but bound it.
FUSERMOUNT_TIMEOUT = 10.0
# After nbdfuse is killed, pending loop I/O fails at once and a deferred detach finishes; allow
# this long for the kernel to release the loop device.
LOOP_RELEASE_TIMEOUT = 5.0
# Mounts stacked on our mount directory that we unmount one by one (a crashed attach retried
# could, in theory, leave more than one).
MAX_UNMOUNTS = 4

# linux/loop.h: LOOP_GET_STATUS64 and struct loop_info64 (lo_device first: the backing file's
# st_dev in the kernel's "huge" encoding, which is glibc's dev_t encoding).
LOOP_GET_STATUS64 = 0x4C05
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")

# loop_backing_dev() of a loop whose FUSE server died: the kernel cannot stat the backing file
# (ENOTCONN), so the device number that proves ownership is no longer available.
DEAD_BACKING = -1

_SAFE_FSNAME = re.compile(r"[^A-Za-z0-9._-]")


def fuse_paths(statedir: str, name: str) -> tuple[str, str, str, str]:
    """(mount directory, FUSE file, nbdfuse pid file, nbdfuse log) for resource `name`."""
    statedir = os.path.realpath(statedir)  # mountinfo lists resolved paths
    mountdir = os.path.join(statedir, f"{name}.fuse")
    return (
        mountdir,
        os.path.join(mountdir, name),
        os.path.join(statedir, f"{name}.nbdfuse.pid"),
        os.path.join(statedir, f"{name}.nbdfuse.log"),
    )


def nbd_uri(socket_path: str, export: str) -> str:
    """The NBD URI (NetworkBlockDevice/nbd doc/uri.md) of export `export` on a unix socket."""
    return "nbd+unix:///{}?socket={}".format(
        urllib.parse.quote(export, safe=""), urllib.parse.quote(socket_path, safe="/")
    )


def tools_missing() -> list[str]:
    return [t for t in (NBDFUSE, LOSETUP, FUSERMOUNT) if shutil.which(t) is None]


# --- Make -------------------------------------------------------------------------------------


def attach_fuse(att: Attachment) -> None:
    """Start nbdfuse and put a loop device on its file; fills in and saves `att` as it goes.
    On failure raises AttachError; the caller tears down whatever the state file records."""
    missing = tools_missing()
    if missing:
        raise AttachError(
            f"attach fuse needs {', '.join(missing)} (Debian: apt-get install libnbd-bin fuse3 util-linux)"
        )
    mountdir, fuse_file, pidfile, logfile = fuse_paths(att.statedir, att.name)
    att.mountdir, att.fuse_file = mountdir, fuse_file
    if mounts_at(mountdir):
        raise AttachError(f"{mountdir} is still mounted (a previous attachment was not cleaned up)")
    save_state(att)  # creates statedir (mode 0700) and records the names before anything exists
    os.makedirs(mountdir, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)

    argv = [
        NBDFUSE,
        "-P", pidfile,
        "-o", "fsname=hastpy:" + _SAFE_FSNAME.sub("_", att.name),
        fuse_file,
        nbd_uri(att.socket_path, att.name),
    ]  # fmt: skip
    with open(logfile, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        # Its own session: the daemon outlives the caller's threads and process group signals
        # (a Ctrl-C to the supervisor must not pull the device away); stdin is not a terminal.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=_CMD_ENV,
        )
    register_child(proc)
    att.nbdfuse_pid = proc.pid
    att.nbdfuse_start = proc_start_time(proc.pid)
    save_state(att)

    mount = _wait_ready(proc, pidfile, mountdir, logfile)
    att.fuse_dev = mount
    save_state(att)

    if att.size:
        got = os.stat(fuse_file).st_size  # answered by nbdfuse from the handshake, no NBD I/O
        if got != att.size:
            raise AttachError(f"export {att.name!r} on {att.socket_path} has {got} bytes, expected {att.size}")

    result = run_command(
        [LOSETUP, "--find", "--show", "--direct-io=on", f"--sector-size={SECTOR_SIZE}", fuse_file],
        LOSETUP_TIMEOUT,
    )
    lines = result.stdout.split()
    if not result.ok or not lines or not lines[-1].startswith("/dev/loop"):
        raise AttachError(f"cannot make a loop device on {fuse_file}: {result.describe()}")
    att.device = lines[-1]
    save_state(att)
    if _sysfs_read(att.device, "loop/dio") == "0":
        log.warning("[%s] %s runs without direct I/O (the kernel refused it)", att.name, att.device)


def _wait_ready(proc: subprocess.Popen, pidfile: str, mountdir: str, logfile: str) -> str:
    """Wait for nbdfuse to say it is ready (its pid in the -P file) and for its mount to appear
    in our mount table; return the mount's device number. Bounded by NBDFUSE_READY_TIMEOUT."""
    deadline = time.monotonic() + NBDFUSE_READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise AttachError(f"nbdfuse exited with status {proc.returncode}: {_tail(logfile)}")
        if _read_pidfile(pidfile) == proc.pid:
            mounts = [m for m in mounts_at(mountdir) if m.fstype.startswith("fuse")]
            if mounts:
                return mounts[-1].dev
        if time.monotonic() >= deadline:
            raise AttachError(f"nbdfuse not ready after {NBDFUSE_READY_TIMEOUT:.0f} s: {_tail(logfile)}")
        time.sleep(POLL_INTERVAL)


def _read_pidfile(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " | ".join(f.read().splitlines()[-lines:]) or "(no output)"
    except OSError:
        return "(no log)"


# --- Loop devices -----------------------------------------------------------------------------


def _sysfs_read(device: str, attr: str) -> str | None:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/{attr}", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def loop_bound(device: str) -> bool:
    return _sysfs_read(device, "loop/backing_file") is not None


def loop_backing_dev(device: str) -> int | None:
    """st_dev of the loop's backing file (LOOP_GET_STATUS64), None if the loop is unbound."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        buf = bytearray(LOOP_INFO64.size)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return DEAD_BACKING
        if exc.errno != errno.ENXIO:  # ENXIO: not bound to a file
            log.debug("attach: LOOP_GET_STATUS64 on %s: %s", device, exc)
        return None
    finally:
        os.close(fd)
    return LOOP_INFO64.unpack(buf)[0]


def our_loops(mountdir: str, fuse_file: str | None, extra: str | None = None) -> list[str]:
    """Loop devices whose backing file is on the FUSE mount(s) at `mountdir` in our namespace.

    The sysfs backing_file path is only a cheap first filter (another node may have the same
    path); the device number from the kernel decides."""
    devs = {devnum(m.dev) for m in mounts_at(mountdir) if m.fstype.startswith("fuse")}
    if not devs and extra is None:
        return []
    prefix = mountdir + "/"
    found = []
    candidates = sorted(glob.glob("/sys/block/loop*"))
    for sys_dir in candidates:
        device = "/dev/" + os.path.basename(sys_dir)
        backing = _sysfs_read(device, "loop/backing_file")
        if backing is None:
            continue
        if device != extra and not (backing == fuse_file or backing.startswith(prefix)):
            continue
        dev = loop_backing_dev(device)
        # A dead backing file cannot prove whose it is: accept it only as the device our own
        # state file recorded (another node's loop with the same path answers with its device).
        if dev in devs or (dev == DEAD_BACKING and device == extra):
            found.append(device)
    return found


# --- Tear down --------------------------------------------------------------------------------


def teardown_fuse(att: Attachment, done: list[str]) -> list[str]:
    """Undo everything `att` (or the naming conventions for att.name) can lead us to: loop
    devices, the FUSE mount, nbdfuse. Appends what it did to `done`; returns what is left.
    Never blocks for more than the sum of the bounded steps."""
    mountdir, fuse_file, pidfile, _ = fuse_paths(att.statedir, att.name)
    mountdir = att.mountdir or mountdir
    fuse_file = att.fuse_file or fuse_file
    daemons = _our_nbdfuse(att, fuse_file, pidfile)
    problems: list[str] = []

    # 1. Loop devices. A detach that hangs means a hung FUSE daemon: kill it to fail the I/O.
    for device in our_loops(mountdir, fuse_file, att.device):
        result = run_command([LOSETUP, "-d", device], LOSETUP_TIMEOUT)
        if result.returncode is None or (not result.ok and loop_bound(device)):
            for pid, start in daemons:
                if (what := kill_now(pid, start, "nbdfuse")) is not None:
                    done.append(what + " to break a hung loop detach")
            if not wait_until(lambda d=device: not loop_bound(d), LOOP_RELEASE_TIMEOUT):
                run_command([LOSETUP, "-d", device], LOSETUP_TIMEOUT)
        if not loop_bound(device):
            done.append(f"detached {device}")
        elif _sysfs_read(device, "loop/autoclear") == "1":
            done.append(f"{device} still open: the kernel detaches it at its last close")
        else:
            problems.append(f"{device} is still attached to {fuse_file}")

    # 2. The FUSE mount(s). EBUSY means a loop still holds the file (a deferred detach):
    # unmount lazily so the directory is free; the kernel drops the mount with the loop.
    for _ in range(MAX_UNMOUNTS):
        if not [m for m in mounts_at(mountdir) if m.fstype.startswith("fuse")]:
            break
        first = run_command([FUSERMOUNT, "-u", mountdir], FUSERMOUNT_TIMEOUT, quiet=True)
        if first.ok:
            done.append(f"unmounted {mountdir}")
            continue
        result = run_command([FUSERMOUNT, "-u", "-z", mountdir], FUSERMOUNT_TIMEOUT)
        if result.ok:
            done.append(f"lazily unmounted {mountdir} (still referenced)")
        else:
            problems.append(f"cannot unmount {mountdir}: {first.describe()}; {result.describe()}")
            break

    # 3. nbdfuse stays running after its mount is gone (lab.md §2): stop it.
    for pid, start in daemons:
        try:
            if (what := terminate(pid, start, "nbdfuse")) is not None:
                done.append(what)
        except AttachError as exc:
            problems.append(str(exc))

    # 4. Our files, once nothing is mounted on the directory.
    if not mounts_at(mountdir):
        for remove, path in ((os.rmdir, mountdir), (os.unlink, pidfile)):
            try:
                remove(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # e.g. someone put files in the directory: not worth failing
                log.warning("attach: cannot remove %s: %s", path, exc)
    return problems


def _our_nbdfuse(att: Attachment, fuse_file: str, pidfile: str) -> list[tuple[int, int | None]]:
    """(pid, start time) of every nbdfuse serving our file in our mount namespace: the one we
    recorded, the one in its pid file, and any other (a crash before the state was saved)."""
    found: dict[int, int | None] = {}
    if att.nbdfuse_pid and proc_alive(att.nbdfuse_pid, att.nbdfuse_start):
        found[att.nbdfuse_pid] = att.nbdfuse_start
    candidates = set(list_pids())
    pid = _read_pidfile(pidfile)
    if pid is not None:
        candidates.add(pid)
    ours = mount_ns()
    for pid in candidates:
        if pid in found:
            continue
        argv = proc_cmdline(pid)
        if not argv or os.path.basename(argv[0]) != NBDFUSE or fuse_file not in argv:
            continue
        if mount_ns(pid) != ours:
            continue  # another node's nbdfuse with the same path
        start = proc_start_time(pid)
        if start is not None and proc_alive(pid, start):
            found[pid] = start
    return sorted(found.items())


def fuse_leftovers(att: Attachment) -> list[str]:
    """What of a fuse attachment exists right now (for tests and status): loops, mounts, daemons."""
    mountdir, fuse_file, pidfile, _ = fuse_paths(att.statedir, att.name)
    mountdir = att.mountdir or mountdir
    fuse_file = att.fuse_file or fuse_file
    left = [f"loop {d}" for d in our_loops(mountdir, fuse_file, att.device)]
    left += [f"mount {m.mountpoint}" for m in mounts_at(mountdir)]
    left += [f"nbdfuse pid {p}" for p, _ in _our_nbdfuse(att, fuse_file, pidfile)]
    return left
