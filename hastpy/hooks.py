"""Hook execution for hastd: the `exec` program of hast.conf, run per event.

Contract (hast.md §8, plus a timeout hastd lacks): hooks run as root with argv
`<exec> <event> <resource> [args]`, a clean environment, stdin/stdout/stderr on /dev/null and no
other inherited descriptors, in their own session so a timeout kills the whole process group. They
are never waited for inline: the supervisor loop calls `poll()` to reap, log exit status, warn about
long runners and kill the ones past their timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

log = logging.getLogger("hastd.hooks")

EVENTS = ("role", "connect", "disconnect", "syncstart", "syncdone", "syncintr", "split-brain")
# The only environment a hook gets: enough to find standard tools, nothing of hastd's.
HOOK_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
# hooks.c logs a hook that has run for over 60 s, then again every 60 s.
LONG_RUNNING_WARN = 60.0
# After SIGTERM at the timeout, a hook gets this long to exit before SIGKILL.
KILL_GRACE = 2.0


@dataclass
class _Running:
    proc: subprocess.Popen
    argv: tuple[str, ...]
    started: float
    deadline: float
    next_warn: float
    terminated_at: float | None = field(default=None)


class HookRunner:
    """Starts hooks and tracks them until they exit. Not thread-safe: owned by the main loop."""

    def __init__(self) -> None:
        self._running: list[_Running] = []

    def run(self, program: str | None, event: str, resource: str, *args: str, timeout: float = 60.0) -> None:
        if not program:
            return
        if event not in EVENTS:
            raise ValueError(f"unknown hook event {event!r}")
        argv = (program, event, resource, *args)
        try:
            proc = subprocess.Popen(
                argv,
                env=HOOK_ENV,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
                cwd="/",
            )
        except OSError as exc:
            log.error("[%s] Unable to execute hook %s: %s.", resource, " ".join(argv), exc.strerror)
            return
        now = time.monotonic()
        self._running.append(_Running(proc, argv, now, now + timeout, now + LONG_RUNNING_WARN))
        log.debug("[%s] Hook started (pid=%d): %s", resource, proc.pid, " ".join(argv))

    @property
    def running(self) -> int:
        return len(self._running)

    def poll(self) -> None:
        """Reap finished hooks, log their status, enforce timeouts. Call from the main loop."""
        now = time.monotonic()
        still = []
        for h in self._running:
            rc = h.proc.poll()
            if rc is not None:
                self._log_exit(h, rc, now)
                continue
            if h.terminated_at is None and now >= h.deadline:
                log.error("Hook %s running for %.0f s, over its timeout: killing it.", " ".join(h.argv), now - h.started)
                self._signal(h, signal.SIGTERM)
                h.terminated_at = now
            elif h.terminated_at is not None and now >= h.terminated_at + KILL_GRACE:
                self._signal(h, signal.SIGKILL)
            elif now >= h.next_warn:
                log.warning("Hook is running for %.0f seconds: %s", now - h.started, " ".join(h.argv))
                h.next_warn += LONG_RUNNING_WARN
            still.append(h)
        self._running = still

    def wait_all(self, timeout: float) -> None:
        """Used at shutdown and by tests: poll until every hook exited or timeout passed."""
        end = time.monotonic() + timeout
        while self._running and time.monotonic() < end:
            self.poll()
            time.sleep(0.05)

    @staticmethod
    def _signal(h: _Running, sig: int) -> None:
        try:
            os.killpg(h.proc.pid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _log_exit(h: _Running, rc: int, now: float) -> None:
        cmd = " ".join(h.argv)
        if rc == 0:
            log.debug("Hook exited cleanly after %.1f s: %s", now - h.started, cmd)
        elif rc < 0:
            log.error("Hook %s was killed by signal %d.", cmd, -rc)
        else:
            log.error("Hook %s exited with status %d.", cmd, rc)
