"""Plans in motion: the leader re-plans on changes, every agent applies the plan and acks.

This is where membership (etcd) meets the planner (pure functions); the two never import
each other, so the glue lives here, in the agent layer.

* **Leader.** On every membership or load change, debounced, it turns the live view into
  `MemberInfo`s (draining members left out: they are leaving), runs `next_plan` on the
  current plan, and writes the result only if roles or placement changed, with the plan
  compare-and-swap (`Membership.write_plan`): a deposed or paused leader's write fails.
* **Everyone.** When a plan with a newer epoch arrives, the member takes its role: a role
  change is a handshake with the engine (`weft.engine.changes.RoleChange`: the engine
  finishes or hands off its requests, switches, answers), and only then is the new role
  published in the member record; new experts are pulled and verified, handed to the engine
  (`ExpertChange`), and only then is the epoch acked. Without an engine (the `weft agent`
  daemon), a role change waits, bounded, until the fabric's transfers in flight are done.

Planning and applying run as two tasks: an engine that takes long to switch never holds up
the leader's planning of the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from weft.api import records
from weft.api.vocab import MemberState, Role
from weft.engine.changes import Change, ExpertChange, RoleChange
from weft.engine.experts import ExpertHolder
from weft.fabric.errors import WeftError
from weft.membership.events import EventKind
from weft.membership.member import Membership, MembershipEvent, Phase, stop_tasks
from weft.membership.port import FabricPort
from weft.planner import ExpertSpec, LoadPolicy, MemberInfo, Plan, RatioPolicy, next_plan

log = logging.getLogger(__name__)

# the events after which the plan may need to change (or be applied again)
RETRY_FIRST = 0.2
"""Seconds before a failed planning step is tried again; doubled per failure in a row."""
RETRY_MAX = 2.0
"""The longest wait between two tries of a failing planning step."""
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
    """Seconds the engine (or, without one, the fabric's transfers in flight) has to finish
    the old role's work before taking a new one; past it the member says it is overdue."""
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


async def fabric_drain(agent: FabricPort | None, change: Change) -> bool:
    """No engine: before a role change, wait (bounded by the change's deadline) until the
    fabric has no transfers in flight; then answer done."""
    if isinstance(change, RoleChange) and change.old is not None and agent is not None:
        # the fabric counts transfers, it does not signal them: poll, bounded
        while agent.in_flight() and change.seconds_left > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    change.done()
    return True


Handshake = Callable[[Change], Awaitable[bool]]
"""Hands a change to the engine and returns once it answered: True when done."""


class Coordinator:
    """Runs the leader's planning loop and this member's plan application.

    Args:
        membership: the member's membership.
        config: policy, experts and timing.
        experts: the expert weights this member holds (None: no expert placement here).
        handshake: asks the engine to carry out a change (`weft.engine.Engine` passes its
            own); None: no engine, a role change waits for the fabric's transfers in flight.
    """

    def __init__(
        self,
        membership: Membership,
        config: PlanningConfig,
        experts: ExpertHolder | None = None,
        handshake: Handshake | None = None,
    ) -> None:
        self.membership = membership
        self.config = config
        self.experts = experts
        self.handshake = handshake or self._fabric_drain
        self.applied: records.PlanRecord | None = None
        self.applied_epoch = 0
        self.role: Role | None = None
        self.pending: Change | None = None
        """The change the engine is carrying out now, if any."""
        self.given: set[int] = set()
        """The experts the engine has taken (answered an `ExpertChange` for)."""
        self._wake = asyncio.Event()
        self._apply_wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._failures: dict[str, int] = {}  # planning step -> failures in a row
        membership.subscribe(self._on_event)

    def status(self) -> dict[str, object]:
        """For /status: the plan applied, this member's role, the experts it holds and pulled."""
        out: dict[str, object] = {"applied_epoch": self.applied_epoch, "role": self.role}
        out["planning_failures"] = dict(self._failures)  # step -> failures in a row, now
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
        pending = self.pending
        out["pending"] = None if pending is None else {"change": str(pending), "overdue": self.overdue}
        if self.experts is not None:
            out["experts"] = {str(e): d for e, d in sorted(self.experts.digests().items())}
            out["pulled"] = [
                {"expert": p.expert, "source": p.source, "bytes": p.nbytes, "seconds": round(p.seconds, 6)}
                for p in self.experts.pulled[-200:]
            ]
            out["failed_pulls"] = self.experts.failed_pulls
        return out

    @property
    def overdue(self) -> bool:
        """The engine is past the deadline of the change it is carrying out."""
        pending = self.pending
        return pending is not None and pending.seconds_left < 0

    def _on_event(self, ev: MembershipEvent) -> None:
        if ev.kind is EventKind.REJOINED:
            self.applied_epoch = 0  # its ack went with the old lease: apply (and ack) again
        if ev.kind in _REPLAN_ON:
            self._wake.set()
            self._apply_wake.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name="weft-planning"),
            loop.create_task(self._apply_loop(), name="weft-applying"),
        ]
        self._wake.set()
        self._apply_wake.set()

    async def stop(self) -> None:
        self._stopping = True  # the loops check it too
        self._wake.set()
        self._apply_wake.set()
        tasks, self._tasks = self._tasks, []
        await stop_tasks(tasks, f"{self.membership.config.name}: planning")

    async def _run(self) -> None:
        """The leader's side: re-plan after changes (and every `tick` for a load policy)."""
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
            if self.membership.is_leader:
                await self._step(self.replan, self._wake)
            self._apply_wake.set()  # a plan we wrote comes back through the watch too

    async def _apply_loop(self) -> None:
        """Everyone's side: apply the newest plan, one at a time."""
        while not self._stopping:
            await self._apply_wake.wait()
            self._apply_wake.clear()
            if self._stopping:
                return
            await self._step(self.apply, self._apply_wake)

    async def _step(self, work: Callable[[], Awaitable[object]], again: asyncio.Event) -> None:
        """Run one planning step; a failure is retried with backoff (`RETRY_FIRST` doubling up
        to `RETRY_MAX` s) and said once per episode, not on every retry."""
        what = getattr(work, "__name__", "step")
        failures = self._failures.get(what, 0)
        try:
            await work()
        except Exception as exc:  # WeftError: etcd away, a pull that failed everywhere; else a bug
            name = self.membership.config.name
            if failures == 0 and isinstance(exc, WeftError):
                log.warning("%s: planning step (%s) failed, retrying with backoff: %s", name, what, exc)
            elif failures == 0:
                log.exception("%s: planning step (%s) crashed; retrying with backoff", name, what)
            else:
                log.debug("%s: planning step (%s) failed again: %r", name, what, exc)
            self._failures[what] = failures + 1
            await asyncio.sleep(min(RETRY_FIRST * 2 ** min(failures, 8), RETRY_MAX))
            again.set()
            return
        if failures:
            del self._failures[what]
            log.info(
                "%s: planning step (%s) works again after %d failures",
                self.membership.config.name,
                what,
                failures,
            )

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
                    ttft_p90_ms=load.ttft_ms.p90 if load and load.ttft_ms else None,
                    itl_p90_ms=load.itl_ms.p90 if load and load.itl_ms else None,
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
        """Take this member's role in the newest plan (the engine switches first), take its
        experts (the engine loads them), then ack the epoch. An engine that answers
        `failed` gets asked again a second later; nothing is acked meanwhile."""
        m = self.membership
        plan = m.plan
        if plan is None or plan.epoch <= self.applied_epoch or m.phase is not Phase.JOINED:
            return
        role = plan.roles.get(m.config.name)
        if role != self.role:
            change = RoleChange(plan.epoch, self._deadline(), old=self.role, new=role)
            if not await self._ask(change):
                return
            self.role = role
            await m.set_role(role)
        if self.experts is not None and not await self._take_experts(plan):
            return
        await m.put_ack(plan.epoch)
        self.applied, self.applied_epoch = plan, plan.epoch

    def _deadline(self) -> float:
        return time.monotonic() + self.config.drain_timeout

    async def _ask(self, change: Change) -> bool:
        """Hand `change` to the engine and wait for its answer (False: it failed; asked again
        after a second)."""
        name = self.membership.config.name
        self.pending = change
        try:
            ok = await self.handshake(change)
        finally:
            self.pending = None
        if not ok:
            log.warning("%s: the engine did not carry out %s: %s", name, change, change.reason or "no reason")
            loop = asyncio.get_running_loop()
            loop.call_later(1.0, self._apply_wake.set)
        return ok

    async def _fabric_drain(self, change: Change) -> bool:
        return await fabric_drain(self.membership.agent, change)

    async def _take_experts(self, plan: records.PlanRecord) -> bool:
        """Pull the experts this plan newly gives us (verified), hand them to the engine,
        publish, and release the ones lost one plan ago. False: the engine refused them."""
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
        released = frozenset(set(self.experts.held) - mine - kept_one_more)
        # what the engine has taken is tracked apart from what is held: an engine that
        # refused a change is handed the same experts again, not an empty change
        added = sorted(mine - self.given)
        removed = frozenset(self.given - mine)
        if added or removed or released:
            views = {e: self.experts.view(e) for e in added}
            change = ExpertChange(
                plan.epoch, self._deadline(), added=views, removed=removed, released=released
            )
            if not await self._ask(change):
                return False
        self.given = (self.given | set(added)) - removed
        self.experts.release(released)
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
        return True
