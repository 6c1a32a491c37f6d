"""What site.yml promises about a deployed pair, checked on the nodes (see conftest.py to run).

Per node (`host`, once for each --hosts entry): hastd runs and answers, hast.conf is private and
valid, every provider has metadata, the replication listener and the control socket are up, the
hast user exists. Across the pair (`pair`): one hast.conf, each resource primary on exactly one
node and secondary on the other, the same settings on both sides, each primary connected; with
--hast-vip, the VIP on exactly the primary node. Read-only: nothing here changes a node.

The `failover` tests check the survivor after the primary failed, and only that: run them alone
(`-m failover`) with --hosts naming the survivor (the failed node has no hastd to ask), and the
others with `-m "not failover"` against the pair.
"""

from __future__ import annotations

import json
import stat

import pytest

pytestmark = pytest.mark.infra


def _address(remote: str) -> tuple[str, str]:
    """(host, port) from a hast.conf TCP address such as tcp4://10.99.0.2:8457 or tcp6://[fd00::2]:8457."""
    rest = remote.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), port


def _control_path(config_text: str) -> str:
    for line in config_text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] == ["control"]:
            return words[1].split("://", 1)[-1]
    return "/var/run/hastctl"  # hast.conf(5)'s default


# ---- each node ----------------------------------------------------------------------------------


def test_hastd_runs(host, hastd):
    assert host.file(f"/proc/{hastd.pid}/comm").content_string.strip() == "hastd"


def test_hastd_answers(host, hastd):
    host.run_expect([0], hastd.hastctl_cmd("status"))


def test_config_is_private_to_root(host, hastd):
    conf = host.file(hastd.config)
    assert conf.is_file
    assert (conf.user, conf.group, conf.mode) == ("root", "root", 0o600)


def test_config_is_valid(host, hastd):
    host.run_expect([0], hastd.hastctl_cmd("check-config"))


def test_config_is_managed(host, hastd):
    assert "Ansible managed" in host.file(hastd.config).content_string


def test_every_resource_has_metadata(host, hastd, status):
    dumped = json.loads(host.check_output(hastd.hastctl_cmd("dump", "--json")))
    assert sorted(md["resource"] for md in dumped) == sorted(r["name"] for r in status)


def test_control_socket_is_private(host, hastd):
    # hastd binds a temporary name and renames it into place, so `ss` lists the socket under
    # the old name: check the file, and that hastctl gets answers through it (test above).
    sock = host.file(_control_path(host.file(hastd.config).content_string))
    assert sock.is_socket
    assert (sock.user, stat.S_IMODE(sock.mode)) == ("root", 0o600)


def test_hast_user_exists(host):
    user = host.user("hast")
    assert user.exists
    assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")


def test_no_resource_left_in_init(status):
    assert {r["name"]: r["role"] for r in status if r["role"] == "init"} == {}


# ---- the pair -----------------------------------------------------------------------------------


def test_both_nodes_read_the_same_config(pair):
    sums = {n.name: n.host.file(n.hastd.config).sha256sum for n in pair}
    assert len(set(sums.values())) == 1, sums


def test_each_resource_is_primary_on_one_node_and_secondary_on_the_other(pair):
    names = sorted(set(pair[0].roles()) | set(pair[1].roles()))
    roles = {name: sorted(n.roles().get(name, "missing") for n in pair) for name in names}
    assert roles == {name: ["primary", "secondary"] for name in names}


def test_both_sides_have_the_same_settings(pair):
    def settings(node):
        return {r["name"]: (r["replication"], r["checksum"], r["compression"]) for r in node.status}

    assert settings(pair[0]) == settings(pair[1])


def test_each_primary_is_connected(pair):
    primaries = {(n.name, r["name"]): r.get("status") for n in pair for r in n.status if r["role"] == "primary"}
    assert primaries == {key: "complete" for key in primaries}


def test_each_primary_serves_its_nbd_socket(pair):
    listening = {
        (n.name, r["name"]): bool(r.get("nbd_socket")) and n.host.socket(f"unix://{r['nbd_socket']}").is_listening
        for n in pair
        for r in n.status
        if r["role"] == "primary"
    }
    assert listening == {key: True for key in listening}


def test_each_node_listens_where_its_peer_connects(pair):
    listening = {
        (node.name, f"{ip}:{port}"): node.host.socket(f"tcp://{ip}:{port}").is_listening
        for node, peer in zip(pair, reversed(pair))
        for ip, port in {_address(r["remoteaddr"]) for r in peer.status if r["remoteaddr"] != "none"}
    }
    assert listening == {key: True for key in listening}


def test_vip_is_on_exactly_the_primary_node(pair, vip):
    address, interface = vip
    holders = sorted(n.name for n in pair if address in n.host.interface(interface).addresses)
    primaries = sorted(n.name for n in pair if "primary" in n.roles().values())
    assert len(holders) == 1
    assert holders == primaries


# ---- the survivor of a failover (-m failover, --hosts=<survivor>) --------------------------------

failover = pytest.mark.failover


@failover
def test_failover_survivor_hastd_answers(host, hastd):
    assert host.file(f"/proc/{hastd.pid}/comm").content_string.strip() == "hastd"
    host.run_expect([0], hastd.hastctl_cmd("status"))


@failover
def test_failover_survivor_is_primary_for_every_resource(status):
    assert status, "hastd reports no resource"
    assert {r["name"]: r["role"] for r in status} == {r["name"]: "primary" for r in status}


@failover
def test_failover_survivor_has_every_device(host, status):
    def block_device(path):  # /dev/hast/<name> links to a loop or nbd device
        return bool(path) and host.run("test -b %s", path).rc == 0

    devices = {r["name"]: (bool(r.get("device_ready")), block_device(r.get("device")), r.get("attach_error"))
               for r in status}
    assert devices == {r["name"]: (True, True, None) for r in status}


@failover
def test_failover_survivor_serves_its_nbd_socket(host, status):
    listening = {r["name"]: bool(r.get("nbd_socket")) and host.socket(f"unix://{r['nbd_socket']}").is_listening
                 for r in status}
    assert listening == {name: True for name in listening}


@failover
def test_failover_survivor_mounts_each_filesystem(host, status, mounts):
    if not mounts:
        pytest.skip("no --hast-mount: nothing is mounted on promotion")
    devices = {r["name"]: r.get("device") for r in status}
    # /dev/hast/<name> links to the loop or nbd device that the mount table shows.
    want = {name: (path, host.file(devices[name]).linked_to if devices.get(name) else None)
            for name, path in mounts.items()}
    seen = {name: (path, host.mount_point(path).device if host.mount_point(path).exists else "not mounted")
            for name, path in mounts.items()}
    assert seen == want


@failover
def test_failover_survivor_holds_the_vip(host, vip):
    address, interface = vip
    assert address in host.interface(interface).addresses
