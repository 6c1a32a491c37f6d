"""The attach layer's record and helpers that need no root: state file round trip, method choice,
mountinfo and /proc parsing, the link, bounded commands, and clean-up of records that cannot
name a live kernel object (another boot, the `none` method, nothing recorded)."""

import json
import os
import time

import pytest

import hastpy.attach as attach_mod
from hastpy.attach import base, fuse
from hastpy.attach.base import Attachment, AttachError, DeviceBusy
from hastpy.errors import HastError, UsageError


def make_att(tmp_path, **over) -> Attachment:
    fields = dict(
        method="fuse",
        name="data",
        provname="data",
        socket_path="/run/hastd-data.nbd",
        size=1 << 30,
        devdir=str(tmp_path / "dev"),
        statedir=str(tmp_path / "state"),
        device="/dev/loop3",
        link=str(tmp_path / "dev" / "data"),
        mountdir=str(tmp_path / "state" / "data.fuse"),
        fuse_file=str(tmp_path / "state" / "data.fuse" / "data"),
        fuse_dev="0:55",
        nbdfuse_pid=4242,
        nbdfuse_start=123456,
        boot_id="b0",
        created=1700000000.5,
    )
    fields.update(over)
    return Attachment(**fields)


# --- state file -------------------------------------------------------------------------------


def test_state_round_trip(tmp_path):
    att = make_att(tmp_path)
    base.save_state(att)
    path = base.state_path(att.statedir, "data")
    assert path.endswith("/state/data.attach.json")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.listdir(att.statedir) == ["data.attach.json"]  # no temporary file left behind
    back = base.load_state(att.statedir, "data")
    assert back == att
    on_disk = json.loads(open(path).read())
    assert on_disk["version"] == base.STATE_VERSION
    assert on_disk["nbdfuse_pid"] == 4242 and on_disk["device"] == "/dev/loop3"


def test_state_kernel_fields_round_trip(tmp_path):
    att = make_att(tmp_path, method="kernel", device="/dev/nbd2", nbd_index=2, backend_id="hastpy:/x/data",
                   mountdir=None, fuse_file=None, fuse_dev=None, nbdfuse_pid=None, nbdfuse_start=None)
    base.save_state(att)
    assert base.load_state(att.statedir, "data") == att


def test_state_overwrite_and_remove(tmp_path):
    att = make_att(tmp_path)
    base.save_state(att)
    att.device = "/dev/loop5"
    base.save_state(att)
    assert base.load_state(att.statedir, "data").device == "/dev/loop5"
    base.remove_state(att.statedir, "data")
    base.remove_state(att.statedir, "data")  # idempotent
    assert base.load_state(att.statedir, "data") is None


def test_state_from_newer_or_older_hastpy(tmp_path):
    statedir = tmp_path / "state"
    statedir.mkdir()
    (statedir / "data.attach.json").write_text(
        json.dumps({"method": "none", "name": "data", "future_field": [1, 2], "version": 99})
    )
    att = base.load_state(str(statedir), "data")
    assert att.method == "none" and att.provname == "data" and att.device is None


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"name": "data"}),  # no method
        json.dumps({"method": "fuse", "name": "data", "size": "big"}),
        json.dumps({"method": "fuse", "name": "data", "nbdfuse_pid": True}),
        json.dumps({"method": "fuse", "name": "data", "device": 3}),
    ],
)
def test_unreadable_state_raises_attach_error(tmp_path, content):
    statedir = tmp_path / "state"
    statedir.mkdir()
    (statedir / "data.attach.json").write_text(content)
    with pytest.raises(AttachError, match="unreadable attach state"):
        base.load_state(str(statedir), "data")


# --- choose_method ----------------------------------------------------------------------------


def test_choose_method(monkeypatch):
    monkeypatch.setattr(attach_mod, "kernel_usable", lambda: True)
    assert attach_mod.choose_method("auto") == "kernel"
    monkeypatch.setattr(attach_mod, "kernel_usable", lambda: False)
    assert attach_mod.choose_method("auto") == "fuse"
    for method in ("kernel", "fuse", "none"):
        assert attach_mod.choose_method(method) == method
    with pytest.raises(UsageError, match="attach must be one of"):
        attach_mod.choose_method("ublk")


