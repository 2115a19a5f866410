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
    """The campaign learned who leads (itself, having created the key, or the holder it read).

    Without `key` (a test's shortcut) the name is taken as it is; with it, the leader key as
    etcd holds it decides, checked like a watched one (`leader_problem`).
    """

    leader: str | None
    key: Put | None = None


Input = Put | Delete | Snapshot | Silenced | Answered | Lost | Fenced | PlanWritten | LeaderKnown


@dataclass(frozen=True, slots=True)
class Own:
    """This member's own record as it last wrote it (0s before a join), and its lease (0:
    not checked)."""

    generation: int
    mod_revision: int
    lease: int = 0


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


@dataclass(frozen=True, slots=True)
class RepairSelf:
    """Our own key holds something we did not write: put our record back (CAS on
    `mod_revision`, under our lease)."""

    mod_revision: int
    why: str


@dataclass(frozen=True, slots=True)
class ClearLeader:
    """The ``leader`` key names no live leader: delete it (CAS on `mod_revision`) so that the
    election goes on."""

    mod_revision: int
    why: str


Change = PeerPut | PeerBack | PeerRemoved | Notice | FenceSelf | Ignored | Wake | RepairSelf | ClearLeader


@dataclass(frozen=True, slots=True)
class LeaderKey:
    """The ``leader`` key as etcd holds it: the name it names ("" when it does not verify),
    the lease it is under (0: none) and its revision."""

    name: str
    lease: int
    mod_revision: int


def leader_problem(view: GroupView, key: LeaderKey) -> str | None:
    """Why the ``leader`` key names no live leader, or None when it does.

    A leader record counts only when it verifies, is under a lease, and that lease is the one
    the named member's record is under (the member is in the view, or silent: still in etcd).
    A record re-written without a lease, or naming a member that has gone, would otherwise
    keep a dead leader forever.

    Args:
        view: the view the key is checked against.
        key: the leader key.
    Returns:
        None, or the reason the key must be cleared.
    """
    if not key.name:
        return "the leader record does not verify"
    if not key.lease:
        return f"the leader record naming {key.name!r} is under no lease"
    holder = view.members.get(key.name) or view.silent.get(key.name)
    if holder is None:
        return f"the leader record names {key.name!r}, which is not a live member"
    if holder.lease != key.lease:
        return f"the leader record naming {key.name!r} is not under that member's lease"
    return None


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
        leader: the planner leader's name: the ``leader`` key's holder while `leader_problem`
            finds none, else None.
        leader_key: the ``leader`` key as last read (None: absent).
        plan: the last valid plan; `plan_revision` is the ``plan`` key's revision (0: none),
            `plan_invalid` says the key does not hold the group's current plan (it does not
            verify, its epoch is below `epoch`, or it was deleted): the leader re-writes it.
        epoch: the highest plan epoch this member has seen, in the plan key or in a verified
            ack; kept across fences and re-reads, so a rewound plan is never adopted.
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
    leader_key: LeaderKey | None = None
    plan: records.PlanRecord | None = None
    plan_revision: int = 0
    plan_invalid: bool = False
    epoch: int = 0
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
            step.leader_key = None
        case PlanWritten(plan, revision):
            step.plan, step.plan_revision, step.plan_invalid = plan, revision, False
            step.epoch = max(step.epoch, plan.epoch)
            step.notice(EventKind.PLAN, plan.leader, plan.epoch, f"written: {plan.reason}")
        case LeaderKnown(leader, None):
            step.leader_key = None if leader is None else LeaderKey(leader, -1, 0)
        case LeaderKnown(_, Put() as kv):
            step.leader_key = step.read_leader(kv)
    return step.result(), step.out


