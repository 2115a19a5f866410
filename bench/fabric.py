#!/usr/bin/env python3
"""weft against NIXL, DRAM -> DRAM, two OS processes on one host.

Contenders (each runs in its own freshly spawned processes, so UCX settings made in the
environment reach NIXL before it loads, and nothing of one contender leaks into another):

    numpy      np.copyto of the same bytes in one process: the memcpy limit
    socket     plain Python socket over loopback, sendall -> recv_into + 1-byte ack: the
               socket limit (shapes of 64 KiB and up)
    nixl       NIXL, UCX backend, default UCX_TLS, progress thread with pthrDelay=10 us
    nixl-tcp   the same with UCX_TLS=tcp
    weft       weft, backends ["local", "tcp"] (same-host fast path)
    weft-tcp   weft, backends ["tcp"]

A point is one shape (a single descriptor of 4 KiB .. 256 MiB, or a batch such as 1024 x 4 KiB
descriptors in one request) and one operation (WRITE or READ). The transfer handle is prepared
once per point and re-posted: warm-up posts, then the median of N timed posts. Timing runs on
the initiator from just before the post to the moment the transfer reports done. After every
post, outside the timing, the target's notification is awaited and the destination is compared
byte for byte with the expected pattern, then cleared. Metadata and verification travel over a
multiprocessing Pipe.

    python bench/fabric.py                      # everything installed: all six contenders
    python bench/fabric.py --quick              # fewer shapes and repetitions
    python bench/fabric.py --skip-nixl          # no NIXL columns (reported missing, not faked)
    python bench/fabric.py --contenders numpy,socket,nixl,nixl-tcp --sizes 4K,1M,1024x4K

Writes <out>/fabric.json and <out>/fabric.png (default out: bench/out/).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

CONTENDERS = ("numpy", "socket", "nixl", "nixl-tcp", "weft", "weft-tcp")
NIXL_CONTENDERS = ("nixl", "nixl-tcp")
WEFT_CONTENDERS = ("weft", "weft-tcp")
LIMITS = ("numpy", "socket")  # measured once per shape, shown for WRITE and READ alike
OPS = ("WRITE", "READ")

FULL_SIZES = "4K,64K,1M,16M,64M,256M,1024x4K,64x64K"
QUICK_SIZES = "4K,64K,1M,64M,1024x4K,64x64K"
SOCKET_MIN_BYTES = 64 * KiB

# Environment given to each contender's processes (None: removed).
CONTENDER_ENV: dict[str, dict[str, str | None]] = {
    "numpy": {},
    "socket": {},
    "nixl": {"UCX_TLS": None},
    "nixl-tcp": {"UCX_TLS": "tcp"},
    "weft": {},
    "weft-tcp": {},
}
WEFT_BACKENDS = {"weft": ["local", "tcp"], "weft-tcp": ["tcp"]}

NOTIFY_TIMEOUT = 30.0


# --------------------------------------------------------------------------------------
# shapes and layouts
# --------------------------------------------------------------------------------------
def parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": GiB}.get(t[-1:], 1)
    return int(t[:-1] if mult != 1 else t) * mult


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


@dataclasses.dataclass(frozen=True)
class Shape:
    """`count` descriptors of `block` bytes in one request."""

    count: int
    block: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        count, _, block = text.strip().lower().rpartition("x")
        return cls(int(count) if count else 1, parse_bytes(block))

    @property
    def total(self) -> int:
        return self.count * self.block

    @property
    def label(self) -> str:
        b = fmt_bytes(self.block)
        return b if self.count == 1 else f"{self.count} x {b}"

    @property
    def span(self) -> int:
        """Bytes of buffer a request of this shape touches on either side."""
        return self.block if self.count == 1 else (2 * self.count - 1) * self.block

    def layout(self) -> tuple[list[int], list[int]]:
        """(local offsets, remote offsets). A batch uses every other block on both sides, in
        opposite orders, so no two descriptors are adjacent and none can be merged."""
        if self.count == 1:
            return [0], [0]
        local = [2 * i * self.block for i in range(self.count)]
        return local, local[::-1]


def reps_for(shape: Shape, reps: int) -> int:
    """N for shapes up to 16 MiB; fewer (N * sqrt(16 MiB / bytes), at least 3) above."""
    if shape.total <= 16 * MiB:
        return reps
    return max(3, min(reps, round(reps * (16 * MiB / shape.total) ** 0.5)))


# --------------------------------------------------------------------------------------
# contents: a pattern that depends on the absolute offset and the repetition
# --------------------------------------------------------------------------------------
PERIOD = 251  # prime: a block landing at the wrong offset shows up
CHUNK = 8 * MiB


@functools.cache
def _tile() -> np.ndarray:
    return (np.arange(CHUNK + PERIOD, dtype=np.uint32) % PERIOD).astype(np.uint8)


def _rep_byte(rep: int) -> np.uint8:
    return np.uint8((rep * 37 + 1) & 0xFF)


def fill_pattern(buf: np.ndarray, off: int, n: int, rep: int) -> None:
    """buf[off:off+n] = pattern(absolute offset off.., rep)."""
    tile, r, pos = _tile(), _rep_byte(rep), 0
    while pos < n:
        m = min(CHUNK, n - pos)
        ph = (off + pos) % PERIOD
        np.add(tile[ph : ph + m], r, out=buf[off + pos : off + pos + m])
        pos += m


def matches_pattern(buf: np.ndarray, doff: int, soff: int, n: int, rep: int, scratch: np.ndarray) -> bool:
    """buf[doff:doff+n] equals the pattern the source holds at soff..soff+n."""
    tile, r, pos = _tile(), _rep_byte(rep), 0
    while pos < n:
        m = min(CHUNK, n - pos)
        ph = (soff + pos) % PERIOD
        np.add(tile[ph : ph + m], r, out=scratch[:m])
        if not np.array_equal(buf[doff + pos : doff + pos + m], scratch[:m]):
            return False
        pos += m
    return True


def verify(
    buf: np.ndarray,
    dst_offs: list[int],
    src_offs: list[int],
    block: int,
    span: int,
    rep: int,
    scratch: np.ndarray,
) -> bool:
    """Every destination block holds its source block's pattern; the rest of the span is 0."""
    for d, s in zip(dst_offs, src_offs, strict=True):
        if not matches_pattern(buf, d, s, block, rep, scratch):
            return False
    pos = 0
    for d in sorted(dst_offs):
        if d > pos and buf[pos:d].any():
            return False
        pos = d + block
    return not (span > pos and buf[pos:span].any())


