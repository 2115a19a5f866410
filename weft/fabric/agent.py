"""The fabric `Agent`: one per process; registers memory, knows peers, moves bytes.

Threads, not an event loop, carry the data path: blocking socket calls and ctypes calls
release the GIL, so one thread per stream keeps a core busy with the kernel's copy while
Python stays out of the way. Everything a user calls returns quickly; transfers finish on
background threads and are awaited with `Transfer.wait()` or `await transfer`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from weft.api import metadata as md_api
from weft.fabric import _cuda, backends, dispatch, errors, limits, memory, peers, storage, wire
from weft.fabric.config import AgentConfig
from weft.fabric.host import AgentHost, LostHook
from weft.fabric.listener import Listener
from weft.fabric.memory import DescList, Registration, RemoteRegion
from weft.fabric.notify import Receiving
from weft.fabric.transfer import PreparedTransfer, Transfer
from weft.fabric.types import Backend, MemoryKind, Op

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$")

#: One generation of a remote agent (defined in `weft.fabric.peers`).
Peer = peers.Peer


class Agent(Receiving, dispatch.Storing, limits.Guarded):
    """One process's endpoint of the fabric.

    Args:
        name: unique within the group (letters, digits, ``._:-``).
        config: settings; default `AgentConfig()`.
    Raises:
        ConfigError: bad name or settings. OSError: the listen address is unusable.
    """

    def __init__(self, name: str, config: AgentConfig | None = None) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise errors.ConfigError(f"invalid agent name {name!r}: use letters, digits and ._:- (max 253)")
        self.name = name
        self.config = config if config is not None else AgentConfig()
        self.instance = uuid.uuid4().hex
        self.generation = self.config.generation if self.config.generation is not None else time.time_ns()
        self._closed = False
        self._fenced = False
        self._serve_until: float | None = None
        #: What backends and peer connections may ask of this agent (`BackendHost`).
        self.backend_host = AgentHost(self, self._region_dropped)
        self._lock = self.backend_host.lock
        self._peers = self.backend_host.peers
        self._inbox = self.backend_host.inbox
        self._limits = self.backend_host.limits
        self._dispatch = dispatch.Dispatcher(
            self, backends.load_backends(self.config.backends, self.backend_host)
        )
        self._backends = self._dispatch.backends
        self._listener = Listener(self.backend_host)
        self.port = self._listener.port
        self._troubled = (self._listener, self._inbox)
        if self.config.secret is None:
            log.warning(
                "agent %s: NO GROUP SECRET: the data path on %s:%d is OPEN to anyone who can reach it; "
                "set AgentConfig(secret=...) outside a trusted test",
                name,
                self.config.listen_host,
                self.port,
            )

    # -- metadata and peers --------------------------------------------------------------
    @property
    def gpus(self) -> int:
        """CUDA devices this process can register VRAM on (0: host memory only)."""
        return _cuda.gpu_count()

    @property
    def backends(self) -> list[Backend]:
        """The backends that loaded, in order of preference."""
        return [b.kind for b in self._backends]

    def _metadata_record(self) -> md_api.AgentMetadata:
        return self.backend_host.record(
            {b.kind: ep for b in self._backends if (ep := b.endpoint()) is not None}
        )

    def metadata(self) -> bytes:
        """This agent's metadata: versioned bytes (no pickle) for `add_peer` on a peer."""
        return md_api.encode_metadata(self._metadata_record(), self.config.secret)

    def add_peer(self, metadata: bytes) -> str:
        """Add (or update) a peer from its metadata.

        Same instance: the region list is refreshed. Newer generation of a known name: the old
        one is replaced and transfers still aimed at it fail with `StalePeerError`.

        Returns:
            the peer's name.
        Raises:
            MetadataError: not valid metadata. AuthenticationError: not signed with the group
            secret. StalePeerError: older than the generation already known.
        """
        self._check_open()
        return self.backend_host.admit(metadata)

    def remove_peer(self, name: str) -> None:
        """Forget a peer; its transfers in flight fail with `PeerLostError`."""
        with self._lock:
            peer = self._peers.pop(name, None)
        if peer is None:
            raise errors.UnknownPeerError(f"no peer named {name!r}")
        peer.close(errors.PeerLostError(f"peer {name!r} was removed"))

    def peers(self) -> list[str]:
        with self._lock:
            return sorted(self._peers)

    def peer_alive(self, name: str) -> bool:
        return self._peer(name).failure is None

    def connect(self, name: str) -> None:
        """Open and authenticate the connection to a peer now instead of at first use."""
        peer = self._peer(name)
        peer.stream()
        for backend in self._backends:
            if backend.kind is Backend.LOCAL:
                peer.cross_memory_ok()

    def _peer(self, name: str) -> Peer:
        self._check_open()
        return self.backend_host.peer(name)

    def remote(self, peer: str, region: str | int, *, timeout: float | None = None) -> RemoteRegion:
        """A peer's region by name or id; asks the peer for fresh metadata if it is unknown.

        Raises:
            UnknownPeerError, UnknownRegionError, PeerLostError.
        """
        p = self._peer(peer)
        found = p.region(region)
        if found is None:
            self.refresh_peer(peer, timeout=timeout)
            found = self._peer(peer).region(region)
        if found is None:
            raise errors.UnknownRegionError(f"peer {peer!r} has no region {region!r}")
        return found

    def refresh_peer(self, name: str, *, timeout: float | None = None) -> None:
        """Fetch the peer's current metadata over its connection (new regions)."""
        self._peer(name).fetch_metadata(self.config.connect_timeout if timeout is None else timeout)

    def ping(self, name: str, on_pong: Callable[[float], None]) -> Callable[[], None]:
        """Probe a connected peer: send PING, call ``on_pong(rtt_seconds)`` when PONG arrives.

        Never blocks: the peer must already be connected (`connect`), else `UnknownPeerError`.
        `on_pong` runs on a fabric thread. A peer that is stopped or hung simply never answers;
        the caller decides how long silence may last. Returns a function that forgets the ping.

        Raises:
            UnknownPeerError: no such peer, or not connected. PeerLostError: the peer is lost.
        """
        return self._peer(name).ping(on_pong)

    # -- memory --------------------------------------------------------------------------
    def register(
        self,
        obj: Any,
        name: str | None = None,
        *,
        kind: MemoryKind | None = None,
        readonly: bool | None = None,
    ) -> Registration:
        """Register memory peers may read or write.

        Args:
            obj: anything with the buffer protocol (numpy, bytearray, mmap, ...) or
                `__cuda_array_interface__` (cupy, torch.cuda), C-contiguous; or storage:
                a `FileRegion` (FILE) or an `ObjectRegion` (OBJ, needs the obj backend),
                moved with transfers whose peer is this agent itself.
            name: how peers find it (`Agent.remote(peer, name)`); unique in this agent.
            kind: expected memory kind (checked); inferred by default.
            readonly: refuse remote WRITEs (default: read-only buffers are read-only).
        Raises:
            InvalidBufferError, DeviceUnavailableError, RegistrationError (duplicate name).
        """
        self._check_open()
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise errors.RegistrationError(f"invalid region name {name!r}")
        if isinstance(obj, storage.ObjectRegion):
            self._dispatch.storage_for(MemoryKind.OBJ)  # raises when there is no obj backend
        mkind, addr, size, ro, view, device, keep = memory.normalise(obj, kind)
        if readonly is not None:
            if ro and not readonly:
                raise errors.RegistrationError("a read-only buffer cannot be registered writable")
            ro = readonly
        return self.backend_host.regions.add(name, mkind, addr, size, ro, view, device, keep)

    def alloc(
        self, nbytes: int, name: str | None = None, *, kind: MemoryKind = MemoryKind.DRAM
    ) -> Registration:
        """Allocate and register `nbytes` of zeroed memory (`Registration.buffer` is the array).

        Raises:
            DeviceUnavailableError: kind=VRAM without a usable GPU.
        """
        if nbytes <= 0:
            raise errors.InvalidBufferError("nbytes must be > 0")
        if kind is MemoryKind.VRAM:
            return self.register(_cuda.alloc(nbytes), name, kind=kind)
        if kind is not MemoryKind.DRAM:
            raise errors.InvalidBufferError(f"alloc supports DRAM and VRAM, not {kind.value}")
        return self.register(np.zeros(nbytes, dtype=np.uint8), name)

    def _region_dropped(self, rid: int) -> None:
        self._listener.broadcast(wire.header(wire.INVALIDATE, count=rid))

    # -- transfers -----------------------------------------------------------------------
    def prepare(
        self,
        op: Op | str,
        local: DescList,
        peer: str,
        remote: DescList,
        notify: bytes | None = None,
    ) -> PreparedTransfer:
        """Validate and lay out a request once; `post()` it many times.

        Args:
            op: Op.WRITE (local -> remote) or Op.READ (remote -> local).
            local: descriptors of a registration of this agent.
            peer: the peer's name; this agent's own name for its FILE and OBJ regions.
            remote: descriptors of that peer's region (`Agent.remote(peer, name).descs(...)`),
                or of this agent's own FILE/OBJ registration.
            notify: a notification the target receives once the bytes are in place.
        Raises:
            InvalidDescriptorError, UnknownPeerError, StalePeerError, BackendUnavailableError.
        """
        return self._dispatch.prepare(op, local, peer, remote, notify)

    def transfer(
        self,
        op: Op | str,
        local: DescList,
        peer: str,
        remote: DescList,
        notify: bytes | None = None,
        *,
        timeout: float | None = None,
    ) -> Transfer:
        """Prepare and post once. Returns the `Transfer` (already running)."""
        return self.prepare(op, local, peer, remote, notify).post(timeout=timeout)

    def write(
        self,
        local: DescList,
        peer: str,
        remote: DescList,
        notify: bytes | None = None,
        *,
        timeout: float | None = None,
    ) -> Transfer:
        """Copy local descriptors into the peer's; `notify` reaches the peer after the bytes."""
        return self.transfer(Op.WRITE, local, peer, remote, notify, timeout=timeout)

    def read(
        self,
        local: DescList,
        peer: str,
        remote: DescList,
        notify: bytes | None = None,
        *,
        timeout: float | None = None,
    ) -> Transfer:
        """Copy the peer's descriptors into local ones."""
        return self.transfer(Op.READ, local, peer, remote, notify, timeout=timeout)

    # -- notifications -------------------------------------------------------------------
    def send_notification(self, peer: str, message: bytes) -> None:
        """Send a notification alone (no data) to a peer we added or that connected to us."""
        self._check_open()
        self._dispatch.check_notify(message)
        frame = [wire.header(wire.NOTIFY, length=len(message)), message]
        with self._lock:
            known = self._peers.get(peer)
        inbound = self._listener.find(peer) if known is None else None
        if known is not None:
            known.stream().send_now(frame)
        elif inbound is not None:
            inbound.send(frame)
        else:
            raise errors.UnknownPeerError(f"no peer named {peer!r}")

    # -- membership hooks ----------------------------------------------------------------
    @property
    def fenced(self) -> bool:
        """True while the agent serves and starts nothing (see `fence` and `serve_until`)."""
        if self._fenced:
            return True
        until = self._serve_until
        return until is not None and time.monotonic() > until

    def serve_until(self, deadline: float | None) -> None:
        """Serve requests only until `deadline` (``time.monotonic()``); None: no limit.

        Membership moves the deadline forward on every confirmed lease keep-alive. The check
        is made on every request, so an agent that was paused (SIGSTOP, a long GC) refuses
        work the moment it runs again, before anything else in it gets to look at the clock.
        """
        self._serve_until = deadline

    def fence(self, reason: str) -> None:
        """Stop serving and starting transfers at once (requests fail `PeerFencedError`)."""
        if not self._fenced:
            log.warning("agent %s: fenced: %s", self.name, reason)
        self._fenced = True

    def regenerate(self, generation: int) -> None:
        """Become a new incarnation (a join or a rejoin): new instance id and generation, no peers.

        Ordering generations is the caller's job (membership derives them from etcd revisions).

        Every connection is closed; peers that still address the old incarnation are refused
        and their transfers fail with `StalePeerError`. Registered memory stays registered.
        The agent stays fenced until `unfence`.
        """
        with self._lock:
            if generation == self.generation:
                raise errors.ConfigError(f"generation {generation} is the current one")
            self.instance = uuid.uuid4().hex
            self.generation = generation
            taken = self.backend_host.take_peers()
        exc = errors.StalePeerError(f"agent {self.name!r} rejoined as generation {generation}")
        for p in taken:
            p.close(exc)
        self._listener.close_connections()

    def stats(self) -> dict[str, int]:
        """Counters since the agent started, for metrics.

        ``transfers``/``bytes``/``errors``: transfers this agent posted, their bytes, those
        that failed. ``served``/``served_bytes``/``refused``: requests peers made of it (tcp
        and ucx paths; same-host copies are made by the initiator alone and counted there).
        """
        out = self._dispatch.counts()
        out.update(self._listener.served())
        return out

    def in_flight(self) -> int:
        """Transfers this agent posted that have not ended, plus requests it is serving now."""
        return self._listener.busy() + self._dispatch.in_flight()

    def unfence(self) -> None:
        self._fenced = False

    def on_peer_lost(self, hook: LostHook) -> None:
        """Call ``hook(name, generation, error)`` when the data path loses a peer.

        The hook runs on a fabric thread and must not block (membership hands it to its loop).
        """
        self.backend_host.on_peer_lost(hook)

    # -- lifetime ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise errors.AgentClosedError(f"agent {self.name!r} is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close connections (transfers in flight fail with AgentClosedError) and the listener."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            taken = self.backend_host.take_peers()
        exc = errors.AgentClosedError(f"agent {self.name!r} closed")
        for p in taken:
            p.close(exc)
        self._listener.close()
        self._dispatch.close()
        self._inbox.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Agent {self.name} :{self.port} backends={[b.value for b in self.backends]}{state}>"
