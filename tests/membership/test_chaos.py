"""Membership under OS-level chaos: members are real processes that get killed, paused, stopped.

In-process tests (test_member.py) cannot lose a process: SIGKILL closing every socket at once,
SIGSTOP freezing the lease keep-alive with the sockets still open, SIGTERM draining while
peers still write. Each member here is a `MemberProcess` (a fabric agent and its membership in
a spawned child); the test kills, pauses and restarts them and etcd, and checks every view and
every byte on the far side of a process boundary.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import SECRET
from tests.memberproc import MemberProcess, start_members, wait_until
from tests.peerproc import digest, pattern
from weft.api import records
from weft.api.records import MemberRecord
from weft.api.settings import EtcdSettings, GroupRef
from weft.membership._etcd import Etcd
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

TTL = 2.0
SIZE = 64 << 10
STREAM_SIZE = 1 << 20  # the SIGTERM stream: large enough that writes are often in flight

Start = Callable[[EtcdServer, list[str]], list[MemberProcess]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Starts members in a group of their own; every process is gone after the test."""
    made: list[MemberProcess] = []

    def factory(server: EtcdServer, names: list[str]) -> list[MemberProcess]:
        group = f"chaos-{secrets.token_hex(4)}"
        ms = start_members(names, server.endpoint, group, lease_ttl=TTL)
        made.extend(ms)
        return ms

    yield factory
    for m in made:
        m.request_close()
    for m in made:
        m.close()


def whole(ms: list[MemberProcess]) -> bool:
    """Every member is ready and sees exactly the others, all active."""
    names = {m.name for m in ms}
    for m in ms:
        v = m.view()
        if not v["ready"] or set(v["peers"]) != names - {m.name}:
            return False
    return True


def wait_whole(ms: list[MemberProcess], timeout: float = 10.0) -> None:
    wait_until(lambda: whole(ms), timeout, f"every view of {[m.name for m in ms]} is whole and ready")


def agreed(ms: list[MemberProcess]) -> bool:
    """Every view holds all members (itself too) with the same generations, and one leader."""
    views = [m.view() for m in ms]
    first = views[0]
    return (
        set(first["members"]) == {m.name for m in ms}
        and all(v["members"] == first["members"] and v["leader"] == first["leader"] for v in views)
        and first["leader"] is not None
    )


def removal(view: dict[str, Any], name: str, since: float) -> tuple[float, str] | None:
    """When and why this view removed `name` (the first time after `since`), or None."""
    found = [
        (at, why)
        for kind, who, _gen, why, at in view["events"]
        if kind == "removed" and who == name and at >= since
    ]
    return min(found) if found else None


def removal_latencies(
    survivors: list[MemberProcess], name: str, since: float
) -> tuple[dict[str, float], dict[str, str]]:
    """Per survivor: seconds from `since` to its removal of `name`, and the removal's reason."""
    latencies, reasons = {}, {}
    for s in survivors:
        found = removal(s.view(), name, since)
        assert found is not None, f"{s.name} has no 'removed' event for {name}"
        latencies[s.name] = round(found[0] - since, 3)
        reasons[s.name] = found[1]
    return latencies, reasons


def gone_everywhere(survivors: list[MemberProcess], name: str) -> bool:
    return all(name not in s.view()["members"] for s in survivors)


def register_inboxes(ms: list[MemberProcess], sources: list[str], size: int = SIZE) -> None:
    """Each member registers a zeroed ``in-<source>`` region for every other source."""
    tickets = [
        (m, m.send("register_many", [(f"in-{src}", size, None) for src in sources if src != m.name]))
        for m in ms
    ]
    for m, t in tickets:
        m.result(t)


def test_eight_members_see_each_other_and_write_every_pair(etcd_session: EtcdServer, start: Start) -> None:
    ms = start(etcd_session, [f"m{i}" for i in range(8)])
    wait_whole(ms)
    wait_until(lambda: agreed(ms), 5, "every view has the same members, generations and leader")
    names = [m.name for m in ms]
    register_inboxes(ms, names)
    seeds = {m.name: 100 + i for i, m in enumerate(ms)}
    tickets = [
        (m, m.send_write_many([n for n in names if n != m.name], f"in-{m.name}", SIZE, 7, seed=seeds[m.name]))
        for m in ms
    ]
    for m, t in tickets:
        outcomes = m.result(t)
        assert [o for _, o, _ in outcomes] == ["ok"] * 7, (m.name, outcomes)
    expected = {n: digest(pattern(SIZE, s)) for n, s in seeds.items()}
    for dst in ms:
        got = dst.digests()
        wrong = [src for src in names if src != dst.name and got[f"in-{src}"] != expected[src]]
        assert not wrong, f"{dst.name}: bytes from {wrong} did not land"