def alloc(nbytes: int) -> np.ndarray:
    buf = np.empty(max(nbytes, 1), dtype=np.uint8)
    buf.fill(0)  # fault every page in now, not inside a timed transfer
    return buf


def summarize(times: list[float], nbytes: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "GBps": nbytes / med / 1e9,
        "times_us": [round(t * 1e6, 2) for t in times],
    }


# --------------------------------------------------------------------------------------
# plumbing between the initiator and target processes
# --------------------------------------------------------------------------------------
class Peer:
    """The initiator's end of the control Pipe to the target process."""

    def __init__(self, conn: mpc.Connection) -> None:
        self.conn = conn

    def call(self, *msg: Any) -> Any:
        self.conn.send(msg)
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"target process failed:\n{value}")
        return value


def _reply(conn: mpc.Connection, fn: Callable[[], Any]) -> bool:
    try:
        conn.send(("ok", fn()))
    except Exception:
        conn.send(("err", traceback.format_exc()))
        return False
    return True


# --------------------------------------------------------------------------------------
# NIXL (imported only in NIXL child processes)
# --------------------------------------------------------------------------------------
def _nixl_agent(name: str, pthr_delay: int) -> Any:
    import nixl._api as api
    from nixl._api import nixl_agent, nixl_agent_config

    if pthr_delay >= 0 and not getattr(api.nixlBind, "_weft_bench_patched", False):
        # nixl_agent hard-codes pthrDelay=0: its progress thread then spins a whole core even
        # when idle, which on a small host starves the very processes it serves. Wrap the
        # bound constructor to give the progress thread a delay (microseconds).
        orig = api.nixlBind.nixlAgent

        def patched(nm: str, cfg: Any, _orig: Any = orig, _delay: int = pthr_delay) -> Any:
            cfg.pthrDelay = _delay
            return _orig(nm, cfg)

        api.nixlBind.nixlAgent = patched
        api.nixlBind._weft_bench_patched = True
    return nixl_agent(name, nixl_agent_config(enable_prog_thread=True, backends=["UCX"]))


def _nixl_info() -> dict[str, Any]:
    import importlib.metadata as md

    import nixl

    info: dict[str, Any] = {"module": getattr(getattr(nixl, "_api", None), "__name__", "?")}
    with contextlib.suppress(Exception):
        info["version"] = md.version("nixl")
    return info


