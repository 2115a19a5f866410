"""A group's state read once from etcd: members, leader, plan, acks and load, as a typed snapshot.

`weft status` prints it (``--json``: `GroupStatus.to_json`, a format scripts parse, so its
keys and their order are part of the interface) and the operator mirrors it into the
TransferGroup's status, gates scale-down on it and sizes the group from its load records.
All read attributes of one frozen snapshot instead of indexing a dict whose shape only
prose described. The load records are an attribute only, not part of ``--json``: the JSON
stays what scripts already parse, and load changes every few seconds.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from weft.api import records, vocab
from weft.membership import keyspace as ks

R = TypeVar("R", bound=records.Record)

_UNVERIFIED_ACK = "ack not signed with the join token"


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """One member record as `weft status` shows it.

    Attributes:
        name: the member's name.
        generation: the member's generation (grows with every join).
        state: joining, active or draining.
        node: the node it runs on.
        lease_ttl_left: whole seconds left on its lease; None without a lease or once it is gone.
        role: the role it reports, if any.
        verified: the record is signed with the join token the read was given.
        incarnation: the process's restart count.
        capabilities: its capabilities, as JSON values.
        http: its HTTP endpoint, if any.
    """

    name: str
    generation: int
    state: vocab.MemberState
    node: str
    lease_ttl_left: int | None
    role: str | None
    verified: bool
    incarnation: int
    capabilities: Mapping[str, Any]
    http: str | None

    def to_dict(self) -> dict[str, Any]:
        """The member's ``weft status --json`` object (keys in their documented order)."""
        return {
            "name": self.name,
            "generation": self.generation,
            "state": self.state,
            "node": self.node,
            "lease_ttl_left": self.lease_ttl_left,
            "role": self.role,
            "verified": self.verified,
            "incarnation": self.incarnation,
            "capabilities": dict(self.capabilities),
            "http": self.http,
        }


@dataclass(frozen=True, slots=True)
class PlanStatus:
    """The group's plan and who applied it.

    Attributes:
        epoch: the plan's epoch.
        leader: the leader that wrote it.
        roles: member name -> "prefill" or "decode", sorted by name.
        experts: expert id (decimal string) -> members holding it, sorted by expert id.
        under_replicated: experts below their replication.
        verified: the plan is signed with the join token the read was given, and its epoch is
            not below one that members have acked (a plan written back is not the group's).
        acked: members whose ack names this epoch, sorted. With a join token, only acks that
            verify, of live signed members at their current generation, count.
        reason: why the leader wrote it (the role policy's sentence).
        action: the load policy's step in it (``prefill+1``, ``decode+1``), if any.
    """

    epoch: int
    leader: str
    roles: Mapping[str, vocab.Role]
    experts: Mapping[str, Sequence[str]]
    under_replicated: Sequence[int]
    verified: bool
    acked: Sequence[str]
    reason: str = ""
    action: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The plan's ``weft status --json`` object."""
        return {
            "epoch": self.epoch,
            "leader": self.leader,
            "roles": dict(self.roles),
            "experts": {e: list(holders) for e, holders in self.experts.items()},
            "under_replicated": list(self.under_replicated),
            "verified": self.verified,
            "acked": list(self.acked),
        }


