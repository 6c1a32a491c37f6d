"""The namespace lab itself: up, down (twice, no residue), isolation per node, ssh from the switch
namespace, cut/heal, kill, a failed up cleaning up after itself, and the hastpy-lab command line.

Needs root (skipped otherwise, see conftest.py). Each test brings its own lab up and down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hastpy.lab import Lab, LabCommandError, LabError
from hastpy.lab import lab as labmod
from hastpy.lab import topology as topo

A, B = topo.NODES
SIZE = 64 * topo.MiB


# -- helpers -------------------------------------------------------------------------------------


def host_snapshot() -> dict:
    """The host paths the lab may touch, to compare before and after. /run/netns is left out while
    someone else's network namespaces live in it (then down must leave it, and rightly does)."""
    etc = Path(topo.ETC_HAST_CONF)
    snap = {
        "etc_hast_conf": etc.read_bytes() if etc.is_file() else None,
        "dev_hast": os.path.isdir(topo.DEV_HAST),
    }
    foreign = os.path.isdir(topo.RUN_NETNS) and set(os.listdir(topo.RUN_NETNS)) - set(topo.NAMESPACES)
    if not foreign:
        snap["run_netns_mounted"] = any(m.mountpoint == topo.RUN_NETNS for m in Lab.host_mounts())
        snap["run_netns_exists"] = os.path.lexists(topo.RUN_NETNS)
    return snap


def same_host(before: dict, after: dict) -> bool:
    return all(after[k] == before[k] for k in after.keys() & before.keys())


def ns_inodes(lab: Lab) -> set[int]:
    """The nsfs inodes of every namespace of the lab (recorded while up)."""
    out = set()
    for path in [topo.netns_path(name) for name in topo.NAMESPACES] + [
        p for n in topo.NODES for p in (lab.paths.mnt_ns(n), lab.paths.uts_ns(n))
    ]:
        st = os.stat(path)
        assert st.st_dev == os.stat("/proc/self/ns/net").st_dev, f"{path} is not a namespace"
        out.add(st.st_ino)
    return out


def pids_in_namespaces(inodes: set[int]) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for kind in ("net", "mnt", "uts"):
            try:
                if os.stat(f"/proc/{entry}/ns/{kind}").st_ino in inodes:
                    found.append(f"{entry} ({Path(f'/proc/{entry}/comm').read_text().strip()})")
                    break
            except OSError:
                pass
    return found


def losetup_list() -> list[dict]:
    out = subprocess.run(["losetup", "-l", "-J", "-O", "NAME,BACK-FILE,BACK-INO"], capture_output=True,
                         text=True, check=True, env={**os.environ, "PATH": labmod.tool_path()}).stdout
    return json.loads(out)["loopdevices"] if out.strip() else []


def assert_no_residue(lab: Lab, inodes: set[int], loops: list[tuple[str, int]], before: dict) -> None:
    env = {**os.environ, "PATH": labmod.tool_path()}
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True, env=env).stdout
    listed = {ln.split()[0] for ln in netns.splitlines() if ln.strip()}
    assert not listed & set(topo.NAMESPACES), netns
    losetup_a = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True, env=env).stdout
    assert str(lab.dir) not in losetup_a
    still = {(d["name"], d.get("back-ino")) for d in losetup_list()}
    assert not [lo for lo in loops if lo in still], f"loop devices left: {loops}"
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert f" {lab.dir}/" not in mountinfo and f" {lab.dir} " not in mountinfo
    assert pids_in_namespaces(inodes) == []
    assert lab.residue() == []
    assert same_host(before, host_snapshot())


def ping(lab: Lab, ip: str) -> bool:
    return lab.controller(["ping", "-c", "1", "-W", "1", ip], check=False).returncode == 0


