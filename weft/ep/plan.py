"""What an exchange needs of the group's plan, and the routing rule every rank applies to it
(the bench's NIXL ranks call `route` too, so both sides of a comparison route alike)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

import numpy as np

ExpertFn = Callable[[int, np.ndarray], np.ndarray]
"""(expert id, rows [n, hidden]) -> rows [n, hidden] of the same dtype: the expert's FFN."""


@dataclass(frozen=True)
class EpPlan:
    """What an exchange needs of the group's plan."""

    epoch: int
    ranks: tuple[str, ...]  # member names; a rank's index is its position
    experts: Mapping[int, tuple[str, ...]]  # expert -> ranks hosting it

    @classmethod
    def from_placement(
        cls, epoch: int, experts: Mapping[Any, Sequence[str]], ranks: Sequence[str] = ()
    ) -> EpPlan:
        """From a plan's expert placement (``PlanRecord.experts``: id as str -> members).

        Args:
            epoch: the plan's epoch.
            experts: expert id (int, or its decimal string) -> the members hosting it.
            ranks: members that are ranks even if they host no expert.

        Returns:
            The plan, ranks sorted by name.
        """
        placed = {int(e): tuple(hosts) for e, hosts in experts.items()}
        names = sorted(set(ranks) | {h for hosts in placed.values() for h in hosts})
        return cls(epoch, tuple(names), placed)

    def hosted_by(self, rank: str) -> set[int]:
        """The experts `rank` hosts in this plan."""
        return {e for e, hosts in self.experts.items() if rank in hosts}


def route(
    plan: EpPlan, ids: np.ndarray, tokens: np.ndarray, masked: Set[str] = frozenset()
) -> dict[str, list[int]]:
    """Tokens per live rank: each expert's tokens split evenly over its replicas that are not
    `masked`, the least loaded first.

    Args:
        plan: the plan whose placement is used.
        ids: the expert id of every token of the step.
        tokens: the indices into `ids` to route.
        masked: ranks that get nothing.

    Returns:
        Rank -> token indices; tokens whose expert has no replica outside `masked` are under ''.
    """
    load: dict[str, int] = {}
    out: dict[str, list[int]] = {}
    by_expert: dict[int, list[int]] = {}
    for t in tokens.tolist():
        by_expert.setdefault(int(ids[t]), []).append(t)
    for e, toks in by_expert.items():
        live = [r for r in plan.experts.get(e, ()) if r not in masked]
        if not live:
            out.setdefault("", []).extend(toks)
            continue
        share, extra = divmod(len(toks), len(live))
        live.sort(key=lambda r: load.get(r, 0))
        start = 0
        for i, r in enumerate(live):
            k = share + (1 if i < extra else 0)
            if k:
                out.setdefault(r, []).extend(toks[start : start + k])
                load[r] = load.get(r, 0) + k
                start += k
    return out
