"""The backend interface: a backend written only against `weft.fabric.backend` moves bytes.

`CopyBackend` below is what a new backend looks like: it implements `DataPath`, asks the
agent for what it needs through `BackendHost` (its own region, the target's descriptor
checks, notification delivery) and ends each transfer with `Transfer.complete`. Its
"network" is a dict of the backends in this process, found by the endpoint each publishes
in its agent's metadata.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import SECRET
from weft import Agent, AgentConfig, Backend, MemoryKind, Op, PeerLostError, TransferState
from weft.fabric import backends, errors, wire
from weft.fabric.backend import BackendHost
from weft.fabric.memory import DescList
from weft.fabric.peers import Peer
from weft.fabric.transfer import Transfer

_NETWORK: dict[str, CopyBackend] = {}


@dataclass(frozen=True)
class CopyPlan:
    op: Op
    peer: Peer
    views: tuple[memoryview, ...]  # the local bytes, one view per descriptor
    table: Any  # the remote descriptors, as the target checks them


class CopyBackend:
    """Copies between agents of one process; only public names of the fabric."""

    kind = Backend.LOCAL  # registered in place of the built-in same-host backend below

    def __init__(self, host: BackendHost) -> None:
        self.host = host
        self.address = f"copy://{host.name}/{id(self)}"
        self.completions: list[tuple[bool, bool]] = []  # (first call took effect, second did)
        _NETWORK[self.address] = self

    def usable(self, peer: Peer, local: MemoryKind, remote: MemoryKind) -> bool:
        both_host = local is MemoryKind.DRAM and remote is MemoryKind.DRAM
        return both_host and peer.md.endpoints.get(self.kind) in _NETWORK

    def plan(self, op: Op, local: DescList, peer: Peer, remote: DescList) -> CopyPlan:
        region = self.host.local_region(local)
        views = tuple(region.view[o : o + n] for o, n in local.pairs())
        table = wire.parse_desc_table(wire.desc_table(remote.region_id, remote.offsets, remote.lengths))
        return CopyPlan(op, peer, views, table)

    def post(self, plan: CopyPlan, transfer: Transfer, notify: bytes | None) -> None:
        target = _NETWORK[plan.peer.md.endpoints[self.kind]]
        spans, code, message = target.host.resolve(plan.table, write=plan.op is Op.WRITE)
        if spans is None:
            transfer.complete(errors.error_from_code(code, message))
            return
        for mine, span in zip(plan.views, spans, strict=True):
            assert span.view is not None
            if plan.op is Op.WRITE:
                span.view[:] = mine
            else:
                mine[:] = span.view
        if notify is not None:
            target.host.deliver(self.host.name, notify)
        first = transfer.complete()
        second = transfer.complete(PeerLostError("a late failure after the transfer ended"))
        self.completions.append((first, second))

    def endpoint(self) -> str | None:
        return self.address

    def close(self) -> None:
        _NETWORK.pop(self.address, None)


def test_copy_backend_is_a_factory_of_data_paths() -> None:
    factory: backends.Factory = CopyBackend  # mypy checks CopyBackend against DataPath here
    assert factory is CopyBackend


@pytest.fixture
def pair(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(backends, "_FACTORIES", dict(backends._FACTORIES))  # registration undone after
    backends.register_backend(Backend.LOCAL, lambda: CopyBackend)
    made = [Agent(n, AgentConfig([Backend.LOCAL], listen_host="127.0.0.1", secret=SECRET)) for n in "ab"]
    yield made
    for agent in made:
        agent.close()


def test_a_registered_backend_moves_bytes_between_real_agents(pair: list[Agent]) -> None:
    a, b = pair
    assert a.backends == [Backend.LOCAL]
    kv = np.zeros(1 << 16, np.uint8)
    b.register(kv, "kv")
    a.add_peer(b.metadata())
    remote = a.remote("b", "kv")
    src = a.register(np.arange(1 << 16, dtype=np.uint64).astype(np.uint8))
    pairs = [(0, 4096), (8192, 4096), (60000, 5536)]

    t = a.write(src.descs(pairs), "b", remote.descs(pairs), notify=b"written").wait(timeout=10)
    assert t.state is TransferState.DONE and t.backend is Backend.LOCAL
    assert b.wait_notification("a", b"written", 10) == b"written"
    for off, n in pairs:
        assert np.array_equal(kv[off : off + n], src.buffer[off : off + n])
    assert not kv[4096:8192].any()

    kv[:] = 7
    back = a.alloc(1 << 16)
    a.read(back.descs([(0, 4096)]), "b", remote.descs([(0, 4096)])).wait(timeout=10)
    assert (back.buffer[:4096] == 7).all() and not back.buffer[4096:].any()
    assert a.stats()["transfers"] == 2 and a.stats()["errors"] == 0


def test_completing_a_transfer_twice_has_no_second_effect(pair: list[Agent]) -> None:
    a, b = pair
    b.register(np.zeros(4096, np.uint8), "kv")
    a.add_peer(b.metadata())
    src = a.register(np.ones(4096, np.uint8))
    t = a.write(src.descs(), "b", a.remote("b", "kv").descs()).wait(timeout=10)
    backend = next(p for p in _NETWORK.values() if p.host.name == "a")
    assert backend.completions == [(True, False)]
    assert t.state is TransferState.DONE and t.error is None  # the late failure changed nothing
    assert a.stats()["errors"] == 0


def test_complete_runs_callbacks_once_and_keeps_the_first_outcome() -> None:
    t = Transfer(Op.WRITE, "b", 10, 30.0, Backend.TCP)
    ran: list[int] = []
    cancelled: list[int] = []
    t.on_done(lambda: ran.append(1))
    t.on_cancel(lambda: cancelled.append(1))
    assert t.complete() is True
    done_at = t.t_done
    assert t.complete(PeerLostError("late")) is False
    assert t.complete() is False
    t.release()  # ended already: no cancellation either
    assert ran == [1] and cancelled == []
    assert t.state is TransferState.DONE and t.error is None and t.t_done == done_at
    t.on_done(lambda: ran.append(2))  # registered after the end: runs at once, once
    assert ran == [1, 2]


def test_a_refused_request_ends_with_the_target_error(pair: list[Agent]) -> None:
    a, b = pair
    reg = b.register(np.zeros(4096, np.uint8), "kv")
    a.add_peer(b.metadata())
    remote = a.remote("b", "kv")
    src = a.register(np.ones(4096, np.uint8))
    prepared = a.prepare(Op.WRITE, src.descs(), "b", remote.descs())
    reg.release()  # the target forgets the region after the request was laid out
    with pytest.raises(errors.UnknownRegionError):
        prepared.post().wait(timeout=10)


def test_backends_use_no_private_agent_name() -> None:
    fabric = Path(__file__).parents[2] / "weft" / "fabric"
    private = re.compile(r"\bagent\._[a-z]|\._agent\._[a-z]|\btransfer\._[a-z]")
    offenders = [
        f"{path.relative_to(fabric)}:{n}"
        for path in sorted(fabric.rglob("*.py"))
        if path.name != "agent.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert offenders == []
