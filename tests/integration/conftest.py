"""Fixtures for the integration tests (the harness itself is in harness.py)."""

import os
import signal

import pytest

from harness import MiB, Pair


@pytest.fixture
def make_pair(tmp_path):
    pairs = []

    def make(size=64 * MiB, **params) -> Pair:
        p = Pair(tmp_path / f"pair{len(pairs)}", size, **params)
        pairs.append(p)
        return p

    yield make
    for p in pairs:
        p.stop()
        for n in (p.a, p.b):
            for pid in n.worker_pids():
                os.kill(pid, signal.SIGKILL)
