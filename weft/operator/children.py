"""The objects a TransferGroup owns, as plain manifests (pure functions, no API calls).

A group ``NAME`` in namespace ``NS`` owns:

- ConfigMap ``NAME-agent``: ``agent.yaml``, the `weft agent --config` file made from the spec;
- Service ``NAME`` (headless, ``publishNotReadyAddresses``): stable pod names for the
  StatefulSet, with no cluster DNS needed (agents find each other through etcd);
- StatefulSet ``NAME`` (``podManagementPolicy: Parallel``): with ``spec.template.spec``, the
  user's engine pods with weft injected (`weft.operator.podtemplate`); without it (the
  legacy form, rendered exactly as before pod templates existed, so an operator upgrade does
  not roll existing pods) the agent pods, one container, the pod's name as the member name,
  its IP as the advertised address, GPU limits from the spec (none: a GPU-less agent),
  readiness on ``/readyz``;
- PodDisruptionBudget ``NAME``: at most one agent voluntarily disrupted at a time;
- NetworkPolicy ``NAME`` (when the operator runs with ``WEFT_NETWORK_POLICIES``, as the
  chart's default has it): only the group's own pods reach its pods' data path; the HTTP
  port and every port the template declares stay open to all (engines serve there).

Every one carries the group's labels and a controller owner reference, so deleting the group
garbage-collects them.
"""

from __future__ import annotations

from typing import Any

from weft.api.transfergroup import (
    AGENT_PORT,
    DEFAULT_AGENT_IMAGE,
    DEFAULT_PULL_POLICY,
    ETCD_TLS_DIR,
    GROUP,
    HTTP_PORT,
    KIND,
    VERSION,
    TransferGroupSpec,
)
from weft.api.vocab import RolePolicy
from weft.operator import podtemplate

LABEL_GROUP = f"{GROUP}/group"


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "weft-agent",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "weft-operator",
        LABEL_GROUP: name,
    }


def selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "weft-agent", LABEL_GROUP: name}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(name).items())


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(name: str, namespace: str, owner: str, uid: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(owner),
        "ownerReferences": [owner_reference(owner, uid)],
    }


def agent_config(
    name: str, namespace: str, spec: TransferGroupSpec, *, endpoints: list[str] | None = None
) -> dict[str, Any]:
    """The `weft agent --config` file: the member name, address and instance come from the
    pod (environment: ``WEFT_NAME``, ``WEFT_ADVERTISE_HOST``, ``WEFT_NODE``, ``POD_UID``).
    `endpoints`: the etcd URLs as the agents should dial them (default: the spec's)."""
    etcd: dict[str, Any] = {"endpoints": list(spec.etcd.endpoints) if endpoints is None else endpoints}
    if spec.etcd.tls_secret_ref is not None:
        etcd.update(
            ca_file=f"{ETCD_TLS_DIR}/ca.crt",
            cert_file=f"{ETCD_TLS_DIR}/tls.crt",
            key_file=f"{ETCD_TLS_DIR}/tls.key",
        )
    return {
        "group": {"namespace": namespace, "group": name},
        "etcd": etcd,
        "lease_ttl": spec.failure_detection.lease_ttl_seconds,
        "backends": [b.value for b in spec.fabric.backends],
        "listen_host": "0.0.0.0",
        "listen_port": AGENT_PORT,
        "http_host": "0.0.0.0",
        "http_port": HTTP_PORT,
        "secret_file": podtemplate.secret_file(spec),
        "kv_pool_bytes": spec.fabric.kv_pool_bytes,
        "planning": {
            "ratio": spec.roles.ratio,
            "min_prefill": spec.roles.min_prefill,
            "min_decode": spec.roles.min_decode,
            "experts": spec.experts.count,
            "replication": spec.experts.replication,
            "redundant_slots": spec.experts.redundant_slots,
            "gpu_less_roles": [r.value for r in spec.roles.gpu_less_roles],
            **_load_policy(spec),
        },
    }


def _load_policy(spec: TransferGroupSpec) -> dict[str, Any]:
    """The load policy's settings, only for ``policy: load`` (a ratio group's file, and so its
    config hash, stays what it was: upgrading the operator rolls no pods)."""
    r = spec.roles
    if r.policy is not RolePolicy.LOAD:
        return {}
    out: dict[str, Any] = {
        "policy": r.policy.value,
        "high_queue": r.high_queue,
        "low_queue": r.low_queue,
        "settle_seconds": r.settle_seconds,
    }
    if r.ttft_p90_ms is not None:
        out["ttft_p90_ms"] = r.ttft_p90_ms
    if r.itl_p90_ms is not None:
        out["itl_p90_ms"] = r.itl_p90_ms
    return out


def lmcache_config(spec: TransferGroupSpec) -> dict[str, Any] | None:
    """The KV store's ``lmcache-config.yaml`` (weft.kvstore, LMCache) from ``spec.storage`` and
    ``spec.fabric``; no credentials in it: the pods get those from the Secret as
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, which the S3 client reads."""
    s = spec.storage
    if s is None:
        return None
    extra: dict[str, Any] = {
        "enable_nixl_storage": True,
        "nixl_backend": s.backend.value,
        "nixl_pool_size": spec.fabric.pool_size,
    }
    if s.path:
        extra["nixl_path"] = s.path
    if s.params:
        extra["nixl_backend_params"] = dict(s.params)
    return {
        "chunk_size": 256,
        "nixl_buffer_size": spec.fabric.buffer_size,
        "nixl_buffer_device": spec.fabric.buffer_device.value,
        "extra_config": extra,
    }


