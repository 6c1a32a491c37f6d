"""Hooks fired by real hastd pairs (hast.md §8): exact argv, on the right node, clean exec, timeout.

Each node's `exec` is its own recorder script (the harness replaces `{node}` in the path), which
appends one JSON line per call: the node, argv, the environment exactly as execve passed it and
its open descriptors. $HOSTNAME cannot tell the nodes apart: both run on this host and the hook
environment is clean.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from harness import MiB, sha, wait_for

pytestmark = pytest.mark.integration

PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())

RECORDER = """\
#!{python} -I
import json, os, sys
fds = {{}}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        pass
with open("/proc/self/environ", "rb") as f:
    env = dict(kv.split("=", 1) for kv in f.read().decode().split("\\0") if kv)
line = json.dumps({{"node": {node!r}, "pid": os.getpid(), "argv": sys.argv, "env": env, "fds": fds}}) + "\\n"
fd = os.open({out!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, line.encode())
os.close(fd)
"""


class Hooks:
    """The recorders of both nodes and what they recorded."""

    def __init__(self, directory: Path):
        self.out = directory / "hooks.jsonl"
        for node in ("node-a", "node-b"):
            path = directory / f"hook-{node}.py"
            path.write_text(RECORDER.format(python=sys.executable, node=node, out=str(self.out)))
            path.chmod(0o755)
        self.exec = str(directory / "hook-{node}.py")
        self.scripts = {node: str(directory / f"hook-{node}.py") for node in ("node-a", "node-b")}

    def records(self) -> list[dict]:
        """Every call so far, in the order hastd started them.

        Hooks run concurrently, so the file's order is the order they *finished*; the pid each
        got at fork is the order they were started (hastd forks them one by one).
        """
        if not self.out.exists():
            return []
        recs = [json.loads(line) for line in self.out.read_text().splitlines() if line.endswith("}")]
        pids = [r["pid"] for r in recs]
        # pids wrap at pid_max (32768 by default): order them on the circle, from the gap.
        wrapped = bool(pids) and max(pids) - min(pids) > PID_MAX // 2
        return sorted(recs, key=lambda r: r["pid"] + (PID_MAX if wrapped and r["pid"] < PID_MAX // 2 else 0))

    def calls(self, node: str) -> list[list[str]]:
        """argv after the program, in the order hastd started them, of one node's hooks."""
        out = []
        for rec in self.records():
            if rec["node"] == node:
                assert rec["argv"][0] == self.scripts[node]
                out.append(rec["argv"][1:])
        return out

    def wait(self, node: str, *argv: str, count: int = 1, timeout: float = 30.0) -> None:
        wait_for(lambda: self.calls(node).count(list(argv)) >= count, timeout,
                 what=f"hook {' '.join(argv)} x{count} on {node}; got {self.calls(node)}")  # fmt: skip


@pytest.fixture
def hooks(tmp_path):
    return Hooks(tmp_path)


def _events(calls: list[list[str]], *names: str) -> list[list[str]]:
    return [c for c in calls if c[0] in names]


def _degrade_and_write(pair, extents=(3, 7)):
    """The secondary goes away, the primary writes alone into the given extents."""
    pair.b.role("init")
    wait_for(lambda: pair.a.status()["status"] == "degraded", what="degraded")
    c = pair.a.client()
    ext = pair.a.status()["extentsize"]
    for e in extents:
        c.pwrite(e * ext, os.urandom(64 * 1024))
    c.flush()
    c.disconnect()


def test_role_and_connect_hooks_on_both_nodes_with_clean_exec(make_pair, hooks):
    pair = make_pair(exec=hooks.exec, env={"HASTPY_LEAK": "must-not-reach-hooks"}).start()
    hooks.wait("node-b", "role", "data", "init", "secondary")
    hooks.wait("node-a", "role", "data", "init", "primary")
    hooks.wait("node-a", "connect", "data")
    hooks.wait("node-b", "connect", "data")
    # A fresh pair is in sync at once (virgin): no sync hooks at all.
    assert not _events(hooks.calls("node-a") + hooks.calls("node-b"), "syncstart", "syncdone", "syncintr")
    for rec in hooks.records():
        assert rec["env"] == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
        assert rec["fds"] == {"0": "/dev/null", "1": "/dev/null", "2": "/dev/null"}, rec

    # The secondary goes away: the primary emits disconnect.
    pair.b.role("init")
    hooks.wait("node-b", "role", "data", "secondary", "init")
    hooks.wait("node-a", "disconnect", "data")
    # It comes back: the primary reconnects and both emit connect again.
    pair.b.role("secondary")
    hooks.wait("node-a", "connect", "data", count=2)
    hooks.wait("node-b", "connect", "data", count=2)
    # The primary goes away: the secondary worker sees the connection drop and emits disconnect.
    pair.a.role("init")
    hooks.wait("node-a", "role", "data", "primary", "init")
    hooks.wait("node-b", "disconnect", "data")

    a = hooks.calls("node-a")
    assert a[0] == ["role", "data", "init", "primary"]
    assert _events(a, "connect", "disconnect") == [["connect", "data"], ["disconnect", "data"], ["connect", "data"]]
    assert not _events(a, "split-brain")
    b = hooks.calls("node-b")
    assert b[0] == ["role", "data", "init", "secondary"]
    assert _events(b, "role") == [["role", "data", "init", "secondary"], ["role", "data", "secondary", "init"],
                                  ["role", "data", "init", "secondary"]]  # fmt: skip
    assert not _events(b, "syncstart", "syncdone", "syncintr", "split-brain")


def test_sync_hooks_on_the_primary_only(make_pair, hooks):
    pair = make_pair(exec=hooks.exec).start()
    _degrade_and_write(pair)
    pair.b.role("secondary")
    hooks.wait("node-a", "syncdone", "data")
    pair.wait_synced()
    a = _events(hooks.calls("node-a"), "connect", "disconnect", "syncstart", "syncdone", "syncintr")
    assert a == [["connect", "data"], ["disconnect", "data"], ["connect", "data"], ["syncstart", "data"], ["syncdone", "data"]]
    assert not _events(hooks.calls("node-b"), "syncstart", "syncdone", "syncintr")
    assert sha(pair.a.data()) == sha(pair.b.data())


def test_syncintr_when_the_link_drops_mid_sync(make_pair, hooks):
    """The secondary's disk writes are held (test hook) so the sync cannot finish; its worker is
    then stopped: the primary emits syncintr, and after reconnecting syncstart and syncdone."""
    # timeout: the primary gives up on a held write after this long; the test needs far less.
    pair = make_pair(size=128 * MiB, timeout=30, exec=hooks.exec)
    # In the node's directory: the worker (user `hast` where it exists) can look it up there.
    gate = pair.b.dir / "hold-disk"
    pair.b.params["env"] = {"HASTPY_TEST_HOLD_DISK": str(gate)}
    pair.start()
    _degrade_and_write(pair, extents=(1, 5, 9, 13, 17))
    gate.touch()
    pair.b.role("secondary")
    hooks.wait("node-a", "syncstart", "data")
    wait_for(lambda: pair.a.status()["sync"]["state"] == "running", what="sync running")
    pair.b.role("init")
    hooks.wait("node-a", "syncintr", "data")
    assert pair.a.status()["sync"]["pending"] > 0
    gate.unlink()
    pair.b.role("secondary")
    hooks.wait("node-a", "syncdone", "data")
    pair.wait_synced()
    sync = _events(hooks.calls("node-a"), "syncstart", "syncdone", "syncintr")
    assert sync == [["syncstart", "data"], ["syncintr", "data"], ["syncstart", "data"], ["syncdone", "data"]]
    assert not _events(hooks.calls("node-b"), "syncstart", "syncdone", "syncintr")
    assert sha(pair.a.data()) == sha(pair.b.data())


def test_split_brain_hook_on_both_nodes(make_pair, hooks):
    pair = make_pair(exec=hooks.exec).start()
    c = pair.a.client()
    c.pwrite(0, b"1" * 4096)
    c.disconnect()
    pair.b.role("init")
    wait_for(lambda: pair.a.status()["status"] == "degraded", what="degraded")
    pair.b.role("primary")
    for node, byte in ((pair.a, b"A"), (pair.b, b"B")):
        cl = node.client()
        cl.pwrite(8192, byte * 4096)
        cl.flush()
        cl.disconnect()
    pair.b.role("secondary")
    hooks.wait("node-b", "split-brain", "data")
    hooks.wait("node-a", "split-brain", "data")
    assert pair.a.status()["status"] == "degraded"
    # The primary retries at hastd's 10 s pace, not every second: no storm of hooks meanwhile.
    before = len(_events(hooks.calls("node-a"), "split-brain"))
    time.sleep(2.5)
    assert len(_events(hooks.calls("node-a"), "split-brain")) <= before + 1
    # Refused, never resolved: no sync ran in either direction.
    assert not _events(hooks.calls("node-a") + hooks.calls("node-b"), "syncstart", "syncdone")


def test_hook_over_its_timeout_is_killed_and_logged(make_pair, tmp_path):
    pids = tmp_path / "pids"
    after = tmp_path / "after"
    hook = tmp_path / "slow-hook.sh"
    # Only the role hook is slow; the rest of the events exit at once.
    hook.write_text(
        "#!/bin/sh\n"
        '[ "$1" = role ] || exit 0\n'
        f"sleep 120 &\necho $$ $! >> {pids}\nwait\necho survived >> {after}\n"
    )
    hook.chmod(0o755)
    pair = make_pair(exec=str(hook), extra=["hook_timeout 1"])
    pair.start(connect=False)
    pair.b.role("secondary")
    wait_for(lambda: pids.exists() and pids.read_text().strip(), what="hook started")
    shell, child = map(int, pids.read_text().split())
    wait_for(lambda: "over its timeout: killing it" in pair.b.log.read_text(), what="timeout logged")
    assert f"slow-hook.sh role data init secondary running for" in pair.b.log.read_text()
    wait_for(lambda: not _alive(shell) and not _alive(child), what="hook and its child gone")
    assert not after.exists()
    # The daemon carries on.
    assert pair.b.status()["role"] == "secondary"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False
