"""Transfer handles: post, wait (threads or asyncio), deadlines, release.

A `Transfer` is one posted request. Backends end it from their own threads with
`complete` (exactly once: later calls have no effect); waiters block on an event or an
asyncio future. Deadlines are enforced lazily (any look at the state past the deadline
fails the transfer) and by waits, so no timer thread is needed and no transfer can outlive
its deadline unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from weft.api.vocab import StorageBackend
from weft.fabric import errors
from weft.fabric.types import Backend, Op, TransferState

if TYPE_CHECKING:
    from weft.fabric.memory import DescList

#: How a prepared transfer is posted: (itself, its plan, notification, timeout) -> Transfer.
Poster = Callable[["PreparedTransfer", Any, "bytes | None", "float | None"], "Transfer"]


class Transfer:
    """One posted READ or WRITE. Ends DONE or ERROR (with a `WeftError` in `error`)."""

    __slots__ = (
        "__weakref__",
        "_assist",
        "_callbacks",
        "_cancel_hook",
        "_event",
        "_lock",
        "_state",
        "backend",
        "deadline",
        "error",
        "nbytes",
        "op",
        "peer",
        "t_done",
        "t_posted",
    )

    def __init__(
        self, op: Op, peer: str, nbytes: int, timeout: float, backend: Backend | StorageBackend
    ) -> None:
        self.op = op
        self.peer = peer
        self.nbytes = nbytes
        self.backend = backend
        self.t_posted = time.monotonic()
        self.deadline = self.t_posted + timeout
        self.t_done: float | None = None
        self.error: errors.WeftError | None = None
        self._state = TransferState.POSTED
        self._event: threading.Event | None = None  # made by the first waiter (most never wait)
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._cancel_hook: Callable[[], None] | None = None
        self._assist: Callable[[], bool] | None = None

    # -- state -------------------------------------------------------------------------
    @property
    def state(self) -> TransferState:
        if self._state is TransferState.POSTED and time.monotonic() > self.deadline:
            self._expire()
        return self._state

    def done(self) -> bool:
        """True once the transfer ended (DONE or ERROR)."""
        return self.state is not TransferState.POSTED

    @property
    def elapsed(self) -> float | None:
        """Seconds from post to completion (None while in flight)."""
        return None if self.t_done is None else self.t_done - self.t_posted

    def complete(self, error: errors.WeftError | None = None) -> bool:
        """End the transfer: DONE without `error`, ERROR with it. Backends call this.

        Exactly once takes effect: the first call sets the state, wakes waiters and runs the
        callbacks; every later call (a late answer after a timeout, a second error) is ignored.

        Args:
            error: why the transfer failed; None when every byte is in place.
        Returns:
            True if this call ended the transfer, False if it had already ended.
        """
        with self._lock:
            if self._state is not TransferState.POSTED:
                return False
            self.t_done = time.monotonic()
            self.error = error
            self._state = TransferState.DONE if error is None else TransferState.ERROR
            callbacks, self._callbacks = self._callbacks, []
            self._cancel_hook = None
            event = self._event
        if event is not None:
            event.set()
        for cb in callbacks:
            cb()
        return True

    def _waiter(self) -> threading.Event:
        """The event `wait` blocks on, made on first use (set at once if already ended)."""
        with self._lock:
            if self._event is None:
                self._event = threading.Event()
                if self._state is not TransferState.POSTED:
                    self._event.set()
            return self._event

    def _expire(self) -> None:
        waited = time.monotonic() - self.t_posted
        hook = self._cancel_hook
        if (
            self.complete(
                errors.TransferTimeoutError(
                    f"{self.op.value} of {self.nbytes} bytes to {self.peer!r} did not finish "
                    f"within its deadline ({waited:.3f} s)"
                )
            )
            and hook is not None
        ):
            hook()

    def on_done(self, cb: Callable[[], None]) -> None:
        """Run `cb()` once the transfer ends (at once if it already has), on the ending thread."""
        with self._lock:
            if self._state is TransferState.POSTED:
                self._callbacks.append(cb)
                return
        cb()

    def on_cancel(self, hook: Callable[[], None] | None) -> None:
        """Set what a backend runs when the transfer ends early (deadline passed or released):
        typically forgetting the request so a late answer is dropped. None clears it."""
        self._cancel_hook = hook

    def on_assist(self, helper: Callable[[], bool] | None) -> None:
        """Set what `assist` runs: a backend's way to let a waiting or polling caller do one
        queued piece of this transfer's work itself (returns False when none is left)."""
        self._assist = helper

    def assist(self) -> bool:
        """Do one queued piece of this transfer's work in the calling thread, if there is one.

        Caller-driven completion: a thread that polls or waits would otherwise only compete
        for the CPU with the workers doing the copies; here it does one of them. Returns
        True if it did some work (there may be more), False if nothing was left to take.
        """
        helper = self._assist
        return helper is not None and self._state is TransferState.POSTED and helper()

    # -- waiting -----------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> Transfer:
        """Block until the transfer ends.

        Args:
            timeout: seconds to wait at most; the transfer's own deadline applies too. When
                the wait runs out first the transfer is abandoned (ERROR, timeout).
        Returns:
            self, DONE.
        Raises:
            WeftError: the transfer's error (`TransferTimeoutError`, `PeerLostError`, ...).
        """
        limit = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        while time.monotonic() < limit and self.assist():
            pass
        event = self._waiter()
        while not event.wait(max(0.0, limit - time.monotonic())):
            if time.monotonic() >= limit:
                self._expire()
                break
        return self._result()

    async def wait_async(self, timeout: float | None = None) -> Transfer:
        """`wait` for asyncio; `await transfer` does the same with the transfer's deadline."""
        if self._state is TransferState.POSTED:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                def set_result() -> None:
                    if not fut.done():
                        fut.set_result(None)

                with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                    loop.call_soon_threadsafe(set_result)

            self.on_done(wake)
            now = time.monotonic()
            limit = self.deadline if timeout is None else min(self.deadline, now + timeout)
            try:
                await asyncio.wait_for(fut, max(0.0, limit - now))
            except TimeoutError:
                self._expire()
        return self._result()

    def __await__(self) -> Any:
        return self.wait_async().__await__()

    def _result(self) -> Transfer:
        if self._state is TransferState.ERROR:
            assert self.error is not None
            raise self.error
        return self

    # -- lifetime ----------------------------------------------------------------------
    def release(self) -> None:
        """Give the handle back; a transfer still in flight is cancelled (its late bytes may
        still land in local memory, as with any RDMA library: quiesce before reusing it)."""
        hook = self._cancel_hook
        cancelled = self.complete(errors.TransferCancelledError("transfer released before it finished"))
        if cancelled and hook is not None:
            hook()

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"<Transfer {self.op.value} {self.nbytes}B -> {self.peer} "
            f"{self._state.value} via {self.backend.value}>"
        )


