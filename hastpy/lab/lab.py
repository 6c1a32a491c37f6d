"""The two-node namespace lab: bring it up, run things in it, break it, tear it down.

``topology`` says what the lab is; this module does the I/O. One lab per machine (the namespace
names are fixed). All state the lab keeps is under its directory; ``state.json`` there records what
`up` changed on the host (placeholders, /run/netns), written *before* each change so that `down`
can undo a partial `up`.

`up` on a lab that is already up is an error (exit 64); `down` is idempotent. `up` resets the
nodes' /run, hast.conf and disk images; SSH keys are made once per lab dir and kept.

`down` removes, in this order: the lab's processes (everything in the three network namespaces
or the nodes' mount/UTS namespaces, plus anything whose cwd or root is under the lab dir; SIGTERM,
then SIGKILL), the namespaces, every mount under the lab dir, loop devices backed by a lab file
(by path, by inode, or on a mount private to a node, e.g. nbdfuse), and the host placeholders
(/etc/hast.conf, /dev/hast, the /run/netns mount) that `up` created. The caller and its ancestors
are never signalled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable

from hastpy.errors import HastError
from hastpy.lab import topology as topo
from hastpy.lab.topology import NODES, Node

_STEP_TIMEOUT = 30.0
_LOCK_WAIT = 60.0
_NODE_INFO_SEP = "--8<-- hastpy-lab --8<--"


class LabError(HastError):
    """Something the lab could not do; ``exit_code`` is a sysexits code."""

    exit_code = os.EX_OSERR

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class LabCommandError(subprocess.CalledProcessError, HastError):
    """A command run by or in the lab failed (``check=True``)."""

    exit_code = os.EX_OSERR

    def __str__(self) -> str:
        cmd = " ".join(self.cmd) if isinstance(self.cmd, (list, tuple)) else str(self.cmd)
        err = self.stderr if isinstance(self.stderr, str) else (self.stderr or b"").decode(errors="replace")
        last = [ln for ln in err.strip().splitlines() if ln.strip()]
        tail = f": {last[-1].strip()}" if last else ""
        return f"`{cmd}` failed (exit {self.returncode}){tail}"


# -- small pure helpers (unit-tested) ------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    majmin: str
    root: str
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        mounts.append(Mount(
            mount_id=int(fields[0]), parent_id=int(fields[1]), majmin=fields[2],
            root=_unescape(fields[3]), mountpoint=_unescape(fields[4]),
            fstype=fields[sep + 1], source=_unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
        ))  # fmt: skip
    return mounts


def parse_losetup(text: str) -> list[dict]:
    """`losetup -l -J -O NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN` → [{name, file, ino, majmin}]."""
    if not text.strip():
        return []
    out = []
    for d in json.loads(text).get("loopdevices", []):
        back = d.get("back-file") or ""
        if back.endswith(" (deleted)"):
            back = back[: -len(" (deleted)")]
        ino = d.get("back-ino")
        out.append({
            "name": d.get("name", ""),
            "file": back,
            "ino": int(ino) if ino not in (None, "") else None,
            "majmin": "".join(str(d.get("back-maj:min") or "").split()),
        })  # fmt: skip
    return out


def tool_path() -> str:
    """PATH plus the sbin directories, for finding ip, sshd and friends."""
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    return os.pathsep.join(parts + [d for d in topo.TOOL_DIRS if d not in parts])


def missing_tools(tools: Iterable[str] = topo.REQUIRED_TOOLS) -> list[str]:
    path = tool_path()
    return [t for t in tools if shutil.which(t, path=path) is None]


# -- processes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    comm: str
    state: str
    net: int | None
    mnt: int | None
    uts: int | None
    cwd: str | None
    root: str | None

    def args(self) -> str:
        try:
            raw = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return ""
        return " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a) or f"[{self.comm}]"


_PF_KTHREAD = 0x00200000


def _ns_ino(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def scan_processes() -> list[Proc]:
    """Every live user-space process with its namespaces, cwd and root."""
    procs = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        base = f"/proc/{entry}"
        try:
            stat = Path(f"{base}/stat").read_text()
        except OSError:
            continue
        lpar, rpar = stat.find("("), stat.rfind(")")
        rest = stat[rpar + 2 :].split()
        if len(rest) < 7:
            continue
        state, ppid, flags = rest[0], int(rest[1]), int(rest[6])
        if flags & _PF_KTHREAD or state in ("Z", "X"):
            continue
        procs.append(Proc(
            pid=int(entry), ppid=ppid, comm=stat[lpar + 1 : rpar], state=state,
            net=_ns_ino(f"{base}/ns/net"), mnt=_ns_ino(f"{base}/ns/mnt"), uts=_ns_ino(f"{base}/ns/uts"),
            cwd=_readlink(f"{base}/cwd"), root=_readlink(f"{base}/root"),
        ))  # fmt: skip
    return procs


def _ancestors() -> set[int]:
    """This process and its ancestors: never signalled, even when they are in the lab."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rfind(")") + 2 :].split()[1])
    return pids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _depth(pid: int, parents: dict[int, int]) -> int:
    d, seen = 0, set()
    while pid in parents and pid not in seen:
        seen.add(pid)
        pid = parents[pid]
        d += 1
    return d


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _dead_backing(device: str) -> bool:
    """A loop device still bound to a backing file the kernel can no longer stat (its FUSE
    server is gone): LOOP_GET_STATUS64 fails with ENOTCONN."""
    from hastpy.attach.fuse import DEAD_BACKING, loop_backing_dev

    return loop_backing_dev(device) == DEAD_BACKING


