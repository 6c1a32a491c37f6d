"""Supervisor bookkeeping without processes: status replies matched to their requests, and a
primary whose worker cannot be started.

The supervisor is built from a real hast.conf; its workers are socketpairs driven by a thread
playing the worker's side of the channel, and start_primary is replaced where it must fail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from hastpy import control
from hastpy import supervisor as supmod
from hastpy.proto import messages as msg
from hastpy.supervisor import Supervisor, Worker, WorkerStartError

CONF = """\
resource data {
    on node-a {
        local /nonexistent/a
        remote 10.0.0.2
    }
    on node-b {
        local /nonexistent/b
        remote 10.0.0.1
    }
}
"""

# The status timeout used here: long enough for a loaded machine to answer an immediate reply,
# short enough to keep the test quick.
STATUS_TIMEOUT = 0.5
# How much later than STATUS_TIMEOUT the fake worker answers its first request.
LATE_BY = 0.5
# Bound on any wait for the fake worker's thread.
THREAD_TIMEOUT = 10.0


class _Proc:
    """Stands in for the worker's Popen: alive, with a pid."""

    pid = 4242
    returncode = None

    def poll(self):
        return None


class _ExitedProc(_Proc):
    """Stands in for a worker's Popen that has exited, not reaped by the supervisor yet."""

    returncode = os.EX_TEMPFAIL

    def poll(self):
        return self.returncode


@pytest.fixture
def sup(tmp_path):
    conf = tmp_path / "hast.conf"
    conf.write_text(CONF)
    s = Supervisor(str(conf), ("node-a",))
    yield s
    s.sel.close()


def _fake_worker(sup: Supervisor, script) -> tuple[socket.socket, threading.Thread]:
    """Register a worker for `data` whose other end runs script(reader, sock) in a thread."""
    rs = sup.resources["data"]
    mine, theirs = socket.socketpair()
    rs.worker = Worker(_Proc(), mine, control.LineReader(mine), "primary", time.monotonic())
    rs.role = "primary"
    thread = threading.Thread(target=script, args=(control.LineReader(theirs), theirs), daemon=True)
    thread.start()
    return theirs, thread


def test_a_late_status_reply_never_answers_the_next_request(sup, monkeypatch):
    monkeypatch.setattr(supmod, "STATUS_TIMEOUT", STATUS_TIMEOUT)
    ids = []

    def worker(reader, sock):
        first = reader.read()
        ids.append(first.get("id"))
        time.sleep(STATUS_TIMEOUT + LATE_BY)  # busy: answers after the supervisor gave up
        control.send(sock, {"reply": {"answer": "stale"}, "id": first.get("id")})
        second = reader.read()
        ids.append(second.get("id"))
        control.send(sock, {"event": "connect"})  # an event before the reply is still handled
        control.send(sock, {"reply": {"answer": "fresh"}, "id": second.get("id")})

    theirs, thread = _fake_worker(sup, worker)
    rs = sup.resources["data"]
    assert sup.worker_status(rs) is None  # timed out
    time.sleep(LATE_BY + 0.2)  # the stale reply is now waiting in the socket
    assert sup.worker_status(rs) == {"answer": "fresh"}
    thread.join(THREAD_TIMEOUT)
    assert len(ids) == 2 and ids[0] != ids[1]
    theirs.close()


def test_status_wait_is_bounded_in_total_while_events_keep_coming(sup, monkeypatch):
    monkeypatch.setattr(supmod, "STATUS_TIMEOUT", STATUS_TIMEOUT)
    stop = threading.Event()

    def worker(reader, sock):
        reader.read()
        while not stop.is_set():  # chatty, never answers
            control.send(sock, {"event": "other"})
            time.sleep(0.05)

    theirs, thread = _fake_worker(sup, worker)
    started = time.monotonic()
    assert sup.worker_status(sup.resources["data"]) is None
    assert time.monotonic() - started < STATUS_TIMEOUT + 1.0
    stop.set()
    thread.join(THREAD_TIMEOUT)
    theirs.close()


