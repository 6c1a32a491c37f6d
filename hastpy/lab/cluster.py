"""A HAST pair with a virtual IP on the lab's two nodes: set up, write, fail over, rejoin.

Used by the lab tests and by the demo. Everything runs inside the nodes through `Lab.run` and
`Lab.spawn`: hastd, ucarp or keepalived with hook scripts rendered by `hastctl render-hooks`, the
filesystem mounted by `hastctl promote`, and a verifying writer whose acknowledgements are recorded
on the host, outside the node that may die.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hastpy.lab import topology as topo
from hastpy.lab.lab import Lab

RESOURCE = "data"
MOUNTPOINT = "/srv/hast/data"
JOURNAL = "journal"
BIN = Path(sys.executable).parent
# keepalived: priority decides the first master; nopreempt keeps the VIP where it is afterwards.
PRIORITY = {"node-a": 150, "node-b": 100}
# ucarp's timers. ucarp reads adverts through libpcap opened with a 1000 ms capture timeout, and
# on Linux (TPACKET_V3) the kernel hands captured packets over only when that timer retires the
# ring block: every advert reaches the backup up to 1 s late (measured: sent at .748, handled at
# .716 of the next second). A backup declares the master dead after advbase * deadratio +
# advskew/256 s without an advert, so that must stay well above 1 s + advbase: advbase 0 (sub-
# second adverts) leaves only the skew, and the backup then became master after every batch and
# the node with the lower address won the tie between two masters -- the VIP flapped, and a
# rejoining node-a (10.99.0.1) took it back from node-b. advbase is whole seconds, so 1 s with the
# default deadratio 3 is the fastest safe setting: about 3 s from the last advert to takeover.
UCARP_ADVBASE = 1
UCARP_DEADRATIO = 3
# The same skew on both nodes and no --preempt: whoever is master keeps the VIP; a starting node
# hears the master well within its 3 s master-down time and stays backup.
UCARP_SKEW = 0
# What each VIP manager logs when it becomes master (ucarp on stderr, keepalived with -l).
MASTER_LINE = {"ucarp": "Switching to state: MASTER", "keepalived": "Entering MASTER STATE"}
STEP_TIMEOUT = 60.0
RESYNC_TIMEOUT = 120.0  # a lab resync is a few dirty extents: seconds; this bounds a stuck one
POLL = 0.02

CONF = """\
# hast.conf of the hastpy lab ({node})
control uds:///run/hastctl
pidfile /run/hastd.pid
replication {replication}
timeout {timeout}
resource {name} {{
    attach fuse
    on node-a {{
        local {disk_a}
        remote {ip_b}
    }}
    on node-b {{
        local {disk_b}
        remote {ip_a}
    }}
}}
"""


@dataclass
class FailoverResult:
    seconds: float  # from the kill (or cut) to the filesystem mounted on the survivor
    acked: int  # writes the verifying writer saw acknowledged before the failure
    missing: int  # of those, absent or damaged on the survivor (must be 0)

    @property
    def ok(self) -> bool:
        return self.acked > 0 and self.missing == 0


class Cluster:
    def __init__(self, lab: Lab, vip: str = "keepalived", tuned: bool = True, replication: str = "fullsync", timeout: int = 5):
        if vip not in ("keepalived", "ucarp"):
            raise ValueError(f"unknown VIP manager {vip!r}")
        self.lab = lab
        self.vip = vip
        self.tuned = tuned
        self.replication = replication
        self.timeout = timeout
        self.nodes = {n.name: n for n in topo.NODES}
        self.writer = None
        self.vip_procs: dict[str, object] = {}

    # -- paths ----------------------------------------------------------------------------------

    def ndir(self, node: str) -> Path:
        return self.lab.paths.node_dir(self.nodes[node])

    def hooks_dir(self, node: str) -> Path:
        return self.ndir(node) / "hooks"

    @property
    def acks_file(self) -> Path:
        return self.lab.dir / "acks.log"

    def other(self, node: str) -> str:
        return "node-b" if node == "node-a" else "node-a"

    # -- commands in nodes ----------------------------------------------------------------------

    def hastctl(self, node: str, *args: str, check: bool = True):
        return self.lab.run(node, [str(BIN / "hastctl"), *args], check=check, timeout=120)

    def status(self, node: str) -> dict:
        cp = self.hastctl(node, "list", "--json", RESOURCE, check=False)
        if cp.returncode:
            return {}
        return json.loads(cp.stdout)[0]

    def mounted(self, node: str) -> bool:
        return self.lab.run(node, ["findmnt", "-n", MOUNTPOINT], check=False).returncode == 0

    def wait(self, what: str, predicate, timeout: float = STEP_TIMEOUT) -> float:
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(POLL)
        return time.monotonic() - start

    # -- setup ----------------------------------------------------------------------------------

    def write_config(self) -> None:
        a, b = self.nodes["node-a"], self.nodes["node-b"]
        for n in (a, b):
            self.lab.paths.hast_conf(n).write_text(
                CONF.format(node=n.name, replication=self.replication, timeout=self.timeout, name=RESOURCE,
                            disk_a=self.lab.paths.disk(a), disk_b=self.lab.paths.disk(b), ip_a=a.ip, ip_b=b.ip)  # fmt: skip
            )

    def start_hastd(self, node: str) -> None:
        self.lab.run(node, ["rm", "-f", "/run/hastctl"], check=False)
        self.lab.spawn(node, [str(BIN / "hastd"), "-F"], log=self.ndir(node) / "hastd.log")
        self.wait(f"hastd on {node}", lambda: self.hastctl(node, "status", check=False).returncode == 0)

    def setup(self) -> None:
        """Fresh metadata on both nodes, hastd running, an ext4 made through node-a, then both
        nodes secondary: the VIP manager decides who becomes primary."""
        self.write_config()
        for node in self.nodes:
            self.hastctl(node, "create", RESOURCE)
            self.start_hastd(node)
        self.hastctl("node-b", "role", "secondary", RESOURCE)
        self.hastctl("node-a", "role", "primary", RESOURCE)
        self.wait("node-a connected", lambda: self.status("node-a").get("status") == "complete")
        self.hastctl("node-a", "promote", RESOURCE)  # waits for /dev/hast/data
        # No lazy init: ext4lazyinit would otherwise keep zeroing inode tables in the background
        # for minutes after each mount, writes that make replica comparisons race.
        mkfs = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", f"/dev/hast/{RESOURCE}"]
        self.lab.run("node-a", mkfs, timeout=120)
        self.hastctl("node-a", "role", "secondary", RESOURCE)
        for node in self.nodes:
            self.render_hooks(node)

    def render_hooks(self, node: str) -> None:
        args = ["render-hooks", self.vip, "--out", str(self.hooks_dir(node)), "--vip", f"{topo.VIP}/{topo.PREFIXLEN}",
                "--interface", topo.NODE_IFACE, "--mount", f"{RESOURCE}:{MOUNTPOINT}:ext4",
                "--priority", str(PRIORITY[node]), "--advert-int", "0.1" if self.tuned else "1"]  # fmt: skip
        self.hastctl(node, *args)
        logfile = self.ndir(node) / "failover.log"
        for script in self.hooks_dir(node).glob("*.sh"):
            script.write_text(script.read_text().replace("/var/log/hast-failover.log", str(logfile)))

    def start_vip(self, node: str) -> None:
        n = self.nodes[node]
        hooks = self.hooks_dir(node)
        log = self.ndir(node) / f"{self.vip}.log"
        if self.vip == "keepalived":
            # A killed keepalived leaves its pid files; a new one refuses to start over them.
            self.lab.run(node, ["rm", "-f", "/run/keepalived.pid", "/run/keepalived-vrrp.pid"], check=False)
            argv = ["keepalived", "-n", "-l", "-D", "-f", str(hooks / "keepalived.conf"),
                    "-p", "/run/keepalived.pid", "-r", "/run/keepalived-vrrp.pid"]  # fmt: skip
        else:
            # No --neutral: the downscript also runs when ucarp starts as backup, which removes a
            # VIP that a crashed (kill -9) ucarp left behind and makes sure this node is secondary.
            # `tuned` does not apply: ucarp cannot go below these timers (see UCARP_ADVBASE).
            timers = ["-b", str(UCARP_ADVBASE), "-r", str(UCARP_DEADRATIO), "-k", str(UCARP_SKEW)]
            argv = ["ucarp", "-i", topo.NODE_IFACE, "-s", n.ip, "-v", "1", "-p", "hastpy-lab", "-a", topo.VIP,
                    "-u", str(hooks / "vip-up.sh"), "-d", str(hooks / "vip-down.sh"), "-z", "-x", node, *timers]  # fmt: skip
        self.vip_procs[node] = self.lab.spawn(node, argv, log=log)

    def start(self) -> str:
        """Start the VIP managers; returns the node that became primary with the mount."""
        self.start_vip("node-a")
        self.wait("node-a primary and mounted", lambda: self.mounted("node-a"))
        self.start_vip("node-b")
        self.wait("node-b secondary and connected", lambda: self.status("node-a").get("status") == "complete")
        return "node-a"

    # -- the verifying writer -------------------------------------------------------------------

    def start_writer(self, node: str) -> None:
        self.acks_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "hastpy.lab.writer", "write", f"{MOUNTPOINT}/{JOURNAL}", str(self.acks_file)]
        self.writer = self.lab.spawn(node, argv, log=self.ndir(node) / "writer.log")
        self.wait("first acknowledged write", lambda: self.acks_file.exists() and self.acks_file.stat().st_size > 0)

    def verify(self, node: str) -> dict:
        argv = [sys.executable, "-m", "hastpy.lab.writer", "verify", f"{MOUNTPOINT}/{JOURNAL}", str(self.acks_file)]
        return json.loads(self.lab.run(node, argv, timeout=300).stdout)

    # -- failures -------------------------------------------------------------------------------

    def fail(self, node: str, how: str = "kill") -> FailoverResult:
        """Kill (kill -9 of hastd, its workers and the VIP manager) or cut `node`; wait until the
        other node holds the VIP, is primary and has the filesystem mounted; verify the data."""
        survivor = self.other(node)
        time.sleep(0.5)  # let the writer get some acknowledgements in
        t0 = time.monotonic()
        if how == "kill":
            self.lab.kill(node)
        else:
            self.lab.cut(node)
        self.wait(f"{survivor} mounted", lambda: self.mounted(survivor))
        seconds = time.monotonic() - t0
        if self.writer is not None:
            self.writer.kill()
            self.writer.wait()
        v = self.verify(survivor)
        return FailoverResult(seconds, v["acked"], v["nmissing"])

    def rejoin(self, node: str, how: str = "kill") -> dict:
        """Bring a failed node back as secondary; returns the survivor's status after the resync."""
        survivor = self.other(node)
        if how == "cut":
            self.lab.heal(node)
            self.wait(f"{node} demoted", lambda: not self.mounted(node))
        else:
            # The killed node's mount sits on a device whose server died: unmount it lazily, then
            # hastd's start-up removes the stale device.
            self.lab.run(node, ["umount", "-l", MOUNTPOINT], check=False)
            self.start_hastd(node)
            self.start_vip(node)
        self.wait(f"{node} back as secondary", lambda: self.status(node).get("role") == "secondary")

        def synced():
            st = self.status(survivor)
            return st.get("status") == "complete" and st.get("sync", {}).get("state") == "done" and not st["sync"]["pending"]

        try:
            self.wait("resync", synced, timeout=RESYNC_TIMEOUT)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.diagnostics()}") from None
        return self.status(survivor)

    def masterships(self, node: str) -> int:
        """How often the VIP manager on `node` has become master (from its log, all runs)."""
        path = self.ndir(node) / f"{self.vip}.log"
        if not path.exists():
            return 0
        return path.read_text(errors="replace").count(MASTER_LINE[self.vip])

    def diagnostics(self, lines: int = 15) -> str:
        """Both nodes' status and log tails, for a failure message."""
        out = []
        for node in self.nodes:
            out.append(f"== {node}: {json.dumps(self.status(node))}")
            for name in ("hastd.log", "failover.log", f"{self.vip}.log"):
                path = self.ndir(node) / name
                if path.exists():
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                    out.append(f"-- {node}/{name}:\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        for node in self.nodes:
            self.lab.kill(node)
