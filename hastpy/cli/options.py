"""Options shared by hastd and hastctl, each defined once, and the error-to-exit-code wrapper."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import NoReturn

import click

from hastpy import config as cfgmod
from hastpy import constants as const
from hastpy.errors import HastError

config_option = click.option(
    "-c", "--config", "config_path", default=const.DEFAULT_CONFIG, show_default=True,
    metavar="FILE", help="Configuration file.",  # checked by config.load: exit 78, not a usage error
)  # fmt: skip
node_option = click.option(
    "-n", "--node", default=None, metavar="NAME",
    help="Act as this node (default: hostname, short hostname, then /etc/machine-id).",
)  # fmt: skip
debug_option = click.option("-d", "--debug", count=True, help="More logging; repeatable.")

EX_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT (128 + 2)


def node_names(node: str | None) -> tuple[str, ...] | None:
    return (node,) if node else None


def load_config(config_path: str, node: str | None) -> cfgmod.Config:
    return cfgmod.load(config_path, node_names(node))


def fail(message: str, code: int) -> None:
    ctx = click.get_current_context(silent=True)
    prog = ctx.find_root().info_name if ctx else os.path.basename(sys.argv[0])
    click.echo(f"{prog}: {message}", err=True)
    sys.exit(code)


def run_main(cli: click.Command, prog: str, argv: list[str] | None = None) -> NoReturn:
    """Run a command line to its exit status, sysexits style: a usage error (an unknown option
    or command, a bad argument) exits EX_USAGE (click's own is 2), ^C at a prompt 130, and a
    command's integer result is the exit status (hastpy-lab's exec and switch pass theirs on)."""
    try:
        rc = cli.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.UsageError as exc:
        exc.show()
        sys.exit(os.EX_USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(EX_INTERRUPTED)
    sys.exit(rc if isinstance(rc, int) else 0)


def reports_errors(fn):
    """Turn HastError (its sysexits code), a tool that timed out and an OSError (EX_OSERR), and
    ^C (130) into one line on stderr; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HastError as exc:
            fail(str(exc), exc.exit_code)
        except subprocess.TimeoutExpired as exc:
            fail(f"`{exc.cmd}` timed out after {exc.timeout:g} s", os.EX_OSERR)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}", os.EX_OSERR)
        except KeyboardInterrupt:
            fail("interrupted", EX_INTERRUPTED)

    return wrapper
