"""The metadata directory (NIXL's central metadata server) on a real etcd."""

from __future__ import annotations

import asyncio
import time

import pytest

from weft.api.settings import EtcdSettings
from weft.membership import errors
from weft.membership.directory import Directory
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration


def _settings(etcd: EtcdServer) -> EtcdSettings:
    return EtcdSettings(endpoints=[etcd.endpoint])


async def test_publish_fetch_withdraw(etcd: EtcdServer) -> None:
    a = Directory(_settings(etcd), "/nixl/agents", ttl=5)
    b = Directory(_settings(etcd), "/nixl/agents/", ttl=5)
    try:
        assert await b.fetch("prefill-0") is None
        await a.publish("prefill-0", b"record-1")
        await a.publish("prefill-0", b"part", label="layers-0-15")
        assert await b.fetch("prefill-0") == b"record-1"
        assert await b.fetch("prefill-0", "layers-0-15") == b"part"
        raw = etcd.etcdctl("get", "/nixl/agents/prefill-0/metadata", "--print-value-only")
        assert raw.strip() == "record-1"
        await a.publish("prefill-0", b"record-2")  # a refresh replaces
        assert await b.fetch("prefill-0") == b"record-2"
        assert await a.withdraw("prefill-0") == 2
        assert await b.fetch("prefill-0") is None
    finally:
        await a.close()
        await b.close()


async def test_a_dead_publisher_disappears_within_its_ttl_and_a_live_one_stays(etcd: EtcdServer) -> None:
    ttl = 3
    live = Directory(_settings(etcd), ttl=ttl)
    dead = Directory(_settings(etcd), ttl=ttl)
    reader = Directory(_settings(etcd))
    try:
        await live.publish("live", b"x")
        await dead.publish("dead", b"y")
        # the "dead" one stops keeping its lease alive, as a SIGKILLed process would
        assert dead._keeper is not None
        dead._keeper.cancel()
        start = time.monotonic()
        while await reader.fetch("dead") is not None:
            # etcd expires a lease at most one TTL after its last refresh (plus its own tick)
            assert time.monotonic() - start < ttl + 3, "a dead publisher's metadata stayed"
            await asyncio.sleep(0.2)
        assert await reader.fetch("live") == b"x"  # kept alive across the same time
    finally:
        await live.close()
        dead._published.clear()
        await dead.close()
        await reader.close()


async def test_close_revokes_at_once_and_bad_names_are_refused(etcd: EtcdServer) -> None:
    d = Directory(_settings(etcd), ttl=30)
    other = Directory(_settings(etcd))
    try:
        await d.publish("a", b"x")
        await d.close()
        assert await other.fetch("a") is None  # revoked, not left for 30 s
        with pytest.raises(errors.MembershipError, match="invalid agent name"):
            await other.fetch("../etc")
        with pytest.raises(errors.MembershipError, match="key path"):
            Directory(_settings(etcd), "nixl")
    finally:
        await other.close()
