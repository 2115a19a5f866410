"""etcd records: seal/unseal round trips, every rejection, and a fuzzed decoder (property-tested)."""

from __future__ import annotations

import json
import struct
from typing import Any

import hypothesis.strategies as st
import pydantic
import pytest
from hypothesis import given, settings

from weft.api import records

SECRET = b"weft-records-secret-0123456789ab"
OTHER_SECRET = b"another-groups-secret-0123456789"
PREFIX = "/weft/v1/default/g/"
HEADER = struct.Struct("!5sBBH")
MAC_LEN = 32

CLASSES: list[type[records._Record]] = [
    records.MemberRecord,
    records.LeaderRecord,
    records.AckRecord,
    records.LoadRecord,
]
_DIRS = {
    records.RecordKind.MEMBER: "members/",
    records.RecordKind.ACK: "acks/",
    records.RecordKind.LOAD: "load/",
}


def key_for(kind: records.RecordKind, name: str, prefix: str = PREFIX) -> str:
    """The etcd key a record of `kind` for member `name` lives under."""
    if kind is records.RecordKind.LEADER:
        return prefix + "leader"
    return prefix + _DIRS[kind] + name


def envelope(
    kind: int,
    key: str,
    body: bytes,
    *,
    secret: bytes = SECRET,
    mac_kind: records.RecordKind | None = None,
    fmt: int = records.RECORD_FORMAT,
    magic: bytes = b"WEFTR",
    mac: bytes | None = None,
) -> bytes:
    """A record value built by hand, with a correct MAC unless told otherwise."""
    if mac is None:
        mac = records._mac(secret, mac_kind or records.RecordKind(kind), key, body)
    return HEADER.pack(magic, kind, fmt, len(mac)) + mac + body


def make_member(name: str = "a", **over: Any) -> records.MemberRecord:
    fields: dict[str, Any] = {
        "name": name,
        "generation": 3,
        "instance": "pod-0123-abcd",
        "incarnation": 1,
        "node": "node-1.example",
        "state": "active",
        "capabilities": records.Capabilities(
            gpus=8,
            memory_kinds=["DRAM", "VRAM"],
            backends=["tcp", "ucx"],
            dram_bytes=512 << 30,
            vram_bytes=8 * (80 << 30),
        ),
        "fabric": records.MemberRecord.encode_fabric(b"\x00fabric-metadata\xff\x80"),
        "lease_ttl": 10.0,
        "joined_at": 1_700_000_000.25,
        "http": "10.0.0.1:8080",
        "role": "prefill",
    }
    fields.update(over)
    return records.MemberRecord(**fields)


SAMPLES: list[records._Record] = [
    make_member(),
    make_member("b.x:1", http=None, role=None, fabric="", capabilities=records.Capabilities()),
    records.LeaderRecord(name="a", generation=2**64 - 1, since=12.5),
    records.AckRecord(name="a", generation=0, epoch=41),
    records.LoadRecord(
        name="a", generation=7, queue_depth=3, tokens_per_s=1234.5, expert_hits={"0": 5, "17": 0}, at=99.0
    ),
    records.LoadRecord(name="a", generation=7),
]
SAMPLE_IDS = ["member", "member-minimal", "leader", "ack", "load", "load-defaults"]


def sealed(record: records._Record, secret: bytes = SECRET) -> tuple[str, bytes]:
    key = key_for(record.kind, record.name)  # type: ignore[attr-defined]
    return key, records.seal(record, key, secret)


def valid_body(cls: type[records._Record]) -> dict[str, Any]:
    """A JSON body that validates as `cls`, for editing in the rejection tests."""
    record = next(r for r in SAMPLES if type(r) is cls)
    body: dict[str, Any] = json.loads(record.model_dump_json())
    return body


# ---------------------------------------------------------------- round trips and layout


@pytest.mark.parametrize("record", SAMPLES, ids=SAMPLE_IDS)
def test_round_trip(record: records._Record) -> None:
    key, data = sealed(record)
    back = records.unseal(type(record), data, key, SECRET)
    assert back == record
    assert type(back) is type(record)


