"""Group membership on etcd: a member record under a lease, a watched view, fencing, a leader.

The life of a member (DESIGN.md, "Control plane"):

* **Join.** Grant a lease (TTL, default 3 s), derive a generation from etcd's revision (so a
  later incarnation of a name always has a higher one, whatever the clocks say), and create
  ``members/<name>`` under the lease only if absent. A name still held by a live member is
  waited for, within the join deadline.
* **View.** Read the prefix, then watch it from the next revision. A PUT of a new or newer
  member adds its fabric metadata to the fabric `Agent`; a DELETE (leave or lease expiry)
  removes it. Records that are not signed with the group's join token are ignored with one
  warning, and a member key holding one (or a record under no lease) counts as absent, for a
  member watching as for one reading afresh; a member that finds its own key overwritten
  puts its record back under its lease. A broken or compacted watch re-reads the prefix and
  reconciles.
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
  its lease ends, and the others retry when they see the key deleted. A leader record that is
  not under its holder's live lease (written back without one, or naming a member that has
  gone) names no leader and is cleared, so the election goes on.
* **Plan epochs.** Each member keeps the highest epoch it has seen (plan key, acks); a plan
  below it is reported and never adopted, and the leader writes above it, also after the
  plan key was deleted: an epoch is never used twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic

from weft.api import records
from weft.api.records import Capabilities, MemberRecord
from weft.api.settings import EtcdSettings, GroupRef
from weft.api.vocab import MemberState
from weft.fabric import errors as fabric_errors
from weft.membership import detector, election, errors, events, keyspace, peersync, session, tasks, view
from weft.membership._etcd import Etcd
from weft.membership.events import EventKind, MembershipEvent
from weft.membership.port import FabricPort
from weft.membership.session import Phase
from weft.membership.tasks import stop_tasks
from weft.membership.view import Member

__all__ = ["Member", "MemberConfig", "Membership", "MembershipEvent", "Phase", "stop_tasks"]

log = logging.getLogger(__name__)

_NO_CAPABILITIES = Capabilities()


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


class Membership:
    """This process's membership in one group, optionally driving a fabric agent.

    Use inside one asyncio loop: ``await m.start()`` ... ``await m.leave()``. The work is
    done by its parts: `session` (lease, record, fencing), `sync` (the watch and the view's
    reducer, the fabric's peers), `detector` (heartbeat, data-path probes) and `election`
    (leader, plan writes); this class holds the state they share and the public calls.

    Args:
        etcd: how to reach etcd.
        config: the member's settings.
        agent: the fabric agent whose peers follow the group (None: a lightweight member,
            as ``weft status`` and the fan-out benchmark use).
    Raises:
        ConfigError: the agent's name is not the member's.
    """

    def __init__(self, etcd: EtcdSettings, config: MemberConfig, agent: FabricPort | None = None) -> None:
        if agent is not None and agent.name != config.name:
            raise fabric_errors.ConfigError(f"agent {agent.name!r} and member {config.name!r} differ")
        self.config = config
        self.agent = agent
        self._etcd = Etcd(etcd)
        self.keyspace = keyspace.Keyspace.of(config.group)
        self.prefix = self.keyspace.prefix
        self.key = self.keyspace.member(config.name)
        self.view = view.GroupView(self.keyspace, config.name, config.secret)
        self.phase = Phase.STARTING
        self.state: MemberState = MemberState.JOINING
        self.generation = 0
        self.incarnation = -1
        self.lease = 0
        self.lease_ttl = 0
        self.etcd_reachable = False
        self.synced = False
        self.bus = events.EventBus(config.name)
        self.counters: dict[str, int] = {
            "peer_adds": 0,
            "peer_removes": 0,
            "fences": 0,
            "rejoins": 0,
            "ignored_records": 0,
            "watch_restarts": 0,
            "repairs": 0,
            "leaders_cleared": 0,
        }
        self.detections: deque[tuple[str, float]] = deque(maxlen=1000)  # (signal, seconds)
        self._record: MemberRecord | None = None
        self._mod_revision = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._joined_at = 0.0
        self._role: str | None = None
        self.session = session.Session(self)
        self.sync = peersync.PeerSync(self)
        self.detector = detector.Detector(self)
        self.election = election.Election(self)
        if agent is not None:
            agent.on_peer_lost(self.detector.peer_lost_threadsafe)

    # -- public view -----------------------------------------------------------------------
    @property
    def members(self) -> dict[str, Member]:
        """Name -> member, as this agent sees the group (a new dict on every change)."""
        return self.view.members

    @property
    def leader(self) -> str | None:
        return self.view.leader

    @property
    def plan(self) -> records.PlanRecord | None:
        return self.view.plan

    @plan.setter
    def plan(self, plan: records.PlanRecord | None) -> None:  # a test plays a paused leader
        self.view = dataclasses.replace(self.view, plan=plan)

    @property
    def plan_revision(self) -> int:
        """Mod revision of the ``plan`` key (0: none yet): the CAS guard of `write_plan`."""
        return self.view.plan_revision

    @plan_revision.setter
    def plan_revision(self, revision: int) -> None:
        self.view = dataclasses.replace(self.view, plan_revision=revision)

    @property
    def plan_invalid(self) -> bool:
        """The ``plan`` key does not hold the group's current plan (not a plan of this group, a
        plan below the highest epoch seen, or no plan at all): the leader re-writes it."""
        return self.view.plan_invalid

    @property
    def acks(self) -> dict[str, int]:
        """Member -> plan epoch it applied."""
        return self.view.acks

    @property
    def loads(self) -> dict[str, records.LoadRecord]:
        return self.view.loads

    @property
    def drains(self) -> set[str]:
        """Members the operator asked to plan out (scale-down)."""
        return self.view.drains

    @property
    def events(self) -> deque[MembershipEvent]:
        """The last 1000 events, oldest first."""
        return self.bus.events

    @property
    def ready(self) -> bool:
        """Joined, active, lease confirmed, view in sync, not fenced: fit to take new work."""
        return (
            self.phase is Phase.JOINED
            and self.state == MemberState.ACTIVE
            and self.synced
            and not self.session.keepalive_failing
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
        self.bus.subscribe(listener)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until `predicate()` holds, re-checked on every change.

        Raises:
            TimeoutError: it did not hold within `timeout` seconds.
        """
        await self.bus.wait_for(predicate, timeout)

    def _emit(self, kind: EventKind | str, name: str, generation: int, reason: str) -> None:
        self.bus.emit(kind, name, generation, reason)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Join the group, read and start watching it, keep the lease alive.

        Raises:
            MembershipError: (or an `EtcdError`) it could not within `join_timeout`.
        """
        self._loop = asyncio.get_running_loop()
        await self.session.join(time.monotonic() + self.config.join_timeout)
        await self.sync.sync()
        self._spawn(self.sync.watch_loop, "watch")
        self._spawn(self.session.keepalive_loop, "keep-alive")
        self._spawn(self.session.watchdog, "watchdog")
        if self.agent is not None and self.config.heartbeat:
            self._spawn(self.detector.heartbeat, "heartbeat")
        if self.config.campaign:
            self._spawn(self.election.campaign, "campaign")

    def _spawn(self, loop: Callable[[], Coroutine[Any, Any, None]], what: str) -> None:
        """Run `loop` until stopped; a crash is a bug: logged, fenced (the view may be wrong)
        and the loop restarted."""

        def crashed(_exc: BaseException) -> None:
            self.session.fence(f"membership {what} loop crashed")

        run = tasks.restarting(
            loop,
            what=f"membership {what}",
            owner=self.config.name,
            stopping=lambda: self._stopping,
            on_crash=crashed,
        )
        self._tasks.append(tasks.create_guarded_task(run, name=f"weft-{what}", owner=self.config.name))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """A short job (probe, eager connect) that must not outlive the membership."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    async def activate(self) -> None:
        """Publish state ``active`` (the member is ready for work)."""
        await self.session.publish(MemberState.ACTIVE)

    async def drain(self) -> None:
        """Publish state ``draining``: peers stop sending new work here."""
        await self.session.publish(MemberState.DRAINING)

    async def republish(self) -> None:
        """Publish the record again (after registering memory: peers get the new regions)."""
        await self.session.publish(self.state)

    def _make_record(self, state: MemberState) -> MemberRecord:
        return self.session.make_record(state)

    async def leave(self) -> None:
        """Drain (bounded), delete the member key and revoke the lease; stop watching."""
        if self.phase in (Phase.LEAVING, Phase.LEFT):
            return
        with contextlib.suppress(errors.EtcdError, errors.MembershipError):
            await self.session.publish(MemberState.DRAINING)
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
        self._emit(EventKind.LEFT, self.config.name, self.generation, "left the group")
        await self._etcd.close()

    async def close(self) -> None:
        """Stop without deleting anything (the lease runs out): for crash-like exits in tests."""
        await self._stop_tasks()
        await self._etcd.close()

    async def _stop_tasks(self) -> None:
        self._stopping = True  # the loops check it too
        tasks_, self._tasks = self._tasks, []
        await stop_tasks(tasks_, f"{self.config.name}: membership")

    # -- the leader's plan, acks, load, role -----------------------------------------------
    async def write_plan(self, plan: records.PlanRecord) -> bool:
        """Write the next plan if this member leads and nobody wrote one since it last looked.

        The write is a compare-and-swap on the ``plan`` key's revision as this member saw it
        (absent: 0), so a deposed or paused leader working from an old plan fails instead of
        overwriting; one epoch never gets two plans.

        The epoch written is one above the highest this member has seen (the plan key's and
        the verified acks'): a plan made from an older one (the key was written back or
        deleted) is renumbered, so no epoch is ever used twice.

        Returns:
            True when written.
        Raises:
            MembershipError: `plan`'s epoch is not above the current plan's, or skips ahead of
                the highest epoch seen.
        """
        return await self.election.write_plan(plan)

    async def set_role(self, role: str | None) -> None:
        """Publish the role this member now serves (after it drained the old one).

        Raises:
            MembershipError: not joined.
        """
        if self.phase is not Phase.JOINED or self._record is None:
            raise errors.MembershipError(f"{self.config.name} is not joined ({self.phase.value})")
        self._role = role
        await self.session.publish(self.state)

    async def put_ack(self, epoch: int) -> None:
        """Publish ``acks/<name>``: this member applied plan `epoch`."""
        key = self.keyspace.ack(self.config.name)
        record = records.AckRecord(name=self.config.name, generation=self.generation, epoch=epoch)
        await self._etcd.put(key.encode(), records.seal(record, key, self.config.secret), lease=self.lease)

    async def put_load(
        self,
        queue_depth: int = 0,
        tokens_per_s: float = 0.0,
        expert_hits: Mapping[int, int] | None = None,
        *,
        running: int = 0,
        kv_cache_usage: float = 0.0,
        ttft_ms: records.Percentiles | None = None,
        itl_ms: records.Percentiles | None = None,
    ) -> None:
        """Publish ``load/<name>`` for the planner (and the operator's status and autoscaler).

        Args:
            queue_depth: requests waiting to start. running: requests being served.
            tokens_per_s: recent throughput. kv_cache_usage: fraction of KV blocks in use.
            ttft_ms, itl_ms: recent time-to-first-token and inter-token latency percentiles.
            expert_hits: expert id -> tokens routed to it since the last report.
        Raises:
            ConfigError: an expert id is not a non-negative integer, or a figure is out of
                range (negative, a usage above 1).
        """
        hits = dict(expert_hits or {})
        if not all(isinstance(e, int) and 0 <= e < 10**9 for e in hits):
            raise fabric_errors.ConfigError(
                f"expert_hits keys are expert ids (integers >= 0), got {list(hits)}"
            )
        key = self.keyspace.load(self.config.name)
        try:
            record = records.LoadRecord(
                name=self.config.name,
                generation=self.generation,
                queue_depth=queue_depth,
                running=running,
                kv_cache_usage=float(kv_cache_usage),
                ttft_ms=ttft_ms,
                itl_ms=itl_ms,
                tokens_per_s=float(tokens_per_s),
                expert_hits={str(e): n for e, n in hits.items()},
                at=time.time(),
            )
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "load"
            raise fabric_errors.ConfigError(f"load figure {where}: {first.get('msg', 'invalid')}") from None
        await self._etcd.put(key.encode(), records.seal(record, key, self.config.secret), lease=self.lease)
