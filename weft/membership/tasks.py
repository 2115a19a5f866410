"""Background tasks of the control plane: started guarded, stopped for sure.

A loop that crashes is a bug: it is logged at once with its traceback (not when someone
happens to await the task) and the exception stays on the task, so nothing swallows it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


def create_guarded_task(
    coro: Coroutine[Any, Any, None],
    *,
    name: str,
    owner: str,
    on_crash: Callable[[BaseException], None] | None = None,
) -> asyncio.Task[None]:
    """Run `coro` as a task of the running loop; log a crash when it happens and keep it raised.

    Args:
        coro: the task's work.
        name: the task's name (and the log's).
        owner: who runs it, for the log.
        on_crash: called with the exception before it propagates (e.g. to fence).
    Returns:
        The task; its exception (if any) is the one `coro` raised.
    """

    async def guarded() -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: task %s crashed", owner, name)
            if on_crash is not None:
                on_crash(exc)
            raise

    return asyncio.get_running_loop().create_task(guarded(), name=name)


async def restarting(
    loop: Callable[[], Coroutine[Any, Any, None]],
    *,
    what: str,
    owner: str,
    stopping: Callable[[], bool],
    on_crash: Callable[[BaseException], None],
    pause: float = 1.0,
) -> None:
    """Run `loop` until `stopping()`; a crash is logged with its traceback, told to
    `on_crash` (the membership fences: its view may be wrong) and the loop starts again after
    `pause` seconds. Cancellation is never caught."""
    while not stopping():
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: %s loop crashed; restarting it", owner, what)
            on_crash(exc)
            await asyncio.sleep(pause)


async def stop_tasks(tasks: list[asyncio.Task[None]], owner: str) -> None:
    """Cancel `tasks` and wait until every one has ended; log the ones that failed.

    Python 3.11's wait_for can swallow a cancellation that races with its result, so the
    cancel is repeated until each task is really done (bounded: 50 rounds of 0.1 s).
    """
    for _ in range(50):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            break
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=0.1)
    else:
        log.error("%s tasks did not stop: %s", owner, pending)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.error("%s task failed: %r", owner, t.exception())
