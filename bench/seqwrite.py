#!/usr/bin/env python3
"""Sequential-write throughput through the primary's NBD export, against nbdkit's `file` plugin.

    .venv/bin/python bench/seqwrite.py [--runs 5] [--mib 512] [--dir DIR] [--replication fullsync] [--floor]

Sets up, in one run: a hastd pair on two loopback addresses (127.X.Y.1 primary, .2 secondary),
each with a sparse provider of --provider bytes (1 GiB), and nbdkit's file plugin serving a sparse
file of the primary's datasize (the size the hast export has). Then, rotating the order of the
targets run by run so that all see the same machine load:

1. nbdcopy from a random file in the page cache:
   `nbdcopy --requests=16 --connections=4 SRC nbd+unix:///?socket=...` (--requests, --connections)
2. hastpy.nbd.client writing the same bytes in 1 MiB requests, --inflight of them in flight.

Prints MB/s (10^6 bytes per second) of each target, the median of --runs runs, and the ratio
hast / nbdkit; and the CPU time each target's server processes spent per MiB written (both hastd
workers; nbdkit), a figure much less sensitive than MB/s to what else the machine is running. Neither client flushes at the end: this measures the replication pipeline, not
the page cache's writeback. `--only hast` keeps nbdkit out (e.g. while profiling the workers; the
worker pids are printed at start-up). `--floor` adds bench/relay.py's least replicating server in
Python, without and with hast's activemap, as two more targets (relay, relay-am).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hastpy import control
from hastpy.nbd.client import NBDClient
from hastpy.nbd.codec import Command
from relay import RELAY_ARMS, Relay

BIN = Path(sys.executable).parent
MiB = 1024 * 1024
GiB = 1024 * MiB
PORT = 8457

CONF = """\
control {dir}/{node}/ctl
pidfile {dir}/{node}/pid
listen {ip}:{port}
replication {replication}
metaflush {metaflush}
timeout 20
resource data {{
    attach none
    on node-a {{
        local {dir}/a/disk
        remote {ip_b}:{port}
        source {ip_a}
    }}
    on node-b {{
        local {dir}/b/disk
        remote {ip_a}:{port}
        source {ip_b}
    }}
}}
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(pred, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def free_subnet() -> tuple[str, str]:
    rng = random.Random()
    for _ in range(200):
        hi, lo = rng.randrange(1, 255), rng.randrange(1, 255)
        ips = (f"127.{hi}.{lo}.1", f"127.{hi}.{lo}.2")
        try:
            for ip in ips:
                with socket.socket() as s:
                    s.bind((ip, PORT))
        except OSError:
            continue
        return ips
    raise RuntimeError("no free loopback subnet")


class HastPair:
    def __init__(self, root: Path, provider: int, replication: str, metaflush: str = "on"):
        self.root = root
        self.ip_a, self.ip_b = free_subnet()
        self.procs: dict[str, subprocess.Popen] = {}
        for node, ip in (("a", self.ip_a), ("b", self.ip_b)):
            d = root / node
            d.mkdir()
            (d / "hast.conf").write_text(CONF.format(dir=root, node=node, ip=ip, port=PORT, replication=replication,
                                                      metaflush=metaflush, ip_a=self.ip_a, ip_b=self.ip_b))  # fmt: skip
            with open(d / "disk", "wb") as f:
                f.truncate(provider)
            self.hastctl(node, "create", "data")

    def hastctl(self, node: str, *args: str) -> str:
        cmd = [str(BIN / "hastctl"), args[0], "-c", str(self.root / node / "hast.conf"), "-n", f"node-{node}", *args[1:]]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    def hastpy_source(self) -> str:
        """Where the workers import hastpy from (the same interpreter, directory and environment)."""
        cmd = [str(BIN / "python"), "-P", "-c", "import hastpy; print(hastpy.__file__)"]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=self.root / "a").stdout.strip()

    def status(self, node: str) -> dict:
        return control.call(str(self.root / node / "ctl"), {"cmd": "status", "resources": ["data"]})["resources"][0]

    def start(self) -> None:
        for node in ("a", "b"):
            log = open(self.root / node / "hastd.log", "ab")
            # cwd: outside the checkout, so that PYTHONPATH decides which hastpy the script's own
            # client imports in an A/B run (the workers run with -P and ignore the directory).
            self.procs[node] = subprocess.Popen(
                [str(BIN / "hastd"), "-F", "-c", str(self.root / node / "hast.conf"), "-n", f"node-{node}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root / node,
            )  # fmt: skip
            wait_for(lambda node=node: (self.root / node / "ctl").exists(), what="control socket")
        self.hastctl("b", "role", "secondary", "data")
        self.hastctl("a", "role", "primary", "data")
        wait_for(lambda: self.status("a").get("status") == "complete", what="pair connected")
        wait_for(lambda: os.path.exists(self.socket), what="NBD socket")

    @property
    def socket(self) -> str:
        return str(self.root / "a" / "hastd-data.nbd")

    def worker_pid(self, node: str) -> int:
        return wait_for(lambda: self.status(node).get("workerpid"), what=f"node-{node} worker")

    def datasize(self) -> int:
        return json.loads(self.hastctl("a", "dump", "--json", "data"))[0]["datasize"]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


class Nbdkit:
    def __init__(self, root: Path, size: int):
        self.path = root / "nbdkit.img"
        with open(self.path, "wb") as f:
            f.truncate(size)
        self.socket = str(root / "nbdkit.sock")
        self.proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", self.socket, "file", f"file={self.path}"])
        wait_for(lambda: os.path.exists(self.socket), what="nbdkit socket")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_nbdcopy(src: Path, sock: str, requests: int, connections: int) -> float:
    t = time.perf_counter()
    argv = ["nbdcopy", f"--requests={requests}", f"--connections={connections}", str(src), f"nbd+unix:///?socket={sock}"]
    subprocess.run(argv, check=True)
    return time.perf_counter() - t


def run_client(data: memoryview, sock: str, inflight: int, block: int = MiB) -> float:
    c = NBDClient.connect_unix(sock)
    t = time.perf_counter()
    for off in range(0, len(data), block):
        if c.in_flight >= inflight:
            c.next_reply().check()
        c.submit(Command.WRITE, off, data=data[off : off + block])
    while c.in_flight:
        c.next_reply().check()
    elapsed = time.perf_counter() - t
    c.disconnect()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per target and client (median reported)")
    ap.add_argument("--mib", type=int, default=512, help="MiB written per run")
    ap.add_argument("--provider", type=int, default=GiB, help="provider size in bytes (each node)")
    ap.add_argument("--dir", default=None, help="where providers and the source file live (default: a new dir in /tmp)")
    ap.add_argument("--replication", default="fullsync", choices=("fullsync", "memsync", "async"))
    ap.add_argument("--metaflush", default="on", choices=("on", "off"), help="hast.conf metaflush (default on)")
    ap.add_argument("--requests", type=int, default=16, help="nbdcopy --requests")
    ap.add_argument("--connections", type=int, default=4,
                    help="nbdcopy --connections (default 4, nbdcopy's own default: both servers allow multi-conn)")
    ap.add_argument("--inflight", type=int, default=16, help="hastpy client: 1 MiB requests in flight")
    ap.add_argument("--only", choices=("hast", "nbdkit"), default=None, help="measure one target only")
    ap.add_argument("--clients", default="nbdcopy,hastpy", help="comma-separated: nbdcopy, hastpy")
    ap.add_argument("--keep", action="store_true", help="keep the directory (logs) afterwards")
    ap.add_argument("--floor", action="store_true",
                    help="also bench/relay.py's least Python replicating server, without and with an activemap")  # fmt: skip
    args = ap.parse_args()
    if shutil.which("nbdcopy") is None or shutil.which("nbdkit") is None:
        print("needs nbdcopy (libnbd-bin) and nbdkit", file=sys.stderr)
        return 69
    root = Path(tempfile.mkdtemp(prefix="seqwrite-", dir=args.dir))
    nbytes = args.mib * MiB
    src = root / "src.img"
    with open(src, "wb") as f:
        for _ in range(args.mib):
            f.write(os.urandom(MiB))
    data = memoryview(src.read_bytes())  # also puts the source in the page cache
    pair = HastPair(root, args.provider, args.replication, args.metaflush)
    kit = None
    relays: list[Relay] = []
    try:
        pair.start()
        size = pair.datasize()
        if nbytes > size:
            raise SystemExit(f"--mib {args.mib} exceeds the export ({size} bytes)")
        targets = {"hast": pair.socket}
        if args.only != "hast":
            kit = Nbdkit(root, size)
            targets["nbdkit"] = kit.socket
        if args.only == "nbdkit":
            del targets["hast"]
        # Whose CPU time a run of each target costs: both hastd workers, or nbdkit, or both relay.py processes.
        pids = {"hast": [pair.worker_pid("a"), pair.worker_pid("b")], "nbdkit": [kit.proc.pid] if kit else []}
        who = {"hast": ("primary", "secondary"), "nbdkit": ("nbdkit",)}
        for name, keepdirty in RELAY_ARMS.items() if args.floor else ():
            relays.append(Relay(root / name, "", size, keepdirty))
            targets[name] = relays[-1].socket
            pids[name] = list(relays[-1].servers.values())
            who[name] = tuple(relays[-1].servers)
        print(f"seqwrite: {args.mib} MiB per run, {args.runs} runs each, {args.replication}, metaflush {args.metaflush}, provider "
              f"{args.provider // MiB} MiB x 2 in {root}", flush=True)  # fmt: skip
        print(f"  hastd pids: node-a {pair.procs['a'].pid}, node-b {pair.procs['b'].pid}; workers: primary "
              f"{pair.worker_pid('a')}, secondary {pair.worker_pid('b')}; hastpy from {pair.hastpy_source()}", flush=True)  # fmt: skip
        clients = [c.strip() for c in args.clients.split(",") if c.strip()]
        results: dict[tuple[str, str], list[float]] = {(c, t): [] for c in clients for t in targets}
        cpu: dict[tuple[str, str], list[list[float]]] = {(c, t): [] for c in clients for t in targets}
        for i in range(args.runs):
            order = list(targets.items())
            order = order[i % len(order) :] + order[: i % len(order)]  # who goes first rotates
            for client in clients:
                for target, sock in order:
                    before = [cpu_seconds(p) for p in pids[target]]
                    if client == "nbdcopy":
                        secs = run_nbdcopy(src, sock, args.requests, args.connections)
                    else:
                        secs = run_client(data, sock, args.inflight)
                    used = [(cpu_seconds(p) - b) * 1000 / args.mib for p, b in zip(pids[target], before)]
                    mbs = nbytes / secs / 1e6
                    results[(client, target)].append(mbs)
                    cpu[(client, target)].append(used)
                    per = " + ".join(f"{u:.2f}" for u in used)
                    print(f"  run {i + 1}: {client:8s} {target:6s} {mbs:8.1f} MB/s   cpu {per} ms/MiB", flush=True)
        labels = {"nbdcopy": f"nbdcopy --requests={args.requests} --connections={args.connections}",
                  "hastpy": f"hastpy.nbd.client, {args.inflight} x 1 MiB in flight"}  # fmt: skip
        print("medians:")
        for client in clients:
            med = {t: statistics.median(results[(client, t)]) for t in targets}
            line = f"  {labels[client]}: " + ", ".join(f"{t} {v:.1f} MB/s" for t, v in med.items())
            if "nbdkit" in med:
                line += ", ratio to nbdkit: " + ", ".join(f"{t} {v / med['nbdkit']:.2f}" for t, v in med.items() if t != "nbdkit")
            print(line, flush=True)
            for t in targets:
                runs = cpu[(client, t)]
                per = ", ".join(f"{w} {statistics.median(r[k] for r in runs):.2f}" for k, w in enumerate(who[t]))
                print(f"      cpu ms per MiB written, {t}: {per}", flush=True)
        st = pair.status("a")
        print(f"  primary after the runs: status {st.get('status')}, dirty {st.get('dirty')}, "
              f"statistics {st.get('statistics')}")  # fmt: skip
    finally:
        for r in relays:
            r.stop()
        if kit:
            kit.stop()
        pair.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
