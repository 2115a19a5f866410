"""etcd records of a group: members, leader, acks and load, each signed with the join token.

Layout of a value: ``b"WEFTR" | u8 kind | u8 format | u16 mac length | mac | JSON body``. The
MAC is an HMAC-SHA256, keyed by the group secret (the join token), over the record kind, the
etcd key and the body, so a record cannot be replayed under another member's key or as
another kind. Anything that fails to parse, validate or authenticate raises `RecordError` (a
`weft.api.errors.WeftError` and a `ValueError`); nothing is executed and nothing crashes the reader.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import struct
from typing import Annotated, ClassVar, TypeVar

import pydantic

from weft.api.errors import RecordError
from weft.api.metadata import U64, BackendName, MemoryKindName, Name
from weft.api.vocab import MemberState, MemoryKind, Role

__all__ = [
    "MAX_RECORD_BYTES",
    "RECORD_FORMAT",
    "AckRecord",
    "Capabilities",
    "DrainRecord",
    "ExpertId",
    "LeaderRecord",
    "LoadRecord",
    "MemberRecord",
    "Percentiles",
    "PlanRecord",
    "Record",
    "RecordError",
    "RecordKind",
    "seal",
    "unseal",
]

RECORD_FORMAT = 1
MAX_RECORD_BYTES = 4 << 20
_MAGIC = b"WEFTR"
_PREFIX = struct.Struct("!5sBBH")

Text = Annotated[str, pydantic.Field(max_length=253)]
StateName = Annotated[MemberState, pydantic.Strict(False)]
RoleName = Annotated[Role, pydantic.Strict(False)]
ExpertId = Annotated[str, pydantic.StringConstraints(pattern=r"^[0-9]{1,9}$")]
"""An expert id as a JSON object key: decimal digits."""
Seconds = Annotated[float, pydantic.Field(ge=0, lt=1e10)]


class RecordKind(enum.IntEnum):
    MEMBER = 1
    LEADER = 2
    ACK = 3
    LOAD = 4
    PLAN = 5
    DRAIN = 6


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, frozen=True, extra="forbid")


class _Record(_Strict):
    kind: ClassVar[RecordKind]


Record = _Record
"""Any signed record type (the base of the six kinds): what `seal` and `unseal` take."""


class Capabilities(_Strict):
    """What a member can do: planners read it to place roles and experts."""

    gpus: Annotated[int, pydantic.Field(ge=0, le=1024)] = 0
    memory_kinds: Annotated[list[MemoryKindName], pydantic.Field(max_length=4)] = [MemoryKind.DRAM]
    backends: Annotated[list[BackendName], pydantic.Field(max_length=8)] = []
    dram_bytes: Annotated[int, pydantic.Field(ge=0, lt=1 << 62)] = 0
    vram_bytes: Annotated[int, pydantic.Field(ge=0, lt=1 << 62)] = 0

    @property
    def gpu(self) -> bool:
        return self.gpus > 0


class MemberRecord(_Record):
    """``members/<name>``, under the member's lease."""

    kind: ClassVar[RecordKind] = RecordKind.MEMBER
    name: Name
    generation: U64
    """Orders incarnations of one name: a higher generation replaces a lower one."""
    instance: Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Za-z0-9-]{1,64}$")]
    """Pod uid when run by the operator, else random per process."""
    incarnation: Annotated[int, pydantic.Field(ge=0, lt=1 << 31)]
    """How many times this process has (re)joined: 0 first, +1 after each fence."""
    node: Text
    state: StateName
    capabilities: Capabilities
    fabric: Annotated[str, pydantic.Field(max_length=MAX_RECORD_BYTES - (64 << 10))]
    """The fabric `Agent.metadata()` bytes, base64; empty for a member without a data path."""
    lease_ttl: Annotated[float, pydantic.Field(gt=0, le=3600)]
    joined_at: Seconds
    """Unix time of the join (display only; nothing compares clocks across nodes)."""
    http: Annotated[str, pydantic.Field(max_length=300)] | None = None
    """``host:port`` of the member's /healthz, /readyz and /metrics."""
    role: Annotated[str, pydantic.Field(max_length=32)] | None = None

    def fabric_metadata(self) -> bytes:
        return base64.b64decode(self.fabric.encode("ascii"), validate=True)

    @staticmethod
    def encode_fabric(md: bytes) -> str:
        return base64.b64encode(md).decode("ascii")


class LeaderRecord(_Record):
    """``leader``, under the leader's lease."""

    kind: ClassVar[RecordKind] = RecordKind.LEADER
    name: Name
    generation: U64
    since: Seconds


class AckRecord(_Record):
    """``acks/<name>``: the plan epoch this member has applied, under its lease."""

    kind: ClassVar[RecordKind] = RecordKind.ACK
    name: Name
    generation: U64
    epoch: U64


Millis = Annotated[float, pydantic.Field(ge=0, lt=1e9)]


class Percentiles(_Strict):
    """A latency distribution as engines report it: milliseconds at p50, p90 and p99."""

    p50: Millis = 0.0
    p90: Millis = 0.0
    p99: Millis = 0.0


