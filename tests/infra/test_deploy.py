"""Issue #6 in CI: site.yml against the namespace lab over SSH, then the testinfra suite, then a
failover by crashing the primary.

One lab for the module (tests/lab's fixtures, mirrored). In order:

1. A bad inventory (unknown replication mode; a node without an address, i.e. the peer's missing
   `remote`; a VIP outside the nodes' subnet, which needs their real facts) stops site.yml in
   its first play, and nothing appears on the nodes.
2. site.yml converges both nodes; a second run reports changed=0; --check reports no change.
3. The testinfra suite (test_pair.py, `-m "not failover"`) passes against both nodes.
4. `kill node-a` (SIGKILL of everything in it but sshd): keepalived on node-b takes the VIP and its
   notify script promotes and mounts; data written on node-a before the crash is there; the
   suite's failover checks (`-m failover`) pass on node-b.

Each step needs the ones before it; a step whose predecessor failed fails at once, saying so.

ansible-playbook and the inner pytest run in the switch namespace hast-sw (the nodes' addresses
exist only there), with the tools of the venv running this pytest. The nodes cannot reach a
package index, so hastpy and its dependencies are built into a wheelhouse on the host first
(`pip wheel`, which needs the index the venv was installed from), once for the module.

The lab nodes share the host's filesystem and /etc/passwd: the deploy writes under
/etc/hastpy-lab, /opt/hastpy-lab, /var/lib/hastpy-lab and /srv/hastpy-lab and may create the
`hast` user and group. Teardown takes the lab down, then removes those directories, and the user
and group if this module created them. Needs root; skipped otherwise (and only then).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from hastpy.lab import Lab
from hastpy.lab import topology as topo
from hastpy.lab.lab import LabError, missing_tools
from infra_tools import (
    INVENTORIES, ROOT, SITE, bad_inventory, check_stopped_early, parse_recap, system_tool, tail, tool_env,
    unavailable, venv_tool,
)  # fmt: skip

pytestmark = [
    pytest.mark.infra,
    pytest.mark.lab,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the namespace lab needs root"),
]

# What inventories/lab deploys where (its group_vars); the nodes share the host's filesystem.
HOST_DIRS = ("/etc/hastpy-lab", "/opt/hastpy-lab", "/var/lib/hastpy-lab", "/srv/hastpy-lab")
RESOURCE = "data"
MOUNT = "/srv/hastpy-lab/data"
HAST_USER = HAST_GROUP = "hast"
INTERFACE = "eth0"

LAB_WAIT = 600.0  # another engineer's lab: wait for it to go away, never take it down
PLAYBOOK_TIMEOUT = 420.0
SUITE_TIMEOUT = 240.0
FAILOVER_WAIT = 90.0

# Which steps have passed, for the steps that need them.
_done: set[str] = set()
_timings: dict[str, float] = {}
# Loop devices the nodes' /dev/hast links pointed at (attach fuse), checked after `down`.
_lab_loops: dict[str, str] = {}


def needs(*steps: str) -> None:
    __tracebackhide__ = True
    missing = [s for s in steps if s not in _done]
    if missing:
        pytest.fail(f"needs {', '.join(missing)}, which did not pass", pytrace=False)


def hastctl(node: str) -> str:
    return f"/opt/hastpy-lab/{node}/bin/hastctl"  # hast_venv in inventories/lab


# -- host state ------------------------------------------------------------------------------------


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def remove_host_dirs() -> list[str]:
    """Remove what the deploy wrote on the host; refuse a directory with a host mount under it
    (the nodes' mounts live in their own mount namespaces, never here)."""
    problems = []
    mounts = [m.mountpoint for m in Lab.host_mounts()]
    for d in HOST_DIRS:
        if not os.path.lexists(d):
            continue
        busy = [m for m in mounts if topo.under(m, d)]
        if busy:
            problems.append(f"{d}: not removed, {', '.join(busy)} mounted under it")
            continue
        shutil.rmtree(d, ignore_errors=True)
        if os.path.lexists(d):
            problems.append(f"{d}: could not be removed")
    return problems


def wait_for_no_lab(deadline: float) -> None:
    while any(os.path.lexists(topo.netns_path(n)) for n in topo.NAMESPACES):
        if time.monotonic() > deadline:
            owners = ", ".join(str(d) for d in Lab.owner_dirs()) or "unknown dir"
            pytest.fail(f"another lab ({owners}) stayed up for {LAB_WAIT:g} s; not taking it down", pytrace=False)
        time.sleep(2)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def wheelhouse(work) -> Path:
    """hastpy and every dependency as wheels: the nodes install offline from these."""
    out = work / "wheels"
    t0 = time.monotonic()
    cp = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                         "--wheel-dir", str(out), str(ROOT)],
                        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)  # fmt: skip
    assert cp.returncode == 0, f"pip wheel failed:\n{tail(cp.stdout + cp.stderr)}"
    wheels = sorted(p.name for p in out.glob("hastpy-*.whl"))
    assert len(wheels) == 1, wheels
    _timings["wheelhouse"] = time.monotonic() - t0
    return out


