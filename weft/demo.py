"""`weft demo`: two agents in separate processes move checksummed KV blocks both ways, live.

For now this shows the data plane; the membership, failure and rebalancing acts join the
demo as those layers land.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from weft.fabric import Agent, AgentConfig, Op

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
    return 0 if ok else 1
