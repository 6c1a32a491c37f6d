#!/usr/bin/python3
"""Runs inside the VM guest, as root, from /init (tests/vm/guest.py boots it).

hastd with one resource `data` (`remote none`, `attach kernel`) on a file, then:

1. `modprobe nbd`; `hastctl create data`; hastd; `hastctl role primary data`;
2. /dev/hast/data -> /dev/nbdN; mkfs.ext4, mount, files with known sha256, umount;
3. `hastctl role init data` detaches: no /dev/hast/data, nothing in /sys/block/nbd*/pid;
4. `hastctl role primary data` again; e2fsck -fn; mount; the checksums read back;
5. kill -9 of the primary worker while mounted and being written: what the kernel and the
   supervisor do over KILL_WATCH seconds (dmesg, hastd log, hastctl list, /dev/hast/data, probe
   reads, tasks in D state, hung-task reports with the detector set to HUNG_TASK_SECS); then
   umount and `role init`, and whether that leaves anything behind.

Until the supervisor attaches by itself, step 2 falls back to calling hastpy.attach directly
(reported as attach_mode "direct"), so the rest of the path is still exercised; after kill -9 the
script then does what the attach contract asks of the supervisor (cleanup_stale when a worker
died), unless given --no-emulated-cleanup.

Every step that may block on a dead device runs in a child process with a deadline: a child stuck
in uninterruptible sleep is reported (state, wchan, kernel stack) and left behind, never waited
for. The results are one JSON line between HASTPY-VM-RESULT-BEGIN and -END; the exit code is 0
only if every required step passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

NODE = "hastvm"
RES = "data"
CONF = "/etc/hast.conf"
CONTROL = "/run/hastctl"
IMAGE = "/var/lib/hast/data.img"
IMAGE_SIZE = 256 * 2**20
DEVDIR = "/dev/hast"
LINK = f"{DEVDIR}/{RES}"
MNT = "/mnt/data"
STATEDIR = "/run/hastpy-vm-attach"  # for the direct fallback only
HASTD_LOG = "/tmp/hastd.log"
HUNG_TASK_SECS = 10  # the kernel's hung-task detector, lowered so it can fire within the test
KILL_WATCH = 25  # seconds observed after kill -9 (> 2 x HUNG_TASK_SECS: khungtaskd's period)
DEVICE_WAIT = 60  # seconds for /dev/hast/data to appear after `role primary`
# --no-emulated-cleanup: in direct mode, do not stand in for the supervisor after kill -9 (shows
# what the kernel does when nobody disconnects the device of a dead worker).
EMULATE_CLEANUP = "--no-emulated-cleanup" not in sys.argv[1:]

CONFIG = f"""# written by tests/vm/guest_test.py
control uds://{CONTROL}
pidfile /run/hastd.pid
listen tcp4://127.0.0.1:8457

resource {RES} {{
	attach kernel
	on {NODE} {{
		local {IMAGE}
		remote none
	}}
}}
"""

T0 = time.monotonic()
R: dict = {"steps": [], "failures": [], "notes": []}


def log(msg: str) -> None:
    print(f"[guest {time.monotonic() - T0:6.1f}] {msg}", flush=True)


def step(name: str, ok: bool, detail: str = "", required: bool = True) -> bool:
    R["steps"].append({"name": name, "ok": bool(ok), "detail": detail, "t": round(time.monotonic() - T0, 1)})
    log(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if required and not ok:
        R["failures"].append(f"{name}: {detail}")
    return bool(ok)


class Child:
    """A command run with a deadline that never blocks on a child stuck in the kernel. A thread
    notes when it exits, so the time is right even while the caller is busy elsewhere."""

    def __init__(self, cmd: list[str], out=None):
        self.cmd = cmd
        self.out = out or tempfile.TemporaryFile()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)
        self.end: float | None = None
        threading.Thread(target=self._reaper, daemon=True).start()

    def _reaper(self) -> None:
        self.proc.wait()
        self.end = time.monotonic()

    def poll(self) -> int | None:
        return self.proc.returncode if self.end is not None else None

    def wait(self, timeout: float) -> dict:
        """{"rc", "out", "seconds"} or, if it outlived the deadline and SIGKILL, {"hung": ...}."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                return {"cmd": " ".join(self.cmd), "hung": task_info(self.proc.pid), "after": timeout}
        self.seconds = (self.end or time.monotonic()) - self.start
        self.out.seek(0)
        text = self.out.read().decode(errors="replace")
        return {"cmd": " ".join(self.cmd), "rc": self.proc.returncode, "out": text, "seconds": round(self.seconds, 2)}


