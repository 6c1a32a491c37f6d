"""pytest-testinfra checks of a pair deployed by site.yml (DESIGN.md §4, "infra").

The tests reach the nodes the way testinfra does (--hosts, --ssh-config, --ansible-inventory ...)
and find everything else on the nodes themselves: hastd's pid file leads to its command line,
which names hast.conf, the node name and the directory hastctl is in. For the namespace lab:

    ip netns exec hast-sw .venv/bin/python -m pytest tests/infra/test_pair.py -p no:cacheprovider \\
        -m "not failover" --hosts=ssh://root@10.99.0.1,ssh://root@10.99.0.2 \\
        --ssh-config=<labdir>/ssh_config --hast-vip=10.99.0.100 --hast-vip-interface=eth0

and, after the primary failed (e.g. `hastpy-lab kill node-a`), the failover checks on the survivor:

    ip netns exec hast-sw .venv/bin/python -m pytest tests/infra/test_pair.py -p no:cacheprovider \\
        -m failover --hosts=ssh://root@10.99.0.2 --ssh-config=<labdir>/ssh_config \\
        --hast-vip=10.99.0.100 --hast-vip-interface=eth0 --hast-mount=data=/srv/hastpy-lab/data

tests/infra/test_deploy.py does all of that (lab up, site.yml, the runs above) as part of the
project's test command.

For the Vagrant VMs: `vagrant ssh-config > .vagrant/ssh-config`, then
`--hosts=node-a,node-b --ssh-config=.vagrant/ssh-config --sudo --hast-vip=192.168.56.10
--hast-vip-interface=eth1`.

Without --hosts, or without pytest-testinfra, the tests of test_pair.py are skipped with the
reason: they need a deployed pair, and test_deploy.py runs them as a subprocess against one.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
from dataclasses import dataclass

import pytest

HERE = pathlib.Path(__file__).parent
DEFAULT_PIDFILE = "/run/hastd.pid"  # roles/hast: hast_pidfile
DEFAULT_CONFIG = "/etc/hast.conf"  # hastd's own default when its command line has no -c


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hastpy infra")
    group.addoption(
        "--hast-pidfile",
        default=DEFAULT_PIDFILE,
        help="hastd's pid file on every node; {host} stands for the node's testinfra host name.",
    )
    group.addoption("--hast-vip", default=None, help="The VIP; without it the VIP checks are skipped.")
    group.addoption("--hast-vip-interface", default=None, help="Interface that carries the VIP.")
    group.addoption(
        "--hast-mount",
        action="append",
        default=[],
        metavar="RESOURCE=DIR",
        help="Where a promotion mounts RESOURCE (hast_failover_resources); repeatable. The failover "
        "checks expect it mounted on the survivor.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "failover: checks of the survivor after the primary failed (run with -m failover)"
    )


# The testinfra suite: it needs --hosts naming a deployed pair. The other modules here
# (test_deploy.py, test_lint.py) build what they need themselves.
TESTINFRA_MODULES = ("test_pair.py",)


def _skip_reason(config: pytest.Config) -> str | None:
    try:
        import testinfra  # noqa: F401
    except ImportError:
        return "pytest-testinfra is not installed (test_deploy.py runs this suite against the lab)"
    if not config.getoption("hosts", default=None):
        return "no --hosts: these check a pair deployed by site.yml (test_deploy.py runs them against the lab)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --hosts the testinfra suite is deselected, not skipped: test_deploy.py runs it
    against the lab (so a CI run lists no skip for it). With CI unset it is skipped instead, with
    the reason, so that running it by hand without --hosts says why nothing ran."""
    reason = _skip_reason(config)
    keep, dropped = [], []
    for item in items:
        if item.path.parent == HERE:
            item.add_marker(pytest.mark.infra)
            if reason is not None and item.path.name in TESTINFRA_MODULES:
                if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                    dropped.append(item)
                    continue
                item.add_marker(pytest.mark.skip(reason=reason))
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@dataclass(frozen=True)
class Hastd:
    """One node's running hastd, as its command line describes it."""

    pid: int
    hastctl: str  # next to the hastd script (the venv's or the system's bin directory)
    config: str  # -c
    node: str | None  # -n; None: hastd matched its hostname

    def hastctl_cmd(self, *args: str) -> str:
        argv = [self.hastctl, args[0], "-c", self.config, *(["-n", self.node] if self.node else []), *args[1:]]
        return shlex.join(argv)


