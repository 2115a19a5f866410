"""Readiness: can this member serve transfers now? Apart from it, is etcd with us?

Why apart: while etcd restarts, every member's keep-alives fail at once, yet the fabric keeps
serving the peers it knows (the watchdog extends the serving deadline; see
`weft.membership.session`). Were readiness to follow the lease, every pod of the group would
turn unready together, ``readyReplicas`` would drop to 0 and a PodDisruptionBudget would see
the whole group disrupted while nothing is. So losing etcd is its own condition (``/status``
``conditions.etcd``, the ``weft_etcd_connected`` and ``weft_etcd_lost_seconds`` metrics), and
/readyz answers 503 only for what stops this member serving:

* ``not-joined``: not joined yet, or (after a fence) rejoined but the group not read back;
* ``fenced``: our lease ended (etcd said so, or we were paused past it) and we serve nothing;
* ``leaving``: `stop` was called;
* ``draining``: asked to drain (scale-down, SIGTERM) or published ``draining``;
* ``engine``: the engine is past the deadline of a change it was asked for;
* a named extra check (`Readiness.add_check`), e.g. the fabric's own health.

Each transition (ready to not ready, one reason to another, etcd lost and back) is logged once,
whoever looks (probe, scrape or the engine's own poll).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from weft.api.vocab import MemberState
from weft.membership.member import Membership, Phase

log = logging.getLogger(__name__)

Check = Callable[[], str | None]
"""A condition that makes the member unready: returns why, or None while all is well."""

REASONS = ("not-joined", "fenced", "leaving", "draining", "engine")
"""The built-in reason kinds, in the order they are checked (extra checks come after)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why the member is not ready: a short kind (a metric label) and the text /readyz shows."""

    kind: str
    text: str


@dataclass(frozen=True, slots=True)
class EtcdCondition:
    """Whether etcd confirms our lease and feeds our view; since when it does not.

    Attributes:
        connected: keep-alives answered and the watch is live.
        lost_since: Unix time the loss was first seen (None while connected).
        detail: what is failing (keep-alive, watch), empty while connected.
    """

    connected: bool
    lost_since: float | None = None
    detail: str = ""

    def describe(self, now: float | None = None) -> str:
        """``connected``, or ``lost since <UTC time> (<seconds> s ago): <detail>``."""
        if self.connected or self.lost_since is None:
            return "connected"
        now = time.time() if now is None else now
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.lost_since))
        return f"lost since {stamp} ({max(now - self.lost_since, 0.0):.1f} s ago): {self.detail}"


class Readiness:
    """The readiness of one member, from its membership and any number of extra checks.

    Args:
        membership: the member's membership.
        checks: (kind, check) pairs run after the built-in ones, in order.
    """

    def __init__(self, membership: Membership, checks: list[tuple[str, Check]] | None = None) -> None:
        self.membership = membership
        self.checks: list[tuple[str, Check]] = list(checks or [])
        self._last: Verdict | None = Verdict("not-joined", "not joined yet")
        self._etcd = EtcdCondition(True)

    def add_check(self, kind: str, check: Check) -> None:
        """Make the member unready whenever `check()` returns a reason (`kind` labels the metric)."""
        self.checks.append((kind, check))

    def verdict(self) -> Verdict | None:
        """Why the member cannot serve now (None: it can). Logs a change of answer once."""
        now = self._evaluate()
        if now != self._last:
            if now is None:
                log.info("%s: ready", self.membership.config.name)
            else:
                log.warning("%s: not ready: %s", self.membership.config.name, now.text)
            self._last = now
        self.etcd()
        return now

    def reason(self) -> str | None:
        """The text of `verdict` (None when ready)."""
        v = self.verdict()
        return None if v is None else v.text

    def etcd(self) -> EtcdCondition:
        """The etcd condition now; a loss and a recovery are logged once each."""
        m = self.membership
        failing = []
        if m.phase is Phase.JOINED or m.phase is Phase.FENCED:
            if not m.etcd_reachable or m.session.keepalive_failing:
                failing.append("lease keep-alives fail")
            if not m.synced and m.phase is Phase.JOINED and _read_back(m):
                failing.append("the watch is re-reading the group")
        before = self._etcd
        if failing and before.connected:
            self._etcd = EtcdCondition(False, time.time(), "; ".join(failing))
            log.warning("%s: etcd lost (%s); serving known peers meanwhile", m.config.name, self._etcd.detail)
        elif failing:
            self._etcd = EtcdCondition(False, before.lost_since, "; ".join(failing))
        elif not before.connected:
            lost = time.time() - (before.lost_since or time.time())
            log.info("%s: etcd back after %.1f s", m.config.name, lost)
            self._etcd = EtcdCondition(True)
        return self._etcd

    def _evaluate(self) -> Verdict | None:
        m = self.membership
        if m.phase is Phase.STARTING:
            return Verdict("not-joined", "not joined yet")
        if m.phase is Phase.FENCED or (m.agent is not None and m.agent.fenced and m.phase is Phase.JOINED):
            return Verdict("fenced", "fenced: our lease ended; rejoining as a new generation")
        if m.phase is not Phase.JOINED:
            return Verdict("leaving", f"phase {m.phase.value}")
        if not _read_back(m):
            return Verdict("not-joined", "joined; reading the group")
        if m.state == MemberState.JOINING:
            return Verdict("not-joined", "joined, not active yet")
        if m.state == MemberState.DRAINING:
            return Verdict("draining", "draining")
        for kind, check in self.checks:
            why = check()
            if why:
                return Verdict(kind, why)
        return None


def _read_back(m: Membership) -> bool:
    """The view holds this member's own current record: the group was read since the (re)join
    (a fence empties the view; a broken watch leaves it as it was)."""
    me = m.members.get(m.config.name)
    return me is not None and me.generation == m.generation
