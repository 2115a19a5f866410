"""The fabric `Agent`: one per process; registers memory, knows peers, moves bytes.

Threads, not an event loop, carry the data path: blocking socket calls and ctypes calls
release the GIL, so one thread per stream keeps a core busy with the kernel's copy while
Python stays out of the way. Everything a user calls returns quickly; transfers finish on
background threads and are awaited with `Transfer.wait()` or `await transfer`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import socket
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from weft.api import metadata as md_api
from weft.fabric import _cuda, _sys, errors, memory, wire
from weft.fabric.backends import DataPath, load_backend
from weft.fabric.config import AgentConfig
from weft.fabric.connection import Inbound, Outbound, Pending, connect
from weft.fabric.memory import DescList, Region, Registration, RemoteRegion
from weft.fabric.notify import Inbox, Notification
from weft.fabric.transfer import PreparedTransfer, Transfer
from weft.fabric.types import Backend, MemoryKind, Op, TransferState

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$")


class Peer:
    """What this agent knows about one remote agent (one generation of it)."""

    def __init__(self, agent: Agent, md: md_api.AgentMetadata) -> None:
        self.agent = agent
        self.md = md
        self.name = md.name
        self.instance = md.instance
        self.generation = md.generation
        self.pid = md.host.pid
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._stream: Outbound | None = None
        self._failure: errors.WeftError | None = None
        self._cma: bool | None = None
        self._set_regions(md)

    def _set_regions(self, md: md_api.AgentMetadata) -> None:
        by_id: dict[int, RemoteRegion] = {}
        by_name: dict[str, RemoteRegion] = {}
        for r in md.regions:
            rr = RemoteRegion(
                self.name,
                self.instance,
                r.id,
                r.name,
                MemoryKind(r.kind),
                r.size,
                r.addr,
                r.readonly,
            )
            by_id[r.id] = rr
            if r.name is not None:
                by_name[r.name] = rr
        self.md = md
        self._by_id, self._by_name = by_id, by_name

    # -- regions -------------------------------------------------------------------------
    def region(self, key: str | int) -> RemoteRegion | None:
        return self._by_name.get(key) if isinstance(key, str) else self._by_id.get(key)

    def region_by_id(self, rid: int) -> RemoteRegion:
        r = self._by_id.get(rid)
        if r is None:
            raise errors.UnknownRegionError(f"peer {self.name!r} has no region #{rid} (deregistered?)")
        return r

    def drop_region(self, rid: int) -> None:
        with self._lock:
            by_id = dict(self._by_id)
            gone = by_id.pop(rid, None)
            by_name = {k: v for k, v in self._by_name.items() if v is not gone}
            self._by_id, self._by_name = by_id, by_name

    # -- liveness ------------------------------------------------------------------------
    def check_alive(self) -> None:
        if self._failure is not None:
            raise self._failure

    @property
    def failure(self) -> errors.WeftError | None:
        return self._failure

    def lost(self, exc: errors.WeftError) -> None:
        """Invalidate this peer: fail everything in flight, refuse new work."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = exc
            streams = [self._stream] if self._stream is not None else []
        for s in streams:
            s.fail(exc)
        log.warning(
            "agent %s: peer %s (generation %d) invalidated: %s",
            self.agent.name,
            self.name,
            self.generation,
            exc,
        )
        self.agent._peer_lost(self, exc)

    def close(self, exc: errors.WeftError) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = exc
            streams = [self._stream] if self._stream is not None else []
        for s in streams:  # abort: what is queued for this peer fails now, nothing drains
            s.fail(exc)

    # -- connections ---------------------------------------------------------------------
    def stream(self) -> Outbound:
        """The authenticated connection to this peer, opened on first use."""
        s = self._stream
        if s is not None and s.alive:
            return s
        self.check_alive()
        with self._connect_lock:
            s = self._stream
            if s is not None and s.alive:
                return s
            self.check_alive()
            s = connect(self.agent, self, self.agent.config.connect_timeout)
            with self._lock:
                if self._failure is not None:
                    s.fail(self._failure)
                    raise self._failure
                self._stream = s
            return s

    def cross_memory_ok(self) -> bool:
        """Same host, same PID namespace, and a probe read of the peer's token succeeded."""
        if self._cma is not None:
            return self._cma
        me = self.agent._host
        them = _sys.HostIdentity(
            self.md.host.hostname, self.md.host.boot_id, self.md.host.pid_ns, self.md.host.pid
        )
        ok = False
        why = "different host or PID namespace"
        probe = self.md.probe
        if _sys.same_host(me, them) and probe is not None and "local" in self.md.backends:
            self.stream()  # authenticate first: only a peer that passed the handshake is probed
            token = bytearray(16)
            local = _sys.make_iovecs(
                np.array([np.frombuffer(token, np.uint8).ctypes.data], np.uint64),
                np.array([16], np.uint64),
            )
            remote = _sys.make_iovecs(np.array([probe.addr], np.uint64), np.array([16], np.uint64))
            try:
                _sys.cma_copy(False, self.pid, local, remote)
                ok = token.hex() == probe.token
                why = "probe token mismatch" if not ok else ""
            except _sys.CrossMemoryError as exc:
                why = f"probe failed: {exc}"
        elif probe is None or "local" not in self.md.backends:
            why = "peer does not offer the local backend"
        if not ok:
            log.info("agent %s: no same-host fast path to %s (%s)", self.agent.name, self.name, why)
        self._cma = ok
        return ok

    def disable_cross_memory(self, why: str) -> None:
        self._cma = False
        log.warning("agent %s: same-host fast path to %s disabled: %s", self.agent.name, self.name, why)


