"""Checksummed KV traffic through the group's agents, running throughout a chaos run.

What an inference engine does with a disaggregated KV cache, reduced to what can be checked:
write each KV block (random bytes, its SHA-256 kept here) into the ``kv-pool`` region of two
members (`AgentSettings.kv_pool_bytes`), read blocks back from either copy and compare, and
when a copy's holder goes away, copy the block again from the survivor to another member.

A copy is valid while the process that holds it lives: members are told apart by their
process (boot id, pid namespace, pid), not their generation, because an agent that fenced
and rejoined keeps its registered memory. A write that failed or timed out may still land
later, so its slot on that process is never used again (quarantined), and a copy is only
read after its write completed. Hence the two invariants, checked on every read:

- corrupt: a read that completed returned bytes whose digest is not the block's;
- lost: a block whose every copy is gone (two holders lost before the repair ran).

A member the plan no longer names is on its way out (a scale-down drains it: the operator
plans it out before its pod goes, and may take two at once): its copies do not count towards
the two a block keeps, so they are copied to members that stay while it still answers, as an
engine moves KV blocks off a draining rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from e2e.observe import Member, Observer
from weft.fabric import errors
from weft.fabric.agent import Agent
from weft.fabric.config import AgentConfig
from weft.fabric.types import Op

KV_POOL = "kv-pool"
TIMEOUT = 1.0  # one transfer's deadline
SUSPECT_SECONDS = 3.0  # a member that failed a transfer gets no new work for this long


@dataclass
class Copy:
    member: str
    process: str
    slot: int


@dataclass
class Block:
    id: int
    digest: str = ""
    copies: list[Copy] = field(default_factory=list)


@dataclass
class Counters:
    written: int = 0
    verified: int = 0
    repaired: int = 0
    failed_transfers: int = 0
    lost: int = 0
    corrupt: int = 0
    bytes: int = 0


class Traffic(threading.Thread):
    """Writes, reads and repairs blocks of `block_bytes` until `stop`; `counters.bytes` is what
    moved (the throughput the report plots)."""

    def __init__(
        self,
        observer: Observer,
        token: bytes,
        *,
        pool_bytes: int,
        block_bytes: int = 128 << 10,
        blocks: int = 48,
        write_ratio: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__(name="traffic", daemon=True)
        self.observer = observer
        self.block_bytes = block_bytes
        self.slots = pool_bytes // block_bytes
        self.blocks = [Block(i) for i in range(blocks)]
        self.rng = random.Random(seed)
        self.write_ratio = write_ratio  # writes among reads, once every block has been written
        self.counters = Counters()
        self.violations: list[str] = []
        self.agent = Agent(
            f"e2e-traffic-{seed}", AgentConfig(["tcp"], secret=token, transfer_timeout=TIMEOUT)
        )
        self.buf = self.agent.alloc(block_bytes)
        self._peers: dict[str, str] = {}  # member -> process we added
        self._used: dict[str, set[int]] = {}  # process -> slots holding a copy
        self._quarantined: dict[str, set[int]] = {}  # process -> slots a failed write may still hit
        self._suspect: dict[str, float] = {}  # process -> until when it gets no new work
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(30)
        self.agent.close()

    def run(self) -> None:
        while not self._halt.is_set():
            live = self._sync_peers()
            if len(live) < 2:
                time.sleep(0.1)
                continue
            self._drop_gone(live)
            staying = self._staying(live)
            damaged = next(
                (
                    b
                    for b in self.blocks
                    if b.digest and sum(c.member in staying for c in b.copies) < 2 and self._source(b)
                ),
                None,
            )
            if damaged is not None:
                self._repair(damaged, staying)
            elif unwritten := [b for b in self.blocks if not b.digest]:
                self._write(unwritten[0], staying)
            elif self.rng.random() < self.write_ratio:
                self._write(self.rng.choice(self.blocks), staying)
            else:
                self._verify(self.rng.choice([b for b in self.blocks if b.digest]))

    # -- membership ------------------------------------------------------------------------
    def _sync_peers(self) -> dict[str, Member]:
        view = self.observer.snapshot()
        for name, m in view.members.items():
            if self._peers.get(name) != m.process + f"@{m.generation}":
                try:
                    self.agent.add_peer(m.fabric)
                except errors.WeftError:
                    continue
                self._peers[name] = m.process + f"@{m.generation}"
        for name in set(self._peers) - set(view.members):  # left the group (scaled down)
            with contextlib.suppress(errors.WeftError):
                self.agent.remove_peer(name)
            del self._peers[name]
        # while etcd is away the observer keeps the members last seen: the data path goes on
        return dict(view.members)

    def _staying(self, live: dict[str, Member]) -> dict[str, Member]:
        """The live members the plan names (all of them before there is a plan, or when fewer
        than two are named: the traffic needs two)."""
        plan = self.observer.snapshot().plan
        staying = {n: m for n, m in live.items() if plan is None or n in plan.roles}
        return staying if len(staying) >= 2 else live

    def _drop_gone(self, live: dict[str, Member]) -> None:
        processes = {m.process for m in live.values()}
        for b in self.blocks:
            kept = [c for c in b.copies if c.process in processes]
            for c in b.copies:
                if c not in kept:
                    self._used.get(c.process, set()).discard(c.slot)
            b.copies = kept
            if b.digest and not b.copies:
                self.counters.lost += 1
                self.violations.append(
                    f"block {b.id} lost: every holder went away before it was copied again"
                )
                b.digest = ""

    # -- data ------------------------------------------------------------------------------
    def _slot(self, m: Member) -> int | None:
        used = self._used.setdefault(m.process, set())
        bad = self._quarantined.setdefault(m.process, set())
        free = [s for s in range(self.slots) if s not in used and s not in bad]
        return self.rng.choice(free) if free else None

    def _usable(self, live: dict[str, Member]) -> list[str]:
        """Members to give new work, in random order: a member that just failed a transfer
        (frozen, cut off, dying) is left alone for `SUSPECT_SECONDS`, as an engine masks a
        rank, so one stuck peer does not stall the traffic on its timeouts."""
        now = time.monotonic()
        names = [n for n in sorted(live) if self._suspect.get(live[n].process, 0.0) <= now]
        return self.rng.sample(names, len(names))

    def _failed(self, process: str) -> None:
        self.counters.failed_transfers += 1
        self._suspect[process] = time.monotonic() + SUSPECT_SECONDS

    def _put(self, m: Member, data: np.ndarray) -> Copy | None:
        slot = self._slot(m)
        if slot is None:
            return None
        self.buf.buffer[:] = data
        try:
            remote = self.agent.remote(m.name, KV_POOL, timeout=TIMEOUT)
            where = remote.descs([(slot * self.block_bytes, self.block_bytes)])
            self.agent.transfer(Op.WRITE, self.buf.descs(), m.name, where, timeout=TIMEOUT).wait()
        except errors.WeftError:
            self._failed(m.process)
            self._quarantined[m.process].add(slot)
            return None
        self._used[m.process].add(slot)
        self.counters.bytes += self.block_bytes
        return Copy(m.name, m.process, slot)

    def _get(self, c: Copy) -> np.ndarray | None:
        try:
            remote = self.agent.remote(c.member, KV_POOL, timeout=TIMEOUT)
            where = remote.descs([(c.slot * self.block_bytes, self.block_bytes)])
            self.agent.transfer(Op.READ, self.buf.descs(), c.member, where, timeout=TIMEOUT).wait()
        except errors.WeftError:
            self._failed(c.process)
            return None
        self.counters.bytes += self.block_bytes
        return np.array(self.buf.buffer, copy=True)

    def _write(self, b: Block, live: dict[str, Member]) -> None:
        data = np.frombuffer(self.rng.randbytes(self.block_bytes), dtype=np.uint8)
        digest = hashlib.sha256(data.tobytes()).hexdigest()
        copies: list[Copy] = []
        for name in self._usable(live):
            if len(copies) == 2:
                break
            c = self._put(live[name], data)
            if c is not None:
                copies.append(c)
        if len(copies) < 2:  # not committed: the engine would try again; the old version stays
            for c in copies:
                self._used[c.process].discard(c.slot)
            return
        for old in b.copies:
            self._used.get(old.process, set()).discard(old.slot)
        b.digest, b.copies = digest, copies
        self.counters.written += 1

    def _verify(self, b: Block) -> None:
        now = time.monotonic()
        for c in sorted(b.copies, key=lambda c: self._suspect.get(c.process, 0.0) > now):
            data = self._get(c)
            if data is None:
                continue  # a holder that does not answer: its copy stays until it leaves
            if hashlib.sha256(data.tobytes()).hexdigest() != b.digest:
                self.counters.corrupt += 1
                self.violations.append(f"block {b.id}: the copy on {c.member} slot {c.slot} is corrupt")
                b.copies.remove(c)
                continue
            self.counters.verified += 1
            return

    def _source(self, b: Block) -> Copy | None:
        now = time.monotonic()
        return next((c for c in b.copies if self._suspect.get(c.process, 0.0) <= now), None)

    def _repair(self, b: Block, live: dict[str, Member]) -> None:
        source = self._source(b)
        data = self._get(source) if source is not None else None
        if data is None:
            return
        if hashlib.sha256(data.tobytes()).hexdigest() != b.digest:
            self.counters.corrupt += 1
            self.violations.append(f"block {b.id}: the copy on {source.member} is corrupt (repair)")  # type: ignore[union-attr]
            return
        holders = {c.process for c in b.copies}
        for name in self._usable(live):
            if live[name].process in holders:
                continue
            c = self._put(live[name], data)
            if c is not None:
                b.copies.append(c)
                self.counters.repaired += 1
                return
