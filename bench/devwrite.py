#!/usr/bin/env python3
"""Writes through the primary's /dev/hast/data (attach fuse) against nbdkit behind the same stack.

    .venv/bin/python bench/devwrite.py [--runs 5] [--mib 512] [--runtime 10] [--dir DIR] [--dd]
                                       [--floor]

Needs root (loop devices, FUSE mounts), fio, nbdkit, nbdfuse, losetup and fusermount3.

Sets up, in one run:

- "hast": a hastd pair on two loopback addresses (bench/seqwrite.py's HastPair: fullsync,
  metaflush on, a sparse provider of --provider bytes per node) with `attach fuse`, so that the
  primary's worker export becomes a block device: nbdfuse + `losetup --direct-io=on`, linked as
  <dir>/a/dev/data (the node's /dev/hast/data; a private devdir, so that nothing of the machine's
  own /dev/hast is touched);
- "nbdkit": nbdkit's `file` plugin serving a sparse file of the hast export's size on a unix
  socket, made into a block device by the same code (hastpy.attach.attach("fuse", ...)), so both
  targets have the same nbdfuse + direct-I/O loop stack and differ only in the NBD server;
- with --floor, two more behind the same stack: "relay" and "relay-am", bench/relay.py's least
  replicating server in Python (a write acknowledged once a second process on loopback TCP wrote
  it too), without and with a durable activemap write for each write to an extent outside the
  64 most recent ones (hast's default keepdirty and metaflush). They say how close a Python
  server of hast's design could come to nbdkit here, and so how much of the distance is hast's.

Then, alternating the targets run by run (and which one goes first), each run preceded by a
`sync -f` so that one target's page-cache writeback is not charged to the other's run:

1. seq: fio, sequential 1 MiB writes, ioengine=libaio, iodepth=16, direct=1, over the first --mib
   MiB of the device for --runtime seconds (time based: it wraps around);
2. rand: fio, 4 KiB random writes, ioengine=libaio, iodepth=16, direct=1, same area and time;
3. with --dd: `dd if=<random file in the page cache> of=DEV bs=1M count=--mib oflag=direct`
   (one request at a time).

Prints the median over --runs of MB/s (10^6 B/s) or IOPS per target, the ratio hast / nbdkit
against the issue #4 targets, and the CPU time the servers spent per MiB (seq, dd) or per write
(rand): both hastd workers vs nbdkit, and each target's nbdfuse. Bytes and writes are counted
at the loop device (/sys/block/loopN/stat), so fio's ramp time is in both numerator and
denominator of the CPU figures. It also prints the whole machine's CPU per MiB or per write
(/proc/stat: softirq and kernel threads included, which no process's time shows) and how busy
the machine was, and, for seq, the ceiling any server that keeps a second copy over TCP could
reach behind this stack: the nbdkit arm's machine CPU per MiB plus what floor.py measures a
second copy to cost.

Cleans up on exit, on errors, on Ctrl-C and on SIGTERM: loop devices, FUSE mounts, nbdfuse,
nbdkit, both hastd, the temporary directory; then checks that nothing of it is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from floor import busy_seconds, median_cost
from relay import RELAY_ARMS, Relay
from seqwrite import GiB, MiB, HastPair, Nbdkit, cpu_seconds, wait_for

from hastpy.attach import attach, cleanup_stale, detach, leftovers
from hastpy.attach.base import load_state
from hastpy.errors import HastError

RES = "data"  # the hast resource (seqwrite.py's configuration)
KIT = "kit"  # the baseline's attachment name (and NBD export name: nbdkit serves any)

# --- Limits and fixed parameters, each with its reason ---------------------------------------

# Issue #4's acceptance targets, hast / nbdkit through the same nbdfuse + loop stack.
TARGET_SEQ = 0.6
TARGET_RAND = 0.5
# 1 MiB sequential writes with 16 in flight: the same request size and depth as seqwrite.py's
# hastpy client, so the two benchmarks can be compared; libaio so that one fio thread keeps 16
# requests in the loop device's queue (psync would be depth 1, which --dd measures).
SEQ_BS = MiB
SEQ_IODEPTH = 16
# Issue #4: 4 KiB random writes at queue depth 16.
RAND_BS = 4096
RAND_IODEPTH = 16
# fio's first second (thread start, filling the queue, the first extents' bitmap writes) is
# left out of its MB/s and IOPS.
FIO_RAMP = 1
# The per-process CPU labels that are not NBD servers: left out of the servers' sums.
NOT_SERVERS = ("nbdfuse", "machine")
# floor.py's second-copy cost, measured after the runs: 1 GiB, three times (about 3 s).
FLOOR_MIB = 1024
FLOOR_RUNS = 3
# fio must finish within runtime + ramp + this: it only has to drain iodepth requests at the
# end. Longer means a hung device, which must fail the benchmark rather than hang it.
FIO_GRACE = 120.0
# dd writes --mib MiB one request at a time; below this rate it is taken as hung.
DD_MIN_MBS = 1.0
# From `hastctl role primary` to the device link: worker start, the pair connecting, nbdfuse,
# losetup. A second or two here; 60 s allows for a loaded 2-core machine.
DEVICE_READY_TIMEOUT = 60.0
# `sync -f` before each run writes back the previous run's dirty pages (at most --mib MiB of
# each page-cached provider, plus whatever else shares the filesystem).
SYNC_TIMEOUT = 300.0
REQUIRED_TOOLS = ("fio", "nbdkit", "nbdfuse", "losetup", "fusermount3", "sync")
# Exit status on Ctrl-C / SIGTERM, as a shell reports a process killed by SIGINT.
EXIT_INTERRUPTED = 128 + signal.SIGINT


class BenchError(Exception):
    """A failure to report in one line, without a traceback."""


class FusePair(HastPair):
    """seqwrite.py's hastd pair, with `attach fuse` and a devdir of its own on each node."""

    def __init__(self, root: Path, provider: int):
        super().__init__(root, provider, "fullsync", "on")
        for node in ("a", "b"):
            conf = root / node / "hast.conf"
            text = conf.read_text()
            if "    attach none\n" not in text:
                raise BenchError(f"{conf}: seqwrite.py's configuration changed (no 'attach none' line)")
            conf.write_text(text.replace("    attach none\n", f"    attach fuse\n    devdir {root / node / 'dev'}\n"))

    @property
    def link(self) -> Path:
        return self.root / "a" / "dev" / RES

    @property
    def statedir(self) -> str:
        return str(self.root / "a" / "hastpy")  # the Supervisor's: next to the control socket

    def device(self) -> str:
        wait_for(self.link.exists, timeout=DEVICE_READY_TIMEOUT, what=f"{self.link} (attach fuse)")
        return os.path.realpath(self.link)


