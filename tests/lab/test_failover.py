"""VIP failover in the namespace lab: real ucarp and keepalived, real hastd, a real ext4.

A verifying writer on the primary records each acknowledged write outside the node; the primary is
killed (kill -9 of hastd, its workers and the VIP daemon) or its link is cut; the survivor must hold
the VIP, be primary with the filesystem checked and mounted, and have every acknowledged write.
Then the failed node rejoins as secondary and only dirty extents are resynced.
"""

from __future__ import annotations

import hashlib

import pytest

from hastpy.lab import Lab
from hastpy.lab import topology as topo
from hastpy.lab.cluster import MOUNTPOINT, RESOURCE, Cluster

from conftest import assert_no_foreign_lab

DISK = 256 * topo.MiB


@pytest.fixture
def lab(tmp_path):
    assert_no_foreign_lab()
    lab = Lab(tmp_path / "lab")
    lab.up(size=DISK)
    try:
        yield lab
    finally:
        lab.down(purge=True)
        assert lab.residue() == []


def data_area(lab: Lab, node: str, cluster: Cluster) -> str:
    """sha256 of a node's data area, read from its provider file."""
    md = __import__("json").loads(cluster.hastctl(node, "dump", "--json").stdout)[0]
    h = hashlib.sha256()
    with open(lab.paths.disk(cluster.nodes[node]), "rb") as f:
        f.seek(md["localoff"])
        h.update(f.read(md["datasize"]))
    return h.hexdigest()


def assert_replicas_equal(lab: Lab, cluster: Cluster, primary: str) -> None:
    # Remount read-only so that no write is in flight while both providers are read; both
    # disks get every write, so they must then be byte-identical.
    cluster.lab.run(primary, ["mount", "-o", "remount,ro", MOUNTPOINT])
    try:
        a, b = data_area(lab, "node-a", cluster), data_area(lab, "node-b", cluster)
    finally:
        cluster.lab.run(primary, ["mount", "-o", "remount,rw", MOUNTPOINT], check=False)
    assert a == b, "replicas differ after the resync"


def check_survivor(cluster: Cluster, survivor: str, result) -> None:
    print(f"\n{cluster.vip}: failover {result.seconds:.2f} s from failure to mounted; "
          f"{result.acked} acknowledged writes, {result.missing} missing")  # fmt: skip
    assert result.ok, f"{result.missing} acknowledged writes missing on {survivor}"
    st = cluster.status(survivor)
    assert st["role"] == "primary" and st["device"] == f"/dev/hast/{RESOURCE}"
    assert cluster.mounted(survivor)
    assert survivor in cluster.lab.vip_holders()
    log = (cluster.ndir(survivor) / "failover.log").read_text()
    assert "Filesystem clean." in log and "Promoted." in log


def assert_no_flap(cluster: Cluster, before: dict[str, int], survivor: str) -> None:
    """Since `before` (masterships per node), the survivor became master once and the failed node
    never: no election was lost to a late advert, and the rejoin did not take the VIP back."""
    failed = cluster.other(survivor)
    now = {node: cluster.masterships(node) for node in cluster.nodes}
    assert now[survivor] - before[survivor] == 1, f"{survivor} became master {now[survivor] - before[survivor]} times\n{cluster.diagnostics()}"
    assert now[failed] == before[failed], f"{failed} became master again after it failed\n{cluster.diagnostics()}"
    assert cluster.lab.vip_holders() == [survivor]


def check_rejoined(lab: Lab, cluster: Cluster, failed: str, st: dict) -> None:
    survivor = cluster.other(failed)
    assert st.get("role") == "primary" and st["status"] == "complete", st
    extent = st["extentsize"]
    synced = st["sync"]["synced"]
    print(f"resync after rejoin: {synced / topo.MiB:.1f} MiB")
    assert 0 < synced <= 64 * extent  # dirty extents only (keepdirty 64), never the whole volume
    assert synced < DISK // 2
    assert cluster.status(failed)["role"] == "secondary"
    assert not cluster.mounted(failed)
    assert cluster.mounted(survivor)
    assert_replicas_equal(lab, cluster, survivor)


def masterships(cluster: Cluster) -> dict[str, int]:
    return {node: cluster.masterships(node) for node in cluster.nodes}


@pytest.mark.parametrize("vip", ["keepalived", "ucarp"])
def test_kill_primary_fails_over_with_every_acknowledged_write(lab, vip):
    cluster = Cluster(lab, vip=vip, tuned=True)
    cluster.setup()
    assert cluster.start() == "node-a"
    cluster.start_writer("node-a")
    before = masterships(cluster)
    result = cluster.fail("node-a", "kill")
    check_survivor(cluster, "node-b", result)
    # kill -9 leaves the VIP configured on the dead node too (reference/lab.md §1); its hastd is
    # gone, so it cannot write: one primary only.
    assert cluster.status("node-a") == {}
    st = cluster.rejoin("node-a")
    check_rejoined(lab, cluster, "node-a", st)
    # The restarted VIP manager dropped the stale VIP and stayed backup.
    assert_no_flap(cluster, before, "node-b")


@pytest.mark.parametrize("vip", ["keepalived", "ucarp"])
def test_link_cut_fails_over_and_the_old_primary_rejoins(lab, vip):
    cluster = Cluster(lab, vip=vip, tuned=True)
    cluster.setup()
    cluster.start()
    cluster.start_writer("node-a")
    before = masterships(cluster)
    result = cluster.fail("node-a", "cut")
    check_survivor(cluster, "node-b", result)
    st = cluster.rejoin("node-a", "cut")
    check_rejoined(lab, cluster, "node-a", st)
    assert_no_flap(cluster, before, "node-b")


@pytest.mark.parametrize("vip", ["keepalived", "ucarp"])
def test_ten_failovers_back_and_forth(lab, vip):
    cluster = Cluster(lab, vip=vip, tuned=True)
    cluster.setup()
    primary = cluster.start()
    times = []
    for _ in range(10):
        cluster.start_writer(primary)
        before = masterships(cluster)
        result = cluster.fail(primary, "kill")
        survivor = cluster.other(primary)
        assert result.ok, f"{result.missing} acknowledged writes missing after failover to {survivor}"
        times.append(result.seconds)
        cluster.rejoin(primary)
        assert_no_flap(cluster, before, survivor)
        primary = survivor
    assert_replicas_equal(lab, cluster, primary)
    times.sort()
    print(f"\n{vip}: 10 failovers: min {times[0]:.2f} s, median {times[5]:.2f} s, max {times[-1]:.2f} s "
          f"({' '.join(f'{t:.2f}' for t in times)})")  # fmt: skip
    assert lab.run(primary, ["findmnt", "-n", "-o", "SOURCE", MOUNTPOINT]).stdout.strip().startswith("/dev/loop")
