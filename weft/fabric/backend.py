"""The two sides of a data-path backend, as types.

A backend turns a validated request into bytes moved. Two interfaces meet here, in the
manner of NIXL's backend engines:

- `DataPath`: what the agent asks of a backend. The agent asks each configured backend, in
  the order of `AgentConfig.backends`, whether it can serve a request (`usable`), lays the
  request out once (`plan`, reused by every post of a prepared transfer) and posts it
  (`post`). `endpoint` is what the backend publishes in the agent's metadata (a listener
  address) and `close` stops it.
- `BackendHost`: what a backend may ask of the agent. It finds the region under local
  descriptors, checks a peer's request against the registered regions, delivers a
  notification, reports a peer it lost, logs a refused stranger, copies to and from device
  memory, and gives the identity and secret the handshake (`weft.fabric.handshake`) needs.

Storage backends (`posix` for FILE memory, `obj` for OBJ) implement `StoragePath`: the same
plan-once, post-many, `Transfer.complete` shape, for transfers between this agent's own
DRAM (or VRAM, staged) and its own FILE or OBJ regions (the agent is its own "peer"), plus
`query` (does a file or object exist, and how large is it).

A backend ends each posted transfer with `Transfer.complete(error)`, exactly once in effect
(later calls are ignored), from any thread, and sets `Transfer.on_cancel` when it must hear
of a transfer that ended early. It touches nothing else of the agent. A `Factory` builds a
backend for one agent; `weft.fabric.backends.register_backend` makes it available.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from weft.api.vocab import StorageBackend
from weft.fabric.types import Backend, MemoryKind, Op

if TYPE_CHECKING:
    from weft.fabric import errors
    from weft.fabric.config import AgentConfig
    from weft.fabric.handshake import Identity
    from weft.fabric.limits import Staging
    from weft.fabric.memory import DescList, Region
    from weft.fabric.peers import Peer
    from weft.fabric.regions import Resolved
    from weft.fabric.storage import FileRegion, ObjectRegion, StorageInfo
    from weft.fabric.transfer import Transfer


class DataPath(Protocol):
    """What the agent asks of a backend."""

    kind: Backend

    def usable(self, peer: Peer, local: MemoryKind, remote: MemoryKind) -> bool:
        """Can this backend move bytes between these kinds for this peer right now?"""
        ...

    def plan(self, op: Op, local: DescList, peer: Peer, remote: DescList) -> Any:
        """Lay out a request once; the result is passed to every `post`.

        Raises:
            WeftError: the request cannot be served by this backend.
        """
        ...

    def post(self, plan: Any, transfer: Transfer, notify: bytes | None) -> None:
        """Start moving bytes; end `transfer` with `Transfer.complete` (DONE or error).

        Raises:
            WeftError: the request could not even start (the agent completes it with this).
        """
        ...

    def endpoint(self) -> str | None:
        """This backend's own address for peers (published in metadata), or None."""
        ...

    def close(self) -> None:
        """Stop: transfers still in flight end with `AgentClosedError`."""
        ...


class BackendHost(Protocol):
    """What a backend (or the agent's own peer stream) may ask of the agent."""

    @property
    def name(self) -> str:
        """The agent's name."""
        ...

    @property
    def config(self) -> AgentConfig:
        """The agent's settings (limits, timeouts, advertised host)."""
        ...

    @property
    def fenced(self) -> bool:
        """True while the agent must serve nothing."""
        ...

    def identity(self) -> Identity:
        """Name, current instance and generation, and group secret, for the handshake."""
        ...

    def metadata(self) -> bytes:
        """The agent's signed metadata (what a peer asks for with MD_REQ)."""
        ...

    def local_region(self, descs: DescList) -> Region:
        """The local region under descriptors of this agent's registration.

        Raises:
            InvalidDescriptorError, RegistrationError.
        """
        ...

    def resolve(self, table: Any, write: bool) -> Resolved:
        """Check a peer's descriptor table (`wire.DESC_DTYPE`) against the registered regions."""
        ...

    def deliver(self, peer: str, message: bytes, *, reserved: bool = False) -> bool:
        """Hand a notification from `peer` to the agent's inbox.

        Waits at most `AgentConfig.inbox_full_timeout` for room in a full inbox. `reserved`:
        room was made sure of with `notify_room` before the bytes moved; add it regardless.

        Returns:
            False when the inbox stayed full (the notification is dropped and counted).
        """
        ...

    def notify_room(self, nbytes: int) -> bool:
        """Wait (as `deliver` does) until a notification of `nbytes` fits; False if it never did."""
        ...

    @property
    def staging(self) -> Staging:
        """The agent's host memory for device copies, shared by its connections."""
        ...

    def limit_hit(self, name: str) -> None:
        """Count a hit of one of the agent's bounds (a `weft.fabric.limits.LimitsHit` field)."""
        ...

    def peer(self, name: str) -> Peer:
        """A known peer by name. Raises UnknownPeerError."""
        ...

    def peer_failed(self, peer: Peer, exc: errors.WeftError) -> None:
        """A connection to `peer` failed: the peer is invalidated if it is still the current one."""
        ...

    def refused(self, addr: object, exc: Exception) -> None:
        """Log a connection refused before it authenticated (once per address)."""
        ...

    def host_to_device(self, src: memoryview, region: Region, offset: int) -> None:
        """Copy host bytes into a device region at `offset`."""
        ...

    def device_to_host(self, region: Region, offset: int, dst: memoryview) -> None:
        """Copy a device region's bytes at `offset` into host memory."""
        ...


#: Builds a backend for one agent; may raise (ImportError, ...) when its library is missing.
Factory = Callable[[BackendHost], DataPath]


class StoragePath(Protocol):
    """What the agent asks of a storage backend: moves between its own memory and storage."""

    kind: StorageBackend
    #: The memory kind this backend stores (FILE or OBJ).
    memory: MemoryKind

    def plan(self, op: Op, local: DescList, storage: DescList) -> Any:
        """Lay out a request once (WRITE: memory -> storage; READ: storage -> memory).

        Raises:
            WeftError: the request cannot be served by this backend.
        """
        ...

    def plan_batch(self, op: Op, pairs: list[tuple[DescList, DescList]]) -> Any:
        """Lay out several (memory, storage) pairs as one request (one `Transfer` per post).

        Raises:
            WeftError: a pair cannot be served by this backend.
        """
        ...

    def post(self, plan: Any, transfer: Transfer, notify: bytes | None) -> None:
        """Start moving bytes; end `transfer` with `Transfer.complete`. A notification is
        delivered to the agent's own inbox once the bytes are in place."""
        ...

    def post_batch(self, items: list[tuple[Any, Transfer, bytes | None]]) -> None:
        """Post several (plan, transfer, notification) at once, as `post` does each; a
        backend may move them in parallel. Errors end their own transfer."""
        ...

    def query(self, spec: FileRegion | ObjectRegion) -> StorageInfo | None:
        """The file's or object's size, or None when it does not exist.

        Raises:
            StorageError: the storage could not answer.
        """
        ...

    def close(self) -> None:
        """Stop; transfers in flight end with `AgentClosedError`."""
        ...


#: Builds a storage backend for one agent from its parameters (NIXL's backend params).
StorageFactory = Callable[[BackendHost, Mapping[str, Any]], StoragePath]
