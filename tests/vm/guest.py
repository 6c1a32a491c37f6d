"""Build, cache and boot the small Linux guest the VM test runs in (qemu, TCG only).

The guest is Debian bookworm: its stock kernel (which has the nbd module; this machine's kernel
has no modules at all) and a debootstrap minbase root with python3, booted as an initramfs. The
initrd handed to qemu is three concatenated cpio archives, which Linux unpacks in order:

    base     debootstrap root + the kernel modules we need     rebuilt when the kernel package
                                                               or the package list changes (~60 s)
    project  hastpy and its Python dependencies, hastd and     rebuilt when hastpy changes (~1 s)
             hastctl entry points, /init
    boot     the test script of this boot and its arguments    written at every boot

/init (see INIT below) mounts the pseudo file systems, runs the test script with its output on
the serial console, prints the exit code between markers and powers the guest off. `boot()`
reads the console from qemu's stdout, with a timeout.

Cache: $HASTPY_VM_CACHE, default /var/cache/hastpy-vm. Building needs root (debootstrap,
chroot); booting a cached guest does not.

Run alone: `python tests/vm/guest.py build` or `python tests/vm/guest.py boot SCRIPT [ARGS...]`.
"""

from __future__ import annotations

import compileall
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import py_compile
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

# Bump when the way a layer is built changes, so cached layers from older code are not reused.
RECIPE_VERSION = 1

SUITE = "bookworm"  # its python3 is 3.11, the same minor version as the host venv
GUEST_PYTHON = "python3.11"
PACKAGES = ("python3", "kmod", "e2fsprogs", "util-linux", "procps", "iproute2")
KERNEL_META_PACKAGE = "linux-image-amd64"
# Modules the test loads, with their dependencies added at build time. ext4 and crc32c are
# modules in Debian's kernel; ext4 wants crc32c (a soft dependency) for metadata checksums.
MODULES = ("nbd", "ext4", "crc32c_generic")
# Left out of the base root: apt's caches and lists, documentation and translations.
PRUNE = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale")
DEFAULT_CACHE = "/var/cache/hastpy-vm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SITE_DIR = f"usr/local/lib/{GUEST_PYTHON}/dist-packages"
# Files pip writes about this installation (not needed, and they differ between checkouts).
INSTALLER_FILES = ("RECORD", "INSTALLER", "direct_url.json", "REQUESTED")

BEGIN_MARK = "HASTPY-VM-BEGIN"
EXIT_MARK = "HASTPY-VM-EXIT"
RESULT_BEGIN = "HASTPY-VM-RESULT-BEGIN"
RESULT_END = "HASTPY-VM-RESULT-END"

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# PID 1 of the guest. Its output and the test's go to /dev/console, the first serial port.
INIT = f"""#!/bin/sh
# hastpy VM guest: mount what a system needs, run /hastpy-vm/run, report, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname "$(cat /etc/hostname)"
ip link set lo up
echo "{BEGIN_MARK} kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
/hastpy-vm/run
echo "{EXIT_MARK} rc=$? uptime=$(cut -d' ' -f1 /proc/uptime)"
exec /usr/local/sbin/hastpy-vm-poweroff
"""

# Waits until the serial port has sent everything, then powers off at once (no init system in the
# guest, and no sync: a dead nbd device must not keep the guest from stopping).
POWEROFF = """#!/usr/bin/python3
import ctypes, os, termios, time
try:
    fd = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY)
    termios.tcdrain(fd)
except OSError:
    time.sleep(1)
RB_POWER_OFF = 0x4321FEDC
ctypes.CDLL(None, use_errno=True).reboot(RB_POWER_OFF)
with open("/proc/sysrq-trigger", "w") as f:
    f.write("o")
time.sleep(60)
"""

ENTRY_POINT = """#!/usr/bin/python3
import sys
from {module} import main
sys.exit(main())
"""


class GuestError(RuntimeError):
    """Building or booting the guest failed; the message says which step and why."""


@dataclasses.dataclass
class BootResult:
    """What one boot printed. `results` is the JSON the script printed between the result marks."""

    console: list[str]
    exit_code: int | None  # the script's exit code, None if the guest never reported one
    results: dict | None
    timed_out: bool
    qemu_rc: int | None
    seconds: float

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.console[-n:])