@pytest.mark.parametrize("record", SAMPLES, ids=SAMPLE_IDS)
def test_layout(record: records._Record) -> None:
    key, data = sealed(record)
    magic, kind, fmt, mac_len = HEADER.unpack_from(data)
    assert (magic, kind, fmt, mac_len) == (b"WEFTR", int(record.kind), records.RECORD_FORMAT, MAC_LEN)
    mac, body = data[HEADER.size : HEADER.size + mac_len], data[HEADER.size + mac_len :]
    assert body == record.model_dump_json().encode()
    assert mac == records._mac(SECRET, record.kind, key, body)
    assert records.seal(record, key, SECRET) == data  # deterministic


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=["bytes", "bytearray", "memoryview"])
def test_unseal_accepts_bytes_like(wrap: Any) -> None:
    record = make_member()
    key, data = sealed(record)
    assert records.unseal(records.MemberRecord, wrap(data), key, SECRET) == record


@pytest.mark.parametrize("md", [b"", b"\x00", bytes(range(256)), b"x" * 1000])
def test_member_fabric_metadata_round_trip(md: bytes) -> None:
    record = make_member(fabric=records.MemberRecord.encode_fabric(md))
    key, data = sealed(record)
    back = records.unseal(records.MemberRecord, data, key, SECRET)
    assert back.fabric_metadata() == md
    assert back.fabric.isascii()


def test_capabilities_defaults_and_gpu() -> None:
    caps = records.Capabilities()
    assert (caps.gpus, caps.memory_kinds, caps.backends, caps.dram_bytes, caps.vram_bytes) == (
        0,
        ["DRAM"],
        [],
        0,
        0,
    )
    assert not caps.gpu
    assert records.Capabilities(gpus=1).gpu
    assert records.Capabilities().memory_kinds is not caps.memory_kinds  # no shared mutable default


def test_models_are_strict_and_frozen_in_python_too() -> None:
    with pytest.raises(pydantic.ValidationError):
        records.AckRecord(name="a", generation="1", epoch=0)  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError):
        records.AckRecord(name="a", generation=1, epoch=0, extra=1)  # type: ignore[call-arg]
    ack = records.AckRecord(name="a", generation=1, epoch=0)
    with pytest.raises(pydantic.ValidationError):
        ack.epoch = 2


# ---------------------------------------------------------------- authentication and keys


@pytest.mark.parametrize("record", SAMPLES, ids=SAMPLE_IDS)
def test_record_does_not_unseal_under_another_key(record: records._Record) -> None:
    key, data = sealed(record)
    other_group = key.replace(PREFIX, "/weft/v1/default/h/")
    with pytest.raises(records.RecordError, match="join token"):
        records.unseal(type(record), data, other_group, SECRET)
    if record.kind is not records.RecordKind.LEADER:
        other_name = key_for(record.kind, "b")
        with pytest.raises(records.RecordError, match="join token"):
            records.unseal(type(record), data, other_name, SECRET)


def test_replayed_member_record_is_refused_even_without_the_secret() -> None:
    # A copy of a's record put under b's key: the MAC stops it, and without a secret the name does.
    _, data = sealed(make_member("a"))
    with pytest.raises(records.RecordError):
        records.unseal(records.MemberRecord, data, key_for(records.RecordKind.MEMBER, "b"), SECRET)
    with pytest.raises(records.RecordError, match="another name"):
        records.unseal(records.MemberRecord, data, key_for(records.RecordKind.MEMBER, "b"), None)


@pytest.mark.parametrize("cls", [records.MemberRecord, records.AckRecord, records.LoadRecord])
@pytest.mark.parametrize("last", ["b", "ba", "xa", "a.b", "A"])
def test_name_must_match_last_key_segment(cls: type[records._Record], last: str) -> None:
    record = next(r for r in SAMPLES if type(r) is cls)
    assert record.name == "a"  # type: ignore[attr-defined]
    key = PREFIX + _DIRS[cls.kind] + last
    data = records.seal(record, key, SECRET)  # signed correctly, but for the wrong name
    for secret in (SECRET, None):
        with pytest.raises(records.RecordError, match="stored under another name"):
            records.unseal(cls, data, key, secret)


def test_name_check_needs_a_slash_before_the_name() -> None:
    record = records.AckRecord(name="a", generation=1, epoch=1)
    data = records.seal(record, "a", SECRET)
    with pytest.raises(records.RecordError, match="another name"):
        records.unseal(records.AckRecord, data, "a", SECRET)


