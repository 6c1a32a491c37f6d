"""The `kernel` attach method: Linux's nbd driver (/dev/nbdN), configured over generic netlink.

We do what `nbd-client` does, without it (reference/peers.md §5.4): connect to the worker's unix
socket, run the fixed-newstyle handshake up to NBD_OPT_GO with `hastpy.nbd.client.NBDClient`
(which leaves the socket in transmission phase, simple replies, as the kernel expects), then send
NBD_CMD_CONNECT with that socket's fd, the size, block size, the server's transmission flags and
timeouts; where the export allows multi-conn, MULTI_CONN_SOCKETS such sockets (nbd-client's
-connections). The kernel takes its own references to the sockets and answers with the device
index; our fds are closed after the reply. Detach is NBD_CMD_DISCONNECT by index.

Needs Linux >= 4.12 (the nbd netlink family) and CAP_SYS_ADMIN. The ioctl interface
(NBD_SET_SOCK ... NBD_DO_IT, which needs a thread parked in the kernel for the device's life) is
not implemented: every kernel with a usable nbd driver for us also has netlink.

Identity: each device is tagged with a backend identifier (NBD_ATTR_BACKEND_IDENTIFIER, shown in
/sys/block/nbdN/backend on Linux >= 5.14) naming the resource and state directory; cleanup only
disconnects an index whose tag is ours (or, on older kernels, one we recorded in this boot).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import socket
import threading

from hastpy.attach import netlink as nl
from hastpy.attach.base import (
    SECTOR_SIZE,
    AttachError,
    Attachment,
    run_command,
    save_state,
    wait_until,
)
from hastpy.errors import HastError
from hastpy.nbd.client import NBDClient

log = logging.getLogger(__name__)

# --- Limits, each with its reason -------------------------------------------------------------

# The handshake with our own worker is a few local round trips; a worker that does not finish it
# in this long is not ready to serve, and attach fails rather than wait.
HANDSHAKE_TIMEOUT = 10.0
# A netlink request is handled synchronously in the kernel (connect: allocate the device, start
# its receive workers; no I/O to the server). Bound our wait for the answer anyway.
NETLINK_TIMEOUT = 10.0
# Receive buffer for netlink answers: ours are a few dozen bytes, an error copies our request.
NETLINK_RECV_SIZE = 65536
# Per-request timeout given to the kernel, in seconds. 0: none (Linux >= 5.x then waits and
# logs instead of failing). Peer stalls are the worker's business (HAST `timeout`, default 20 s);
# a kernel timeout would only turn a stall into EIO for the filesystem (peers.md §5.5 item 5).
IO_TIMEOUT = 0
# Seconds I/O waits for a reconnect (NBD_CMD_RECONFIGURE) once the socket is dead. We do not
# reconnect a device to a restarted worker, so waiting would only delay the filesystem's EIO
# and keep umount/detach waiting: fail at once.
DEAD_CONN_TIMEOUT = 0
# After NBD_CMD_DISCONNECT the kernel tears the configuration down asynchronously (its receive
# workers notice the shut socket); /sys/block/nbdN/pid disappears when it is done.
DISCONNECT_TIMEOUT = 10.0
# How long an idle device gets to drop its configuration before we check whether it is held
# open (then the kernel keeps it until the last close, and waiting longer cannot help).
DISCONNECT_SETTLE = 1.0
# Time for devtmpfs/udev to show /dev/nbdN after the kernel created the device.
DEVICE_NODE_TIMEOUT = 5.0
# `modprobe nbd` when the driver is neither loaded nor built in.
MODPROBE_TIMEOUT = 10.0
# Sockets given to the device when the export allows multi-conn; one otherwise. The driver sends
# each hardware queue's requests on a socket of its own (blk-mq makes at most one queue per CPU;
# a spare socket takes over from a dead one), and the worker serves each socket on its own
# thread, so the copies of concurrent requests overlap. nbdfuse's default number, too.
MULTI_CONN_SOCKETS = 4

NBD_MAJOR = 43
_seq = itertools.count(int.from_bytes(os.urandom(2), "little") + 1)
_seq_lock = threading.Lock()


def _next_seq() -> int:
    with _seq_lock:
        return next(_seq) & 0xFFFFFFFF or 1


# --- Generic netlink I/O ----------------------------------------------------------------------


def _transact(request_for_seq, what: str) -> list[nl.Message]:
    """Send one request (built for a fresh sequence number) and collect the kernel's answers up
    to its ack. Raises NetlinkError on a kernel error, a timeout or a socket failure."""
    seq = _next_seq()
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_GENERIC)
    except OSError as exc:
        raise nl.NetlinkError(exc.errno or 0, "no generic netlink socket", what) from exc
    with sock:
        with contextlib.suppress(OSError):
            sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_EXT_ACK, 1)
        sock.settimeout(NETLINK_TIMEOUT)
        try:
            sock.bind((0, 0))
            request = request_for_seq(seq)
            if sock.send(request) != len(request):  # a datagram goes whole or not at all
                raise nl.NetlinkError(errno.EMSGSIZE, "request truncated", what)
            replies: list[nl.Message] = []
            while True:
                data = sock.recv(NETLINK_RECV_SIZE)
                got, finished = nl.collect_replies(nl.parse_messages(data), seq, what)
                replies += got
                if finished:
                    return replies
        except TimeoutError as exc:
            raise nl.NetlinkError(errno.ETIMEDOUT, f"no answer in {NETLINK_TIMEOUT:.0f} s", what) from exc
        except nl.NetlinkError:
            raise
        except OSError as exc:
            raise nl.NetlinkError(exc.errno or 0, str(exc), what) from exc


def resolve_family(name: str) -> int:
    """The numeric id of generic netlink family `name` (ENOENT: not registered)."""
    replies = _transact(lambda seq: nl.get_family_request(name, seq), f"looking up netlink family {name!r}")
    return nl.family_id(replies)


# --- Availability -----------------------------------------------------------------------------


def kernel_usable() -> bool:
    """True where the nbd driver can be used: /dev/nbd0 or /sys/module/nbd exists, or `modprobe
    nbd` loads it; and its netlink family answers (the only interface we drive)."""
    present = os.path.exists("/dev/nbd0") or os.path.isdir("/sys/module/nbd")
    if not present:
        present = run_command(["modprobe", "nbd"], MODPROBE_TIMEOUT, quiet=True).ok
    if not present:
        return False
    try:
        resolve_family(nl.NBD_GENL_FAMILY_NAME)
    except HastError as exc:
        log.info("nbd driver present but its netlink family is not usable: %s", exc)
        return False
    return True


def backend_identifier(statedir: str, name: str) -> str:
    """Our tag for the device of `name`: unique per node (state directory) and resource."""
    return f"hastpy:{os.path.join(os.path.realpath(statedir), name)}"


# --- Make -------------------------------------------------------------------------------------


def attach_kernel(att: Attachment, *, io_timeout: int = IO_TIMEOUT, dead_conn_timeout: int = DEAD_CONN_TIMEOUT) -> None:
    """Connect, handshake, NBD_CMD_CONNECT; fills in and saves `att`. Raises AttachError."""
    att.backend_id = backend_identifier(att.statedir, att.name)
    save_state(att)
    socks: list[socket.socket] = []
    try:
        client = _handshake(att, socks)
        if att.size and client.size != att.size:
            raise AttachError(f"export {att.name!r} has {client.size} bytes, expected {att.size}")
        if client.block_sizes and client.block_sizes[0] > SECTOR_SIZE:
            raise AttachError(f"export {att.name!r} needs {client.block_sizes[0]}-byte blocks; we use {SECTOR_SIZE}")
        if client.can_multi_conn:
            while len(socks) < MULTI_CONN_SOCKETS:
                _handshake(att, socks)
        for sock in socks:
            sock.settimeout(None)  # the kernel gets blocking sockets, as from nbd-client
        try:
            family = resolve_family(nl.NBD_GENL_FAMILY_NAME)
            replies = _transact(
                lambda seq: nl.nbd_connect_request(
                    family,
                    seq,
                    size=client.size,
                    block_size=SECTOR_SIZE,
                    server_flags=client.transmission_flags,
                    timeout=io_timeout,
                    dead_conn_timeout=dead_conn_timeout,
                    sockets=[sock.fileno() for sock in socks],
                    backend_id=att.backend_id,
                ),
                "NBD_CMD_CONNECT",
            )
            index = nl.connect_index(replies, family)
        except nl.NetlinkError as exc:
            hint = " (the nbd driver is not loaded: modprobe nbd)" if exc.errno == errno.ENOENT else ""
            raise AttachError(f"cannot connect an nbd device to {att.socket_path}: {exc}{hint}") from exc
    finally:
        for sock in socks:
            sock.close()  # the kernel holds its own references from here on
    att.nbd_index = index
    att.device = f"/dev/nbd{index}"
    save_state(att)
    if not wait_until(lambda: os.path.exists(att.device), DEVICE_NODE_TIMEOUT):
        raise AttachError(f"{att.device} did not appear within {DEVICE_NODE_TIMEOUT:.0f} s")


def _handshake(att: Attachment, socks: list[socket.socket]) -> NBDClient:
    """One more connection to the worker's export, in transmission phase, added to `socks`
    (which the caller closes, also on failure)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socks.append(sock)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        sock.connect(att.socket_path)
        return NBDClient(sock, att.name)  # runs the handshake; the kernel then uses `sock`
    except (OSError, HastError) as exc:
        raise AttachError(f"NBD handshake with {att.socket_path} (export {att.name!r}) failed: {exc}") from exc


