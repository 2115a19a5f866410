"""The failure detector: sees a dead or hung peer before its lease ends.

Two signals besides the lease (DESIGN.md, "Control plane"):

* **Data path.** When the fabric loses a peer, its listen address is probed: a refused
  connection means nothing listens there any more and the peer is removed at once; an
  accepting address means a live (or paused) process: the peer is re-added fresh and the
  heartbeat and the lease decide.
* **Heartbeat.** Every connected peer is pinged (``lease_ttl / 6``); one that has not answered
  for a whole lease TTL (SIGSTOP, a hang) is removed but kept as *silent* and pinged on, and
  it comes back the moment it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from weft.api.metadata import decode_metadata
from weft.fabric import errors as fabric_errors
from weft.membership import session, view

if TYPE_CHECKING:
    from weft.membership.member import Membership

log = logging.getLogger(__name__)

TICK = 0.05  # heartbeat and watchdog period, seconds


class Detector:
    """The heartbeat and the data path's signal of one membership.

    Args:
        m: the membership whose peers this watches.

    Attributes:
        suspects: name -> monotonic time a signal first suspected it (for `detections`).
    """

    def __init__(self, m: Membership) -> None:
        self.m = m
        self.suspects: dict[str, float] = {}
        self.last_heard: dict[tuple[str, int], float] = {}  # (name, generation) -> last PONG

    def forget(self) -> None:
        """Drop what was heard (fenced: the view is rebuilt on rejoin)."""
        self.last_heard.clear()

    # -- heartbeat ------------------------------------------------------------------------------
    async def heartbeat(self) -> None:
        """Ping connected peers; remove one silent for a whole lease TTL (SIGSTOP, a hang)."""
        m = self.m
        agent = m.agent
        assert agent is not None
        loop = asyncio.get_running_loop()
        next_ping = last = time.monotonic()
        while not m._stopping:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            gap, last = now - last, now
            if m.phase is not session.Phase.JOINED:
                continue
            limit = m.config.lease_ttl
            if gap > max(4 * TICK, 0.5):  # we were the silent one (paused or starved)
                self.last_heard = dict.fromkeys(self.last_heard, now)
            live = {(n, p.generation) for n, p in m.members.items()}
            live |= {(n, p.generation) for n, p in m.view.silent.items()}
            self.last_heard = {k: t for k, t in self.last_heard.items() if k in live}
            for name, p in list(m.members.items()):
                heard = self.last_heard.get((name, p.generation))
                if name != m.config.name and heard is not None and now - heard > limit:
                    self._silence(p, now - heard)
            if now < next_ping:
                continue
            next_ping = now + max(0.1, limit / 6)
            self._ping_all(loop, now, limit)

    def _ping_all(self, loop: asyncio.AbstractEventLoop, now: float, limit: float) -> None:
        m = self.m
        agent = m.agent
        assert agent is not None
        for name, p in [*m.members.items(), *m.view.silent.items()]:
            if name == m.config.name:
                continue
            key = (name, p.generation)
            try:
                agent.ping(name, self._on_pong(loop, key))
            except (fabric_errors.UnknownPeerError, fabric_errors.PeerLostError):
                if name in m.view.silent and now - self.last_heard.get(key, 0.0) > limit:
                    self.last_heard[key] = now  # retry the connection once per TTL
                    with contextlib.suppress(fabric_errors.WeftError, ValueError):
                        agent.add_peer(p.record.fabric_metadata())
                    m.sync.connect_soon(name)
                continue
            self.last_heard.setdefault(key, now)

    def _on_pong(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int]) -> Callable[[float], None]:
        def on_pong(_rtt: float) -> None:  # a fabric thread
            with contextlib.suppress(RuntimeError):  # the loop closed: we are exiting
                loop.call_soon_threadsafe(self._heard, key)

        return on_pong

    def _heard(self, key: tuple[str, int]) -> None:
        name, generation = key
        self.last_heard[key] = time.monotonic()
        silent = self.m.view.silent.get(name)
        if silent is not None and silent.generation == generation and self.m.phase is session.Phase.JOINED:
            self.m.sync.feed(view.Answered(name, generation))

    def _silence(self, p: view.Member, silent_for: float) -> None:
        self.suspects.setdefault(p.name, time.monotonic() - silent_for)
        self.m.sync.feed(view.Silenced(p, f"no answer to pings for {silent_for:.2f} s"))

    # -- the data path's signal -----------------------------------------------------------------
    def peer_lost_threadsafe(self, name: str, generation: int, exc: fabric_errors.WeftError) -> None:
        """The fabric's peer-lost hook (a fabric thread): hand it to the loop."""
        loop = self.m._loop
        if (
            loop is None
            or self.m._stopping
            or isinstance(exc, fabric_errors.StalePeerError | fabric_errors.AgentClosedError)
        ):
            return
        with contextlib.suppress(RuntimeError):  # loop closed: we are exiting
            loop.call_soon_threadsafe(self._peer_lost, name, generation, exc)

    def _peer_lost(self, name: str, generation: int, exc: fabric_errors.WeftError) -> None:
        p = self.m.members.get(name)
        if p is None or p.generation != generation or self.m.phase is not session.Phase.JOINED:
            return
        self.suspects.setdefault(name, time.monotonic())
        self.m._background(self._probe(p, str(exc)))

    async def _probe(self, p: view.Member, why: str) -> None:
        """Is anything still listening where the lost peer listened?

        A killed process closes its connections a moment before its listening socket, so an
        accepted (or reset) connection is asked again, three times 10 ms apart, before the peer
        counts as alive.
        """
        m = self.m
        try:
            md = p.record.fabric_metadata()
            listen = decode_metadata(md, None).listen
        except ValueError:
            return
        for attempt in range(4):
            if attempt:
                await asyncio.sleep(0.01)
            try:
                _reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(listen.host, listen.port), 0.5
                )
            except ConnectionRefusedError:
                reason = f"data path lost ({why}) and nothing listens there"
                m.sync.feed(view.Lost(p.name, p.generation, reason, "data-path"))
                return
            except (ConnectionResetError, ConnectionAbortedError):
                continue  # the dying listener accepted, then reset: ask again
            except (OSError, TimeoutError) as exc:
                log.debug("%s: probe of %s inconclusive: %r", m.config.name, p.name, exc)
                return  # unreachable or slow: the heartbeat and the lease decide
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        current = m.members.get(p.name)
        if current is not None and current.generation == p.generation and m.agent is not None:
            with contextlib.suppress(fabric_errors.WeftError, ValueError):
                m.agent.remove_peer(p.name)
                m.agent.add_peer(md)
                log.info(
                    "%s: %s still listens; re-added it, heartbeat and lease decide", m.config.name, p.name
                )
                m.sync.connect_soon(p.name)  # pinged again, and its next loss is seen again
