"""hastctl: manage HAST resources (create, role, list, status, dump, check-config).

Exit codes (sysexits): 0 ok; 64 usage; 65 bad metadata; 66 provider missing/unusable; 69 hastd
unreachable; 70 internal; 71 OS error; 78 configuration error. With several resources the first
error's code is returned, as hastctl does.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time

import click

from hastpy import config as cfgmod
from hastpy import constants as const
from hastpy import control, failover, hookscripts, metadata, provider
from hastpy.cli.options import config_option, debug_option, fail, load_config, node_option, reports_errors, run_main
from hastpy.errors import HastError, UsageError

ROLES = ("init", "primary", "secondary")
# `role primary` returns once each new primary serves, or fails with the worker's reason and
# exit code (a missing provider is 66, as DRBD's `drbdadm primary` fails at once): a script's
# `hastctl role primary data && mount /dev/hast/data` must not go on with no device. A worker
# first tries its peer for up to the resource's `timeout` before it starts degraded; this much
# more covers opening the provider and starting the export.
ROLE_READY_MARGIN = 10.0
ROLE_READY_POLL = 0.05


def _select(cfg: cfgmod.Config, names: tuple[str, ...]) -> list[cfgmod.Resource]:
    if not names or names == ("all",):
        return list(cfg.resources)
    out = []
    for name in names:
        res = cfg.resource(name)
        if res is None:
            raise UsageError(f"resource {name!r} is not configured in {cfg.path}")
        out.append(res)
    return out


@click.group(name="hastctl", context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Control the Highly Available Storage daemon (hastd)."""


@cli.command("check-config")
@config_option
@node_option
@reports_errors
def check_config(config_path: str, node: str | None) -> None:
    """Parse the configuration; exit 0 if valid, 78 (EX_CONFIG) with file:line otherwise."""
    cfg = load_config(config_path, node)
    click.echo(f"{config_path}: OK ({len(cfg.resources)} resource(s) for node {cfg.node})")


@cli.command()
@config_option
@node_option
@click.option("-e", "extentsize", default=None, metavar="SIZE", help="Extent size (default 2M).")
@click.option("-k", "keepdirty", default=None, type=int, help="Extents kept dirty (default 64).")
@click.option("-m", "mediasize", default=None, metavar="SIZE", help="Use only this much of the provider.")
@click.argument("names", nargs=-1, required=True)
@reports_errors
def create(config_path, node, extentsize, keepdirty, mediasize, names) -> None:
    """Write fresh metadata and a clean activemap on each resource's local provider."""
    cfg = load_config(config_path, node)
    ext = metadata.parse_size(extentsize, "extent size") if extentsize else const.DEFAULT_EXTENTSIZE
    media = metadata.parse_size(mediasize, "media size") if mediasize else None
    kd = const.DEFAULT_KEEPDIRTY if keepdirty is None else keepdirty
    for res in _select(cfg, names):
        provider.create(res.local, res.name, ext, kd, media)


def _dump_one(res: cfgmod.Resource) -> metadata.Metadata:
    with provider.open_provider(res.local, writable=False) as prov:
        return prov.read_metadata(res.name)


@cli.command()
@config_option
@node_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("names", nargs=-1)
@reports_errors
def dump(config_path, node, as_json, names) -> None:
    """Print the metadata stored on each resource's local provider."""
    cfg = load_config(config_path, node)
    results, first_error = [], None
    for res in _select(cfg, names):
        try:
            results.append(_dump_one(res))
        except HastError as exc:
            click.echo(f"hastctl: {res.name}: {exc}", err=True)
            first_error = first_error or exc
    if as_json:
        click.echo(json.dumps([metadata.dump_dict(md) for md in results], indent=2))
    else:
        for md in results:
            click.echo(metadata.format_dump(md), nl=False)
    if first_error:
        raise SystemExit(first_error.exit_code)


def _call(cfg: cfgmod.Config, request: dict) -> dict:
    return control.call(cfgmod.parse_control_address(cfg.control), request)


