"""What peers told this rank about the steps it has in flight: results, acknowledgements and
rejections, kept by (epoch, step, peer, round) until the step takes or forgets them.

Kept apart from the exchange so the notification thread only decodes and files: every
message is decoded by `weft.ep.wire.decode`, a malformed one is counted and dropped, and
messages of steps that are not in flight (late answers of a finished step) are dropped too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from weft.ep import wire

log = logging.getLogger(__name__)

Key = tuple[int, int, str, int]  # (epoch, step, peer, round)


class Mailbox:
    """Answers of peers to this rank's batches.

    Args:
        lock: the exchange's condition: filing a message notifies it.
        on_dispatch: called (outside the lock) with a peer's batch for this rank to serve.
        name: this rank (for the log).
    """

    def __init__(
        self, lock: threading.Condition, on_dispatch: Callable[[str, wire.Note], None], name: str
    ) -> None:
        self.lock, self.on_dispatch, self.name = lock, on_dispatch, name
        self.open: set[tuple[int, int]] = set()  # (epoch, step) of the steps in flight
        self.arrived: dict[Key, int] = {}  # results -> tokens
        self.acks: set[Key] = set()
        self.rejected: dict[tuple[int, int, str], wire.Rejection] = {}
        self.malformed = 0
        self.heard: set[str] = set()  # peers that answered anything since the exchange last looked

    def deliver(self, peer: str, msg: bytes) -> None:
        """File a notification from `peer` (never raises for what `peer` sent)."""
        try:
            m = wire.decode(msg)
        except wire.MalformedMessageError as exc:
            with self.lock:
                self.malformed += 1
            log.warning("%s: a malformed message from %s (%d bytes): %s", self.name, peer, len(msg), exc)
            return
        if isinstance(m, wire.Note) and m.kind == wire.DISPATCH:
            self.on_dispatch(peer, m)
            return
        with self.lock:
            self.heard.add(peer)
            if (m.epoch, m.step) in self.open:
                if isinstance(m, wire.Rejection):
                    self.rejected[(m.epoch, m.step, peer)] = m
                elif m.kind == wire.RESULT:
                    self.arrived[(m.epoch, m.step, peer, m.round)] = m.tokens
                else:
                    self.acks.add((m.epoch, m.step, peer, m.round))
            self.lock.notify_all()

    def forget(self, epoch: int, step: int) -> None:
        """With the lock held: the step is over; what is filed for it, and what comes later,
        is dropped."""
        self.open.discard((epoch, step))
        for key in [k for k in self.arrived if k[:2] == (epoch, step)]:
            del self.arrived[key]
        self.acks = {k for k in self.acks if k[:2] != (epoch, step)}
        for rkey in [k for k in self.rejected if k[:2] == (epoch, step)]:
            del self.rejected[rkey]
