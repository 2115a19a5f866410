"""Metadata round trip and rejection of garbage (property-tested)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from weft.api import metadata as md_api

SECRET = b"0123456789abcdef0123"

names = st.from_regex(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,30}$", fullmatch=True)
regions = st.lists(
    st.builds(
        md_api.RegionInfo,
        id=st.integers(0, 2**32 - 1),
        name=st.none() | names,
        kind=st.sampled_from(["DRAM", "VRAM", "FILE", "OBJ"]),
        size=st.integers(1, 2**62),
        addr=st.integers(0, 2**64 - 1),
        readonly=st.booleans(),
        device=st.none() | st.integers(0, 16),
    ),
    max_size=8,
    unique_by=(lambda r: r.id, lambda r: r.name or object()),
)
records = st.builds(
    md_api.AgentMetadata,
    name=names,
    instance=st.from_regex(r"^[0-9a-f]{32}$", fullmatch=True),
    generation=st.integers(0, 2**64 - 1),
    host=st.builds(
        md_api.HostInfo,
        hostname=st.text(max_size=40),
        boot_id=st.text(max_size=40),
        pid_ns=st.text(max_size=40),
        pid=st.integers(0, 2**32 - 1),
    ),
    listen=st.builds(
        md_api.ListenInfo, host=st.sampled_from(["127.0.0.1", "::1", "node-3"]), port=st.integers(1, 65535)
    ),
    backends=st.lists(st.sampled_from(["local", "tcp", "ucx"]), max_size=3),
    auth=st.booleans(),
    probe=st.none()
    | st.builds(
        md_api.ProbeInfo,
        addr=st.integers(0, 2**64 - 1),
        token=st.from_regex(r"^[0-9a-f]{32}$", fullmatch=True),
    ),
    regions=regions,
)


@given(records, st.none() | st.just(SECRET))
@settings(max_examples=150, deadline=None)
def test_round_trip(record: md_api.AgentMetadata, secret: bytes | None) -> None:
    data = md_api.encode_metadata(record, secret)
    assert data.startswith(md_api.MAGIC)
    assert md_api.decode_metadata(data, secret) == record


@given(st.binary(max_size=512))
@settings(max_examples=300, deadline=None)
def test_garbage_is_rejected_typed(data: bytes) -> None:
    with pytest.raises(md_api.MetadataDecodeError):
        md_api.decode_metadata(data)


@given(records, st.data())
@settings(max_examples=150, deadline=None)
def test_mutations_are_rejected_or_valid(record: md_api.AgentMetadata, data: st.DataObject) -> None:
    raw = bytearray(md_api.encode_metadata(record))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        out = md_api.decode_metadata(bytes(raw))
    except md_api.MetadataDecodeError:
        return
    assert isinstance(out, md_api.AgentMetadata)  # a flip inside a string can stay valid


@given(records)
@settings(max_examples=50, deadline=None)
def test_signed_metadata_needs_the_secret(record: md_api.AgentMetadata) -> None:
    unsigned = md_api.encode_metadata(record)
    other = md_api.encode_metadata(record, b"another-secret-0123456")
    for data in (unsigned, other):
        with pytest.raises(md_api.MetadataAuthError):
            md_api.decode_metadata(data, SECRET)
    signed = bytearray(md_api.encode_metadata(record, SECRET))
    signed[-2] ^= 1
    with pytest.raises(md_api.MetadataDecodeError):
        md_api.decode_metadata(bytes(signed), SECRET)


def test_unsupported_format_is_named() -> None:
    with pytest.raises(md_api.MetadataDecodeError, match="format 9 is not supported"):
        md_api.decode_metadata(md_api.MAGIC + bytes([9, 0, 0]) + b"{}")


def test_duplicate_region_ids_rejected() -> None:
    body = b'{"name":"a"}'
    with pytest.raises(md_api.MetadataDecodeError, match="invalid metadata"):
        md_api.decode_metadata(md_api.MAGIC + bytes([1, 0, 0]) + body)
