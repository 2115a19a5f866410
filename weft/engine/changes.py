"""What the SDK asks of an engine, and how the engine answers: one handshake per change.

A plan that moves this member, an expert set that changes, a drain: each reaches the engine
as a `Change`, and the SDK waits until the engine calls `Change.done` (or its handler
returns) before it acts on it: before it publishes the new role and acks the plan's epoch,
before it leaves the group. So the leader, the operator and `weft status` see a member
switched only once its engine has really switched.

`done` and `failed` may be called from any thread (a synchronous engine answers from its own
threads); the waiting side is the SDK's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from weft.api.vocab import Role


class ChangeState(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(eq=False)
class Change:
    """One request to the engine. Answer it once, with `done()` or `failed(reason)`.

    Attributes:
        epoch: the plan epoch it belongs to (0 for a drain that no plan asked for).
        deadline: ``time.monotonic()`` by which the SDK expects the answer; past it, the SDK
            says so (log, /readyz, metric) and goes on waiting.
    """

    epoch: int
    deadline: float
    state: ChangeState = field(default=ChangeState.PENDING, init=False)
    reason: str = field(default="", init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _answered: asyncio.Event | None = field(default=None, init=False, repr=False)

    @property
    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def done(self) -> None:
        """The engine has done what the change asks (any thread)."""
        self._answer(ChangeState.DONE, "")

    def failed(self, reason: str) -> None:
        """The engine cannot do it; the SDK does not ack, logs `reason` and asks again later."""
        self._answer(ChangeState.FAILED, reason)

    def _answer(self, state: ChangeState, reason: str) -> None:
        if self.state is not ChangeState.PENDING:
            return
        self.state, self.reason = state, reason
        loop, answered = self._loop, self._answered
        if loop is not None and answered is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(answered.set)

    def _bind(self) -> asyncio.Event:
        """Called by the SDK in its loop before the change is handed out."""
        self._loop = asyncio.get_running_loop()
        self._answered = asyncio.Event()
        if self.state is not ChangeState.PENDING:
            self._answered.set()
        return self._answered


@dataclass(eq=False)
class RoleChange(Change):
    """Switch from `old` to `new` (None: the plan gives this member no role, as before it is
    scaled down): finish or hand off the requests of the old role, then answer."""

    old: Role | None = None
    new: Role | None = None

    def __str__(self) -> str:
        return f"switch from {self.old or 'no role'} to {self.new or 'no role'} at epoch {self.epoch}"


@dataclass(eq=False)
class ExpertChange(Change):
    """The plan's experts for this member changed.

    Attributes:
        added: expert id -> its weights, pulled from a peer or the store and verified by
            digest; a read-only view of fabric-registered memory, valid until the expert is
            released. Load them, then answer.
        removed: experts this plan no longer gives this member: stop routing to them (their
            memory stays one more plan, for peers still pulling).
        released: experts whose memory the SDK frees now (removed one plan ago).
    """

    added: Mapping[int, memoryview] = field(default_factory=dict)
    removed: frozenset[int] = frozenset()
    released: frozenset[int] = frozenset()

    def __str__(self) -> str:
        return (
            f"experts at epoch {self.epoch}: +{sorted(self.added)} -{sorted(self.removed)} "
            f"freed {sorted(self.released)}"
        )


@dataclass(eq=False)
class DrainRequest(Change):
    """Stop taking new requests; finish or hand off the running ones, then answer.

    `why`: ``scale-down`` (the operator planned this member out), ``SIGTERM``, ``stop``. A
    scale-down the operator withdraws (scaled back up) ends with a `RoleChange` that gives
    the member a role again: serve it."""

    why: str = ""

    def __str__(self) -> str:
        return f"drain ({self.why})"
