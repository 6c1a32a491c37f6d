"""HAST wire protocol, sans-IO: framing (frame), messages (messages), payload pipeline (pipeline).

Nothing here touches sockets, threads or files; transport.py and the workers do the I/O.
"""

from hastpy.proto.frame import (
    MAX_HANDSHAKE_PAYLOAD,
    MAX_IO_PAYLOAD,
    MAX_NV_SIZE,
    Frame,
    FrameReader,
    encode_frame,
)
from hastpy.proto.messages import (
    ERROR_FRAME_VERSION,
    HELLO_FRAME_VERSION,
    Cmd,
    ErrorReply,
    Hello,
    HelloReply,
    InHello,
    Reply,
    Request,
    SecondaryInfo,
    decode_handshake,
    decode_hello_reply,
    decode_secondary_info,
    from_wire_errno,
    negotiate_maxio,
    negotiate_version,
    to_wire_errno,
    validate_request,
)
from hastpy.proto.pipeline import decode_payload, encode_payload, is_all_zero, pack, unpack

__all__ = [
    "ERROR_FRAME_VERSION",
    "HELLO_FRAME_VERSION",
    "MAX_HANDSHAKE_PAYLOAD",
    "MAX_IO_PAYLOAD",
    "MAX_NV_SIZE",
    "Cmd",
    "ErrorReply",
    "Frame",
    "FrameReader",
    "Hello",
    "HelloReply",
    "InHello",
    "Reply",
    "Request",
    "SecondaryInfo",
    "decode_handshake",
    "decode_hello_reply",
    "decode_payload",
    "decode_secondary_info",
    "encode_frame",
    "encode_payload",
    "from_wire_errno",
    "is_all_zero",
    "negotiate_maxio",
    "negotiate_version",
    "pack",
    "to_wire_errno",
    "unpack",
    "validate_request",
]
