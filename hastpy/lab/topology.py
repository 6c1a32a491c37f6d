"""The two-node lab as data: names, addresses, paths, rendered files and the ordered commands.

Nothing here touches the system, so all of it is unit-tested without root. ``hastpy.lab.lab`` runs
what this module describes.

The shape (reference/lab.md §1, §3, §4)::

    hast-sw (network namespace)            node-a (net ns + persistent mount and UTS ns)
      br0 10.99.0.254/24 ── veth-a ─────── eth0 10.99.0.1/24   hostname node-a
                        └── veth-b ─────── eth0 10.99.0.2/24   hostname node-b   (node-b, same)

Each node's mount namespace has its own ``/run`` (bound from the lab dir, holds ``/run/sshd``),
``/etc/hast.conf`` (a per-node file bound over a host placeholder), ``/dev/hast`` (a tmpfs over a
host placeholder directory) and ``/sys`` (a sysfs mounted from inside the node's network namespace,
so ``/sys/class/net`` lists the node's interfaces). The addresses live only inside the namespaces.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from hastpy.errors import UsageError

DEFAULT_LABDIR = "/var/tmp/hastpy-lab"
LABDIR_ENV = "HASTPY_LAB_DIR"

SWITCH_NS = "hast-sw"
BRIDGE = "br0"
PREFIXLEN = 24
SUBNET = "10.99.0.0/24"
CONTROLLER_IP = "10.99.0.254"
VIP = "10.99.0.100"
NODE_IFACE = "eth0"
SSH_PORT = 22
MiB = 1024 * 1024
DEFAULT_DISK_SIZE = 512 * MiB

# Host paths a node needs as mount points. The lab creates them only when absent, and removes them
# on `down` only if it created them (the host is not modified for good).
ETC_HAST_CONF = "/etc/hast.conf"
DEV_HAST = "/dev/hast"
# Where `ip netns add` keeps its bind mounts; the first `ip netns add` makes it a mount point.
RUN_NETNS = "/run/netns"

# The iptables chain used by `cut --mode drop` inside a node's network namespace.
CUT_CHAIN = "HASTPY-LAB-CUT"
CUT_MODES = ("down", "drop")

# The tools `up` needs, and the Debian package that ships each (the Makefile's `deps` installs them).
REQUIRED_TOOLS = {
    "ip": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "mount": "mount",
    "umount": "mount",
    "losetup": "mount",
    "hostname": "hostname",
    "sshd": "openssh-server",
    "ssh-keygen": "openssh-client",
}
# Extra directories searched for tools, since sbin is not always on a non-login PATH.
TOOL_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

# Unix socket paths hold 107 bytes; ssh first binds the ControlPath plus a 17-byte random suffix.
_SUN_PATH_MAX = 107
_SSH_TEMP_SUFFIX = 17


@dataclass(frozen=True)
class Node:
    """One lab node. ``name`` is also its network namespace, hostname and SSH host alias."""

    name: str
    letter: str
    ip: str
    mac: str

    @property
    def netns(self) -> str:
        return self.name

    @property
    def veth(self) -> str:
        """The switch-side end of the node's cable, in the hast-sw namespace."""
        return f"veth-{self.letter}"

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{PREFIXLEN}"


NODES: tuple[Node, ...] = (
    Node("node-a", "a", "10.99.0.1", "02:00:0a:63:00:01"),
    Node("node-b", "b", "10.99.0.2", "02:00:0a:63:00:02"),
)
NAMESPACES: tuple[str, ...] = (SWITCH_NS,) + tuple(n.netns for n in NODES)


def node(name: str) -> Node:
    """The node called ``name``: "node-a", or just "a" (any case)."""
    wanted = name.strip().lower()
    for n in NODES:
        if wanted in (n.name, n.letter):
            return n
    known = ", ".join(n.name for n in NODES)
    raise UsageError(f"unknown node {name!r} (the lab has {known})")


