"""The agent's side of the backend interface: the state its connections and backends share.

`AgentHost` is the one `BackendHost` implementation. It owns what every data path reads
(the region table, the peer table, the notification inbox) and the agent's reactions to
what backends report (a lost peer, a refused stranger), so a backend needs nothing of the
`Agent` class itself and the `Agent` stays the user's facade.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from weft.fabric import _cuda, _sys, errors, handshake
from weft.fabric.notify import Inbox
from weft.fabric.regions import RegionTable, Resolved

if TYPE_CHECKING:
    from weft.fabric.agent import Agent
    from weft.fabric.config import AgentConfig
    from weft.fabric.memory import DescList, Region
    from weft.fabric.peers import Peer

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
        self.peers: dict[str, Peer] = {}
        self.regions = RegionTable(agent.name, on_region_drop)
        self.inbox = Inbox(agent.config.max_pending_notifications)
        self.machine = _sys.host_identity()
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
    def deliver(self, peer: str, message: bytes) -> None:
        self.inbox.put(peer, message)

    # -- peers ---------------------------------------------------------------------------
    def peer(self, name: str) -> Peer:
        with self.lock:
            found = self.peers.get(name)
        if found is None:
            raise errors.UnknownPeerError(f"no peer named {name!r} (add_peer its metadata first)")
        return found

    def peer_failed(self, peer: Peer, exc: errors.WeftError) -> None:
        if self._agent.closed:
            return
        with self.lock:
            current = self.peers.get(peer.name)
        if current is peer and peer.failure is None:
            peer.lost(exc)

    def on_peer_lost(self, hook: LostHook) -> None:
        self._lost_hooks.append(hook)

    def peer_lost(self, peer: Peer, exc: errors.WeftError) -> None:
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