def test_the_worker_echoes_the_request_id_and_takes_new_settings():
    """hastpy.worker's side, in a child: its channel thread ends the process when the
    supervisor's end closes, which must not be the test runner."""
    code = """
import socket, sys
from hastpy import control
from hastpy.worker import Channel
a, b = socket.socketpair()
from dataclasses import asdict
from hastpy.config import parse
res = parse(sys.argv[1], "hast.conf", ("hasta",)).resources[0]
taken = []
Channel(a).serve_status(lambda: {"n": len(taken)}, lambda r: taken.append(r))
reader = control.LineReader(b)
control.send(b, {"cmd": "status", "id": 7})
print(reader.read(), flush=True)
control.send(b, {"cmd": "reconfigure", "resource": asdict(res)})  # no reply: the next status tells
control.send(b, {"cmd": "status", "id": 8})
print(reader.read(), flush=True)
print(taken == [res], flush=True)
"""
    conf = "resource data {\n on hasta {\n  local /dev/null\n  remote 10.0.0.2\n }\n on hastb {\n  local /dev/null\n  remote 10.0.0.1\n }\n}\n"
    cp = subprocess.run([sys.executable, "-c", code, conf], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines() == ["{'reply': {'n': 0}, 'id': 7}", "{'reply': {'n': 1}, 'id': 8}", "True"]


# --- a primary whose worker cannot start ------------------------------------------------------


def _failing_start(rs, force=False):
    raise OSError(24, "Too many open files")


def test_role_primary_with_a_worker_that_cannot_start_goes_back_to_init(sup, monkeypatch):
    monkeypatch.setattr(sup, "start_primary", _failing_start)
    rs = sup.resources["data"]
    with pytest.raises(WorkerStartError, match="Too many open files.*role changed to init"):
        sup.set_role_one(rs, "primary")
    assert rs.role == "init" and rs.worker is None
    st = sup.status_one(rs)
    assert st["role"] == "init" and st["workerpid"] == 0
    assert "unable to start the primary worker" in st["worker_error"]

    reply = sup.handle_control({"cmd": "role", "role": "primary", "resources": ["data"]})
    [entry] = reply["resources"]
    assert entry["exit_code"] == WorkerStartError.exit_code and entry["role"] == "init"
    assert "Too many open files" in entry["error"]


def test_a_failed_restart_of_a_crashed_primary_goes_back_to_init(sup, monkeypatch):
    monkeypatch.setattr(sup, "start_primary", _failing_start)
    rs = sup.resources["data"]
    rs.role, rs.restart_at = "primary", time.monotonic() - 1  # as _reap leaves a crashed primary
    sup._restart_due()
    assert rs.role == "init" and rs.restart_at is None
    assert "Too many open files" in sup.status_one(rs)["worker_error"]


def test_a_later_role_change_clears_the_worker_error(sup, monkeypatch):
    monkeypatch.setattr(sup, "start_primary", _failing_start)
    rs = sup.resources["data"]
    with pytest.raises(WorkerStartError):
        sup.set_role_one(rs, "primary")
    sup.set_role_one(rs, "secondary")
    assert rs.role == "secondary" and sup.status_one(rs)["worker_error"] is None


def test_a_new_connection_from_the_primary_first_reads_what_the_old_worker_said(sup, monkeypatch):
    """A secondary worker that refused the handshake sends its reason and exits; the primary's
    next attempt can arrive before the supervisor's loop has read it. The reason must not be
    lost with the worker it came from."""
    monkeypatch.setattr(supmod, "_peer", lambda conn: "10.0.0.2")  # node-a's configured remote
    rs = sup.resources["data"]
    mine, theirs = socket.socketpair()
    rs.worker = Worker(_ExitedProc(), mine, control.LineReader(mine), "secondary", time.monotonic())
    rs.role = "secondary"
    control.send(theirs, {"event": "refused", "reason": msg.ERRMSG_SPLIT_BRAIN})
    conn, primary = socket.socketpair()
    with theirs, primary:
        sup._out_connection(conn, msg.Hello(resource="data", version=msg.PROTO_VERSION))
        assert rs.worker is None and rs.pending_out is conn  # the new handshake goes on
        assert sup.status_one(rs)["connect_error"] == msg.ERRMSG_SPLIT_BRAIN
    sup._drop_pending(rs)
