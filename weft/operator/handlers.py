"""`weft operator`: kopf handlers that reconcile TransferGroups. The only module importing kopf.

- create / update / resume, and a resync timer: check the spec (the schema did the per-field
  checks; `cross_field_problems` the rest), then make the owned children exactly what the spec
  says (`weft.operator.children`, applied idempotently by `weft.operator.kube`): created when
  missing, repaired when they drifted, untouched otherwise. Status: phase, conditions (Valid,
  Ready) with reasons, observedGeneration, replicas, ready replicas and the pods' selector.
- scale-down: the pods that go are first planned out (signed ``drain/<pod>`` records), and
  the StatefulSet shrinks once the remaining members applied that plan (`_drain_step`).
- a daemon per group (`mirror`) watches its etcd prefix and mirrors the plan into the status:
  members, prefill/decode, epoch, under-replicated experts, Rebalancing and Degraded.
- delete: kopf's finalizer holds the object until the group's etcd prefix
  (``/weft/v1/<namespace>/<name>/``) is removed; the children go by garbage collection.
- etcd: one `GroupClient` per group (`weft.operator.groupclients`), shared by the drain
  step, the mirror and the finalizer. The handlers are coroutines on kopf's loop, where
  those clients live; blocking Kubernetes calls run in threads (`asyncio.to_thread`).
- replicas of the operator elect the one that works with kopf's peering (`run`).

Errors are decided, not left to chance: a Kubernetes or etcd error worth retrying becomes
``kopf.TemporaryError(delay=...)``; a spec that cannot work becomes a ``Valid=False``
condition (the operator changes nothing until it is fixed), and a bug of ours a
``kopf.PermanentError``. Progress is kept in annotations (the status schema is structural
and would prune kopf's own fields).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import kopf
import pydantic

from weft.api.agent_settings import dump_yaml
from weft.api.transfergroup import (
    GROUP,
    PLURAL,
    VERSION,
    ConditionType,
    TransferGroupSpec,
    cross_field_problems,
)
from weft.membership import GroupClient, GroupStatus, PlanStatus, keyspace
from weft.operator import children, groupclients, scaling
from weft.operator.kube import Kube, KubeError

log = logging.getLogger(__name__)
RESYNC_SECONDS = 10.0
ETCD_CLEANUP_SECONDS = 30.0
_kube_lock = threading.Lock()
_kube: list[Kube] = []  # one connection per process, made at first use
_clients: list[groupclients.GroupClients] = []  # one per process, made at first use (`group_clients`)
NETWORK_POLICIES_ENV = "WEFT_NETWORK_POLICIES"
"""``true``: every group also gets its NetworkPolicy (`children.network_policy`); the chart
sets it with ``networkPolicy.enabled``."""


def network_policies_on() -> bool:
    """Whether groups get their NetworkPolicy (`NETWORK_POLICIES_ENV`)."""
    return os.environ.get(NETWORK_POLICIES_ENV, "").lower() in ("1", "true", "yes")


def kube() -> Kube:
    with _kube_lock:
        if not _kube:
            _kube.append(Kube())
        return _kube[0]


PEERING_LIFETIME = 3
"""Seconds a silent replica's peering record keeps the others paused: the failover time after
a SIGKILL, at most (kopf renews a record every second when its lifetime is this short;
docs/decisions/013-operator-failover.md)."""
_peering: dict[str, Any] = {}  # what `run` was asked for: the startup handler makes the object


@kopf.on.startup()
def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.peering.lifetime = PEERING_LIFETIME
    settings.peering.stealth = True  # no log line per keep-alive (one a second)
    if _peering.get("name"):
        _ensure_peering(_peering["name"], _peering["namespaces"], _peering["clusterwide"])
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/etcd-cleanup"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 60


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions(
    old: list[dict[str, Any]] | None, new: dict[ConditionType, tuple[str, str, str]]
) -> list[dict[str, Any]]:
    """Conditions with lastTransitionTime kept while a condition's status does not change."""
    before = {c.get("type"): c for c in (old or [])}
    out = []
    for ctype, (status, reason, message) in new.items():
        prev = before.get(ctype.value)
        since = prev.get("lastTransitionTime") if prev and prev.get("status") == status else None
        out.append(
            {
                "type": ctype.value,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since or _now(),
            }
        )
    kept = [c for t, c in before.items() if t not in {k.value for k in new}]
    return out + kept


