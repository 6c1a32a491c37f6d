"""The README's first command: `make demo` (python -m hastpy.demo), run end to end as a user would.

It must print every step as it happens, end with the timings and OK, exit 0, and leave no lab
behind (namespaces, loop devices, processes of the lab's directory).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from hastpy.lab import topology as topo

from conftest import assert_no_foreign_lab

# The demo builds a lab, deploys, fails over once and resyncs: about a minute here; this bounds
# a hung step, far below CI's budget.
DEMO_TIMEOUT = 600
# Lines the demo prints, in this order: each step, then the timings and the verdict.
STEPS = [
    r"lab up: node-a 10\.99\.0\.1 and node-b 10\.99\.0\.2",
    r"node-a holds the VIP, is primary, has /dev/hast/data checked and mounted",
    r"wrote 8 files of 1 MiB",
    r"kill -9 of node-a's hastd, workers and {vip}",
    r"VIP now answered by node-b",
    r"node-b is primary, fsck'd and mounted in [0-9.]+ s after the kill",
    r"files: 8/8 checksums match on node-b",
    r"journal: [1-9][0-9]* acknowledged writes, 0 missing",
    r"node-a restarts and rejoins as secondary",
    r"resync done: [0-9]+ MiB copied",
    r"^timings:$",
    r"failover: kill to mounted +[0-9.]+s",
    r"^OK: every acknowledged write survived the crash$",
]


@pytest.mark.parametrize("vip", ["keepalived", "ucarp"])
def test_demo_runs_end_to_end_and_cleans_up(vip):
    assert_no_foreign_lab()
    argv = [sys.executable, "-m", "hastpy.demo"] + (["--vip", vip] if vip != "keepalived" else [])
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=DEMO_TIMEOUT)
    out = cp.stdout
    assert cp.returncode == 0, f"{out}\n{cp.stderr}"
    pos = 0
    for step in STEPS:
        m = re.compile(step.format(vip=vip), re.M).search(out, pos)
        assert m, f"missing, or out of order: {step!r}\n{out}"
        pos = m.end()
    # Steps are printed as they happen, each stamped with the time since the start.
    stamps = [float(s) for s in re.findall(r"^\[ *([0-9.]+)s\]", out, re.M)]
    assert len(stamps) >= 10 and stamps == sorted(stamps)
    assert not [n for n in topo.NAMESPACES if os.path.lexists(topo.netns_path(n))]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert "hastpy-demo-" not in loops
