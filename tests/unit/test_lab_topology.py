"""The lab as data (hastpy.lab.topology) and the pure helpers of hastpy.lab.lab; no root needed."""

import ipaddress
import os
import shlex

import pytest

from hastpy.errors import UsageError
from hastpy.lab import cli as labcli
from hastpy.lab import lab as labmod
from hastpy.lab import topology as topo

ROOT = "/var/tmp/lab-under-test"


@pytest.fixture
def paths():
    return topo.Paths.at(ROOT)


A, B = topo.NODES


# -- names and addresses -------------------------------------------------------------------------


def test_nodes_and_namespaces():
    assert [n.name for n in topo.NODES] == ["node-a", "node-b"]
    assert topo.NAMESPACES == ("hast-sw", "node-a", "node-b")
    assert (A.netns, A.veth, A.cidr) == ("node-a", "veth-a", "10.99.0.1/24")
    assert (B.netns, B.veth, B.cidr) == ("node-b", "veth-b", "10.99.0.2/24")
    assert topo.CONTROLLER_IP == "10.99.0.254" and topo.VIP == "10.99.0.100"


def test_addresses_are_distinct_and_inside_the_lab_subnet():
    net = ipaddress.ip_network(topo.SUBNET)
    addrs = [n.ip for n in topo.NODES] + [topo.CONTROLLER_IP, topo.VIP]
    assert len(set(addrs)) == len(addrs)
    assert all(ipaddress.ip_address(a) in net for a in addrs)
    assert net.prefixlen == topo.PREFIXLEN
    macs = [n.mac for n in topo.NODES]
    assert len(set(macs)) == len(macs)
    for mac in macs:  # locally administered unicast
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01


@pytest.mark.parametrize("name,expected", [
    ("node-a", "node-a"), ("a", "node-a"), ("A", "node-a"), (" node-b ", "node-b"), ("NODE-B", "node-b"),
])  # fmt: skip
def test_node_lookup(name, expected):
    assert topo.node(name).name == expected


@pytest.mark.parametrize("name", ["node-c", "", "hast-sw", "nodea"])
def test_node_lookup_rejects_unknown(name):
    with pytest.raises(UsageError, match="unknown node"):
        topo.node(name)


def test_default_labdir_from_environment():
    assert topo.default_labdir({}) == "/var/tmp/hastpy-lab"
    assert topo.default_labdir({"HASTPY_LAB_DIR": "/srv/lab"}) == "/srv/lab"
    assert topo.default_labdir({"HASTPY_LAB_DIR": ""}) == "/var/tmp/hastpy-lab"


def test_under():
    assert topo.under("/var/tmp/lab", "/var/tmp/lab")
    assert topo.under("/var/tmp/lab/ns/mnt-a", "/var/tmp/lab/")
    assert not topo.under("/var/tmp/lab2/x", "/var/tmp/lab")
    assert not topo.under("/var/tmp", "/var/tmp/lab")


# -- paths ---------------------------------------------------------------------------------------


def test_paths_layout(paths):
    r = ROOT
    assert str(paths.state) == f"{r}/state.json"
    assert str(paths.ns_dir) == f"{r}/ns"
    assert str(paths.mnt_ns(A)) == f"{r}/ns/mnt-a" and str(paths.uts_ns(B)) == f"{r}/ns/uts-b"
    assert str(paths.run_dir(A)) == f"{r}/nodes/a/run"
    assert str(paths.sshd_pidfile(A)) == f"{r}/nodes/a/run/sshd.pid"
    assert str(paths.hast_conf(B)) == f"{r}/nodes/b/hast.conf"
    assert str(paths.disk(A)) == f"{r}/nodes/a/disk.img"
    assert str(paths.ssh_config) == f"{r}/ssh_config"
    assert str(paths.inventory) == f"{r}/inventory.ini"
    assert str(paths.client_key) == f"{r}/ssh/id_ed25519"
    assert paths.host_key(A) != paths.host_key(B)


def test_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert topo.Paths.at("lab").root == tmp_path / "lab"


def test_every_path_is_under_the_root(paths):
    singles = [paths.state, paths.lock, paths.ns_dir, paths.ssh_dir, paths.client_key, paths.known_hosts,
               paths.authorized_keys, paths.ssh_config, paths.inventory]
    per_node = [f(n) for n in topo.NODES for f in (
        paths.node_dir, paths.run_dir, paths.hast_conf, paths.disk, paths.sshd_config, paths.sshd_log,
        paths.host_key, paths.mnt_ns, paths.uts_ns)]  # fmt: skip
    for p in singles + per_node:
        assert topo.under(p, ROOT), p