def wait_for(pred, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


@pytest.fixture
def fresh(tmp_path, no_foreign_lab):
    """A lab dir and the host snapshot; the lab is downed at the end whatever happened."""
    before = host_snapshot()
    lab = Lab(tmp_path / "lab")
    try:
        yield lab, before
    finally:
        lab.down()
        assert lab.residue() == []
        assert same_host(before, host_snapshot())


@pytest.fixture
def up_lab(fresh):
    lab, before = fresh
    lab.up(size=SIZE)
    yield lab


# -- up / down -----------------------------------------------------------------------------------


def test_up_then_down_twice_leaves_nothing_behind(fresh):
    lab, before = fresh
    timings = []
    for cycle in range(2):
        t0 = time.monotonic()
        summary = lab.up(size=SIZE)
        t_up = time.monotonic() - t0
        assert lab.is_up() and summary["nodes"] == {"node-a": "10.99.0.1", "node-b": "10.99.0.2"}

        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True,
                               env={**os.environ, "PATH": labmod.tool_path()}).stdout
        assert {ln.split()[0] for ln in netns.splitlines()} >= set(topo.NAMESPACES)

        # sshd per node, reachable from the switch namespace with the lab's client config.
        for n in topo.NODES:
            out = lab.controller(["ssh", "-F", str(lab.paths.ssh_config), n.name, "hostname"], timeout=30)
            assert out.stdout.strip() == n.name
        # Own hostname per node; the host keeps its own.
        names = {n.name: lab.run(n, ["hostname"]).stdout.strip() for n in topo.NODES}
        assert names == {"node-a": "node-a", "node-b": "node-b"}
        assert os.uname().nodename not in names.values()
        # Own addresses, only inside the namespaces.
        assert "10.99.0.1/24" in lab.run(A, ["ip", "-br", "addr", "show", "eth0"]).stdout
        assert "10.99.0." not in subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True,
                                                env={**os.environ, "PATH": labmod.tool_path()}).stdout
        # Own /dev/hast: a file made in node-a is absent in node-b and on the host.
        lab.run(A, ["sh", "-c", "echo a > /dev/hast/only-a"])
        assert lab.run(B, ["test", "-e", "/dev/hast/only-a"], check=False).returncode == 1
        assert not os.path.exists("/dev/hast/only-a")
        # Own /etc/hast.conf, written from the host through the lab's per-node file.
        lab.paths.hast_conf(A).write_text("# node-a\n")
        assert lab.run(A, ["cat", "/etc/hast.conf"]).stdout == "# node-a\n"
        assert lab.run(B, ["cat", "/etc/hast.conf"]).stdout == ""
        assert host_snapshot()["etc_hast_conf"] in (None, before["etc_hast_conf"], b"")
        # Own /run: each sshd wrote its pid file into its node's /run.
        pid_a = lab.run(A, ["cat", "/run/sshd.pid"]).stdout.strip()
        pid_b = lab.run(B, ["cat", "/run/sshd.pid"]).stdout.strip()
        assert pid_a and pid_b and pid_a != pid_b
        # /sys shows the node's own interfaces.
        assert sorted(lab.run(A, ["ls", "/sys/class/net"]).stdout.split()) == ["eth0", "lo"]

        # Things down must clear: a filesystem on a loop device mounted in node-a, a loop device
        # opened through the node's /run, processes in both nodes and in the switch.
        loop = lab.run(A, ["losetup", "-f", "--show", str(lab.paths.disk(A))]).stdout.strip()
        lab.run(A, ["mkfs.ext4", "-q", loop])
        lab.run(A, ["sh", "-c", f"mkdir -p /run/mnt && mount {loop} /run/mnt && echo x > /run/mnt/f"])
        lab.run(A, ["truncate", "-s", "8M", "/run/img"])
        loop2 = lab.run(A, ["losetup", "-f", "--show", "/run/img"]).stdout.strip()
        ours = {d["name"]: d.get("back-ino") for d in losetup_list()}
        loops = [(loop, ours[loop]), (loop2, ours[loop2])]
        sleepers = [lab.spawn(B, ["sleep", "1000"]), lab.spawn(A, ["sh", "-c", "sleep 1000 & wait"])]
        switch_sleeper = subprocess.Popen(topo.controller_argv(["sleep", "1000"]), start_new_session=True,
                                          env={**os.environ, "PATH": labmod.tool_path()})
        inodes = ns_inodes(lab)
        # 2 sshd, the sleepers and their shell (+ ssh masters in the switch)
        assert wait_for(lambda: len(pids_in_namespaces(inodes)) >= 6, 5), pids_in_namespaces(inodes)

        t0 = time.monotonic()
        assert lab.down() == []
        t_down = time.monotonic() - t0
        for p in sleepers + [switch_sleeper]:
            assert p.wait(timeout=5) in (-signal.SIGTERM, -signal.SIGKILL)
        assert_no_residue(lab, inodes, loops, before)
        # down again: nothing to do, nothing left.
        assert lab.down() == []
        assert_no_residue(lab, inodes, loops, before)
        timings.append((t_up, t_down))
    print(f"\nlab up/down timings (s): {[(round(u, 2), round(d, 2)) for u, d in timings]}")
    assert all(u < 15 for u, _ in timings), timings


