"""A client of one group's keys for those outside the group: `weft status` and the operator.

They read the group's state, ask the planner to plan a member out (signed ``drain/<name>``
records), and remove the group's keys when it is deleted. Going through this class, they
never build keys by hand nor touch the etcd adapter (`weft.membership._etcd`), so the
keyspace and the record signing stay the membership package's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from weft.api import records
from weft.membership import _etcd, errors, status
from weft.membership import keyspace as ks

if TYPE_CHECKING:
    from weft.api.agent_settings import GroupClientSettings
    from weft.api.settings import EtcdSettings, GroupRef


class GroupClient:
    """One etcd connection to one group, bound to the event loop that first uses it.

    Use it as an async context manager, or call `close` when done.

    Args:
        etcd: how to reach etcd (endpoints, TLS files, credentials, request deadline). TLS
            files are read whenever a connection is (re)opened: keep them while the client lives.
        group: the group.
        secret: the join token: records are checked against it, drain requests signed with
            it; None to read without checking and write nothing signed.
    """

    def __init__(self, etcd: EtcdSettings, group: GroupRef, secret: bytes | None) -> None:
        self.keyspace = ks.Keyspace.of(group)
        self.secret = secret
        self._endpoints = len(etcd.endpoints)
        self._etcd = _etcd.Etcd(etcd)

    @classmethod
    def from_settings(cls, settings: GroupClientSettings) -> GroupClient:
        """A client with the settings' etcd, group and join token.

        Raises:
            SettingsError: the token file cannot be read or is too short.
        """
        return cls(settings.etcd, settings.group, settings.join_token())

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        await self._etcd.close()

    async def __aenter__(self) -> GroupClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def read_status(self) -> status.GroupStatus:
        """The group's keys read once (see `weft.membership.status`).

        Returns:
            The group's status.
        Raises:
            EtcdUnavailableError: no endpoint answered (each is tried once).
            EtcdError: etcd refused the read (auth, permissions).
        """
        prefix = self.keyspace.prefix.encode()
        for attempt in range(self._endpoints):
            try:
                revision, kvs = await self._etcd.get_prefix(prefix)
                break
            except errors.EtcdUnavailableError:
                if attempt + 1 == self._endpoints:
                    raise
        raw = (status.RawRecord(kv.key, kv.value, kv.lease) for kv in kvs)
        decoded = status.decode_group(self.keyspace, raw, self.secret)
        ttls = await asyncio.gather(*(self._ttl_left(lease) for _, lease, _ in decoded.members))
        return status.group_status(self.keyspace, revision, decoded, ttls)

    async def _ttl_left(self, lease: int) -> int | None:
        if not lease:
            return None
        ttl = await self._etcd.time_to_live(lease)
        return ttl if ttl >= 0 else None

    async def put_record(self, kind: ks.KeyKind, record: records.Record, name: str = "") -> None:
        """Write `record`, signed with the join token, under the key of `kind` (and `name`).

        Raises:
            ValueError: the client has no join token, or `name` does not fit `kind`.
            EtcdError: etcd refused the write or did not answer.
        """
        if not self.secret:
            raise ValueError("no join token to sign the record with")
        key = self.keyspace.key(kind, name)
        await self._etcd.put(key.encode(), records.seal(record, key, self.secret))

    async def delete_record(self, kind: ks.KeyKind, name: str = "") -> bool:
        """Delete the key of `kind` (and `name`); whether there was one.

        Raises:
            EtcdError: etcd refused the delete or did not answer.
        """
        return await self._etcd.delete(self.keyspace.key(kind, name).encode())

    async def drain_requests(self) -> frozenset[str]:
        """Names of the members with a ``drain/<name>`` key (signed or not).

        Raises:
            EtcdError: etcd refused the read or did not answer.
        """
        prefix = f"{self.keyspace.prefix}{ks.KeyKind.DRAIN.value}/"
        _, kvs = await self._etcd.get_prefix(prefix.encode())
        parsed = (self.keyspace.parse(kv.key) for kv in kvs)
        return frozenset(p.name for p in parsed if p is not None and p.kind is ks.KeyKind.DRAIN)

    async def request_drain(self, name: str, reason: str) -> None:
        """Ask the planner to plan member `name` out (a signed ``drain/<name>`` record).

        Raises:
            ValueError: the client has no join token.
            EtcdError: etcd refused the write or did not answer.
        """
        record = records.DrainRecord(name=name, reason=reason, at=time.time())
        await self.put_record(ks.KeyKind.DRAIN, record, name)

    async def cancel_drain(self, name: str) -> bool:
        """Withdraw a drain request; whether there was one.

        Raises:
            EtcdError: etcd refused the delete or did not answer.
        """
        return await self.delete_record(ks.KeyKind.DRAIN, name)

    async def delete_group(self) -> int:
        """Remove every key of the group; how many there were.

        Raises:
            EtcdError: etcd refused the delete or did not answer.
        """
        return await self._etcd.delete_prefix(self.keyspace.prefix.encode())

    async def next_change(self, revision: int, timeout: float) -> bool:
        """Wait for the group's first change after `revision`, at most `timeout` seconds.

        Returns:
            Whether a change came (False: the time ran out).
        Raises:
            EtcdUnavailableError: the watch could not be set up or broke.
            EtcdCompactedError: `revision` is no longer in etcd's history.
        """
        changes = self._etcd.watch_prefix(self.keyspace.prefix.encode(), revision + 1)
        try:
            await anext(changes)  # the watch is confirmed from here on
            try:
                await asyncio.wait_for(anext(changes), timeout)
            except TimeoutError:
                return False
            return True
        finally:
            with contextlib.suppress(Exception):
                await changes.aclose()  # type: ignore[attr-defined]


async def read_group_status(settings: GroupClientSettings, secret: bytes | None) -> status.GroupStatus:
    """Read a group's keys once (a `GroupClient` opened for this one read).

    ``lease_ttl_left`` is the lease's remaining whole seconds; ``verified`` is true only when
    the record is signed with `secret`. A record that fails the check is still listed
    (unverified); one that does not decode at all goes to ``invalid``, and so do, with
    `secret`, an ack that fails the check and a plan below an epoch that members acked (they
    are not counted: `PlanStatus.acked` holds only verified acks of live members). Without
    `secret` the leader and the acks are read unchecked too.

    Args:
        settings: etcd and the group.
        secret: the join token, or None to read without checking signatures.
    Returns:
        The group's status.
    Raises:
        EtcdUnavailableError: no endpoint answered (each is tried once).
        EtcdError: etcd refused the read (auth, permissions).
    """
    async with GroupClient(settings.etcd, settings.group, secret) as group:
        return await group.read_status()
