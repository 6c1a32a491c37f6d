"""hastctl's offline commands through click's CliRunner: exit codes, one-line errors, dump output."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from hastpy.cli import hastctl

MiB = 1024 * 1024

GOOD = """\
resource data {{
    on node-a {{
        local {disk}
        remote 10.0.0.2
    }}
    on node-b {{
        local /nonexistent/b
        remote 10.0.0.1
    }}
}}
"""

BAD = {
    "missing brace": ("resource data {\n    on node-a {\n        local /x\n        remote 10.0.0.2\n    }\n", 5, "missing '}'"),
    "unknown keyword": ("resource data {\n    bogus 1\n}\n", 2, "bogus"),
    "no local": ("resource data {\n    on node-a {\n        remote 10.0.0.2\n    }\n}\n", 1, "local"),
    "no on for node": ("resource data {\n    on hosta {\n        local /x\n        remote 10.0.0.2\n    }\n}\n", 1, "acceptable node names: node-a"),
    "duplicate": (
        "resource d {\n on node-a {\n local /x\n remote 1.2.3.4\n }\n}\nresource d {\n on node-a {\n local /y\n remote 1.2.3.4\n }\n}\n",
        7,
        "duplicate resource",
    ),
    "non-numeric timeout": ("timeout soon\n", 1, "soon"),
}


def run(*args):
    return CliRunner().invoke(hastctl.cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("case", sorted(BAD))
def test_check_config_errors_are_one_line_with_file_and_line(tmp_path, case):
    text, line, needle = BAD[case]
    conf = tmp_path / "hast.conf"
    conf.write_text(text)
    result = run("check-config", "-c", str(conf), "-n", "node-a")
    assert result.exit_code == os.EX_CONFIG, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"hastctl: {conf}:{line}: "), lines[0]
    assert needle in lines[0]
    assert "Traceback" not in result.output


def test_check_config_valid(tmp_path):
    conf = tmp_path / "hast.conf"
    conf.write_text(GOOD.format(disk=tmp_path / "disk"))
    result = run("check-config", "-c", str(conf), "-n", "node-a")
    assert result.exit_code == 0
    assert "OK" in result.output


def test_check_config_missing_file(tmp_path):
    result = run("check-config", "-c", str(tmp_path / "nope.conf"), "-n", "node-a")
    assert result.exit_code == os.EX_CONFIG
    assert "nope.conf" in result.output and "Traceback" not in result.output


@pytest.fixture
def conf(tmp_path):
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(100 * MiB)
    path = tmp_path / "hast.conf"
    path.write_text(GOOD.format(disk=disk))
    return path


def test_create_then_dump_shows_the_sizing_arithmetic(conf):
    assert run("create", "-c", str(conf), "-n", "node-a", "data").exit_code == 0
    result = run("dump", "-c", str(conf), "-n", "node-a", "data")
    assert result.exit_code == 0
    # 100 MiB, 512-byte sectors, 2 MiB extents: 50 extents -> a 512-byte map (hast.md §2).
    assert result.output == (
        "resource: data\n"
        "    datasize: 104852992 (100MB)\n"
        "    extentsize: 2097152 (2.0MB)\n"
        "    keepdirty: 64\n"
        "    localoff: 4608\n"
        "    resuid: 0\n"
        "    localcnt: 0\n"
        "    remotecnt: 0\n"
        "    prevrole: init\n"
    )
    js = json.loads(run("dump", "-c", str(conf), "-n", "node-a", "--json", "all").output)
    assert js == [
        {"resource": "data", "datasize": 104852992, "extentsize": 2097152, "keepdirty": 64, "localoff": 4608,
         "resuid": 0, "localcnt": 0, "remotecnt": 0, "prevrole": "init", "inconsistent": False,
         "replicaid": 0, "peerid": 0}  # fmt: skip
    ]


def test_create_options(conf):
    result = run("create", "-c", str(conf), "-n", "node-a", "-e", "1M", "-k", "16", "-m", "50M", "data")
    assert result.exit_code == 0, result.output
    js = json.loads(run("dump", "-c", str(conf), "-n", "node-a", "--json").output)[0]
    # nextents = ceil((50 MiB - 4096) / 1 MiB) = 50 -> 7 bytes -> one 512-byte sector.
    assert js["extentsize"] == MiB and js["keepdirty"] == 16
    assert js["datasize"] == 50 * MiB - 4096 - 512 and js["localoff"] == 4608


def test_create_refuses_mediasize_larger_than_provider(conf):
    result = run("create", "-c", str(conf), "-n", "node-a", "-m", "1G", "data")
    assert result.exit_code != 0
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_dump_of_never_created_provider_says_so(conf):
    result = run("dump", "-c", str(conf), "-n", "node-a", "data")
    assert result.exit_code == os.EX_DATAERR
    assert "hastctl create" in result.output


def test_missing_provider_is_a_clear_error(tmp_path):
    path = tmp_path / "hast.conf"
    path.write_text(GOOD.format(disk=tmp_path / "absent"))
    result = run("create", "-c", str(path), "-n", "node-a", "data")
    assert result.exit_code == os.EX_NOINPUT
    assert "absent" in result.output and "Traceback" not in result.output


def test_unknown_resource_is_a_usage_error(conf):
    result = run("create", "-c", str(conf), "-n", "node-a", "other")
    assert result.exit_code == os.EX_USAGE
    assert "other" in result.output


def test_daemon_commands_without_hastd(conf, tmp_path):
    text = conf.read_text()
    conf.write_text(f"control {tmp_path}/ctl\n" + text)
    for args in (("role", "primary", "data"), ("status",), ("list",)):
        result = run(args[0], "-c", str(conf), "-n", "node-a", *args[1:])
        assert result.exit_code == os.EX_UNAVAILABLE, (args, result.output)
        assert "is hastd running" in result.output


def test_bad_role_is_usage_error(conf, capsys):
    with pytest.raises(SystemExit) as exit_:
        hastctl.main(["role", "boss", "data", "-c", str(conf)])
    assert exit_.value.code == os.EX_USAGE  # sysexits, not click's 2
    assert "boss" in capsys.readouterr().err