class _Step:
    """One input's work on copies of the view's fields."""

    def __init__(self, view: GroupView, own: Own) -> None:
        self.view = view
        self.own = own
        self.members = dict(view.members)
        self.silent = dict(view.silent)
        self.leader_key = view.leader_key
        self.plan = view.plan
        self.plan_revision = view.plan_revision
        self.plan_invalid = view.plan_invalid
        self.epoch = view.epoch
        self.acks = dict(view.acks)
        self.loads = dict(view.loads)
        self.drains = set(view.drains)
        self.out: list[Change] = []

    def result(self) -> GroupView:
        after = dataclasses.replace(
            self.view,
            members=self.members,
            silent=self.silent,
            leader_key=self.leader_key,
            plan=self.plan,
            plan_revision=self.plan_revision,
            plan_invalid=self.plan_invalid,
            epoch=self.epoch,
            acks=self.acks,
            loads=self.loads,
            drains=self.drains,
        )
        leader = self._checked_leader(after)
        if leader != self.view.leader:
            self.notice(EventKind.LEADER, leader or "", 0, "elected" if leader else "no leader")
        return dataclasses.replace(after, leader=leader)

    def _checked_leader(self, after: GroupView) -> str | None:
        """The leader key's holder if it is a live leader; otherwise None, and the key is to be
        cleared when it changed or was good before this input."""
        key = after.leader_key
        if key is None:
            return None
        if key.lease < 0:  # named by a test without a key: taken as it is
            return key.name
        problem = leader_problem(after, key)
        if problem is None:
            return key.name
        before = self.view.leader_key
        if before != key or leader_problem(self.view, before) is None:
            self.out.append(ClearLeader(key.mod_revision, problem))
        return None

    def notice(self, kind: EventKind, name: str, generation: int, reason: str) -> None:
        self.out.append(Notice(kind, name, generation, reason))

    def decode_member(self, kv: Put) -> Member | None:
        try:
            record = records.unseal(MemberRecord, kv.value, kv.key, self.view.secret)
        except records.RecordError as exc:
            self.out.append(Ignored(kv.key, str(exc)))
            return None
        if not kv.lease:
            self.out.append(Ignored(kv.key, "a member record under no lease is no live member"))
            return None
        return Member(record, kv.lease, kv.create_revision, kv.mod_revision)

    def read_leader(self, kv: Put) -> LeaderKey:
        try:
            name = records.unseal(LeaderRecord, kv.value, kv.key, self.view.secret).name
        except records.RecordError as exc:
            self.out.append(Ignored(kv.key, str(exc)))
            name = ""
        return LeaderKey(name, kv.lease, kv.mod_revision)

    def snapshot(self, snap: Snapshot) -> None:
        seen: set[str] = set()
        self.leader_key = None
        self.acks.clear()
        self.loads.clear()
        self.drains.clear()
        plan: Put | None = None
        for kv in snap.kvs:
            parsed = self.view.keyspace.parse(kv.key)
            if parsed is None:
                continue
            if parsed.kind is keyspace.KeyKind.MEMBER:
                m = self.own_key(kv) if parsed.name == self.view.me else self.decode_member(kv)
                if m is not None:
                    seen.add(m.name)
                    self.apply_member(m)
            elif parsed.kind is keyspace.KeyKind.LEADER:
                self.leader_key = self.read_leader(kv)
            elif parsed.kind is keyspace.KeyKind.PLAN:
                plan = kv  # after the acks: they tell the highest epoch applied
            else:
                self.apply_other(parsed, kv.key, kv)
        for name in list(self.members):
            if name not in seen and name != self.view.me:
                self.remove(name, None, "not in etcd after a re-read")
        for name in [n for n in self.silent if n not in seen]:
            del self.silent[name]  # its DELETE came while the watch was down
        if plan is not None:
            self.apply_other(keyspace.GroupKey(keyspace.KeyKind.PLAN), plan.key, plan)
        elif self.plan is not None or self.epoch:
            self.plan_gone()

    def own_key(self, kv: Put) -> Member | None:
        """Our own key, read: what we wrote, or something to repair (`RepairSelf`)."""
        if kv.mod_revision <= self.own.mod_revision or not self.own.mod_revision:
            return self.decode_member(kv)  # what we wrote, or an event older than our write
        try:
            record = records.unseal(MemberRecord, kv.value, kv.key, self.view.secret)
        except records.RecordError as exc:
            self.out.append(
                RepairSelf(kv.mod_revision, f"overwritten with a record that does not verify: {exc}")
            )
            return None
        if record.generation != self.own.generation or (self.own.lease and kv.lease != self.own.lease):
            self.out.append(
                RepairSelf(
                    kv.mod_revision, f"overwritten with generation {record.generation}, lease {kv.lease}"
                )
            )
            return None
        return self.decode_member(kv)

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
                self.member_put(parsed.name, ev)
                return
            self.member_deleted(parsed.name, ev)
        elif parsed.kind is keyspace.KeyKind.LEADER:
            self.leader_key = self.read_leader(ev) if isinstance(ev, Put) else None
        else:
            self.apply_other(parsed, ev.key, ev if isinstance(ev, Put) else None)

    def member_put(self, name: str, kv: Put) -> None:
        """A member key written: a record that does not verify (or is under no lease) makes
        the key as good as absent, for us as for a member that reads the group afresh."""
        m = self.own_key(kv) if name == self.view.me else self.decode_member(kv)
        if m is not None:
            self.apply_member(m)
        elif name != self.view.me:
            self.remove(name, None, "its record was overwritten with one that does not count")
            self.silent.pop(name, None)

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
                self.apply_ack(name, key, kv)
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

    def apply_ack(self, name: str, key: str, kv: Put | None) -> None:
        """An ack: it also raises the highest epoch known; a plan key below it is stale."""
        if kv is None:
            self.acks.pop(name, None)
            return
        try:
            epoch = records.unseal(records.AckRecord, kv.value, key, self.view.secret).epoch
        except records.RecordError:
            self.acks.pop(name, None)  # unreadable is absent, as for a fresh reader
            raise
        self.acks[name] = epoch
        self.out.append(Wake())
        if epoch > self.epoch:
            self.epoch = epoch
            if self.plan is not None and not self.plan_invalid and self.plan.epoch < epoch:
                self.plan_invalid = True
                self.notice(
                    EventKind.PLAN,
                    "",
                    self.plan.epoch,
                    f"the plan key is below epoch {epoch}: the leader replaces it",
                )

    def plan_gone(self) -> None:
        """The plan key is absent: the leader writes it again above the highest epoch known."""
        if self.plan_revision == 0 and self.plan_invalid:
            return
        self.plan_revision, self.plan_invalid = 0, True
        last = max(self.epoch, self.plan.epoch if self.plan is not None else 0)
        self.notice(EventKind.PLAN, "", last, f"plan deleted: the leader writes it again above epoch {last}")

    def apply_plan(self, key: str, kv: Put | None) -> None:
        if kv is None:
            self.plan_gone()
            return
        if kv.mod_revision <= self.plan_revision:
            return  # known already (the leader's own write), or older than what is known
        try:
            plan = records.unseal(records.PlanRecord, kv.value, key, self.view.secret)
        except records.RecordError:
            # keep the last good plan; the leader overwrites this one (CAS on its revision)
            self.plan_revision, self.plan_invalid = kv.mod_revision, True
            self.notice(EventKind.PLAN, "", 0, "invalid plan record: the leader replaces it")
            raise
        current = self.plan
        if plan.epoch > self.epoch or (
            plan.epoch == self.epoch and (current is None or current.epoch < plan.epoch or current == plan)
        ):
            fresh = current != plan
            self.plan, self.plan_revision, self.plan_invalid = plan, kv.mod_revision, False
            self.epoch = plan.epoch
            if fresh:
                self.notice(EventKind.PLAN, plan.leader, plan.epoch, plan.reason or "new plan")
            return
        # a validly signed plan below the highest epoch seen (written back), or a second plan
        # of one epoch: never adopted; the leader overwrites it (CAS on its real revision)
        self.plan_revision, self.plan_invalid = kv.mod_revision, True
        why = f"plan epoch {plan.epoch} is below epoch {self.epoch} already seen"
        if plan.epoch == self.epoch:
            why = f"a second plan for epoch {plan.epoch}"
        self.notice(EventKind.PLAN, "", plan.epoch, f"invalid plan record ({why}): the leader replaces it")
        self.out.append(Ignored(key, why))
