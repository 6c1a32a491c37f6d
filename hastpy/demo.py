"""`make demo`: two hastd daemons on loopback replicate a resource, lose the secondary, catch up.

Every step is printed as it happens with its time; the run ends with the timings and the proof
(checksums of both providers). Everything lives in a temporary directory and is stopped at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hastpy.nbd.client import NBDClient

BIN = Path(sys.executable).parent
MiB = 1024 * 1024
SIZE = 256 * MiB
STEP_TIMEOUT = 30.0
CONF = """\
control {dir}/{node}/ctl
pidfile {dir}/{node}/pid
listen {ip}:8457
replication fullsync
resource data {{
    attach none
    on node-a {{
        local {dir}/node-a/disk
        remote 127.0.99.2
        source 127.0.99.1
    }}
    on node-b {{
        local {dir}/node-b/disk
        remote 127.0.99.1
        source 127.0.99.2
    }}
}}
"""


class Demo:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self.t0 = time.monotonic()
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: list[tuple[str, float]] = []

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.2f}s] {text}", flush=True)

    def hastctl(self, node: str, *args: str) -> str:
        cmd = [str(BIN / "hastctl"), args[0], "-c", str(self.dir / node / "hast.conf"), "-n", node, *args[1:]]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout

    def status(self, node: str) -> dict:
        return json.loads(self.hastctl(node, "list", "--json"))[0]

    def wait(self, what: str, predicate) -> float:
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > STEP_TIMEOUT:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.05)
        took = time.monotonic() - start
        self.timings.append((what, took))
        return took

    def setup(self) -> None:
        for node, ip in (("node-a", "127.0.99.1"), ("node-b", "127.0.99.2")):
            d = self.dir / node
            d.mkdir()
            (d / "hast.conf").write_text(CONF.format(dir=self.dir, node=node, ip=ip))
            with open(d / "disk", "wb") as f:
                f.truncate(SIZE)
            self.hastctl(node, "create", "data")
        self.say(f"created two {SIZE // MiB} MiB sparse providers and their HAST metadata (hastctl create)")

    def start(self, node: str) -> None:
        (self.dir / node / "ctl").unlink(missing_ok=True)  # a killed hastd leaves its socket file
        log = open(self.dir / node / "hastd.log", "ab")
        conf = str(self.dir / node / "hast.conf")
        self.procs[node] = subprocess.Popen([str(BIN / "hastd"), "-F", "-c", conf, "-n", node], stdout=log, stderr=log)
        while not (self.dir / node / "ctl").exists():
            time.sleep(0.02)
        self.say(f"hastd started on {node}")

    def write(self, client: NBDClient, offset: int, count: int, seed: int) -> None:
        data = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
        for i in range(count):
            client.pwrite(offset + i * MiB, data)
        client.flush()

    def data_sha(self, node: str) -> str:
        md = json.loads(self.hastctl(node, "dump", "--json"))[0]
        h = hashlib.sha256()
        with open(self.dir / node / "disk", "rb") as f:
            f.seek(md["localoff"])
            for _ in range(md["datasize"] // MiB):
                h.update(f.read(MiB))
            h.update(f.read())
        return h.hexdigest()[:16]

    def run(self) -> None:
        self.setup()
        self.start("node-a")
        self.start("node-b")
        self.hastctl("node-b", "role", "secondary", "data")
        self.hastctl("node-a", "role", "primary", "data")
        took = self.wait("first connection", lambda: self.status("node-a").get("status") == "complete")
        self.say(f"node-a is primary, node-b secondary: connected in {took:.2f}s")
        sock = self.status("node-a")["nbd_socket"]
        client = NBDClient.connect_unix(sock, timeout=60)
        start = time.monotonic()
        self.write(client, 0, 64, seed=1)
        self.timings.append(("64 MiB written (fullsync) and flushed", time.monotonic() - start))
        self.say(f"wrote 64 MiB through the NBD export {sock}: acknowledged only once on both disks")
        self.say("node-b's hastd is killed (kill -9): the primary keeps serving, degraded")
        self.procs.pop("node-b").kill()
        for pid in _workers("data", "secondary"):
            os.kill(pid, signal.SIGKILL)
        self.wait("primary notices the loss", lambda: self.status("node-a").get("status") == "degraded")
        self.write(client, 100 * MiB, 6, seed=2)
        st = self.status("node-a")
        self.say(f"wrote 6 MiB more while degraded: {st['sync']['pending'] // MiB} MiB of dirty extents to resync")
        self.start("node-b")
        self.hastctl("node-b", "role", "secondary", "data")
        took = self.wait("reconnect and resync", lambda: (s := self.status("node-a"))["status"] == "complete" and s["sync"]["state"] == "done")
        st = self.status("node-a")
        self.say(f"node-b is back: resynced {st['sync']['synced'] // MiB} MiB (only the dirty extents) in {took:.2f}s")
        client.disconnect()
        a, b = self.data_sha("node-a"), self.data_sha("node-b")
        self.say(f"sha256 of the data area: node-a {a}, node-b {b}: {'identical' if a == b else 'DIFFERENT'}")
        print("\ntimings:")
        for what, secs in self.timings:
            print(f"  {what:<45} {secs:6.2f}s")
        if a != b:
            raise SystemExit(1)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
            proc.wait(20)


def _workers(res: str, role: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"hastd: {res} \\({role}\\)"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="hastpy-demo-") as tmp:
        demo = Demo(Path(tmp))
        try:
            demo.run()
        finally:
            demo.stop()


if __name__ == "__main__":
    main()
