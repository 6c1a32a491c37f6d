"""hastpy.hooks: argv, clean environment and descriptors, exit logging, timeouts (real processes).

Each hook here is a tiny Python or shell script that records what it saw into a file; the tests
poll HookRunner the way the supervisor loop does and wait on conditions, never on fixed sleeps.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from hastpy import hooks
from hastpy.hooks import HOOK_ENV, HookRunner

# The recorder: argv, the environment exactly as execve passed it (Python itself would add
# LC_CTYPE to os.environ under LANG=C), open descriptors, cwd and session.
RECORDER = """\
#!{python} -I
import json, os, sys
fds = {{}}
for fd in os.listdir("/proc/self/fd"):  # listdir's own descriptor is closed before readlink
    try:
        fds[fd] = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        pass
with open("/proc/self/environ", "rb") as f:
    env = dict(kv.split("=", 1) for kv in f.read().decode().split("\\0") if kv)
rec = {{"argv": sys.argv, "env": env, "fds": fds, "cwd": os.getcwd(),
       "session_leader": os.getsid(0) == os.getpid(), "pid": os.getpid()}}
with open({out!r}, "a") as f:
    f.write(json.dumps(rec) + "\\n")
"""


def _script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def runner():
    r = HookRunner()
    yield r
    # Nothing a test started may outlive it.
    for h in list(r._running):
        try:
            os.killpg(h.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        h.proc.wait()


def _poll_until(runner: HookRunner, predicate, timeout: float = 20.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        runner.poll()
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _records(out: Path) -> list[dict]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie left for its parent to reap is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def recorder(tmp_path):
    out = tmp_path / "rec.jsonl"
    return _script(tmp_path / "hook.py", RECORDER.format(python=sys.executable, out=str(out))), out


@pytest.mark.parametrize(
    "event,args",
    [
        ("role", ("init", "primary")),
        ("connect", ()),
        ("disconnect", ()),
        ("syncstart", ()),
        ("syncdone", ()),
        ("syncintr", ()),
        ("split-brain", ()),
    ],
)
def test_argv_is_program_event_resource_args(runner, recorder, event, args):
    prog, out = recorder
    runner.run(prog, event, "data", *args)
    runner.wait_all(20)
    assert runner.running == 0
    (rec,) = _records(out)
    assert rec["argv"] == [prog, event, "data", *args]


def test_environment_is_only_path_and_lang(runner, recorder, monkeypatch):
    prog, out = recorder
    monkeypatch.setenv("HASTPY_SECRET", "must-not-leak")
    runner.run(prog, "connect", "data")
    runner.wait_all(20)
    (rec,) = _records(out)
    assert rec["env"] == HOOK_ENV
    assert set(rec["env"]) == {"PATH", "LANG"}


def test_only_stdio_on_dev_null_is_inherited(runner, recorder):
    prog, out = recorder
    # Descriptors a careless exec would leak: inheritable ones, with and without CLOEXEC.
    r, w = os.pipe()
    os.set_inheritable(r, True)
    os.set_inheritable(w, True)
    leak = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leak, True)
    try:
        runner.run(prog, "disconnect", "data")
        runner.wait_all(20)
    finally:
        for fd in (r, w, leak):
            os.close(fd)
    (rec,) = _records(out)
    assert rec["fds"] == {"0": "/dev/null", "1": "/dev/null", "2": "/dev/null"}


def test_runs_in_root_dir_and_own_session(runner, recorder):
    prog, out = recorder
    runner.run(prog, "syncdone", "data")
    runner.wait_all(20)
    (rec,) = _records(out)
    assert rec["cwd"] == "/"
    assert rec["session_leader"] is True


def test_no_program_is_a_no_op(runner):
    runner.run(None, "connect", "data")
    runner.run("", "connect", "data")
    assert runner.running == 0


def test_unknown_event_is_refused(runner, recorder):
    prog, _ = recorder
    for event in ("start", "stop", "reload", "Connect"):  # hastd has no such hooks (hast.md §8)
        with pytest.raises(ValueError):
            runner.run(prog, event, "data")
    assert runner.running == 0


def test_hooks_run_concurrently_and_are_not_waited_for(runner, tmp_path):
    gate = tmp_path / "gate"
    out = tmp_path / "out"
    prog = _script(tmp_path / "hook.sh", f'#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.02; done\necho "$*" >> {out}\n')
    started = time.monotonic()
    for ev in ("connect", "syncstart", "syncdone"):
        runner.run(prog, ev, "data")
    assert time.monotonic() - started < 5  # run() returns at once: never waits for the hook
    assert runner.running == 3
    gate.touch()
    _poll_until(runner, lambda: runner.running == 0, what="all hooks done")
    assert sorted(out.read_text().split("\n")[:-1]) == ["connect data", "syncdone data", "syncstart data"]


def test_missing_program_is_logged_not_raised(runner, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="hastd.hooks")
    runner.run(str(tmp_path / "nope"), "connect", "data")
    assert runner.running == 0
    assert "Unable to execute hook" in caplog.text


def test_not_executable_is_logged_not_raised(runner, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="hastd.hooks")
    prog = tmp_path / "hook.sh"
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(0o644)  # no x bit at all: EACCES even for root
    runner.run(str(prog), "connect", "data")
    assert runner.running == 0
    assert "Unable to execute hook" in caplog.text


def test_clean_exit_is_not_an_error(runner, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="hastd.hooks")
    prog = _script(tmp_path / "hook.sh", "#!/bin/sh\nexit 0\n")
    runner.run(prog, "connect", "data")
    runner.wait_all(20)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Hook exited cleanly" in caplog.text


def test_nonzero_exit_is_logged_as_error(runner, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="hastd.hooks")
    prog = _script(tmp_path / "hook.sh", "#!/bin/sh\nexit 3\n")
    runner.run(prog, "split-brain", "data")
    runner.wait_all(20)
    assert f"Hook {prog} split-brain data exited with status 3." in caplog.text


def test_death_by_signal_is_logged_as_error(runner, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="hastd.hooks")
    prog = _script(tmp_path / "hook.sh", "#!/bin/sh\nkill -USR1 $$\nsleep 5\n")
    runner.run(prog, "connect", "data")
    runner.wait_all(20)
    assert f"Hook {prog} connect data was killed by signal {int(signal.SIGUSR1)}." in caplog.text


def test_timeout_kills_the_whole_process_group(runner, tmp_path, caplog):
    """A hook past its timeout gets SIGTERM on its process group: its children die with it."""
    caplog.set_level(logging.WARNING, logger="hastd.hooks")
    pids = tmp_path / "pids"
    after = tmp_path / "after"
    prog = _script(
        tmp_path / "hook.sh",
        f"#!/bin/sh\nsleep 60 &\necho $$ $! > {pids}.tmp && mv {pids}.tmp {pids}\nwait\necho survived > {after}\n",
    )
    runner.run(prog, "role", "data", "init", "primary", timeout=1)
    _poll_until(runner, pids.exists, what="hook started")
    shell, child = map(int, pids.read_text().split())
    _poll_until(runner, lambda: runner.running == 0, what="hook killed")
    assert "over its timeout: killing it" in caplog.text
    assert f"Hook {prog} role data init primary running for" in caplog.text
    assert not _alive(shell)
    end = time.monotonic() + 10
    while _alive(child) and time.monotonic() < end:
        time.sleep(0.02)
    assert not _alive(child), "the hook's child survived the timeout"
    assert not after.exists()


def test_timeout_escalates_to_sigkill(runner, tmp_path, caplog, monkeypatch):
    """A hook that ignores SIGTERM is SIGKILLed after the grace period."""
    monkeypatch.setattr(hooks, "KILL_GRACE", 0.3)
    caplog.set_level(logging.ERROR, logger="hastd.hooks")
    ready = tmp_path / "ready"
    prog = _script(tmp_path / "hook.sh", f"#!/bin/sh\ntrap '' TERM\ntouch {ready}\nwhile :; do sleep 0.05; done\n")
    runner.run(prog, "connect", "data", timeout=0.5)
    _poll_until(runner, ready.exists, what="hook started")
    _poll_until(runner, lambda: runner.running == 0, what="hook killed")
    assert "over its timeout: killing it" in caplog.text
    assert f"was killed by signal {int(signal.SIGKILL)}." in caplog.text


def test_a_hook_within_its_timeout_is_left_alone(runner, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="hastd.hooks")
    gate = tmp_path / "gate"
    prog = _script(tmp_path / "hook.sh", f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.02; done\n")
    runner.run(prog, "connect", "data", timeout=30)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.02)
    assert runner.running == 1
    gate.touch()
    _poll_until(runner, lambda: runner.running == 0, what="hook done")
    assert "killing" not in caplog.text
    assert not caplog.records


def test_long_running_hook_is_reported(runner, tmp_path, caplog, monkeypatch):
    """hastd logs a hook running past 60 s, then every 60 s; scaled down here."""
    monkeypatch.setattr(hooks, "LONG_RUNNING_WARN", 0.2)
    caplog.set_level(logging.WARNING, logger="hastd.hooks")
    gate = tmp_path / "gate"
    prog = _script(tmp_path / "hook.sh", f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.02; done\n")
    runner.run(prog, "syncstart", "data", timeout=60)
    _poll_until(runner, lambda: caplog.text.count("Hook is running for") >= 2, what="two warnings")
    gate.touch()
    _poll_until(runner, lambda: runner.running == 0, what="hook done")
    assert "killing" not in caplog.text


def test_wait_all_gives_up_after_its_timeout(runner, tmp_path):
    prog = _script(tmp_path / "hook.sh", "#!/bin/sh\nsleep 30\n")
    runner.run(prog, "connect", "data", timeout=60)
    started = time.monotonic()
    runner.wait_all(0.3)
    assert time.monotonic() - started < 10
    assert runner.running == 1
