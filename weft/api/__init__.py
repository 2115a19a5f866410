"""Boundary models: what crosses a process or a file (wire metadata, records, configs)."""

from weft.api.metadata import (
    METADATA_FORMAT,
    AgentMetadata,
    HostInfo,
    ListenInfo,
    ProbeInfo,
    RegionInfo,
    decode_metadata,
    encode_metadata,
)

__all__ = [
    "METADATA_FORMAT",
    "AgentMetadata",
    "HostInfo",
    "ListenInfo",
    "ProbeInfo",
    "RegionInfo",
    "decode_metadata",
    "encode_metadata",
]
