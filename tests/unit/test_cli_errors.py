"""The error wrapper every command line shares (hastctl, hastd, hastpy-lab): one line on stderr
and a sysexits-style code for each kind of failure a user can cause, never a traceback."""

from __future__ import annotations

import errno
import os
import subprocess

import click
import pytest
from click.testing import CliRunner

from hastpy.cli import hastctl, hastd
from hastpy.cli.options import EX_INTERRUPTED, reports_errors
from hastpy.errors import ConfigError
from hastpy.lab import cli as labcli


def _command(exc: BaseException) -> click.Command:
    @click.command()
    @reports_errors
    def cmd():
        raise exc

    return cmd


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (ConfigError("hast.conf:3: unknown keyword 'foo'"), os.EX_CONFIG, "hast.conf:3: unknown keyword 'foo'"),
        (subprocess.TimeoutExpired(["losetup", "-d", "/dev/loop0"], 10), os.EX_OSERR,
         "`['losetup', '-d', '/dev/loop0']` timed out after 10 s"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/etc/hast.conf"), os.EX_OSERR,
         "/etc/hast.conf: No such file or directory"),
        (KeyboardInterrupt(), EX_INTERRUPTED, "interrupted"),
    ],
)  # fmt: skip
def test_each_failure_is_one_line_and_its_exit_code(exc, code, line):
    result = CliRunner().invoke(_command(exc), [], prog_name="hastpy-lab", catch_exceptions=False)
    assert result.exit_code == code
    assert result.stderr == f"hastpy-lab: {line}\n"
    assert "Traceback" not in result.output


@pytest.mark.parametrize("main", [hastctl.main, hastd.main, labcli.main], ids=["hastctl", "hastd", "hastpy-lab"])
@pytest.mark.parametrize("argv", [["--no-such-option"], ["--help"]], ids=["usage-error", "help"])
def test_usage_errors_exit_ex_usage_and_help_exits_0(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    if argv == ["--help"]:
        assert exit_.value.code == 0 and "Usage:" in out
    else:
        assert exit_.value.code == os.EX_USAGE  # sysexits; click's own code would be 2
        assert "--no-such-option" in err