class NixlInitiator:
    contiguous = False
    ops = OPS

    def __init__(self, plan: dict[str, Any], peer: Peer, buf: np.ndarray) -> None:
        self.agent = _nixl_agent("a", plan["nixl_pthr_delay"])
        self.buf = buf
        self.reg = self.agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
        md, self.raddr = peer.call("hello")
        self.peer = self.agent.add_remote_agent(md)
        peer.call("peer_md", self.agent.get_agent_metadata())
        self.info = {**_nixl_info(), "pthrDelay_us": plan["nixl_pthr_delay"], "prog_thread": True}

    def prepare(self, op: str, shape: Shape, tag: bytes) -> Any:
        loffs, roffs = shape.layout()
        base = self.buf.ctypes.data
        ldl = np.array([(base + o, shape.block, 0) for o in loffs], dtype=np.uint64)
        rdl = np.array([(self.raddr + o, shape.block, 0) for o in roffs], dtype=np.uint64)
        local = self.agent.get_xfer_descs(ldl, "DRAM")
        remote = self.agent.get_xfer_descs(rdl, "DRAM")
        h = self.agent.initialize_xfer(op, local, remote, self.peer, tag)
        return (h, tag)

    def post_and_wait(self, prepared: Any) -> tuple[float, str]:
        h, tag = prepared
        agent = self.agent
        t0 = time.perf_counter()
        state = agent.transfer(h, tag)
        while state == "PROC":
            state = agent.check_xfer_state(h)
        dt = time.perf_counter() - t0
        if state != "DONE":
            raise RuntimeError(f"NIXL transfer ended {state}")
        return dt, "UCX"

    def backend(self, prepared: Any) -> str:
        return str(self.agent.query_xfer_backend(prepared[0]))

    def release(self, prepared: Any) -> None:
        self.agent.release_xfer_handle(prepared[0])

    def close(self) -> None:
        self.agent.deregister_memory(self.reg)


class NixlTarget:
    def __init__(self, plan: dict[str, Any], buf: np.ndarray) -> None:
        self.agent = _nixl_agent("b", plan["nixl_pthr_delay"])
        self.buf = buf
        self.reg = self.agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
        self.initiator = "a"

    def handle(self, msg: tuple[Any, ...]) -> Any:
        if msg[0] == "hello":
            return self.agent.get_agent_metadata(), self.buf.ctypes.data
        if msg[0] == "peer_md":
            self.initiator = self.agent.add_remote_agent(msg[1])
            if isinstance(self.initiator, bytes):
                self.initiator = self.initiator.decode()
            return None
        raise ValueError(f"unknown message {msg[0]!r}")

    def await_notification(self, tag: bytes) -> None:
        deadline = time.monotonic() + NOTIFY_TIMEOUT
        while not self.agent.check_remote_xfer_done(self.initiator, tag):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no NIXL notification {tag!r}")

    def close(self) -> None:
        self.agent.deregister_memory(self.reg)


# --------------------------------------------------------------------------------------
# weft
# --------------------------------------------------------------------------------------
def _import_weft() -> Any:
    if (REPO_ROOT / "weft" / "__init__.py").exists() and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import weft

    return weft


class WeftInitiator:
    contiguous = False
    ops = OPS

    def __init__(self, plan: dict[str, Any], peer: Peer, buf: np.ndarray) -> None:
        weft = _import_weft()
        self.weft = weft
        self.agent = weft.Agent("a", weft.AgentConfig(backends=WEFT_BACKENDS[plan["contender"]]))
        self.reg = self.agent.register(buf, name="src")
        self.peer = self.agent.add_peer(peer.call("hello"))
        self.remote = self.agent.remote(self.peer, "kv")
        self.info = {
            "version": getattr(weft, "__version__", "?"),
            "backends": WEFT_BACKENDS[plan["contender"]],
        }

    def prepare(self, op: str, shape: Shape, tag: bytes) -> Any:
        loffs, roffs = shape.layout()
        local = self.reg.descs([(o, shape.block) for o in loffs])
        remote = self.remote.descs([(o, shape.block) for o in roffs])
        return self.agent.prepare(self.weft.Op[op], local, self.peer, remote, notify=tag)

    def post_and_wait(self, prepared: Any) -> tuple[float, str]:
        t0 = time.perf_counter()
        t = prepared.post()
        t.wait(timeout=60)
        dt = time.perf_counter() - t0
        if t.state is not self.weft.TransferState.DONE:
            raise RuntimeError(f"weft transfer ended {t.state}")
        backend = getattr(t, "backend", "?")
        return dt, str(getattr(backend, "value", backend))

    def backend(self, prepared: Any) -> str:
        return "?"

    def release(self, prepared: Any) -> None:
        rel = getattr(prepared, "release", None)
        if rel is not None:
            rel()

    def close(self) -> None:
        self.reg.release()
        self.agent.close()


