"""A node whose data is the unfinished target of a synchronization never serves it on its own.

The secondary marks its metadata `inconsistent` at the handshake that makes it a sync target
(hastpy protocol v4) and clears the mark when the primary reports the sync complete. A primary
worker that starts with the mark set and no peer holding the newer copy refuses (exit 66): the
role goes back to init with the reason in `hastctl list`, `hastctl promote` exits 66, and only
`hastctl role --force primary` serves that copy. The sync is held in the middle by the
secondary's disk-write gate (HASTPY_TEST_HOLD_DISK), and the primary is then killed with -9.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import replace

import pytest

from harness import MiB, Node, wait_for
from hastpy import constants as const
from hastpy import metadata
from hastpy.primary import RECONNECT_INTERVAL, REFUSED_RETRY

pytestmark = [pytest.mark.integration]

# Extents the primary writes while the secondary is away: the sync has this many to copy.
DIRTY_EXTENTS = 4
WRITE = 256 * 1024  # per extent; the extent is dirty however little of it is written
MARK_LINE = "inconsistent: yes"


def _dump(node) -> str:
    return node.hastctl("dump", node.res).stdout


def _write_extents(node, extents) -> int:
    """WRITE bytes at the start of each extent numbered in `extents`, through node's export,
    flushed; returns the extent size."""
    c = node.client()
    extent = node.status()["extentsize"]
    for i in extents:
        c.pwrite(i * extent, os.urandom(WRITE))
    c.flush()
    c.disconnect()
    return extent


def _outdated_secondary(make_pair):
    """A pair whose secondary reconnected after an outage and holds the first sync write."""
    pair = make_pair(size=64 * MiB)
    gate = pair.b.dir / "hold-disk"
    pair.b.params["env"] = {"HASTPY_TEST_HOLD_DISK": str(gate)}
    pair.start()
    pair.b.role("init")
    wait_for(lambda: pair.a.status()["status"] == "degraded", what="primary degraded")
    c = pair.a.client()
    extent = pair.a.status()["extentsize"]
    for i in range(DIRTY_EXTENTS):
        c.pwrite((2 * i + 1) * extent, os.urandom(WRITE))
    c.flush()
    c.disconnect()
    assert MARK_LINE not in _dump(pair.b)
    gate.touch()
    pair.b.role("secondary")
    wait_for(lambda: pair.b.status().get("inconsistent") is True, what="secondary marked inconsistent")
    assert pair.a.status()["sync"]["state"] == "running"
    return pair, gate


def test_a_completed_sync_clears_the_mark(make_pair):
    pair, gate = _outdated_secondary(make_pair)
    assert MARK_LINE in _dump(pair.b)  # on disk, not only in the worker's memory
    assert "local data: inconsistent" in pair.b.hastctl("list", pair.b.res).stdout
    gate.unlink()
    pair.wait_synced()
    wait_for(lambda: pair.b.status().get("inconsistent") is False, what="mark cleared")
    assert MARK_LINE not in _dump(pair.b)
    assert pair.a.status()["inconsistent"] is False
    assert pair.a.data() == pair.b.data()


def test_an_interrupted_sync_target_does_not_serve_alone_until_forced(make_pair):
    pair, gate = _outdated_secondary(make_pair)
    pair.a.kill_all()  # the primary dies with the sync in the middle
    gate.unlink()
    wait_for(lambda: not pair.b.status().get("workerpid"), what="secondary worker gone after the primary died")
    assert MARK_LINE in _dump(pair.b)
    # No worker answers for it now: hastd reads the mark from the provider, so list tells the
    # admin before any promote is tried.
    st = pair.b.status()
    assert st["role"] == "secondary" and st["inconsistent"] is True
    assert "local data: inconsistent" in pair.b.hastctl("list", pair.b.res).stdout

    cp = pair.b.hastctl("promote", pair.b.res, check=False)
    assert cp.returncode == const.STALE_DATA_EXIT, cp.stderr
    assert "local data is inconsistent" in cp.stderr and "role --force primary" in cp.stderr
    st = pair.b.status()
    assert st["role"] == "init" and not st.get("workerpid")
    assert "inconsistent" in st["worker_error"] and st["worker_exit"] == const.STALE_DATA_EXIT
    assert "worker error: local data is inconsistent" in pair.b.hastctl("list", pair.b.res).stdout
    assert MARK_LINE in _dump(pair.b)  # refusing changed nothing

    pair.b.hastctl("role", "--force", "primary", pair.b.res)
    c = pair.b.client()
    c.pwrite(0, b"f" * 4096)
    c.flush()
    c.disconnect()
    st = pair.b.status()
    assert st["role"] == "primary" and st["inconsistent"] is False and not st.get("worker_error")
    assert MARK_LINE not in _dump(pair.b)


def test_a_stale_primary_is_marked_until_the_sync_from_the_secondary_completes(make_pair):
    pair = make_pair(size=64 * MiB).start()
    # node-b serves alone for a while: its data becomes the newer copy.
    pair.a.role("init")
    pair.b.role("primary")
    _write_extents(pair.b, range(DIRTY_EXTENTS))
    # Back to node-a as primary: it is the older side and syncs from node-b (hast.md §7.2 row 3).
    pair.b.role("secondary")
    pair.a.role("primary")
    pair.wait_synced()
    log = pair.a.log.read_text()
    assert "Local data is older than the secondary's: marked inconsistent" in log
    assert "Local data is up to date again." in log
    assert MARK_LINE not in _dump(pair.a)
    assert pair.a.status()["inconsistent"] is False
    assert pair.a.data() == pair.b.data()


def test_a_fresh_secondary_of_a_primary_that_wrote_before_it_ever_connected_is_marked(make_pair):
    """The `virgin` flag says only that the primary never connected, not that it wrote nothing:
    what it wrote alone is synced to the fresh disk, which is marked until that completes."""
    pair = make_pair(size=64 * MiB)
    gate = pair.b.dir / "hold-disk"
    pair.b.params["env"] = {"HASTPY_TEST_HOLD_DISK": str(gate)}
    pair.start(connect=False)
    pair.a.role("primary")
    assert pair.a.status()["counters"]["resuid"] == 0  # never connected
    _write_extents(pair.a, range(DIRTY_EXTENTS))
    gate.touch()
    pair.b.role("secondary")
    wait_for(lambda: pair.b.status().get("inconsistent") is True, what="fresh secondary marked inconsistent")
    # At the handshake that adopted the resource: not only at a later reconnection (the held
    # sync times the first connection out after `timeout` s, and that one did mark it).
    assert pair.a.log.read_text().count(f"Connected to {pair.ip_b}") == 1
    pair.a.kill_all()
    gate.unlink()
    wait_for(lambda: not pair.b.status().get("workerpid"), what="secondary worker gone after the primary died")
    cp = pair.b.hastctl("promote", pair.b.res, check=False)
    assert cp.returncode == const.STALE_DATA_EXIT, cp.stderr


def _third_node(pair, tmp_path):
    """node C: another node-b (its own directory, disk and address), fresh, as secondary of A."""
    ip_c = pair.ip_a.rsplit(".", 1)[0] + ".3"
    params = {k: v for k, v in pair.a.params.items() if k != "env"}
    node_c = Node("node-b", tmp_path / "c", ip_c, pair.ip_a, params)
    node_c.write_conf(pair.a.dir, node_c.dir, pair.ip_a, ip_c)
    pair.create(node_c, node_c.res)
    node_c.start()
    node_c.role("secondary")
    return node_c


def _point(node, pair, remote: str) -> None:
    """node-a's `remote` becomes remote; SIGHUP."""
    before = node.log.read_text().count("Reloading configuration...")
    pair.write_conf()
    node.conf.write_text(node.conf.read_text().replace(f"remote {pair.ip_b}\n", f"remote {remote}\n"))
    node.reload()
    wait_for(lambda: node.log.read_text().count("Reloading configuration...") > before, what="reload")


