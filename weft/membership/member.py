"""Group membership on etcd: a member record under a lease, a watched view, fencing, a leader.

The life of a member (DESIGN.md, "Control plane"):

* **Join.** Grant a lease (TTL, default 3 s), derive a generation from etcd's revision (so a
  later incarnation of a name always has a higher one, whatever the clocks say), and create
  ``members/<name>`` under the lease only if absent. A name still held by a live member is
  waited for, within the join deadline.
* **View.** Read the prefix, then watch it from the next revision. A PUT of a new or newer
  member adds its fabric metadata to the fabric `Agent`; a DELETE (leave or lease expiry)
  removes it. Records that are not signed with the group's join token are ignored with one
  warning. A broken or compacted watch re-reads the prefix and reconciles.
* **Second signal.** When the data path loses a peer, the peer's listen address is probed: a
  refused connection means nothing listens there any more, and the peer is removed at once
  instead of waiting for its lease to run out. An accepting address means a live (or paused)
  process: the peer is re-added fresh and the lease decides.
* **Fencing.** The fabric serves only until ``keep-alive send time + granted TTL``, the
  earliest moment etcd can expire the lease, checked on every request; a paused process
  therefore refuses work the instant it runs again. A keep-alive answered "lease gone" (or a
  pause longer than the TTL) fences the agent, and it rejoins as a new generation. While etcd
  itself is unreachable, and no pause was seen, serving goes on (peers it knows keep working,
  readiness is false) and the client retries with backoff.
* **Leader.** Candidates race to create ``leader`` under their lease; the holder leads until
  its lease ends, and the others retry when they see the key deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from weft.api import records
from weft.api.metadata import decode_metadata
from weft.api.records import Capabilities, LeaderRecord, MemberRecord
from weft.api.settings import EtcdSettings, GroupRef
from weft.api.vocab import MemberState, MemoryKind
from weft.fabric import errors as fabric_errors
from weft.fabric.agent import Agent
from weft.membership import errors
from weft.membership._etcd import Etcd, Event, KeyValue

log = logging.getLogger(__name__)

_TICK = 0.05  # watchdog period, seconds
_NO_CAPABILITIES = Capabilities()


async def stop_tasks(tasks: list[asyncio.Task[None]], owner: str) -> None:
    """Cancel `tasks` and wait until every one has ended; log the ones that failed.

    Python 3.11's wait_for can swallow a cancellation that races with its result, so the
    cancel is repeated until each task is really done (bounded: 50 rounds of 0.1 s).
    """
    for _ in range(50):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            break
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=0.1)
    else:
        log.error("%s tasks did not stop: %s", owner, pending)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.error("%s task failed: %r", owner, t.exception())


class Phase(enum.Enum):
    """Where this member is in its life (not the published `state`)."""

    STARTING = "starting"
    JOINED = "joined"
    FENCED = "fenced"
    LEAVING = "leaving"
    LEFT = "left"


@dataclass(frozen=True)
class MemberConfig:
    """Settings of one member.

    Args:
        name: the member's name in the group (and its fabric agent's name).
        group: namespace and group: the etcd prefix.
        secret: the group's join token (>= 16 bytes); records are signed with it.
        lease_ttl: seconds; etcd grants whole seconds (rounded up) and no less than its
            minimum (about 2 s with etcd's default election timeout).
        node: the node (host) name shown to others.
        instance: pod uid when run by the operator; random otherwise.
        capabilities: what the planner may use this member for.
        http: ``host:port`` of the member's health and metrics endpoint, if any.
        campaign: stand for leader.
        connect_peers: open the data-path connection to every new peer at once, so its
            death is seen within milliseconds (the second signal); off for members without
            a fabric agent.
        heartbeat: ping every connected peer (``lease_ttl / 6``) and remove one that has not
            answered for ``lease_ttl``: a stopped or hung process is seen as precisely as its
            lease would be, without etcd's 500 ms expiry granularity.
        join_timeout: how long a join may wait for etcd and for a stale holder of the name.
        drain_timeout: bound on waiting for in-flight transfers when leaving.
    """

    name: str
    group: GroupRef
    secret: bytes
    lease_ttl: float = 3.0
    node: str = field(default_factory=socket.gethostname)
    instance: str = field(default_factory=lambda: secrets.token_hex(16))
    capabilities: Capabilities = _NO_CAPABILITIES
    http: str | None = None
    campaign: bool = True
    connect_peers: bool = True
    heartbeat: bool = True
    join_timeout: float = 30.0
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < 16:
            raise fabric_errors.ConfigError("the group join token (secret) must be at least 16 bytes")
        if not 0 < self.lease_ttl <= 3600:
            raise fabric_errors.ConfigError(f"lease_ttl {self.lease_ttl} is not in (0, 3600] seconds")


@dataclass(frozen=True)
class Member:
    """One member as this agent sees it."""

    record: MemberRecord
    lease: int
    create_revision: int
    mod_revision: int

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def generation(self) -> int:
        return self.record.generation


@dataclass(frozen=True)
class MembershipEvent:
    """Something that changed in this agent's view (also what tests and benchmarks time).

    kind: added, updated, removed, leader, fenced, rejoined, etcd-lost, etcd-back, load, plan, drain
    (for a plan, `name` is the leader that wrote it and `generation` the plan's epoch).
    """

    kind: str
    name: str
    generation: int
    reason: str
    at: float  # time.time()


class Membership:
    """This process's membership in one group, optionally driving a fabric `Agent`.

    Use inside one asyncio loop: ``await m.start()`` ... ``await m.leave()``.

    Args:
        etcd: how to reach etcd.
        config: the member's settings.
        agent: the fabric agent whose peers follow the group (None: a lightweight member,
            as ``weft status`` and the fan-out benchmark use).
    """

    def __init__(self, etcd: EtcdSettings, config: MemberConfig, agent: Agent | None = None) -> None:
        if agent is not None and agent.name != config.name:
            raise fabric_errors.ConfigError(f"agent {agent.name!r} and member {config.name!r} differ")
        self.config = config
        self.agent = agent
        self._etcd = Etcd(etcd)
        self.prefix = config.group.prefix
        self.key = f"{self.prefix}members/{config.name}"
        self.members: dict[str, Member] = {}
        self.leader: str | None = None
        self.plan: records.PlanRecord | None = None
        self.plan_revision = 0  # mod revision of the `plan` key (0: none yet): the CAS guard
        self.plan_invalid = False  # the key holds something that is not a plan of this group
        self.acks: dict[str, int] = {}  # member -> plan epoch it applied
        self.loads: dict[str, records.LoadRecord] = {}
        self.drains: set[str] = set()  # members the operator asked to plan out (scale-down)
        self.phase = Phase.STARTING
        self.state: MemberState = MemberState.JOINING
        self.generation = 0
        self.incarnation = -1
        self.lease = 0
        self.lease_ttl = 0
        self.etcd_reachable = False
        self.synced = False
        self.events: deque[MembershipEvent] = deque(maxlen=1000)
        self.counters: dict[str, int] = {
            "peer_adds": 0,
            "peer_removes": 0,
            "fences": 0,
            "rejoins": 0,
            "ignored_records": 0,
            "watch_restarts": 0,
        }
        self.detections: deque[tuple[str, float]] = deque(maxlen=1000)  # (signal, seconds)
        self._record: MemberRecord | None = None
        self._mod_revision = 0
        self._warned: set[str] = set()
        self._listeners: list[Callable[[MembershipEvent], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keepalive_failing = False
        self._last_tick = time.monotonic()
        self._suspects: dict[str, float] = {}  # name -> monotonic time the data path lost it
        self._last_heard: dict[tuple[str, int], float] = {}  # (name, generation) -> last PONG
        self._silent: dict[str, Member] = {}  # removed for silence, still in etcd: pinged on
        self._changed = asyncio.Event()
        self._stopping = False
        self._revision = 0
        self._joined_at = 0.0
        self._role: str | None = None
        if agent is not None:
            agent.on_peer_lost(self._peer_lost_threadsafe)

    # -- public view -----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Joined, active, lease confirmed, view in sync, not fenced: fit to take new work."""
        return (
            self.phase is Phase.JOINED
            and self.state == MemberState.ACTIVE
            and self.synced
            and not self._keepalive_failing
            and not (self.agent is not None and self.agent.fenced)
        )

    @property
    def is_leader(self) -> bool:
        return self.leader == self.config.name and self.phase is Phase.JOINED

    def peers(self, *, state: MemberState | None = MemberState.ACTIVE) -> list[str]:
        """Names of the other members, optionally only those in `state`."""
        return sorted(
            n
            for n, m in self.members.items()
            if n != self.config.name and (state is None or m.record.state == state)
        )

    def subscribe(self, listener: Callable[[MembershipEvent], None]) -> None:
        """Call `listener` (in the loop) for every event."""
        self._listeners.append(listener)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until `predicate()` holds, re-checked on every change. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("membership condition not reached in time")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.25))

    def _emit(self, kind: str, name: str, generation: int, reason: str) -> None:
        ev = MembershipEvent(kind, name, generation, reason, time.time())
        self.events.append(ev)
        log.info("%s: %s %s (generation %d): %s", self.config.name, kind, name, generation, reason)
        for listener in self._listeners:
            try:
                listener(ev)
            except Exception:
                log.exception("membership listener failed")
        self._changed.set()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Join the group, read and start watching it, keep the lease alive. Raises
        `MembershipError` (or an `EtcdError`) if that cannot happen within `join_timeout`."""
        self._loop = asyncio.get_running_loop()
        await self._join(time.monotonic() + self.config.join_timeout)
        await self._sync()
        self._spawn(self._watch_loop, "watch")
        self._spawn(self._keepalive_loop, "keep-alive")
        self._spawn(self._watchdog, "watchdog")
        if self.agent is not None and self.config.heartbeat:
            self._spawn(self._heartbeat, "heartbeat")
        if self.config.campaign:
            self._spawn(self._campaign, "campaign")

    def _spawn(self, loop: Callable[[], Coroutine[Any, Any, None]], what: str) -> None:
        async def guarded() -> None:
            while not self._stopping:
                try:
                    await loop()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug: say so loudly, fence (the view may be wrong), go on
                    log.exception("%s: membership %s loop crashed; restarting it", self.config.name, what)
                    self._fence(f"membership {what} loop crashed")
                    await asyncio.sleep(1.0)

        self._tasks.append(asyncio.get_running_loop().create_task(guarded(), name=f"weft-{what}"))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """A short job (probe, eager connect) that must not outlive the membership."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    async def activate(self) -> None:
        """Publish state ``active`` (the member is ready for work)."""
        await self._publish(MemberState.ACTIVE)

    async def drain(self) -> None:
        """Publish state ``draining``: peers stop sending new work here."""
        await self._publish(MemberState.DRAINING)

    async def leave(self) -> None:
        """Drain (bounded), delete the member key and revoke the lease; stop watching."""
        if self.phase in (Phase.LEAVING, Phase.LEFT):
            return
        with contextlib.suppress(errors.EtcdError, errors.MembershipError):
            await self._publish(MemberState.DRAINING)
        self.phase = Phase.LEAVING
        if self.agent is not None:
            deadline = time.monotonic() + self.config.drain_timeout
            quiet = 0
            while time.monotonic() < deadline and quiet < 3:
                quiet = quiet + 1 if self.agent.in_flight() == 0 else 0
                await asyncio.sleep(0.02)
            if quiet < 3:
                log.warning(
                    "%s: leaving with %d transfers still in flight", self.config.name, self.agent.in_flight()
                )
        await self._stop_tasks()
        try:
            if self._mod_revision:
                await self._etcd.delete_if(self.key.encode(), mod_revision=self._mod_revision)
            if self.lease:
                await self._etcd.revoke(self.lease)
        except errors.EtcdError as exc:
            log.warning(
                "%s: could not delete its key on leave (the lease will expire): %s", self.config.name, exc
            )
        self.phase = Phase.LEFT
        self._emit("left", self.config.name, self.generation, "left the group")
        await self._etcd.close()

    async def close(self) -> None:
        """Stop without deleting anything (the lease runs out): for crash-like exits in tests."""
        await self._stop_tasks()
        await self._etcd.close()

    async def _stop_tasks(self) -> None:
        self._stopping = True  # the loops check it too
        tasks, self._tasks = self._tasks, []
        await stop_tasks(tasks, f"{self.config.name}: membership")

    # -- join and publish ------------------------------------------------------------------
    def _make_record(self, state: MemberState) -> MemberRecord:
        fabric = ""
        if self.agent is not None:
            fabric = MemberRecord.encode_fabric(self.agent.metadata())
        caps = self.config.capabilities
        if self.agent is not None and not caps.backends:
            gpus = self.agent.gpus
            kinds = [MemoryKind.DRAM, MemoryKind.VRAM] if gpus else [MemoryKind.DRAM]
            caps = caps.model_copy(
                update={"backends": list(self.agent.backends), "gpus": gpus, "memory_kinds": kinds}
            )
        return MemberRecord(
            name=self.config.name,
            generation=self.generation,
            instance=self.config.instance,
            incarnation=self.incarnation,
            node=self.config.node[:253],
            state=state,
            capabilities=caps,
            fabric=fabric,
            lease_ttl=float(self.lease_ttl),
            joined_at=self._joined_at,
            http=self.config.http,
            role=self._role,
        )

    async def _join(self, deadline: float) -> None:
        etcd = self._etcd
        backoff = 0.1
        incarnation = self.incarnation + 1
        while True:
            try:
                ttl = max(1, math.ceil(self.config.lease_ttl))
                sent = time.monotonic()
                lease, granted = await etcd.grant(ttl)
                generation = await etcd.revision() + 1
                self.incarnation = incarnation
                self.generation = generation
                self.lease, self.lease_ttl = lease, granted
                self._joined_at = time.time()
                if self.agent is not None:
                    if self.agent.generation != generation:
                        self.agent.regenerate(generation)
                    self.agent.serve_until(sent + granted)
                record = self._make_record(MemberState.JOINING)
                created, revision = await etcd.create(
                    self.key.encode(), records.seal(record, self.key, self.config.secret), lease=lease
                )
                if created:
                    self._record, self._mod_revision = record, revision
                    self.phase = Phase.JOINED
                    self.state = MemberState.JOINING
                    self.etcd_reachable = True
                    self._keepalive_failing = False
                    if self.agent is not None:
                        self.agent.unfence()
                    return
                await etcd.revoke(lease)
                holder = await etcd.get(self.key.encode())
                why = f"the name {self.config.name!r} is held by another live member"
                if holder is not None:
                    with contextlib.suppress(records.RecordError):
                        other = records.unseal(MemberRecord, holder.value, self.key, self.config.secret)
                        why += (
                            f" (node {other.node}, instance {other.instance}, generation {other.generation})"
                        )
                last: errors.EtcdError | None = None
            except errors.EtcdUnavailableError as exc:
                why, last = str(exc), exc
            if time.monotonic() + backoff > deadline:
                raise errors.MembershipError(f"{self.config.name}: could not join: {why}") from last
            log.info("%s: join waits: %s", self.config.name, why)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.25)  # a dead holder's lease can end any moment

    async def _publish(self, state: MemberState) -> None:
        if self.phase is not Phase.JOINED or self._record is None:
            raise errors.MembershipError(f"{self.config.name} is not joined ({self.phase.value})")
        record = self._make_record(state)
        ok, revision = await self._etcd.replace(
            self.key.encode(),
            records.seal(record, self.key, self.config.secret),
            mod_revision=self._mod_revision,
            lease=self.lease,
        )
        if not ok:
            raise errors.MembershipError(f"{self.config.name}: its member record changed under it")
        self._record, self._mod_revision, self.state = record, revision, state
        self._changed.set()

    async def republish(self) -> None:
        """Publish the record again (after registering memory: peers get the new regions)."""
        await self._publish(self.state)

    # -- the view --------------------------------------------------------------------------
    def _warn_once(self, key: str, why: str) -> None:
        self.counters["ignored_records"] += 1
        if key not in self._warned and len(self._warned) < 10000:
            self._warned.add(key)
            log.warning(
                "%s: ignoring %s: %s (further problems with this key are not logged)",
                self.config.name,
                key,
                why,
            )
        else:
            log.debug("%s: ignoring %s: %s", self.config.name, key, why)

    def _decode_member(self, kv: KeyValue) -> Member | None:
        key = kv.key.decode("utf-8", "replace")
        try:
            record = records.unseal(MemberRecord, kv.value, key, self.config.secret)
        except records.RecordError as exc:
            self._warn_once(key, str(exc))
            return None
        return Member(record, kv.lease, kv.create_revision, kv.mod_revision)

    async def _sync(self) -> None:
        """Read the whole prefix and make the view (and the fabric's peers) match it."""
        revision, kvs = await self._etcd.get_prefix(self.prefix.encode())
        seen: set[str] = set()
        leader: str | None = None
        self.acks.clear()
        self.loads.clear()
        self.drains.clear()
        for kv in kvs:
            rest = kv.key.decode("utf-8", "replace")[len(self.prefix) :]
            if rest.startswith("members/"):
                m = self._decode_member(kv)
                if m is not None:
                    seen.add(m.name)
                    self._apply_member(m)
            elif rest == "leader":
                leader = self._decode_leader(kv)
            else:
                self._apply_other(rest, kv, "put")
        for name in list(self.members):
            if name not in seen and name != self.config.name:
                self._remove(name, None, "not in etcd after a re-read")
        for name in [n for n in self._silent if n not in seen]:
            del self._silent[name]  # its DELETE came while the watch was down
        self._set_leader(leader)
        self._revision = revision
        self.synced = True
        self._changed.set()

    def _apply_member(self, m: Member) -> None:
        name = m.name
        if name == self.config.name:
            if m.record.generation == self.generation:
                self.members[name] = m
            return
        silent = self._silent.get(name)
        if silent is not None:
            if m.generation == silent.generation:
                self._silent[name] = m  # still silent to us: it comes back when it answers
                return
            del self._silent[name]
        old = self.members.get(name)
        if old is not None and m.generation < old.generation:
            return  # an older incarnation's record arriving late
        if old is not None and m.generation == old.generation and m.mod_revision <= old.mod_revision:
            return
        self.members[name] = m
        self._suspects.pop(name, None)
        if self.agent is not None and m.record.fabric:
            try:
                if old is not None and old.generation == m.generation and self._lost_in_fabric(name):
                    with contextlib.suppress(fabric_errors.UnknownPeerError):
                        self.agent.remove_peer(name)  # re-add a fresh peer for a live member
                self.agent.add_peer(m.record.fabric_metadata())
            except (fabric_errors.WeftError, ValueError) as exc:
                self._warn_once(f"{self.prefix}members/{name}", f"fabric metadata refused: {exc}")
                return
            if old is None or old.generation != m.generation:
                self._connect_soon(name)
        if old is None or old.generation != m.generation:
            self.counters["peer_adds"] += 1
            self._emit("added", name, m.generation, f"state {m.record.state}")
        else:
            self._emit("updated", name, m.generation, f"state {m.record.state}")

    def _lost_in_fabric(self, name: str) -> bool:
        assert self.agent is not None
        try:
            return not self.agent.peer_alive(name)
        except fabric_errors.WeftError:
            return True

    def _connect_soon(self, name: str) -> None:
        agent = self.agent
        if agent is None or not self.config.connect_peers:
            return

        def connect() -> None:
            try:
                agent.connect(name)
            except fabric_errors.WeftError as exc:
                log.debug("%s: eager connect to %s failed: %s", self.config.name, name, exc)

        self._background(asyncio.to_thread(connect))

    def _remove(self, name: str, generation: int | None, reason: str, signal: str = "etcd") -> None:
        m = self.members.get(name)
        if m is None or (generation is not None and m.generation != generation):
            return
        del self.members[name]
        suspected = self._suspects.pop(name, None)
        if suspected is not None:
            self.detections.append((signal, time.monotonic() - suspected))
        if self.agent is not None:
            with contextlib.suppress(fabric_errors.UnknownPeerError, fabric_errors.AgentClosedError):
                self.agent.remove_peer(name)
        self.counters["peer_removes"] += 1
        self._emit("removed", name, m.generation, reason)

    def _decode_leader(self, kv: KeyValue) -> str | None:
        key = kv.key.decode("utf-8", "replace")
        try:
            return records.unseal(LeaderRecord, kv.value, key, self.config.secret).name
        except records.RecordError as exc:
            self._warn_once(key, str(exc))
            return None

    def _set_leader(self, leader: str | None) -> None:
        if leader != self.leader:
            self.leader = leader
            self._emit("leader", leader or "", 0, "elected" if leader else "no leader")

    def _apply(self, ev: Event) -> None:
        if self.phase is not Phase.JOINED:
            return  # fenced or leaving: the view is rebuilt on rejoin
        key = ev.kv.key.decode("utf-8", "replace")
        rest = key[len(self.prefix) :]
        if rest.startswith("members/"):
            name = rest[len("members/") :]
            if ev.kind == "put":
                m = self._decode_member(ev.kv)
                if m is not None:
                    self._apply_member(m)
                return
            if name == self.config.name:
                if self.phase is Phase.JOINED and (
                    ev.prev is None or ev.prev.mod_revision == self._mod_revision
                ):
                    self._fence("its member key was deleted (lease expired or removed by hand)")
                return
            gen = None
            if ev.prev is not None:
                with contextlib.suppress(records.RecordError):
                    gen = records.unseal(MemberRecord, ev.prev.value, key, self.config.secret).generation
            m = self.members.get(name)
            if m is not None and m.record.state == MemberState.DRAINING:
                reason = "left (drained)"
            else:
                reason = "member key deleted (lease expired or left)"
            self._remove(name, gen, reason, "etcd")
            silent = self._silent.get(name)
            if silent is not None and gen in (None, silent.generation):
                del self._silent[name]
        elif rest == "leader":
            self._set_leader(self._decode_leader(ev.kv) if ev.kind == "put" else None)
        else:
            self._apply_other(rest, ev.kv, ev.kind)

    def _apply_other(self, rest: str, kv: KeyValue, kind: str) -> None:
        """``plan``, ``acks/<name>``, ``load/<name>``, ``drain/<name>``: kept for the planner and
        ``weft status``."""
        key = self.prefix + rest
        try:
            if rest == "plan":
                if kind == "delete":
                    self.plan, self.plan_revision, self.plan_invalid = None, 0, False
                    self._emit("plan", "", 0, "plan deleted")
                    return
                try:
                    plan = records.unseal(records.PlanRecord, kv.value, key, self.config.secret)
                except records.RecordError:
                    # keep the last good plan; the leader overwrites this one (CAS on its revision)
                    self.plan_revision, self.plan_invalid = kv.mod_revision, True
                    self._emit("plan", "", 0, "invalid plan record: the leader replaces it")
                    raise
                if self.plan is None or plan.epoch > self.plan.epoch or self.plan_invalid:
                    self.plan, self.plan_revision, self.plan_invalid = plan, kv.mod_revision, False
                    self._emit("plan", plan.leader, plan.epoch, plan.reason or "new plan")
            elif rest.startswith("acks/"):
                name = rest[len("acks/") :]
                if kind == "delete":
                    self.acks.pop(name, None)
                else:
                    self.acks[name] = records.unseal(
                        records.AckRecord, kv.value, key, self.config.secret
                    ).epoch
                    self._changed.set()
            elif rest.startswith("drain/"):
                name = rest[len("drain/") :]
                if kind == "delete":
                    self.drains.discard(name)
                else:
                    records.unseal(records.DrainRecord, kv.value, key, self.config.secret)
                    self.drains.add(name)
                self._changed.set()
                self._emit("drain", name, 0, "drain requested" if kind != "delete" else "drain withdrawn")
            elif rest.startswith("load/"):
                name = rest[len("load/") :]
                if kind == "delete":
                    self.loads.pop(name, None)
                else:
                    load = records.unseal(records.LoadRecord, kv.value, key, self.config.secret)
                    self.loads[name] = load
                    self._emit("load", name, load.generation, f"queue depth {load.queue_depth}")
        except records.RecordError as exc:
            self._warn_once(key, str(exc))

    async def _watch_loop(self) -> None:
        backoff = 0.1
        first = True
        while not self._stopping:
            try:
                if not first:
                    await self._sync()
                first = False
                async for batch in self._etcd.watch_prefix(self.prefix.encode(), self._revision + 1):
                    backoff = 0.1
                    for ev in batch:
                        self._revision = ev.revision
                        self._apply(ev)
            except (errors.EtcdUnavailableError, errors.EtcdCompactedError, errors.EtcdError) as exc:
                self.synced = False
                self.counters["watch_restarts"] += 1
                log.info("%s: watch restarts in %.1f s: %s", self.config.name, backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    # -- liveness --------------------------------------------------------------------------
    async def _keepalive_loop(self) -> None:
        backoff = 0.1
        while not self._stopping:
            period = max(self.lease_ttl / 3, 0.2)
            if self.phase is Phase.FENCED:
                await self._rejoin()
                continue
            sent = time.monotonic()
            try:
                ttl = await self._etcd.keepalive(self.lease)
            except errors.EtcdError as exc:
                if not self._keepalive_failing:
                    log.warning(
                        "%s: etcd unreachable, serving known peers meanwhile: %s", self.config.name, exc
                    )
                    self._emit("etcd-lost", self.config.name, self.generation, str(exc))
                self._keepalive_failing = True
                self.etcd_reachable = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, period)
                continue
            backoff = 0.1
            if ttl <= 0:
                self._fence("etcd says its lease is gone")
                continue
            if self._keepalive_failing:
                self._emit("etcd-back", self.config.name, self.generation, "keep-alive answered again")
            self._keepalive_failing = False
            self.etcd_reachable = True
            if self.agent is not None and self.phase is Phase.JOINED:
                self.agent.serve_until(sent + ttl)
            self._changed.set()
            await asyncio.sleep(max(0.0, sent + period - time.monotonic()))

    async def _watchdog(self) -> None:
        """Sees pauses, and keeps serving going while etcd (not this process) is away."""
        self._last_tick = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            gap, self._last_tick = now - self._last_tick, now
            if self.phase is not Phase.JOINED:
                continue
            if gap > self.lease_ttl:
                self._fence(f"this process was paused for {gap:.1f} s, longer than its lease")
            elif self._keepalive_failing and self.agent is not None and gap < max(4 * _TICK, 0.5):
                self.agent.serve_until(now + 1.0)

    def _fence(self, reason: str) -> None:
        if self.phase is not Phase.JOINED:
            return
        self.phase = Phase.FENCED
        self.counters["fences"] += 1
        if self.agent is not None:
            self.agent.fence(reason)
        for name in [n for n in self.members if n != self.config.name]:
            self._remove(name, None, "this agent was fenced")
        self.members.pop(self.config.name, None)
        self._silent.clear()
        self._last_heard.clear()
        self._set_leader(None)
        self.synced = False
        self._emit("fenced", self.config.name, self.generation, reason)

    async def _rejoin(self) -> None:
        old_lease = self.lease
        with contextlib.suppress(errors.EtcdError):
            await self._etcd.revoke(old_lease)  # a lease that etcd kept (restart) must go too
        state = self.state  # what it had published: it comes back in the same state
        try:
            await self._join(time.monotonic() + self.config.join_timeout)
            await self._sync()
            if state != MemberState.JOINING:
                await self._publish(state)
        except (errors.MembershipError, errors.EtcdError) as exc:
            log.warning("%s: rejoin failed, retrying: %s", self.config.name, exc)
            await asyncio.sleep(0.5)
            return
        self.counters["rejoins"] += 1
        self._emit("rejoined", self.config.name, self.generation, f"incarnation {self.incarnation}")

    # -- heartbeat ---------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Ping connected peers; remove one silent for a whole lease TTL (SIGSTOP, a hang)."""
        agent = self.agent
        assert agent is not None
        loop = asyncio.get_running_loop()
        next_ping = last = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            gap, last = now - last, now
            if self.phase is not Phase.JOINED:
                continue
            limit = self.config.lease_ttl
            if gap > max(4 * _TICK, 0.5):  # we were the silent one (paused or starved)
                self._last_heard = dict.fromkeys(self._last_heard, now)
            live = {(n, m.generation) for n, m in self.members.items()}
            live |= {(n, m.generation) for n, m in self._silent.items()}
            self._last_heard = {k: t for k, t in self._last_heard.items() if k in live}
            for name, m in list(self.members.items()):
                heard = self._last_heard.get((name, m.generation))
                if name != self.config.name and heard is not None and now - heard > limit:
                    self._silence(m, now - heard)
            if now < next_ping:
                continue
            next_ping = now + max(0.1, limit / 6)
            for name, m in [*self.members.items(), *self._silent.items()]:
                if name == self.config.name:
                    continue
                key = (name, m.generation)
                try:
                    agent.ping(name, self._on_pong(loop, key))
                except (fabric_errors.UnknownPeerError, fabric_errors.PeerLostError):
                    if name in self._silent and now - self._last_heard.get(key, 0.0) > limit:
                        self._last_heard[key] = now  # retry the connection once per TTL
                        with contextlib.suppress(fabric_errors.WeftError, ValueError):
                            agent.add_peer(m.record.fabric_metadata())
                        self._connect_soon(name)
                    continue
                self._last_heard.setdefault(key, now)

    def _on_pong(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int]) -> Callable[[float], None]:
        def on_pong(_rtt: float) -> None:  # a fabric thread
            with contextlib.suppress(RuntimeError):  # the loop closed: we are exiting
                loop.call_soon_threadsafe(self._heard, key)

        return on_pong

    def _heard(self, key: tuple[str, int]) -> None:
        name, generation = key
        self._last_heard[key] = time.monotonic()
        silent = self._silent.get(name)
        if silent is not None and silent.generation == generation and self.phase is Phase.JOINED:
            del self._silent[name]
            self.members[name] = silent
            self.counters["peer_adds"] += 1
            self._emit("added", name, generation, "answers pings again")

    def _silence(self, m: Member, silent_for: float) -> None:
        self._suspects.setdefault(m.name, time.monotonic() - silent_for)
        self._remove(m.name, m.generation, f"no answer to pings for {silent_for:.2f} s", "heartbeat")
        self._silent[m.name] = m

    # -- the data path's signal ------------------------------------------------------------
    def _peer_lost_threadsafe(self, name: str, generation: int, exc: fabric_errors.WeftError) -> None:
        loop = self._loop
        if (
            loop is None
            or self._stopping
            or isinstance(exc, fabric_errors.StalePeerError | fabric_errors.AgentClosedError)
        ):
            return
        with contextlib.suppress(RuntimeError):  # loop closed: we are exiting
            loop.call_soon_threadsafe(self._peer_lost, name, generation, exc)

    def _peer_lost(self, name: str, generation: int, exc: fabric_errors.WeftError) -> None:
        m = self.members.get(name)
        if m is None or m.generation != generation or self.phase is not Phase.JOINED:
            return
        self._suspects.setdefault(name, time.monotonic())
        self._background(self._probe(m, str(exc)))

    async def _probe(self, m: Member, why: str) -> None:
        """Is anything still listening where the lost peer listened?

        A killed process closes its connections a moment before its listening socket, so an
        accepted (or reset) connection is asked again, three times 10 ms apart, before the peer
        counts as alive.
        """
        try:
            md = m.record.fabric_metadata()
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
                self._remove(
                    m.name, m.generation, f"data path lost ({why}) and nothing listens there", "data-path"
                )
                return
            except (ConnectionResetError, ConnectionAbortedError):
                continue  # the dying listener accepted, then reset: ask again
            except (OSError, TimeoutError) as exc:
                log.debug("%s: probe of %s inconclusive: %r", self.config.name, m.name, exc)
                return  # unreachable or slow: the heartbeat and the lease decide
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        current = self.members.get(m.name)
        if current is not None and current.generation == m.generation and self.agent is not None:
            with contextlib.suppress(fabric_errors.WeftError, ValueError):
                self.agent.remove_peer(m.name)
                self.agent.add_peer(md)
                log.info(
                    "%s: %s still listens; re-added it, heartbeat and lease decide", self.config.name, m.name
                )
                self._connect_soon(m.name)  # pinged again, and its next loss is seen again

    # -- leader, acks, load ----------------------------------------------------------------
    async def _campaign(self) -> None:
        key = f"{self.prefix}leader"
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await self.wait_for(lambda: self.phase is Phase.JOINED and self.leader is None, 60.0)
            if not (self.phase is Phase.JOINED and self.leader is None):
                continue
            record = LeaderRecord(name=self.config.name, generation=self.generation, since=time.time())
            try:
                created, _ = await self._etcd.create(
                    key.encode(), records.seal(record, key, self.config.secret), lease=self.lease
                )
            except errors.EtcdError:
                await asyncio.sleep(0.2)
                continue
            if created:
                self._set_leader(self.config.name)
                continue
            await asyncio.sleep(0.05)  # the watch will tell who holds it
            if self.leader is not None:
                continue
            try:
                kv = await self._etcd.get(key.encode())
                if kv is not None and self._decode_leader(kv) is None:
                    # not a leader record of this group (a stranger's write, maybe without a
                    # lease: it would never expire): clear it, guarded by its revision
                    if await self._etcd.delete_if(key.encode(), mod_revision=kv.mod_revision):
                        log.warning("%s: removed an invalid leader key", self.config.name)
                elif kv is not None:
                    self._set_leader(self._decode_leader(kv))
            except errors.EtcdError:
                pass
            await asyncio.sleep(0.2)

    async def write_plan(self, plan: records.PlanRecord) -> bool:
        """Write the next plan if this member leads and nobody wrote one since it last looked.

        The write is a compare-and-swap on the ``plan`` key's revision as this member saw it
        (absent: 0), so a deposed or paused leader working from an old plan fails instead of
        overwriting; one epoch never gets two plans. Returns True when written.
        """
        if not self.is_leader:
            return False
        expected = (self.plan.epoch if self.plan is not None else 0) + 1
        if plan.epoch != expected:
            raise errors.MembershipError(f"plan epoch {plan.epoch} does not follow {expected - 1}")
        key = f"{self.prefix}plan"
        ok, revision = await self._etcd.replace(
            key.encode(), records.seal(plan, key, self.config.secret), mod_revision=self.plan_revision
        )
        if ok:
            self.plan, self.plan_revision, self.plan_invalid = plan, revision, False
            self._emit("plan", plan.leader, plan.epoch, f"written: {plan.reason}")
        return ok

    async def set_role(self, role: str | None) -> None:
        """Publish the role this member now serves (after it drained the old one)."""
        if self.phase is not Phase.JOINED or self._record is None:
            raise errors.MembershipError(f"{self.config.name} is not joined ({self.phase.value})")
        self._role = role
        await self._publish(self.state)

    async def put_ack(self, epoch: int) -> None:
        """Publish ``acks/<name>``: this member applied plan `epoch`."""
        key = f"{self.prefix}acks/{self.config.name}"
        record = records.AckRecord(name=self.config.name, generation=self.generation, epoch=epoch)
        await self._etcd.put(key.encode(), records.seal(record, key, self.config.secret), lease=self.lease)

    async def put_load(
        self, queue_depth: int = 0, tokens_per_s: float = 0.0, expert_hits: Mapping[int, int] | None = None
    ) -> None:
        """Publish ``load/<name>`` for the planner.

        Args:
            queue_depth: requests waiting. tokens_per_s: recent throughput.
            expert_hits: expert id -> tokens routed to it since the last report.
        Raises:
            ConfigError: an expert id is not a non-negative integer.
        """
        hits = dict(expert_hits or {})
        if not all(isinstance(e, int) and 0 <= e < 10**9 for e in hits):
            raise fabric_errors.ConfigError(
                f"expert_hits keys are expert ids (integers >= 0), got {list(hits)}"
            )
        key = f"{self.prefix}load/{self.config.name}"
        record = records.LoadRecord(
            name=self.config.name,
            generation=self.generation,
            queue_depth=queue_depth,
            tokens_per_s=tokens_per_s,
            expert_hits={str(e): n for e, n in hits.items()},
            at=time.time(),
        )
        await self._etcd.put(key.encode(), records.seal(record, key, self.config.secret), lease=self.lease)
