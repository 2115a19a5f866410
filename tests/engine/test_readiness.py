"""Readiness is "can serve transfers"; etcd being away is a condition apart (no etcd needed here:
the membership's state is set by hand, as its loops would set it)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, cast

import pytest

from weft.api.vocab import MemberState
from weft.engine import readiness
from weft.membership.member import Membership, Phase


def member(**state: Any) -> Any:
    me = SimpleNamespace(generation=7)
    fields: dict[str, Any] = {
        "config": SimpleNamespace(name="m"),
        "phase": Phase.JOINED,
        "state": MemberState.ACTIVE,
        "generation": 7,
        "synced": True,
        "etcd_reachable": True,
        "session": SimpleNamespace(keepalive_failing=False),
        "agent": SimpleNamespace(fenced=False),
        "members": {"m": me},
    }
    return SimpleNamespace(**(fields | state))


def judge(m: Any, *checks: tuple[str, readiness.Check]) -> readiness.Readiness:
    return readiness.Readiness(cast(Membership, m), list(checks))


def test_losing_etcd_leaves_a_serving_member_ready_and_is_reported_apart() -> None:
    m = member()
    r = judge(m)
    assert r.verdict() is None and r.etcd().connected and r.etcd().describe() == "connected"
    m.etcd_reachable, m.session.keepalive_failing, m.synced = False, True, False
    assert r.verdict() is None
    lost = r.etcd()
    assert not lost.connected and lost.lost_since is not None
    assert "lease keep-alives fail" in lost.detail and "watch" in lost.detail
    assert lost.describe().startswith("lost since ")
    assert r.etcd().lost_since == lost.lost_since  # the episode keeps its start
    m.etcd_reachable, m.session.keepalive_failing, m.synced = True, False, True
    assert r.etcd().connected and r.etcd().lost_since is None


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        ({"phase": Phase.STARTING}, "not-joined"),
        ({"state": MemberState.JOINING}, "not-joined"),
        ({"members": {}, "synced": False}, "not-joined"),  # rejoined, the group not read back
        ({"phase": Phase.FENCED}, "fenced"),
        ({"agent": SimpleNamespace(fenced=True)}, "fenced"),
        ({"phase": Phase.LEAVING}, "leaving"),
        ({"state": MemberState.DRAINING}, "draining"),
    ],
)
def test_what_stops_serving_makes_the_member_unready(state: dict[str, Any], kind: str) -> None:
    verdict = judge(member(**state)).verdict()
    assert verdict is not None and verdict.kind == kind and verdict.text


def test_extra_checks_come_last_and_each_transition_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    health: list[str] = []
    m = member()
    r = judge(m)
    r.add_check("fabric", lambda: "; ".join(health) or None)
    caplog.set_level(logging.INFO, logger=readiness.__name__)
    assert r.reason() is None
    health.append("the notification inbox is full")
    for _ in range(50):  # probes
        assert r.reason() == "the notification inbox is full"
    verdict = r.verdict()
    assert verdict is not None and verdict.kind == "fabric"
    m.state = MemberState.DRAINING  # a built-in reason is named first
    assert r.reason() == "draining"
    health.clear()
    m.state = MemberState.ACTIVE
    for _ in range(50):
        assert r.reason() is None
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines == [
        "m: ready",
        "m: not ready: the notification inbox is full",
        "m: not ready: draining",
        "m: ready",
    ]
