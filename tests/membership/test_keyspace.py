"""The group keyspace: every key built parses back to what built it; nothing else parses."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from weft.api.settings import GroupRef
from weft.membership.keyspace import GroupKey, KeyKind, Keyspace, parse_rest

NAMES = st.from_regex(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,40}$", fullmatch=True)
PER_MEMBER = [KeyKind.MEMBER, KeyKind.ACK, KeyKind.LOAD, KeyKind.DRAIN]


def test_the_layout_is_the_documented_one() -> None:
    ks = Keyspace("default", "kv")
    assert ks.prefix == "/weft/v1/default/kv/" == GroupRef(namespace="default", group="kv").prefix
    assert Keyspace.of(GroupRef(namespace="default", group="kv")) == ks
    assert ks.member("a") == "/weft/v1/default/kv/members/a"
    assert (ks.ack("a"), ks.load("a"), ks.drain("a")) == (
        "/weft/v1/default/kv/acks/a",
        "/weft/v1/default/kv/load/a",
        "/weft/v1/default/kv/drain/a",
    )
    assert (ks.leader, ks.plan) == ("/weft/v1/default/kv/leader", "/weft/v1/default/kv/plan")


@given(kind=st.sampled_from(PER_MEMBER), name=NAMES)
def test_per_member_keys_round_trip(kind: KeyKind, name: str) -> None:
    ks = Keyspace("ns", "g")
    key = ks.key(kind, name)
    assert ks.parse(key) == GroupKey(kind, name) == ks.parse(key.encode())


@pytest.mark.parametrize("kind", [KeyKind.LEADER, KeyKind.PLAN])
def test_group_wide_keys_round_trip(kind: KeyKind) -> None:
    ks = Keyspace("ns", "g")
    assert ks.parse(ks.key(kind)) == GroupKey(kind)


@pytest.mark.parametrize(
    "rest", ["", "members", "members/", "members/a/b", "plan/x", "leader/", "lease/a", "Members/a", "acks"]
)
def test_keys_of_no_kind_do_not_parse(rest: str) -> None:
    assert parse_rest(rest) is None
    assert Keyspace("ns", "g").parse("/weft/v1/ns/g/" + rest) is None


def test_another_groups_keys_do_not_parse() -> None:
    assert Keyspace("ns", "g").parse("/weft/v1/ns/g2/members/a") is None
    assert Keyspace("ns", "g").parse("/weft/v1/ns2/g/plan") is None


@pytest.mark.parametrize(("kind", "name"), [(KeyKind.MEMBER, ""), (KeyKind.PLAN, "a")])
def test_building_a_key_of_the_wrong_shape_is_refused(kind: KeyKind, name: str) -> None:
    with pytest.raises(ValueError, match=kind.value):
        Keyspace("ns", "g").key(kind, name)