def test_up_twice_is_an_error_and_keeps_the_lab(up_lab):
    lab = up_lab
    with pytest.raises(LabError, match="already up") as exc:
        lab.up(size=SIZE)
    assert exc.value.exit_code == os.EX_USAGE
    assert lab.is_up()
    assert lab.run(B, ["hostname"]).stdout.strip() == "node-b"


def test_down_with_another_dir_takes_down_the_lab_that_is_up(up_lab, tmp_path):
    other = Lab(tmp_path / "elsewhere")
    with pytest.raises(LabError, match=f"already up in {up_lab.dir}"):
        other.up(size=SIZE)
    warnings = other.down()
    assert warnings == [f"the lab was up in {up_lab.dir}; took it down there"]
    assert up_lab.residue() == [] and other.residue() == []


def test_failed_up_in_the_middle_tears_itself_down(fresh, monkeypatch):
    lab, before = fresh
    real = topo.up_commands

    def failing(paths):
        cmds = real(paths)
        at = next(i for i, c in enumerate(cmds) if "sysfs" in c)  # mount and net namespaces exist
        return cmds[:at] + [["sh", "-c", "echo injected failure >&2; exit 3"]] + cmds[at:]

    monkeypatch.setattr(topo, "up_commands", failing)
    with pytest.raises(LabCommandError, match="injected failure") as exc:
        lab.up(size=SIZE)
    assert exc.value.exit_code == os.EX_OSERR
    assert lab.residue() == []
    assert same_host(before, host_snapshot())


def test_failed_sshd_start_tears_itself_down(fresh, monkeypatch):
    lab, before = fresh
    real = topo.render_sshd_config
    monkeypatch.setattr(topo, "render_sshd_config", lambda paths, n: real(paths, n) + "NoSuchOption yes\n")
    with pytest.raises(LabError, match="sshd in node-a exited with status 255: .*NoSuchOption") as exc:
        lab.up(size=SIZE)
    assert exc.value.exit_code == os.EX_OSERR
    assert lab.residue() == []
    assert same_host(before, host_snapshot())


# -- run, spawn, controller ----------------------------------------------------------------------


def test_run_spawn_and_controller(up_lab, tmp_path):
    lab = up_lab
    cp = lab.run(A, ["sh", "-c", "cat; echo err >&2; exit 4"], input="in\n", check=False)
    assert (cp.returncode, cp.stdout, cp.stderr) == (4, "in\n", "err\n")
    with pytest.raises(LabCommandError) as exc:
        lab.run("b", ["sh", "-c", "echo nope >&2; exit 5"])
    assert exc.value.returncode == 5 and "nope" in str(exc.value)
    with pytest.raises(subprocess.TimeoutExpired):
        lab.run(A, ["sleep", "5"], timeout=0.3)

    log = tmp_path / "spawn.log"
    proc = lab.spawn(B, ["sh", "-c", "hostname; echo to-stderr >&2"], log=log)
    assert proc.wait(timeout=10) == 0
    assert log.read_text().split() == ["node-b", "to-stderr"]

    sleeper = lab.spawn(A, ["sleep", "1000"])
    assert sleeper.pid in {p.pid for p in lab.processes(A)}
    assert sleeper.pid not in {p.pid for p in lab.processes(B)}

    cp = lab.controller(["ip", "-br", "addr", "show", "br0"])
    assert "10.99.0.254/24" in cp.stdout
    assert lab.ssh("node-b", ["cat", "/etc/hostname", "/proc/sys/kernel/hostname"]).stdout.split()[-1] == "node-b"


