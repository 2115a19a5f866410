"""The status the plan mirror writes (`mirror_fields`), from a group's etcd state."""

from __future__ import annotations

import pytest

from weft.api.vocab import MemberState, Role
from weft.membership import GroupStatus, MemberStatus, PlanStatus
from weft.operator import handlers
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


def test_a_new_plan_that_moves_members_is_announced_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[tuple[str, str]] = []
    monkeypatch.setattr(handlers.kopf, "info", lambda body, reason, message: said.append((reason, message)))
    first = PlanStatus(3, "a", {"a": Role.PREFILL, "b": Role.DECODE, "c": Role.DECODE}, {}, (), True, ())
    assert handlers._announce_plan({}, None, first) is first and said == []  # remembered, not repeated
    moved = PlanStatus(
        4, "a", {"a": Role.PREFILL, "b": Role.PREFILL, "c": Role.DECODE}, {}, (), True, (),
        reason="prefill queue 30.0; decode queue 0.0: prefill+1", action="prefill+1",
    )  # fmt: skip
    assert handlers._announce_plan({}, first, moved) is moved
    assert said == [
        ("RolesChanged", "plan epoch 4: b decode->prefill (prefill queue 30.0; decode queue 0.0: prefill+1)")
    ]
    joined = PlanStatus(5, "a", {**moved.roles, "d": Role.DECODE}, {}, (), True, ())
    assert handlers._announce_plan({}, moved, joined) is joined and len(said) == 1  # nobody moved
    assert handlers._announce_plan({}, joined, moved) is joined  # an older epoch is not news
    forged = PlanStatus(9, "x", {"a": Role.DECODE}, {}, (), False, ())
    assert handlers._announce_plan({}, joined, forged) is joined and len(said) == 1