def test_errors_are_hast_errors_with_exit_codes():
    busy = DeviceBusy("/dev/loop3", "mounted on /mnt/x", "data")
    assert isinstance(busy, HastError) and busy.exit_code == os.EX_TEMPFAIL
    assert str(busy) == "data: /dev/loop3 is busy (mounted on /mnt/x); unmount or close it first"
    assert busy.reason == "mounted on /mnt/x"
    assert issubclass(AttachError, HastError) and AttachError.exit_code == os.EX_OSERR


# --- parsers ----------------------------------------------------------------------------------

MOUNTINFO = (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "42 22 0:39 / /run/hast\\040state/data.fuse rw,nosuid,nodev,relatime shared:7 master:2 - fuse hastpy:data rw,user_id=0\n"
    "43 22 7:3 / /mnt/x rw,relatime - ext4 /dev/loop3 rw\n"
    "44 22 0:40 /sub /srv/bind rw - tmpfs tmp\\134fs rw\n"
    "garbage line\n"
)


def test_parse_mountinfo():
    mounts = base.parse_mountinfo(MOUNTINFO)
    assert len(mounts) == 4
    fuse_mount = mounts[1]
    assert fuse_mount.mountpoint == "/run/hast state/data.fuse"  # \040 is a space
    assert (fuse_mount.dev, fuse_mount.fstype, fuse_mount.source) == ("0:39", "fuse", "hastpy:data")
    assert mounts[2].dev == "7:3" and mounts[2].source == "/dev/loop3"
    assert mounts[3].root == "/sub" and mounts[3].source == "tmp\\fs"
    assert base.devnum("7:3") == os.makedev(7, 3)


def test_read_mounts_sees_root():
    assert any(m.mountpoint == "/" for m in base.read_mounts())


def test_parse_proc_stat_with_awkward_command_names():
    text = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 987654 1000 10\n"
    assert base.parse_proc_stat(text) == ("S", 1, 987654)


def test_own_process_identity():
    me = os.getpid()
    start = base.proc_start_time(me)
    assert start is not None and base.proc_alive(me, start)
    assert not base.proc_alive(me, start + 1)  # same pid, another start time: not the same process
    assert base.mount_ns() == base.mount_ns(me)
    assert base.proc_cmdline(me) and base.proc_comm(me)


def test_nbd_uri_quotes_name_and_path():
    assert fuse.nbd_uri("/run/hastd-data.nbd", "data") == "nbd+unix:///data?socket=/run/hastd-data.nbd"
    assert fuse.nbd_uri("/tmp/a b&c.sock", "x/y?") == "nbd+unix:///x%2Fy%3F?socket=/tmp/a%20b%26c.sock"


def test_fuse_paths_follow_the_naming_convention(tmp_path):
    mountdir, fuse_file, pidfile, logfile = fuse.fuse_paths(str(tmp_path), "data")
    real = os.path.realpath(tmp_path)
    assert (mountdir, fuse_file) == (f"{real}/data.fuse", f"{real}/data.fuse/data")
    assert (pidfile, logfile) == (f"{real}/data.nbdfuse.pid", f"{real}/data.nbdfuse.log")


# --- the link ---------------------------------------------------------------------------------


def test_make_link_replaces_stale_symlink_atomically(tmp_path):
    link = str(tmp_path / "dev" / "data")
    base.make_link(link, "/dev/loop1")
    assert os.readlink(link) == "/dev/loop1"
    base.make_link(link, "/dev/loop2")
    assert os.readlink(link) == "/dev/loop2"
    assert os.listdir(tmp_path / "dev") == ["data"]


def test_make_link_refuses_to_replace_a_real_file(tmp_path):
    (tmp_path / "data").write_text("not ours")
    with pytest.raises(AttachError, match="not a symbolic link"):
        base.make_link(str(tmp_path / "data"), "/dev/loop1")


def test_remove_link(tmp_path):
    link = str(tmp_path / "data")
    assert base.remove_link(None) is None
    assert base.remove_link(link) is None  # nothing there
    os.symlink("/dev/loop9", link)
    assert base.remove_link(link, {"/dev/loop1"}) is None  # points elsewhere: left alone
    assert os.path.islink(link)
    assert base.links_to(str(tmp_path), ["/dev/loop9"]) == [link]
    assert base.remove_link(link, {"/dev/loop9"}) == f"removed link {link} -> /dev/loop9"
    assert not os.path.lexists(link)
    (tmp_path / "file").write_text("x")
    assert base.remove_link(str(tmp_path / "file")) is None
    assert (tmp_path / "file").exists()


