"""Shared by test_deploy.py and test_lint.py: where the tools are, the environment they run in,
and reading ansible-playbook's PLAY RECAP.

The tools come from the project's own install: the Python packages (ansible-core, ansible-lint,
yamllint, pytest-testinfra) from the test extras in the venv that runs pytest, vagrant from the
Debian package (the Makefile's APT_PACKAGES). A missing tool skips a test on a developer's
machine and fails it in CI (env CI set), where everything must run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hastpy.lab.lab import tool_path

ROOT = Path(__file__).resolve().parents[2]
# The venv running pytest (`make test`: .venv/bin): not resolved, a venv's python is a symlink.
VENV_BIN = Path(sys.executable).parent
INVENTORIES = ROOT / "inventories"
SITE = ROOT / "site.yml"
PLAYBOOKS = [SITE, *sorted((ROOT / "playbooks").glob("*.yml"))]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> None:
    """Skip, except in CI, where a test that cannot run is a failure."""
    __tracebackhide__ = True
    if in_ci():
        pytest.fail(f"{reason} (CI is set: nothing may be skipped for a missing tool)", pytrace=False)
    pytest.skip(reason)


def venv_tool(name: str) -> str:
    """A console script of the test extras, from the venv running pytest only."""
    path = VENV_BIN / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        unavailable(f"{name} is not installed in {VENV_BIN} (pip install -e '.[test]')")
    return str(path)


def system_tool(name: str, package: str) -> str:
    path = shutil.which(name, path=tool_path())
    if path is None:
        unavailable(f"{name} is not installed (Debian package {package}; `make deps` installs it)")
    return path


def tool_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment for ansible, ansible-lint, yamllint, vagrant and the inner pytest: the venv
    first on PATH; every directory Ansible would otherwise make under ~ (or on the nodes, which
    share the host's /root) kept under ``tmp``; no colours; nothing inherited that would change
    what runs (ANSIBLE_*, an outer pytest-cov's COV_CORE_*, PYTEST_ADDOPTS)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANSIBLE_", "COV_CORE_", "VAGRANT_")) and k not in ("PYTEST_ADDOPTS",)}
    tmp.mkdir(parents=True, exist_ok=True)
    env.update({
        "PATH": os.pathsep.join([str(VENV_BIN), tool_path()]),
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local"),
        "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-remote"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp / "cp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "XDG_CACHE_HOME": str(tmp / "cache"),
        "NO_COLOR": "1",
        "PY_COLORS": "0",
    })  # fmt: skip
    env.update(extra)
    return env


_RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$")


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """{host: {ok, changed, unreachable, failed, skipped, rescued, ignored}} from the last PLAY
    RECAP in ansible-playbook's output."""
    at = output.rfind("PLAY RECAP")
    if at < 0:
        return {}
    recap = {}
    for line in output[at:].splitlines()[1:]:
        m = _RECAP_LINE.match(line.strip())
        if m:
            recap[m["host"]] = {k: int(v) for k, v in (kv.split("=") for kv in m["counts"].split())}
    return recap


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run(argv: list[str], env: dict[str, str], *, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a tool on the host (lint, syntax check, vagrant), output captured as text."""
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def check_stopped_early(cp, change: str) -> None:
    """site.yml failed in the first play (argument_specs validation, or a preflight check), on
    both hosts, with nothing changed and the deploy play never started."""
    __tracebackhide__ = True
    out = cp.stdout + cp.stderr
    message = BAD_INVENTORIES[change][1]
    assert cp.returncode != 0, f"site.yml accepted the bad inventory ({change}):\n{tail(out)}"
    assert message in out, f"no argument_specs message {message!r}:\n{tail(out)}"
    assert "Validating arguments against arg spec 'preflight'" in out, tail(out)
    assert "PLAY [Deploy hastd and the VIP manager]" not in out, f"the deploy play started:\n{tail(out)}"
    recap = parse_recap(out)
    assert sorted(recap) == ["node-a", "node-b"], tail(out)
    assert {h: (r["changed"], r["failed"] > 0) for h, r in recap.items()} == {
        "node-a": (0, True), "node-b": (0, True)}, recap  # fmt: skip


def bad_inventory(dst: Path, change: str) -> Path:
    """A copy of inventories/lab with one bad value (``change``: see BAD_INVENTORIES)."""
    inv = dst / f"inventory-{change}"
    shutil.copytree(INVENTORIES / "lab", inv)
    gv = inv / "group_vars" / "hast.yml"
    text = gv.read_text()
    for old, new in BAD_INVENTORIES[change][0]:
        assert text.count(old) == 1, f"inventories/lab changed: {old!r} is not in {gv} once"
        text = text.replace(old, new)
    gv.write_text(text)
    return inv


# change -> ([(text in inventories/lab/group_vars/hast.yml, its replacement)], the message (of
# argument_specs or a preflight check) that must stop the run)
BAD_INVENTORIES = {
    "unknown-replication": (
        [("    replication: memsync\n", "    replication: bogus\n")],
        "value of replication must be one of: fullsync, memsync, async, got: bogus found in hast_resources",
    ),
    "missing-remote": (
        # node-b's address is node-a's `remote` in hast.conf.
        [("  - host: node-b\n    address: 10.99.0.2\n", "  - host: node-b\n")],
        "missing required arguments: address found in hast_nodes",
    ),
    "keepalived-missing-vip": (
        [("keepalived_vip: 10.99.0.100\n", "")],
        "missing required arguments: keepalived_vip",
    ),
    "vip-outside-subnet": (
        # A typo in the VIP: the lab's nodes are 10.99.0.1 and .2 on eth0 (a /24).
        [("keepalived_vip: 10.99.0.100\n", "keepalived_vip: 10.98.0.100\n")],
        "keepalived_vip 10.98.0.100/24 is not in the subnet of this node",
    ),
    "resource-name-with-slash": (
        [("  - name: data\n    replication: memsync\n", "  - name: da/ta\n    replication: memsync\n")],
        "Resource names become file names (/dev/hast/<name>): none may contain '/'",
    ),
    "switch-to-ucarp": (
        # Only refused on a pair that runs keepalived (NEEDS_A_RUNNING_PAIR).
        [("hastpy_vip_manager: keepalived\n", "hastpy_vip_manager: ucarp\n")],
        "keepalived runs for hast on",
    ),
    "ucarp-missing-interface": (
        [("hastpy_vip_manager: keepalived\n", "hastpy_vip_manager: ucarp\n"), ("ucarp_interface: eth0\n", "")],
        "missing required arguments: ucarp_interface",
    ),
}
# Bad only next to what the deploy started: tested against the lab's converged pair alone.
NEEDS_A_RUNNING_PAIR = frozenset({"switch-to-ucarp"})
