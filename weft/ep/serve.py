"""The serving side of the exchange: batches peers send here, checked, computed and written
back.

Serving runs on its own thread, apart from the thread that takes notifications, so a rank
busy computing a long batch still acknowledges new batches at once: its peers then know it
is alive and slow (a straggler), not gone. Batches are served in arrival order. A refused
batch is answered with a typed rejection; errors of the fabric (the caller may be gone) are
logged and dropped, never ending the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from weft.ep import plan as plan_mod
from weft.ep import slots as slots_mod
from weft.ep import wire
from weft.fabric import errors
from weft.fabric.agent import Agent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """A dispatch notification: `tokens` rows from `peer` (rank `rank`) for (epoch, step)."""

    peer: str
    epoch: int
    step: int
    rank: int
    tokens: int
    round: int

    @property
    def header(self) -> wire.SlotHeader:
        """The header the batch's slot must hold."""
        return wire.SlotHeader(self.epoch, self.step, self.rank, self.tokens, self.round)


def compute(expert_fn: plan_mod.ExpertFn, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each row through its expert; returns a new array like `rows`."""
    out = np.empty_like(rows)
    for e in np.unique(ids).tolist():
        sel = ids == e
        out[sel] = expert_fn(int(e), rows[sel])
    return out


class Server:
    """Serves the batches peers send to this rank, on a thread of its own.

    Args:
        agent: this rank's fabric agent; slots: its slots.
        plan: returns the current plan; expert_fn: the experts this rank hosts.
    """

    def __init__(
        self,
        agent: Agent,
        slots: slots_mod.Slots,
        plan: Callable[[], plan_mod.EpPlan],
        expert_fn: plan_mod.ExpertFn,
    ) -> None:
        self.agent, self.slots, self.plan, self.expert_fn = agent, slots, plan, expert_fn
        self.served = 0
        self.refused = 0
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"weft-ep-serve {agent.name}", daemon=True)
        self._thread.start()

    def submit(self, batch: Batch) -> None:
        """Serve `batch` after those before it."""
        self._queue.put(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the batch being served."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (batch := self._queue.get()) is not None:
            try:
                self.serve(batch)
            except Exception:  # a bad batch must not end the serving thread
                log.exception("%s: serving %s", self.agent.name, batch)
                self.refused += 1

    def check(self, b: Batch) -> tuple[wire.Reject, str] | None:
        """Why `b` is refused, or None when it can be served."""
        plan = self.plan()
        if b.epoch < plan.epoch:
            return (wire.Reject.STALE, f"epoch {b.epoch} is older than {plan.epoch}")
        if b.epoch > plan.epoch:
            return (wire.Reject.AHEAD, f"epoch {b.epoch} is newer than {plan.epoch}")
        if (
            not (0 <= b.rank < len(plan.ranks))
            or plan.ranks[b.rank] != b.peer
            or not 0 < b.tokens <= self.slots.max_tokens
        ):
            return (wire.Reject.MALFORMED, f"rank {b.rank} / {b.tokens} tokens from {b.peer}")
        if self.slots.header(self.slots.inbox, b.rank) != b.header:
            return (wire.Reject.MALFORMED, "the slot does not match the notification")
        ids = self.slots.ids(self.slots.inbox, b.rank, b.tokens)
        hosted = plan.hosted_by(self.agent.name)
        if not set(np.unique(ids).tolist()) <= hosted:
            return (wire.Reject.NOT_HOSTED, f"experts {sorted(set(ids.tolist()) - hosted)[:8]} are not here")
        return None

    def serve(self, b: Batch) -> None:
        """Compute `b` and WRITE the results back, or send the peer a rejection.

        Results are not sent when the peer has put a newer batch in the slot meanwhile: it
        has moved on from `b`, and results of `b` landing in its results slot now would only
        be in the way of the newer ones."""
        me = self.plan().ranks.index(self.agent.name)
        problem = self.check(b)
        if problem is not None:
            self.refused += 1
            log.info("%s: refusing step %d from %s: %s", self.agent.name, b.step, b.peer, problem[1])
            reject = wire.Rejection(b.epoch, b.step, me, b.round, *problem)
            with quiet():
                self.agent.send_notification(b.peer, reject.encode())
            return
        ids = self.slots.ids(self.slots.inbox, b.rank, b.tokens)
        result = compute(self.expert_fn, ids, self.slots.rows(self.slots.inbox, b.rank, b.tokens))
        if self.slots.header(self.slots.inbox, b.rank) != b.header:  # overwritten while computed
            log.info(
                "%s: step %d of %s was replaced before its results went", self.agent.name, b.step, b.peer
            )
            return
        head = wire.SlotHeader(b.epoch, b.step, me, b.tokens, b.round)
        nbytes = self.slots.pack(self.slots.replies, b.rank, head, ids, result)
        note = wire.Note(wire.RESULT, b.epoch, b.step, me, b.tokens, b.round).encode()
        with quiet():  # the caller may be gone: its step is its own business
            self.slots.post(self.slots.replies, slots_mod.RESULTS, b.peer, (b.rank, me), nbytes, note)
            self.served += b.tokens


class quiet:
    """Errors of the fabric, logged and dropped (the serving thread goes on)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and isinstance(exc, errors.WeftError):
            log.info("ep: %s", exc)
            return True
        return False
