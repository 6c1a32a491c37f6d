#!/usr/bin/env python3
"""Failover time in the namespace lab: kill -9 of the primary to the filesystem mounted elsewhere.

    .venv/bin/python bench/failover.py [--vip keepalived|ucarp] [--runs 5] [--untuned] [--cut]

Brings the lab up, deploys a HAST pair with the VIP manager (tuned: keepalived advert 0.1 s with
VRRPv3; ucarp has no faster safe setting than advbase 1 s, deadratio 3: see UCARP_ADVBASE in
hastpy/lab/cluster.py), and then, --runs times: a verifying writer on the primary, kill -9
of the primary's hastd, workers and VIP daemon, time until the survivor has the filesystem
checked and mounted, verification that every acknowledged write survived, rejoin of the old
primary. Prints each run, then the median and the VIP manager's own detection time measured in
reference/lab.md (0.31 s tuned keepalived, 2.66 s ucarp at advbase 1) for comparison. With
--cut the primary's link is cut instead: the survivor's hook then waits for its secondary
worker to give up on the silent primary (the replication `timeout`, 5 s in the lab) before it
promotes, as ucarp_up.sh does, so no target applies. Needs root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from hastpy.lab import Lab
from hastpy.lab.cluster import Cluster

# Medians of the VIP move alone, reference/lab.md §1 (same machine kind, same lab topology).
# ucarp runs with advbase 1 either way: lab.md's 0.75 s at advbase 0 flapped (its adverts reach
# the backup through libpcap up to 1 s late), so its tuned figure is the advbase-1 one.
VIP_ONLY = {("keepalived", True): 0.308, ("ucarp", True): 2.659, ("keepalived", False): 2.850, ("ucarp", False): 2.659}
TARGET = 2.0  # issue #5: kill to mounted, tuned keepalived


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vip", choices=("keepalived", "ucarp"), default="keepalived")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--untuned", action="store_true", help="default advert intervals (1 s)")
    ap.add_argument("--cut", action="store_true", help="cut the primary's link instead of killing it")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/failover.py needs root (network namespaces, mounts)")
    tuned = not args.untuned
    how, done = ("cut", "cut off") if args.cut else ("kill", "killed")
    with tempfile.TemporaryDirectory(prefix="hastpy-bench-") as tmp:
        lab = Lab(os.path.join(tmp, "lab"))
        lab.up(size=256 * 1024 * 1024)
        try:
            cluster = Cluster(lab, vip=args.vip, tuned=tuned)
            cluster.setup()
            primary = cluster.start()
            times = []
            for run in range(1, args.runs + 1):
                cluster.start_writer(primary)
                result = cluster.fail(primary, how)
                survivor = cluster.other(primary)
                status = "ok" if result.ok else f"{result.missing} ACKNOWLEDGED WRITES MISSING"
                print(f"run {run}: {primary} {done} -> {survivor} mounted in {result.seconds:.3f} s "
                      f"({result.acked} acknowledged writes, {status})", flush=True)  # fmt: skip
                times.append(result.seconds)
                cluster.rejoin(primary, how)
                primary = survivor
        finally:
            lab.down(purge=True)
    median = statistics.median(times)
    vip_only = VIP_ONLY[(args.vip, tuned)]
    print(f"\n{args.vip} ({'tuned' if tuned else 'default'}): median {median:.3f} s from {how} to mounted "
          f"over {len(times)} runs (min {min(times):.3f}, max {max(times):.3f})")  # fmt: skip
    print(f"VIP move alone (reference/lab.md): {vip_only:.3f} s; HAST promotion adds {median - vip_only:.3f} s; "
          f"ratio to the VIP move {median / vip_only:.2f}")  # fmt: skip
    if args.vip == "keepalived" and tuned and not args.cut:
        print(f"target <= {TARGET:.1f} s: {'met' if median <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
