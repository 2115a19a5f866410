"""The etcd keyspace of a group, built and parsed in one place.

One prefix per group, ``/weft/v1/<namespace>/<group>/``, and under it::

    members/<name>   member record, under the member's lease
    leader           the planner leader's record, under its lease
    plan             the plan, durable, written by the leader with a compare-and-swap
    acks/<name>      the plan epoch a member applied, under its lease
    load/<name>      a member's load figures, under its lease
    drain/<name>     the operator asks the planner to plan a member out (scale-down)

Every reader (the membership view, `weft status`, the operator, the chaos suite's observer)
parses keys with `parse_key`, so a key kind is added or renamed here only, and a key that
matches no kind is reported as unknown rather than guessed at.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from weft.api import records
from weft.api.settings import GroupRef, group_prefix


class KeyKind(enum.StrEnum):
    """What a key under a group's prefix holds."""

    MEMBER = "members"
    LEADER = "leader"
    PLAN = "plan"
    ACK = "acks"
    LOAD = "load"
    DRAIN = "drain"


_PER_MEMBER = frozenset({KeyKind.MEMBER, KeyKind.ACK, KeyKind.LOAD, KeyKind.DRAIN})

RECORD_TYPES: dict[KeyKind, type[records.Record]] = {
    KeyKind.MEMBER: records.MemberRecord,
    KeyKind.LEADER: records.LeaderRecord,
    KeyKind.PLAN: records.PlanRecord,
    KeyKind.ACK: records.AckRecord,
    KeyKind.LOAD: records.LoadRecord,
    KeyKind.DRAIN: records.DrainRecord,
}
"""The record type stored under each kind of key."""


@dataclass(frozen=True, slots=True)
class GroupKey:
    """A parsed key: its kind and, for per-member kinds, the member's name ("" otherwise)."""

    kind: KeyKind
    name: str = ""


@dataclass(frozen=True, slots=True)
class Keyspace:
    """The keys of one group.

    Attributes:
        namespace: the group's namespace (a DNS label).
        group: the group's name (a DNS label).
    """

    namespace: str
    group: str

    @classmethod
    def of(cls, ref: GroupRef) -> Keyspace:
        """The keyspace of the group `ref` names."""
        return cls(ref.namespace, ref.group)

    @property
    def prefix(self) -> str:
        """``/weft/v1/<namespace>/<group>/``: every key of the group starts with it."""
        return group_prefix(self.namespace, self.group)

    def key(self, kind: KeyKind, name: str = "") -> str:
        """The full key of `kind` (and member `name` for per-member kinds).

        Raises:
            ValueError: a per-member kind without a name, or a name for a group-wide kind.
        """
        if (kind in _PER_MEMBER) != bool(name):
            need = "need a" if kind in _PER_MEMBER else "take no"
            raise ValueError(f"{kind.value} keys {need} member name")
        return f"{self.prefix}{kind.value}/{name}" if name else f"{self.prefix}{kind.value}"

    def member(self, name: str) -> str:
        return self.key(KeyKind.MEMBER, name)

    def ack(self, name: str) -> str:
        return self.key(KeyKind.ACK, name)

    def load(self, name: str) -> str:
        return self.key(KeyKind.LOAD, name)

    def drain(self, name: str) -> str:
        return self.key(KeyKind.DRAIN, name)

    @property
    def leader(self) -> str:
        return self.key(KeyKind.LEADER)

    @property
    def plan(self) -> str:
        return self.key(KeyKind.PLAN)

    def parse(self, key: str | bytes) -> GroupKey | None:
        """The kind and member name of a key of this group; None for anything else (another
        group's key, an unknown kind, a per-member kind without a name)."""
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        if not text.startswith(self.prefix):
            return None
        return parse_rest(text[len(self.prefix) :])


def parse_rest(rest: str) -> GroupKey | None:
    """Parse the part of a key after the group's prefix (``members/a``, ``plan``...).

    Returns:
        The parsed key, or None when it names no kind of this keyspace.
    """
    head, sep, name = rest.partition("/")
    try:
        kind = KeyKind(head)
    except ValueError:
        return None
    if kind in _PER_MEMBER:
        return GroupKey(kind, name) if sep and name and "/" not in name else None
    return GroupKey(kind) if not sep else None
