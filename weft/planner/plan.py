"""The group's plan: epoch, members, a role per member, expert placement. One pure function.

`next_plan(previous, members, ...)` is what the leader runs on every (debounced) membership or
load change; its result is written to etcd with a compare-and-swap on the previous epoch.
Same inputs, same plan: no clocks except the `now` passed in, no randomness, sorted outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from weft.api.vocab import Role
from weft.planner.experts import ExpertSpec, Placement, place_experts
from weft.planner.roles import (
    LoadPolicy,
    MemberInfo,
    RatioPolicy,
    RoleDecision,
    plan_roles_load,
    plan_roles_ratio,
)


@dataclass(frozen=True)
class Plan:
    epoch: int
    members: tuple[str, ...]
    roles: dict[str, Role]
    experts: dict[int, tuple[str, ...]] = field(default_factory=dict)
    under_replicated: tuple[int, ...] = ()
    reason: str = ""
    action: str | None = None
    action_at: float | None = None
    """When the load policy last stepped (``now`` of that plan)."""


@dataclass(frozen=True)
class PlanChange:
    plan: Plan
    role_flips: int
    added: tuple[tuple[int, str], ...]
    """(expert, member) replicas to pull for this plan."""


def next_plan(
    previous: Plan | None,
    members: Sequence[MemberInfo],
    policy: RatioPolicy | LoadPolicy,
    experts: ExpertSpec | None = None,
    expert_load: Mapping[int, float] | None = None,
    *,
    now: float = 0.0,
    reason: str = "",
) -> PlanChange:
    """The plan after `previous` for the live `members` (draining and dead ones left out).

    Members carry their current role (`MemberInfo.role`); where it is None the previous plan's
    role is used, so a member that has not applied its role yet is not counted as new.
    Epochs only grow: ``previous.epoch + 1`` (1 for the first plan).
    """
    prev_roles = previous.roles if previous is not None else {}
    infos = [
        m if m.role is not None or m.name not in prev_roles else _with_role(m, prev_roles[m.name])
        for m in sorted(members, key=lambda m: m.name)
    ]
    if len({m.name for m in infos}) != len(infos):
        raise ValueError("member names must be unique")
    decision: RoleDecision
    action_at = previous.action_at if previous is not None else None
    if isinstance(policy, RatioPolicy):
        decision = plan_roles_ratio(infos, policy)
    else:
        decision = plan_roles_load(infos, policy, previous_action_at=action_at, now=now)
        if decision.action is not None:
            action_at = now
    placement = Placement({}, (), (), {})
    if experts is not None:
        hosts = [m.name for m in infos if m.gpus > 0] or [m.name for m in infos]
        placement = place_experts(experts, hosts, previous.experts if previous else None, expert_load)
    plan = Plan(
        epoch=(previous.epoch if previous is not None else 0) + 1,
        members=tuple(m.name for m in infos),
        roles=decision.roles,
        experts=placement.experts,
        under_replicated=placement.under_replicated,
        reason="; ".join(r for r in (reason, decision.reason) if r),
        action=decision.action,
        action_at=action_at,
    )
    return PlanChange(plan, decision.flips, placement.added)


def _with_role(m: MemberInfo, role: Role) -> MemberInfo:
    return MemberInfo(m.name, m.gpus, role, m.queue_depth, m.tokens_per_s, m.load_at)