class LoadRecord(_Record):
    """``load/<name>``: load figures for the planner, under the member's lease.

    `queue_depth` is the requests waiting to start (vLLM's ``num_requests_waiting``),
    `running` the ones being served; TTFT and ITL are recent percentiles, None when the
    engine has served nothing recently (the agent daemon reports none)."""

    kind: ClassVar[RecordKind] = RecordKind.LOAD
    name: Name
    generation: U64
    queue_depth: Annotated[int, pydantic.Field(ge=0, lt=1 << 31)] = 0
    running: Annotated[int, pydantic.Field(ge=0, lt=1 << 31)] = 0
    kv_cache_usage: Annotated[float, pydantic.Field(ge=0, le=1)] = 0.0
    """Fraction of the engine's KV-cache blocks in use."""
    ttft_ms: Percentiles | None = None
    itl_ms: Percentiles | None = None
    tokens_per_s: Annotated[float, pydantic.Field(ge=0, lt=1e12)] = 0.0
    expert_hits: Annotated[
        dict[ExpertId, Annotated[int, pydantic.Field(ge=0, lt=1 << 62)]], pydantic.Field(max_length=1 << 16)
    ] = {}
    at: Seconds = 0.0


class DrainRecord(_Record):
    """``drain/<name>``: the operator asks the planner to plan `name` out before its pod goes
    (scale-down); the member keeps serving until then. Deleted when the pod is gone."""

    kind: ClassVar[RecordKind] = RecordKind.DRAIN
    name: Name
    reason: Text = ""
    at: Seconds = 0.0


class PlanRecord(_Record):
    """``plan``: durable, written only by the leader with a compare-and-swap on the previous one."""

    kind: ClassVar[RecordKind] = RecordKind.PLAN
    epoch: Annotated[int, pydantic.Field(ge=1, lt=1 << 63)]
    members: Annotated[list[Name], pydantic.Field(max_length=1 << 16)]
    roles: Annotated[dict[Name, RoleName], pydantic.Field(max_length=1 << 16)]
    experts: Annotated[
        dict[ExpertId, list[Name]],
        pydantic.Field(max_length=1 << 20),
    ] = {}
    """Expert id (decimal, JSON keys are strings) -> the members hosting it."""
    under_replicated: Annotated[
        list[Annotated[int, pydantic.Field(ge=0)]], pydantic.Field(max_length=1 << 20)
    ] = []
    reason: Annotated[str, pydantic.Field(max_length=2000)] = ""
    action: Annotated[str, pydantic.Field(max_length=64)] | None = None
    action_at: Seconds | None = None
    leader: Name
    leader_generation: U64
    written_at: Seconds = 0.0


R = TypeVar("R", bound=_Record)


def _mac(secret: bytes, kind: RecordKind, key: str, body: bytes) -> bytes:
    msg = b"weft-record\0%d\0%s\0" % (int(kind), key.encode("utf-8", "surrogatepass")) + body
    return hmac.new(secret, msg, hashlib.sha256).digest()


def seal(record: _Record, key: str, secret: bytes) -> bytes:
    """Encode `record` for etcd key `key`, signed with the group secret."""
    body = record.model_dump_json().encode()
    if len(body) + _PREFIX.size + 32 > MAX_RECORD_BYTES:
        raise RecordError(f"record of {len(body)} bytes is larger than a reader accepts")
    mac = _mac(secret, record.kind, key, body)
    return _PREFIX.pack(_MAGIC, int(record.kind), RECORD_FORMAT, len(mac)) + mac + body


def unseal(cls: type[R], data: bytes, key: str, secret: bytes | None) -> R:
    """Decode and check a record of type `cls` stored at `key`.

    Args:
        secret: the group secret; None reads without checking (``weft status`` without the
            token, which says so), never for decisions.
    Raises:
        RecordError: garbage, another kind, a format this weft does not read, a bad or
            missing MAC, invalid fields, or a name that does not match the key.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RecordError(f"record must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"record too large: {len(data)} bytes")
    if len(data) < _PREFIX.size:
        raise RecordError("not a weft record (too short)")
    magic, kind, fmt, mac_len = _PREFIX.unpack_from(data)
    if magic != _MAGIC:
        raise RecordError("not a weft record (bad magic)")
    if kind != cls.kind:
        raise RecordError(f"record kind {kind} where {cls.kind.name.lower()} ({int(cls.kind)}) was expected")
    if fmt != RECORD_FORMAT:
        raise RecordError(f"record format {fmt} is not supported (this weft reads format {RECORD_FORMAT})")
    mac = data[_PREFIX.size : _PREFIX.size + mac_len]
    body = data[_PREFIX.size + mac_len :]
    if len(mac) != mac_len:
        raise RecordError("record truncated")
    if secret is not None and not (mac_len and hmac.compare_digest(mac, _mac(secret, cls.kind, key, body))):
        raise RecordError("record is not signed with this group's join token")
    try:
        record = cls.model_validate_json(body)
    except pydantic.ValidationError as exc:
        errs = exc.errors()
        where = ".".join(str(p) for p in errs[0].get("loc", ())) or "record"
        raise RecordError(f"invalid record: {where}: {errs[0].get('msg', 'invalid')}") from None
    name = getattr(record, "name", None)
    if name is not None and cls.kind is not RecordKind.LEADER and not key.endswith("/" + name):
        raise RecordError(f"record for {name!r} stored under another name ({key})")
    return record
