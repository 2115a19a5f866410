"""Replica autoscaling of a TransferGroup from its members' load records, the way HPA does it.

Why not an HPA: the figures (requests waiting, KV-cache usage, TTFT) are the members'
signed ``load/<name>`` records in the group's etcd, which no metrics API serves. So the
operator runs HPA's algorithm itself (kubernetes ``pkg/controller/podautoscaler``):

- per target, ``desired = ceil(current * value / target)``, and no change while
  ``|value / target - 1| <= tolerance``; several targets: the largest recommendation wins.
  Members that do not report yet (pods just added) count as idle when scaling up and as
  on target when scaling down, so a scale-up does not feed on itself while new pods join.
- the raw recommendation is clamped to ``[floor, maxReplicas]`` and kept with its time;
  scale-up goes to the lowest recommendation of the up window, scale-down to the highest of
  the down window (stabilization), and one decision moves at most ``maxStep`` pods.

`decide` is that algorithm, pure and deterministic. `Autoscaler.step` is what the resync
timer runs: it reads the group's load, decides, and writes ``spec.replicas`` through the
scale subresource, so ``kubectl scale`` composes with it (a person's value is just the next
``current``) and a scale-down still goes through the drain (the reconcile holds the pods the
plan needs; nothing here touches the StatefulSet).

The history lives in the operator's memory, keyed by the object's uid. An operator that
restarts (or a replica that takes over) starts with none: its first decisions then have
no window behind them, the way a restarted kube-controller-manager's HPA has none. The
damage is bounded by ``maxStep`` and by the floor, and scale-down is the slow direction
anyway (each pod is drained first).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic

from weft.api import autoscaling as api
from weft.api.records import LoadRecord
from weft.api.transfergroup import GROUP, VERSION, TransferGroupSpec, cross_field_problems
from weft.api.vocab import RolePolicy
from weft.operator.groupclients import GroupClients
from weft.operator.kube import Kube, KubeError

log = logging.getLogger(__name__)
API = f"{GROUP}/{VERSION}"

CONDITION = "Scaling"
"""The condition type that says why the last scale happened (status, reason, message)."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """Where the autoscaler may put the replicas: ``floor <= replicas <= ceiling``."""

    floor: int
    ceiling: int


def bounds(spec: TransferGroupSpec) -> Bounds:
    """The spec's floor and ceiling.

    The floor is what the spec itself needs to stay valid: ``minReplicas``, the experts'
    replication when experts are placed, ``minPrefill + minDecode`` under the ratio policy,
    and 1 (a group scaled to zero reports no load, so nothing would bring it back). A floor
    above ``maxReplicas`` is the ceiling (such a spec is invalid and is not scaled anyway).
    """
    floor = max(spec.min_replicas, 1)
    if spec.experts.count:
        floor = max(floor, spec.experts.replication)
    if spec.roles.policy is RolePolicy.RATIO:
        floor = max(floor, spec.roles.min_prefill + spec.roles.min_decode)
    return Bounds(min(floor, spec.max_replicas), spec.max_replicas)


@dataclass(frozen=True, slots=True)
class Recommendation:
    """A raw (unstabilized) recommendation and when it was made (monotonic seconds)."""

    at: float
    replicas: int


@dataclass(frozen=True, slots=True)
class Reading:
    """One metric against its target.

    Attributes:
        metric: the target's name in the spec (``queueDepthPerMember``, ...).
        value: the group's figure: the mean, or for TTFT the highest p90, of the reporters.
        target: the target it is held against.
        reporting: how many members' records it comes from.
        replicas: what this metric alone recommends (``current`` inside the tolerance).
    """

    metric: str
    value: float
    target: float
    reporting: int
    replicas: int

    def describe(self) -> str:
        return f"{self.metric} {self.value:.4g} (target {self.target:.4g}, {self.reporting} reporting)"


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """What `decide` says.

    Attributes:
        current: the replicas it started from.
        replicas: the replicas to have (``current``: no change).
        reason: why, in a sentence (the event's and the condition's message).
        readings: each metric that had figures.
        history: the recommendations to pass to the next decision.
    """

    current: int
    replicas: int
    reason: str
    readings: tuple[Reading, ...]
    history: tuple[Recommendation, ...]

    @property
    def changed(self) -> bool:
        return self.replicas != self.current


def _ceil(x: float) -> int:
    return math.ceil(round(x, 9))  # 4 * 0.5 is 2, not 3 through a rounding error


def _within(ratio: float, tolerance: float) -> bool:
    return abs(ratio - 1.0) <= tolerance + 1e-9  # 11 / 10 is on the band's edge, not past it


def _mean_reading(
    metric: str, values: Sequence[float], target: float, current: int, tolerance: float
) -> Reading:
    """A per-member mean against its target, with HPA's rule for members that do not report:
    idle when the reporters ask for more, on target when they ask for less."""
    n, total = len(values), sum(values)
    mean = total / n
    slots = max(n, current)
    missing = slots - n
    replicas = current
    if not _within(mean / target, tolerance):
        up = mean > target
        ratio = (total if up else total + missing * target) / (slots * target)
        if not _within(ratio, tolerance) and (ratio > 1.0) == up:
            replicas = _ceil(current * ratio)
    return Reading(metric, mean, target, n, replicas)


def _max_reading(
    metric: str, values: Sequence[float], target: float, current: int, tolerance: float
) -> Reading:
    """The worst member's figure against its target (an SLA: every member must meet it). A
    scale-up waits until every replica reports: pods still joining have no latency yet, and
    the last scale-up's effect is not visible before they serve."""
    worst = max(values)
    ratio = worst / target
    replicas = current
    if not _within(ratio, tolerance) and (ratio < 1.0 or len(values) >= current):
        replicas = _ceil(current * ratio)
    return Reading(metric, worst, target, len(values), replicas)


