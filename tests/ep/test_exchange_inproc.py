"""The exchange's protocol with every rank's agent in this process (TCP between them): the
wire, the slots, routing, masking and epochs, before the OS-process tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from weft.ep import EpochMismatchError, EpPlan, Exchange, ExpertFn, serve, wire
from weft.fabric import gpu_available
from weft.fabric.agent import Agent
from weft.fabric.config import AgentConfig

SECRET = b"ep-test-secret-0123456789abcdef"
HIDDEN = 64


def scale(e: int, rows: np.ndarray) -> np.ndarray:
    return (rows * np.float16(1 + e % 4)).astype(np.float16)


def placement(ranks: list[str], experts: int) -> dict[int, list[str]]:
    """Expert e on ranks e and e+1 (mod world): two replicas each."""
    w = len(ranks)
    return {e: [ranks[e % w], ranks[(e + 1) % w]] for e in range(experts)}


@pytest.fixture
def ranks() -> Iterator[list[Exchange]]:
    names = [f"r{i}" for i in range(4)]
    agents = [Agent(n, AgentConfig(["tcp"], secret=SECRET)) for n in names]
    for a in agents:
        for b in agents:
            if a is not b:
                a.add_peer(b.metadata())
    plan = EpPlan.from_placement(1, placement(names, 8))
    ex = [Exchange(a, plan, scale, hidden=HIDDEN, max_tokens=512, deadline=0.5) for a in agents]
    yield ex
    for e in ex:
        e.close()
    for a in agents:
        a.close()


def test_combine_of_dispatch_returns_each_token_through_its_expert(ranks: list[Exchange]) -> None:
    rng = np.random.default_rng(1)
    results = {}

    def run(ex: Exchange) -> None:
        x = rng.standard_normal((300, HIDDEN)).astype(np.float16)
        ids = rng.integers(0, 8, 300)
        got = ex.step(x, ids)
        results[ex.agent.name] = (x, ids, got)

    threads = [threading.Thread(target=run, args=(ex,)) for ex in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4
    for x, ids, got in results.values():
        want = np.stack([scale(int(e), row[None])[0] for row, e in zip(x, ids, strict=True)])
        assert np.array_equal(got.out, want)
        assert not got.missing.any() and got.masked == ()


def test_a_rank_that_stops_answering_is_masked_and_its_tokens_go_to_replicas(ranks: list[Exchange]) -> None:
    dead = ranks[2]
    dead.agent.close()  # no more answers, nor transfers
    ex = ranks[0]
    x = np.ones((200, HIDDEN), dtype=np.float16)
    ids = np.arange(200) % 8
    got = ex.step(x, ids)
    assert "r2" in got.masked
    assert not got.missing.any()  # every expert has a replica off r2
    assert np.array_equal(got.out, np.stack([scale(int(e), x[:1])[0] for e in ids]))
    assert "r2" in ex.masked
    got = ex.step(x, ids)  # the next step of the epoch avoids r2 from the start
    assert got.masked == () and got.redispatched == 0


def test_tokens_whose_every_replica_is_gone_come_back_flagged(ranks: list[Exchange]) -> None:
    for i in (1, 2):
        ranks[i].agent.close()
    ex = ranks[0]
    ids = np.arange(8)
    got = ex.step(np.ones((8, HIDDEN), dtype=np.float16), ids)
    # experts 1 and 5 live on r1 and r2 only
    assert got.missing.tolist() == [e % 4 == 1 for e in range(8)]
    assert not got.out[got.missing].any()
    assert got.out[~got.missing].all()


def test_a_step_of_an_old_epoch_is_refused_typed(ranks: list[Exchange]) -> None:
    names = list(ranks[0].plan.ranks)
    newer = EpPlan.from_placement(2, placement(names, 8))
    for ex in ranks[1:]:
        ex.update_plan(newer)
    with pytest.raises(EpochMismatchError):
        ranks[0].step(np.ones((16, HIDDEN), dtype=np.float16), np.arange(16) % 8)
    assert sum(ex.refused for ex in ranks[1:]) > 0
    ranks[0].update_plan(newer)
    got = ranks[0].step(np.ones((16, HIDDEN), dtype=np.float16), np.arange(16) % 8)
    assert not got.missing.any()


def test_malformed_messages_are_refused_and_the_rank_keeps_serving(ranks: list[Exchange]) -> None:
    target = ranks[1]
    sender = ranks[0].agent
    for junk in (b"", b"WEPD", b"WEPD" + b"\x00" * 29, b"nonsense" * 10, b"WEPX\x01"):
        sender.send_notification("r1", junk)
    got = ranks[0].step(np.ones((32, HIDDEN), dtype=np.float16), np.arange(32) % 8)
    assert not got.missing.any() and got.masked == ()
    assert target.refused >= 4


def test_a_steady_batch_shape_is_prepared_once_and_posted_again(ranks: list[Exchange]) -> None:
    ex = ranks[0]
    x = np.ones((64, HIDDEN), dtype=np.float16)
    ids = np.arange(64) % 8
    ex.step(x, ids)
    laid_out = ex.prepares
    assert laid_out > 0
    for _ in range(3):
        assert not ex.step(x, ids).missing.any()
    assert ex.prepares == laid_out


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no usable GPU")
def test_cupy_activations_come_back_on_the_device(ranks: list[Exchange]) -> None:
    import cupy

    x = cupy.arange(32 * HIDDEN, dtype=cupy.float16).reshape(32, HIDDEN) % 7
    ids = np.arange(32) % 8
    got = ranks[0].step(x, ids)
    assert hasattr(got.out, "__cuda_array_interface__")
    want = np.stack([scale(int(e), row[None])[0] for row, e in zip(cupy.asnumpy(x), ids, strict=True)])
    assert np.array_equal(cupy.asnumpy(got.out), want)


def _slow_on(rank: str, seconds: float) -> ExpertFn:
    def fn(e: int, rows: np.ndarray) -> np.ndarray:
        if threading.current_thread().name.endswith(rank):
            time.sleep(seconds)
        return scale(e, rows)

    return fn


def test_a_slow_rank_is_a_straggler_not_masked(ranks: list[Exchange]) -> None:
    slow = ranks[1]
    slow._server.expert_fn = _slow_on("r1", 0.8)  # past the 0.5 s deadline, but it acknowledges
    ex = ranks[0]
    x = np.ones((64, HIDDEN), dtype=np.float16)
    ids = np.arange(64) % 8
    got = ex.step(x, ids)
    assert got.stragglers == ("r1",) and got.masked == () and ex.masked == frozenset()
    assert not got.missing.any() and got.redispatched > 0
    assert np.array_equal(got.out, np.stack([scale(int(e), x[:1])[0] for e in ids]))


def test_a_rank_masked_by_the_caller_is_avoided_at_once(ranks: list[Exchange]) -> None:
    ex = ranks[0]
    ex.mask("r2")
    served = ranks[2].served
    got = ex.step(np.ones((64, HIDDEN), dtype=np.float16), np.arange(64) % 8)
    assert not got.missing.any() and got.redispatched == 0
    assert ranks[2].served == served and ex.masked == frozenset({"r2"})


def test_a_rank_lost_by_the_fabric_is_masked_without_waiting_for_the_deadline(ranks: list[Exchange]) -> None:
    ex = ranks[0]
    ex.step(np.ones((8, HIDDEN), dtype=np.float16), np.arange(8))  # connections up
    ranks[2].agent.close()
    deadline = time.monotonic() + 5
    while "r2" not in ex.masked:  # the agent's peer-lost hook, before any step
        assert time.monotonic() < deadline, "r2 was not masked"
        time.sleep(0.01)
    started = time.monotonic()
    got = ex.step(np.ones((64, HIDDEN), dtype=np.float16), np.arange(64) % 8)
    assert not got.missing.any() and time.monotonic() - started < ex.deadline
    assert got.masked == ("r2",)  # lost between two steps: reported by the next one, once
    assert ex.step(np.ones((8, HIDDEN), dtype=np.float16), np.arange(8)).masked == ()


def test_results_overwritten_by_a_stale_write_are_sent_again_and_the_rank_stays_unmasked(
    ranks: list[Exchange],
) -> None:
    ex = ranks[0]
    deliver = ex._box.deliver
    spoiled: list[str] = []

    def stale_first(peer: str, msg: bytes) -> None:
        """Before r1's first results are filed, a late WRITE of an older step lands on them."""
        if msg[:4] == wire.RESULT and peer == "r1" and not spoiled:
            slot = ex.plan.ranks.index("r1")
            stale = np.frombuffer(wire.SlotHeader(ex.epoch, 0, slot, 1, 0).encode(), dtype=np.uint8)
            ex._slots.results.buffer[slot * ex.slot_bytes : slot * ex.slot_bytes + len(stale)] = stale
            spoiled.append(peer)
        deliver(peer, msg)

    ex._box.deliver = stale_first  # type: ignore[method-assign]
    x = np.ones((64, HIDDEN), dtype=np.float16)
    ids = np.arange(64) % 8
    got = ex.step(x, ids)
    assert spoiled == ["r1"] and got.redispatched > 0
    assert not got.missing.any() and got.masked == () and ex.masked == frozenset()
    assert np.array_equal(got.out, np.stack([scale(int(e), x[:1])[0] for e in ids]))