def kill_hard(select: Callable[[], list[Proc]], timeout: float = 10.0) -> list[int]:
    """SIGKILL what ``select`` returns, like a crash: freeze everything first (SIGSTOP, rescanning
    until no new process appears, so that a parent cannot respawn a child in between, as
    keepalived's parent would), then SIGKILL children before parents, then wait until gone."""
    stopped: dict[int, Proc] = {}
    for _ in range(50):
        new = [p for p in select() if p.pid not in stopped]
        if not new:
            break
        for p in new:
            _signal(p.pid, signal.SIGSTOP)
            stopped[p.pid] = p
    parents = {p.pid: p.ppid for p in stopped.values()}
    order = sorted(stopped, key=lambda pid: _depth(pid, parents), reverse=True)
    for pid in order:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in order):
            break
        time.sleep(0.02)
    return order


# -- the lab -------------------------------------------------------------------------------------


class Lab:
    """The lab rooted at ``labdir`` (default: $HASTPY_LAB_DIR or /var/tmp/hastpy-lab)."""

    def __init__(self, labdir: str | os.PathLike | None = None):
        self.paths = topo.Paths.at(labdir if labdir is not None else topo.default_labdir())

    @property
    def dir(self) -> Path:
        return self.paths.root

    def __repr__(self) -> str:
        return f"Lab({str(self.dir)!r})"

    # -- running commands ------------------------------------------------------------------------

    def _env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        out = dict(os.environ if env is None else env)
        out["PATH"] = tool_path() if env is None else out.get("PATH", tool_path())
        return out

    def _cmd(self, argv: list[str], *, check: bool = True, timeout: float | None = _STEP_TIMEOUT,
             input: str | None = None) -> subprocess.CompletedProcess:
        try:
            cp = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                                env=self._env(), stdin=None if input is not None else subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise LabError(f"{argv[0]}: command not found", os.EX_UNAVAILABLE) from exc
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from exc
        if check and cp.returncode != 0:
            raise LabCommandError(cp.returncode, argv, cp.stdout, cp.stderr)
        return cp

    def node_argv(self, node: str | Node, argv: list[str] | tuple[str, ...]) -> list[str]:
        """The argv that runs ``argv`` inside ``node`` (net + mount + UTS namespaces)."""
        n = node if isinstance(node, Node) else topo.node(node)
        return topo.nsenter_argv(self.paths, n, list(argv))

    def _require_node_ns(self, n: Node) -> None:
        if not (self._ns_bound(topo.netns_path(n.netns)) and self._ns_bound(self.paths.mnt_ns(n))):
            raise LabError(f"the lab is not up in {self.dir} ({n.name} has no namespaces); "
                           "run `hastpy-lab up` first", os.EX_UNAVAILABLE)

    def run(self, node: str | Node, argv: list[str] | tuple[str, ...], *, check: bool = True,
            timeout: float | None = None, input: str | bytes | None = None, capture: bool = True,
            text: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``node`` and wait. Starts in the node's "/". With ``check``, a non-zero
        exit raises :class:`LabCommandError` (a CalledProcessError); ``timeout`` raises
        subprocess.TimeoutExpired."""
        n = node if isinstance(node, Node) else topo.node(node)
        self._require_node_ns(n)
        full = topo.nsenter_argv(self.paths, n, list(argv))
        cp = subprocess.run(full, input=input, capture_output=capture, text=text, timeout=timeout,
                            env=self._env(env))
        if check and cp.returncode != 0:
            raise LabCommandError(cp.returncode, list(argv), cp.stdout, cp.stderr)
        return cp

    def spawn(self, node: str | Node, argv: list[str] | tuple[str, ...], *,
              log: str | os.PathLike | IO | None = None, env: dict[str, str] | None = None,
              ) -> subprocess.Popen:  # fmt: skip
        """Start ``argv`` in the background inside ``node`` (its own session, stdin /dev/null,
        stdout+stderr appended to ``log`` or discarded). Returns once the process is inside the
        node; the Popen's pid is the process itself (nsenter execs it). `kill NODE` and `down`
        stop it."""
        n = node if isinstance(node, Node) else topo.node(node)
        self._require_node_ns(n)
        full = topo.nsenter_argv(self.paths, n, list(argv))
        proc = self._popen(full, log, env)
        self._wait_entered(proc, n)
        return proc

    def _wait_entered(self, proc: subprocess.Popen, n: Node, timeout: float = 5.0) -> None:
        """Return once ``proc`` is inside the node's namespaces (or has exited), so that what the
        caller does next (status, kill, down) sees it there."""
        want = self._node_inodes(n)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if (_ns_ino(f"/proc/{proc.pid}/ns/net"), _ns_ino(f"/proc/{proc.pid}/ns/mnt")) == (
                want["net"], want["mnt"]):
                return
            time.sleep(0.002)

    def _popen(self, argv: list[str], log, env=None) -> subprocess.Popen:
        if log is None:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True, env=self._env(env))
        if hasattr(log, "fileno"):
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=self._env(env))
        with open(log, "ab") as fh:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=self._env(env))

    def controller(self, argv: list[str] | tuple[str, ...], *, check: bool = True,
                   timeout: float | None = None, input: str | bytes | None = None, capture: bool = True,
                   text: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in the switch namespace hast-sw (controller address 10.99.0.254): the place
        for ssh, ansible-playbook, pytest --hosts, ping."""
        if not self._ns_bound(topo.netns_path(topo.SWITCH_NS)):
            raise LabError(f"the lab is not up ({topo.SWITCH_NS} does not exist); run `hastpy-lab up` first",
                           os.EX_UNAVAILABLE)
        full = topo.controller_argv(list(argv))
        cp = subprocess.run(full, input=input, capture_output=capture, text=text, timeout=timeout,
                            env=self._env(env))
        if check and cp.returncode != 0:
            raise LabCommandError(cp.returncode, list(argv), cp.stdout, cp.stderr)
        return cp

    def ssh(self, node: str | Node, argv: list[str] | tuple[str, ...], **kwargs) -> subprocess.CompletedProcess:
        """``ssh -F <labdir>/ssh_config NODE argv...`` from the controller (NODE may be "vip")."""
        name = node.name if isinstance(node, Node) else (node if node == "vip" else topo.node(node).name)
        return self.controller(["ssh", "-F", str(self.paths.ssh_config), name, "--", *argv], **kwargs)

    # -- queries ---------------------------------------------------------------------------------

    @staticmethod
    def _nsfs_dev() -> int:
        return os.stat("/proc/self/ns/net").st_dev

    def _ns_bound(self, path: str | os.PathLike) -> bool:
        """True if ``path`` is an nsfs bind (a namespace kept alive by a file)."""
        try:
            return os.stat(path).st_dev == self._nsfs_dev()
        except OSError:
            return False

    def _ns_inode(self, path: str | os.PathLike) -> int | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_ino if st.st_dev == self._nsfs_dev() else None

    def namespaces(self) -> dict[str, bool]:
        return {name: os.path.lexists(topo.netns_path(name)) for name in topo.NAMESPACES}

    def is_up(self) -> bool:
        return all(self._ns_bound(topo.netns_path(name)) for name in topo.NAMESPACES) and all(
            self._ns_bound(self.paths.mnt_ns(n)) and self._ns_bound(self.paths.uts_ns(n)) for n in NODES
        )

    @staticmethod
    def host_mounts() -> list[Mount]:
        return parse_mountinfo(Path("/proc/self/mountinfo").read_text())

    @classmethod
    def is_mountpoint(cls, path: str | os.PathLike) -> bool:
        """From mountinfo: os.path.ismount misses a bind mount of a directory onto itself."""
        return os.path.realpath(path) in {m.mountpoint for m in cls.host_mounts()}

    @classmethod
    def owner_dirs(cls) -> list[Path]:
        """Lab dirs whose node-a mount namespace is bound on this host (normally none or one)."""
        out = []
        for m in cls.host_mounts():
            if m.fstype == "nsfs" and m.mountpoint.endswith(f"/ns/mnt-{NODES[0].letter}"):
                root = Path(m.mountpoint).parent.parent
                if root not in out:
                    out.append(root)
        return out

    def mounts_under_labdir(self) -> list[Mount]:
        return [m for m in self.host_mounts() if topo.under(m.mountpoint, self.dir)]

    def _node_inodes(self, n: Node) -> dict[str, int | None]:
        return {
            "net": self._ns_inode(topo.netns_path(n.netns)),
            "mnt": self._ns_inode(self.paths.mnt_ns(n)),
            "uts": self._ns_inode(self.paths.uts_ns(n)),
        }

    def _lab_inodes(self) -> set[tuple[str, int]]:
        out: set[tuple[str, int]] = set()
        for n in NODES:
            for kind, ino in self._node_inodes(n).items():
                if ino is not None:
                    out.add((kind, ino))
        sw = self._ns_inode(topo.netns_path(topo.SWITCH_NS))
        if sw is not None:
            out.add(("net", sw))
        return out

    def _is_lab_proc(self, p: Proc, inodes: set[tuple[str, int]], skip: set[int]) -> bool:
        if p.pid in skip:
            return False
        if ("net", p.net) in inodes or ("mnt", p.mnt) in inodes or ("uts", p.uts) in inodes:
            return True
        return any(x is not None and x.startswith("/") and topo.under(x, self.dir) for x in (p.cwd, p.root))

    def processes(self, node: str | Node | None = None) -> list[Proc]:
        """Processes in ``node``'s namespaces (net, mount or UTS); with no node, every process of
        the lab: both nodes, hast-sw, and anything whose cwd or root is under the lab dir."""
        skip = _ancestors()
        if node is None:
            inodes = self._lab_inodes()
            return [p for p in scan_processes() if self._is_lab_proc(p, inodes, skip)]
        n = node if isinstance(node, Node) else topo.node(node)
        inodes = {(k, v) for k, v in self._node_inodes(n).items() if v is not None}
        if not inodes:
            return []
        return [p for p in scan_processes()
                if p.pid not in skip and (("net", p.net) in inodes or ("mnt", p.mnt) in inodes
                                          or ("uts", p.uts) in inodes)]

    def _node_private_devs(self) -> set[str]:
        """major:minor of every mount that exists only in a node's mount namespace (FUSE mounts,
        filesystems on loop devices...): a loop device backed by a file on one of them is ours."""
        host = {m.majmin for m in self.host_mounts()}
        devs: set[str] = set()
        for n in NODES:
            if not self._ns_bound(self.paths.mnt_ns(n)):
                continue
            cp = self._cmd(topo.nsenter_argv(self.paths, n, ["cat", "/proc/self/mountinfo"], net=False, uts=False),
                           check=False)
            devs |= {m.majmin for m in parse_mountinfo(cp.stdout)} - host
        return devs

    def _labdir_files(self) -> set[tuple[str, int]]:
        """(major:minor, inode) of every regular file under the lab dir, to recognise loop devices
        whose backing file was opened through another path (e.g. /run/... inside a node)."""
        out: set[tuple[str, int]] = set()
        if not self.dir.is_dir():
            return out
        mounted = {m.mountpoint for m in self.host_mounts()}
        for dirpath, dirnames, filenames in os.walk(self.dir):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in mounted]
            for f in filenames:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(dirpath, f))
                    if (st.st_mode & 0o170000) == 0o100000:
                        out.add((f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", st.st_ino))
        return out

    def loops(self, private_devs: set[str] | None = None) -> list[dict]:
        """Loop devices whose backing file belongs to the lab."""
        if shutil.which("losetup", path=tool_path()) is None:
            return []
        cp = self._cmd(["losetup", "-l", "-J", "-O", "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN"], check=False)
        if cp.returncode != 0:
            return []
        files = self._labdir_files()
        devs = private_devs or set()
        return [
            lo for lo in parse_losetup(cp.stdout)
            if (lo["file"].startswith("/") and topo.under(lo["file"], self.dir))
            or lo["majmin"] in devs
            or (lo["majmin"], lo["ino"]) in files
        ]

    def residue(self) -> list[str]:
        """What of the lab exists on this machine now (empty when it is fully down)."""
        items = [f"network namespace {name}" for name, there in self.namespaces().items() if there]
        items += [f"mount {m.mountpoint}" for m in self.mounts_under_labdir()]
        items += [f"loop device {lo['name']} ({lo['file']})" for lo in self.loops()]
        items += [f"process {p.pid} ({p.comm})" for p in self.processes()]
        return items

    def vip_holders(self) -> list[str]:
        """The nodes that have the VIP on eth0 (two after a crash without a link-down)."""
        holders = []
        for n in NODES:
            if any(a["local"] == topo.VIP for a in self._addresses(n.netns)):
                holders.append(n.name)
        return holders

    def _addresses(self, netns: str) -> list[dict]:
        if not self._ns_bound(topo.netns_path(netns)):
            return []
        cp = self._cmd(["ip", "-n", netns, "-j", "addr", "show"], check=False)
        if cp.returncode != 0 or not cp.stdout.strip():
            return []
        out = []
        for link in json.loads(cp.stdout):
            for a in link.get("addr_info", []):
                if a.get("family") == "inet":
                    out.append({"dev": link.get("ifname"), "local": a.get("local"),
                                "cidr": f"{a.get('local')}/{a.get('prefixlen')}"})
        return out

    # -- state and locking -----------------------------------------------------------------------

    def _load_state(self) -> dict:
        try:
            return json.loads(self.paths.state.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: dict) -> None:
        tmp = self.paths.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.paths.state)

    @contextlib.contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + _LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        raise LabError(f"another hastpy-lab holds {self.paths.lock}") from exc
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _require_root() -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (namespaces, mounts, sshd)", os.EX_NOPERM)

    # -- up ----------------------------------------------------------------------------------------

    def up(self, size: int = topo.DEFAULT_DISK_SIZE) -> dict:
        """Build the lab. Raises LabError(64) if it is already up, LabError(69) if a tool is
        missing; if a step fails, tears down what was built and re-raises. Returns a summary."""
        self._require_root()
        if size <= 0 or size % 512:
            raise LabError(f"disk size must be a positive multiple of 512 bytes, not {size}", os.EX_USAGE)
        missing = missing_tools()
        if missing:
            pkgs = sorted({topo.REQUIRED_TOOLS[t] for t in missing})
            raise LabError(f"missing tools: {', '.join(missing)} (Debian packages: {' '.join(pkgs)}; "
                           "`make deps` installs them)", os.EX_UNAVAILABLE)
        t0 = time.monotonic()
        with self._locked():
            there = [f"network namespace {name}" for name, ok in self.namespaces().items() if ok]
            there += [f"mount {m.mountpoint}" for m in self.mounts_under_labdir()]
            if there:
                owner = (self.owner_dirs() or [self.dir])[0]
                raise LabError(f"the lab is already up in {owner} (found {', '.join(there[:3])}"
                               f"{', ...' if len(there) > 3 else ''}); run `hastpy-lab down"
                               f" --dir {owner}` first", os.EX_USAGE)
            if self._load_state().get("created"):
                self._down_locked()  # a stale state from an earlier lab: undo its placeholders
            try:
                self._up_locked(size)
            except BaseException as exc:
                try:
                    self._down_locked()
                except Exception as cleanup:
                    if isinstance(exc, Exception):
                        code = getattr(exc, "exit_code", os.EX_OSERR)
                        raise LabError(f"{exc}; the cleanup after it failed too: {cleanup}", code) from exc
                raise
        return {"dir": str(self.dir), "seconds": round(time.monotonic() - t0, 3), "size": size,
                "nodes": {n.name: n.ip for n in NODES}, "controller": topo.CONTROLLER_IP,
                "ssh_config": str(self.paths.ssh_config), "inventory": str(self.paths.inventory)}

    def _up_locked(self, size: int) -> None:
        p = self.paths
        state = {"version": 1, "phase": "starting", "size": size, "created": {}, "cut": {}}
        self._save_state(state)

        def created(what: str) -> None:
            state["created"][what] = True
            self._save_state(state)

        self._ensure_keys()
        for n in NODES:
            nd = p.node_dir(n)
            nd.mkdir(parents=True, exist_ok=True)
            if p.run_dir(n).exists():
                shutil.rmtree(p.run_dir(n))
            (p.run_dir(n) / "sshd").mkdir(parents=True, mode=0o755)
            (p.run_dir(n) / "lock").mkdir(mode=0o755)
            p.hast_conf(n).write_text("")
            with open(p.disk(n), "wb") as fh:
                fh.truncate(size)
            p.sshd_config(n).write_text(topo.render_sshd_config(p, n))
            p.sshd_log(n).write_text("")

        # Host mount points, created only if absent (and then removed by down).
        if not os.path.lexists(topo.ETC_HAST_CONF):
            created("etc_hast_conf")
            with open(topo.ETC_HAST_CONF, "x"):
                pass
            os.chmod(topo.ETC_HAST_CONF, 0o644)
        if not os.path.lexists(topo.DEV_HAST):
            created("dev_hast")
            os.mkdir(topo.DEV_HAST, 0o755)
        if not self.is_mountpoint(topo.RUN_NETNS):
            if not os.path.lexists(topo.RUN_NETNS):
                created("run_netns_dir")
            created("run_netns_mount")

        p.ns_dir.mkdir(exist_ok=True)
        for n in NODES:
            p.mnt_ns(n).touch()
            p.uts_ns(n).touch()
        for argv in topo.up_commands(p):
            self._cmd(argv)

        self._write_client_files()
        sshd = shutil.which("sshd", path=tool_path())
        started = {n.name: self._popen(topo.sshd_argv(p, n, sshd), p.sshd_log(n)) for n in NODES}
        for n in NODES:
            self._wait_sshd(n, started[n.name])
        state["phase"] = "up"
        self._save_state(state)

    def _ensure_keys(self) -> None:
        p = self.paths
        p.ssh_dir.mkdir(mode=0o700, exist_ok=True)
        for stale in p.ssh_dir.glob("cm-*"):  # multiplexing sockets of a killed ssh master
            stale.unlink(missing_ok=True)
        keys = [(p.client_key, "hastpy-lab-controller")] + [(p.host_key(n), f"root@{n.name}") for n in NODES]
        for key, comment in keys:
            if not (key.exists() and key.with_name(key.name + ".pub").exists()):
                for f in (key, key.with_name(key.name + ".pub")):
                    f.unlink(missing_ok=True)
                self._cmd(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])
        pub = p.client_key.with_name(p.client_key.name + ".pub").read_text()
        p.authorized_keys.write_text(pub)
        p.authorized_keys.chmod(0o600)

    def _write_client_files(self) -> None:
        p = self.paths
        host_keys = {n.name: p.host_key(n).with_name(p.host_key(n).name + ".pub").read_text() for n in NODES}
        p.known_hosts.write_text(topo.render_known_hosts(host_keys))
        p.ssh_config.write_text(topo.render_ssh_config(p))
        p.ssh_config.chmod(0o644)
        p.inventory.write_text(topo.render_inventory(p))

    def _wait_sshd(self, n: Node, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        """sshd writes its pid file once it listens; fail at once if it exits instead."""
        pidfile = self.paths.sshd_pidfile(n)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                if int(pidfile.read_text().strip()) == proc.pid:
                    return
            time.sleep(0.02)
        log = self.paths.sshd_log(n).read_text(errors="replace").strip().splitlines()
        what = f"exited with status {proc.returncode}" if proc.poll() is not None else \
            f"did not start within {timeout:g} s"
        tail = "; ".join(ln.strip() for ln in log[-2:])
        raise LabError(f"sshd in {n.name} {what}{': ' + tail if tail else ''} (log: {self.paths.sshd_log(n)})")

    # -- down --------------------------------------------------------------------------------------

    def down(self, *, purge: bool = False, grace: float = 2.0) -> list[str]:
        """Tear everything down; safe to repeat and after a partial up. Returns warnings (things
        deliberately left alone). Raises LabError(71) listing anything that could not be removed.
        With ``purge``, also delete the lab dir (keys, disks, logs)."""
        self._require_root()
        warnings: list[str] = []
        for other in self.owner_dirs():
            if other != self.dir:
                # The namespace names are global: a lab up elsewhere is what this down would break.
                warnings += Lab(other).down(grace=grace)
                warnings.append(f"the lab was up in {other}; took it down there")
        if not self.dir.exists():
            if any(self.namespaces().values()):
                with self._locked():
                    warnings += self._down_locked(grace)
                shutil.rmtree(self.dir, ignore_errors=True)
            return warnings
        with self._locked():
            warnings += self._down_locked(grace)
        if purge:
            if self.mounts_under_labdir():
                raise LabError(f"not purging {self.dir}: something is still mounted under it")
            shutil.rmtree(self.dir)
        return warnings

    def _down_locked(self, grace: float = 2.0) -> list[str]:
        state = self._load_state()
        created = dict(state.get("created", {}))
        warnings: list[str] = []
        private_devs = self._node_private_devs()
        # Loops backed by a FUSE file in a node must be found now: once nbdfuse is killed below,
        # the kernel no longer reports their backing device and they look like anyone's.
        loops_before = self.loops(private_devs)
        inodes = self._lab_inodes()  # kept: valid while any process still holds a namespace
        skip = _ancestors()

        def select() -> list[Proc]:
            return [p for p in scan_processes() if self._is_lab_proc(p, inodes, skip)]

        procs = select()
        for proc in procs:
            _signal(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while procs and time.monotonic() < deadline:
            time.sleep(0.02)
            procs = [p for p in procs if _alive(p.pid)]
        kill_hard(select)

        for argv in topo.down_commands(self.paths):
            if argv[0] == "umount" and not self.is_mountpoint(argv[-1]):
                continue
            if argv[:3] == ["ip", "netns", "delete"] and not os.path.lexists(topo.netns_path(argv[3])):
                continue
            self._cmd(argv, check=False)
        for m in sorted(self.mounts_under_labdir(), key=lambda m: m.mount_id, reverse=True):
            if self._cmd(["umount", m.mountpoint], check=False).returncode != 0:
                self._cmd(["umount", "-l", m.mountpoint], check=False)

        loops = {lo["name"]: lo for lo in loops_before + self.loops(private_devs)}
        # Loops recorded by `kill` that are still bound to a file whose FUSE server died.
        for name in state.get("crashed_loops", []):
            if _dead_backing(name):
                loops.setdefault(name, {"name": name, "file": "", "ino": None, "majmin": ""})
        loops = list(loops.values())
        for lo in loops:
            self._cmd(["losetup", "-d", lo["name"]], check=False)
        deadline = time.monotonic() + 5.0
        while loops and time.monotonic() < deadline:
            names = {lo["name"] for lo in loops}
            loops = [lo for lo in self.loops(private_devs) if lo["name"] in names]
            if loops:
                time.sleep(0.05)

        if created.get("run_netns_mount") and self.is_mountpoint(topo.RUN_NETNS):
            if os.listdir(topo.RUN_NETNS):
                warnings.append(f"left {topo.RUN_NETNS} mounted: other network namespaces use it")
            else:
                self._cmd(["umount", topo.RUN_NETNS], check=False)
        if not self.is_mountpoint(topo.RUN_NETNS):
            created.pop("run_netns_mount", None)
        if created.get("run_netns_dir") and not self.is_mountpoint(topo.RUN_NETNS):
            with contextlib.suppress(FileNotFoundError):
                try:
                    os.rmdir(topo.RUN_NETNS)
                except OSError:
                    warnings.append(f"left {topo.RUN_NETNS}: not empty")
        if not os.path.lexists(topo.RUN_NETNS):
            created.pop("run_netns_dir", None)

        if created.get("etc_hast_conf"):
            path = topo.ETC_HAST_CONF
            if os.path.isfile(path) and not self.is_mountpoint(path) and os.path.getsize(path) == 0:
                os.unlink(path)
            elif os.path.lexists(path):
                warnings.append(f"left {path}: it is no longer the empty placeholder the lab made")
            created.pop("etc_hast_conf")
        if created.get("dev_hast"):
            path = topo.DEV_HAST
            if os.path.isdir(path) and not self.is_mountpoint(path):
                try:
                    os.rmdir(path)
                except OSError:
                    warnings.append(f"left {path}: not empty")
            created.pop("dev_hast")

        if self.dir.exists():
            self._save_state({"version": 1, "phase": "down", "created": created, "cut": {}})

        residue = [f"network namespace {name}" for name, ok in self.namespaces().items() if ok]
        residue += [f"mount {m.mountpoint}" for m in self.mounts_under_labdir()]
        residue += [f"loop device {lo['name']} ({lo['file']})" for lo in loops]
        residue += [f"process {p.pid} ({p.comm})" for p in select()]
        if residue:
            raise LabError(f"down left {len(residue)} thing(s) behind: {', '.join(residue[:5])}"
                           f"{', ...' if len(residue) > 5 else ''}")
        return warnings

    # -- failures ------------------------------------------------------------------------------------

    def kill(self, node: str | Node) -> list[Proc]:
        """Crash ``node``: SIGKILL every process in its namespaces except sshd (children first,
        all frozen beforehand). Mounts, namespaces and sshd stay. Returns what was killed."""
        self._require_root()
        n = node if isinstance(node, Node) else topo.node(node)
        self._require_node_ns(n)
        inodes = {(k, v) for k, v in self._node_inodes(n).items() if v is not None}
        skip = _ancestors()
        victims: dict[int, Proc] = {}

        def select() -> list[Proc]:
            found = [p for p in scan_processes()
                     if p.pid not in skip and p.comm != "sshd"
                     and (("net", p.net) in inodes or ("mnt", p.mnt) in inodes or ("uts", p.uts) in inodes)]
            victims.update({p.pid: p for p in found})
            return found

        # Loops over a FUSE file in the node must be recorded before nbdfuse dies: afterwards the
        # kernel no longer reports their backing device, and `down` could not tell they are ours.
        loops = [lo["name"] for lo in self.loops(self._node_private_devs())]
        if loops:
            state = self._load_state()
            state["crashed_loops"] = sorted(set(state.get("crashed_loops", [])) | set(loops))
            self._save_state(state)
        kill_hard(select)
        return sorted(victims.values(), key=lambda p: p.pid)

    def cut(self, node: str | Node, mode: str = "down") -> None:
        """Cut ``node`` off the switch: ``down`` pulls the cable (carrier loss on its eth0),
        ``drop`` silently drops its IP traffic on eth0 with iptables inside the node."""
        self._require_root()
        n = node if isinstance(node, Node) else topo.node(node)
        cmds = topo.cut_commands(n, mode)
        self._require_node_ns(n)
        if mode == "drop" and missing_tools(["iptables"]):
            raise LabError("missing tools: iptables (Debian package iptables)", os.EX_UNAVAILABLE)
        with self._locked():
            state = self._load_state()
            cuts = state.setdefault("cut", {})
            if mode in cuts.get(n.name, []):
                return
            for argv in cmds:
                self._cmd(argv)
            cuts.setdefault(n.name, []).append(mode)
            self._save_state(state)

    def heal(self, node: str | Node) -> None:
        """Undo every cut of ``node`` (link up; the drop rules removed)."""
        self._require_root()
        n = node if isinstance(node, Node) else topo.node(node)
        self._require_node_ns(n)
        with self._locked():
            state = self._load_state()
            modes = state.setdefault("cut", {}).pop(n.name, [])
            for argv in topo.heal_commands(n, "down"):
                self._cmd(argv)
            if "drop" in modes or (not modes and not missing_tools(["iptables"])):
                for argv in topo.heal_commands(n, "drop"):
                    self._cmd(argv, check="drop" in modes)
            self._save_state(state)

    def cuts(self) -> dict[str, list[str]]:
        return dict(self._load_state().get("cut", {}))

    # -- status ------------------------------------------------------------------------------------

    def _node_view(self, n: Node) -> dict:
        """hostname, node-private mounts and /dev/hast entries, seen from inside the node."""
        script = (
            f"hostname; echo '{_NODE_INFO_SEP}'; cat /proc/self/mountinfo; echo '{_NODE_INFO_SEP}'; "
            f"for f in {topo.DEV_HAST}/* {topo.DEV_HAST}/.[!.]*; do "
            '[ -e "$f" ] || [ -L "$f" ] || continue; '
            'printf "%s\\t%s\\n" "${f##*/}" "$(readlink "$f")"; done'
        )
        cp = self._cmd(topo.nsenter_argv(self.paths, n, ["sh", "-c", script], net=False), check=False)
        parts = cp.stdout.split(_NODE_INFO_SEP + "\n")
        if cp.returncode != 0 or len(parts) != 3:
            return {"hostname": None, "mounts": [], "dev_hast": {}}
        host = {(m.mountpoint, m.majmin, m.root) for m in self.host_mounts()}
        lab_own = {"/run", topo.ETC_HAST_CONF, topo.DEV_HAST, "/sys"}
        mounts = [
            {"source": m.source, "target": m.mountpoint, "fstype": m.fstype}
            for m in parse_mountinfo(parts[1])
            if (m.mountpoint, m.majmin, m.root) not in host and m.mountpoint not in lab_own
        ]
        dev_hast = {}
        for line in parts[2].splitlines():
            name, _, target = line.partition("\t")
            dev_hast[name] = target or None
        return {"hostname": parts[0].strip(), "mounts": mounts, "dev_hast": dev_hast}

    def _link_state(self, n: Node) -> str | None:
        cp = self._cmd(["ip", "-n", topo.SWITCH_NS, "-j", "link", "show", n.veth], check=False)
        if cp.returncode != 0 or not cp.stdout.strip():
            return None
        return "up" if "UP" in json.loads(cp.stdout)[0].get("flags", []) else "down"

    def status(self) -> dict:
        """Everything worth knowing about the lab, as plain data (the --json output)."""
        self._require_root()
        ns = self.namespaces()
        up = self.is_up()
        out: dict = {"dir": str(self.dir), "up": up, "namespaces": ns,
                     "controller": {"namespace": topo.SWITCH_NS, "addresses": []},
                     "vip": {"address": topo.VIP, "holders": []}, "nodes": {}}
        if ns[topo.SWITCH_NS]:
            out["controller"]["addresses"] = [a["cidr"] for a in self._addresses(topo.SWITCH_NS)
                                              if a["dev"] != "lo"]
        cuts = self.cuts()
        for n in NODES:
            info: dict = {"ip": n.ip, "netns": ns[n.netns], "hostname": None, "addresses": [],
                          "link": None, "cut": cuts.get(n.name, []), "vip": False, "processes": [],
                          "dev_hast": {}, "mounts": []}
            if ns[n.netns]:
                addrs = self._addresses(n.netns)
                info["addresses"] = [a["cidr"] for a in addrs if a["dev"] != "lo"]
                info["vip"] = any(a["local"] == topo.VIP for a in addrs)
                info["link"] = self._link_state(n)
            if self._ns_bound(self.paths.mnt_ns(n)):
                info.update(self._node_view(n))
            info["processes"] = [{"pid": p.pid, "comm": p.comm, "args": p.args()}
                                 for p in self.processes(n)]
            if info["vip"]:
                out["vip"]["holders"].append(n.name)
            out["nodes"][n.name] = info
        return out
