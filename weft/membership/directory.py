"""A directory of agents' metadata in etcd: NIXL's central metadata server, with liveness.

NIXL (built with etcd) publishes an agent's metadata under a key prefix (``NIXL_ETCD_NAMESPACE``,
by default ``/nixl/agents``) and fetches a peer's by name; its watchers drop a peer whose
metadata disappears. This is the same for `weft.nixl`, on weft's own etcd client, plus what
weft's membership does for its members: every published key is attached to a lease the
publisher keeps alive, so an agent that dies (SIGKILL, a lost node) disappears from the
directory within its TTL instead of staying there for ever; a lease that lapsed (etcd was
unreachable longer than the TTL) is replaced and the keys written again.

Keys: ``<namespace>/<agent>/<label>``, the label ``metadata`` for the whole record (NIXL's
partial metadata goes under its own label). Values are opaque here (weft's signed metadata:
the reader checks the signature, not this module).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from weft.api.settings import EtcdSettings
from weft.membership import _etcd, errors

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$")
#: The label of an agent's whole record.
FULL = "metadata"


class Directory:
    """Agents' metadata under one etcd prefix, published under a kept-alive lease.

    Bound to the event loop that first uses it (as `weft.membership._etcd.Etcd`).

    Args:
        etcd: how to reach etcd.
        namespace: the key prefix (NIXL's ``NIXL_ETCD_NAMESPACE``).
        ttl: seconds a dead publisher's keys outlive it.
    Raises:
        MembershipError: a namespace that is empty or not an absolute key path.
    """

    def __init__(self, etcd: EtcdSettings, namespace: str = "/nixl/agents", ttl: int = 10) -> None:
        if not namespace.startswith("/") or namespace.strip("/") == "":
            raise errors.MembershipError(
                f"directory namespace {namespace!r} must be a key path like /nixl/agents"
            )
        self.namespace = namespace.rstrip("/")
        self.ttl = max(2, int(ttl))
        self._etcd = _etcd.Etcd(etcd)
        self._lease = 0
        self._published: dict[bytes, bytes] = {}
        self._keeper: asyncio.Task[None] | None = None

    def key(self, agent: str, label: str = FULL) -> bytes:
        """Where `agent`'s metadata (or its `label` part) lives."""
        if not _NAME.match(agent):
            raise errors.MembershipError(f"invalid agent name {agent!r}")
        if not _NAME.match(label or FULL):
            raise errors.MembershipError(f"invalid metadata label {label!r}")
        return f"{self.namespace}/{agent}/{label or FULL}".encode()

    async def publish(self, agent: str, value: bytes, label: str = FULL) -> None:
        """Put `value` under `agent` (and `label`), attached to this directory's lease.

        Raises:
            EtcdError: etcd refused or did not answer within its deadline.
        """
        key = self.key(agent, label)
        if not self._lease:
            self._lease, _ = await self._etcd.grant(self.ttl)
        await self._etcd.put(key, value, lease=self._lease)
        self._published[key] = value
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._keep(), name=f"directory {agent}")

    async def fetch(self, agent: str, label: str = FULL) -> bytes | None:
        """`agent`'s published value, or None when it has none (never published, withdrawn,
        or its publisher died more than a TTL ago)."""
        found = await self._etcd.get(self.key(agent, label))
        return None if found is None else found.value

    async def withdraw(self, agent: str) -> int:
        """Remove every key of `agent` (NIXL's ``invalidate_local_metadata``); how many went."""
        prefix = f"{self.namespace}/{agent}/".encode()
        if not _NAME.match(agent):
            raise errors.MembershipError(f"invalid agent name {agent!r}")
        for key in [k for k in self._published if k.startswith(prefix)]:
            del self._published[key]
        return await self._etcd.delete_prefix(prefix)

    async def _keep(self) -> None:
        """Keep the lease alive at a third of its TTL; a lapsed lease is replaced and every
        published key written again. Ends when nothing is published any more."""
        while self._published:
            await asyncio.sleep(self.ttl / 3)
            try:
                left = await self._etcd.keepalive(self._lease)
                if left <= 0:
                    log.warning("directory %s: lease lapsed; publishing again", self.namespace)
                    self._lease, _ = await self._etcd.grant(self.ttl)
                    for key, value in list(self._published.items()):
                        await self._etcd.put(key, value, lease=self._lease)
            except errors.EtcdError as exc:  # etcd away: try again; the TTL is the budget
                log.warning("directory %s: keep-alive failed: %s", self.namespace, exc)

    async def close(self) -> None:
        """Stop keeping the lease and revoke it: what this directory published goes at once."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._lease:
            with contextlib.suppress(errors.EtcdError):
                await self._etcd.revoke(self._lease)
        self._published.clear()
        await self._etcd.close()
