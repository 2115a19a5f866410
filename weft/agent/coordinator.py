"""Plans in motion: the leader re-plans on changes, every agent applies the plan and acks.

This is where membership (etcd) meets the planner (pure functions); the two never import
each other, so the glue lives here, in the agent layer.

* **Leader.** On every membership or load change, debounced, it turns the live view into
  `MemberInfo`s (draining members left out: they are leaving), runs `next_plan` on the
  current plan, and writes the result only if roles or placement changed, with the plan
  compare-and-swap (`Membership.write_plan`): a deposed or paused leader's write fails.
* **Everyone.** When a plan with a newer epoch arrives, the agent takes its role: if the role
  changes it first drains (waits, bounded, until its transfers in flight are done), then
  publishes the new role in its member record; then it acks the epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from weft.agent.experts import ExpertHolder
from weft.api import records
from weft.api.vocab import MemberState
from weft.fabric.errors import WeftError
from weft.membership.events import EventKind
from weft.membership.member import Membership, MembershipEvent, Phase, stop_tasks
from weft.planner import ExpertSpec, LoadPolicy, MemberInfo, Plan, RatioPolicy, next_plan

log = logging.getLogger(__name__)

# the events after which the plan may need to change (or be applied again)
_REPLAN_ON = frozenset(
    {
        EventKind.ADDED,
        EventKind.UPDATED,
        EventKind.REMOVED,
        EventKind.LEADER,
        EventKind.PLAN,
        EventKind.REJOINED,
        EventKind.LOAD,
        EventKind.DRAIN,
    }
)


@dataclass(frozen=True)
class PlanningConfig:
    policy: RatioPolicy | LoadPolicy
    experts: ExpertSpec | None = None
    debounce: float = 0.1
    """Seconds of quiet after a change before the leader re-plans."""
    drain_timeout: float = 10.0
    """Bound on draining the old role's work before taking a new one."""
    tick: float | None = None
    """Re-plan at least this often (seconds) even without a change; default: 1 s for a load
    policy (its settle time runs out without an event), never for a ratio."""


def plan_from_record(rec: records.PlanRecord | None) -> Plan | None:
    if rec is None:
        return None
    return Plan(
        epoch=rec.epoch,
        members=tuple(rec.members),
        roles=dict(rec.roles),
        experts={int(e): tuple(hosts) for e, hosts in rec.experts.items()},
        under_replicated=tuple(rec.under_replicated),
        reason=rec.reason,
        action=rec.action,
        action_at=rec.action_at,
    )


def record_from_plan(plan: Plan, leader: str, generation: int) -> records.PlanRecord:
    return records.PlanRecord(
        epoch=plan.epoch,
        members=list(plan.members),
        roles=dict(plan.roles),
        experts={str(e): list(hosts) for e, hosts in sorted(plan.experts.items())},
        under_replicated=list(plan.under_replicated),
        reason=plan.reason[:2000],
        action=plan.action,
        action_at=plan.action_at,
        leader=leader,
        leader_generation=generation,
        written_at=time.time(),
    )


