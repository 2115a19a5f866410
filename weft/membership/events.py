"""What changed in a member's view, told to whoever listens: one event type, one bus.

Listeners (the planning coordinator, benchmarks, tests) and the ``/status`` document read the
same `MembershipEvent`s; the kinds are an `EventKind` so a listener compares enum members, and
the strings stay what ``/status`` showed before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from weft.api.vocab import EventKind

__all__ = ["EventBus", "EventKind", "MembershipEvent"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MembershipEvent:
    """Something that changed in this agent's view (also what tests and benchmarks time).

    For a plan, `name` is the leader that wrote it and `generation` the plan's epoch.
    """

    kind: EventKind
    name: str
    generation: int
    reason: str
    at: float  # time.time()


class EventBus:
    """The last events, the listeners, and a wake-up for `wait_for`.

    Args:
        owner: the member's name, for the log.
        keep: how many events to keep.
    """

    def __init__(self, owner: str, keep: int = 1000) -> None:
        self.owner = owner
        self.events: deque[MembershipEvent] = deque(maxlen=keep)
        self.changed = asyncio.Event()
        self._listeners: list[Callable[[MembershipEvent], None]] = []

    def subscribe(self, listener: Callable[[MembershipEvent], None]) -> None:
        """Call `listener` (in the loop) for every event."""
        self._listeners.append(listener)

    def emit(self, kind: EventKind | str, name: str, generation: int, reason: str) -> MembershipEvent:
        """Record an event, log it, tell every listener (a failing one is logged) and wake waiters.

        Raises:
            ValueError: `kind` is not an `EventKind`.
        """
        ev = MembershipEvent(EventKind(kind), name, generation, reason, time.time())
        self.events.append(ev)
        log.info("%s: %s %s (generation %d): %s", self.owner, ev.kind, name, generation, reason)
        for listener in self._listeners:
            try:
                listener(ev)
            except Exception:
                log.exception("membership listener failed")
        self.changed.set()
        return ev

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until `predicate()` holds, re-checked on every change.

        Raises:
            TimeoutError: it did not hold within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("membership condition not reached in time")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.25))
