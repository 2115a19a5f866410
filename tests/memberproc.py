"""A group member (fabric agent + membership) in its own OS process, driven over a Pipe.

Chaos tests need members that can really die: SIGKILL closes their sockets as a crash does,
SIGSTOP freezes every thread (the lease keep-alive included) the way a long GC pause or a
frozen VM does, and SIGTERM must drain and leave as the daemon does. So each member runs in a
spawned child: its `Membership` and fabric `Agent` live in an asyncio loop on a background
thread, and the child's main thread answers the test's commands.

Every answer the parent waits for has a deadline, and commands carry a sequence number, so a
late answer to a command that timed out is never taken for the answer to the next one. Data
path failures come back as outcome strings (``"ok"`` or ``"ClassName: message"``), never as
exceptions; a command that fails for another reason (a bug in the test) raises `RuntimeError`
in the parent with the child's traceback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable
from multiprocessing.connection import Connection
from typing import Any, TypeVar, cast

import numpy as np

from tests import signals
from tests.peerproc import digest, pattern

T = TypeVar("T")

START_TIMEOUT = 60.0
"""Spawning imports numpy, pydantic and grpc: seconds on a loaded 2-core machine."""
CALL_TIMEOUT = 30.0
WRITE_TIMEOUT = 10.0

Outcome = str
"""``"ok"``, ``"skipped"`` (write_many: the peer was not active in the writer's view), or
``"ClassName: message"`` of the `WeftError` the write raised."""


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; return that. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not reached within {timeout} s: {what}")
        time.sleep(interval)


# -- the child ---------------------------------------------------------------------------------


class _WarningLog(logging.Handler):
    """Keeps weft's warnings (and worse) so the test can count them through `view()`."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[tuple[str, str, str]] = collections.deque(maxlen=2000)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.records.append((record.name, record.levelname, record.getMessage()))


class _Child:
    """What runs in the child process: the loop thread and the command server."""

    def __init__(self, conn: Connection, name: str, endpoint: str, group: str, lease_ttl: float) -> None:
        self.conn = conn
        self.name = name
        self.endpoint = endpoint
        self.group = group
        self.lease_ttl = lease_ttl
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="member-loop", daemon=True)
        self.arrays: dict[str, np.ndarray] = {}
        self.regs: dict[str, Any] = {}
        self.sources: dict[tuple[int, int], Any] = {}
        self.remembered: dict[tuple[str, str], Any] = {}
        self.exit = threading.Event()
        self.terminating = False
        self.warnings = _WarningLog()
        self.agent: Any = None
        self.membership: Any = None
        self.ep: Any = None

    # -- set-up ------------------------------------------------------------------------------
    def on_loop(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _join(self) -> None:
        from tests.conftest import SECRET
        from weft import Agent, AgentConfig
        from weft.api.settings import EtcdSettings, GroupRef
        from weft.membership.member import MemberConfig, Membership

        self.agent = Agent(self.name, AgentConfig(["local", "tcp"], secret=SECRET))
        config = MemberConfig(self.name, GroupRef(group=self.group), SECRET, lease_ttl=self.lease_ttl)
        self.membership = Membership(EtcdSettings(endpoints=[self.endpoint]), config, self.agent)
        await self.membership.start()
        await self.membership.activate()
        me = self.name
        m = self.membership
        # as the daemon does: joined once its own active record came back through the watch
        await m.wait_for(lambda: me in m.members and m.members[me].record.state == "active", 10.0)

    def run(self) -> None:
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format=f"%(asctime)s [{self.name} %(process)d] %(name)s %(levelname)s: %(message)s",
        )
        logging.getLogger("weft").addHandler(self.warnings)
        self.thread.start()
        try:
            self.on_loop(self._join(), START_TIMEOUT)
        except BaseException as exc:
            self.conn.send((0, "error", f"join failed: {exc!r}\n{traceback.format_exc()}"))
            raise
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.conn.send((0, "ok", {"pid": os.getpid(), "generation": self.membership.generation}))
        try:
            self.serve()
        finally:
            self.shutdown()

    def _on_sigterm(self, signum: int, frame: object) -> None:
        # like the daemon: SIGTERM drains and leaves, then the process exits 0
        if not self.terminating:
            self.terminating = True
            self.loop.call_soon_threadsafe(self._start_leaving)

    def _start_leaving(self) -> None:
        async def leave() -> None:
            try:
                await self.membership.leave()
            finally:
                self.exit.set()

        self.loop.create_task(leave())

    def serve(self) -> None:
        while not self.exit.is_set():
            if not self.conn.poll(0.05):
                continue
            try:
                seq, cmd, args = self.conn.recv()
            except EOFError:  # the parent went away
                return
            if cmd == "quit":
                self.on_loop(self.membership.close(), 10.0)
                self.conn.send((seq, "ok", None))
                return
            if cmd == "leave":
                self.on_loop(self.membership.leave(), 60.0)
                self.conn.send((seq, "ok", None))
                return
            try:
                result = getattr(self, f"cmd_{cmd}")(*args)
            except Exception as exc:
                self.conn.send((seq, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            else:
                self.conn.send((seq, "ok", result))

    def shutdown(self) -> None:
        if self.agent is not None:
            self.agent.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5.0)

    # -- commands ----------------------------------------------------------------------------
    async def _snapshot(self) -> dict[str, Any]:
        m, agent = self.membership, self.agent
        return {
            "name": self.name,
            "pid": os.getpid(),
            "generation": m.generation,
            "phase": m.phase.value,
            "state": m.state,
            "ready": m.ready,
            "fenced": agent.fenced,
            "etcd_reachable": m.etcd_reachable,
            "peers": m.peers(),
            "members": {n: mm.generation for n, mm in m.members.items()},
            "states": {n: mm.record.state for n, mm in m.members.items()},
            "leader": m.leader,
            "agent_peers": agent.peers(),
            "events": [(e.kind, e.name, e.generation, e.reason, e.at) for e in m.events],
            "ignored_records": m.counters["ignored_records"],
            "counters": dict(m.counters),
            "detections": list(m.detections),
            "warnings": list(self.warnings.records),
        }

    def cmd_view(self) -> dict[str, Any]:
        return self.on_loop(self._snapshot())

    def _register(self, rname: str, size: int, seed: int | None) -> None:
        arr = pattern(size, seed) if seed is not None else np.zeros(size, np.uint8)
        self.regs[rname] = self.agent.register(arr, name=rname)
        self.arrays[rname] = arr

    def cmd_register(self, rname: str, size: int, seed: int | None) -> None:
        self.cmd_register_many([(rname, size, seed)])

    def cmd_register_many(self, regions: list[tuple[str, int, int | None]]) -> None:
        for rname, size, seed in regions:
            self._register(rname, size, seed)
        self.on_loop(self.membership.republish())  # peers learn the regions through the record

    def _source(self, size: int, seed: int) -> Any:
        reg = self.sources.get((size, seed))
        if reg is None:
            reg = self.sources[(size, seed)] = self.agent.register(pattern(size, seed))
        return reg

    def _write_to(self, remote: Any, peer: str, size: int, seed: int) -> Outcome:
        from weft import WeftError

        try:
            src = self._source(size, seed)
            self.agent.write(src.descs([(0, size)]), peer, remote.descs([(0, size)])).wait(WRITE_TIMEOUT)
        except WeftError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ok"

    def _write(self, peer: str, region: str, size: int, seed: int) -> Outcome:
        from weft import WeftError

        try:
            remote = self.agent.remote(peer, region)
        except WeftError as exc:
            return f"{type(exc).__name__}: {exc}"
        return self._write_to(remote, peer, size, seed)

    def cmd_write(self, peer: str, region: str, size: int, seed: int) -> Outcome:
        return self._write(peer, region, size, seed)

    def _active(self, peer: str) -> bool:
        m = self.membership.members.get(peer)  # read across threads: one dict lookup
        return m is not None and m.record.state == "active"

    def cmd_write_many(
        self, peers: list[str], region: str, size: int, count: int, seed: int, pause: float
    ) -> list[tuple[str, Outcome, float]]:
        out = []
        for i in range(count):
            peer = peers[i % len(peers)]
            outcome = self._write(peer, region, size, seed) if self._active(peer) else "skipped"
            out.append((peer, outcome, time.time()))
            if pause:
                time.sleep(pause)  # pacing the stream, not waiting for anything
        return out

    def cmd_digest(self, rname: str) -> str:
        return digest(self.arrays[rname])

    def cmd_digests(self) -> dict[str, str]:
        return {rname: digest(arr) for rname, arr in self.arrays.items()}

    def cmd_remember(self, peer: str, region: str) -> int:
        rr = self.agent.remote(peer, region)
        self.remembered[(peer, region)] = rr
        return int(self.membership.members[peer].generation)

    def cmd_stale_write(self, peer: str, region: str) -> Outcome:
        rr = self.remembered[(peer, region)]
        return self._write_to(rr, peer, rr.size, 0)

    # -- expert parallelism (weft.ep) --------------------------------------------------------
    def _ep_plan(self) -> Any:
        """The group's plan from etcd (sealed `PlanRecord`), as an `EpPlan`."""
        from tests.conftest import SECRET
        from weft.api import records
        from weft.api.settings import EtcdSettings
        from weft.ep import EpPlan
        from weft.membership._etcd import Etcd

        async def read() -> Any:
            async with Etcd(EtcdSettings(endpoints=[self.endpoint])) as etcd:
                key = f"/weft/v1/default/{self.group}/plan"
                kv = await etcd.get(key.encode())
                assert kv is not None, "no plan in etcd"
                return records.unseal(records.PlanRecord, kv.value, key, SECRET)

        plan = self.on_loop(read())
        return EpPlan.from_placement(plan.epoch, plan.experts, plan.members)

    def cmd_ep_start(self, hidden: int, fn: str, max_tokens: int, deadline: float) -> int:
        """An `Exchange` on this member's agent, on the plan in etcd; returns its epoch."""
        from weft.ep import Exchange

        self.ep = Exchange(self.agent, self._ep_plan(), EXPERT_FNS[fn], hidden=hidden,
                           max_tokens=max_tokens, deadline=deadline)  # fmt: skip
        return int(self.ep.plan.epoch)

    def cmd_ep_reload(self) -> int:
        """Move to the plan now in etcd; returns its epoch."""
        self.ep.update_plan(self._ep_plan())
        return int(self.ep.plan.epoch)

    def cmd_ep_step(self, seed: int, tokens: int, fn: str, experts: int) -> dict[str, Any]:
        """One `combine(dispatch(x))` of seeded activations and routing, checked here against
        the expert function. Mismatches, flagged tokens and their experts come back."""
        from weft.ep import EpochMismatchError

        rng = np.random.default_rng(seed)
        x = rng.standard_normal((tokens, self.ep.hidden)).astype(np.float16)
        ids = rng.integers(0, experts, tokens)
        started = time.perf_counter()
        try:
            got = self.ep.step(x, ids)
        except EpochMismatchError as exc:
            return {"error": f"EpochMismatchError: {exc}", "seconds": time.perf_counter() - started}
        seconds = time.perf_counter() - started
        want = _apply(EXPERT_FNS[fn], ids, x)
        done = ~got.missing
        wrong = int((~np.all(got.out[done] == want[done], axis=1)).sum())
        return {
            "seconds": seconds,
            "wrong": wrong,
            "missing": int(got.missing.sum()),
            "missing_experts": sorted({int(e) for e in ids[got.missing]}),
            "masked": list(got.masked),
            "redispatched": got.redispatched,
            "served": self.ep.served,
            "refused": self.ep.refused,
        }

    def cmd_ep_junk(self, peer: str) -> None:
        """Malformed and stale messages at a peer's exchange."""
        import struct

        for junk in (b"", b"WEPD", b"WEPD" + b"\x00" * 29, b"junk" * 50, b"WEPR" + b"\xff" * 8,
                     struct.pack("<4sQQIIB", b"WEPD", 0, 1, 0, 10, 0),
                     struct.pack("<4sQQIIB", b"WEPD", 1 << 40, 1, 0, 10**9, 0)):  # fmt: skip
            self.agent.send_notification(peer, junk)


def _identity(e: int, rows: np.ndarray) -> np.ndarray:
    return rows


def _per_expert(e: int, rows: np.ndarray) -> np.ndarray:
    return (rows * np.float16(0.5 + (e % 7) * 0.25) + np.float16(e % 3)).astype(np.float16)


EXPERT_FNS = {"identity": _identity, "per-expert": _per_expert}


def _apply(fn: Any, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for e in np.unique(ids).tolist():
        out[ids == e] = fn(int(e), x[ids == e])
    return out


def _main(conn: Connection, name: str, endpoint: str, group: str, lease_ttl: float) -> None:
    _Child(conn, name, endpoint, group, lease_ttl).run()


# -- the parent's handle -----------------------------------------------------------------------


class MemberProcess:
    """Handle on a child process running one group member.

    Args:
        name: member (and agent) name.
        etcd_endpoint: ``http://host:port`` of etcd.
        group: the group name (a DNS label); the namespace is ``default``.
        lease_ttl: the member's lease TTL, seconds.
        wait: wait here until it has joined; False: call `wait_ready` later (start many at once).
    """

    def __init__(
        self, name: str, etcd_endpoint: str, group: str, *, lease_ttl: float = 2.0, wait: bool = True
    ) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.group = group
        self.pid = 0
        self.generation = 0
        self.stopped = False  # SIGSTOPped: calling it would only time out
        self._seq = 0
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_main,
            args=(child, name, etcd_endpoint, group, lease_ttl),
            name=f"member-{name}",
            daemon=True,
        )
        self.proc.start()
        child.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        info = self._answer(0, timeout)
        self.pid, self.generation = info["pid"], info["generation"]

    # -- commands ----------------------------------------------------------------------------
    def send(self, cmd: str, *args: Any) -> int:
        """Start a command; collect its answer with `result`. Returns its ticket."""
        if self.stopped:
            raise AssertionError(f"member {self.name} is SIGSTOPped: SIGCONT it before calling it")
        self._seq += 1
        self._conn.send((self._seq, cmd, args))
        return self._seq

    def result(self, ticket: int, timeout: float = CALL_TIMEOUT) -> Any:
        return self._answer(ticket, timeout)

    def call(self, cmd: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return self.result(self.send(cmd, *args), timeout)

    def _answer(self, ticket: int, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._conn.poll(left):
                raise TimeoutError(f"member {self.name} did not answer within {timeout} s")
            try:
                seq, status, payload = self._conn.recv()
            except (EOFError, OSError):
                self.proc.join(1.0)
                raise RuntimeError(f"member {self.name} exited (exit code {self.proc.exitcode})") from None
            if seq < ticket:
                continue  # the late answer to a command that timed out
            if status != "ok":
                raise RuntimeError(f"member {self.name}: {payload}")
            return payload

    def view(self) -> dict[str, Any]:
        """Its view: name, generation, phase, state, ready, fenced, etcd_reachable, peers
        (active ones), members {name: generation}, states, leader, agent_peers, events
        [(kind, name, generation, reason, at)], ignored_records, counters, detections,
        warnings [(logger, level, message)]."""
        return cast(dict[str, Any], self.call("view"))

    def register(self, region: str, size: int, seed: int | None) -> None:
        """Register a uint8 region (seeded pattern; None: zeros) and republish the record."""
        self.call("register", region, size, seed)

    def register_many(self, regions: Iterable[tuple[str, int, int | None]]) -> None:
        self.call("register_many", list(regions))

    def write(self, peer: str, region: str, size: int, seed: int) -> Outcome:
        """WRITE `size` bytes of pattern(size, seed) to the start of the peer's region."""
        return cast(Outcome, self.call("write", peer, region, size, seed))

    def send_write_many(
        self, peers: list[str], region: str, size: int, count: int, *, seed: int = 0, pause: float = 0.0
    ) -> int:
        """Start `write_many` without waiting; collect with `result(ticket)`."""
        return self.send("write_many", peers, region, size, count, seed, pause)

    def write_many(
        self,
        peers: list[str],
        region: str,
        size: int,
        count: int,
        *,
        seed: int = 0,
        pause: float = 0.0,
        timeout: float = CALL_TIMEOUT,
    ) -> list[tuple[str, Outcome, float]]:
        """`count` writes round-robin over `peers`, each only if the peer is active in this
        member's view (else ``"skipped"``), `pause` seconds apart. Returns (peer, outcome,
        time.time() when it ended) per write."""
        ticket = self.send_write_many(peers, region, size, count, seed=seed, pause=pause)
        return cast(list[tuple[str, Outcome, float]], self.result(ticket, timeout))

    def digest(self, region: str) -> str:
        return cast(str, self.call("digest", region))

    def digests(self) -> dict[str, str]:
        """{region: digest} of every region registered with `register`."""
        return cast(dict[str, str], self.call("digests"))

    def remember(self, peer: str, region: str) -> int:
        """Keep ``agent.remote(peer, region)`` for `stale_write`; returns the peer's generation."""
        return cast(int, self.call("remember", peer, region))

    def stale_write(self, peer: str, region: str) -> Outcome:
        """WRITE through the RemoteRegion kept by `remember` (maybe of an older generation)."""
        return cast(Outcome, self.call("stale_write", peer, region))

    def leave(self, timeout: float = 60.0) -> None:
        """Drain and leave the group; the process then exits."""
        self.call("leave", timeout=timeout)
        self.proc.join(10.0)

    # -- signals and lifetime ----------------------------------------------------------------
    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig`; a SIGSTOP returns once the whole process is stopped."""
        signals.send(self.pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def alive(self) -> bool:
        return self.proc.is_alive()

    def request_close(self) -> None:
        """Ask it to stop (no leave: its lease runs out); `close` finishes the job."""
        if self.proc.is_alive() and not self.stopped:
            with contextlib.suppress(OSError):
                self._conn.send((self._seq + 1, "quit", ()))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the process, whatever state it is in; never leaves it behind."""
        if self.stopped and self.proc.is_alive():
            self.proc.kill()  # SIGKILL ends a stopped process too
        self.request_close()
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
        self._conn.close()


def start_members(
    names: Iterable[str], etcd_endpoint: str, group: str, *, lease_ttl: float = 2.0
) -> list[MemberProcess]:
    """Start several members at once and wait until all have joined (closes them on failure)."""
    made = [MemberProcess(n, etcd_endpoint, group, lease_ttl=lease_ttl, wait=False) for n in names]
    try:
        for m in made:
            m.wait_ready()
    except BaseException:
        for m in made:
            m.close()
        raise
    return made
