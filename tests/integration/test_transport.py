"""FrameStream over a real socket pair: read-ahead after small frames, and the on_wait hook."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from hastpy.proto import messages as msg
from hastpy.proto.frame import encode_frame
from hastpy.transport import PAYLOAD_READ_AHEAD, FrameStream, send_buffers

pytestmark = pytest.mark.integration

TIMEOUT = 10


def write_frame(seq: int, payload: bytes) -> list:
    req = msg.Request(msg.Cmd.WRITE, seq, seq * 4096, len(payload))
    return encode_frame(msg.PROTO_VERSION, req.to_nv(), payload)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_small_frames_sent_together_cost_few_receives(pair):
    a, b = pair
    waits = []
    stream = FrameStream(b, msg.PROTO_VERSION, 1 << 20, msg.REQUEST_LAYOUTS, PAYLOAD_READ_AHEAD, lambda: waits.append(1))
    payloads = [os.urandom(1024) for _ in range(20)]
    send_buffers(a, [buf for i, p in enumerate(payloads) for buf in write_frame(i + 1, p)])
    for i, p in enumerate(payloads):
        frame = stream.recv()
        assert msg.Request.from_nv(frame.nv).seq == i + 1
        assert bytes(frame.payload) == p
    # The first receive reads PAYLOAD_READ_AHEAD; after that small frame, the whole buffer.
    assert len(waits) == 2


def test_on_wait_runs_before_the_stream_blocks(pair):
    a, b = pair
    waited = threading.Event()
    stream = FrameStream(b, msg.PROTO_VERSION, 1 << 20, msg.REQUEST_LAYOUTS, PAYLOAD_READ_AHEAD, waited.set)
    got = []
    reader = threading.Thread(target=lambda: got.append(stream.recv()), daemon=True)
    reader.start()
    assert waited.wait(TIMEOUT)  # called although nothing has arrived: before the receive
    assert not got
    send_buffers(a, write_frame(7, b"x" * 512))
    reader.join(TIMEOUT)
    assert msg.Request.from_nv(got[0].nv).seq == 7


def test_large_payload_after_small_frames(pair):
    """A large frame behind small ones is partly read ahead through the buffer; it still
    arrives whole and byte-exact, and so does the frame after it."""
    a, b = pair
    stream = FrameStream(b, msg.PROTO_VERSION, 4 << 20, msg.REQUEST_LAYOUTS, PAYLOAD_READ_AHEAD)
    small, big, last = os.urandom(4096), os.urandom(3 << 20), os.urandom(100)
    frames = [write_frame(1, small), write_frame(2, big), write_frame(3, last)]
    sender = threading.Thread(target=lambda: [send_buffers(a, f) for f in frames], daemon=True)
    sender.start()
    assert [bytes(stream.recv().payload) for _ in frames] == [small, big, last]
    sender.join(TIMEOUT)


def _record_receives(stream: FrameStream) -> list[tuple[int, int]]:
    """(size asked for, flags) of every receive the stream makes into its buffers from now on."""
    receives: list[tuple[int, int]] = []
    real = stream._recv_into  # noqa: SLF001

    def recording(view, flags=0):
        receives.append((len(view), flags))
        return real(view, flags)

    stream._recv_into = recording  # noqa: SLF001
    return receives


def test_large_writes_read_nothing_of_their_payload_with_the_header(pair):
    """PAYLOAD_READ_AHEAD is exactly a plain WRITE's header, counted from each frame's start: every
    large payload is received whole into a buffer of its own (no zero-filled buffer to assemble
    it in, which one payload byte read with the header would force), although the bytes behind
    each header are already there, and whatever short frames (FLUSH, KEEPALIVE, READ) or longer
    headers (memsync, hastd's default) come between."""
    a, b = pair
    stream = FrameStream(b, msg.PROTO_VERSION, 4 << 20, msg.REQUEST_LAYOUTS, PAYLOAD_READ_AHEAD)
    receives = _record_receives(stream)
    big = [os.urandom(256 * 1024) for _ in range(6)]
    short = [
        encode_frame(msg.PROTO_VERSION, msg.Request(msg.Cmd.FLUSH, 100, 0, 0).to_nv()),
        encode_frame(msg.PROTO_VERSION, msg.Request.keepalive().to_nv()),
        encode_frame(msg.PROTO_VERSION, msg.Request(msg.Cmd.READ, 101, 0, 4096).to_nv()),
    ]
    memsync = msg.Request(msg.Cmd.WRITE, 7, 0, len(big[5]), memsync=True)
    frames = [write_frame(1, big[0]), write_frame(2, big[1]), short[0], write_frame(3, big[2]), short[1],
              write_frame(4, big[3]), short[2], write_frame(5, big[4]), encode_frame(msg.PROTO_VERSION, memsync.to_nv(), big[5]),
              write_frame(6, big[0])]  # fmt: skip
    sender = threading.Thread(target=lambda: [send_buffers(a, f) for f in frames])
    sender.start()
    time.sleep(0.2)  # the socket's buffer is full: a header arrives with payload bytes behind it
    got = [bytes(stream.recv().payload) for _ in frames]
    sender.join(TIMEOUT)
    assert got == [big[0], big[1], b"", big[2], b"", big[3], b"", big[4], big[5], big[0]]
    # Only the assembling path receives a payload's rest with MSG_WAITALL through _recv_into.
    assert [n for n, flags in receives if flags] == []


def test_frames_without_payload_leave_read_ahead_as_it_was(pair):
    """A FLUSH between large writes must not make the next header's receive pull part of the
    next large payload through the buffer: after FLUSH the stream still reads ahead only
    PAYLOAD_READ_AHEAD."""
    a, b = pair
    stream = FrameStream(b, msg.PROTO_VERSION, 4 << 20, msg.REQUEST_LAYOUTS, PAYLOAD_READ_AHEAD)
    receives = _record_receives(stream)
    big = os.urandom(1 << 20)
    flush = encode_frame(msg.PROTO_VERSION, msg.Request(msg.Cmd.FLUSH, 2, 0, 0).to_nv())
    frames = [write_frame(1, big), flush, write_frame(3, big)]

    def send():
        send_buffers(a, frames[0] + frames[1])
        time.sleep(0.3)  # the FLUSH is received alone, then the stream waits for the next header
        send_buffers(a, frames[2])

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    for _ in frames:
        stream.recv()
    sender.join(TIMEOUT)
    header_receives = [n for n, _ in receives if n < (1 << 19)]
    assert header_receives and max(header_receives) <= PAYLOAD_READ_AHEAD


def test_large_payload_survives_a_short_receive(pair):
    """A signal ends the payload's MSG_WAITALL receive early with part of it: the stream goes on
    receiving the rest, and the frame arrives whole."""
    a, b = pair
    stream = FrameStream(b, msg.PROTO_VERSION, 4 << 20, msg.REQUEST_LAYOUTS, PAYLOAD_READ_AHEAD)
    big = os.urandom(2 << 20)
    header = write_frame(1, big)[0]
    half = len(big) // 2

    def send():
        send_buffers(a, [header])  # alone: nothing of the payload is read ahead with it
        time.sleep(0.1)
        send_buffers(a, [big[:half]])
        time.sleep(0.6)
        send_buffers(a, [big[half:]])

    sender = threading.Thread(target=send, daemon=True)
    interrupted = []
    old = signal.signal(signal.SIGALRM, lambda *_: interrupted.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.4)
        sender.start()
        frame = stream.recv()  # the main thread: the one that gets SIGALRM
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        sender.join(TIMEOUT)
    assert interrupted
    assert bytes(frame.payload) == big
