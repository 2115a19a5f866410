"""The group view's decisions, without etcd: generations never go back, a late older
incarnation is ignored, a plan is replaced only by a higher epoch or when the current one is
invalid, and losing our own key fences us."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from weft.api import records
from weft.api.records import Capabilities, LeaderRecord, MemberRecord, PlanRecord
from weft.api.settings import GroupRef
from weft.api.vocab import MemberState
from weft.membership import keyspace, view
from weft.membership.events import EventKind

SECRET = b"s" * 32
KS = keyspace.Keyspace.of(GroupRef(namespace="ns", group="g"))
ME = "me"
OWN = view.Own(generation=5, mod_revision=7)
NAMES = ("a", "b", "c")


def empty() -> view.GroupView:
    return view.GroupView(KS, ME, SECRET)


def member_put(name: str, generation: int, mod_revision: int, state: str = MemberState.ACTIVE) -> view.Put:
    record = MemberRecord(
        name=name,
        generation=generation,
        instance="i",
        incarnation=0,
        node="n",
        state=state,
        capabilities=Capabilities(),
        fabric="",
        lease_ttl=3.0,
        joined_at=0.0,
    )
    key = KS.member(name)
    return view.Put(key, records.seal(record, key, SECRET), 1, mod_revision, mod_revision)


def plan_put(epoch: int, mod_revision: int) -> view.Put:
    plan = PlanRecord(
        epoch=epoch, members=[], roles={}, experts={}, under_replicated=[], leader="a", leader_generation=1
    )
    return view.Put(KS.plan, records.seal(plan, KS.plan, SECRET), 0, mod_revision, mod_revision)


member_puts = st.builds(member_put, st.sampled_from(NAMES), st.integers(1, 20), st.integers(1, 1000))


@settings(max_examples=200, deadline=None)
@given(st.lists(member_puts, max_size=40))
def test_generations_never_go_back(puts: list[view.Put]) -> None:
    v = empty()
    for put in puts:
        before = dict(v.members)
        v, changes = view.reduce(v, put, OWN)
        for name, m in before.items():
            assert v.members[name].generation >= m.generation
        for change in changes:
            assert isinstance(change, view.PeerPut)
            assert change.fresh == (change.old is None or change.old.generation < change.member.generation)


@given(st.sampled_from(NAMES), st.integers(2, 20), st.data())
def test_a_late_older_incarnation_is_ignored(name: str, generation: int, data: st.DataObject) -> None:
    v, changes = view.reduce(empty(), member_put(name, generation, 10), OWN)
    assert [type(c) for c in changes] == [view.PeerPut]
    older = member_put(name, data.draw(st.integers(1, generation - 1)), data.draw(st.integers(1, 1000)))
    after, changes = view.reduce(v, older, OWN)
    assert changes == []
    assert after.members == v.members
    stale = member_put(name, generation, data.draw(st.integers(1, 10)))  # same incarnation, not newer
    assert view.reduce(v, stale, OWN)[1] == []


plan_inputs = st.one_of(
    st.builds(plan_put, st.integers(1, 10), st.integers(1, 1000)),
    st.builds(lambda rev: view.Put(KS.plan, b"not a plan", 0, rev, rev), st.integers(1, 1000)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(plan_inputs, max_size=30))
def test_a_plan_is_replaced_only_by_a_higher_epoch_or_when_invalid(puts: list[view.Put]) -> None:
    v = empty()
    for put in puts:
        valid = put.value != b"not a plan"
        v2, changes = view.reduce(v, put, OWN)
        if not valid:
            assert v2.plan == v.plan and v2.plan_invalid and v2.plan_revision == put.mod_revision
            assert any(isinstance(c, view.Ignored) for c in changes)
        else:
            new = records.unseal(PlanRecord, put.value, put.key, SECRET)
            if v.plan is None or new.epoch > v.plan.epoch or v.plan_invalid:
                assert v2.plan == new and not v2.plan_invalid and v2.plan_revision == put.mod_revision
                assert [c.kind for c in changes if isinstance(c, view.Notice)] == [EventKind.PLAN]
            else:
                assert v2 == v and changes == []
        v = v2


@given(st.one_of(st.none(), st.integers(1, 20)))
def test_losing_our_own_key_fences_us(prev_revision: int | None) -> None:
    v, _ = view.reduce(empty(), member_put(ME, OWN.generation, OWN.mod_revision), OWN)
    v, _ = view.reduce(v, member_put("a", 1, 3), OWN)
    assert set(v.members) == {ME, "a"}
    prev = None if prev_revision is None else member_put(ME, OWN.generation, prev_revision)
    _, changes = view.reduce(v, view.Delete(KS.member(ME), prev), OWN)
    fences = [c for c in changes if isinstance(c, view.FenceSelf)]
    assert len(fences) == (1 if prev_revision in (None, OWN.mod_revision) else 0)
    fenced, changes = view.reduce(v, view.Fenced(), OWN)
    assert fenced.members == {} and fenced.leader is None and fenced.silent == {}
    assert [c.member.name for c in changes if isinstance(c, view.PeerRemoved)] == ["a"]


def test_our_own_record_of_another_generation_is_not_us() -> None:
    v, changes = view.reduce(empty(), member_put(ME, OWN.generation - 1, 3), OWN)
    assert v.members == {} and changes == []


def test_a_silent_member_comes_back_when_it_answers() -> None:
    v, _ = view.reduce(empty(), member_put("a", 3, 10), OWN)
    v, changes = view.reduce(v, view.Silenced(v.members["a"], "quiet"), OWN)
    assert "a" not in v.members and "a" in v.silent
    assert [type(c) for c in changes] == [view.PeerRemoved]
    v, changes = view.reduce(v, member_put("a", 3, 11), OWN)  # its record renewed: still silent
    assert "a" not in v.members and v.silent["a"].mod_revision == 11 and changes == []
    v, changes = view.reduce(v, view.Answered("a", 3), OWN)
    assert "a" in v.members and v.silent == {} and [type(c) for c in changes] == [view.PeerBack]


def test_a_snapshot_removes_what_etcd_no_longer_holds_and_sets_the_leader() -> None:
    v, _ = view.reduce(empty(), member_put("a", 1, 2), OWN)
    v, _ = view.reduce(v, member_put("b", 1, 3), OWN)
    leader = records.seal(LeaderRecord(name="b", generation=1, since=0.0), KS.leader, SECRET)
    snap = view.Snapshot((member_put("b", 1, 3), view.Put(KS.leader, leader, 1, 4, 4)))
    v, changes = view.reduce(v, snap, OWN)
    assert set(v.members) == {"b"} and v.leader == "b"
    assert [type(c) for c in changes] == [view.PeerRemoved, view.Notice]


def test_a_drained_member_leaving_is_said_so() -> None:
    v, _ = view.reduce(empty(), member_put("a", 1, 2, MemberState.DRAINING), OWN)
    prev = member_put("a", 1, 2)
    v, changes = view.reduce(v, view.Delete(KS.member("a"), prev), OWN)
    assert v.members == {}
    assert [(c.member.name, c.reason) for c in changes if isinstance(c, view.PeerRemoved)] == [
        ("a", "left (drained)")
    ]


def test_a_foreign_or_forged_record_is_ignored() -> None:
    forged = member_put("a", 1, 2)
    forged = view.Put(KS.member("b"), forged.value, 1, 2, 2)  # a's record under b's key
    v, changes = view.reduce(empty(), forged, OWN)
    assert v.members == {} and [type(c) for c in changes] == [view.Ignored]
    other = keyspace.Keyspace("ns", "other")
    v, changes = view.reduce(empty(), view.Put(other.member("a"), b"", 1, 2, 2), OWN)
    assert v == empty() and changes == []
