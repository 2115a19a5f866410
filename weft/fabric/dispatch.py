"""From a request to a running transfer: validate once, pick a backend, post, count.

`Dispatcher` is the agent's initiator side. `prepare` checks a request completely (kinds,
ownership, generations, lengths, read-only regions) and asks the configured backends, in
order, for the first that can move it (`DataPath.usable`), which lays it out once
(`DataPath.plan`). Every `post` of the prepared transfer re-checks only what can change
(closed, fenced, the peer replaced) and hands the plan to the backend.

A request whose peer is the agent itself, with remote descriptors of its own FILE or OBJ
region, goes to the storage backend of that memory kind (`add_storage`): same checks, same
`Transfer`, no peer.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from weft.api.vocab import StorageBackend
from weft.fabric import backends, errors, storage
from weft.fabric.memory import DescList, Registration, RemoteRegion
from weft.fabric.transfer import PreparedTransfer, Transfer
from weft.fabric.types import MemoryKind, Op, TransferState

if TYPE_CHECKING:
    from weft.fabric.agent import Agent
    from weft.fabric.backend import DataPath, StoragePath
    from weft.fabric.peers import Peer

_STORAGE_KINDS = (MemoryKind.FILE, MemoryKind.OBJ)


class Dispatcher:
    """Prepares and posts the transfers of one agent through its backends.

    Args:
        agent: the agent (its public state, settings and `backend_host` are read).
        backends: the loaded backends, in order of preference.
    """

    def __init__(self, agent: Agent, backends: list[DataPath]) -> None:
        self._agent = agent
        self.backends = backends
        self.storage: dict[MemoryKind, StoragePath] = {}
        self._posted: weakref.WeakSet[Transfer] = weakref.WeakSet()
        self._counts = {"transfers": 0, "bytes": 0, "errors": 0}
        self._lock = threading.Lock()

    def check_notify(self, notify: bytes | None) -> None:
        """Raises InvalidDescriptorError unless `notify` is None or bytes within the limit."""
        if notify is None:
            return
        if not isinstance(notify, bytes):
            raise errors.InvalidDescriptorError("notify must be bytes")
        if len(notify) > self._agent.config.max_notification_bytes:
            raise errors.InvalidDescriptorError(
                f"notification of {len(notify)} bytes exceeds max_notification_bytes"
            )

    def _check_open(self) -> None:
        if self._agent.closed:
            raise errors.AgentClosedError(f"agent {self._agent.name!r} is closed")

    def prepare(
        self, op: Op | str, local: DescList, peer: str, remote: DescList, notify: bytes | None
    ) -> PreparedTransfer:
        """`Agent.prepare`: validate and lay out a request once."""
        try:
            operation = Op.parse(op)
        except ValueError as exc:
            raise errors.InvalidDescriptorError(str(exc)) from None
        if not isinstance(local, DescList) or not isinstance(remote, DescList):
            raise errors.InvalidDescriptorError(
                "local and remote must be DescList objects (Registration.descs())"
            )
        self.check_notify(notify)
        self._check_open()
        if peer == self._agent.name:
            return self._prepare_storage(operation, local, remote, notify)
        host = self._agent.backend_host
        p = host.peer(peer)
        region = host.local_region(local)
        owner = remote.owner
        if not isinstance(owner, RemoteRegion):
            raise errors.InvalidDescriptorError("remote descriptors must come from Agent.remote(...)")
        if owner.peer != peer:
            raise errors.InvalidDescriptorError(f"remote descriptors belong to {owner.peer!r}, not {peer!r}")
        if owner.instance != p.instance:
            raise errors.StalePeerError(f"remote descriptors are from an older generation of {peer!r}")
        self._check_pairing(local, remote)
        if operation is Op.WRITE and owner.readonly:
            raise errors.RegistrationError(f"remote region {owner.name or owner.id} is read-only")
        if operation is Op.READ and region.readonly:
            raise errors.RegistrationError("cannot READ into a read-only local region")
        p.check_alive()
        for backend in self.backends:
            if backend.usable(p, region.kind, owner.kind):
                plan = (backend, p, backend.plan(operation, local, p, remote))
                return PreparedTransfer(self.post, operation, local, peer, remote, notify, plan)
        raise errors.BackendUnavailableError(
            f"no configured backend moves {region.kind.value} -> {owner.kind.value} to {peer!r} "
            f"(configured: {[b.kind.value for b in self.backends]})"
        )

    # -- the agent's own storage -----------------------------------------------------------
    def add_storage(self, kind: StorageBackend | str, params: Mapping[str, Any]) -> StorageBackend:
        """Create the storage backend `kind` (`Agent.add_backend`)."""
        self._check_open()
        try:
            parsed = kind if isinstance(kind, StorageBackend) else StorageBackend(str(kind).strip().upper())
        except ValueError:
            known = ", ".join(b.value for b in StorageBackend)
            raise errors.BackendUnavailableError(
                f"unknown storage backend {kind!r} (known: {known})"
            ) from None
        made = backends.load_storage(parsed, self._agent.backend_host, params)
        with self._lock:
            if made.memory in self.storage:
                made.close()
                raise errors.ConfigError(
                    f"agent {self._agent.name!r} already has a {made.memory.value} backend "
                    f"({self.storage[made.memory].kind.value})"
                )
            self.storage[made.memory] = made
        return made.kind

    def storage_for(self, kind: MemoryKind) -> StoragePath:
        found = self.storage.get(kind)
        if found is None:
            name = "posix" if kind is MemoryKind.FILE else "obj"
            raise errors.BackendUnavailableError(
                f"agent {self._agent.name!r} has no {kind.value} backend: "
                f"call add_backend({name!r}, ...) first"
            )
        return found

    def _prepare_storage(
        self, op: Op, local: DescList, remote: DescList, notify: bytes | None
    ) -> PreparedTransfer:
        backend = self.storage_for(self._check_storage_pair(op, local, remote))
        plan = (backend, None, backend.plan(op, local, remote))
        return PreparedTransfer(self.post, op, local, self._agent.name, remote, notify, plan)

    def _check_storage_pair(self, op: Op, local: DescList, remote: DescList) -> MemoryKind:
        """Check one (memory, own storage) pair; returns the storage's memory kind."""
        host = self._agent.backend_host
        if not isinstance(remote.owner, Registration):
            raise errors.InvalidDescriptorError(
                "a transfer with the agent itself needs descriptors of its own FILE or OBJ region"
            )
        region = host.local_region(local)
        target = host.local_region(remote)
        if target.kind not in _STORAGE_KINDS:
            raise errors.InvalidDescriptorError(
                f"a transfer with the agent itself moves to or from FILE or OBJ, not {target.kind.value} "
                f"(region {target.label})"
            )
        if region.kind not in (MemoryKind.DRAM, MemoryKind.VRAM):
            raise errors.InvalidDescriptorError(
                f"local descriptors must be DRAM or VRAM, not {region.kind.value}"
            )
        self._check_pairing(local, remote)
        if op is Op.WRITE and target.readonly:
            raise errors.RegistrationError(f"{target.kind.value} region {target.label} is read-only")
        if op is Op.READ and region.readonly:
            raise errors.RegistrationError("cannot READ into a read-only local region")
        return target.kind

    def prepare_batch(
        self, op: Op | str, pairs: Sequence[tuple[DescList, DescList]], notify: bytes | None
    ) -> PreparedTransfer:
        """`Agent.prepare_batch`: several (memory, storage) pairs as one request."""
        try:
            operation = Op.parse(op)
        except ValueError as exc:
            raise errors.InvalidDescriptorError(str(exc)) from None
        if not pairs:
            raise errors.InvalidDescriptorError("prepare_batch needs at least one (local, storage) pair")
        self.check_notify(notify)
        self._check_open()
        kinds = set()
        for local, remote in pairs:
            if not isinstance(local, DescList) or not isinstance(remote, DescList):
                raise errors.InvalidDescriptorError("pairs must be (DescList, DescList)")
            kinds.add(self._check_storage_pair(operation, local, remote))
        if len(kinds) != 1:
            raise errors.InvalidDescriptorError(
                "a batch moves to one kind of storage (FILE or OBJ), not both"
            )
        backend = self.storage_for(kinds.pop())
        plan = (backend, None, backend.plan_batch(operation, list(pairs)))
        first = pairs[0]
        prepared = PreparedTransfer(self.post, operation, first[0], self._agent.name, first[1], notify, plan)
        prepared.nbytes = sum(local.total for local, _ in pairs)
        return prepared

    def query(
        self, specs: list[storage.FileRegion | storage.ObjectRegion]
    ) -> list[storage.StorageInfo | None]:
        """`Agent.query`: each file's or object's size, None where it does not exist."""
        self._check_open()
        out: list[storage.StorageInfo | None] = []
        for spec in specs:
            if isinstance(spec, storage.FileRegion):
                out.append(self.storage_for(MemoryKind.FILE).query(spec))
            elif isinstance(spec, storage.ObjectRegion):
                out.append(self.storage_for(MemoryKind.OBJ).query(spec))
            else:
                raise errors.InvalidDescriptorError(
                    f"query takes FileRegion or ObjectRegion items, not {type(spec).__name__}"
                )
        return out

    def _check_pairing(self, local: DescList, remote: DescList) -> None:
        if len(local) != len(remote) or not np.array_equal(local.lengths, remote.lengths):
            raise errors.InvalidDescriptorError(
                f"local and remote descriptors must match one to one in length "
                f"({len(local)} local, {len(remote)} remote descriptors)"
            )
        limit = self._agent.config.max_descriptors
        if len(local) > limit:
            raise errors.InvalidDescriptorError(f"{len(local)} descriptors exceed max_descriptors={limit}")

    def post(
        self, prepared: PreparedTransfer, plan: Any, notify: bytes | None, timeout: float | None
    ) -> Transfer:
        """Post a prepared transfer once (`PreparedTransfer.post`)."""
        t = self._admit(prepared, plan, notify, timeout)
        try:
            plan[0].post(plan[2], t, notify)
        except errors.WeftError as exc:
            t.complete(exc)
        return t

    def post_many(self, prepared: Sequence[PreparedTransfer], timeout: float | None) -> list[Transfer]:
        """Post several prepared transfers at once (`Agent.post_many`).

        Storage transfers of one backend go to it as one batch (`StoragePath.post_batch`),
        which spreads them over its lanes; the others are posted one by one, in order.
        """
        out: list[Transfer] = []
        batches: dict[int, tuple[StoragePath, list[tuple[Any, Transfer, bytes | None]]]] = {}
        for p in prepared:
            plan = p.plan_for_post()
            t = self._admit(p, plan, p.notify, timeout)
            out.append(t)
            backend = plan[0]
            if plan[1] is None:  # the agent's own storage
                batches.setdefault(id(backend), (backend, []))[1].append((plan[2], t, p.notify))
                continue
            try:
                backend.post(plan[2], t, p.notify)
            except errors.WeftError as exc:
                t.complete(exc)
        for backend, items in batches.values():
            try:
                backend.post_batch(items)
            except errors.WeftError as exc:
                for _, t, _ in items:
                    t.complete(exc)
        return out

    def _admit(
        self, prepared: PreparedTransfer, plan: Any, notify: bytes | None, timeout: float | None
    ) -> Transfer:
        """Check what may have changed since prepare and make the `Transfer` (not yet posted)."""
        self._check_open()
        agent = self._agent
        if agent.fenced:
            raise errors.FencedError(f"agent {agent.name!r} is fenced: it lost its group lease")
        self.check_notify(notify)
        backend: DataPath | StoragePath = plan[0]
        peer: Peer | None = plan[1]
        if peer is not None:
            with agent.backend_host.lock:
                current = agent.backend_host.peers.get(peer.name)
            if current is not peer:
                raise errors.StalePeerError(f"peer {peer.name!r} was replaced or removed since prepare()")
        limit = agent.config.transfer_timeout if timeout is None else timeout
        if limit <= 0:
            raise errors.ConfigError("timeout must be > 0")
        t = Transfer(prepared.op, prepared.peer, prepared.nbytes, limit, backend.kind)
        self._posted.add(t)
        with self._lock:
            self._counts["transfers"] += 1
            self._counts["bytes"] += t.nbytes
        t.on_done(lambda: self._count_end(t))
        return t

    def _count_end(self, t: Transfer) -> None:
        if t.error is not None:
            with self._lock:
                self._counts["errors"] += 1

    def counts(self) -> dict[str, int]:
        """Transfers posted, their bytes, those that failed."""
        with self._lock:
            return dict(self._counts)

    def in_flight(self) -> int:
        """Transfers posted that have not ended."""
        return sum(1 for t in list(self._posted) if t.state is TransferState.POSTED)

    def close(self) -> None:
        """Close every backend."""
        for b in self.backends:
            b.close()
        with self._lock:
            stores, self.storage = list(self.storage.values()), {}
        for st in stores:
            st.close()


