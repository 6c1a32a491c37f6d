"""/dev/hast/<name> end to end (issue #4): two real hastd daemons, `attach fuse`, real ext4 and fio.

Each test gets a fullsync pair on its own 127.X.Y.{1,2} whose resource `data` is attached on the
primary through nbdfuse + a direct-I/O loop device and linked as the node's `dev/data`. What is
proved, test by test:

- the filesystem made through node-a's device is clean and, after a switchover with hastctl
  (a secondary, b primary), mounts through node-b's device with every file intact, read from
  node-b's own provider;
- fio's crc32c verification passes through the device, random and sequential writes;
- leaving primary is refused while mounted (exit 75, nothing torn down) and, once unmounted,
  leaves nothing behind: no loop, mount, link or nbdfuse of this test;
- kill -9 of the primary worker under a mounted filesystem: exactly what hastd does then.

Every external command runs with a timeout (the constants below say why each is what it is): a
hung umount or losetup fails the test instead of hanging the suite. The fixture unmounts, stops
both daemons and sweeps with cleanup_stale() even when a test fails, then checks for residue.
Only this test's objects are looked at (by its paths and pids): other tests and labs on the same
machine may hold loop devices and mounts of their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import MiB, Node, Pair, block_device_unavailable, sha, wait_for
from hastpy.attach import cleanup_stale
from hastpy.constants import PROTO_VERSION
from hastpy.attach.base import proc_cmdline
from hastpy.attach.fuse import fuse_paths

RES = "data"
SIZE = 64 * MiB

# --- Timeouts. None of these operations takes more than a few seconds here; the bounds are for
# a loaded 2-core CI machine shared with other suites, and far below "hung forever". ----------

# mkfs.ext4 of 64 MiB with eager init writes ~10 MiB through fullsync replication.
MKFS_TIMEOUT = 120.0
# mount replays at most a small journal; umount flushes at most a few MiB. Longer means hung:
# exactly the failure this file exists to catch (a dead FUSE daemon under the loop).
MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 60.0
# `sync -f` writes back what the test wrote (a few MiB) through the device.
SYNC_TIMEOUT = 60.0
# e2fsck -fn reads the metadata of a 64 MiB filesystem.
FSCK_TIMEOUT = 120.0
# losetup -a lists loop devices: ioctls and sysfs only, never I/O through a device.
LOSETUP_TIMEOUT = 30.0
# fio: 2 x FIO_SIZE written 4-64 KiB at a time with fullsync, then all read back to verify.
FIO_TIMEOUT = 300.0
# A single small I/O probe (dd) on a device or filesystem whose server may be gone: EIO is
# immediate once nbdfuse is dead, so a probe still running after this long is hung.
PROBE_TIMEOUT = 30.0
# From `hastctl role primary` (or a worker restart, 1 s delay) to /dev/hast/data usable: worker
# start, connect to the peer (or give up after the pair's 5 s timeout), nbdfuse, losetup.
DEVICE_READY_TIMEOUT = 45.0
# From kill -9 of the worker to the supervisor having reaped it and torn its device down.
REAP_TIMEOUT = 30.0
# After the last close of a loop marked autoclear, the kernel releases it (from a work queue on
# recent kernels, so not necessarily before umount returns).
LOOP_RELEASE_TIMEOUT = 15.0
# A killed command that is still there after this long is stuck in the kernel: stop waiting.
KILL_GRACE = 5.0
# Replication caught up after the test's writes (all acknowledged already under fullsync).
COMPLETE_TIMEOUT = 60.0

# The writer of the kill test writes its first MiB (fullsync, one fsync) within this long.
WRITER_START_TIMEOUT = 30.0

FIO_SIZE = 16 * MiB

# Rewrites the first 16 MiB of a file with O_DIRECT 64 KiB writes and an fsync every 1 MiB, until
# an error ends it; says "writing" once the first MiB is on the device.
WRITER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
buf = mmap.mmap(-1, 65536)  # page-aligned, as O_DIRECT needs
buf.write(os.urandom(65536))
n = 0
while True:
    os.pwrite(fd, buf, (n % 256) * 65536)
    n += 1
    if n % 16 == 0:
        os.fsync(fd)
        if n == 16:
            print("writing", flush=True)
"""

REQUIRED_TOOLS = ("nbdfuse", "losetup", "fusermount3", "mkfs.ext4", "e2fsck", "mount", "umount", "sync", "dd")


