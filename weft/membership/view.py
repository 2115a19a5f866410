"""The group as one member sees it, kept by a reducer: an input in, a new view and changes out.

`reduce` decides everything about the view (which record wins, when a member is removed,
which plan counts, when our own key's loss fences us) without etcd, asyncio or a fabric agent,
so those decisions have tests of their own. Its inputs are what the watch and the failure
detector saw; its outputs are a new `GroupView` (never mutated: readers on other threads may
hold the old one) and the `Change`s the caller carries out in order: sync a fabric peer, tell
listeners, fence, warn about a record it ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

from weft.api import records
from weft.api.records import LeaderRecord, MemberRecord
from weft.api.vocab import MemberState
from weft.membership import keyspace
from weft.membership.events import EventKind


@dataclass(frozen=True)
class Member:
    """One member as this agent sees it."""

    record: MemberRecord
    lease: int
    create_revision: int
    mod_revision: int

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def generation(self) -> int:
        return self.record.generation


# -- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Put:
    """A key written (or read), with what etcd holds for it."""

    key: str
    value: bytes
    lease: int = 0
    create_revision: int = 0
    mod_revision: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    """A key deleted; `prev` is what it held, when etcd said."""

    key: str
    prev: Put | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole prefix, read again (at start, after a rejoin or a broken watch)."""

    kvs: tuple[Put, ...]


@dataclass(frozen=True, slots=True)
class Silenced:
    """The heartbeat heard nothing from `member` for a lease: removed, still pinged."""

    member: Member
    reason: str


@dataclass(frozen=True, slots=True)
class Answered:
    """A pong came from `name` at `generation`."""

    name: str
    generation: int


@dataclass(frozen=True, slots=True)
class Lost:
    """The failure detector found `name` dead (`generation` None: whichever is known)."""

    name: str
    generation: int | None
    reason: str
    signal: str


@dataclass(frozen=True, slots=True)
class Fenced:
    """This member was fenced: it forgets the group until it rejoins."""


@dataclass(frozen=True, slots=True)
class PlanWritten:
    """This member (the leader) wrote `plan`; the key's revision is now `revision`."""

    plan: records.PlanRecord
    revision: int


@dataclass(frozen=True, slots=True)
class LeaderKnown:
    """The campaign learned who leads (itself, having created the key, or the holder it read)."""

    leader: str | None


Input = Put | Delete | Snapshot | Silenced | Answered | Lost | Fenced | PlanWritten | LeaderKnown


@dataclass(frozen=True, slots=True)
class Own:
    """This member's own record as it last wrote it (0s before a join)."""

    generation: int
    mod_revision: int


# -- changes ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PeerPut:
    """Another member's record was accepted: bring the fabric peer in line, then tell."""

    member: Member
    old: Member | None

    @property
    def fresh(self) -> bool:
        """A new member or a new incarnation (not an update of the one known)."""
        return self.old is None or self.old.generation != self.member.generation


@dataclass(frozen=True, slots=True)
class PeerBack:
    """A member removed for silence answers again (its fabric peer was never removed)."""

    member: Member


@dataclass(frozen=True, slots=True)
class PeerRemoved:
    """A member left the view: remove its fabric peer, tell."""

    member: Member
    reason: str
    signal: str


@dataclass(frozen=True, slots=True)
class Notice:
    """An event to tell listeners (leader, plan, drain, load)."""

    kind: EventKind
    name: str
    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class FenceSelf:
    """Our own key is gone: fence now."""

    reason: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """A record was refused (bad signature, wrong group, not decodable)."""

    key: str
    why: str


@dataclass(frozen=True, slots=True)
class Wake:
    """Nothing to tell, but waiters should look again."""


Change = PeerPut | PeerBack | PeerRemoved | Notice | FenceSelf | Ignored | Wake


# -- the view -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupView:
    """What one member knows of its group. Never mutated: `reduce` returns a new one.

    Attributes:
        keyspace: the group's keys.
        me: this member's name.
        secret: the group's join token: records not sealed with it are ignored.
        members: name -> member, this member included once its own record is seen.
        silent: removed for silence but still in etcd: they come back when they answer.
        leader: the planner leader's name.
        plan: the last valid plan; `plan_revision` is the ``plan`` key's revision (0: none),
            `plan_invalid` says the key holds something that is not a plan of this group.
        acks: member -> plan epoch it applied.
        loads: member -> its last load report.
        drains: members the operator asked to plan out.
    """

    keyspace: keyspace.Keyspace
    me: str
    secret: bytes = field(repr=False)
    members: dict[str, Member] = field(default_factory=dict)
    silent: dict[str, Member] = field(default_factory=dict)
    leader: str | None = None
    plan: records.PlanRecord | None = None
    plan_revision: int = 0
    plan_invalid: bool = False
    acks: dict[str, int] = field(default_factory=dict)
    loads: dict[str, records.LoadRecord] = field(default_factory=dict)
    drains: set[str] = field(default_factory=set)