@dataclasses.dataclass
class Layers:
    kernel: Path  # vmlinuz
    kernel_release: str  # uname -r of the guest
    base: Path
    project: Path
    timings: dict[str, float]


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise GuestError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(out))
    return proc


def _digest(items: Iterable[bytes | str]) -> str:
    h = hashlib.sha256()
    for item in items:
        b = item.encode() if isinstance(item, str) else item
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()[:16]


# ---- cpio (newc), the format the kernel unpacks ---------------------------------------------------


class CpioWriter:
    """Writes a newc archive. Hard links become separate files; owners can be forced to root."""

    def __init__(self, out: io.BufferedIOBase, force_root: bool = False):
        self.out = out
        self.force_root = force_root
        self.ino = 0
        self.size = 0

    def _write(self, b: bytes) -> None:
        self.out.write(b)
        self.size += len(b)

    def _pad(self) -> None:
        self._write(b"\0" * (-self.size % 4))

    def entry(self, name: str, mode: int, data: bytes = b"", uid: int = 0, gid: int = 0, mtime: int = 0,
              rdev: int = 0) -> None:  # fmt: skip
        self.ino += 1
        if self.force_root:
            uid = gid = 0
        # inode, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
        # namesize (with the NUL), check
        fields = (self.ino, mode, uid, gid, 1, mtime, len(data), 0, 0, os.major(rdev), os.minor(rdev),
                  len(name.encode()) + 1, 0)  # fmt: skip
        self._write(b"070701" + "".join(f"{v:08X}" for v in fields).encode() + name.encode() + b"\0")
        self._pad()
        self._write(data)
        self._pad()

    def add_tree(self, root: Path, prefix: str = "") -> None:
        """Every file below root, parents first, as `prefix/relative path` in the archive."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(dirpath, name)
                arcname = os.path.normpath(os.path.join(prefix, rel_dir, name)).lstrip("/")
                self.add_path(path, arcname)

    def add_path(self, path: str, arcname: str) -> None:
        st = os.lstat(path)
        data = b""
        if stat.S_ISLNK(st.st_mode):
            data = os.readlink(path).encode()
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                data = f.read()
        self.entry(arcname, st.st_mode, data, st.st_uid, st.st_gid, int(st.st_mtime), st.st_rdev)

    def add_dir(self, arcname: str, mode: int = 0o755) -> None:
        self.entry(arcname, stat.S_IFDIR | mode, mtime=int(time.time()))

    def add_file(self, arcname: str, data: bytes | str, mode: int = 0o644) -> None:
        data = data.encode() if isinstance(data, str) else data
        self.entry(arcname, stat.S_IFREG | mode, data, mtime=int(time.time()))

    def close(self) -> None:
        self.entry("TRAILER!!!", 0)
        self._write(b"\0" * (-self.size % 512))


# ---- the guest ---------------------------------------------------------------------------------


class Guest:
    """build() makes (or finds in the cache) the three layers; boot(script) runs one script."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, project_root: Path = PROJECT_ROOT,
                 log: Callable[[str], None] | None = None):  # fmt: skip
        self.cache = Path(cache_dir or os.environ.get("HASTPY_VM_CACHE") or DEFAULT_CACHE)
        self.project_root = Path(project_root)
        self.log = log or (lambda msg: print(f"[vm] {msg}", file=sys.stderr, flush=True))
        self.layers: Layers | None = None

    # -- what is needed -----------------------------------------------------------------------

    @staticmethod
    def qemu_binary() -> str | None:
        return shutil.which("qemu-system-x86_64")

    @staticmethod
    def missing_build_tools() -> list[str]:
        tools = ("debootstrap", "apt-get", "apt-cache", "dpkg-deb", "chroot")
        return [t for t in tools if not shutil.which(t)]

    def cached(self) -> bool:
        """True when boot() can run without building anything (no root needed)."""
        try:
            self._kernel_key()
        except GuestError:
            return False
        return self._base_path().exists() and self._project_path().exists() and self._kernel_dir().exists()

    # -- keys ---------------------------------------------------------------------------------

    def _kernel_package(self) -> tuple[str, str]:
        """(package, version) of the kernel image linux-image-amd64 depends on, from apt's lists.

        Without usable lists: as root, `apt-get update` once; otherwise the kernel already cached."""
        if hasattr(self, "_kpkg"):
            return self._kpkg
        try:
            self._kpkg = self._apt_kernel_package()
        except GuestError as exc:
            if os.geteuid() == 0 and shutil.which("apt-get"):
                self.log(f"{exc}; running apt-get update")
                _run(["apt-get", "update", "-q"], "apt-get update")
                self._kpkg = self._apt_kernel_package()
            else:
                cached = sorted(self.cache.glob("kernel-*_*/vmlinuz"))
                if not cached:
                    raise
                pkg, _, ver = cached[-1].parent.name.removeprefix("kernel-").rpartition("_")
                self.log(f"{exc}; using the cached {pkg} {ver}")
                self._kpkg = (pkg, ver)
        return self._kpkg

    @staticmethod
    def _apt_kernel_package() -> tuple[str, str]:
        if not shutil.which("apt-cache"):
            raise GuestError("apt-cache not found: the guest kernel comes from Debian's package lists")
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], "apt-cache depends").stdout
        names = re.findall(r"Depends:\s+(linux-image-\S+)", out)
        if not names:
            raise GuestError(f"apt-cache depends {KERNEL_META_PACKAGE}: no linux-image dependency in:\n{out}")
        policy = _run(["apt-cache", "policy", names[0]], "apt-cache policy").stdout
        m = re.search(r"Candidate:\s+(\S+)", policy)
        if not m or m.group(1) == "(none)":
            raise GuestError(f"apt-cache policy {names[0]}: no candidate version")
        return names[0], m.group(1)

    def _kernel_key(self) -> str:
        pkg, ver = self._kernel_package()
        return f"{pkg}_{ver}"

    def _kernel_dir(self) -> Path:
        return self.cache / f"kernel-{self._kernel_key()}"

    def _base_key(self) -> str:
        parts = [str(RECIPE_VERSION), SUITE, self._kernel_key(), ",".join(PACKAGES), ",".join(MODULES), ",".join(PRUNE)]
        return _digest(parts)

    def _base_path(self) -> Path:
        return self.cache / f"base-{self._base_key()}.cpio.gz"

    def _project_files(self) -> list[tuple[str, Path]]:
        """(path in the guest's dist-packages, file on the host) for hastpy and its dependencies."""
        files: list[tuple[str, Path]] = []
        src = self.project_root / "hastpy"
        for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith((".pyc", ".pyo")):
                    continue
                path = Path(dirpath) / name
                files.append((str(path.relative_to(self.project_root)), path))
        for dist in _requirement_closure("hastpy"):
            for f in dist.files or ():
                parts = Path(f).parts
                if parts[0] == ".." or "__pycache__" in parts or f.suffix == ".pyc" or parts[-1] in INSTALLER_FILES:
                    continue
                files.append((str(f), Path(dist.locate_file(f))))
        return files

    def _project_key(self) -> str:
        items = [str(RECIPE_VERSION), INIT, POWEROFF, ENTRY_POINT]
        for arc, path in self._project_files():
            items += [arc, path.read_bytes()]
        return _digest(items)

    def _project_path(self) -> Path:
        return self.cache / f"project-{self._base_key()}-{self._project_key()}.cpio.gz"

    # -- build --------------------------------------------------------------------------------

    def build(self) -> Layers:
        """Make sure all layers exist (building what is missing or stale) and return them."""
        timings: dict[str, float] = {}
        self.cache.mkdir(parents=True, exist_ok=True)
        with self._lock():
            kdir = self._kernel_dir()
            if not (kdir / "vmlinuz").exists():
                t = time.monotonic()
                self._build_kernel(kdir)
                timings["kernel"] = time.monotonic() - t
            release = (kdir / "release").read_text().strip()
            base = self._base_path()
            if not base.exists():
                t = time.monotonic()
                self._build_base(base, kdir, release)
                timings["base"] = time.monotonic() - t
            project = self._project_path()
            if not project.exists():
                t = time.monotonic()
                self._build_project(project)
                timings["project"] = time.monotonic() - t
            self._prune_cache({kdir.name, base.name, project.name})
        self.layers = Layers(kdir / "vmlinuz", release, base, project, timings)
        return self.layers

    @contextlib.contextmanager
    def _lock(self):
        with open(self.cache / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _require_root(self, what: str) -> None:
        if os.geteuid() != 0:
            raise GuestError(f"building the guest's {what} needs root (debootstrap, chroot); "
                             f"run once as root or point HASTPY_VM_CACHE at a built cache")  # fmt: skip
        missing = self.missing_build_tools()
        if missing:
            raise GuestError(f"building the guest needs {', '.join(missing)} "
                             f"(apt-get install --no-install-recommends debootstrap qemu-system-x86)")  # fmt: skip

    def _build_kernel(self, kdir: Path) -> None:
        """Download the kernel package, keep vmlinuz and the modules in MODULES (with dependencies)."""
        self._require_root("kernel")
        pkg, ver = self._kernel_package()
        self.log(f"kernel: downloading {pkg} {ver}")
        with tempfile.TemporaryDirectory(dir=self.cache, prefix="tmp-kernel-") as tmp:
            os.chmod(tmp, 0o755)  # apt downloads as user _apt when it can
            _run(["apt-get", "download", f"{pkg}={ver}"], "apt-get download", cwd=tmp)
            deb = next(Path(tmp).glob("*.deb"))
            tree = Path(tmp) / "x"
            _run(["dpkg-deb", "-x", str(deb), str(tree)], "dpkg-deb -x")
            vmlinuz = next((tree / "boot").glob("vmlinuz-*"))
            release = vmlinuz.name.removeprefix("vmlinuz-")
            mroot = tree / "lib" / "modules" / release
            wanted = _module_closure(mroot, MODULES)
            staging = Path(tmp) / "kernel"
            mdest = staging / "modules" / release
            for rel in wanted:
                (mdest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(mroot / rel, mdest / rel)
            for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
                if (mroot / name).exists():
                    shutil.copy2(mroot / name, mdest / name)
            shutil.copy2(vmlinuz, staging / "vmlinuz")
            shutil.copy2(tree / "boot" / f"config-{release}", staging / "config")
            (staging / "release").write_text(release + "\n")
            (staging / "modules.list").write_text("".join(f"{m}\n" for m in wanted))
            if kdir.exists():
                shutil.rmtree(kdir)
            staging.rename(kdir)
        self.log(f"kernel: {release}, modules: {', '.join(Path(m).name for m in wanted)}")

    def _mirror(self) -> str:
        if os.environ.get("HASTPY_VM_MIRROR"):
            return os.environ["HASTPY_VM_MIRROR"]
        sources = Path("/etc/apt/sources.list.d/debian.sources")
        if sources.exists():
            for stanza in sources.read_text().split("\n\n"):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if SUITE in fields.get("Suites", "").split() and fields.get("URIs"):
                    return fields["URIs"].split()[0]
        listfile = Path("/etc/apt/sources.list")
        if listfile.exists():
            m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", listfile.read_text(), re.M)
            if m:
                return m.group(1)
        return DEFAULT_MIRROR

    def _build_base(self, out: Path, kdir: Path, release: str) -> None:
        self._require_root("root file system")
        mirror = self._mirror()
        debs = self.cache / "debs"
        debs.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache, prefix="tmp-base-") as tmp:
            root = Path(tmp) / "root"
            self.log(f"base: debootstrap --variant=minbase {SUITE} from {mirror}")
            t = time.monotonic()
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", f"--cache-dir={debs}",
                  SUITE, str(root), mirror], "debootstrap")  # fmt: skip
            self.log(f"base: debootstrap took {time.monotonic() - t:.1f} s")
            for rel in PRUNE:
                p = root / rel
                if p.is_dir():
                    for child in p.iterdir():
                        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            shutil.copytree(kdir / "modules" / release, root / "lib" / "modules" / release)
            _run(["chroot", str(root), "/sbin/depmod", release], "depmod in the guest root")
            (root / "etc" / "hostname").write_text("hastvm\n")
            (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\thastvm\n")
            (root / "var" / "lib" / "hast").mkdir(parents=True, exist_ok=True)
            self._pack(out, lambda w: w.add_tree(root))

    def _build_project(self, out: Path) -> None:
        """hastpy (source, compiled to .pyc) and its dependencies from this venv, entry points, /init."""
        if sys.version_info[:2] != (3, 11):
            self.log(f"project: host Python is {sys.version.split()[0]}, the guest's 3.11 compiles its own .pyc")
        with tempfile.TemporaryDirectory(dir=self.cache, prefix="tmp-project-") as tmp:
            site = Path(tmp) / SITE_DIR
            for arc, path in self._project_files():
                dest = site / arc
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
            if sys.version_info[:2] == (3, 11):
                # Unchecked hash-based .pyc: the guest's Python (12x slower) never recompiles them.
                mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
                ok = compileall.compile_dir(str(site), ddir="/" + SITE_DIR, quiet=1, invalidation_mode=mode)
                if not ok:
                    raise GuestError("compileall of the guest's hastpy failed")
            self.log(f"project: {len(self._project_files())} files")

            def fill(w: CpioWriter) -> None:
                w.add_dir("usr/local/sbin")
                for path in sorted(Path(tmp).rglob("*")):
                    rel = str(path.relative_to(tmp))
                    if path.is_dir():
                        w.add_dir(rel)
                    elif path.is_file():
                        w.add_file(rel, path.read_bytes(), 0o755 if path.suffix == ".so" else 0o644)
                w.add_file("usr/local/sbin/hastd", ENTRY_POINT.format(module="hastpy.cli.hastd"), 0o755)
                w.add_file("usr/local/sbin/hastctl", ENTRY_POINT.format(module="hastpy.cli.hastctl"), 0o755)
                w.add_file("usr/local/sbin/hastpy-vm-poweroff", POWEROFF, 0o755)
                w.add_file("init", INIT, 0o755)

            self._pack(out, fill, force_root=True)

    def _pack(self, out: Path, fill: Callable[[CpioWriter], None], force_root: bool = False) -> None:
        """A gzip cpio written next to `out`, renamed into place when complete."""
        t = time.monotonic()
        part = out.with_name(out.name + ".part")
        with open(part, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
            w = CpioWriter(gz, force_root=force_root)
            fill(w)
            w.close()
        part.rename(out)
        self.log(f"packed {out.name}: {out.stat().st_size / 2**20:.1f} MiB in {time.monotonic() - t:.1f} s")

    def _prune_cache(self, keep: set[str]) -> None:
        """Remove layers of older keys (other kernels, other base or project contents)."""
        for p in self.cache.iterdir():
            if p.name in keep or not p.name.startswith(("kernel-", "base-", "project-", "tmp-")):
                continue
            self.log(f"cache: removing stale {p.name}")
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    # -- boot ---------------------------------------------------------------------------------

    def boot(self, script: str | os.PathLike, args: Iterable[str] = (), timeout: float = 240,
             memory_mb: int = 2048, cpus: int = 2, append: str = "", echo: Callable[[str], None] | None = None,
             console_log: str | os.PathLike | None = None) -> BootResult:  # fmt: skip
        """Boot the guest, run `script ARGS` in it as root, power off. Never raises on guest failure."""
        layers = self.layers or self.build()
        qemu = self.qemu_binary()
        if not qemu:
            raise GuestError("qemu-system-x86_64 not found (apt-get install --no-install-recommends qemu-system-x86)")
        script = Path(script)
        run = "#!/bin/sh\nexec /hastpy-vm/" + shlex.quote(script.name) + "".join(" " + shlex.quote(a) for a in args) + "\n"
        with tempfile.TemporaryDirectory(prefix="hastpy-vm-boot-") as tmp:
            initrd = Path(tmp) / "initrd"
            with open(initrd, "wb") as out:
                for layer in (layers.base, layers.project):
                    with open(layer, "rb") as f:
                        shutil.copyfileobj(f, out, 4 << 20)
                    out.write(b"\0" * (-out.tell() % 4))
                w = CpioWriter(out, force_root=True)
                w.add_dir("hastpy-vm")
                w.add_file(f"hastpy-vm/{script.name}", script.read_bytes(), 0o755)
                w.add_file("hastpy-vm/run", run, 0o755)
                w.close()
            cmdline = f"console=ttyS0 panic=-1 quiet mitigations=off {append}".strip()
            cmd = [qemu, "-accel", "tcg", "-M", "pc", "-m", str(memory_mb), "-smp", str(cpus),
                   "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                   "-kernel", str(layers.kernel), "-initrd", str(initrd), "-append", cmdline, "-no-reboot"]  # fmt: skip
            return self._run_qemu(cmd, timeout, echo, console_log)

    def _run_qemu(self, cmd: list[str], timeout: float, echo, console_log) -> BootResult:
        self.log("boot: " + " ".join(shlex.quote(c) for c in cmd))
        lines: list[str] = []
        logf = open(console_log, "w") if console_log else None
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def reader() -> None:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
                lines.append(line)
                if logf:
                    logf.write(f"{time.monotonic() - t0:7.2f} {line}\n")
                    logf.flush()
                if echo:
                    echo(line)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        thread.join(10)
        if logf:
            logf.close()
        seconds = time.monotonic() - t0
        return BootResult(lines, _exit_code(lines), _results(lines), timed_out, proc.returncode, seconds)


def _exit_code(lines: list[str]) -> int | None:
    for line in reversed(lines):
        m = re.search(rf"{EXIT_MARK} rc=(\d+)", line)
        if m:
            return int(m.group(1))
    return None


def _results(lines: list[str]) -> dict | None:
    """The JSON between the result marks. The script prints it as one line; kernel messages that
    land between the marks are skipped."""
    try:
        start = max(i for i, l in enumerate(lines) if l.strip() == RESULT_BEGIN)
        end = next(i for i in range(start, len(lines)) if lines[i].strip() == RESULT_END)
    except (ValueError, StopIteration):
        return None
    for line in lines[start + 1 : end]:
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _requirement_closure(name: str) -> list[importlib.metadata.Distribution]:
    """The installed distributions `name` needs at run time (markers evaluated, extras skipped)."""
    from packaging.requirements import Requirement

    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [Requirement(r) for r in importlib.metadata.requires(name) or ()]
    while todo:
        req = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in seen:
            continue
        dist = importlib.metadata.distribution(req.name)
        seen[key] = dist
        todo += [Requirement(r) for r in dist.requires or ()]
    return [seen[k] for k in sorted(seen)]


def _modinfo_depends(ko: Path) -> list[str]:
    """The `depends=` entry of a module's .modinfo section (NUL-separated key=value strings)."""
    data = ko.read_bytes()
    m = re.search(rb"\0depends=([^\0]*)\0", data)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def _module_closure(mroot: Path, names: Iterable[str]) -> list[str]:
    """Paths (relative to lib/modules/<release>) of the named modules and everything they depend on."""
    index = {p.name.removesuffix(".ko").replace("-", "_"): p for p in (mroot / "kernel").rglob("*.ko")}
    todo = [n.replace("-", "_") for n in names]
    found: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in found:
            continue
        if name not in index:
            raise GuestError(f"kernel module {name} not in {mroot} (built in, or not built at all?)")
        found[name] = index[name]
        todo += [d.replace("-", "_") for d in _modinfo_depends(index[name])]
    return sorted(str(p.relative_to(mroot)) for p in found.values())


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build, cache and boot the hastpy VM guest.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the missing layers (needs root the first time)")
    b = sub.add_parser("boot", help="boot and run SCRIPT inside the guest")
    b.add_argument("--timeout", type=float, default=300, help="seconds (default 300)")
    b.add_argument("script")
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
    opts = ap.parse_args(argv)
    guest = Guest()
    t = time.monotonic()
    layers = guest.build()
    print(f"build: {time.monotonic() - t:.1f} s {layers.timings} -> {layers.base.name} {layers.project.name}")
    if opts.cmd == "build":
        return 0
    res = guest.boot(opts.script, opts.args, timeout=opts.timeout, echo=print)
    print(f"boot: {res.seconds:.1f} s, script exit {res.exit_code}, timed out {res.timed_out}, qemu rc {res.qemu_rc}")
    return 0 if res.exit_code == 0 and not res.timed_out else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