def _retry(exc: KubeError) -> kopf.TemporaryError | kopf.PermanentError:
    if exc.transient:
        return kopf.TemporaryError(str(exc), delay=5)
    return kopf.PermanentError(str(exc))


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
async def reconcile(
    name: str,
    namespace: str | None,
    uid: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    body: kopf.Body,
    **_: Any,
) -> None:
    await _reconcile(name, namespace or "default", uid, dict(spec), meta, dict(status), patch, body)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def resync(
    name: str,
    namespace: str | None,
    uid: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    body: kopf.Body,
    **_: Any,
) -> None:
    """Children drift (edited, deleted) and pods become ready without the group changing;
    load changes too (`_autoscale`)."""
    await _reconcile(name, namespace or "default", uid, dict(spec), meta, dict(status), patch, body)
    await _autoscale(scaling.Target(namespace or "default", name, uid), dict(spec), dict(status), patch, body)


@kopf.on.cleanup()
async def _close_clients(**_: Any) -> None:
    """The operator stops: close the groups' etcd connections."""
    if _clients:
        await _clients[0].close()


@dataclass(frozen=True)
class _Group:
    """What a reconcile works on: the object's identity and its parsed spec."""

    name: str
    namespace: str
    uid: str
    spec: TransferGroupSpec


async def _reconcile(
    name: str,
    namespace: str,
    uid: str,
    raw: dict[str, Any],
    meta: Any,
    status: dict[str, Any],
    patch: kopf.Patch,
    body: Any,
) -> None:
    generation = meta.get("generation")
    spec = _checked_spec(raw, status, generation, patch, body)
    if spec is None:
        return
    group = _Group(name, namespace, uid, spec)
    try:
        live_sts = await asyncio.to_thread(kube().get, "apps/v1", "StatefulSet", name, namespace)
    except KubeError as exc:
        raise _retry(exc) from None
    current = int(((live_sts or {}).get("spec") or {}).get("replicas") or 0)
    draining, drain_note, since = await _drain_hold(group, current, status, body)
    replicas = current if draining else spec.replicas  # hold the pods the plan still needs
    try:
        done, sts = await asyncio.to_thread(_apply_children, group, replicas)
    except KubeError as exc:
        raise _retry(exc) from None
    patch.status["draining"] = draining
    patch.status["drainingSince"] = since if draining else None
    if draining and not status.get("draining"):
        kopf.info(body, reason="Draining", message=f"planning out {', '.join(draining)} before scale-down")
    for kind, what in done.items():
        if what != "unchanged":
            kopf.info(body, reason=what.capitalize(), message=f"{kind} {name}: {what}")
    _report_ready(group, sts, generation, status, patch, body, draining, drain_note)


def _checked_spec(
    raw: dict[str, Any], status: dict[str, Any], generation: Any, patch: kopf.Patch, body: Any
) -> TransferGroupSpec | None:
    """The spec, or None when it cannot work (then the status says why: phase Invalid)."""
    try:
        spec = TransferGroupSpec.model_validate(raw)
    except pydantic.ValidationError as exc:  # the schema should have caught it: an older CRD?
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5]]
    else:
        problems = cross_field_problems(spec)
    if not problems:
        return spec
    message = "; ".join(problems)
    if status.get("phase") != "Invalid" or status.get("observedGeneration") != generation:
        kopf.warn(body, reason="InvalidSpec", message=message)
    patch.status["phase"] = "Invalid"
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = _conditions(
        status.get("conditions"),
        {
            ConditionType.VALID: ("False", "InvalidSpec", message),
            ConditionType.READY: ("False", "InvalidSpec", "the spec must be fixed first"),
        },
    )
    return None


