"""`make demo`: a two-node lab, a VIP, a filesystem, a crash of the primary, and the failover.

Builds the namespace lab (hastpy-lab), deploys a HAST pair with keepalived (advert 0.1 s), writes
files and a verifying journal through the primary's mounted ext4, kills the primary (kill -9 of
hastd, its workers and keepalived), and shows the VIP move, the secondary promoted, checked and
mounted with every acknowledged write intact; then the old primary rejoins as secondary and only
the dirty extents are resynced. Every step is printed as it happens; the run ends with the
timings. The lab is taken down at the end, whatever happens. Needs root.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

from hastpy.lab import Lab
from hastpy.lab.cluster import MOUNTPOINT, Cluster

MiB = 1024 * 1024
FILES = 8  # files of 1 MiB written through the filesystem before the crash


class Demo:
    def __init__(self, lab: Lab, vip: str):
        self.lab = lab
        self.cluster = Cluster(lab, vip=vip, tuned=True)
        self.t0 = time.monotonic()
        self.timings: list[tuple[str, float]] = []

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.2f}s] {text}", flush=True)

    def timed(self, what: str, fn, *args):
        start = time.monotonic()
        result = fn(*args)
        self.timings.append((what, time.monotonic() - start))
        return result

    def write_files(self, node: str) -> dict[str, str]:
        sums = {}
        for i in range(FILES):
            data = hashlib.sha256(f"file {i}".encode()).digest() * (MiB // 32)
            path = f"{MOUNTPOINT}/file-{i}"
            self.lab.run(node, ["sh", "-c", f"cat > {path} && sync {path}"], input=data, text=False)
            sums[path] = hashlib.sha256(data).hexdigest()
        return sums

    def check_files(self, node: str, sums: dict[str, str]) -> int:
        out = self.lab.run(node, ["sha256sum", *sums]).stdout.split("\n")
        good = sum(1 for line in out if line and sums.get(line.split()[1]) == line.split()[0])
        return good

    def run(self) -> bool:
        c = self.cluster
        self.say(f"lab up: node-a 10.99.0.1 and node-b 10.99.0.2 on a bridge; VIP 10.99.0.100 ({c.vip})")
        self.timed("deploy HAST (create, hastd, mkfs)", c.setup)
        self.say("hastd runs on both nodes; metadata created; ext4 made on /dev/hast/data")
        primary = self.timed("VIP election and first promotion", c.start)
        self.say(f"{primary} holds the VIP, is primary, has /dev/hast/data checked and mounted on {MOUNTPOINT}")
        sums = self.write_files(primary)
        self.say(f"wrote {FILES} files of 1 MiB through the filesystem on {primary} (fullsync)")
        c.start_writer(primary)
        self.say("a verifying writer appends stamped 4 KiB blocks with O_DSYNC; each ack is recorded on the host")
        self.say(f"kill -9 of {primary}'s hastd, workers and {c.vip}")
        result = c.fail(primary, "kill")
        survivor = c.other(primary)
        self.timings.append(("failover: kill to mounted", result.seconds))
        st = c.status(survivor)
        holders = self.lab.vip_holders()
        self.say(f"VIP now answered by {survivor} (configured on: {', '.join(holders)}; a killed node keeps it, but its hastd is gone)")
        self.say(f"{survivor} is {st['role']}, fsck'd and mounted in {result.seconds:.2f} s after the kill")
        good = self.check_files(survivor, sums)
        self.say(f"files: {good}/{FILES} checksums match on {survivor}")
        self.say(f"journal: {result.acked} acknowledged writes, {result.missing} missing")
        self.say(f"{primary} restarts and rejoins as secondary")
        st = self.timed("rejoin and resync", c.rejoin, primary)
        self.say(f"resync done: {st['sync']['synced'] // MiB} MiB copied (dirty extents only, of a {st['extentsize'] // MiB} MiB extent size)")
        ok = result.ok and good == FILES
        print("\ntimings:")
        for what, secs in self.timings:
            print(f"  {what:<40} {secs:6.2f}s")
        print(f"\n{'OK' if ok else 'FAILED'}: every acknowledged write {'survived' if ok else 'did NOT survive'} the crash")
        return ok


def main() -> None:
    ap = argparse.ArgumentParser(description="the hastpy two-node failover demo")
    ap.add_argument("--vip", choices=("keepalived", "ucarp"), default="keepalived")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("the demo builds network namespaces and mounts filesystems: run it as root")
    with tempfile.TemporaryDirectory(prefix="hastpy-demo-") as tmp:
        lab = Lab(os.path.join(tmp, "lab"))
        lab.up(size=256 * MiB)
        try:
            ok = Demo(lab, args.vip).run()
        finally:
            lab.down(purge=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