def test_a_batch_a_live_rank_refuses_as_malformed_is_sent_again(ranks: list[Exchange]) -> None:
    server = ranks[1]._server
    check = server.check
    refused: list[int] = []

    def refuse_once(b: serve.Batch) -> tuple[wire.Reject, str] | None:
        if not refused:  # as if a torn slot: the rank is alive, the batch is not usable
            refused.append(b.step)
            return (wire.Reject.MALFORMED, "the slot does not match the notification")
        return check(b)

    server.check = refuse_once  # type: ignore[method-assign]
    x = np.ones((64, HIDDEN), dtype=np.float16)
    ids = np.arange(64) % 8
    got = ranks[0].step(x, ids)
    assert refused == [1] and got.redispatched > 0
    assert not got.missing.any() and got.masked == ()
    assert np.array_equal(got.out, np.stack([scale(int(e), x[:1])[0] for e in ids]))


def test_a_rank_membership_removes_from_the_agent_is_masked_at_once(ranks: list[Exchange]) -> None:
    ex = ranks[0]
    ex.step(np.ones((8, HIDDEN), dtype=np.float16), np.arange(8))  # connections up
    ex.agent.remove_peer("r2")  # what membership does with a member it lost
    started = time.monotonic()
    got = ex.step(np.ones((64, HIDDEN), dtype=np.float16), np.arange(64) % 8)
    assert time.monotonic() - started < ex.deadline  # no deadline waited for
    assert got.masked == ("r2",) and not got.missing.any() and got.stragglers == ()
