"""Prefill/decode roles: how many of each, and who, with the fewest flips.

Pure functions: the same members, policy and previous roles give the same answer, on any node.
Two policies:

* `RatioPolicy`: a fixed ratio such as ``1:3`` with minimum counts.
* `LoadPolicy`: starts from a floor (the minimums) and moves one member at a time between the
  roles when the load records show one side saturated and the other idle (hysteresis: two
  thresholds), never again before the previous step has settled and fresh load was reported
  after it (no stacked actions, one action per signal), as Dynamo's planner does.

Who flips: members keep their role when they can. New members (no role yet) fill a deficit
first; then members whose current role is not allowed for them (a GPU-less member where the
policy restricts GPU-less members); then the least loaded, ties broken by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from weft.api import vocab
from weft.api.vocab import ROLES, Role


@dataclass(frozen=True)
class MemberInfo:
    """What the planner knows of one live member."""

    name: str
    gpus: int = 1
    role: Role | None = None
    queue_depth: int = 0
    tokens_per_s: float = 0.0
    load_at: float = 0.0  # when its load record was written (time.time())
    ttft_p90_ms: float | None = None  # its engine's recent p90 time to first token
    itl_p90_ms: float | None = None  # its engine's recent p90 inter-token latency


@dataclass(frozen=True)
class RatioPolicy:
    """``prefill:decode`` as integers (``1:3``), with minimum counts."""

    prefill: int = 1
    decode: int = 1
    min_prefill: int = vocab.DEFAULT_MIN_PREFILL
    min_decode: int = vocab.DEFAULT_MIN_DECODE
    gpu_less_roles: frozenset[Role] = frozenset(ROLES)
    """Roles a member without a GPU may take."""

    def __post_init__(self) -> None:
        if self.prefill < 0 or self.decode < 0 or self.prefill + self.decode == 0:
            raise ValueError(f"ratio {self.prefill}:{self.decode} needs non-negative parts, not both 0")
        if self.min_prefill < 0 or self.min_decode < 0:
            raise ValueError("minimum counts must be >= 0")

    @classmethod
    def parse(cls, ratio: str, **kw: object) -> RatioPolicy:
        """``"1:3"`` -> RatioPolicy(1, 3, ...)."""
        parts = ratio.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"ratio {ratio!r} is not PREFILL:DECODE (e.g. 1:3)")
        return cls(int(parts[0]), int(parts[1]), **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LoadPolicy:
    """A floor plus +/-1 steps driven by queue depth per member of each role."""

    min_prefill: int = vocab.DEFAULT_MIN_PREFILL
    min_decode: int = vocab.DEFAULT_MIN_DECODE
    high_queue: float = 8.0
    """Mean queue depth per member above which a role is saturated."""
    low_queue: float = 2.0
    """Mean queue depth per member below which a role can spare a member."""
    settle_s: float = 30.0
    """No new step within this many seconds of the previous one."""
    ttft_p90_ms: float | None = None
    """Prefill is saturated when a prefill member's p90 TTFT is above this (an SLA target,
    as Dynamo's planner takes one), and can spare a member only below half of it."""
    itl_p90_ms: float | None = None
    """The same for decode, with the p90 inter-token latency."""
    gpu_less_roles: frozenset[Role] = frozenset(ROLES)

    def __post_init__(self) -> None:
        if not 0 <= self.low_queue < self.high_queue:
            raise ValueError("load policy needs 0 <= low_queue < high_queue (hysteresis)")
        for target in (self.ttft_p90_ms, self.itl_p90_ms):
            if target is not None and target <= 0:
                raise ValueError("latency targets must be > 0 ms")

    def target(self, role: Role) -> float | None:
        """The latency target of `role` (TTFT for prefill, ITL for decode), if set."""
        return self.ttft_p90_ms if role == Role.PREFILL else self.itl_p90_ms


def _latency(m: MemberInfo, role: Role) -> float | None:
    return m.ttft_p90_ms if role == Role.PREFILL else m.itl_p90_ms


@dataclass(frozen=True)
class RoleDecision:
    roles: dict[str, Role]
    flips: int
    action: str | None = None  # LoadPolicy: "prefill+1" / "decode+1" when it stepped
    reason: str = ""
    counts: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)


def ratio_counts(n: int, policy: RatioPolicy) -> tuple[int, int]:
    """How many prefill and decode members out of `n` (rounding half up, then minimums)."""
    if n <= 0:
        return 0, 0
    share = policy.prefill / (policy.prefill + policy.decode)
    p = math.floor(n * share + 0.5)
    p = max(p, min(policy.min_prefill, n))
    p = min(p, max(n - policy.min_decode, min(policy.min_prefill, n)))
    return p, n - p


def _allowed(m: MemberInfo, allowed: frozenset[Role], role: Role) -> bool:
    return m.gpus > 0 or role in allowed


