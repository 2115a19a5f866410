"""`SyncEngine`: the engine SDK for engines without an asyncio loop of their own.

The SDK's loop runs in one daemon thread ("weft-engine"): the lease, the watch, heartbeats
and the plan live there, so a busy engine thread never lets the lease lapse. Calls from the
engine's threads are bounded (`timeout`, default from the settings); changes reach the
engine through handlers (plain functions run in a worker thread) or `changes()`, a blocking
iterator the engine drains from its own thread, answering each with ``change.done()``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from weft.api.vocab import Role
from weft.engine.changes import Change
from weft.engine.engine import Engine
from weft.engine.load import LoadTracker
from weft.fabric.agent import Agent

T = TypeVar("T")

_SLACK = 5.0  # seconds beyond the SDK's own deadline before a blocked call gives up


class SyncEngine:
    """An `Engine` driven from plain threads.

    Use: ``with SyncEngine.from_env() as engine: ...`` (joins on enter, drains and leaves on
    exit), or `start` and `stop`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="weft-engine", daemon=True)

    @classmethod
    def from_env(cls, **kw: Any) -> SyncEngine:
        """`Engine.from_env` with the same arguments, driven from threads.

        Raises:
            ConfigError: the environment does not make valid settings.
        """
        return cls(Engine.from_env(**kw))

    # -- what the engine reads (plain attributes: safe to read from any thread) ----------------
    @property
    def agent(self) -> Agent:
        return self.engine.agent

    @property
    def load(self) -> LoadTracker:
        return self.engine.load

    @property
    def role(self) -> Role | None:
        return self.engine.role

    @property
    def epoch(self) -> int:
        return self.engine.epoch

    @property
    def experts_held(self) -> frozenset[int]:
        return self.engine.experts_held

    @property
    def draining(self) -> bool:
        return self.engine.drain_request is not None

    # -- how the engine answers (plain functions run in a worker thread) -----------------------
    def on_role_change(self, handler: Any) -> None:
        self.engine.on_role_change(handler)

    def on_experts(self, handler: Any) -> None:
        self.engine.on_experts(handler)

    def on_drain(self, handler: Any) -> None:
        self.engine.on_drain(handler)

    # -- life ----------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> SyncEngine:
        """Join the group (bounded by the join timeout).

        Raises:
            MembershipError, EtcdUnavailableError: could not join. TimeoutError: the SDK's
            loop did not answer in time.
        """
        self._thread.start()
        self._run(self.engine.start(), timeout or self.engine.settings.join_timeout + _SLACK)
        return self

    def stop(self, why: str = "stop", timeout: float | None = None) -> None:
        """Drain (the engine answers the `DrainRequest`), leave, and end the SDK's thread."""
        if not self._thread.is_alive():
            return
        try:
            limit = timeout or self.engine.settings.drain_timeout * 2 + _SLACK
            self._run(self.engine.stop(why), limit)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_SLACK)
            if not self._thread.is_alive():
                self._loop.close()

    def republish(self, timeout: float = 10.0) -> None:
        """Publish the member record again (after registering memory)."""
        self._run(self.engine.republish(), timeout)

    def changes(self, timeout: float | None = None) -> Iterator[Change]:
        """Changes as they come; ends after `timeout` seconds without one (None: never), or
        when the engine stops."""
        inbox: queue.Queue[Change] = queue.Queue()
        undo = self._run(self._subscribe(inbox.put_nowait), 10.0)
        try:
            while self._thread.is_alive():
                try:
                    yield inbox.get(timeout=timeout if timeout is not None else 1.0)
                except queue.Empty:
                    if timeout is not None:
                        return
        finally:
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(undo)

    async def _subscribe(self, put: Any) -> Any:
        return self.engine.subscribe(put)

    def __enter__(self) -> SyncEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)