def reduce(view: GroupView, event: Input, own: Own) -> tuple[GroupView, list[Change]]:
    """Apply one input to `view`.

    Args:
        view: the view before.
        event: what was seen.
        own: this member's generation and its record's revision, as it last wrote them.
    Returns:
        The view after, and the changes to carry out in order.
    """
    step = _Step(view, own)
    match event:
        case Put() | Delete():
            step.watched(event)
        case Snapshot():
            step.snapshot(event)
        case Silenced(member, reason):
            step.remove(member.name, member.generation, reason, "heartbeat")
            step.silent[member.name] = member
        case Answered(name, generation):
            silent = step.silent.get(name)
            if silent is not None and silent.generation == generation:
                del step.silent[name]
                step.members[name] = silent
                step.out.append(PeerBack(silent))
        case Lost(name, generation, reason, signal):
            step.remove(name, generation, reason, signal)
        case Fenced():
            for name in [n for n in step.members if n != view.me]:
                step.remove(name, None, "this agent was fenced")
            step.members.pop(view.me, None)
            step.silent.clear()
            step.set_leader(None)
        case PlanWritten(plan, revision):
            step.plan, step.plan_revision, step.plan_invalid = plan, revision, False
            step.notice(EventKind.PLAN, plan.leader, plan.epoch, f"written: {plan.reason}")
        case LeaderKnown(leader):
            step.set_leader(leader)
    return step.result(), step.out


