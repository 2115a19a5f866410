"""The agent's side of the backend interface: the state its connections and backends share.

`AgentHost` is the one `BackendHost` implementation. It owns what every data path reads
(the region table, the peer table, the notification inbox) and the agent's reactions to
what backends report (a lost peer, a refused stranger), so a backend needs nothing of the
`Agent` class itself and the `Agent` stays the user's facade.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from weft.api import metadata as md_api
from weft.fabric import _cuda, _sys, errors, handshake, limits, peers
from weft.fabric.notify import Inbox
from weft.fabric.regions import RegionTable, Resolved
from weft.fabric.types import Backend, MemoryKind

if TYPE_CHECKING:
    from weft.fabric.agent import Agent
    from weft.fabric.config import AgentConfig
    from weft.fabric.memory import DescList, Region

log = logging.getLogger(__name__)

#: Distinct refused addresses remembered (each is logged once at WARNING).
MAX_STRANGERS = 10000

LostHook = Callable[[str, int, errors.WeftError], None]


class AgentHost:
    """What backends and peer connections may ask of one agent (`weft.fabric.backend.BackendHost`).

    Args:
        agent: the agent served (its public identity, state and settings are read).
        on_region_drop: called with a region id after it is deregistered.
    """

    def __init__(self, agent: Agent, on_region_drop: Callable[[int], None]) -> None:
        self._agent = agent
        self.lock = threading.RLock()
        self.peers: dict[str, peers.Peer] = {}
        self.regions = RegionTable(agent.name, on_region_drop)
        cfg = agent.config
        self.inbox = Inbox(
            cfg.max_pending_notifications,
            cfg.max_pending_notification_bytes,
            agent.name,
            cfg.max_notification_bytes,
        )
        self.limits = limits.Counters()
        self.staging = limits.Staging(cfg.max_staging_bytes)
        self.machine = _sys.host_identity()
        # a same-host peer proves it may read our memory by reading these bytes (cross_memory_ok)
        self.probe = bytearray(secrets.token_bytes(16))
        self.probe_addr = int(np.frombuffer(self.probe, np.uint8).ctypes.data)
        self._strangers: set[str] = set()
        self._lost_hooks: list[LostHook] = []

    # -- identity ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._agent.name

    @property
    def config(self) -> AgentConfig:
        return self._agent.config

    @property
    def fenced(self) -> bool:
        return self._agent.fenced

    def identity(self) -> handshake.Identity:
        a = self._agent
        return handshake.Identity(a.name, a.instance, a.generation, a.config.secret)

    def metadata(self) -> bytes:
        return self._agent.metadata()

    def record(self, endpoints: dict[Backend, str]) -> md_api.AgentMetadata:
        """The agent's metadata record: identity, host, listen address, backends, regions."""
        a, machine = self._agent, self.machine
        with self.lock:
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
                for r in self.regions.snapshot().values()
                if r.kind in (MemoryKind.DRAM, MemoryKind.VRAM)  # storage is moved by its own agent
            ]
        return md_api.AgentMetadata(
            name=a.name,
            instance=a.instance,
            generation=a.generation,
            host=md_api.HostInfo(
                hostname=machine.hostname[:255],
                boot_id=machine.boot_id[:64],
                pid_ns=machine.pid_ns[:64],
                pid=machine.pid,
            ),
            listen=md_api.ListenInfo(host=a.config.advertise_host or a.config.listen_host, port=a.port),
            backends=list(a.backends),
            auth=a.config.secret is not None,
            probe=md_api.ProbeInfo(addr=self.probe_addr, token=bytes(self.probe).hex()),
            regions=regions,
            endpoints=endpoints,
        )

    # -- memory --------------------------------------------------------------------------
    def local_region(self, descs: DescList) -> Region:
        return self.regions.local(descs)

    def resolve(self, table: Any, write: bool) -> Resolved:
        return self.regions.resolve(table, write, self._agent.fenced)

    def host_to_device(self, src: memoryview, region: Region, offset: int) -> None:
        _cuda.host_to_device(src, region.addr + offset)

    def device_to_host(self, region: Region, offset: int, dst: memoryview) -> None:
        _cuda.device_to_host(region.addr + offset, dst)

    # -- notifications -------------------------------------------------------------------
    def deliver(self, peer: str, message: bytes, *, reserved: bool = False) -> bool:
        if self.inbox.put(peer, message, self.config.inbox_full_timeout, force=reserved):
            return True
        self.limits.hit("inbox_full")
        return False

    def notify_room(self, nbytes: int) -> bool:
        if self.inbox.room(nbytes, self.config.inbox_full_timeout):
            return True
        self.limits.hit("inbox_full")
        return False

    def limit_hit(self, name: str) -> None:
        self.limits.hit(name)

    # -- peers ---------------------------------------------------------------------------
    def peer(self, name: str) -> peers.Peer:
        with self.lock:
            found = self.peers.get(name)
        if found is None:
            raise errors.UnknownPeerError(f"no peer named {name!r} (add_peer its metadata first)")
        return found

    def admit(self, metadata: bytes) -> str:
        """Add a peer from its signed metadata, refresh its regions, or replace an older generation.

        Returns:
            the peer's name.
        Raises:
            MetadataError: not valid metadata, or this agent's own. AuthenticationError: not signed
            with the group secret. StalePeerError: not newer than the known generation.
        """
        try:
            md = md_api.decode_metadata(metadata, self.config.secret)
        except md_api.MetadataAuthError as exc:
            raise errors.AuthenticationError(str(exc)) from None
        except md_api.MetadataDecodeError as exc:
            raise errors.MetadataError(str(exc)) from None
        if md.name == self.name and md.instance == self._agent.instance:
            raise errors.MetadataError("an agent cannot add itself as a peer")
        with self.lock:
            current = self.peers.get(md.name)
            if current is not None and current.instance == md.instance:
                current.update(md)
                return md.name
            if current is not None and md.generation <= current.generation:
                raise errors.StalePeerError(
                    f"peer {md.name!r} generation {md.generation} is not newer than "
                    f"the known {current.generation}"
                )
            self.peers[md.name] = peers.Peer(self._agent, md)
        if current is not None:
            current.close(
                errors.StalePeerError(f"peer {md.name!r} was replaced by generation {md.generation}")
            )
            log.info(
                "agent %s: peer %s replaced: generation %d -> %d",
                self.name,
                md.name,
                current.generation,
                md.generation,
            )
        return md.name

    def take_peers(self) -> list[peers.Peer]:
        """With `lock` held: every peer, forgotten here."""
        taken = list(self.peers.values())
        self.peers.clear()
        return taken

    def peer_failed(self, peer: peers.Peer, exc: errors.WeftError) -> None:
        if self._agent.closed:
            return
        with self.lock:
            current = self.peers.get(peer.name)
        if current is peer and peer.failure is None:
            peer.lost(exc)

    def on_peer_lost(self, hook: LostHook) -> None:
        self._lost_hooks.append(hook)

    def peer_lost(self, peer: peers.Peer, exc: errors.WeftError) -> None:
        """Run the peer-lost hooks (membership's) for an invalidated peer."""
        for hook in self._lost_hooks:
            try:
                hook(peer.name, peer.generation, exc)
            except Exception:
                log.exception("agent %s: peer-lost hook failed", self.name)

    def refused(self, addr: object, exc: Exception) -> None:
        key = str(addr[0]) if isinstance(addr, tuple) else str(addr)
        with self.lock:
            first = key not in self._strangers
            if first and len(self._strangers) < MAX_STRANGERS:
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
