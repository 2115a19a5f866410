"""Settings of `weft agent` and `weft status`, and the one place their sources are merged.

Why here: the node agent is configured from three places at once (a config file baked into an
image or a ConfigMap, ``WEFT_*`` variables set by the operator, and flags typed by a person),
and a wrong value must be reported with its field and the source it came from, before
anything starts. Precedence, highest first::

    flags (overrides) > environment > config file > defaults

A source that sets ``secret`` or ``secret_file`` replaces both from the sources below it (the
join token comes from one place).

**Config file.** YAML, read with PyYAML (a dependency of weft); a file whose name ends in
``.json`` is read as JSON (JSON is also valid YAML). The file mirrors the model, sections
nested::

    name: prefill-0
    group: {namespace: default, group: llama}
    etcd:
      endpoints: ["https://etcd-0:2379", "https://etcd-1:2379"]
      ca_file: certs/ca.pem            # relative paths: relative to the file's directory
    lease_ttl: 3
    secret_file: /var/run/weft/join-token
    http_host: 0.0.0.0

The file may not hold ``secret`` itself (use ``secret_file``, or ``WEFT_SECRET``).

**Environment** (`ENVIRONMENT` lists every variable; an empty value counts as unset):
``WEFT_NAME``, ``WEFT_GROUP``, ``WEFT_NAMESPACE``, ``WEFT_ETCD`` (comma-separated endpoints),
``WEFT_ETCD_CA``/``WEFT_ETCD_CERT``/``WEFT_ETCD_KEY``, ``WEFT_ETCD_USER``/``WEFT_ETCD_PASSWORD``,
``WEFT_LEASE_TTL``, ``WEFT_SECRET``, ``WEFT_SECRET_FILE``, ``WEFT_LISTEN_HOST``,
``WEFT_ADVERTISE_HOST``, ``WEFT_LISTEN_PORT``, ``WEFT_BACKENDS`` (comma-separated),
``WEFT_HTTP_HOST``, ``WEFT_HTTP_PORT``, ``WEFT_DRAIN_TIMEOUT``, ``WEFT_JOIN_TIMEOUT``,
``WEFT_KV_POOL_BYTES``,
``WEFT_NODE``, ``WEFT_RATIO``, ``WEFT_MIN_PREFILL``, ``WEFT_MIN_DECODE``, ``WEFT_EXPERTS``,
``WEFT_REPLICATION``, ``WEFT_REDUNDANT_SLOTS``, ``WEFT_EXPERT_SOURCE``, ``WEFT_ROLE_POLICY``,
``WEFT_HIGH_QUEUE``, ``WEFT_LOW_QUEUE``, ``WEFT_SETTLE_SECONDS``, ``WEFT_TTFT_P90_MS``,
``WEFT_ITL_P90_MS``, ``WEFT_KV_POOL_FILE``, ``WEFT_ENGINE_METRICS``, ``WEFT_ENGINE_HOOK``, and
``POD_UID``
(the instance id, from the Kubernetes downward API). ``WEFT_CONFIG`` names the settings file
for an engine that joins with `weft.engine.Engine.from_env` (the operator mounts it).

Three more names are set by the operator in an engine's pod (``spec.template.spec`` of a
TransferGroup) and are not settings, so `ENVIRONMENT` does not read them: ``WEFT_CONFIG``
(`CONFIG_FILE_ENV`, the path of this file for an engine that embeds weft; `weft agent` takes
``--config``), ``WEFT_MODE`` (``embedded`` or ``sidecar``) and ``WEFT_AGENT_HTTP`` (sidecar
mode: the URL of the sidecar agent's status and metrics endpoint).

Errors are `SettingsError`, a `weft.api.errors.ConfigError` (so also a `ValueError`) naming
the field and its source.
"""

from __future__ import annotations

import json
import reprlib
import secrets
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic

from weft.api import vocab
from weft.api.errors import ConfigError
from weft.api.settings import EtcdSettings, GroupRef, Name

MIN_SECRET_BYTES = 16
MAX_CONFIG_FILE_BYTES = 1 << 20
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
_SECRET_PATHS = frozenset({("secret",), ("etcd", "password")})
_PATH_FIELDS = frozenset({("secret_file",), ("etcd", "ca_file"), ("etcd", "cert_file"), ("etcd", "key_file")})
_SECTIONS = frozenset({"group", "etcd", "planning", "limits"})

FieldPath = tuple[str, ...]

