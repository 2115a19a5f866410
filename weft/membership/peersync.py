"""The watch that feeds the group view, and the fabric peers kept in line with the view.

The watch turns etcd's events into `view` inputs; `PeerSync.feed` runs the reducer and then
carries out its changes in order: a fabric peer added (and connected at once, so its death is
seen within milliseconds), re-added fresh or removed, an event told, a bad record warned
about once, a fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from weft.fabric import errors as fabric_errors
from weft.membership import errors, session, view
from weft.membership._etcd import Event, KeyValue
from weft.membership.events import EventKind

if TYPE_CHECKING:
    from weft.membership.member import Membership

log = logging.getLogger(__name__)


def _put(kv: KeyValue) -> view.Put:
    return view.Put(
        kv.key.decode("utf-8", "replace"), kv.value, kv.lease, kv.create_revision, kv.mod_revision
    )


def watch_input(ev: Event) -> view.Put | view.Delete:
    """The view's input for one watch event."""
    if ev.kind == "put":
        return _put(ev.kv)
    return view.Delete(ev.kv.key.decode("utf-8", "replace"), None if ev.prev is None else _put(ev.prev))


class PeerSync:
    """Keeps `m.view` (and the fabric's peers) in line with etcd.

    Args:
        m: the membership whose view this keeps.
    """

    def __init__(self, m: Membership) -> None:
        self.m = m
        self.revision = 0  # the last revision seen: the watch resumes after it
        self._warned: set[str] = set()

    def feed(self, event: view.Input) -> None:
        """Reduce `event` into the view, then carry out what changed, in order."""
        m = self.m
        m.view, changes = view.reduce(m.view, event, view.Own(m.generation, m._mod_revision, m.lease))
        for change in changes:
            self._carry_out(change)

    def _carry_out(self, change: view.Change) -> None:
        m = self.m
        match change:
            case view.PeerPut(member, old):
                self._peer_put(member, old, change.fresh)
            case view.PeerBack(member):
                m.counters["peer_adds"] += 1
                m._emit(EventKind.ADDED, member.name, member.generation, "answers pings again")
            case view.PeerRemoved(member, reason, signal):
                self._peer_removed(member, reason, signal)
            case view.Notice(kind, name, generation, reason):
                m._emit(kind, name, generation, reason)
            case view.FenceSelf(reason):
                m.session.fence(reason)
            case view.Ignored(key, why):
                self.warn_once(key, why)
            case view.Wake():
                m.bus.changed.set()
            case view.RepairSelf(mod_revision, why):
                if m.phase is session.Phase.JOINED:
                    log.warning("%s: its member key was %s: writing its record back", m.config.name, why)
                    m._background(m.session.repair(mod_revision))
            case view.ClearLeader(mod_revision, why):
                if m.phase is session.Phase.JOINED:
                    m._background(self.clear_leader(mod_revision, why))

    async def clear_leader(self, mod_revision: int, why: str) -> None:
        """Delete a ``leader`` key that names no live leader, guarded by its revision (other
        members may be clearing it too; a newer leader's key is left alone)."""
        m = self.m
        try:
            if await m._etcd.delete_if(m.keyspace.leader.encode(), mod_revision=mod_revision):
                m.counters["leaders_cleared"] += 1
                log.warning("%s: cleared the leader key: %s", m.config.name, why)
        except errors.EtcdError as exc:  # the campaign checks the key again
            log.info("%s: could not clear the leader key (%s): %s", m.config.name, why, exc)

    def _peer_put(self, member: view.Member, old: view.Member | None, fresh: bool) -> None:
        m, name = self.m, member.name
        m.detector.suspects.pop(name, None)
        if m.agent is not None and member.record.fabric:
            try:
                if old is not None and old.generation == member.generation and self._lost_in_fabric(name):
                    with contextlib.suppress(fabric_errors.UnknownPeerError):
                        m.agent.remove_peer(name)  # re-add a fresh peer for a live member
                m.agent.add_peer(member.record.fabric_metadata())
            except (fabric_errors.WeftError, ValueError) as exc:
                self.warn_once(m.view.keyspace.member(name), f"fabric metadata refused: {exc}")
                return
            if fresh:
                self.connect_soon(name)
        if fresh:
            m.counters["peer_adds"] += 1
            m._emit(EventKind.ADDED, name, member.generation, f"state {member.record.state}")
        else:
            m._emit(EventKind.UPDATED, name, member.generation, f"state {member.record.state}")

    def _peer_removed(self, member: view.Member, reason: str, signal: str) -> None:
        m = self.m
        suspected = m.detector.suspects.pop(member.name, None)
        if suspected is not None:
            m.detections.append((signal, time.monotonic() - suspected))
        if m.agent is not None:
            with contextlib.suppress(fabric_errors.UnknownPeerError, fabric_errors.AgentClosedError):
                m.agent.remove_peer(member.name)
        m.counters["peer_removes"] += 1
        m._emit(EventKind.REMOVED, member.name, member.generation, reason)

    def _lost_in_fabric(self, name: str) -> bool:
        assert self.m.agent is not None
        try:
            return not self.m.agent.peer_alive(name)
        except fabric_errors.WeftError:
            return True

    def connect_soon(self, name: str) -> None:
        """Open the data-path connection to `name` in the background (if configured)."""
        m = self.m
        agent = m.agent
        if agent is None or not m.config.connect_peers:
            return

        def connect() -> None:
            try:
                agent.connect(name)
            except fabric_errors.WeftError as exc:
                log.debug("%s: eager connect to %s failed: %s", m.config.name, name, exc)

        m._background(asyncio.to_thread(connect))

    def warn_once(self, key: str, why: str) -> None:
        """Count an ignored record; log the first problem per key as a warning."""
        self.m.counters["ignored_records"] += 1
        if key not in self._warned and len(self._warned) < 10000:
            self._warned.add(key)
            log.warning(
                "%s: ignoring %s: %s (further problems with this key are not logged)",
                self.m.config.name,
                key,
                why,
            )
        else:
            log.debug("%s: ignoring %s: %s", self.m.config.name, key, why)

    async def sync(self) -> None:
        """Read the whole prefix and make the view (and the fabric's peers) match it."""
        m = self.m
        revision, kvs = await m._etcd.get_prefix(m.prefix.encode())
        self.feed(view.Snapshot(tuple(_put(kv) for kv in kvs)))
        self.revision = revision
        m.synced = True
        m.bus.changed.set()

    def apply(self, ev: Event) -> None:
        """One watch event (ignored unless joined: the view is rebuilt on rejoin)."""
        if self.m.phase is not session.Phase.JOINED:
            return
        self.feed(watch_input(ev))

    async def watch_loop(self) -> None:
        """Watch the prefix from the last revision seen; a broken watch re-reads and resumes."""
        m = self.m
        backoff = 0.1
        first = True
        while not m._stopping:
            try:
                if not first:
                    await self.sync()
                first = False
                async for batch in m._etcd.watch_prefix(m.prefix.encode(), self.revision + 1):
                    backoff = 0.1
                    for ev in batch:
                        self.revision = ev.revision
                        self.apply(ev)
            except (errors.EtcdUnavailableError, errors.EtcdCompactedError, errors.EtcdError) as exc:
                m.synced = False
                m.counters["watch_restarts"] += 1
                log.info("%s: watch restarts in %.1f s: %s", m.config.name, backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
