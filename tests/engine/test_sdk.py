"""The engine SDK's pieces: handshakes, load figures, the sync form, experts handed to the engine."""

from __future__ import annotations

import asyncio
import mmap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.agent.test_cli import TOKEN, wait_for
from weft.agent import daemon
from weft.api.agent_settings import AgentSettings
from weft.api.settings import EtcdSettings, GroupRef
from weft.engine import (
    ChangeState,
    DrainRequest,
    Engine,
    ExpertChange,
    LoadTracker,
    RoleChange,
    SyncEngine,
    load_settings,
)
from weft.engine.experts import SyntheticExperts, digest
from weft.engine.load import percentiles
from weft.fabric.errors import ConfigError
from weft.fabric.types import Op
from weft.membership import GroupClient
from weft.testing.etcd import EtcdServer


# -- pure parts ------------------------------------------------------------------------------
def test_percentiles_are_nearest_rank() -> None:
    p = percentiles([float(v) for v in range(1, 101)])
    assert p is not None and (p.p50, p.p90, p.p99) == (50.0, 90.0, 99.0)
    assert percentiles([]) is None
    one = percentiles([7.0])
    assert one is not None and one.p50 == one.p99 == 7.0


def test_load_tracker_refuses_nonsense_and_windows_latencies() -> None:
    t = LoadTracker(window=60.0)
    with pytest.raises(ValueError, match="counts"):
        t.set(queue_depth=-1)
    with pytest.raises(ValueError, match="fraction"):
        t.set(kv_cache_usage=1.5)
    with pytest.raises(ValueError, match="out of range"):
        t.observe_ttft(-3)
    before = t.version
    t.set(queue_depth=5, running=2, kv_cache_usage=0.25)
    for ms in (10, 20, 30, 40):
        t.observe_ttft(ms)
    t.observe_itl(5, tokens=4)
    r = t.snapshot()
    assert (r.queue_depth, r.running, r.kv_cache_usage) == (5, 2, 0.25)
    assert r.ttft_ms is not None and r.ttft_ms.p50 == 20 and r.ttft_ms.p99 == 40
    assert r.itl_ms is not None and r.tokens_per_s > 0
    assert t.version > before
    with pytest.raises(ValueError):
        LoadTracker(window=0)


def test_a_change_answered_from_another_thread_wakes_the_sdk() -> None:
    async def main() -> tuple[ChangeState, ChangeState, str]:
        ok = RoleChange(3, time.monotonic() + 5, old=None, new="decode")
        answered = ok._bind()
        threading.Thread(target=ok.done).start()
        await asyncio.wait_for(answered.wait(), 5)
        bad = DrainRequest(0, time.monotonic() + 5, why="stop")
        answered = bad._bind()
        threading.Thread(target=bad.failed, args=("still busy",)).start()
        await asyncio.wait_for(answered.wait(), 5)
        bad.done()  # a second answer changes nothing
        return ok.state, bad.state, bad.reason

    assert asyncio.run(main()) == (ChangeState.DONE, ChangeState.FAILED, "still busy")


def test_settings_from_the_environment_name_the_bad_field(tmp_path: Path) -> None:
    env = {"WEFT_NAME": "x", "WEFT_GROUP": "g", "WEFT_SECRET": TOKEN, "WEFT_ROLE_POLICY": "fastest"}
    with pytest.raises(ConfigError, match="policy"):
        load_settings(None, env)
    config = tmp_path / "agent.yaml"
    config.write_text("group: {namespace: n, group: g}\nname: from-file\nlease_ttl: 4\n")
    s = load_settings(None, {"WEFT_CONFIG": str(config), "WEFT_SECRET": TOKEN, "WEFT_LEASE_TTL": "2"})
    assert (s.name, s.group.namespace, s.lease_ttl) == ("from-file", "n", 2.0)  # env over file
    with pytest.raises(ConfigError, match="low_queue"):
        load_settings(None, {**env, "WEFT_ROLE_POLICY": "load", "WEFT_LOW_QUEUE": "9"})


# -- against a real etcd ---------------------------------------------------------------------
def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


