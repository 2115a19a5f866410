"""`weft demo`: the data plane and the control plane, live, on this machine.

Act 1: two agents in separate processes move checksummed KV blocks both ways.
Act 2: an embedded etcd and four `weft agent` daemons form a group with roles (1:3) and 16
MoE experts placed twice; the leader is killed with SIGKILL; the survivors remove it (who
noticed, how fast, by which signal), elect a new leader, re-plan, pull the lost expert
replicas from surviving ones over the fabric and verify every byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from weft.fabric import Agent, AgentConfig, Op
from weft.testing.etcd import EtcdServer

BLOCK = 1 << 20
BLOCKS = 256
BATCH = 16


def _digest(arr: np.ndarray) -> str:
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()


def _decode_worker(conn: Connection, backends: list[str], secret: bytes) -> None:
    """The peer process: a 'decode' agent with a KV pool the 'prefill' agent fills and reads."""
    agent = Agent("decode-0", AgentConfig(backends, secret=secret))
    pool = np.zeros(BLOCK * BLOCKS, dtype=np.uint8)
    pool.fill(0)  # touch the pages now, as a serving engine does with its KV pool at start-up
    agent.register(pool, name="kv")
    conn.send(agent.metadata())
    while True:
        cmd, arg = conn.recv()
        if cmd == "wait":
            agent.wait_notification("prefill-0", arg, timeout=60)
            conn.send(True)
        elif cmd == "digests":
            conn.send([_digest(pool[i * BLOCK : (i + 1) * BLOCK]) for i in arg])
        elif cmd == "refill":
            pool[:] = np.random.default_rng(arg).integers(0, 256, pool.size, dtype=np.uint8)
            conn.send([_digest(pool[i * BLOCK : (i + 1) * BLOCK]) for i in range(BLOCKS)])
        else:
            agent.close()
            conn.send(True)
            return


def _run_backend(console: Console, backends: list[str]) -> dict[str, Any]:
    secret = b"weft-demo-secret-not-for-production"
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_decode_worker, args=(child, backends, secret), daemon=True)
    proc.start()
    result: dict[str, Any] = {"backends": "+".join(backends)}
    try:
        if not conn.poll(60):
            raise RuntimeError("the decode agent did not start")
        agent = Agent("prefill-0", AgentConfig(backends, secret=secret))
        with agent:
            agent.add_peer(conn.recv())
            kv = np.random.default_rng(1).integers(0, 256, BLOCK * BLOCKS, dtype=np.uint8)
            reg = agent.register(kv, name="kv")
            remote = agent.remote("decode-0", "kv")
            order = np.random.default_rng(2).permutation(BLOCKS)  # scattered placement
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(
                    f"[cyan]{result['backends']}: WRITE prefill-0 -> decode-0", total=kv.nbytes
                )
                start = time.perf_counter()
                for i in range(0, BLOCKS, BATCH):
                    idx = np.arange(i, i + BATCH)
                    tag = f"blocks {i}".encode()
                    agent.write(
                        reg.blocks(BLOCK, idx), "decode-0", remote.blocks(BLOCK, order[idx]), notify=tag
                    ).wait(30)
                    progress.advance(task, BATCH * BLOCK)
                write_s = time.perf_counter() - start
                conn.send(("digests", [int(x) for x in order]))
                theirs = conn.recv()
                ours = [_digest(kv[i * BLOCK : (i + 1) * BLOCK]) for i in range(BLOCKS)]
                result["write_ok"] = theirs == ours
                result["write_gbps"] = kv.nbytes / write_s / 1e9

                conn.send(("refill", 3))
                expected = conn.recv()
                back = np.zeros_like(kv)
                rback = agent.register(back)
                task = progress.add_task(
                    f"[magenta]{result['backends']}: READ decode-0 -> prefill-0", total=kv.nbytes
                )
                h = agent.prepare(
                    Op.READ,
                    rback.blocks(BLOCK, np.arange(BATCH)),
                    "decode-0",
                    remote.blocks(BLOCK, np.arange(BATCH)),
                )
                start = time.perf_counter()
                for i in range(0, BLOCKS, BATCH):
                    idx = np.arange(i, i + BATCH)
                    agent.read(rback.blocks(BLOCK, idx), "decode-0", remote.blocks(BLOCK, idx)).wait(30)
                    progress.advance(task, BATCH * BLOCK)
                read_s = time.perf_counter() - start
                h.release()
                got = [_digest(back[i * BLOCK : (i + 1) * BLOCK]) for i in range(BLOCKS)]
                result["read_ok"] = got == expected
                result["read_gbps"] = kv.nbytes / read_s / 1e9
                result["via"] = (
                    agent.write(reg.blocks(BLOCK, [0]), "decode-0", remote.blocks(BLOCK, [0]))
                    .wait(30)
                    .backend.value
                )
        conn.send(("quit", None))
        conn.poll(10)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return result


def run(console: Console | None = None) -> int:
    console = console or Console()
    console.rule("[bold]weft demo: two agents, two processes, checksummed KV blocks both ways")
    console.print(
        f"{BLOCKS} blocks of {BLOCK >> 20} MiB, {BATCH} blocks per request, scattered on the far side\n"
    )
    results = [_run_backend(console, b) for b in (["local", "tcp"], ["tcp"])]
    table = Table(title="throughput (GB/s), contents verified by BLAKE2 per block")
    for col in ("configured", "used", "WRITE", "verified", "READ", "verified"):
        table.add_column(col)
    ok = True
    for r in results:
        ok = ok and r["write_ok"] and r["read_ok"]
        table.add_row(
            r["backends"],
            r["via"],
            f"{r['write_gbps']:.2f}",
            "yes" if r["write_ok"] else "[red]NO",
            f"{r['read_gbps']:.2f}",
            "yes" if r["read_ok"] else "[red]NO",
        )
    console.print(table)
    ok = _membership_act(console) and ok
    return 0 if ok else 1


# -- act 2: membership ---------------------------------------------------------------------
AGENTS = 4
TTL = 3
EXPERTS = 16
EXPERT_BYTES = 1 << 20
_T = TypeVar("_T")


def _status(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=0.5) as reply:
            result: dict[str, Any] = json.loads(reply.read())
            return result
    except (OSError, ValueError):
        return None


def _view_table(names: list[str], ports: dict[str, int], dead: set[str]) -> Table:
    table = Table(title=f"group 'demo' (lease TTL {TTL} s): each agent's own view")
    for col in ("agent", "generation", "ready", "leader", "sees", "plan", "role", "experts held"):
        table.add_column(col)
    for name in names:
        st = None if name in dead else _status(ports[name])
        if st is None:
            table.add_row(name, "-", "[red]killed" if name in dead else "...", *["-"] * 5)
            continue
        sees = sorted(m["name"] for m in st["members"] if m["name"] != name)
        held = sorted(int(e) for e in st.get("experts", {}))
        table.add_row(
            name,
            str(st["generation"]),
            "[green]yes" if st["ready"] else "[yellow]no",
            str(st["leader"]),
            ", ".join(sees) or "-",
            str(st.get("applied_epoch") or "-"),
            str(st.get("role") or "-"),
            " ".join(map(str, held)) or "-",
        )
    return table


class _Watch:
    """Polls the live agents' /status, redrawing their views between tries."""

    def __init__(self, live: Live, names: list[str], ports: dict[str, int], dead: set[str]) -> None:
        self.live, self.names, self.ports, self.dead = live, names, ports, dead

    def until(self, seconds: float, probe: Callable[[], _T | None], pause: float = 0.05) -> _T | None:
        """`probe()` until it returns something (returned) or `seconds` pass (None)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = probe()
            if found is not None:
                return found
            self.live.update(_view_table(self.names, self.ports, self.dead))
            time.sleep(pause)
        return None

    def status(self, name: str) -> dict[str, Any]:
        return _status(self.ports[name]) or {}


@dataclass
class _KillOutcome:
    victim: str
    removed: dict[str, tuple[float, str]]
    """Survivor -> (seconds after the kill it removed the victim, the signal that told it)."""
    new_leader: tuple[str, float] | None
    replanned: float | None
    pulled_before: dict[str, int]


def _kill_the_leader(watch: _Watch, procs: dict[str, subprocess.Popen[bytes]]) -> _KillOutcome:
    """SIGKILL the leader; time the survivors' removal of it, the new leader and the re-plan."""
    names, dead = watch.names, watch.dead

    def settled() -> int | None:
        """The plan epoch every agent applied, once they all see each other."""
        return _plan_applied(names, watch.ports, dead) if _all_see(names, watch.ports, dead) else None

    first_epoch = watch.until(15, settled, pause=0.1) or _plan_applied(names, watch.ports, dead) or 0
    time.sleep(0.5)
    victim = watch.status(names[0]).get("leader") or names[-1]  # the survivors elect a new one
    victim_gen = watch.status(victim).get("generation")
    pulled_before = {n: len(watch.status(n).get("pulled", [])) for n in names}
    t_kill = time.time()
    procs[victim].send_signal(signal.SIGKILL)
    dead.add(victim)
    removed: dict[str, tuple[float, str]] = {}

    def all_removed() -> bool | None:
        for name in names:
            if name in dead or name in removed:
                continue
            for ev in watch.status(name).get("events", []):
                if ev["kind"] == "removed" and ev["name"] == victim and ev["generation"] == victim_gen:
                    removed[name] = (ev["at"] - t_kill, ev["reason"])
        return True if len(removed) == AGENTS - 1 else None

    def agreed_leader() -> tuple[str, float] | None:
        leaders = {watch.status(n).get("leader") for n in names if n not in dead}
        if len(leaders) == 1 and None not in leaders and victim not in leaders:
            return str(leaders.pop()), time.time() - t_kill
        return None

    def replanned() -> float | None:
        epoch = _plan_applied(names, watch.ports, dead)
        return time.time() - t_kill if epoch is not None and epoch > first_epoch else None

    watch.until(TTL + 5, all_removed)
    # the leader key lives under the dead leader's lease: a new leader follows its expiry
    new_leader = watch.until(TTL + 5, agreed_leader)
    return _KillOutcome(victim, removed, new_leader, watch.until(TTL + 10, replanned), pulled_before)


