"""weft injected into an engine's pod template (``spec.template.spec`` of a TransferGroup).

Why: an inference engine (vLLM, SGLang...) joins a group from its own pod, so the user writes
the engine's pod and the operator adds only what joining needs, leaving the rest untouched:

- the settings as files: ConfigMap ``NAME-agent`` (``agent.yaml``, ``lmcache-config.yaml``
  with storage) at ``/etc/weft``, the join-token Secret and the etcd TLS Secret read-only;
  their volumes are named ``weft-...`` (`cross_field_problems` keeps the user's names and
  paths out of the way);
- ``WEFT_*`` variables (`weft.api.agent_settings` defines them): the pod's identity from the
  downward API (the member name is the pod name) and the settings the operator resolved.
  The operator owns them: a user entry of the same name is replaced. Ours come first, so a
  user value may refer to them (``$(WEFT_NAME)``);
- ports ``weft-fabric`` and ``weft-http`` on the container that runs the agent.

``spec.engine.mode`` says where the agent runs. ``embedded``: in the engine's process (the
engine imports weft), so the engine's container gets everything. ``sidecar``: `weft agent`
runs as container ``weft-agent`` beside an engine that does not import weft; both get the
settings, and they share a memory-backed emptyDir (``weft-shm``) at
``spec.engine.sharedMemory.mountPath``. Containers of a pod share the IPC namespace by
default, so POSIX shared memory under ``/dev/shm`` and SysV segments are visible to both
anyway; the shared mount makes ``/dev/shm`` one tmpfs of a known size for both, so the
agent's kv-pool can live in a file there (``WEFT_KV_POOL_FILE``) that the engine maps too.
When the engine's container already mounts a volume at that path, the sidecar mounts the
same volume instead.
"""

from __future__ import annotations

import copy
from typing import Any

from weft.api import agent_settings
from weft.api.errors import ConfigError
from weft.api.transfergroup import (
    AGENT_PORT,
    CONFIG_DIR,
    ETCD_TLS_DIR,
    HTTP_PORT,
    RESERVED_PREFIX,
    SIDECAR,
    TOKEN_DIR,
    TransferGroupSpec,
    engine_container,
)
from weft.api.vocab import EngineMode

SHM_VOLUME = f"{RESERVED_PREFIX}shm"
CONFIG_FILE = f"{CONFIG_DIR}/agent.yaml"
GRACE_SECONDS = 35  # the agent drains for up to 30 s on SIGTERM
PORTS = [
    {"name": f"{RESERVED_PREFIX}fabric", "containerPort": AGENT_PORT},
    {"name": f"{RESERVED_PREFIX}http", "containerPort": HTTP_PORT},
]


def readiness_probe() -> dict[str, Any]:
    return {"httpGet": {"path": "/readyz", "port": HTTP_PORT}, "periodSeconds": 2}


def liveness_probe() -> dict[str, Any]:
    return {"httpGet": {"path": "/healthz", "port": HTTP_PORT}, "periodSeconds": 10}


def secret_file(spec: TransferGroupSpec) -> str:
    """Where the join token is mounted, as the agent's settings name it."""
    return f"{TOKEN_DIR}/{spec.etcd.join_token_secret_ref.key or 'token'}"


def field_env(var: str, path: str) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _value(var: str, value: object) -> dict[str, Any]:
    return {"name": var, "value": str(value)}


def storage_env(spec: TransferGroupSpec) -> list[dict[str, Any]]:
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


