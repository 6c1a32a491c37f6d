"""Test harness: two real hastd daemons on loopback addresses, sparse files as providers, real sockets.

`pair` gives a started, connected pair (node-a primary on 127.0.N.1, node-b secondary on
127.0.N.2); `Node` wraps one daemon: its config, hastctl calls, status, and its provider's data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from hastpy.nbd.client import NBDClient

BIN = Path(sys.executable).parent
MiB = 1024 * 1024
_subnet = itertools.count(10 + os.getpid() % 200)

CONF = """\
control {ctl}
pidfile {pid}
listen {ip}:8457
replication {replication}
timeout {timeout}
{exec_line}
resource {name} {{
    on node-a {{
        local {dir_a}/disk
        remote {ip_b}
        source {ip_a}
    }}
    on node-b {{
        local {dir_b}/disk
        remote {ip_a}
        source {ip_b}
    }}
}}
"""


def wait_for(predicate, timeout=20.0, interval=0.05, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Node:
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

    def write_conf(self, dir_a: Path, dir_b: Path, ip_a: str, ip_b: str) -> None:
        p = self.params
        exec_line = f"exec {p['exec']}" if p.get("exec") else ""
        self.conf.write_text(
            CONF.format(ctl=self.dir / "ctl", pid=self.dir / "pid", ip=self.ip, replication=p["replication"],
                        timeout=p["timeout"], exec_line=exec_line, name=self.res, dir_a=dir_a, dir_b=dir_b,
                        ip_a=ip_a, ip_b=ip_b)  # fmt: skip
        )

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

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"hastpy.worker .* hastd: {self.res} "], capture_output=True, text=True)
        mine = []
        for pid in map(int, out.stdout.split()):
            try:
                if Path(f"/proc/{pid}/status").read_text().find(f"PPid:\t{self.proc.pid if self.proc else -1}") >= 0:
                    mine.append(pid)
            except OSError:
                pass
        return mine

    def status(self) -> dict:
        return json.loads(self.hastctl("list", "--json").stdout)[0]

    def role(self, role: str) -> None:
        self.hastctl("role", role, self.res)

    @property
    def nbd_socket(self) -> str:
        return str(self.dir / f"hastd-{self.res}.nbd")

    def client(self) -> NBDClient:
        wait_for(lambda: os.path.exists(self.nbd_socket) and self.status().get("workerpid"), what="NBD socket")
        return NBDClient.connect_unix(self.nbd_socket, timeout=60)

    def data(self) -> bytes:
        md = json.loads(self.hastctl("dump", "--json").stdout)[0]
        with open(self.disk, "rb") as f:
            f.seek(md["localoff"])
            return f.read(md["datasize"])


class Pair:
    def __init__(self, tmp: Path, size: int, **params):
        net = next(_subnet)
        self.ip_a, self.ip_b = f"127.0.{net}.1", f"127.0.{net}.2"
        p = {"name": "data", "replication": "fullsync", "timeout": 5, **params}
        self.a = Node("node-a", tmp / "a", self.ip_a, self.ip_b, p)
        self.b = Node("node-b", tmp / "b", self.ip_b, self.ip_a, p)
        for n in (self.a, self.b):
            n.write_conf(self.a.dir, self.b.dir, self.ip_a, self.ip_b)
            with open(n.disk, "wb") as f:
                f.truncate(size)
            n.hastctl("create", n.res)

    def start(self, connect: bool = True) -> Pair:
        self.a.start()
        self.b.start()
        if connect:
            self.b.role("secondary")
            self.a.role("primary")
            self.wait_complete()
        return self

    def wait_complete(self, timeout=30.0) -> dict:
        def ok():
            st = self.a.status()
            return st if st.get("status") == "complete" and st.get("sync", {}).get("state") in ("done", None) and st.get("dirty", 1) == 0 else None

        return wait_for(ok, timeout, what="replication complete and in sync")

    def wait_synced(self, timeout=60.0) -> dict:
        def ok():
            st = self.a.status()
            return st if st.get("status") == "complete" and st["sync"]["state"] == "done" and st["sync"]["pending"] == 0 else None

        return wait_for(ok, timeout, what="sync done")

    def stop(self) -> None:
        for n in (self.a, self.b):
            n.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