def _option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def find_hastd(host, pidfile: str) -> Hastd:
    """Locate hastd through its pid file and read -c and -n from /proc/<pid>/cmdline."""
    __tracebackhide__ = True
    pidfile = pidfile.format(host=host.backend.get_hostname())
    pid = int(host.file(pidfile).content_string.split()[0])
    argv = [a.decode() for a in host.file(f"/proc/{pid}/cmdline").content.split(b"\0") if a]
    # argv: [python, .../bin/hastd, -c, FILE, -n, NODE, -P, PIDFILE, (-F)]
    script = next(a for a in argv if os.path.basename(a) == "hastd")
    return Hastd(
        pid=pid,
        hastctl=os.path.join(os.path.dirname(script), "hastctl"),
        config=_option(argv, "-c") or DEFAULT_CONFIG,
        node=_option(argv, "-n"),
    )


def read_status(host, hastd: Hastd) -> list[dict]:
    """`hastctl status --json`: one dict per resource."""
    __tracebackhide__ = True
    return json.loads(host.check_output(hastd.hastctl_cmd("status", "--json")))


@pytest.fixture(scope="module")
def hastd(host, pytestconfig) -> Hastd:
    return find_hastd(host, pytestconfig.getoption("hast_pidfile"))


@pytest.fixture(scope="module")
def status(host, hastd) -> list[dict]:
    return read_status(host, hastd)


@dataclass(frozen=True)
class Node:
    """One node of the pair, for the checks that compare the two."""

    name: str
    host: object  # testinfra.host.Host
    hastd: Hastd
    status: list[dict]

    def roles(self) -> dict[str, str]:
        return {r["name"]: r["role"] for r in self.status}


@pytest.fixture(scope="session")
def pair(pytestconfig) -> list[Node]:
    """Both nodes, connected the same way testinfra's `host` fixture connects."""
    import testinfra

    opt = pytestconfig.option
    hosts = testinfra.get_hosts(
        opt.hosts.split(","),
        connection=opt.connection,
        ssh_config=opt.ssh_config,
        ssh_identity_file=opt.ssh_identity_file,
        sudo=opt.sudo,
        sudo_user=opt.sudo_user,
        ansible_inventory=opt.ansible_inventory,
        force_ansible=opt.force_ansible,
    )
    nodes = []
    for h in hosts:
        d = find_hastd(h, pytestconfig.getoption("hast_pidfile"))
        nodes.append(Node(h.backend.get_pytest_id(), h, d, read_status(h, d)))
    assert len(nodes) == 2, f"a HAST pair has two nodes; --hosts names {len(nodes)}"
    return nodes


@pytest.fixture(scope="session")
def mounts(pytestconfig) -> dict[str, str]:
    """--hast-mount RESOURCE=DIR options as {resource: mount point}."""
    out = {}
    for spec in pytestconfig.getoption("hast_mount"):
        name, sep, path = spec.partition("=")
        if not (sep and name and path.startswith("/")):
            raise pytest.UsageError(f"--hast-mount wants RESOURCE=/absolute/dir, not {spec!r}")
        out[name] = path
    return out


@pytest.fixture(scope="session")
def vip(pytestconfig) -> tuple[str, str]:
    address, interface = pytestconfig.getoption("hast_vip"), pytestconfig.getoption("hast_vip_interface")
    if not address or not interface:
        pytest.skip("no --hast-vip and --hast-vip-interface: no VIP manager to check")
    return address, interface
