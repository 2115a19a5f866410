"""The exchange's registered memory and its WRITEs.

Four regions registered once, each with one slot per rank: ``ep-inbox`` (batches peers send
here), ``ep-results`` (results peers send back), and two local staging areas the WRITEs read
from. WRITEs are prepared once per (peer, slot, size) and re-posted with each step's
notification (prepare once, post many); the least recently used are released first.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

from weft.ep import wire
from weft.fabric import errors
from weft.fabric.agent import Agent
from weft.fabric.memory import Registration, RemoteRegion
from weft.fabric.transfer import PreparedTransfer, Transfer
from weft.fabric.types import Op

INBOX, RESULTS = "ep-inbox", "ep-results"


class Slots:
    """One rank's slots and prepared WRITEs.

    Args:
        agent: the rank's fabric agent (the regions are allocated on it).
        world: slots per region (one per rank of the plan).
        hidden: activation width; dtype: activation dtype; max_tokens: rows per slot.
        timeout: seconds a WRITE or a peer's region look-up may take.
    """

    def __init__(
        self, agent: Agent, world: int, *, hidden: int, dtype: np.dtype, max_tokens: int, timeout: float
    ) -> None:
        self.agent, self.world, self.hidden, self.dtype = agent, world, hidden, dtype
        self.max_tokens, self.timeout = max_tokens, timeout
        self.row_bytes = hidden * dtype.itemsize
        self.slot_bytes = wire.HEADER_BYTES + 4 * max_tokens + max_tokens * self.row_bytes
        self.inbox = agent.alloc(self.slot_bytes * world, INBOX)
        self.results = agent.alloc(self.slot_bytes * world, RESULTS)
        self.staging = agent.alloc(self.slot_bytes * world)  # what our WRITEs read from
        self.replies = agent.alloc(self.slot_bytes * world)  # what our result WRITEs read from
        self._remote: dict[tuple[str, str], RemoteRegion] = {}
        # prepared WRITEs by (peer, region, local slot, remote slot, bytes)
        self._prepared: collections.OrderedDict[tuple[str, str, int, int, int], PreparedTransfer] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self.prepared_limit = 4 * world
        self.prepares = 0  # transfers laid out (a steady workload stops adding to it)

    def pack(
        self, reg: Registration, slot: int, head: wire.SlotHeader, ids: np.ndarray, rows: np.ndarray
    ) -> int:
        """`head` (its token count is ``len(ids)``), the expert ids and the rows into `slot`
        of `reg`; returns the bytes to send."""
        buf, base, n = reg.buffer, slot * self.slot_bytes, len(ids)
        header = head.encode()
        buf[base : base + wire.SLOT.size] = np.frombuffer(header, dtype=np.uint8)
        ids_at = base + wire.HEADER_BYTES
        buf[ids_at : ids_at + 4 * n] = ids.astype(np.int32).view(np.uint8)
        start = ids_at + 4 * self.max_tokens
        buf[start : start + n * self.row_bytes] = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
        return wire.HEADER_BYTES + 4 * self.max_tokens + n * self.row_bytes

    def header(self, reg: Registration, slot: int) -> wire.SlotHeader | None:
        """The header of `slot` of `reg`, or None when it holds none (or `slot` is out of range)."""
        if not 0 <= slot < self.world:
            return None
        try:
            return wire.decode_slot(
                bytes(reg.buffer[slot * self.slot_bytes : slot * self.slot_bytes + wire.SLOT.size])
            )
        except wire.MalformedMessageError:
            return None

    def ids(self, reg: Registration, slot: int, tokens: int) -> np.ndarray:
        """The expert ids in `slot` of `reg` (int64, a copy)."""
        base = slot * self.slot_bytes + wire.HEADER_BYTES
        ids: np.ndarray = reg.buffer[base : base + 4 * tokens].view(np.int32).astype(np.int64)
        return ids

    def rows(self, reg: Registration, slot: int, tokens: int) -> np.ndarray:
        """The rows in `slot` of `reg`: a view [tokens, hidden] of the registered memory."""
        start = slot * self.slot_bytes + wire.HEADER_BYTES + 4 * self.max_tokens
        raw = reg.buffer[start : start + tokens * self.row_bytes]
        rows: np.ndarray = raw.view(self.dtype).reshape(tokens, self.hidden)
        return rows

    def post(
        self, local: Registration, region: str, peer: str, slots: tuple[int, int], nbytes: int, note: bytes
    ) -> Transfer:
        """WRITE `nbytes` from slot ``slots[0]`` of `local` to slot ``slots[1]`` of the peer's
        `region`, through a prepared transfer kept for that shape.

        Returns:
            The posted transfer.

        Raises:
            WeftError: the peer could not be reached (its prepared WRITEs are dropped).
        """
        local_slot, remote_slot = slots
        key = (peer, region, local_slot, remote_slot, nbytes)
        with self._lock:
            prepared = self._prepared.pop(key, None)
        try:
            if prepared is None:
                self.prepares += 1
                remote = self._region(peer, region)
                prepared = self.agent.prepare(
                    Op.WRITE, local.descs([(local_slot * self.slot_bytes, nbytes)]), peer,
                    remote.descs([(remote_slot * self.slot_bytes, nbytes)]),
                )  # fmt: skip
            transfer = prepared.post(note, timeout=self.timeout)
        except errors.WeftError:
            self.forget_peer(peer)  # a peer that failed (or restarted) is laid out again
            raise
        with self._lock:
            self._prepared[key] = prepared
            while len(self._prepared) > self.prepared_limit:
                self._prepared.popitem(last=False)[1].release()
        return transfer

    def forget_peer(self, peer: str) -> None:
        """Drop what was laid out for `peer` (it is looked up again at the next WRITE)."""
        with self._lock:
            for key in [k for k in self._prepared if k[0] == peer]:
                self._prepared.pop(key).release()
            self._remote = {k: v for k, v in self._remote.items() if k[0] != peer}

    def forget_all(self) -> None:
        """Drop every prepared WRITE and remote region (peers may have restarted)."""
        with self._lock:
            self._remote.clear()
            while self._prepared:
                self._prepared.popitem()[1].release()

    def _region(self, peer: str, name: str) -> RemoteRegion:
        key = (peer, name)
        with self._lock:
            found = self._remote.get(key)
        if found is None:  # a peer that is gone fails the transfer itself (and is masked)
            found = self.agent.remote(peer, name, timeout=self.timeout)
            with self._lock:
                self._remote[key] = found
        return found

    def release(self) -> None:
        """Release the prepared WRITEs and the four regions."""
        self.forget_all()
        for reg in (self.inbox, self.results, self.staging, self.replies):
            reg.release()