class Storing:
    """The agent's calls for its own storage and for batches (`weft.fabric.Agent` inherits
    them): storage backends, existence queries, one request over many regions, many posts."""

    _dispatch: Dispatcher

    def add_backend(
        self, kind: StorageBackend | str, params: Mapping[str, Any] | None = None
    ) -> StorageBackend:
        """Create a storage backend, ``posix`` (FILE) or ``obj`` (OBJ: S3), by weft's or NIXL's
        name, with parameters as NIXL's clients pass them (`weft.fabric.backends.posix`, `.obj`).
        Raises:
            BackendUnavailableError: GDS, GDS_MT, HF3FS (refused, the reason said), unknown names.
            ConfigError: bad parameters; a backend for that memory kind exists. StorageError:
            the obj backend's bucket does not answer.
        """
        return self._dispatch.add_storage(kind, dict(params or {}))

    def query(
        self, specs: Sequence[storage.FileRegion | storage.ObjectRegion]
    ) -> list[storage.StorageInfo | None]:
        """NIXL's ``query_memory``: per file or object, `StorageInfo(size)` or None if missing.

        Raises:
            BackendUnavailableError: no backend for that kind. StorageError: no answer.
        """
        return self._dispatch.query(list(specs))

    def prepare_batch(
        self, op: Op | str, pairs: Sequence[tuple[DescList, DescList]], notify: bytes | None = None
    ) -> PreparedTransfer:
        """Prepare (memory, own FILE or OBJ) descriptor pairs of several regions as one request:
        one `Transfer` per post, its pieces spread over the storage backend's lanes (LMCache
        moves 64 chunks, one file each, in one NIXL request). Raises what `prepare` raises."""
        return self._dispatch.prepare_batch(op, pairs, notify)

    def post_many(
        self, prepared: Sequence[PreparedTransfer], *, timeout: float | None = None
    ) -> list[Transfer]:
        """Post several prepared transfers at once; storage ones of one backend move in
        parallel (a batch of chunks to files, say). Returns their transfers, in order.

        Raises:
            the errors of `PreparedTransfer.post`, before anything is posted for that item.
        """
        return self._dispatch.post_many(prepared, timeout)
