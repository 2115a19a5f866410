#!/usr/bin/env python3
"""Wide expert parallelism: weft.ep's dispatch+combine against the same exchange written
directly with NIXL's Python API, 8 ranks as OS processes on this host, in one run.

Each rank holds `tokens` activations of `hidden` float16 and routes each token to one of 32
experts placed twice over the 8 ranks (weft's planner). A step: every rank sends each peer
its tokens in one WRITE with a notification, every rank applies its experts (identity: the
exchange is measured, not the FFN) and WRITEs the results back with a notification, every
rank puts its results back in token order. The step time is the slowest rank's, from a
common start (a barrier) to its last result in place; p50 and p99 over the timed steps.

    NIXL   UCX backend, progress thread (pthrDelay 10 us, as bench/fabric.py), connections
           made up front, one initialize_xfer + transfer per peer and step, get_new_notifs
           polling, the open transfers polled in the same loop (NIXL's UCX backend sends a
           notification once the initiator has seen its transfer complete).
    weft   `weft.ep.Exchange` (backends local+tcp), the same routing

Then, for weft, one rank is SIGKILLed between steps and the survivors' next step is timed
against a normal one (the target: no more than 2x a normal step plus the deadline), once per
hidden size (``weft.losses`` in the JSON, one record per hidden size).

    python bench/ep.py [--quick] [--steps N]        # bench/out/ep.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RANKS, EXPERTS = 8, 32
DEADLINE = 1.0
YIELD = float(os.environ.get("BENCH_EP_NIXL_YIELD", "0"))  # seconds the NIXL loop sleeps when idle
SECRET = b"bench-ep-secret-0123456789abcdef"


def _placement() -> dict[int, tuple[str, ...]]:
    sys.path.insert(0, str(REPO))
    from weft.planner.experts import ExpertSpec, place_experts

    return place_experts(ExpertSpec(EXPERTS, replication=2), [f"r{i}" for i in range(RANKS)]).experts


# -- the NIXL exchange ---------------------------------------------------------------------
class NixlRank:
    def __init__(self, rank: int, max_bytes: int) -> None:
        import nixl._api as api
        from nixl._api import nixl_agent, nixl_agent_config

        orig = api.nixlBind.nixlAgent

        def patched(nm: str, cfg: Any, _orig: Any = orig) -> Any:
            cfg.pthrDelay = 10  # a progress thread that does not spin a whole core
            return _orig(nm, cfg)

        api.nixlBind.nixlAgent = patched
        self.rank, self.name = rank, f"r{rank}"
        self.agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=True, backends=["UCX"]))
        self.slot = max_bytes
        self.inbox = np.zeros(RANKS * max_bytes, dtype=np.uint8)
        self.results = np.zeros(RANKS * max_bytes, dtype=np.uint8)
        self.staging = np.zeros(RANKS * max_bytes, dtype=np.uint8)
        self.replies = np.zeros(RANKS * max_bytes, dtype=np.uint8)
        self.regs = [self.agent.register_memory([(b.ctypes.data, b.nbytes, 0, "")], "DRAM")
                     for b in (self.inbox, self.results, self.staging, self.replies)]  # fmt: skip
        self.addrs: dict[int, tuple[int, int]] = {}

    def metadata(self) -> tuple[bytes, int, int]:
        return self.agent.get_agent_metadata(), self.inbox.ctypes.data, self.results.ctypes.data

    def peers(self, mds: list[tuple[bytes, int, int]]) -> None:
        for r, (md, inbox, results) in enumerate(mds):
            if r != self.rank:
                self.agent.add_remote_agent(md)
                self.addrs[r] = (inbox, results)
        for r in self.addrs:  # connections made before the first step, not raced during it
            self.agent.make_connection(f"r{r}")

    def _write(self, src: np.ndarray, off: int, nbytes: int, peer: int, raddr: int, note: bytes) -> Any:
        local = self.agent.get_xfer_descs(
            np.array([(src.ctypes.data + off, nbytes, 0)], dtype=np.uint64), "DRAM"
        )
        remote = self.agent.get_xfer_descs(np.array([(raddr, nbytes, 0)], dtype=np.uint64), "DRAM")
        h = self.agent.initialize_xfer("WRITE", local, remote, f"r{peer}", note)
        self.agent.transfer(h)
        return h

    def step(self, step: int, x: np.ndarray, routes: dict[int, np.ndarray], hidden: int) -> np.ndarray:
        row = hidden * 2
        out = np.empty_like(x)
        handles = []
        expect = set()
        for peer, idx in routes.items():
            if peer == self.rank:
                out[idx] = x[idx]  # identity expert, locally
                continue
            n = len(idx)
            base = peer * self.slot
            self.staging[base : base + n * row] = x[idx].reshape(-1).view(np.uint8)
            raddr = self.addrs[peer][0] + self.rank * self.slot
            handles.append(
                self._write(
                    self.staging, base, max(n * row, 1), peer, raddr, b"D%d:%d:%d" % (step, self.rank, n)
                )
            )
            expect.add(peer)
        # every peer sends one dispatch (maybe empty) to every other rank
        for peer in range(RANKS):
            if peer != self.rank and peer not in routes:
                raddr = self.addrs[peer][0] + self.rank * self.slot
                note = b"D%d:%d:0" % (step, self.rank)
                handles.append(self._write(self.staging, peer * self.slot, 1, peer, raddr, note))
        served, got = 0, set()
        give_up = time.monotonic() + 60
        while served < RANKS - 1 or got != expect or handles:
            if time.monotonic() > give_up:
                raise TimeoutError(f"r{self.rank} step {step}: served {served}, results {sorted(got)} of "
                                   f"{sorted(expect)}, {len(handles)} transfers open")  # fmt: skip
            # NIXL's UCX backend sends a transfer's notification when the initiator sees it
            # complete: the handles are polled here, not after the loop (that deadlocks)
            for h in list(handles):
                state = self.agent.check_xfer_state(h)
                if state == "DONE":
                    self.agent.release_xfer_handle(h)
                    handles.remove(h)
                elif state != "PROC":
                    raise RuntimeError(f"NIXL transfer ended {state}")
            notifs = self.agent.get_new_notifs()
            if not notifs:
                time.sleep(YIELD)  # 8 ranks share 2 cores: a spinning rank starves the others
            for _agent, msgs in notifs.items():
                for m in msgs:
                    kind, s, src, n = m[:1], *map(int, m[1:].split(b":"))
                    if s != step:
                        continue
                    if kind == b"D":
                        served += 1
                        base = src * self.slot
                        # identity expert: the rows go back as they came, through the reply slot
                        self.replies[base : base + n * row] = self.inbox[base : base + n * row]
                        raddr = self.addrs[src][1] + self.rank * self.slot
                        note = b"R%d:%d:%d" % (step, self.rank, n)
                        handles.append(self._write(self.replies, base, max(n * row, 1), src, raddr, note))
                    elif kind == b"R" and src in routes:
                        idx = routes[src]
                        base = src * self.slot
                        rows = self.results[base : base + len(idx) * row]
                        out[idx] = rows.view(np.float16).reshape(len(idx), hidden)
                        got.add(src)
        return out


# -- the weft exchange ---------------------------------------------------------------------
class WeftRank:
    def __init__(self, rank: int, max_tokens: int, hidden: int) -> None:
        sys.path.insert(0, str(REPO))
        from weft.fabric.agent import Agent
        from weft.fabric.config import AgentConfig

        self.rank, self.name = rank, f"r{rank}"
        self.agent = Agent(self.name, AgentConfig(["local", "tcp"], secret=SECRET))
        self.max_tokens, self.hidden = max_tokens, hidden
        self.ex: Any = None

    def metadata(self) -> bytes:
        return self.agent.metadata()

    def peers(self, mds: list[bytes], placement: dict[int, tuple[str, ...]]) -> None:
        from weft.ep import EpPlan, Exchange

        for r, md in enumerate(mds):
            if r != self.rank:
                self.agent.add_peer(md)
        plan = EpPlan.from_placement(1, placement)
        self.ex = Exchange(self.agent, plan, lambda e, rows: rows, hidden=self.hidden,
                           max_tokens=self.max_tokens, deadline=DEADLINE)  # fmt: skip

    def step(self, x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        got = self.ex.step(x, ids)
        return got.out, {"masked": list(got.masked), "missing": int(got.missing.sum()),
                         "stragglers": list(got.stragglers), "redispatched": got.redispatched}  # fmt: skip


def _rank_main(conn: Connection, contender: str, rank: int, hidden: int, max_tokens: int) -> None:
    try:
        placement = _placement()
        from weft.ep import EpPlan, route  # the NIXL ranks route exactly as weft does

        names = [f"r{i}" for i in range(RANKS)]
        r: Any = (NixlRank(rank, max_tokens * hidden * 2) if contender == "nixl"
                  else WeftRank(rank, max_tokens, hidden))  # fmt: skip
        conn.send(r.metadata())
        mds = conn.recv()
        if contender == "nixl":
            r.peers(mds)
        else:
            r.peers(mds, placement)
        conn.send("ready")
        x = ids = routes = None
        step = 0
        while True:
            msg = conn.recv()
            if msg[0] == "point":
                tokens, seed = msg[1], msg[2]
                rng = np.random.default_rng(seed * 100 + rank)
                x = rng.standard_normal((tokens, hidden)).astype(np.float16)
                ids = rng.integers(0, EXPERTS, tokens)
                by_name = route(EpPlan.from_placement(1, placement), ids, np.arange(len(ids)))
                routes = {names.index(r): np.asarray(t, dtype=np.int64) for r, t in by_name.items()}
                conn.send("ok")
            elif msg[0] == "step":
                step += 1
                t0 = time.perf_counter()
                extra: dict[str, Any] = {}
                if contender == "nixl":
                    out = r.step(step, x, routes, hidden)
                else:
                    out, extra = r.step(x, ids)
                dt = time.perf_counter() - t0
                ok = bool(np.array_equal(out, x))  # identity experts: every row back in place
                conn.send((dt, ok, extra))
            elif msg[0] == "quit":
                return
    except Exception:
        conn.send(("error", traceback.format_exc()))


def run_contender(contender: str, points: list[tuple[int, int]], steps: int, kill: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results: dict[str, Any] = {"points": []}
    by_hidden: dict[int, list[int]] = {}
    for tokens, hidden in points:
        by_hidden.setdefault(hidden, []).append(tokens)
    for hidden, token_list in by_hidden.items():
        # a peer gets about tokens/RANKS of each rank's tokens; 3x that leaves room for the
        # re-dispatch after a rank is lost (and keeps 8 ranks' buffers within this host's memory)
        max_tokens = 3 * max(token_list) // RANKS + 64
        conns, procs = [], []
        for rank in range(RANKS):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_rank_main, args=(child, contender, rank, hidden, max_tokens), daemon=True)
            p.start()
            conns.append(parent)
            procs.append(p)
        try:
            mds = [_recv(c, 120) for c in conns]
            for c in conns:
                c.send(mds)
            for c in conns:
                _recv(c, 120)
            for tokens in token_list:
                for c in conns:
                    c.send(("point", tokens, tokens))
                for c in conns:
                    _recv(c, 120)
                times, ok = [], True
                for i in range(steps + 2):
                    for c in conns:
                        c.send(("step",))
                    answers = _gather(conns, 300)
                    ok = ok and all(a[1] for a in answers)
                    if i >= 2:  # two warm-up steps
                        times.append(max(a[0] for a in answers))
                p50 = statistics.median(times)
                point = {"tokens": tokens, "hidden": hidden, "ok": ok, "p50_ms": 1e3 * p50,
                         "p99_ms": 1e3 * float(np.percentile(times, 99)), "steps": len(times),
                         "tokens_per_s": RANKS * tokens / p50}  # fmt: skip
                results["points"].append(point)
                print(f"{contender:5s} tokens {tokens:5d} hidden {hidden:5d}: p50 {point['p50_ms']:8.2f} ms "
                      f"p99 {point['p99_ms']:8.2f} ms ok {ok}", flush=True)  # fmt: skip
            if kill and contender == "weft":
                results.setdefault("losses", []).append({"hidden": hidden, **_loss(conns, procs, steps)})
        finally:
            for c in conns:
                with contextlib.suppress(OSError):
                    c.send(("quit",))
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
    return results


def _loss(conns: list[Connection], procs: list[Any], steps: int) -> dict[str, Any]:
    """The next step of the survivors after one rank is SIGKILLed, against a normal step."""
    normal = []
    for _ in range(steps):
        for c in conns:
            c.send(("step",))
        normal.append(max(_recv(c, 300)[0] for c in conns))
    victim = 3
    os.kill(procs[victim].pid, signal.SIGKILL)
    procs[victim].join(5)
    survivors = [c for i, c in enumerate(conns) if i != victim]
    for c in survivors:
        c.send(("step",))
    answers = [_recv(c, 300) for c in survivors]
    after = max(a[0] for a in answers)
    ok = all(a[1] for a in answers)  # r=2: one loss leaves every expert a replica, all rows right
    out = {"normal_ms": 1e3 * statistics.median(normal), "after_loss_ms": 1e3 * after,
           "deadline_ms": 1e3 * DEADLINE,
           "bound_ms": 1e3 * (2 * statistics.median(normal) + DEADLINE), "masked": answers[0][2]["masked"],
           "stragglers": sorted({s for a in answers for s in a[2]["stragglers"]}),
           "redispatched": sum(a[2]["redispatched"] for a in answers),
           "missing_tokens": sum(a[2]["missing"] for a in answers), "ok": ok}  # fmt: skip
    out["within_bound"] = out["after_loss_ms"] <= out["bound_ms"]
    print(f"weft  after SIGKILL of a rank: {out['after_loss_ms']:.1f} ms (normal {out['normal_ms']:.1f} ms, "
          f"bound {out['bound_ms']:.1f} ms)", flush=True)  # fmt: skip
    conns.pop(victim)
    procs.pop(victim)
    return out


def _gather(conns: list[Connection], timeout: float) -> list[Any]:
    """Every rank's answer; every error, if any, in one exception."""
    got, errors = [], []
    for i, c in enumerate(conns):
        try:
            got.append(_recv(c, timeout))
        except (RuntimeError, TimeoutError) as exc:
            errors.append(f"rank {i}: {exc}")
    if errors:
        raise RuntimeError("\n".join(errors))
    return got


