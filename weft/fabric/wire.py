"""The peer protocol: fixed 28-byte frames, a descriptor table, raw payload.

Frame header (little endian): ``magic "WF" | u8 version | u8 type | u32 flags | u32 count |
u64 request id | u64 body length``. Bodies:

- WRITE: [u32 n + notification if FLAG_NOTIFY] | count x (u32 region, u64 offset, u64 length)
  | payload (the descriptors' bytes, in order).
- READ: [notification] | descriptor table. The target answers READ_DATA + payload.
- DONE / ERROR (count = error code, body = UTF-8 message) / NOTIFY (body = message) /
  INVALIDATE (count = a region the target just deregistered) / MD_REQ, MD_RESP / PING, PONG / BYE.
- HELLO (server challenge), AUTH (client proof), WELCOME / REJECT: JSON handshake bodies.

Every length is bounded before anything is allocated, and a target checks each descriptor
against its own registered regions before a single payload byte touches memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from weft.fabric import errors

MAGIC = b"WF"
VERSION = 1
HEADER = struct.Struct("<2sBBIIQQ")
HEADER_SIZE = HEADER.size

# frame types
HELLO = 1
AUTH = 2
WELCOME = 3
REJECT = 4
WRITE = 10
READ = 11
DONE = 12
ERROR = 13
READ_DATA = 14
NOTIFY = 15
MD_REQ = 16
MD_RESP = 17
BYE = 18
INVALIDATE = 19  # count = id of a region the target deregistered
PING = 20  # liveness probe: the target answers PONG with the same request id at once
PONG = 21

FLAG_NOTIFY = 1

DESC_DTYPE = np.dtype([("region", "<u4"), ("offset", "<u8"), ("length", "<u8")])
assert DESC_DTYPE.itemsize == 20
NOTIFY_LEN = struct.Struct("<I")
MAX_HANDSHAKE_BYTES = 64 << 10
MAX_ERROR_BYTES = 4 << 10
MAX_IOV = 1000  # below IOV_MAX, leaving room for header parts


def header(ftype: int, req_id: int = 0, length: int = 0, count: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, flags, count, req_id, length)


def parse_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int]:
    """(type, flags, count, request id, length), or ProtocolError."""
    magic, version, ftype, flags, count, req_id, length = HEADER.unpack(buf)
    if magic != MAGIC:
        raise errors.ProtocolError("bad frame magic")
    if version != VERSION:
        raise errors.ProtocolError(f"unsupported protocol version {version}")
    return ftype, flags, count, req_id, length


def desc_table(region_id: int, offsets: npt.NDArray[np.uint64], lengths: npt.NDArray[np.uint64]) -> bytes:
    table = np.empty(len(offsets), dtype=DESC_DTYPE)
    table["region"] = region_id
    table["offset"] = offsets
    table["length"] = lengths
    return table.tobytes()


def parse_desc_table(buf: bytes | bytearray) -> npt.NDArray[Any]:
    return np.frombuffer(buf, dtype=DESC_DTYPE)


# -- sockets -------------------------------------------------------------------------------
class ConnectionClosed(ConnectionError):
    """The other end closed the connection."""


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf), deadline)
    return buf


def recv_into_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill `view` from the stream. With a `deadline` (time.monotonic()) the whole read must
    finish by then, however the bytes trickle in (TimeoutError otherwise)."""
    got = 0
    n = len(view)
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionClosed("connection closed by peer")
        got += k


BATCH_BYTES = 256 << 10  # a stream call rarely moves more; longer iovec lists are wasted work

Views = list[memoryview]


def _batch(views: Sequence[memoryview], idx: int, off: int) -> Views:
    """The views from (idx, off) on, at most MAX_IOV of them and about BATCH_BYTES."""
    first = views[idx][off:] if off else views[idx]
    batch = [first]
    size = len(first)
    end = min(len(views), idx + MAX_IOV)
    j = idx + 1
    while j < end and size < BATCH_BYTES:
        batch.append(views[j])
        size += len(views[j])
        j += 1
    return batch


def _advance(views: Sequence[memoryview], idx: int, off: int, moved: int) -> tuple[int, int]:
    while moved:
        rem = len(views[idx]) - off
        if moved >= rem:
            moved -= rem
            idx += 1
            off = 0
        else:
            off += moved
            moved = 0
    return idx, off


def recv_scatter(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """Fill `views` in order from the stream (recvmsg_into, scatter)."""
    if len(views) == 1:
        recv_into_exact(sock, views[0])
        return
    idx, off, n = 0, 0, len(views)
    while idx < n:
        got = sock.recvmsg_into(_batch(views, idx, off))[0]
        if got == 0:
            raise ConnectionClosed("connection closed by peer")
        idx, off = _advance(views, idx, off, got)


def send_gather(
    sock: socket.socket, parts: Sequence[bytes | bytearray | memoryview], nowait: bool = False
) -> Views:
    """Send `parts` in order (sendmsg, gather; partial sends resumed).

    With `nowait`, stop as soon as the socket would block and return what is left (the
    views not yet sent, the first one trimmed); otherwise block until all is sent.
    """
    views = [p if isinstance(p, memoryview) else memoryview(p) for p in parts if len(p)]
    flags = socket.MSG_DONTWAIT if nowait else 0
    idx, off, n = 0, 0, len(views)
    while idx < n:
        try:
            sent = sock.sendmsg(_batch(views, idx, off), [], flags)
        except BlockingIOError:
            return [views[idx][off:], *views[idx + 1 :]]
        idx, off = _advance(views, idx, off, sent)
    return []


def drain(sock: socket.socket, n: int) -> None:
    scratch = memoryview(bytearray(min(n, 1 << 20) or 1))
    while n > 0:
        k = sock.recv_into(scratch, min(n, len(scratch)))
        if k == 0:
            raise ConnectionClosed("connection closed by peer")
        n -= k


def tune(sock: socket.socket, buffer_bytes: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)


# -- handshake -----------------------------------------------------------------------------
def json_body(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def parse_json_body(buf: bytes | bytearray) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(buf))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.ProtocolError(f"malformed handshake: {exc}") from None
    except RecursionError:  # "[[[[..." nested past the interpreter's limit
        raise errors.ProtocolError("malformed handshake: nested too deeply") from None
    if not isinstance(obj, dict):
        raise errors.ProtocolError("malformed handshake: not an object")
    return obj


def proof(secret: bytes, role: bytes, *fields: str) -> str:
    """HMAC-SHA256 over a role tag and length-prefixed fields (no ambiguity between fields)."""
    mac = hmac.new(secret, b"weft-handshake\0" + role, hashlib.sha256)
    for field in fields:
        data = field.encode()
        mac.update(struct.pack("<I", len(data)) + data)
    return mac.hexdigest()


def check_proof(expected: str, got: Any) -> bool:
    return isinstance(got, str) and hmac.compare_digest(expected, got)
