"""`GroupStatus`: the typed snapshot of a group, and its JSON (``weft status --json``).

The expected JSON below was printed by the dict-returning `read_group_status` that the
snapshot replaced, for the records `group_records` writes (in that order, into a fresh etcd):
`to_json` must stay byte-identical, since scripts parse it.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.conftest import SECRET
from weft.api import records, vocab
from weft.api.agent_settings import GroupClientSettings
from weft.api.settings import EtcdSettings, GroupRef
from weft.membership import GroupClient, GroupStatus, InvalidRecord, read_group_status, status
from weft.membership.keyspace import KeyKind, Keyspace
from weft.testing import EtcdServer

OTHER = b"another-secret-0123456789abcdefgh"
SPACE = Keyspace("ns", "g")


def _member(name: str, gen: int, **fields: object) -> records.MemberRecord:
    base: dict[str, object] = {
        "name": name,
        "generation": gen,
        "instance": f"i{gen}",
        "incarnation": gen - 1,
        "node": f"node-{name}",
        "state": "active",
        "capabilities": records.Capabilities(gpus=gen, backends=[vocab.Backend.TCP]),
        "fabric": "",
        "lease_ttl": 5.0,
        "joined_at": 1000.0 + gen,
    }
    return records.MemberRecord.model_validate(base | fields)


def group_records() -> list[tuple[str, bytes]]:
    """(key, value) in write order: signed members, one signed with another token, values that
    do not decode, a leader, a plan with unsorted roles and experts, acks of two epochs, and
    keys the view skips (drain, load)."""

    def sealed(key: str, record: records.Record, secret: bytes = SECRET) -> tuple[str, bytes]:
        return key, records.seal(record, key, secret)

    plan = records.PlanRecord(
        epoch=4,
        members=["a", "b"],
        roles={"b": vocab.Role.DECODE, "a": vocab.Role.PREFILL},
        experts={"10": ["a"], "2": ["a", "b"]},
        under_replicated=[10],
        leader="a",
        leader_generation=1,
        written_at=2.0,
    )
    return [
        sealed(SPACE.member("b"), _member("b", 2, role="decode", http="http://b:8080")),
        sealed(SPACE.member("a"), _member("a", 1, role="prefill", state="joining")),
        sealed(SPACE.member("c"), _member("c", 3), OTHER),
        (SPACE.member("d"), b"not a record"),
        sealed(SPACE.leader, records.LeaderRecord(name="a", generation=1, since=1.0)),
        sealed(SPACE.plan, plan),
        sealed(SPACE.ack("a"), records.AckRecord(name="a", generation=1, epoch=4)),
        sealed(SPACE.ack("b"), records.AckRecord(name="b", generation=2, epoch=3)),
        sealed(SPACE.drain("b"), records.DrainRecord(name="b", reason="x", at=3.0)),
        sealed(SPACE.load("a"), records.LoadRecord(name="a", generation=1)),
        (SPACE.ack("e"), b"\x00garbage"),
    ]


REVISION = 12  # a fresh etcd is at revision 1; each of the 11 writes adds one
EXPECTED_SIGNED = """\
{
  "group": "g",
  "namespace": "ns",
  "revision": 12,
  "leader": "a",
  "plan_epoch": 4,
  "plan": {
    "epoch": 4,
    "leader": "a",
    "roles": {
      "a": "prefill",
      "b": "decode"
    },
    "experts": {
      "2": [
        "a",
        "b"
      ],
      "10": [
        "a"
      ]
    },
    "under_replicated": [
      10
    ],
    "verified": true,
    "acked": [
      "a"
    ]
  },
  "members": [
    {
      "name": "a",
      "generation": 1,
      "state": "joining",
      "node": "node-a",
      "lease_ttl_left": null,
      "role": "prefill",
      "verified": true,
      "incarnation": 0,
      "capabilities": {
        "gpus": 1,
        "memory_kinds": [
          "DRAM"
        ],
        "backends": [
          "tcp"
        ],
        "dram_bytes": 0,
        "vram_bytes": 0
      },
      "http": null
    },
    {
      "name": "b",
      "generation": 2,
      "state": "active",
      "node": "node-b",
      "lease_ttl_left": null,
      "role": "decode",
      "verified": true,
      "incarnation": 1,
      "capabilities": {
        "gpus": 2,
        "memory_kinds": [
          "DRAM"
        ],
        "backends": [
          "tcp"
        ],
        "dram_bytes": 0,
        "vram_bytes": 0
      },
      "http": "http://b:8080"
    },
    {
      "name": "c",
      "generation": 3,
      "state": "active",
      "node": "node-c",
      "lease_ttl_left": null,
      "role": null,
      "verified": false,
      "incarnation": 2,
      "capabilities": {
        "gpus": 3,
        "memory_kinds": [
          "DRAM"
        ],
        "backends": [
          "tcp"
        ],
        "dram_bytes": 0,
        "vram_bytes": 0
      },
      "http": null
    }
  ],
  "invalid": [
    {
      "key": "/weft/v1/ns/g/acks/e",
      "error": "not a weft record (too short)"
    },
    {
      "key": "/weft/v1/ns/g/members/d",
      "error": "not a weft record (bad magic)"
    }
  ]
}"""
EXPECTED_UNCHECKED = """\
{
  "group": "g",
  "namespace": "ns",
  "revision": 12,
  "leader": "a",
  "plan_epoch": 4,
  "plan": {
    "epoch": 4,
    "leader": "a",
    "roles": {
      "a": "prefill",
      "b": "decode"
    },
    "experts": {
      "2": [
        "a",
        "b"
      ],
      "10": [
        "a"
      ]
    },
    "under_replicated": [
      10
    ],
    "verified": false,
    "acked": [
      "a"
    ]
  },
  "members": [
    {
      "name": "a",
      "generation": 1,
      "state": "joining",
      "node": "node-a",
      "lease_ttl_left": null,
      "role": "prefill",
      "verified": false,
      "incarnation": 0,
      "capabilities": {
        "gpus": 1,
        "memory_kinds": [
          "DRAM"
        ],
        "backends": [
          "tcp"
        ],
        "dram_bytes": 0,
        "vram_bytes": 0
      },
      "http": null
    },
    {
      "name": "b",
      "generation": 2,
      "state": "active",
      "node": "node-b",
      "lease_ttl_left": null,
      "role": "decode",
      "verified": false,
      "incarnation": 1,
      "capabilities": {
        "gpus": 2,
        "memory_kinds": [
          "DRAM"
        ],
        "backends": [
          "tcp"
        ],
        "dram_bytes": 0,
        "vram_bytes": 0
      },
      "http": "http://b:8080"
    },
    {
      "name": "c",
      "generation": 3,
      "state": "active",
      "node": "node-c",
      "lease_ttl_left": null,
      "role": null,
      "verified": false,
      "incarnation": 2,
      "capabilities": {
        "gpus": 3,
        "memory_kinds": [
          "DRAM"
        ],
        "backends": [
          "tcp"
        ],
        "dram_bytes": 0,
        "vram_bytes": 0
      },
      "http": null
    }
  ],
  "invalid": [
    {
      "key": "/weft/v1/ns/g/acks/e",
      "error": "not a weft record (too short)"
    },
    {
      "key": "/weft/v1/ns/g/members/d",
      "error": "not a weft record (bad magic)"
    }
  ]
}"""
EXPECTED_EMPTY = """\
{
  "group": "empty",
  "namespace": "ns",
  "revision": 12,
  "leader": null,
  "plan_epoch": null,
  "plan": null,
  "members": [],
  "invalid": []
}"""


def _snapshot(secret: bytes | None) -> GroupStatus:
    raw = [status.RawRecord(k.encode(), v, 0) for k, v in sorted(group_records())]  # etcd's order
    decoded = status.decode_group(SPACE, raw, secret)
    return status.group_status(SPACE, REVISION, decoded, [None] * len(decoded.members))


def test_to_json_is_what_weft_status_printed() -> None:
    assert _snapshot(SECRET).to_json() == EXPECTED_SIGNED
    assert _snapshot(None).to_json() == EXPECTED_UNCHECKED


def test_the_snapshot_reads_as_attributes() -> None:
    snap = _snapshot(SECRET)
    assert [m.name for m in snap.members] == ["a", "b", "c"]
    assert snap.verified_members == {"a", "b"}
    assert snap.leader == "a" and snap.plan_epoch == 4
    assert snap.plan is not None and snap.plan.acked == ("a",)
    assert list(snap.plan.experts) == ["2", "10"] and list(snap.plan.roles) == ["a", "b"]
    assert [bad.key for bad in snap.invalid] == [SPACE.ack("e"), SPACE.member("d")]
    assert all(isinstance(bad, InvalidRecord) and bad.error for bad in snap.invalid)


def test_a_group_without_records_has_no_plan_members_or_leader() -> None:
    empty = Keyspace("ns", "empty")
    snap = status.group_status(empty, 12, status.decode_group(empty, [], SECRET), [])
    assert snap.to_json() == EXPECTED_EMPTY
    assert snap.plan is None and snap.leader is None and snap.members == () and snap.invalid == ()


def test_only_signed_current_loads_of_live_members_count() -> None:
    """The autoscaler sizes the group from `loads`: a load record signed with another token,
    one left by an earlier generation, one of a member whose record is not signed, and one
    whose lease ran out do not count; `to_json` shows no load at all."""
    snap = _snapshot(SECRET)
    assert [(load.name, load.generation) for load in snap.loads] == [("a", 1)]
    assert "load" not in snap.to_json()
    assert _snapshot(None).loads == ()  # nothing is verified without the token

    def sealed(key: str, record: records.Record, secret: bytes = SECRET) -> status.RawRecord:
        return status.RawRecord(key.encode(), records.seal(record, key, secret), 7)

    raw = [
        sealed(SPACE.member("a"), _member("a", 1)),
        sealed(SPACE.member("b"), _member("b", 2)),
        sealed(SPACE.member("c"), _member("c", 3), OTHER),
        sealed(SPACE.member("d"), _member("d", 4)),
        sealed(SPACE.load("a"), records.LoadRecord(name="a", generation=1, queue_depth=3)),
        sealed(SPACE.load("b"), records.LoadRecord(name="b", generation=1, queue_depth=9)),  # stale
        sealed(SPACE.load("c"), records.LoadRecord(name="c", generation=3, queue_depth=9)),
        sealed(SPACE.load("d"), records.LoadRecord(name="d", generation=4, queue_depth=9)),
        sealed(SPACE.load("e"), records.LoadRecord(name="e", generation=5, queue_depth=9)),  # no member
        sealed(SPACE.load("f"), records.LoadRecord(name="f", generation=1), OTHER),
        status.RawRecord(SPACE.load("g").encode(), b"garbage", 7),
    ]
    decoded = status.decode_group(SPACE, raw, SECRET)
    assert decoded.invalid == ()  # a load that does not decode is dropped, not listed
    snap = status.group_status(SPACE, 3, decoded, [5, 5, 5, None])  # d's lease ran out
    assert [(load.name, load.queue_depth) for load in snap.loads] == [("a", 3)]


def test_keys_of_no_kind_are_skipped() -> None:
    raw = [status.RawRecord(f"{SPACE.prefix}{rest}".encode(), b"x", 0) for rest in ("plans", "members/")]
    assert status.decode_group(SPACE, raw, SECRET).invalid == ()


@pytest.mark.integration
def test_read_from_etcd_matches_the_recorded_json(etcd: EtcdServer) -> None:
    settings = EtcdSettings(endpoints=[etcd.endpoint])

    async def scenario() -> None:
        async with GroupClient(settings, GroupRef(namespace="ns", group="g"), SECRET) as group:
            for key, value in group_records():
                await group._etcd.put(key.encode(), value)
            assert (await group.read_status()).to_json() == EXPECTED_SIGNED
        unchecked = GroupClientSettings(group=GroupRef(namespace="ns", group="g"), etcd=settings)
        assert (await read_group_status(unchecked, None)).to_json() == EXPECTED_UNCHECKED
        assert json.loads(EXPECTED_EMPTY)["revision"] == REVISION
        empty = GroupClientSettings(group=GroupRef(namespace="ns", group="empty"), etcd=settings)
        assert (await read_group_status(empty, SECRET)).to_json() == EXPECTED_EMPTY

    asyncio.run(scenario())


@pytest.mark.integration
def test_a_member_under_a_lease_shows_the_seconds_left_and_drains_round_trip(etcd: EtcdServer) -> None:
    settings = EtcdSettings(endpoints=[etcd.endpoint])

    async def scenario() -> None:
        async with GroupClient(settings, GroupRef(namespace="ns", group="lease"), SECRET) as group:
            lease, _ = await group._etcd.grant(60)
            key = group.keyspace.member("a")
            await group._etcd.put(key.encode(), records.seal(_member("a", 1), key, SECRET), lease=lease)
            snap = await group.read_status()
            assert [m.name for m in snap.members] == ["a"]
            ttl = snap.members[0].lease_ttl_left
            assert ttl is not None and 50 <= ttl <= 60
            await group.request_drain("a", "scale-down")
            assert await group.drain_requests() == {"a"}
            assert await group.cancel_drain("a") and await group.drain_requests() == set()
            await group.put_record(
                KeyKind.LEADER, records.LeaderRecord(name="a", generation=1, since=time.time())
            )
            assert (await group.read_status()).leader == "a"
            assert await group.delete_group() == 2
            assert (await group.read_status()).members == ()

    asyncio.run(scenario())