def test_status(up_lab):
    lab = up_lab
    lab.run(A, ["sh", "-c", "ln -s /dev/null /dev/hast/res0"])
    st = lab.status()
    assert st["up"] and all(st["namespaces"].values())
    assert st["controller"]["addresses"] == ["10.99.0.254/24"]
    assert st["vip"]["holders"] == []
    a, b = st["nodes"]["node-a"], st["nodes"]["node-b"]
    assert (a["hostname"], b["hostname"]) == ("node-a", "node-b")
    assert a["addresses"] == ["10.99.0.1/24"] and b["addresses"] == ["10.99.0.2/24"]
    assert a["link"] == b["link"] == "up"
    assert a["dev_hast"] == {"res0": "/dev/null"} and b["dev_hast"] == {}
    assert any(p["comm"] == "sshd" for p in a["processes"])
    json.dumps(st)  # plain data


# -- failures ------------------------------------------------------------------------------------


def test_cut_and_heal_change_reachability(up_lab):
    lab = up_lab
    assert ping(lab, A.ip) and ping(lab, B.ip)

    lab.cut(A)  # link down
    assert not ping(lab, A.ip) and ping(lab, B.ip)
    assert lab.status()["nodes"]["node-a"]["link"] == "down"
    assert "NO-CARRIER" in lab.run(A, ["ip", "link", "show", "eth0"]).stdout
    lab.cut(A)  # again: no-op
    lab.heal(A)
    assert wait_for(lambda: ping(lab, A.ip), 5)
    assert lab.status()["nodes"]["node-a"]["link"] == "up"

    lab.cut(B, "drop")  # link stays up, traffic dropped
    assert not ping(lab, B.ip) and ping(lab, A.ip)
    assert "NO-CARRIER" not in lab.run(B, ["ip", "link", "show", "eth0"]).stdout
    assert lab.status()["nodes"]["node-b"]["cut"] == ["drop"]
    lab.heal(B)
    assert wait_for(lambda: ping(lab, B.ip), 5)
    assert topo.CUT_CHAIN not in lab.run(B, ["iptables", "-S"]).stdout
    lab.heal(B)  # again: fine


def test_kill_crashes_the_node_but_leaves_sshd(up_lab):
    lab = up_lab
    sshd_a = int(lab.paths.sshd_pidfile(A).read_text())
    tree = lab.spawn(A, ["sh", "-c", "sleep 1000 & sleep 1000 & wait"])
    other = lab.spawn(B, ["sleep", "1000"])
    assert wait_for(lambda: sum(p.comm == "sleep" for p in lab.processes(A)) == 2, 5)

    killed = lab.kill("node-a")
    assert tree.pid in {p.pid for p in killed}
    assert {p.comm for p in killed} == {"sh", "sleep"}
    assert tree.wait(timeout=5) == -signal.SIGKILL
    assert {p.comm for p in lab.processes(A)} == {"sshd"}
    assert labmod._alive(sshd_a)
    assert lab.ssh(A, ["hostname"], timeout=30).stdout.strip() == "node-a"
    assert other.poll() is None  # node-b untouched
    assert lab.is_up()


@pytest.mark.skipif(shutil.which("keepalived", path=labmod.tool_path()) is None,
                    reason="keepalived not installed (make deps installs it)")
