"""hastctl: manage HAST resources (create, role, list, status, dump, check-config).

Exit codes (sysexits): 0 ok; 64 usage; 65 bad metadata; 66 provider missing/unusable; 69 hastd
unreachable; 70 internal; 71 OS error; 78 configuration error. With several resources the first
error's code is returned, as hastctl does.
"""

from __future__ import annotations

import json
import os

import click

from hastpy import config as cfgmod
from hastpy import constants as const
from hastpy import control, metadata, provider
from hastpy.cli.options import config_option, debug_option, fail, load_config, node_option, reports_errors
from hastpy.errors import HastError, UsageError

ROLES = ("init", "primary", "secondary")


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
@click.argument("role", type=click.Choice(ROLES))
@click.argument("names", nargs=-1, required=True)
@reports_errors
def role(config_path, node, debug, role, names) -> None:
    """Change the role of resources (all, or the names given)."""
    cfg = load_config(config_path, node)
    reply = _call(cfg, {"cmd": "role", "role": role, "resources": list(names)})
    _exit_on_resource_errors(reply)


def _exit_on_resource_errors(reply: dict) -> None:
    errors = [r for r in reply.get("resources", []) if "error" in r]
    for r in errors:
        click.echo(f"hastctl: {r['name']}: {r['error']}", err=True)
    if errors:
        raise SystemExit(os.EX_UNAVAILABLE if "not configured" not in errors[0]["error"] else os.EX_USAGE)


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
    if r["role"] == "primary":
        dirty = r.get("dirty", 0)
        lines.append(f"  dirty: {dirty} ({_human(dirty)})")
        if r.get("nbd_socket"):
            lines.append(f"  nbdsocket: {r['nbd_socket']}")
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


def main() -> None:
    cli(prog_name="hastctl")


if __name__ == "__main__":
    main()
