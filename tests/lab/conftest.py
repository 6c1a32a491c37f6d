"""Fixtures for the namespace-lab tests (tests/lab).

``lab_dir``: a fresh lab directory per test module. ``lab``: a lab that is up for the whole module
and torn down (with a residue check) after it. Tests skip only when they cannot run at all: not
root, or ip/nsenter/sshd absent. The namespace names are fixed, so a lab already up on this
machine is an error, not a skip.
"""

from __future__ import annotations

import os
import shutil

import pytest

from hastpy.lab import Lab
from hastpy.lab import topology as topo
from hastpy.lab.lab import tool_path

ESSENTIAL = ("ip", "nsenter", "sshd")


def lab_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the namespace lab needs root"
    missing = [t for t in ESSENTIAL if shutil.which(t, path=tool_path()) is None]
    if missing:
        return f"the namespace lab needs {', '.join(missing)} (make deps installs them)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = lab_unavailable_reason()
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here + os.sep):
            item.add_marker(pytest.mark.lab)
            item.add_marker(pytest.mark.root)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def assert_no_foreign_lab() -> None:
    there = [name for name in topo.NAMESPACES if os.path.lexists(topo.netns_path(name))]
    if there:
        pytest.fail(f"network namespace(s) {', '.join(there)} already exist: another lab is up on this "
                    "machine (hastpy-lab down --dir <its dir>)", pytrace=False)


@pytest.fixture
def no_foreign_lab():
    """Fails the test (not a skip) if the lab's namespaces already exist on this machine."""
    assert_no_foreign_lab()


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(scope="module")
def lab(lab_dir):
    """An up lab for the module; down (and purged) afterwards, which must leave nothing behind."""
    assert_no_foreign_lab()
    lab = Lab(lab_dir)
    lab.up(size=64 * topo.MiB)
    try:
        yield lab
    finally:
        lab.down(purge=True)
        assert lab.residue() == []