class WeftTarget:
    def __init__(self, plan: dict[str, Any], buf: np.ndarray) -> None:
        weft = _import_weft()
        self.agent = weft.Agent("b", weft.AgentConfig(backends=WEFT_BACKENDS[plan["contender"]]))
        self.reg = self.agent.register(buf, name="kv")

    def handle(self, msg: tuple[Any, ...]) -> Any:
        if msg[0] == "hello":
            return self.agent.metadata()
        raise ValueError(f"unknown message {msg[0]!r}")

    def await_notification(self, tag: bytes) -> None:
        self.agent.wait_notification("a", tag, timeout=NOTIFY_TIMEOUT)

    def close(self) -> None:
        self.reg.release()
        self.agent.close()


# --------------------------------------------------------------------------------------
# raw socket over loopback: the socket limit (WRITE direction, one contiguous buffer)
# --------------------------------------------------------------------------------------
class SocketInitiator:
    contiguous = True
    ops = ("WRITE",)

    def __init__(self, plan: dict[str, Any], peer: Peer, buf: np.ndarray) -> None:
        port = peer.call("hello")
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.view = memoryview(buf)
        self.ack = bytearray(1)
        self.peer = peer
        self.info = {"transport": "AF_INET loopback, TCP_NODELAY, default buffers"}

    def prepare(self, op: str, shape: Shape, tag: bytes) -> Any:
        return shape.total

    def post_and_wait(self, prepared: Any) -> tuple[float, str]:
        n = prepared
        self.peer.call("recv", n)  # target is about to block in recv_into
        t0 = time.perf_counter()
        self.sock.sendall(self.view[:n])
        if self.sock.recv_into(self.ack, 1) != 1 or self.ack[0] != 1:
            raise RuntimeError("socket target did not ack")
        return time.perf_counter() - t0, "socket"

    def backend(self, prepared: Any) -> str:
        return "socket"

    def release(self, prepared: Any) -> None:
        pass

    def close(self) -> None:
        self.sock.close()


class SocketTarget:
    def __init__(self, plan: dict[str, Any], buf: np.ndarray) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.view = memoryview(buf)
        self.sock: socket.socket | None = None

    def handle(self, msg: tuple[Any, ...]) -> Any:
        if msg[0] == "hello":
            return self.srv.getsockname()[1]
        raise ValueError(f"unknown message {msg[0]!r}")

    def ready(self) -> None:
        if self.sock is None:  # the initiator connected right after "hello"
            self.sock, _ = self.srv.accept()
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def receive(self, n: int) -> None:
        assert self.sock is not None
        got = 0
        while got < n:
            k = self.sock.recv_into(self.view[got:n])
            if not k:
                raise EOFError("socket initiator went away")
            got += k
        self.sock.sendall(b"\x01")

    def await_notification(self, tag: bytes) -> None:
        pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.srv.close()


INITIATORS: dict[str, Any] = {
    "socket": SocketInitiator,
    "nixl": NixlInitiator,
    "nixl-tcp": NixlInitiator,
    "weft": WeftInitiator,
    "weft-tcp": WeftInitiator,
}
TARGETS: dict[str, Any] = {
    "socket": SocketTarget,
    "nixl": NixlTarget,
    "nixl-tcp": NixlTarget,
    "weft": WeftTarget,
    "weft-tcp": WeftTarget,
}


# --------------------------------------------------------------------------------------
# child process bodies
# --------------------------------------------------------------------------------------
def _target_check(
    impl: Any,
    buf: np.ndarray,
    scratch: np.ndarray,
    op: str,
    shape: Shape,
    contiguous: bool,
    tag: bytes,
    rep: int,
) -> bool:
    """Await the notification; after a WRITE compare the destination. Then clear the span
    (after a READ it held this repetition's source pattern)."""
    impl.await_notification(tag)
    sh = Shape(1, shape.total) if contiguous else shape
    ok = True
    if op == "WRITE":
        loffs, roffs = sh.layout()
        ok = verify(buf, roffs, loffs, sh.block, sh.span, rep, scratch)
    buf[: sh.span].fill(0)
    return ok