class _Step:
    """One input's work on copies of the view's fields."""

    def __init__(self, view: GroupView, own: Own) -> None:
        self.view = view
        self.own = own
        self.members = dict(view.members)
        self.silent = dict(view.silent)
        self.leader = view.leader
        self.plan = view.plan
        self.plan_revision = view.plan_revision
        self.plan_invalid = view.plan_invalid
        self.acks = dict(view.acks)
        self.loads = dict(view.loads)
        self.drains = set(view.drains)
        self.out: list[Change] = []

    def result(self) -> GroupView:
        return dataclasses.replace(
            self.view,
            members=self.members,
            silent=self.silent,
            leader=self.leader,
            plan=self.plan,
            plan_revision=self.plan_revision,
            plan_invalid=self.plan_invalid,
            acks=self.acks,
            loads=self.loads,
            drains=self.drains,
        )

    def notice(self, kind: EventKind, name: str, generation: int, reason: str) -> None:
        self.out.append(Notice(kind, name, generation, reason))

    def decode_member(self, kv: Put) -> Member | None:
        try:
            record = records.unseal(MemberRecord, kv.value, kv.key, self.view.secret)
        except records.RecordError as exc:
            self.out.append(Ignored(kv.key, str(exc)))
            return None
        return Member(record, kv.lease, kv.create_revision, kv.mod_revision)

    def decode_leader(self, kv: Put) -> str | None:
        try:
            return records.unseal(LeaderRecord, kv.value, kv.key, self.view.secret).name
        except records.RecordError as exc:
            self.out.append(Ignored(kv.key, str(exc)))
            return None

    def set_leader(self, leader: str | None) -> None:
        if leader != self.leader:
            self.leader = leader
            self.notice(EventKind.LEADER, leader or "", 0, "elected" if leader else "no leader")

    def snapshot(self, snap: Snapshot) -> None:
        seen: set[str] = set()
        leader: str | None = None
        self.acks.clear()
        self.loads.clear()
        self.drains.clear()
        for kv in snap.kvs:
            parsed = self.view.keyspace.parse(kv.key)
            if parsed is None:
                continue
            if parsed.kind is keyspace.KeyKind.MEMBER:
                m = self.decode_member(kv)
                if m is not None:
                    seen.add(m.name)
                    self.apply_member(m)
            elif parsed.kind is keyspace.KeyKind.LEADER:
                leader = self.decode_leader(kv)
            else:
                self.apply_other(parsed, kv.key, kv)
        for name in list(self.members):
            if name not in seen and name != self.view.me:
                self.remove(name, None, "not in etcd after a re-read")
        for name in [n for n in self.silent if n not in seen]:
            del self.silent[name]  # its DELETE came while the watch was down
        self.set_leader(leader)

    def apply_member(self, m: Member) -> None:
        name = m.name
        if name == self.view.me:
            if m.record.generation == self.own.generation:
                self.members[name] = m
            return
        silent = self.silent.get(name)
        if silent is not None:
            if m.generation == silent.generation:
                self.silent[name] = m  # still silent to us: it comes back when it answers
                return
            del self.silent[name]
        old = self.members.get(name)
        if old is not None and m.generation < old.generation:
            return  # an older incarnation's record arriving late
        if old is not None and m.generation == old.generation and m.mod_revision <= old.mod_revision:
            return
        self.members[name] = m
        self.out.append(PeerPut(m, old))

    def remove(self, name: str, generation: int | None, reason: str, signal: str = "etcd") -> None:
        m = self.members.get(name)
        if m is None or (generation is not None and m.generation != generation):
            return
        del self.members[name]
        self.out.append(PeerRemoved(m, reason, signal))

    def watched(self, ev: Put | Delete) -> None:
        parsed = self.view.keyspace.parse(ev.key)
        if parsed is None:
            return
        if parsed.kind is keyspace.KeyKind.MEMBER:
            if isinstance(ev, Put):
                m = self.decode_member(ev)
                if m is not None:
                    self.apply_member(m)
                return
            self.member_deleted(parsed.name, ev)
        elif parsed.kind is keyspace.KeyKind.LEADER:
            self.set_leader(self.decode_leader(ev) if isinstance(ev, Put) else None)
        else:
            self.apply_other(parsed, ev.key, ev if isinstance(ev, Put) else None)

    def member_deleted(self, name: str, ev: Delete) -> None:
        if name == self.view.me:
            if ev.prev is None or ev.prev.mod_revision == self.own.mod_revision:
                self.out.append(FenceSelf("its member key was deleted (lease expired or removed by hand)"))
            return
        gen = None
        if ev.prev is not None:
            with contextlib.suppress(records.RecordError):
                gen = records.unseal(MemberRecord, ev.prev.value, ev.key, self.view.secret).generation
        m = self.members.get(name)
        if m is not None and m.record.state == MemberState.DRAINING:
            reason = "left (drained)"
        else:
            reason = "member key deleted (lease expired or left)"
        self.remove(name, gen, reason, "etcd")
        silent = self.silent.get(name)
        if silent is not None and gen in (None, silent.generation):
            del self.silent[name]

    def apply_other(self, parsed: keyspace.GroupKey, key: str, kv: Put | None) -> None:
        """``plan``, ``acks/<name>``, ``load/<name>``, ``drain/<name>`` (`kv` None: deleted):
        kept for the planner and ``weft status``."""
        kind, name = parsed.kind, parsed.name
        try:
            if kind is keyspace.KeyKind.PLAN:
                self.apply_plan(key, kv)
            elif kind is keyspace.KeyKind.ACK:
                if kv is None:
                    self.acks.pop(name, None)
                else:
                    self.acks[name] = records.unseal(records.AckRecord, kv.value, key, self.view.secret).epoch
                    self.out.append(Wake())
            elif kind is keyspace.KeyKind.DRAIN:
                if kv is None:
                    self.drains.discard(name)
                else:
                    records.unseal(records.DrainRecord, kv.value, key, self.view.secret)
                    self.drains.add(name)
                self.out.append(Wake())
                self.notice(
                    EventKind.DRAIN, name, 0, "drain requested" if kv is not None else "drain withdrawn"
                )
            elif kind is keyspace.KeyKind.LOAD:
                if kv is None:
                    self.loads.pop(name, None)
                else:
                    load = records.unseal(records.LoadRecord, kv.value, key, self.view.secret)
                    self.loads[name] = load
                    self.notice(EventKind.LOAD, name, load.generation, f"queue depth {load.queue_depth}")
        except records.RecordError as exc:
            self.out.append(Ignored(key, str(exc)))

    def apply_plan(self, key: str, kv: Put | None) -> None:
        if kv is None:
            self.plan, self.plan_revision, self.plan_invalid = None, 0, False
            self.notice(EventKind.PLAN, "", 0, "plan deleted")
            return
        try:
            plan = records.unseal(records.PlanRecord, kv.value, key, self.view.secret)
        except records.RecordError:
            # keep the last good plan; the leader overwrites this one (CAS on its revision)
            self.plan_revision, self.plan_invalid = kv.mod_revision, True
            self.notice(EventKind.PLAN, "", 0, "invalid plan record: the leader replaces it")
            raise
        if self.plan is None or plan.epoch > self.plan.epoch or self.plan_invalid:
            self.plan, self.plan_revision, self.plan_invalid = plan, kv.mod_revision, False
            self.notice(EventKind.PLAN, plan.leader, plan.epoch, plan.reason or "new plan")
