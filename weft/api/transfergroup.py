"""The `TransferGroup` custom resource (``weft.dev/v1alpha1``, short name ``tg``).

These pydantic models are the source of truth: `weft crds` turns them into the structural
OpenAPI schema of ``crds/transfergroup.yaml`` (`crd_manifest`), and the operator reads
objects through them. Field names are the camelCase the API server stores.

Per-field rules (types, ranges, enums, patterns, required fields, defaults) are in the
schema, so the API server itself rejects bad input with the field named. Kubernetes 1.20 has
no CEL rules, so the checks that span fields are `cross_field_problems`, which the operator
reports as the ``Valid`` condition (reason ``InvalidSpec``) and acts on nothing until fixed.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import pydantic
from pydantic.alias_generators import to_camel

from weft.api import autoscaling, podschema, vocab
from weft.api.agent_settings import LocalUrl
from weft.api.autoscaling import Autoscaling
from weft.api.vocab import Backend, BufferDevice, EngineMode, Role, RolePolicy, StorageBackend

GROUP = "weft.dev"
VERSION = "v1alpha1"
KIND = "TransferGroup"
PLURAL = "transfergroups"
SINGULAR = "transfergroup"
SHORT_NAMES = ["tg"]
RATIO_PATTERN = r"^[1-9][0-9]{0,3}:[1-9][0-9]{0,3}$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
OPTIONAL_DNS_LABEL = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"

# The pod layout weft injects into an engine's pod (weft.operator), here because
# `cross_field_problems` keeps the user's template from colliding with it.
AGENT_PORT = 7400
HTTP_PORT = 8080
CONFIG_DIR = "/etc/weft"
TOKEN_DIR = "/var/run/weft/join-token"
ETCD_TLS_DIR = "/var/run/weft/etcd-tls"
RESERVED_PREFIX = "weft-"  # names of the volumes, mounts and ports weft adds
SIDECAR = "weft-agent"  # the sidecar container's name
DEFAULT_AGENT_IMAGE = "weft-agent:latest"
DEFAULT_PULL_POLICY: Literal["IfNotPresent"] = "IfNotPresent"


# an object's default in the schema: the API server then fills the defaults inside it too
_EMPTY: dict[str, Any] = {"default": {}}


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Roles(_Model):
    """How members are split between prefill and decode."""

    policy: RolePolicy = pydantic.Field(
        RolePolicy.RATIO, description="ratio: a fixed prefill:decode ratio; load: by measured load"
    )
    ratio: Annotated[str, pydantic.Field(pattern=RATIO_PATTERN)] = pydantic.Field(
        vocab.DEFAULT_RATIO, description="prefill:decode, such as 1:3"
    )
    min_prefill: Annotated[int, pydantic.Field(ge=0, le=4096)] = pydantic.Field(
        vocab.DEFAULT_MIN_PREFILL, description="members kept in prefill whatever the ratio"
    )
    min_decode: Annotated[int, pydantic.Field(ge=0, le=4096)] = pydantic.Field(
        vocab.DEFAULT_MIN_DECODE, description="members kept in decode whatever the ratio"
    )
    gpu_less_roles: list[Role] = pydantic.Field(
        default_factory=lambda: [Role.PREFILL, Role.DECODE],
        json_schema_extra={"default": ["prefill", "decode"]},
        description="roles a member without a GPU may take",
        max_length=2,
    )
    high_queue: Annotated[float, pydantic.Field(gt=0, le=1e6)] = pydantic.Field(
        8.0, description="load: mean requests waiting per member above which a role is saturated"
    )
    low_queue: Annotated[float, pydantic.Field(ge=0, le=1e6)] = pydantic.Field(
        2.0, description="load: mean requests waiting per member below which a role can spare one"
    )
    settle_seconds: Annotated[float, pydantic.Field(ge=0, le=3600)] = pydantic.Field(
        30.0, description="load: no new flip within this many seconds of the previous one"
    )
    ttft_p90_ms: Annotated[float, pydantic.Field(gt=0, le=1e7)] | None = pydantic.Field(
        None, description="load: prefill is saturated when a prefill member's p90 TTFT is above this"
    )
    itl_p90_ms: Annotated[float, pydantic.Field(gt=0, le=1e7)] | None = pydantic.Field(
        None, description="load: decode is saturated when a decode member's p90 ITL is above this"
    )


class Experts(_Model):
    """Expert placement (wide expert parallelism); count 0 turns it off."""

    count: Annotated[int, pydantic.Field(ge=0, le=65536)] = pydantic.Field(
        0, description="experts per layer to place"
    )
    replication: Annotated[int, pydantic.Field(ge=1, le=16)] = pydantic.Field(
        1, description="replicas of every expert"
    )
    redundant_slots: Annotated[int, pydantic.Field(ge=0, le=4096)] = pydantic.Field(
        0, description="extra slots for the hottest experts"
    )


class Fabric(_Model):
    """The data plane of every agent."""

    backends: list[Backend] = pydantic.Field(
        default_factory=lambda: [Backend.LOCAL, Backend.TCP],
        json_schema_extra={"default": ["local", "tcp"]},
        description="data paths in order of preference",
        min_length=1,
        max_length=3,
    )
    buffer_device: BufferDevice = pydantic.Field(BufferDevice.CPU, description="where staging buffers live")
    buffer_size: Annotated[int, pydantic.Field(ge=4096, le=1 << 40)] = pydantic.Field(
        1 << 30, description="bytes of the staging buffer"
    )
    pool_size: Annotated[int, pydantic.Field(ge=1, le=65536)] = pydantic.Field(
        64, description="descriptors or handles kept open"
    )
    kv_pool_bytes: Annotated[int, pydantic.Field(ge=0, le=1 << 40)] = pydantic.Field(
        0, description="host memory each agent registers as region kv-pool for peers' KV blocks"
    )


class SecretRef(_Model):
    """A Secret in the group's namespace (never the secret itself)."""

    name: Annotated[str, pydantic.Field(pattern=DNS_LABEL, max_length=253)]
    key: Annotated[str, pydantic.Field(min_length=1, max_length=253)] | None = None