UNAVAILABLE = block_device_unavailable(REQUIRED_TOOLS)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.root,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
]


class Hung(AssertionError):
    """An external command did not finish within its bound: what these tests exist to catch."""


def run(argv: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    """Every external command of this file goes through here: always bounded, even if the
    command is stuck in the kernel (D state), where subprocess.run would wait for it forever
    after killing it. Raises Hung on timeout, AssertionError on failure if `check`."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=KILL_GRACE)  # else it stays stuck: leave it, do not hang too
        raise Hung(f"{argv} still running after {timeout:.0f} s") from None
    cp = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and cp.returncode != 0:
        raise AssertionError(f"{argv} -> {cp.returncode}: {cp.stdout}{cp.stderr}")
    return cp


def mountpoints(prefix: str) -> list[str]:
    """Mount points in our mount namespace at or under `prefix`, or with a source under it."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if prefix in line:
                found.append(line.split(" ")[4])
    return found


def is_mounted(path: Path) -> bool:
    return str(path) in mountpoints(str(path))


def loop_backing(device: str) -> str | None:
    """The backing file the kernel reports for a loop device, None if it is not bound."""
    try:
        return Path(f"/sys/block/{os.path.basename(device)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def diskseq(device: str) -> int | None:
    """The kernel's sequence number of the disk's current media: a loop device gets a new one
    each time it is bound, so (device, diskseq) names one binding even if the number is reused."""
    try:
        return int(Path(f"/sys/block/{os.path.basename(device)}/diskseq").read_text())
    except (OSError, ValueError):
        return None


def binding_gone(device: str, seq: int | None) -> bool:
    """The binding `seq` of loop `device` no longer exists. Another test or lab on this machine
    may already have bound the same loop number again: that is a different binding."""
    return loop_backing(device) is None or diskseq(device) != seq


def our_nbdfuse_pids(node: Node) -> list[int]:
    """Live nbdfuse processes serving this node's FUSE file (found by command line)."""
    fuse_file = fuse_paths(str(node.statedir), RES)[1]
    pids = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        argv = proc_cmdline(pid)
        if argv and os.path.basename(argv[0]) == "nbdfuse" and fuse_file in argv:
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(pid)
    return pids


def residue(node: Node) -> list[str]:
    """What of this node's attachment exists now, found without the attach code's own logic:
    loops backed by its nbdfuse file, mounts under its directory, entries in its devdir, nbdfuse
    processes serving its file."""
    fuse_file = fuse_paths(str(node.statedir), RES)[1]
    left = []
    losetup = run(["losetup", "-a"], LOSETUP_TIMEOUT).stdout
    left += [f"loop: {line}" for line in losetup.splitlines() if fuse_file in line]
    left += [f"mount: {m}" for m in mountpoints(str(node.dir))]
    devdir = node.devlink().parent
    if devdir.is_dir() and os.listdir(devdir):
        left.append(f"devdir: {os.listdir(devdir)}")
    left += [f"nbdfuse pid {pid}" for pid in our_nbdfuse_pids(node)]
    return left


def log_of(node: Node) -> str:
    return node.log.read_text(errors="replace")


class DevPair:
    """A started fuse pair plus the mount points its test uses, for the fixture to clean up."""

    def __init__(self, pair: Pair, base: Path):
        self.pair = pair
        self.a, self.b = pair.a, pair.b
        self.base = base
        self.mounts: list[Path] = []
        self.procs: list[subprocess.Popen] = []

    def mnt(self, name: str) -> Path:
        path = self.base / name
        path.mkdir(exist_ok=True)
        return path

    def mount(self, node: Node, mnt: Path) -> None:
        self.mounts.append(mnt)
        run(["mount", str(node.devlink()), str(mnt)], MOUNT_TIMEOUT)

    def umount(self, mnt: Path) -> None:
        run(["umount", str(mnt)], UMOUNT_TIMEOUT)

    def spawn_writer(self, path: Path) -> subprocess.Popen:
        """A process writing (O_DIRECT, fsync) to `path` in a loop until an error ends it;
        returns once it is writing. Killed by the fixture if still alive."""
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], WRITER_START_TIMEOUT)
        assert ready and proc.stdout.readline().strip() == "writing", "the writer did not start"
        return proc


