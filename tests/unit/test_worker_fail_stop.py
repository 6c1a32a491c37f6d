"""worker.run_or_exit / fail_stop: a worker thread or pool task that raises what it did not
handle ends the worker with EX_TEMPFAIL (the supervisor restarts a primary worker on it), with
the traceback in the log, instead of leaving a worker that is up but whose requests hang."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Long enough for a thread to fail and the process to exit; the probe's main thread waits this
# long for it before it exits on its own with status 0.
WAIT = 30

PROBE = textwrap.dedent(f"""
    import logging, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from hastpy import worker
    logging.basicConfig(level=logging.INFO)

    def fails():
        raise ValueError("boom")

    def returns():
        pass

    how = sys.argv[1]
    if how == "thread":
        threading.Thread(target=worker.fail_stop(fails), name="doomed", daemon=True).start()
    elif how == "pool":
        ThreadPoolExecutor(1, thread_name_prefix="local").submit(worker.run_or_exit, fails)
    else:
        t = threading.Thread(target=worker.fail_stop(returns), name="fine")
        t.start()
        t.join()
    time.sleep({WAIT} if how != "returns" else 0)
""")


def probe(how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True, timeout=WAIT * 2)


@pytest.mark.parametrize(("how", "thread"), [("thread", "doomed"), ("pool", "local_0")])
def test_an_exception_a_thread_leaves_ends_the_worker_for_a_restart(how, thread):
    cp = probe(how)
    assert cp.returncode == os.EX_TEMPFAIL, cp
    assert f"Internal error in thread {thread}: exiting." in cp.stderr
    assert "ValueError: boom" in cp.stderr  # the traceback, for the bug report


def test_a_thread_that_returns_leaves_the_worker_alone():
    cp = probe("returns")
    assert (cp.returncode, cp.stderr) == (0, "")