class Storage(_Model):
    """The KV store's tier (weft.kvstore); credentials come from a Secret by reference."""

    backend: StorageBackend = pydantic.Field(description="POSIX, GDS, GDS_MT, OBJ or HF3FS")
    path: Annotated[str, pydantic.Field(max_length=4096, pattern=r"^/")] | None = pydantic.Field(
        None, description="directory of the files (file backends)"
    )
    params: dict[str, Annotated[str, pydantic.Field(max_length=2048)]] = pydantic.Field(
        default_factory=dict,
        description="backend parameters that are not secret (bucket, region, endpoint...)",
    )
    credentials_secret_ref: SecretRef | None = pydantic.Field(
        None, description="Secret with access_key and secret_key (OBJ)"
    )


class FailureDetection(_Model):
    lease_ttl_seconds: Annotated[int, pydantic.Field(ge=1, le=60)] = pydantic.Field(
        3, description="etcd lease of each member"
    )


class Etcd(_Model):
    """Where the group's membership and plans live."""

    endpoints: list[Annotated[str, pydantic.Field(pattern=r"^https?://[^\s/]+(:[0-9]{1,5})?/?$")]] = (
        pydantic.Field(min_length=1, max_length=16, description="etcd client URLs")
    )
    tls_secret_ref: SecretRef | None = pydantic.Field(
        None, description="Secret with ca.crt, tls.crt and tls.key"
    )
    join_token_secret_ref: SecretRef = pydantic.Field(description="Secret holding the group's join token")