@pytest.fixture(scope="module")
def env(work, wheelhouse) -> dict[str, str]:
    venv_tool("ansible-playbook")
    try:
        import testinfra  # noqa: F401
    except ImportError:
        unavailable("pytest-testinfra is not installed (pip install -e '.[test]')")
    return tool_env(work / "tools", HASTPY_WHEEL_DIR=str(wheelhouse))


@pytest.fixture(scope="module")
def lab(work, env):
    """The lab, up for the module, once no other lab is; down and the host cleaned afterwards."""
    missing = missing_tools()
    if missing:
        unavailable(f"the namespace lab needs {', '.join(missing)} (make deps installs them)")
    for tool, package in (("keepalived", "keepalived"), ("nbdfuse", "libnbd-bin"), ("mkfs.ext4", "e2fsprogs"),
                          ("start-stop-daemon", "dpkg")):
        system_tool(tool, package)
    lab = Lab(work / "lab")
    t0 = time.monotonic()
    deadline = t0 + LAB_WAIT
    while True:
        wait_for_no_lab(deadline)
        try:
            lab.up(size=64 * topo.MiB)
            break
        except LabError as exc:  # lost a race with another `up`: wait again
            if exc.exit_code != os.EX_USAGE or time.monotonic() > deadline:
                raise
    _timings["waiting for the lab"] = time.monotonic() - t0
    had_user, had_group = user_exists(HAST_USER), group_exists(HAST_GROUP)
    try:
        # We hold the lab: anything under the lab's host dirs is left from an earlier deploy whose
        # nodes are gone, and its first-deploy markers would make this deploy skip the roles.
        stale = remove_host_dirs()
        assert not stale, stale
        yield lab
    finally:
        problems = []
        try:
            lab.down(purge=True)
        except LabError as exc:
            problems.append(f"lab down: {exc}")
        problems += [f"left by the lab: {r}" for r in lab.residue()]
        problems += detach_dead_loops()
        problems += remove_host_dirs()
        if not had_user and user_exists(HAST_USER):
            # --force: a hastd outside the lab (another test run on this machine) may have a worker
            # running as `hast` since the deploy created it; it keeps the numeric uid.
            cp = subprocess.run(["userdel", "--force", HAST_USER], capture_output=True, text=True)
            if user_exists(HAST_USER):
                problems.append(f"userdel {HAST_USER}: {cp.stderr.strip()}")
        if not had_group and group_exists(HAST_GROUP):
            cp = subprocess.run(["groupdel", HAST_GROUP], capture_output=True, text=True)
            if cp.returncode != 0:
                problems.append(f"groupdel {HAST_GROUP}: {cp.stderr.strip()}")
        print("\ntests/infra/test_deploy.py timings: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in _timings.items()))  # fmt: skip
        assert not problems, problems


# -- running things in hast-sw -----------------------------------------------------------------------


def playbook(lab: Lab, env: dict, *args: str, inventory: Path = INVENTORIES / "lab",
             label: str | None = None) -> subprocess.CompletedProcess:
    """ansible-playbook site.yml from hast-sw, with the lab's inventory (SSH details) first."""
    argv = ["env", "-C", str(ROOT), venv_tool("ansible-playbook"), "-i", str(lab.paths.inventory),
            "-i", str(inventory), *args, str(SITE)]  # fmt: skip
    t0 = time.monotonic()
    cp = lab.controller(argv, env=env, check=False, timeout=PLAYBOOK_TIMEOUT)
    if label:
        _timings[label] = time.monotonic() - t0
    print(cp.stdout[-20000:], cp.stderr[-5000:], sep="\n")
    return cp


def check_recap(cp: subprocess.CompletedProcess, *, changed_zero: bool) -> dict:
    __tracebackhide__ = True
    out = cp.stdout + cp.stderr
    recap = parse_recap(out)
    assert sorted(recap) == ["node-a", "node-b"], f"no PLAY RECAP for both nodes:\n{tail(out)}"
    bad = {h: r for h, r in recap.items() if r["failed"] or r["unreachable"]}
    assert cp.returncode == 0 and not bad, f"site.yml failed (exit {cp.returncode}): {bad}\n{tail(out, 80)}"
    if changed_zero:
        changed = {h: r["changed"] for h, r in recap.items()}
        assert changed == {"node-a": 0, "node-b": 0}, f"{changed}; changed tasks:\n" + "\n".join(
            line for line in out.splitlines() if line.startswith("changed:"))
    return recap


def run_testinfra(lab: Lab, env: dict, work: Path, label: str, hosts: list[str], *args: str) -> str:
    """Run tests/infra/test_pair.py from hast-sw against ``hosts``; returns its output after
    checking that it passed with nothing skipped."""
    argv = [
        "env", "-C", str(ROOT), sys.executable, "-m", "pytest", str(ROOT / "tests" / "infra" / "test_pair.py"),
        "-p", "no:cacheprovider", "-q", "-rfEs", f"--basetemp={work / ('pytest-' + label)}",
        "--hosts=" + ",".join(f"ssh://root@{h}" for h in hosts), f"--ssh-config={lab.paths.ssh_config}",
        f"--hast-vip={topo.VIP}", f"--hast-vip-interface={INTERFACE}", *args,
    ]  # fmt: skip
    t0 = time.monotonic()
    cp = lab.controller(argv, env=env, check=False, timeout=SUITE_TIMEOUT)
    _timings[f"testinfra {label}"] = time.monotonic() - t0
    out = cp.stdout + cp.stderr
    print(out)
    assert cp.returncode == 0, f"the testinfra suite failed (exit {cp.returncode}):\n{tail(out, 120)}"
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary
    return out


def node_status(lab: Lab, node: str) -> list[dict] | None:
    cp = lab.run(node, [hastctl(node), "status", "--json", "-c", "/etc/hast.conf", "-n", node], check=False,
                 timeout=15)  # fmt: skip
    if cp.returncode != 0:
        return None
    return json.loads(cp.stdout)


def mounted(lab: Lab, node: str) -> str | None:
    """`SOURCE FSTYPE` of MOUNT inside the node, or None."""
    cp = lab.run(node, ["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--mountpoint", MOUNT], check=False, timeout=15)
    return (cp.stdout.strip() or None) if cp.returncode == 0 else None


def note_device(lab: Lab, node: str) -> None:
    """Remember the loop device behind the node's /dev/hast/<resource>."""
    cp = lab.run(node, ["readlink", "-f", f"/dev/hast/{RESOURCE}"], check=False, timeout=15)
    dev = cp.stdout.strip()
    if cp.returncode == 0 and dev.startswith("/dev/loop"):
        _lab_loops[dev] = node


def detach_dead_loops() -> list[str]:
    """After `down`: detach the loop devices the nodes used that are still attached to a dead FUSE
    file. `hastpy-lab down` misses the one of a node crashed with `kill`: nbdfuse died with the
    node, the kernel no longer reports the backing file's device and inode (losetup shows them
    null), so down cannot tell it is the lab's. A device someone reused since has a live backing
    file and is left alone."""
    if not _lab_loops:
        return []
    cp = subprocess.run(["losetup", "-l", "-J", "-O", "NAME,BACK-INO,BACK-MAJ:MIN"], capture_output=True, text=True)
    attached = {d["name"]: d for d in (json.loads(cp.stdout or "{}").get("loopdevices") or [])}
    problems, detached = [], []
    for dev, node in sorted(_lab_loops.items()):
        info = attached.get(dev)
        if info is None or info.get("back-ino") not in (None, "") or info.get("back-maj:min") not in (None, ""):
            continue
        if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
            detached.append(f"{dev} ({node})")
        else:
            problems.append(f"{dev} ({node}'s /dev/hast/{RESOURCE}) is still attached after down")
    if detached:
        warnings.warn(f"hastpy-lab down left loop device(s) {', '.join(detached)} attached to a dead "
                      "FUSE file; detached them here", stacklevel=1)  # fmt: skip
    return problems


def diagnostics(lab: Lab) -> str:
    parts = []
    for node in ("node-a", "node-b"):
        log = Path(f"/var/lib/hastpy-lab/{node}/vip-events.log")
        if log.exists():
            parts.append(f"--- {log}\n{tail(log.read_text(errors='replace'), 30)}")
    with_status = lab.status()
    parts.append("--- hastpy-lab status\n" + json.dumps(
        {n: {k: v[k] for k in ("vip", "mounts", "dev_hast")} | {"processes": [p["comm"] for p in v["processes"]]}
         for n, v in with_status["nodes"].items()}, indent=1))  # fmt: skip
    return "\n".join(parts)


# -- the steps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["unknown-replication", "missing-remote", "vip-outside-subnet"])
def test_bad_inventory_stops_before_anything_changes_on_the_nodes(lab, env, work, change):
    had_user = user_exists(HAST_USER)
    cp = playbook(lab, env, inventory=bad_inventory(work, change))
    check_stopped_early(cp, change)
    assert [d for d in HOST_DIRS if os.path.lexists(d)] == []
    assert user_exists(HAST_USER) == had_user
    for n in topo.NODES:
        assert lab.paths.hast_conf(n).read_text() == "", f"{n.name}'s /etc/hast.conf was written"
        daemons = {"hastd", "keepalived", "ucarp", "nbdfuse", "nbdkit"} & {p.comm for p in lab.processes(n)}
        assert daemons == set(), f"started in {n.name}: {daemons}"


def test_site_converges_both_nodes(lab, env):
    cp = playbook(lab, env, label="converge 1")
    recap = check_recap(cp, changed_zero=False)
    assert all(r["changed"] > 0 for r in recap.values()), recap
    _done.add("converge")


def test_second_run_changes_nothing(lab, env):
    needs("converge")
    check_recap(playbook(lab, env, label="converge 2"), changed_zero=True)
    _done.add("idempotent")


def test_check_mode_reports_no_change(lab, env):
    needs("converge")
    check_recap(playbook(lab, env, "--check", label="converge --check"), changed_zero=True)


def test_changing_the_vip_manager_of_the_running_pair_is_refused(lab, env, work):
    """keepalived runs: an inventory that now says ucarp stops in the first play, before a
    second VIP manager starts next to it."""
    needs("converge")
    cp = playbook(lab, env, inventory=bad_inventory(work, "switch-to-ucarp"))
    check_stopped_early(cp, "switch-to-ucarp")
    for n in topo.NODES:
        daemons = {"keepalived", "ucarp"} & {p.comm for p in lab.processes(n)}
        assert daemons == {"keepalived"}, f"VIP managers in {n.name}: {daemons}"


def test_switchover_to_the_primary_is_a_no_op(lab, env):
    """A rerun of switchover.yml after it went through (the target already primary) changes
    nothing and succeeds."""
    needs("converge")
    deadline = time.monotonic() + FAILOVER_WAIT  # the first election's promotion may still run
    while not (mounted(lab, "node-a") or mounted(lab, "node-b")) and time.monotonic() < deadline:
        time.sleep(0.5)
    primary = "node-a" if mounted(lab, "node-a") else "node-b"
    assert mounted(lab, primary), f"{MOUNT} is mounted on neither node\n{diagnostics(lab)}"
    argv = ["env", "-C", str(ROOT), venv_tool("ansible-playbook"), "-i", str(lab.paths.inventory),
            "-i", str(INVENTORIES / "lab"), "-e", f"switchover_to={primary}", str(ROOT / "playbooks" / "switchover.yml")]
    cp = lab.controller(argv, env=env, check=False, timeout=PLAYBOOK_TIMEOUT)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, f"switchover to the primary {primary} failed:\n{tail(out, 60)}"
    assert f"{primary} is already primary for every resource: nothing to do." in out, tail(out, 60)
    assert {h: r["changed"] for h, r in parse_recap(out).items()} == {"node-a": 0, "node-b": 0}, tail(out, 60)
    assert mounted(lab, primary), f"{MOUNT} is no longer mounted on {primary}\n{diagnostics(lab)}"


def test_testinfra_suite_passes_on_both_nodes(lab, env, work):
    needs("converge")
    run_testinfra(lab, env, work, "pair", [n.ip for n in topo.NODES], "-m", "not failover")
    _done.add("testinfra")


def test_failover_to_node_b_after_node_a_crashes(lab, env, work):
    needs("converge", "testinfra")
    # Data on the primary's filesystem before the crash; memsync acknowledges a write once the
    # secondary has it, and sync waits for the acknowledgements.
    if not mounted(lab, "node-a"):
        # The first VRRP election can go to node-b when its keepalived starts first (nopreempt):
        # move the service to node-a with the planned switchover, a feature in its own right.
        argv = ["env", "-C", str(ROOT), venv_tool("ansible-playbook"), "-i", str(lab.paths.inventory),
                "-i", str(INVENTORIES / "lab"), "-e", "switchover_to=node-a", str(ROOT / "playbooks" / "switchover.yml")]
        cp = lab.controller(argv, env=env, check=False, timeout=PLAYBOOK_TIMEOUT)
        assert cp.returncode == 0, f"switchover to node-a failed:\n{tail(cp.stdout + cp.stderr, 60)}"
        deadline = time.monotonic() + FAILOVER_WAIT
        while not mounted(lab, "node-a") and time.monotonic() < deadline:
            time.sleep(0.5)
    assert mounted(lab, "node-a"), f"{MOUNT} is not mounted on the primary node-a\n{diagnostics(lab)}"
    cp = lab.run("node-a", ["sh", "-c", f"head -c 4194304 /dev/urandom >{MOUNT}/before-crash && sync "
                                        f"&& sha256sum <{MOUNT}/before-crash"], timeout=60)  # fmt: skip
    digest = cp.stdout.split()[0]
    note_device(lab, "node-a")

    killed = lab.kill("node-a")
    t0 = time.monotonic()
    assert {"hastd", "keepalived"} <= {p.comm for p in killed}, [p.comm for p in killed]
    state = None
    while time.monotonic() - t0 < FAILOVER_WAIT:
        status = node_status(lab, "node-b")
        where = mounted(lab, "node-b")
        state = (status, where)
        if status and all(r["role"] == "primary" and r.get("device_ready") for r in status) and where:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"node-b was not primary with {MOUNT} mounted {FAILOVER_WAIT:g} s after node-a "
                    f"crashed: {state}\n{diagnostics(lab)}", pytrace=False)  # fmt: skip
    _timings["failover (kill to mounted)"] = time.monotonic() - t0
    note_device(lab, "node-b")
    print(f"failover: node-b primary with {MOUNT} mounted ({where}) "
          f"{_timings['failover (kill to mounted)']:.1f} s after the crash")  # fmt: skip

    cp = lab.run("node-b", ["sha256sum", f"{MOUNT}/before-crash"], check=False, timeout=30)
    assert cp.returncode == 0 and cp.stdout.split()[0] == digest, f"data written before the crash: {cp}"

    run_testinfra(lab, env, work, "failover", ["10.99.0.2"], "-m", "failover", f"--hast-mount={RESOURCE}={MOUNT}")
