"""A group's state read once from etcd: members, leader, plan and acks (``weft status --json``,
and the operator's status mirror)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from weft.api.agent_settings import GroupClientSettings
    from weft.api.records import AckRecord, LeaderRecord, MemberRecord, PlanRecord
    from weft.membership._etcd import Etcd

R = TypeVar("R", "MemberRecord", "LeaderRecord", "PlanRecord", "AckRecord")


async def read_group_status(settings: GroupClientSettings, secret: bytes | None) -> dict[str, Any]:
    """Read a group's keys once and describe its members (the ``weft status --json`` object).

    The object, keys in this order, members sorted by name::

        {"group": str, "namespace": str, "revision": int, "leader": str | None,
         "plan_epoch": int | None,
         "plan": None | {"epoch": int, "leader": str, "roles": {member: "prefill" | "decode"},
                         "experts": {expert id (str): [member, ...]}, "under_replicated": [int],
                         "verified": bool, "acked": [member, ...] (acked this epoch)},
         "members": [{"name", "generation", "state", "node", "lease_ttl_left", "role",
                      "verified", "incarnation", "capabilities", "http"}],
         "invalid": [{"key", "error"}]}

    ``lease_ttl_left`` is the lease's remaining whole seconds (None without a lease or when it
    is gone); ``verified`` is true only when the record is signed with `secret`. A record that
    fails the check is still listed (unverified); one that does not decode at all goes to
    ``invalid``. Without `secret` the leader is read unchecked too.

    Args:
        settings: etcd and the group.
        secret: the join token, or None to read without checking signatures.
    Raises:
        EtcdUnavailableError: no endpoint answered (each is tried once).
        EtcdError: etcd refused the read (auth, permissions).
    """
    from weft.api import records
    from weft.membership import errors
    from weft.membership._etcd import Etcd

    prefix = settings.group.prefix
    etcd = Etcd(settings.etcd)
    try:
        for attempt in range(len(settings.etcd.endpoints)):
            try:
                revision, kvs = await etcd.get_prefix(prefix.encode())
                break
            except errors.EtcdUnavailableError:
                if attempt + 1 == len(settings.etcd.endpoints):
                    raise
        members: list[tuple[records.MemberRecord, int, bool]] = []
        invalid: list[dict[str, str]] = []
        leader: str | None = None
        plan_epoch: int | None = None
        plan: dict[str, Any] | None = None
        acks: dict[str, int] = {}
        for kv in kvs:
            key = kv.key.decode("utf-8", "replace")
            rest = key[len(prefix) :]
            cls = _record_class(rest)
            if cls is None:
                continue
            try:
                record, verified = _unseal(cls, kv.value, key, secret)
            except records.RecordError as exc:
                invalid.append({"key": key, "error": str(exc)})
                continue
            if isinstance(record, records.MemberRecord):
                members.append((record, kv.lease, verified))
            elif isinstance(record, records.LeaderRecord):
                if verified or secret is None:
                    leader = record.name
            elif isinstance(record, records.PlanRecord):
                plan_epoch = record.epoch
                plan = {
                    "epoch": record.epoch,
                    "leader": record.leader,
                    "roles": dict(sorted(record.roles.items())),
                    "experts": {e: record.experts[e] for e in sorted(record.experts, key=int)},
                    "under_replicated": record.under_replicated,
                    "verified": verified,
                }
            elif isinstance(record, records.AckRecord):
                acks[record.name] = record.epoch
        ttls = await asyncio.gather(*(_ttl_left(etcd, lease) for _, lease, _ in members))
    finally:
        await etcd.close()
    rows = [
        {
            "name": record.name,
            "generation": record.generation,
            "state": record.state,
            "node": record.node,
            "lease_ttl_left": ttl,
            "role": record.role,
            "verified": verified,
            "incarnation": record.incarnation,
            "capabilities": record.capabilities.model_dump(mode="json"),
            "http": record.http,
        }
        for (record, _, verified), ttl in zip(members, ttls, strict=True)
    ]
    rows.sort(key=lambda r: str(r["name"]))
    return {
        "group": settings.group.group,
        "namespace": settings.group.namespace,
        "revision": revision,
        "leader": leader,
        "plan_epoch": plan_epoch,
        "plan": None
        if plan is None
        else plan | {"acked": sorted(n for n, e in acks.items() if e == plan_epoch)},
        "members": rows,
        "invalid": invalid,
    }


def _record_class(rest: str) -> Any:
    """The record type stored under a group key (the part after the group's prefix); None
    for keys this view does not read (drains, load)."""
    from weft.api import records

    if rest.startswith("members/"):
        return records.MemberRecord
    if rest.startswith("acks/"):
        return records.AckRecord
    return {"leader": records.LeaderRecord, "plan": records.PlanRecord}.get(rest)


def _unseal(cls: type[R], value: bytes, key: str, secret: bytes | None) -> tuple[R, bool]:
    """Decode a record: (record, signed with `secret`). Raises RecordError if it does not decode."""
    from weft.api import records

    if secret is not None:
        try:
            return records.unseal(cls, value, key, secret), True
        except records.RecordError:
            pass
    return records.unseal(cls, value, key, None), False


async def _ttl_left(etcd: Etcd, lease: int) -> int | None:
    if not lease:
        return None
    ttl = await etcd.time_to_live(lease)
    return ttl if ttl >= 0 else None