CONFIG_FILE_ENV = "WEFT_CONFIG"
"""The variable naming the config file in an engine's pod (documented above; not a setting)."""

ENVIRONMENT: dict[str, FieldPath] = {
    "WEFT_NAME": ("name",),
    "WEFT_GROUP": ("group", "group"),
    "WEFT_NAMESPACE": ("group", "namespace"),
    "WEFT_ETCD": ("etcd", "endpoints"),
    "WEFT_ETCD_CA": ("etcd", "ca_file"),
    "WEFT_ETCD_CERT": ("etcd", "cert_file"),
    "WEFT_ETCD_KEY": ("etcd", "key_file"),
    "WEFT_ETCD_USER": ("etcd", "username"),
    "WEFT_ETCD_PASSWORD": ("etcd", "password"),
    "WEFT_LEASE_TTL": ("lease_ttl",),
    "WEFT_SECRET": ("secret",),
    "WEFT_SECRET_FILE": ("secret_file",),
    "WEFT_LISTEN_HOST": ("listen_host",),
    "WEFT_ADVERTISE_HOST": ("advertise_host",),
    "WEFT_LISTEN_PORT": ("listen_port",),
    "WEFT_BACKENDS": ("backends",),
    "WEFT_HTTP_HOST": ("http_host",),
    "WEFT_HTTP_PORT": ("http_port",),
    "WEFT_DRAIN_TIMEOUT": ("drain_timeout",),
    "WEFT_JOIN_TIMEOUT": ("join_timeout",),
    "WEFT_KV_POOL_BYTES": ("kv_pool_bytes",),
    "WEFT_NODE": ("node",),
    "WEFT_RATIO": ("planning", "ratio"),
    "WEFT_MIN_PREFILL": ("planning", "min_prefill"),
    "WEFT_MIN_DECODE": ("planning", "min_decode"),
    "WEFT_EXPERTS": ("planning", "experts"),
    "WEFT_REPLICATION": ("planning", "replication"),
    "WEFT_REDUNDANT_SLOTS": ("planning", "redundant_slots"),
    "WEFT_EXPERT_SOURCE": ("planning", "expert_source"),
    "WEFT_ROLE_POLICY": ("planning", "policy"),
    "WEFT_HIGH_QUEUE": ("planning", "high_queue"),
    "WEFT_LOW_QUEUE": ("planning", "low_queue"),
    "WEFT_SETTLE_SECONDS": ("planning", "settle_seconds"),
    "WEFT_TTFT_P90_MS": ("planning", "ttft_p90_ms"),
    "WEFT_ITL_P90_MS": ("planning", "itl_p90_ms"),
    "WEFT_KV_POOL_FILE": ("kv_pool_file",),
    "WEFT_ENGINE_METRICS": ("engine_metrics_url",),
    "WEFT_ENGINE_HOOK": ("engine_hook_url",),
    "POD_UID": ("instance",),
    "WEFT_MAX_UNAUTHENTICATED": ("limits", "max_unauthenticated"),
    "WEFT_MAX_DESCRIPTORS": ("limits", "max_descriptors"),
    "WEFT_MAX_STAGING_BYTES": ("limits", "max_staging_bytes"),
    "WEFT_MAX_NOTIFICATION_BYTES": ("limits", "max_notification_bytes"),
    "WEFT_MAX_PENDING_NOTIFICATIONS": ("limits", "max_pending_notifications"),
    "WEFT_MAX_PENDING_NOTIFICATION_BYTES": ("limits", "max_pending_notification_bytes"),
}
"""Environment variable -> settings field (a path into the sections)."""

_LISTS = frozenset({"WEFT_ETCD", "WEFT_BACKENDS"})  # comma-separated values

Port = Annotated[int, pydantic.Field(ge=0, le=65535)]
Host = Annotated[str, pydantic.Field(max_length=253)]


LocalUrl = Annotated[
    str, pydantic.StringConstraints(pattern=r"^http://[^\s/?#]+(/[^\s]*)?$", max_length=2048)
]
"""A plain-HTTP URL of a process in the same pod (the engine next to a sidecar agent)."""