def wait_device(node: Node, not_device: str | None = None) -> str:
    """Wait until node's /dev/hast/data is attached (and, given not_device, is a new device)."""

    def ready():
        st = node.status()
        if not st.get("device_ready") or not os.path.lexists(node.devlink()):
            return None
        target = os.readlink(node.devlink())
        return target if target != not_device else None

    return wait_for(ready, DEVICE_READY_TIMEOUT, 0.1, what=f"{node.name}'s {node.devlink()}")


@pytest.fixture
def dev_pair(make_pair, tmp_path):
    pair: Pair = make_pair(size=SIZE, attach="fuse")
    dp = DevPair(pair, tmp_path)
    try:
        pair.start()
        wait_device(pair.a)
        yield dp
    finally:
        for proc in dp.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=PROBE_TIMEOUT)
        # Whatever the test did: unmount (lazily if a dead device refuses), stop both daemons
        # (hastd tears down its devices by force on SIGTERM), sweep what a crash could leave,
        # kill any nbdfuse of ours by pid, then insist nothing is left.
        for mnt in reversed(dp.mounts):
            if is_mounted(mnt):
                with contextlib.suppress(Hung):
                    if run(["umount", str(mnt)], UMOUNT_TIMEOUT, check=False).returncode == 0:
                        continue
                run(["umount", "-l", str(mnt)], UMOUNT_TIMEOUT, check=False)
        workers = pair.a.worker_pids() + pair.b.worker_pids()  # found through hastd's pid: before stop
        pair.stop()
        for pid in workers:
            if "hastpy.worker" in " ".join(proc_cmdline(pid)):  # still the same process
                os.kill(pid, signal.SIGKILL)
        swept = []
        for node in (pair.a, pair.b):
            swept += cleanup_stale(RES, str(node.devlink().parent), str(node.statedir))
            for pid in our_nbdfuse_pids(node):
                os.kill(pid, signal.SIGKILL)
        left = residue(pair.a) + residue(pair.b)
        assert not left, f"left behind: {left} (final sweep did {swept})"


# --- files with known checksums ---------------------------------------------------------------


def write_tree(root: Path) -> dict[str, str]:
    """A small tree: nested directories, sizes from empty to several MiB (spanning extents)."""
    sizes = {"a/empty": 0, "a/one": 1, "a/b/page": 4096, "a/b/odd": 12345, "a/b/c/big": 3 * MiB + 17, "top": 700 * 1024}
    digests = {}
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        path.write_bytes(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def read_tree(root: Path, names) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in names}


def mkfs(node: Node) -> None:
    # Eager inode table and journal init: no ext4lazyinit thread writing behind the test's back
    # while it checks busy-ness or kills the worker.
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(node.devlink())], MKFS_TIMEOUT)


def fsck_clean(node: Node) -> None:
    cp = run(["e2fsck", "-fn", str(node.devlink())], FSCK_TIMEOUT, check=False)
    assert cp.returncode == 0, f"e2fsck -fn {node.devlink()}: {cp.returncode}\n{cp.stdout}{cp.stderr}"


# --- 1. a filesystem survives a switchover ----------------------------------------------------


def test_ext4_made_on_a_mounts_on_b_after_switchover(dev_pair):
    a, b = dev_pair.a, dev_pair.b
    mnt = dev_pair.mnt("mnt")
    mkfs(a)
    dev_pair.mount(a, mnt)
    digests = write_tree(mnt)
    run(["sync", "-f", str(mnt)], SYNC_TIMEOUT)  # this filesystem only: others may be hung
    dev_pair.umount(mnt)
    fsck_clean(a)

    dev_pair.pair.wait_complete(COMPLETE_TIMEOUT)
    a.role("secondary")
    assert residue(a) == []
    # Both providers hold the same bytes (fullsync), so whichever node serves, the data is there.
    assert sha(a.data()) == sha(b.data())

    b.role("primary")
    wait_device(b)
    dev_pair.mount(b, mnt)
    assert read_tree(mnt, digests) == digests
    st = b.status()
    assert st["role"] == "primary" and st["device"] == str(b.devlink())
    assert st["statistics"]["reads"] > 0  # served by node-b's worker
    # The source of every byte is node-b's own provider: the new primary is the sync source (the
    # extents keepdirty left dirty are copied b -> a), so its worker reads nothing from node-a.
    assert f"Connected to {a.ip} (protocol {PROTO_VERSION}, syncsrc=primary)." in log_of(b)
    dev_pair.umount(mnt)
    fsck_clean(b)