async def _drain_hold(
    group: _Group, current: int, status: dict[str, Any], body: Any
) -> tuple[list[str], str, str]:
    """The pods to keep while the plan still needs them, why, and since when (`_drain_step`;
    after `DRAIN_TIMEOUT_SECONDS` the scale-down goes ahead, with a warning)."""
    spec, name = group.spec, group.name
    draining: list[str] = []
    drain_note = ""
    try:
        draining, drain_note = await _drain_step(spec, group.namespace, name, current)
    except Exception as exc:  # etcd away: do not scale down blind, try again soon
        if current > spec.replicas:
            draining, drain_note = (
                [f"{name}-{i}" for i in range(spec.replicas, current)],
                f"etcd unreachable: {exc}",
            )
        else:
            log.warning("drain bookkeeping of %s/%s: %s", group.namespace, name, exc)
    since = status.get("drainingSince") or _now()
    if draining and _age(since) >= DRAIN_TIMEOUT_SECONDS:
        kopf.warn(
            body,
            reason="DrainTimedOut",
            message=f"scaling down after {DRAIN_TIMEOUT_SECONDS:.0f} s: {drain_note}",
        )
        draining = []
    return draining, drain_note, since


def _apply_children(group: _Group, replicas: int) -> tuple[dict[str, str], dict[str, Any]]:
    """Make the children what the spec says (blocking: run in a thread); what each apply did
    (created, repaired, unchanged) and the StatefulSet as it is now.

    Raises:
        KubeError: the API refused or did not answer.
    """
    name, namespace, uid, spec = group.name, group.namespace, group.uid, group.spec
    k = kube()
    endpoints = resolve_endpoints(list(spec.etcd.endpoints))
    config_yaml = dump_yaml(children.agent_config(name, namespace, spec, endpoints=endpoints))
    kv = children.lmcache_config(spec)
    lmcache_yaml = dump_yaml(kv) if kv is not None else None
    config_hash = hashlib.sha256((config_yaml + (lmcache_yaml or "")).encode()).hexdigest()[:16]
    pdb_version = k.preferred_version("policy", "PodDisruptionBudget", ["policy/v1", "policy/v1beta1"])
    wanted = [
        children.config_map(name, namespace, uid, spec, config_yaml, lmcache_yaml),
        children.service(name, namespace, uid),
        children.stateful_set(
            name, namespace, uid, spec, config_hash, replicas=replicas, endpoints=endpoints
        ),
        children.disruption_budget(name, namespace, uid, pdb_version),
    ]
    if network_policies_on():
        wanted.append(children.network_policy(name, namespace, uid, spec))
    done = {m["kind"]: k.apply(m) for m in wanted}
    return done, k.get("apps/v1", "StatefulSet", name, namespace) or {}


def _report_ready(
    group: _Group,
    sts: dict[str, Any],
    generation: Any,
    status: dict[str, Any],
    patch: kopf.Patch,
    body: Any,
    draining: list[str],
    drain_note: str,
) -> None:
    """Phase, replicas, selector and the Valid, Ready (and while draining Rebalancing)
    conditions from the StatefulSet's status."""
    spec = group.spec
    sts_status = sts.get("status") or {}
    current, ready = int(sts_status.get("replicas") or 0), int(sts_status.get("readyReplicas") or 0)
    all_ready = ready == spec.replicas and sts_status.get("observedGeneration") == (
        sts.get("metadata") or {}
    ).get("generation")
    phase = "Running" if all_ready else "Pending"
    if status.get("phase") != phase:
        kopf.info(body, reason=phase, message=f"{ready} of {spec.replicas} agents ready")
    patch.status["phase"] = phase
    patch.status["observedGeneration"] = generation
    patch.status["replicas"] = current
    patch.status["readyReplicas"] = ready
    patch.status["selector"] = children.selector_string(group.name)
    extra: dict[ConditionType, tuple[str, str, str]] = {}
    if draining:
        extra[ConditionType.REBALANCING] = (
            "True",
            "Draining",
            drain_note or f"planning out {', '.join(draining)}",
        )
    patch.status["conditions"] = _conditions(
        status.get("conditions"),
        extra
        | {
            ConditionType.VALID: ("True", "SpecValid", "the spec passed every check"),
            ConditionType.READY: (
                ("True", "AgentsReady", f"{ready} of {spec.replicas} agents ready")
                if all_ready
                else ("False", "AgentsNotReady", f"{ready} of {spec.replicas} agents ready")
            ),
        },
    )


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def cleanup(name: str, namespace: str | None, spec: kopf.Spec, body: kopf.Body, **_: Any) -> None:
    """Remove the group's etcd prefix before the object goes (bounded: after
    `ETCD_CLEANUP_SECONDS` of failures the object is let go, with a warning event)."""
    try:
        parsed = TransferGroupSpec.model_validate(dict(spec))
    except pydantic.ValidationError:
        kopf.warn(body, reason="EtcdCleanupSkipped", message="the spec has no usable etcd section")
        return
    namespace = namespace or "default"
    _autoscaler.forget_group(namespace, name)
    prefix = keyspace.Keyspace(namespace, name).prefix
    deadline = asyncio.get_running_loop().time() + ETCD_CLEANUP_SECONDS
    last: Exception | None = None
    clients = group_clients()
    try:
        while asyncio.get_running_loop().time() < deadline:
            try:
                client = await clients.get(namespace, name, parsed, need_token=False)
                removed = await client.delete_group()
            except Exception as exc:  # etcd away, or the TLS Secret missing: retry until the deadline
                last = exc
                log.warning("removing %s from etcd failed (%s); retrying", prefix, exc)
                await asyncio.sleep(2.0)
                continue
            kopf.info(body, reason="EtcdCleaned", message=f"removed {removed} keys under {prefix}")
            return
    finally:
        await clients.drop(namespace, name)
    kopf.warn(
        body,
        reason="EtcdCleanupFailed",
        message=f"{prefix} left in etcd after {ETCD_CLEANUP_SECONDS:.0f} s: {last}",
    )