@cli.command()
@config_option
@node_option
@debug_option
@click.option("--force", is_flag=True, help="Leave primary even if the device is mounted or open; become primary even if the local data is marked inconsistent.")
@click.argument("role", type=click.Choice(ROLES))
@click.argument("names", nargs=-1, required=True)
@reports_errors
def role(config_path, node, debug, force, role, names) -> None:
    """Change the role of resources (all, or the names given).

    Leaving primary is refused (exit 75) while /dev/hast/<name> is mounted or open, unless
    --force, which tears the device down under its users as FreeBSD's hastd does.

    Becoming primary returns once the resource is served; if its worker cannot serve (no
    provider: 66, no metadata: 65), the role falls back to init and the worker's reason and code
    are the command's. A node whose local data is marked inconsistent (a synchronization to it
    did not finish) does not serve it unless connected to a peer with the newer copy (exit 66,
    `list` says why). --force serves it anyway and drops the mark.
    """
    cfg = load_config(config_path, node)
    reply = _call(cfg, {"cmd": "role", "role": role, "resources": list(names), "force": force})
    _exit_on_resource_errors(reply)
    codes = [_wait_serving(cfg, cfg.resource(r["name"])) for r in reply["resources"]
             if r["role"] == "primary" and r["previous"] != "primary"]  # fmt: skip
    if any(codes):
        raise SystemExit(next(code for code in codes if code))  # the first error's, as hastctl


def _wait_serving(cfg: cfgmod.Config, res: cfgmod.Resource) -> int:
    """Wait until a new primary serves: 0, or its worker's exit code (said on stderr with the
    reason) if it fell back to init. A worker still starting at the deadline (its restart
    pending after a crash) is said on stderr; the role is primary all the same: 0."""
    deadline = time.monotonic() + res.timeout + ROLE_READY_MARGIN
    while True:
        st = _call(cfg, {"cmd": "status", "resources": [res.name]})["resources"][0]
        if st["role"] != "primary":
            why = (st.get("worker_error") or "the primary worker stopped").rstrip(".")
            click.echo(f"hastctl: {res.name}: {why}; role changed to {st['role']}", err=True)
            code = st.get("worker_exit")
            return code if isinstance(code, int) and os.EX_USAGE <= code <= os.EX_CONFIG else os.EX_UNAVAILABLE
        if st.get("serving"):
            return 0
        if time.monotonic() >= deadline:
            click.echo(f"hastctl: {res.name}: primary, but not serving yet after {res.timeout + ROLE_READY_MARGIN:g} s (see hastctl list)", err=True)
            return 0
        time.sleep(ROLE_READY_POLL)


def _exit_on_resource_errors(reply: dict) -> None:
    errors = [r for r in reply.get("resources", []) if "error" in r]
    for r in errors:
        click.echo(f"hastctl: {r['name']}: {r['error']}", err=True)
    if errors:
        first = errors[0]
        if isinstance(first.get("exit_code"), int):
            raise SystemExit(first["exit_code"])
        if first.get("busy"):
            raise SystemExit(os.EX_TEMPFAIL)
        raise SystemExit(os.EX_USAGE if "not configured" in first["error"] else os.EX_UNAVAILABLE)


def _human(n: int) -> str:
    return metadata.humanize(n)


