"""The bookkeeping of one step, apart from any I/O so each phase can be tested alone.

A step's tokens are each in one of four states: done (a result is in `out`), missing (every
replica of its expert is gone), held (in the batch of a pending peer that has not fallen
behind), or uncovered (to be sent, or sent again). What happens to a peer that has not
answered follows what is known of its liveness, not a timer alone:

- a peer the fabric has lost (a failed transfer, the agent's peer-lost hook, or the caller's
  `Exchange.mask`) is masked at once and its tokens go to surviving replicas;
- a peer past the deadline that acknowledged its batch is alive but slow: a straggler. Its
  tokens are sent again to another live replica for this step, whichever answer comes first
  is kept, and tokens with no other live replica wait for it. It is not masked;
- a peer past the deadline that did not even acknowledge is masked for the epoch (a frozen
  or partitioned rank), until it shows it is alive again (the exchange unmasks it when an
  acknowledgement or a result of it arrives).
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weft.ep import plan as plan_mod
from weft.fabric.transfer import Transfer


@dataclass
class Dispatched:
    """A step in flight: what went where (`Exchange.combine` needs it)."""

    plan: plan_mod.EpPlan  # the plan the step started on (it finishes on it, or fails typed)
    step: int
    x: np.ndarray
    expert_ids: np.ndarray
    out: np.ndarray
    missing: np.ndarray  # bool per token: no live replica of its expert
    done: np.ndarray  # bool per token: its result is in `out`
    pending: dict[str, np.ndarray] = field(default_factory=dict)  # peer -> tokens awaiting it
    rounds: dict[str, int] = field(default_factory=dict)  # peer -> round of the batch it holds
    posted: dict[str, float] = field(default_factory=dict)  # peer -> when its batch was sent
    acked: set[str] = field(default_factory=set)  # peers that acknowledged the batch they hold
    lost: set[str] = field(default_factory=set)  # peers whose WRITE could not be posted
    transfers: dict[str, Transfer] = field(default_factory=dict)
    masked: list[str] = field(default_factory=list)  # peers masked during this step
    masked_before: frozenset[str] = frozenset()  # masks the previous step's result reported
    stragglers: list[str] = field(default_factory=list)  # alive but late during this step
    redispatched: int = 0
    next_round: int = 0
    on_device: bool = False  # x came as a CUDA array: `combine` returns one too

    @classmethod
    def start(cls, plan: plan_mod.EpPlan, step: int, x: np.ndarray, ids: np.ndarray) -> Dispatched:
        """A step with every token uncovered."""
        n = len(ids)
        return cls(
            plan=plan, step=step, x=x, expert_ids=ids, out=np.zeros_like(x),
            missing=np.zeros(n, dtype=bool), done=np.zeros(n, dtype=bool),
        )  # fmt: skip

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    @property
    def finished(self) -> bool:
        """Every token is done or missing."""
        return bool((self.done | self.missing).all())


@dataclass(frozen=True)
class Combined:
    """A step's outcome."""

    out: Any  # [n, hidden] in the original token order: numpy, or CuPy when x was on a GPU
    missing: np.ndarray  # bool [n]: tokens whose expert had no live replica (rows are zero)
    masked: tuple[str, ...]  # ranks masked since the previous step's result (each once)
    redispatched: int  # tokens sent again after a rank was masked or fell behind
    stragglers: tuple[str, ...] = ()  # ranks alive but late: their tokens went to a replica


@dataclass(frozen=True)
class Overdue:
    """Peers that are past the deadline, by what is known of them."""

    silent: tuple[str, ...]  # no acknowledgement: masked for the epoch
    late: tuple[str, ...]  # acknowledged: stragglers of this step


def sent(d: Dispatched, peer: str, tokens: np.ndarray, round_: int, now: float) -> None:
    """Record that `tokens` went to `peer` in `round_`."""
    d.pending[peer], d.rounds[peer], d.posted[peer] = tokens, round_, now
    d.acked.discard(peer)


def take(d: Dispatched, peer: str, rows: np.ndarray) -> None:
    """`peer`'s results for the batch it held: tokens not yet done take their rows (the
    first answer wins when a straggler's tokens were also sent to a replica)."""
    idx = d.pending.pop(peer)
    fresh = ~d.done[idx]
    d.out[idx[fresh]] = rows[fresh]
    d.done[idx] = True


def note_masked(d: Dispatched, masked: Set[str]) -> None:
    """Ranks masked for the epoch since the previous step's result count as masked in this
    one, whether or not they held its tokens: each masking is reported once, even when it
    happened between two steps or after the rank had answered."""
    d.masked.extend(sorted(set(masked) - d.masked_before - set(d.masked)))


def drop(d: Dispatched, peer: str) -> None:
    """Mask `peer` for this step: the tokens it held are uncovered again."""
    d.pending.pop(peer, None)
    d.acked.discard(peer)
    if peer not in d.masked:
        d.masked.append(peer)


def overdue(d: Dispatched, now: float, deadline: float) -> Overdue:
    """Pending peers past the deadline that are not yet stragglers, silent or late."""
    silent: list[str] = []
    late: list[str] = []
    for p in d.pending:
        if now - d.posted[p] > deadline and p not in d.stragglers:
            (late if p in d.acked else silent).append(p)
    return Overdue(tuple(silent), tuple(late))


def next_wake(d: Dispatched, deadline: float) -> float | None:
    """When the next pending peer that is not a straggler passes the deadline."""
    times = [d.posted[p] + deadline for p in d.pending if p not in d.stragglers]
    return min(times) if times else None


def uncovered(d: Dispatched) -> np.ndarray:
    """Tokens neither done, missing, nor held by a pending peer that is on time."""
    open_ = ~(d.done | d.missing)
    for p, idx in d.pending.items():
        if p not in d.stragglers:
            open_[idx] = False
    return np.flatnonzero(open_)


def resend(d: Dispatched, masked: Set[str]) -> dict[str, np.ndarray]:
    """Where the uncovered tokens go now; tokens that cannot go anywhere are flagged missing.

    Live replicas are those not `masked`; stragglers of this step are live but used only for
    tokens that have no other live replica. A token with no live replica at all is missing,
    unless a straggler still holds it (its answer is awaited). A peer still holding a batch
    of this step gets nothing now (its slot is busy); the tokens are routed again once it
    has answered.

    Returns:
        Peer (possibly this rank) -> tokens to send it.
    """
    tokens = uncovered(d)
    if not len(tokens):
        return {}
    routes = plan_mod.route(d.plan, d.expert_ids, tokens, set(masked) | set(d.stragglers))
    rest = np.asarray(routes.pop("", []), dtype=np.int64)
    if len(rest) and d.stragglers:  # only a straggler is left for them: it is alive
        for p, t in plan_mod.route(d.plan, d.expert_ids, rest, set(masked)).items():
            routes.setdefault(p, []).extend(t)
        rest = np.asarray(routes.pop("", []), dtype=np.int64)
    if len(rest):
        held = np.zeros(len(d.done), dtype=bool)
        for idx in d.pending.values():
            held[idx] = True
        d.missing[rest[~held[rest]]] = True
    return {p: np.asarray(t, dtype=np.int64) for p, t in routes.items() if p not in d.pending}
