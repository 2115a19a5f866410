"""The notification inbox: bounded by count and by bytes, waitable from threads and asyncio.

A full inbox must not wedge a peer's stream for good, nor be a way to make the agent hold
unbounded memory. So delivery waits for room at most `AgentConfig.inbox_full_timeout`
seconds, then refuses the notification, counted in `LimitsHit.inbox_full`:

- a WRITE with ``notify=``: its bytes are in place; the initiator's transfer fails with
  `InboxFullError` (it knows the data landed and the target was not told);
- a READ with ``notify=``: room is waited for before any byte is sent, and when none comes
  the READ is refused with `InboxFullError` (nothing was sent);
- a notification alone (`Agent.send_notification`) or one a storage or UCX transfer
  delivers: dropped, and logged at WARNING once per full episode.

While the inbox is full (or a delivery waits for room), `Agent.health()` says so; once the
application drains it, the agent is healthy again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

from weft.fabric import errors

log = logging.getLogger(__name__)


class Notification(NamedTuple):
    peer: str
    message: bytes


class Inbox:
    """Notifications delivered to this agent, oldest first.

    Args:
        capacity: notifications held at most.
        max_bytes: bytes of notifications held at most.
        name: the agent's name (for the log).
        largest: the largest notification accepted; the inbox counts as full while one that
            large would not fit.
    """

    def __init__(self, capacity: int, max_bytes: int = 1 << 62, name: str = "", largest: int = 1) -> None:
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._largest = largest
        self._name = name
        self._items: collections.deque[Notification] = collections.deque()
        self._bytes = 0
        self._waiting = 0  # deliveries waiting for room now
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._closed = False
        self._full_logged = False

    def _fits(self, nbytes: int) -> bool:
        return len(self._items) < self._capacity and self._bytes + nbytes <= self._max_bytes

    def _wait_room(self, nbytes: int, timeout: float | None) -> bool:
        """With the lock held: wait until `nbytes` more fit (or the inbox closes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._fits(nbytes) or self._closed:
            return True
        self._waiting += 1
        try:
            while not self._fits(nbytes) and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    if not self._full_logged:
                        self._full_logged = True
                        log.warning("agent %s: %s; refusing notifications", self._name, self._describe())
                    return False
                self._cond.wait(left if left is not None else 1.0)
        finally:
            self._waiting -= 1
        return True

    def room(self, nbytes: int, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds until a notification of `nbytes` fits; False if it never did."""
        with self._cond:
            return self._wait_room(nbytes, timeout)

    def put(self, peer: str, message: bytes, timeout: float | None = None, *, force: bool = False) -> bool:
        """Add a notification, waiting up to `timeout` seconds for room (None: no limit).

        Returns:
            False when there was no room in time (nothing added). `force` adds it regardless
            (room was checked with `room` before the bytes moved).
        """
        with self._cond:
            if not force and not self._wait_room(len(message), timeout):
                return False
            self._items.append(Notification(peer, message))
            self._bytes += len(message)
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
        return True

    def _describe(self) -> str:
        return f"notification inbox full: {len(self._items)} notifications / {_size(self._bytes)}"

    def trouble(self) -> str | None:
        """Why the inbox takes nothing now ("notification inbox full: ..."), or None."""
        with self._cond:
            full = self._waiting > 0 or not self._fits(self._largest)
            return self._describe() if full else None

    def _removed(self, items: list[Notification]) -> None:
        """With the lock held: account for notifications taken out."""
        self._bytes -= sum(len(n.message) for n in items)
        if self._full_logged and self._fits(self._largest) and not self._waiting:
            self._full_logged = False
            log.warning("agent %s: notification inbox has room again", self._name)
        self._cond.notify_all()

    def drain(self) -> dict[str, list[bytes]]:
        """Every waiting notification, grouped by peer (NIXL's get_new_notifs)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._removed(items)
        out: dict[str, list[bytes]] = {}
        for n in items:
            out.setdefault(n.peer, []).append(n.message)
        return out

    def _take(self, peer: str | None, message: bytes | None) -> Notification | None:
        for i, n in enumerate(self._items):
            if (peer is None or n.peer == peer) and (message is None or n.message == message):
                del self._items[i]
                self._removed([n])
                return n
        return None

    def wait(self, peer: str | None, message: bytes | None, timeout: float) -> Notification:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._take(peer, message)
                if found is not None:
                    return found
                if self._closed:
                    raise errors.AgentClosedError("agent closed while waiting for a notification")
                left = deadline - time.monotonic()
                if left <= 0:
                    what = f"{message!r} " if message is not None else ""
                    who = f"from {peer!r} " if peer is not None else ""
                    raise errors.NotificationTimeoutError(f"no notification {what}{who}within {timeout} s")
                self._cond.wait(left)

    async def wait_async(
        self, peer: str | None, message: bytes | None, timeout: float | None
    ) -> Notification:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._async_waiters.append(entry)
        try:
            while True:
                with self._cond:
                    found = self._take(peer, message)
                    closed = self._closed
                    event.clear()
                if found is not None:
                    return found
                if closed:
                    raise errors.AgentClosedError("agent closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise errors.NotificationTimeoutError(f"no notification within {timeout} s")
                try:
                    await asyncio.wait_for(event.wait(), left)
                except TimeoutError:
                    continue
        finally:
            with self._cond:
                self._async_waiters.remove(entry)

    async def iterate(self, peer: str | None, timeout: float | None) -> AsyncIterator[Notification]:
        while True:
            try:
                yield await self.wait_async(peer, None, timeout)
            except errors.AgentClosedError:
                return

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)


class Receiving:
    """The receiving half of an agent's notifications (`weft.fabric.Agent` inherits it):
    polling, waiting in threads or in asyncio, iterating. Its one piece of state is the inbox."""

    _inbox: Inbox

    def get_notifications(self) -> dict[str, list[bytes]]:
        """All notifications received so far, by peer, removed from the inbox (polling)."""
        return self._inbox.drain()

    def wait_notification(
        self, peer: str | None = None, message: bytes | None = None, timeout: float = 30.0
    ) -> bytes:
        """Wait for (and take) a notification, optionally from `peer` and equal to `message`.

        Raises:
            NotificationTimeoutError, AgentClosedError.
        """
        return self._inbox.wait(peer, message, timeout).message

    def take_notification(self, timeout: float = 30.0) -> Notification:
        """Wait for (and take) the oldest notification from any peer: (peer, message).

        Raises:
            NotificationTimeoutError, AgentClosedError.
        """
        return self._inbox.wait(None, None, timeout)

    async def next_notification(
        self, peer: str | None = None, message: bytes | None = None, timeout: float | None = None
    ) -> Notification:
        """`wait_notification` for asyncio; returns (peer, message)."""
        return await self._inbox.wait_async(peer, message, timeout)

    def notifications(
        self, peer: str | None = None, *, idle_timeout: float | None = None
    ) -> AsyncIterator[Notification]:
        """Iterate notifications as they arrive (`async for n in agent.notifications()`); ends
        when the agent closes, or raises NotificationTimeoutError after `idle_timeout` s of silence."""
        return self._inbox.iterate(peer, idle_timeout)


def _size(n: int) -> str:
    if n < 1 << 10:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / (1 << 10):.0f} KiB"
    return f"{n / (1 << 20):.0f} MiB"