@pytest.mark.integration
def test_sync_engines_follow_the_plan_through_the_change_stream(etcd: EtcdServer) -> None:
    """Two engines without an asyncio loop: each answers its first role from its own
    thread, reports load (in etcd and on /metrics), and drains on stop."""
    engines = [SyncEngine.from_env(env=settings_env(etcd, f"s{i}")) for i in range(2)]
    answered: list[str] = []

    def answer(engine: SyncEngine) -> None:
        for change in engine.changes(timeout=30):
            answered.append(f"{engine.engine.name}:{type(change).__name__}")
            change.done()
            if isinstance(change, DrainRequest):
                return

    threads = []
    for e in engines:
        e.start()
        t = threading.Thread(target=answer, args=(e,))
        t.start()
        threads.append(t)
    try:
        wait_for("both engines in a role", lambda: all(e.role is not None for e in engines), 30)
        wait_for("both engines acked", lambda: all(e.epoch > 0 for e in engines), 30)
        assert sorted(str(e.role) for e in engines) == ["decode", "prefill"]
        engines[0].load.set(queue_depth=3, running=2, kv_cache_usage=0.5)
        engines[0].load.observe_ttft(120.0)
        m = engines[0].engine.membership
        assert m is not None
        wait_for("the load record in etcd", lambda: (ld := m.loads.get("s0")) and ld.running == 2, 15)
        load = m.loads["s0"]
        assert load.queue_depth == 3 and load.kv_cache_usage == 0.5
        assert load.ttft_ms is not None and load.ttft_ms.p90 == 120.0
        text = scrape(engines[0].engine.http_port)
        assert "weft_engine_queue_depth 3.0" in text and 'weft_engine_ttft_ms{quantile="0.9"} 120.0' in text
        assert f'weft_role{{role="{engines[0].role}"}} 1.0' in text
    finally:
        for e in engines:
            e.stop()
        for t in threads:
            t.join(30)
    assert {a.split(":")[1] for a in answered} == {"RoleChange", "DrainRequest"}


def settings_env(etcd: EtcdServer, name: str, **extra: str) -> dict[str, str]:
    return {
        "WEFT_NAME": name,
        "WEFT_GROUP": "sdk",
        "WEFT_ETCD": etcd.endpoint,
        "WEFT_SECRET": TOKEN,
        "WEFT_LEASE_TTL": "2",
        "WEFT_DRAIN_TIMEOUT": "10",
        **extra,
    }


@pytest.mark.integration
def test_experts_reach_the_engine_verified_before_the_ack(etcd: EtcdServer) -> None:
    """With expert placement, each engine's handler gets the weights of its experts (bytes
    checked against the source's digest) before its epoch is acked; a handler that raises
    is asked again and nothing is acked meanwhile."""
    nbytes = 4096
    truth = SyntheticExperts(nbytes)
    extra = {"WEFT_EXPERTS": "4", "WEFT_EXPERT_SOURCE": f"synthetic:{nbytes}"}

    async def main() -> dict[str, dict[int, str]]:
        got: dict[str, dict[int, str]] = {}
        refusals = {"x0": 1}
        engines = [Engine.from_env(settings_env(etcd, f"x{i}", **extra)) for i in range(2)]

        for e in engines:

            def take(change: ExpertChange, name: str = e.name, engine: Engine = e) -> None:
                if refusals.get(name):
                    refusals[name] -= 1
                    raise RuntimeError("not yet")  # the SDK asks again a second later
                assert engine.epoch < change.epoch  # not acked before the engine took them
                got.setdefault(name, {}).update({x: digest(w) for x, w in change.added.items()})

            e.on_experts(take)
        try:
            for e in engines:
                await e.start()
            await asyncio.wait_for(_all_applied(engines), 30)
        finally:
            for e in engines:
                await e.stop()
        return got

    got = asyncio.run(main())
    assert sorted(x for held in got.values() for x in held) == [0, 1, 2, 3]
    assert all(d == truth.digest(x) for held in got.values() for x, d in held.items())


async def _all_applied(engines: list[Engine]) -> None:
    while True:
        plans = [e.membership.plan for e in engines if e.membership is not None]
        if (
            len(plans) == len(engines)
            and all(p is not None for p in plans)
            and all(e.epoch == plans[0].epoch for e in engines if plans[0] is not None)
            and all(len(e.experts_held) == 2 for e in engines)
        ):
            return
        await asyncio.sleep(0.05)


def test_the_kv_pool_file_is_shared_memory_another_process_maps(make_agent: Any, tmp_path: Path) -> None:
    """Sidecar mode: a peer's WRITE into the agent's ``kv-pool`` lands in the file that the
    engine container maps (here: a second mapping of the same file)."""
    pool = tmp_path / "kv-pool"
    s = AgentSettings.model_validate(
        {
            "name": "side",
            "group": {"namespace": "n", "group": "g"},
            "secret": TOKEN,
            "kv_pool_bytes": 1 << 16,
            "kv_pool_file": str(pool),
        }
    )
    side = make_agent("side", "tcp", secret=TOKEN.encode())
    daemon._kv_pool(side, s)
    peer = make_agent("peer", "tcp", secret=TOKEN.encode())
    peer.add_peer(side.metadata())
    src = peer.register(np.arange(4096, dtype=np.uint8).astype(np.uint8), "src")
    remote = peer.remote("side", "kv-pool", timeout=5)
    peer.transfer(Op.WRITE, src.descs(), "side", remote.descs([(4096, 4096)]), timeout=10).wait()
    with pool.open("r+b") as f, mmap.mmap(f.fileno(), 1 << 16) as engine_view:
        assert engine_view[4096:8192] == bytes(range(256)) * 16
    bad = s.model_copy(update={"kv_pool_file": tmp_path / "missing-dir" / "pool"})
    with pytest.raises(ConfigError, match="missing-dir"):
        daemon._kv_pool(side, bad)