class SettingsError(ConfigError):
    """A setting is missing, malformed or inconsistent.

    Attributes:
        field: the dotted field name (``etcd.endpoints``), or ``settings`` when the problem
            spans fields.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Settings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class GroupClientSettings(_Settings):
    """What any client of a group needs: where etcd is, which group, and the join token."""

    group: GroupRef
    """Namespace and group name: the etcd prefix ``/weft/v1/<namespace>/<group>/``."""
    etcd: EtcdSettings = EtcdSettings()
    """How to reach etcd: endpoints, TLS files, user and password, request deadline."""
    secret: pydantic.SecretStr | None = None
    """The group join token itself (>= 16 bytes, UTF-8); normally from ``WEFT_SECRET``."""
    secret_file: Path | None = None
    """A file holding the group join token (>= 16 bytes; surrounding whitespace is dropped),
    e.g. a mounted Kubernetes Secret."""

    @pydantic.field_validator("secret")
    @classmethod
    def _secret_length(cls, value: pydantic.SecretStr | None) -> pydantic.SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"the join token must be at least {MIN_SECRET_BYTES} bytes")
        return value

    @pydantic.model_validator(mode="after")
    def _one_secret(self) -> GroupClientSettings:
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("give secret or secret_file, not both")
        return self

    def join_token(self) -> bytes | None:
        """The group join token: `secret`, or the contents of `secret_file`; None if neither.

        Raises:
            SettingsError: the file cannot be read or holds fewer than 16 bytes.
        """
        if self.secret is not None:
            return self.secret.get_secret_value().encode()
        if self.secret_file is None:
            return None
        try:
            with self.secret_file.open("rb") as f:
                token = f.read(64 << 10).strip()
        except OSError as exc:
            raise SettingsError(
                "secret_file", f"secret_file: cannot read {self.secret_file}: {exc}"
            ) from None
        if len(token) < MIN_SECRET_BYTES:
            raise SettingsError(
                "secret_file",
                f"secret_file: {self.secret_file} holds {len(token)} bytes; "
                f"the join token must be at least {MIN_SECRET_BYTES}",
            )
        return token


class LimitSettings(pydantic.BaseModel):
    """Bounds of the data path against peers that misbehave (each hit is counted on /metrics
    as ``weft_fabric_limit_<bound>_total``); the defaults are the fabric's."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
    max_unauthenticated: Annotated[int, pydantic.Field(ge=1, le=1 << 16)] = 256
    """Inbound connections still in their handshake at once; more are closed on accept."""
    max_descriptors: Annotated[int, pydantic.Field(ge=1, le=1 << 24)] = 1 << 16
    """Most descriptors one request may carry."""
    max_staging_bytes: Annotated[int, pydantic.Field(ge=1 << 20, le=1 << 40)] = 256 << 20
    """Host memory held at once for copies to and from device memory."""
    max_notification_bytes: Annotated[int, pydantic.Field(ge=1, le=1 << 30)] = 1 << 20
    """Largest notification accepted."""
    max_pending_notifications: Annotated[int, pydantic.Field(ge=1, le=1 << 24)] = 1 << 16
    """Notifications held before back-pressure (/readyz 503 while full)."""
    max_pending_notification_bytes: Annotated[int, pydantic.Field(ge=1, le=1 << 40)] = 64 << 20
    """Bytes of notifications held before back-pressure (at least max_notification_bytes)."""

    @pydantic.model_validator(mode="after")
    def _room_for_one(self) -> LimitSettings:
        if self.max_pending_notification_bytes < self.max_notification_bytes:
            raise ValueError("max_pending_notification_bytes must be at least max_notification_bytes")
        return self


