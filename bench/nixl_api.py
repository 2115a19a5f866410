"""NIXL's Python API, the same client code on the real NIXL 1.5 and on `weft.nixl`, one run.

Each flavour runs in its own interpreters (spawned processes): `nixl` is the NIXL wheel,
`weft` calls `weft.nixl.install()` first so that `import nixl._api` is weft's shim. The
client code is one function per workload, written against `nixl._api` as LMCache and vLLM
call it:

- posix: LMCache-style chunk put/get. One agent, backend POSIX, `nixl_pool_size` chunks of
  one size in DRAM and one file per chunk (opened once, as LMCache's `NixlFilePool`);
  `register_memory` DRAM and FILE, `prep_xfer_dlist` each side (the FILE side under the
  agent's own name), `make_prepped_xfer` WRITE then READ of all chunks, `transfer`, poll
  `check_xfer_state`; the bytes read back are checked. Page cache, no fsync. Chunk sizes
  256 KiB .. 32 MiB.
- blocks: a vLLM-style block READ between two processes: 64 layers, one registration per
  layer, N blocks per layer; the initiator READs every block of every layer in one prepared
  request with a notification, and the target waits for it (`get_new_notifs`). Block sizes
  16 KiB .. 1 MiB.
- overhead: the shim's own per-call cost: `transfer` + `check_xfer_state` until DONE of one
  prepared 4 KiB READ between two agents of one process, against weft's fabric doing the
  same directly (`PreparedTransfer.post().wait()`).
- kill: the failure story. A READ of 1 GiB (UCX over TCP for NIXL) is posted and the target is SIGKILLed; the
  initiator polls `check_xfer_state` until DONE/ERR/an exception, bounded by --kill-deadline
  (NIXL 1.5 may never answer). Time is counted from the target's death (reaped).

    make bench-nixl                 # installs NIXL and LMCache's set, then runs this
    .venv/bin/python bench/nixl_api.py [--quick] [--flavours nixl,weft] [--only posix,blocks]

Writes <out>/nixl_api.json (default out: bench/out/). A flavour that cannot run is reported
as skipped with its reason (weft without weft.nixl in the tree, NIXL not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
KiB, MiB = 1 << 10, 1 << 20
if str(REPO_ROOT) not in sys.path:  # this checkout's weft, in this process and the spawned ones
    sys.path.insert(0, str(REPO_ROOT))
FLAVOURS = ("nixl", "weft")
WORKLOADS = ("posix", "blocks", "overhead", "kill")
POSIX_SIZES = [256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 32 * MiB]
BLOCK_SIZES = [16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB]
LAYERS = 64
POLL_DEADLINE = 60.0


def use(flavour: str) -> Any:
    """Pick the implementation of `nixl._api` for this process; returns the module."""
    if flavour == "weft":
        import weft.nixl

        weft.nixl.install()
    import nixl._api

    return nixl._api


def poll(agent: Any, handle: Any, deadline: float = POLL_DEADLINE) -> str:
    state = agent.transfer(handle)
    end = time.monotonic() + deadline
    while state not in ("DONE", "ERR"):
        if time.monotonic() > end:
            raise TimeoutError(f"transfer still {state} after {deadline} s")
        state = agent.check_xfer_state(handle)
    return str(state)


def fmt(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


# ---- (a) POSIX chunk put/get ---------------------------------------------------------------


def posix(api: Any, a: dict[str, Any]) -> dict[str, Any]:
    agent = api.nixl_agent("bench-posix", api.nixl_agent_config(backends=[]))
    agent.create_backend("POSIX", {})
    out: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="nixl-api-", dir=a.get("dir")))
    for size in a["sizes"]:
        count = max(2, min(a["pool"], a["span"] // size))
        src = np.random.default_rng(size).integers(0, 256, count * size, dtype=np.uint8)
        dst = np.zeros_like(src)
        fds = [os.open(root / f"obj_{size}_{i}.bin", os.O_CREAT | os.O_RDWR, 0o600) for i in range(count)]
        base_s, base_d = src.ctypes.data, dst.ctypes.data
        mem = [(base_s + i * size, size, 0, "") for i in range(count)]
        mem += [(base_d + i * size, size, 0, "") for i in range(count)]
        files = [(0, size, fd, "") for fd in fds]
        reg_m = agent.register_memory(mem, mem_type="DRAM")
        reg_f = agent.register_memory(files, mem_type="FILE")
        h_mem = agent.prep_xfer_dlist("", [(d[0], d[1], 0) for d in mem], mem_type="DRAM")
        h_file = agent.prep_xfer_dlist("bench-posix", [(0, size, fd) for fd in fds], mem_type="FILE")
        idx = list(range(count))
        put = agent.make_prepped_xfer("WRITE", h_mem, idx, h_file, idx)
        get = agent.make_prepped_xfer("READ", h_mem, [count + i for i in idx], h_file, idx)
        times: dict[str, list[float]] = {"put": [], "get": []}
        for rep in range(a["warmup"] + a["reps"]):
            for name, h in (("put", put), ("get", get)):
                t = time.perf_counter()
                state = poll(agent, h)
                dt = time.perf_counter() - t
                if state != "DONE":
                    raise RuntimeError(f"{name} {fmt(size)}: {state}")
                if rep >= a["warmup"]:
                    times[name].append(dt)
        ok = bool(np.array_equal(src, dst))
        for h in (put, get):
            agent.release_xfer_handle(h)
        agent.release_dlist_handle(h_mem)
        agent.release_dlist_handle(h_file)
        agent.deregister_memory(reg_m)
        agent.deregister_memory(reg_f)
        for fd in fds:
            os.close(fd)
        for f in root.glob(f"obj_{size}_*"):
            f.unlink()
        total = count * size
        out[str(size)] = {
            "chunks": count,
            "bytes": total,
            "verified": ok,
            **{f"{k}_MBps": total / statistics.median(v) / 1e6 for k, v in times.items()},
            **{f"{k}_s": v for k, v in times.items()},
        }
    root.rmdir()
    return out


# ---- (b) vLLM-style block READ between two processes ----------------------------------------


def _layers(api: Any, agent: Any, blocks: int, size: int, seed: int | None) -> tuple[list[np.ndarray], Any]:
    if seed is None:
        bufs = [np.zeros(blocks * size, np.uint8) for _ in range(LAYERS)]
    else:
        rng = np.random.default_rng(seed)
        bufs = [rng.integers(0, 256, blocks * size, dtype=np.uint8) for _ in range(LAYERS)]
    regs = [agent.register_memory([(b.ctypes.data, b.nbytes, 0, "")], mem_type="DRAM") for b in bufs]
    return bufs, regs


def _block_descs(bufs: list[np.ndarray], blocks: int, size: int) -> list[tuple[int, int, int]]:
    return [(b.ctypes.data + i * size, size, 0) for b in bufs for i in range(blocks)]


def blocks_target(api: Any, conn: Connection, a: dict[str, Any]) -> None:
    agent = api.nixl_agent("bench-target", api.nixl_agent_config(backends=a["backends"]))
    shapes = {}
    for size in a["sizes"]:
        blocks = max(1, a["span"] // (LAYERS * size))
        bufs, _ = _layers(api, agent, blocks, size, seed=size)
        shapes[size] = (bufs, blocks)
    conn.send((agent.get_agent_metadata(), {s: _block_descs(b, n, s) for s, (b, n) in shapes.items()}))
    while True:
        msg = conn.recv()
        if msg == "quit":
            return
        size, expect = msg  # wait for `expect` notifications of this shape
        got = 0
        end = time.monotonic() + POLL_DEADLINE
        while got < expect and time.monotonic() < end:
            for msgs in agent.get_new_notifs().values():
                got += sum(1 for m in msgs if m == f"blocks-{size}".encode())
        conn.send(got)


def blocks_initiator(api: Any, conn: Connection, a: dict[str, Any]) -> dict[str, Any]:
    agent = api.nixl_agent("bench-initiator", api.nixl_agent_config(backends=a["backends"]))
    md, remote = conn.recv()
    name = agent.add_remote_agent(md)
    if isinstance(name, bytes):
        name = name.decode()
    out: dict[str, Any] = {}
    for size in a["sizes"]:
        blocks = max(1, a["span"] // (LAYERS * size))
        bufs, regs = _layers(api, agent, blocks, size, seed=None)
        local = agent.prep_xfer_dlist("", _block_descs(bufs, blocks, size), mem_type="DRAM")
        far = agent.prep_xfer_dlist(name, remote[size], mem_type="DRAM")
        idx = list(range(LAYERS * blocks))
        h = agent.make_prepped_xfer("READ", local, idx, far, idx, notif_msg=f"blocks-{size}".encode())
        times = []
        n = a["warmup"] + a["reps"]
        for rep in range(n):
            t = time.perf_counter()
            state = poll(agent, h)
            dt = time.perf_counter() - t
            if state != "DONE":
                raise RuntimeError(f"READ {fmt(size)} blocks: {state}")
            if rep >= a["warmup"]:
                times.append(dt)
        conn.send((size, n))
        notifs = conn.recv()
        rng = np.random.default_rng(size)
        ok = all(np.array_equal(b, rng.integers(0, 256, b.nbytes, dtype=np.uint8)) for b in bufs)
        agent.release_xfer_handle(h)
        agent.release_dlist_handle(local)
        agent.release_dlist_handle(far)
        for r in regs:
            agent.deregister_memory(r)
        total = LAYERS * blocks * size
        out[str(size)] = {
            "layers": LAYERS,
            "blocks_per_layer": blocks,
            "bytes": total,
            "verified": ok,
            "notifications": f"{notifs}/{n}",
            "read_MBps": total / statistics.median(times) / 1e6,
            "read_s": times,
        }
    conn.send("quit")
    return out


# ---- (c) per-call overhead, 4 KiB loopback ---------------------------------------------------


def overhead(api: Any, a: dict[str, Any]) -> dict[str, Any]:
    n = a["calls"]
    x = api.nixl_agent("bench-x", api.nixl_agent_config(backends=a["backends"]))
    y = api.nixl_agent("bench-y", api.nixl_agent_config(backends=a["backends"]))
    src = np.arange(4 * KiB, dtype=np.uint8)
    dst = np.zeros(4 * KiB, np.uint8)
    y.register_memory([(src.ctypes.data, src.nbytes, 0, "")], mem_type="DRAM")
    x.register_memory([(dst.ctypes.data, dst.nbytes, 0, "")], mem_type="DRAM")
    name = x.add_remote_agent(y.get_agent_metadata())
    name = name.decode() if isinstance(name, bytes) else name
    local = x.get_xfer_descs([(dst.ctypes.data, dst.nbytes, 0)], mem_type="DRAM")
    remote = x.get_xfer_descs([(src.ctypes.data, src.nbytes, 0)], mem_type="DRAM")
    h = x.initialize_xfer("READ", local, remote, name)
    for _ in range(100):
        poll(x, h)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        state = poll(x, h)
        lat.append(time.perf_counter() - t)
        assert state == "DONE", state
    assert np.array_equal(src, dst)
    x.release_xfer_handle(h)
    return {
        "calls": n,
        "median_us": statistics.median(lat) * 1e6,
        "p90_us": float(np.percentile(lat, 90) * 1e6),
    }


def overhead_fabric(a: dict[str, Any]) -> dict[str, Any]:
    """The same 4 KiB READ through weft's fabric API directly."""
    from weft import Agent, AgentConfig

    secret = b"bench-nixl-api-secret-0123456789"
    x = Agent("fx", AgentConfig(["local", "tcp"], secret=secret))
    y = Agent("fy", AgentConfig(["local", "tcp"], secret=secret))
    src = np.arange(4 * KiB, dtype=np.uint8)
    dst = np.zeros(4 * KiB, np.uint8)
    y.register(src, name="src")
    rx = x.register(dst, name="dst")
    x.add_peer(y.metadata())
    prep = x.prepare(
        "READ", rx.descs([(0, dst.nbytes)]), "fy", x.remote("fy", "src").descs([(0, src.nbytes)])
    )
    for _ in range(100):
        prep.post().wait(timeout=10)
    lat = []
    for _ in range(a["calls"]):
        t = time.perf_counter()
        prep.post().wait(timeout=10)
        lat.append(time.perf_counter() - t)
    assert np.array_equal(src, dst)
    x.close()
    y.close()
    return {
        "calls": a["calls"],
        "median_us": statistics.median(lat) * 1e6,
        "p90_us": float(np.percentile(lat, 90) * 1e6),
    }