# -- entering namespaces -------------------------------------------------------------------------


def test_nsenter_argv(paths):
    assert topo.nsenter_argv(paths, A, ["hostname"]) == [
        "nsenter", "--net=/run/netns/node-a", f"--mount={ROOT}/ns/mnt-a", f"--uts={ROOT}/ns/uts-a",
        "--", "hostname",
    ]  # fmt: skip
    assert topo.nsenter_argv(paths, B, ["true"], net=False, uts=False) == [
        "nsenter", f"--mount={ROOT}/ns/mnt-b", "--", "true"]


def test_controller_and_sshd_argv(paths):
    assert topo.controller_argv(["ping", "-c1", "10.99.0.1"]) == [
        "nsenter", "--net=/run/netns/hast-sw", "--", "ping", "-c1", "10.99.0.1"]
    argv = topo.sshd_argv(paths, A, "/usr/sbin/sshd")
    assert argv[:5] == topo.nsenter_argv(paths, A, [])[:5]
    assert argv[5:] == ["/usr/sbin/sshd", "-D", "-e", "-f", f"{ROOT}/nodes/a/sshd_config"]


# -- up and down ---------------------------------------------------------------------------------


def test_mount_namespaces_are_persistent_and_private(paths):
    cmds = topo.mount_ns_commands(paths)
    assert cmds[:2] == [["mount", "--bind", f"{ROOT}/ns", f"{ROOT}/ns"],
                        ["mount", "--make-private", f"{ROOT}/ns"]]
    assert cmds[2] == ["unshare", f"--mount={ROOT}/ns/mnt-a", f"--uts={ROOT}/ns/uts-a",
                       "--propagation", "private", "hostname", "node-a"]
    assert cmds[3][-1] == "node-b"


