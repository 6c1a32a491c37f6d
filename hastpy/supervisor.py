"""hastd's parent process: config, control socket, replication listener, hooks, one worker per role.

Everything that changes state runs on the main loop's thread: role changes, worker start and stop,
hand-off of accepted connections, hooks, reload. Helper threads only read a first message (a
hastctl request, a peer's handshake frame) with a timeout and post it to the loop through
`_post`, so a slow or hostile client never stalls the loop and no thread but the loop forks.
Signals are consumed synchronously: handlers do nothing, the wakeup fd carries their numbers.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import queue
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace

from hastpy import attach as attachmod
from hastpy import config as cfgmod
from hastpy import constants as const
from hastpy import control, provider
from hastpy.activemap import ActiveMap
from hastpy.errors import AlreadyRunning, ConfigError, ControlError, HastError, HostError, NvError, ProtocolError
from hastpy.hooks import HookRunner
from hastpy.proto import messages as msg
from hastpy.transport import listen, peer_host, recv_one, send_frame, tune

log = logging.getLogger("hastd")

HANDSHAKE_TIMEOUT = 20.0  # hastd's accept timeout: a peer gets this long to send its first frame
WORKER_STOP_TIMEOUT = 10.0  # SIGTERM, then SIGKILL after this long
WORKER_RESTART_DELAY = 1.0  # hastd restarts a primary worker that crashed after 1 s
STATUS_TIMEOUT = 5.0  # a worker that does not answer a status request in this long is reported busy
LOOP_TICK = 0.2  # hooks are polled and restarts fired at least this often
CONTROL_READ_TIMEOUT = 5.0
# A worker's refusal reason is kept for `hastctl list`; a longer one is cut (it is one sentence).
REFUSAL_MAX = 1000


class WorkerStartError(HastError):
    """A primary worker could not be started (fork, its NBD socket): the resource went back to init.

    hastd's rule (hastd.c child_exit): a primary whose worker cannot run is not left pretending
    to be primary; it is changed back to init, and the reason is kept for `hastctl list`."""

    exit_code = os.EX_OSERR


@dataclass
class Worker:
    proc: subprocess.Popen
    sock: socket.socket  # supervisor's end of the channel
    reader: control.LineReader
    role: str
    started: float
    ready: bool = False


@dataclass
class ResState:
    res: cfgmod.Resource
    role: str = "init"
    worker: Worker | None = None
    token: bytes | None = None  # issued to the primary's first connection, awaiting the second
    pending_out: socket.socket | None = None  # that first connection (requests will arrive on it)
    pending_version: int = 0
    pending_maxio: int | None = None  # the primary's maxio from its hello (v3), if it sent one
    restart_at: float | None = None  # a crashed primary worker restarts at this time
    att: attachmod.Attachment | None = None  # /dev/hast/<provname> while the primary serves
    attach_error: str | None = None  # why the last attach failed, for hastctl list
    worker_error: str | None = None  # why the role fell back to init (worker failed), for hastctl list
    worker_exit: int | None = None  # that worker's exit status (failover tells refusals apart by it)
    refusal: str | None = None  # the reason a primary worker gave before refusing to serve
    # A secondary's side of the primary's "connect error": why this node refused the last
    # handshake (split-brain, a mismatch, a stale source, its provider), until one succeeds.
    peer_refusal: str | None = None
    # A reloaded configuration that could not be applied (the device was busy): it takes effect
    # at the next role change, when the worker is restarted anyway.
    pending_res: cfgmod.Resource | None = None
    events: list = field(default_factory=list)


# Resource settings only hastd's own loop reads (it runs the hooks), and those a running worker
# takes over when told (as hastd's primary does on SIGHUP: the ack mode, the wire's checksum and
# compression, the sockets' timeout, the bitmap's flushing). A reload that changes nothing else
# leaves the worker, its NBD clients, its peer connection and its device alone.
HOOK_FIELDS = ("exec", "hook_timeout")
LIVE_FIELDS = ("replication", "checksum", "compression", "timeout", "metaflush")
# The peer's address and our source address: a running primary takes them as hastd's does, by
# dropping its connection and reconnecting (a secondary is restarted: it has no device to keep,
# and its new primary reconnects). So a primary whose device is mounted can be given a new
# secondary without leaving primary.
RECONNECT_FIELDS = ("remote", "source")


class Supervisor:
    def __init__(self, config_path: str, node_names: tuple[str, ...] | None, debug: int = 0):
        self.config_path = config_path
        self.node_names = node_names
        self.debug = debug
        self.cfg = cfgmod.load(config_path, node_names)
        self.resources: dict[str, ResState] = {r.name: ResState(r) for r in self.cfg.resources}
        self.sel = selectors.DefaultSelector()
        self.hooks = HookRunner()
        self._posted: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.control_sock: socket.socket | None = None
        self.control_path = ""
        self.listeners: list[socket.socket] = []
        self.running = True
        self._status_seq = 0  # ids of status requests to workers, so a late reply is never taken for a newer one

    # -- setup ----------------------------------------------------------------------------------

    def open_control(self) -> None:
        path = cfgmod.parse_control_address(self.cfg.control)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
                raise AlreadyRunning(f"another hastd is serving {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
            finally:
                probe.close()
        try:
            self._bind_control(path)
        except OSError as exc:
            raise HostError(f"Unable to create the control socket {path}: {exc.strerror or exc}") from None

    def _bind_control(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound and listening under a temporary name, then renamed into place: a hastctl that
        # finds the path (e.g. right after hastd started) never gets "connection refused".
        tmp = f"{path}.{os.getpid()}"
        if len(os.fsencode(tmp)) > const.MAX_UDS_PATH_LEN:
            tmp = path  # no room for a suffix: bind in place, as before
        elif os.path.exists(tmp):
            os.unlink(tmp)
        old = os.umask(0o177)  # the control socket is created mode 0600: root only
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(16)
            if tmp != path:
                os.rename(tmp, path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        self.control_sock, self.control_path = sock, path
        self.sel.register(sock, selectors.EVENT_READ, ("control", None))

    def open_listeners(self) -> None:
        """Listen on every `listen` address; HastError if an explicitly configured one fails."""
        for sock in self._bind_listeners(self.cfg.listen):
            self.listeners.append(sock)
            self.sel.register(sock, selectors.EVENT_READ, ("listen", None))

    @staticmethod
    def _bind_listeners(addrs) -> list[socket.socket]:
        explicit = tuple(addrs) != const.DEFAULT_LISTEN
        socks: list[socket.socket] = []
        try:
            for addr in addrs:
                try:
                    sock = listen(addr)
                except OSError as exc:
                    if explicit:
                        raise HostError(f"Unable to listen on {addr}: {exc.strerror or exc}") from None
                    log.debug("Not listening on %s: %s", addr, exc)  # e.g. no IPv6 in this kernel
                    continue
                socks.append(sock)
                log.info("Listening on %s.", addr)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _close_listeners(self) -> None:
        for sock in self.listeners:
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self.listeners = []

    def setup_signals(self) -> None:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        self.sel.register(self._sig_r, selectors.EVENT_READ, ("signal", None))
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))

    # -- posting work to the loop ---------------------------------------------------------------

    def _post(self, fn, *args) -> None:
        self._posted.put((fn, args))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _call_in_loop(self, fn, *args, timeout: float = 60.0):
        done = threading.Event()
        box = {}

        def run():
            try:
                box["result"] = fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported to the caller's thread
                box["error"] = exc
            done.set()

        self._post(run)
        if not done.wait(timeout):
            raise ControlError("hastd is busy: request timed out")
        if "error" in box:
            raise box["error"]
        return box["result"]

    # -- main loop ------------------------------------------------------------------------------

    def serve(self) -> int:
        self.setup_signals()
        while self.running:
            for key, _ in self.sel.select(LOOP_TICK):
                try:
                    self._dispatch(key)
                except Exception:  # noqa: BLE001 - a bug in one handler must not end the daemon
                    log.exception("Internal error in the main loop")
            try:
                self.hooks.poll()
                self._restart_due()
            except Exception:  # noqa: BLE001 - as above
                log.exception("Internal error in the main loop")
        self.shutdown()
        return 0

    def _dispatch(self, key) -> None:
        kind, obj = key.data
        if kind == "control":
            self._accept_control()
        elif kind == "listen":
            self._accept_peer(key.fileobj)
        elif kind == "worker":
            self._worker_readable(obj)
        elif kind == "signal":
            self._signals()
        elif kind == "wake":
            self._drain_posted()

    def _drain_posted(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fn, args = self._posted.get_nowait()
            except queue.Empty:
                return
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - one bad request must not end the daemon
                log.exception("Internal error handling a request")

    def _signals(self) -> None:
        try:
            data = os.read(self._sig_r, 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGHUP:
                self.reload()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                log.info("Termination signal received, exiting.")
                self.running = False
            elif signum == signal.SIGCHLD:
                self._reap()

    # -- workers --------------------------------------------------------------------------------

    def nbd_path(self, name: str) -> str:
        return os.path.join(os.path.dirname(self.control_path) or ".", f"hastd-{name}.nbd")

    def spawn(self, rs: ResState, role: str, fds: dict[str, int], extra: dict) -> None:
        """Start a worker and register it as rs.worker; or raise OSError with no process left
        running and no socket left open (the caller then decides the resource's role)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pass_fds = [child.fileno(), *fds.values()]
        # The title hastd's failover scripts look for ("hastd: <res> (<role>)") is the last
        # argument, so `pgrep -f` finds it; argv[0] must stay the interpreter for venvs to work.
        # -P: `-m` would otherwise put hastd's working directory first on the import path, and a
        # directory there named hastpy (the state directory next to a control socket, a checkout)
        # would decide what code the worker runs.
        title = f"hastd: {rs.res.name} ({role})"
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "hastpy.worker", str(child.fileno()), title],
                pass_fds=pass_fds,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        spec = {"role": role, "resource": asdict(rs.res), "fds": fds, "debug": self.debug, **extra}
        try:
            control.send(parent, spec)
        except OSError:
            # Not registered anywhere yet: reap it here, or it would run (or linger as a
            # zombie) unseen by _reap.
            proc.kill()
            proc.wait()
            parent.close()
            raise
        rs.worker = Worker(proc, parent, control.LineReader(parent), role, time.monotonic())
        self.sel.register(parent, selectors.EVENT_READ, ("worker", rs))
        log.info("[%s] Worker started (pid=%d, %s).", rs.res.name, proc.pid, role)

    def start_primary(self, rs: ResState, force: bool = False) -> None:
        """Bind the NBD socket and spawn the primary worker. OSError (nothing left running, no
        worker registered) if either fails; callers go through _start_primary_or_init."""
        path = self.nbd_path(rs.res.name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(8)
            # force: serve local data marked inconsistent (hastctl role --force primary).
            self.spawn(rs, "primary", {"nbd": sock.fileno()}, {"nbd_path": path, "force": force})
        finally:
            sock.close()  # the worker has its own copy of the listening socket

    def _start_primary_or_init(self, rs: ResState, force: bool = False) -> str | None:
        """Start the worker of a resource whose role is primary. If that fails, the role goes
        back to init (a primary with no worker would answer nothing and report itself primary)
        and the reason is logged, kept for `hastctl list`, and returned; None on success."""
        rs.refusal = None
        try:
            self.start_primary(rs, force)
        except OSError as exc:
            why = f"unable to start the primary worker: {exc}"
            rs.worker_error = why
            rs.role = "init"
            log.error("[%s] U%s; role changed back to init.", rs.res.name, why[1:])
            self.hooks.run(rs.res.exec, "role", rs.res.name, "primary", "init", timeout=rs.res.hook_timeout)
            return why
        rs.worker_error = None
        return None

    # -- /dev/hast ------------------------------------------------------------------------------

    @property
    def statedir(self) -> str:
        """Where attach records what it made, so a restarted hastd can clean up after a crash."""
        return os.path.join(os.path.dirname(self.control_path) or ".", "hastpy")

    def _attach(self, rs: ResState, size: int) -> None:
        """The worker serves: make /dev/hast/<provname>. A failure leaves the socket usable."""
        r = rs.res
        try:
            method = attachmod.choose_method(r.attach)
            os.makedirs(self.statedir, exist_ok=True)
            rs.att = attachmod.attach(method, r.name, r.provname, self.nbd_path(r.name), size, r.devdir, self.statedir)
            rs.attach_error = None
            log.info("[%s] Attached (%s): %s -> %s.", r.name, method, rs.att.link, rs.att.device)
        except HastError as exc:
            rs.attach_error = str(exc)
            log.error("[%s] Unable to attach the device: %s", r.name, exc)

    def _detach(self, rs: ResState, force: bool) -> None:
        """Remove /dev/hast/<provname> before the worker stops. DeviceBusy (nothing torn down)
        if it is mounted or open and not force, or, with `attach none`, while NBD clients (a
        QEMU, nbdfuse of the admin's own) are connected to the export: for them the socket is
        the disk."""
        if rs.att is None:
            return
        if rs.att.method == "none" and not force:
            clients = (self.worker_status(rs) or {}).get("nbd_clients", 0)
            if clients:
                what = f"{clients} NBD client{'s' if clients > 1 else ''} connected"
                raise attachmod.DeviceBusy(rs.att.socket_path, what, rs.res.name, "disconnect them first")
        attachmod.detach(rs.att, force=force)
        log.info("[%s] Detached %s.", rs.res.name, rs.att.device or rs.att.method)
        rs.att = None

    def _cleanup_device(self, rs: ResState, why: str) -> None:
        """After a primary worker died, or at start-up: remove whatever device it left behind."""
        name = rs.res.name
        try:
            if rs.att is not None:
                attachmod.detach(rs.att, force=True)
        except HastError as exc:
            log.warning("[%s] Forced detach after %s: %s", name, why, exc)
        rs.att = None
        try:
            for action in attachmod.cleanup_stale(name, rs.res.devdir, self.statedir):
                log.warning("[%s] Cleaned up after %s: %s", name, why, action)
        except (HastError, OSError) as exc:
            log.error("[%s] Unable to clean up after %s: %s", name, why, exc)

    def cleanup_all(self) -> None:
        for rs in self.resources.values():
            self._cleanup_device(rs, "a previous hastd")

    def stop_worker(self, rs: ResState, sig: int = signal.SIGTERM) -> None:
        w = rs.worker
        if w is None:
            return
        rs.worker = None
        try:
            self.sel.unregister(w.sock)
        except (KeyError, ValueError):
            pass
        # Signal before closing the channel: a worker that sees its channel close first thinks
        # the supervisor died and says so in the log.
        if w.proc.poll() is None:
            w.proc.send_signal(sig)
            try:
                w.proc.wait(WORKER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("[%s] Worker %d did not exit, killing it.", rs.res.name, w.proc.pid)
                w.proc.kill()
                w.proc.wait()
        w.sock.close()
        if w.role == "primary":
            try:
                os.unlink(self.nbd_path(rs.res.name))
            except FileNotFoundError:
                pass
        log.info("[%s] Worker %d stopped (status %s).", rs.res.name, w.proc.pid, w.proc.returncode)

    def _reap(self) -> None:
        for rs in self.resources.values():
            w = rs.worker
            if w is None or w.proc.poll() is None:
                continue
            rc = w.proc.returncode
            # Its last events (a secondary's disconnect or split-brain) may still be unread.
            self._drain_worker(rs, w)
            self.stop_worker(rs)
            name = rs.res.name
            if w.role == "primary":
                self._cleanup_device(rs, f"the worker's exit (status {rc})")
                if rc < 0 or rc == os.EX_TEMPFAIL:
                    log.warning("[%s] Primary worker died (status %d): restarting in %.0f s.", name, rc, WORKER_RESTART_DELAY)
                    rs.restart_at = time.monotonic() + WORKER_RESTART_DELAY
                else:
                    log.error("[%s] Primary worker exited with status %d: role changed to init.", name, rc)
                    refusal = rs.refusal
                    self.set_role_one(rs, "init")
                    rs.worker_error = refusal or f"the primary worker exited with status {rc}"
                    rs.worker_exit = rc
            else:
                log.info("[%s] Secondary worker exited (status %d).", name, rc)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for rs in self.resources.values():
            if rs.restart_at is not None and now >= rs.restart_at:
                rs.restart_at = None
                if rs.role == "primary" and rs.worker is None:
                    self._start_primary_or_init(rs)

    def _worker_readable(self, rs: ResState) -> None:
        w = rs.worker
        if w is None:
            return
        if not self._drain_worker(rs, w):
            try:
                self.sel.unregister(w.sock)
            except (KeyError, ValueError):
                pass
            self._reap()

    def _drain_worker(self, rs: ResState, w: Worker) -> bool:
        """Handle every message the worker has sent so far, without blocking; False at EOF.

        All of them, not one: a worker often sends two events back to back (connect, syncstart),
        the reader takes both in one recv, and select() would not wake us for the second one
        until the worker sends something else, maybe minutes later.
        """
        w.sock.settimeout(0.0)
        try:
            while True:
                try:
                    obj = w.reader.read()
                except BlockingIOError:
                    return True
                except (OSError, ControlError):
                    return False
                if obj is None:
                    return False
                self._worker_message(rs, obj)
        finally:
            if w.sock.fileno() != -1:
                w.sock.settimeout(None)

    def _worker_message(self, rs: ResState, obj: dict) -> None:
        """An unsolicited message. A status reply arriving here came after its request timed
        out: it answers nothing any more and is dropped."""
        ev = obj.get("event")
        if ev == "refused":
            reason = str(obj.get("reason") or "")[:REFUSAL_MAX] or None
            if rs.worker is not None and rs.worker.role == "secondary":
                rs.peer_refusal = reason
            else:
                rs.refusal = reason
            return
        if ev == "connect":
            rs.peer_refusal = None
        if ev == "ready":
            if rs.worker:
                rs.worker.ready = True
                self._attach(rs, obj.get("size", 0))
            return
        if ev in ("connect", "disconnect", "syncstart", "syncdone", "syncintr", "split-brain"):
            log.info("[%s] Event: %s.", rs.res.name, ev)
            self.hooks.run(rs.res.exec, ev, rs.res.name, timeout=rs.res.hook_timeout)

    def worker_status(self, rs: ResState) -> dict | None:
        """The worker's status, or None if it has none or does not answer within STATUS_TIMEOUT.

        Each request carries a fresh id and only the reply echoing it is taken: a worker that
        answered too late for an earlier request has that reply skipped here (or dropped by
        _drain_worker), never returned as the answer to this one. Events met while waiting are
        handled as usual. The wait is bounded in total, however many events arrive meanwhile."""
        w = rs.worker
        if w is None:
            return None
        self._status_seq += 1
        want = self._status_seq
        deadline = time.monotonic() + STATUS_TIMEOUT
        try:
            control.send(w.sock, {"cmd": "status", "id": want})
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                w.sock.settimeout(remaining)
                obj = w.reader.read()
                if obj is None:
                    return None
                if "reply" in obj:
                    if obj.get("id") != want:
                        log.debug("[%s] Dropped a late status reply (id %s).", rs.res.name, obj.get("id"))
                        continue
                    self._drain_worker(rs, w)  # events that came in the same read
                    return obj["reply"]
                self._worker_message(rs, obj)
        except (OSError, ControlError):
            return None
        finally:
            if rs.worker is w:
                w.sock.settimeout(None)

    # -- roles ----------------------------------------------------------------------------------

    def set_role_one(self, rs: ResState, role: str, force: bool = False) -> str:
        """Change a role; DeviceBusy (nothing changed) if leaving primary while the device is
        mounted or open, unless force. WorkerStartError if the new primary's worker cannot be
        started: the old role's worker is gone by then and the role is init (see
        _start_primary_or_init), as hastd leaves a primary whose worker fails."""
        old = rs.role
        if old == role:
            return old
        self._detach(rs, force)
        self.stop_worker(rs)
        self._drop_pending(rs)
        if rs.pending_res is not None:
            rs.res, rs.pending_res = rs.pending_res, None
            log.info("[%s] Configuration change applied (it waited for this role change).", rs.res.name)
        rs.restart_at = None
        rs.worker_error = None
        rs.worker_exit = None
        rs.peer_refusal = None
        rs.role = role
        log.info("[%s] Role changed to %s.", rs.res.name, role)
        self.hooks.run(rs.res.exec, "role", rs.res.name, old, role, timeout=rs.res.hook_timeout)
        if role == "primary" and (why := self._start_primary_or_init(rs, force)) is not None:
            raise WorkerStartError(f"{why}; role changed to init")
        return old

    def _drop_pending(self, rs: ResState) -> None:
        if rs.pending_out is not None:
            rs.pending_out.close()
        rs.pending_out, rs.token = None, None

    def select(self, names: list[str]) -> list[tuple[str, ResState | None]]:
        if names == ["all"]:
            return [(n, rs) for n, rs in self.resources.items()]
        return [(n, self.resources.get(n)) for n in names]

    def handle_control(self, req: dict) -> dict:
        cmd, role, names = control.validate_request(req)
        out = []
        for name, rs in self.select(names):
            if rs is None:
                out.append({"name": name, "error": f"resource {name!r} is not configured"})
            elif cmd == "role":
                try:
                    out.append({"name": name, "previous": self.set_role_one(rs, role, bool(req.get("force"))), "role": role})
                except attachmod.DeviceBusy as exc:  # hastctl names the resource itself
                    out.append({"name": name, "error": exc.detail, "busy": True})
                except WorkerStartError as exc:
                    out.append({"name": name, "error": str(exc), "role": rs.role, "exit_code": exc.exit_code})
            else:
                out.append(self.status_one(rs))
        return {"resources": out}

    def status_one(self, rs: ResState) -> dict:
        r = rs.res
        st = {
            "name": r.name,
            "role": rs.role,
            "provname": r.provname,
            "localpath": r.local,
            "remoteaddr": r.remote,
            "sourceaddr": r.source,
            "replication": r.replication,
            "checksum": r.checksum,
            "compression": r.compression,
            "timeout": r.timeout,
            "metaflush": r.metaflush,
            "workerpid": rs.worker.proc.pid if rs.worker else 0,
            "nbd_socket": self.nbd_path(r.name) if rs.role == "primary" else None,
            "attach": r.attach if rs.att is None else rs.att.method,
            "device": rs.att.link if rs.att is not None else None,
            "device_ready": rs.att is not None,
            "serving": bool(rs.worker and rs.worker.ready),  # a primary worker said "ready"
            "attach_error": rs.attach_error,
            "worker_error": rs.worker_error,
            "worker_exit": rs.worker_exit,
            "config_pending": rs.pending_res is not None,  # a reload waits for the next role change
        }
        if rs.role == "secondary":
            st["connect_error"] = rs.peer_refusal
        ws = self.worker_status(rs)
        if ws:
            ws.pop("role", None)
            st.update(ws)
        return st

    # -- control connections --------------------------------------------------------------------

    def _accept_control(self) -> None:
        try:
            conn, _ = self.control_sock.accept()
        except OSError:
            return
        threading.Thread(target=self._control_client, args=(conn,), daemon=True).start()

    def _control_client(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(CONTROL_READ_TIMEOUT)
            try:
                req = control.LineReader(conn).read()
                if req is None:
                    return
                reply = self._call_in_loop(self.handle_control, req)
                if req.get("cmd") == "status":
                    add_provider_metadata(reply)
            except ControlError as exc:
                reply = {"error": str(exc)}
            except RecursionError:  # json.loads of a line nested thousands deep
                reply = {"error": "malformed control message: nested too deeply"}
            except (OSError, TimeoutError):
                return
            except Exception as exc:  # noqa: BLE001 - a bug: answer and log it, keep serving
                log.exception("Internal error handling a control request")
                reply = {"error": f"internal error: {exc}"}
            try:
                control.send(conn, reply)
            except OSError:
                pass

    # -- replication connections ----------------------------------------------------------------

    def _accept_peer(self, lsock: socket.socket) -> None:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        threading.Thread(target=self._peer_first_frame, args=(conn,), daemon=True).start()

    def _peer_first_frame(self, conn: socket.socket) -> None:
        try:
            tune(conn, HANDSHAKE_TIMEOUT)
            # A hello never carries a payload: refuse one rather than buffer up to 16 MiB for
            # every connection anyone opens to the port.
            frame = recv_one(conn, msg.PROTO_VERSION, max_payload=0)
        except (OSError, ConnectionError, ProtocolError, NvError) as exc:
            log.warning("Unable to receive a handshake from a peer: %s.", exc)
            conn.close()
            return
        self._post(self._peer_handshake, conn, frame)

    def _refuse(self, conn: socket.socket, errmsg: str, wait: bool = False) -> None:
        log.warning("Refusing a connection from %s: %s", _peer(conn), errmsg)
        try:
            send_frame(conn, msg.ERROR_FRAME_VERSION, msg.ErrorReply(errmsg, wait).to_nv())
        except OSError:
            pass
        conn.close()

    def _peer_handshake(self, conn: socket.socket, frame) -> None:
        try:
            hello = msg.decode_handshake(frame.nv)
            if isinstance(hello, msg.InHello):
                self._in_connection(conn, hello)
            else:
                self._out_connection(conn, hello)
        except ProtocolError as exc:
            self._refuse(conn, f"Invalid handshake: {exc}")

    def _check_peer(self, conn: socket.socket, name: str) -> ResState | str:
        host = _peer(conn)
        allowed = [rs for rs in self.resources.values() if _same_host(rs.res.remote, host)]
        if not allowed:
            return msg.ERRMSG_NOT_CONFIGURED
        rs = self.resources.get(name)
        if rs is None or rs not in allowed:
            return msg.ERRMSG_NO_ACCESS
        return rs

    def _out_connection(self, conn: socket.socket, hello) -> None:
        rs = self._check_peer(conn, hello.resource)
        if isinstance(rs, str):
            return self._refuse(conn, rs)
        if rs.role != "secondary":
            text = msg.ERRMSG_WRONG_ROLE.format(role=rs.role)
            return self._refuse(conn, text, wait=rs.role == "primary")
        if rs.worker is not None:
            log.info("[%s] New connection from the primary: stopping the old worker.", rs.res.name)
            # Its last events (a refusal's reason, a disconnect) may still be unread when the
            # primary's next attempt arrives first: handled now, not lost with the worker.
            self._drain_worker(rs, rs.worker)
            self.stop_worker(rs, signal.SIGINT)
        self._drop_pending(rs)
        rs.token = secrets.token_bytes(16)
        rs.pending_out = conn
        rs.pending_version = msg.negotiate_version(hello.version)
        rs.pending_maxio = hello.maxio
        rs.events.clear()
        try:
            send_frame(conn, msg.HELLO_FRAME_VERSION, msg.HelloReply(version=rs.pending_version, token=rs.token).to_nv())
        except OSError as exc:
            log.warning("[%s] Handshake with the primary failed: %s.", rs.res.name, exc)
            self._drop_pending(rs)

    def _in_connection(self, conn: socket.socket, inhello) -> None:
        rs = self._check_peer(conn, inhello.resource)
        if isinstance(rs, str):
            return self._refuse(conn, rs)
        if rs.token is None or rs.pending_out is None or not secrets.compare_digest(rs.token, inhello.token):
            return self._refuse(conn, msg.ERRMSG_TOKEN_MISMATCH)
        out, version = rs.pending_out, rs.pending_version
        rs.pending_out, rs.token = None, None
        handshake = {
            "virgin": inhello.virgin,
            "resuid": inhello.resuid,
            "localcnt": inhello.localcnt,
            "remotecnt": inhello.remotecnt,
            "replicaid": inhello.replicaid,
            "peerid": inhello.peerid,
            "inconsistent": inhello.inconsistent,
            "maxio": rs.pending_maxio,
        }
        try:
            self.spawn(rs, "secondary", {"out": out.fileno(), "in": conn.fileno()}, {"version": version, "handshake": handshake})
        finally:
            out.close()
            conn.close()

    # -- reload and shutdown --------------------------------------------------------------------

    def reload(self) -> None:
        log.info("Reloading configuration...")
        try:
            new = cfgmod.load(self.config_path, self.node_names)
        except (ConfigError, OSError) as exc:
            log.error("Reload failed, keeping the old configuration: %s", exc)
            return
        if new.listen != self.cfg.listen:
            # Before anything else, so that a listen address we cannot bind leaves the whole
            # old configuration in place (the old addresses are released first: the new list
            # may share some of them).
            self._close_listeners()
            try:
                socks = self._bind_listeners(new.listen)
            except HastError as exc:
                log.error("Reload failed, keeping the old configuration: %s", exc)
                try:
                    self.open_listeners()
                except HastError as exc2:
                    log.error("Unable to listen on the old addresses again: %s", exc2)
                return
            for sock in socks:
                self.listeners.append(sock)
                self.sel.register(sock, selectors.EVENT_READ, ("listen", None))
        new_res = {r.name: r for r in new.resources}
        for name in list(self.resources):
            if name not in new_res:
                try:
                    self.set_role_one(self.resources[name], "init")
                except attachmod.DeviceBusy as exc:
                    log.error("[%s] Not removed: the device is busy (%s).", name, exc)
                    continue
                del self.resources[name]
                log.info("[%s] Resource removed.", name)
        waiting = []
        for name, r in new_res.items():
            rs = self.resources.get(name)
            if rs is None:
                self.resources[name] = ResState(r)
                log.info("[%s] Resource added (role init).", name)
                continue
            rs.pending_res = None  # this configuration replaces one still waiting, if any
            if rs.res == r:
                continue
            if _differs_only_in(rs.res, r, HOOK_FIELDS):
                rs.res = r  # only hastd runs hooks: nothing to restart
                log.info("[%s] Hook settings changed.", name)
                continue
            if _differs_only_in(rs.res, r, HOOK_FIELDS + LIVE_FIELDS + (RECONNECT_FIELDS if rs.role == "primary" else ())):
                rs.res = r  # a worker started from now on has them from its spec
                self._reconfigure_worker(rs)
                continue
            role = rs.role
            try:
                self.set_role_one(rs, "init")
            except attachmod.DeviceBusy as exc:
                rs.pending_res = r
                waiting.append(name)
                log.error("[%s] Configuration change not applied yet: the device is busy (%s). "
                          "It applies at the next role change.", name, exc)  # fmt: skip
                continue
            rs.res = r
            try:
                self.set_role_one(rs, role)
            except WorkerStartError:
                continue  # logged, role is init; the rest of the reload still applies
            log.info("[%s] Resource configuration changed: restarted in role %s.", name, role)
        self.cfg = new
        if waiting:
            log.warning("Configuration reloaded, except for %s (device busy).", ", ".join(waiting))
        else:
            log.info("Configuration reloaded.")

    def _reconfigure_worker(self, rs: ResState) -> None:
        """Hand the running worker (if any) rs.res's LIVE_FIELDS (and a primary's
        RECONNECT_FIELDS). One that cannot be told has gone away: _reap restarts it, from
        rs.res."""
        w = rs.worker
        if w is None:
            log.info("[%s] Configuration changed.", rs.res.name)
            return
        try:
            w.sock.settimeout(STATUS_TIMEOUT)
            control.send(w.sock, {"cmd": "reconfigure", "resource": asdict(rs.res)})
        except OSError as exc:
            log.warning("[%s] The worker could not be told of the new configuration: %s.", rs.res.name, exc)
            return
        log.info("[%s] Configuration change handed to the running worker.", rs.res.name)

    def shutdown(self) -> None:
        for rs in self.resources.values():
            # hastd destroys /dev/hast/<name> by force when it stops; a filesystem still mounted
            # on it gets I/O errors (the rc script runs `hastctl role init all` first).
            self._cleanup_device(rs, "shutdown")
            self.stop_worker(rs)
            self._drop_pending(rs)
        self.hooks.wait_all(2.0)
        if self.control_sock is not None:
            self.control_sock.close()
            try:
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass
        self._close_listeners()


def _differs_only_in(old: cfgmod.Resource, new: cfgmod.Resource, fields: tuple[str, ...]) -> bool:
    return replace(old, **{f: getattr(new, f) for f in fields}) == new


def _peer(conn: socket.socket) -> str:
    try:
        return peer_host(conn)
    except OSError:
        return "?"


def _same_host(remote: str, host: str) -> bool:
    """Does the peer's IP match a `remote` address (hastd compares addresses, not ports)?"""
    if remote == const.REMOTE_NONE:
        return False
    try:
        family, rhost, _ = cfgmod.parse_tcp_address(remote)
        infos = socket.getaddrinfo(rhost, None, family, socket.SOCK_STREAM)
    except (ConfigError, OSError):
        return False
    want = ipaddress.ip_address(host.split("%")[0])
    if want.version == 6 and want.ipv4_mapped:
        want = want.ipv4_mapped
    return any(ipaddress.ip_address(info[4][0].split("%")[0]) == want for info in infos)


class PidFile:
    """An flock'ed pid file: a second hastd with the same pid file refuses to start."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise AlreadyRunning(f"hastd is already running (pid file {path} is locked)") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)


def add_provider_metadata(reply: dict) -> None:
    """Fill in what a worker would report (inconsistent mark, extentsize, keepdirty) from the
    provider's metadata, for the status rows no worker answered for: role init, a secondary
    waiting for its primary. So `hastctl list` says whether a node's data is marked inconsistent
    before anyone tries to promote it. Runs on the control client's thread, not in hastd's loop:
    a read from a failing disk may block for long, and must not stop hastd.

    A primary whose worker has not answered (it is still connecting to its peer, or restarts
    after a crash) gets `dirty` from the bitmap on disk: what that worker will resync, where
    hastctl would otherwise say 0."""
    for row in reply.get("resources", []):
        if "error" in row or "inconsistent" in row or not row.get("localpath"):
            continue
        try:
            with provider.open_provider(row["localpath"], writable=False) as prov:
                md = prov.read_metadata(row["name"])
                if row.get("role") == "primary":
                    am = ActiveMap(md.datasize, md.extentsize, md.keepdirty, prov.sectorsize, const.MAXPHYS)
                    am.copyin(prov.read_bitmap(am.mapsize))
                    row["dirty"] = am.dirty_bytes
        except (OSError, HastError, ValueError) as exc:  # ValueError: a geometry the map refuses
            row["metadata_error"] = str(exc)
            continue
        row["inconsistent"] = md.inconsistent
        row.setdefault("extentsize", md.extentsize)
        row.setdefault("keepdirty", md.keepdirty)

