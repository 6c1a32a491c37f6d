"""Test harness: two real hastd daemons on loopback addresses, sparse files as providers, real sockets.

`pair` gives a started, connected pair (node-a primary on 127.X.Y.1, node-b secondary on
127.X.Y.2); `Node` wraps one daemon: its config, hastctl calls, status, and its provider's data.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


from hastpy.nbd.client import NBDClient

BIN = Path(sys.executable).parent
MiB = 1024 * 1024
_rng = random.Random(os.urandom(16))
# pgrep reads every /proc/<pid>/cmdline; one of a process stuck in the kernel can block it.
PGREP_TIMEOUT = 30.0


def block_device_unavailable(tools: tuple[str, ...]) -> str | None:
    """Why a test that makes loop devices over FUSE cannot run here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, FUSE mounts)"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"no {dev}"
    missing = [t for t in tools if shutil.which(t) is None]
    return f"{', '.join(missing)} not installed" if missing else None

def free_subnet(port: int = 8457) -> tuple[str, str]:
    """Two loopback addresses 127.X.Y.1 and .2 whose port is free right now.

    Random over 64k subnets and probed, so that concurrent pytest sessions (other engineers, a
    loop of runs) do not hand two pairs the same addresses.
    """
    for _ in range(200):
        hi, lo = _rng.randrange(1, 255), _rng.randrange(1, 255)
        ips = (f"127.{hi}.{lo}.1", f"127.{hi}.{lo}.2")
        try:
            for ip in ips:
                with socket.socket() as probe:
                    probe.bind((ip, port))
        except OSError:
            continue
        return ips
    raise RuntimeError("no free loopback subnet")


GLOBAL_CONF = """\
control {ctl}
pidfile {pid}
listen {ip}:8457
replication {replication}
timeout {timeout}
{exec_line}{extra}
"""

RESOURCE_CONF = """\
resource {name} {{
{res_extra}    attach {attach}
    on node-a {{
        local {dir_a}/{disk}
        remote {ip_b}
        source {ip_a}
        devdir {dir_a}/dev
    }}
    on node-b {{
        local {dir_b}/{disk}
        remote {ip_a}
        source {ip_b}
        devdir {dir_b}/dev
    }}
}}
"""


def disk_name(index: int, res: str) -> str:
    """The provider file of a node's index-th resource: `disk` for the first, as always."""
    return "disk" if index == 0 else f"disk-{res}"


