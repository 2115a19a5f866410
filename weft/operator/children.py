"""The objects a TransferGroup owns, as plain manifests (pure functions, no API calls).

A group ``NAME`` in namespace ``NS`` owns:

- ConfigMap ``NAME-agent``: ``agent.yaml``, the `weft agent --config` file made from the spec;
- Service ``NAME`` (headless, ``publishNotReadyAddresses``): stable pod names for the
  StatefulSet, with no cluster DNS needed (agents find each other through etcd);
- StatefulSet ``NAME`` (``podManagementPolicy: Parallel``): the agent pods, one container,
  the pod's name as the member name, its IP as the advertised address, GPU limits from the
  spec (none: a GPU-less agent), readiness on ``/readyz``;
- PodDisruptionBudget ``NAME``: at most one agent voluntarily disrupted at a time.

Every one carries the group's labels and a controller owner reference, so deleting the group
garbage-collects them.
"""

from __future__ import annotations

from typing import Any

from weft.api.transfergroup import GROUP, KIND, VERSION, TransferGroupSpec

AGENT_PORT = 7400
HTTP_PORT = 8080
CONFIG_DIR = "/etc/weft"
TOKEN_DIR = "/var/run/weft/join-token"
ETCD_TLS_DIR = "/var/run/weft/etcd-tls"
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
        "secret_file": f"{TOKEN_DIR}/{spec.etcd.join_token_secret_ref.key or 'token'}",
        "kv_pool_bytes": spec.fabric.kv_pool_bytes,
        "planning": {
            "ratio": spec.roles.ratio,
            "min_prefill": spec.roles.min_prefill,
            "min_decode": spec.roles.min_decode,
            "experts": spec.experts.count,
            "replication": spec.experts.replication,
            "redundant_slots": spec.experts.redundant_slots,
            "gpu_less_roles": [r.value for r in spec.roles.gpu_less_roles],
        },
    }


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


def _field_env(var: str, path: str) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _volumes(name: str, spec: TransferGroupSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The agent pod's volumes and the container's mounts: its config, the join token and,
    when the spec names one, the etcd TLS Secret."""
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{name}-agent"}},
        {"name": "join-token", "secret": {"secretName": spec.etcd.join_token_secret_ref.name}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "join-token", "mountPath": TOKEN_DIR, "readOnly": True},
    ]
    if spec.etcd.tls_secret_ref is not None:
        volumes.append({"name": "etcd-tls", "secret": {"secretName": spec.etcd.tls_secret_ref.name}})
        mounts.append({"name": "etcd-tls", "mountPath": ETCD_TLS_DIR, "readOnly": True})
    return volumes, mounts


def _storage_env(spec: TransferGroupSpec) -> list[dict[str, Any]]:
    """The KV store's environment: its config file and the S3 credentials by reference."""
    env: list[dict[str, Any]] = []
    if spec.storage is not None:
        env.append({"name": "LMCACHE_CONFIG_FILE", "value": f"{CONFIG_DIR}/lmcache-config.yaml"})
        ref = spec.storage.credentials_secret_ref
        if ref is not None:
            for var, key in (("AWS_ACCESS_KEY_ID", "access_key"), ("AWS_SECRET_ACCESS_KEY", "secret_key")):
                env.append(
                    {
                        "name": var,
                        "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key, "optional": True}},
                    }
                )
    return env


def stateful_set(
    name: str,
    namespace: str,
    uid: str,
    spec: TransferGroupSpec,
    config_hash: str,
    *,
    replicas: int | None = None,
) -> dict[str, Any]:
    """`replicas`: what the StatefulSet runs now (the operator holds pods while they drain)."""
    t = spec.template
    volumes, mounts = _volumes(name, spec)
    env_storage = _storage_env(spec)
    container: dict[str, Any] = {
        "name": "agent",
        "image": t.image,
        "imagePullPolicy": t.image_pull_policy,
        "args": ["agent", "--config", f"{CONFIG_DIR}/agent.yaml"],
        "env": [
            _field_env("WEFT_NAME", "metadata.name"),
            _field_env("POD_UID", "metadata.uid"),
            _field_env("WEFT_ADVERTISE_HOST", "status.podIP"),
            _field_env("WEFT_NODE", "spec.nodeName"),
            *env_storage,
        ],
        "ports": [
            {"name": "fabric", "containerPort": AGENT_PORT},
            {"name": "http", "containerPort": HTTP_PORT},
        ],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": HTTP_PORT}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": HTTP_PORT}, "periodSeconds": 10},
        "volumeMounts": mounts,
    }
    limits = {k: v for k, v in t.resources.limits.items()}
    requests = {k: v for k, v in t.resources.requests.items()}
    if limits or requests:
        container["resources"] = {k: v for k, v in (("limits", limits), ("requests", requests)) if v}
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 35,  # the agent drains for up to 30 s on SIGTERM
        "enableServiceLinks": False,
    }
    if t.node_selector:
        pod_spec["nodeSelector"] = dict(t.node_selector)
    if t.tolerations:
        pod_spec["tolerations"] = [tol.model_dump(by_alias=True, exclude_none=True) for tol in t.tolerations]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(name, namespace, name, uid),
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(name)},
            "template": {
                # a config change rolls the pods (the agent reads its file once, at start)
                "metadata": {"labels": labels(name), "annotations": {f"{GROUP}/config-hash": config_hash}},
                "spec": pod_spec,
            },
        },
    }


def disruption_budget(name: str, namespace: str, uid: str, api_version: str) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, namespace, name, uid),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name)}},
    }