@pytest.mark.parametrize("key", ["e0", "", "-1", "1.5", "1234567890"])
def test_expert_hits_keys_are_expert_ids(key: str) -> None:
    """A load record whose expert ids are not decimal is refused, not read and dropped later."""
    with pytest.raises(pydantic.ValidationError, match="expert_hits"):
        records.LoadRecord.model_validate({"name": "a", "generation": 1, "expert_hits": {key: 1}})


def test_leader_name_is_not_tied_to_the_key() -> None:
    record = records.LeaderRecord(name="whoever", generation=1, since=0.0)
    key = PREFIX + "leader"
    assert records.unseal(records.LeaderRecord, records.seal(record, key, SECRET), key, SECRET) == record


@pytest.mark.parametrize("wrong", [OTHER_SECRET, b"", SECRET[:-1], SECRET[:-1] + b"X", SECRET + b"x"])
@pytest.mark.parametrize("record", SAMPLES, ids=SAMPLE_IDS)
def test_wrong_secret(record: records._Record, wrong: bytes) -> None:
    key, data = sealed(record)
    with pytest.raises(records.RecordError, match="join token"):
        records.unseal(type(record), data, key, wrong)


@pytest.mark.parametrize("record", SAMPLES, ids=SAMPLE_IDS)
def test_secret_none_reads_without_checking(record: records._Record) -> None:
    key, data = sealed(record, OTHER_SECRET)
    assert records.unseal(type(record), data, key, None) == record
    body = record.model_dump_json().encode()
    for mac in (b"", b"\0" * MAC_LEN, b"short"):
        forged = envelope(record.kind, key, body, mac=mac)
        assert records.unseal(type(record), forged, key, None) == record
        with pytest.raises(records.RecordError, match="join token"):
            records.unseal(type(record), forged, key, SECRET)


@pytest.mark.parametrize("mac_len", [0, 1, 16, 31, 33, 64])
def test_mac_of_the_wrong_length_is_refused(mac_len: int) -> None:
    record = records.AckRecord(name="a", generation=1, epoch=1)
    key, data = sealed(record)
    real = data[HEADER.size : HEADER.size + MAC_LEN]
    mac = (real * 3)[:mac_len]
    forged = envelope(record.kind, key, record.model_dump_json().encode(), mac=mac)
    with pytest.raises(records.RecordError, match="join token"):
        records.unseal(records.AckRecord, forged, key, SECRET)


# ---------------------------------------------------------------- envelope rejections


@pytest.mark.parametrize(
    ("stored", "wanted"),
    [
        pytest.param(record, cls, id=f"{ident}-as-{cls.__name__}")
        for record, ident in zip(SAMPLES, SAMPLE_IDS, strict=True)
        for cls in CLASSES
        if type(record) is not cls
    ],
)
def test_another_record_kind_at_the_key(stored: records._Record, wanted: type[records._Record]) -> None:
    key, data = sealed(stored)
    for secret in (SECRET, None):
        with pytest.raises(records.RecordError, match=f"record kind {int(stored.kind)} where"):
            records.unseal(wanted, data, key, secret)


def test_mac_binds_the_kind() -> None:
    # A body that is valid both as a load record and (by its fields) nothing else needs: the kind
    # byte says LOAD but the MAC was computed for ACK, so it must not verify.
    key = key_for(records.RecordKind.LOAD, "a")
    body = b'{"name":"a","generation":1}'
    good = envelope(records.RecordKind.LOAD, key, body)
    assert records.unseal(records.LoadRecord, good, key, SECRET) == records.LoadRecord(name="a", generation=1)
    forged = envelope(records.RecordKind.LOAD, key, body, mac_kind=records.RecordKind.ACK)
    with pytest.raises(records.RecordError, match="join token"):
        records.unseal(records.LoadRecord, forged, key, SECRET)


@pytest.mark.parametrize("kind", [0, 5, 99, 255])
def test_unknown_kind_byte(kind: int) -> None:
    key = key_for(records.RecordKind.ACK, "a")
    data = envelope(kind, key, b"{}", mac=b"\0" * MAC_LEN)
    with pytest.raises(records.RecordError, match=f"record kind {kind} where ack"):
        records.unseal(records.AckRecord, data, key, SECRET)