# --- Tear down --------------------------------------------------------------------------------


def _held(index: int) -> bool:
    """Whether something has /dev/nbdN open or mounted (an exclusive open is refused)."""
    try:
        fd = os.open(f"/dev/nbd{index}", os.O_RDONLY | os.O_EXCL | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def nbd_connected(index: int) -> bool:
    """/sys/block/nbdN/pid exists exactly while the device has a live configuration."""
    return os.path.exists(f"/sys/block/nbd{index}/pid")


def nbd_backend(index: int) -> str | None:
    try:
        with open(f"/sys/block/nbd{index}/backend", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def kernel_has_backend_ids(release: str | None = None) -> bool:
    """Linux >= 5.14 keeps NBD_ATTR_BACKEND_IDENTIFIER in /sys/block/nbdN/backend."""
    parts = (release or os.uname().release).split(".")
    try:
        return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)) >= (5, 14)
    except (IndexError, ValueError):
        return False


def _is_ours(att: Attachment, index: int, same_boot: bool) -> bool:
    # The backend file exists only for devices connected with an identifier, so on a kernel
    # that keeps them a missing file means "someone else's", never "ours".
    if kernel_has_backend_ids():
        return nbd_backend(index) == att.backend_id
    # Older kernels cannot tag: trust only the index recorded in this boot.
    return same_boot and index == att.nbd_index