def readings(
    targets: api.Targets, loads: Sequence[LoadRecord], current: int, tolerance: float
) -> tuple[Reading, ...]:
    """Each configured metric that some member reports, against its target."""
    out = []
    if targets.queue_depth_per_member is not None and loads:
        values = [float(load.queue_depth) for load in loads]
        out.append(
            _mean_reading("queueDepthPerMember", values, targets.queue_depth_per_member, current, tolerance)
        )
    if targets.kv_cache_usage is not None and loads:
        values = [load.kv_cache_usage for load in loads]
        out.append(_mean_reading("kvCacheUsage", values, targets.kv_cache_usage, current, tolerance))
    ttfts = [load.ttft_ms.p90 for load in loads if load.ttft_ms is not None]
    if targets.ttft_p90_ms is not None and ttfts:
        out.append(_max_reading("ttftP90Ms", ttfts, targets.ttft_p90_ms, current, tolerance))
    return tuple(out)


def decide(
    current: int,
    autoscaling: api.Autoscaling,
    limits: Bounds,
    loads: Sequence[LoadRecord],
    history: Sequence[Recommendation],
    now: float,
) -> ScaleDecision:
    """The replicas the group should have now (pure: same arguments, same answer).

    Args:
        current: ``spec.replicas`` as the scale subresource says now.
        autoscaling: the spec's section (targets, behavior).
        limits: the floor and ceiling (`bounds`).
        loads: the load records that count (`GroupStatus.loads`).
        history: the previous decision's ``history`` (empty at first).
        now: monotonic seconds, the clock of `history`.
    Returns:
        The decision; ``replicas == current`` when nothing should change, with the reason.
    """
    behavior = autoscaling.behavior
    if current <= 0:
        return ScaleDecision(current, current, "spec.replicas is 0: autoscaling waits (as HPA)", (), ())
    up_window = behavior.scale_up.stabilization_window_seconds
    down_window = behavior.scale_down.stabilization_window_seconds
    recent = tuple(r for r in history if r.at > now - max(up_window, down_window))
    got = readings(autoscaling.targets, loads, current, behavior.tolerance)
    if not got:
        what = ", ".join(autoscaling.targets.configured()) or "no target"
        return ScaleDecision(current, current, f"no member reports load ({what}): replicas stay", (), recent)
    raw = min(max(*(r.replicas for r in got), limits.floor), limits.ceiling)
    kept = (*recent, Recommendation(now, raw))
    up = min((r.replicas for r in kept if r.at > now - up_window), default=raw)
    down = max((r.replicas for r in kept if r.at > now - down_window), default=raw)
    target = min(max(current, min(up, raw)), max(down, raw))
    if target > current:
        target = min(target, current + behavior.scale_up.max_step)
    elif target < current:
        target = max(target, current - behavior.scale_down.max_step)
    target = min(max(target, limits.floor), limits.ceiling)
    return ScaleDecision(current, target, _why(current, target, raw, got, limits), got, kept)