# --- bounded commands -------------------------------------------------------------------------


def test_run_command_results():
    ok = base.run_command(["sh", "-c", "echo out; echo err >&2"], 5)
    assert ok.ok and ok.stdout == "out\n" and ok.stderr == "err\n"
    bad = base.run_command(["sh", "-c", "echo nope >&2; exit 3"], 5)
    assert bad.returncode == 3 and bad.describe() == "`sh -c echo nope >&2; exit 3` exit status 3: nope"
    missing = base.run_command(["/nonexistent/hastpy-tool"], 5)
    assert missing.returncode == 127 and not missing.ok


def test_run_command_timeout_is_bounded():
    started = time.monotonic()
    result = base.run_command(["sleep", "30"], 0.2)
    assert result.returncode is None and "timed out" in result.describe()
    assert time.monotonic() - started < 0.2 + base.KILL_GRACE


def test_wait_until():
    assert base.wait_until(lambda: True, 0)
    started = time.monotonic()
    assert not base.wait_until(lambda: False, 0.1)
    assert 0.1 <= time.monotonic() - started < 1


# --- records that name no live kernel object --------------------------------------------------


def test_busy_is_none_without_a_device(tmp_path):
    assert attach_mod.busy(make_att(tmp_path, method="none", device=None, link=None)) is None
    # A record from another boot cannot describe anything live, whatever its device says.
    assert attach_mod.busy(make_att(tmp_path, boot_id="another-boot")) is None


def test_cleanup_stale_with_nothing_recorded(tmp_path):
    assert attach_mod.cleanup_stale("data", str(tmp_path / "dev"), str(tmp_path / "state")) == []


def test_cleanup_stale_record_from_an_earlier_boot(tmp_path):
    att = make_att(tmp_path, boot_id="an-earlier-boot", nbdfuse_pid=os.getpid(),
                   nbdfuse_start=base.proc_start_time(os.getpid()))
    base.save_state(att)
    os.makedirs(att.mountdir)
    base.make_link(att.link, att.device)
    done = attach_mod.cleanup_stale("data", att.devdir, att.statedir)
    assert done[0] == "recorded attachment is from an earlier boot"
    assert f"removed link {att.link} -> /dev/loop3" in done
    assert not any("stopped" in d or "killed" in d for d in done)  # the recorded pid is not trusted
    assert not os.path.lexists(att.link)
    assert not os.path.exists(att.mountdir)
    assert base.load_state(att.statedir, "data") is None


def test_cleanup_stale_with_a_corrupt_record_removes_it(tmp_path):
    statedir = tmp_path / "state"
    statedir.mkdir()
    (statedir / "data.attach.json").write_text("{")
    assert attach_mod.cleanup_stale("data", str(tmp_path / "dev"), str(statedir)) == []
    assert not (statedir / "data.attach.json").exists()


def test_none_method_attach_and_detach(tmp_path):
    statedir, devdir = str(tmp_path / "state"), str(tmp_path / "dev")
    att = attach_mod.attach("none", "data", "data", "/run/hastd-data.nbd", 4096, devdir, statedir)
    assert (att.method, att.device, att.link, att.socket_path) == ("none", None, None, "/run/hastd-data.nbd")
    assert base.load_state(statedir, "data") == att
    assert attach_mod.busy(att) is None
    attach_mod.detach(att)
    assert base.load_state(statedir, "data") is None
    assert not os.path.exists(devdir)


def test_kernel_backend_identifier_support_by_release():
    from hastpy.attach.kernel import backend_identifier, kernel_has_backend_ids

    assert kernel_has_backend_ids("5.14.0") and kernel_has_backend_ids("6.1.0-28-amd64")
    assert kernel_has_backend_ids("6.18.44-fc-v669")
    assert not kernel_has_backend_ids("5.10.0-30-amd64") and not kernel_has_backend_ids("4.19.0")
    assert not kernel_has_backend_ids("garbage")
    assert backend_identifier("/run/hastd", "data") == f"hastpy:{os.path.realpath('/run/hastd')}/data"
