"""Hostile input on the replication port and the control socket (hypothesis, bounded).

One pair, two resources: `data` is a real primary/secondary pair with a writer thread busy on it
for the whole of every test; `fuzz` is secondary on node-b and init on node-a, so the tests can
play its primary. Input: random bytes, valid handshake and request frames with bytes flipped,
truncated, with oversized length fields, and, inside a real session (a fake primary that completes
the handshake with hastpy.proto.messages), requests with unknown commands and bad offsets or
lengths. The properties: both daemons stay up and answer hastctl, the secondary answers bad
requests with EINVAL or closes the connection, and `data` keeps replicating, undisturbed: its
secondary worker is never restarted and the replicas are equal at the end.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import MiB, Pair, sha, wait_for
from hastpy import control
from hastpy.constants import MAXPHYS
from hastpy.errors import RemoteProtocolError
from hastpy.nv import NvList, NvType
from hastpy.proto import messages as msg
from hastpy.proto import pipeline
from hastpy.proto.frame import HEADER, MAX_HANDSHAKE_PAYLOAD, FrameReader, encode_frame
from hastpy.transport import recv_one, send_frame

pytestmark = pytest.mark.integration

FUZZ = "fuzz"
PORT = 8457
SIZE = 32 * MiB
SECTOR = 512
RESUID = 0x5EED_F00D_CAFE_0001
FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)


# -- the pair and the replication that must not notice ---------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = Pair(tmp_path_factory.mktemp("fuzz"), SIZE, resources=["data", FUZZ])
    try:
        p.start(connect=False)
        p.b.role("secondary", "data")
        p.b.role("secondary", FUZZ)
        p.a.role("primary", "data")
        p.wait_complete(res="data")
        yield p
    finally:  # also when the set-up failed: no daemon outlives the module
        workers = [pid for n in (p.a, p.b) for pid in n.worker_pids()]
        p.stop()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


@contextlib.contextmanager
def data_replicates(pair: Pair):
    """Writes to `data` all along; afterwards both replicas are equal and nothing restarted."""
    worker_b = pair.b.status("data")["workerpid"]
    worker_a = pair.a.status("data")["workerpid"]
    writes_before = pair.b.status("data")["statistics"]["writes"]
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def writer():
        rng = random.Random()
        try:
            c = pair.a.client("data")
            while not stop.is_set():
                off = rng.randrange(0, (c.size - 65536) // 4096) * 4096
                c.pwrite(off, rng.randbytes(rng.choice((4096, 65536))))
                done[0] += 1
            c.flush()
            c.disconnect()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert done[0] > 0
    st_a = pair.wait_complete(res="data")
    assert st_a["workerpid"] == worker_a
    st_b = pair.b.status("data")
    assert st_b["workerpid"] == worker_b, "the data secondary was restarted"
    assert st_b["statistics"]["writes"] >= writes_before + done[0]
    assert sha(pair.a.data("data")) == sha(pair.b.data("data"))
    for n in (pair.a, pair.b):
        assert n.proc.poll() is None, f"{n.name} hastd died"
        log = n.log.read_text()
        assert "Internal error" not in log
        assert "Traceback" not in log, f"{n.name}: a traceback in {n.log}"


def _alive_and_answering(pair: Pair) -> None:
    for n in (pair.a, pair.b):
        assert n.proc.poll() is None, f"{n.name} hastd died"
        reply = control.call(str(n.dir / "ctl"), {"cmd": "status", "resources": ["data"]}, timeout=30)
        assert reply["resources"][0]["role"] in ("primary", "secondary")


# -- byte-level tools ---------------------------------------------------------------------------------


def frame(version: int, nv: NvList, payload: bytes | None = None) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(version, nv, payload))


def raw_frame(version: int, nv: NvList, payload: bytes = b"", size: int | None = None) -> bytes:
    """A frame whose nv `size` field says `size` (default: the payload's), whatever is sent."""
    nv = NvList(list(nv))
    if size is None:
        size = len(payload)
    if size:
        nv.add_uint32("size", size)
    body = nv.encode()
    return HEADER.pack(version, len(body)) + body + payload


@st.composite
def mutated(draw, raw: bytes) -> bytes:
    """raw with one of: bytes flipped, truncated, a huge nv length, a new version byte, junk after."""
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "nvsize", "version", "append"]))
    buf = bytearray(raw)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del buf[draw(st.integers(0, len(buf) - 1)) :]
    elif kind == "nvsize":
        struct.pack_into("<I", buf, 1, draw(st.integers(len(buf) - HEADER.size + 1, 2**32 - 1)))
    elif kind == "version":
        buf[0] = draw(st.integers(0, 255))
    else:
        buf += draw(st.binary(min_size=1, max_size=64))
    return bytes(buf)


