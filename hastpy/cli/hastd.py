"""hastd: the Highly Available Storage daemon (supervisor process)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

import click

from hastpy.cli.options import config_option, debug_option, node_names, node_option, reports_errors, run_main
from hastpy.supervisor import PidFile, Supervisor

LOG_FORMAT = "%(asctime)s hastd[%(process)d] %(levelname)s %(message)s"


def _setup_logging(debug: int, foreground: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    if foreground or not os.path.exists("/dev/log"):
        logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    else:
        handler = logging.handlers.SysLogHandler("/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("hastd[%(process)d]: %(message)s"))
        logging.basicConfig(level=level, handlers=[handler])


@click.command(name="hastd", context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@node_option
@debug_option
@click.option("-F", "--foreground", is_flag=True, help="Stay in the foreground, log to stderr.")
@click.option("-P", "--pidfile", default=None, help="Pid file (default: from the configuration).")
@reports_errors
def cli(config_path: str, node: str | None, debug: int, foreground: bool, pidfile: str | None) -> None:
    """Replicate block devices between two nodes, as FreeBSD's hastd."""
    _setup_logging(debug, foreground)
    sup = Supervisor(config_path, node_names(node), debug)
    pid = PidFile(pidfile or sup.cfg.pidfile)
    try:
        sup.open_control()
        sup.cleanup_all()
        sup.open_listeners()
        if not foreground:
            _daemonize()
            os.ftruncate(pid.fd, 0)
            os.pwrite(pid.fd, f"{os.getpid()}\n".encode(), 0)
        logging.getLogger("hastd").info("Started (node %s, %d resource(s)).", sup.cfg.node, len(sup.resources))
        sys.exit(sup.serve())
    finally:
        pid.remove()


def _daemonize() -> None:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None) -> None:
    run_main(cli, "hastd", argv)


if __name__ == "__main__":
    main()