def config_map(
    name: str,
    namespace: str,
    uid: str,
    spec: TransferGroupSpec,
    config_yaml: str,
    lmcache_yaml: str | None = None,
) -> dict[str, Any]:
    data = {"agent.yaml": config_yaml}
    if lmcache_yaml is not None:
        data["lmcache-config.yaml"] = lmcache_yaml
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(f"{name}-agent", namespace, name, uid),
        "data": data,
    }


def service(name: str, namespace: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, name, uid),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(name),
            "ports": [
                {"name": "fabric", "port": AGENT_PORT, "targetPort": AGENT_PORT},
                {"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT},
            ],
        },
    }


def stateful_set(
    name: str,
    namespace: str,
    uid: str,
    spec: TransferGroupSpec,
    config_hash: str,
    *,
    replicas: int | None = None,
    endpoints: list[str] | None = None,
) -> dict[str, Any]:
    """`replicas`: what the StatefulSet runs now (the operator holds pods while they drain);
    `endpoints`: the etcd URLs as the members should dial them (default: the spec's)."""
    # a config change rolls the pods (the agent reads its file once, at start)
    hashed = {f"{GROUP}/config-hash": config_hash}
    if spec.template.spec is None:
        template = _legacy_pod_template(name, spec, hashed)
    else:
        urls = list(spec.etcd.endpoints) if endpoints is None else endpoints
        template = podtemplate.pod_template(
            name, namespace, spec, labels=labels(name), annotations=hashed, endpoints=urls
        )
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(name, namespace, name, uid),
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(name)},
            "template": template,
        },
    }


def _legacy_pod_template(name: str, spec: TransferGroupSpec, annotations: dict[str, str]) -> dict[str, Any]:
    """The `weft agent` pods of a template without ``spec``: byte for byte what the operator
    rendered before pod templates (tests/operator/data/legacy_statefulsets.json)."""
    t = spec.template
    volumes, mounts = podtemplate.settings_volumes(name, spec)
    container: dict[str, Any] = {
        "name": "agent",
        "image": t.image or DEFAULT_AGENT_IMAGE,
        "imagePullPolicy": t.image_pull_policy or DEFAULT_PULL_POLICY,
        "args": ["agent", "--config", podtemplate.CONFIG_FILE],
        "env": [
            podtemplate.field_env("WEFT_NAME", "metadata.name"),
            podtemplate.field_env("POD_UID", "metadata.uid"),
            podtemplate.field_env("WEFT_ADVERTISE_HOST", "status.podIP"),
            podtemplate.field_env("WEFT_NODE", "spec.nodeName"),
            *podtemplate.storage_env(spec),
        ],
        "ports": [
            {"name": "fabric", "containerPort": AGENT_PORT},
            {"name": "http", "containerPort": HTTP_PORT},
        ],
        "readinessProbe": podtemplate.readiness_probe(),
        "livenessProbe": podtemplate.liveness_probe(),
        "volumeMounts": mounts,
    }
    limits = dict(t.resources.limits) if t.resources else {}
    requests = dict(t.resources.requests) if t.resources else {}
    if limits or requests:
        container["resources"] = {k: v for k, v in (("limits", limits), ("requests", requests)) if v}
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": podtemplate.GRACE_SECONDS,
        "enableServiceLinks": False,
    }
    if t.node_selector:
        pod_spec["nodeSelector"] = dict(t.node_selector)
    if t.tolerations:
        pod_spec["tolerations"] = [tol.model_dump(by_alias=True, exclude_none=True) for tol in t.tolerations]
    return {"metadata": {"labels": labels(name), "annotations": annotations}, "spec": pod_spec}


def disruption_budget(name: str, namespace: str, uid: str, api_version: str) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, namespace, name, uid),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name)}},
    }


def _declared_ports(spec: TransferGroupSpec) -> list[tuple[int, str]]:
    """The (port, protocol) pairs the group's pods declare besides the fabric's: the HTTP
    port, and each ``containerPort`` of the template's containers (an engine's API)."""
    found = {(HTTP_PORT, "TCP")}
    for container in (spec.template.spec or {}).get("containers") or []:
        for port in (container.get("ports") or []) if isinstance(container, dict) else []:
            number = port.get("containerPort") if isinstance(port, dict) else None
            if isinstance(number, int) and number != AGENT_PORT:
                found.add((number, str(port.get("protocol") or "TCP")))
    return sorted(found)


def network_policy(name: str, namespace: str, uid: str, spec: TransferGroupSpec) -> dict[str, Any]:
    """Who reaches the group's pods: the group's own pods, on any port (the fabric's port and
    whatever ports its backends open between members); anyone, on the HTTP port (probes,
    metrics) and on every port the pod template declares (the engine's API). Undeclared
    ports are closed to other pods, where the cluster's CNI enforces NetworkPolicies."""
    own = {"podSelector": {"matchLabels": selector(name)}}
    open_ports = [{"protocol": proto, "port": number} for number, proto in _declared_ports(spec)]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(name, namespace, name, uid),
        "spec": {
            "podSelector": {"matchLabels": selector(name)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [own]}, {"ports": open_ports}],
        },
    }