names = st.sampled_from([FUZZ, FUZZ, "nosuch", "x" * 255, "fu", "fuzz\u00e9"])


@st.composite
def handshake_frames(draw, token: bytes) -> bytes:
    """Hello or InHello for `fuzz` (never `data`), valid or mutated, or random bytes."""
    choice = draw(st.sampled_from(["hello", "inhello", "random", "fields"]))
    if choice == "random":
        return draw(st.binary(min_size=0, max_size=300))
    if choice == "fields":
        nv = NvList()
        for name in draw(st.lists(st.sampled_from(["resource", "version", "token", "maxio", "resuid", "virgin", "x"]), max_size=6)):
            typ = draw(st.sampled_from([NvType.STRING, NvType.UINT8, NvType.UINT64, NvType.UINT8_ARRAY]))
            value = {NvType.STRING: draw(names), NvType.UINT8: draw(st.integers(0, 255)),
                     NvType.UINT64: draw(st.integers(0, 2**64 - 1)),
                     NvType.UINT8_ARRAY: draw(st.binary(min_size=1, max_size=20))}[typ]  # fmt: skip
            nv.add(name, typ, value)
        raw = raw_frame(draw(st.integers(0, 3)), nv, size=draw(st.sampled_from([None, 0, 1, MAX_HANDSHAKE_PAYLOAD, 2**32 - 1])))
    elif choice == "hello":
        version = draw(st.integers(0, 3))
        nv = msg.Hello(draw(names), version or 1, MAXPHYS if version >= 3 else None).to_nv()
        raw = frame(msg.HELLO_FRAME_VERSION, nv)
    else:
        nv = msg.InHello(draw(names), token, False, RESUID, 0, 0).to_nv()
        raw = frame(3, nv)
    if draw(st.booleans()):
        return raw
    return draw(mutated(raw))


def exchange(dst: str, src: str, raw: bytes, timeout: float = 30.0) -> bytes:
    """Connect from src, send raw, half-close, read until EOF or one whole frame came back."""
    with socket.create_connection((dst, PORT), timeout=timeout, source_address=(src, 0)) as s:
        with contextlib.suppress(OSError):  # the peer may refuse before reading it all
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        reader = FrameReader(3, max_payload=MAX_HANDSHAKE_PAYLOAD)
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
            reader.feed(chunk)
            if reader.next_frame() is not None:
                return got


# -- 1. the listener ---------------------------------------------------------------------------------


def test_listener_survives_random_and_mutated_handshakes(pair):
    stranger = pair.ip_a.rsplit(".", 1)[0] + ".3"  # not a `remote` of any resource
    token = os.urandom(16)
    seen = {"refused": 0, "token": 0, "closed": 0}

    @settings(max_examples=80, **FUZZ_SETTINGS)
    @given(data=st.data())
    def run(data):
        to_b = data.draw(st.integers(0, 3)) > 0  # mostly the secondary, sometimes the primary
        dst, src = (pair.ip_b, pair.ip_a) if to_b else (pair.ip_a, pair.ip_b)
        if data.draw(st.integers(0, 5)) == 0:
            src = stranger
        raw = data.draw(handshake_frames(token))
        got = exchange(dst, src, raw)
        if got:
            # Whatever comes back is a well-formed answer: a refusal or a hello reply.
            reader = FrameReader(3, max_payload=0)
            reader.feed(got)
            reply = msg.decode_hello_reply(reader.next_frame().nv)
            if isinstance(reply, msg.ErrorReply):
                seen["refused"] += 1
                assert reply.errmsg
            else:
                seen["token"] += 1
                assert len(reply.token) == 16
        else:
            seen["closed"] += 1
        for n in (pair.a, pair.b):
            assert n.proc.poll() is None, f"{n.name} hastd died"

    with data_replicates(pair):
        run()
        _alive_and_answering(pair)
    assert seen["refused"] and seen["closed"], seen