def default_labdir(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(LABDIR_ENV) or DEFAULT_LABDIR


@dataclass(frozen=True)
class Paths:
    """Every file the lab owns lives under ``root``."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> "Paths":
        """Resolved like the kernel shows mount points, so mounts under it are recognised."""
        return cls(Path(os.path.realpath(os.fspath(root))))

    # -- lab-wide -------------------------------------------------------------------------------
    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def ns_dir(self) -> Path:
        """Bound onto itself with private propagation; holds the nsfs binds that keep the nodes'
        mount and UTS namespaces alive without a process in them."""
        return self.root / "ns"

    @property
    def ssh_dir(self) -> Path:
        return self.root / "ssh"

    @property
    def client_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.ssh_dir / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def control_path(self) -> str:
        """ssh's multiplexing socket: short tokens (user@address) to fit a socket path."""
        return str(self.ssh_dir / "cm-%r@%h")

    @property
    def ssh_config(self) -> Path:
        return self.root / "ssh_config"

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.ini"

    # -- per node -------------------------------------------------------------------------------
    def node_dir(self, n: Node) -> Path:
        return self.root / "nodes" / n.letter

    def run_dir(self, n: Node) -> Path:
        """Bound over /run inside the node."""
        return self.node_dir(n) / "run"

    def hast_conf(self, n: Node) -> Path:
        """Bound over /etc/hast.conf inside the node; write it from the host directly."""
        return self.node_dir(n) / "hast.conf"

    def disk(self, n: Node) -> Path:
        """The node's sparse-file provider."""
        return self.node_dir(n) / "disk.img"

    def sshd_config(self, n: Node) -> Path:
        return self.node_dir(n) / "sshd_config"

    def sshd_log(self, n: Node) -> Path:
        return self.node_dir(n) / "sshd.log"

    def sshd_pidfile(self, n: Node) -> Path:
        """``/run/sshd.pid`` as seen from the host."""
        return self.run_dir(n) / "sshd.pid"

    def host_key(self, n: Node) -> Path:
        return self.ssh_dir / f"ssh_host_ed25519_key-{n.name}"

    def mnt_ns(self, n: Node) -> Path:
        return self.ns_dir / f"mnt-{n.letter}"

    def uts_ns(self, n: Node) -> Path:
        return self.ns_dir / f"uts-{n.letter}"


def netns_path(name: str) -> str:
    return f"{RUN_NETNS}/{name}"


def under(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True if ``path`` is ``root`` or inside it (textually; both absolute)."""
    p, r = os.fspath(path).rstrip("/") or "/", os.fspath(root).rstrip("/") or "/"
    return p == r or p.startswith(r + "/") or r == "/"


# -- entering a node -----------------------------------------------------------------------------


def nsenter_argv(paths: Paths, n: Node, argv: list[str] | tuple[str, ...], *, net: bool = True,
                 mount: bool = True, uts: bool = True) -> list[str]:
    """The command that runs ``argv`` inside node ``n`` (its /, as seen from its namespaces)."""
    cmd = ["nsenter"]
    if net:
        cmd.append(f"--net={netns_path(n.netns)}")
    if mount:
        cmd.append(f"--mount={paths.mnt_ns(n)}")
    if uts:
        cmd.append(f"--uts={paths.uts_ns(n)}")
    return cmd + ["--", *argv]


def controller_argv(argv: list[str] | tuple[str, ...]) -> list[str]:
    """The command that runs ``argv`` in the switch namespace, where 10.99.0.254 lives (ansible,
    ssh, testinfra, ping run from here). Only the network namespace changes."""
    return ["nsenter", f"--net={netns_path(SWITCH_NS)}", "--", *argv]


def sshd_argv(paths: Paths, n: Node, sshd: str = "/usr/sbin/sshd") -> list[str]:
    """sshd in the foreground, logging to stderr; ``sshd`` must be an absolute path (re-exec)."""
    return nsenter_argv(paths, n, [sshd, "-D", "-e", "-f", str(paths.sshd_config(n))])


# -- up and down ---------------------------------------------------------------------------------


def mount_ns_commands(paths: Paths) -> list[list[str]]:
    """Persistent per-node mount + UTS namespaces (reference/lab.md §3). The nsfs files under
    ``ns_dir`` must exist (empty files) before these run. Made before the network namespaces so
    the nodes' copies of the host mount table hold no binds of /run/netns/*."""
    ns = str(paths.ns_dir)
    cmds = [["mount", "--bind", ns, ns], ["mount", "--make-private", ns]]
    for n in NODES:
        cmds.append([
            "unshare", f"--mount={paths.mnt_ns(n)}", f"--uts={paths.uts_ns(n)}",
            "--propagation", "private", "hostname", n.name,
        ])  # fmt: skip
    return cmds


def node_mount_commands(paths: Paths, n: Node) -> list[list[str]]:
    """Inside the node's mount namespace: its own /run, /etc/hast.conf and /dev/hast. The host
    placeholders (/etc/hast.conf, /dev/hast) and the lab files must exist first."""
    def inside(argv: list[str]) -> list[str]:
        return nsenter_argv(paths, n, argv, net=False, uts=False)

    return [
        inside(["mount", "--bind", str(paths.run_dir(n)), "/run"]),
        inside(["mount", "--bind", str(paths.hast_conf(n)), ETC_HAST_CONF]),
        inside(["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", f"hast-{n.name}", DEV_HAST]),
    ]


def network_commands() -> list[list[str]]:
    """The three network namespaces, the bridge and the two cables (reference/lab.md §1)."""
    cmds = [["ip", "netns", "add", name] for name in NAMESPACES]
    sw = ["ip", "-n", SWITCH_NS]
    cmds += [
        sw + ["link", "set", "lo", "up"],
        sw + ["link", "add", BRIDGE, "type", "bridge"],
        sw + ["link", "set", BRIDGE, "up"],
    ]
    for n in NODES:
        nd = ["ip", "-n", n.netns]
        cmds += [
            sw + ["link", "add", n.veth, "type", "veth", "peer", "name", NODE_IFACE, "netns", n.netns],
            sw + ["link", "set", n.veth, "master", BRIDGE, "up"],
            nd + ["link", "set", "lo", "up"],
            nd + ["link", "set", NODE_IFACE, "address", n.mac],
            nd + ["addr", "add", n.cidr, "dev", NODE_IFACE],
            nd + ["link", "set", NODE_IFACE, "up"],
        ]
    cmds.append(sw + ["addr", "add", f"{CONTROLLER_IP}/{PREFIXLEN}", "dev", BRIDGE])
    return cmds


def sysfs_commands(paths: Paths) -> list[list[str]]:
    """A sysfs mounted from inside each node's network namespace shows that namespace's
    interfaces under /sys/class/net (what `ip netns exec` does per call; here once, for good)."""
    return [
        nsenter_argv(paths, n, ["mount", "-t", "sysfs", "-o", "nosuid,nodev,noexec",
                                f"sysfs-{n.name}", "/sys"], uts=False)
        for n in NODES
    ]


def up_commands(paths: Paths) -> list[list[str]]:
    """Every command of `up`, in order. Before them the lab creates its files and the host
    placeholders; after them it starts sshd in each node."""
    cmds = mount_ns_commands(paths)
    for n in NODES:
        cmds += node_mount_commands(paths, n)
    cmds += network_commands()
    cmds += sysfs_commands(paths)
    return cmds


def down_commands(paths: Paths) -> list[list[str]]:
    """The fixed part of `down`, after the lab's processes are gone; each may fail harmlessly
    (already gone). The lab then sweeps any other mount under the lab dir, detaches loop devices
    backed by lab files and removes the placeholders it created."""
    cmds = [["ip", "netns", "delete", name] for name in reversed(NAMESPACES)]
    for n in NODES:
        cmds += [["umount", str(paths.mnt_ns(n))], ["umount", str(paths.uts_ns(n))]]
    cmds.append(["umount", str(paths.ns_dir)])
    return cmds


# -- cut and heal --------------------------------------------------------------------------------


def cut_commands(n: Node, mode: str = "down") -> list[list[str]]:
    """Pull node ``n``'s cable (``down``: the node sees carrier loss, so ucarp and keepalived on
    it notice) or silently drop its IP traffic on eth0 (``drop``: the link stays up)."""
    if mode == "down":
        return [["ip", "-n", SWITCH_NS, "link", "set", n.veth, "down"]]
    if mode == "drop":
        ipt = ["ip", "netns", "exec", n.netns, "iptables", "-w"]
        return [
            ipt + ["-N", CUT_CHAIN],
            ipt + ["-A", CUT_CHAIN, "-j", "DROP"],
            ipt + ["-I", "INPUT", "-i", NODE_IFACE, "-j", CUT_CHAIN],
            ipt + ["-I", "OUTPUT", "-o", NODE_IFACE, "-j", CUT_CHAIN],
        ]
    raise UsageError(f"unknown cut mode {mode!r} (use {' or '.join(CUT_MODES)})")


def heal_commands(n: Node, mode: str = "down") -> list[list[str]]:
    """Undo :func:`cut_commands` for ``mode``."""
    if mode == "down":
        return [["ip", "-n", SWITCH_NS, "link", "set", n.veth, "up"]]
    if mode == "drop":
        ipt = ["ip", "netns", "exec", n.netns, "iptables", "-w"]
        return [
            ipt + ["-D", "INPUT", "-i", NODE_IFACE, "-j", CUT_CHAIN],
            ipt + ["-D", "OUTPUT", "-o", NODE_IFACE, "-j", CUT_CHAIN],
            ipt + ["-F", CUT_CHAIN],
            ipt + ["-X", CUT_CHAIN],
        ]
    raise UsageError(f"unknown cut mode {mode!r} (use {' or '.join(CUT_MODES)})")


# -- rendered files ------------------------------------------------------------------------------


def render_sshd_config(paths: Paths, n: Node) -> str:
    """sshd for node ``n``: root by key only, no PAM, its pid file in the node's own /run."""
    return "\n".join([
        f"# hastpy lab: sshd for {n.name} (written by hastpy-lab up)",
        f"Port {SSH_PORT}",
        "ListenAddress 0.0.0.0",
        f"HostKey {paths.host_key(n)}",
        "PidFile /run/sshd.pid",
        f"AuthorizedKeysFile {paths.authorized_keys}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "AcceptEnv LANG LC_*",
        "Subsystem sftp internal-sftp",
        "",
    ])  # fmt: skip


def render_ssh_config(paths: Paths) -> str:
    """Client config for ssh/testinfra/ansible run in hast-sw: ``ssh -F <labdir>/ssh_config node-a``."""
    lines = ["# hastpy lab: ssh client config (use from the hast-sw namespace)"]
    for n in NODES:
        lines += [f"Host {n.name} {n.ip}", f"    HostName {n.ip}", ""]
    lines += [f"Host vip {VIP}", f"    HostName {VIP}", ""]
    lines += [
        "Host *",
        "    User root",
        f"    IdentityFile {paths.client_key}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {paths.known_hosts}",
        "    GlobalKnownHostsFile /dev/null",
        "    StrictHostKeyChecking yes",
        "    PasswordAuthentication no",
        "    BatchMode yes",
        "    ConnectTimeout 5",
        "    ServerAliveInterval 2",
        "    ServerAliveCountMax 3",
        "    LogLevel ERROR",
    ]  # fmt: skip
    longest = paths.control_path.replace("%r@%h", f"root@{VIP}")
    if len(longest) + _SSH_TEMP_SUFFIX <= _SUN_PATH_MAX:
        lines += [
            "    ControlMaster auto",
            f"    ControlPath {paths.control_path}",
            "    ControlPersist 30",
        ]
    return "\n".join(lines) + "\n"


def render_known_hosts(host_keys: dict[str, str]) -> str:
    """``host_keys`` maps node name to its public host key line ("ssh-ed25519 AAAA... comment").
    The VIP is listed with every node's key, since whichever node holds it answers."""
    lines = []
    for n in NODES:
        key = " ".join(host_keys[n.name].split()[:2])
        lines.append(f"{n.name},{n.ip} {key}")
    for n in NODES:
        key = " ".join(host_keys[n.name].split()[:2])
        lines.append(f"vip,{VIP} {key}")
    return "\n".join(lines) + "\n"


def render_inventory(paths: Paths) -> str:
    """The ansible inventory: group ``hast`` with both nodes, reached over SSH from hast-sw."""
    common = shlex.quote(f"-F {paths.ssh_config}")
    lines = ["# hastpy lab inventory (run ansible from the hast-sw namespace: hastpy-lab switch ...)",
             "[hast]"]
    for n in NODES:
        lines.append(
            f"{n.name} ansible_host={n.ip} ansible_user=root"
            f" ansible_ssh_private_key_file={paths.client_key}"
            f" ansible_ssh_common_args={common}"
            " ansible_python_interpreter=/usr/bin/python3"
            f" lab_ip={n.ip}"
        )
    lines += ["", "[hast:vars]", f"lab_vip={VIP}", f"lab_prefixlen={PREFIXLEN}",
              f"lab_interface={NODE_IFACE}", f"lab_controller_ip={CONTROLLER_IP}", ""]
    return "\n".join(lines)
