"""The planner leader's election and the leader's plan writes.

Candidates race to create ``leader`` under their lease; the holder leads until its lease
ends, and the others retry when they see the key deleted, or clear a key that names no live
leader (`view.leader_problem`: someone with etcd access wrote it back without a lease).

The leader writes the plan with a compare-and-swap on the ``plan`` key's revision as it last
saw it, so a deposed or paused leader working from an old plan fails instead of
overwriting, and above the highest epoch it has seen, so no epoch is used twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from weft.api import records
from weft.api.records import LeaderRecord
from weft.membership import errors, session, view

if TYPE_CHECKING:
    from weft.membership.member import Membership

log = logging.getLogger(__name__)


class Election:
    """Stands for leader (if configured) and writes plans while leading.

    Args:
        m: the membership that campaigns.
    """

    def __init__(self, m: Membership) -> None:
        self.m = m

    def _vacant(self) -> bool:
        return self.m.phase is session.Phase.JOINED and self.m.leader is None

    async def campaign(self) -> None:
        """Whenever joined and no leader is known, try to create the ``leader`` key."""
        m = self.m
        key = m.view.keyspace.leader
        while not m._stopping:
            with contextlib.suppress(TimeoutError):
                await m.wait_for(self._vacant, 60.0)
            if not self._vacant():
                continue
            record = LeaderRecord(name=m.config.name, generation=m.generation, since=time.time())
            value = records.seal(record, key, m.config.secret)
            try:
                created, revision = await m._etcd.create(key.encode(), value, lease=m.lease)
            except errors.EtcdError:
                await asyncio.sleep(0.2)
                continue
            if created:
                if revision > m.sync.revision:  # not seen by the watch yet: take it now
                    put = view.Put(key, value, m.lease, revision, revision)
                    m.sync.feed(view.LeaderKnown(m.config.name, put))
                continue
            await asyncio.sleep(0.05)  # the watch will tell who holds it
            if m.leader is None:
                with contextlib.suppress(errors.EtcdError):
                    await self._clear_dead_leader()
            await asyncio.sleep(0.2)

    async def _clear_dead_leader(self) -> None:
        """Delete the ``leader`` key when it names no live leader (`view.leader_problem`):
        a stranger's write, or a leader record re-written without a lease or naming a member
        that has gone would otherwise block the election for good. Judged only once the
        watch has caught up with the key (its holder's record comes before it)."""
        m = self.m
        key = m.view.keyspace.leader
        kv = await m._etcd.get(key.encode())
        if kv is None or kv.mod_revision > m.sync.revision:
            return
        try:
            name = records.unseal(LeaderRecord, kv.value, key, m.config.secret).name
        except records.RecordError as exc:
            m.sync.warn_once(key, str(exc))
            name = ""
        problem = view.leader_problem(m.view, view.LeaderKey(name, kv.lease, kv.mod_revision))
        if problem is not None and await m._etcd.delete_if(key.encode(), mod_revision=kv.mod_revision):
            m.counters["leaders_cleared"] += 1
            log.warning("%s: cleared the leader key: %s", m.config.name, problem)

    async def write_plan(self, plan: records.PlanRecord) -> bool:
        """Write the next plan if this member leads and nobody wrote one since it last looked.

        The epoch written is one above the highest this member has seen (the plan key's and
        the verified acks'): a plan made from an older one (the key was written back or
        deleted) is renumbered, so no epoch is ever used twice.

        Returns:
            True when written.
        Raises:
            MembershipError: `plan`'s epoch is not above the current plan's, or skips ahead of
                the highest epoch seen.
        """
        m = self.m
        if not m.is_leader:
            return False
        current = m.plan.epoch if m.plan is not None else 0
        expected = max(current, m.view.epoch) + 1
        if plan.epoch > expected or plan.epoch <= current:
            raise errors.MembershipError(f"plan epoch {plan.epoch} does not follow {current}")
        if plan.epoch < expected:  # made from a plan below the highest epoch seen: renumbered
            plan = plan.model_copy(update={"epoch": expected})
        key = m.view.keyspace.plan
        ok, revision = await m._etcd.replace(
            key.encode(), records.seal(plan, key, m.config.secret), mod_revision=m.plan_revision
        )
        if ok:
            m.sync.feed(view.PlanWritten(plan, revision))
        return ok
