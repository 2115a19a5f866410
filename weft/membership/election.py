"""The planner leader's election and the leader's plan writes.

Candidates race to create ``leader`` under their lease; the holder leads until its lease
ends, and the others retry when they see the key deleted. The leader writes the plan with a
compare-and-swap on the ``plan`` key's revision as it last saw it, so a deposed or paused
leader working from an old plan fails instead of overwriting.
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
    from weft.membership._etcd import KeyValue
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
            try:
                created, _ = await m._etcd.create(
                    key.encode(), records.seal(record, key, m.config.secret), lease=m.lease
                )
            except errors.EtcdError:
                await asyncio.sleep(0.2)
                continue
            if created:
                self._set_leader(m.config.name)
                continue
            await asyncio.sleep(0.05)  # the watch will tell who holds it
            if m.leader is not None:
                continue
            try:
                kv = await m._etcd.get(key.encode())
                holder = None if kv is None else self._decode_leader(kv)
                if kv is not None and holder is None:
                    # not a leader record of this group (a stranger's write, maybe without a
                    # lease: it would never expire): clear it, guarded by its revision
                    if await m._etcd.delete_if(key.encode(), mod_revision=kv.mod_revision):
                        log.warning("%s: removed an invalid leader key", m.config.name)
                elif kv is not None:
                    self._set_leader(holder)
            except errors.EtcdError:
                pass
            await asyncio.sleep(0.2)

    def _decode_leader(self, kv: KeyValue) -> str | None:
        key = kv.key.decode("utf-8", "replace")
        try:
            return records.unseal(LeaderRecord, kv.value, key, self.m.config.secret).name
        except records.RecordError as exc:
            self.m.sync.warn_once(key, str(exc))
            return None

    def _set_leader(self, leader: str | None) -> None:
        m = self.m
        m.sync.feed(view.LeaderKnown(leader))

    async def write_plan(self, plan: records.PlanRecord) -> bool:
        """Write the next plan if this member leads and nobody wrote one since it last looked.

        Returns:
            True when written.
        Raises:
            MembershipError: `plan` is not the epoch after the current plan's.
        """
        m = self.m
        if not m.is_leader:
            return False
        expected = (m.plan.epoch if m.plan is not None else 0) + 1
        if plan.epoch != expected:
            raise errors.MembershipError(f"plan epoch {plan.epoch} does not follow {expected - 1}")
        key = m.view.keyspace.plan
        ok, revision = await m._etcd.replace(
            key.encode(), records.seal(plan, key, m.config.secret), mod_revision=m.plan_revision
        )
        if ok:
            m.sync.feed(view.PlanWritten(plan, revision))
        return ok