# --- 2. fio verify through the device ---------------------------------------------------------


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
def test_fio_crc32c_verify_random_and_sequential(dev_pair):
    a = dev_pair.a
    common = [
        f"--filename={a.devlink()}", "--direct=1", "--ioengine=psync", "--verify=crc32c",
        f"--size={FIO_SIZE}", "--output-format=json",
        "--verify_state_save=0",  # else fio drops *-verify.state files in the working directory
    ]  # fmt: skip
    jobs = [
        "--name=randwrite", "--rw=randwrite", "--bs=4k", "--offset=0",
        "--name=seqwrite", "--stonewall", "--rw=write", "--bs=64k", f"--offset={2 * FIO_SIZE}",
    ]  # fmt: skip
    cp = run(["fio", *common, *jobs], FIO_TIMEOUT, check=False)
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr
    report = json.loads(cp.stdout[cp.stdout.index("{") :])
    by_name = {job["jobname"]: job for job in report["jobs"]}
    assert sorted(by_name) == ["randwrite", "seqwrite"]
    for name, job in by_name.items():
        assert job["error"] == 0, (name, job["error"])
        assert job["write"]["io_bytes"] == FIO_SIZE, name
        assert job["read"]["io_bytes"] == FIO_SIZE, name  # the verify pass read every block back
    dev_pair.pair.wait_complete(COMPLETE_TIMEOUT)
    assert sha(a.data()) == sha(dev_pair.b.data())  # and every write reached the secondary


# --- 3. busy refusal, then a clean detach -----------------------------------------------------