class Target:
    """A block device under test and the processes whose CPU time it costs."""

    def __init__(self, name: str, device: str, servers: dict[str, int], nbdfuse: int):
        self.name = name
        self.device = device
        self.servers = servers  # label -> pid
        self.nbdfuse = nbdfuse

    def pids(self) -> dict[str, int]:
        return {**self.servers, "nbdfuse": self.nbdfuse}

    def cpu(self) -> dict[str, float]:
        try:
            return {label: cpu_seconds(pid) for label, pid in self.pids().items()}
        except OSError as exc:
            raise BenchError(f"{self.name}: a server process is gone ({exc})") from None

    def disk_stat(self) -> tuple[int, int]:
        """(writes completed, bytes written) of the loop device so far (Documentation/block/stat)."""
        with open(f"/sys/block/{os.path.basename(self.device)}/stat") as f:
            fields = f.read().split()
        return int(fields[4]), int(fields[6]) * 512


class Measure:
    """One run of one test on one target: result, CPU per MiB and per write of each process and
    of the whole machine ("machine": /proc/stat, so softirq and kernel threads count too, which
    no process's own time shows), and the fraction of the machine that was busy."""

    def __init__(self, value: float, cpu: dict[str, float], nbytes: int, writes: int, busy: float):
        self.value = value
        self.busy = busy
        self.cpu_ms_per_mib = {k: v * 1000 / (nbytes / MiB) for k, v in cpu.items()} if nbytes else {}
        self.cpu_us_per_write = {k: v * 1e6 / writes for k, v in cpu.items()} if writes else {}