def target_main(plan: dict[str, Any], conn: mpc.Connection) -> None:
    """Serves the initiator's control messages; each gets one ("ok", value) or ("err", tb)."""
    buf = alloc(plan["bufsize"])
    scratch = np.empty(CHUNK, dtype=np.uint8)
    impl: Any = None
    try:
        impl = TARGETS[plan["contender"]](plan, buf)
    except Exception:
        conn.send(("err", traceback.format_exc()))
        return
    conn.send(("ok", None))  # started
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            kind = msg[0]
            if kind == "quit":
                _reply(conn, lambda: None)
                return
            if kind == "fill":  # READ source for this repetition
                _reply(conn, functools.partial(fill_pattern, buf, 0, msg[1], msg[2]))
            elif kind == "check":
                _reply(conn, functools.partial(_target_check, impl, buf, scratch, *msg[1:]))
            elif kind == "recv":  # socket: reply, then block receiving msg[1] bytes
                if _reply(conn, impl.ready):
                    impl.receive(msg[1])
            else:
                _reply(conn, functools.partial(impl.handle, msg))
    except Exception:
        traceback.print_exc()
    finally:
        if impl is not None:
            with contextlib.suppress(Exception):
                impl.close()


def initiator_main(plan: dict[str, Any], conn: mpc.Connection, results: mpc.Connection) -> None:
    """Runs every point of one contender; sends ("info", dict), ("point", dict) per point,
    then ("done", None) or ("error", traceback)."""
    peer = Peer(conn)
    impl: Any = None
    try:
        status, value = conn.recv()  # the target's start-up report
        if status != "ok":
            raise RuntimeError(f"target process failed to start:\n{value}")
        buf = alloc(plan["bufsize"])
        scratch = np.empty(CHUNK, dtype=np.uint8)
        impl = INITIATORS[plan["contender"]](plan, peer, buf)
        results.send(("info", impl.info))
        serial = 0
        for count, block in plan["shapes"]:
            shape = Shape(count, block)
            if impl.contiguous and shape.total < SOCKET_MIN_BYTES:
                continue
            sh = Shape(1, shape.total) if impl.contiguous else shape
            loffs, roffs = sh.layout()
            reps = reps_for(shape, plan["reps"])
            for op in plan["ops"]:
                if op not in impl.ops:
                    continue
                serial += 1
                tag = f"w{serial:05d}|".encode()  # fixed width: no tag is a prefix of another
                prepared = impl.prepare(op, shape, tag)
                backend = impl.backend(prepared)
                times: list[float] = []
                ok_all = True
                for rep in range(plan["warmup"] + reps):
                    if op == "WRITE":
                        fill_pattern(buf, 0, sh.span, rep)
                    else:
                        peer.call("fill", sh.span, rep)
                        buf[: sh.span].fill(0)
                    dt, backend_used = impl.post_and_wait(prepared)
                    ok = peer.call("check", op, shape, impl.contiguous, tag, rep)
                    if op == "READ":
                        ok = ok and verify(buf, loffs, roffs, sh.block, sh.span, rep, scratch)
                    if not ok:
                        raise RuntimeError(f"{shape.label} {op} rep {rep}: contents differ")
                    ok_all = ok_all and ok
                    if rep >= plan["warmup"]:
                        times.append(dt)
                impl.release(prepared)
                point = {
                    "shape": shape.label,
                    "count": shape.count,
                    "block": shape.block,
                    "bytes": shape.total,
                    "op": op,
                    "reps": reps,
                    "warmup": plan["warmup"],
                    "verified": ok_all,
                    "backend": backend if backend != "?" else backend_used,
                    **summarize(times, shape.total),
                }
                results.send(("point", point))
        results.send(("done", None))
    except Exception:
        results.send(("error", traceback.format_exc()))
    finally:
        if impl is not None:
            with contextlib.suppress(Exception):
                impl.close()
        with contextlib.suppress(Exception):
            peer.call("quit")


def numpy_main(plan: dict[str, Any], results: mpc.Connection) -> None:
    """np.copyto of each shape's total bytes, contiguous: the memcpy limit."""
    try:
        src = alloc(plan["bufsize"])
        dst = alloc(plan["bufsize"])
        scratch = np.empty(CHUNK, dtype=np.uint8)
        results.send(("info", {"numpy": np.__version__}))
        for count, block in plan["shapes"]:
            shape = Shape(count, block)
            n = shape.total
            reps = reps_for(shape, plan["reps"])
            times: list[float] = []
            ok_all = True
            for rep in range(plan["warmup"] + reps):
                fill_pattern(src, 0, n, rep)
                t0 = time.perf_counter()
                np.copyto(dst[:n], src[:n])
                dt = time.perf_counter() - t0
                ok_all = ok_all and matches_pattern(dst, 0, 0, n, rep, scratch)
                dst[:n].fill(0)
                if rep >= plan["warmup"]:
                    times.append(dt)
            results.send(
                (
                    "point",
                    {
                        "shape": shape.label,
                        "count": shape.count,
                        "block": shape.block,
                        "bytes": n,
                        "op": "COPY",
                        "reps": reps,
                        "warmup": plan["warmup"],
                        "verified": ok_all,
                        "backend": "np.copyto",
                        **summarize(times, n),
                    },
                )
            )
        results.send(("done", None))
    except Exception:
        results.send(("error", traceback.format_exc()))