class Agent:
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
        self._lock = threading.RLock()
        self._closed = False
        self._serve_until: float | None = None
        self._posted: weakref.WeakSet[Transfer] = weakref.WeakSet()
        self._counts = {"transfers": 0, "bytes": 0, "errors": 0}
        self._served_gone = {"served": 0, "served_bytes": 0, "refused": 0}  # closed connections
        self._count_lock = threading.Lock()
        self._fenced = False
        self._lost_hooks: list[Callable[[str, int, errors.WeftError], None]] = []
        self._regions: dict[int, Region] = {}
        self._region_names: dict[str, int] = {}
        self._next_region = 1
        self._peers: dict[str, Peer] = {}
        self._inbound: set[Inbound] = set()
        self._strangers: set[str] = set()
        self._inbox = Inbox(self.config.max_pending_notifications)
        self._host = _sys.host_identity()
        self._probe = bytearray(secrets.token_bytes(16))
        self._probe_addr = int(np.frombuffer(self._probe, np.uint8).ctypes.data)
        self._backends: list[DataPath] = []
        for kind in self.config.backends:
            try:
                self._backends.append(load_backend(kind)(self))
            except Exception as exc:  # a missing optional library must not stop the agent
                log.warning(
                    "agent %s: backend %r unavailable (%s); continuing without it",
                    name,
                    kind.value,
                    exc,
                )
        if not self._backends:
            raise errors.ConfigError(
                f"none of the backends {[b.value for b in self.config.backends]} is available"
            )
        self._listener = socket.socket(socket.AF_INET6 if ":" in self.config.listen_host else socket.AF_INET)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((self.config.listen_host, self.config.listen_port))
        except OSError:
            self._listener.close()
            raise
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"weft-accept {name}", daemon=True
        )
        self._accept_thread.start()
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
        with self._lock:
            regions = [
                md_api.RegionInfo(
                    id=r.id,
                    name=r.name,
                    kind=r.kind,
                    size=r.size,
                    addr=r.addr,
                    readonly=r.readonly,
                    device=r.device,
                )
                for r in self._regions.values()
            ]
        return md_api.AgentMetadata(
            name=self.name,
            instance=self.instance,
            generation=self.generation,
            host=md_api.HostInfo(
                hostname=self._host.hostname[:255],
                boot_id=self._host.boot_id[:64],
                pid_ns=self._host.pid_ns[:64],
                pid=self._host.pid,
            ),
            listen=md_api.ListenInfo(
                host=self.config.advertise_host or self.config.listen_host, port=self.port
            ),
            backends=list(self.backends),
            auth=self.config.secret is not None,
            probe=md_api.ProbeInfo(addr=self._probe_addr, token=bytes(self._probe).hex()),
            regions=regions,
            endpoints={b.kind: ep for b in self._backends if (ep := b.endpoint()) is not None},
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
        try:
            md = md_api.decode_metadata(metadata, self.config.secret)
        except md_api.MetadataAuthError as exc:
            raise errors.AuthenticationError(str(exc)) from None
        except md_api.MetadataDecodeError as exc:
            raise errors.MetadataError(str(exc)) from None
        if md.name == self.name and md.instance == self.instance:
            raise errors.MetadataError("an agent cannot add itself as a peer")
        old: Peer | None = None
        with self._lock:
            current = self._peers.get(md.name)
            if current is not None and current.instance == md.instance:
                with current._lock:
                    current._set_regions(md)
                return md.name
            if current is not None and md.generation <= current.generation:
                raise errors.StalePeerError(
                    f"peer {md.name!r} generation {md.generation} is not newer than "
                    f"the known {current.generation}"
                )
            old = current
            self._peers[md.name] = Peer(self, md)
        if old is not None:
            old.close(errors.StalePeerError(f"peer {md.name!r} was replaced by generation {md.generation}"))
            log.info(
                "agent %s: peer %s replaced: generation %d -> %d",
                self.name,
                md.name,
                old.generation,
                md.generation,
            )
        return md.name

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
        with self._lock:
            peer = self._peers.get(name)
        if peer is None:
            raise errors.UnknownPeerError(f"no peer named {name!r} (add_peer its metadata first)")
        return peer

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
        p = self._peer(name)
        ch = p.stream()
        box: list[bytes] = []
        done = threading.Event()

        def on_bytes(body: bytes) -> None:
            box.append(body)
            done.set()

        req = ch.next_id()
        ch.submit(req, Pending(None, on_bytes=on_bytes), [wire.header(wire.MD_REQ, req)])
        limit = self.config.connect_timeout if timeout is None else timeout
        if not done.wait(limit):
            ch.forget(req)
            p.check_alive()
            raise errors.TransferTimeoutError(f"peer {name!r} did not send its metadata within {limit} s")
        try:
            md = md_api.decode_metadata(box[0], self.config.secret)
        except md_api.MetadataDecodeError as exc:
            raise errors.MetadataError(f"peer {name!r} sent invalid metadata: {exc}") from None
        if md.instance != p.instance:
            raise errors.StalePeerError(f"peer {name!r} is now another instance")
        with p._lock:
            p._set_regions(md)

    def ping(self, name: str, on_pong: Callable[[float], None]) -> Callable[[], None]:
        """Probe a connected peer: send PING, call ``on_pong(rtt_seconds)`` when PONG arrives.

        Never blocks: the peer must already be connected (`connect`), else `UnknownPeerError`.
        `on_pong` runs on a fabric thread. A peer that is stopped or hung simply never answers;
        the caller decides how long silence may last. Returns a function that forgets the ping.

        Raises:
            UnknownPeerError: no such peer, or not connected. PeerLostError: the peer is lost.
        """
        p = self._peer(name)
        p.check_alive()
        ch = p._stream
        if ch is None:
            raise errors.UnknownPeerError(f"peer {name!r} is not connected")
        sent = time.monotonic()
        req = ch.next_id()
        ch.submit(
            req,
            Pending(None, on_bytes=lambda _body: on_pong(time.monotonic() - sent)),
            [wire.header(wire.PING, req)],
        )
        return lambda: ch.forget(req)

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
                `__cuda_array_interface__` (cupy, torch.cuda); C-contiguous.
            name: how peers find it (`Agent.remote(peer, name)`); unique in this agent.
            kind: expected memory kind (checked); inferred by default.
            readonly: refuse remote WRITEs (default: read-only buffers are read-only).
        Raises:
            InvalidBufferError, DeviceUnavailableError, RegistrationError (duplicate name).
        """
        self._check_open()
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise errors.RegistrationError(f"invalid region name {name!r}")
        mkind, addr, size, ro, view, device, keep = memory.normalise(obj, kind)
        if readonly is not None:
            if ro and not readonly:
                raise errors.RegistrationError("a read-only buffer cannot be registered writable")
            ro = readonly
        with self._lock:
            if name is not None and name in self._region_names:
                if view is not None:
                    view.release()
                raise errors.RegistrationError(f"a region named {name!r} is already registered")
            rid = self._next_region
            self._next_region += 1
            region = Region(rid, name, mkind, addr, size, ro, view, device, keep)
            regions = dict(self._regions)
            regions[rid] = region
            self._regions = regions
            if name is not None:
                self._region_names[name] = rid
        return Registration(self, region)

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

    def _deregister(self, region: Region) -> None:
        with self._lock:
            regions = dict(self._regions)
            regions.pop(region.id, None)
            self._regions = regions
            if region.name is not None and self._region_names.get(region.name) == region.id:
                del self._region_names[region.name]
            inbound = list(self._inbound)
        frame = wire.header(wire.INVALIDATE, count=region.id)
        for conn in inbound:
            with contextlib.suppress(OSError):
                conn.send([frame])
        try:
            region.release()
        except BufferError:  # a transfer still holds a slice; the memory lives until it ends
            region.keepalive = None

    def _regions_snapshot(self) -> dict[int, Region]:
        return self._regions

    def _local_region(self, descs: DescList) -> Region:
        owner = descs.owner
        if not isinstance(owner, Registration) or owner._agent is not self:
            raise errors.InvalidDescriptorError(
                "local descriptors must come from a registration of this agent"
            )
        return owner.region

    def _host_to_device(self, src: memoryview, region: Region, offset: int) -> None:
        _cuda.host_to_device(src, region.addr + offset)

    def _device_to_host(self, region: Region, offset: int, dst: memoryview) -> None:
        _cuda.device_to_host(region.addr + offset, dst)

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
            peer: the peer's name.
            remote: descriptors of that peer's region (`Agent.remote(peer, name).descs(...)`).
            notify: a notification the target receives once the bytes are in place.
        Raises:
            InvalidDescriptorError, UnknownPeerError, StalePeerError, BackendUnavailableError.
        """
        try:
            operation = Op.parse(op)
        except ValueError as exc:
            raise errors.InvalidDescriptorError(str(exc)) from None
        if not isinstance(local, DescList) or not isinstance(remote, DescList):
            raise errors.InvalidDescriptorError(
                "local and remote must be DescList objects (Registration.descs())"
            )
        self._check_notify(notify)
        p = self._peer(peer)
        region = self._local_region(local)
        owner = remote.owner
        if not isinstance(owner, RemoteRegion):
            raise errors.InvalidDescriptorError("remote descriptors must come from Agent.remote(...)")
        if owner.peer != peer:
            raise errors.InvalidDescriptorError(f"remote descriptors belong to {owner.peer!r}, not {peer!r}")
        if owner.instance != p.instance:
            raise errors.StalePeerError(f"remote descriptors are from an older generation of {peer!r}")
        if len(local) != len(remote) or not np.array_equal(local.lengths, remote.lengths):
            raise errors.InvalidDescriptorError(
                f"local and remote descriptors must match one to one in length "
                f"({len(local)} local, {len(remote)} remote descriptors)"
            )
        if len(local) > self.config.max_descriptors:
            raise errors.InvalidDescriptorError(
                f"{len(local)} descriptors exceed max_descriptors={self.config.max_descriptors}"
            )
        if operation is Op.WRITE and owner.readonly:
            raise errors.RegistrationError(f"remote region {owner.name or owner.id} is read-only")
        if operation is Op.READ and region.readonly:
            raise errors.RegistrationError("cannot READ into a read-only local region")
        p.check_alive()
        for backend in self._backends:
            if backend.usable(p, region.kind, owner.kind):
                plan = (backend, backend.plan(operation, local, p, remote))
                return PreparedTransfer(self, operation, local, peer, remote, notify, plan)
        raise errors.BackendUnavailableError(
            f"no configured backend moves {region.kind.value} -> {owner.kind.value} to {peer!r} "
            f"(configured: {[b.value for b in self.backends]})"
        )

    def _post(self, prepared: PreparedTransfer, notify: bytes | None, timeout: float | None) -> Transfer:
        self._check_open()
        if self.fenced:
            raise errors.FencedError(f"agent {self.name!r} is fenced: it lost its group lease")
        self._check_notify(notify)
        backend, plan = prepared._plan
        peer: Peer = plan.peer
        current = self._peers.get(peer.name)
        if current is not peer:
            raise errors.StalePeerError(f"peer {peer.name!r} was replaced or removed since prepare()")
        limit = self.config.transfer_timeout if timeout is None else timeout
        if limit <= 0:
            raise errors.ConfigError("timeout must be > 0")
        t = Transfer(prepared.op, peer.name, prepared.local.total, limit, backend.kind)
        self._posted.add(t)
        with self._count_lock:
            self._counts["transfers"] += 1
            self._counts["bytes"] += t.nbytes
        t._callbacks.append(lambda: self._count_end(t))
        try:
            backend.post(plan, t, notify)
        except errors.WeftError as exc:
            t._finish(exc)
        return t

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
    def _check_notify(self, notify: bytes | None) -> None:
        if notify is None:
            return
        if not isinstance(notify, bytes):
            raise errors.InvalidDescriptorError("notify must be bytes")
        if len(notify) > self.config.max_notification_bytes:
            raise errors.InvalidDescriptorError(
                f"notification of {len(notify)} bytes exceeds max_notification_bytes"
            )

    def send_notification(self, peer: str, message: bytes) -> None:
        """Send a notification alone (no data) to a peer we added or that connected to us."""
        self._check_open()
        self._check_notify(message)
        frame = [wire.header(wire.NOTIFY, length=len(message)), message]
        with self._lock:
            known = self._peers.get(peer)
            inbound = next((c for c in self._inbound if c.peer_name == peer), None)
        if known is not None:
            known.stream().send_now(frame)
        elif inbound is not None:
            inbound.send(frame)
        else:
            raise errors.UnknownPeerError(f"no peer named {peer!r}")

    def _deliver(self, peer: str, message: bytes) -> None:
        self._inbox.put(peer, message)

    def get_notifications(self) -> dict[str, list[bytes]]:
        """All notifications received so far, by peer, removed from the inbox (polling)."""
        return self._inbox.drain()

    def wait_notification(
        self, peer: str | None = None, message: bytes | None = None, timeout: float = 30.0
    ) -> bytes:
        """Wait for (and take) a notification, optionally from `peer` and equal to `message`.

        Raises:
            NotificationTimeoutError, AgentClosedError.
        """
        return self._inbox.wait(peer, message, timeout).message

    def take_notification(self, timeout: float = 30.0) -> Notification:
        """Wait for (and take) the oldest notification from any peer: (peer, message).

        Raises:
            NotificationTimeoutError, AgentClosedError.
        """
        return self._inbox.wait(None, None, timeout)

    async def next_notification(
        self, peer: str | None = None, message: bytes | None = None, timeout: float | None = None
    ) -> Notification:
        """`wait_notification` for asyncio; returns (peer, message)."""
        return await self._inbox.wait_async(peer, message, timeout)

    def notifications(
        self, peer: str | None = None, *, idle_timeout: float | None = None
    ) -> AsyncIterator[Notification]:
        """Iterate notifications as they arrive (`async for n in agent.notifications()`); ends
        when the agent closes, or raises NotificationTimeoutError after `idle_timeout` s of silence."""
        return self._inbox.iterate(peer, idle_timeout)

    # -- server side ---------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except OSError:
                return  # listener closed
            if self._closed:
                sock.close()
                return
            with self._lock:
                crowded = len(self._inbound) >= 4096
            if crowded:
                sock.close()
                continue
            wire.tune(sock, self.config.socket_buffer_bytes)
            conn = Inbound(self, sock, addr)
            with self._lock:
                self._inbound.add(conn)
            conn.start()

    def _inbound_ready(self, conn: Inbound) -> None:
        log.debug("agent %s: %s connected from %s", self.name, conn.peer_name, conn.addr)

    def _inbound_gone(self, conn: Inbound) -> None:
        with self._lock:
            self._inbound.discard(conn)
        with self._count_lock:
            self._served_gone["served"] += conn.served
            self._served_gone["served_bytes"] += conn.served_bytes
            self._served_gone["refused"] += conn.refused

    def _log_stranger(self, addr: Any, exc: Exception) -> None:
        key = str(addr[0]) if isinstance(addr, tuple) else str(addr)
        with self._lock:
            first = key not in self._strangers
            if first and len(self._strangers) < 10000:
                self._strangers.add(key)
        if first:
            log.warning(
                "agent %s: refused connection from %s: %s (further refusals from it are not logged)",
                self.name,
                key,
                exc,
            )
        else:
            log.debug("agent %s: refused connection from %s: %s", self.name, key, exc)

    def _connection_failed(self, peer: Peer, exc: errors.WeftError) -> None:
        if self._closed:
            return
        with self._lock:
            current = self._peers.get(peer.name)
        if current is peer and peer.failure is None:
            peer.lost(exc)

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
            peers, inbound = self._take_connections()
        exc = errors.StalePeerError(f"agent {self.name!r} rejoined as generation {generation}")
        for p in peers:
            p.close(exc)
        for conn in inbound:
            conn.close()

    def _count_end(self, t: Transfer) -> None:
        if t.error is not None:
            with self._count_lock:
                self._counts["errors"] += 1

    def stats(self) -> dict[str, int]:
        """Counters since the agent started, for metrics.

        ``transfers``/``bytes``/``errors``: transfers this agent posted, their bytes, those
        that failed. ``served``/``served_bytes``/``refused``: requests peers made of it (tcp
        and ucx paths; same-host copies are made by the initiator alone and counted there).
        """
        with self._count_lock:
            out = dict(self._counts)
            served = dict(self._served_gone)
        with self._lock:
            inbound = list(self._inbound)
        for conn in inbound:
            served["served"] += conn.served
            served["served_bytes"] += conn.served_bytes
            served["refused"] += conn.refused
        out.update(served)
        return out

    def _take_connections(self) -> tuple[list[Peer], list[Inbound]]:
        """With `_lock` held: every peer (forgotten here) and every inbound connection."""
        peers = list(self._peers.values())
        self._peers.clear()
        return peers, list(self._inbound)

    def in_flight(self) -> int:
        """Transfers this agent posted that have not ended, plus requests it is serving now."""
        with self._lock:
            serving = sum(1 for conn in self._inbound if conn.busy)
        return serving + sum(1 for t in list(self._posted) if t.state is TransferState.POSTED)

    def unfence(self) -> None:
        self._fenced = False

    def on_peer_lost(self, hook: Callable[[str, int, errors.WeftError], None]) -> None:
        """Call ``hook(name, generation, error)`` when the data path loses a peer.

        The hook runs on a fabric thread and must not block (membership hands it to its loop).
        """
        self._lost_hooks.append(hook)

    def _peer_lost(self, peer: Peer, exc: errors.WeftError) -> None:
        for hook in self._lost_hooks:
            try:
                hook(peer.name, peer.generation, exc)
            except Exception:
                log.exception("agent %s: peer-lost hook failed", self.name)

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
            peers, inbound = self._take_connections()
        exc = errors.AgentClosedError(f"agent {self.name!r} closed")
        for p in peers:
            p.close(exc)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in inbound:
            conn.close()
        for b in self._backends:
            b.close()
        self._inbox.close()
        self._accept_thread.join(timeout=2.0)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Agent {self.name} :{self.port} backends={[b.value for b in self.backends]}{state}>"
