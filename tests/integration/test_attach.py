"""The fuse attach method for real: nbdfuse + loop device over our NBD export, ext4 on top.

Needs root, /dev/fuse, loop devices, nbdfuse (libnbd-bin), fusermount3 (fuse3), losetup and
e2fsprogs; fio for the verify run. Every test leaves nothing behind: the fixture unmounts its
mount point, runs cleanup_stale() and kills (by pid) every process the test started, then checks
that no loop device, mount, link or nbdfuse of ours is left.

Crashes are simulated for real: the "supervisor" is a child process that attaches and is then
SIGKILLed (nbdfuse, in its own session, survives it, as it would a crashed hastd), and the NBD
server is a child process killed with SIGKILL (a dead worker) or stopped with SIGSTOP (a hung one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

import hastpy.attach as attach_mod
from harness import block_device_unavailable
from hastpy.attach import AttachError, DeviceBusy, attach, busy, cleanup_stale, detach
from hastpy.attach.base import load_state, proc_cmdline, state_path
from hastpy.attach.fuse import fuse_paths, loop_bound
from hastpy.nbd.server import BlockingAdapter, ExportConfig, FileBackend, serve_unix

MiB = 1024 * 1024
SIZE = 128 * MiB
NAME = "data"
# Bounds on operations that must not hang; generous for a loaded CI machine, far below "forever".
CLEANUP_BOUND = 30.0  # cleanup/forced detach with a dead or hung server (fuse.py's limits sum to ~25 s)
CMD_TIMEOUT = 120.0  # mkfs, mount, e2fsck, fio
SERVER_START_TIMEOUT = 10.0

REQUIRED_TOOLS = ("nbdfuse", "losetup", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount", "umount", "dd")


UNAVAILABLE = block_device_unavailable(REQUIRED_TOOLS)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.root,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
]

SERVER = """
import signal, sys
from hastpy.nbd.server import BlockingAdapter, ExportConfig, FileBackend, serve_unix
serve_unix(sys.argv[1], lambda: BlockingAdapter(FileBackend(sys.argv[2])), ExportConfig(name=sys.argv[3]))
print("ready", flush=True)
while True:
    signal.pause()