def assign(
    members: Iterable[MemberInfo], prefill: int, gpu_less_roles: frozenset[Role]
) -> tuple[dict[str, Role], int]:
    """Give `prefill` members the prefill role and the rest decode, changing as few as possible.

    Returns (roles, flips); flips counts members whose existing role changed.
    """
    ms = sorted(members, key=lambda m: m.name)
    roles: dict[str, Role] = {}
    # a member whose current role is not allowed for it has to move anyway
    keep: dict[str, Role] = {
        m.name: m.role for m in ms if m.role is not None and _allowed(m, gpu_less_roles, m.role)
    }
    want = {Role.PREFILL: prefill, Role.DECODE: len(ms) - prefill}
    for role in ROLES:
        holders = [m for m in ms if keep.get(m.name) == role]
        if len(holders) > want[role]:
            # too many: the most loaded keep it (they have work), the rest are released
            holders.sort(key=lambda m: (m.queue_depth, m.tokens_per_s, m.name))
            for m in holders[: len(holders) - want[role]]:
                del keep[m.name]
    roles.update(keep)
    free = [m for m in ms if m.name not in roles]
    # new members first (no flip), then the ones moving anyway, then the least loaded
    free.sort(key=lambda m: (m.role is not None, m.queue_depth, m.tokens_per_s, m.name))
    for role in ROLES:
        need = want[role] - sum(1 for r in roles.values() if r == role)
        for m in [m for m in free if _allowed(m, gpu_less_roles, role)][:need]:
            roles[m.name] = role
        free = [m for m in free if m.name not in roles]
    # still short of a role while the members left may not take it: a kept holder of the other
    # role that may moves over, and a restricted member takes its seat
    for role, other in (ROLES, ROLES[::-1]):
        short = want[role] - sum(1 for r in roles.values() if r == role)
        blocked = [m for m in free if not _allowed(m, gpu_less_roles, role)]
        movable = sorted(
            (m for m in ms if roles.get(m.name) == other and _allowed(m, gpu_less_roles, role)),
            key=lambda m: (m.queue_depth, m.tokens_per_s, m.name),
        )
        for mover, seated in zip(movable, blocked[: max(short, 0)], strict=False):
            roles[mover.name] = role
            roles[seated.name] = other
        free = [m for m in free if m.name not in roles]
    for m in free:  # nobody allowed for the missing role: they take what they may
        roles[m.name] = Role.DECODE if _allowed(m, gpu_less_roles, Role.DECODE) else Role.PREFILL
    flips = sum(1 for m in ms if m.role is not None and roles[m.name] != m.role)
    return roles, flips


def plan_roles_ratio(members: Iterable[MemberInfo], policy: RatioPolicy) -> RoleDecision:
    ms = list(members)
    p, d = ratio_counts(len(ms), policy)
    roles, flips = assign(ms, p, policy.gpu_less_roles)
    return RoleDecision(roles, flips, None, f"ratio {policy.prefill}:{policy.decode} of {len(ms)}", (p, d))


def plan_roles_load(
    members: Iterable[MemberInfo],
    policy: LoadPolicy,
    *,
    previous_action_at: float | None,
    now: float,
) -> RoleDecision:
    """One +/-1 step at most, and only on load reported after the previous step settled."""
    ms = list(members)
    n = len(ms)
    current = {m.name: m.role for m in ms if m.role is not None}
    p = sum(1 for r in current.values() if r == Role.PREFILL)
    newcomers = n - len(current)
    if newcomers:  # new members go where the floor needs them, else to decode
        p = max(p, min(policy.min_prefill, n))
    p = max(min(p, n - min(policy.min_decode, n)), min(policy.min_prefill, n))
    action = None
    reason = f"load floor {policy.min_prefill}/{policy.min_decode}"
    settled = previous_action_at is None or now - previous_action_at >= policy.settle_s
    fresh = [m for m in ms if previous_action_at is None or m.load_at > previous_action_at]
    if settled and fresh and n >= 2:
        busy, idle, said = _pressure(fresh, current, policy)
        if busy[Role.PREFILL] and idle[Role.DECODE] and n - p > policy.min_decode:
            p, action = p + 1, "prefill+1"
        elif busy[Role.DECODE] and idle[Role.PREFILL] and p > policy.min_prefill:
            p, action = p - 1, "decode+1"
        if action:
            reason = f"{said}: {action}"
    roles, flips = assign(ms, p, policy.gpu_less_roles)
    return RoleDecision(roles, flips, action, reason, (p, n - p))


def _pressure(
    fresh: list[MemberInfo], current: Mapping[str, Role], policy: LoadPolicy
) -> tuple[dict[Role, bool], dict[Role, bool], str]:
    """Which roles are saturated and which idle, from fresh load (and a sentence saying why).

    Saturated: mean queue depth above `high_queue`, or a member's p90 latency above the
    role's target. Idle: mean queue below `low_queue` and every p90 below half the target
    (the band between is the hysteresis)."""
    busy: dict[Role, bool] = {}
    idle: dict[Role, bool] = {}
    words = []
    for role in ROLES:
        holders = [m for m in fresh if current.get(m.name) == role]
        mean = sum(m.queue_depth for m in holders) / len(holders) if holders else 0.0
        seen = [x for x in (_latency(m, role) for m in holders) if x is not None]
        worst = max(seen) if seen else None
        target = policy.target(role)
        late = target is not None and worst is not None and worst > target
        fast = target is None or worst is None or worst < target / 2
        busy[role] = mean > policy.high_queue or late
        idle[role] = mean < policy.low_queue and fast
        kind = "TTFT" if role == Role.PREFILL else "ITL"
        words.append(
            f"{role} queue {mean:.1f}" + (f", p90 {kind} {worst:.0f} ms" if worst is not None else "")
        )
    return busy, idle, "; ".join(words)


def role_counts(roles: Mapping[str, Role]) -> tuple[int, int]:
    p = sum(1 for r in roles.values() if r == Role.PREFILL)
    return p, len(roles) - p
