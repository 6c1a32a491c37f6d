"""worker.keep_freed_memory: payloads received while others are in flight reuse freed memory
instead of faulting fresh pages in at every request (glibc's default trims the heap as soon as a
queue of 1 MiB payloads is freed, and grows it again for the next)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PAYLOAD = 1024 * 1024  # the kernel's and nbdfuse's largest write requests
QUEUE = 16  # payloads in flight together (fio's and the benchmarks' queue depth)
ROUNDS = 64
PAGES = PAYLOAD // 4096

# In a fresh interpreter, on a thread as the NBD receive threads are: receive payloads from a
# socket as the workers do (recv allocates each), keep QUEUE of them, free them together, and
# print the minor page faults this thread took.
PROBE = textwrap.dedent(f"""
    import resource, socket, sys, threading
    from hastpy import worker
    if sys.argv[1] == "keep":
        worker.keep_freed_memory()
    a, b = socket.socketpair()
    data = b"\\x01" * {PAYLOAD}
    def send():
        for _ in range({ROUNDS}):
            a.sendall(data)
    def receive(out):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        inflight = []
        for i in range({ROUNDS}):
            inflight.append(b.recv({PAYLOAD}, socket.MSG_WAITALL))
            if len(inflight) == {QUEUE}:
                inflight.clear()
        out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    threading.Thread(target=send, daemon=True).start()
    out = []
    t = threading.Thread(target=receive, args=(out,))
    t.start()
    t.join()
    print(out[0])
""")


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout)


def test_payload_memory_is_reused_not_faulted_in_at_every_request():
    kept = faults("keep")
    default = faults("default")
    # With the thresholds: the first queue's pages only, then the same memory over and over.
    assert kept < (QUEUE + 2) * PAGES, kept
    # glibc's defaults fault most pages of every round in again: the probe does see the churn.
    assert default > ROUNDS * PAGES // 2, default