def test_kill_keepalived_master_child_first_no_respawn(up_lab):
    lab = up_lab
    for n, prio in ((A, 150), (B, 100)):
        conf = lab.paths.node_dir(n) / "keepalived.conf"
        conf.write_text(
            f"global_defs {{ router_id {n.name}\n vrrp_garp_master_delay 0 }}\n"
            "vrrp_instance VI_1 {\n state BACKUP\n interface eth0\n virtual_router_id 51\n"
            f" priority {prio}\n advert_int 0.1\n version 3\n"
            f" virtual_ipaddress {{ {topo.VIP}/24 dev eth0 }}\n}}\n"
        )
        # Default pid files (/run/keepalived.pid ...) are per node: each node has its own /run.
        lab.spawn(n, ["keepalived", "-n", "-l", "-D", "-f", str(conf)],
                  log=lab.paths.node_dir(n) / "keepalived.log")
    assert wait_for(lambda: lab.vip_holders() == ["node-a"], 15), lab.status()["vip"]
    assert sum(p.comm == "keepalived" for p in lab.processes(A)) == 2  # parent + VRRP child

    killed = lab.kill(A)
    assert sum(p.comm == "keepalived" for p in killed) == 2
    time.sleep(1.0)  # a surviving parent would have respawned its child by now
    assert not [p for p in lab.processes(A) if p.comm == "keepalived"]
    # As on a real crash, node-a keeps the VIP (no one removed it) and node-b takes it over.
    assert wait_for(lambda: lab.vip_holders() == ["node-a", "node-b"], 10), lab.vip_holders()
    assert lab.status()["vip"]["holders"] == ["node-a", "node-b"]


# -- the command line ----------------------------------------------------------------------------


def hastpy_lab() -> list[str]:
    script = Path(sys.executable).with_name("hastpy-lab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hastpy.lab.cli"]


def test_command_line(fresh):
    lab, before = fresh
    base = hastpy_lab() + ["--dir", str(lab.dir)]

    def cli(*args, input=None):
        return subprocess.run(base + list(args), input=input, capture_output=True, text=True, timeout=120)

    t0 = time.monotonic()
    cp = cli("up", "--size", "64M")
    t_up = time.monotonic() - t0
    assert cp.returncode == 0, cp.stderr
    assert "node-a" in cp.stdout
    assert os.path.getsize(lab.paths.disk(A)) == 64 * topo.MiB

    cp = cli("up")
    assert cp.returncode == os.EX_USAGE
    assert cp.stderr.startswith("hastpy-lab: the lab is already up") and len(cp.stderr.splitlines()) == 1

    cp = cli("exec", "node-a", "sh", "-c", "cat; hostname; exit 7", input="from-stdin\n")
    assert (cp.returncode, cp.stdout) == (7, "from-stdin\nnode-a\n")
    cp = cli("exec", "b", "ls", "-d", "/dev/hast")  # options after NODE belong to the command
    assert (cp.returncode, cp.stdout) == (0, "/dev/hast\n")
    cp = cli("exec", "node-b", "--", "hostname", "-s")
    assert (cp.returncode, cp.stdout) == (0, "node-b\n")
    cp = cli("switch", "ssh", "-F", str(lab.paths.ssh_config), "node-b", "hostname")
    assert (cp.returncode, cp.stdout) == (0, "node-b\n")

    st = json.loads(cli("status", "--json").stdout)
    assert st["up"] and st["nodes"]["node-b"]["hostname"] == "node-b"
    assert "node-a: hostname node-a" in cli("status").stdout

    assert cli("cut", "node-a").returncode == 0
    assert "link down" in cli("status").stdout
    assert cli("heal", "node-a").returncode == 0
    assert cli("kill", "node-b").stdout.strip() == "node-b: nothing to kill"

    inventory = lab.paths.inventory.read_text()
    assert "node-a ansible_host=10.99.0.1" in inventory and "ansible_python_interpreter=/usr/bin/python3" in inventory

    t0 = time.monotonic()
    cp = cli("down")
    t_down = time.monotonic() - t0
    assert cp.returncode == 0, cp.stderr
    assert cli("down").returncode == 0
    assert lab.residue() == [] and same_host(before, host_snapshot())
    cp = cli("exec", "node-a", "true")
    assert cp.returncode == os.EX_UNAVAILABLE and "not up" in cp.stderr
    print(f"\nhastpy-lab up {t_up:.2f} s, down {t_down:.2f} s (wall, including Python start-up)")