"""

ATTACHER = """
import json, sys, time
from hastpy.attach import attach
att = attach("fuse", *sys.argv[1:4], int(sys.argv[4]), sys.argv[5], sys.argv[6])
print(json.dumps(att.to_dict()), flush=True)
time.sleep(3600)
"""


def run(*argv: str, check: bool = True, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}): {result.stderr}")
    return result


@dataclass
class Env:
    base: str  # short: unix socket paths are limited to 107 bytes
    disk: str
    sock: str
    devdir: str
    statedir: str
    mnt: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)

    @property
    def link(self) -> str:
        return os.path.join(self.devdir, NAME)

    def spawn(self, *argv: str) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def start_server(self) -> subprocess.Popen:
        """The NBD export in a child process, so that it can die or hang for real."""
        proc = self.spawn(sys.executable, "-c", SERVER, self.sock, self.disk, NAME)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def attach_in_child(self) -> tuple[subprocess.Popen, dict]:
        """Attach from a child process (a stand-in supervisor) that we can then SIGKILL."""
        proc = self.spawn(
            sys.executable, "-c", ATTACHER, NAME, NAME, self.sock, str(SIZE), self.devdir, self.statedir
        )
        line = proc.stdout.readline()
        assert line, "the attaching child died"
        return proc, json.loads(line)

    def mounted(self) -> bool:
        return any(line.split()[1] == self.mnt for line in open("/proc/self/mounts"))


@pytest.fixture
def env():
    base = tempfile.mkdtemp(prefix="hpat-", dir="/tmp")
    e = Env(
        base=base,
        disk=os.path.join(base, "disk.img"),
        sock=os.path.join(base, "nbd.sock"),
        devdir=os.path.join(base, "dev"),
        statedir=os.path.join(base, "state"),
        mnt=os.path.join(base, "mnt"),
    )
    with open(e.disk, "wb") as f:
        f.truncate(SIZE)  # sparse
    os.mkdir(e.mnt)
    yield e
    # Finalizer: nothing we started may survive, whatever the test did.
    if e.mounted():
        if run("umount", e.mnt, check=False).returncode != 0:
            run("umount", "-l", e.mnt, check=False)
    done = cleanup_stale(NAME, e.devdir, e.statedir)
    for proc in e.procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
    left = nothing_left_problems(e)
    shutil.rmtree(base, ignore_errors=True)
    for key, value in e.times.items():
        print(f"timing {key}: {value:.3f} s")
    assert not left, f"left behind: {left} (final cleanup did {done})"


def nothing_left_problems(e: Env) -> list[str]:
    """Everything an attachment could leave, looked for independently of the attach code."""
    problems = []
    losetup = run("losetup", "-a").stdout
    problems += [f"loop: {line}" for line in losetup.splitlines() if e.base in line]
    for line in open("/proc/mounts"):
        if e.base in line:
            problems.append(f"mount: {line.strip()}")
    if os.path.isdir(e.devdir) and os.listdir(e.devdir):
        problems.append(f"devdir: {os.listdir(e.devdir)}")
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        argv = proc_cmdline(pid)
        if argv and os.path.basename(argv[0]) == "nbdfuse" and any(e.base in a for a in argv):
            try:
                state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                problems.append(f"nbdfuse pid {pid}")
    if os.path.exists(state_path(e.statedir, NAME)):
        problems.append("state file")
    problems += attach_mod.leftovers(NAME, e.statedir)
    return problems


def sysfs(device: str, attr: str) -> str:
    with open(f"/sys/block/{os.path.basename(device)}/{attr}") as f:
        return f.read().strip()


def write_files(mnt: str) -> dict[str, str]:
    digests = {}
    for i, size in enumerate((8 * MiB, 1234, 64 * 1024)):
        data = os.urandom(size)
        path = os.path.join(mnt, f"f{i}")
        with open(path, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        digests[f"f{i}"] = hashlib.sha256(data).hexdigest()
    return digests


def read_digests(mnt: str, names) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(mnt, n), "rb").read()).hexdigest() for n in names}


def assert_intact(e: Env, att) -> None:
    assert os.readlink(e.link) == att.device
    assert loop_bound(att.device)
    assert any(line.split()[1] == att.mountdir for line in open("/proc/mounts"))
    assert os.path.exists(f"/proc/{att.nbdfuse_pid}")
    assert load_state(e.statedir, NAME) == att


# --- the whole life of a device ---------------------------------------------------------------


def test_fuse_attach_mkfs_mount_busy_detach(env):
    server = serve_unix(env.sock, lambda: BlockingAdapter(FileBackend(env.disk)), ExportConfig(name=NAME))
    try:
        started = time.monotonic()
        att = attach("fuse", NAME, NAME, env.sock, SIZE, env.devdir, env.statedir)
        env.times["attach"] = time.monotonic() - started

        assert att.method == "fuse" and att.device.startswith("/dev/loop")
        assert os.readlink(env.link) == att.device
        assert sysfs(att.device, "loop/dio") == "1"
        assert sysfs(att.device, "queue/logical_block_size") == "512"
        assert int(sysfs(att.device, "size")) * 512 == SIZE
        assert json.load(open(state_path(env.statedir, NAME))) == att.to_dict()
        assert busy(att) is None

        run("mkfs.ext4", "-q", env.link)
        run("mount", env.link, env.mnt)
        digests = write_files(env.mnt)

        # Mounted: busy says where, detach refuses and changes nothing, nor does a new attach.
        assert busy(att) == f"mounted on {env.mnt}"
        with pytest.raises(DeviceBusy) as info:
            detach(att)
        assert info.value.exit_code == os.EX_TEMPFAIL and env.mnt in str(info.value)
        with pytest.raises(DeviceBusy):
            attach("fuse", NAME, NAME, env.sock, SIZE, env.devdir, env.statedir)
        assert_intact(env, att)
        assert read_digests(env.mnt, digests) == digests
        run("umount", env.mnt)

        # Open by a process: busy names it.
        holder = env.spawn(
            sys.executable, "-c",
            "import os, sys, time; os.open(sys.argv[1], os.O_RDONLY); print('open', flush=True); time.sleep(60)",
            env.link,
        )  # fmt: skip
        assert holder.stdout.readline().strip() == "open"
        assert busy(att).startswith(f"open by pid {holder.pid} ")
        with pytest.raises(DeviceBusy):
            detach(att)
        holder.kill()
        holder.wait()
        assert busy(att) is None

        started = time.monotonic()
        detach(att)
        env.times["detach"] = time.monotonic() - started
        assert nothing_left_problems(env) == []
    finally:
        server.stop()

    # The export's bytes are the filesystem, from offset 0 of the backing file.
    fsck = run("e2fsck", "-fn", env.disk, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dumped = subprocess.run(["debugfs", "-R", "cat /f0", env.disk], capture_output=True, timeout=CMD_TIMEOUT)
    assert hashlib.sha256(dumped.stdout).hexdigest() == digests["f0"]


def test_attach_failure_leaves_nothing(env):
    with pytest.raises(AttachError, match="nbdfuse"):
        attach("fuse", NAME, NAME, os.path.join(env.base, "no.sock"), SIZE, env.devdir, env.statedir)
    assert nothing_left_problems(env) == []
    assert not os.path.exists(fuse_paths(env.statedir, NAME)[0])


def test_attach_refuses_an_export_of_the_wrong_size(env):
    env.start_server()
    with pytest.raises(AttachError, match="expected"):
        attach("fuse", NAME, NAME, env.sock, SIZE + 4096, env.devdir, env.statedir)
    assert nothing_left_problems(env) == []


# --- crashes ----------------------------------------------------------------------------------


def test_server_killed_under_live_loop_then_cleanup_from_state(env):
    server = env.start_server()
    supervisor, recorded = env.attach_in_child()
    device = recorded["device"]
    run("dd", "if=/dev/urandom", f"of={env.link}", "bs=1M", "count=4", "oflag=direct")

    # Crash of everything: the supervisor, then the worker serving the export.
    os.kill(supervisor.pid, signal.SIGKILL)
    os.kill(server.pid, signal.SIGKILL)
    supervisor.wait()
    server.wait()
    failed = run("dd", "if=/dev/zero", f"of={env.link}", "bs=1M", "count=4", "oflag=direct", check=False, timeout=60)
    assert failed.returncode != 0  # the device is dead, and says so rather than hanging
    assert loop_bound(device)  # ... and still there: the stale state lab.md describes

    started = time.monotonic()
    done = cleanup_stale(NAME, env.devdir, env.statedir)
    env.times["cleanup after server kill"] = time.monotonic() - started
    assert env.times["cleanup after server kill"] < CLEANUP_BOUND
    assert f"detached {device}" in done
    assert f"removed link {env.link} -> {device}" in done
    assert any(d.startswith("unmounted ") for d in done), done
    assert nothing_left_problems(env) == []


def test_server_killed_under_mounted_filesystem(env):
    server = env.start_server()
    att = attach("fuse", NAME, NAME, env.sock, SIZE, env.devdir, env.statedir)
    run("mkfs.ext4", "-q", env.link)
    run("mount", env.link, env.mnt)
    write_files(env.mnt)
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    del att  # the supervisor forgot it: only the state file remains

    started = time.monotonic()
    done = cleanup_stale(NAME, env.devdir, env.statedir)
    env.times["cleanup under a mounted fs"] = time.monotonic() - started
    assert env.times["cleanup under a mounted fs"] < CLEANUP_BOUND
    # The kernel holds the loop for the mounted filesystem; it goes with the unmount.
    assert any("the kernel detaches it at its last close" in d for d in done), done
    assert any(d.startswith("lazily unmounted ") for d in done), done
    assert not os.path.lexists(env.link)
    assert not os.path.exists(state_path(env.statedir, NAME))
    device = next(d.split()[0] for d in done if "last close" in d)
    run("umount", env.mnt, check=False)  # a dead filesystem: umount may complain, and must finish
    assert not env.mounted()
    assert wait_for(lambda: not loop_bound(device), 10)
    assert nothing_left_problems(env) == []


def test_hung_server_forced_detach_is_bounded(env):
    server = env.start_server()
    att = attach("fuse", NAME, NAME, env.sock, SIZE, env.devdir, env.statedir)
    os.kill(server.pid, signal.SIGSTOP)  # a hung worker: the socket stays open, nobody answers
    writer = env.spawn("dd", "if=/dev/zero", f"of={env.link}", "bs=64k", "count=64", "oflag=direct")
    time.sleep(0.5)
    assert writer.poll() is None  # stuck on the hung export

    started = time.monotonic()
    assert busy(att).startswith(f"open by pid {writer.pid} ")  # and busy() itself did not hang
    with pytest.raises(DeviceBusy):
        detach(att)
    detach(att, force=True)
    env.times["forced detach, hung server"] = time.monotonic() - started
    assert env.times["forced detach, hung server"] < CLEANUP_BOUND
    assert writer.wait(timeout=CLEANUP_BOUND) != 0  # its I/O failed instead of hanging forever
    assert wait_for(lambda: not loop_bound(att.device), 10)
    assert nothing_left_problems(env) == []


def test_cleanup_without_the_state_file(env):
    """A crash that also lost the record: the fixed names under statedir are enough."""
    env.start_server()
    supervisor, recorded = env.attach_in_child()
    os.kill(supervisor.pid, signal.SIGKILL)
    supervisor.wait()
    os.unlink(state_path(env.statedir, NAME))
    # Found without the record: the loop by its backing FUSE mount, nbdfuse by its pid file and
    # command line in our mount namespace.
    assert sorted(attach_mod.leftovers(NAME, env.statedir)) == sorted(
        [f"loop {recorded['device']}", f"mount {recorded['mountdir']}", f"nbdfuse pid {recorded['nbdfuse_pid']}"]
    )

    done = cleanup_stale(NAME, env.devdir, env.statedir)
    assert f"detached {recorded['device']}" in done
    assert f"removed link {env.link} -> {recorded['device']}" in done  # found via the device
    assert nothing_left_problems(env) == []


# --- data path --------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
def test_fio_verify_through_fuse_attach(env):
    env.start_server()
    att = attach("fuse", NAME, NAME, env.sock, SIZE, env.devdir, env.statedir)
    started = time.monotonic()
    fio = run(
        "fio", "--name=v", f"--filename={env.link}", "--rw=randwrite", "--bs=4k", "--size=32M",
        "--verify=crc32c", "--direct=1", "--ioengine=psync", "--output-format=json",
        "--verify_state_save=0",  # else fio drops local-v-0-verify.state in the working directory
        check=False,
    )  # fmt: skip
    env.times["fio 32M randwrite+verify"] = time.monotonic() - started
    assert fio.returncode == 0, fio.stderr
    job = json.loads(fio.stdout[fio.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 32 * MiB and job["read"]["io_bytes"] == 32 * MiB  # verify read it all
    print(f"fio: write {job['write']['iops']:.0f} IOPS, verify read {job['read']['iops']:.0f} IOPS")
    detach(att)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# --- the kernel method, as far as it runs without the nbd driver ------------------------------


def test_kernel_attach_hands_the_handshaken_socket_to_the_kernel(env, monkeypatch):
    """Everything up to the driver, for real: connect, handshake, the NBD_CMD_CONNECT we would
    send (parsed back), the fd it names, and the roll-back when no device appears. The kernel's
    side of netlink is faked; its bytes are pinned in tests/unit/test_attach_netlink.py."""
    import socket

    from hastpy.attach import kernel
    from hastpy.attach import netlink as nl
    from hastpy.nbd.client import NBDClient

    server = serve_unix(env.sock, lambda: BlockingAdapter(FileBackend(env.disk)), ExportConfig(name=NAME))
    with NBDClient.connect_unix(env.sock, NAME, timeout=10) as probe:
        expected_flags = probe.transmission_flags
    family, index = 0x1A, 5
    sent = []

    def fake_transact(build, what):
        seq = 77
        [msg] = nl.parse_messages(build(seq))
        reply = nl.parse_genl(msg)
        sent.append((msg.type, reply))
        if msg.type == nl.GENL_ID_CTRL:
            answer = nl.GENL_HDR.pack(nl.CTRL_CMD_NEWFAMILY, 2, 0) + nl.attr_u16(nl.CTRL_ATTR_FAMILY_ID, family)
            return [nl.Message(nl.GENL_ID_CTRL, 0, seq, 0, answer)]
        if reply.cmd == nl.NBD_CMD_CONNECT:
            [(_, item)] = nl.parse_attrs(reply.attrs[nl.NBD_ATTR_SOCKETS])
            fd = nl.u32(nl.attrs_dict(item)[nl.NBD_SOCK_FD])
            with socket.socket(fileno=os.dup(fd)) as handed:  # what the kernel would take over
                assert handed.getpeername() == env.sock
                assert handed.gettimeout() is None  # blocking, as the kernel expects
            answer = nl.GENL_HDR.pack(nl.NBD_CMD_CONNECT, 1, 0) + nl.attr_u32(nl.NBD_ATTR_INDEX, index)
            return [nl.Message(family, 0, seq, 0, answer)]
        return []

    monkeypatch.setattr(kernel, "_transact", fake_transact)
    monkeypatch.setattr(kernel, "DEVICE_NODE_TIMEOUT", 0.1)
    try:
        with pytest.raises(AttachError, match=f"/dev/nbd{index} did not appear"):
            attach("kernel", NAME, NAME, env.sock, SIZE, env.devdir, env.statedir)
    finally:
        server.stop()
    [(ctrl_type, _), (conn_type, connect)] = sent
    assert ctrl_type == nl.GENL_ID_CTRL and conn_type == family
    attrs = connect.attrs
    assert connect.cmd == nl.NBD_CMD_CONNECT and connect.version == nl.NBD_GENL_VERSION
    assert nl.u64(attrs[nl.NBD_ATTR_SIZE_BYTES]) == SIZE
    assert nl.u64(attrs[nl.NBD_ATTR_BLOCK_SIZE_BYTES]) == 512
    assert nl.u64(attrs[nl.NBD_ATTR_SERVER_FLAGS]) == expected_flags
    assert expected_flags & 0b1101 == 0b1101  # HAS_FLAGS, SEND_FLUSH, SEND_FUA
    assert nl.u64(attrs[nl.NBD_ATTR_TIMEOUT]) == kernel.IO_TIMEOUT
    assert nl.u64(attrs[nl.NBD_ATTR_DEAD_CONN_TIMEOUT]) == kernel.DEAD_CONN_TIMEOUT
    assert nl.string(attrs[nl.NBD_ATTR_BACKEND_IDENTIFIER]) == kernel.backend_identifier(env.statedir, NAME)
    assert nl.NBD_ATTR_INDEX not in attrs  # the kernel picks a free device
    assert nothing_left_problems(env) == []


def test_kernel_attach_without_the_driver_fails_cleanly(env):
    if attach_mod.kernel_usable():
        pytest.skip("the nbd driver is present")
    env.start_server()
    with pytest.raises(AttachError, match="nbd") as info:
        attach("kernel", NAME, NAME, env.sock, SIZE, env.devdir, env.statedir)
    print(info.value)
    assert nothing_left_problems(env) == []
