"""SIGHUP: hastd re-reads hast.conf, applies a valid change, keeps the old one if the new is broken."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from harness import MiB, free_subnet, sha, wait_for

from hastpy.primary import RECONNECT_INTERVAL

pytestmark = pytest.mark.integration


def _names(node) -> list[str]:
    return [r["name"] for r in json.loads(node.hastctl("status", "--json").stdout)]


def _reloaded(node, count: int) -> None:
    wait_for(lambda: node.log.read_text().count("Reloading configuration...") >= count, what=f"{node.name} reload #{count}")
    wait_for(lambda: node.log.read_text().count("Configuration reloaded.") + node.log.read_text().count("Reload failed")
             >= count, what=f"{node.name} reload #{count} finished")  # fmt: skip


def test_new_resource_appears_and_replicates(make_pair):
    pair = make_pair(size=32 * MiB).start()
    pid_before = pair.a.status()["workerpid"]
    pair.a.params["resources"] = ["data", "extra"]
    pair.write_conf()
    for n in (pair.a, pair.b):
        pair.create(n, "extra")
        n.reload()
        _reloaded(n, 1)
        wait_for(lambda n=n: _names(n) == ["data", "extra"], what="new resource listed")
        assert n.status("extra")["role"] == "init"
        assert f"[extra] Resource added (role init)." in n.log.read_text()
    # The unchanged resource was not touched.
    assert pair.a.status()["workerpid"] == pid_before
    pair.b.role("secondary", "extra")
    pair.a.role("primary", "extra")
    pair.wait_complete(res="extra")
    c = pair.a.client("extra")
    c.pwrite(MiB, os.urandom(MiB))
    c.flush()
    c.disconnect()
    assert sha(pair.a.data("extra")) == sha(pair.b.data("extra"))


def test_changed_resource_settings_are_applied(make_pair):
    """The ack mode, checksum, compression and timeout reach the running workers on both nodes,
    as hastd's primary takes them on SIGHUP: no restart, no reconnection, an NBD client
    connected across the reload goes on, and what it writes after replicates with them."""
    pair = make_pair(size=32 * MiB).start()
    st = pair.a.status()
    assert (st["checksum"], st["replication"]) == ("none", "fullsync")
    pids = (st["workerpid"], pair.b.status()["workerpid"])
    c = pair.a.client()
    c.pwrite(0, os.urandom(MiB))
    pair.a.params["timeout"] = 7
    pair.a.params["res_extra"] = {"data": ["checksum crc32", "replication memsync", "compression lzf", "metaflush off"]}
    pair.write_conf()
    for n in (pair.a, pair.b):
        n.reload()
        _reloaded(n, 1)
        assert "[data] Configuration change handed to the running worker." in n.log.read_text()
    wait_for(lambda: "Configuration reloaded: replication memsync, checksum crc32, compression lzf, timeout 7 s,"
             " metaflush off" in pair.a.log.read_text(), what="the primary worker took the settings")  # fmt: skip
    assert pair.a.status()["metaflush"] is False
    c.pwrite(3 * MiB, os.urandom(MiB))  # its extent marked without a flush
    pair.a.params["res_extra"]["data"].remove("metaflush off")
    pair.a.write_conf(pair.a.dir, pair.b.dir, pair.ip_a, pair.ip_b)
    pair.a.reload()
    _reloaded(pair.a, 2)
    wait_for(lambda: "timeout 7 s, metaflush on" in pair.a.log.read_text(), what="metaflush back on")
    wait_for(lambda: "Configuration reloaded: checksum crc32, compression lzf, timeout 7 s" in pair.b.log.read_text(),
             what="the secondary worker took the settings")  # fmt: skip
    st = pair.a.status()
    assert (st["checksum"], st["replication"], st["compression"], st["timeout"]) == ("crc32", "memsync", "lzf", 7)
    assert (st["workerpid"], pair.b.status()["workerpid"]) == pids  # the same workers
    c.pwrite(MiB, b"z" * MiB)  # compressible: lzf on the wire now
    c.pwrite(2 * MiB, os.urandom(MiB))
    c.flush()
    c.disconnect()
    assert "Disconnected" not in pair.a.log.read_text()
    pair.wait_complete()
    assert sha(pair.a.data()) == sha(pair.b.data())


def test_a_changed_device_setting_restarts_the_resource(make_pair):
    """What a running worker cannot take (here the provider's name, /dev/hast/<name>)
    restarts the resource in its role, with the new settings."""
    pair = make_pair(size=32 * MiB).start()
    old_pid = pair.a.status()["workerpid"]
    pair.a.params["res_extra"] = {"data": ["name other"]}
    pair.a.write_conf(pair.a.dir, pair.b.dir, pair.ip_a, pair.ip_b)
    pair.a.reload()
    _reloaded(pair.a, 1)
    assert "[data] Resource configuration changed: restarted in role primary." in pair.a.log.read_text()
    wait_for(lambda: pair.a.status()["workerpid"] not in (0, old_pid), what="a new worker")
    assert pair.a.status()["provname"] == "other"
    pair.wait_complete()
    c = pair.a.client()
    c.pwrite(0, os.urandom(MiB))
    c.flush()
    c.disconnect()
    assert sha(pair.a.data()) == sha(pair.b.data())


def test_a_primary_takes_a_new_remote_address_by_reconnecting(make_pair):
    """hastd's primary takes a changed `remote` on SIGHUP by reconnecting, not by leaving
    primary: the worker, its NBD client and its device stay; `remote none` stops the connection
    attempts; what was written meanwhile reaches the peer by resync once it is named again."""
    pair = make_pair(size=32 * MiB).start()
    a = pair.a
    pid = a.status()["workerpid"]
    c = a.client()
    c.pwrite(0, os.urandom(MiB))

    def point_a_at(remote: str, count: int) -> None:
        pair.write_conf()
        a.conf.write_text(a.conf.read_text().replace(f"remote {pair.ip_b}\n", f"remote {remote}\n"))
        a.reload()
        _reloaded(a, count)

    point_a_at("none", 1)
    wait_for(lambda: f"Disconnected from {pair.ip_b}: remote address changed to none." in a.log.read_text(),
             what="the old connection dropped")  # fmt: skip
    assert "Remote address changed to none: disconnecting." in a.log.read_text()
    assert "Configuration change not applied yet" not in a.log.read_text()  # not held for the client
    st = a.status()
    assert (st["workerpid"], st["status"], st["remoteaddr"], st["config_pending"]) == (pid, "degraded", "none", False)
    assert st["connect_error"] is None  # no attempt is made, and none failed
    c.pwrite(4 * MiB, os.urandom(MiB))  # degraded: marked for the next peer
    time.sleep(3 * RECONNECT_INTERVAL)
    assert "Unable to connect to none" not in a.log.read_text()  # `none` is never resolved
    nowhere = pair.ip_a.rsplit(".", 1)[0] + ".3"  # the pair's subnet, nobody listening
    point_a_at(nowhere, 2)
    wait_for(lambda: f"Unable to connect to {nowhere}" in a.log.read_text(), what="attempts at the new address")
    assert "Connection refused" in a.status()["connect_error"]
    c.pwrite(8 * MiB, os.urandom(MiB))
    point_a_at(pair.ip_b, 3)
    wait_for(lambda: a.log.read_text().count(f"Connected to {pair.ip_b}") == 2, what="reconnected to the secondary")
    pair.wait_synced()
    c.flush()
    c.disconnect()  # the same connection all along
    assert a.status()["workerpid"] == pid
    assert sha(a.data()) == sha(pair.b.data())


def test_removed_resource_goes_to_init_with_a_role_hook(make_pair, tmp_path):
    log = tmp_path / "hooks.log"
    hook = tmp_path / "hook-{node}.sh"
    for node in ("node-a", "node-b"):
        p = tmp_path / f"hook-{node}.sh"
        p.write_text(f'#!/bin/sh\necho "{node} $*" >> {log}\n')
        p.chmod(0o755)
    pair = make_pair(size=32 * MiB, resources=["data", "gone"], exec=str(hook)).start()
    wait_for(lambda: log.exists() and "node-a role gone init primary" in log.read_text(), what="role hook")
    pair.a.params["resources"] = ["data"]
    pair.write_conf()
    pair.a.reload()
    _reloaded(pair.a, 1)
    wait_for(lambda: _names(pair.a) == ["data"], what="resource removed")
    wait_for(lambda: "node-a role gone primary init" in log.read_text(), what="role hook on removal")
    assert not pair.a.worker_pids("gone")
    assert not os.path.exists(pair.a.nbd_socket_of("gone"))
    assert pair.a.status()["status"] == "complete"


@pytest.mark.parametrize(
    "broken",
    [
        "resource {\n",  # syntax error
        "resource data {\n    on node-a {\n        local /dev/null\n    }\n",  # unterminated
        "\x00\x01\x02 garbage\n",
        None,  # the file is gone
    ],
)
def test_broken_config_keeps_the_old_one(make_pair, broken):
    pair = make_pair(size=32 * MiB).start()
    before = pair.a.status()
    if broken is None:
        pair.a.conf.unlink()
    else:
        pair.a.conf.write_text(broken)
    pair.a.reload()
    wait_for(lambda: "Reload failed, keeping the old configuration" in pair.a.log.read_text(), what="reload error")
    assert pair.a.proc.poll() is None
    # hastctl needs a readable config to find the control socket: give it the old one back.
    pair.write_conf()
    st = pair.a.status()
    assert (st["role"], st["workerpid"], st["status"]) == ("primary", before["workerpid"], "complete")
    c = pair.a.client()
    c.pwrite(0, os.urandom(MiB))
    c.disconnect()
    assert sha(pair.a.data()) == sha(pair.b.data())


def test_unbindable_listen_address_keeps_the_old_config(make_pair):
    """A reload whose `listen` cannot be bound fails as a whole: hastd keeps listening where it
    did, and the resources keep replicating (the secondary still accepts the primary)."""
    pair = make_pair(size=32 * MiB).start()
    taken_ip, _ = free_subnet()
    with socket.socket() as squatter:
        squatter.bind((taken_ip, 8457))
        squatter.listen(1)
        pair.b.params["extra"] = [f"listen {taken_ip}:8457"]  # a second `listen`: both are used
        pair.b.write_conf(pair.a.dir, pair.b.dir, pair.ip_a, pair.ip_b)
        pair.b.params["extra"] = []
        pair.b.reload()
        wait_for(lambda: "Reload failed, keeping the old configuration" in pair.b.log.read_text(), what="reload error")
        assert pair.b.proc.poll() is None
    pair.b.write_conf(pair.a.dir, pair.b.dir, pair.ip_a, pair.ip_b)
    assert pair.b.status()["role"] == "secondary"
    # Force a new connection to the secondary's listener: it must still be there.
    pair.a.role("init")
    pair.a.role("primary")
    pair.wait_complete()
    c = pair.a.client()
    c.pwrite(0, os.urandom(MiB))
    c.disconnect()
    assert sha(pair.a.data()) == sha(pair.b.data())