def format_list(r: dict) -> str:
    """hastctl list: hastd's verbose per-resource block (hast.md §9), plus our device fields."""
    lines = [f"{r['name']}:", f"  role: {r['role']}", f"  provname: {r['provname']}", f"  localpath: {r['localpath']}"]
    ext = r.get("extentsize", 0)
    lines.append(f"  extentsize: {ext} ({_human(ext)})")
    lines.append(f"  keepdirty: {r.get('keepdirty', 0)}")
    lines.append(f"  remoteaddr: {r['remoteaddr']}")
    if r.get("sourceaddr"):
        lines.append(f"  sourceaddr: {r['sourceaddr']}")
    lines.append(f"  replication: {r['replication']}")
    if r.get("workerpid"):
        lines.append(f"  status: {r.get('status', '-')}")
        lines.append(f"  workerpid: {r['workerpid']}")
    if r.get("worker_error"):
        lines.append(f"  worker error: {r['worker_error']}")
    if r.get("connect_error"):
        lines.append(f"  connect error: {r['connect_error']}")
    if r.get("config_pending"):
        lines.append("  configuration: reloaded, applies at the next role change (the device was busy)")
    if r.get("inconsistent"):
        lines.append("  local data: inconsistent (a synchronization to this node has not finished)")
    if r.get("metadata_error"):
        lines.append(f"  metadata error: {r['metadata_error']}")
    if r["role"] == "primary":
        dirty = r.get("dirty", 0)
        lines.append(f"  dirty: {dirty} ({_human(dirty)})")
        lines.append(f"  attach: {r.get('attach')}")
        if r.get("device"):
            lines.append(f"  device: {r['device']}")
        if r.get("attach_error"):
            lines.append(f"  attach error: {r['attach_error']}")
        if r.get("nbd_socket"):
            lines.append(f"  nbdsocket: {r['nbd_socket']}")
        if "nbd_clients" in r:
            lines.append(f"  nbdclients: {r['nbd_clients']}")
        sync = r.get("sync")
        if sync:
            lines.append(f"  sync: {sync['state']}, {sync['pending']} bytes to go, {sync['synced']} bytes synced")
    st = r.get("statistics")
    if st:
        q = r.get("queues", {})
        lines += [
            "  statistics:",
            f"    reads: {st['reads']}",
            f"    writes: {st['writes']}",
            f"    deletes: {st['deletes']}",
            f"    flushes: {st['flushes']}",
            f"    activemap updates: {st.get('activemap_updates', 0)}",
            f"    local errors: read: {st['read_errors']}, write: {st['write_errors']}, "
            f"delete: {st['delete_errors']}, flush: {st['flush_errors']}",
            "    queues: " + ", ".join(f"{k}: {v}" for k, v in q.items()),
        ]
    return "\n".join(lines) + "\n"


def format_status(rows: list[dict]) -> str:
    out = ["Name\tStatus\t Role\t\tComponents"]
    for r in rows:
        status = r.get("status", "-") if r.get("workerpid") else "-"
        out.append(f"{r['name']}\t{status:<9}{r['role']:<15}{r['localpath']}\t{r['remoteaddr']}")
    return "\n".join(out) + "\n"


def _status(config_path, node, names) -> list[dict]:
    cfg = load_config(config_path, node)
    reply = _call(cfg, {"cmd": "status", "resources": list(names) or ["all"]})
    _exit_on_resource_errors(reply)
    return reply["resources"]


@cli.command("list")
@config_option
@node_option
@debug_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("names", nargs=-1)
@reports_errors
def list_(config_path, node, debug, as_json, names) -> None:
    """Verbose state of each resource, from the running hastd."""
    rows = _status(config_path, node, names)
    click.echo(json.dumps(rows, indent=2) if as_json else "".join(format_list(r) for r in rows), nl=not not as_json)


@cli.command()
@config_option
@node_option
@debug_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("names", nargs=-1)
@reports_errors
def status(config_path, node, debug, as_json, names) -> None:
    """Terse state of each resource, from the running hastd."""
    rows = _status(config_path, node, names)
    click.echo(json.dumps(rows, indent=2) if as_json else format_status(rows), nl=not not as_json)


def _target(mount: str | None, fstype: str, options: str) -> failover.Target:
    return failover.Target(mountpoint=mount, fstype=fstype, options=options)


mount_options = [
    click.option("--mount", "mount", default=None, metavar="DIR", help="Mount point (default: none, device only)."),
    click.option("--fstype", default="ext4", show_default=True, help="Filesystem type on the device."),
    click.option("--options", "mount_opts", default="defaults", show_default=True, help="Mount options."),
]


def _with_mount_options(fn):
    for opt in reversed(mount_options):
        fn = opt(fn)
    return fn