@pytest.mark.parametrize("fmt", [0, 2, 255])
def test_unsupported_format_byte(fmt: int) -> None:
    key = key_for(records.RecordKind.ACK, "a")
    body = records.AckRecord(name="a", generation=1, epoch=1).model_dump_json().encode()
    data = envelope(records.RecordKind.ACK, key, body, fmt=fmt)
    for secret in (SECRET, None):
        with pytest.raises(records.RecordError, match=f"record format {fmt} is not supported"):
            records.unseal(records.AckRecord, data, key, secret)


@pytest.mark.parametrize("magic", [b"WEFTX", b"weftr", b"\0\0\0\0\0", b"WEFT\0"])
def test_bad_magic(magic: bytes) -> None:
    key = key_for(records.RecordKind.ACK, "a")
    data = envelope(records.RecordKind.ACK, key, b"{}", magic=magic)
    with pytest.raises(records.RecordError, match="bad magic"):
        records.unseal(records.AckRecord, data, key, None)


@pytest.mark.parametrize("data", [b"", b"W", b"WEFTR", b"WEFTR\x03\x01", b"WEFTR\x03\x01\x00"])
def test_too_short(data: bytes) -> None:
    with pytest.raises(records.RecordError, match="too short"):
        records.unseal(records.AckRecord, data, "acks/a", SECRET)


@pytest.mark.parametrize("keep", [0, 1, 16, MAC_LEN - 1])
def test_truncated_mac(keep: int) -> None:
    key, data = sealed(records.AckRecord(name="a", generation=1, epoch=1))
    cut = data[: HEADER.size + keep]
    for secret in (SECRET, None):
        with pytest.raises(records.RecordError, match="truncated"):
            records.unseal(records.AckRecord, cut, key, secret)


def test_mac_length_beyond_the_data() -> None:
    key = key_for(records.RecordKind.ACK, "a")
    data = HEADER.pack(b"WEFTR", records.RecordKind.ACK, records.RECORD_FORMAT, 0xFFFF) + b"\0" * 100
    with pytest.raises(records.RecordError, match="truncated"):
        records.unseal(records.AckRecord, data, key, None)


def test_truncated_body() -> None:
    key, data = sealed(make_member())
    for secret in (SECRET, None):
        with pytest.raises(records.RecordError):
            records.unseal(records.MemberRecord, data[:-1], key, secret)


def test_oversize_input_is_refused_before_parsing() -> None:
    key, data = sealed(records.AckRecord(name="a", generation=1, epoch=1))
    big = data + b" " * (records.MAX_RECORD_BYTES - len(data) + 1)
    assert len(big) == records.MAX_RECORD_BYTES + 1
    for secret in (SECRET, None):
        with pytest.raises(records.RecordError, match="too large"):
            records.unseal(records.AckRecord, big, key, secret)


def test_largest_allowed_input_is_read() -> None:
    record = records.AckRecord(name="a", generation=1, epoch=1)
    key = key_for(record.kind, "a")
    body = record.model_dump_json().encode()
    body += b" " * (
        records.MAX_RECORD_BYTES - HEADER.size - MAC_LEN - len(body)
    )  # JSON allows trailing space
    data = envelope(record.kind, key, body)
    assert len(data) == records.MAX_RECORD_BYTES
    assert records.unseal(records.AckRecord, data, key, SECRET) == record


@pytest.mark.parametrize("data", ["WEFTR", None, 17, [1, 2], {"a": 1}, 1.5], ids=lambda v: type(v).__name__)
def test_non_bytes_input(data: Any) -> None:
    with pytest.raises(records.RecordError, match="must be bytes"):
        records.unseal(records.AckRecord, data, "acks/a", SECRET)


# ---------------------------------------------------------------- invalid bodies (correctly signed)


def unseal_body(cls: type[records._Record], body: bytes, name: str = "a") -> records._Record:
    key = key_for(cls.kind, name)
    return records.unseal(cls, envelope(cls.kind, key, body), key, SECRET)


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"\xff\xfe", b"[]", b"null", b'"a"', b"1", b"{", b'{"name":"a"} {}', b"{}"]
)
def test_body_that_is_not_a_record(body: bytes) -> None:
    with pytest.raises(records.RecordError, match="invalid record"):
        unseal_body(records.AckRecord, body)