class PlanningSettings(pydantic.BaseModel):
    """The group's policy (the operator will feed it from the TransferGroup; flags for now).

    Every agent carries it; the elected leader plans with its own copy.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    ratio: Annotated[str, pydantic.StringConstraints(pattern=r"^[0-9]{1,3}:[0-9]{1,3}$")] = (
        vocab.DEFAULT_RATIO
    )
    """``PREFILL:DECODE`` members, e.g. ``1:3``."""
    min_prefill: Annotated[int, pydantic.Field(ge=0, le=100000)] = vocab.DEFAULT_MIN_PREFILL
    """Members kept in prefill whatever the ratio."""
    min_decode: Annotated[int, pydantic.Field(ge=0, le=100000)] = vocab.DEFAULT_MIN_DECODE
    """Members kept in decode whatever the ratio."""
    experts: Annotated[int, pydantic.Field(ge=0, le=1 << 20)] = 0
    """MoE experts to place (0: no expert placement)."""
    replication: Annotated[int, pydantic.Field(ge=1, le=64)] = 1
    """Replicas of every expert (on distinct members)."""
    redundant_slots: Annotated[int, pydantic.Field(ge=0, le=1 << 20)] = 0
    """Extra replicas, given to the hottest experts."""
    gpu_less_roles: Annotated[list[vocab.Role], pydantic.Field(max_length=2)] = list(vocab.ROLES)
    """Roles a member without a GPU may take (e.g. only ``decode``)."""
    policy: vocab.RolePolicy = vocab.RolePolicy.RATIO
    """``ratio``: the fixed ratio above; ``load``: members move between the roles by the load
    they report (queue depth per role, TTFT/ITL targets), one step per signal."""
    high_queue: Annotated[float, pydantic.Field(gt=0, le=1e6)] = 8.0
    """Load policy: mean requests waiting per member above which a role is saturated."""
    low_queue: Annotated[float, pydantic.Field(ge=0, le=1e6)] = 2.0
    """Load policy: mean requests waiting per member below which a role can spare one."""
    settle_seconds: Annotated[float, pydantic.Field(ge=0, le=3600)] = 30.0
    """Load policy: no new step within this many seconds of the previous one."""
    ttft_p90_ms: Annotated[float, pydantic.Field(gt=0, le=1e7)] | None = None
    """Load policy: prefill is saturated when a prefill member's p90 TTFT is above this."""
    itl_p90_ms: Annotated[float, pydantic.Field(gt=0, le=1e7)] | None = None
    """Load policy: decode is saturated when a decode member's p90 ITL is above this."""
    debounce: Annotated[float, pydantic.Field(ge=0, le=60)] = 0.1
    """Seconds of quiet after a change before the leader re-plans."""
    expert_source: (
        Annotated[str, pydantic.StringConstraints(pattern=r"^(synthetic:[0-9]{1,12}|dir:.+|kv:.+)$")] | None
    ) = None
    """Where expert weights come from when no replica survived: ``synthetic:BYTES`` (tests,
    demos), ``dir:PATH`` (``expert-<id>.bin`` + ``manifest.json``) or ``kv:LMCACHE_CONFIG``
    (the KV store that config names, shared by the group); None: placement only."""

    @pydantic.model_validator(mode="after")
    def _hysteresis(self) -> PlanningSettings:
        if self.low_queue >= self.high_queue:
            raise ValueError(f"low_queue ({self.low_queue}) must be below high_queue ({self.high_queue})")
        return self

    @pydantic.field_validator("ratio")
    @classmethod
    def _not_zero(cls, value: str) -> str:
        if all(int(p) == 0 for p in value.split(":")):
            raise ValueError("ratio 0:0 has no members in either role")
        return value


