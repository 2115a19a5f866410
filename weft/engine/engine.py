"""`Engine`: an inference engine's membership in a weft group, in the engine's own process.

One object joins the group from what the operator injected (``WEFT_*`` variables and the
mounted ``agent.yaml``): a fabric `Agent` the engine registers its real KV cache and expert
weights with, a `Membership` under a lease, the plan coordinator, the health/metrics
endpoint and a load publisher. The engine then follows the plan through handshakes
(`weft.engine.changes`): it is told to switch roles, load experts, or drain, and the SDK
acts (publishes the role, acks the epoch, leaves) only after the engine answered.

An engine answers in one of three ways, checked in this order for each change:

1. a handler for the change's kind (`on_role_change`, `on_experts`, `on_drain`): a coroutine
   function runs in the SDK's loop, a plain function in a worker thread (it may block; the
   loop keeps the lease alive meanwhile); returning answers `done`, raising answers `failed`;
2. the change stream (`changes()`, or `SyncEngine.changes()`): the engine calls
   ``change.done()`` itself;
3. neither: the SDK's own behaviour, what the `weft agent` daemon does: a role change waits,
   bounded, for the fabric's transfers in flight; expert and drain changes are done at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from weft.api import agent_settings
from weft.api.agent_settings import AgentSettings
from weft.api.vocab import MemberState, Role
from weft.engine import http as engine_http
from weft.engine import metrics as engine_metrics
from weft.engine import readiness as engine_readiness
from weft.engine.changes import Change, ChangeState, DrainRequest, ExpertChange, RoleChange
from weft.engine.coordinator import Coordinator, PlanningConfig, fabric_drain
from weft.engine.experts import ExpertHolder, ExpertSource
from weft.engine.load import LoadTracker
from weft.fabric import limits as fabric_limits
from weft.fabric.agent import Agent
from weft.fabric.config import AgentConfig
from weft.fabric.errors import ConfigError, WeftError
from weft.membership.events import EventKind, MembershipEvent
from weft.membership.member import MemberConfig, Membership, Phase
from weft.planner import ExpertSpec, LoadPolicy, RatioPolicy

log = logging.getLogger(__name__)

_LIMIT_DOCS = {
    "unauthenticated": "Connections closed on accept: too many were still in their handshake.",
    "accept_failures": "Accepts on the data port that failed for want of descriptors, memory or a thread.",
    "descriptors": "Requests dropped for carrying more descriptors than max_descriptors.",
    "staging": "Requests refused: no staging memory was free within staging_timeout.",
    "inbox_full": "Notifications refused: the inbox stayed full for inbox_full_timeout.",
}
"""Each field of `weft.fabric.limits.LimitsHit`, exported as a counter."""

CONFIG_ENV = "WEFT_CONFIG"
"""The variable naming the settings file (the operator mounts ``/etc/weft/agent.yaml``)."""
LOAD_INTERVAL = 1.0
"""Seconds between two load records when the figures change."""
LOAD_REFRESH = 10.0
"""A load record is re-published at least this often, changed or not: the role policy only
acts on load reported after its previous step."""
READINESS_POLL = 0.25
"""Seconds between two looks at readiness (for the transition log lines)."""
_SELF_ECHO_TIMEOUT = 5.0

C = TypeVar("C", bound=Change)
Handler = Callable[[C], Any]


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentSettings:
    """The member's settings: `overrides` > `env` > `config_file` (default: ``$WEFT_CONFIG``).

    The join token is read once here too, so a missing or short token file fails now.

    Raises:
        ConfigError: naming the bad field and the source of its value.
    """
    env = os.environ if env is None else env
    if config_file is None and env.get(CONFIG_ENV):
        config_file = Path(env[CONFIG_ENV])
    try:
        settings = agent_settings.resolve_settings(
            AgentSettings, config_file=config_file, env=env, overrides=overrides or {}
        )
        settings.join_token()
    except agent_settings.SettingsError as exc:
        raise ConfigError(str(exc)) from exc
    return settings


def planning_config(p: agent_settings.PlanningSettings, drain_timeout: float = 10.0) -> PlanningConfig:
    """The planner's policy and timing from the member's settings."""
    roles = frozenset(p.gpu_less_roles)
    policy: RatioPolicy | LoadPolicy
    if p.policy == "load":
        policy = LoadPolicy(
            min_prefill=p.min_prefill,
            min_decode=p.min_decode,
            high_queue=p.high_queue,
            low_queue=p.low_queue,
            settle_s=p.settle_seconds,
            ttft_p90_ms=p.ttft_p90_ms,
            itl_p90_ms=p.itl_p90_ms,
            gpu_less_roles=roles,
        )
    else:
        policy = RatioPolicy.parse(
            p.ratio, min_prefill=p.min_prefill, min_decode=p.min_decode, gpu_less_roles=roles
        )
    experts = ExpertSpec(p.experts, p.replication, p.redundant_slots) if p.experts else None
    return PlanningConfig(policy, experts, debounce=p.debounce, drain_timeout=drain_timeout)


class Engine:
    """This engine's member of a weft group (use in one asyncio loop; `SyncEngine` for threads).

    Args:
        settings: the member's settings (`load_settings`, or `Engine.from_env`).
        expert_source: where expert weights come from when no peer holds them (default: the
            settings' ``planning.expert_source``); needed for expert placement.
        http: serve /healthz, /readyz, /metrics and /status on the settings' HTTP address.
    Raises:
        ConfigError: bad settings; OSError: the fabric port cannot be bound.
    """

    def __init__(
        self, settings: AgentSettings, *, expert_source: ExpertSource | None = None, http: bool = True
    ) -> None:
        self.settings = settings
        self.agent = Agent(settings.name, AgentConfig.from_settings(settings))
        """The fabric agent: register KV-cache and weight memory with it."""
        self.load = LoadTracker()
        """Set gauges and observe latencies here; the SDK publishes them."""
        self.server = engine_http.HttpServer() if http else None
        self.membership: Membership | None = None
        self.coordinator: Coordinator | None = None
        self.http_port = 0
        source = expert_source
        if source is None and settings.planning.experts and settings.planning.expert_source:
            source = ExpertSource.parse(settings.planning.expert_source)
            source.check()
        self.experts = ExpertHolder(self.agent, source) if source is not None else None
        self.drain_request: DrainRequest | None = None
        """Set once the engine was asked to drain (scale-down, SIGTERM, stop)."""
        self.ready_checks: list[tuple[str, engine_readiness.Check]] = [
            ("draining", self._draining),
            ("engine", self._overdue),
            ("fabric", self._fabric_health),
        ]
        """(kind, check) pairs that make /readyz 503 while a check returns a reason; add to it
        before `start` (the fabric's health, an engine's own condition)."""
        self.readiness: engine_readiness.Readiness | None = None
        self.metrics: engine_metrics.AgentMetrics | None = None
        """The Prometheus metrics served on /metrics (set by `start` when serving HTTP)."""
        self._handlers: dict[type[Change], Handler[Any]] = {}
        self._streams: list[Callable[[Change], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        config_file: Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> Engine:
        """An engine from the injected environment (``WEFT_*``, ``$WEFT_CONFIG``).

        Raises:
            ConfigError: the environment does not make valid settings.
        """
        return cls(load_settings(config_file, env, overrides), **kw)

    # -- what the engine reads ---------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def role(self) -> Role | None:
        """The role this engine serves now (after its last switch)."""
        return self.coordinator.role if self.coordinator is not None else None

    @property
    def epoch(self) -> int:
        """The plan epoch this engine has applied and acked (0: none yet)."""
        return self.coordinator.applied_epoch if self.coordinator is not None else 0

    @property
    def experts_held(self) -> frozenset[int]:
        return frozenset(self.experts.held) if self.experts is not None else frozenset()

    @property
    def ready(self) -> bool:
        """Can serve transfers (what /readyz says; etcd being away does not count)."""
        return self.readiness is not None and self.readiness.verdict() is None

    # -- how the engine answers ---------------------------------------------------------------
    def on_role_change(self, handler: Handler[RoleChange]) -> None:
        """Call `handler(change)` for every role change (see the module docstring)."""
        self._handlers[RoleChange] = handler

    def on_experts(self, handler: Handler[ExpertChange]) -> None:
        self._handlers[ExpertChange] = handler

    def on_drain(self, handler: Handler[DrainRequest]) -> None:
        self._handlers[DrainRequest] = handler

    async def changes(self) -> AsyncIterator[Change]:
        """Every change from now on, for an engine that answers them itself (``change.done()``)."""
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._streams.append(queue.put_nowait)
        try:
            while True:
                yield await queue.get()
        finally:
            self._streams.remove(queue.put_nowait)

    def subscribe(self, put: Callable[[Change], None]) -> Callable[[], None]:
        """Hand every change to `put` (called in the loop; must not block); returns the undo."""
        self._streams.append(put)
        return lambda: self._streams.remove(put)

    # -- life ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Serve HTTP, join the group, follow its plan and publish load.

        Raises:
            MembershipError, EtcdUnavailableError: could not join within the join timeout.
            OSError: the HTTP address cannot be bound.
        """
        s = self.settings
        secret = self.agent.config.secret
        assert secret is not None  # AgentSettings requires one
        if self.server is not None:
            self.http_port = await self.server.start(s.http_host, s.http_port)
        config = MemberConfig(
            name=s.name,
            group=s.group,
            secret=secret,
            lease_ttl=s.lease_ttl,
            node=s.node,
            instance=s.instance,
            http=s.http_address(self.http_port) if self.server is not None else None,
            drain_timeout=s.drain_timeout,
            join_timeout=s.join_timeout,
        )
        m = self.membership = Membership(s.etcd, config, self.agent)
        self.coordinator = Coordinator(m, planning_config(s.planning), self.experts, self._handshake)
        ready = self.readiness = engine_readiness.Readiness(m, self.ready_checks)
        if self.server is not None:
            c = self.coordinator
            metrics = self.metrics = engine_metrics.AgentMetrics(
                m, self.load, lambda: (c.applied_epoch, c.role, c.overdue), ready
            )
            self.server.routes.update(engine_http.agent_routes(m, metrics, self.coordinator.status, ready))
            server = self.server
            metrics.add_counter(
                "http_accept_errors",
                "Times the HTTP port failed to accept a connection (descriptors or memory ran out).",
                lambda: server.accept_errors,
            )
            self._export_limits(metrics)
        m.subscribe(self._on_event)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch_readiness(), name="weft-readiness"))
        await _join(m)
        await self.coordinator.start()
        self._tasks.append(loop.create_task(self._publish_load(), name="weft-load"))

    async def republish(self) -> None:
        """Publish the member record again: after registering memory, so peers see the regions."""
        if self.membership is not None:
            await self.membership.republish()

    async def stop(self, why: str = "stop") -> None:
        """Drain (the engine finishes its requests, bounded by the drain timeout), leave the
        group, close the fabric and the HTTP endpoint. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        m = self.membership
        if m is not None and m.phase is Phase.JOINED:
            with contextlib.suppress(WeftError):
                await m.drain()  # peers send nothing new from now on
            await self._drain(why, self.settings.drain_timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.coordinator is not None:
            await self.coordinator.stop()
        if m is not None:
            await m.leave()
        await asyncio.to_thread(self.agent.close)
        if self.server is not None:
            await self.server.close()

    async def close(self) -> None:
        """Stop without draining or leaving (the lease runs out): for crash-like exits."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        if self.coordinator is not None:
            await self.coordinator.stop()
        if self.membership is not None:
            with contextlib.suppress(WeftError):
                await self.membership.close()
        await asyncio.to_thread(self.agent.close)
        if self.server is not None:
            await self.server.close()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- inside -------------------------------------------------------------------------------
    def _export_limits(self, metrics: engine_metrics.AgentMetrics) -> None:
        """``weft_fabric_limit_<bound>_total``: how often each bound of the data path was hit."""
        for field in dataclasses.fields(fabric_limits.LimitsHit):
            doc = _LIMIT_DOCS.get(field.name, f"Times the fabric's {field.name} bound was hit.")
            metrics.add_counter(f"fabric_limit_{field.name}", doc, self._limit_reader(field.name))

    def _limit_reader(self, name: str) -> Callable[[], float]:
        return lambda: float(getattr(self.agent.limits_hit(), name))

    def _fabric_health(self) -> str | None:
        """Why the fabric cannot serve new transfers (accepting fails, the inbox is full)."""
        return "; ".join(self.agent.health()) or None

    def _overdue(self) -> str | None:
        c = self.coordinator
        if c is not None and c.overdue and c.pending is not None:
            return f"the engine has not answered: {c.pending}"
        return None

    def _draining(self) -> str | None:
        return f"draining ({self.drain_request.why})" if self.drain_request is not None else None

    async def _watch_readiness(self) -> None:
        """Look at readiness every `READINESS_POLL` s, so each transition is logged (once)
        when it happens, whether or not anything probes."""
        while self.readiness is not None:
            self.readiness.verdict()
            await asyncio.sleep(READINESS_POLL)

    def _on_event(self, ev: MembershipEvent) -> None:
        m = self.membership
        if ev.kind is not EventKind.DRAIN or m is None or ev.name != self.name:
            return
        if self.name not in m.drains:  # withdrawn (scaled back up): the plan gives a role again
            request = self.drain_request
            if request is not None and request.why == "scale-down" and not self._stopped:
                log.info("%s: the scale-down drain was withdrawn", self.name)
                self.drain_request = None
            return
        if self.drain_request is None:
            loop = asyncio.get_running_loop()
            task = loop.create_task(self._drain("scale-down", self.settings.drain_timeout))
            self._tasks = [t for t in self._tasks if not t.done()] + [task]

    async def _drain(self, why: str, timeout: float) -> None:
        if self.drain_request is not None:  # asked already (scale-down, then SIGTERM): wait for that one
            request = self.drain_request
        else:
            request = self.drain_request = DrainRequest(0, time.monotonic() + timeout, why=why)
            log.info("%s: draining (%s)", self.name, why)
        try:
            await asyncio.wait_for(self._handshake(request), max(request.seconds_left, 0.0) + 0.5)
        except TimeoutError:
            log.warning("%s: the engine did not finish draining within %.0f s", self.name, timeout)

    async def _handshake(self, change: Change) -> bool:
        """Hand `change` to the engine (handler, stream, or the SDK's default) and wait for its
        answer; past the deadline say so once, and go on waiting. True when done."""
        answered = change._bind()
        handler = next((h for kind, h in self._handlers.items() if isinstance(change, kind)), None)
        if handler is not None:
            task = asyncio.get_running_loop().create_task(_run_handler(handler, change))
            self._tasks = [t for t in self._tasks if not t.done()] + [task]
        elif self._streams:
            for put in list(self._streams):
                put(change)
        elif self.membership is not None:
            await fabric_drain(self.membership.agent, change)
        said = False
        while not answered.is_set():
            left = change.seconds_left
            if left <= 0 and not said:
                log.warning("%s: the engine has not answered in time: %s (still waiting)", self.name, change)
                said = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), left if left > 0 else None)
        if change.state is ChangeState.DONE:
            log.info("%s: engine did: %s", self.name, change)
        return change.state is ChangeState.DONE

    async def _publish_load(self) -> None:
        """Publish the load figures when they change (at most every `LOAD_INTERVAL`) and at
        least every `LOAD_REFRESH`."""
        m = self.membership
        assert m is not None
        seen, at = -1, 0.0
        while True:
            now = time.monotonic()
            if self.load.version != seen or now - at >= LOAD_REFRESH:
                seen = self.load.version
                r = self.load.snapshot()
                try:
                    await m.put_load(
                        r.queue_depth,
                        r.tokens_per_s,
                        running=r.running,
                        kv_cache_usage=r.kv_cache_usage,
                        ttft_ms=r.ttft_ms,
                        itl_ms=r.itl_ms,
                    )
                    at = now
                except WeftError as exc:  # etcd away: the next round tries again
                    log.debug("%s: load not published: %s", self.name, exc)
            await asyncio.sleep(LOAD_INTERVAL)


async def _run_handler(handler: Handler[Any], change: Change) -> None:
    """Run an engine's handler; returning answers done, raising answers failed."""
    try:
        if inspect.iscoroutinefunction(handler):
            result = await handler(change)
        else:
            result = await asyncio.to_thread(handler, change)
            if inspect.isawaitable(result):
                result = await result
    except Exception as exc:
        log.warning("engine handler for %s raised: %r", change, exc)
        change.failed(f"{type(exc).__name__}: {exc}")
        return
    del result
    change.done()


async def _join(membership: Membership) -> None:
    await membership.start()
    await membership.activate()
    name = membership.config.name

    def sees_itself_active() -> bool:
        me = membership.members.get(name)
        return me is not None and me.record.state is MemberState.ACTIVE

    # the watch brings our own record back: once it has, the view is live end to end
    try:
        await membership.wait_for(sees_itself_active, _SELF_ECHO_TIMEOUT)
    except TimeoutError:
        log.warning("%s: its own active record has not come back through the watch yet", name)