# -- 2. inside a session: a fake primary ----------------------------------------------------------


class FakePrimary:
    """Plays node-a's primary for `fuzz` against node-b: the real handshake, then raw requests."""

    def __init__(self, pair: Pair, rcvbuf: int | None = None):
        self.pair = pair
        self.rcvbuf = rcvbuf  # a small receive buffer makes a slow reader quickly felt
        self.out: socket.socket | None = None
        self.inn: socket.socket | None = None
        self.version = 0
        self.maxio = 0
        self.seq = 1000
        self.sessions = 0
        self.last = 0.0

    def connect(self) -> None:
        self.close()
        p = self.pair

        def attempt():
            out = socket.create_connection((p.ip_b, PORT), timeout=30, source_address=(p.ip_a, 0))
            try:
                send_frame(out, msg.HELLO_FRAME_VERSION, msg.Hello(FUZZ, msg.PROTO_VERSION, MAXPHYS).to_nv())
                reply = msg.decode_hello_reply(recv_one(out, msg.PROTO_VERSION).nv)
                if isinstance(reply, msg.ErrorReply):
                    out.close()
                    return None
                inn = socket.socket()
                inn.settimeout(30)
                if self.rcvbuf:
                    inn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                inn.bind((p.ip_a, 0))
                inn.connect((p.ip_b, PORT))
                send_frame(inn, reply.version, msg.InHello(FUZZ, reply.token, False, RESUID, 0, 0).to_nv())
                info = msg.decode_secondary_info(recv_one(out, reply.version).nv)
                assert isinstance(info, msg.SecondaryInfo), info
            except BaseException:
                out.close()
                raise
            self.out, self.inn, self.version = out, inn, reply.version
            self.maxio = msg.negotiate_maxio(reply.version, MAXPHYS, info.maxio)
            self.datasize = info.datasize
            return True

        # The secondary's role check can race with a worker that is still exiting: retry.
        wait_for(attempt, timeout=60, interval=0.2, what="fake primary handshake")
        self.sessions += 1
        self.last = time.monotonic()

    @property
    def connected(self) -> bool:
        # The secondary drops a silent primary after `timeout` (20 s from a hastd primary);
        # do not run into that: reconnect well before.
        idle_limit = self.pair.a.params["timeout"] / 3
        return self.out is not None and time.monotonic() - self.last < idle_limit

    def close(self) -> None:
        for s in (self.out, self.inn):
            if s is not None:
                s.close()
        self.out = self.inn = None

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def send(self, raw: bytes) -> bool:
        try:
            self.out.sendall(raw)
            self.last = time.monotonic()
            return True
        except OSError:
            return False

    def reply(self, timeout: float = 30.0):
        """(Reply, payload) or None if the secondary closed the connection."""
        self.inn.settimeout(timeout)
        try:
            f = recv_one(self.inn, self.version, max_payload=MAXPHYS)
        except (ConnectionError, RemoteProtocolError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                return None
            raise
        data = pipeline.decode_payload(f.payload, f.nv, MAXPHYS) if len(f.payload) else b""
        return msg.Reply.from_nv(f.nv), bytes(data)

    def closed_by_peer(self, timeout: float = 30.0) -> bool:
        return self.reply(timeout) is None


@pytest.fixture(scope="module")
def fake(pair):
    fp = FakePrimary(pair)
    yield fp
    fp.close()


def _req(cmd: int, seq: int, offset: int | None = None, length: int | None = None, **extra) -> NvList:
    nv = NvList().add_uint8("cmd", cmd).add_uint64("seq", seq)
    if offset is not None:
        nv.add_uint64("offset", offset)
    if length is not None:
        nv.add_uint64("length", length)
    for name, (typ, value) in extra.items():
        nv.add(name, typ, value)
    return nv


RANGED = (msg.Cmd.READ, msg.Cmd.WRITE, msg.Cmd.DELETE)
U64 = 2**64 - 1


@st.composite
def bad_requests(draw, datasize: int, maxio: int):
    """(nv, payload, expectation): "EINVAL", "ok", or "close" (the header cannot be answered)."""
    kind = draw(st.sampled_from(["unknown_cmd", "zero_length", "misaligned", "out_of_range", "too_long",
                                 "write_size", "valid_read", "flush", "no_seq", "missing", "wrong_type"]))  # fmt: skip
    aligned = lambda lo, hi: st.integers(lo // SECTOR, hi // SECTOR).map(lambda n: n * SECTOR)  # noqa: E731
    if kind == "unknown_cmd":
        cmd = draw(st.sampled_from([0, *range(6, 256)]))
        return _req(cmd, 1, draw(st.integers(0, U64)), draw(st.integers(0, U64))), b"", "EINVAL"
    if kind == "flush":  # FLUSH ignores offset and length
        return _req(msg.Cmd.FLUSH, 1, draw(st.integers(0, U64)), draw(st.integers(0, U64))), b"", "ok"
    if kind == "no_seq":
        return _req(draw(st.sampled_from([*RANGED, msg.Cmd.FLUSH, 9])), 0, 0, SECTOR), b"", "close"
    if kind == "missing":  # a ranged command without offset or length
        cmd = draw(st.sampled_from(RANGED))
        return (_req(cmd, 1, length=SECTOR) if draw(st.booleans()) else _req(cmd, 1, offset=0)), b"", "close"
    if kind == "wrong_type":  # nv lookups with a type mismatch are errors, as in nv.c
        if draw(st.booleans()):  # seq as uint32
            nv = NvList().add_uint8("cmd", msg.Cmd.READ).add_uint32("seq", 1)
        else:  # cmd as uint16
            nv = NvList().add("cmd", NvType.UINT16, msg.Cmd.READ).add_uint64("seq", 1)
        nv.add_uint64("offset", 0).add_uint64("length", SECTOR)
        return nv, b"", "close"
    cmd = draw(st.sampled_from(RANGED))
    if kind == "zero_length":
        return _req(cmd, 1, draw(aligned(0, datasize)), 0), b"", "EINVAL"
    if kind == "misaligned":
        off = draw(st.integers(0, datasize - maxio))
        length = draw(st.integers(1, maxio))
        if off % SECTOR == 0 and length % SECTOR == 0:
            off += draw(st.integers(1, SECTOR - 1))
        return _req(cmd, 1, off, length), b"", "EINVAL"
    if kind == "out_of_range":
        length = draw(aligned(SECTOR, maxio))
        off = draw(st.one_of(aligned(datasize - length + SECTOR, datasize), aligned(datasize, U64 - SECTOR + 1)))
        return _req(cmd, 1, off, length), b"", "EINVAL"
    if kind == "too_long":
        cmd = draw(st.sampled_from((msg.Cmd.READ, msg.Cmd.WRITE)))
        return _req(cmd, 1, 0, draw(aligned(maxio + SECTOR, datasize))), b"", "EINVAL"
    if kind == "write_size":
        length = draw(aligned(SECTOR, 64 * 1024))
        sent = draw(st.integers(0, 64 * 1024).filter(lambda n: n != length))
        return _req(msg.Cmd.WRITE, 1, 0, length), os.urandom(sent), "EINVAL"
    # valid_read
    length = draw(aligned(SECTOR, maxio))
    return _req(msg.Cmd.READ, 1, draw(aligned(0, datasize - length)), length), b"", "ok"


def _with_seq(nv: NvList, seq: int) -> NvList:
    out = NvList()
    for f in nv:
        if f.name == "seq" and f.type == NvType.UINT64 and f.value:
            out.add("seq", NvType.UINT64, seq)
        else:
            out.add(f.name, f.type, f.value)
    return out


def test_session_bad_requests_get_einval_or_close(pair, fake):
    """Well-framed requests with bad values: the secondary answers each with EINVAL (by seq) and
    keeps the session; a header it cannot answer (no seq, missing or mistyped field) ends it."""
    fake.connect()
    seen: dict[str, int] = {}

    @settings(max_examples=100, **FUZZ_SETTINGS)
    @given(data=st.data())
    def run(data):
        if not fake.connected:
            fake.connect()
        nv, payload, expect = data.draw(bad_requests(fake.datasize, fake.maxio))
        seq = fake.next_seq()
        nv = _with_seq(nv, seq)
        assert fake.send(raw_frame(fake.version, nv, payload)), "secondary closed the connection early"
        seen[expect] = seen.get(expect, 0) + 1
        if expect == "close":
            assert fake.closed_by_peer(), f"{nv} was answered"
            fake.close()
            return
        got = fake.reply()
        assert got is not None, f"connection closed after {nv}"
        rep, data_back = got
        assert rep.seq == seq
        if expect == "EINVAL":
            assert rep.error == errno.EINVAL, (nv, rep)
            assert data_back == b""
        else:
            assert rep.error == 0, (nv, rep)
            cmd = nv.get("cmd", NvType.UINT8)
            if cmd == msg.Cmd.READ:
                assert len(data_back) == nv.get("length", NvType.UINT64)

    with data_replicates(pair):
        run()
        _alive_and_answering(pair)
    assert seen.get("EINVAL") and seen.get("ok"), seen


def test_session_mutated_frames_never_crash_anything(pair, fake):
    """Valid requests mutated at the byte level, inside a session. The secondary may answer,
    refuse, or drop the connection; it must not hang past EOF, and no daemon may die."""

    @settings(max_examples=40, **FUZZ_SETTINGS)
    @given(data=st.data())
    def run(data):
        if not fake.connected:
            fake.connect()
        seq = fake.next_seq()
        template = data.draw(st.sampled_from(["read", "write", "delete", "flush", "keepalive"]))
        if template == "write":
            raw = frame(fake.version, msg.Request(msg.Cmd.WRITE, seq, 4096, 4096).to_nv(), os.urandom(4096))
        elif template == "keepalive":
            raw = frame(fake.version, msg.Request.keepalive().to_nv())
        else:
            cmd = {"read": msg.Cmd.READ, "delete": msg.Cmd.DELETE, "flush": msg.Cmd.FLUSH}[template]
            off, ln = (0, 0) if cmd == msg.Cmd.FLUSH else (8192, 4096)
            raw = frame(fake.version, msg.Request(cmd, seq, off, ln).to_nv())
        bad = data.draw(mutated(raw))
        if not fake.send(bad):
            fake.close()
            return
        # End the stream: whatever the secondary made of the bytes, it now sees EOF and must let
        # go of the session (answering what it could first).
        with contextlib.suppress(OSError):
            fake.out.shutdown(socket.SHUT_WR)
        replies = 0
        while (got := fake.reply()) is not None:
            replies += 1
            assert replies < 10
        fake.close()
        for n in (pair.a, pair.b):
            assert n.proc.poll() is None, f"{n.name} hastd died"

    with data_replicates(pair):
        run()
        _alive_and_answering(pair)
    assert fake.sessions >= 2


def test_session_slow_reader_gets_every_reply(pair):
    """A primary that takes its time reading replies (its receive buffer small and full): the
    secondary must wait for room, not drop replies. Regression: the reply socket reached the
    worker non-blocking while Python took it for blocking, so a send into a full buffer failed
    with EAGAIN and the reply was silently lost; the primary then timed out and reconnected,
    forever if the reply was a sync chunk."""
    fp = FakePrimary(pair, rcvbuf=64 * 1024)
    fp.connect()
    try:
        rng = random.Random(5)
        for i in range(8):  # data that does not compress to a hole
            seq = fp.next_seq()
            assert fp.send(frame(fp.version, msg.Request(msg.Cmd.WRITE, seq, i * MiB, MiB).to_nv(), rng.randbytes(MiB)))
            rep, _ = fp.reply()
            assert (rep.seq, rep.error) == (seq, 0)
        seqs = []
        for i in range(24):
            seqs.append(fp.next_seq())
            assert fp.send(frame(fp.version, msg.Request(msg.Cmd.READ, seqs[-1], (i % 8) * MiB, MiB).to_nv()))
        time.sleep(1.0)  # the slow reader: replies pile up on the secondary meanwhile
        got = []
        for _ in seqs:
            r = fp.reply()
            assert r is not None, f"connection closed after {len(got)} replies"
            assert r[0].error == 0 and len(r[1]) == MiB
            got.append(r[0].seq)
        assert sorted(got) == seqs
    finally:
        fp.close()
    assert "Unable to send a reply" not in pair.b.log.read_text()


# -- 3. the control socket ---------------------------------------------------------------------------


def _control_exchange(path: str, raw: bytes, timeout: float = 30.0) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        with contextlib.suppress(OSError):
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass  # hastd closed with our unread bytes in its buffer (an oversized line)
        return got


# Names a fuzzed request may carry. Never `data` or `all` in a role request: the property is that
# garbage cannot hurt the resource that replicates, not that a valid command does nothing.
safe_names = st.sampled_from(["nosuch", "", "x" * 300, "\u00e9", "fuzz\n", "None"])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=10)


@st.composite
def control_lines(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "mutated", "object", "role"]))
    if kind == "random":
        return draw(st.binary(max_size=200)) + draw(st.sampled_from([b"\n", b"", b"\n\n"]))
    if kind == "mutated":
        line = control.encode({"cmd": "status", "resources": [draw(st.sampled_from(["data", FUZZ, "all"]))]})
        buf = bytearray(line)
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= draw(st.integers(1, 255))
        if draw(st.booleans()):
            del buf[draw(st.integers(0, len(buf) - 1)) :]
        return bytes(buf)
    if kind == "role":
        obj = {"cmd": "role", "role": draw(st.sampled_from(["init", "primary", "secondary", "bogus", 3, None])),
               "resources": draw(st.lists(safe_names, min_size=0, max_size=3))}  # fmt: skip
        return control.encode(obj)
    obj = {}
    if draw(st.booleans()):
        obj["cmd"] = draw(st.one_of(st.sampled_from(["status", "bogus", ""]), json_values))
    if draw(st.booleans()):
        obj["resources"] = draw(st.one_of(st.lists(st.one_of(safe_names, st.sampled_from(["data", FUZZ])), max_size=3), json_values))
    for k in draw(st.lists(st.text(max_size=5), max_size=2)):
        obj[k] = draw(json_values)
    if obj.get("cmd") == "role":
        obj["cmd"] = "status"
    return json.dumps(obj).encode() + b"\n"


def test_control_socket_survives_random_and_mutated_lines(pair):
    paths = [str(pair.a.dir / "ctl"), str(pair.b.dir / "ctl")]

    @settings(max_examples=100, **FUZZ_SETTINGS)
    @given(data=st.data())
    def run(data):
        path = data.draw(st.sampled_from(paths))
        got = _control_exchange(path, data.draw(control_lines()))
        if got:
            assert got.endswith(b"\n") and got.count(b"\n") == 1, got
            reply = json.loads(got)
            assert isinstance(reply, dict) and ("error" in reply or "resources" in reply), reply

    with data_replicates(pair):
        # Oversized, deeply nested and silent-then-gone clients, once each.
        for path in paths:
            got = _control_exchange(path, b"x" * (2 * 1024 * 1024))
            assert got == b"" or b"too large" in got
            _control_exchange(path, b"[" * 200_000 + b"\n")
            _control_exchange(path, b"")
        run()
        _alive_and_answering(pair)
    for n in (pair.a, pair.b):
        assert [r["name"] for r in json.loads(n.hastctl("status", "--json").stdout)] == ["data", FUZZ]
