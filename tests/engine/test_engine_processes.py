"""Engines as OS processes following a load-driven plan (`tests.engineproc`, real etcd).

The bounds come from the policy's timing: a step needs fresh load (published within
`LOAD_INTERVAL` of a change), the settle time, the leader's tick (1 s for a load policy) and
one plan write and watch round; the tests allow `SETTLE` + 15 s on top for a busy machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from tests.agent.test_cli import TOKEN, wait_for
from weft.api.agent_settings import GroupClientSettings
from weft.api.settings import EtcdSettings, GroupRef
from weft.membership import GroupStatus, read_group_status
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration

SETTLE = 2.0
STEP_DEADLINE = SETTLE + 15.0
GROUP = GroupRef(namespace="default", group="eng")


@dataclass
class EngineProcess:
    name: str
    proc: subprocess.Popen[str]
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float, **match: Any) -> dict[str, Any]:
        """The next event of that kind (and fields), within `timeout` seconds."""
        for ev in self.seen:
            if ev["event"] == event and all(ev.get(k) == v for k, v in match.items()):
                self.seen.remove(ev)
                return ev
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if ev["event"] == event and all(ev.get(k) == v for k, v in match.items()):
                return ev
            self.seen.append(ev)
        raise AssertionError(f"{self.name}: no {event} {match} within {timeout} s; saw {self.seen[-10:]}")


@pytest.fixture
def start_engine(etcd: EtcdServer, tmp_path: Path) -> Iterator[Callable[..., EngineProcess]]:
    started: list[EngineProcess] = []
    logs: list[IO[str]] = []

    def start(name: str, **env_extra: str) -> EngineProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
        env |= {
            "WEFT_NAME": name,
            "WEFT_NAMESPACE": GROUP.namespace,
            "WEFT_GROUP": GROUP.group,
            "WEFT_ETCD": etcd.endpoint,
            "WEFT_SECRET": TOKEN,
            "WEFT_LEASE_TTL": "2",
            "WEFT_ROLE_POLICY": "load",
            "WEFT_SETTLE_SECONDS": str(SETTLE),
            "WEFT_HIGH_QUEUE": "8",
            "WEFT_LOW_QUEUE": "2",
            "WEFT_DRAIN_TIMEOUT": "20",
            **env_extra,
        }
        log = (tmp_path / f"{name}.log").open("w")
        logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.engineproc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )
        e = EngineProcess(name, proc)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                e.events.put(json.loads(line))

        threading.Thread(target=pump, daemon=True).start()
        started.append(e)
        e.expect("ready", 30.0)
        return e

    yield start
    for e in started:
        if e.proc.poll() is None:
            e.proc.kill()
        e.proc.wait(10)
        for pipe in (e.proc.stdin, e.proc.stdout):
            if pipe is not None:
                pipe.close()
    for log in logs:
        log.close()


def status(etcd: EtcdServer) -> GroupStatus:
    settings = GroupClientSettings(group=GROUP, etcd=EtcdSettings(endpoints=[etcd.endpoint]))
    return asyncio.run(read_group_status(settings, TOKEN.encode()))


def settled(etcd: EtcdServer, names: set[str]) -> GroupStatus | None:
    """The status once every one of `names` acked the current plan, which plans exactly them."""
    doc = status(etcd)
    plan = doc.plan
    if plan is None or set(plan.roles) != names or set(plan.acked) != names:
        return None
    return doc


def test_overloaded_prefill_flips_a_decode_engine_which_switches_before_it_acks(
    etcd: EtcdServer, start_engine: Callable[..., EngineProcess]
) -> None:
    engines = {n: start_engine(n) for n in ("e0", "e1", "e2")}
    doc = wait_for("three engines on one plan", lambda: settled(etcd, set(engines)), 30.0)
    assert doc.plan is not None
    roles = dict(doc.plan.roles)
    assert sorted(roles.values()) == ["decode", "decode", "prefill"]  # the floor: 1 prefill
    prefill = next(n for n, r in roles.items() if r == "prefill")
    decodes = [n for n, r in roles.items() if r == "decode"]
    for n in decodes:
        engines[n].send("gate closed")  # a switch away from decode waits for the test
        engines[n].send("submit 3")  # requests in flight when the flip comes
    engines[prefill].send("load 30")
    epoch_before = doc.plan.epoch

    def flipped() -> tuple[str, int] | None:
        plan = status(etcd).plan
        if plan is None or plan.epoch <= epoch_before:
            return None
        movers = [n for n in decodes if plan.roles.get(n) == "prefill"]
        return (movers[0], plan.epoch) if movers else None

    mover, epoch = wait_for("the leader to flip a decode engine to prefill", flipped, STEP_DEADLINE)
    began = engines[mover].expect("switch-begin", 10.0, epoch=epoch, old="decode", new="prefill")
    assert began["running"] >= 0
    others = set(engines) - {mover}

    def others_acked() -> GroupStatus | None:
        doc = status(etcd)
        return doc if doc.plan is not None and others <= set(doc.plan.acked) else None

    doc = wait_for("the engines that did not move to ack the new epoch", others_acked, 15.0)
    assert doc.plan is not None and doc.plan.epoch == epoch
    assert mover not in doc.plan.acked  # its engine has not switched yet: no ack
    mine = next(m for m in doc.members if m.name == mover)
    assert mine.role == "decode"  # nor does its record claim the new role
    engines[mover].send("gate open")
    ended = engines[mover].expect("switch-end", 10.0, epoch=epoch)
    doc = wait_for("the mover to ack once switched", lambda: settled(etcd, set(engines)), 15.0)
    assert next(m for m in doc.members if m.name == mover).role == "prefill"
    assert ended["at"] >= began["at"]
    for e in engines.values():
        e.send("quit")
    for e in engines.values():
        done = e.expect("exit", 30.0)
        assert done["accepted"] == done["completed"]  # no request lost across the flip
        assert e.proc.wait(10) == 0


def test_an_engine_killed_mid_switch_leaves_a_consistent_plan(
    etcd: EtcdServer, start_engine: Callable[..., EngineProcess]
) -> None:
    engines = {n: start_engine(n) for n in ("e0", "e1", "e2")}
    doc = wait_for("three engines on one plan", lambda: settled(etcd, set(engines)), 30.0)
    assert doc.plan is not None
    prefill = next(n for n, r in doc.plan.roles.items() if r == "prefill")
    decodes = [n for n, r in doc.plan.roles.items() if r == "decode"]
    for n in decodes:
        engines[n].send("gate closed")
    engines[prefill].send("load 30")
    began = None
    deadline = time.monotonic() + STEP_DEADLINE
    while began is None:  # whichever decode engine the leader flips
        for n in decodes:
            try:
                began = (n, engines[n].expect("switch-begin", 0.5, old="decode"))
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
    victim = began[0]
    engines[victim].proc.send_signal(signal.SIGKILL)
    engines[victim].proc.wait(10)
    alive = set(engines) - {victim}

    def consistent() -> GroupStatus | None:  # its lease (2 s) ends too: its record goes
        doc = settled(etcd, alive)
        return doc if doc is not None and victim not in {m.name for m in doc.members} else None

    doc = wait_for("a plan of the survivors, applied by both", consistent, 30.0)
    assert doc.plan is not None and sorted(doc.plan.roles.values()) == ["decode", "prefill"]


def test_sigterm_drains_the_engine_before_it_leaves(
    etcd: EtcdServer, start_engine: Callable[..., EngineProcess]
) -> None:
    e = start_engine("solo")
    wait_for("the engine on a plan", lambda: settled(etcd, {"solo"}), 30.0)
    e.send("submit 4")
    e.expect("accepted", 10.0, total=4)
    e.proc.send_signal(signal.SIGTERM)
    begin = e.expect("drain-begin", 10.0, why="SIGTERM")
    assert begin["running"] == 4
    end = e.expect("drain-end", 10.0)
    assert end["completed"] == 4
    done = e.expect("exit", 20.0)
    assert done["accepted"] == done["completed"] == 4
    assert e.proc.wait(10) == 0
    assert "solo" not in {m.name for m in status(etcd).members}  # left, not expired