@dataclass(frozen=True, slots=True)
class InvalidRecord:
    """A key whose value does not decode as the record its key names.

    Attributes:
        key: the full etcd key.
        error: why it does not decode.
    """

    key: str
    error: str

    def to_dict(self) -> dict[str, str]:
        """The ``{"key", "error"}`` object of ``weft status --json``."""
        return {"key": self.key, "error": self.error}


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """A group's keys read at one etcd revision.

    Attributes:
        group: the group's name.
        namespace: its namespace.
        revision: the etcd revision the read is consistent at.
        leader: the leader's name (only a signed leader record when a token was given).
        plan_epoch: the plan's epoch, None without a plan.
        plan: the plan, None without one.
        members: the member records that decode, sorted by name (signed or not).
        invalid: the records that do not decode, in key order; with a join token also the
            acks that do not verify and a plan below an acked epoch (neither counts).
        loads: the load records that count, sorted by name: signed with the join token, of a
            live signed member, and of that member's current generation (a record left by an
            earlier incarnation says nothing about this one). Not in `to_dict`.
    """

    group: str
    namespace: str
    revision: int
    leader: str | None
    plan_epoch: int | None
    plan: PlanStatus | None
    members: tuple[MemberStatus, ...]
    invalid: tuple[InvalidRecord, ...]
    loads: tuple[records.LoadRecord, ...] = ()

    @property
    def unverified_acks(self) -> int:
        """How many ack records were not counted because they do not verify."""
        return sum(1 for bad in self.invalid if bad.error.startswith(_UNVERIFIED_ACK))

    @property
    def verified_members(self) -> frozenset[str]:
        """Names of the members whose records are signed with the join token."""
        return frozenset(m.name for m in self.members if m.verified)

    def to_dict(self) -> dict[str, Any]:
        """The ``weft status --json`` object: keys in their documented order."""
        return {
            "group": self.group,
            "namespace": self.namespace,
            "revision": self.revision,
            "leader": self.leader,
            "plan_epoch": self.plan_epoch,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "members": [m.to_dict() for m in self.members],
            "invalid": [bad.to_dict() for bad in self.invalid],
        }

    def to_json(self) -> str:
        """What ``weft status --json`` prints (without the final newline)."""
        return json.dumps(self.to_dict(), indent=2)


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A key and value as read from etcd, and the lease it is under (0: none)."""

    key: bytes
    value: bytes
    lease: int


@dataclass(frozen=True, slots=True)
class DecodedGroup:
    """A group's records decoded, before the member leases are looked up.

    Attributes:
        members: (record, lease, verified) per member record that decodes, in key order.
        leader: see `GroupStatus.leader`.
        plan: the plan record and whether it is signed.
        acks: member name -> its ack (with a join token: only acks that verify).
        invalid: the records that do not decode (with a join token: acks that do not verify).
        loads: the load records signed with the join token, in key order (none without one).
        checked: read with a join token (signatures were checked).
    """

    members: tuple[tuple[records.MemberRecord, int, bool], ...]
    leader: str | None
    plan: tuple[records.PlanRecord, bool] | None
    acks: Mapping[str, records.AckRecord]
    invalid: tuple[InvalidRecord, ...]
    loads: tuple[records.LoadRecord, ...] = ()
    checked: bool = False


def decode_group(space: ks.Keyspace, kvs: Iterable[RawRecord], secret: bytes | None) -> DecodedGroup:
    """Decode the member, leader, plan, ack and load records among a group's keys.

    Drain keys and keys that name no kind are skipped. A record that fails the signature
    check is kept as unverified; one that does not decode at all becomes an `InvalidRecord`.
    An ack that fails it is no evidence of anything: it becomes an `InvalidRecord` too (it
    is reported, and never counted).
    Without `secret` the leader is taken unchecked too. Load records count only when signed:
    the others are dropped, and never listed as invalid (``--json`` shows no load).

    Args:
        space: the group's keyspace.
        kvs: the keys read under its prefix.
        secret: the join token, or None to read without checking signatures.
    Returns:
        The decoded records.
    """
    members: list[tuple[records.MemberRecord, int, bool]] = []
    invalid: list[InvalidRecord] = []
    leader: str | None = None
    plan: tuple[records.PlanRecord, bool] | None = None
    acks: dict[str, records.AckRecord] = {}
    loads: list[records.LoadRecord] = []
    for kv in kvs:
        key = kv.key.decode("utf-8", "replace")
        parsed = space.parse(key)
        if parsed is None or parsed.kind is ks.KeyKind.DRAIN:
            continue
        if parsed.kind is ks.KeyKind.LOAD:
            if secret is not None:
                with contextlib.suppress(records.RecordError):
                    loads.append(records.unseal(records.LoadRecord, kv.value, key, secret))
            continue
        try:
            record, verified = _unseal(ks.RECORD_TYPES[parsed.kind], kv.value, key, secret)
        except records.RecordError as exc:
            invalid.append(InvalidRecord(key, str(exc)))
            continue
        if isinstance(record, records.MemberRecord):
            members.append((record, kv.lease, verified))
        elif isinstance(record, records.LeaderRecord):
            if verified or secret is None:
                leader = record.name
        elif isinstance(record, records.PlanRecord):
            plan = (record, verified)
        elif isinstance(record, records.AckRecord):
            if verified or secret is None:
                acks[record.name] = record
            else:
                invalid.append(InvalidRecord(key, f"{_UNVERIFIED_ACK}: not counted"))
    return DecodedGroup(
        tuple(members), leader, plan, acks, tuple(invalid), tuple(loads), checked=secret is not None
    )


def group_status(
    space: ks.Keyspace, revision: int, decoded: DecodedGroup, ttls: Sequence[int | None]
) -> GroupStatus:
    """The snapshot of a decoded group.

    Args:
        space: the group's keyspace.
        revision: the etcd revision of the read.
        decoded: its records (`decode_group`).
        ttls: the seconds left on each member's lease, in the order of ``decoded.members``.
    Returns:
        The group's status.
    """
    rows = [
        MemberStatus(
            name=record.name,
            generation=record.generation,
            state=record.state,
            node=record.node,
            lease_ttl_left=ttl,
            role=record.role,
            verified=verified,
            incarnation=record.incarnation,
            capabilities=record.capabilities.model_dump(mode="json"),
            http=record.http,
        )
        for (record, _, verified), ttl in zip(decoded.members, ttls, strict=True)
    ]
    rows.sort(key=lambda m: m.name)
    plan: PlanStatus | None = None
    invalid = decoded.invalid
    if decoded.plan is not None:
        p, verified = decoded.plan
        acks = _counted_acks(decoded, ttls)
        applied = max((a.epoch for a in acks.values()), default=0)
        if verified and p.epoch < applied:  # written back by someone with etcd access
            verified = False
            why = f"plan epoch {p.epoch} is below epoch {applied} that members applied: not the group's plan"
            invalid = (*invalid, InvalidRecord(space.plan, why))
        plan = PlanStatus(
            epoch=p.epoch,
            leader=p.leader,
            roles=dict(sorted(p.roles.items())),
            experts={e: tuple(p.experts[e]) for e in sorted(p.experts, key=int)},
            under_replicated=tuple(p.under_replicated),
            verified=verified,
            acked=tuple(sorted(n for n, a in acks.items() if a.epoch == p.epoch)),
            reason=p.reason,
            action=p.action,
        )
    return GroupStatus(
        group=space.group,
        namespace=space.namespace,
        revision=revision,
        leader=decoded.leader,
        plan_epoch=None if plan is None else plan.epoch,
        plan=plan,
        members=tuple(rows),
        invalid=invalid,
        loads=_counted_loads(decoded, ttls),
    )


def _live(decoded: DecodedGroup, ttls: Sequence[int | None]) -> dict[str, int]:
    """Live signed members -> their current generation."""
    return {
        record.name: record.generation
        for (record, lease, verified), ttl in zip(decoded.members, ttls, strict=True)
        if verified and (not lease or ttl is not None)  # a lease that ran out: the member is gone
    }


def _counted_acks(decoded: DecodedGroup, ttls: Sequence[int | None]) -> dict[str, records.AckRecord]:
    """The acks that count: all of them when read without a token (nothing is checked, and
    the plan shows as unverified); with one, those of live signed members at their current
    generation (an ack left by an earlier incarnation says nothing about this one)."""
    if not decoded.checked:
        return dict(decoded.acks)
    live = _live(decoded, ttls)
    return {n: a for n, a in decoded.acks.items() if live.get(n) == a.generation}


def _counted_loads(decoded: DecodedGroup, ttls: Sequence[int | None]) -> tuple[records.LoadRecord, ...]:
    """The load records of live signed members, of their current generation, by name."""
    live = _live(decoded, ttls)
    counted = (load for load in decoded.loads if live.get(load.name) == load.generation)
    return tuple(sorted(counted, key=lambda load: load.name))


def _unseal(cls: type[R], value: bytes, key: str, secret: bytes | None) -> tuple[R, bool]:
    """Decode a record: (record, signed with `secret`). Raises RecordError if it does not decode."""
    if secret is not None:
        try:
            return records.unseal(cls, value, key, secret), True
        except records.RecordError:
            pass
    return records.unseal(cls, value, key, None), False
