"""The `tcp` backend: the peer's authenticated stream carries the bytes.

WRITE sends header, descriptor table and the local bytes with one gathering `sendmsg`; the
target receives straight into its registered memory with `recvmsg_into` (no copy in Python).
READ asks, and the answer lands straight in local memory. GPU memory is staged through host
buffers. It works between any two hosts and is the GPU-less fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from weft.fabric import wire
from weft.fabric.connection import Pending
from weft.fabric.types import Backend, MemoryKind, Op

if TYPE_CHECKING:
    from weft.fabric.backend import BackendHost
    from weft.fabric.memory import DescList, Region
    from weft.fabric.peers import Peer
    from weft.fabric.transfer import Transfer

_HOST_KINDS = (MemoryKind.DRAM, MemoryKind.VRAM)


@dataclass(frozen=True, slots=True)
class TcpPlan:
    op: Op
    peer: Peer
    table: bytes
    count: int
    total: int
    region: Region
    spans: tuple[tuple[int, int], ...]
    host_views: tuple[memoryview, ...] | None  # DRAM: slices of the region, reused by every post


class TcpBackend:
    kind = Backend.TCP

    def __init__(self, host: BackendHost) -> None:
        self.host = host

    def usable(self, peer: Peer, local: MemoryKind, remote: MemoryKind) -> bool:
        return local in _HOST_KINDS and remote in _HOST_KINDS

    def plan(self, op: Op, local: DescList, peer: Peer, remote: DescList) -> TcpPlan:
        region = self.host.local_region(local)
        spans = tuple(local.pairs())
        views = None
        if region.kind is MemoryKind.DRAM:
            base = region.view
            views = tuple(base[o : o + n] for o, n in spans)
        table = wire.desc_table(remote.region_id, remote.offsets, remote.lengths)
        return TcpPlan(op, peer, table, len(remote), local.total, region, spans, views)

    def post(self, plan: TcpPlan, transfer: Transfer, notify: bytes | None) -> None:
        ch = plan.peer.stream()
        req = ch.next_id()
        flags = 0
        prefix: list[bytes] = []
        if notify is not None:
            flags = wire.FLAG_NOTIFY
            prefix = [wire.NOTIFY_LEN.pack(len(notify)), notify]
        extra = sum(len(p) for p in prefix) + len(plan.table)
        if plan.op is Op.WRITE:
            views = plan.host_views if plan.host_views is not None else self._stage_out(plan)
            hdr = wire.header(wire.WRITE, req, extra + plan.total, plan.count, flags)
            ch.submit(req, Pending(transfer), [hdr, *prefix, plan.table, *views])
        else:
            hdr = wire.header(wire.READ, req, extra, plan.count, flags)
            if plan.host_views is not None:
                pending = Pending(transfer, views=plan.host_views)
            else:
                staging = [memoryview(bytearray(n)) for _o, n in plan.spans]
                pending = Pending(transfer, views=staging, after=lambda: self._stage_in(plan, staging))
            ch.submit(req, pending, [hdr, *prefix, plan.table])

    def _stage_out(self, plan: TcpPlan) -> list[memoryview]:
        out = []
        for off, n in plan.spans:
            staging = memoryview(bytearray(n))
            self.host.device_to_host(plan.region, off, staging)
            out.append(staging)
        return out

    def _stage_in(self, plan: TcpPlan, staging: list[memoryview]) -> None:
        for (off, _n), buf in zip(plan.spans, staging, strict=True):
            self.host.host_to_device(buf, plan.region, off)

    def endpoint(self) -> str | None:
        return None

    def close(self) -> None:
        pass
