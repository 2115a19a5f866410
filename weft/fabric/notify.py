"""The notification inbox: bounded, waitable from threads and from asyncio."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

from weft.fabric import errors


class Notification(NamedTuple):
    peer: str
    message: bytes


class Inbox:
    """Notifications delivered to this agent, oldest first.

    When `capacity` notifications are waiting, delivery blocks (the sender's connection
    stops being read, so back-pressure reaches the sender) instead of dropping anything.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: collections.deque[Notification] = collections.deque()
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._closed = False

    def put(self, peer: str, message: bytes, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._items) >= self._capacity and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
            self._items.append(Notification(peer, message))
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
        return True

    def drain(self) -> dict[str, list[bytes]]:
        """Every waiting notification, grouped by peer (NIXL's get_new_notifs)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        out: dict[str, list[bytes]] = {}
        for n in items:
            out.setdefault(n.peer, []).append(n.message)
        return out

    def _take(self, peer: str | None, message: bytes | None) -> Notification | None:
        for i, n in enumerate(self._items):
            if (peer is None or n.peer == peer) and (message is None or n.message == message):
                del self._items[i]
                self._cond.notify_all()
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