def settings_volumes(
    name: str, spec: TransferGroupSpec, prefix: str = ""
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The volumes and mounts of the settings: the config, the join token and, when the spec
    names one, the etcd TLS Secret. `prefix`: of the volume names (``weft-`` in a user's pod)."""
    config, token, tls = f"{prefix}config", f"{prefix}join-token", f"{prefix}etcd-tls"
    volumes: list[dict[str, Any]] = [
        {"name": config, "configMap": {"name": f"{name}-agent"}},
        {"name": token, "secret": {"secretName": spec.etcd.join_token_secret_ref.name}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": config, "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": token, "mountPath": TOKEN_DIR, "readOnly": True},
    ]
    if spec.etcd.tls_secret_ref is not None:
        volumes.append({"name": tls, "secret": {"secretName": spec.etcd.tls_secret_ref.name}})
        mounts.append({"name": tls, "mountPath": ETCD_TLS_DIR, "readOnly": True})
    return volumes, mounts


def weft_env(
    name: str, namespace: str, spec: TransferGroupSpec, endpoints: list[str]
) -> list[dict[str, Any]]:
    """The ``WEFT_*`` variables of a member: the pod's identity and the group's settings
    (the same values as ``agent.yaml``, for an engine that reads no file)."""
    env = [
        _value(agent_settings.CONFIG_FILE_ENV, CONFIG_FILE),
        field_env("WEFT_NAME", "metadata.name"),
        field_env("POD_UID", "metadata.uid"),
        field_env("WEFT_ADVERTISE_HOST", "status.podIP"),
        field_env("WEFT_NODE", "spec.nodeName"),
        _value("WEFT_NAMESPACE", namespace),
        _value("WEFT_GROUP", name),
        _value("WEFT_ETCD", ",".join(endpoints)),
    ]
    if spec.etcd.tls_secret_ref is not None:
        env += [
            _value("WEFT_ETCD_CA", f"{ETCD_TLS_DIR}/ca.crt"),
            _value("WEFT_ETCD_CERT", f"{ETCD_TLS_DIR}/tls.crt"),
            _value("WEFT_ETCD_KEY", f"{ETCD_TLS_DIR}/tls.key"),
        ]
    env += [
        _value("WEFT_SECRET_FILE", secret_file(spec)),
        _value("WEFT_LEASE_TTL", spec.failure_detection.lease_ttl_seconds),
        _value("WEFT_LISTEN_PORT", AGENT_PORT),
        _value("WEFT_HTTP_PORT", HTTP_PORT),
        _value("WEFT_BACKENDS", ",".join(b.value for b in spec.fabric.backends)),
        _value("WEFT_KV_POOL_BYTES", spec.fabric.kv_pool_bytes),
    ]
    return env + storage_env(spec)


def _joined(
    container: dict[str, Any], env: list[dict[str, Any]], mounts: list[dict[str, Any]], *, ports: bool
) -> dict[str, Any]:
    """`container` with weft's env first (same names replaced), mounts and maybe ports added."""
    owned = {e["name"] for e in env}
    out = dict(container)
    out["env"] = [*env, *(e for e in container.get("env") or [] if e.get("name") not in owned)]
    out["volumeMounts"] = [*(container.get("volumeMounts") or []), *mounts]
    if ports:
        out["ports"] = [*(container.get("ports") or []), *copy.deepcopy(PORTS)]
    return out


def _shared_memory(
    spec: TransferGroupSpec, engine: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The shared-memory volume to add (none when the engine mounts one there already), the
    engine's mount of it (likewise) and the sidecar's."""
    shm = spec.engine.shared_memory
    path = shm.mount_path.rstrip("/") or "/"
    for m in engine.get("volumeMounts") or []:
        if str(m.get("mountPath", "")).rstrip("/") == path:
            return [], [], {"name": m["name"], "mountPath": shm.mount_path}
    mount = {"name": SHM_VOLUME, "mountPath": shm.mount_path}
    volume = {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm.size_limit}}
    return [volume], [mount], mount


KV_POOL_FILE = "weft-kv-pool"
"""The sidecar's kv-pool, a file on the shared memory volume that the engine maps too."""


def _shared_pool_env(spec: TransferGroupSpec) -> list[dict[str, Any]]:
    """Sidecar mode with a kv-pool: where it lives, for the agent that serves it and for the
    engine that maps it (``WEFT_KV_POOL_FILE``)."""
    if not spec.fabric.kv_pool_bytes:
        return []
    path = spec.engine.shared_memory.mount_path.rstrip("/")
    return [_value("WEFT_KV_POOL_FILE", f"{path}/{KV_POOL_FILE}")]


def _engine_link_env(spec: TransferGroupSpec) -> list[dict[str, Any]]:
    """The sidecar's way to the engine: its metrics and its hook (`weft.agent.sidecar`)."""
    e = spec.engine
    out = []
    if e.metrics_url:
        out.append(_value("WEFT_ENGINE_METRICS", e.metrics_url))
    if e.hook_url:
        out.append(_value("WEFT_ENGINE_HOOK", e.hook_url))
    return out


def _sidecar(
    spec: TransferGroupSpec, env: list[dict[str, Any]], mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    """The `weft agent` container of mode sidecar: the legacy agent's command, probes, mounts."""
    agent = spec.engine.agent
    container: dict[str, Any] = {
        "name": SIDECAR,
        "image": agent.image,
        "imagePullPolicy": agent.image_pull_policy,
        "args": ["agent", "--config", CONFIG_FILE],
        "env": env,
        "ports": copy.deepcopy(PORTS),
        "readinessProbe": readiness_probe(),
        "livenessProbe": liveness_probe(),
        "volumeMounts": mounts,
    }
    r = agent.resources
    if r.limits or r.requests:
        container["resources"] = {
            k: dict(v) for k, v in (("limits", r.limits), ("requests", r.requests)) if v
        }
    return container


def pod_template(
    name: str,
    namespace: str,
    spec: TransferGroupSpec,
    *,
    labels: dict[str, str],
    annotations: dict[str, str],
    endpoints: list[str],
) -> dict[str, Any]:
    """The StatefulSet's pod template: the user's, with weft injected (see the module).

    Args:
        labels: the group's labels; they win over the user's on the same keys.
        annotations: the operator's (the config hash); they win likewise.
        endpoints: the etcd URLs as the members should dial them (``WEFT_ETCD``).

    Raises:
        ConfigError: the template has no engine container (`cross_field_problems` says so
            first; the operator renders nothing for a spec with problems).
    """
    found = engine_container(spec)
    if found is None:
        raise ConfigError(f"TransferGroup {namespace}/{name}: spec.template.spec has no engine container")
    index, _ = found
    pod = copy.deepcopy(spec.template.spec or {})
    volumes, mounts = settings_volumes(name, spec, prefix=RESERVED_PREFIX)
    env = weft_env(name, namespace, spec, endpoints)
    mode = spec.engine.mode
    mode_env = [_value("WEFT_MODE", mode.value)]
    engine = pod["containers"][index]
    if mode is EngineMode.SIDECAR:
        mode_env.append(_value("WEFT_AGENT_HTTP", f"http://127.0.0.1:{HTTP_PORT}"))
        shm_volumes, engine_shm, sidecar_shm = _shared_memory(spec, engine)
        shared = _shared_pool_env(spec)
        pod["containers"][index] = _joined(engine, env + shared + mode_env, mounts + engine_shm, ports=False)
        side_env = [*copy.deepcopy(env), *shared, *_engine_link_env(spec)]
        pod["containers"].append(_sidecar(spec, side_env, [*copy.deepcopy(mounts), sidecar_shm]))
        volumes += shm_volumes
    else:
        pod["containers"][index] = _joined(engine, env + mode_env, mounts, ports=True)
    pod["volumes"] = [*(pod.get("volumes") or []), *volumes]
    pod.setdefault("terminationGracePeriodSeconds", GRACE_SECONDS)
    pod.setdefault("enableServiceLinks", False)  # as the legacy pods: no variables per Service
    meta = spec.template.metadata
    return {
        "metadata": {
            "labels": {**meta.labels, **labels},
            "annotations": {**meta.annotations, **annotations},
        },
        "spec": pod,
    }
