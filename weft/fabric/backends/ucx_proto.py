"""The ucx backend's protocol: control messages, message tags and the records of requests.

Control messages travel as UCX active messages with a fixed header; payload bytes travel
as tag messages whose tag says which connection, request and descriptor they belong to
(see `weft.fabric.backends.ucx`). Nothing here calls UCX: the records only hold the
requests the progress thread made.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from weft.fabric import handshake
from weft.fabric.types import Op

if TYPE_CHECKING:
    from weft.fabric.peers import Peer
    from weft.fabric.transfer import Transfer

# -- control messages (active messages) ---------------------------------------------------
# magic "WU" | u8 version | u8 type | u32 flags | u32 count (descriptors / error code) | u64 request
CTL = struct.Struct("<2sBBIIQ")
CTL_MAGIC = b"WU"
CTL_VERSION = 1
HELLO, AUTH, WELCOME, REJECT = 1, 2, 3, 4
WRITE, READ, DONE, ERROR = 10, 11, 12, 13

CONN_BITS, REQ_BITS, INDEX_BITS = 16, 24, 24
MAX_CONNS = 1 << CONN_BITS
REQ_MASK = (1 << REQ_BITS) - 1
MAX_INDEX = 1 << INDEX_BITS
MAX_INBOUND = 4096
HOUSEKEEPING_S = 0.05
#: with requests in flight, keep polling this long after the last event before sleeping in
#: epoll (an answer usually comes back within tens of microseconds; a wake-up costs more)
SPIN_S = 100e-6
REJECT_LINGER_S = 0.5


def tag(conn_id: int, req_id: int, index: int) -> int:
    return (conn_id << (REQ_BITS + INDEX_BITS)) | ((req_id & REQ_MASK) << INDEX_BITS) | index


def ctl(ftype: int, req_id: int = 0, count: int = 0, flags: int = 0) -> bytes:
    return CTL.pack(CTL_MAGIC, CTL_VERSION, ftype, flags, count, req_id)


@dataclass(frozen=True, slots=True)
class UcxPlan:
    op: Op
    peer: Peer
    table: bytes
    count: int
    total: int
    views: tuple[memoryview, ...]  # slices of the local region, one per descriptor
    arrays: tuple[Any, ...]  # ucxx Arrays over `views`, reused by every post


class PostedOp:
    """One posted request on the initiator."""

    __slots__ = ("conn", "keep", "notify", "plan", "req_id", "reqs", "transfer")

    def __init__(self, plan: UcxPlan, transfer: Transfer, notify: bytes | None) -> None:
        self.plan = plan
        self.transfer = transfer
        self.notify = notify
        self.conn: Conn | None = None
        self.req_id = 0
        self.reqs: list[Any] = []
        self.keep: list[Any] = []


class Serving:
    """A request this agent serves as the target (receives for WRITE, sends for READ)."""

    __slots__ = ("conn", "keep", "notify", "pos", "req_id", "reqs", "write")

    def __init__(
        self, conn: Conn, req_id: int, write: bool, reqs: list[Any], keep: list[Any], notify: bytes | None
    ) -> None:
        self.conn = conn
        self.req_id = req_id
        self.write = write
        self.reqs = reqs
        self.keep = keep  # the Arrays and views the requests point into
        self.notify = notify
        self.pos = 0


class Conn:
    """One UCX endpoint with its handshake state (outbound when `peer` is set)."""

    def __init__(self, ep: Any, cid: int, peer: Peer | None, deadline: float) -> None:
        self.ep = ep
        self.id = cid
        self.remote_id = -1
        self.peer = peer
        self.peer_name: str | None = peer.name if peer is not None else None
        self.ready = False
        self.closed = False
        self.close_at: float | None = None
        self.deadline = deadline
        self.client: handshake.Client | None = None  # outbound: our half of the handshake
        self.server: handshake.Server | None = None  # inbound: our half of the handshake
        self.am: Any = None
        self.ops: dict[int, PostedOp] = {}
        self.queued: list[PostedOp] = []
        self.ids = itertools.count(1)

    def next_req(self) -> int:
        while True:
            req = next(self.ids) & REQ_MASK
            if req and req not in self.ops:
                return req


def failed(req: Any) -> bool:
    """True if a completed UCX request ended in error."""
    try:
        req.check_error()
    except Exception:
        return True
    return False
