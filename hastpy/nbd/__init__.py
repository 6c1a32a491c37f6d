"""The NBD export of a primary resource: a sans-IO server codec, the socket loop, a test client.

- `codec`: protocol only (handshake, request parsing, reply encoding); no I/O.
- `server`: serves a codec over sockets, handing requests to a backend; `serve_unix()`.
- `client`: a small blocking client for tests and benchmarks.
"""

from hastpy.nbd.codec import (
    NEED_DATA,
    Aborted,
    Command,
    ConnectionClosed,
    OptionReply,
    Ready,
    Request,
    RequestError,
    ServerConnection,
    encode_reply,
    encode_reply_header,
    nbd_error,
    nbd_error_from_exception,
)
from hastpy.nbd.server import (
    AsyncBackend,
    Backend,
    BlockingAdapter,
    ExportConfig,
    ExportConnection,
    FileBackend,
    UnixServer,
    serve_connection,
    serve_unix,
)

__all__ = [
    "NEED_DATA",
    "Aborted",
    "AsyncBackend",
    "Backend",
    "BlockingAdapter",
    "Command",
    "ConnectionClosed",
    "ExportConfig",
    "ExportConnection",
    "FileBackend",
    "OptionReply",
    "Ready",
    "Request",
    "RequestError",
    "ServerConnection",
    "UnixServer",
    "encode_reply",
    "encode_reply_header",
    "nbd_error",
    "nbd_error_from_exception",
    "serve_connection",
    "serve_unix",
]