def test_a_secondary_the_primary_moved_on_from_is_refused_until_recreated(make_pair, tmp_path):
    """A replicates with B, then with a new copy C (C confirms writes B never sees, and A's
    bitmap forgets them), then is pointed back at B: B has A's resuid and counters as if in
    step, but is refused by the copy IDs instead of being 'synced' from A's bitmap alone."""
    pair = make_pair(size=64 * MiB).start()
    a, b = pair.a, pair.b
    c = a.client()
    c.pwrite(0, os.urandom(4 * MiB))
    c.flush()
    node_c = _third_node(pair, tmp_path)
    try:
        _point(a, pair, node_c.ip)
        wait_for(lambda: f"Connected to {node_c.ip}" in a.log.read_text(), what="A replicating with C")
        pair.wait_synced()  # the full sync of the fresh C
        extent = a.status()["extentsize"]
        for i in range(4, 24):  # more extents than keepdirty would keep: C alone confirms these
            c.pwrite(i * extent, os.urandom(WRITE))
        c.flush()
        b_before = b.data()
        assert b_before != a.data()
        _point(a, pair, pair.ip_b)
        wait_for(lambda: f"Unable to connect to {pair.ip_b}: Replica mismatch: the primary" in a.log.read_text(),
                 what="B refused")  # fmt: skip
        assert "Replica mismatch" in b.log.read_text()
        time.sleep(3 * RECONNECT_INTERVAL)  # a refusal is not retried every second, but at hastd's pace
        assert b.log.read_text().count("Replica mismatch") == 1
        st = a.status()
        assert (st["status"], st["remoteaddr"]) == ("degraded", pair.ip_b)
        assert st["connect_error"].startswith("Replica mismatch: the primary")  # hastctl tells why
        assert "  connect error: Replica mismatch: the primary" in a.hastctl("list", a.res).stdout
        # ... and so does it on B, which refused.
        assert b.status()["connect_error"].startswith("Replica mismatch: the primary")
        assert "  connect error: Replica mismatch: the primary" in b.hastctl("list", b.res).stdout
        assert b.data() == b_before  # nothing was copied to B, right or wrong
        # The way out the message gives: recreate B, which then gets everything.
        b.role("init")
        pair.create(b, b.res)
        b.role("secondary")
        pair.wait_synced()
        assert a.status()["connect_error"] is None
        assert b.status()["connect_error"] is None
        c.disconnect()
        assert a.data() == b.data()
    finally:
        node_c.stop()