class PreparedTransfer:
    """A request validated and laid out once, posted many times (NIXL's prepared handle)."""

    __slots__ = ("_plan", "_poster", "local", "nbytes", "notify", "op", "peer", "remote")

    def __init__(
        self,
        poster: Poster,
        op: Op,
        local: DescList,
        peer: str,
        remote: DescList,
        notify: bytes | None,
        plan: Any,
    ) -> None:
        self._poster = poster
        self.op = op
        self.local = local
        self.nbytes = local.total  # a batch (`Agent.prepare_batch`) sets the sum of its pairs
        self.peer = peer
        self.remote = remote
        self.notify = notify
        self._plan: Any = plan

    def post(self, notify: bytes | None = None, timeout: float | None = None) -> Transfer:
        """Start the transfer again.

        Args:
            notify: a notification for this post (default: the one given to `prepare`).
            timeout: deadline in seconds (default: the agent's `transfer_timeout`).
        """
        if self._plan is None:
            raise errors.RegistrationError("prepared transfer was released")
        return self._poster(self, self._plan, self.notify if notify is None else notify, timeout)

    def plan_for_post(self) -> Any:
        """The laid-out request (`Agent.post_many`). Raises RegistrationError once released."""
        if self._plan is None:
            raise errors.RegistrationError("prepared transfer was released")
        return self._plan

    def release(self) -> None:
        self._plan = None

    def __enter__(self) -> PreparedTransfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<PreparedTransfer {self.op.value} {self.nbytes}B -> {self.peer}>"


class Joint:
    """Ends something once, after `n` pieces: `finish(first error or None)`, then `finished`
    is set. Backends that split a request over threads count its pieces with it."""

    def __init__(self, n: int, finish: Callable[[errors.WeftError | None], None]) -> None:
        self._left = n
        self._error: errors.WeftError | None = None
        self._lock = threading.Lock()
        self._end = finish
        self.finished = threading.Event()

    def done(self, error: errors.WeftError | None) -> None:
        """One piece ended (with its error, or None)."""
        with self._lock:
            self._left -= 1
            if error is not None and self._error is None:
                self._error = error
            last = self._left == 0
        if last:
            self._end(self._error)
            self.finished.set()
