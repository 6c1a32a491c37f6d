"""Static checks of the Ansible deployment (issue #6): yamllint, ansible-lint with the production
profile, ansible-playbook --syntax-check against both inventories, `vagrant validate`, and a bad
inventory value stopping site.yml in argument validation before anything changes.

None of this needs root or the lab. The bad-inventory runs here use a local connection for the
two inventory hosts, and --check, so that even a regression could not change this machine. They
show that the run stops early: the failing task is the argument_specs validation in the first,
read-only play (the deploy play never starts), and the PLAY RECAP shows changed=0 and a failure
for both hosts. test_deploy.py repeats one of them without --check, over SSH, against the fresh
lab nodes, and checks that nothing appeared on them.
"""

from __future__ import annotations

import os
import pwd

import pytest

from infra_tools import (
    BAD_INVENTORIES, INVENTORIES, NEEDS_A_RUNNING_PAIR, PLAYBOOKS, ROOT, SITE, bad_inventory, check_stopped_early, run,
    system_tool, tail, tool_env, venv_tool,
)  # fmt: skip

# What a deploy with inventories/lab creates on the host (the lab nodes share its filesystem).
LAB_HOST_PATHS = ("/etc/hastpy-lab", "/opt/hastpy-lab", "/var/lib/hastpy-lab", "/srv/hastpy-lab")


@pytest.fixture
def env(tmp_path):
    return tool_env(tmp_path / "tools")


def test_yamllint(env):
    cp = run([venv_tool("yamllint"), "--strict", "-f", "parsable", "."], env)
    assert cp.returncode == 0, f"yamllint found problems:\n{tail(cp.stdout + cp.stderr)}"


def test_ansible_lint_production_profile(env):
    cp = run([venv_tool("ansible-lint"), "--profile", "production", "--offline", "--nocolor"], env, timeout=600)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, f"ansible-lint (production profile) failed:\n{tail(out)}"
    assert "Profile 'production' was required, and it passed" in out, tail(out)


@pytest.mark.parametrize("inventory", ["lab", "vagrant"])
def test_playbooks_syntax(env, inventory):
    argv = [venv_tool("ansible-playbook"), "-i", str(INVENTORIES / inventory), "--syntax-check"]
    cp = run(argv + [str(p) for p in PLAYBOOKS], env)
    assert cp.returncode == 0, tail(cp.stdout + cp.stderr)


def test_vagrant_validate(env, tmp_path):
    vagrant = system_tool("vagrant", "vagrant")
    venv = {
        **env,
        "VAGRANT_HOME": str(tmp_path / "vagrant-home"),
        # Vagrant writes .vagrant/ (machine index, rgloader) next to the Vagrantfile otherwise.
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "vagrant-dot"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_NO_COLOR": "1",
    }
    # vagrant-libvirt (Recommends of vagrant) validates the libvirt provider block; without it,
    # validate the rest. Asked outside the project, so that no Vagrantfile is loaded.
    plugins = run([vagrant, "plugin", "list"], venv, cwd=tmp_path)
    argv = [vagrant, "validate"] + ([] if "vagrant-libvirt" in plugins.stdout else ["--ignore-provider"])
    cp = run(argv, venv)
    assert cp.returncode == 0, tail(cp.stdout + cp.stderr)
    assert "Vagrantfile validated successfully" in cp.stdout


def host_snapshot() -> dict:
    """What of a deploy would show on this machine: the lab's host directories, the hast user."""
    try:
        pwd.getpwnam("hast")
        hast_user = True
    except KeyError:
        hast_user = False
    return {"paths": {p: os.path.lexists(p) for p in LAB_HOST_PATHS}, "hast_user": hast_user}


@pytest.mark.parametrize("change", sorted(set(BAD_INVENTORIES) - NEEDS_A_RUNNING_PAIR))
def test_bad_inventory_fails_in_argument_validation_before_any_change(env, tmp_path, change):
    inv = bad_inventory(tmp_path, change)
    local = tmp_path / "local.ini"
    local.write_text("[hast]\nnode-a ansible_connection=local\nnode-b ansible_connection=local\n")
    # The lab inventory finds the wheel through HASTPY_WHEEL_DIR, and the hast preflight (before
    # the VIP manager's) checks that it exists; nothing ever reads it.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "hastpy-0.0.0-py3-none-any.whl").touch()
    before = host_snapshot()
    argv = [venv_tool("ansible-playbook"), "-i", str(local), "-i", str(inv), str(SITE),
            # Extra vars beat the inventories: whatever they say, nothing leaves this machine,
            # and --check: nothing changes on it either.
            "-e", "ansible_connection=local", "--check"]
    cp = run(argv, {**env, "HASTPY_WHEEL_DIR": str(wheels)}, cwd=ROOT)
    check_stopped_early(cp, change)
    assert host_snapshot() == before