def _stale_primary(make_pair, extents: int, before_sync=lambda pair: None, **params):
    """node-b wrote `extents` extents alone as primary; then node-a is made primary again and
    syncs from it (node-a the older copy, marked inconsistent), node-b's disk gate held, so
    that sync stops where it is. before_sync(pair) runs just before. (pair, gate, extentsize)."""
    pair = make_pair(size=64 * MiB, **params)
    gate = pair.b.dir / "hold-disk"  # holds node-b's reads too
    pair.b.params["env"] = {"HASTPY_TEST_HOLD_DISK": str(gate)}
    pair.start()
    a, b = pair.a, pair.b
    a.role("init")
    b.role("primary")
    extent = _write_extents(b, range(extents))
    before_sync(pair)
    gate.touch()
    b.role("secondary")
    a.role("primary")
    wait_for(lambda: a.status().get("inconsistent") is True, what="node-a marked inconsistent")
    return pair, gate, extent


def test_an_inconsistent_primary_is_no_source_for_a_new_copy(make_pair, tmp_path):
    """A syncing from B (A older, marked inconsistent) is pointed at a fresh C mid-sync: it
    refuses to copy its half-old data there, keeps the mark, and finishes from B later."""
    nodes = []
    pair, gate, _ = _stale_primary(make_pair, 16, lambda pair: nodes.append(_third_node(pair, tmp_path)))
    a, b, node_c = pair.a, pair.b, nodes[0]
    try:
        assert a.status()["sync"]["state"] == "running"
        _point(a, pair, node_c.ip)
        wait_for(lambda: f"Unable to connect to {node_c.ip}: The primary's data is inconsistent" in a.log.read_text(),
                 what="C refused as a sync target")  # fmt: skip
        assert a.status()["inconsistent"] is True
        assert f"Connected to {node_c.ip}" not in a.log.read_text()
        assert not any(node_c.data())  # nothing of A's half-old data was copied there
        # C refused before adopting anything: it is as fresh as before, usable later.
        assert json.loads(node_c.hastctl("dump", "--json").stdout)[0]["resuid"] == 0
    finally:
        gate.unlink()
    _point(a, pair, pair.ip_b)
    pair.wait_synced()
    wait_for(lambda: a.status()["inconsistent"] is False, what="A up to date")
    assert a.data() == b.data()
    try:
        _point(a, pair, node_c.ip)  # now a good source: C is brought in as a new copy
        wait_for(lambda: f"Connected to {node_c.ip}" in a.log.read_text(), what="A replicating with C")
        pair.wait_synced()
        assert node_c.data() == a.data()
    finally:
        node_c.stop()