def our_devices(att: Attachment, same_boot: bool) -> list[int]:
    """Connected nbd devices that belong to `att`: the recorded index, and any tagged as ours
    (a crash between the kernel's answer and saving the state)."""
    indexes = set()
    if att.nbd_index is not None:
        indexes.add(att.nbd_index)
    if att.backend_id:
        with contextlib.suppress(OSError):
            for entry in os.listdir("/sys/block"):
                if entry.startswith("nbd") and entry[3:].isdigit():
                    indexes.add(int(entry[3:]))
    return sorted(i for i in indexes if nbd_connected(i) and _is_ours(att, i, same_boot))


def teardown_kernel(att: Attachment, done: list[str], same_boot: bool = True) -> list[str]:
    """NBD_CMD_DISCONNECT each of our devices and wait (bounded) for the kernel to let go."""
    if att.backend_id is None:
        att.backend_id = backend_identifier(att.statedir, att.name)
    problems = []
    for index in our_devices(att, same_boot):
        try:
            family = resolve_family(nl.NBD_GENL_FAMILY_NAME)
            _transact(lambda seq, i=index: nl.nbd_disconnect_request(family, seq, i), "NBD_CMD_DISCONNECT")
        except nl.NetlinkError as exc:
            problems.append(f"cannot disconnect /dev/nbd{index}: {exc}")
            continue
        if wait_until(lambda i=index: not nbd_connected(i), DISCONNECT_SETTLE):
            done.append(f"disconnected /dev/nbd{index}")
        elif _held(index):
            # Mounted or open: its sockets are shut down (new I/O fails at once), but the kernel
            # keeps the configuration until the last close. Waiting longer cannot help.
            done.append(f"disconnected /dev/nbd{index} (still held open: released at its last close)")
        elif wait_until(lambda i=index: not nbd_connected(i), DISCONNECT_TIMEOUT):
            done.append(f"disconnected /dev/nbd{index}")
        else:
            problems.append(f"/dev/nbd{index} still connected {DISCONNECT_TIMEOUT:.0f} s after NBD_CMD_DISCONNECT")
    return problems