# `<service>.<namespace>.svc[.cluster.local]`: a Service named the way cluster DNS names it
_SERVICE_HOST = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.svc(\.cluster\.local)?$"
)


def resolve_endpoints(endpoints: list[str]) -> list[str]:
    """Endpoints whose host names a Service (``http://weft-etcd.weft-system.svc:2379``) with
    that Service's cluster IP in its place, read from the API.

    Why: clusters without cluster DNS exist (the e2e `local` cluster has none; Debian ships
    no CoreDNS), and the operator can always ask the API. The result goes into the agents'
    config too, so agents need no DNS either. A headless Service, one the API does not
    have, any other host, and every https URL (its certificate names the Service, not the
    IP) are left as they are (DNS may still know them)."""
    return [_resolve(url) for url in endpoints]


def _resolve(url: str) -> str:
    parts = urlsplit(url)
    match = _SERVICE_HOST.match(parts.hostname or "")
    if match is None or parts.scheme != "http":
        return url
    try:
        svc = kube().get("v1", "Service", match.group(1), match.group(3))
    except KubeError as exc:
        log.warning("resolving %s through the API: %s", url, exc)
        return url
    ip = ((svc or {}).get("spec") or {}).get("clusterIP")
    if not ip or ip == "None":
        return url
    return urlunsplit(parts._replace(netloc=ip if parts.port is None else f"{ip}:{parts.port}"))


def _read_secret(name: str, namespace: str) -> dict[str, bytes]:
    return kube().read_secret(name, namespace)


def group_clients() -> groupclients.GroupClients:
    """The operator's etcd clients, one per group (made at first use)."""
    with _kube_lock:
        if not _clients:
            _clients.append(groupclients.GroupClients(_read_secret, resolve_endpoints))
        return _clients[0]


# -- drain before scale-down -----------------------------------------------------------------
DRAIN_TIMEOUT_SECONDS = 120.0


def _age(since: str) -> float:
    try:
        at = datetime.datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return 0.0
    return (datetime.datetime.now(datetime.UTC) - at).total_seconds()


