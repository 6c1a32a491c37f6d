"""hastd when a primary worker cannot run: the role goes back to init and says why.

FreeBSD's hastd changes a primary whose worker cannot run back to init; hastpy does the same
whether the worker could not be started at all (hastctl gets the error and exit 71 at once) or
started and exited with an error, and `hastctl list` shows the reason until the next role change.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from harness import BIN, wait_for

pytestmark = pytest.mark.integration

# The worker's failure is noticed by hastd's loop (SIGCHLD) within a tick; this is only a bound.
REAP_TIMEOUT = 30.0
# hastd that cannot start exits at once; this only bounds a hang.
HASTD_EXIT_TIMEOUT = 30.0


def test_primary_worker_that_cannot_start_reverts_to_init(make_pair):
    pair = make_pair().start(connect=False)
    a = pair.a
    # Something that is not a socket where the worker's NBD socket goes: binding it fails.
    os.mkdir(a.nbd_socket)

    cp = a.hastctl("role", "primary", "data", check=False)
    assert cp.returncode == os.EX_OSERR, cp
    assert "hastctl: data: unable to start the primary worker:" in cp.stderr
    assert "role changed to init" in cp.stderr and "Traceback" not in cp.stderr
    st = a.status()
    assert (st["role"], st["workerpid"]) == ("init", 0)
    assert "unable to start the primary worker" in st["worker_error"]
    assert "worker error: unable to start the primary worker" in a.hastctl("list", "data").stdout
    assert "Unable to start the primary worker" in a.log.read_text()

    os.rmdir(a.nbd_socket)
    pair.b.role("secondary")
    a.role("primary")
    pair.wait_complete()
    st = a.status()
    assert st["role"] == "primary" and st["workerpid"] and st["worker_error"] is None


def test_primary_worker_that_exits_with_an_error_reverts_to_init(make_pair):
    pair = make_pair().start(connect=False)
    a = pair.a
    a.disk.unlink()  # the worker cannot open its provider: exits with EX_NOINPUT

    # hastd accepts the role and the worker fails after: hastctl waits for the worker to serve
    # or fail, so a script's `role primary && mount` stops here, with the worker's code.
    cp = a.hastctl("role", "primary", "data", check=False)
    assert cp.returncode == os.EX_NOINPUT, cp
    why = f"Unable to open {a.disk}: No such file or directory"  # the worker's own reason
    assert cp.stderr == f"hastctl: data: {why}; role changed to init\n"
    st = wait_for(lambda: (s := a.status())["role"] == "init" and s, REAP_TIMEOUT, what="role back to init")
    assert st["workerpid"] == 0
    assert st["worker_error"] == f"{why}."
    assert f"Primary worker exited with status {os.EX_NOINPUT}: role changed to init." in a.log.read_text()


def test_role_primary_all_waits_for_every_resource_and_returns_the_first_error(make_pair):
    pair = make_pair(resources=["data", "extra"]).start(connect=False)
    a = pair.a
    a.disk_of("data").unlink()
    for res in pair.resources:
        pair.b.role("secondary", res)
    cp = a.hastctl("role", "primary", "all", check=False)
    assert cp.returncode == os.EX_NOINPUT, cp
    assert cp.stderr.startswith("hastctl: data: Unable to open ") and cp.stderr.count("\n") == 1
    st = a.status("extra")  # waited for too: serving when hastctl returned
    assert (st["role"], st["serving"]) == ("primary", True)


def test_leaving_primary_with_nbd_clients_connected_is_refused(make_pair):
    """With `attach none` the socket is the disk (a QEMU's, say): leaving primary while clients
    are connected is refused as for a mounted /dev/hast/<name> (exit 75, nothing torn down), and
    so is a reload that would restart the resource (it waits for the next role change)."""
    pair = make_pair().start()
    a = pair.a
    client = a.client()
    client.pwrite(0, b"q" * 4096)
    pid = a.status()["workerpid"]
    assert a.status()["nbd_clients"] == 1 and "nbdclients: 1" in a.hastctl("list", "data").stdout

    cp = a.hastctl("role", "secondary", "data", check=False)
    assert cp.returncode == os.EX_TEMPFAIL, cp
    assert cp.stderr == f"hastctl: data: {a.nbd_socket} is busy (1 NBD client connected); disconnect them first\n"
    a.params["res_extra"] = {"data": ["name other"]}
    a.write_conf(pair.a.dir, pair.b.dir, pair.ip_a, pair.ip_b)
    a.reload()
    wait_for(lambda: "Configuration reloaded, except for data (device busy)." in a.log.read_text(), what="reload")
    st = a.status()
    assert (st["role"], st["workerpid"], st["config_pending"]) == ("primary", pid, True)
    assert client.pread(0, 4096) == b"q" * 4096  # still served, same connection

    client.disconnect()
    wait_for(lambda: a.status()["nbd_clients"] == 0, what="the client gone")
    a.role("secondary")
    assert (a.status()["role"], a.status()["provname"]) == ("secondary", "other")

    pair.b.role("init")
    a.role("primary")
    forced = a.client()
    a.hastctl("role", "--force", "init", "data")  # --force: the client is dropped
    with pytest.raises(OSError):
        forced.pread(0, 4096)


def test_workers_ignore_a_hastpy_directory_in_hastds_working_directory(make_pair, tmp_path):
    """hastd may run where a directory named hastpy sits (its state directory next to the
    control socket, a checkout): the workers it starts must still import the installed package."""
    cwd = tmp_path / "cwd"
    shadow = cwd / "hastpy"
    shadow.mkdir(parents=True)
    for name in ("__init__.py", "worker.py"):
        (shadow / name).write_text("raise SystemExit('the shadowing hastpy was imported')\n")
    pair = make_pair()
    for node in (pair.a, pair.b):
        node.params["cwd"] = str(cwd)
    pair.start()
    c = pair.a.client()
    c.pwrite(0, b"s" * 4096)
    c.flush()
    c.disconnect()
    assert pair.b.data()[:4096] == b"s" * 4096
    assert "shadowing" not in pair.a.log.read_text() + pair.b.log.read_text()


def _hastd(node, *args: str) -> subprocess.CompletedProcess:
    argv = [str(BIN / "hastd"), "-F", "-c", str(node.conf), "-n", node.name, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=HASTD_EXIT_TIMEOUT)


def test_hastd_start_errors_are_one_line_with_the_sysexits_code(make_pair, tmp_path):
    """What stops hastd from starting is said in one line with what it could not have, and the
    code FreeBSD's hastd exits with: another hastd running 75 (EX_TEMPFAIL), an address it cannot
    listen on or a control socket it cannot create 71 (EX_OSERR)."""
    pair = make_pair().start(connect=False)
    a = pair.a
    second = _hastd(a)  # the same pid file, locked by the running hastd
    assert second.returncode == os.EX_TEMPFAIL and second.stderr.count("\n") == 1, second
    assert "hastd is already running (pid file" in second.stderr
    a.stop()

    conf = a.conf.read_text()
    a.conf.write_text(conf.replace(f"listen {a.ip}:8457", "listen 192.0.2.77:8457"))  # not ours
    cp = _hastd(a)
    assert cp.returncode == os.EX_OSERR and cp.stderr.count("\n") == 1, cp
    assert "Unable to listen on 192.0.2.77:8457: Cannot assign requested address" in cp.stderr

    afile = tmp_path / "afile"
    afile.write_text("")
    a.conf.write_text(conf.replace(f"control {a.dir / 'ctl'}", f"control {afile}/ctl"))
    cp = _hastd(a)
    assert cp.returncode == os.EX_OSERR and cp.stderr.count("\n") == 1, cp
    assert f"Unable to create the control socket {afile}/ctl:" in cp.stderr
    assert "Traceback" not in cp.stderr


@pytest.mark.parametrize("what", ["directory", "missing", "device"])
def test_an_unusable_config_file_is_a_configuration_error(tmp_path, what):
    """-c naming a directory, nothing, or a device: one line naming it, exit 78 from both."""
    path = {"directory": str(tmp_path), "missing": str(tmp_path / "nope.conf"), "device": "/dev/zero"}[what]
    for argv in ([str(BIN / "hastctl"), "list", "-c", path], [str(BIN / "hastd"), "-F", "-c", path]):
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=HASTD_EXIT_TIMEOUT)
        assert cp.returncode == os.EX_CONFIG and cp.stderr.count("\n") == 1, cp
        assert cp.stderr.startswith(f"{os.path.basename(argv[0])}: {path}: ")