def _membership_act(console: Console) -> bool:
    console.rule(f"[bold]membership: embedded etcd, {AGENTS} agent daemons, one killed with SIGKILL")
    names = [f"agent-{i}" for i in range(AGENTS)]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with tempfile.TemporaryDirectory(prefix="weft-demo-") as tmp, EtcdServer(Path(tmp) / "etcd") as etcd:
        console.print(f"etcd {etcd.endpoint} (Debian etcd-server, data in a temporary folder)")
        try:
            _start_agents(names, etcd.endpoint, tmp, procs)
            ports = _wait_ready(names, Path(tmp), procs, deadline=time.monotonic() + 30)
            if ports is None:
                console.print(f"[red]agents did not start; logs are in {tmp}")
                return False
            dead: set[str] = set()
            with Live(_view_table(names, ports, dead), console=console, refresh_per_second=10) as live:
                outcome = _kill_the_leader(_Watch(live, names, ports, dead), procs)
            _show_kill(console, names, dead, outcome)
            verified = _show_moves(console, names, ports, dead, outcome.pulled_before, outcome.replanned)
            return len(outcome.removed) == AGENTS - 1 and outcome.new_leader is not None and verified
        finally:
            _stop_agents(console, procs)


def _start_agents(
    names: list[str], endpoint: str, tmp: str, procs: dict[str, subprocess.Popen[bytes]]
) -> None:
    env = dict(os.environ, WEFT_SECRET=secrets.token_hex(16))
    for name in names:
        cmd = [sys.executable, "-m", "weft.cli", "agent", "--etcd", endpoint, "--group", "demo"]
        cmd += ["--name", name, "--lease-ttl", str(TTL), "--ready-file", f"{tmp}/{name}.ready"]
        cmd += ["--ratio", "1:3", "--experts", str(EXPERTS), "--replication", "2"]
        cmd += ["--expert-source", f"synthetic:{EXPERT_BYTES}"]
        with open(f"{tmp}/{name}.log", "wb") as log_file:
            procs[name] = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def _stop_agents(console: Console, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for name, proc in procs.items():
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code not in (0, -signal.SIGKILL):
            console.print(f"[yellow]{name} exited with {code}")


def _show_kill(console: Console, names: list[str], dead: set[str], outcome: _KillOutcome) -> None:
    table = Table(title=f"SIGKILL of {outcome.victim} (the leader): when each survivor removed it")
    for col in ("survivor", "after", "signal"):
        table.add_column(col)
    for name in names:
        if name in outcome.removed:
            took, reason = outcome.removed[name]
            table.add_row(name, f"{took * 1000:.0f} ms", reason)
        elif name not in dead:
            table.add_row(name, "[red]not removed", "-")
    console.print(table)
    if outcome.new_leader is not None:
        console.print(
            f"new leader {outcome.new_leader[0]}, agreed by every survivor "
            f"{outcome.new_leader[1]:.2f} s after the kill"
        )
    console.print(
        "data-path signal: the survivor's connection to the dead agent closed and nothing "
        "listens at its address any more; lease: etcd expired the dead agent's lease "
        f"(TTL {TTL} s) and the watch delivered the DELETE"
    )


def _plan_applied(names: list[str], ports: dict[str, int], dead: set[str]) -> int | None:
    """The epoch every live agent has applied, if they agree and it lists exactly them."""
    alive = {n for n in names if n not in dead}
    views = [_status(ports[n]) for n in alive]
    if any(v is None for v in views):
        return None
    epochs = {v["applied_epoch"] for v in views if v is not None}
    planned = [set(v.get("members_planned", [])) for v in views if v is not None]
    if len(epochs) != 1 or 0 in epochs or any(p != alive for p in planned):
        return None
    return int(epochs.pop())


def _show_moves(
    console: Console,
    names: list[str],
    ports: dict[str, int],
    dead: set[str],
    pulled_before: dict[str, int],
    took: float | None,
) -> bool:
    """The re-plan: which experts each survivor pulled after the kill, from where, verified."""
    from weft.engine.experts import SyntheticExperts

    if took is None:
        console.print("[red]no new plan was applied by every survivor")
        return False
    truth = SyntheticExperts(EXPERT_BYTES)
    table = Table(title=f"re-plan applied by every survivor {took:.2f} s after the kill: experts moved")
    for col in ("survivor", "role", "experts held", "pulled after the kill", "bytes verified"):
        table.add_column(col)
    ok = True
    for name in names:
        if name in dead:
            continue
        st = _status(ports[name]) or {}
        held = st.get("experts", {})
        good = all(d == truth.digest(int(e)) for e, d in held.items())
        ok = ok and good and bool(held)
        fresh = st.get("pulled", [])[pulled_before.get(name, 0) :]
        table.add_row(
            name,
            str(st.get("role")),
            str(len(held)),
            ", ".join(f"{p['expert']}<-{p['source']}" for p in fresh[-6:]) or "-",
            "[green]all BLAKE2 match" if good else "[red]MISMATCH",
        )
    console.print(table)
    return ok


def _wait_ready(
    names: list[str], tmp: Path, procs: dict[str, subprocess.Popen[bytes]], deadline: float
) -> dict[str, int] | None:
    ports: dict[str, int] = {}
    while time.monotonic() < deadline and len(ports) < len(names):
        for name in names:
            ready = tmp / f"{name}.ready"
            if name not in ports and ready.exists():
                with contextlib.suppress(ValueError, OSError):
                    ports[name] = int(json.loads(ready.read_text())["http_port"])
            if procs[name].poll() is not None:
                return None
        time.sleep(0.05)
    return ports if len(ports) == len(names) else None


def _all_see(names: list[str], ports: dict[str, int], dead: set[str]) -> bool:
    alive = [n for n in names if n not in dead]
    for name in alive:
        st = _status(ports[name])
        if st is None or not st["ready"] or {m["name"] for m in st["members"]} != set(alive):
            return False
    return True
