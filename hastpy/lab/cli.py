"""hastpy-lab: the two-node namespace lab (node-a, node-b on a bridge in hast-sw).

Exit codes (sysexits): 0 ok; 64 usage (also: `up` on a lab that is already up); 69 a tool is
missing or the lab is not up; 71 OS error (a step failed; `up` has already torn down what it
built); 77 not root. `exec` and `switch` exit with the command's own code.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import click

from hastpy import metadata
from hastpy.cli.options import reports_errors, run_main
from hastpy.errors import HastError
from hastpy.lab import topology as topo
from hastpy.lab.lab import Lab, LabError, tool_path

PROG = "hastpy-lab"


def _size(ctx, param, value):
    if value is None:
        return topo.DEFAULT_DISK_SIZE
    try:
        return metadata.parse_size(value, "disk size")
    except HastError as exc:
        raise click.BadParameter(str(exc)) from exc


def _node(ctx, param, value):
    try:
        return topo.node(value)
    except HastError as exc:
        raise click.BadParameter(str(exc)) from exc


node_argument = click.argument("node", metavar="NODE", callback=_node)
_PASS = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dir", "labdir", envvar=topo.LABDIR_ENV, default=topo.DEFAULT_LABDIR, show_default=True,
              type=click.Path(file_okay=False), help=f"Lab directory (env {topo.LABDIR_ENV}).")
@click.pass_context
def cli(ctx: click.Context, labdir: str) -> None:
    """The two-node network-namespace lab: node-a (10.99.0.1) and node-b (10.99.0.2) on a bridge
    in namespace hast-sw (controller 10.99.0.254), each with its own mount and UTS namespace,
    /run, /etc/hast.conf, /dev/hast and sshd. Needs root."""
    ctx.obj = Lab(labdir)


@cli.command()
@click.option("--size", default=None, callback=_size, metavar="SIZE",
              help="Size of each node's sparse disk image (default 512M; k/m/g suffixes).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
@reports_errors
def up(lab: Lab, size: int, as_json: bool) -> None:
    """Build the lab. An error (64) if it is already up; tears itself down if a step fails."""
    summary = lab.up(size)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    p = lab.paths
    click.echo(f"lab up in {lab.dir} ({summary['seconds']:.2f} s)")
    for n in topo.NODES:
        click.echo(f"  {n.name}  {n.ip}/{topo.PREFIXLEN}  disk {p.disk(n)}  hast.conf {p.hast_conf(n)}")
    click.echo(f"  controller {topo.CONTROLLER_IP} in namespace {topo.SWITCH_NS}; VIP {topo.VIP}")
    click.echo(f"  ssh:     {PROG} switch ssh -F {p.ssh_config} node-a")
    click.echo(f"  ansible: {PROG} switch ansible-playbook -i {p.inventory} ...")


@cli.command()
@click.option("--purge", is_flag=True, help="Also delete the lab directory (keys, disks, logs).")
@click.pass_obj
@reports_errors
def down(lab: Lab, purge: bool) -> None:
    """Tear the lab down, leaving nothing behind; fine to repeat."""
    for warning in lab.down(purge=purge):
        click.echo(f"{PROG}: warning: {warning}", err=True)
    click.echo(f"lab down ({lab.dir}{', purged' if purge else ''})")


def _render_status(st: dict) -> str:
    lines = [f"lab {'up' if st['up'] else 'down'} ({st['dir']})"]
    ns = ", ".join(f"{name}{'' if there else ' (absent)'}" for name, there in st["namespaces"].items())
    lines.append(f"namespaces: {ns}")
    ctl = st["controller"]
    lines.append(f"controller: {ctl['namespace']} {' '.join(ctl['addresses']) or '-'}")
    holders = st["vip"]["holders"]
    vip_note = " (SPLIT: more than one holder)" if len(holders) > 1 else ""
    lines.append(f"vip {st['vip']['address']}: {', '.join(holders) or 'nobody'}{vip_note}")
    for name, info in st["nodes"].items():
        link = info["link"] or "-"
        if info["cut"]:
            link += f" (cut: {', '.join(info['cut'])})"
        lines.append(f"{name}: hostname {info['hostname'] or '-'}  addresses {' '.join(info['addresses']) or '-'}"
                     f"  link {link}")
        for proc in info["processes"]:
            lines.append(f"    pid {proc['pid']:>7}  {proc['args'][:100]}")
        for dev, target in info["dev_hast"].items():
            lines.append(f"    /dev/hast/{dev}{' -> ' + target if target else ''}")
        for m in info["mounts"]:
            lines.append(f"    mount {m['source']} on {m['target']} ({m['fstype']})")
    return "\n".join(lines)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@reports_errors
def status(lab: Lab, as_json: bool) -> None:
    """Namespaces, addresses, VIP holder, processes, /dev/hast and mounts per node."""
    st = lab.status()
    click.echo(json.dumps(st, indent=2) if as_json else _render_status(st))


def _command(command: tuple[str, ...]) -> list[str]:
    """COMMAND as given; a leading "--" (``exec node-a -- ls -l``) only separates."""
    argv = list(command[1:] if command[:1] == ("--",) else command)
    if not argv:
        raise click.UsageError("missing COMMAND")
    return argv


def _exec(argv: list[str]) -> None:
    """Replace this process (stdin, stdout and the exit code pass straight through)."""
    env = dict(os.environ, PATH=tool_path())
    prog = shutil.which(argv[0], path=env["PATH"])
    if prog is None:
        raise LabError(f"{argv[0]}: command not found (Debian package util-linux)", os.EX_UNAVAILABLE)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(prog, argv, env)


@cli.command("exec", context_settings=_PASS)
@node_argument
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
@reports_errors
def exec_(lab: Lab, node: topo.Node, command: tuple[str, ...]) -> None:
    """Run COMMAND inside NODE (its net, mount and UTS namespaces; cwd "/")."""
    argv = _command(command)
    lab._require_node_ns(node)
    _exec(lab.node_argv(node, argv))


@cli.command(context_settings=_PASS)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
@reports_errors
def switch(lab: Lab, command: tuple[str, ...]) -> None:
    """Run COMMAND in the switch namespace hast-sw (ssh, ansible, pytest --hosts, ping)."""
    argv = _command(command)
    if not lab.namespaces()[topo.SWITCH_NS]:
        raise LabError(f"the lab is not up ({topo.SWITCH_NS} does not exist)", os.EX_UNAVAILABLE)
    _exec(topo.controller_argv(argv))


@cli.command()
@node_argument
@click.pass_obj
@reports_errors
def kill(lab: Lab, node: topo.Node) -> None:
    """Crash NODE: SIGKILL all its processes except sshd; mounts and namespaces stay."""
    killed = lab.kill(node)
    if not killed:
        click.echo(f"{node.name}: nothing to kill")
    for p in killed:
        click.echo(f"{node.name}: killed {p.pid} ({p.comm})")


@cli.command()
@node_argument
@click.option("--mode", type=click.Choice(topo.CUT_MODES), default="down", show_default=True,
              help="down: link down (the node sees carrier loss); drop: iptables DROP on its eth0.")
@click.pass_obj
@reports_errors
def cut(lab: Lab, node: topo.Node, mode: str) -> None:
    """Cut NODE off the switch."""
    lab.cut(node, mode)
    click.echo(f"{node.name}: cut ({mode})")


@cli.command()
@node_argument
@click.pass_obj
@reports_errors
def heal(lab: Lab, node: topo.Node) -> None:
    """Reconnect NODE (undo every cut)."""
    lab.heal(node)
    click.echo(f"{node.name}: healed")


def main(argv: list[str] | None = None) -> None:
    run_main(cli, PROG, argv)


if __name__ == "__main__":
    main()
