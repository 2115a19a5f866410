"""Membership against a real etcd, members in this process (OS-process chaos: test_chaos.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from tests.certs import TestCerts
from tests.conftest import SECRET
from weft import Agent, AgentConfig, StalePeerError
from weft.api import records
from weft.api.records import MemberRecord
from weft.api.settings import EtcdSettings, GroupRef
from weft.membership import errors
from weft.membership._etcd import Etcd
from weft.membership.member import MemberConfig, Membership, Phase
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration

TTL = 2.0


class Group:
    """Members of one test group, each with a fabric agent; all closed at the end."""

    def __init__(self, settings: EtcdSettings, group: str) -> None:
        self.settings = settings
        self.ref = GroupRef(group=group)
        self.members: list[Membership] = []

    async def join(self, name: str, *, agent: bool = True, **config: Any) -> Membership:
        fabric = Agent(name, AgentConfig(["local", "tcp"], secret=SECRET)) if agent else None
        cfg = MemberConfig(name, self.ref, SECRET, lease_ttl=TTL, connect_peers=agent, **config)
        m = Membership(self.settings, cfg, fabric)
        self.members.append(m)
        await m.start()
        await m.activate()
        return m

    async def close(self) -> None:
        for m in self.members:
            if m.phase is not Phase.LEFT:
                await m.close()
            if m.agent is not None:
                m.agent.close()


@asynccontextmanager
async def group(settings: EtcdSettings, name: str) -> AsyncIterator[Group]:
    g = Group(settings, name)
    try:
        yield g
    finally:
        await g.close()


def sees(m: Membership, names: set[str]) -> Callable[[], bool]:
    return lambda: set(m.peers()) == names - {m.config.name}


async def all_see(members: list[Membership], names: set[str], timeout: float = 5.0) -> None:
    await asyncio.gather(*(m.wait_for(sees(m, names), timeout) for m in members))


def plain(server: EtcdServer) -> EtcdSettings:
    return EtcdSettings(endpoints=[server.endpoint])


async def test_members_see_each_other_and_one_leader(etcd_session: EtcdServer) -> None:
    async with group(plain(etcd_session), "see") as g:
        ms = [await g.join(f"m{i}") for i in range(4)]
        await all_see(ms, {m.config.name for m in ms})
        await asyncio.gather(*(m.wait_for(lambda m=m: m.leader is not None, 3) for m in ms))
        assert len({m.leader for m in ms}) == 1
        assert sum(m.is_leader for m in ms) == 1
        gens = [m.generation for m in ms]
        assert gens == sorted(gens) and len(set(gens)) == 4  # etcd revisions: later joins are higher
        for m in ms:
            assert m.ready
            assert m.agent is not None and sorted(m.agent.peers()) == m.peers()


async def test_transfer_between_members_added_by_membership(etcd_session: EtcdServer) -> None:
    async with group(plain(etcd_session), "xfer") as g:
        a, b = await g.join("a"), await g.join("b")
        assert a.agent is not None and b.agent is not None
        src = np.arange(1 << 20, dtype=np.uint8)
        dst = np.zeros(1 << 20, dtype=np.uint8)
        local = a.agent.register(src)
        b.agent.register(dst, name="dst")
        await b.republish()  # peers learn the new region through the record
        await a.wait_for(lambda: "b" in a.members and a.members["b"].mod_revision == b._mod_revision, 3)
        remote = a.agent.remote("b", "dst")
        a.agent.write(local.descs(), "b", remote.descs()).wait()
        assert np.array_equal(src, dst)


async def test_crash_is_seen_by_lease_expiry(etcd_session: EtcdServer) -> None:
    async with group(plain(etcd_session), "crash") as g:
        ms = [await g.join(f"m{i}", agent=False) for i in range(3)]
        await all_see(ms, {"m0", "m1", "m2"})
        t0 = time.monotonic()
        await ms[2].close()  # no delete: only the lease can tell
        await all_see(ms[:2], {"m0", "m1"}, timeout=TTL + 2)
        took = time.monotonic() - t0
        assert took >= TTL - TTL / 3 - 0.3, took  # not before the lease could have run out
        assert [e.reason for e in ms[0].events if e.kind == "removed"] == [
            "member key deleted (lease expired or left)"
        ]


async def test_data_path_sees_a_dead_peer_before_its_lease(etcd_session: EtcdServer) -> None:
    async with group(plain(etcd_session), "fast") as g:
        a, b, c = await g.join("a"), await g.join("b"), await g.join("c")
        await all_see([a, b, c], {"a", "b", "c"})
        assert a.agent is not None and b.agent is not None and c.agent is not None
        for m in (a, b):
            await m.wait_for(lambda m=m: m.agent is not None and m.agent.peer_alive("c"), 3)
        await asyncio.sleep(0.3)  # eager connections up
        t0 = time.monotonic()
        c.agent.close()  # its listener and connections close, as when the process dies
        await c.close()
        await all_see([a, b], {"a", "b"}, timeout=TTL)
        assert time.monotonic() - t0 < TTL / 2
        assert any(s == "data-path" for s, _ in a.detections)


async def test_leave_is_seen_at_once_and_draining_first(etcd_session: EtcdServer) -> None:
    async with group(plain(etcd_session), "leave") as g:
        a, b = await g.join("a"), await g.join("b")
        await all_see([a, b], {"a", "b"})
        states: list[str] = []
        a.subscribe(lambda ev: states.append(ev.reason) if ev.name == "b" else None)
        t0 = time.monotonic()
        await b.leave()
        await a.wait_for(lambda: a.peers() == [], 2)
        assert time.monotonic() - t0 < 1.0
        assert "state draining" in states and states[-1] == "left (drained)"
        assert b.phase is Phase.LEFT
        await a.wait_for(lambda: a.leader == "a", 3)  # b led or not: a leads now


async def test_strangers_and_garbage_are_ignored_once(
    etcd_session: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = plain(etcd_session)
    async with group(settings, "garbage") as g:
        a = await g.join("a")
        prefix = a.prefix
        async with Etcd(settings) as etcd:
            good = await g.join("b", agent=False)
            await a.wait_for(lambda: a.peers() == ["b"], 3)
            forged = good._make_record("active").model_copy(update={"name": "evil"})
            await etcd.put(f"{prefix}members/junk".encode(), b"\x00\xffnot a record")
            await etcd.put(
                f"{prefix}members/evil".encode(), records.seal(forged, f"{prefix}members/evil", b"x" * 32)
            )
            replay = records.seal(good._make_record("active"), f"{prefix}members/b", SECRET)
            await etcd.put(f"{prefix}members/replayed".encode(), replay)  # b's record under another key
            await etcd.put(f"{prefix}members/junk".encode(), b"WEFTR\x01\x01\x00\x00{}")
            await etcd.put(f"{prefix}leader".encode(), b"garbage")
            await a.wait_for(lambda: a.counters["ignored_records"] >= 5, 3)
        assert a.peers() == ["b"] and a.phase is Phase.JOINED
        warnings = [
            r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ignoring" in r.message
        ]
        warnings = [w for w in warnings if w.startswith("a: ")]
        assert len([w for w in warnings if "members/junk" in w]) == 1  # once per key
        assert any("members/evil" in w for w in warnings) and any("members/replayed" in w for w in warnings)


async def test_lost_lease_fences_and_rejoins_with_new_generation(etcd_session: EtcdServer) -> None:
    settings = plain(etcd_session)
    async with group(settings, "fence") as g:
        a, b = await g.join("a"), await g.join("b")
        await all_see([a, b], {"a", "b"})
        assert a.agent is not None and b.agent is not None
        dst = np.zeros(4096, np.uint8)
        b.agent.register(dst, name="dst")
        await b.republish()
        await a.wait_for(lambda: "b" in a.members and a.members["b"].mod_revision == b._mod_revision, 3)
        old_remote = a.agent.remote("b", "dst")
        old_gen = b.generation
        src = a.agent.register(np.ones(4096, np.uint8))
        async with Etcd(settings) as etcd:
            await etcd.revoke(b.lease)  # what a partition or a long pause ends in
        await b.wait_for(lambda: b.counters["fences"] == 1, 3)
        await b.wait_for(lambda: b.phase is Phase.JOINED and b.generation > old_gen, 5)
        await a.wait_for(lambda: "b" in a.members and a.members["b"].generation == b.generation, 5)
        assert b.incarnation == 1 and b.agent.generation == b.generation
        with pytest.raises(StalePeerError):
            a.agent.write(src.descs(), "b", old_remote.descs()).wait()
        await b.wait_for(lambda: b.ready, 3)


async def test_etcd_restart_keeps_members(etcd: EtcdServer) -> None:
    async with group(plain(etcd), "restart") as g:
        ms = [await g.join(f"m{i}") for i in range(3)]
        await all_see(ms, {"m0", "m1", "m2"})
        gens = [m.generation for m in ms]
        await asyncio.to_thread(etcd.kill)
        await asyncio.gather(*(m.wait_for(lambda m=m: not m.etcd_reachable, 5) for m in ms))
        assert all(
            m.phase is Phase.JOINED and set(m.peers()) == {"m0", "m1", "m2"} - {m.config.name} for m in ms
        )
        assert all(m.agent is not None and not m.agent.fenced for m in ms)  # serving goes on
        await asyncio.sleep(TTL + 0.5)  # longer than the lease: etcd renews leases when it comes back
        await asyncio.to_thread(etcd.start)
        await asyncio.gather(*(m.wait_for(lambda m=m: m.ready, 10) for m in ms))
        await all_see(ms, {"m0", "m1", "m2"})
        assert [m.generation for m in ms] == gens


async def test_name_held_by_a_live_member_times_out(etcd_session: EtcdServer) -> None:
    async with group(plain(etcd_session), "held") as g:
        await g.join("a", agent=False)
        with pytest.raises(errors.MembershipError, match="held by another live member"):
            await g.join("a", agent=False, join_timeout=0.5)


async def test_record_fields(etcd_session: EtcdServer) -> None:
    settings = plain(etcd_session)
    async with group(settings, "fields") as g:
        a = await g.join("a")
        async with Etcd(settings) as etcd:
            kv = await etcd.get(a.key.encode())
        assert kv is not None
        rec = records.unseal(MemberRecord, kv.value, a.key, SECRET)
        assert rec.state == "active" and rec.generation == a.generation and rec.lease_ttl == TTL
        assert rec.capabilities.backends == ["local", "tcp"] and kv.lease == a.lease
        assert rec.fabric_metadata() == rec.fabric_metadata() and rec.fabric


async def test_tls_with_client_certificates(etcd_tls: tuple[EtcdServer, TestCerts]) -> None:
    server, certs = etcd_tls
    settings = EtcdSettings(
        endpoints=[server.endpoint], ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key
    )
    async with group(settings, "tls") as g:
        a, b = await g.join("a"), await g.join("b")
        await all_see([a, b], {"a", "b"})
    no_cert = EtcdSettings(endpoints=[server.endpoint], ca_file=certs.ca, request_timeout=1.0)
    async with Etcd(no_cert) as etcd:
        with pytest.raises(errors.EtcdError):
            await etcd.get(b"/x")


async def test_user_and_password(etcd_auth: tuple[EtcdServer, str, str]) -> None:
    server, user, password = etcd_auth
    settings = EtcdSettings(endpoints=[server.endpoint], username=user, password=password)
    async with group(settings, "auth") as g:
        a, b = await g.join("a"), await g.join("b")
        await all_see([a, b], {"a", "b"})
    wrong = EtcdSettings(endpoints=[server.endpoint], username=user, password="wrong-password")
    with pytest.raises(errors.EtcdAuthError):
        async with Etcd(wrong) as etcd:
            await etcd.get(b"/x")
    async with Etcd(plain(server)) as etcd:
        with pytest.raises(errors.EtcdAuthError):
            await etcd.put(b"/x", b"y")


async def test_acks_and_load_live_under_the_member_lease(etcd_session: EtcdServer) -> None:
    settings = plain(etcd_session)
    async with group(settings, "acks") as g:
        a = await g.join("a", agent=False)
        await a.put_ack(7)
        await a.put_load(queue_depth=3, tokens_per_s=1500.0, expert_hits={1: 10})
        async with Etcd(settings) as etcd:
            ack_kv = await etcd.get(f"{a.prefix}acks/a".encode())
            load_kv = await etcd.get(f"{a.prefix}load/a".encode())
            assert ack_kv is not None and load_kv is not None
            assert ack_kv.lease == load_kv.lease == a.lease
            ack = records.unseal(records.AckRecord, ack_kv.value, f"{a.prefix}acks/a", SECRET)
            load = records.unseal(records.LoadRecord, load_kv.value, f"{a.prefix}load/a", SECRET)
            assert (ack.epoch, ack.generation) == (7, a.generation)
            assert (load.queue_depth, load.tokens_per_s, load.expert_hits) == (3, 1500.0, {"1": 10})
            await a.leave()
            assert await etcd.get(f"{a.prefix}acks/a".encode()) is None  # gone with the lease
            assert await etcd.get(f"{a.prefix}load/a".encode()) is None