@pytest.mark.integration
def test_a_scale_down_drain_record_asks_the_engine_to_drain_before_its_role_goes(etcd: EtcdServer) -> None:
    """The operator's ``drain/<pod>`` record (scale-down): the engine is told at once (stop
    admitting), /readyz says it is draining, and the plan then takes its role away through a
    RoleChange to no role, which the engine also answers before it is acked."""

    async def main() -> list[str]:
        seen: list[str] = []
        engines = [Engine.from_env(settings_env(etcd, f"d{i}")) for i in range(3)]
        for e in engines:

            async def drain(change: DrainRequest, name: str = e.name) -> None:
                seen.append(f"{name}:drain:{change.why}")

            async def switch(change: RoleChange, name: str = e.name) -> None:
                seen.append(f"{name}:role:{change.new}")

            e.on_drain(drain)
            e.on_role_change(switch)
        try:
            for e in engines:
                await e.start()
            await asyncio.wait_for(_until(lambda: all(e.epoch > 0 for e in engines)), 30)
            leaving = engines[2]
            group = GroupRef(namespace="default", group="sdk")
            async with GroupClient(EtcdSettings(endpoints=[etcd.endpoint]), group, TOKEN.encode()) as client:
                await client.request_drain("d2", "scale-down to 2")
            await asyncio.wait_for(
                _until(lambda: leaving.role is None and leaving.drain_request is not None), 30
            )
            assert leaving.readiness is not None
            assert leaving.readiness.reason() == "draining (scale-down)"
            assert not leaving.ready
            m = engines[0].membership
            assert m is not None
            await asyncio.wait_for(_until(lambda: m.plan is not None and "d2" not in m.plan.roles), 30)
            async with GroupClient(EtcdSettings(endpoints=[etcd.endpoint]), group, TOKEN.encode()) as client:
                await client.cancel_drain("d2")  # scaled back up before the pod went
            back = lambda: leaving.drain_request is None and leaving.role is not None  # noqa: E731
            await asyncio.wait_for(_until(back), 30)
            assert leaving.readiness.reason() is None and leaving.ready
        finally:
            for e in engines:
                await e.stop()
        return seen

    seen = asyncio.run(main())
    assert seen.index("d2:drain:scale-down") < seen.index("d2:role:None")
    d2_roles = [x for x in seen if x.startswith("d2:role:")]
    assert d2_roles[-1] != "d2:role:None"  # serving again once the drain was withdrawn
    assert seen[-1] == "d2:drain:stop"  # and asked to drain once more when it stops


async def _until(check: Any) -> None:
    """Poll `check` (the callers bound it with wait_for)."""
    while True:
        if check():
            return
        await asyncio.sleep(0.05)


@pytest.mark.integration
def test_a_full_inbox_makes_the_engine_unready_until_drained(etcd: EtcdServer, make_agent: Any) -> None:
    """The fabric's health reaches /readyz: a peer fills the engine's notification inbox (its
    byte bound, 64 MiB by default), /readyz answers 503 naming it, and 200 once the engine
    takes its notifications."""
    engine = SyncEngine.from_env(env=settings_env(etcd, "inbox"))
    engine.start()
    try:
        port = engine.engine.http_port
        wait_for("ready", lambda: readyz(port)[0] == 200, 30)
        peer = make_agent("filler", "tcp", secret=engine.engine.agent.config.secret)
        name = peer.add_peer(engine.engine.agent.metadata())
        for _ in range(64):  # 64 MiB: no room left for another notification of the largest size
            peer.send_notification(name, b"n" * (1 << 20))
        wait_for("the fabric reports its inbox full", lambda: bool(engine.engine.agent.health()), 30)
        code, body = readyz(port)
        assert code == 503 and "notification inbox full" in body, body
        text = scrape(port)
        assert 'weft_not_ready{reason="fabric"} 1.0' in text
        for bound in ("unauthenticated", "accept_failures", "descriptors", "staging", "inbox_full"):
            assert f"weft_fabric_limit_{bound}_total 0.0" in text  # every bound exported, none hit yet
        peer.send_notification(name, b"over")  # no room: dropped once inbox_full_timeout passes
        wait_for("the refusal counted", lambda: "weft_fabric_limit_inbox_full_total 1.0" in scrape(port), 30)
        taken = engine.engine.agent.get_notifications()
        assert sum(len(v) for v in taken.values()) == 64
        wait_for("ready again", lambda: readyz(port)[0] == 200, 10)
    finally:
        engine.stop()


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
