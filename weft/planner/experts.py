"""Expert placement: replicas on distinct live members, the hottest first, moving little.

EPLB-style, in three steps, all deterministic (ties broken by expert id and member name):

1. **How many replicas.** Every expert gets ``min(r, members)``; the redundant slots go one
   at a time to the expert with the highest load per replica.
2. **Keep what still stands.** Replicas of the previous placement on members that are still
   live stay where they are (an expert with more than it now needs sheds the copy on the most
   loaded member; a member over its slot limit sheds its lightest experts).
3. **Place what is missing**, hottest expert first, each on the least loaded member that does
   not host it yet and has a free slot; then at most `rebalance_moves` single moves from the
   most to the least loaded member while that lowers the maximum by a useful margin.

Capacity is ``slots_per_member`` when given, else just enough for an even spread. When the
members cannot hold every needed replica, placement degrades gracefully: redundant replicas
go first, and experts left with fewer than ``min(r, members)`` are reported under-replicated,
never an exception.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExpertSpec:
    """The expert-parallel layout a group asks for."""

    experts: int
    replication: int = 1
    redundant_slots: int = 0
    slots_per_member: int | None = None
    """Most replicas one member may host (GPU memory); None: an even spread."""
    rebalance_moves: int = 2
    """Most single moves per re-plan made only to even out load (a first placement is balanced
    fully, as it moves no data yet)."""
    imbalance: float = 1.25
    """Rebalance only while the busiest member carries more than this times the mean."""

    def __post_init__(self) -> None:
        if self.experts < 0 or self.replication < 1 or self.redundant_slots < 0:
            raise ValueError("experts >= 0, replication >= 1 and redundant_slots >= 0")
        if self.slots_per_member is not None and self.slots_per_member < 1:
            raise ValueError("slots_per_member must be >= 1")


@dataclass(frozen=True)
class Placement:
    experts: dict[int, tuple[str, ...]]
    """Expert id -> the members hosting it (sorted)."""
    under_replicated: tuple[int, ...]
    added: tuple[tuple[int, str], ...]
    """(expert, member) replicas that are new in this placement: what must be pulled."""
    member_load: dict[str, float]
    repairs: int = 0
    """Moves made because greedy packing met a dead end (each frees one slot for one replica)."""


def replica_counts(spec: ExpertSpec, members: int, load: Mapping[int, float]) -> dict[int, int]:
    """Replicas wanted per expert: min(r, members) each, redundant slots to the hottest."""
    base = min(spec.replication, members)
    counts = dict.fromkeys(range(spec.experts), base)
    if members == 0 or spec.experts == 0:
        return counts
    heap = [(-_load(load, e) / base, e) for e in range(spec.experts)] if base else []
    heapq.heapify(heap)
    for _ in range(spec.redundant_slots):
        while heap:
            _, e = heapq.heappop(heap)
            if counts[e] < members:
                counts[e] += 1
                if counts[e] < members:
                    heapq.heappush(heap, (-_load(load, e) / counts[e], e))
                break
        else:
            break
    return counts


def _make_room(
    e: int,
    hosts: dict[int, list[str]],
    names: list[str],
    used: dict[str, int],
    cap: int,
    weight: dict[int, float],
    member_load: dict[str, float],
) -> tuple[str, int, str] | None:
    """Every member with a free slot already hosts `e`: move another expert off a full member
    that does not host `e` onto one with room, freeing a slot for `e`.

    Returns (the freed member, the expert moved, where it went), or None if impossible."""
    roomy = sorted((m for m in names if used[m] < cap), key=lambda m: (member_load[m], m))
    full = sorted(
        (m for m in names if m not in hosts[e] and used[m] >= cap), key=lambda m: (-member_load[m], m)
    )
    for q in full:
        for m in roomy:
            for x in sorted(
                (x for x in hosts if q in hosts[x] and m not in hosts[x]), key=lambda x: (weight[x], x)
            ):
                hosts[x].remove(q)
                hosts[x].append(m)
                member_load[q] -= weight[x]
                member_load[m] += weight[x]
                used[q] -= 1
                used[m] += 1
                return q, x, m
    return None


def _load(load: Mapping[int, float], e: int) -> float:
    return max(float(load.get(e, 1.0)), 1e-9)


def _capacity(spec: ExpertSpec, counts: dict[int, int], n: int, load: Mapping[int, float]) -> int:
    """Slots per member; when they cannot hold every replica, drops redundant ones (coldest
    first) from `counts` in place."""
    total = sum(counts.values())
    # without a slot limit: an even spread plus one slot of slack, so that greedy packing of
    # unequal loads never paints itself into a corner
    cap = (
        spec.slots_per_member if spec.slots_per_member is not None else (math.ceil(total / n) + 1 if n else 0)
    )
    if total > cap * n:  # not enough room: drop redundant replicas first, coldest first
        base = min(spec.replication, n)
        order = sorted(counts, key=lambda e: (_load(load, e) / counts[e], e))
        excess = total - cap * n
        for e in order:
            while excess and counts[e] > base:
                counts[e] -= 1
                excess -= 1
    return cap


@dataclass
class _Packing:
    """The placement being built: who hosts what, each member's load and used slots."""

    names: list[str]
    counts: dict[int, int]
    cap: int
    weight: dict[int, float]
    hosts: dict[int, list[str]] = field(init=False)
    member_load: dict[str, float] = field(init=False)
    used: dict[str, int] = field(init=False)
    added: list[tuple[int, str]] = field(default_factory=list)
    repairs: int = 0

    def __post_init__(self) -> None:
        self.hosts = {e: [] for e in self.counts}
        self.member_load = dict.fromkeys(self.names, 0.0)
        self.used = dict.fromkeys(self.names, 0)

    def keep(self, previous: Mapping[int, Sequence[str]]) -> None:
        """Step 2: the previous replicas on live members stay, within the counts and slots."""
        live = set(self.names)
        hosts, weight = self.hosts, self.weight
        for e in sorted(self.counts):
            for m in sorted(set(previous.get(e, ()))):
                if m in live:
                    hosts[e].append(m)
        for e in sorted(self.counts):
            while len(hosts[e]) > self.counts[e]:
                kept_load = {m: sum(weight[x] for x in self.counts if m in hosts[x]) for m in hosts[e]}
                drop = max(hosts[e], key=lambda m: (kept_load[m], m))
                hosts[e].remove(drop)
        for e, hs in hosts.items():
            for m in hs:
                self.member_load[m] += weight[e]
                self.used[m] += 1
        for m in self.names:
            while self.used[m] > self.cap:  # a member over its limit sheds its lightest experts
                mine = sorted((weight[e], e) for e in hosts if m in hosts[e])
                _, e = mine[0]
                hosts[e].remove(m)
                self.member_load[m] -= weight[e]
                self.used[m] -= 1

    def _heap(self) -> list[tuple[float, int, str]]:
        heap = [(self.member_load[m], self.used[m], m) for m in self.names if self.used[m] < self.cap]
        heapq.heapify(heap)
        return heap

    def _pop_host(self, e: int, heap: list[tuple[float, int, str]]) -> str | None:
        """The least loaded member with room that does not host `e` yet, off the heap."""
        skipped = []
        chosen = None
        while heap:
            item = heapq.heappop(heap)
            m = item[2]
            if item[0] != self.member_load[m] or item[1] != self.used[m] or self.used[m] >= self.cap:
                continue  # stale heap entry
            if m in self.hosts[e]:
                skipped.append(item)
                continue
            chosen = m
            break
        for item in skipped:
            heapq.heappush(heap, item)
        return chosen

    def fill(self) -> None:
        """Step 3: place what is missing, hottest first, on the least loaded member with room."""
        heap = self._heap()
        for e in sorted(self.counts, key=lambda e: (-self.weight[e], e)):
            while len(self.hosts[e]) < self.counts[e] and heap:
                chosen = self._pop_host(e, heap)
                if chosen is None:
                    room = _make_room(
                        e, self.hosts, self.names, self.used, self.cap, self.weight, self.member_load
                    )
                    if room is None:
                        break
                    chosen, moved, to = room
                    self.repairs += 1
                    self.added = [a for a in self.added if a != (moved, chosen)]
                    self.added.append((moved, to))
                    heap = self._heap()
                self.hosts[e].append(chosen)
                self.added.append((e, chosen))
                self.member_load[chosen] += self.weight[e]
                self.used[chosen] += 1
                if self.used[chosen] < self.cap:
                    heapq.heappush(heap, (self.member_load[chosen], self.used[chosen], chosen))

    def rebalance(self, budget: int, imbalance: float) -> None:
        """Step 4: up to `budget` single moves from the busiest to the idlest member while the
        busiest carries more than `imbalance` times the mean."""
        names, member_load, used = self.names, self.member_load, self.used
        mean = sum(member_load.values()) / len(names)
        for _ in range(budget):
            hi = max(names, key=lambda m: (member_load[m], m))
            lo = min(names, key=lambda m: (member_load[m], m))
            gap = member_load[hi] - member_load[lo]
            if member_load[hi] <= imbalance * mean or used[lo] >= self.cap:
                break
            # a move must strictly even out (w < gap, with room for rounding), or it just swaps
            candidates = [
                e
                for e in self.hosts
                if hi in self.hosts[e] and lo not in self.hosts[e] and self.weight[e] < gap * (1 - 1e-9)
            ]
            if not candidates:
                break
            e = min(candidates, key=lambda e: (abs(self.weight[e] - gap / 2), e))
            self.hosts[e].remove(hi)
            self.hosts[e].append(lo)
            self.added = [a for a in self.added if a != (e, hi)]
            self.added.append((e, lo))
            member_load[hi] -= self.weight[e]
            member_load[lo] += self.weight[e]
            used[hi] -= 1
            used[lo] += 1


