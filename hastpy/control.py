"""The control protocol between hastctl and hastd, and between hastd and its workers.

Both are newline-delimited JSON objects over a stream socket: one request line, one reply line.
JSON rather than hastd's nv control protocol because our control socket is never shared with a
FreeBSD peer and JSON is what `hastctl --json` prints anyway.

Requests (hastctl -> hastd):
    {"cmd": "status", "resources": ["all"] | [names]}
    {"cmd": "role", "role": "init"|"primary"|"secondary", "resources": [...]}
Reply:
    {"resources": [{"name": ..., "error": "...", ...fields}], "error": "..." (whole request failed)}

hastd -> worker: {"cmd": "status", "id": N} -> {"reply": {status fields}, "id": N} (the id is
echoed so that a reply too late for one request is never taken for the next); worker -> hastd
(unsolicited, on the event socket): {"event": "connect"|"disconnect"|"syncstart"|"syncdone"|
"syncintr"|"split-brain"|"ready", ...}.

A per-resource reply entry of a role request may carry "exit_code" (sysexits) for hastctl.
"""

from __future__ import annotations

import json
import socket

from hastpy.errors import ControlError

# A status reply for a few hundred resources is tens of KiB; anything near this is not ours.
MAX_MESSAGE = 1024 * 1024
# hastctl.c: the control connection times out after 20 s.
CONTROL_TIMEOUT = 20.0

COMMANDS = ("status", "role")
ROLES = ("init", "primary", "secondary")


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    """One JSON object; anything else is a ControlError (never a crash on peer input)."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError(f"malformed control message: {exc}") from None
    if not isinstance(obj, dict):
        raise ControlError("malformed control message: not an object")
    return obj


def validate_request(req: dict) -> tuple[str, str | None, list[str]]:
    """(cmd, role, resources) of a hastctl request, or ControlError saying what is wrong."""
    cmd = req.get("cmd")
    if cmd not in COMMANDS:
        raise ControlError(f"unknown command {cmd!r}")
    role = req.get("role")
    if cmd == "role" and role not in ROLES:
        raise ControlError(f"unknown role {role!r}")
    names = req.get("resources", ["all"])
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ControlError("'resources' must be a non-empty list of names")
    return cmd, role if cmd == "role" else None, names


class LineReader:
    """Reads newline-terminated messages from a blocking socket, bounded by MAX_MESSAGE."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buf = bytearray()

    def read(self) -> dict | None:
        """The next message, or None on a clean EOF between messages."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return decode(line)
            if len(self._buf) > MAX_MESSAGE:
                raise ControlError("control message too large")
            chunk = self._sock.recv(65536)
            if not chunk:
                if self._buf:
                    raise ControlError("control connection closed mid-message")
                return None
            self._buf += chunk


def send(sock: socket.socket, obj: dict) -> None:
    sock.sendall(encode(obj))


def call(path: str, request: dict, timeout: float = CONTROL_TIMEOUT) -> dict:
    """hastctl's side: one request to hastd's control socket, its reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"Unable to connect to hastd via {path}: no such socket (is hastd running?)") from None
        except OSError as exc:
            raise ControlError(f"Unable to connect to hastd via {path}: {exc.strerror}") from None
        try:
            send(sock, request)
            reply = LineReader(sock).read()
        except TimeoutError:
            raise ControlError(f"hastd did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise ControlError(f"control connection to hastd failed: {exc.strerror}") from None
        if reply is None:
            raise ControlError("hastd closed the control connection without a reply")
        if "error" in reply and "resources" not in reply:
            raise ControlError(str(reply["error"]))
        return reply
    finally:
        sock.close()
