"""The member's session with etcd: its record under a lease, kept alive, fenced when lost.

* **Join.** Grant a lease, derive a generation from etcd's revision (so a later incarnation
  of a name always has a higher one, whatever the clocks say), and create ``members/<name>``
  under the lease only if absent; a name still held by a live member is waited for.
* **Fencing.** The fabric serves only until ``keep-alive send time + granted TTL``, the
  earliest moment etcd can expire the lease; a keep-alive answered "lease gone" (or a pause
  longer than the TTL) fences the agent, and it rejoins as a new generation. While etcd itself
  is unreachable, and no pause was seen, serving goes on and the client retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from typing import TYPE_CHECKING

from weft.api import records
from weft.api.records import MemberRecord
from weft.api.vocab import MemberState, MemoryKind
from weft.membership import errors, view
from weft.membership.events import EventKind

if TYPE_CHECKING:
    from weft.membership.member import Membership

log = logging.getLogger(__name__)

TICK = 0.05  # watchdog period, seconds


class Phase(enum.Enum):
    """Where this member is in its life (not the published `state`)."""

    STARTING = "starting"
    JOINED = "joined"
    FENCED = "fenced"
    LEAVING = "leaving"
    LEFT = "left"


class Session:
    """Join, publish, keep-alive, watchdog, fence and rejoin of one membership.

    Args:
        m: the membership whose record and lease this keeps.
    """

    def __init__(self, m: Membership) -> None:
        self.m = m
        self.keepalive_failing = False
        self._last_tick = time.monotonic()

    # -- join and publish -----------------------------------------------------------------------
    def make_record(self, state: MemberState) -> MemberRecord:
        """This member's record in `state`, from its config and its fabric agent."""
        m = self.m
        fabric = ""
        if m.agent is not None:
            fabric = MemberRecord.encode_fabric(m.agent.metadata())
        caps = m.config.capabilities
        if m.agent is not None and not caps.backends:
            gpus = m.agent.gpus
            kinds = [MemoryKind.DRAM, MemoryKind.VRAM] if gpus else [MemoryKind.DRAM]
            caps = caps.model_copy(
                update={"backends": list(m.agent.backends), "gpus": gpus, "memory_kinds": kinds}
            )
        return MemberRecord(
            name=m.config.name,
            generation=m.generation,
            instance=m.config.instance,
            incarnation=m.incarnation,
            node=m.config.node[:253],
            state=state,
            capabilities=caps,
            fabric=fabric,
            lease_ttl=float(m.lease_ttl),
            joined_at=m._joined_at,
            http=m.config.http,
            role=m._role,
        )

    async def join(self, deadline: float) -> None:
        """Create the member key under a new lease, as a new incarnation.

        Raises:
            MembershipError: not joined by `deadline` (etcd away, or the name held by another).
        """
        m = self.m
        etcd = m._etcd
        backoff = 0.1
        incarnation = m.incarnation + 1
        while True:
            try:
                ttl = max(1, math.ceil(m.config.lease_ttl))
                sent = time.monotonic()
                lease, granted = await etcd.grant(ttl)
                generation = await etcd.revision() + 1
                m.incarnation = incarnation
                m.generation = generation
                m.lease, m.lease_ttl = lease, granted
                m._joined_at = time.time()
                if m.agent is not None:
                    if m.agent.generation != generation:
                        m.agent.regenerate(generation)
                    m.agent.serve_until(sent + granted)
                record = self.make_record(MemberState.JOINING)
                created, revision = await etcd.create(
                    m.key.encode(), records.seal(record, m.key, m.config.secret), lease=lease
                )
                if created:
                    m._record, m._mod_revision = record, revision
                    m.phase = Phase.JOINED
                    m.state = MemberState.JOINING
                    m.etcd_reachable = True
                    self.keepalive_failing = False
                    if m.agent is not None:
                        m.agent.unfence()
                    return
                await etcd.revoke(lease)
                holder = await etcd.get(m.key.encode())
                why = f"the name {m.config.name!r} is held by another live member"
                if holder is not None:
                    try:
                        other = records.unseal(MemberRecord, holder.value, m.key, m.config.secret)
                        why += (
                            f" (node {other.node}, instance {other.instance}, generation {other.generation})"
                        )
                        dead = "is under no lease" if not holder.lease else None
                    except records.RecordError as exc:
                        dead = f"does not verify ({exc})"
                    if dead is not None:  # no live member holds it: every reader sees it as absent
                        log.warning("%s: its key holds a record that %s: removing it", m.config.name, dead)
                        await etcd.delete_if(m.key.encode(), mod_revision=holder.mod_revision)
                        why = f"its key held a record that {dead} (removed)"
                last: errors.EtcdError | None = None
            except errors.EtcdUnavailableError as exc:
                why, last = str(exc), exc
            if time.monotonic() + backoff > deadline:
                raise errors.MembershipError(f"{m.config.name}: could not join: {why}") from last
            log.info("%s: join waits: %s", m.config.name, why)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.25)  # a dead holder's lease can end any moment

    async def publish(self, state: MemberState) -> None:
        """Replace the member record (guarded by its revision) with one in `state`.

        Raises:
            MembershipError: not joined, or the record changed under it.
        """
        m = self.m
        if m.phase is not Phase.JOINED or m._record is None:
            raise errors.MembershipError(f"{m.config.name} is not joined ({m.phase.value})")
        record = self.make_record(state)
        ok, revision = await m._etcd.replace(
            m.key.encode(),
            records.seal(record, m.key, m.config.secret),
            mod_revision=m._mod_revision,
            lease=m.lease,
        )
        if not ok:
            raise errors.MembershipError(f"{m.config.name}: its member record changed under it")
        m._record, m._mod_revision, m.state = record, revision, state
        m.bus.changed.set()

    async def repair(self, mod_revision: int) -> None:
        """Put this member's record back over whatever someone else wrote to its key (at
        `mod_revision`), under its lease; a CAS, so a newer write is looked at again first."""
        m = self.m
        if m.phase is not Phase.JOINED or m._record is None:
            return
        try:
            ok, revision = await m._etcd.replace(
                m.key.encode(),
                records.seal(m._record, m.key, m.config.secret),
                mod_revision=mod_revision,
                lease=m.lease,
            )
        except errors.EtcdError as exc:
            log.warning("%s: could not repair its member key: %s", m.config.name, exc)
            return
        if ok:
            m._mod_revision = revision
            m.counters["repairs"] += 1
            m.bus.changed.set()

    # -- liveness -------------------------------------------------------------------------------
    async def keepalive_loop(self) -> None:
        """Renew the lease every third of its TTL; extend the fabric's serving deadline."""
        m = self.m
        backoff = 0.1
        while not m._stopping:
            period = max(m.lease_ttl / 3, 0.2)
            if m.phase is Phase.FENCED:
                await self.rejoin()
                continue
            sent = time.monotonic()
            try:
                ttl = await m._etcd.keepalive(m.lease)
            except errors.EtcdError as exc:
                if not self.keepalive_failing:
                    log.warning("%s: etcd unreachable, serving known peers meanwhile: %s", m.config.name, exc)
                    m._emit(EventKind.ETCD_LOST, m.config.name, m.generation, str(exc))
                self.keepalive_failing = True
                m.etcd_reachable = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, period)
                continue
            backoff = 0.1
            if ttl <= 0:
                self.fence("etcd says its lease is gone")
                continue
            if self.keepalive_failing:
                m._emit(EventKind.ETCD_BACK, m.config.name, m.generation, "keep-alive answered again")
            self.keepalive_failing = False
            m.etcd_reachable = True
            if m.agent is not None and m.phase is Phase.JOINED:
                m.agent.serve_until(sent + ttl)
            m.bus.changed.set()
            await asyncio.sleep(max(0.0, sent + period - time.monotonic()))

    async def watchdog(self) -> None:
        """Sees pauses, and keeps serving going while etcd (not this process) is away."""
        m = self.m
        self._last_tick = time.monotonic()
        while not m._stopping:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            gap, self._last_tick = now - self._last_tick, now
            if m.phase is not Phase.JOINED:
                continue
            if gap > m.lease_ttl:
                self.fence(f"this process was paused for {gap:.1f} s, longer than its lease")
            elif self.keepalive_failing and m.agent is not None and gap < max(4 * TICK, 0.5):
                m.agent.serve_until(now + 1.0)

    def fence(self, reason: str) -> None:
        """Stop serving and forget the group (only when joined); the keep-alive rejoins."""
        m = self.m
        if m.phase is not Phase.JOINED:
            return
        m.phase = Phase.FENCED
        m.counters["fences"] += 1
        if m.agent is not None:
            m.agent.fence(reason)
        m.sync.feed(view.Fenced())
        m.detector.forget()
        m.synced = False
        m._emit(EventKind.FENCED, m.config.name, m.generation, reason)

    async def rejoin(self) -> None:
        """Join again as a new generation, re-read the group and publish the old state."""
        m = self.m
        old_lease = m.lease
        with contextlib.suppress(errors.EtcdError):
            await m._etcd.revoke(old_lease)  # a lease that etcd kept (restart) must go too
        state = m.state  # what it had published: it comes back in the same state
        try:
            await self.join(time.monotonic() + m.config.join_timeout)
            await m.sync.sync()
            if state != MemberState.JOINING:
                await self.publish(state)
        except (errors.MembershipError, errors.EtcdError) as exc:
            log.warning("%s: rejoin failed, retrying: %s", m.config.name, exc)
            await asyncio.sleep(0.5)
            return
        m.counters["rejoins"] += 1
        m._emit(EventKind.REJOINED, m.config.name, m.generation, f"incarnation {m.incarnation}")
