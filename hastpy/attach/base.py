"""What every attach method shares: the Attachment record and its state file, errors, bounded
external commands, process identity, mount table parsing, the device link, and busy().

State on disk. `statedir/<name>.attach.json` describes one resource's attachment. It is written
(atomically: temporary file, fsync, rename) *before* each step that creates something, with
everything needed to find that thing again, so that `cleanup_stale()` can undo a half-made or
orphaned attachment after any crash, including kill -9 of the supervisor, the worker and nbdfuse
together. Names derived from (statedir, name) - the FUSE mount directory, the nbdfuse pid file -
are fixed, so even a lost or corrupt state file leaves enough to clean up by.

Namespaces. Everything is done in the caller's mount namespace (the supervisor runs in the
node's), never in a private one: the device, the FUSE mount and the link must be visible where
the filesystem is mounted. Several lab nodes share one kernel (network and mount namespaces on
one host), so a loop device, a FUSE mount or an nbdfuse process is only taken as ours after
checking identity that another node cannot share: our mount table, device numbers, our mount
namespace, process start times - never a path alone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

from hastpy.errors import HastError

log = logging.getLogger(__name__)

# --- Limits and names, each with its reason ---------------------------------------------------

# Logical block size of every device we make. The same on every node and for every method, so a
# filesystem made through one attach method (loop on node-a) mounts through the other (kernel nbd
# on node-b): XFS refuses a device whose logical block is larger than its sector size.
SECTOR_SIZE = 512
# Polling period while waiting for something the kernel or a helper does asynchronously.
POLL_INTERVAL = 0.02
# After SIGKILL, how long we wait for a helper to go away. A process stuck in uninterruptible
# I/O sleep (D state) cannot die until its I/O ends; we then stop waiting, report it, and leave
# a thread to reap it, rather than hang the supervisor.
KILL_GRACE = 2.0
# SIGTERM to exit for a daemon we started (nbdfuse). With its mount gone it exits within
# milliseconds; one still alive after this long is stuck on a hung server, and only SIGKILL
# (which aborts its FUSE connection) frees it.
TERM_TIMEOUT = 3.0
# Removing a device node can lag the kernel object by a moment (devtmpfs, udev); bound the wait.
DEVICE_NODE_TIMEOUT = 5.0

STATE_VERSION = 1
STATE_SUFFIX = ".attach.json"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
METHODS = ("kernel", "fuse", "none")

# Helpers run with a fixed locale so the stderr we log and match is English.
_CMD_ENV = {**os.environ, "LC_ALL": "C"}


# --- Errors -----------------------------------------------------------------------------------


class AttachError(HastError):
    """The block device could not be made, or could not be completely torn down."""

    exit_code = os.EX_OSERR


class DeviceBusy(HastError):
    """The device is mounted or open: detaching now would pull it from under its user.

    Nothing has been torn down when this is raised; retry after unmounting/closing."""

    exit_code = os.EX_TEMPFAIL

    def __init__(self, device: str, reason: str, name: str = "", advice: str = "unmount or close it first") -> None:
        self.device = device
        self.reason = reason
        self.detail = f"{device} is busy ({reason}); {advice}"  # without the resource's name
        super().__init__(f"{name}: {self.detail}" if name else self.detail)


# --- The record -------------------------------------------------------------------------------


@dataclass
class Attachment:
    """One resource's attachment, as the supervisor holds it and as the state file stores it.

    `device` is the block device (/dev/loopN, /dev/nbdN; None for `none` or before it exists),
    `link` is devdir/provname (None for `none`). The fuse and kernel fields are None for other
    methods. Every field is plain JSON; `from_dict` ignores keys it does not know, so an older
    hastpy can still clean up after a newer one.
    """

    method: str
    name: str
    provname: str
    socket_path: str
    size: int
    devdir: str
    statedir: str
    device: str | None = None
    link: str | None = None
    # fuse: the FUSE mount directory, the file nbdfuse exposes in it, the FUSE connection's
    # device number ("major:minor" from mountinfo) and the nbdfuse process (pid + start time in
    # clock ticks since boot, so a reused pid is never mistaken for it).
    mountdir: str | None = None
    fuse_file: str | None = None
    fuse_dev: str | None = None
    nbdfuse_pid: int | None = None
    nbdfuse_start: int | None = None
    # kernel: device index and the backend identifier written to /sys/block/nbdN/backend.
    nbd_index: int | None = None
    backend_id: str | None = None
    # Which boot made it: after a reboot no kernel object (loop, mount, process) can survive.
    boot_id: str | None = None
    created: float = 0.0
    version: int = STATE_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Attachment:
        known = {f.name for f in fields(cls)}
        missing = {"method", "name"} - d.keys()
        if missing:
            raise ValueError(f"state lacks {', '.join(sorted(missing))}")
        if isinstance(d.get("version"), int) and d["version"] > STATE_VERSION:
            log.warning("attach state for %s has version %s (ours %d); reading what we know",
                        d.get("name"), d.get("version"), STATE_VERSION)
        defaults = {"provname": d["name"], "socket_path": "", "size": 0, "devdir": "", "statedir": ""}
        values = {**defaults, **{k: v for k, v in d.items() if k in known}}
        for key, value in values.items():
            allowed = _FIELD_TYPES[key]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ValueError(f"field {key!r} has a {type(value).__name__}")
        return cls(**values)


_STR, _OPT_STR, _OPT_INT = (str,), (str, type(None)), (int, type(None))
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "method": _STR, "name": _STR, "provname": _STR, "socket_path": _STR, "size": (int,),
    "devdir": _STR, "statedir": _STR, "device": _OPT_STR, "link": _OPT_STR, "mountdir": _OPT_STR,
    "fuse_file": _OPT_STR, "fuse_dev": _OPT_STR, "nbdfuse_pid": _OPT_INT, "nbdfuse_start": _OPT_INT,
    "nbd_index": _OPT_INT, "backend_id": _OPT_STR, "boot_id": _OPT_STR, "created": (int, float),
    "version": (int,),
}  # fmt: skip


def state_path(statedir: str, name: str) -> str:
    return os.path.join(statedir, name + STATE_SUFFIX)


def save_state(att: Attachment) -> None:
    """Write the record atomically and durably: a crash leaves the old or the new file, whole."""
    os.makedirs(att.statedir, mode=0o700, exist_ok=True)
    path = state_path(att.statedir, att.name)
    tmp = f"{path}.{os.getpid()}.tmp"
    data = json.dumps(att.to_dict(), indent=1, sort_keys=True).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(att.statedir)


def load_state(statedir: str, name: str) -> Attachment | None:
    """The recorded attachment of `name`, None if there is none. A file that cannot be read as
    one raises AttachError (the caller decides whether conventions can stand in for it)."""
    path = state_path(statedir, name)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return Attachment.from_dict(d)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise AttachError(f"{path}: unreadable attach state: {exc}") from exc


def remove_state(statedir: str, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(statedir, name))
        _fsync_dir(statedir)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def boot_id() -> str | None:
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


# --- External commands, always bounded --------------------------------------------------------


@dataclass(frozen=True)
class CmdResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: it did not finish within its timeout and was killed
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        what = "timed out" if self.returncode is None else f"exit status {self.returncode}"
        err = self.stderr.strip()
        return f"`{' '.join(self.argv)}` {what}" + (f": {err}" if err else "")


def run_command(argv: Sequence[str], timeout: float, *, quiet: bool = False) -> CmdResult:
    """Run a helper with a hard bound on our wait; failures are logged with its stderr.

    Contract: returns within about timeout + KILL_GRACE whatever the helper does. A helper that
    cannot be killed (D state: e.g. `losetup -d` waiting for I/O on a hung FUSE daemon) is left
    to a reaper thread; the returned result says it timed out. `quiet`: an expected failure
    (probing) is logged at debug level only.
    """
    argv = tuple(argv)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_CMD_ENV,
            close_fds=True,
        )
    except OSError as exc:
        result = CmdResult(argv, 127, "", str(exc))
        log.log(logging.DEBUG if quiet else logging.WARNING, "attach: %s", result.describe())
        return result
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            out, err = proc.communicate(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            out, err = "", ""
            _abandon(proc)
        result = CmdResult(argv, None, out or "", err or "")
        log.warning("attach: %s (after %.0f s)", result.describe(), timeout)
        return result
    result = CmdResult(argv, proc.returncode, out, err)
    if not result.ok:
        log.log(logging.DEBUG if quiet else logging.WARNING, "attach: %s", result.describe())
    return result


def _abandon(proc: subprocess.Popen) -> None:
    """Stop waiting for an unkillable helper; a daemon thread reaps it when its I/O ends."""
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    log.error("attach: pid %d (%s) is stuck in the kernel; no longer waiting for it", proc.pid, proc.args)
    threading.Thread(target=proc.wait, name=f"reap {proc.pid}", daemon=True).start()


def wait_until(predicate, timeout: float, interval: float = POLL_INTERVAL) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds have passed; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- Processes --------------------------------------------------------------------------------

# Children we started (nbdfuse), by pid, so that we reap them (no zombies while the supervisor
# lives) and can tell "exited" from "running" without racing a pid's reuse.
_children: dict[int, subprocess.Popen] = {}
_children_lock = threading.Lock()


def register_child(proc: subprocess.Popen) -> None:
    with _children_lock:
        _children[proc.pid] = proc


def _reap(pid: int) -> None:
    """Collect the exit status of a child *we registered*. Never waitpid() any other pid: it
    may be another child of the caller (a supervisor's worker) whose status is not ours."""
    with _children_lock:
        proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        with _children_lock:
            _children.pop(pid, None)


def parse_proc_stat(text: str) -> tuple[str, int, int]:
    """(state letter, ppid, start time in clock ticks) from /proc/<pid>/stat. The command name
    in parentheses may itself contain spaces and parentheses: split after the last ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[19])


def proc_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return parse_proc_stat(f.read())[2]
    except (OSError, ValueError, IndexError):
        return None


def proc_alive(pid: int, start: int | None = None) -> bool:
    """True if `pid` is a live process (not a zombie) and, given `start`, the same process."""
    _reap(pid)
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            state, _, started = parse_proc_stat(f.read())
    except (OSError, ValueError, IndexError):
        return False
    if state in ("Z", "X", "x"):
        return False
    return start is None or started == start


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def proc_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def mount_ns(pid: int | str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def list_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def terminate(pid: int, start: int | None, what: str) -> str | None:
    """Stop one of our daemons: SIGTERM, then SIGKILL after TERM_TIMEOUT. Returns what was done,
    or None if it was not running. Raises AttachError if it survives SIGKILL (D state)."""
    if not proc_alive(pid, start):
        return None
    for sig, timeout in ((signal.SIGTERM, TERM_TIMEOUT), (signal.SIGKILL, KILL_GRACE)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_until(lambda: not proc_alive(pid, start), timeout):
            return f"stopped {what} (pid {pid}, {signal.Signals(sig).name})"
    raise AttachError(f"{what} (pid {pid}) does not die even with SIGKILL")


def kill_now(pid: int, start: int | None, what: str) -> str | None:
    """SIGKILL at once: used to break a hang, when waiting for a clean exit is what hangs."""
    if not proc_alive(pid, start):
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not proc_alive(pid, start), KILL_GRACE)
    return f"killed {what} (pid {pid})"


# --- The mount table --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mount:
    mount_id: int
    dev: str  # "major:minor" of the mounted filesystem (st_dev of its files)
    root: str
    mountpoint: str
    fstype: str
    source: str


_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape_mount_field(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """proc(5) mountinfo: `id parent major:minor root mountpoint options [optional...] - fstype
    source superoptions`. The optional fields end at the lone "-" separator."""
    mounts = []
    for line in text.splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)
            mounts.append(
                Mount(
                    mount_id=int(parts[0]),
                    dev=parts[2],
                    root=unescape_mount_field(parts[3]),
                    mountpoint=unescape_mount_field(parts[4]),
                    fstype=parts[sep + 1],
                    source=unescape_mount_field(parts[sep + 2]),
                )
            )
        except (ValueError, IndexError):
            log.debug("attach: unparsable mountinfo line %r", line)
    return mounts


def read_mounts() -> list[Mount]:
    """The mounts of our own mount namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mounts_at(path: str) -> list[Mount]:
    return [m for m in read_mounts() if m.mountpoint == path]


def devnum(text: str) -> int:
    major, minor = text.split(":")
    return os.makedev(int(major), int(minor))


# --- The device link --------------------------------------------------------------------------


def make_link(link: str, target: str) -> None:
    """Point `link` at `target` atomically (symlink to a temporary name, rename over). A stale
    symlink is replaced; anything else at that path is not ours and is an error."""
    directory = os.path.dirname(link)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        st = os.lstat(link)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISLNK(st.st_mode):
            raise AttachError(f"{link} exists and is not a symbolic link; not replacing it")
    tmp = os.path.join(directory, f".{os.path.basename(link)}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    try:
        os.rename(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_link(link: str | None, targets: Iterable[str] | None = None) -> str | None:
    """Remove `link` if it is a symbolic link (and, given `targets`, points at one of them)."""
    if not link:
        return None
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            log.warning("attach: %s is not a symbolic link; leaving it", link)
            return None
        raise
    if targets is not None and target not in set(targets):
        log.warning("attach: %s points at %s, not at our device; leaving it", link, target)
        return None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)
    return f"removed link {link} -> {target}"


def links_to(devdir: str, targets: Iterable[str]) -> list[str]:
    """Symbolic links directly in `devdir` that point at one of `targets`."""
    wanted = set(targets)
    found = []
    try:
        entries = os.listdir(devdir)
    except OSError:
        return found
    for entry in entries:
        path = os.path.join(devdir, entry)
        with contextlib.suppress(OSError):
            if os.readlink(path) in wanted:
                found.append(path)
    return found


# --- busy() -----------------------------------------------------------------------------------


def device_busy(device: str, extra_paths: Sequence[str] = ()) -> str | None:
    """Why `device` must not be detached now, or None. The checks, cheapest and most specific
    first; together they cover every user we know of:

    1. mounted here: the device's major:minor (st_dev of a filesystem on it) or its path as the
       source in our /proc/self/mountinfo - the namespace where the supervisor, hooks and
       `mount /dev/hast/x` run;
    2. stacked on: /sys/dev/block/M:m/holders is non-empty (device-mapper, md, ...);
    3. open by a process: a /proc/<pid>/fd link to the device (names the pid: mkfs, dd, qemu) or,
       for `extra_paths` (the nbdfuse file under a loop device), to one of those paths;
    4. claimed exclusively: our own open(O_EXCL) fails with EBUSY. The kernel holds a device
       exclusively while a filesystem is mounted on it in *any* mount namespace, while it is
       swap, and while mkfs/fsck/another O_EXCL opener has it; this catches what 1-3 cannot see.

    Reads only kernel tables and never stats anything outside /dev, so it cannot hang on a dead
    FUSE daemon. Check 4 opens the device read-only and closes it at once (no I/O).
    """
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    rdev = st.st_rdev
    majmin = f"{os.major(rdev)}:{os.minor(rdev)}"
    names = {device, os.path.realpath(device)}
    for m in read_mounts():
        if m.dev == majmin or m.source in names:
            return f"mounted on {m.mountpoint}"
    try:
        holders = sorted(os.listdir(f"/sys/dev/block/{majmin}/holders"))
    except OSError:
        holders = []
    if holders:
        return f"held by {', '.join(holders)}"
    opener = find_opener(rdev, names | set(extra_paths))
    if opener is not None:
        return opener
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return "in exclusive use (a mount in another namespace, swap, or an exclusive opener)"
        return None
    os.close(fd)
    return None


def find_opener(rdev: int, paths: set[str]) -> str | None:
    """'open by pid N (comm)' for the first process with an fd on block device `rdev` or on one
    of `paths`. Only /dev paths are stat()ed: anything else might sit on a hung FUSE mount."""
    me = os.getpid()
    for pid in list_pids():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            hit = target in paths
            if not hit and target.startswith("/dev/"):
                try:
                    st = os.stat(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                hit = stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev
            if hit:
                who = "us" if pid == me else proc_comm(pid)
                return f"open by pid {pid} ({who})"
    return None
