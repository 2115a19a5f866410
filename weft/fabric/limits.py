"""The bounds an agent keeps on what peers (and strangers) may make it hold, and their counters.

A stranger that connects and says nothing holds a file descriptor and a thread until the
handshake deadline; a peer holding the group token can ask for device-sized host staging
with one small header, or fill the notification inbox. Each of these is bounded by a setting
of `AgentConfig`, and every time a bound is hit a counter moves (`LimitsHit`), so an operator
can tell a hostile or overloaded agent from a slow one. `Guarded` gives the `Agent` its
`health()` and `limits_hit()`: why it cannot serve new transfers now, and the counters.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Protocol

#: Host staging one request takes at most at a time; device spans stream through it.
STAGING_CHUNK = 16 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class LimitsHit:
    """How often each bound of an agent was hit since it started.

    Attributes:
        unauthenticated: connections closed on accept because `max_unauthenticated`
            connections were already waiting to finish their handshake (or `MAX_INBOUND`
            connections were open).
        accept_failures: accepts that failed for want of descriptors, memory or a thread.
        descriptors: requests dropped for carrying more than `max_descriptors` descriptors.
        staging: requests refused because no staging memory was free within `staging_timeout`.
        inbox_full: notifications refused because the inbox stayed full for `inbox_full_timeout`.
    """

    unauthenticated: int = 0
    accept_failures: int = 0
    descriptors: int = 0
    staging: int = 0
    inbox_full: int = 0


class Counters:
    """The thread-safe counters behind `LimitsHit`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {f.name: 0 for f in dataclasses.fields(LimitsHit)}

    def hit(self, name: str) -> None:
        """Count one more hit of bound `name` (a `LimitsHit` field)."""
        with self._lock:
            self._counts[name] += 1

    def snapshot(self) -> LimitsHit:
        with self._lock:
            return LimitsHit(**self._counts)


class Staging:
    """Host memory for device copies, shared by all of an agent's inbound connections.

    Args:
        budget: bytes that may be held at once.
    """

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._held = 0
        self._cond = threading.Condition()

    @property
    def held(self) -> int:
        """Bytes held now."""
        with self._cond:
            return self._held

    def acquire(self, want: int, timeout: float) -> bytearray | None:
        """A staging buffer of ``min(want, STAGING_CHUNK, budget)`` bytes, or None when that
        much did not come free within `timeout` seconds. Give it back with `release`."""
        size = min(want, STAGING_CHUNK, self._budget)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._held + size > self._budget:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            self._held += size
        try:
            return bytearray(size)
        except MemoryError:
            self.release(size)
            return None

    def release(self, size: int) -> None:
        with self._cond:
            self._held -= size
            self._cond.notify_all()


class Troubled(Protocol):
    """A part of an agent that can be unable to do its job for a while (listener, inbox)."""

    def trouble(self) -> str | None:
        """Why it cannot do its job now, or None."""
        ...


class Guarded:
    """The health half of an agent (`weft.fabric.Agent` inherits it): what keeps it from
    serving new transfers now, and how often its bounds were hit. Its state: the parts that
    can be in trouble (listener, inbox) and the counters."""

    _troubled: tuple[Troubled, ...]
    _limits: Counters

    def health(self) -> tuple[str, ...]:
        """Why this agent cannot serve new transfers right now; empty when it can.

        Returns:
            human-readable reasons, e.g. "data port cannot accept connections: [Errno 24]
            Too many open files (since 12 s)" or "notification inbox full: 512
            notifications / 500 MiB".
        """
        return tuple(r for r in (part.trouble() for part in self._troubled) if r)

    def limits_hit(self) -> LimitsHit:
        """How often each of this agent's bounds was hit since it started (see `LimitsHit`)."""
        return self._limits.snapshot()