class Coordinator:
    """Runs the leader's planning loop and this agent's plan application."""

    def __init__(
        self, membership: Membership, config: PlanningConfig, experts: ExpertHolder | None = None
    ) -> None:
        self.membership = membership
        self.config = config
        self.experts = experts
        self.applied: records.PlanRecord | None = None
        self.applied_epoch = 0
        self.role: str | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        membership.subscribe(self._on_event)

    def status(self) -> dict[str, object]:
        """For /status: the plan applied, this agent's role, the experts it holds and pulled."""
        out: dict[str, object] = {"applied_epoch": self.applied_epoch, "role": self.role}
        plan = self.applied
        out["members_planned"] = list(plan.members) if plan is not None else []
        out["plan"] = (
            None
            if plan is None
            else {
                "epoch": plan.epoch,
                "roles": plan.roles,
                "experts": plan.experts,
                "under_replicated": plan.under_replicated,
            }
        )
        if self.experts is not None:
            out["experts"] = {str(e): d for e, d in sorted(self.experts.digests().items())}
            out["pulled"] = [
                {"expert": p.expert, "source": p.source, "bytes": p.nbytes, "seconds": round(p.seconds, 6)}
                for p in self.experts.pulled[-200:]
            ]
            out["failed_pulls"] = self.experts.failed_pulls
        return out

    def _on_event(self, ev: MembershipEvent) -> None:
        if ev.kind is EventKind.REJOINED:
            self.applied_epoch = 0  # its ack went with the old lease: apply (and ack) again
        if ev.kind in _REPLAN_ON:
            self._wake.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name="weft-coordinator")]
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True  # the loop checks it too
        self._wake.set()
        tasks, self._tasks = self._tasks, []
        await stop_tasks(tasks, f"{self.membership.config.name}: planning")

    async def _run(self) -> None:
        tick = self.config.tick
        if tick is None and isinstance(self.config.policy, LoadPolicy):
            tick = 1.0
        while not self._stopping:
            if tick is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), tick)
            await asyncio.sleep(self.config.debounce)  # let a burst of changes settle
            self._wake.clear()
            if self._stopping:
                return
            try:
                if self.membership.is_leader:
                    await self.replan()
                await self.apply()
            except WeftError as exc:  # etcd away, a pull that failed everywhere: try again
                log.warning("%s: planning step failed, retrying: %s", self.membership.config.name, exc)
                await asyncio.sleep(0.2)
                self._wake.set()
            except Exception:  # a bug: say so loudly, keep the loop alive
                log.exception("%s: planning step crashed; retrying", self.membership.config.name)
                await asyncio.sleep(1.0)
                self._wake.set()

    def _live_members(self) -> list[MemberInfo]:
        m = self.membership
        out = []
        for name, member in sorted(m.members.items()):
            rec = member.record
            if rec.state is MemberState.DRAINING or name in m.drains:  # leaving, or asked to (scale-down)
                continue
            load = m.loads.get(name)
            out.append(
                MemberInfo(
                    name,
                    gpus=rec.capabilities.gpus,
                    # the role comes from the current plan (what is meant), not from the record,
                    # which lags until the member has applied it
                    role=None,
                    queue_depth=load.queue_depth if load else 0,
                    tokens_per_s=load.tokens_per_s if load else 0.0,
                    load_at=load.at if load else 0.0,
                )
            )
        return out

    async def replan(self) -> bool:
        """Leader only: compute the next plan and write it if anything changed."""
        m = self.membership
        current = plan_from_record(m.plan)
        members = self._live_members()
        expert_load: dict[int, float] = {}
        for load in m.loads.values():
            for e, hits in load.expert_hits.items():  # keys are decimal: the record checks them
                expert_load[int(e)] = expert_load.get(int(e), 0.0) + hits
        change = next_plan(
            current, members, self.config.policy, self.config.experts, expert_load or None, now=time.time()
        )
        nxt = change.plan
        unchanged = current is not None and (
            nxt.members == current.members and nxt.roles == current.roles and nxt.experts == current.experts
        )
        if unchanged and not m.plan_invalid:
            return False
        written = await m.write_plan(record_from_plan(nxt, m.config.name, m.generation))
        if written:
            log.info(
                "%s: plan %d: %d members, %d flips, %d replicas to pull, under-replicated %s",
                m.config.name,
                nxt.epoch,
                len(nxt.members),
                change.role_flips,
                len(change.added),
                list(nxt.under_replicated),
            )
        return written

    async def apply(self) -> None:
        """Take this agent's role in the newest plan (draining the old one first), then ack."""
        m = self.membership
        plan = m.plan
        if plan is None or plan.epoch <= self.applied_epoch or m.phase is not Phase.JOINED:
            return
        role = plan.roles.get(m.config.name)
        if role is not None and role != self.role:
            if self.role is not None and m.agent is not None:
                deadline = time.monotonic() + self.config.drain_timeout
                # the fabric counts transfers, it does not signal them: poll, bounded
                while m.agent.in_flight() and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            self.role = role
            await m.set_role(role)
        if self.experts is not None:
            await self._take_experts(plan)
        await m.put_ack(plan.epoch)
        self.applied, self.applied_epoch = plan, plan.epoch

    async def _take_experts(self, plan: records.PlanRecord) -> None:
        """Pull the experts this plan newly gives us (verified), publish, release old ones."""
        assert self.experts is not None
        m = self.membership
        me = m.config.name
        mine = {int(e) for e, hosts in plan.experts.items() if me in hosts}
        before = self.applied.experts if self.applied is not None else {}
        sources: dict[int, list[str]] = {}
        for e in mine:
            old = [h for h in before.get(str(e), []) if h != me and h in m.members]
            staying = [h for h in old if h in plan.experts.get(str(e), [])]
            sources[e] = staying + [h for h in old if h not in staying]
        pulled = await self.experts.ensure(mine, sources)
        kept_one_more = {int(e) for e, hosts in before.items() if me in hosts}
        self.experts.release(set(self.experts.held) - mine - kept_one_more)
        if pulled:
            await m.republish()  # peers learn the new regions from the record
            log.info(
                "%s: plan %d: pulled %d experts (%s)",
                me,
                plan.epoch,
                len(pulled),
                ", ".join(f"{p.expert} from {p.source}" for p in pulled[:8])
                + (" ..." if len(pulled) > 8 else ""),
            )
