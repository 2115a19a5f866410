"""`weft agent`: the node agent daemon, from settings to a drained exit.

One process per node (or pod): a fabric `Agent` that moves the bytes, a `Membership` that keeps
its record in etcd and its peers in step with the group, and an HTTP endpoint for the kubelet
and Prometheus. The order matters and is kept here in one place:

1. bind the HTTP endpoint first, so /healthz answers while the join waits for etcd and the
   member record can carry the endpoint's address;
2. join (``joining``), then publish ``active``: only then is /readyz 200;
3. on SIGTERM or SIGINT (or `stop`), drain: publish ``draining`` so peers send nothing new,
   wait (bounded by ``drain_timeout``) for transfers in flight, delete the member key and
   revoke the lease, so peers drop this agent at once instead of after the lease TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Coroutine, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weft.agent import http as agent_http
from weft.agent import metrics as agent_metrics
from weft.agent.coordinator import Coordinator, PlanningConfig
from weft.agent.experts import ExpertHolder, ExpertSource
from weft.api import agent_settings
from weft.api.agent_settings import AgentSettings
from weft.api.vocab import MemberState
from weft.fabric.agent import Agent
from weft.fabric.config import AgentConfig
from weft.fabric.errors import ConfigError, WeftError
from weft.membership import errors as membership_errors
from weft.membership.member import MemberConfig, Membership
from weft.planner import ExpertSpec, RatioPolicy

log = logging.getLogger(__name__)

EXIT_OK = 0
"""Drained and left (or stopped before joining)."""
EXIT_FAILED = 1
"""Could not start or join: bad settings, a name held by a live member, etcd refused us."""
EXIT_ETCD_UNREACHABLE = 2
"""No etcd endpoint answered within the join deadline (an `EtcdUnavailableError` from the join,
or a `MembershipError` caused by one)."""


_SELF_ECHO_TIMEOUT = 5.0
KV_POOL_REGION = "kv-pool"  # the region `AgentSettings.kv_pool_bytes` registers


class _AgentLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with ``namespace/group name``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"{extra.get('group')} {extra.get('agent')}: {msg}", kwargs


def load_agent_settings(
    config_file: Path | None, env: Mapping[str, str], overrides: Mapping[str, Any]
) -> AgentSettings:
    """The agent's settings: flags (`overrides`) > `env` > `config_file` > defaults.

    The join token is read once here too, so a missing or short token file fails now.
    See `weft.api.agent_settings` for the file format and the environment variables.

    Args:
        config_file: YAML (or ``.json``) file shaped like `AgentSettings`, or None.
        env: the environment, usually ``os.environ``.
        overrides: values from flags, nested like the file; None values count as not given.
    Returns:
        The validated settings.
    Raises:
        ConfigError: naming the bad field and the source of its value.
    """
    try:
        settings = agent_settings.resolve_settings(
            AgentSettings, config_file=config_file, env=env, overrides=overrides
        )
        settings.join_token()
    except agent_settings.SettingsError as exc:
        raise ConfigError(str(exc)) from exc
    return settings


@dataclass
class _Running:
    """What `run_agent` has started so far, for the teardown to undo in reverse."""

    server: agent_http.HttpServer = field(default_factory=agent_http.HttpServer)
    agent: Agent | None = None
    membership: Membership | None = None
    coordinator: Coordinator | None = None
    left: bool = False


async def run_agent(
    settings: AgentSettings, *, ready_file: Path | None = None, stop: asyncio.Event | None = None
) -> int:
    """Run the node agent until SIGTERM/SIGINT (or `stop` is set), then drain and leave.

    Args:
        settings: the agent's settings (`load_agent_settings`).
        ready_file: once the agent is active, write JSON there: ``{"pid", "name", "http",
            "http_port", "fabric_port", "generation"}`` (written atomically, removed on exit).
            For tests and scripts that start the agent as a process.
        stop: set it to stop the agent as SIGTERM would (signals are caught only when this
            runs in the main thread).
    Returns:
        `EXIT_OK` after a drained exit, `EXIT_FAILED` when the agent could not start or
        join, `EXIT_ETCD_UNREACHABLE` when etcd did not answer within the join deadline.
    """
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    alog = _AgentLog(
        log, {"group": f"{settings.group.namespace}/{settings.group.group}", "agent": settings.name}
    )
    signals = _catch_signals(loop, stop, alog)
    running = _Running()
    try:
        return await _serve(settings, running, stop, ready_file, alog)
    except (ConfigError, agent_settings.SettingsError) as exc:
        alog.error("bad settings: %s", exc)
        return EXIT_FAILED
    except membership_errors.EtcdUnavailableError as exc:
        alog.error("etcd is unreachable: %s", exc)
        return EXIT_ETCD_UNREACHABLE
    except membership_errors.MembershipError as exc:
        alog.error("could not join: %s", exc)
        unreachable = isinstance(exc.__cause__, membership_errors.EtcdUnavailableError)
        return EXIT_ETCD_UNREACHABLE if unreachable else EXIT_FAILED
    except (WeftError, OSError) as exc:
        alog.error("could not start: %s", exc)
        return EXIT_FAILED
    finally:
        if running.coordinator is not None:
            await running.coordinator.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)
        if running.membership is not None and not running.left:
            with contextlib.suppress(WeftError):
                await running.membership.close()
        if running.agent is not None:
            await asyncio.to_thread(running.agent.close)
        await running.server.close()
        if ready_file is not None:
            _remove_ready_file(ready_file)


async def _serve(
    settings: AgentSettings,
    running: _Running,
    stop: asyncio.Event,
    ready_file: Path | None,
    alog: _AgentLog,
) -> int:
    """Start, join, serve until `stop`, drain and leave (the happy path of `run_agent`)."""
    config, http_port = await _start(settings, running, alog)
    agent, membership, coordinator = running.agent, running.membership, running.coordinator
    assert agent is not None and membership is not None and coordinator is not None
    if not await _unless_stopped(_join(membership), stop):
        alog.info("stopped before it joined")
        return EXIT_OK
    await coordinator.start()
    alog.info("active as generation %d", membership.generation)
    if ready_file is not None:
        _write_ready_file(
            ready_file,
            {
                "pid": os.getpid(),
                "name": settings.name,
                "http": config.http,
                "http_port": http_port,
                "fabric_port": agent.port,
                "generation": membership.generation,
            },
        )
    await stop.wait()
    await coordinator.stop()
    alog.info("draining: %d transfers in flight", agent.in_flight())
    await membership.leave()
    running.left = True
    alog.info("left the group")
    return EXIT_OK


async def _start(settings: AgentSettings, running: _Running, alog: _AgentLog) -> tuple[MemberConfig, int]:
    """The fabric agent, the HTTP endpoint, the membership and the coordinator, in that order.

    Returns:
        The membership's config and the HTTP port bound.
    """
    fabric_config = AgentConfig.from_settings(settings)
    secret = fabric_config.secret
    assert secret is not None  # AgentSettings requires one
    agent = running.agent = Agent(settings.name, fabric_config)
    if settings.kv_pool_bytes:
        agent.alloc(settings.kv_pool_bytes, KV_POOL_REGION)
    http_port = await running.server.start(settings.http_host, settings.http_port)
    config = MemberConfig(
        name=settings.name,
        group=settings.group,
        secret=secret,
        lease_ttl=settings.lease_ttl,
        node=settings.node,
        instance=settings.instance,
        http=settings.http_address(http_port),
        drain_timeout=settings.drain_timeout,
        join_timeout=settings.join_timeout,
    )
    membership = running.membership = Membership(settings.etcd, config, agent)
    holder = None
    if settings.planning.experts and settings.planning.expert_source:
        holder = ExpertHolder(agent, ExpertSource.parse(settings.planning.expert_source))
    coordinator = running.coordinator = Coordinator(membership, planning_config(settings.planning), holder)
    # no await since the server started: the routes are in place before any request runs
    running.server.routes.update(
        agent_http.agent_routes(membership, agent_metrics.AgentMetrics(membership), coordinator.status)
    )
    alog.info(
        "starting: fabric on %s:%d (%s), http on %s:%d, etcd %s",
        settings.fabric_host,
        agent.port,
        ",".join(b.value for b in agent.backends),
        settings.http_host,
        http_port,
        ",".join(settings.etcd.endpoints),
    )
    return config, http_port


def planning_config(p: agent_settings.PlanningSettings) -> PlanningConfig:
    """The planner's policy from the agent's settings."""
    policy = RatioPolicy.parse(
        p.ratio,
        min_prefill=p.min_prefill,
        min_decode=p.min_decode,
        gpu_less_roles=frozenset(p.gpu_less_roles),
    )
    experts = ExpertSpec(p.experts, p.replication, p.redundant_slots) if p.experts else None
    return PlanningConfig(policy, experts, debounce=p.debounce)


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


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run `work` unless `stop` is set first (then cancel it). True when `work` finished."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopped
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()  # raises what the work raised
    return True


def _catch_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, alog: _AgentLog) -> list[int]:
    """SIGTERM and SIGINT set `stop`; returns the signals caught (none outside the main thread)."""

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            alog.warning("%s again: already draining", sig.name)
            return
        alog.info("%s: draining and leaving", sig.name)
        stop.set()

    caught = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            alog.debug("cannot catch %s here (%s); stop with the event", sig.name, exc)
            continue
        caught.append(int(sig))
    return caught


def _write_ready_file(path: Path, info: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def _remove_ready_file(path: Path) -> None:
    path.unlink(missing_ok=True)