async def _drain_step(
    spec: TransferGroupSpec, namespace: str, name: str, current: int
) -> tuple[list[str], str]:
    """Members still to be planned out before the StatefulSet may shrink to ``spec.replicas``
    (empty: go ahead), and why. Writes ``drain/<member>`` for the leaving pods that are members,
    and removes drain keys nobody needs any more (the member is gone, or scaled back up).
    Only what verifies with the group's join token counts: a plan that is not signed with it
    (or was written back below an acked epoch) and acks that are not (`GroupStatus.acked`
    holds only verified acks of live members) never let a member go."""
    leaving = {f"{name}-{i}" for i in range(spec.replicas, current)}
    client = await group_clients().get(namespace, name, spec)
    doc = await client.read_status()
    members = doc.verified_members
    asked = await client.drain_requests()
    for gone in asked - (leaving & members):
        await client.cancel_drain(gone)
    to_drain = sorted(leaving & members)
    if to_drain and not client.secret:
        return to_drain, "no join token to sign the drain request with"
    for member in set(to_drain) - asked:
        await client.request_drain(member, f"scale-down to {spec.replicas}")
    if not to_drain:
        return [], ""
    plan = doc.plan
    stay = members - leaving
    if plan is None:
        return to_drain, "waiting for a plan"
    if not plan.verified:
        why = "not signed with the join token, or written back below an epoch members applied"
        return to_drain, f"plan epoch {plan.epoch} is not verified ({why})"
    still = sorted(set(plan.roles) & set(to_drain))
    if still:
        return to_drain, f"plan epoch {plan.epoch} still gives work to {', '.join(still)}"
    waiting = sorted(stay - set(plan.acked))
    if waiting:
        ignored = f" ({doc.unverified_acks} unverified acks not counted)" if doc.unverified_acks else ""
        return to_drain, f"waiting for {', '.join(waiting)} to apply epoch {plan.epoch}{ignored}"
    return [], ""


# -- the plan mirror ---------------------------------------------------------------------------
MIRROR_MIN_INTERVAL = 0.25  # seconds between two status patches of one group
MIRROR_IDLE_RECHECK = 5.0  # re-read at least this often, changes or not
MIRROR_LOAD_INTERVAL = 5.0  # seconds between two patches that change only status.load