def test_sigkill_is_seen_by_every_survivor_within_ttl(etcd_session: EtcdServer, start: Start) -> None:
    ms = start(etcd_session, [f"k{i}" for i in range(5)])
    wait_whole(ms)
    victim, survivors = ms[-1], ms[:-1]
    t_kill = time.time()
    victim.kill(signal.SIGKILL)
    wait_until(lambda: gone_everywhere(survivors, victim.name), TTL + 3, f"survivors drop {victim.name}")
    latencies, reasons = removal_latencies(survivors, victim.name, t_kill)
    log.info("SIGKILL detection latencies (s): %s; reasons: %s", latencies, reasons)
    assert max(latencies.values()) < TTL + 1, f"detection latencies (s) after SIGKILL: {latencies} {reasons}"
    victim.proc.join(5)
    assert victim.proc.exitcode == -signal.SIGKILL
    wait_whole(survivors)


def test_sigstop_fences_and_rejoins_with_a_new_generation(etcd_session: EtcdServer, start: Start) -> None:
    ms = start(etcd_session, [f"s{i}" for i in range(4)])
    wait_whole(ms)
    victim, survivors = ms[-1], ms[:-1]
    victim.register("sink", SIZE, None)
    old_gen = victim.view()["generation"]
    for s in survivors:
        assert s.remember(victim.name, "sink") == old_gen
    t_stop = time.time()
    victim.kill(signal.SIGSTOP)
    try:
        wait_until(
            lambda: gone_everywhere(survivors, victim.name), 2 * TTL + 0.5, "survivors drop the paused one"
        )
        latencies, reasons = removal_latencies(survivors, victim.name, t_stop)
        log.info("SIGSTOP detection latencies (s): %s; reasons: %s", latencies, reasons)
        time.sleep(max(0.0, t_stop + 2 * TTL + 0.5 - time.time()))  # the pause itself
    finally:
        victim.kill(signal.SIGCONT)
    assert min(latencies.values()) > TTL / 3, f"removed before its lease could run out: {latencies} {reasons}"
    # the lease ran out, or the data-path heartbeat heard nothing for as long as a lease lasts
    lease_or_silence = ("member key deleted (lease expired or left)", "no answer to pings for ")
    assert all(why.startswith(lease_or_silence) for why in reasons.values()), reasons

    def rejoined() -> dict[str, Any] | None:
        v = victim.view()
        return v if v["ready"] and v["generation"] > old_gen else None

    v = wait_until(rejoined, 10, f"{victim.name} rejoins")
    own = [(kind, gen) for kind, name, gen, _why, _at in v["events"] if name == victim.name]
    kinds = [k for k, _ in own]
    assert "fenced" in kinds and "rejoined" in kinds, own
    assert kinds.index("fenced") < kinds.index("rejoined"), own
    fenced_gen = own[kinds.index("fenced")][1]
    rejoined_gen = own[kinds.index("rejoined")][1]
    assert fenced_gen == old_gen and rejoined_gen > old_gen and v["generation"] == rejoined_gen, own
    new_gen = v["generation"]
    wait_until(
        lambda: all(s.view()["members"].get(victim.name) == new_gen for s in survivors),
        5,
        "survivors see the new generation",
    )
    wait_whole(ms)
    for i, s in enumerate(survivors):
        stale = s.stale_write(victim.name, "sink")
        assert stale.split(":")[0] == "StalePeerError", stale
        assert s.write(victim.name, "sink", SIZE, 7 + i) == "ok"
        assert victim.digest("sink") == digest(pattern(SIZE, 7 + i))


