"""A node whose data is the unfinished target of a synchronization never serves it on its own.

The secondary marks its metadata `inconsistent` at the handshake that makes it a sync target
(hastpy protocol v4) and clears the mark when the primary reports the sync complete. A primary
worker that starts with the mark set and no peer holding the newer copy refuses (exit 66): the
role goes back to init with the reason in `hastctl list`, `hastctl promote` exits 66, and only
`hastctl role --force primary` serves that copy. The sync is held in the middle by the
secondary's disk-write gate (HASTPY_TEST_HOLD_DISK), and the primary is then killed with -9.
"""

from __future__ import annotations

import os

import pytest

from harness import MiB, wait_for
from hastpy import constants as const

pytestmark = [pytest.mark.integration]

# Extents the primary writes while the secondary is away: the sync has this many to copy.
DIRTY_EXTENTS = 4
WRITE = 256 * 1024  # per extent; the extent is dirty however little of it is written
MARK_LINE = "inconsistent: yes"


def _dump(node) -> str:
    return node.hastctl("dump", node.res).stdout


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
    c = pair.b.client()
    extent = pair.b.status()["extentsize"]
    for i in range(DIRTY_EXTENTS):
        c.pwrite(i * extent, os.urandom(WRITE))
    c.flush()
    c.disconnect()
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