def mirror_fields(doc: GroupStatus, old_conditions: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Status fields from a group's etcd state (`GroupStatus`): members and roles count
    only signed members that are live; a role's ready count only those that also acked the
    plan's epoch (they serve in it); Rebalancing while some have not applied the plan."""
    live = doc.verified_members
    plan = doc.plan
    roles = {n: r for n, r in (plan.roles if plan else {}).items() if n in live}
    acked = set(plan.acked if plan else ())
    under = sorted(int(e) for e in (plan.under_replicated if plan else ()))
    waiting = sorted(live - acked)
    epoch = plan.epoch if plan else None
    return {
        "members": len(live),
        "prefill": sum(1 for r in roles.values() if r == "prefill"),
        "decode": sum(1 for r in roles.values() if r == "decode"),
        "prefillReady": sum(1 for n, r in roles.items() if r == "prefill" and n in acked),
        "decodeReady": sum(1 for n, r in roles.items() if r == "decode" and n in acked),
        "planEpoch": epoch,
        "load": role_loads(doc, roles),
        "underReplicated": under,
        "conditions": _conditions(
            old_conditions,
            {
                ConditionType.REBALANCING: (
                    (
                        "True",
                        "PlanNotApplied",
                        f"{len(waiting)} of {len(live)} members still applying epoch {epoch}",
                    )
                    if plan and waiting
                    else (
                        "False",
                        "PlanApplied",
                        f"every member applied epoch {epoch}" if plan else "no plan yet",
                    )
                ),
                ConditionType.DEGRADED: (
                    ("True", "UnderReplicatedExperts", f"experts below their replication: {under[:20]}")
                    if under
                    else (
                        "False",
                        "FullyReplicated",
                        "every expert has its replicas" if plan else "no plan yet",
                    )
                ),
            },
        ),
    }


def role_loads(doc: GroupStatus, roles: dict[str, Any]) -> list[dict[str, Any]]:
    """The engines' load by role (``status.load``), rounded so that noise in the figures does
    not rewrite the status at every report."""
    out = []
    for role in ("prefill", "decode"):
        loads = [ld for ld in doc.loads if roles.get(ld.name) == role]
        if not loads:
            continue
        ttft = [ld.ttft_ms.p90 for ld in loads if ld.ttft_ms is not None]
        itl = [ld.itl_ms.p90 for ld in loads if ld.itl_ms is not None]
        out.append(
            {
                "role": role,
                "members": len(loads),
                "queueDepth": sum(ld.queue_depth for ld in loads),
                "running": sum(ld.running for ld in loads),
                "kvCacheUsage": round(sum(ld.kv_cache_usage for ld in loads) / len(loads), 2),
                "tokensPerSecond": round(sum(ld.tokens_per_s for ld in loads)),
                "ttftP90Ms": round(max(ttft)) if ttft else None,
                "itlP90Ms": round(max(itl)) if itl else None,
            }
        )
    return out


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def mirror(
    name: str,
    namespace: str | None,
    spec: kopf.Spec,
    status: kopf.Status,
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    **_: Any,
) -> None:
    """Mirror the group's etcd plan into its status, for as long as the group exists: a
    watch on the group's prefix wakes it, and patches are rate-limited per group."""
    namespace = namespace or "default"
    last: dict[str, Any] | None = None
    last_patch = 0.0
    seen_plan: PlanStatus | None = None
    loop = asyncio.get_running_loop()
    while not stopped:
        try:
            parsed = TransferGroupSpec.model_validate(dict(spec))  # a live view: follows updates
        except pydantic.ValidationError:
            await stopped.wait(MIRROR_IDLE_RECHECK)
            continue
        try:
            client = await group_clients().get(namespace, name, parsed)
            doc = await client.read_status()
            seen_plan = _announce_plan(body, seen_plan, doc.plan)
            fields = mirror_fields(doc, list(dict(status).get("conditions") or []))
            comparable = {k: v for k, v in fields.items() if k != "conditions"} | {
                "c": [(c["type"], c["status"], c["message"]) for c in fields["conditions"]]
            }
            if comparable != last and not _only_load_changed(comparable, last, loop.time() - last_patch):
                await asyncio.sleep(max(0.0, last_patch + MIRROR_MIN_INTERVAL - loop.time()))
                await asyncio.to_thread(
                    kube().patch_status, f"{GROUP}/{VERSION}", "TransferGroup", name, namespace, fields
                )
                last, last_patch = comparable, loop.time()
            await _next_change(client, doc.revision, stopped)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # etcd down, Secret missing, API hiccup: say so, keep going
            log.warning("status mirror of %s/%s: %s", namespace, name, exc)
            await stopped.wait(2.0)


def _only_load_changed(now: dict[str, Any], before: dict[str, Any] | None, since_patch: float) -> bool:
    """Only ``status.load`` moved, and the last patch is recent: the engines' figures change
    at every report, and rewriting the object each second would churn its resourceVersion
    and every watcher of it; they go out with the next patch, at most `MIRROR_LOAD_INTERVAL`
    later."""
    if before is None or since_patch >= MIRROR_LOAD_INTERVAL:
        return False
    return {k: v for k, v in now.items() if k != "load"} == {k: v for k, v in before.items() if k != "load"}


def _announce_plan(body: Any, before: PlanStatus | None, plan: PlanStatus | None) -> PlanStatus | None:
    """An event for every new plan that moves members between roles, saying who moved and
    why (the role policy's sentence), so ``kubectl describe tg`` tells the story. The first
    plan the mirror sees is only remembered (an operator restart repeats nothing)."""
    if plan is None or not plan.verified:
        return before
    if before is None:
        return plan
    if plan.epoch <= before.epoch:
        return before
    moved = [
        f"{name} {before.roles[name]}->{role}"
        for name, role in plan.roles.items()
        if name in before.roles and before.roles[name] != role
    ]
    if moved:
        why = plan.reason or "the role policy"
        message = f"plan epoch {plan.epoch}: {', '.join(moved[:20])} ({why})"
        kopf.info(body, reason="RolesChanged", message=message[:1000])
    return plan


async def _next_change(client: GroupClient, revision: int, stopped: kopf.DaemonStopped) -> None:
    """Return at the group's next change in etcd, after `MIRROR_IDLE_RECHECK`, or when stopped.

    Raises:
        EtcdError: the watch could not be set up.
    """
    waiter = asyncio.ensure_future(client.next_change(revision, MIRROR_IDLE_RECHECK))
    stop = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in (waiter, stop):
            f.cancel()
            with contextlib.suppress(BaseException):
                await f
    failed = waiter.exception() if waiter.done() and not waiter.cancelled() else None
    if failed is not None:
        raise failed


# -- autoscaling ------------------------------------------------------------------------------
_autoscaler = scaling.Autoscaler()  # the groups' recommendation histories (in memory: see scaling)


async def _autoscale(
    target: scaling.Target, raw: dict[str, Any], status: dict[str, Any], patch: kopf.Patch, body: Any
) -> None:
    """Size the group from its load (`scaling.Autoscaler.step`): the new ``spec.replicas``
    goes through /scale, and the next reconcile applies it (draining first on a scale-down).
    A failure is logged and retried at the next resync: the reconcile already did its work."""
    fresh = status | dict(patch.status)  # what the reconcile just found (draining) wins
    conditions = fresh.get("conditions") or []
    try:
        outcome = await _autoscaler.step(kube(), group_clients(), target, raw, fresh, conditions)
    except Exception as exc:  # etcd or the API away: the next resync decides again
        log.warning("autoscaling %s/%s: %s", target.namespace, target.name, exc)
        return
    if outcome is None or outcome.event is None:
        return
    kopf.info(body, reason=outcome.event[0], message=outcome.event[1])
    if outcome.conditions is not None:  # this handler's own status patch must not drop it
        patch.status["conditions"] = outcome.conditions


def _ensure_peering(name: str, namespaces: list[str], clusterwide: bool) -> None:
    """kopf patches its peering object but never creates it: without one, replicas would not
    see each other. (Its CRDs are crds/kopf-peering.yaml.)"""
    k = kube()
    targets = [None] if clusterwide else namespaces
    kind = "ClusterKopfPeering" if clusterwide else "KopfPeering"
    for ns in targets:
        meta: dict[str, Any] = {"name": name} | ({"namespace": ns} if ns else {})
        try:
            if k.get("kopf.dev/v1", kind, name, ns) is None:
                k.apply({"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": meta})
        except KubeError as exc:
            raise kopf.PermanentError(f"{kind} {name}: {exc} (apply crds/kopf-peering.yaml)") from None


PRIORITY_EPOCH_LIMIT = 1 << 33  # seconds since 1970: beyond the year 2200
PRIORITY_TIEBREAK = 1 << 10


def default_priority(started: float) -> int:
    """A peering priority that falls with the start time: the replica that has run longest
    serves, and one that starts (or restarts) later waits behind it. The low bits are random,
    so replicas started in the same second still differ (kopf pauses every replica when two
    share the highest priority).

    Args:
        started: the process's start, in seconds since 1970.

    Returns:
        A positive priority below 2**43 (exact in JSON numbers).
    """
    age_rank = PRIORITY_EPOCH_LIMIT - int(started)
    return age_rank * PRIORITY_TIEBREAK + secrets.randbelow(PRIORITY_TIEBREAK)


def run(
    *,
    namespaces: list[str],
    clusterwide: bool,
    standalone: bool,
    peering: str | None,
    priority: int | None = None,
    debug: bool = False,
    liveness: str | None = None,
) -> int:
    """Run the operator until interrupted (kopf's own loop, signals and logging).

    Replicas elect the one that works through kopf's peering: the highest `priority` serves
    and the others pause; when it dies they resume after `PEERING_LIFETIME` seconds. The
    default priority (`default_priority`) makes the oldest replica win, so a replica that
    restarts never takes the work back from the one that took over. `standalone`: no peering
    (a single replica). `liveness`: a URL such as ``http://0.0.0.0:8080/healthz`` where kopf
    answers kubelet's liveness probe."""
    kopf.configure(debug=debug, verbose=debug)
    if standalone:  # kopf waits for its peering CRD whenever a peering name is given
        kopf.run(clusterwide=clusterwide, namespaces=namespaces, standalone=True, liveness_endpoint=liveness)
        return 0
    name = peering or "weft-operator"
    _peering.update(name=name, namespaces=namespaces, clusterwide=clusterwide)
    prio = priority if priority is not None else default_priority(time.time())
    log.info("peering %r with priority %d", name, prio)
    kopf.run(
        clusterwide=clusterwide,
        namespaces=namespaces,
        peering_name=name,
        priority=prio,
        liveness_endpoint=liveness,
    )
    return 0
