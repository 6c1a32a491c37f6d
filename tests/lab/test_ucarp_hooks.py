"""The rendered ucarp upscript, run the way ucarp runs it (ucarp's child, `IFACE VIP XPARAM`):
when `hastctl promote` reports that the peer is still primary (exit 75), the script gives the VIP
back by sending ucarp SIGUSR2; on any other outcome ucarp is left alone. No lab needed: the
interface does not exist, so the script's `ip addr add` and arping change nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hastpy import hookscripts

NO_SUCH_IFACE = "hastpy-none0"  # the script's ip/arping calls fail harmlessly on it
TEST_NET_VIP = "192.0.2.1"  # RFC 5737 documentation address: never a real VIP
SIGNAL_WAIT = 10.0  # the promote runs in the background; generous for a loaded machine
# A stand-in for ucarp: names itself "ucarp" (what the script checks before signalling), runs the
# upscript as its child and waits for its background work, reporting whether SIGUSR2 arrived.
FAKE_UCARP = textwrap.dedent("""
    import ctypes, signal, subprocess, sys, time
    PR_SET_NAME = 15
    ctypes.CDLL(None).prctl(PR_SET_NAME, b"ucarp", 0, 0, 0)
    got = []
    signal.signal(signal.SIGUSR2, lambda *a: got.append(1))
    subprocess.run([sys.argv[1], sys.argv[2], sys.argv[3], "node-a"], check=True)
    deadline = time.monotonic() + float(sys.argv[4])
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    print("USR2" if got else "none")
""")


def run_upscript(tmp_path, hastctl_status: int) -> str:
    fake = tmp_path / "hastctl"
    fake.write_text(f"#!/bin/sh\nexit {hastctl_status}\n")
    fake.chmod(0o755)
    settings = hookscripts.HookSettings(
        hastctl=str(fake), config=str(tmp_path / "hast.conf"),
        resources=(hookscripts.HookResource("data", str(tmp_path / "mnt")),),
        vip=TEST_NET_VIP, vip_prefix=24, interface=NO_SUCH_IFACE, logfile=str(tmp_path / "failover.log"),
    )  # fmt: skip
    up = tmp_path / "vip-up.sh"
    up.write_text(hookscripts.render("ucarp", settings)["vip-up.sh"])
    up.chmod(0o755)
    wait = SIGNAL_WAIT if hastctl_status == 75 else 2.0
    cp = subprocess.run([sys.executable, "-c", FAKE_UCARP, str(up), NO_SUCH_IFACE, TEST_NET_VIP, str(wait)],
                        capture_output=True, text=True, timeout=SIGNAL_WAIT + 30)  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    return cp.stdout.strip().splitlines()[-1]


def test_upscript_gives_the_vip_back_when_the_peer_stays_primary(tmp_path):
    assert run_upscript(tmp_path, 75) == "USR2"


@pytest.mark.parametrize("status", [0, 69, 73])
def test_upscript_keeps_the_vip_otherwise(tmp_path, status):
    # 0 promoted; 69 hastd unreachable and 73 mount failed are not the peer's doing: giving the
    # VIP back would not help, and the log says what to fix.
    assert run_upscript(tmp_path, status) == "none"
