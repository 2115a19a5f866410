"""Agent metadata on the wire: versioned, self-describing, never pickled.

Layout: ``b"WEFTMD" | u8 format | u16 mac length | mac | JSON body``. The JSON body is a
strict pydantic model, so anything a peer (or an attacker) hands us is either a valid record
or a `MetadataDecodeError` (a `weft.api.errors.MetadataError`) raised by `decode_metadata`;
nothing is ever executed. With a group secret, the MAC is an HMAC-SHA256 of the body and a
record without a valid one is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Annotated

import pydantic

from weft.api import errors
from weft.api.vocab import Backend, MemoryKind

MAGIC = b"WEFTMD"
METADATA_FORMAT = 1
MAX_METADATA_BYTES = 16 << 20
_PREFIX = struct.Struct("!6sBH")

Name = Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$")]
U64 = Annotated[int, pydantic.Field(ge=0, lt=1 << 64)]
U32 = Annotated[int, pydantic.Field(ge=0, lt=1 << 32)]
BackendName = Annotated[Backend, pydantic.Strict(False)]
"""A `Backend`, given as the enum or its string (strict models take only exact types)."""
MemoryKindName = Annotated[MemoryKind, pydantic.Strict(False)]
"""A `MemoryKind`, given as the enum or its string."""


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, frozen=True, extra="forbid")


class HostInfo(_Strict):
    hostname: Annotated[str, pydantic.Field(max_length=255)]
    boot_id: Annotated[str, pydantic.Field(max_length=64)]
    pid_ns: Annotated[str, pydantic.Field(max_length=64)]
    pid: U32


class ListenInfo(_Strict):
    host: Annotated[str, pydantic.Field(min_length=1, max_length=255)]
    port: Annotated[int, pydantic.Field(ge=1, le=65535)]


class ProbeInfo(_Strict):
    """A token at a known address: a peer that reads it back proves cross-memory attach works."""

    addr: U64
    token: Annotated[str, pydantic.StringConstraints(pattern=r"^[0-9a-f]{32}$")]


class RegionInfo(_Strict):
    id: U32
    name: Name | None = None
    kind: MemoryKindName
    size: Annotated[int, pydantic.Field(gt=0, lt=1 << 63)]
    addr: U64
    readonly: bool = False
    device: Annotated[int, pydantic.Field(ge=0, le=1024)] | None = None


class AgentMetadata(_Strict):
    name: Name
    instance: Annotated[str, pydantic.StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    generation: U64
    host: HostInfo
    listen: ListenInfo
    backends: Annotated[list[BackendName], pydantic.Field(max_length=8)]
    auth: bool
    probe: ProbeInfo | None = None
    regions: Annotated[list[RegionInfo], pydantic.Field(max_length=1 << 20)] = []
    # backend name -> that backend's own address (e.g. a UCX listener "host:port")
    endpoints: Annotated[
        dict[BackendName, Annotated[str, pydantic.Field(max_length=4096)]],
        pydantic.Field(max_length=8),
    ] = {}

    @pydantic.model_validator(mode="after")
    def _unique_regions(self) -> AgentMetadata:
        ids = [r.id for r in self.regions]
        names = [r.name for r in self.regions if r.name is not None]
        if len(set(ids)) != len(ids) or len(set(names)) != len(names):
            raise ValueError("region ids and names must be unique")
        return self


class MetadataDecodeError(errors.MetadataError):
    """Raised by `decode_metadata` for anything that is not a valid record."""


class MetadataAuthError(MetadataDecodeError, errors.AuthenticationError):
    """The record's MAC is missing or wrong for the group secret."""


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, b"weft-metadata\0" + body, hashlib.sha256).digest()


def encode_metadata(md: AgentMetadata, secret: bytes | None = None) -> bytes:
    body = md.model_dump_json().encode()
    mac = _mac(secret, body) if secret else b""
    return _PREFIX.pack(MAGIC, METADATA_FORMAT, len(mac)) + mac + body


def decode_metadata(data: bytes, secret: bytes | None = None) -> AgentMetadata:
    """Parse and validate a metadata record.

    Raises:
        MetadataDecodeError: not a weft record, an unsupported format, or invalid content.
        MetadataAuthError: `secret` is set and the record has no valid MAC.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MetadataDecodeError(f"metadata must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_METADATA_BYTES:
        raise MetadataDecodeError(f"metadata too large: {len(data)} bytes")
    if len(data) < _PREFIX.size:
        raise MetadataDecodeError("metadata truncated")
    magic, fmt, mac_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MetadataDecodeError("not weft metadata (bad magic)")
    if fmt != METADATA_FORMAT:
        raise MetadataDecodeError(
            f"metadata format {fmt} is not supported (this weft reads format {METADATA_FORMAT})"
        )
    mac = data[_PREFIX.size : _PREFIX.size + mac_len]
    body = data[_PREFIX.size + mac_len :]
    if len(mac) != mac_len:
        raise MetadataDecodeError("metadata truncated")
    if secret is not None and not (mac_len and hmac.compare_digest(mac, _mac(secret, body))):
        raise MetadataAuthError("metadata is not signed with this group's secret")
    try:
        return AgentMetadata.model_validate_json(body)
    except pydantic.ValidationError as exc:
        raise MetadataDecodeError(f"invalid metadata: {_short(exc)}") from None


def _short(exc: pydantic.ValidationError) -> str:
    errs = exc.errors()
    first = errs[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "record"
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"
