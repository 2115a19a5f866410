"""The bookkeeping of one step, apart from any I/O so each phase can be tested alone.

A step's tokens are each in one of four states: done (a result is in `out`), missing (every
replica of its expert is gone), held (in the batch of a pending peer that has not fallen
behind), or uncovered (to be sent, or sent again). What happens to a peer that has not
answered follows what is known of its liveness, not a timer alone:

- a peer the group sees dead (the fabric lost it: the agent's peer-lost hook, a transfer
  that failed because the peer is gone, the agent no longer knowing it once membership
  removed it; or the caller's `Exchange.mask`) is masked for the epoch at once, and its
  tokens go to surviving replicas;
- a peer past the straggler deadline whose connection is alive is a straggler: its tokens
  are sent again to another live replica for this step, whichever answer comes first is
  kept, and tokens with no other live replica wait for it. It is not masked;
- a peer whose batch failed while the peer stays alive (a transfer error, a results slot
  that does not match its notification) has that batch's tokens sent again; for the rest
  of the step it is used only for tokens that have no other live replica, and after
  `MAX_FAILURES` failures in one step not at all.

So a token goes missing only when no replica of its expert is alive.
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
    lost: dict[str, Exception] = field(default_factory=dict)  # peer -> why its WRITE was not posted
    failures: dict[str, int] = field(default_factory=dict)  # peer -> batches that failed, alive
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


MAX_FAILURES = 3  # failed batches of a live peer in one step before the step stops using it


def sent(d: Dispatched, peer: str, tokens: np.ndarray, round_: int, now: float) -> None:
    """Record that `tokens` went to `peer` in `round_`."""
    d.pending[peer], d.rounds[peer], d.posted[peer] = tokens, round_, now
    d.acked.discard(peer)
    d.lost.pop(peer, None)


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


def fail(d: Dispatched, peer: str) -> None:
    """The batch `peer` holds failed, the peer alive: its tokens are uncovered again, and the
    peer is used only where no other live replica is left (see `resend`)."""
    d.pending.pop(peer, None)
    d.acked.discard(peer)
    d.failures[peer] = d.failures.get(peer, 0) + 1


def overdue(d: Dispatched, now: float, deadline: float) -> tuple[str, ...]:
    """Pending peers past the straggler deadline that are not stragglers yet."""
    return tuple(p for p in d.pending if now - d.posted[p] > deadline and p not in d.stragglers)


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

    Live replicas are those not `masked`. Stragglers of this step and peers whose batch
    failed in it are live, but used only for tokens that have no other live replica (a peer
    with `MAX_FAILURES` failures in the step is not used). A token with no live replica at
    all is missing, unless a pending peer still holds it (its answer is awaited). A peer
    still holding a batch of this step gets nothing now (its slot is busy); the tokens are
    routed again once it has answered.

    Returns:
        Peer (possibly this rank) -> tokens to send it.
    """
    tokens = uncovered(d)
    if not len(tokens):
        return {}
    gone = set(masked) | {p for p, n in d.failures.items() if n >= MAX_FAILURES}
    shaky = (set(d.stragglers) | set(d.failures)) - gone
    routes = plan_mod.route(d.plan, d.expert_ids, tokens, gone | shaky)
    rest = np.asarray(routes.pop("", []), dtype=np.int64)
    if len(rest) and shaky:  # only a straggler or a peer that failed once is left: both live
        for p, t in plan_mod.route(d.plan, d.expert_ids, rest, gone).items():
            routes.setdefault(p, []).extend(t)
        rest = np.asarray(routes.pop("", []), dtype=np.int64)
    if len(rest):
        held = np.zeros(len(d.done), dtype=bool)
        for idx in d.pending.values():
            held[idx] = True
        d.missing[rest[~held[rest]]] = True
    return {p: np.asarray(t, dtype=np.int64) for p, t in routes.items() if p not in d.pending}