def run_cmd(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} still running after {timeout:.0f} s (device hung?): {' '.join(argv)}") from None
    if cp.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {cp.returncode}: {(cp.stderr or cp.stdout).strip()[-500:]}")
    return cp


def fio(test: str, device: str, mib: int, runtime: int) -> float:
    """Run one fio job; MB/s for seq, IOPS for rand."""
    rw, bs, depth = ("write", SEQ_BS, SEQ_IODEPTH) if test == "seq" else ("randwrite", RAND_BS, RAND_IODEPTH)
    argv = [
        "fio", f"--name={test}", f"--filename={device}", f"--rw={rw}", f"--bs={bs}",
        "--ioengine=libaio", f"--iodepth={depth}", "--direct=1", f"--size={mib}M",
        "--time_based", f"--runtime={runtime}", f"--ramp_time={FIO_RAMP}",
        "--norandommap", "--randrepeat=0", "--output-format=json",
    ]  # fmt: skip
    out = run_cmd(argv, runtime + FIO_RAMP + FIO_GRACE).stdout
    try:
        write = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    except (ValueError, KeyError, IndexError) as exc:
        raise BenchError(f"cannot read fio's output ({exc}): {out[:300]}") from None
    if write.get("error") or not write.get("io_bytes"):
        raise BenchError(f"fio wrote nothing to {device}: {write}")
    return write["bw_bytes"] / 1e6 if test == "seq" else write["iops"]


def dd(src: Path, device: str, mib: int) -> float:
    argv = ["dd", f"if={src}", f"of={device}", f"bs={MiB}", f"count={mib}", "oflag=direct", "status=none"]
    t = time.perf_counter()
    run_cmd(argv, mib * MiB / 1e6 / DD_MIN_MBS)
    return mib * MiB / (time.perf_counter() - t) / 1e6


def measure(test: str, target: Target, args, src: Path | None) -> Measure:
    run_cmd(["sync", "-f", str(args.root)], SYNC_TIMEOUT)
    cpu0, (w0, b0), t0 = {**target.cpu(), "machine": busy_seconds()}, target.disk_stat(), time.monotonic()
    value = dd(src, target.device, args.mib) if test == "dd" else fio(test, target.device, args.mib, args.runtime)
    cpu1, (w1, b1), t1 = {**target.cpu(), "machine": busy_seconds()}, target.disk_stat(), time.monotonic()
    busy = (cpu1["machine"] - cpu0["machine"]) / ((t1 - t0) * (os.cpu_count() or 1))
    return Measure(value, {k: cpu1[k] - cpu0[k] for k in cpu0}, b1 - b0, w1 - w0, busy)


# --- Set-up and clean-up ----------------------------------------------------------------------


def preflight(args) -> tuple[int, str] | None:
    """(exit code, message) if this cannot run here."""
    if os.geteuid() != 0:
        return os.EX_NOPERM, "needs root (loop devices and FUSE mounts)"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return os.EX_UNAVAILABLE, f"no {dev} on this machine"
    tools = REQUIRED_TOOLS + (("dd",) if args.dd else ())
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return os.EX_UNAVAILABLE, f"{', '.join(missing)} not installed (Debian: fio nbdkit libnbd-bin fuse3 util-linux)"
    return None


def residue(root: Path) -> list[str]:
    """Loop devices, mounts and nbdfuse processes of ours still there."""
    prefix = os.path.realpath(root) + "/"
    left = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(prefix):
                left.append(f"loop /dev/{backing.parent.parent.name}")
    with open("/proc/self/mountinfo") as f:
        left += [f"mount {line.split()[4]}" for line in f if line.split()[4].startswith(prefix)]
    left += leftovers(RES, str(root / "a" / "hastpy")) + leftovers(KIT, str(root / KIT / "state"))
    for name in RELAY_ARMS:
        left += leftovers(name, str(root / name / "state"))
    return sorted(set(left))