def test_sigterm_drains_while_peers_write(etcd_session: EtcdServer, start: Start) -> None:
    ms = start(etcd_session, ["w0", "w1", "w2", "t0", "v"])
    wait_whole(ms)
    writers, target, victim = ms[:3], ms[3], ms[4]
    writer_names = [w.name for w in writers]
    register_inboxes(ms, writer_names, STREAM_SIZE)
    seeds = {w.name: 200 + i for i, w in enumerate(writers)}
    expected = {n: digest(pattern(STREAM_SIZE, s)) for n, s in seeds.items()}
    peers = {w.name: [m.name for m in ms if m is not w] for w in writers}
    count, pause = 4 * 500, 0.002  # >= 4 s of writes: the victim leaves in the middle
    tickets = [
        (
            w,
            w.send_write_many(
                peers[w.name], f"in-{w.name}", STREAM_SIZE, count, seed=seeds[w.name], pause=pause
            ),
        )
        for w in writers
    ]

    def victim_receiving() -> bool:
        got = victim.digests()
        return all(got[f"in-{n}"] == expected[n] for n in writer_names)

    wait_until(victim_receiving, 10, "every writer has written to the victim")
    t_term = time.time()
    victim.kill(signal.SIGTERM)
    victim.proc.join(10)
    assert victim.proc.exitcode == 0, f"SIGTERM exit code {victim.proc.exitcode}"
    survivors = ms[:4]
    results = {w.name: w.result(t, timeout=60) for w, t in tickets}
    failed = {n: [r for r in rs if r[1] not in ("ok", "skipped")] for n, rs in results.items()}
    assert not any(failed.values()), f"writes failed: {failed}"
    for n, rs in results.items():
        assert all(peer == victim.name and at > t_term for peer, o, at in rs if o == "skipped"), n
        assert any(peer == victim.name and o == "ok" and at < t_term for peer, o, at in rs), n
        assert any(o == "skipped" for _, o, _ in rs), f"{n} finished before the victim left"
    latencies, reasons = removal_latencies(survivors, victim.name, t_term)
    served = [
        at - t_term for rs in results.values() for peer, o, at in rs if peer == victim.name and o == "ok"
    ]
    log.info(
        "SIGTERM drop latencies (s): %s; reasons: %s; writes to it that ended ok after SIGTERM: %d",
        latencies,
        reasons,
        sum(1 for d in served if d > 0),
    )
    assert max(latencies.values()) < TTL / 2, f"drop latencies (s) after SIGTERM: {latencies}"
    assert set(reasons.values()) == {"left (drained)"}, reasons
    for s in survivors:
        # every surviving writer's last write to it landed
        got = s.digests()
        assert all(got[f"in-{n}"] == expected[n] for n in writer_names if n != s.name), s.name
    for later in [r for rs in results.values() for r in rs if r[2] > t_term + 1.0]:
        assert later[1] == ("skipped" if later[0] == victim.name else "ok"), later
    wait_whole(survivors)
    assert target.alive()


def test_etcd_outage_keeps_members_and_data_path(etcd: EtcdServer, start: Start) -> None:
    ms = start(etcd, [f"e{i}" for i in range(4)])
    wait_whole(ms)
    names = [m.name for m in ms]
    register_inboxes(ms, names)
    before = {m.name: m.view()["generation"] for m in ms}
    seeds = {n: 300 + i for i, n in enumerate(names)}
    t_kill = time.monotonic()
    etcd.kill()
    wait_until(lambda: all(not m.view()["etcd_reachable"] for m in ms), 5, "members notice etcd is gone")
    # writes between known members go on for the rest of 2 * TTL without etcd
    count = 3 * 20
    pause = max(0.0, t_kill + 2 * TTL - time.monotonic()) / count
    tickets = [
        (
            m,
            m.send_write_many(
                [n for n in names if n != m.name],
                f"in-{m.name}",
                SIZE,
                count,
                seed=seeds[m.name],
                pause=pause,
            ),
        )
        for m in ms
    ]
    for m, t in tickets:
        outcomes = m.result(t)
        assert {o for _, o, _ in outcomes} == {"ok"}, (m.name, [o for o in outcomes if o[1] != "ok"])
    assert time.monotonic() - t_kill >= 2 * TTL
    for m in ms:
        v = m.view()
        assert v["phase"] == "joined" and not v["fenced"] and not v["ready"], (m.name, v)
        assert set(v["members"]) == set(names), (m.name, v["members"])
    etcd.start()
    t_back = time.monotonic()
    wait_whole(ms, timeout=10)
    log.info("etcd back: every member ready again after %.2f s", time.monotonic() - t_back)
    for m in ms:
        v = m.view()
        assert v["generation"] == before[m.name], (m.name, v["generation"], before[m.name])
        assert v["members"] == before, (m.name, v["members"])
        assert m.alive()
    expected = {n: digest(pattern(SIZE, s)) for n, s in seeds.items()}
    for dst in ms:
        got = dst.digests()
        assert all(got[f"in-{src}"] == expected[src] for src in names if src != dst.name), dst.name


