"""weft.nixl between two OS processes: a multi-region READ and a WRITE with its notification
checked on the far side, and a remote killed mid-READ makes the handle "ERR" fast."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

from weft.nixl import _api

pytestmark = pytest.mark.integration

REGION = 128 << 20


def _child(conn: Connection, name: str, size: int, backends: list[str]) -> None:
    agent = _api.nixl_agent(name, _api.nixl_agent_config(backends=backends))
    regions = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8) for i in range(2)]
    agent.register_memory([(r.ctypes.data, size, 0, "") for r in regions], "DRAM")
    conn.send((agent.get_agent_metadata(), [int(r.ctypes.data) for r in regions]))
    while True:
        cmd, *args = conn.recv()
        if cmd == "digest":
            i, off, n = args
            conn.send(hashlib.blake2b(regions[i][off : off + n].tobytes()).hexdigest())
        elif cmd == "notifs":
            deadline = time.monotonic() + 10
            got: dict[str, list[bytes]] = {}
            while not got and time.monotonic() < deadline:
                got = agent.get_new_notifs()
                time.sleep(0.001)
            conn.send(got)
        elif cmd == "add":
            conn.send(agent.add_remote_agent(args[0]))
        elif cmd == "quit":
            agent.close()
            conn.send("bye")
            return


class Remote:
    def __init__(self, name: str, size: int, backends: list[str]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child, name, size, backends), daemon=True)
        self.proc.start()
        child.close()
        assert self.conn.poll(60), "remote did not start"
        self.metadata, self.addrs = self.conn.recv()

    def call(self, *msg: Any) -> Any:
        self.conn.send(msg)
        assert self.conn.poll(30)
        return self.conn.recv()

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, EOFError, AssertionError):
                self.call("quit")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@pytest.fixture
def local() -> Any:
    agents: list[_api.nixl_agent] = []

    def make(name: str, backends: list[str]) -> _api.nixl_agent:
        a = _api.nixl_agent(name, _api.nixl_agent_config(backends=backends))
        agents.append(a)
        return a

    yield make
    for a in agents:
        a.close()


def _state(agent: _api.nixl_agent, h: Any, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while (s := agent.check_xfer_state(h)) == "PROC" and time.monotonic() < deadline:
        time.sleep(0.0005)
    return s


@pytest.mark.parametrize("backends", [["UCX"], ["tcp"]])
def test_read_two_regions_and_write_with_notification(local: Any, backends: list[str]) -> None:
    size = 1 << 20
    remote = Remote("p-remote", size, backends)
    try:
        a = local("p-local", backends)
        dst = np.zeros(2 * size, np.uint8)
        a.register_memory([(dst.ctypes.data, 2 * size, 0, "")], "DRAM")
        name = a.add_remote_agent(remote.metadata)
        assert remote.call("add", a.get_agent_metadata()) == b"p-local"
        half = size // 2
        rdescs = [(remote.addrs[1], half, 0), (remote.addrs[0] + half, half, 0), (remote.addrs[0], half, 0)]
        ldescs = [(dst.ctypes.data + i * half, half, 0) for i in range(3)]
        lh = a.prep_xfer_dlist("", ldescs, "DRAM")
        rh = a.prep_xfer_dlist(name, rdescs, "DRAM")
        h = a.make_prepped_xfer("READ", lh, [0, 1, 2], rh, np.arange(3), b"read-done")
        a.transfer(h)
        assert _state(a, h) == "DONE"
        digest = hashlib.blake2b
        assert digest(dst[:half].tobytes()).hexdigest() == remote.call("digest", 1, 0, half)
        assert digest(dst[half : 2 * half].tobytes()).hexdigest() == remote.call("digest", 0, half, half)
        assert digest(dst[2 * half : 3 * half].tobytes()).hexdigest() == remote.call("digest", 0, 0, half)
        assert remote.call("notifs") == {"p-local": [b"read-done"]}
        # WRITE back into both remote regions (two weft parts, one notification after both)
        dst[:] = 9
        w = a.make_prepped_xfer("WRITE", lh, [0, 1], rh, [0, 1], b"write-done")
        a.transfer(w)
        assert _state(a, w) == "DONE"
        assert remote.call("notifs") == {"p-local": [b"write-done"]}
        nines = digest(np.full(half, 9, np.uint8).tobytes()).hexdigest()
        assert remote.call("digest", 1, 0, half) == nines
        assert remote.call("digest", 0, half, half) == nines
    finally:
        remote.close()


def test_remote_killed_mid_read_reads_err_fast(local: Any) -> None:
    remote = Remote("k-remote", REGION, ["tcp"])
    try:
        a = local("k-local", ["tcp"])
        dst = np.zeros(2 * REGION, np.uint8)
        a.register_memory([(dst.ctypes.data, 2 * REGION, 0, "")], "DRAM")
        name = a.add_remote_agent(remote.metadata)
        lh = a.prep_xfer_dlist(
            "", [(dst.ctypes.data, REGION, 0), (dst.ctypes.data + REGION, REGION, 0)], "DRAM"
        )
        rh = a.prep_xfer_dlist(name, [(remote.addrs[0], REGION, 0), (remote.addrs[1], REGION, 0)], "DRAM")
        h = a.make_prepped_xfer("READ", lh, [0, 1], rh, [0, 1])
        assert a.transfer(h) == "PROC"
        os.kill(remote.proc.pid, signal.SIGKILL)
        remote.proc.join(10)
        observed = time.monotonic()
        assert not remote.proc.is_alive()
        worst = 0.0
        state = "PROC"
        while state == "PROC" and time.monotonic() - observed < 5:
            t0 = time.perf_counter()
            state = a.check_xfer_state(h)
            worst = max(worst, time.perf_counter() - t0)
        elapsed = time.monotonic() - observed
        if state == "DONE":
            pytest.fail("the READ finished before the kill landed; make REGION larger")
        assert state == "ERR"
        assert elapsed <= 0.1, f"ERR {elapsed * 1e3:.1f} ms after the death was observed"
        assert worst < 0.01  # check_xfer_state never blocks
        assert not a.check_remote_metadata(name)
    finally:
        remote.close()