@cli.command()
@config_option
@node_option
@_with_mount_options
@click.option("--peer-wait", default=failover.PEER_WAIT, show_default=True, help="Seconds to wait for the remote primary to go away.")
@click.argument("name")
@reports_errors
def promote(config_path, node, mount, fstype, mount_opts, peer_wait, name) -> None:
    """Failover: become primary, wait for the device, fsck, mount (what VIP up-hooks run)."""
    _log_to_stderr_and_syslog()
    fo = failover.Failover(load_config(config_path, node), name, {"peer": peer_wait})
    fo.promote(_target(mount, fstype, mount_opts))


@cli.command()
@config_option
@node_option
@_with_mount_options
@click.option("--force", is_flag=True, help="Kill processes using the mount point instead of refusing.")
@click.argument("name")
@reports_errors
def demote(config_path, node, mount, fstype, mount_opts, force, name) -> None:
    """Failover: stop a running promote, unmount, become secondary (what VIP down-hooks run)."""
    _log_to_stderr_and_syslog()
    fo = failover.Failover(load_config(config_path, node), name)
    fo.demote(_target(mount, fstype, mount_opts), force=force)


@cli.command("render-hooks")
@config_option
@node_option
@click.argument("kind", type=click.Choice(sorted(hookscripts.KINDS)))
@click.option("--out", "outdir", required=True, type=click.Path(file_okay=False), help="Directory to write the scripts to.")
@click.option("--vip", required=True, metavar="ADDR/PREFIX", help="The virtual IP, e.g. 10.99.0.100/24.")
@click.option("--interface", required=True, help="Interface carrying the VIP.")
@click.option("--mount", "mounts", multiple=True, metavar="RES:DIR[:FSTYPE]", help="Mount a resource on promote.")
@click.option("--priority", default=100, show_default=True, help="keepalived priority.")
@click.option("--advert-int", default=1.0, show_default=True, help="keepalived advert interval (< 1 uses VRRPv3).")
@click.option("--hastctl", "hastctl_path", default=None, help="hastctl path in the scripts (default: this one).")
@reports_errors
def render_hooks(config_path, node, kind, outdir, vip, interface, mounts, priority, advert_int, hastctl_path) -> None:
    """Write ucarp or keepalived hook scripts that call `hastctl promote` / `demote`."""
    cfg = load_config(config_path, node)
    addr, _, prefix = vip.partition("/")
    if not prefix.isdigit():
        raise UsageError(f"--vip needs a prefix length, e.g. {addr}/24")
    by_name = {}
    for spec in mounts:
        name, _, rest = spec.partition(":")
        directory, _, fstype = rest.partition(":")
        if not directory:
            raise UsageError(f"--mount {spec!r}: expected RES:DIR[:FSTYPE]")
        by_name[name] = hookscripts.HookResource(name, directory, fstype or "ext4")
    resources = tuple(by_name.get(r.name, hookscripts.HookResource(r.name)) for r in _select(cfg, ()))
    settings = hookscripts.HookSettings(
        hastctl=hastctl_path or os.path.join(os.path.dirname(os.path.realpath(sys.argv[0])), "hastctl"),
        config=os.path.abspath(config_path), resources=resources, vip=addr, vip_prefix=int(prefix),
        interface=interface, node=node, priority=priority, advert_int=advert_int,
        notify_script=os.path.join(os.path.abspath(outdir), "notify.sh"),
    )  # fmt: skip
    os.makedirs(outdir, exist_ok=True)
    for fname, text in hookscripts.render(kind, settings).items():
        path = os.path.join(outdir, fname)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755 if fname.endswith(".sh") else 0o644)
        click.echo(path)


def _log_to_stderr_and_syslog() -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if os.path.exists("/dev/log"):
        syslog = logging.handlers.SysLogHandler("/dev/log", facility=logging.handlers.SysLogHandler.LOG_LOCAL0)
        syslog.setFormatter(logging.Formatter("hast: %(message)s"))
        handlers.append(syslog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hast %(message)s", handlers=handlers)


def main(argv: list[str] | None = None) -> None:
    run_main(cli, "hastctl", argv)


if __name__ == "__main__":
    main()