# --------------------------------------------------------------------------------------
# orchestration (this process imports neither nixl nor weft)
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def patched_env(changes: dict[str, str | None]) -> Iterator[None]:
    def apply(values: dict[str, str | None]) -> None:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    saved = {k: os.environ.get(k) for k in changes}
    try:
        apply(changes)
        yield
    finally:
        apply(saved)


def run_contender(name: str, plan: dict[str, Any], timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    plan = {**plan, "contender": name}
    env = dict(CONTENDER_ENV[name])
    if name in NIXL_CONTENDERS:
        env.setdefault("NIXL_LOG_LEVEL", os.environ.get("NIXL_LOG_LEVEL", "WARN"))
    res_r, res_w = ctx.Pipe(duplex=False)
    procs: list[Any] = []
    with patched_env(env):
        shown_env = {k: v for k, v in os.environ.items() if k.startswith(("UCX_", "NIXL_"))}
        if name == "numpy":
            procs.append(ctx.Process(target=numpy_main, args=(plan, res_w), name="numpy"))
        else:
            ci, ct = ctx.Pipe()
            procs.append(ctx.Process(target=target_main, args=(plan, ct), name=f"{name}-target"))
            procs.append(ctx.Process(target=initiator_main, args=(plan, ci, res_w), name=f"{name}-initiator"))
        for p in procs:
            p.start()
    res_w.close()
    if name != "numpy":
        ci.close()
        ct.close()
    out: dict[str, Any] = {"status": "running", "env": shown_env, "points": [], "info": {}}
    deadline = time.monotonic() + timeout
    t_start = time.monotonic()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not res_r.poll(left):
                out.update(status="error", error=f"timed out after {timeout:.0f} s")
                break
            try:
                kind, value = res_r.recv()
            except EOFError:
                out.update(status="error", error="initiator process died without a report")
                break
            if kind == "info":
                out["info"] = value
            elif kind == "point":
                out["points"].append(value)
                ms = value["median_s"] * 1e3
                print(
                    f"  {name:9s} {value['op']:5s} {value['shape']:>14s}: {value['GBps']:8.3f} GB/s"
                    f"  median {ms:9.3f} ms  (n={value['reps']}, verified={value['verified']},"
                    f" via {value['backend']})",
                    flush=True,
                )
            elif kind == "done":
                out["status"] = "ok"
                break
            else:
                out.update(status="error", error=value)
                break
    finally:
        for p in procs:
            p.join(max(1.0, min(30.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    out["wall_s"] = round(time.monotonic() - t_start, 2)
    if out["status"] == "error":
        print(f"  {name}: FAILED: {out['error'].strip().splitlines()[-1]}", flush=True)
    return out


def merge_rounds(prev: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Pool the repetitions of a later round into the earlier one's points."""
    if new["status"] != "ok":
        return {**new, "points": prev["points"], "error": f"in a later round: {new.get('error')}"}
    by_key = {(p["shape"], p["op"]): p for p in new["points"]}
    points = []
    for p in prev["points"]:
        q = by_key.get((p["shape"], p["op"]))
        times = p["times_us"] + (q["times_us"] if q else [])
        points.append(
            {
                **p,
                "reps": len(times),
                "verified": p["verified"] and (q is None or q["verified"]),
                **summarize([t / 1e6 for t in times], p["bytes"]),
            }
        )
    return {**prev, "points": points, "wall_s": prev["wall_s"] + new["wall_s"]}


def _result_map(report: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(contender, shape, op) -> point; limits are entered under both ops."""
    m: dict[tuple[str, str, str], dict[str, Any]] = {}
    for name, c in report["contenders"].items():
        for p in c.get("points", []):
            for op in OPS if name in LIMITS else (p["op"],):
                m[(name, p["shape"], op)] = p
    return m


def _missing_reason(report: dict[str, Any], name: str) -> str:
    c = report["contenders"].get(name)
    if c is None:
        return "not selected"
    return str(c.get("reason") or c.get("error", "")).strip().splitlines()[-1] if c["status"] != "ok" else ""


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


RATIOS = (
    ("weft/nixl", "weft", "nixl"),
    ("weft-tcp/nixl-tcp", "weft-tcp", "nixl-tcp"),
    ("weft-tcp/socket", "weft-tcp", "socket"),
)


def table_rows(report: dict[str, Any], stat: str = "median") -> list[dict[str, Any]]:
    """One row per (shape, op): GB/s and time per request (us) per contender, by the median
    or the best repetition (None: not measured), and the ratios."""
    m = _result_map(report)
    key = "median_s" if stat == "median" else "min_s"
    rows = []
    for shape in report["shapes"]:
        for op in report["ops"]:
            row: dict[str, Any] = {"shape": shape, "op": op, "stat": stat, "GBps": {}, "us": {}, "ratios": {}}
            for name in report["contenders"]:
                p = m.get((name, shape, op))
                row["GBps"][name] = p["bytes"] / p[key] / 1e9 if p else None
                row["us"][name] = p[key] * 1e6 if p else None
            for label, a, b in RATIOS:
                ga, gb = row["GBps"].get(a), row["GBps"].get(b)
                row["ratios"][label] = ga / gb if ga and gb else None
            rows.append(row)
    return rows


def print_table(report: dict[str, Any], stat: str = "median") -> None:
    names = [n for n in CONTENDERS if n in report["contenders"]]

    def cell(name: str, value: float | None, fmt: str) -> str:
        if value is not None:
            return format(value, fmt)
        status = report["contenders"][name]["status"]
        return {"skipped": "skip", "error": "fail"}.get(status, "-")

    for title, key, fmt in (
        (f"throughput, GB/s ({stat} of the repetitions)", "GBps", ".3f"),
        (f"time per request, us ({stat})", "us", ".1f"),
    ):
        head = ["shape", "op", *names]
        if key == "GBps":
            head += [r[0] for r in RATIOS]
        rows = [head]
        for tr in report["tables"][stat]:
            row = [tr["shape"], tr["op"]] + [cell(n, tr[key][n], fmt) for n in names]
            if key == "GBps":
                row += [f"{v:.2f}" if v is not None else "-" for v in tr["ratios"].values()]
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        print(f"\n{title}  (numpy, socket: limits, the same total bytes in one buffer; socket >= 64 KiB)")
        for i, r in enumerate(rows):
            cells = (
                c.rjust(w) if j > 1 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            print("  ".join(cells))
            if i == 0:
                print("  ".join("-" * w for w in widths))
    for name in names:
        why = _missing_reason(report, name)
        if why:
            print(f"{name}: column missing ({why}); no numbers were made up for it")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = _result_map(report)
    shapes = report["shapes"]
    styles = {
        "numpy": ("k", ":"),
        "socket": ("0.5", ":"),
        "nixl": ("tab:green", "-"),
        "nixl-tcp": ("tab:green", "--"),
        "weft": ("tab:blue", "-"),
        "weft-tcp": ("tab:blue", "--"),
    }
    fig, axes = plt.subplots(1, len(report["ops"]), figsize=(7 * len(report["ops"]), 5), squeeze=False)
    for ax, op in zip(axes[0], report["ops"], strict=True):
        for name in CONTENDERS:
            if name not in report["contenders"]:
                continue
            xs = [i for i, s in enumerate(shapes) if (name, s, op) in m]
            if not xs:
                continue
            ys = [m[(name, shapes[i], op)]["GBps"] for i in xs]
            color, ls = styles[name]
            ax.plot(
                xs,
                ys,
                marker="o",
                color=color,
                linestyle=ls,
                label=name + (" (limit)" if name in LIMITS else ""),
            )
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("GB/s (median)")
        ax.set_title(f"DRAM -> DRAM {op}, two processes, one host")
        ax.grid(True, which="both", alpha=0.3)
        first_batch = next((i for i, s in enumerate(shapes) if " x " in s), None)
        if first_batch:
            ax.axvline(first_batch - 0.5, color="0.7", linewidth=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    host = report["host"]
    fig.suptitle(
        f"weft vs NIXL ({host['cpus']} CPUs, load {host['load_start']} -> {host.get('load_end', '?')},"
        f" {report['started']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SIZES}, 5 reps, 1 warm-up")
    ap.add_argument(
        "--reps",
        type=int,
        help="timed posts per point up to 16 MiB (default 30, quick 5); bigger shapes use fewer, at least 3",
    )
    ap.add_argument("--warmup", type=int, help="untimed posts per point (default 2, quick 1)")
    ap.add_argument("--sizes", help=f"comma-separated shapes, COUNTxSIZE for batches (default {FULL_SIZES})")
    ap.add_argument("--ops", default="WRITE,READ", help="WRITE,READ (default both)")
    ap.add_argument(
        "--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}"
    )
    ap.add_argument("--skip-nixl", action="store_true", help="leave the NIXL contenders out")
    ap.add_argument(
        "--nixl-pthr-delay",
        type=int,
        default=10,
        help="NIXL progress-thread delay in us (default 10; -1 keeps NIXL's 0)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole sequence of contenders this many times and pool the repetitions "
        "(spreads a noisy host's slow spells over all contenders)",
    )
    ap.add_argument(
        "--stat",
        choices=("median", "best"),
        default="median",
        help="statistic of the printed table (the JSON holds both)",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per contender")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="output folder")
    a = ap.parse_args(argv)

    sizes = a.sizes or (QUICK_SIZES if a.quick else FULL_SIZES)
    try:
        shapes = [Shape.parse(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"cannot read --sizes {sizes!r} (e.g. 4K,1M,256M,1024x4K)")
    if not shapes or min(s.total for s in shapes) <= 0:
        ap.error("--sizes: give at least one shape of at least 1 byte")
    ops = [o.strip().upper() for o in a.ops.split(",") if o.strip()]
    names = [n.strip() for n in a.contenders.split(",") if n.strip()]
    for n in names:
        if n not in CONTENDERS:
            ap.error(f"unknown contender {n!r} (choose from {', '.join(CONTENDERS)})")
    for o in ops:
        if o not in OPS:
            ap.error(f"unknown op {o!r}")
    plan = {
        "shapes": [(s.count, s.block) for s in shapes],
        "ops": ops,
        "reps": a.reps or (5 if a.quick else 30),
        "warmup": a.warmup if a.warmup is not None else (1 if a.quick else 2),
        "bufsize": max(s.span for s in shapes),
        "nixl_pthr_delay": a.nixl_pthr_delay,
    }
    report: dict[str, Any] = {
        "bench": "weft vs NIXL, DRAM->DRAM, two processes, one host",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "load_start": _load(),
        },
        "plan": {
            **plan,
            "rounds": a.rounds,
            "timing": "initiator: post -> done; median of reps after warm-up",
        },
        "shapes": [s.label for s in shapes],
        "ops": ops,
        "contenders": {},
    }
    have_nixl = importlib.util.find_spec("nixl") is not None
    have_weft = (REPO_ROOT / "weft" / "__init__.py").exists() or importlib.util.find_spec("weft")
    if report["host"]["load_start"] > 0.5:
        print(f"note: load average {report['host']['load_start']}: other work on this host adds noise")
    print(
        f"{report['bench']}: shapes {', '.join(report['shapes'])}; ops {', '.join(ops)}; "
        f"reps {plan['reps']} (fewer above 16 MiB), warm-up {plan['warmup']}",
        flush=True,
    )
    runnable = []
    for name in CONTENDERS:
        if name not in names:
            continue
        reason = None
        if name in NIXL_CONTENDERS and a.skip_nixl:
            reason = "--skip-nixl given"
        elif name in NIXL_CONTENDERS and not have_nixl:
            reason = "nixl is not installed in this Python"
        elif name in WEFT_CONTENDERS and not have_weft:
            reason = "weft is not importable"
        if reason:
            report["contenders"][name] = {"status": "skipped", "reason": reason, "points": []}
            print(f"{name}: skipped ({reason})", flush=True)
        else:
            runnable.append(name)
    for rnd in range(a.rounds):
        for name in runnable:
            prev = report["contenders"].get(name)
            if prev is not None and prev["status"] != "ok":
                continue  # failed in an earlier round
            print(f"{name}: running" + (f" (round {rnd + 1}/{a.rounds})" if a.rounds > 1 else ""), flush=True)
            out = run_contender(name, plan, a.timeout)
            report["contenders"][name] = out if prev is None else merge_rounds(prev, out)

    report["host"]["load_end"] = _load()
    report["tables"] = {stat: table_rows(report, stat) for stat in ("median", "best")}
    print_table(report, a.stat)
    print(
        f"load average (1 min) at start {report['host']['load_start']}, at end {report['host']['load_end']}"
    )
    a.out.mkdir(parents=True, exist_ok=True)
    jpath, ppath = a.out / "fabric.json", a.out / "fabric.png"
    jpath.write_text(json.dumps(report, indent=1))
    try:
        plot(report, ppath)
    except ImportError as e:
        print(f"no plot ({e}); pip install matplotlib")
    else:
        print(f"\nwrote {jpath} and {ppath}")
    failed = [n for n, c in report["contenders"].items() if c["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