def test_deeply_nested_body() -> None:
    body = b'{"name":"a","generation":1,"epoch":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(records.RecordError, match="invalid record"):
        unseal_body(records.AckRecord, body)


MEMBER_BAD_FIELDS: list[tuple[str, Any]] = [
    ("generation", -1),
    ("generation", 2**64),
    ("incarnation", -1),
    ("incarnation", 2**31),
    ("state", "gone"),
    ("state", "ACTIVE"),
    ("name", ""),
    ("name", "-a"),
    ("name", "a/b"),
    ("instance", ""),
    ("instance", "pod_1"),
    ("instance", "x" * 65),
    ("node", "n" * 254),
    ("lease_ttl", 0),
    ("lease_ttl", -1.0),
    ("lease_ttl", 3600.5),
    ("joined_at", -0.5),
    ("joined_at", 1e10),
    ("http", "h" * 301),
    ("role", "r" * 33),
    ("capabilities", {"gpus": -1}),
    ("capabilities", {"gpus": 1025}),
    ("capabilities", {"memory_kinds": ["HBM"]}),
    ("capabilities", {"memory_kinds": ["DRAM"] * 5}),
    ("capabilities", {"backends": ["rdma"]}),
    ("capabilities", {"dram_bytes": 1 << 62}),
    ("capabilities", {"unknown": 1}),
]
# Types a lax model would coerce; these records are strict.
MEMBER_WRONG_TYPES: list[tuple[str, Any]] = [
    ("generation", "3"),
    ("generation", 3.0),
    ("generation", True),
    ("incarnation", False),
    ("name", 5),
    ("state", 1),
    ("node", None),
    ("fabric", None),
    ("fabric", ["AAAA"]),
    ("lease_ttl", "10"),
    ("joined_at", True),
    ("http", 8080),
    ("capabilities", "gpu"),
    ("capabilities", {"gpus": True}),
    ("capabilities", {"gpus": "2"}),
    ("capabilities", {"memory_kinds": "DRAM"}),
]


@pytest.mark.parametrize(("field", "value"), MEMBER_BAD_FIELDS + MEMBER_WRONG_TYPES)
def test_invalid_member_field(field: str, value: Any) -> None:
    body = valid_body(records.MemberRecord)
    body[field] = value
    with pytest.raises(records.RecordError, match=rf"^invalid record: {field}\b"):
        unseal_body(records.MemberRecord, json.dumps(body).encode())


@pytest.mark.parametrize("field", ["name", "generation", "instance", "node", "state", "fabric", "lease_ttl"])
def test_missing_member_field(field: str) -> None:
    body = valid_body(records.MemberRecord)
    del body[field]
    with pytest.raises(records.RecordError, match=rf"^invalid record: {field}: Field required"):
        unseal_body(records.MemberRecord, json.dumps(body).encode())


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_extra_field(cls: type[records._Record]) -> None:
    body = valid_body(cls)
    body["admin"] = True
    with pytest.raises(records.RecordError, match=r"^invalid record: admin: Extra inputs"):
        unseal_body(cls, json.dumps(body).encode())


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (records.LeaderRecord, "since", -1),
        (records.LeaderRecord, "since", "0"),
        (records.LeaderRecord, "generation", -1),
        (records.AckRecord, "epoch", -1),
        (records.AckRecord, "epoch", 2**64),
        (records.AckRecord, "epoch", 1.5),
        (records.LoadRecord, "queue_depth", -1),
        (records.LoadRecord, "queue_depth", 2**31),
        (records.LoadRecord, "tokens_per_s", 1e12),
        (records.LoadRecord, "tokens_per_s", -0.1),
        (records.LoadRecord, "expert_hits", {"e0": -1}),
        (records.LoadRecord, "expert_hits", {"e0": "1"}),
        (records.LoadRecord, "expert_hits", ["e0"]),
        (records.LoadRecord, "at", 1e10),
    ],
)
def test_invalid_field_of_other_kinds(cls: type[records._Record], field: str, value: Any) -> None:
    body = valid_body(cls)
    body[field] = value
    with pytest.raises(records.RecordError, match=rf"^invalid record: {field}\b"):
        unseal_body(cls, json.dumps(body).encode())


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_floats_are_refused(token: bytes) -> None:
    body = b'{"name":"a","generation":1,"since":' + token + b"}"
    with pytest.raises(records.RecordError, match="invalid record"):
        unseal_body(records.LeaderRecord, body)