def run(cmd: list[str], timeout: float = 120) -> dict:
    return Child(cmd).wait(timeout)


def ok(res: dict) -> bool:
    return res.get("rc") == 0


def brief(res: dict) -> str:
    if "hung" in res:
        return f"hung after {res['after']} s: {res['hung']}"
    out = res["out"].strip().splitlines()
    return f"rc={res['rc']} in {res['seconds']} s" + (f": {' | '.join(out[-4:])}" if out else "")


def read(path: str, default: str = "") -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def task_info(pid: int) -> dict:
    stat = read(f"/proc/{pid}/stat")
    state = stat.rsplit(")", 1)[-1].split()[0] if stat else "gone"
    return {"pid": pid, "comm": read(f"/proc/{pid}/comm").strip(), "state": state,
            "wchan": read(f"/proc/{pid}/wchan"), "stack": read(f"/proc/{pid}/stack").strip().splitlines()[:12]}  # fmt: skip


def d_state_tasks() -> list[dict]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            info = task_info(int(pid))
            if info["state"] == "D":
                out.append(info)
    return out


def dmesg() -> list[str]:
    res = run(["dmesg"], 20)
    return res.get("out", "").splitlines() if "out" in res else []


def kmsg(text: str) -> None:
    """A mark in the kernel log, to cut dmesg into before/after."""
    try:
        write("/dev/kmsg", f"hastpy-vm: {text}\n")
    except OSError:
        pass


def dmesg_since(mark: str) -> list[str]:
    lines = dmesg()
    idx = max((i for i, l in enumerate(lines) if f"hastpy-vm: {mark}" in l), default=-1)
    return lines[idx + 1 :]


def hastctl(*args: str, timeout: float = 120) -> dict:
    return run(["hastctl", *args[:1], "-c", CONF, "-n", NODE, *args[1:]], timeout)


def status() -> dict | None:
    """The resource's row from hastd (in-process: a hastctl start costs seconds in this guest)."""
    from hastpy import config as cfgmod
    from hastpy import control

    try:
        reply = control.call(cfgmod.parse_control_address(f"uds://{CONTROL}"), {"cmd": "status", "resources": [RES]})
        return reply["resources"][0]
    except Exception as exc:  # noqa: BLE001 - reported, the caller decides
        return {"error": f"{type(exc).__name__}: {exc}"}


def nbd_connected() -> list[str]:
    """nbd devices with a live configuration (/sys/block/nbdN/pid exists while connected)."""
    return sorted(d for d in os.listdir("/sys/block") if d.startswith("nbd") and os.path.exists(f"/sys/block/{d}/pid"))


def link_target() -> str | None:
    return os.path.realpath(LINK) if os.path.lexists(LINK) else None


