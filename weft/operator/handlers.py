"""`weft operator`: kopf handlers that reconcile TransferGroups. The only module importing kopf.

- create / update / resume, and a resync timer: check the spec (the schema did the per-field
  checks; `cross_field_problems` the rest), then make the owned children exactly what the spec
  says (`weft.operator.children`, applied idempotently by `weft.operator.kube`): created when
  missing, repaired when they drifted, untouched otherwise. Status: phase, conditions (Valid,
  Ready) with reasons, observedGeneration, replicas, ready replicas and the pods' selector.
- delete: kopf's finalizer holds the object until the group's etcd prefix
  (``/weft/v1/<namespace>/<name>/``) is removed; the children go by garbage collection.

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
import tempfile
import threading
from pathlib import Path
from typing import Any

import kopf
import pydantic

from weft.api.agent_settings import dump_yaml
from weft.api.settings import EtcdSettings
from weft.api.transfergroup import (
    GROUP,
    PLURAL,
    VERSION,
    ConditionType,
    TransferGroupSpec,
    cross_field_problems,
)
from weft.operator import children
from weft.operator.kube import Kube, KubeError

log = logging.getLogger(__name__)
RESYNC_SECONDS = 10.0
ETCD_CLEANUP_SECONDS = 30.0
_kube_lock = threading.Lock()
_kube: list[Kube] = []  # one connection per process, made at first use


def kube() -> Kube:
    with _kube_lock:
        if not _kube:
            _kube.append(Kube())
        return _kube[0]


@kopf.on.startup()
def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
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
def reconcile(
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
    _reconcile(name, namespace or "default", uid, dict(spec), meta, dict(status), patch, body)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(
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
    """Children drift (edited, deleted) and pods become ready without the group changing."""
    _reconcile(name, namespace or "default", uid, dict(spec), meta, dict(status), patch, body)


def _reconcile(
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
    try:
        spec = TransferGroupSpec.model_validate(raw)
    except pydantic.ValidationError as exc:  # the schema should have caught it: an older CRD?
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5]]
    else:
        problems = cross_field_problems(spec)
    if problems:
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
        return
    k = kube()
    config_yaml = dump_yaml(children.agent_config(name, namespace, spec))
    config_hash = hashlib.sha256(config_yaml.encode()).hexdigest()[:16]
    try:
        pdb_version = k.preferred_version("policy", "PodDisruptionBudget", ["policy/v1", "policy/v1beta1"])
        wanted = [
            children.config_map(name, namespace, uid, spec, config_yaml),
            children.service(name, namespace, uid),
            children.stateful_set(name, namespace, uid, spec, config_hash),
            children.disruption_budget(name, namespace, uid, pdb_version),
        ]
        done = {m["kind"]: k.apply(m) for m in wanted}
        sts = k.get("apps/v1", "StatefulSet", name, namespace) or {}
    except KubeError as exc:
        raise _retry(exc) from None
    for kind, what in done.items():
        if what != "unchanged":
            kopf.info(body, reason=what.capitalize(), message=f"{kind} {name}: {what}")
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
    patch.status["selector"] = children.selector_string(name)
    patch.status["conditions"] = _conditions(
        status.get("conditions"),
        {
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
    prefix = f"/weft/v1/{namespace}/{name}/"
    deadline = asyncio.get_running_loop().time() + ETCD_CLEANUP_SECONDS
    last: Exception | None = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            removed = await _delete_prefix(parsed, namespace, prefix)
        except (KubeError, OSError, TimeoutError, Exception) as exc:  # etcd or the TLS Secret
            last = exc
            log.warning("removing %s from etcd failed (%s); retrying", prefix, exc)
            await asyncio.sleep(2.0)
            continue
        kopf.info(body, reason="EtcdCleaned", message=f"removed {removed} keys under {prefix}")
        return
    kopf.warn(
        body,
        reason="EtcdCleanupFailed",
        message=f"{prefix} left in etcd after {ETCD_CLEANUP_SECONDS:.0f} s: {last}",
    )


async def _delete_prefix(spec: TransferGroupSpec, namespace: str, prefix: str) -> int:
    from weft.membership._etcd import Etcd

    with tempfile.TemporaryDirectory(prefix="weft-etcd-tls-") as tmp:
        extra: dict[str, Any] = {}
        if spec.etcd.tls_secret_ref is not None:
            files = await asyncio.to_thread(kube().read_secret, spec.etcd.tls_secret_ref.name, namespace)
            for key, field in (("ca.crt", "ca_file"), ("tls.crt", "cert_file"), ("tls.key", "key_file")):
                if key in files:
                    path = Path(tmp) / key
                    path.write_bytes(files[key])
                    path.chmod(0o600)
                    extra[field] = path
        settings = EtcdSettings(endpoints=list(spec.etcd.endpoints), **extra)
        etcd = Etcd(settings)
        try:
            return await etcd.delete_prefix(prefix.encode())
        finally:
            with contextlib.suppress(Exception):
                await etcd.close()


def run(
    *, namespaces: list[str], clusterwide: bool, standalone: bool, peering: str | None, debug: bool = False
) -> int:
    """Run the operator until interrupted (kopf's own loop, signals and logging)."""
    kopf.configure(debug=debug, verbose=debug)
    if standalone:  # kopf waits for its peering CRD whenever a peering name is given
        kopf.run(clusterwide=clusterwide, namespaces=namespaces, standalone=True)
    else:
        kopf.run(clusterwide=clusterwide, namespaces=namespaces, peering_name=peering or "weft-operator")
    return 0
