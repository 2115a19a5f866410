"""The status the plan mirror writes (`mirror_fields`), from a group's etcd state."""

from __future__ import annotations

from weft.api.vocab import MemberState, Role
from weft.membership import GroupStatus, MemberStatus, PlanStatus
from weft.operator.handlers import mirror_fields


def member(name: str, verified: bool = True) -> MemberStatus:
    return MemberStatus(name, 1, MemberState.ACTIVE, "node", 3, None, verified, 0, {}, None)


def test_role_ready_counts_only_live_verified_members_that_acked_the_epoch() -> None:
    roles = {
        "p0": Role.PREFILL,
        "p1": Role.PREFILL,
        "d0": Role.DECODE,
        "d1": Role.DECODE,
        "gone": Role.DECODE,
    }
    plan = PlanStatus(7, "p0", roles, {}, (), True, ("p0", "d0", "d1", "gone", "forged"))
    members = (
        member("p0"),
        member("p1"),
        member("d0"),
        member("d1", verified=False),
        member("forged", False),
    )
    doc = GroupStatus("g", "ns", 10, "p0", 7, plan, members, ())
    fields = mirror_fields(doc, None)
    assert (fields["prefill"], fields["decode"]) == (2, 1)
    assert (fields["prefillReady"], fields["decodeReady"]) == (1, 1)


def test_without_a_plan_no_role_is_ready() -> None:
    doc = GroupStatus("g", "ns", 1, None, None, None, (member("a"),), ())
    fields = mirror_fields(doc, None)
    assert (fields["prefillReady"], fields["decodeReady"]) == (0, 0)
