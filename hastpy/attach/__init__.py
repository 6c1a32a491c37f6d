"""Turn a primary worker's NBD export into `<devdir>/<provname>` (DESIGN.md §2 decision 2).

Three methods, chosen per resource by hast.conf's `attach`:

- `kernel`: Linux's nbd driver, configured over generic netlink (`attach.kernel`);
- `fuse`: nbdfuse exposes the export as a file, a direct-I/O loop device makes it a block device
  (`attach.fuse`), where there is no nbd driver;
- `none`: only the unix socket, for NBD clients such as QEMU;
- `auto`: `kernel` where the nbd driver can be used, else `fuse`.

The supervisor's contract:

- `attach()` once the worker is ready to serve; it returns an `Attachment`, already recorded in
  `statedir/<name>.attach.json`, with the device and the symbolic link `<devdir>/<provname>`.
- `detach()` when leaving primary. It refuses with `DeviceBusy` (exit code EX_TEMPFAIL, nothing
  torn down) while the device is mounted or open; otherwise it removes, in the order that cannot
  hang: the link, the loop device, the FUSE mount (and nbdfuse), the nbd connection.
- `cleanup_stale()` at start-up and whenever a worker died: it tears down whatever the state
  file (or, if that is lost, the fixed names under statedir) leads to, even after kill -9 of
  everything. Call it only when no worker serves `name`: it does not ask whether the device is
  in use - a device whose server is gone is dead anyway, and a filesystem still mounted on it
  only delays the kernel's release of the loop device to its unmount.

Every external command and every wait is bounded (constants in base.py, fuse.py, kernel.py), so
none of these calls can hang the supervisor, whatever state the server or nbdfuse is in.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from hastpy import constants as const
from hastpy.attach.base import (
    METHODS,
    AttachError,
    Attachment,
    DeviceBusy,
    boot_id,
    device_busy,
    links_to,
    load_state,
    make_link,
    remove_link,
    remove_state,
    save_state,
)
from hastpy.attach.fuse import attach_fuse, fuse_leftovers, fuse_paths, our_loops, teardown_fuse
from hastpy.attach.kernel import attach_kernel, kernel_usable, our_devices, teardown_kernel
from hastpy.errors import HastError, UsageError

__all__ = [
    "Attachment",
    "AttachError",
    "DeviceBusy",
    "attach",
    "busy",
    "choose_method",
    "cleanup_stale",
    "detach",
    "kernel_usable",
    "leftovers",
]

log = logging.getLogger(__name__)


def choose_method(configured: str) -> str:
    """The concrete method for hast.conf's `attach` value: auto -> kernel if usable, else fuse."""
    if configured not in const.ATTACH_MODES:
        raise UsageError(f"attach must be one of {', '.join(const.ATTACH_MODES)}, not {configured!r}")
    if configured == "auto":
        return "kernel" if kernel_usable() else "fuse"
    return configured


def attach(
    method: str,
    name: str,
    provname: str,
    socket_path: str,
    size: int,
    devdir: str,
    statedir: str,
) -> Attachment:
    """Make the block device for the export `name` on `socket_path` and link it as
    devdir/provname. `size` (bytes, 0: do not check) must match the export's.

    Leftovers recorded for `name` are cleaned up first, unless they are still in use, which
    raises DeviceBusy. On any failure, what was made is torn down again and AttachError raised.
    """
    method = choose_method(method)
    started = time.monotonic()
    try:
        previous = load_state(statedir, name)
    except AttachError as exc:
        log.warning("[%s] %s", name, exc)
        previous = None
    if previous is not None:
        reason = busy(previous)
        if reason is not None:
            raise DeviceBusy(previous.device or "?", f"left by an earlier attachment: {reason}", name)
    for action in cleanup_stale(name, devdir, statedir):
        log.info("[%s] stale attachment: %s", name, action)

    att = Attachment(
        method=method,
        name=name,
        provname=provname,
        socket_path=socket_path,
        size=size,
        devdir=devdir,
        statedir=statedir,
        boot_id=boot_id(),
        created=time.time(),
    )
    try:
        if method == "fuse":
            attach_fuse(att)
        elif method == "kernel":
            attach_kernel(att)
        if att.device is not None:
            att.link = os.path.join(devdir, provname)
        save_state(att)
        if att.link is not None:
            make_link(att.link, att.device)
    except BaseException as exc:
        done: list[str] = []
        problems = _teardown(att, done)
        for action in done:
            log.info("[%s] undo failed attach: %s", name, action)
        if problems:
            log.error("[%s] after the failed attach, still left: %s", name, "; ".join(problems))
        else:
            remove_state(statedir, name)
        if isinstance(exc, HastError) or not isinstance(exc, Exception):
            raise
        raise AttachError(f"{name}: attach {method} failed: {exc}") from exc
    log.info(
        "[%s] attached (%s) %s%s in %.2f s",
        name,
        method,
        att.device or att.socket_path,
        f" as {att.link}" if att.link else "",
        time.monotonic() - started,
    )
    return att