def test_integers_are_accepted_for_float_fields() -> None:
    body = valid_body(records.MemberRecord)
    body["lease_ttl"] = 10
    body["joined_at"] = 0
    record = unseal_body(records.MemberRecord, json.dumps(body).encode())
    assert isinstance(record, records.MemberRecord)
    assert (record.lease_ttl, record.joined_at) == (10.0, 0.0)


def test_error_message_names_the_field_and_hides_the_traceback() -> None:
    body = valid_body(records.MemberRecord)
    body["capabilities"]["gpus"] = 2000
    with pytest.raises(records.RecordError) as info:
        unseal_body(records.MemberRecord, json.dumps(body).encode())
    assert str(info.value).startswith("invalid record: capabilities.gpus: ")
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# ---------------------------------------------------------------- property tests

names = st.from_regex(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,30}$", fullmatch=True)
u64 = st.integers(0, 2**64 - 1)
seconds = st.floats(0, 1e10, exclude_max=True)
capabilities = st.builds(
    records.Capabilities,
    gpus=st.integers(0, 1024),
    memory_kinds=st.lists(st.sampled_from(["DRAM", "VRAM", "FILE", "OBJ"]), max_size=4),
    backends=st.lists(st.sampled_from(["local", "tcp", "ucx"]), max_size=8),
    dram_bytes=st.integers(0, (1 << 62) - 1),
    vram_bytes=st.integers(0, (1 << 62) - 1),
)
members = st.builds(
    records.MemberRecord,
    name=names,
    generation=u64,
    instance=st.from_regex(r"^[A-Za-z0-9-]{1,64}$", fullmatch=True),
    incarnation=st.integers(0, 2**31 - 1),
    node=st.text(max_size=253),
    state=st.sampled_from(["joining", "active", "draining"]),
    capabilities=capabilities,
    fabric=st.binary(max_size=256).map(records.MemberRecord.encode_fabric),
    lease_ttl=st.floats(0, 3600, exclude_min=True),
    joined_at=seconds,
    http=st.none() | st.text(max_size=300),
    role=st.none() | st.text(max_size=32),
)
leaders = st.builds(records.LeaderRecord, name=names, generation=u64, since=seconds)
acks = st.builds(records.AckRecord, name=names, generation=u64, epoch=u64)
loads = st.builds(
    records.LoadRecord,
    name=names,
    generation=u64,
    queue_depth=st.integers(0, 2**31 - 1),
    tokens_per_s=st.floats(0, 1e12, exclude_max=True),
    expert_hits=st.dictionaries(
        st.from_regex(r"^[0-9]{1,9}$", fullmatch=True), st.integers(0, (1 << 62) - 1), max_size=8
    ),
    at=seconds,
)
any_record = st.one_of(members, leaders, acks, loads)
secrets = st.sampled_from([SECRET, None])
classes = st.sampled_from(CLASSES)


def unseal_or_error(cls: type[records._Record], data: bytes, key: str, secret: bytes | None) -> Any:
    """The record, or the RecordError; any other exception fails the test."""
    try:
        return records.unseal(cls, data, key, secret)
    except records.RecordError as exc:
        return exc


@settings(max_examples=300, deadline=None)
@given(any_record)
def test_round_trip_property(record: records._Record) -> None:
    key, data = sealed(record)
    assert records.unseal(type(record), data, key, SECRET) == record


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512), classes, secrets, st.text(max_size=40))
def test_arbitrary_bytes_raise_only_record_error(
    data: bytes, cls: type[records._Record], secret: bytes | None, key: str
) -> None:
    got = unseal_or_error(cls, data, key, secret)
    assert isinstance(got, records.RecordError | cls)


headers = st.builds(
    HEADER.pack,
    st.just(b"WEFTR"),
    st.sampled_from([int(k) for k in records.RecordKind]) | st.integers(0, 255),
    st.just(records.RECORD_FORMAT) | st.integers(0, 255),
    st.sampled_from([0, MAC_LEN]) | st.integers(0, 0xFFFF),
)