def _why(current: int, target: int, raw: int, got: Sequence[Reading], limits: Bounds) -> str:
    figures = "; ".join(r.describe() for r in got)
    if target == current:
        held = " (stabilizing)" if raw != current else ""
        return f"{current} replicas{held}: {figures}"
    why = f"{current} -> {target}: {figures}"
    if target != raw:
        why += f"; recommended {raw}"
    if target in (limits.floor, limits.ceiling):
        why += f" (bounds {limits.floor}..{limits.ceiling})"
    return why


@dataclass(frozen=True, slots=True)
class Target:
    """The TransferGroup a step works on."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """What a step did, for the handler to report (this module does not import kopf).

    Attributes:
        decision: the decision, None when the step did not get to decide.
        scaled: whether ``spec.replicas`` was written.
        note: why nothing was decided, when nothing was.
        event: (reason, message) of the Kubernetes event to emit, when it scaled.
        condition: (status, reason, message) of the `CONDITION` condition, when it scaled.
        conditions: the status's conditions with that one in, as written before the scale
            (None when the step was not asked to write conditions).
    """

    decision: ScaleDecision | None
    scaled: bool = False
    note: str = ""
    event: tuple[str, str] | None = None
    condition: tuple[str, str, str] | None = None
    conditions: list[dict[str, Any]] | None = None


def with_condition(
    conditions: Sequence[Mapping[str, Any]], condition: tuple[str, str, str], now: str
) -> list[dict[str, Any]]:
    """`conditions` with the `CONDITION` one set to (status, reason, message); its
    lastTransitionTime moves only when its status changes (the Kubernetes convention)."""
    status, reason, message = condition
    old = next((c for c in conditions if c.get("type") == CONDITION), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    mine = {"type": CONDITION, "status": status, "reason": reason, "message": message}
    return [dict(c) for c in conditions if c.get("type") != CONDITION] + [
        mine | {"lastTransitionTime": since or now}
    ]


def section(raw_spec: Mapping[str, Any]) -> api.Autoscaling | None:
    """The spec's autoscaling section, None when absent.

    Raises:
        pydantic.ValidationError: the section does not validate (an older CRD let it in).
    """
    value = raw_spec.get("autoscaling")
    return None if value is None else api.Autoscaling.model_validate(value)


class Autoscaler:
    """The operator's autoscaling: one recommendation history per group, in memory.

    Args:
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._history: dict[Target, tuple[Recommendation, ...]] = {}

    def forget(self, target: Target) -> None:
        """Drop a group's history (autoscaling turned off, the group deleted)."""
        self._history.pop(target, None)

    def forget_group(self, namespace: str, name: str) -> None:
        """Drop the history of every object that had this name (the group is deleted)."""
        for target in [t for t in self._history if (t.namespace, t.name) == (namespace, name)]:
            del self._history[target]

    async def step(
        self,
        kube: Kube,
        clients: GroupClients,
        target: Target,
        raw_spec: Mapping[str, Any],
        status: Mapping[str, Any],
        conditions: Sequence[Mapping[str, Any]] | None = None,
    ) -> StepOutcome | None:
        """Decide the group's replicas from its load and write them through /scale.

        Nothing is decided while the spec is invalid or a scale-down is still under way
        (members draining, or more pods than ``spec.replicas``): the load of a group that is
        changing shape says little, and a second scale-down would pile onto the drain.

        Args:
            kube: the API (blocking calls run in threads).
            clients: the operator's etcd clients (the group's load is read with its own).
            target: the group.
            raw_spec: its spec as stored (``autoscaling`` read here: see `section`).
            status: its status as last seen.
            conditions: its conditions, when the status schema has the `CONDITION` type:
                the step then writes that condition before it scales, so the reconcile the
                new spec.replicas triggers already sees it (and keeps it).
        Returns:
            What was done, for the handler's event and condition; None when the group has
            autoscaling off.
        Raises:
            KubeError: the scale subresource could not be read or written (a 409, someone
                scaled meanwhile, is not an error: the next step starts from their value).
            EtcdError, TokenMissingError: the group's load could not be read.
        """
        try:
            autoscaling = section(raw_spec)
        except pydantic.ValidationError as exc:
            return StepOutcome(None, note=f"invalid spec.autoscaling: {exc.errors()[0]['msg']}")
        if autoscaling is None or not autoscaling.enabled:
            self.forget(target)
            return None
        try:  # the section is read on its own: this works whether or not the spec model has it
            spec = TransferGroupSpec.model_validate({k: v for k, v in raw_spec.items() if k != "autoscaling"})
        except pydantic.ValidationError as exc:
            return StepOutcome(None, note=f"invalid spec: {exc.errors()[0]['msg']}")
        problems = cross_field_problems(spec) + api.problems(autoscaling)
        if problems:
            return StepOutcome(None, note=f"invalid spec: {'; '.join(problems)}")
        if status.get("draining"):
            return StepOutcome(None, note=f"draining {', '.join(status['draining'])}")
        scale = await asyncio.to_thread(kube.get_scale, API, "TransferGroup", *_at(target))
        if scale.status_replicas is not None and scale.status_replicas > scale.replicas:
            return StepOutcome(None, note=f"{scale.status_replicas} pods still going to {scale.replicas}")
        client = await clients.get(target.namespace, target.name, spec)
        doc = await client.read_status()
        history = self._history.get(target, ())
        decision = decide(scale.replicas, autoscaling, bounds(spec), doc.loads, history, self._clock())
        self._history[target] = decision.history
        if not decision.changed:
            return StepOutcome(decision)
        return await _write(kube, target, decision, scale.resource_version, conditions)


async def _write(
    kube: Kube,
    target: Target,
    decision: ScaleDecision,
    version: str,
    conditions: Sequence[Mapping[str, Any]] | None,
) -> StepOutcome:
    """Write the Scaling condition (when asked) and then spec.replicas through /scale, each
    only if the object is still at the version the decision was made from: a ``kubectl
    scale`` in between wins, and the next step starts from it."""
    reason = "ScaledUp" if decision.replicas > decision.current else "ScaledDown"
    condition = ("True", reason, decision.reason)
    written = None
    try:
        if conditions is not None:
            written = with_condition(conditions, condition, _utc_now())
            version = await asyncio.to_thread(
                kube.patch_status, API, "TransferGroup", *_at(target), {"conditions": written}, version
            )
        await asyncio.to_thread(
            kube.patch_scale, API, "TransferGroup", *_at(target), decision.replicas, version
        )
    except KubeError as exc:
        if exc.status != 409:
            raise
        return StepOutcome(decision, note="spec.replicas changed meanwhile: next time")
    log.info("%s/%s %s: %s", target.namespace, target.name, reason, decision.reason)
    return StepOutcome(decision, True, "", (reason, decision.reason), condition, written)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _at(target: Target) -> tuple[str, str]:
    return target.name, target.namespace