class Toleration(_Model):
    key: Annotated[str, pydantic.Field(max_length=317)] | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: Annotated[str, pydantic.Field(max_length=63)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


Quantity = Annotated[
    int | Annotated[str, pydantic.Field(pattern=r"^[0-9]+(\.[0-9]+)?([eE][0-9]+|[numkKMGTPE]i?)?$")],
    "quantity",
]


class Resources(_Model):
    limits: dict[str, Quantity] = pydantic.Field(
        default_factory=dict, description="such as nvidia.com/gpu: 1"
    )
    requests: dict[str, Quantity] = pydantic.Field(default_factory=dict)


PullPolicy = Literal["Always", "IfNotPresent", "Never"]


class TemplateMetadata(_Model):
    """Labels and annotations of the pods (the group's own labels win on the same keys)."""

    labels: dict[str, Annotated[str, pydantic.Field(max_length=63)]] = pydantic.Field(default_factory=dict)
    annotations: dict[str, str] = pydantic.Field(default_factory=dict)


class Template(_Model):
    """The pods: a pod template (metadata, spec) the operator injects weft into, or the legacy
    form, `weft agent` pods tuned by image, imagePullPolicy, resources, nodeSelector, tolerations."""

    # The legacy fields have no schema default: the API server would fill it into new-style
    # templates too. The operator applies weft-agent:latest/IfNotPresent when it renders them.
    metadata: TemplateMetadata = pydantic.Field(
        default_factory=lambda: TemplateMetadata.model_validate({}),
        description="labels and annotations of the pods",
    )
    spec: dict[str, Any] | None = pydantic.Field(
        None,
        description="a Kubernetes PodSpec: the engine's pod, into which the operator injects weft "
        "(spec.engine); without it the pods run `weft agent` alone (the legacy fields)",
    )
    image: Annotated[str, pydantic.Field(min_length=1, max_length=1024)] | None = pydantic.Field(
        None, description="legacy: the agent image (default weft-agent:latest)"
    )
    image_pull_policy: PullPolicy | None = pydantic.Field(None, description="legacy (default IfNotPresent)")
    resources: Resources | None = pydantic.Field(None, description="legacy: the agent container's resources")
    node_selector: dict[str, Annotated[str, pydantic.Field(max_length=63)]] | None = pydantic.Field(
        None, description="legacy"
    )
    tolerations: list[Toleration] | None = pydantic.Field(None, max_length=64, description="legacy")

    def legacy_fields(self) -> list[str]:
        """The legacy fields that are set, by their names in the CRD."""
        fields = ("image", "image_pull_policy", "resources", "node_selector", "tolerations")
        return [to_camel(f) for f in fields if getattr(self, f) is not None]


class EngineAgent(_Model):
    """The `weft agent` sidecar container (``mode: sidecar``)."""

    image: Annotated[str, pydantic.Field(min_length=1, max_length=1024)] = DEFAULT_AGENT_IMAGE
    image_pull_policy: PullPolicy = DEFAULT_PULL_POLICY
    resources: Resources = pydantic.Field(
        default_factory=lambda: Resources.model_validate({}), json_schema_extra=_EMPTY
    )


class SharedMemory(_Model):
    """The memory-backed emptyDir the engine and the sidecar share (``mode: sidecar``)."""

    size_limit: Quantity = pydantic.Field("1Gi", description="sizeLimit of the emptyDir (medium Memory)")
    mount_path: Annotated[str, pydantic.Field(max_length=4096, pattern=r"^/")] = pydantic.Field(
        "/dev/shm", description="where both containers mount it"
    )


class Engine(_Model):
    """How weft joins the engine's pod. Only with ``spec.template.spec``; the legacy
    template form ignores it (its pods run `weft agent` alone)."""

    container: Annotated[str, pydantic.Field(max_length=63, pattern=OPTIONAL_DNS_LABEL)] = pydantic.Field(
        "",
        description="the engine's container in spec.template.spec (empty: the first)",
        json_schema_extra=_no_default,  # 1.20 reads a default "" as null and refuses the CRD
    )
    mode: EngineMode = pydantic.Field(
        EngineMode.EMBEDDED,
        description="embedded: the engine imports weft; sidecar: `weft agent` runs beside it as "
        "container weft-agent",
    )
    agent: EngineAgent = pydantic.Field(
        default_factory=lambda: EngineAgent.model_validate({}), json_schema_extra=_EMPTY
    )
    shared_memory: SharedMemory = pydantic.Field(
        default_factory=lambda: SharedMemory.model_validate({}), json_schema_extra=_EMPTY
    )
    metrics_url: LocalUrl | None = pydantic.Field(
        None,
        description="sidecar: the engine's Prometheus endpoint (vLLM/SGLang names), read as the "
        "member's load, such as http://127.0.0.1:8000/metrics",
    )
    hook_url: LocalUrl | None = pydantic.Field(
        None,
        description="sidecar: where each role switch and drain is POSTed; the ack waits for a 2xx",
    )


class TransferGroupSpec(_Model):
    replicas: Annotated[int, pydantic.Field(ge=0, le=4096)] = pydantic.Field(2, description="agent pods")
    min_replicas: Annotated[int, pydantic.Field(ge=0, le=4096)] = pydantic.Field(
        0, description="scale-down floor"
    )
    max_replicas: Annotated[int, pydantic.Field(ge=1, le=4096)] = pydantic.Field(
        64, description="scale-up ceiling"
    )
    roles: Roles = pydantic.Field(default_factory=lambda: Roles.model_validate({}), json_schema_extra=_EMPTY)
    experts: Experts = pydantic.Field(
        default_factory=lambda: Experts.model_validate({}), json_schema_extra=_EMPTY
    )
    fabric: Fabric = pydantic.Field(
        default_factory=lambda: Fabric.model_validate({}), json_schema_extra=_EMPTY
    )
    storage: Storage | None = None
    failure_detection: FailureDetection = pydantic.Field(
        default_factory=lambda: FailureDetection.model_validate({}), json_schema_extra=_EMPTY
    )
    etcd: Etcd
    autoscaling: Autoscaling | None = pydantic.Field(
        None, description="replicas from the members' load (HPA-style); absent: off"
    )
    template: Template = pydantic.Field(
        default_factory=lambda: Template.model_validate({}), json_schema_extra=_EMPTY
    )
    engine: Engine = pydantic.Field(
        default_factory=lambda: Engine.model_validate({}),
        json_schema_extra=_EMPTY,
        description="how weft joins the engine's pod (only with spec.template.spec; ignored otherwise)",
    )


class ConditionType(enum.StrEnum):
    READY = "Ready"
    DEGRADED = "Degraded"
    REBALANCING = "Rebalancing"
    VALID = "Valid"
    SCALING = "Scaling"


class Condition(_Model):
    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[
        str, pydantic.Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    ]
    message: Annotated[str, pydantic.Field(max_length=32768)] = ""
    last_transition_time: str | None = None


class RoleLoad(_Model):
    """The load the engines of one role reported (their members' load records)."""

    role: Role
    members: int = pydantic.Field(description="members of the role that reported load")
    queue_depth: int = pydantic.Field(description="requests waiting, summed")
    running: int = pydantic.Field(description="requests being served, summed")
    kv_cache_usage: float = pydantic.Field(description="mean fraction of KV-cache blocks in use")
    tokens_per_second: float = pydantic.Field(description="summed")
    ttft_p90_ms: float | None = pydantic.Field(None, description="the worst member's p90 TTFT")
    itl_p90_ms: float | None = pydantic.Field(None, description="the worst member's p90 ITL")


class TransferGroupStatus(_Model):
    phase: Literal["Pending", "Running", "Degraded", "Invalid", "Deleting"] | None = None
    conditions: list[Condition] = pydantic.Field(default_factory=list)
    observed_generation: int | None = None
    replicas: int | None = pydantic.Field(None, description="agent pods that exist (the scale subresource)")
    ready_replicas: int | None = None
    selector: str | None = pydantic.Field(None, description="label selector of the agent pods")
    members: int | None = pydantic.Field(None, description="members in the group's etcd")
    prefill: int | None = None
    decode: int | None = None
    prefill_ready: int | None = pydantic.Field(
        None, description="live members the plan puts in prefill that applied its epoch"
    )
    decode_ready: int | None = pydantic.Field(
        None, description="live members the plan puts in decode that applied its epoch"
    )
    plan_epoch: int | None = None
    load: list[RoleLoad] = pydantic.Field(
        default_factory=list, description="the engines' reported load, by role in the plan"
    )
    under_replicated: list[int] = pydantic.Field(default_factory=list)
    draining: list[str] = pydantic.Field(
        default_factory=list, description="members being planned out before a scale-down removes their pods"
    )
    draining_since: str | None = None


def cross_field_problems(spec: TransferGroupSpec) -> list[str]:
    """Rules between fields the 1.20 schema cannot say; each a sentence a user can act on."""
    problems = []
    if not spec.min_replicas <= spec.replicas <= spec.max_replicas:
        problems.append(
            f"spec.replicas ({spec.replicas}) must be between spec.minReplicas ({spec.min_replicas}) "
            f"and spec.maxReplicas ({spec.max_replicas})"
        )
    if spec.experts.count and spec.experts.replication > max(spec.replicas, 1):
        problems.append(
            f"spec.experts.replication ({spec.experts.replication}) needs at least that many replicas "
            f"(spec.replicas is {spec.replicas})"
        )
    if (
        spec.roles.policy is RolePolicy.RATIO
        and spec.replicas >= 2  # one agent is a legitimate small group: it takes one role
        and spec.roles.min_prefill + spec.roles.min_decode > spec.replicas
    ):
        problems.append(
            f"spec.roles.minPrefill + minDecode ({spec.roles.min_prefill + spec.roles.min_decode}) "
            f"is more than spec.replicas ({spec.replicas})"
        )
    gpus, gpu_field = _gpus(spec)
    problems += autoscaling.problems(spec.autoscaling)
    if spec.roles.low_queue >= spec.roles.high_queue:
        problems.append(
            f"spec.roles.lowQueue ({spec.roles.low_queue:g}) must be below spec.roles.highQueue "
            f"({spec.roles.high_queue:g}): the band between them is the hysteresis"
        )
    e = spec.engine
    if (e.metrics_url or e.hook_url) and e.mode is not EngineMode.SIDECAR:
        problems.append(
            "spec.engine.metricsUrl and hookUrl are read by the weft-agent sidecar: set "
            "spec.engine.mode to sidecar (an embedded engine reports load through the SDK)"
        )
    if spec.fabric.buffer_device is BufferDevice.CUDA and not gpus:
        problems.append(f"spec.fabric.bufferDevice is cuda but {gpu_field} asks for no GPU")
    s = spec.storage
    if s is not None:
        if s.backend is not StorageBackend.OBJ and not s.path:
            problems.append(f"spec.storage.path is needed for the {s.backend.value} backend")
        if s.backend is StorageBackend.OBJ and not s.params.get("bucket"):
            problems.append("spec.storage.params.bucket is needed for the OBJ backend")
        if s.backend in (StorageBackend.GDS, StorageBackend.GDS_MT) and not gpus:
            problems.append(f"the {s.backend.value} backend needs GPUs ({gpu_field})")
        for secret_word in ("access_key", "secret_key", "password", "token"):
            if secret_word in s.params:
                problems.append(
                    f"spec.storage.params.{secret_word} is a secret: put it in a Secret and name it in "
                    "spec.storage.credentialsSecretRef"
                )
    return problems + template_problems(spec)


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The dicts of a list in the raw pod spec (the schema made them dicts; be safe anyway)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def engine_container(spec: TransferGroupSpec) -> tuple[int, dict[str, Any]] | None:
    """The index and the raw dict of the container weft joins (``spec.engine.container``,
    else the first); None without ``spec.template.spec`` or when no container has the name."""
    containers = _dicts((spec.template.spec or {}).get("containers"))
    for i, c in enumerate(containers):
        if not spec.engine.container or c.get("name") == spec.engine.container:
            return i, c
    return None


def _gpus(spec: TransferGroupSpec) -> tuple[bool, str]:
    """Whether the pods ask for a GPU, and the field that says so (for the messages)."""
    if spec.template.spec is None:
        limits: dict[str, Any] = dict(spec.template.resources.limits) if spec.template.resources else {}
        field = "spec.template.resources.limits"
    else:
        found = engine_container(spec)
        i, c = found if found is not None else (0, {})
        limits = (c.get("resources") or {}).get("limits") or {}
        field = f"spec.template.spec.containers[{i}].resources.limits (the engine's container)"
    return any(str(k).endswith("/gpu") for k in limits), field


def template_problems(spec: TransferGroupSpec) -> list[str]:
    """The pod template against what the operator injects into it (`cross_field_problems`)."""
    t = spec.template
    if t.spec is None:
        return []
    problems = []
    legacy = t.legacy_fields()
    if legacy:
        problems.append(
            f"spec.template.{', '.join(legacy)} cannot be used with spec.template.spec: move them onto "
            "the engine's container in spec.template.spec.containers (image, imagePullPolicy, "
            "resources) or into spec.template.spec (nodeSelector, tolerations)"
        )
    containers = _dicts(t.spec.get("containers"))
    if not containers:
        return [*problems, "spec.template.spec.containers is empty: put the engine's container there"]
    found = engine_container(spec)
    if found is None:
        names = ", ".join(str(c.get("name")) for c in containers)
        return [
            *problems,
            f"spec.engine.container ({spec.engine.container}) names no container of "
            f"spec.template.spec.containers ({names})",
        ]
    return problems + _reserved_names(spec) + _reserved_places(spec, containers, found)


def _reserved_names(spec: TransferGroupSpec) -> list[str]:
    """Names starting ``weft-`` are the operator's: its volumes, mounts, ports, the sidecar."""
    pod = spec.template.spec or {}
    problems = []
    for i, v in enumerate(_dicts(pod.get("volumes"))):
        if str(v.get("name", "")).startswith(RESERVED_PREFIX):
            problems.append(f"spec.template.spec.volumes[{i}].name ({v.get('name')}) starts with weft-")
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(_dicts(pod.get(kind))):
            where = f"spec.template.spec.{kind}[{i}]"
            if spec.engine.mode is EngineMode.SIDECAR and c.get("name") == SIDECAR:
                problems.append(f"{where}.name is {SIDECAR}, the sidecar's name in mode sidecar")
            for j, m in enumerate(_dicts(c.get("volumeMounts"))):
                if str(m.get("name", "")).startswith(RESERVED_PREFIX):
                    problems.append(f"{where}.volumeMounts[{j}].name ({m.get('name')}) starts with weft-")
            for j, port in enumerate(_dicts(c.get("ports"))):
                if str(port.get("name", "")).startswith(RESERVED_PREFIX):
                    problems.append(f"{where}.ports[{j}].name ({port.get('name')}) starts with weft-")
    return [f"{p}: names starting weft- are the operator's" for p in problems]


def _reserved_places(
    spec: TransferGroupSpec, containers: list[dict[str, Any]], engine: tuple[int, dict[str, Any]]
) -> list[str]:
    """The agent's ports (the pod's containers share one network) and weft's mount paths in
    the engine's container."""
    problems = []
    for i, c in enumerate(containers):
        for j, port in enumerate(_dicts(c.get("ports"))):
            number = port.get("containerPort")
            if number in (AGENT_PORT, HTTP_PORT):
                what = "weft-fabric" if number == AGENT_PORT else "weft-http"
                problems.append(
                    f"spec.template.spec.containers[{i}].ports[{j}] uses port {number}, which weft's "
                    f"agent listens on ({what}): use another port"
                )
    i, c = engine
    for j, m in enumerate(_dicts(c.get("volumeMounts"))):
        if str(m.get("mountPath", "")).rstrip("/") in (CONFIG_DIR, TOKEN_DIR, ETCD_TLS_DIR):
            problems.append(
                f"spec.template.spec.containers[{i}].volumeMounts[{j}].mountPath ({m.get('mountPath')}) "
                "is where weft mounts its settings: use another path"
            )
    return problems


# -- the CRD ------------------------------------------------------------------------------------
PRINTER_COLUMNS = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Members", "type": "integer", "jsonPath": ".status.members"},
    {"name": "Prefill", "type": "integer", "jsonPath": ".status.prefill"},
    {"name": "Decode", "type": "integer", "jsonPath": ".status.decode"},
    {"name": "Epoch", "type": "integer", "jsonPath": ".status.planEpoch"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1), structural, from the models."""
    spec = _structural(TransferGroupSpec.model_json_schema(by_alias=True))
    status = _structural(TransferGroupStatus.model_json_schema(by_alias=True), defaults=False)
    template = spec["properties"]["template"]
    template["properties"]["spec"] = podschema.load()["schema"]
    template["properties"]["spec"]["description"] = (
        "a Kubernetes PodSpec (its schema is the API server's own, see weft/api/podschema.py)"
    )
    spec["description"] = "The desired group: agent pods, role policy, experts, fabric, storage, etcd."
    status["description"] = "What the operator observed, mirrored from the group's etcd plan."
    root = {
        "type": "object",
        "description": "A group of weft agents that move KV cache, activations and weights.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["weft"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


_DROP = ("title",)


_EXCLUSIVE = {"exclusiveMinimum": "minimum", "exclusiveMaximum": "maximum"}


def _structural(schema: dict[str, Any], *, defaults: bool = True) -> dict[str, Any]:
    """pydantic's JSON schema as a Kubernetes structural schema: references inlined, nullable
    instead of ``anyOf [X, null]``, int-or-string for quantities, no titles (and no defaults
    for the status: the operator writes it whole)."""
    defs = schema.get("$defs", {})

    def walk(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            if "enum" in target:  # a shared enum's docstring is not the field's description
                target = {k: v for k, v in target.items() if k != "description"}
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return walk(merged)
        if "anyOf" in node:
            branches = [b for b in node["anyOf"] if b.get("type") != "null"]
            nullable = len(branches) != len(node["anyOf"])
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            types = sorted(b.get("type", "") for b in branches)
            if types == ["integer", "string"]:
                out = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
                pattern = next((b["pattern"] for b in branches if "pattern" in b), None)
                if pattern:
                    out["pattern"] = pattern
                out.update({k: v for k, v in rest.items() if k not in _DROP and k != "default"})
                return out
            if len(branches) != 1:
                raise ValueError(f"cannot express {node} in a structural schema")
            out = walk({**branches[0], **rest})
            if nullable:
                out["nullable"] = True
                if out.get("default") is None:
                    out.pop("default", None)
            return out
        out = {}
        for key, value in node.items():
            if key in _DROP or key == "$defs" or (key == "default" and not defaults):
                continue
            if key == "additionalProperties" and value is False:
                continue  # structural schemas forbid it: unknown fields are pruned (and kubectl flags them)
            if key == "properties":
                out[key] = {name: walk(sub) for name, sub in value.items()}
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                out[key] = walk(value)
            elif key in _EXCLUSIVE and not isinstance(value, bool):
                # JSON Schema 2020 (pydantic) gives the bound; OpenAPI 3.0 a flag beside it
                out[_EXCLUSIVE[key]], out[key] = value, True
            else:
                out[key] = value
        if "enum" in out and "type" not in out:
            out["type"] = "string"
        return out

    return walk(schema)


def crd_yaml() -> str:
    """``crds/transfergroup.yaml`` as `weft crds` writes it."""
    from weft.api.agent_settings import dump_yaml

    header = "# Generated by `weft crds` from weft/api/transfergroup.py. Do not edit.\n"
    return header + dump_yaml(crd_manifest())
