"""Peers: what this agent knows about each remote agent, and its stream to it.

A `Peer` is one generation of a remote agent: its published regions, its liveness (a lost
peer refuses new work and fails what is in flight) and its authenticated stream, opened on
first use. Backends receive peers in `plan` and read them through these public methods.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from weft.api import metadata as md_api
from weft.fabric import _sys, connection, errors, wire
from weft.fabric.backend import BackendHost
from weft.fabric.memory import RemoteRegion
from weft.fabric.types import MemoryKind

log = logging.getLogger(__name__)


class PeerHost(BackendHost, Protocol):
    """What a peer needs of its agent beyond the backend interface."""

    @property
    def machine(self) -> _sys.HostIdentity:
        """This host and process (same-host checks)."""
        ...

    def peer_lost(self, peer: Peer, exc: errors.WeftError) -> None:
        """Tell the agent's listeners (membership) that `peer` was invalidated."""
        ...


class Owner(Protocol):
    """The agent a peer belongs to (`Agent`): only its side of the backend interface is used."""

    @property
    def backend_host(self) -> PeerHost: ...


class Peer:
    """What this agent knows about one remote agent (one generation of it)."""

    def __init__(self, agent: Owner, md: md_api.AgentMetadata) -> None:
        self.host = agent.backend_host
        self.md = md
        self.name = md.name
        self.instance = md.instance
        self.generation = md.generation
        self.pid = md.host.pid
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._stream: connection.Outbound | None = None
        self._failure: errors.WeftError | None = None
        self._cma: bool | None = None
        self._set_regions(md)

    def update(self, md: md_api.AgentMetadata) -> None:
        """Take the region list of fresh metadata of the same instance."""
        with self._lock:
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
            self.host.name,
            self.name,
            self.generation,
            exc,
        )
        self.host.peer_lost(self, exc)

    def close(self, exc: errors.WeftError) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = exc
            streams = [self._stream] if self._stream is not None else []
        for s in streams:  # abort: what is queued for this peer fails now, nothing drains
            s.fail(exc)

    # -- connections ---------------------------------------------------------------------
    def stream(self) -> connection.Outbound:
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
            s = connection.connect(self.host, self, self.host.config.connect_timeout)
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
        me = self.host.machine
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
            log.info("agent %s: no same-host fast path to %s (%s)", self.host.name, self.name, why)
        self._cma = ok
        return ok

    def disable_cross_memory(self, why: str) -> None:
        self._cma = False
        log.warning("agent %s: same-host fast path to %s disabled: %s", self.host.name, self.name, why)

    # -- requests on the stream ----------------------------------------------------------
    def fetch_metadata(self, timeout: float) -> None:
        """Ask the peer for its current metadata over the stream and take its regions.

        Raises:
            TransferTimeoutError, MetadataError, StalePeerError, PeerLostError.
        """
        ch = self.stream()
        box: list[bytes] = []
        done = threading.Event()

        def on_bytes(body: bytes) -> None:
            box.append(body)
            done.set()

        req = ch.next_id()
        ch.submit(req, connection.Pending(None, on_bytes=on_bytes), [wire.header(wire.MD_REQ, req)])
        if not done.wait(timeout):
            ch.forget(req)
            self.check_alive()
            raise errors.TransferTimeoutError(
                f"peer {self.name!r} did not send its metadata within {timeout} s"
            )
        try:
            md = md_api.decode_metadata(box[0], self.host.config.secret)
        except md_api.MetadataDecodeError as exc:
            raise errors.MetadataError(f"peer {self.name!r} sent invalid metadata: {exc}") from None
        if md.instance != self.instance:
            raise errors.StalePeerError(f"peer {self.name!r} is now another instance")
        self.update(md)

    def ping(self, on_pong: Callable[[float], None]) -> Callable[[], None]:
        """Send PING on the open stream; returns a function that forgets it (see `Agent.ping`).

        Raises:
            UnknownPeerError: not connected. PeerLostError: the peer is lost.
        """
        self.check_alive()
        ch = self._stream
        if ch is None:
            raise errors.UnknownPeerError(f"peer {self.name!r} is not connected")
        sent = time.monotonic()
        req = ch.next_id()
        ch.submit(
            req,
            connection.Pending(None, on_bytes=lambda _body: on_pong(time.monotonic() - sent)),
            [wire.header(wire.PING, req)],
        )
        return lambda: ch.forget(req)