def cleanup(root: Path, pair: FusePair | None, kit: Nbdkit | None, kit_att, keep: bool,
            relays: dict | None = None) -> list[str]:  # fmt: skip
    """Tear down in the order that cannot wedge: each baseline's loop and FUSE mount while its
    server still answers, that server, then the hastd pair (whose supervisor detaches its own
    device), then a sweep of every attachment by name. `relays`: name -> (Relay or None,
    attachment or None). Returns what could not be removed."""
    problems = []
    steps = []
    if kit_att is not None:
        steps.append(("detach the nbdkit device", lambda: detach(kit_att, force=True)))
    if kit is not None:
        steps.append(("stop nbdkit", kit.stop))
    for name, (relay, att) in (relays or {}).items():
        if att is not None:
            steps.append((f"detach the {name} device", lambda att=att: detach(att, force=True)))
        if relay is not None:
            steps.append((f"stop {name}", relay.stop))
    if pair is not None:
        steps.append(("stop hastd", pair.stop))
    steps.append(("sweep the hast attachment", lambda: cleanup_stale(RES, str(root / "a" / "dev"), str(root / "a" / "hastpy"))))
    steps.append(("sweep the nbdkit attachment", lambda: cleanup_stale(KIT, str(root / KIT / "dev"), str(root / KIT / "state"))))
    for name in relays or {}:
        steps.append((f"sweep the {name} attachment",
                      lambda name=name: cleanup_stale(name, str(root / name / "dev"), str(root / name / "state"))))  # fmt: skip
    for what, step in steps:
        try:
            step()
        except (HastError, OSError, subprocess.SubprocessError) as exc:
            problems.append(f"{what}: {exc}")
    left = residue(root)
    problems += [f"left: {x}" for x in left]
    if left or keep:
        print(f"devwrite: kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return problems


# --- Report -------------------------------------------------------------------------------------


def med(values) -> float:
    return statistics.median(values)


def report(results: dict[tuple[str, str], list[Measure]], tests: list[str], args, arms: list[str]) -> None:
    names = {
        "seq": f"seq {SEQ_BS // MiB} MiB write, libaio qd{SEQ_IODEPTH}",
        "rand": f"rand {RAND_BS // 1024} KiB write, libaio qd{RAND_IODEPTH}",
        "dd": "dd bs=1M oflag=direct (qd1)",
    }
    unit = {"seq": "MB/s", "rand": "IOPS", "dd": "MB/s"}
    target = {"seq": TARGET_SEQ, "rand": TARGET_RAND, "dd": None}
    floors = [a for a in arms if a not in ("hast", "nbdkit")]
    print(f"\nmedians of {args.runs} runs ({args.mib} MiB area, fio {args.runtime} s + {FIO_RAMP} s ramp):")
    print(f"  {'test':36s} {'hast':>12s} {'nbdkit':>12s} {'ratio':>6s}  target")
    for t in tests:
        h, k = med(m.value for m in results[("hast", t)]), med(m.value for m in results[("nbdkit", t)])
        goal = f">= {target[t]}" + ("  met" if h / k >= target[t] else "  NOT met") if target[t] else "-"
        print(f"  {names[t]:36s} {h:9.0f} {unit[t]:4s}{k:9.0f} {unit[t]:4s} {h / k:5.2f}  {goal}")
        for a in floors:
            v = med(m.value for m in results[(a, t)])
            print(f"  {'':4s}{a + ' (bench/relay.py)':32s} {v:9.0f} {unit[t]:4s}{'':13s}{v / k:5.2f}  (hast / {a}: {h / v:.2f})")
    print("  server CPU (median):")
    for t in tests:
        per, attr = ("ms/MiB", "cpu_ms_per_mib") if t != "rand" else ("us/write", "cpu_us_per_write")
        parts = []
        for tgt in arms:
            runs = [getattr(m, attr) for m in results[(tgt, t)]]
            labels = list(runs[0]) if runs and runs[0] else []
            vals = {lab: med(r[lab] for r in runs) for lab in labels}
            servers = " + ".join(f"{lab} {v:.2f}" for lab, v in vals.items() if lab not in NOT_SERVERS)
            total = sum(v for lab, v in vals.items() if lab not in NOT_SERVERS)
            parts.append(f"{tgt}: {servers} = {total:.2f} (its nbdfuse {vals.get('nbdfuse', 0):.2f})")
        print(f"    {t:5s} {per:9s} " + ";\n                    ".join(parts))
    print("  machine CPU, everything included (median), and how busy the machine was:")
    for t in tests:
        per, attr = ("ms/MiB", "cpu_ms_per_mib") if t != "rand" else ("us/write", "cpu_us_per_write")
        parts = [f"{tgt} {med(getattr(m, attr)['machine'] for m in results[(tgt, t)]):.2f} "
                 f"({med(m.busy for m in results[(tgt, t)]):.0%} busy)" for tgt in arms]  # fmt: skip
        print(f"    {t:5s} {per:9s} " + ";  ".join(parts))
    if "seq" in tests:
        ceiling(results, args)


def ceiling(results: dict[tuple[str, str], list[Measure]], args) -> None:
    """How close any server that keeps a second copy over TCP could come to nbdkit on seq: the
    nbdkit arm's machine CPU per MiB plus floor.py's cost of a second copy, at the nbdkit arm's
    busy level and at a fully busy machine (floor.py's docstring has the reasoning)."""
    kit = results[("nbdkit", "seq")]
    m = med(x.cpu_ms_per_mib["machine"] for x in kit)
    b = med(x.busy for x in kit)
    f = median_cost(FLOOR_MIB, args.mib, FLOOR_RUNS, str(args.root))
    print(f"  a second copy over loopback TCP costs at least {f:.2f} ms of machine CPU per MiB (floor.py):")
    print(f"    seq ceiling for a replicating server behind this stack: {m / (m + f):.2f} of nbdkit at its "
          f"{b:.0%} busy, {min(1.0, m / ((m + f) * b)):.2f} with the machine fully busy")  # fmt: skip


# --- Main -------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(os.EX_USAGE, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    ap = Parser(prog="devwrite.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per target and test; medians reported (default 5)")
    ap.add_argument("--mib", type=int, default=512, help="MiB of the device written over (fio area, dd size; default 512)")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio run, after a 1 s ramp (default 10)")
    ap.add_argument("--provider", type=int, default=GiB, help="provider size in bytes, each node (default 1 GiB)")
    ap.add_argument("--dir", default=None, help="where providers, nbdkit's file and sockets live (default: a new dir in /tmp)")
    ap.add_argument("--tests", default="seq,rand", help="comma-separated: seq, rand (default seq,rand)")
    ap.add_argument("--dd", action="store_true", help="also dd oflag=direct bs=1M, one request at a time")
    ap.add_argument("--keep", action="store_true", help="keep the directory (hastd logs) afterwards")
    ap.add_argument("--floor", action="store_true",
                    help="also bench/relay.py's least Python replicating server, without and with an activemap")  # fmt: skip
    args = ap.parse_args(argv)
    args.test_list = [t.strip() for t in args.tests.split(",") if t.strip()]
    bad = set(args.test_list) - {"seq", "rand"}
    if bad or not args.test_list:
        ap.error(f"--tests takes seq and/or rand, not {args.tests!r}")
    if args.dd:
        args.test_list.append("dd")
    for flag in ("runs", "mib", "runtime"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1")
    if args.mib * MiB >= args.provider:
        ap.error(f"--mib {args.mib} does not fit a {args.provider} byte provider")
    if args.dir is not None and not os.path.isdir(args.dir):
        ap.error(f"--dir {args.dir}: no such directory")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    refused = preflight(args)
    if refused:
        print(f"devwrite: {refused[1]}", file=sys.stderr)
        return refused[0]
    # Ctrl-C and SIGTERM both end in the clean-up below (SIGINT explicitly too: a shell starts
    # background jobs with it ignored, and Python then installs no handler of its own).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    args.root = root = Path(tempfile.mkdtemp(prefix="devwrite-", dir=args.dir))
    pair = kit = kit_att = None
    relays: dict[str, tuple] = {}
    status = 0
    problems: list[str] = []
    try:
        pair = FusePair(root, args.provider)
        pair.start()
        size = pair.datasize()
        if args.mib * MiB > size:
            raise BenchError(f"--mib {args.mib} exceeds the hast export ({size} bytes)")
        hast_dev = pair.device()
        hast_att = load_state(pair.statedir, RES)
        if hast_att is None or not hast_att.nbdfuse_pid:
            raise BenchError(f"hastd attached {hast_dev} but recorded no nbdfuse in {pair.statedir}")
        kit = Nbdkit(root, size)
        kit_att = attach("fuse", KIT, KIT, kit.socket, size, str(root / KIT / "dev"), str(root / KIT / "state"))
        targets = [
            Target("hast", hast_dev, {"primary": pair.worker_pid("a"), "secondary": pair.worker_pid("b")}, hast_att.nbdfuse_pid),
            Target("nbdkit", kit_att.device, {"nbdkit": kit.proc.pid}, kit_att.nbdfuse_pid),
        ]
        for name, keepdirty in RELAY_ARMS.items() if args.floor else ():
            relay = Relay(root / name, name, size, keepdirty)
            relays[name] = (relay, None)
            att = attach("fuse", name, name, relay.socket, size, str(root / name / "dev"), str(root / name / "state"))
            relays[name] = (relay, att)
            targets.append(Target(name, att.device, relay.servers, att.nbdfuse_pid))
        src = None
        if args.dd:
            src = root / "src.img"
            with open(src, "wb") as f:
                for _ in range(args.mib):
                    f.write(os.urandom(MiB))
            src.read_bytes()  # into the page cache, so that dd measures the device, not the disk
        print(f"devwrite: {size // MiB} MiB devices, {args.mib} MiB written over, {args.runs} runs, in {root}", flush=True)
        print(f"  hastpy from {pair.hastpy_source()}", flush=True)
        for t in targets:
            pids = ", ".join(f"{k} {v}" for k, v in t.pids().items())
            print(f"  {t.name:6s} {t.device}: {pids}", flush=True)
        results: dict[tuple[str, str], list[Measure]] = {(t.name, test): [] for t in targets for test in args.test_list}
        for i in range(args.runs):
            order = targets[i % len(targets) :] + targets[: i % len(targets)]
            for test in args.test_list:
                for t in order:
                    m = measure(test, t, args, src)
                    results[(t.name, test)].append(m)
                    unit = "IOPS" if test == "rand" else "MB/s"
                    cpu = m.cpu_us_per_write if test == "rand" else m.cpu_ms_per_mib
                    per = "us/write" if test == "rand" else "ms/MiB"
                    cpus = " ".join(f"{k} {v:.2f}" for k, v in cpu.items())
                    print(f"  run {i + 1}: {test:4s} {t.name:6s} {m.value:9.1f} {unit}   cpu {per}: {cpus}", flush=True)
        report(results, args.test_list, args, [t.name for t in targets])
    except KeyboardInterrupt:
        print("\ndevwrite: interrupted; cleaning up", file=sys.stderr)
        status = EXIT_INTERRUPTED
    except (BenchError, HastError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"devwrite: {exc}", file=sys.stderr)
        status = os.EX_SOFTWARE
    finally:
        # A second Ctrl-C must not cut the clean-up short; every step of it is bounded.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            problems = cleanup(root, pair, kit, kit_att, args.keep, relays)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    for p in problems:
        print(f"devwrite: clean-up: {p}", file=sys.stderr)
    if problems and status == 0:
        status = os.EX_OSERR
    return status


if __name__ == "__main__":
    sys.exit(main())
