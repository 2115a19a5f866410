"""The daemon's notification inbox, kept empty: notifications are counted and dropped.

Why: the fabric keeps every notification a peer sends (``notify=`` on a WRITE or READ,
`Agent.send_notification`) until someone takes it, and blocks delivery once its inbox holds
``max_pending_notifications``. In the `weft agent` daemon nobody would: no engine runs in its
process (a sidecar's engine has its own process and talks to the daemon over HTTP, with no
notification path), so the inbox would grow with each notification (512 one-MiB messages keep
500 MiB resident) and, once full, wedge the sender's stream. So the daemon takes them as
they come, counts them (``weft_notifications_dropped_total`` and
``weft_notification_bytes_dropped_total``) and drops them, saying so once per episode.
"""

from __future__ import annotations

import logging
import time

from weft.fabric import errors as fabric_errors
from weft.fabric.agent import Agent

log = logging.getLogger(__name__)

QUIET = 60.0
"""Seconds without a notification that end an episode (the next one is logged again)."""


class Dropper:
    """Takes and drops every notification `agent` receives, counting them.

    Args:
        agent: the daemon's fabric agent.
        quiet: seconds of silence after which the next notification is logged again.
    """

    def __init__(self, agent: Agent, quiet: float = QUIET) -> None:
        self.agent = agent
        self.quiet = quiet
        self.dropped = 0
        """Notifications taken and dropped."""
        self.dropped_bytes = 0
        """Bytes of those notifications."""
        self.episodes = 0
        """Episodes logged (a first notification after `quiet` seconds without one)."""
        self._last = -float("inf")

    async def run(self) -> None:
        """Take notifications until the agent closes (or this task is cancelled)."""
        while True:
            try:
                first = await self.agent.next_notification()
            except fabric_errors.AgentClosedError:
                return
            self._drop(first.peer, [first.message])
            for peer, messages in self.agent.get_notifications().items():  # the rest, at once
                self._drop(peer, messages)

    def _drop(self, peer: str, messages: list[bytes]) -> None:
        now = time.monotonic()
        if now - self._last > self.quiet:
            self.episodes += 1
            log.warning(
                "%s: dropping notifications (the first from %s): no engine in this process "
                "takes them; counted in weft_notifications_dropped_total (%d so far)",
                self.agent.name,
                peer,
                self.dropped,
            )
        self._last = now
        self.dropped += len(messages)
        self.dropped_bytes += sum(len(m) for m in messages)