def test_leaving_primary_while_mounted_is_refused_then_clean(dev_pair):
    a = dev_pair.a
    mnt = dev_pair.mnt("mnt")
    mkfs(a)
    dev_pair.mount(a, mnt)
    before = a.status()
    device = os.readlink(a.devlink())

    refused = a.hastctl("role", "secondary", RES, check=False)
    assert refused.returncode == os.EX_TEMPFAIL, refused
    assert refused.stderr == f"hastctl: {RES}: {device} is busy (mounted on {mnt}); unmount or close it first\n"
    assert "Traceback" not in refused.stderr

    # Nothing was torn down: same worker, same device, still mounted and working.
    st = a.status()
    assert (st["role"], st["workerpid"], st["device_ready"]) == ("primary", before["workerpid"], True)
    assert os.readlink(a.devlink()) == device
    assert loop_backing(device) == fuse_paths(str(a.statedir), RES)[1]
    assert is_mounted(mnt)
    data = os.urandom(256 * 1024)
    with open(mnt / "after-refusal", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    assert (mnt / "after-refusal").read_bytes() == data

    dev_pair.umount(mnt)
    a.role("secondary")
    st = a.status()
    assert (st["role"], st["device"], st["workerpid"]) == ("secondary", None, 0)
    assert residue(a) == []
    assert not os.path.exists(a.nbd_socket)


def test_reload_while_the_device_is_open_waits_for_the_next_role_change(dev_pair):
    """SIGHUP with a setting a running worker cannot take (here the provider's name) restarts
    the resource, which an open device forbids: the change waits, says so in the log and in
    `hastctl list`, and applies at the next role change. A hook-only change, or one the worker
    takes (the ack mode), needs no restart and applies at once, device open or not."""
    a, pair = dev_pair.a, dev_pair.pair
    before = a.status()
    a.params["exec"] = "/bin/true"
    a.write_conf(pair.a.dir, pair.b.dir, pair.ip_a, pair.ip_b)
    a.reload()
    wait_for(lambda: "[data] Hook settings changed." in log_of(a), what="hook-only reload")
    assert a.status()["workerpid"] == before["workerpid"]

    fd = os.open(a.devlink(), os.O_RDONLY)  # what a mount or a database holds
    try:
        a.params["res_extra"] = {RES: ["replication memsync"]}
        a.write_conf(pair.a.dir, pair.b.dir, pair.ip_a, pair.ip_b)
        a.reload()
        wait_for(lambda: "[data] Configuration change handed to the running worker." in log_of(a), what="reload")
        st = a.status()
        assert (st["replication"], st["workerpid"], st["config_pending"]) == ("memsync", before["workerpid"], False)

        a.params["res_extra"] = {RES: ["replication memsync", "name other"]}
        a.write_conf(pair.a.dir, pair.b.dir, pair.ip_a, pair.ip_b)
        a.reload()
        wait_for(lambda: "Configuration reloaded, except for data (device busy)." in log_of(a), what="reload")
        assert "[data] Configuration change not applied yet: the device is busy" in log_of(a)
        st = a.status()
        assert (st["provname"], st["workerpid"], st["config_pending"]) == (RES, before["workerpid"], True)
        assert "configuration: reloaded, applies at the next role change" in a.hastctl("list", RES).stdout
    finally:
        os.close(fd)
    a.role("secondary")
    assert "[data] Configuration change applied (it waited for this role change)." in log_of(a)
    st = a.status()
    assert (st["provname"], st["config_pending"]) == ("other", False)


# --- 4. kill -9 of the primary worker under a mounted filesystem ------------------------------


def test_worker_killed_under_mounted_fs(dev_pair):
    """What hastd does, exactly: it reaps the worker, tears its device down by force (the loop
    under the mount is only marked autoclear, the FUSE mount lazily unmounted, nbdfuse stopped),
    restarts the worker after 1 s and attaches a *new* loop device at the same link. The old
    mount is dead: a writer busy at the time of the kill, direct I/O and fsync all fail with EIO
    at once, nothing hangs, and umount succeeds and releases the old loop. The same filesystem then mounts through the new device
    with every synced file intact, takes writes, and fscks clean."""
    a = dev_pair.a
    mnt = dev_pair.mnt("mnt")
    mkfs(a)
    dev_pair.mount(a, mnt)
    digests = write_tree(mnt)
    run(["sync", "-f", str(mnt)], SYNC_TIMEOUT)
    old_device = os.readlink(a.devlink())
    old_seq = diskseq(old_device)
    assert old_seq is not None
    [old_worker] = a.worker_pids(RES)
    old_nbdfuse = our_nbdfuse_pids(a)
    assert len(old_nbdfuse) == 1
    writer = dev_pair.spawn_writer(mnt / "inflight")

    os.kill(old_worker, signal.SIGKILL)
    new_device = wait_device(a, not_device=old_device)
    st = a.status()
    assert st["role"] == "primary" and st["workerpid"] not in (0, old_worker)
    log = log_of(a)
    assert f"Worker {old_worker} stopped (status -9)." in log
    assert "Primary worker died (status -9): restarting in 1 s." in log
    assert f"detach: removed link {a.devlink()} -> {old_device}" in log
    assert f"detach: {old_device} still open: the kernel detaches it at its last close" in log
    assert f"detach: lazily unmounted {fuse_paths(str(a.statedir), RES)[0]} (still referenced)" in log
    # The old nbdfuse is gone: stopped by hastd, or exited by itself when its I/O failed first.
    assert old_nbdfuse[0] not in our_nbdfuse_pids(a) and len(our_nbdfuse_pids(a)) == 1

    # The writer that was running failed at once with EIO instead of hanging in the kernel...
    try:
        _, err = writer.communicate(timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        writer.kill()
        raise AssertionError(f"a writer on the dead mount still blocks {PROBE_TIMEOUT:.0f} s after the kill") from None
    assert writer.returncode != 0 and "Input/output error" in err, err
    # ... and the old mount stays dead and says so.
    probe = run(["dd", f"if={mnt / 'a/b/c/big'}", "of=/dev/null", "bs=64k", "iflag=direct"], PROBE_TIMEOUT, check=False)
    assert probe.returncode != 0 and "Input/output error" in probe.stderr, probe
    write = run(["dd", "if=/dev/zero", f"of={mnt / 'lost'}", "bs=64k", "count=4", "conv=fsync"], PROBE_TIMEOUT, check=False)
    assert write.returncode != 0, write
    dev_pair.umount(mnt)  # succeeds, bounded
    assert not is_mounted(mnt)
    wait_for(lambda: binding_gone(old_device, old_seq), LOOP_RELEASE_TIMEOUT, what=f"{old_device} released")

    # The filesystem, through the new device: intact and writable.
    assert loop_backing(new_device) == fuse_paths(str(a.statedir), RES)[1]
    dev_pair.mount(a, mnt)
    assert read_tree(mnt, digests) == digests
    data = os.urandom(MiB)
    with open(mnt / "after-restart", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    dev_pair.umount(mnt)
    fsck_clean(a)
    dev_pair.mount(a, mnt)
    assert (mnt / "after-restart").read_bytes() == data
    dev_pair.umount(mnt)

    a.role("secondary")
    assert residue(a) == []
