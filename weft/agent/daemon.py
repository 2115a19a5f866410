"""`weft agent`: the node agent daemon, from settings to a drained exit.

One process per node (or pod), and one user of the engine SDK (`weft.engine.Engine`) with no
engine behind it: a fabric `Agent` that moves the bytes, a `Membership` that keeps its record
in etcd and its peers in step with the group, the plan coordinator, and an HTTP endpoint for
the kubelet and Prometheus. What the daemon adds is a process's life around them:

1. the optional ``kv-pool`` region (anonymous memory, or a file on the pod's shared memory
   volume that the engine container maps too: sidecar mode);
2. `Engine.start`: bind the HTTP endpoint first, so /healthz answers while the join waits
   for etcd, then join (``joining``) and publish ``active``: only then is /readyz 200;
3. on SIGTERM or SIGINT (or `stop`), `Engine.stop`: publish ``draining`` so peers send
   nothing new, wait (bounded by ``drain_timeout``) for transfers in flight, delete the member
   key and revoke the lease, so peers drop this agent at once instead of after the lease TTL;
4. in sidecar mode (`weft.agent.sidecar`), the link to the engine next to it: its metrics
   become this member's load, and role switches and drains are posted to its hook;
5. exit codes that say why it ended, and a ready file for scripts and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import signal
from collections.abc import Coroutine, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weft.agent import inbox
from weft.agent.sidecar import Sidecar
from weft.api.agent_settings import AgentSettings
from weft.engine import Engine, ExpertSource, load_settings
from weft.fabric.agent import Agent
from weft.fabric.errors import ConfigError, WeftError
from weft.membership import errors as membership_errors

log = logging.getLogger(__name__)

EXIT_OK = 0
"""Drained and left (or stopped before joining)."""
EXIT_FAILED = 1
"""Could not start or join: bad settings or command line, a kv-pool larger than the memory
available, a missing expert source, a name held by a live member, etcd refused us."""
EXIT_ETCD_UNREACHABLE = 2
"""No etcd endpoint answered within the join deadline (an `EtcdUnavailableError` from the join,
or a `MembershipError` caused by one)."""


KV_POOL_REGION = "kv-pool"  # the region `AgentSettings.kv_pool_bytes` registers
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


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
    return load_settings(config_file, env, overrides)


@dataclass
class _Running:
    """What `run_agent` has started so far, for the teardown to undo."""

    engine: Engine | None = None
    left: bool = False
    background: list[asyncio.Task[None]] = field(default_factory=list)


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
    except ConfigError as exc:  # SettingsError is one
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
        for sig in signals:
            loop.remove_signal_handler(sig)
        for task in running.background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if running.engine is not None and not running.left:
            await running.engine.close()
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
    engine = running.engine = Engine(settings)
    if settings.kv_pool_bytes:
        _kv_pool(engine.agent, settings)
    sidecar = Sidecar(engine, settings.engine_metrics_url, settings.engine_hook_url)
    dropper = inbox.Dropper(engine.agent)
    dropping = asyncio.get_running_loop().create_task(dropper.run(), name="weft-inbox")
    running.background.append(dropping)
    alog.info(
        "starting: fabric on %s:%d (%s), etcd %s",
        settings.fabric_host,
        engine.agent.port,
        ",".join(b.value for b in engine.agent.backends),
        ",".join(settings.etcd.endpoints),
    )
    if not await _unless_stopped(engine.start(), stop):
        alog.info("stopped before it joined")
        return EXIT_OK
    membership = engine.membership
    assert membership is not None
    if engine.metrics is not None:
        engine.metrics.add_counter(
            "notifications_dropped",
            "Notifications peers sent this daemon, dropped (no engine in its process takes them).",
            lambda: dropper.dropped,
        )
        engine.metrics.add_counter(
            "notification_bytes_dropped", "Bytes of the notifications dropped.", lambda: dropper.dropped_bytes
        )
    alog.info(
        "active as generation %d, http on %s:%d", membership.generation, settings.http_host, engine.http_port
    )
    if ready_file is not None:
        _write_ready_file(
            ready_file,
            {
                "pid": os.getpid(),
                "name": settings.name,
                "http": membership.config.http,
                "http_port": engine.http_port,
                "fabric_port": engine.agent.port,
                "generation": membership.generation,
            },
        )
    scraping = asyncio.get_running_loop().create_task(sidecar.run(), name="weft-engine-scrape")
    await stop.wait()
    scraping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await scraping
    alog.info("draining: %d transfers in flight", engine.agent.in_flight())
    await engine.stop("SIGTERM")
    running.left = True
    alog.info("left the group")
    return EXIT_OK


def preflight(settings: AgentSettings, meminfo: Path = MEMINFO, cgroup: Path = CGROUP) -> None:
    """Check what the settings ask of this machine before anything starts: the ``kv-pool``
    fits in the memory available (or the free space of its file's filesystem), and the expert
    source exists.

    Args:
        settings: the agent's settings.
        meminfo: ``/proc/meminfo`` (tests pass another).
        cgroup: the cgroup v2 directory whose ``memory.max`` limits this process.
    Raises:
        ConfigError: naming the setting, what it asks and what there is.
    """
    need = settings.kv_pool_bytes
    if need:
        if settings.kv_pool_file is None:
            have, where = available_memory(meminfo, cgroup)
            what = "kv_pool_bytes"
        else:
            have, where = _free_space(settings.kv_pool_file)
            what = f"kv_pool_bytes (in kv_pool_file {settings.kv_pool_file})"
        if have is not None and need > have:
            raise ConfigError(f"{what}: {_size(need)} does not fit: {_size(have)} available ({where})")
    if settings.planning.experts and settings.planning.expert_source:
        ExpertSource.parse(settings.planning.expert_source).check()


def available_memory(meminfo: Path = MEMINFO, cgroup: Path = CGROUP) -> tuple[int | None, str]:
    """Bytes this process may still allocate: the smaller of ``MemAvailable`` and what its
    cgroup's ``memory.max`` leaves above ``memory.current``; (None, "") when neither is known.
    Returns (bytes, where the figure came from)."""
    best: tuple[int | None, str] = (None, "")
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                best = (int(line.split()[1]) * 1024, f"MemAvailable in {meminfo}")
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text().strip())
            if best[0] is None or left < best[0]:
                best = (max(left, 0), f"the cgroup limit {cgroup}/memory.max")
    except (OSError, ValueError):
        pass
    return best


def _free_space(path: Path) -> tuple[int | None, str]:
    """Free bytes of the filesystem `path` (or its directory) lies on, counting the file itself."""
    try:
        existing = path.stat().st_blocks * 512 if path.exists() else 0
        st = os.statvfs(path.parent)
    except OSError:
        return None, ""  # `_kv_pool` names the path when it fails
    return st.f_bavail * st.f_frsize + existing, f"free space of the filesystem of {path.parent}"


def _size(n: int) -> str:
    return f"{n} bytes ({n / (1 << 30):.1f} GiB)"


def _kv_pool(agent: Agent, settings: AgentSettings) -> None:
    """Register the ``kv-pool`` region: anonymous memory, or (``kv_pool_file``) a file mapped
    shared, which an engine in the same pod maps too (sidecar mode).

    Raises:
        ConfigError: the file cannot be created or sized (the path named).
    """
    path = settings.kv_pool_file
    if path is None:
        try:
            agent.alloc(settings.kv_pool_bytes, KV_POOL_REGION)
        except MemoryError:
            raise ConfigError(f"kv_pool_bytes: cannot allocate {_size(settings.kv_pool_bytes)}") from None
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, settings.kv_pool_bytes)
            pool = mmap.mmap(fd, settings.kv_pool_bytes, mmap.MAP_SHARED)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError(f"kv_pool_file {path}: {exc.strerror or exc}") from exc
    agent.register(pool, KV_POOL_REGION)


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