def test_node_mounts(paths):
    cmds = topo.node_mount_commands(paths, A)
    inner = [c[c.index("--") + 1 :] for c in cmds]
    assert all(c[:2] == ["nsenter", f"--mount={ROOT}/ns/mnt-a"] for c in cmds)
    assert inner == [
        ["mount", "--bind", f"{ROOT}/nodes/a/run", "/run"],
        ["mount", "--bind", f"{ROOT}/nodes/a/hast.conf", "/etc/hast.conf"],
        ["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "hast-node-a", "/dev/hast"],
    ]


def test_network_commands():
    cmds = topo.network_commands()
    assert cmds[:3] == [["ip", "netns", "add", "hast-sw"], ["ip", "netns", "add", "node-a"],
                        ["ip", "netns", "add", "node-b"]]
    assert ["ip", "-n", "hast-sw", "link", "add", "br0", "type", "bridge"] in cmds
    assert ["ip", "-n", "hast-sw", "link", "add", "veth-a", "type", "veth", "peer", "name", "eth0",
            "netns", "node-a"] in cmds
    assert ["ip", "-n", "hast-sw", "link", "set", "veth-b", "master", "br0", "up"] in cmds
    assert ["ip", "-n", "node-a", "addr", "add", "10.99.0.1/24", "dev", "eth0"] in cmds
    assert ["ip", "-n", "node-b", "addr", "add", "10.99.0.2/24", "dev", "eth0"] in cmds
    assert cmds[-1] == ["ip", "-n", "hast-sw", "addr", "add", "10.99.0.254/24", "dev", "br0"]
    # The bridge exists before a port is attached; each eth0 is addressed before it goes up.
    assert cmds.index(["ip", "-n", "hast-sw", "link", "add", "br0", "type", "bridge"]) < cmds.index(
        ["ip", "-n", "hast-sw", "link", "set", "veth-a", "master", "br0", "up"])
    for n in topo.NODES:
        assert cmds.index(["ip", "-n", n.netns, "addr", "add", n.cidr, "dev", "eth0"]) < cmds.index(
            ["ip", "-n", n.netns, "link", "set", "eth0", "up"])
    # Nothing touches the root namespace: every ip command names a namespace.
    for c in cmds:
        assert c[:2] == ["ip", "netns"] or c[:2] == ["ip", "-n"], c


def test_up_commands_order(paths):
    cmds = topo.up_commands(paths)
    first_unshare = next(i for i, c in enumerate(cmds) if c[0] == "unshare")
    first_node_mount = next(i for i, c in enumerate(cmds) if "/run" in c and "--bind" in c)
    first_netns = cmds.index(["ip", "netns", "add", "hast-sw"])
    first_sysfs = next(i for i, c in enumerate(cmds) if "sysfs" in c)
    # Mount namespaces before network namespaces (their copy of the mount table then holds no
    # /run/netns binds); sysfs needs the node's network namespace.
    assert first_unshare < first_node_mount < first_netns < first_sysfs
    assert cmds[first_sysfs][1] == "--net=/run/netns/node-a"
    assert sum(1 for c in cmds if "sysfs" in c) == 2
    assert cmds == (topo.mount_ns_commands(paths) + topo.node_mount_commands(paths, A)
                    + topo.node_mount_commands(paths, B) + topo.network_commands()
                    + topo.sysfs_commands(paths))


def test_down_commands(paths):
    cmds = topo.down_commands(paths)
    assert cmds[:3] == [["ip", "netns", "delete", "node-b"], ["ip", "netns", "delete", "node-a"],
                        ["ip", "netns", "delete", "hast-sw"]]
    assert ["umount", f"{ROOT}/ns/mnt-a"] in cmds and ["umount", f"{ROOT}/ns/uts-b"] in cmds
    assert cmds[-1] == ["umount", f"{ROOT}/ns"]


# -- cut and heal --------------------------------------------------------------------------------


def test_cut_and_heal_link():
    assert topo.cut_commands(A) == [["ip", "-n", "hast-sw", "link", "set", "veth-a", "down"]]
    assert topo.heal_commands(A) == [["ip", "-n", "hast-sw", "link", "set", "veth-a", "up"]]


def test_cut_and_heal_drop_are_inverse():
    cut = topo.cut_commands(B, "drop")
    heal = topo.heal_commands(B, "drop")
    assert all(c[:6] == ["ip", "netns", "exec", "node-b", "iptables", "-w"] for c in cut + heal)
    inserted = [c[7:] for c in cut if c[6] == "-I"]
    deleted = [c[7:] for c in heal if c[6] == "-D"]
    assert sorted(inserted) == sorted(deleted)
    assert ["INPUT", "-i", "eth0", "-j", topo.CUT_CHAIN] in inserted
    assert ["OUTPUT", "-o", "eth0", "-j", topo.CUT_CHAIN] in inserted
    assert cut[0][6:] == ["-N", topo.CUT_CHAIN] and heal[-1][6:] == ["-X", topo.CUT_CHAIN]


def test_cut_rejects_unknown_mode():
    with pytest.raises(UsageError, match="cut mode"):
        topo.cut_commands(A, "netem")
    with pytest.raises(UsageError, match="cut mode"):
        topo.heal_commands(A, "netem")


# -- rendered files ------------------------------------------------------------------------------


def _directives(text):
    return {ln.split()[0]: " ".join(ln.split()[1:]) for ln in text.splitlines() if ln and not ln.startswith("#")}


def test_sshd_config(paths):
    d = _directives(topo.render_sshd_config(paths, A))
    assert d["PidFile"] == "/run/sshd.pid"
    assert d["UsePAM"] == "no" and d["StrictModes"] == "no"
    assert d["PermitRootLogin"] == "prohibit-password" and d["PasswordAuthentication"] == "no"
    assert d["HostKey"] == str(paths.host_key(A))
    assert d["AuthorizedKeysFile"] == f"{ROOT}/ssh/authorized_keys"
    assert d["Port"] == "22"
    assert _directives(topo.render_sshd_config(paths, B))["HostKey"] == str(paths.host_key(B))


def test_ssh_config(paths):
    text = topo.render_ssh_config(paths)
    assert "Host node-a 10.99.0.1\n    HostName 10.99.0.1\n" in text
    assert "Host node-b 10.99.0.2\n    HostName 10.99.0.2\n" in text
    assert "Host vip 10.99.0.100\n    HostName 10.99.0.100\n" in text
    assert f"    IdentityFile {ROOT}/ssh/id_ed25519\n" in text
    assert f"    UserKnownHostsFile {ROOT}/ssh/known_hosts\n" in text
    assert "    User root\n" in text and "    StrictHostKeyChecking yes\n" in text
    assert f"    ControlPath {ROOT}/ssh/cm-%r@%h\n" in text


def test_ssh_config_without_multiplexing_when_the_socket_path_is_too_long():
    # ssh binds "<ControlPath>.<16 random chars>" first; that must fit in 107 bytes.
    fits = "/" + "x" * (107 - 17 - len("/ssh/cm-root@10.99.0.100") - 1)
    assert "ControlPath" in topo.render_ssh_config(topo.Paths.at(fits))
    text = topo.render_ssh_config(topo.Paths.at(fits + "x"))
    assert "ControlPath" not in text and "ControlMaster" not in text
    assert "IdentityFile" in text


def test_known_hosts():
    keys = {"node-a": "ssh-ed25519 AAAAkeyA root@node-a\n", "node-b": "ssh-ed25519 AAAAkeyB root@node-b"}
    lines = topo.render_known_hosts(keys).splitlines()
    assert lines == ["node-a,10.99.0.1 ssh-ed25519 AAAAkeyA", "node-b,10.99.0.2 ssh-ed25519 AAAAkeyB",
                     "vip,10.99.0.100 ssh-ed25519 AAAAkeyA", "vip,10.99.0.100 ssh-ed25519 AAAAkeyB"]


def test_inventory(paths):
    text = topo.render_inventory(paths)
    lines = text.splitlines()
    start = lines.index("[hast]")
    hosts = {}
    for ln in lines[start + 1 :]:
        if not ln.strip():
            break
        name, *pairs = shlex.split(ln)
        hosts[name] = dict(p.split("=", 1) for p in pairs)
    assert list(hosts) == ["node-a", "node-b"]
    for n in topo.NODES:
        h = hosts[n.name]
        assert h["ansible_host"] == n.ip
        assert h["ansible_user"] == "root"
        assert h["ansible_ssh_private_key_file"] == f"{ROOT}/ssh/id_ed25519"
        assert h["ansible_ssh_common_args"] == f"-F {ROOT}/ssh_config"
        assert h["ansible_python_interpreter"] == "/usr/bin/python3"
    assert "[hast:vars]" in lines and "lab_vip=10.99.0.100" in lines


# -- pure helpers in hastpy.lab.lab --------------------------------------------------------------


MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
98 27 254:0 /run/netns /run/netns rw,relatime shared:1 - ext4 /dev/vda rw
99 98 0:4 net:[4026532181] /run/netns/hast-sw rw shared:2 - nsfs nsfs rw
120 27 0:43 / /var/tmp/my\\040lab/fz rw,nosuid,nodev,relatime - fuse /dev/fuse rw,user_id=0
"""


def test_parse_mountinfo():
    mounts = labmod.parse_mountinfo(MOUNTINFO)
    assert [m.mountpoint for m in mounts] == ["/", "/run/netns", "/run/netns/hast-sw", "/var/tmp/my lab/fz"]
    ns = mounts[2]
    assert (ns.mount_id, ns.parent_id, ns.majmin, ns.root, ns.fstype, ns.source) == (
        99, 98, "0:4", "net:[4026532181]", "nsfs", "nsfs")
    assert mounts[3].fstype == "fuse" and mounts[3].source == "/dev/fuse"
    assert labmod.parse_mountinfo("garbage\n\n") == []


def test_parse_losetup():
    text = """{"loopdevices": [
        {"name": "/dev/loop1", "back-file": "/var/tmp/lab/nodes/a/disk.img", "back-ino": 15343634,
         "back-maj:min": "     254:0  "},
        {"name": "/dev/loop0", "back-file": "/run/img (deleted)", "back-ino": 12, "back-maj:min": "0:43"}
    ]}"""
    assert labmod.parse_losetup(text) == [
        {"name": "/dev/loop1", "file": "/var/tmp/lab/nodes/a/disk.img", "ino": 15343634, "majmin": "254:0"},
        {"name": "/dev/loop0", "file": "/run/img", "ino": 12, "majmin": "0:43"},
    ]
    assert labmod.parse_losetup("") == []
    assert labmod.parse_losetup('{"loopdevices": []}') == []


def test_missing_tools_and_tool_path():
    assert labmod.missing_tools(["sh", "surely-not-a-tool-hastpy"]) == ["surely-not-a-tool-hastpy"]
    path = labmod.tool_path().split(os.pathsep)
    assert "/usr/sbin" in path and "/sbin" in path
    assert set(topo.REQUIRED_TOOLS) >= {"ip", "nsenter", "unshare", "sshd", "losetup"}


def test_up_names_missing_tools_and_their_packages(tmp_path, monkeypatch):
    monkeypatch.setattr(labmod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(labmod, "missing_tools", lambda: ["sshd", "ip"])
    lab = labmod.Lab(tmp_path / "lab")
    with pytest.raises(labmod.LabError, match=r"missing tools: sshd, ip \(Debian packages: iproute2 openssh-server") as exc:
        lab.up()
    assert exc.value.exit_code == os.EX_UNAVAILABLE
    assert not (tmp_path / "lab").exists()  # nothing was touched


def test_up_rejects_a_bad_size(tmp_path, monkeypatch):
    monkeypatch.setattr(labmod.os, "geteuid", lambda: 0)
    with pytest.raises(labmod.LabError, match="multiple of 512") as exc:
        labmod.Lab(tmp_path / "lab").up(size=1000)
    assert exc.value.exit_code == os.EX_USAGE


def test_the_lab_needs_root(tmp_path, monkeypatch):
    monkeypatch.setattr(labmod.os, "geteuid", lambda: 1000)
    lab = labmod.Lab(tmp_path / "lab")
    for call in (lab.up, lab.down, lab.status, lambda: lab.kill("a"), lambda: lab.cut("a"), lambda: lab.heal("a")):
        with pytest.raises(labmod.LabError, match="needs root") as exc:
            call()
        assert exc.value.exit_code == os.EX_NOPERM


def test_lab_command_error_is_one_line():
    err = labmod.LabCommandError(2, ["ip", "netns", "add", "x"], "", "warning\nCannot create namespace: File exists\n")
    assert str(err) == "`ip netns add x` failed (exit 2): Cannot create namespace: File exists"
    assert err.exit_code == os.EX_OSERR
    assert isinstance(err, labmod.HastError)


def test_running_in_a_lab_that_is_not_up_is_a_clear_error(tmp_path):
    lab = labmod.Lab(tmp_path / "lab")
    with pytest.raises(labmod.LabError, match="not up") as exc:
        lab.run("node-a", ["true"])
    assert exc.value.exit_code == os.EX_UNAVAILABLE
    with pytest.raises(labmod.LabError, match="not up"):
        lab.spawn("b", ["true"])
    with pytest.raises(UsageError):
        lab.run("node-z", ["true"])


# -- the command line (no root needed for these) -------------------------------------------------


def _exit_code(argv):
    with pytest.raises(SystemExit) as exc:
        labcli.main(argv)
    return exc.value.code


@pytest.mark.parametrize("argv", [
    ["exec", "node-z", "true"],
    ["exec", "node-a", "--"],
    ["switch"],
    ["cut", "node-a", "--mode", "netem"],
    ["kill"],
    ["up", "--size", "lots"],
    ["frobnicate"],
])  # fmt: skip
def test_cli_usage_errors_exit_64(argv, capsys):
    assert _exit_code(argv) == os.EX_USAGE
    assert "Traceback" not in capsys.readouterr().err


def test_cli_help_exits_0(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("up", "down", "status", "exec", "kill", "cut", "heal", "switch"):
        assert cmd in out


def test_cli_exec_in_a_lab_that_is_not_up(tmp_path, capsys):
    assert _exit_code(["--dir", str(tmp_path / "nolab"), "exec", "node-a", "true"]) == os.EX_UNAVAILABLE
    err = capsys.readouterr().err
    assert err.startswith("hastpy-lab: ") and "not up" in err and len(err.strip().splitlines()) == 1


def test_render_status():
    st = {
        "dir": "/lab", "up": True, "namespaces": {"hast-sw": True, "node-a": True, "node-b": True},
        "controller": {"namespace": "hast-sw", "addresses": ["10.99.0.254/24"]},
        "vip": {"address": "10.99.0.100", "holders": ["node-a", "node-b"]},
        "nodes": {
            "node-a": {"hostname": "node-a", "addresses": ["10.99.0.1/24", "10.99.0.100/24"], "link": "up",
                       "cut": [], "processes": [{"pid": 7, "comm": "hastd", "args": "hastd -F"}],
                       "dev_hast": {"data": "/dev/loop0"},
                       "mounts": [{"source": "/dev/loop0", "target": "/srv", "fstype": "ext4"}]},
            "node-b": {"hostname": "node-b", "addresses": ["10.99.0.2/24"], "link": "down", "cut": ["down"],
                       "processes": [], "dev_hast": {}, "mounts": []},
        },
    }  # fmt: skip
    text = labcli._render_status(st)
    assert "lab up (/lab)" in text
    assert "vip 10.99.0.100: node-a, node-b (SPLIT" in text
    assert "/dev/hast/data -> /dev/loop0" in text
    assert "mount /dev/loop0 on /srv (ext4)" in text
    assert "link down (cut: down)" in text
