"""bench/relay.py, devwrite.py's floor: it must do the work it stands for, or its numbers mean
nothing. Real processes on a unix socket and loopback TCP, our NBD client, several connections.
"""

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hastpy.nbd.client import NBDClient

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SIZE = 16 * MiB
BITMAP_BLOCK = 512  # relay.py: the primary's data sits behind its bitmap block
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "relay.py"
READY_TIMEOUT = 20.0


def _wait_file(path: Path) -> str:
    end = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < end:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


@pytest.fixture(params=[0, 4], ids=["no-activemap", "activemap"])
def relay(tmp_path, request):
    for f in ("p.img", "s.img"):
        with open(tmp_path / f, "wb") as fh:
            fh.truncate(SIZE + MiB)
    py = [sys.executable, str(SCRIPT)]
    peer = subprocess.Popen(py + ["peer", "--file", str(tmp_path / "s.img"), "--ready", str(tmp_path / "port")])
    procs = [peer]
    try:
        port = _wait_file(tmp_path / "port")
        sock = str(tmp_path / "nbd.sock")
        procs.append(subprocess.Popen(py + [
            "primary", "--socket", sock, "--file", str(tmp_path / "p.img"), "--name", "floor",
            "--size", str(SIZE), "--peer", f"127.0.0.1:{port}", "--keepdirty", str(request.param),
            "--ready", str(tmp_path / "pid"),
        ]))  # fmt: skip
        _wait_file(tmp_path / "pid")
        yield tmp_path, sock, procs
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_relay_writes_both_copies_before_acknowledging(relay):
    tmp, sock, procs = relay
    rng = random.Random(7)
    expected = bytearray(SIZE)

    def writer(seed: int, lo: int, hi: int) -> None:
        # Disjoint areas per connection: the relay has no range lock (its docstring says so).
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

    threads = [threading.Thread(target=writer, args=(i, i * SIZE // 4, (i + 1) * SIZE // 4)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Every write was acknowledged, and acknowledgement waits for the peer: both copies hold
    # everything now, without waiting or stopping anything.
    primary = (tmp / "p.img").read_bytes()[BITMAP_BLOCK : BITMAP_BLOCK + SIZE]
    peer = (tmp / "s.img").read_bytes()[:SIZE]
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

    def file_bytes_written() -> int:  # write(2)-family bytes of the whole process; sends are not
        with open(f"/proc/{procs[1].pid}/io") as f:
            return int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])

    c = NBDClient.connect_unix(sock, "floor")
    c.pwrite(0, b"x" * 4096)  # extent 0 becomes resident
    before = file_bytes_written()
    c.pwrite(4096, b"y" * 4096)
    same_extent = file_bytes_written() - before
    before = file_bytes_written()
    c.pwrite(8 * MiB, b"z" * 4096)
    new_extent = file_bytes_written() - before
    c.disconnect()
    assert same_extent == 4096
    assert new_extent == 4096 + (BITMAP_BLOCK if keepdirty else 0)
