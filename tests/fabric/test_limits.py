"""The agent's bounds against strangers and greedy peers, on real listeners and streams.

The accept loop rides out a process out of file descriptors (a target in its own process with
a lowered RLIMIT_NOFILE) and out of threads, says so in `Agent.health()` meanwhile, and serves
a legitimate peer once the cause is gone; silent strangers are bounded; staging for device
copies comes from a bounded budget and streams through one chunk; a full notification inbox
refuses a notification with `InboxFullError` instead of wedging the stream.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import SECRET
from weft import Agent, MemoryKind, PeerLostError
from weft.fabric import _cuda, connection, errors, limits, regions

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 20.0


def _until(check: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _pair(make_agent: Any, **target_config: Any) -> tuple[Agent, Agent, Any, Any]:
    """A target (its region "kv" of 64 KiB) and an initiator that knows it; both tcp only."""
    target = make_agent("target", "tcp", secret=SECRET, **target_config)
    initiator = make_agent("init", "tcp", secret=SECRET, max_descriptors=64)
    kv = target.alloc(1 << 16, "kv")
    mine = initiator.alloc(1 << 16)
    initiator.add_peer(target.metadata())
    return target, initiator, kv, mine


def _write(initiator: Agent, mine: Any, n: int, notify: bytes | None = None, fill: int = 7) -> None:
    mine.buffer[:n] = fill
    remote = initiator.remote("target", "kv")
    initiator.write(mine.descs([(0, n)]), "target", remote.descs([(0, n)]), notify).wait(10.0)


# -- running out of descriptors ---------------------------------------------------------------
class LimitProc:
    """The target of `tests.fabric.limitproc`, spoken to over its stdin and stdout."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fabric.limitproc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        hello = self._line()
        self.port = int(hello["port"])
        self.metadata = bytes.fromhex(hello["metadata"])
        self.log = ""

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the target process ended"
        return dict(json.loads(line))

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> str:
        """Stop the process (once); returns its log."""
        if self.proc.returncode is None:
            try:
                _, err = self.proc.communicate("quit\n", timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, err = self.proc.communicate(timeout=DEADLINE)
            self.log = str(err)
        return self.log


@pytest.fixture
def limitproc() -> Iterator[LimitProc]:
    proc = LimitProc()
    yield proc
    proc.close()


def _strangers(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(n)]


def test_accept_loop_survives_running_out_of_descriptors(make_agent, limitproc):  # type: ignore[no-untyped-def]
    initiator = make_agent("init", "tcp", secret=SECRET)
    mine = initiator.alloc(4096)
    initiator.add_peer(limitproc.metadata)
    _write(initiator, mine, 16, fill=1)  # warm: every module the serving path needs is loaded
    initiator.remove_peer("target")
    assert limitproc.ask("state")["health"] == []

    limitproc.ask("limit 4")
    strangers = _strangers(limitproc.port, 24)  # the kernel queues them; the target runs dry
    state = _until(
        lambda: (s := limitproc.ask("state"))["health"] and s,
        "the target to report that it cannot accept",
    )
    assert "data port cannot accept connections" in state["health"][0]
    assert "Too many open files" in state["health"][0]
    assert state["limits"]["accept_failures"] >= 1

    for sock in strangers:  # the cause goes: the target's descriptors come back
        sock.close()
    _until(lambda: limitproc.ask("state")["health"] == [], "the target to recover")
    initiator.add_peer(limitproc.metadata)
    _write(initiator, mine, 16, fill=9)  # still under the lowered limit
    assert limitproc.ask("state")["kv"] == "09" * 16

    log = limitproc.close()
    assert log.count("data port cannot accept connections") == 1, log
    assert log.count("data port accepts connections again") == 1, log


# -- running out of threads --------------------------------------------------------------------
def test_accept_loop_survives_failing_thread_starts(make_agent, monkeypatch, caplog):  # type: ignore[no-untyped-def]
    target, initiator, kv, mine = _pair(make_agent)
    starve = threading.Event()
    starve.set()
    real_start = connection.Inbound.start

    def start(self: connection.Inbound) -> None:
        if starve.is_set():
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(connection.Inbound, "start", start)
    strangers = _strangers(target.port, 3)
    reasons = _until(target.health, "the target to report that it cannot accept")
    assert reasons[0].startswith("data port cannot accept connections: can't start new thread (since ")
    _until(lambda: target.limits_hit().accept_failures >= 3, "every failed start to be counted")

    starve.clear()
    _until(lambda: target.health() == (), "the target to recover")
    _write(initiator, mine, 100, fill=5)
    assert bytes(kv.buffer[:100]) == b"\x05" * 100
    episode = [r.getMessage() for r in caplog.records if "accept connections" in r.getMessage()]
    assert len(episode) == 1 and "can't start new thread" in episode[0], episode
    assert len([r for r in caplog.records if "accepts connections again" in r.getMessage()]) == 1
    for sock in strangers:
        sock.close()


# -- strangers ---------------------------------------------------------------------------------
def _closed_at_once(sock: socket.socket) -> bool:
    """True when the agent closed the connection before saying anything (no HELLO)."""
    sock.settimeout(DEADLINE)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _connections(agent: Agent, n: int) -> Callable[[], bool]:
    return lambda: len(agent._listener.connections()) == n


def test_unauthenticated_connections_are_bounded(make_agent):  # type: ignore[no-untyped-def]
    target, initiator, kv, mine = _pair(make_agent, max_unauthenticated=4, handshake_timeout=60.0)
    strangers = []
    for n in range(1, 5):  # one by one: each is surely accepted before the next arrives
        strangers.extend(_strangers(target.port, 1))
        _until(_connections(target, n), "the accept")
    more = _strangers(target.port, 12)
    assert all(_closed_at_once(sock) for sock in more)
    assert target.limits_hit().unauthenticated == 12
    assert all(sock.recv(1) for sock in strangers)  # the first four got their HELLO
    assert target.health() == ()

    for sock in [*strangers, *more]:
        sock.close()
    _until(lambda: not target._listener.connections(), "the strangers' connections to go")
    _write(initiator, mine, 64, fill=3)
    assert bytes(kv.buffer[:64]) == b"\x03" * 64


def test_requests_over_max_descriptors_are_dropped_and_counted(make_agent):  # type: ignore[no-untyped-def]
    target, initiator, _kv, mine = _pair(make_agent, max_descriptors=4)
    remote = initiator.remote("target", "kv")
    pairs = [(i * 8, 8) for i in range(5)]
    with pytest.raises(PeerLostError):
        initiator.write(mine.descs(pairs), "target", remote.descs(pairs)).wait(10.0)
    assert target.limits_hit().descriptors == 1


# -- staging for device copies -----------------------------------------------------------------
def test_staging_budget_is_shared_and_waits_with_a_deadline() -> None:
    staging = limits.Staging(100)
    first = staging.acquire(80, timeout=1.0)
    assert first is not None and len(first) == 80
    assert staging.acquire(50, timeout=0.05) is None
    got: list[bytearray | None] = []
    waiter = threading.Thread(target=lambda: got.append(staging.acquire(50, timeout=DEADLINE)))
    waiter.start()
    staging.release(len(first))
    waiter.join(DEADLINE)
    assert got and got[0] is not None and len(got[0]) == 50
    assert staging.held == 50
    assert len(limits.Staging(1 << 40).acquire(1 << 40, 1.0) or b"") == limits.STAGING_CHUNK


def _as_device(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve `agent`'s host regions as if they were device memory: no views, explicit copies.

    The inbound path then stages every byte, as it does for VRAM, without needing a GPU.
    """
    host = agent.backend_host
    real_resolve = host.resolve

    def resolve(table: Any, write: bool) -> regions.Resolved:
        found = real_resolve(table, write)
        if found.spans is None:
            return found
        return found._replace(spans=[span._replace(view=None) for span in found.spans])

    def to_device(src: memoryview, region: Any, offset: int) -> None:
        np.asarray(region.keepalive)[offset : offset + len(src)] = np.frombuffer(src, np.uint8)

    def to_host(region: Any, offset: int, dst: memoryview) -> None:
        np.frombuffer(dst, np.uint8)[:] = np.asarray(region.keepalive)[offset : offset + len(dst)]

    monkeypatch.setattr(host, "resolve", resolve)
    monkeypatch.setattr(host, "host_to_device", to_device)
    monkeypatch.setattr(host, "device_to_host", to_host)


def test_device_spans_stream_through_bounded_staging(make_agent, monkeypatch):  # type: ignore[no-untyped-def]
    target, initiator, kv, mine = _pair(make_agent, max_staging_bytes=4096, staging_timeout=0.2)
    _as_device(target, monkeypatch)
    remote = initiator.remote("target", "kv")
    data = np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8)
    mine.buffer[:] = data
    pairs = [(0, 10000), (20000, 30000), (50000, 15536)]
    initiator.write(mine.descs(pairs), "target", remote.descs(pairs)).wait(10.0)
    for off, n in pairs:
        assert bytes(kv.buffer[off : off + n]) == bytes(data[off : off + n])
    mine.buffer[:] = 0
    initiator.read(mine.descs(pairs), "target", remote.descs(pairs)).wait(10.0)
    for off, n in pairs:
        assert bytes(mine.buffer[off : off + n]) == bytes(data[off : off + n])
    _until(lambda: target.backend_host.staging.held == 0, "the staging to be given back")

    held = target.backend_host.staging.acquire(4096, 1.0)  # the budget is taken
    assert held is not None
    for op in (initiator.write, initiator.read):
        with pytest.raises(errors.LimitError, match="no staging memory"):
            op(mine.descs([(0, 100)]), "target", remote.descs([(0, 100)])).wait(10.0)
    assert target.limits_hit().staging == 2
    target.backend_host.staging.release(len(held))
    _write(initiator, mine, 100, fill=4)  # the same stream serves on
    assert bytes(kv.buffer[:100]) == b"\x04" * 100


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda.gpu_available(), reason="no usable GPU")
def test_vram_write_and_read_stream_through_bounded_staging(make_agent):  # type: ignore[no-untyped-def]
    target = make_agent("target", "tcp", secret=SECRET, max_staging_bytes=1 << 20)
    initiator = make_agent("init", "tcp", secret=SECRET)
    n = 8 << 20
    target.alloc(n, "vram", kind=MemoryKind.VRAM)
    mine = initiator.alloc(n)
    initiator.add_peer(target.metadata())
    remote = initiator.remote("target", "vram")
    data = np.random.default_rng(2).integers(0, 256, n, dtype=np.uint8)
    mine.buffer[:] = data
    initiator.write(mine.descs(), "target", remote.descs()).wait(30.0)
    mine.buffer[:] = 0
    initiator.read(mine.descs(), "target", remote.descs()).wait(30.0)
    assert bytes(mine.buffer) == bytes(data)
    _until(lambda: target.backend_host.staging.held == 0, "the staging to be given back")


# -- the notification inbox --------------------------------------------------------------------
def test_full_inbox_refuses_notifications_typed_and_recovers(make_agent):  # type: ignore[no-untyped-def]
    target, initiator, kv, mine = _pair(
        make_agent,
        max_notification_bytes=512,
        max_pending_notification_bytes=1024,
        inbox_full_timeout=0.2,
    )
    _write(initiator, mine, 10, b"a" * 400)
    assert target.health() == ()  # room for one of max_notification_bytes
    _write(initiator, mine, 10, b"b" * 400)
    full = ("notification inbox full: 2 notifications / 800 B",)
    assert target.health() == full  # no room for one of max_notification_bytes
    with pytest.raises(errors.InboxFullError, match="bytes are in place"):
        _write(initiator, mine, 10, b"c" * 400, fill=6)
    assert bytes(kv.buffer[:10]) == b"\x06" * 10  # the WRITE landed all the same
    remote = initiator.remote("target", "kv")
    with pytest.raises(errors.InboxFullError, match="nothing was sent"):
        initiator.read(mine.descs([(0, 10)]), "target", remote.descs([(0, 10)]), b"d" * 400).wait(10.0)
    assert target.health() == full
    assert target.limits_hit().inbox_full == 2
    _write(initiator, mine, 10, fill=8)  # the stream serves on

    assert target.get_notifications() == {"init": [b"a" * 400, b"b" * 400]}
    assert target.health() == ()
    _write(initiator, mine, 10, b"e" * 400)
    assert target.wait_notification("init", timeout=DEADLINE) == b"e" * 400


def test_full_inbox_by_count(make_agent):  # type: ignore[no-untyped-def]
    target, initiator, _kv, mine = _pair(make_agent, max_pending_notifications=2, inbox_full_timeout=0.2)
    _write(initiator, mine, 1, b"1")
    _write(initiator, mine, 1, b"2")
    assert target.health() and target.health()[0].startswith("notification inbox full: 2 notifications")
    with pytest.raises(errors.InboxFullError):
        _write(initiator, mine, 1, b"3")
    assert target.take_notification(timeout=DEADLINE).message == b"1"
    assert target.health() == ()
    _write(initiator, mine, 1, b"3")
    assert target.get_notifications() == {"init": [b"2", b"3"]}