def place_experts(
    spec: ExpertSpec,
    members: Sequence[str],
    previous: Mapping[int, Sequence[str]] | None = None,
    load: Mapping[int, float] | None = None,
) -> Placement:
    """Place every expert's replicas on `members` (the live ones that may host experts).

    Args:
        spec: experts, replication, redundant slots, limits.
        members: live members eligible to host experts (draining and dead ones left out).
        previous: the previous placement (expert -> members); replicas on live members stay.
        load: relative load per expert (hits); missing experts count 1.0.

    Returns:
        The placement, the replicas it adds, the experts left under-replicated.
    """
    load = load or {}
    previous = previous or {}
    names = sorted(set(members))
    n = len(names)
    counts = replica_counts(spec, n, load)
    base = min(spec.replication, n)
    cap = _capacity(spec, counts, n, load)
    total = sum(counts.values())
    weight = {e: _load(load, e) / max(c, 1) for e, c in counts.items()}
    packing = _Packing(names, counts, cap, weight)
    packing.keep(previous)
    packing.fill()
    if n > 1 and total:
        # a first placement moves no data yet: balance it fully; a re-plan moves a bounded few
        packing.rebalance(spec.rebalance_moves if previous else 4 * total, spec.imbalance)
    experts = {e: tuple(sorted(hs)) for e, hs in packing.hosts.items()}
    under = tuple(e for e in sorted(experts) if len(experts[e]) < base or (spec.replication and n == 0))
    return Placement(experts, under, tuple(sorted(packing.added)), packing.member_load, packing.repairs)
