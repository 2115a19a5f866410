"""weft.planner: pure functions from the live members and a policy to the group's next plan."""

from weft.api.vocab import Role
from weft.planner.experts import ExpertSpec, Placement, place_experts, replica_counts
from weft.planner.plan import Plan, PlanChange, next_plan
from weft.planner.roles import LoadPolicy, MemberInfo, RatioPolicy, ratio_counts

__all__ = [
    "ExpertSpec",
    "LoadPolicy",
    "MemberInfo",
    "Placement",
    "Plan",
    "PlanChange",
    "RatioPolicy",
    "Role",
    "next_plan",
    "place_experts",
    "ratio_counts",
    "replica_counts",
]
