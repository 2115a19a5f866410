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


@settings(deadline=None)  # a pure function: a busy machine's slowness is no failure
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
def test_a_plan_is_replaced_only_by_a_higher_epoch_and_an_older_one_is_invalid(puts: list[view.Put]) -> None:
    """The plan never goes back: a validly signed plan below the highest epoch seen (written
    back by someone with etcd access) is reported invalid and never adopted, and the key's
    revision is always the one the leader's CAS needs."""
    v = empty()
    for put in puts:
        valid = put.value != b"not a plan"
        v2, changes = view.reduce(v, put, OWN)
        if put.mod_revision <= v.plan_revision:  # that revision or a newer one is known: no news
            assert v2 == v and changes == []
            continue
        assert v2.plan_revision == put.mod_revision  # the leader's CAS runs against the real key
        assert v2.epoch >= v.epoch
        if not valid:
            assert v2.plan == v.plan and v2.plan_invalid and v2.epoch == v.epoch
            assert any(isinstance(c, view.Ignored) for c in changes)
            v = v2
            continue
        new = records.unseal(PlanRecord, put.value, put.key, SECRET)
        adopted = new.epoch > v.epoch or (
            new.epoch == v.epoch and (v.plan is None or v.plan.epoch < new.epoch or v.plan == new)
        )
        if adopted:
            assert v2.plan == new and not v2.plan_invalid and v2.epoch == new.epoch
            notices = [c.kind for c in changes if isinstance(c, view.Notice)]
            assert notices == ([] if v.plan == new else [EventKind.PLAN])
        else:
            assert v2.plan == v.plan and v2.plan_invalid and v2.epoch == v.epoch
            assert [c.kind for c in changes if isinstance(c, view.Notice)] == [EventKind.PLAN]
            assert any(isinstance(c, view.Ignored) for c in changes)
        v = v2


def test_an_ack_above_the_plan_marks_the_plan_key_stale_and_a_delete_keeps_the_epoch() -> None:
    """Acks tell the highest epoch applied: a plan key below it (a restarted member reading a
    rewound key) is not adopted; a deleted key leaves the epoch where it was."""
    ack_key = KS.ack("a")
    ack = view.Put(
        ack_key, records.seal(records.AckRecord(name="a", generation=1, epoch=5), ack_key, SECRET), 1, 3, 3
    )
    v, _ = view.reduce(empty(), view.Snapshot((ack, plan_put(3, 4))), OWN)
    assert v.plan is None and v.plan_invalid and v.epoch == 5 and v.plan_revision == 4
    v, _ = view.reduce(v, plan_put(6, 9), OWN)
    assert v.plan is not None and v.plan.epoch == 6 and not v.plan_invalid
    v, changes = view.reduce(v, view.Delete(KS.plan), OWN)
    assert v.plan is not None and v.plan.epoch == 6 and v.epoch == 6
    assert v.plan_invalid and v.plan_revision == 0
    assert [c.kind for c in changes if isinstance(c, view.Notice)] == [EventKind.PLAN]
    again, _ = view.reduce(v, view.Snapshot((ack,)), OWN)  # the key still absent on a re-read
    assert again.plan_invalid and again.plan_revision == 0 and again.epoch == 6
    v, _ = view.reduce(v, plan_put(2, 11), OWN)  # epoch 1.. written from scratch: refused
    assert v.plan is not None and v.plan.epoch == 6 and v.plan_invalid and v.plan_revision == 11


@settings(deadline=None)
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


def leader_put(name: str, lease: int, mod_revision: int) -> view.Put:
    value = records.seal(LeaderRecord(name=name, generation=1, since=0.0), KS.leader, SECRET)
    return view.Put(KS.leader, value, lease, mod_revision, mod_revision)


def test_a_leader_record_counts_only_under_its_live_holders_lease() -> None:
    """Re-written without a lease, under another lease, or naming a member that has gone: no
    leader, and the key is to be cleared (once per bad key, not on every input)."""
    v, _ = view.reduce(empty(), member_put("a", 1, 2), OWN)  # a's record is under lease 1
    good, _ = view.reduce(v, leader_put("a", 1, 3), OWN)
    assert good.leader == "a"
    for bad, why in ((leader_put("a", 0, 4), "no lease"), (leader_put("a", 7, 4), "not under")):
        after, changes = view.reduce(good, bad, OWN)
        assert after.leader is None
        assert [c.mod_revision for c in changes if isinstance(c, view.ClearLeader)] == [4]
        assert any(why in c.why for c in changes if isinstance(c, view.ClearLeader))
        again, changes = view.reduce(after, member_put("b", 1, 5), OWN)
        assert again.leader is None and not any(isinstance(c, view.ClearLeader) for c in changes)
    gone, changes = view.reduce(good, view.Delete(KS.member("a")), OWN)  # the holder leaves
    assert gone.leader is None
    assert [c.mod_revision for c in changes if isinstance(c, view.ClearLeader)] == [3]
    stranger, changes = view.reduce(v, leader_put("zed", 1, 6), OWN)
    assert stranger.leader is None and any(isinstance(c, view.ClearLeader) for c in changes)


def test_garbage_over_a_member_key_is_absent_and_over_ours_is_repaired() -> None:
    v, _ = view.reduce(empty(), member_put(ME, OWN.generation, OWN.mod_revision), OWN)
    v, _ = view.reduce(v, member_put("a", 1, 3), OWN)
    after, changes = view.reduce(v, view.Put(KS.member("a"), b"garbage", 0, 3, 9), OWN)
    assert set(after.members) == {ME}  # as a fresh reader of the group would see it
    assert [type(c) for c in changes] == [view.Ignored, view.PeerRemoved]
    leaseless = member_put("a", 1, 10)
    after, _ = view.reduce(v, view.Put(leaseless.key, leaseless.value, 0, 3, 10), OWN)
    assert set(after.members) == {ME}
    for value, lease in ((b"garbage", 0), (member_put(ME, OWN.generation - 1, 1).value, 1)):
        ours, changes = view.reduce(v, view.Put(KS.member(ME), value, lease, 1, OWN.mod_revision + 5), OWN)
        assert [c.mod_revision for c in changes if isinstance(c, view.RepairSelf)] == [OWN.mod_revision + 5]
        assert ME in ours.members
    mine = member_put(ME, OWN.generation, OWN.mod_revision + 1)  # our own write, seen first
    _, changes = view.reduce(v, mine, OWN)
    assert not any(isinstance(c, view.RepairSelf) for c in changes)