async def _stranger(endpoint: str, prefix: str, victim: str) -> list[str]:
    """Writes garbage, a forged, an unsigned and a replayed record; returns the keys it wrote."""
    async with Etcd(EtcdSettings(endpoints=[endpoint])) as etcd:
        key = f"{prefix}members/{victim}"
        kv = await etcd.get(key.encode())
        assert kv is not None
        genuine = records.unseal(MemberRecord, kv.value, key, SECRET)
        forged = genuine.model_copy(update={"name": "evil", "generation": genuine.generation + 1000})
        unsigned_body = genuine.model_copy(update={"name": "unsigned"}).model_dump_json().encode()
        bad = {
            "junk": b"\x00\xffnot a record at all",
            "evil": records.seal(forged, f"{prefix}members/evil", b"not-the-group-secret-0123456789"),
            "unsigned": struct.pack("!5sBBH", b"WEFTR", int(records.RecordKind.MEMBER), 1, 0) + unsigned_body,
            "replayed": kv.value,  # a member's genuine record under another key
        }
        for name, value in bad.items():
            await etcd.put(f"{prefix}members/{name}".encode(), value)
        await etcd.put(f"{prefix}members/junk".encode(), b"WEFTR\x01\x01\x00\x00{}")  # same key again
        return [f"{prefix}members/{name}" for name in bad]


def test_strangers_records_are_ignored_and_warned_once(etcd_session: EtcdServer, start: Start) -> None:
    ms = start(etcd_session, [f"g{i}" for i in range(3)])
    wait_whole(ms)
    before = {m.name: m.view() for m in ms}
    prefix = GroupRef(group=ms[0].group).prefix
    keys = asyncio.run(_stranger(etcd_session.endpoint, prefix, ms[0].name))
    wait_until(
        lambda: all(m.view()["ignored_records"] >= len(keys) + 1 for m in ms), 5, "every member saw them"
    )
    for m in ms:
        v = m.view()
        assert m.alive() and v["ready"] and v["phase"] == "joined", (m.name, v)
        assert v["members"] == before[m.name]["members"] and v["peers"] == before[m.name]["peers"]
        ignoring = [msg for _logger, level, msg in v["warnings"] if level == "WARNING" and "ignoring" in msg]
        for key in keys:
            assert len([msg for msg in ignoring if f"ignoring {key}:" in msg]) == 1, (m.name, key, ignoring)
    wait_whole(ms)


async def _put(endpoint: str, key: str, value: bytes) -> None:
    async with Etcd(EtcdSettings(endpoints=[endpoint])) as etcd:
        await etcd.put(key.encode(), value)


def test_garbage_leader_key_neither_stalls_the_election_nor_spins(
    etcd_session: EtcdServer, start: Start
) -> None:
    ms = start(etcd_session, [f"l{i}" for i in range(3)])
    wait_whole(ms)
    wait_until(lambda: agreed(ms), 5, "one leader")
    asyncio.run(_put(etcd_session.endpoint, GroupRef(group=ms[0].group).prefix + "leader", b"garbage"))
    wait_until(lambda: all(m.view()["ignored_records"] >= 1 for m in ms), 5, "every member saw it")
    t0 = time.monotonic()
    time.sleep(TTL)  # observe the members for one lease TTL
    counts = {m.name: m.view()["ignored_records"] for m in ms}
    elapsed = time.monotonic() - t0
    assert all(m.alive() and m.view()["ready"] for m in ms)
    assert max(counts.values()) <= 3, f"ignored the leader key {counts} times in {elapsed:.1f} s"
    wait_until(lambda: agreed(ms), TTL + 1, "a leader is elected again")
