"""`hastctl list` / `hastctl status` against real pairs: counters equal what the test did (hast.md §9).

The primary counts every NBD request it served; the secondary counts the requests it received
from the primary. I/Os here are at most 1 MiB (the negotiated maxio), so each is one request on
the wire and the two nodes' counters match exactly.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal

import pytest

from harness import MiB, sha, wait_for
from hastpy.nbd import Command

pytestmark = pytest.mark.integration

STAT_KEYS = ("reads", "writes", "deletes", "flushes", "read_errors", "write_errors", "delete_errors", "flush_errors")


def _list_json(node, res=None) -> dict:
    return json.loads(node.hastctl("list", "--json", *([res] if res else [])).stdout)[0]


def _list_text_stats(node) -> dict[str, str]:
    """The `statistics:` block of `hastctl list`, as {label: rest of line}."""
    text = node.hastctl("list").stdout
    lines = text.splitlines()
    i = lines.index("  statistics:")
    out = {}
    for line in lines[i + 1 :]:
        m = re.fullmatch(r"    ([a-z ]+): (.*)", line)
        if not m:
            break
        out[m.group(1)] = m.group(2)
    return out


def test_counters_match_the_io_done(make_pair):
    pair = make_pair(size=64 * MiB).start()
    ext = pair.a.status()["extentsize"]
    rng = random.Random(11)
    c = pair.a.client()
    # A working set of 4 extents, well inside keepdirty (64).
    hot = [3, 4, 10, 20]
    nwrites = 120
    for _ in range(nwrites):
        e = rng.choice(hot)
        length = rng.randrange(1, 65) * 4096
        off = e * ext + rng.randrange(0, (ext - length) // 4096 + 1) * 4096
        c.pwrite(off, rng.randbytes(length))
    nreads = 37
    for _ in range(nreads):
        c.pread(rng.randrange(0, (c.size - MiB) // 512) * 512, rng.choice((512, 4096, MiB)))
    ntrims = 5
    for i in range(ntrims):
        c.trim(hot[i % len(hot)] * ext + 128 * 1024, 256 * 1024)
    nflushes = 3
    for _ in range(nflushes):
        c.flush()
    c.disconnect()

    a = _list_json(pair.a)
    st = a["statistics"]
    assert (st["reads"], st["writes"], st["deletes"], st["flushes"]) == (nreads, nwrites, ntrims, nflushes)
    assert st["read_errors"] == st["write_errors"] == st["delete_errors"] == st["flush_errors"] == 0
    # One bitmap write per extent of the working set, the first time it is written.
    assert 1 <= st["activemap_updates"] <= len(hot)
    assert a["dirty"] == 0
    assert a["status"] == "complete"

    # The secondary received every write, trim and flush; reads were served locally.
    b = _list_json(pair.b)
    sb = b["statistics"]
    assert (sb["reads"], sb["writes"], sb["deletes"], sb["flushes"]) == (0, nwrites, ntrims, nflushes)
    assert sb["read_errors"] == sb["write_errors"] == sb["delete_errors"] == sb["flush_errors"] == 0
    assert b["role"] == "secondary"

    # The text form says the same.
    text = _list_text_stats(pair.a)
    assert text["reads"] == str(nreads)
    assert text["writes"] == str(nwrites)
    assert text["deletes"] == str(ntrims)
    assert text["flushes"] == str(nflushes)
    assert text["activemap updates"] == str(st["activemap_updates"])
    assert text["local errors"] == "read: 0, write: 0, delete: 0, flush: 0"
    assert text["queues"].startswith("local: ")
    tb = _list_text_stats(pair.b)
    assert (tb["reads"], tb["writes"], tb["deletes"], tb["flushes"]) == ("0", str(nwrites), str(ntrims), str(nflushes))
    assert sha(pair.a.data()) == sha(pair.b.data())


def test_activemap_updates_track_writes_beyond_keepdirty(make_pair):
    """keepdirty 4, writes round-robin over 16 extents in strides of 3 (never the extent after
    the last one, so no sequential pre-marking). Each extent's first write costs a bitmap
    update. An extent that leaves the keepdirty list keeps its bit until a FLUSH made its
    writes durable on both nodes; then one more update clears the 12 evicted extents, and a
    write to any of them costs one again."""
    pair = make_pair(size=64 * MiB, create_args=["-k", "4"]).start()
    a = pair.a.status()
    assert a["keepdirty"] == 4
    assert pair.b.status()["keepdirty"] == 4  # the secondary's metadata says the same
    ext = a["extentsize"]
    c = pair.a.client()
    order = [i * 3 % 16 for i in range(16)]

    for e in order:
        c.pwrite(e * ext + 8192, os.urandom(4096))
    assert pair.a.status()["statistics"]["activemap_updates"] == 16
    c.flush()

    def cleared():
        st = pair.a.status()["statistics"]["activemap_updates"]
        return st if st == 17 else None

    updates = wait_for(cleared, what="the bitmap write that clears after the FLUSH")
    for e in order:
        c.pwrite(e * ext + 8192, os.urandom(4096))
    c.disconnect()
    st = pair.a.status()["statistics"]
    assert st["writes"] == 32
    assert st["activemap_updates"] - updates >= 12


def test_sequential_writes_premark_the_next_extent(make_pair):
    """A forward stream over new extents: each bitmap write also marks the next extent
    (activemap.py, sequential pre-marking), so only every other extent costs an update."""
    pair = make_pair(size=64 * MiB, create_args=["-k", "4"]).start()
    ext = pair.a.status()["extentsize"]
    c = pair.a.client()
    nextents = 24
    for i in range(nextents):
        c.pwrite(i * ext + 8192, os.urandom(4096))
    c.disconnect()
    st = pair.a.status()["statistics"]
    assert st["writes"] == nextents
    assert nextents // 2 <= st["activemap_updates"] <= nextents // 2 + 2


def test_activemap_updates_within_keepdirty_are_rare(make_pair):
    pair = make_pair(size=64 * MiB, create_args=["-k", "4"]).start()
    ext = pair.a.status()["extentsize"]
    c = pair.a.client()
    nwrites = 64
    for i in range(nwrites):
        c.pwrite((i % 4) * ext + 8192, os.urandom(4096))
    c.disconnect()
    st = pair.a.status()["statistics"]
    assert st["writes"] == nwrites
    assert st["activemap_updates"] <= 4


def test_status_text_and_json(make_pair):
    pair = make_pair(size=64 * MiB).start()
    header = "Name\tStatus\t Role\t\tComponents"
    rows = {}
    for node, peer, role in ((pair.a, pair.ip_b, "primary"), (pair.b, pair.ip_a, "secondary")):
        out = node.hastctl("status").stdout.splitlines()
        assert out[0] == header
        assert out[1] == f"data\t{'complete':<9}{role:<15}{node.disk}\t{peer}"
        assert len(out) == 2
        rows[node.name] = json.loads(node.hastctl("status", "--json").stdout)
    for name, role in (("node-a", "primary"), ("node-b", "secondary")):
        (r,) = rows[name]
        assert (r["name"], r["role"], r["status"]) == ("data", role, "complete")
        assert r["workerpid"] > 0

    # The secondary goes away: the primary is degraded, the secondary has no worker ("-").
    pair.b.role("init")
    wait_for(lambda: pair.a.status()["status"] == "degraded", what="degraded")
    assert pair.a.hastctl("status").stdout.splitlines()[1] == f"data\t{'degraded':<9}{'primary':<15}{pair.a.disk}\t{pair.ip_b}"
    assert pair.b.hastctl("status").stdout.splitlines()[1] == f"data\t{'-':<9}{'init':<15}{pair.b.disk}\t{pair.ip_a}"
    (r,) = json.loads(pair.b.hastctl("status", "--json").stdout)
    assert (r["role"], r["workerpid"]) == ("init", 0)
    # Written alone: the last synchronization was done, the next one is needed.
    c = pair.a.client()
    c.pwrite(0, b"d" * 4096)
    c.disconnect()
    sync = pair.a.status()["sync"]
    assert sync["state"] == "needed" and sync["pending"] > 0, sync
    assert f"sync: needed, {sync['pending']} bytes to go" in pair.a.hastctl("list").stdout
    wait_for(lambda: "WARNING Unable to connect to" in pair.a.log.read_text(), what="why it cannot reconnect, without -d")


def test_status_of_several_resources_and_unknown_names(make_pair):
    pair = make_pair(size=32 * MiB, resources=["data", "logs"]).start()
    out = pair.a.hastctl("status").stdout.splitlines()
    assert out[0] == "Name\tStatus\t Role\t\tComponents"
    assert [line.split("\t")[0] for line in out[1:]] == ["data", "logs"]
    assert out[2] == f"logs\t{'complete':<9}{'primary':<15}{pair.a.disk_of('logs')}\t{pair.ip_b}"
    (only,) = json.loads(pair.a.hastctl("status", "--json", "logs").stdout)
    assert only["name"] == "logs"
    cp = pair.a.hastctl("status", "nosuch", check=False)
    assert cp.returncode != 0
    assert "nosuch" in cp.stderr


def test_writes_received_together_share_a_bitmap_write(make_pair):
    """Group commit: writes to 32 extents none of which is marked (keepdirty 4, strides of 2,
    so no pre-marking), sent without waiting for replies, reach the primary a few receives at a
    time, and each run of them costs one bitmap write, not one each as when they come one by
    one (test_activemap_updates_track_writes_beyond_keepdirty)."""
    pair = make_pair(size=128 * MiB, create_args=["-k", "4"]).start()
    ext = pair.a.status()["extentsize"]
    c = pair.a.client()
    nwrites = 32
    blocks = {2 * i * ext + 8192: os.urandom(4096) for i in range(nwrites)}
    handles = c.submit_many([(Command.WRITE, off, data) for off, data in blocks.items()])
    assert all(c.reply(h).error == 0 for h in handles)
    for off, data in blocks.items():
        assert c.pread(off, 4096) == data
    c.disconnect()
    st = pair.a.status()["statistics"]
    assert st["writes"] == nwrites
    assert 1 <= st["activemap_updates"] <= nwrites // 2
    wait_for(lambda: pair.b.status()["statistics"]["writes"] == nwrites)
    assert sha(pair.a.data()) == sha(pair.b.data())


def test_without_a_worker_status_reads_the_provider_metadata(make_pair):
    """Role init has no worker to ask: hastd reads the mark, extentsize and keepdirty from the
    provider; a provider it cannot read is reported, not hidden."""
    pair = make_pair().start(connect=False)
    a = pair.a
    st = a.status()
    assert st["role"] == "init" and not st.get("workerpid")
    dump = json.loads(a.hastctl("dump", "--json").stdout)[0]
    assert (st["inconsistent"], st["extentsize"], st["keepdirty"]) == (False, dump["extentsize"], dump["keepdirty"])
    assert f"extentsize: {dump['extentsize']} " in a.hastctl("list", "data").stdout

    moved = a.dir / "moved-away"
    os.rename(st["localpath"], moved)
    try:
        st = a.status()
        assert "inconsistent" not in st
        assert st["metadata_error"] == f"Unable to open {st['localpath']}: No such file or directory."
        assert f"metadata error: Unable to open {st['localpath']}" in a.hastctl("list", "data").stdout
    finally:
        os.rename(moved, st["localpath"])


def test_a_primary_whose_worker_does_not_answer_shows_the_dirty_bytes_on_disk(make_pair):
    """A primary worker that is busy connecting or restarting cannot be asked: `dirty` is then
    read from the bitmap on disk (what that worker will resync), not left out or shown as 0."""
    pair = make_pair(size=64 * MiB).start()
    pair.b.stop()
    a = pair.a
    wait_for(lambda: a.status()["status"] == "degraded", what="degraded")
    c = a.client()
    for ext in (0, 5, 9):  # extentsize 2 MiB: three extents written alone
        c.pwrite(ext * 2 * MiB + 4096, os.urandom(4096))
    c.flush()
    c.disconnect()
    live = _list_json(a)["dirty"]
    assert live == 3 * 2 * MiB
    pid = a.status()["workerpid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        st = _list_json(a)  # the worker's answer times out
        assert "statistics" not in st and st["workerpid"] == pid
        assert st["dirty"] == live
        assert f"dirty: {live} (6.0MB)" in a.hastctl("list").stdout
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _list_json(a)["statistics"]["writes"] == 3