class AgentSettings(GroupClientSettings):
    """Everything `weft agent` needs; one frozen object (see the module docstring for sources)."""

    name: Name
    """This agent's name in the group: unique among live members (letters, digits, ``._:-``)."""
    lease_ttl: Annotated[float, pydantic.Field(gt=0, le=3600)] = 3.0
    """Seconds of the member lease: how long a crashed agent stays listed (etcd grants whole
    seconds and no less than its minimum, about 2 s)."""
    listen_host: Host = "127.0.0.1"
    """Address the fabric (data path) listens on."""
    advertise_host: Host | None = None
    """Address peers connect to (default: listen_host; required when that is a wildcard)."""
    listen_port: Port = 0
    """Fabric port (0: any free port)."""
    backends: Annotated[list[vocab.Backend], pydantic.Field(min_length=1, max_length=3)] = [
        vocab.Backend.LOCAL,
        vocab.Backend.TCP,
    ]
    """Data paths to offer, in order of preference."""
    http_host: Host = "127.0.0.1"
    """Address of the /healthz, /readyz, /metrics and /status endpoint."""
    http_port: Port = 0
    """Port of that endpoint (0: any free port; the ready file and the member record say which)."""
    drain_timeout: Annotated[float, pydantic.Field(ge=0, le=3600)] = 30.0
    """On SIGTERM: longest wait, in seconds, for transfers in flight before leaving."""
    join_timeout: Annotated[float, pydantic.Field(gt=0, le=3600)] = 30.0
    """Longest wait, in seconds, for etcd (and for a stale holder of the name) when joining."""
    kv_pool_bytes: Annotated[int, pydantic.Field(ge=0, le=1 << 40)] = 0
    """Host memory registered writable as the region ``kv-pool``: peers (an inference engine,
    the e2e traffic generator) WRITE KV blocks into it and READ them back, the
    disaggregated-serving pattern. 0: none."""
    kv_pool_file: Annotated[Path, pydantic.Field()] | None = None
    """Put the ``kv-pool`` region in this file (created, sized, mapped shared) instead of
    anonymous memory: in sidecar mode it lies on the pod's shared ``emptyDir`` (medium
    Memory), so the engine container maps the same bytes the agent serves to peers."""
    engine_metrics_url: LocalUrl | None = None
    """Sidecar mode: the engine's Prometheus endpoint (``http://127.0.0.1:8000/metrics``);
    the agent reads the engine's queue, KV usage and latencies from it (vLLM and SGLang
    names) and publishes them as this member's load."""
    engine_hook_url: LocalUrl | None = None
    """Sidecar mode: where the agent POSTs each role switch and drain as JSON and waits for
    the engine's 2xx before it acks; unset: the agent acks once its own transfers are done."""
    node: Host = pydantic.Field(default_factory=socket.gethostname)
    """The node (host) shown to others (default: this host's name)."""
    instance: Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Za-z0-9-]{1,64}$")] = pydantic.Field(
        default_factory=lambda: secrets.token_hex(16)
    )
    """Pod uid when run by the operator (``POD_UID``); random per process otherwise."""
    planning: PlanningSettings = PlanningSettings()
    """Role policy and expert layout (``--ratio``, ``--experts``, ...)."""
    limits: LimitSettings = LimitSettings()
    """Bounds of the data path (``WEFT_MAX_*``, or a ``limits:`` section in the file)."""

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> AgentSettings:
        if self.secret is None and self.secret_file is None:
            raise ValueError("a join token is needed: set secret_file (or WEFT_SECRET / WEFT_SECRET_FILE)")
        if self.listen_host in _WILDCARDS and self.advertise_host is None:
            raise ValueError(
                f"advertise_host is needed when listen_host is the wildcard {self.listen_host!r}: "
                "peers cannot connect to it"
            )
        return self

    @property
    def fabric_host(self) -> str:
        """The host peers reach the fabric at."""
        return self.advertise_host or self.listen_host

    def http_address(self, port: int) -> str:
        """``host:port`` others reach the HTTP endpoint at, once it is bound to `port`."""
        host = self.http_host if self.http_host not in _WILDCARDS else self.fabric_host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


S = TypeVar("S", bound=GroupClientSettings)