def _recv(c: Connection, timeout: float) -> Any:
    if not c.poll(timeout):
        raise TimeoutError("a rank did not answer")
    got = c.recv()
    if isinstance(got, tuple) and got and got[0] == "error":
        raise RuntimeError(got[1])
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--contenders", default="nixl,weft", help="comma-separated: nixl, weft")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    args = ap.parse_args()
    if args.quick:
        points = [(128, 1024), (1024, 1024), (1024, 7168)]
    else:
        points = [(t, h) for h in (1024, 4096, 7168) for t in (128, 1024, 8192) if t * h <= 8192 * 4096]
    report: dict[str, Any] = {"ranks": RANKS, "experts": EXPERTS, "replication": 2, "cpus": os.cpu_count()}
    for contender in args.contenders.split(","):
        try:
            report[contender] = run_contender(contender, points, args.steps, kill=True)
        except Exception as exc:  # recorded, never replaced by a number
            print(f"{contender}: failed: {exc}", flush=True)
            report[contender] = {"error": str(exc)[-4000:], "points": []}
    ratios = []
    nixl_points = report.get("nixl", {}).get("points", [])
    for n, w in zip(nixl_points, report.get("weft", {}).get("points", []), strict=False):
        ratio = w["p50_ms"] / n["p50_ms"]
        ratios.append({"tokens": w["tokens"], "hidden": w["hidden"], "weft_over_nixl_p50": round(ratio, 3),
                       "weft_over_nixl_p99": round(w["p99_ms"] / n["p99_ms"], 3)})  # fmt: skip
        print(f"tokens {w['tokens']:5d} hidden {w['hidden']:5d}: weft/NIXL p50 {ratio:.2f} "
              f"p99 {w['p99_ms'] / n['p99_ms']:.2f}")  # fmt: skip
    report["ratios"] = ratios
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ep.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