def wait_for(pred, timeout: float, period: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(period)


def hastd_log_tail(n: int = 40) -> list[str]:
    return read(HASTD_LOG).splitlines()[-n:]


# ---- steps -------------------------------------------------------------------------------------


def setup() -> None:
    R["kernel"] = os.uname().release
    R["cmdline"] = read("/proc/cmdline").strip()
    R["python"] = sys.version.split()[0]
    res = run(["modprobe", "nbd"], 30)
    step("modprobe nbd", ok(res), brief(res))
    R["nbd_module"] = os.path.isdir("/sys/module/nbd")
    R["nbd_nodes"] = len([d for d in os.listdir("/dev") if d.startswith("nbd")])
    try:
        write("/proc/sys/kernel/hung_task_timeout_secs", str(HUNG_TASK_SECS))
        R["hung_task_timeout_secs"] = int(read("/proc/sys/kernel/hung_task_timeout_secs").strip())
    except OSError as exc:
        R["notes"].append(f"cannot set hung_task_timeout_secs: {exc}")
    # hastpy.transport resolves with AI_ADDRCONFIG, which glibc answers with "Name or service not
    # known" on a host whose only IPv4 address is loopback; a non-loopback address on lo avoids it.
    res = run(["ip", "addr", "add", "192.0.2.1/32", "dev", "lo"], 10)
    R["notes"].append(f"added 192.0.2.1/32 on lo (AI_ADDRCONFIG workaround): {brief(res)}")
    write(CONF, CONFIG)
    os.makedirs(os.path.dirname(IMAGE), exist_ok=True)
    with open(IMAGE, "wb") as f:
        f.truncate(IMAGE_SIZE)
    os.makedirs(MNT, exist_ok=True)
    res = hastctl("create", RES)
    step("hastctl create data", ok(res), brief(res))


def start_hastd() -> None:
    logf = open(HASTD_LOG, "ab")
    R["hastd_pid"] = subprocess.Popen(["hastd", "-F", "-c", CONF, "-n", NODE], stdin=subprocess.DEVNULL,
                                      stdout=logf, stderr=subprocess.STDOUT, start_new_session=True).pid  # fmt: skip
    up = wait_for(lambda: os.path.exists(CONTROL), 60)
    step("hastd started", up, f"control socket after {time.monotonic() - T0:.1f} s" if up else "\n".join(hastd_log_tail()))


def supervisor_attaches() -> bool:
    """Whether this hastpy's supervisor makes /dev/hast/<name> itself (the lead's integration)."""
    import hastpy.supervisor

    lines = [l.strip() for l in read(hastpy.supervisor.__file__).splitlines()]
    return any(l.startswith(("from hastpy", "import hastpy")) and "attach" in l for l in lines)


def direct_attach():
    """The fallback while the supervisor does not attach: hastpy.attach on the worker's socket."""
    from hastpy import attach

    row = status() or {}
    sock = row.get("nbd_socket") or f"/run/hastd-{RES}.nbd"
    return attach.attach("kernel", RES, RES, sock, 0, DEVDIR, STATEDIR)


def promote(label: str) -> str | None:
    """`hastctl role primary data`, then wait for /dev/hast/data; returns the device."""
    res = hastctl("role", "primary", RES)
    step(f"{label}: hastctl role primary data", ok(res), brief(res))
    ready = wait_for(lambda: (status() or {}).get("workerpid"), 30)
    step(f"{label}: primary worker running", bool(ready), json.dumps(status()))
    if R["attach_mode"] == "supervisor":
        dev = wait_for(link_target, DEVICE_WAIT)
        step(f"{label}: {LINK} appeared", bool(dev), dev or f"not after {DEVICE_WAIT} s; " + " | ".join(hastd_log_tail(8)))
    else:
        t = time.monotonic()
        try:
            R.setdefault("direct_attachments", []).append(direct_attach().to_dict())
            dev = link_target()
            step(f"{label}: direct attach (hastpy.attach, kernel)", bool(dev), f"{dev} in {time.monotonic() - t:.1f} s")
        except Exception as exc:  # noqa: BLE001 - the error is the result
            step(f"{label}: direct attach (hastpy.attach, kernel)", False, f"{type(exc).__name__}: {exc}")
            R["attach_error"] = traceback.format_exc().splitlines()[-12:]
            dev = None
    if dev:
        name = os.path.basename(dev)
        sysfs = f"/sys/block/{name}"
        size = int(read(f"{sysfs}/size", "0") or 0) * 512
        detail = f"pid={read(f'{sysfs}/pid').strip()} size={size} backend={read(f'{sysfs}/backend').strip()!r}"
        step(f"{label}: {dev} is a connected nbd device", name.startswith("nbd") and os.path.exists(f"{sysfs}/pid"), detail)
        # The export allows multi-conn: the kernel was given several sockets. Counted on the
        # worker's side (blk-mq caps the device's hardware queues at the CPU count).
        from hastpy.attach.kernel import MULTI_CONN_SOCKETS

        row = status() or {}
        conns = served_connections(row.get("nbd_socket") or f"/run/hastd-{RES}.nbd")
        step(f"{label}: {dev} has {MULTI_CONN_SOCKETS} connections", conns == MULTI_CONN_SOCKETS, f"{conns} connected to the export")
    return dev


def served_connections(path: str) -> int:
    """Connected (state 03) sockets bound to `path`: the server's ends of its clients' connections."""
    rows = [line.split() for line in read("/proc/net/unix").splitlines()[1:]]
    return sum(1 for r in rows if len(r) >= 8 and r[5] == "03" and r[7] == path)


def demote(label: str) -> None:
    """`hastctl role init data` (after detaching ourselves in direct mode): nothing may be left."""
    if R["attach_mode"] == "direct" and R.get("direct_attachments"):
        from hastpy import attach

        try:
            att = attach.load_state(STATEDIR, RES)
            if att:
                attach.detach(att)
            step(f"{label}: direct detach", True)
        except Exception as exc:  # noqa: BLE001
            step(f"{label}: direct detach", False, f"{type(exc).__name__}: {exc}")
    res = hastctl("role", "init", RES, timeout=60)
    step(f"{label}: hastctl role init data", ok(res), brief(res))
    gone = wait_for(lambda: not os.path.lexists(LINK) and not nbd_connected(), 15)
    step(f"{label}: detached ({LINK} gone, no /sys/block/nbd*/pid)", gone,
         f"link={link_target()} connected={nbd_connected()}")  # fmt: skip


def make_files() -> dict[str, str]:
    rnd = random.Random(7)
    files = {
        "random-4m.bin": rnd.randbytes(4 * 2**20),
        "pattern-1m.bin": bytes(range(256)) * 4096,
        "dir/small.txt": b"hastpy VM test: written through /dev/hast/data\n" * 100,
    }
    sums = {}
    for name, data in files.items():
        path = os.path.join(MNT, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def first_pass(dev: str) -> bool:
    res = run(["mkfs.ext4", "-q", "-F", "-L", "hastvm", dev], 180)
    if not step("mkfs.ext4 /dev/hast/data", ok(res), brief(res)):
        return False
    res = run(["mount", "-t", "ext4", LINK, MNT], 60)
    if not step("mount", ok(res), brief(res)):
        return False
    try:
        R["checksums"] = make_files()
        step("files written", True, ", ".join(f"{k}={v[:12]}" for k, v in R["checksums"].items()))
    except OSError as exc:
        step("files written", False, str(exc))
    res = run(["umount", MNT], 60)
    return step("umount", ok(res), brief(res))


def second_pass(dev: str) -> bool:
    res = run(["e2fsck", "-fn", LINK], 120)
    step("e2fsck -fn after re-promote", ok(res), brief(res))
    res = run(["mount", "-t", "ext4", LINK, MNT], 60)
    if not step("mount after re-promote", ok(res), brief(res)):
        return False
    got = {}
    for name in R.get("checksums", {}):
        try:
            got[name] = sha256_of(os.path.join(MNT, name))
        except OSError as exc:
            got[name] = f"error: {exc}"
    R["checksums_read"] = got
    same = bool(got) and got == R.get("checksums")
    R["checksums_verified"] = same
    return step("checksums read back after detach and re-promote", same, json.dumps(got))


def kill9() -> None:
    """kill -9 of the primary worker with the filesystem mounted and direct writes in flight."""
    K: dict = {}
    R["kill9"] = K
    row = status() or {}
    pid = row.get("workerpid")
    if not pid:
        step("kill -9: worker pid", False, json.dumps(row))
        return
    dev = link_target()
    K.update(worker_pid=pid, device_before=dev)
    # O_DIRECT: every write goes to the device at once, so some are in flight at the kill. But a
    # direct write waits in blk_io_schedule(), which wakes every hung_task_timeout/2 precisely so
    # the hung-task detector stays quiet; the buffered writer's fsync waits where it does not.
    writers = {
        "direct": Child(["dd", "if=/dev/zero", f"of={MNT}/during-kill.bin", "bs=64k", "count=1600", "oflag=direct"]),
        "fsync": Child(["dd", "if=/dev/zero", f"of={MNT}/during-kill-2.bin", "bs=64k", "count=800", "conv=fsync"]),
    }
    time.sleep(1.5)
    K["writers_running_at_kill"] = [k for k, w in writers.items() if w.poll() is None]
    kmsg(f"kill -9 worker {pid}")
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    log(f"kill -9 {pid} (primary worker) with {dev} mounted and written, watching for {KILL_WATCH} s")
    since = lambda: round(time.monotonic() - t_kill, 1)  # noqa: E731
    samples, probes = [], []
    probe = cleanup = None
    while time.monotonic() - t_kill < KILL_WATCH:
        if probe is None:
            target = link_target() or dev
            probe = (since(), target, Child(["dd", f"if={target}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct"]))
        elif probe[2].poll() is not None or since() - probe[0] > 8:
            probes.append(_probe_result(probe, t_kill))
            probe = None
        asked = time.monotonic()
        row = status() or {}
        answered = round(time.monotonic() - asked, 1)
        if R["attach_mode"] == "direct" and EMULATE_CLEANUP and cleanup is None and row.get("workerpid") != pid:
            # Stand in for the supervisor, whose contract (hastpy.attach) is cleanup_stale()
            # whenever a worker died. In a thread: it may wait for the kernel.
            cleanup = _emulated_cleanup(K, since)
        samples.append({"t": since(), "hastd_answer_s": answered if answered >= 1 else "<1", "role": row.get("role"),
                        "workerpid": row.get("workerpid"), "attach_error": row.get("attach_error"), "link": link_target(),
                        "connected": nbd_connected(), "d_state": [t["comm"] for t in d_state_tasks()],
                        "error": row.get("error")})  # fmt: skip
        time.sleep(1.0)
    if probe is not None:
        probes.append(_probe_result(probe, t_kill, 5))
    if cleanup is not None:
        cleanup.join(15)
    K["writers"], K["writers_hung"] = {}, []
    for key, w in writers.items():
        ended = w.end is not None
        res = w.wait(5)
        end = f"ended at t+{w.end - t_kill:.1f}s: " if ended else "still running at the end of the watch: "
        K["writers"][key] = end + brief(res)
        if not ended or "hung" in res:
            K["writers_hung"].append(key)
    K["probes"] = probes
    K["samples"] = _squash(samples)
    K["device_after"] = link_target()
    K["recovered"] = bool(probes) and probes[-1]["ok"]
    K["d_state_during_watch"] = sorted({c for s in samples for c in s["d_state"]})
    write("/proc/sys/vm/drop_caches", "3")
    K["read_back_uncached"] = brief(run(["sha256sum", f"{MNT}/random-4m.bin"], 15))
    res = hastctl("list", RES, timeout=60)
    K["hastctl_list_after"] = res.get("out", brief(res)).splitlines()[:14]
    K["dmesg"] = [l for l in dmesg_since(f"kill -9 worker {pid}") if not _trace_line(l)][:40]
    K["hastd_log"] = hastd_log_tail(60)
    # Clean up: umount (lazily if it cannot), role init; nothing may be left connected or stuck.
    res = run(["umount", MNT], 30)
    K["umount"] = brief(res)
    if not ok(res):
        K["umount_lazy"] = brief(run(["umount", "-l", MNT], 30))
    res = hastctl("role", "init", RES, timeout=60)
    K["role_init"] = brief(res)
    if R["attach_mode"] == "direct":
        from hastpy import attach

        try:
            K["direct_cleanup"] = attach.cleanup_stale(RES, DEVDIR, STATEDIR)
        except Exception as exc:  # noqa: BLE001
            K["direct_cleanup"] = f"{type(exc).__name__}: {exc}"
    gone = wait_for(lambda: not os.path.lexists(LINK) and not nbd_connected(), 15)
    K["left_connected"] = nbd_connected()
    K["left_link"] = link_target()
    K["d_state_after"] = d_state_tasks()
    K["hung_task_reports"] = [l for l in dmesg() if "blocked for more than" in l]
    clean = not K["hung_task_reports"] and not K["d_state_after"] and not K["writers_hung"]
    K["verdict"] = ("recovered" if K["recovered"] else "failed cleanly") if clean else "hung"
    stuck = [t["comm"] for t in K["d_state_after"]]
    step("kill -9: the device recovers or fails cleanly (no hung task, nothing stuck in D state)", clean,
         f"{K['verdict']}; writers stuck: {K['writers_hung']}; hung-task reports: {len(K['hung_task_reports'])}; "
         f"D state during the watch: {K['d_state_during_watch']}, after: {stuck}")  # fmt: skip
    left = f"connected={K['left_connected']} link={K['left_link']}"
    step("kill -9: umount + role init leave nothing attached", gone, left)


def _probe_result(probe: tuple, t_kill: float, timeout: float = 0.1) -> dict:
    t, target, child = probe
    res = child.wait(timeout)
    done = round(child.end - t_kill, 1) if child.end is not None else None
    return {"t": t, "done": done, "dev": target, "ok": ok(res), "result": brief(res)}


def _emulated_cleanup(K: dict, since) -> threading.Thread:
    from hastpy import attach

    def work() -> None:
        t = since()
        try:
            done = attach.cleanup_stale(RES, DEVDIR, STATEDIR)
        except Exception as exc:  # noqa: BLE001
            done = [f"{type(exc).__name__}: {exc}"]
        K["emulated_cleanup"] = {"t": t, "took": round(since() - t, 1), "done": done}

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def _trace_line(line: str) -> bool:
    """A call-trace or register line of a kernel report (the report's first lines say what happened)."""
    text = line.split("] ", 1)[-1].strip()
    return "+0x" in text or text in ("<TASK>", "</TASK>", "Call Trace:") or re.match(r"R\w{1,3}: ", text) is not None


def _squash(samples: list[dict]) -> list[dict]:
    """Only the samples where something changed (the first one always)."""
    out, last = [], None
    for s in samples:
        key = {k: v for k, v in s.items() if k != "t"}
        if key != last:
            out.append(s)
            last = key
    return out


def main() -> int:
    try:
        setup()
        start_hastd()
        R["attach_mode"] = "supervisor" if supervisor_attaches() else "direct"
        log(f"attach mode: {R['attach_mode']}")
        dev = promote("first promote")
        R["nbd_device"] = dev
        if dev and first_pass(dev):
            demote("first demote")
            dev2 = promote("re-promote")
            R["nbd_device_2"] = dev2
            if dev2 and second_pass(dev2):
                kill9()
    except Exception:  # noqa: BLE001 - reported in the results
        R["failures"].append("exception: " + traceback.format_exc().splitlines()[-1])
        R["traceback"] = traceback.format_exc().splitlines()[-20:]
        log("\n".join(R["traceback"]))
    R["hastd_log_tail"] = hastd_log_tail(30)
    R["dmesg_tail"] = dmesg()[-30:]
    R["uptime"] = read("/proc/uptime").split()[0]
    R["seconds"] = round(time.monotonic() - T0, 1)
    if R.get("hastd_pid"):
        try:
            os.kill(R["hastd_pid"], signal.SIGTERM)
        except OSError:
            pass
    try:
        write("/proc/sys/kernel/printk", "1")  # no kernel lines inside the result block
    except OSError:
        pass
    print("HASTPY-VM-RESULT-BEGIN", flush=True)
    print(json.dumps(R, separators=(",", ":")), flush=True)
    print("HASTPY-VM-RESULT-END", flush=True)
    return 1 if R["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