@settings(max_examples=500, deadline=None)
@given(headers, st.binary(max_size=512), classes, secrets)
def test_bytes_behind_a_plausible_header_raise_only_record_error(
    header: bytes, tail: bytes, cls: type[records._Record], secret: bytes | None
) -> None:
    got = unseal_or_error(cls, header + tail, key_for(cls.kind, "a"), secret)
    assert isinstance(got, records.RecordError | cls)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[records._Record, str, bytes, bytes]:
    record = draw(any_record)
    key, data = sealed(record)
    how = draw(st.sampled_from(["flip", "truncate", "append", "insert"]))
    if how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        b = draw(st.integers(0, 255).filter(lambda v: v != data[i]))
        bad = data[:i] + bytes([b]) + data[i + 1 :]
    elif how == "truncate":
        bad = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "append":
        bad = data + draw(st.binary(min_size=1, max_size=64))
    else:
        i = draw(st.integers(0, len(data)))
        bad = data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    assert bad != data
    return record, key, data, bad


@settings(max_examples=500, deadline=None)
@given(mutated())
def test_mutated_record_is_refused_with_the_secret(case: tuple[records._Record, str, bytes, bytes]) -> None:
    record, key, _data, bad = case
    got = unseal_or_error(type(record), bad, key, SECRET)
    # The HMAC covers kind, key and body, so no real change survives; an equal record would be
    # acceptable in principle, anything else is a failure.
    assert isinstance(got, records.RecordError) or got == record


@settings(max_examples=500, deadline=None)
@given(mutated())
def test_mutated_record_without_the_secret_raises_only_record_error(
    case: tuple[records._Record, str, bytes, bytes],
) -> None:
    record, key, _data, bad = case
    got = unseal_or_error(type(record), bad, key, None)
    assert isinstance(got, records.RecordError | type(record))


lone_surrogates = st.characters(categories=["Cs"])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.text(lone_surrogates | st.characters(), max_size=4)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=16,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> tuple[type[records._Record], str, dict[str, Any]]:
    """A valid record's body with some fields replaced, dropped or added."""
    record = draw(any_record)
    cls = type(record)
    body: dict[str, Any] = json.loads(record.model_dump_json())
    fields = sorted(body)
    for field in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
        action = draw(st.sampled_from(["replace", "drop"]))
        if action == "drop":
            del body[field]
        else:
            body[field] = draw(json_values)
    if draw(st.booleans()) and "capabilities" in body and isinstance(body["capabilities"], dict):
        caps = body["capabilities"]
        caps[draw(st.sampled_from([*sorted(caps), "extra"]))] = draw(json_values)
    for extra in draw(st.lists(st.text(max_size=10), max_size=2)):
        body[extra] = draw(json_values)
    return cls, key_for(cls.kind, record.name), body


@settings(max_examples=500, deadline=None)
@given(json_bodies(), st.booleans(), secrets)
def test_signed_json_bodies_give_a_valid_record_or_record_error(
    case: tuple[type[records._Record], str, dict[str, Any]], ascii_only: bool, secret: bytes | None
) -> None:
    cls, key, body = case
    text = json.dumps(body, ensure_ascii=ascii_only)  # NaN and Infinity included
    raw = text.encode("utf-8", "surrogatepass")
    got = unseal_or_error(cls, envelope(cls.kind, key, raw), key, secret)
    if isinstance(got, records.RecordError):
        assert str(got)
        return
    assert isinstance(got, cls)
    # Whatever was accepted is a valid model that seals and reads back to itself.
    assert records.unseal(cls, records.seal(got, key, SECRET), key, SECRET) == got


@settings(max_examples=300, deadline=None)
@given(json_values, classes, secrets)
def test_signed_arbitrary_json_gives_a_valid_record_or_record_error(
    value: Any, cls: type[records._Record], secret: bytes | None
) -> None:
    key = key_for(cls.kind, "a")
    raw = json.dumps(value).encode()
    got = unseal_or_error(cls, envelope(cls.kind, key, raw), key, secret)
    assert isinstance(got, records.RecordError | cls)