def resolve_settings(
    model: type[S],
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> S:
    """Merge the sources (flags > environment > file > defaults) and validate them as `model`.

    Args:
        model: `AgentSettings` or `GroupClientSettings`.
        config_file: a YAML (or ``.json``) file shaped like the model, or None.
        env: the environment (`ENVIRONMENT` names what is read); variables for fields that
            `model` does not have are ignored.
        overrides: values from flags, nested like the file (``{"etcd": {"endpoints": [...]}}``);
            None values count as not given.
    Returns:
        The validated settings.
    Raises:
        SettingsError: naming the first bad field and where its value came from.
    """
    layers: list[tuple[dict[FieldPath, Any], dict[FieldPath, str]]] = []
    if config_file is not None:
        values = _flatten(_read_file(config_file), ())
        if ("secret",) in values:
            raise SettingsError(
                "secret", f"secret: not allowed in a config file ({config_file}); use secret_file"
            )
        for path in _PATH_FIELDS & values.keys():
            if isinstance(values[path], str) and not Path(values[path]).is_absolute():
                values[path] = str(config_file.parent / values[path])
        layers.append((values, dict.fromkeys(values, f"config file {config_file}")))
    if env is not None:
        layers.append(_from_env(env, set(model.model_fields)))
    if overrides:
        values = {p: v for p, v in _flatten(overrides, ()).items() if v is not None}
        layers.append((values, dict.fromkeys(values, "the command line")))
    merged: dict[FieldPath, Any] = {}
    origin: dict[FieldPath, str] = {}
    for values, where in layers:
        if values.keys() & {("secret",), ("secret_file",)}:
            for p in (("secret",), ("secret_file",)):
                merged.pop(p, None)
                origin.pop(p, None)
        for path in values:  # a section given whole replaces its fields below, and vice versa
            for other in [k for k in merged if k != path and (k == path[: len(k)] or path == k[: len(path)])]:
                merged.pop(other)
                origin.pop(other, None)
        merged.update(values)
        origin.update(where)
    try:
        return model.model_validate(_unflatten(merged))
    except pydantic.ValidationError as exc:
        raise _explain(exc, merged, origin) from None


MAX_YAML_NODES = 10_000
"""Most nodes a YAML document may expand to, aliases counted each time they are used: a few
hundred bytes of nested aliases (a "billion laughs") would otherwise expand to a structure
that takes minutes to walk, print or validate."""


def parse_yaml(text: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    """YAML -> Python data, safely (no tags that build objects). The one place PyYAML is used.

    Aliases (``*name``) are allowed as long as the document, expanded, has at most
    `max_nodes` nodes; an alias inside the node it names is refused.

    Raises:
        ImportError: PyYAML is not installed. ValueError: not valid YAML, too large once
            expanded, or nested too deeply.
    """
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, max_nodes, {}, set())
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ValueError(_clip(str(exc), 400)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    finally:
        loader.dispose()


def _expanded_size(node: Any, limit: int, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes under `node` (itself included), every alias expanded; memoised by node, so a
    document is walked once however often its anchors are used.

    Raises:
        ValueError: over `limit`, or a node that contains itself.
    """
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ValueError("a YAML alias refers to a node that contains it")
    open_.add(key)
    total = 1
    value = node.value
    if isinstance(value, list):
        for item in value:
            for child in item if isinstance(item, tuple) else (item,):
                total += _expanded_size(child, limit, sizes, open_)
                if total > limit:
                    raise ValueError(f"the document expands to more than {limit} nodes (aliases counted)")
    open_.discard(key)
    sizes[key] = total
    return total


def dump_yaml(data: Any) -> str:
    """Python data -> YAML, keys in the order given (generated manifests such as the CRD)."""
    import yaml

    return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100))


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise SettingsError("config", f"config file {path}: cannot read it: {exc}") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise SettingsError("config", f"config file {path}: larger than {MAX_CONFIG_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else parse_yaml(text)
    except ImportError:
        raise SettingsError(
            "config", f"config file {path}: PyYAML is not installed; use a .json file"
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        why = "nested too deeply" if isinstance(exc, RecursionError) else _clip(str(exc), 400)
        raise SettingsError("config", f"config file {path}: not valid {kind}: {why}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise SettingsError("config", f"config file {path}: the top level must be a mapping of field names")
    return data


def _from_env(env: Mapping[str, str], fields: set[str]) -> tuple[dict[FieldPath, Any], dict[FieldPath, str]]:
    values: dict[FieldPath, Any] = {}
    origin: dict[FieldPath, str] = {}
    for var, path in ENVIRONMENT.items():
        raw = env.get(var)
        if raw is None or raw.strip() == "" or path[0] not in fields:
            continue
        value: Any = raw if path in _SECRET_PATHS else raw.strip()  # a secret is taken as given
        if var in _LISTS:
            value = [p.strip() for p in raw.split(",") if p.strip()]
        values[path] = value
        origin[path] = f"environment {var}"
    return values, origin


def _flatten(data: Mapping[str, Any], prefix: FieldPath) -> dict[FieldPath, Any]:
    out: dict[FieldPath, Any] = {}
    for key, value in data.items():
        path = (*prefix, str(key))
        if not prefix and key in _SECTIONS and isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def _unflatten(flat: Mapping[FieldPath, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _explain(
    exc: pydantic.ValidationError, values: Mapping[FieldPath, Any], origin: Mapping[FieldPath, str]
) -> SettingsError:
    problems = []
    first = "settings"
    for err in exc.errors():
        loc = tuple(str(p) for p in err.get("loc", ()))
        field = ".".join(p for p in loc if not p.isdigit()) or "settings"
        if first == "settings":
            first = field
        where = next((origin[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in origin), None)
        msg = str(err.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err.get("type") == "missing":
            var = next((v for v, p in ENVIRONMENT.items() if loc and p in (loc, (*loc, loc[-1]))), None)
            msg = "required, not given" + (f" (a flag, {var}, or the config file)" if var else "")
        text = msg if field == "settings" else f"{field}: {msg}"
        path = next((loc[:n] for n in range(len(loc), 0, -1) if loc[:n] in values), None)
        if path is not None and path not in _SECRET_PATHS:
            text += f" (got {_short(values[path])}"
            text += f" from {where})" if where else ")"
        elif where:
            text += f" (from {where})"
        problems.append(text)
    return SettingsError(first, "; ".join(problems))


def _short(value: Any) -> str:
    """A short repr of `value`, built from a bounded walk (never the whole of a large value)."""
    return _clip(_REPR.repr(value), 80)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40