def wait_for(predicate, timeout=20.0, interval=0.05, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Node:
    """One hastd. params (shared by the pair's two nodes) understands:

    name (first resource), resources (all names, default [name]), replication, timeout, exec (a
    `{node}` in it becomes this node's name, so each node can have its own hook), extra (lines
    for the global section), res_extra ({resource: lines inside its block}), create_args (for
    `hastctl create`), env (extra environment of hastd), attach (default none: the tests talk
    to the NBD socket; `Pair(..., attach="fuse")` makes a real block device, linked as
    `devlink()` in the node's own dev/, with attach state under `statedir`).
    """

    def __init__(self, name: str, directory: Path, ip: str, peer_ip: str, params: dict):
        self.name = name
        self.dir = directory
        self.ip = ip
        self.proc: subprocess.Popen | None = None
        self.conf = directory / "hast.conf"
        self.log = directory / "hastd.log"
        self.res = params["name"]
        directory.mkdir(parents=True, exist_ok=True)
        self.disk = directory / "disk"
        self.params = params

    @property
    def resources(self) -> list[str]:
        return list(self.params.get("resources") or [self.res])

    def devlink(self, res: str | None = None) -> Path:
        """This node's /dev/hast/<res>: the devdir the harness gives each node."""
        return self.dir / "dev" / (res or self.res)

    @property
    def statedir(self) -> Path:
        """Where hastd records its attachments (next to the control socket, see Supervisor)."""
        return self.dir / "hastpy"

    def disk_of(self, res: str | None = None) -> Path:
        res = res or self.res
        return self.dir / disk_name(self.resources.index(res), res)

    def write_conf(self, dir_a: Path, dir_b: Path, ip_a: str, ip_b: str) -> None:
        p = self.params
        exec_line = f"exec {p['exec'].replace('{node}', self.name)}\n" if p.get("exec") else ""
        extra = "".join(f"{line}\n" for line in p.get("extra", ()))
        text = GLOBAL_CONF.format(ctl=self.dir / "ctl", pid=self.dir / "pid", ip=self.ip, replication=p["replication"],
                                  timeout=p["timeout"], exec_line=exec_line, extra=extra)  # fmt: skip
        for i, name in enumerate(self.resources):
            res_extra = "".join(f"    {line}\n" for line in p.get("res_extra", {}).get(name, ()))
            text += RESOURCE_CONF.format(name=name, res_extra=res_extra, dir_a=dir_a, dir_b=dir_b, ip_a=ip_a, ip_b=ip_b,
                                         disk=disk_name(i, name), attach=p.get("attach", "none"))  # fmt: skip
        self.conf.write_text(text)

    def reload(self) -> None:
        """SIGHUP: hastd re-reads its configuration."""
        self.proc.send_signal(signal.SIGHUP)

    def hastctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "hastctl"), *args[:1], "-c", str(self.conf), "-n", self.name, *args[1:]]
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and cp.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {cp.returncode}: {cp.stderr}")
        return cp

    def start(self) -> None:
        (self.dir / "ctl").unlink(missing_ok=True)  # a killed hastd leaves its socket file
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "hastd"), "-F", "-d", "-c", str(self.conf), "-n", self.name],
            stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **self.params.get("env", {})},
            cwd=self.params.get("cwd"),
        )  # fmt: skip
        wait_for(lambda: (self.dir / "ctl").exists(), what=f"{self.name} control socket")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill_all(self) -> None:
        """kill -9 of hastd and every worker of this node (a crash)."""
        pids = self.worker_pids()
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def worker_pids(self, res: str | None = None) -> list[int]:
        """Worker processes of this hastd: of one resource, or of all when res is None."""
        names = [res] if res else self.resources
        pattern = "hastpy.worker .* hastd: (" + "|".join(re.escape(n) for n in names) + ") "
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, timeout=PGREP_TIMEOUT)
        mine = []
        for pid in map(int, out.stdout.split()):
            try:
                if Path(f"/proc/{pid}/status").read_text().find(f"PPid:\t{self.proc.pid if self.proc else -1}") >= 0:
                    mine.append(pid)
            except OSError:
                pass
        return mine

    def status(self, res: str | None = None) -> dict:
        return json.loads(self.hastctl("list", "--json", res or self.res).stdout)[0]

    def role(self, role: str, res: str | None = None) -> None:
        self.hastctl("role", role, res or self.res)

    @property
    def nbd_socket(self) -> str:
        return self.nbd_socket_of(self.res)

    def nbd_socket_of(self, res: str) -> str:
        return str(self.dir / f"hastd-{res}.nbd")

    def client(self, res: str | None = None) -> NBDClient:
        path = self.nbd_socket_of(res or self.res)
        wait_for(lambda: os.path.exists(path) and self.status(res).get("workerpid"), what="NBD socket")
        return NBDClient.connect_unix(path, timeout=60)

    def data(self, res: str | None = None) -> bytes:
        md = json.loads(self.hastctl("dump", "--json", res or self.res).stdout)[0]
        with open(self.disk_of(res), "rb") as f:
            f.seek(md["localoff"])
            return f.read(md["datasize"])


class Pair:
    def __init__(self, tmp: Path, size: int, **params):
        self.ip_a, self.ip_b = free_subnet()
        p = {"name": "data", "replication": "fullsync", "timeout": 5, **params}
        self.a = Node("node-a", tmp / "a", self.ip_a, self.ip_b, p)
        self.b = Node("node-b", tmp / "b", self.ip_b, self.ip_a, p)
        self.size = size
        self.write_conf()
        for n in (self.a, self.b):
            for res in n.resources:
                self.create(n, res)

    def write_conf(self) -> None:
        """(Re)write both nodes' hast.conf from the shared params (then `reload()` a running one)."""
        for n in (self.a, self.b):
            n.write_conf(self.a.dir, self.b.dir, self.ip_a, self.ip_b)

    def create(self, node: Node, res: str) -> None:
        """A fresh sparse provider with new metadata for res on node."""
        with open(node.disk_of(res), "wb") as f:
            f.truncate(self.size)
        node.hastctl("create", *node.params.get("create_args", ()), res)

    @property
    def resources(self) -> list[str]:
        return self.a.resources

    def start(self, connect: bool = True) -> Pair:
        self.a.start()
        self.b.start()
        if connect:
            for res in self.resources:
                self.b.role("secondary", res)
                self.a.role("primary", res)
            for res in self.resources:
                self.wait_complete(res=res)
        return self

    def wait_complete(self, timeout=30.0, res: str | None = None) -> dict:
        def ok():
            st = self.a.status(res)
            return st if st.get("status") == "complete" and st.get("sync", {}).get("state") in ("done", None) and st.get("dirty", 1) == 0 else None

        return wait_for(ok, timeout, what="replication complete and in sync")

    def wait_synced(self, timeout=60.0, res: str | None = None) -> dict:
        def ok():
            st = self.a.status(res)
            return st if st.get("status") == "complete" and st["sync"]["state"] == "done" and st["sync"]["pending"] == 0 else None

        return wait_for(ok, timeout, what="sync done")

    def stop(self) -> None:
        for n in (self.a, self.b):
            n.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
