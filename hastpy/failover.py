"""The promote and demote sequences that VIP hooks run (hast.md §10, made safe).

promote: wait (bounded) until the peer no longer holds the primary role here, become primary,
wait for /dev/hast/<name>, check the filesystem, mount it. demote: stop a promote still running,
unmount (refuse while busy unless forced), become secondary. Every step is logged with the
resource name, checks state before acting (so running a sequence twice is harmless), and is
bounded in time. The hook scripts stay thin: they only call `hastctl promote|demote`.

Exit codes: 0 done; 64 usage; 69 hastd unreachable; 73 mount failed; 75 (EX_TEMPFAIL) the peer
is still primary, or the mount is busy (demote without --force); 65 fsck found errors it could
not fix; 66 the local data is marked inconsistent (a synchronization to this node did not finish)
and the peer with the newer copy is gone: promoting would serve older data, so the role stays
init until the peer is back or an operator runs `hastctl role --force primary`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from hastpy import config as cfgmod
from hastpy import constants as const
from hastpy import control
from hastpy.errors import HastError

log = logging.getLogger("hast.failover")

# ucarp_up.sh waits 30 s for the remote primary to go away before giving up.
PEER_WAIT = 30.0
# ucarp_up.sh waits 5 s for /dev/hast/<name>; the Handbook's script waits 30 s. Attaching a FUSE
# export and a loop device takes well under a second here.
DEVICE_WAIT = 30.0
FSCK_TIMEOUT = 600.0  # a journal replay is seconds; a full check of a large ext4 takes minutes
MOUNT_TIMEOUT = 120.0
# A forced demote gives a plain unmount this long before it drops the role under it: writes
# stuck waiting for a peer that vanished would otherwise hold it for the replication timeout.
FORCED_UMOUNT_WAIT = 3.0
POLL = 0.05
PEER_POLL = 0.5  # the remote primary's connection drops within the secondary's receive timeout
# Where a running promote records its pid, so a demote can stop it (ucarp_down.sh kills
# ucarp_up.sh by process group for the same reason).
PIDDIR = "/run/hastpy"
KILL_GRACE = 5.0


class FailoverError(HastError):
    pass


class PeerStillPrimary(FailoverError):
    exit_code = os.EX_TEMPFAIL


class Busy(FailoverError):
    exit_code = os.EX_TEMPFAIL


class MountFailed(FailoverError):
    exit_code = os.EX_CANTCREAT


class FsckFailed(FailoverError):
    exit_code = os.EX_DATAERR


class StaleData(FailoverError):
    exit_code = const.STALE_DATA_EXIT


@dataclass(frozen=True)
class Target:
    """What to mount where; fstype None means: only make the device, mount nothing."""

    mountpoint: str | None = None
    fstype: str = "ext4"
    options: str = "defaults"


class Failover:
    def __init__(self, cfg: cfgmod.Config, name: str, timeouts: dict | None = None):
        res = cfg.resource(name)
        if res is None:
            raise FailoverError(f"resource {name!r} is not configured in {cfg.path}")
        self.cfg = cfg
        self.res = res
        self.control_path = cfgmod.parse_control_address(cfg.control)
        self.t = {"peer": PEER_WAIT, "device": DEVICE_WAIT, **(timeouts or {})}

    @property
    def device(self) -> str:
        return os.path.join(self.res.devdir, self.res.provname)

    def step(self, text: str, *args) -> None:
        log.info("[%s] " + text, self.res.name, *args)

    def status(self) -> dict:
        reply = control.call(self.control_path, {"cmd": "status", "resources": [self.res.name]})
        return reply["resources"][0]

    def set_role(self, role: str, force: bool = False) -> None:
        reply = control.call(self.control_path, {"cmd": "role", "role": role, "resources": [self.res.name], "force": force})
        err = reply["resources"][0].get("error")
        if err:
            raise (Busy if reply["resources"][0].get("busy") else FailoverError)(f"{self.res.name}: {err}")

    # -- promote --------------------------------------------------------------------------------

    def promote(self, target: Target) -> None:
        with _PidFile(self.res.name):
            st = self.status()
            if st["role"] != "primary":
                self._wait_peer_gone(st)
                self.step("Setting role to primary.")
                self.set_role("primary")
            else:
                self.step("Already primary.")
            self._wait_device()
            if target.mountpoint and not _mounted_at(target.mountpoint):
                self._fsck(target.fstype)
                self._mount(target)
            elif target.mountpoint:
                self.step("Already mounted on %s.", target.mountpoint)
            self.step("Promoted.")

    def _wait_peer_gone(self, st: dict) -> None:
        # A secondary worker exists only while a primary is connected to us: the peer is alive
        # and primary. Promoting now would make two primaries.
        deadline = time.monotonic() + self.t["peer"]
        while st["role"] == "secondary" and st.get("workerpid"):
            if time.monotonic() >= deadline:
                raise PeerStillPrimary(f"{self.res.name}: the peer is still connected as primary after {self.t['peer']:g} s; not promoting")
            self.step("Waiting for the remote primary to go away.")
            time.sleep(PEER_POLL)
            st = self.status()

    def _wait_device(self) -> None:
        deadline = time.monotonic() + self.t["device"]
        while True:
            st = self.status()
            # The role first: a worker that refused to serve has already set it back to init.
            if st["role"] != "primary":
                if st.get("worker_exit") == const.STALE_DATA_EXIT:
                    raise StaleData(f"{self.res.name}: {st.get('worker_error')}")
                raise FailoverError(f"{self.res.name}: role changed to {st['role']} while waiting for the device")
            if st.get("attach") == "none" and st.get("serving"):
                self.step("No device (attach none): the export is %s.", st.get("nbd_socket"))
                return
            if st.get("device_ready") or (os.path.exists(self.device) and st.get("workerpid")):
                self.step("Device %s is ready.", self.device)
                return
            if time.monotonic() >= deadline:
                what = "the export was not served" if st.get("attach") == "none" else f"{self.device} did not appear"
                raise FailoverError(f"{self.res.name}: {what} within {self.t['device']:g} s")
            time.sleep(POLL)

    def _fsck(self, fstype: str) -> None:
        if fstype not in ("ext2", "ext3", "ext4"):
            self.step("No check for %s (journaled; checked at mount).", fstype)
            return
        self.step("Checking the filesystem on %s.", self.device)
        cp = _run(["fsck." + fstype, "-p", self.device], FSCK_TIMEOUT)
        if cp.returncode & ~1:  # 1 = errors corrected
            self.step("fsck -p could not fix everything (status %d): running fsck -y.", cp.returncode)
            cp = _run(["fsck." + fstype, "-y", self.device], FSCK_TIMEOUT)
            if cp.returncode & ~3:  # 2 = corrected, reboot advised (irrelevant for an unmounted fs)
                raise FsckFailed(f"{self.res.name}: fsck -y failed with status {cp.returncode}: {cp.stderr.strip()}")
        self.step("Filesystem clean.")

    def _mount(self, target: Target) -> None:
        os.makedirs(target.mountpoint, exist_ok=True)
        self.step("Mounting %s on %s.", self.device, target.mountpoint)
        cp = _run(["mount", "-t", target.fstype, "-o", target.options, self.device, target.mountpoint], MOUNT_TIMEOUT)
        if cp.returncode:
            raise MountFailed(f"{self.res.name}: mount failed: {cp.stderr.strip()}")

    # -- demote ---------------------------------------------------------------------------------

    def demote(self, target: Target, force: bool = False) -> None:
        _stop_promote(self.res.name, self.step)
        dropped = False
        if target.mountpoint and _mounted_at(target.mountpoint):
            dropped = self._umount(target.mountpoint, force)
        st = self.status()
        if st["role"] == "secondary":
            self.step("Already secondary.")
        else:
            self.step("Setting role to secondary.")
            self.set_role("secondary", force=force or dropped)
        self.step("Demoted.")

    def _umount(self, mountpoint: str, force: bool) -> bool:
        """Unmount; True if the role had to be dropped first (forced) to let it finish."""
        self.step("Unmounting %s.", mountpoint)
        cp = _run(["umount", mountpoint], MOUNT_TIMEOUT if not force else FORCED_UMOUNT_WAIT, check_timeout=not force)
        if cp is not None and cp.returncode == 0:
            return False
        if not force:
            raise Busy(f"{self.res.name}: {mountpoint} is busy ({cp.stderr.strip()}); use --force to kill its users")
        # Forced: this node is losing the service. Kill the users; if the unmount still cannot
        # finish (writes waiting on a peer that is gone), drop the role so that they fail
        # instead of being acknowledged here alone, then detach the mount.
        self.step("Killing the processes using %s.", mountpoint)
        _run(["fuser", "-km", mountpoint], MOUNT_TIMEOUT)
        proc = subprocess.Popen(["umount", mountpoint], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if proc.wait(FORCED_UMOUNT_WAIT) == 0:
                return False
        except subprocess.TimeoutExpired:
            pass
        self.step("Unmount blocked or refused: giving up the role by force, then detaching %s.", mountpoint)
        self.set_role("secondary", force=True)
        try:
            proc.wait(MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
        if _mounted_at(mountpoint):
            _run(["umount", "-l", mountpoint], MOUNT_TIMEOUT)
        return True


def _run(argv: list[str], timeout: float, check_timeout: bool = True) -> subprocess.CompletedProcess | None:
    """Run a command; a timeout is an error, or None when check_timeout is False."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise FailoverError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        if not check_timeout:
            return None
        raise FailoverError(f"{' '.join(argv)} did not finish within {timeout:g} s") from None


def _mounted_at(mountpoint: str) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _pidfile(name: str) -> str:
    return os.path.join(PIDDIR, f"promote-{name}.pid")


class _PidFile:
    def __init__(self, name: str):
        self.path = _pidfile(name)

    def __enter__(self):
        os.makedirs(PIDDIR, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(f"{os.getpid()}\n")

    def __exit__(self, *exc):
        try:
            with open(self.path) as f:
                if int(f.read().strip() or 0) == os.getpid():
                    os.unlink(self.path)
        except (OSError, ValueError):
            pass


def _stop_promote(name: str, step) -> None:
    """Kill a promote of this resource that is still running (TERM, then KILL)."""
    try:
        with open(_pidfile(name)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    if pid == os.getpid() or not _alive(pid):
        return
    step("Stopping the promote still running (pid %d).", pid)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(POLL)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