# ---- (d) the target SIGKILLed mid-READ -------------------------------------------------------


def kill_target(api: Any, conn: Connection, a: dict[str, Any]) -> None:
    agent = api.nixl_agent("kill-target", api.nixl_agent_config(backends=a["backends"]))
    bufs, _ = _layers(api, agent, a["kill_bytes"] // (LAYERS * MiB), MiB, seed=1)
    conn.send((agent.get_agent_metadata(), _block_descs(bufs, a["kill_bytes"] // (LAYERS * MiB), MiB)))
    conn.recv()  # killed before this returns


def kill_initiator(api: Any, conn: Connection, a: dict[str, Any]) -> dict[str, Any]:
    agent = api.nixl_agent("kill-initiator", api.nixl_agent_config(backends=a["backends"]))
    md, remote = conn.recv()
    name = agent.add_remote_agent(md)
    name = name.decode() if isinstance(name, bytes) else name
    blocks = a["kill_bytes"] // (LAYERS * MiB)
    bufs, _ = _layers(api, agent, blocks, MiB, seed=None)
    local = agent.prep_xfer_dlist("", _block_descs(bufs, blocks, MiB), mem_type="DRAM")
    far = agent.prep_xfer_dlist(name, remote, mem_type="DRAM")
    idx = list(range(LAYERS * blocks))
    h = agent.make_prepped_xfer("READ", local, idx, far, idx)
    state = agent.transfer(h)
    conn.send(("posted", state))
    conn.recv()  # the parent has killed and reaped the target
    t_dead = time.monotonic()
    end = t_dead + a["kill_deadline"]
    try:
        while state not in ("DONE", "ERR") and time.monotonic() < end:
            state = agent.check_xfer_state(h)
            time.sleep(0.0005)
    except Exception as e:  # what the API raises is the finding
        return {
            "outcome": f"raised {type(e).__name__}: {e}"[:200],
            "after_ms": (time.monotonic() - t_dead) * 1e3,
        }
    after = (time.monotonic() - t_dead) * 1e3
    if state not in ("DONE", "ERR"):
        return {"outcome": f"still {state} at the deadline (hang)", "after_ms": after}
    return {"outcome": str(state), "after_ms": after}


# ---- processes ------------------------------------------------------------------------------


def _child(flavour: str, fn_name: str, conn: Connection, a: dict[str, Any]) -> None:
    try:
        fn: Callable[..., Any] = globals()[fn_name]
        if fn_name == "overhead_fabric":
            conn.send(("ok", fn(a)))
            return
        os.environ.update(a.get("env", {}))
        if flavour == "weft":  # the group's join token, as a deployment sets it
            os.environ.setdefault("WEFT_SECRET", "bench-nixl-api-secret-0123456789")
        api = use(flavour)
        res = fn(api, conn, a) if fn_name.startswith(("blocks_", "kill_")) else fn(api, a)
        conn.send(("ok", {**(res or {}), "nixl_api": getattr(api, "__file__", api.__name__)}))
    except Exception:
        conn.send(("error", traceback.format_exc()[-3000:]))


def _start(ctx: Any, flavour: str, fn: str, a: dict[str, Any]) -> tuple[Any, Connection]:
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_child, args=(flavour, fn, theirs, a), daemon=True)
    p.start()
    return p, mine


def _result(p: Any, conn: Connection, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while not conn.poll(0.05):
        if time.monotonic() > end or not p.is_alive():
            p.kill()
            raise RuntimeError(f"no answer ({'timeout' if p.is_alive() else f'exit {p.exitcode}'})")
    tag, payload = conn.recv()
    while True:  # the two-process workloads send protocol messages first
        if tag in ("ok", "error"):
            break
        tag, payload = conn.recv()
    p.join(10)
    if tag == "error":
        raise RuntimeError(payload)
    return dict(payload)


def run_one(ctx: Any, flavour: str, fn: str, a: dict[str, Any]) -> dict[str, Any]:
    p, c = _start(ctx, flavour, fn, a)
    return _result(p, c, a["timeout"])


def run_pair(ctx: Any, flavour: str, a: dict[str, Any]) -> dict[str, Any]:
    """blocks: the target's and the initiator's pipes are bridged through this process."""
    pt, ct = _start(ctx, flavour, "blocks_target", a)
    pi, ci = _start(ctx, flavour, "blocks_initiator", a)
    end = time.monotonic() + a["timeout"]
    try:
        while True:
            for src, dst in ((ct, ci), (ci, ct)):
                if src.poll(0.01):
                    msg = src.recv()
                    if isinstance(msg, tuple) and msg and msg[0] in ("ok", "error") and src is ci:
                        if msg[0] == "error":
                            raise RuntimeError(msg[1])
                        return dict(msg[1])
                    if isinstance(msg, tuple) and msg and msg[0] == "error":
                        raise RuntimeError(msg[1])
                    if isinstance(msg, tuple) and msg and msg[0] == "ok":
                        continue  # the target's own end
                    dst.send(msg)
            if time.monotonic() > end:
                raise RuntimeError("blocks: timeout")
    finally:
        for p in (pt, pi):
            if p.is_alive():
                p.kill()
            p.join(10)


def run_kill(ctx: Any, flavour: str, a: dict[str, Any]) -> dict[str, Any]:
    pt, ct = _start(ctx, flavour, "kill_target", a)
    pi, ci = _start(ctx, flavour, "kill_initiator", a)
    try:
        if not ct.poll(a["timeout"]):
            raise RuntimeError("kill: target did not start")
        ci.send(ct.recv())
        if not ci.poll(a["timeout"]):
            raise RuntimeError("kill: initiator did not post")
        msg = ci.recv()
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        posted_state = msg[1]
        os.kill(pt.pid, signal.SIGKILL)
        pt.join(10)
        ci.send("dead")
        res = _result(pi, ci, a["kill_deadline"] + 30)
        res["state_when_killed"] = posted_state
        return res
    finally:
        for p in (pt, pi):
            if p.is_alive():
                p.kill()
            p.join(10)


# ---- report ---------------------------------------------------------------------------------


def print_table(report: dict[str, Any]) -> None:
    res = report["results"]

    def cell(fl: str, wl: str, key: str, field: str) -> float | None:
        r = res.get(fl, {}).get(wl)
        return None if not isinstance(r, dict) or key not in r else r[key].get(field)

    def line(label: str, n: float | None, w: float | None, unit: str, higher_better: bool = True) -> None:
        ns = f"{n:10.1f}" if n is not None else f"{'-':>10}"
        ws = f"{w:10.1f}" if w is not None else f"{'-':>10}"
        ratio = "-"
        if n and w:
            ratio = f"{(w / n if higher_better else n / w):.2f}x"
        print(f"{label:<34}{ns}{ws}   {unit:<6}{ratio:>8}")

    print(f"\n{'':<34}{'NIXL':>10}{'weft.nixl':>10}   {'unit':<6}{'weft/NIXL':>8}")
    for size in report["plan"]["posix_sizes"]:
        for op in ("put", "get"):
            line(
                f"posix {op} {fmt(size)} chunks",
                cell("nixl", "posix", str(size), f"{op}_MBps"),
                cell("weft", "posix", str(size), f"{op}_MBps"),
                "MB/s",
            )
    for size in report["plan"]["block_sizes"]:
        line(
            f"READ 64 layers x {fmt(size)} blocks",
            cell("nixl", "blocks", str(size), "read_MBps"),
            cell("weft", "blocks", str(size), "read_MBps"),
            "MB/s",
        )
    n = res.get("nixl", {}).get("overhead")
    w = res.get("weft", {}).get("overhead")
    f = res.get("fabric", {}).get("overhead")
    line("4 KiB transfer+check (median)", n and n.get("median_us"), w and w.get("median_us"), "us", False)
    if f and w and "median_us" in w:
        shim = w["median_us"] - f["median_us"]
        print(f"  weft fabric direct: {f['median_us']:.1f} us; shim overhead {shim:.1f} us")
    for fl in FLAVOURS:
        k = res.get(fl, {}).get("kill")
        if isinstance(k, dict) and "outcome" in k:
            print(f"  {fl}: target SIGKILLed mid-READ -> {k['outcome']} after {k['after_ms']:.1f} ms")
    for fl, wls in res.items():
        for wl, r in wls.items():
            if isinstance(r, dict) and "skipped" in r:
                print(f"  {fl} {wl}: skipped ({r['skipped']})")
            elif isinstance(r, dict) and "error" in r:
                print(f"  {fl} {wl}: FAILED: {r['error'].strip().splitlines()[-1]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a smaller span")
    ap.add_argument("--flavours", default="nixl,weft")
    ap.add_argument("--only", default=",".join(WORKLOADS), help=f"workloads ({', '.join(WORKLOADS)})")
    ap.add_argument("--reps", type=int, help="timed repeats per point (default 10, quick 3)")
    ap.add_argument("--dir", help="where the POSIX files go (default: the temp dir)")
    ap.add_argument("--backends", default="UCX", help="NIXL backends of the DRAM agents (default UCX)")
    ap.add_argument("--kill-deadline", type=float, default=10.0, help="seconds to wait for ERR after a kill")
    ap.add_argument(
        "--kill-ucx-tls",
        default="tcp",
        help="UCX_TLS for NIXL's processes in the kill case (default tcp: a READ slow enough to kill "
        "mid-way, as across hosts; '' for UCX's choice, shared memory here)",
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    a = ap.parse_args(argv)
    flavours = [f for f in a.flavours.split(",") if f]
    only = [w for w in a.only.split(",") if w]
    plan: dict[str, Any] = {
        "reps": a.reps or (3 if a.quick else 10),
        "warmup": 1,
        "posix_sizes": POSIX_SIZES,
        "block_sizes": BLOCK_SIZES,
        "span": (64 if a.quick else 256) * MiB,  # bytes per request (posix: chunks of a size)
        "pool": 64,
        "sizes": None,
        "calls": 2000 if a.quick else 10000,
        "backends": [b for b in a.backends.split(",") if b],
        "kill_bytes": 1024 * MiB,
        "kill_deadline": a.kill_deadline,
        "timeout": a.timeout,
        "dir": a.dir,
    }
    report: dict[str, Any] = {
        "bench": "NIXL's Python API: NIXL 1.5 against weft.nixl, same client code",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "plan": plan,
        "results": {},
    }
    ctx = mp.get_context("spawn")
    reasons = {
        "nixl": None if importlib.util.find_spec("nixl") else "nixl is not installed in this Python",
        "weft": None if importlib.util.find_spec("weft.nixl") else "weft.nixl is not in this tree",
    }
    for fl in flavours:
        res: dict[str, Any] = report["results"].setdefault(fl, {})
        for wl in only:
            if reasons.get(fl):
                res[wl] = {"skipped": reasons[fl]}
                continue
            print(f"{fl}: {wl}", flush=True)
            try:
                if wl == "posix":
                    res[wl] = run_one(ctx, fl, "posix", {**plan, "sizes": POSIX_SIZES})
                elif wl == "blocks":
                    res[wl] = run_pair(ctx, fl, {**plan, "sizes": BLOCK_SIZES})
                elif wl == "overhead":
                    res[wl] = run_one(ctx, fl, "overhead", plan)
                elif wl == "kill":
                    env = {"UCX_TLS": a.kill_ucx_tls} if a.kill_ucx_tls else {}
                    res[wl] = run_kill(ctx, fl, {**plan, "env": env})
            except Exception as e:
                res[wl] = {"error": str(e)}
    if "overhead" in only and "weft" in flavours:
        try:
            report["results"]["fabric"] = {"overhead": run_one(ctx, "weft", "overhead_fabric", plan)}
        except Exception as e:
            report["results"]["fabric"] = {"overhead": {"error": str(e)}}
    print_table(report)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "nixl_api.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