def busy(att: Attachment) -> str | None:
    """Why `att`'s device cannot be detached now ("mounted on /mnt/x", "open by pid 123
    (mkfs.ext4)", ...), or None. See base.device_busy for what is checked and why."""
    if att.device is None or att.boot_id not in (None, boot_id()):
        return None
    if att.method == "fuse" and att.mountdir:
        if att.device not in our_loops(att.mountdir, att.fuse_file, att.device):
            return None  # detached meanwhile; the number may now be someone else's
        return device_busy(att.device, [att.fuse_file] if att.fuse_file else [])
    if att.method == "kernel":
        if att.nbd_index is None or att.nbd_index not in our_devices(att, same_boot=True):
            return None
    return device_busy(att.device)


def detach(att: Attachment, force: bool = False) -> None:
    """Tear `att` down: link, loop device, FUSE mount and nbdfuse, or the nbd connection.

    Without `force`, raises DeviceBusy and changes nothing while the device is mounted or open.
    With `force`, goes ahead: a filesystem still mounted sees I/O errors, and a loop device
    still open is released by the kernel at its last close. Raises AttachError (keeping the
    state file, so cleanup_stale can retry) if something could not be removed."""
    if not force:
        reason = busy(att)
        if reason is not None:
            raise DeviceBusy(att.device or "?", reason, att.name)
    started = time.monotonic()
    done: list[str] = []
    problems = _teardown(att, done)
    for action in done:
        log.info("[%s] detach: %s", att.name, action)
    if problems:
        raise AttachError(f"{att.name}: detach incomplete: {'; '.join(problems)}")
    remove_state(att.statedir, att.name)
    log.info("[%s] detached (%s) in %.2f s", att.name, att.method, time.monotonic() - started)


def cleanup_stale(name: str, devdir: str, statedir: str) -> list[str]:
    """Tear down what a dead supervisor or worker left for `name`; returns what was done (and,
    prefixed "left:", what could not be), for logging. Safe to call when nothing is left.

    Works from the state file; if that is missing or unreadable, from the fixed names under
    `statedir` (FUSE mount directory, nbdfuse pid file) and the kernel's backend tags, so a
    crash at any point of attach leaves nothing that survives this call."""
    try:
        att = load_state(statedir, name)
    except AttachError as exc:
        log.warning("[%s] %s; cleaning up by name", name, exc)
        att = None
    if att is None:
        # No usable record: look for both methods' leftovers by their fixed names and tags.
        att = Attachment(method="*", name=name, provname=name, socket_path="", size=0, devdir=devdir, statedir=statedir)
    done: list[str] = []
    problems = _teardown(att, done)
    if problems:
        log.error("[%s] stale attachment: still left: %s", name, "; ".join(problems))
    else:
        remove_state(statedir, name)
    return done + [f"left: {p}" for p in problems]


def leftovers(name: str, statedir: str) -> list[str]:
    """What of a fuse attachment of `name` exists now: loops, mounts, nbdfuse (tests, status)."""
    att = Attachment(method="fuse", name=name, provname=name, socket_path="", size=0, devdir="", statedir=statedir)
    return fuse_leftovers(att)


def _teardown(att: Attachment, done: list[str]) -> list[str]:
    """Remove the link, then the method's objects; append actions to `done`, return problems.
    Method "*" means unknown (lost state): try every method's by-name cleanup."""
    same_boot = att.boot_id in (None, boot_id())
    if not same_boot:
        # After a reboot no loop, mount, process or nbd configuration of ours can exist; pids
        # and device numbers in the record may now be someone else's. Keep only the names.
        done.append("recorded attachment is from an earlier boot")
        att = dataclasses.replace(att, nbdfuse_pid=None, nbdfuse_start=None, nbd_index=None, fuse_dev=None)
    problems: list[str] = []

    devices = {att.device} if att.device else set()
    if att.method in ("fuse", "*") and same_boot:
        mountdir, fuse_file, _, _ = fuse_paths(att.statedir, att.name)
        devices.update(our_loops(att.mountdir or mountdir, att.fuse_file or fuse_file, att.device))
    for link in {att.link, *links_to(att.devdir, devices)} - {None}:
        try:
            if (what := remove_link(link, devices or None)) is not None:
                done.append(what)
        except OSError as exc:
            problems.append(f"cannot remove {link}: {exc}")

    if att.method in ("fuse", "*"):
        problems += teardown_fuse(att, done)
    if att.method in ("kernel", "*"):
        problems += teardown_kernel(att, done, same_boot)
    if att.method not in METHODS and att.method != "*":
        problems.append(f"unknown attach method {att.method!r} in the record")
    return problems