@pytest.mark.parametrize("replication", ["fullsync", "async"])
def test_a_stale_primary_that_loses_its_source_fails_writes_instead_of_diverging(make_pair, replication):
    """node-a syncs from node-b (the newer copy) when node-b dies. A write node-a took alone
    would be copied over by that sync when node-b is back (its extent is marked for it), or,
    acknowledged with localcnt bumped, turn the reconnection into a split-brain: it fails with
    EIO instead, in every mode, and the sync later finishes as if the link had only blinked."""
    pair, gate, extent = _stale_primary(make_pair, 8, replication=replication)
    a, b = pair.a, pair.b
    counters = a.status()["counters"]
    b.kill_all()
    gate.unlink()
    wait_for(lambda: a.status()["status"] == "degraded", what="node-a without its source")
    c = a.client()
    with pytest.raises(OSError) as exc:
        c.pwrite(20 * extent, b"x" * 4096)  # an extent the sync does not even touch
    assert exc.value.errno == errno.EIO
    c.disconnect()
    assert a.status()["counters"] == counters  # no localcnt bump: no split-brain to come
    b.start()
    b.role("secondary")
    pair.wait_synced()
    wait_for(lambda: a.status()["inconsistent"] is False, what="node-a up to date")
    assert "Split-brain" not in a.log.read_text()
    assert a.data() == b.data()


def _replicaid(node) -> int:
    with open(node.disk, "rb") as f:
        return metadata.read_metadata(f).replicaid


def _rewrite_metadata(node, **changes) -> metadata.Metadata:
    """Change fields of node's metadata on its disk (its role init); returns the metadata before."""
    with open(node.disk, "r+b") as f:
        md = metadata.read_metadata(f)
        metadata.write_metadata(f, replace(md, **changes))
    return md


def test_a_copy_without_an_id_keeps_the_one_it_is_given_when_refused(make_pair):
    """B's metadata lost its copy ID (an older hastpy rewrote it): B gives itself a new one, so
    the primary, which names B's old ID, is refused. The new ID is on B's disk from the first
    attempt, and every retry names that same copy."""
    pair = make_pair(size=16 * MiB).start()
    a, b = pair.a, pair.b
    old_id = _replicaid(b)
    assert old_id
    b.role("init")
    _rewrite_metadata(b, replicaid=0)
    b.role("secondary")
    wait_for(lambda: "Replica mismatch" in b.log.read_text(), what="B refused")
    new_id = _replicaid(b)
    assert new_id not in (0, old_id)
    assert f"copy {new_id:016x}" in b.log.read_text()
    wait_for(lambda: b.log.read_text().count("Replica mismatch") >= 2, timeout=REFUSED_RETRY * 3, what="a retry")
    assert _replicaid(b) == new_id
    refusals = [line for line in b.log.read_text().splitlines() if "Replica mismatch" in line]
    assert all(f"copy {new_id:016x}" in line for line in refusals), refusals
    assert a.status()["status"] == "degraded"


def test_a_secondary_whose_provider_it_cannot_use_says_so_in_hastctl_list(make_pair):
    """B's provider holds another resource's metadata: each connection from the primary is
    refused with the provider's reason, which `hastctl list` shows on B (and on A) until B can
    connect again."""
    pair = make_pair(size=16 * MiB).start()
    a, b = pair.a, pair.b
    b.role("init")
    md = _rewrite_metadata(b, resource="other")
    b.role("secondary")
    wait_for(lambda: b.status().get("connect_error"), what="B's refusal in its status")
    reason = b.status()["connect_error"]
    assert "is not part of resource data" in reason, reason
    assert f"  connect error: {reason}" in b.hastctl("list", b.res).stdout
    wait_for(lambda: a.status().get("connect_error") == reason, what="the same reason on A")
    b.role("init")
    _rewrite_metadata(b, resource=md.resource)
    assert b.status().get("connect_error") is None  # a role change forgets it
    b.role("secondary")
    pair.wait_complete()
    assert b.status()["connect_error"] is None
