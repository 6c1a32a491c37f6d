"""The verifying writer: stamped blocks written with O_DSYNC, acknowledgements recorded elsewhere.

`write FILE ACKS`: block i holds (magic, i, a sha256 of its payload); after pwrite with O_DSYNC
returns, i is appended to ACKS (a file outside the node that may die). `verify FILE ACKS`: every
acknowledged block must be present and intact; prints {"acked", "checked", "missing", "nmissing"}.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys

BLOCK = 4096
MAGIC = b"HASTBLK1"
HEADER = struct.Struct("<8sQ32s")  # magic, sequence number, sha256 of the payload
PAYLOAD = BLOCK - HEADER.size
MAX_BLOCKS = 256 * 1024  # a 1 GiB journal at most: the writer wraps around after that


def block(seq: int) -> bytes:
    payload = hashlib.sha256(seq.to_bytes(8, "little")).digest() * (PAYLOAD // 32 + 1)
    payload = payload[:PAYLOAD]
    return HEADER.pack(MAGIC, seq, hashlib.sha256(payload).digest()) + payload


def check(data: bytes, seq: int) -> bool:
    if len(data) != BLOCK:
        return False
    magic, got, digest = HEADER.unpack_from(data)
    return magic == MAGIC and got == seq and hashlib.sha256(data[HEADER.size :]).digest() == digest


def write(path: str, acks: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644)
    # The file's directory entry is metadata O_DSYNC does not cover: make it durable before the
    # first acknowledgement, or a crash can lose the whole file.
    os.fsync(fd)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dirfd)
    os.close(dirfd)
    ack = os.open(acks, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    seq = 0
    while True:
        os.pwrite(fd, block(seq), (seq % MAX_BLOCKS) * BLOCK)
        os.write(ack, f"{seq}\n".encode())  # only after the write is durable
        seq += 1


def verify(path: str, acks: str) -> dict:
    with open(acks, "rb") as f:
        acked = [int(line) for line in f.read().split(b"\n")[:-1]]  # a torn last line is not an ack
    latest: dict[int, int] = {}
    for seq in acked:
        latest[seq % MAX_BLOCKS] = seq
    missing = []
    with open(path, "rb") as f:
        for slot, seq in sorted(latest.items()):
            f.seek(slot * BLOCK)
            if not check(f.read(BLOCK), seq):
                missing.append(seq)
    # Blocks overwritten after a wrap are checked at their latest acknowledged content.
    return {"acked": len(acked), "checked": len(latest), "missing": missing[:100], "nmissing": len(missing)}


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] not in ("write", "verify"):
        print("usage: python -m hastpy.lab.writer write|verify FILE ACKS", file=sys.stderr)
        sys.exit(os.EX_USAGE)
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
    else:
        print(json.dumps(verify(sys.argv[2], sys.argv[3])))


if __name__ == "__main__":
    main()
