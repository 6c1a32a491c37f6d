"""/dev/hast/<name> on Linux's nbd driver, in a qemu guest (this machine's kernel has no modules).

One boot runs tests/vm/guest_test.py in the guest (see its docstring for the steps); the tests
below each check one part of its report. The summary (guest kernel, nbd device, checksums, what
kill -9 of the worker did) is printed whether the tests pass or not.

Skipped, with the reason, only where qemu cannot run here: not installed and not installable (not
root), or the guest not built and not buildable (not root). With CI=true those fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .guest import Guest, GuestError

pytestmark = [pytest.mark.integration, pytest.mark.vm]

GUEST_TEST = Path(__file__).with_name("guest_test.py")
BOOT_TIMEOUT = 240  # seconds from qemu start to power-off; a normal run takes about 70 s
HOST_PACKAGES = ("qemu-system-x86", "debootstrap")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip with the reason; in CI, fail: a CI machine must be able to run this test."""
    if in_ci():
        pytest.fail(f"VM test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"VM test: {reason}")


def ensure_qemu() -> str:
    qemu = Guest.qemu_binary()
    if not qemu and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *HOST_PACKAGES]
        if subprocess.run(cmd, capture_output=True, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            subprocess.run(cmd, capture_output=True, env=env)
        qemu = Guest.qemu_binary()
    if not qemu:
        unavailable("qemu-system-x86_64 is not installed and cannot be installed here (not root); "
                    f"apt-get install --no-install-recommends {' '.join(HOST_PACKAGES)}")  # fmt: skip
    proc = subprocess.run([qemu, "--version"], capture_output=True, text=True)
    if proc.returncode != 0:
        unavailable(f"{qemu} --version failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.splitlines()[0]


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory):
    """Build (or reuse) the guest, boot it once with guest_test.py; the result and a summary."""
    qemu_version = ensure_qemu()
    guest = Guest(log=lambda msg: None)
    if not guest.cached():
        if os.geteuid() != 0:
            unavailable(f"the guest is not built in {guest.cache} and building it needs root (debootstrap)")
        if guest.missing_build_tools():
            unavailable(f"building the guest needs {', '.join(guest.missing_build_tools())}")
    t = time.monotonic()
    try:
        layers = guest.build()
    except GuestError as exc:
        pytest.fail(f"building the VM guest failed: {exc}", pytrace=False)
    build_s = time.monotonic() - t
    console = tmp_path_factory.mktemp("vm") / "console.log"
    res = guest.boot(GUEST_TEST, timeout=BOOT_TIMEOUT, console_log=console)
    summary = format_summary(res, qemu_version, build_s, layers.timings, console)
    return res, res.results or {}, summary


@pytest.fixture(scope="module")
def report(guest_run, request):
    res, r, summary = guest_run
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman:
        with capman.global_and_fixture_disabled():
            print("\n" + summary, flush=True)
    else:
        print("\n" + summary, flush=True)
    assert not res.timed_out, f"the guest did not power off within {BOOT_TIMEOUT} s; console:\n{res.tail()}"
    assert r, f"no results from the guest (exit {res.exit_code}, qemu rc {res.qemu_rc}); console:\n{res.tail()}"
    return r


def steps_failed(r: dict, prefix: str = "") -> list[str]:
    return [f"{s['name']}: {s['detail']}" for s in r["steps"] if not s["ok"] and s["name"].startswith(prefix)]


def test_guest_loads_nbd(report):
    assert report["kernel"], report
    assert report["nbd_module"], steps_failed(report, "modprobe")
    assert not steps_failed(report, "hastctl create") and not steps_failed(report, "hastd started"), report["hastd_log_tail"]


def test_supervisor_attaches_kernel_nbd(report):
    assert report["attach_mode"] == "supervisor", (
        "hastd's supervisor does not attach yet; the guest attached through hastpy.attach directly "
        "(the rest of the test ran on that device)"
    )


def test_mkfs_mount_checksums_survive_detach_and_repromote(report):
    dev = report.get("nbd_device") or ""
    assert dev.startswith("/dev/nbd"), steps_failed(report, "first promote") or report.get("attach_error")
    assert not steps_failed(report, "first promote") and not steps_failed(report, "re-promote")
    assert not [s for s in steps_failed(report) if s.startswith(("mkfs", "mount", "files", "umount", "e2fsck"))]
    sums = (report.get("checksums"), report.get("checksums_read"))
    assert report.get("checksums") and report.get("checksums_verified"), sums


def test_role_init_detaches(report):
    assert not steps_failed(report, "first demote"), report["hastd_log_tail"]


def test_kill9_worker_recovers_or_fails_cleanly(report):
    k = report.get("kill9")
    assert k, "the kill -9 part did not run: " + "; ".join(report["failures"])
    assert not k["hung_task_reports"], "\n".join(k["hung_task_reports"] + k["dmesg"])
    facts = {x: k.get(x) for x in ("writers", "d_state_during_watch", "d_state_after", "probes", "dmesg")}
    assert k["verdict"] in ("recovered", "failed cleanly"), json.dumps(facts, indent=1)
    assert not k["left_connected"] and not k["left_link"], (k["left_connected"], k["left_link"], k["role_init"])


def test_guest_reports_no_other_failure(report):
    assert not report["failures"], "\n".join(report["failures"])


def format_summary(res, qemu_version: str, build_s: float, timings: dict, console: Path) -> str:
    r = res.results or {}
    built = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) or "all layers cached"
    lines = [
        "---- VM test (tests/vm) ----",
        f"host qemu: {qemu_version}; build {build_s:.1f} s ({built}); boot+test {res.seconds:.1f} s; "
        f"guest exit {res.exit_code}; console log {console}",
    ]  # fmt: skip
    if not r:
        return "\n".join(lines + ["no results; console tail:", res.tail(40)])
    lines += [
        f"guest kernel: {r.get('kernel')}  python {r.get('python')}  attach mode: {r.get('attach_mode')}",
        f"nbd device: {r.get('nbd_device')} (after re-promote: {r.get('nbd_device_2')})",
    ]
    for name, digest in (r.get("checksums") or {}).items():
        back = (r.get("checksums_read") or {}).get(name)
        lines.append(f"  sha256 {name}: {digest} {'verified' if back == digest else f'READ BACK {back}'}")
    k = r.get("kill9")
    if k:
        lines += [
            f"kill -9 of worker {k['worker_pid']}: {k['verdict']}; "
            f"link before {k['device_before']}, after {k['device_after']}",
            f"  writers running at the kill: {k['writers_running_at_kill']}",
            *(f"  writer {key} (dd): {text[:300]}" for key, text in k["writers"].items()),
            "  probe reads (dd iflag=direct, 4 KiB): " + "; ".join(
                f"t+{p['t']}-{p['done']}s {p['dev']} {'ok' if p['ok'] else p['result'][:70]}" for p in k["probes"][:8]),
            f"  a file read back with caches dropped: {k['read_back_uncached'][:120]}",
            f"  tasks in D state during the watch: {k['d_state_during_watch'] or 'none'}; after cleanup: "
            f"{[t['comm'] for t in k['d_state_after']] or 'none'}",
            f"  hung-task reports (threshold {r.get('hung_task_timeout_secs')} s): {len(k['hung_task_reports'])}",
            f"  umount: {k['umount']}; role init: {k['role_init']}; left connected: {k['left_connected'] or 'none'}",
        ]  # fmt: skip
        if k.get("emulated_cleanup"):
            e = k["emulated_cleanup"]
            lines.append(f"  (direct mode) cleanup_stale at t+{e['t']}s took {e['took']} s: {e['done']}")
        lines.append("  samples (when something changed):")
        lines += [f"    t+{s['t']}s hastd answered in {s.get('hastd_answer_s')} s: role={s['role']} "
                  f"worker={s['workerpid']} link={s['link']} connected={s['connected']} D={s['d_state']}"
                  + (f" attach_error={s['attach_error']!r}" if s.get("attach_error") else "")
                  for s in k["samples"]]  # fmt: skip
        lines.append("  hastctl list after: " + " | ".join(x.strip() for x in k["hastctl_list_after"][:8]))
        lines.append("  dmesg after the kill:")
        lines += [f"    {l}" for l in k["dmesg"][:25]]
        lines.append("  hastd log after the kill:")
        lines += [f"    {l}" for l in k["hastd_log"][-8:]]
    if r.get("failures"):
        lines.append("failures: " + "; ".join(r["failures"]))
    return "\n".join(lines)
