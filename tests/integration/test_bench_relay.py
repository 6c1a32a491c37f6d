"""bench/relay.py, devwrite.py's floor: it must do the work it stands for, or its numbers mean
nothing. Real processes on a unix socket and loopback TCP, our NBD client, several connections.
"""

import contextlib
import random
import sys
import threading
from pathlib import Path

import pytest

from hastpy.nbd.client import NBDClient

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SIZE = 16 * MiB
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from relay import BITMAP_BLOCK, Relay  # noqa: E402 - bench/ is not a package


@contextlib.contextmanager
def _relay(tmp_path, keepdirty: int):
    r = Relay(tmp_path / "floor", "floor", SIZE, keepdirty)
    try:
        yield tmp_path / "floor", r.socket, r.procs[::-1]  # primary first
    finally:
        r.stop()


@pytest.fixture(params=[0, 4], ids=["no-activemap", "activemap"])
def relay(tmp_path, request):
    with _relay(tmp_path, request.param) as r:
        yield r


def _file_bytes_written(pid: int) -> int:
    """write(2)-family bytes of the whole process so far; sends are not counted."""
    with open(f"/proc/{pid}/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])


def test_relay_writes_both_copies_before_acknowledging(relay):
    tmp, sock, procs = relay
    rng = random.Random(7)
    expected = bytearray(SIZE)

    done: list[int] = []
    errors: list[BaseException] = []

    def writer(seed: int, lo: int, hi: int) -> None:
        # Disjoint areas per connection: the relay has no range lock (its docstring says so).
        try:
            r = random.Random(seed)
            c = NBDClient.connect_unix(sock, "floor")
            assert c.can_multi_conn
            for _ in range(200):
                length = r.choice([4096, 65536, 512 * 1024])
                off = r.randrange(lo, hi - length, 4096)
                data = r.randbytes(length)
                c.pwrite(off, data)
                expected[off : off + length] = data
            c.flush()
            c.disconnect()
            done.append(seed)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, i * SIZE // 4, (i + 1) * SIZE // 4)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(done) == [0, 1, 2, 3]
    assert any(expected)
    # Every write was acknowledged, and acknowledgement waits for the peer: both copies hold
    # everything now, without waiting or stopping anything.
    primary = (tmp / "primary.img").read_bytes()[BITMAP_BLOCK : BITMAP_BLOCK + SIZE]
    peer = (tmp / "peer.img").read_bytes()[:SIZE]
    assert primary == bytes(expected)
    assert peer == bytes(expected)
    c = NBDClient.connect_unix(sock, "floor")
    off = rng.randrange(0, SIZE - MiB, 4096)
    assert c.pread(off, MiB) == bytes(expected[off : off + MiB])
    c.disconnect()
    assert all(p.poll() is None for p in procs)


def test_relay_refuses_an_unknown_export_name(relay):
    _, sock, _ = relay
    with pytest.raises(Exception, match="(?i)export|unknown|refus"):
        NBDClient.connect_unix(sock, "other")


def test_relay_activemap_marks_only_new_extents(relay, request):
    """With an activemap, the first write to an extent costs the primary one bitmap block
    written besides the data, a write to a resident extent nothing more; without one, nothing.
    """
    tmp, sock, procs = relay
    keepdirty = request.node.callspec.params["relay"]

    pid = procs[0].pid
    c = NBDClient.connect_unix(sock, "floor")
    c.pwrite(0, b"x" * 4096)  # extent 0 becomes resident
    before = _file_bytes_written(pid)
    c.pwrite(4096, b"y" * 4096)
    same_extent = _file_bytes_written(pid) - before
    before = _file_bytes_written(pid)
    c.pwrite(8 * MiB, b"z" * 4096)
    new_extent = _file_bytes_written(pid) - before
    c.disconnect()
    assert same_extent == 4096
    assert new_extent == 4096 + (BITMAP_BLOCK if keepdirty else 0)


def test_relay_activemap_marks_the_next_extent_of_a_forward_stream(tmp_path):
    """As hast's pre-marking: the write that needs a mark while the extent before it is resident
    has the next extent marked with it, so writing that one costs no mark of its own."""
    with _relay(tmp_path, 4) as (_, sock, procs):
        c = NBDClient.connect_unix(sock, "floor")
        extent = 2 * MiB
        costs = []
        for i in range(3):
            before = _file_bytes_written(procs[0].pid)
            c.pwrite(i * extent, b"s" * 4096)
            costs.append(_file_bytes_written(procs[0].pid) - before)
        c.disconnect()
    # extent 0: marked alone (nothing before it); 1: marked with 2; 2: already marked.
    assert costs == [4096 + BITMAP_BLOCK, 4096 + BITMAP_BLOCK, 4096]
