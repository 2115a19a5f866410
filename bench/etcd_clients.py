#!/usr/bin/env python3
"""Python etcd v3 clients against a real etcd: what works, how fast, what survives a restart.

weft keeps its group membership in etcd, so the choice of client decides how the control plane
behaves when etcd restarts, when a token expires, and what it costs per request. This bench
runs one scenario per client, each in its own freshly started interpreter (protobuf picks its
implementation once per process, so a setting made for one client never reaches another), and
each against its own freshly started etcd:

    aetcd           aetcd 1.0.0, asyncio over grpc.aio
    etcd3gw         etcd3gw 2.7.0, HTTP/JSON through etcd's gRPC gateway (requests)
    etcd3           python-etcd3 0.12.0, sync grpc; needs its own interpreter (--python-etcd3)
                    and is tried twice: with the installed protobuf as it is, then with
                    PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python when that import fails
    raw-grpc        grpc.aio calls made directly with aetcd's generated stubs (aetcd.rpc):
                    what a thin client of our own on top of those stubs costs
    raw-grpc-tuned  the same with a short gRPC reconnect backoff (100 ms .. 1 s)

The scenario (the same steps for every client, each step bounded by a deadline):

    import        does `import` work, and how long it takes
    correctness   put/get, prefix get, lease keep-alive past the TTL, lease expiry without it,
                  prefix watch (PUT and DELETE seen, sibling `/p/ab` of `/p/a/` not seen),
                  compare-and-swap on mod_revision and on value, create-if-absent
    latency       put+get round trip, get alone, one lease keep-alive, watch delivery (from
                  just before the put to the event in the client's hands)
    restart       lease kept alive and prefix watch open; etcd gets SIGTERM, 2 s later starts
                  again on the same port and data: first successful put, fate of the open
                  watch, keep-alive after the restart, lease still there, new watch possible
    auth          a second etcd with auth on and --auth-token-ttl 3: a put after the client
                  idled past the token TTL, and a put after that etcd restarted
    resource      RSS, peak RSS and threads of the client's process at the end

    python bench/etcd_clients.py                                  # all but python-etcd3
    python bench/etcd_clients.py --python-etcd3 VENV/bin/python   # with python-etcd3
    python bench/etcd_clients.py --clients aetcd,raw-grpc --quick

Writes the JSON to --out (default bench/out/etcd_clients.json) and the markdown tables next
to it (same name, .md); prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

CLIENTS = ("aetcd", "etcd3gw", "etcd3", "raw-grpc", "raw-grpc-tuned")
PB_ENV = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"

HOST = "127.0.0.1"
CALL_TIMEOUT = 5.0  # per request, given to every client
LEASE_TTL = 3  # correctness: etcd 3.4's minimum TTL is 2 s with the default heartbeat
RESTART_LEASE_TTL = 10
RESTART_PAUSE = 2.0
KEEPALIVE_INTERVAL = 0.25  # the background keep-alive loop of the restart phase
AUTH_TOKEN_TTL = 3
AUTH_USER = "root"
AUTH_PASSWORD = "bench-password"  # a throw-away etcd on loopback, removed at the end

# Both knobs of gRPC's reconnect backoff (default: 1 s growing by 1.6x up to 120 s).
TUNED_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def now() -> float:
    return time.perf_counter()


def err_text(exc: BaseException) -> str:
    """One line naming an exception: its type and, for gRPC errors, the status and details."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        with contextlib.suppress(Exception):
            return f"{type(exc).__name__}: {code()} {details()}"[:300]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with prefix"."""
    s = bytearray(prefix)
    for i in reversed(range(len(s))):
        if s[i] < 0xFF:
            s[i] += 1
            return bytes(s[: i + 1])
    return b"\0"


# ---------------------------------------------------------------------------------------------
# Watch handles: every client's events end up in one queue as (kind, key, detail, time).
# kind is "PUT", "DELETE", "error" (the watch raised) or "end" (the stream ended quietly).
# ---------------------------------------------------------------------------------------------

WatchItem = tuple[str, bytes | None, str, float]


class SyncWatch:
    """Events pushed by a client's own thread; waiting blocks (the loop has nothing else to do)."""

    def __init__(self, cancel: Callable[[], Any]) -> None:
        self.q: queue.Queue[WatchItem] = queue.Queue()
        self._cancel = cancel

    def push(self, item: WatchItem) -> None:
        self.q.put(item)

    async def next(self, timeout: float) -> WatchItem | None:
        try:
            return self.q.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    async def cancel(self) -> None:
        with contextlib.suppress(Exception):
            self._cancel()


class AsyncWatch:
    """Events pushed by a task of the client's event loop."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[WatchItem] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.on_cancel: Callable[[], Any] | None = None

    def push(self, item: WatchItem) -> None:
        self.q.put_nowait(item)

    async def next(self, timeout: float) -> WatchItem | None:
        try:
            return await asyncio.wait_for(self.q.get(), max(timeout, 0.0))
        except TimeoutError:
            return None

    async def cancel(self) -> None:
        with contextlib.suppress(Exception):
            if self.on_cancel is not None:
                result = self.on_cancel()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, CALL_TIMEOUT)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


# ---------------------------------------------------------------------------------------------
# Adapters: the same small surface over each client. Async clients implement it with async
# methods; blocking clients with plain methods, wrapped by Inline so the scenario can await
# them (the call runs inline: no thread hop is added to a blocking client's latency).
# ---------------------------------------------------------------------------------------------


class Adapter:
    name = ""
    dist = ""  # the distribution whose version is reported
    module = ""  # what `import` is tried
    is_async = False
    supports_auth = True
    tls_note = ""

    def load(self) -> None:
        importlib.import_module(self.module)

    def features(self) -> dict[str, Any]:
        return {"tls": self.tls_note}


class AetcdAdapter(Adapter):
    name, dist, module, is_async = "aetcd", "aetcd", "aetcd", True

    def load(self) -> None:
        import aetcd

        self.m = aetcd

    def features(self) -> dict[str, Any]:
        params = list(inspect.signature(self.m.Client).parameters)
        tls = [p for p in params if "cert" in p or "ssl" in p or "tls" in p or "cred" in p]
        source = inspect.getsource(self.m.Client.connect)
        return {
            "client_params": params,
            "tls": f"parameters {tls}" if tls else "none: Client has no TLS parameter",
            "connect_uses_insecure_channel": "insecure_channel" in source,
            "connect_uses_secure_channel": "secure_channel(" in source.replace("insecure_channel(", ""),
            "token_set_once_in_connect": "Authenticate(" in source,
        }

    async def connect(
        self, host: str, port: int, user: str | None = None, password: str | None = None
    ) -> None:
        self.c = self.m.Client(host=host, port=port, username=user, password=password, timeout=CALL_TIMEOUT)
        await asyncio.wait_for(self.c.connect(), CALL_TIMEOUT)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.c.close(), CALL_TIMEOUT)

    async def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        await self.c.put(key, value, lease=lease)

    async def get(self, key: bytes) -> tuple[bytes, int] | None:
        r = await self.c.get(key)
        return None if r is None else (r.value, r.mod_revision)

    async def get_prefix(self, prefix: bytes) -> list[bytes]:
        return sorted(kv.key for kv in await self.c.get_prefix(prefix))

    async def delete(self, key: bytes) -> None:
        await self.c.delete(key)

    async def lease_grant(self, ttl: int) -> int:
        return int((await self.c.lease(ttl)).id)

    async def keepalive_once(self, lease: int) -> int:
        # aetcd opens a LeaseKeepAlive stream, sends one request, reads one answer, closes it.
        return int((await self.c.refresh_lease(lease)).TTL)

    async def lease_ttl(self, lease: int) -> int:
        return int((await self.c.get_lease_info(lease, keys=False)).TTL)

    async def _txn(self, compare: Any, key: bytes, value: bytes) -> bool:
        # failure=[] is needed: aetcd's default failure=None fails with TypeError
        put = self.c.transactions.put(key, value)
        ok, _ = await self.c.transaction(compare=[compare], success=[put], failure=[])
        return bool(ok)

    async def cas_mod(self, key: bytes, rev: int, value: bytes) -> bool:
        return await self._txn(self.c.transactions.mod(key) == rev, key, value)

    async def cas_value(self, key: bytes, old: bytes, value: bytes) -> bool:
        return await self._txn(self.c.transactions.value(key) == old, key, value)

    async def create(self, key: bytes, value: bytes) -> bool:
        return await self._txn(self.c.transactions.create(key) == 0, key, value)

    async def watch_prefix(self, prefix: bytes) -> AsyncWatch:
        w = await self.c.watch_prefix(prefix)
        h = AsyncWatch()

        async def pump() -> None:
            try:
                async for ev in w:
                    h.push((str(ev.kind), ev.kv.key, "", now()))
                h.push(("end", None, "", now()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                h.push(("error", None, err_text(exc), now()))

        h.task = asyncio.get_running_loop().create_task(pump())
        h.on_cancel = w.cancel
        return h


class RawGrpcAdapter(Adapter):
    """grpc.aio + aetcd's generated stubs; one long-lived LeaseKeepAlive stream, reopened on error."""

    name, dist, module, is_async = "raw-grpc", "grpcio", "aetcd.rpc", True
    tls_note = "grpc.aio.secure_channel (own code)"
    options: ClassVar[list[tuple[str, Any]]] = []

    def load(self) -> None:
        import grpc
        import grpc.aio
        from aetcd import rpc

        self.grpc, self.rpc = grpc, rpc

    async def connect(
        self, host: str, port: int, user: str | None = None, password: str | None = None
    ) -> None:
        rpc = self.rpc
        self.ch = self.grpc.aio.insecure_channel(f"{host}:{port}", options=self.options)
        self.kv, self.leases = rpc.KVStub(self.ch), rpc.LeaseStub(self.ch)
        self.watches = rpc.WatchStub(self.ch)
        self.md: tuple[tuple[str, str], ...] | None = None
        self.ka: Any = None
        if user is not None:
            req = rpc.AuthenticateRequest(name=user, password=password)
            resp = await rpc.AuthStub(self.ch).Authenticate(req, timeout=CALL_TIMEOUT)
            self.md = (("token", resp.token),)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ch.close(), CALL_TIMEOUT)

    async def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        req = self.rpc.PutRequest(key=key, value=value, lease=lease or 0)
        await self.kv.Put(req, timeout=CALL_TIMEOUT, metadata=self.md)

    async def get(self, key: bytes) -> tuple[bytes, int] | None:
        r = await self.kv.Range(self.rpc.RangeRequest(key=key), timeout=CALL_TIMEOUT, metadata=self.md)
        return (r.kvs[0].value, r.kvs[0].mod_revision) if r.kvs else None

    async def get_prefix(self, prefix: bytes) -> list[bytes]:
        req = self.rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix), keys_only=True)
        r = await self.kv.Range(req, timeout=CALL_TIMEOUT, metadata=self.md)
        return sorted(kv.key for kv in r.kvs)

    async def delete(self, key: bytes) -> None:
        await self.kv.DeleteRange(
            self.rpc.DeleteRangeRequest(key=key), timeout=CALL_TIMEOUT, metadata=self.md
        )

    async def lease_grant(self, ttl: int) -> int:
        req = self.rpc.LeaseGrantRequest(TTL=ttl)
        return int((await self.leases.LeaseGrant(req, timeout=CALL_TIMEOUT, metadata=self.md)).ID)

    async def keepalive_once(self, lease: int) -> int:
        if self.ka is None:
            self.ka = self.leases.LeaseKeepAlive(metadata=self.md)
        try:
            await asyncio.wait_for(self.ka.write(self.rpc.LeaseKeepAliveRequest(ID=lease)), CALL_TIMEOUT)
            r = await asyncio.wait_for(self.ka.read(), CALL_TIMEOUT)
            if r is self.grpc.aio.EOF:
                raise ConnectionError("LeaseKeepAlive stream ended")
            return int(r.TTL)
        except BaseException:
            self.ka.cancel()
            self.ka = None
            raise

    async def lease_ttl(self, lease: int) -> int:
        req = self.rpc.LeaseTimeToLiveRequest(ID=lease)
        return int((await self.leases.LeaseTimeToLive(req, timeout=CALL_TIMEOUT, metadata=self.md)).TTL)

    async def _txn(self, compare: Any, key: bytes, value: bytes) -> bool:
        rpc = self.rpc
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))
        req = rpc.TxnRequest(compare=[compare], success=[put])
        return bool((await self.kv.Txn(req, timeout=CALL_TIMEOUT, metadata=self.md)).succeeded)

    def _cmp(self, key: bytes, **target: Any) -> Any:
        name, value = next(iter(target.items()))
        kind = {"mod_revision": "MOD", "value": "VALUE", "create_revision": "CREATE"}[name]
        c = self.rpc.Compare
        return c(key=key, result=c.EQUAL, target=getattr(c, kind), **{name: value})

    async def cas_mod(self, key: bytes, rev: int, value: bytes) -> bool:
        return await self._txn(self._cmp(key, mod_revision=rev), key, value)

    async def cas_value(self, key: bytes, old: bytes, value: bytes) -> bool:
        return await self._txn(self._cmp(key, value=old), key, value)

    async def create(self, key: bytes, value: bytes) -> bool:
        return await self._txn(self._cmp(key, create_revision=0), key, value)

    async def watch_prefix(self, prefix: bytes) -> AsyncWatch:
        rpc = self.rpc
        call = self.watches.Watch(metadata=self.md)
        create = rpc.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix))
        await asyncio.wait_for(call.write(rpc.WatchRequest(create_request=create)), CALL_TIMEOUT)
        first = await asyncio.wait_for(call.read(), CALL_TIMEOUT)
        if first is self.grpc.aio.EOF or not first.created:
            call.cancel()
            raise ConnectionError(f"watch not created: {first!r}")
        h = AsyncWatch()
        kinds = {rpc.Event.PUT: "PUT", rpc.Event.DELETE: "DELETE"}

        async def pump() -> None:
            try:
                while True:
                    r = await call.read()
                    if r is self.grpc.aio.EOF:
                        h.push(("end", None, "", now()))
                        return
                    t = now()
                    for ev in r.events:
                        h.push((kinds.get(ev.type, str(ev.type)), ev.kv.key, "", t))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                h.push(("error", None, err_text(exc), now()))

        h.task = asyncio.get_running_loop().create_task(pump())
        h.on_cancel = call.cancel
        return h


class RawGrpcTunedAdapter(RawGrpcAdapter):
    name = "raw-grpc-tuned"
    options: ClassVar[list[tuple[str, Any]]] = TUNED_OPTIONS


class Etcd3gwAdapter(Adapter):
    """Blocking; one requests.Session; the watch is etcd3gw's Watcher (a thread per watch)."""

    name, dist, module = "etcd3gw", "etcd3gw", "etcd3gw"
    supports_auth = False

    def load(self) -> None:
        import etcd3gw
        import etcd3gw.lease
        import etcd3gw.watch

        self.m = etcd3gw

    def features(self) -> dict[str, Any]:
        params = list(inspect.signature(self.m.Etcd3Client).parameters)
        tls = [p for p in params if "cert" in p or p == "protocol"]
        return {
            "client_params": params,
            "tls": f"parameters {tls}" if tls else "none",
            "auth": "none: no user/password parameter",
        }

    def connect(self, host: str, port: int, user: str | None = None, password: str | None = None) -> None:
        if user is not None:
            raise NotImplementedError("etcd3gw has no user/password parameter")
        self.c = self.m.Etcd3Client(host=host, port=port, timeout=CALL_TIMEOUT)
        self.leases: dict[int, Any] = {}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.c.session.close()

    def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        self.c.put(key, value, lease=self.leases[lease] if lease else None)

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        r = self.c.get(key, metadata=True)
        return (r[0][0], int(r[0][1]["mod_revision"])) if r else None

    def get_prefix(self, prefix: bytes) -> list[bytes]:
        return sorted(meta["key"] for _, meta in self.c.get_prefix(prefix))

    def delete(self, key: bytes) -> None:
        self.c.delete(key)

    def lease_grant(self, ttl: int) -> int:
        lease = self.c.lease(ttl)
        self.leases[lease.id] = lease
        return int(lease.id)

    def keepalive_once(self, lease: int) -> int:
        return int(self.leases[lease].refresh())

    def lease_ttl(self, lease: int) -> int:
        return int(self.leases[lease].ttl())

    def _txn(self, compare: dict[str, Any], key: bytes, value: bytes) -> bool:
        from etcd3gw.utils import _encode

        txn = {
            "compare": [{"key": _encode(key), "result": "EQUAL", **compare}],
            "success": [{"request_put": {"key": _encode(key), "value": _encode(value)}}],
            "failure": [],
        }
        return bool(self.c.transaction(txn).get("succeeded", False))

    def cas_mod(self, key: bytes, rev: int, value: bytes) -> bool:
        return self._txn({"target": "MOD", "mod_revision": rev}, key, value)

    def cas_value(self, key: bytes, old: bytes, value: bytes) -> bool:
        return bool(self.c.replace(key, old, value))

    def create(self, key: bytes, value: bytes) -> bool:
        return bool(self.c.create(key, value))

    def watch_prefix(self, prefix: bytes) -> SyncWatch:
        holder: list[Any] = []

        def stop() -> None:
            holder[0].stop()

        h = SyncWatch(stop)

        def callback(ev: dict[str, Any]) -> None:
            h.push((ev.get("type", "PUT"), ev["kv"]["key"], "", now()))

        end = prefix_end(prefix).decode("latin-1")
        holder.append(self.m.watch.Watcher(self.c, prefix, callback, range_end=end))
        return h


class Etcd3Adapter(Adapter):
    """python-etcd3: blocking grpc; the watch runs in the client's own thread."""

    name, dist, module = "etcd3", "etcd3", "etcd3"

    def load(self) -> None:
        import etcd3
        import etcd3.events

        self.m = etcd3

    def features(self) -> dict[str, Any]:
        params = list(inspect.signature(self.m.Etcd3Client).parameters)
        tls = [p for p in params if "cert" in p]
        return {"client_params": params, "tls": f"parameters {tls}" if tls else "none"}

    def connect(self, host: str, port: int, user: str | None = None, password: str | None = None) -> None:
        self.c = self.m.client(host=host, port=port, timeout=CALL_TIMEOUT, user=user, password=password)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.c.close()

    def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        self.c.put(key, value, lease=lease)

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        value, meta = self.c.get(key)
        return None if value is None else (value, meta.mod_revision)

    def get_prefix(self, prefix: bytes) -> list[bytes]:
        return sorted(meta.key for _, meta in self.c.get_prefix(prefix))

    def delete(self, key: bytes) -> None:
        self.c.delete(key)

    def lease_grant(self, ttl: int) -> int:
        return int(self.c.lease(ttl).id)

    def keepalive_once(self, lease: int) -> int:
        return int(next(iter(self.c.refresh_lease(lease))).TTL)

    def lease_ttl(self, lease: int) -> int:
        return int(self.c.get_lease_info(lease).TTL)

    def _txn(self, compare: Any, key: bytes, value: bytes) -> bool:
        ok, _ = self.c.transaction(
            compare=[compare], success=[self.c.transactions.put(key, value)], failure=[]
        )
        return bool(ok)

    def cas_mod(self, key: bytes, rev: int, value: bytes) -> bool:
        return self._txn(self.c.transactions.mod(key) == rev, key, value)

    def cas_value(self, key: bytes, old: bytes, value: bytes) -> bool:
        return self._txn(self.c.transactions.value(key) == old, key, value)

    def create(self, key: bytes, value: bytes) -> bool:
        return self._txn(self.c.transactions.create(key) == 0, key, value)

    def watch_prefix(self, prefix: bytes) -> SyncWatch:
        ids: list[int] = []
        h = SyncWatch(lambda: self.c.cancel_watch(ids[0]))
        delete_event = self.m.events.DeleteEvent

        def callback(resp: Any) -> None:
            t = now()
            if isinstance(resp, BaseException):
                h.push(("error", None, err_text(resp), t))
                return
            for ev in resp.events:
                h.push(("DELETE" if isinstance(ev, delete_event) else "PUT", ev.key, "", t))

        ids.append(self.c.add_watch_prefix_callback(prefix, callback))
        return h


ADAPTERS: dict[str, type[Adapter]] = {
    "aetcd": AetcdAdapter,
    "etcd3gw": Etcd3gwAdapter,
    "etcd3": Etcd3Adapter,
    "raw-grpc": RawGrpcAdapter,
    "raw-grpc-tuned": RawGrpcTunedAdapter,
}


class Inline:
    """Awaitable view of a blocking adapter: `await api.put(...)` runs the blocking call inline."""

    def __init__(self, impl: Adapter) -> None:
        self.impl = impl

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.impl, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return attr(*args, **kwargs)

        return call


# ---------------------------------------------------------------------------------------------
# The scenario (runs in the child)
# ---------------------------------------------------------------------------------------------


class Keeper:
    """Calls keepalive_once every `interval` s in the background; records each outcome."""

    def __init__(self, adapter: Adapter, api: Any, lease: int, interval: float) -> None:
        self.adapter, self.api, self.lease, self.interval = adapter, api, lease, interval
        self.records: list[tuple[float, bool, str]] = []  # (time, ok, TTL or error)
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.adapter.is_async:
            self._task = asyncio.get_running_loop().create_task(self._aloop())
        else:
            self._thread = threading.Thread(target=self._tloop, name="bench-keepalive", daemon=True)
            self._thread.start()

    async def _aloop(self) -> None:
        while not self._stop.is_set():
            t = now()
            try:
                ttl = await asyncio.wait_for(self.api.keepalive_once(self.lease), CALL_TIMEOUT)
                self.records.append((t, ttl > 0, f"TTL {ttl}"))
            except Exception as exc:
                self.records.append((t, False, err_text(exc)))
            await asyncio.sleep(self.interval)

    def _tloop(self) -> None:
        while not self._stop.is_set():
            t = now()
            try:
                ttl = self.adapter.keepalive_once(self.lease)  # type: ignore[attr-defined]
                self.records.append((t, ttl > 0, f"TTL {ttl}"))
            except Exception as exc:
                self.records.append((t, False, err_text(exc)))
            self._stop.wait(self.interval)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._thread is not None:
            self._thread.join(CALL_TIMEOUT + 1)


def stats_us(samples: list[float]) -> dict[str, Any]:
    us = sorted(s * 1e6 for s in samples)
    if not us:
        return {"n": 0}
    p99 = statistics.quantiles(us, n=100)[98] if len(us) >= 2 else us[0]
    return {
        "n": len(us),
        "median_us": round(statistics.median(us), 1),
        "p99_us": round(p99, 1),
        "mean_us": round(statistics.fmean(us), 1),
        "min_us": round(us[0], 1),
    }


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_status() -> dict[str, Any]:
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key.lower() + "_mib"] = round(int(value.split()[0]) / 1024, 1)
            elif key == "Threads":
                out["threads"] = int(value)
    return out


class Control:
    """The child's line protocol with the orchestrator: one JSON request, one JSON reply."""

    def __init__(self, out_fd: int) -> None:
        self._out = os.fdopen(out_fd, "w", buffering=1)
        self._lock = threading.Lock()

    def ask(self, cmd: str) -> dict[str, Any]:
        with self._lock:
            self._out.write("CTL " + json.dumps({"cmd": cmd}) + "\n")
            self._out.flush()
            line = sys.stdin.readline()
        if not line:
            raise ConnectionError("orchestrator went away")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"orchestrator could not {cmd}: {reply.get('error')}")
        return reply

    async def aask(self, cmd: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.ask, cmd)


async def watch_ready(api: Any, w: Any, prefix: bytes, timeout: float = 5.0) -> float:
    """Put a marker under `prefix` until the watch reports it; returns the seconds it took.

    A watch is registered by the server asynchronously for some clients (etcd3gw returns once
    the HTTP headers arrive), so every watch is proven live before it is relied on.
    """
    t0 = now()
    deadline = t0 + timeout
    marker = prefix + b".ready"
    while now() < deadline:
        await api.put(marker, b"1")
        wait_until = min(deadline, now() + 0.5)
        while now() < wait_until:
            item = await w.next(wait_until - now())
            if item is None:
                break
            if item[0] in ("error", "end"):
                raise ConnectionError(f"watch {item[0]}: {item[2]}")
            if item[1] == marker:
                return now() - t0
    raise TimeoutError(f"watch on {prefix!r} saw nothing within {timeout} s")


async def collect(w: Any, until_key: bytes | None, timeout: float) -> list[WatchItem]:
    """Watch items until one for `until_key` (or an error/end) arrives, or the timeout."""
    items: list[WatchItem] = []
    deadline = now() + timeout
    while now() < deadline:
        item = await w.next(deadline - now())
        if item is None:
            break
        items.append(item)
        if item[0] in ("error", "end") or (until_key is not None and item[1] == until_key):
            break
    return items


async def correctness(api: Any, adapter: Adapter) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def step(name: str, fn: Callable[[], Any]) -> None:
        t0 = now()
        try:
            ok, detail = await asyncio.wait_for(fn(), 60)
        except Exception as exc:
            ok, detail = False, err_text(exc)
        out[name] = {"ok": bool(ok), "detail": detail, "s": round(now() - t0, 2)}

    async def put_get() -> tuple[bool, str]:
        await api.put(b"/c/k", b"v1")
        got, missing = await api.get(b"/c/k"), await api.get(b"/c/missing")
        return got is not None and got[0] == b"v1" and missing is None, f"get={got!r} missing={missing!r}"

    async def prefix() -> tuple[bool, str]:
        for key in (b"/c/p/a/1", b"/c/p/a/2", b"/c/p/ab", b"/c/p/b"):
            await api.put(key, b"x")
        keys = await api.get_prefix(b"/c/p/a/")
        return keys == [b"/c/p/a/1", b"/c/p/a/2"], f"get_prefix('/c/p/a/') = {keys!r}"

    lease_result: dict[str, Any] = {}

    async def leases() -> tuple[bool, str]:
        kept, dropped = await api.lease_grant(LEASE_TTL), await api.lease_grant(LEASE_TTL)
        granted = await api.lease_ttl(kept)
        await api.put(b"/c/l/kept", b"1", lease=kept)
        await api.put(b"/c/l/dropped", b"1", lease=dropped)
        keeper = Keeper(adapter, api, kept, 1.0)
        keeper.start()
        t0 = now()
        gone_after = None
        try:
            while now() < t0 + LEASE_TTL + 6:
                if await api.get(b"/c/l/dropped") is None:
                    gone_after = now() - t0
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(max(0.0, t0 + LEASE_TTL + 2 - now()))
            kept_alive = await api.get(b"/c/l/kept") is not None
            checked_at = now() - t0
        finally:
            await keeper.stop()
        oks = sum(1 for r in keeper.records if r[1])
        fails = [r[2] for r in keeper.records if not r[1]]
        lease_result["expiry"] = (
            gone_after is not None and gone_after >= LEASE_TTL - 1,
            f"key without keep-alive gone after {gone_after:.1f} s (TTL {LEASE_TTL})"
            if gone_after is not None
            else f"key without keep-alive still there after {LEASE_TTL + 6} s",
        )
        detail = (
            f"TTL {granted} right after the grant; key alive at {checked_at:.1f} s after {oks} keep-alives"
        )
        if fails:
            detail += f"; keep-alive errors: {fails[:2]}"
        return kept_alive and oks > 0 and not fails, detail

    async def expiry() -> tuple[bool, str]:
        return lease_result.get("expiry", (False, "not run"))

    watch_result: dict[str, Any] = {}

    async def watch() -> tuple[bool, str]:
        w = await api.watch_prefix(b"/c/w/a/")
        try:
            await watch_ready(api, w, b"/c/w/a/")
            await api.put(b"/c/w/a/x", b"1")
            await api.delete(b"/c/w/a/x")
            await api.put(b"/c/w/ab", b"sibling")
            await api.put(b"/c/w/a/end", b"1")
            items = await collect(w, b"/c/w/a/end", 5.0)
        finally:
            await w.cancel()
        seen = [(i[0], i[1]) for i in items if not (i[1] or b"").endswith(b".ready")]
        expected = [("PUT", b"/c/w/a/x"), ("DELETE", b"/c/w/a/x"), ("PUT", b"/c/w/a/end")]
        sibling = any(key == b"/c/w/ab" for _, key in seen)
        watch_result["sibling"] = (not sibling, f"sibling /c/w/ab {'SEEN' if sibling else 'not seen'}")
        shown = [(k, key.decode() if key else None) for k, key in seen]
        return [s for s in seen if s[1] != b"/c/w/ab"] == expected, f"events {shown}"

    async def sibling() -> tuple[bool, str]:
        return watch_result.get("sibling", (False, "not run"))

    async def cas() -> tuple[bool, str]:
        key = b"/c/cas"
        await api.put(key, b"v1")
        got = await api.get(key)
        assert got is not None
        rev = got[1]
        a = await api.cas_mod(key, rev, b"v2")
        b = await api.cas_mod(key, rev, b"v3")  # stale revision: must fail
        c = await api.cas_value(key, b"v2", b"v4")
        d = await api.cas_value(key, b"v2", b"v5")  # stale value: must fail
        final = await api.get(key)
        ok = (a, b, c, d) == (True, False, True, False) and final is not None and final[0] == b"v4"
        return ok, f"mod {a}/{b} (fresh/stale), value {c}/{d}, final {final[0] if final else None!r}"

    async def create() -> tuple[bool, str]:
        key = b"/c/create"
        await api.delete(key)
        a, b = await api.create(key, b"first"), await api.create(key, b"second")
        final = await api.get(key)
        ok = (a, b) == (True, False) and final is not None and final[0] == b"first"
        return ok, f"first {a}, second {b}, value {final[0] if final else None!r}"

    await step("put_get", put_get)
    await step("prefix_get", prefix)
    await step("lease_keepalive", leases)
    await step("lease_expiry", expiry)
    await step("watch_put_delete", watch)
    await step("watch_no_sibling", sibling)
    await step("cas", cas)
    await step("create_if_absent", create)
    return out


async def latency(api: Any, n_putget: int, n_keepalive: int, n_watch: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    key = b"/lat/k"
    warm = max(10, n_putget // 10)
    samples, gets, bad = [], [], 0
    for i in range(warm + n_putget):
        value = b"%d" % i
        t0 = now()
        await api.put(key, value)
        t1 = now()
        got = await api.get(key)
        t2 = now()
        if i >= warm:
            samples.append(t2 - t0)
            gets.append(t2 - t1)
        if got is None or got[0] != value:
            bad += 1
    out["put_get"] = {**stats_us(samples), "warmup": warm, "wrong_values": bad}
    out["get"] = stats_us(gets)

    lease = await api.lease_grant(60)
    samples = []
    for i in range(10 + n_keepalive):
        t0 = now()
        ttl = await api.keepalive_once(lease)
        if i >= 10:
            samples.append(now() - t0)
        if ttl <= 0:
            raise RuntimeError(f"keep-alive answered TTL {ttl}")
    out["keepalive"] = {**stats_us(samples), "warmup": 10}

    w = await api.watch_prefix(b"/lat/w/")
    samples, missed = [], 0
    try:
        await watch_ready(api, w, b"/lat/w/")
        warm = 20
        for i in range(warm + n_watch):
            k = b"/lat/w/%d" % i
            t0 = now()
            await api.put(k, b"1")
            deadline = t0 + 5.0
            while True:
                item = await w.next(deadline - now())
                if item is None or item[0] in ("error", "end"):
                    missed += 1
                    break
                if item[1] == k:
                    if i >= warm:
                        samples.append(item[3] - t0)
                    break
    finally:
        await w.cancel()
    out["watch"] = {**stats_us(samples), "warmup": 20, "missed": missed}
    return out


async def put_after_restart(api: Any, t_ready: float) -> dict[str, Any]:
    """Put through the same client object every 50 ms until one succeeds (30 s at most)."""
    first_ok, attempts, errors = None, 0, []
    while now() < t_ready + 30:
        attempts += 1
        try:
            await asyncio.wait_for(api.put(b"/r/after", b"1"), 2.0)
            first_ok = now() - t_ready
            break
        except Exception as exc:
            if len(errors) < 2:
                errors.append(err_text(exc))
            await asyncio.sleep(0.05)
    return {
        "ok": first_ok is not None,
        "first_ok_s": None if first_ok is None else round(first_ok, 2),
        "attempts": attempts,
        "errors": errors,
    }


async def restart(api: Any, adapter: Adapter, ctl: Control, cycles: int) -> dict[str, Any]:
    """Cycle 1 checks everything; cycles 2.. only time the first put (gRPC backoff varies)."""
    out: dict[str, Any] = {}
    lease = await api.lease_grant(RESTART_LEASE_TTL)
    await api.put(b"/r/lease-key", b"1", lease=lease)
    keeper = Keeper(adapter, api, lease, KEEPALIVE_INTERVAL)
    keeper.start()
    w = await api.watch_prefix(b"/r/w/")
    await watch_ready(api, w, b"/r/w/")
    w2 = None
    try:
        cpu0, t_stop = cpu_seconds(), now()
        out["etcd_stop_s"] = round((await ctl.aask("stop"))["s"], 2)
        await asyncio.sleep(RESTART_PAUSE)
        out["etcd_start_s"] = round((await ctl.aask("start"))["s"], 2)
        t_ready = now()
        out["cpu_s_during_outage"] = round(cpu_seconds() - cpu0, 2)
        out["outage_s"] = round(t_ready - t_stop, 2)

        # 1. a put through the same client object, retried every 50 ms
        out["put"] = await put_after_restart(api, t_ready)
        first_ok = out["put"]["first_ok_s"]

        # 2. the watch opened before the restart
        items = []
        while (item := await w.next(0.0)) is not None:
            items.append(item)
        if first_ok is not None:
            await api.put(b"/r/w/after", b"1")
            items += await collect(w, b"/r/w/after", 5.0)
        failures = [i for i in items if i[0] in ("error", "end")]
        resumed = any(i[1] == b"/r/w/after" for i in items)
        if first_ok is None:
            verdict = "unknown: no put succeeded"
        elif failures:
            kind, _, detail, t = failures[0]
            verdict = f"{'raised' if kind == 'error' else 'ended'} {t - t_stop:.1f} s after the stop"
            verdict += (": " + detail) if detail else ""
            verdict += "; then resumed" if resumed else ""
        elif resumed:
            verdict = "resumed: the event of a put after the restart arrived"
        else:
            verdict = "silent: no error, no end, no event within 5 s"
        out["watch"] = {"verdict": verdict, "resumed": resumed, "failed": bool(failures)}

        # 3. a new watch through the same client object
        t0 = now()
        try:
            w2 = await asyncio.wait_for(api.watch_prefix(b"/r/w2/"), 10.0)
            await watch_ready(api, w2, b"/r/w2/")
            out["new_watch"] = {"ok": True, "detail": f"live after {now() - t0:.2f} s"}
        except Exception as exc:
            out["new_watch"] = {"ok": False, "detail": err_text(exc)}

        # 4. keep-alives of the background loop after the restart (wait for up to 5 s)
        for _ in range(50):
            if any(r[1] and r[0] > t_ready for r in keeper.records):
                break
            await asyncio.sleep(0.1)
        after = [r for r in keeper.records if r[0] > t_ready]
        during = [r for r in keeper.records if t_stop <= r[0] <= t_ready]
        first_ka = next((r for r in after if r[1]), None)
        out["keepalive"] = {
            "ok": first_ka is not None,
            "first_ok_s": None if first_ka is None else round(first_ka[0] - t_ready, 2),
            "failed_during_outage": sum(1 for r in during if not r[1]),
            "errors": sorted({r[2] for r in during + after if not r[1]})[:3],
        }

        # 5. the lease and its key
        try:
            ttl = await api.lease_ttl(lease)
            key = await api.get(b"/r/lease-key")
            out["lease"] = {
                "ok": ttl > 0 and key is not None,
                "detail": f"TTL {ttl}, key {'there' if key else 'gone'}",
            }
        except Exception as exc:
            out["lease"] = {"ok": False, "detail": err_text(exc)}

        # 6. more cycles, keep-alive loop still running: the first put after each restart
        out["put_first_ok_s_all"] = [out["put"]["first_ok_s"]]
        for _ in range(cycles - 1):
            await ctl.aask("stop")
            await asyncio.sleep(RESTART_PAUSE)
            await ctl.aask("start")
            out["put_first_ok_s_all"].append((await put_after_restart(api, now()))["first_ok_s"])
    finally:
        await keeper.stop()
        await w.cancel()
        if w2 is not None:
            await w2.cancel()
    return out


async def put_until_ok(api: Any, key: bytes, timeout: float) -> tuple[float | None, list[str]]:
    t0, errors = now(), []
    while now() < t0 + timeout:
        try:
            await asyncio.wait_for(api.put(key, b"1"), 2.0)
            return now() - t0, errors
        except Exception as exc:
            text = err_text(exc)
            if text not in errors:
                errors.append(text)
            await asyncio.sleep(0.1)
    return None, errors


async def auth(adapter_cls: type[Adapter], ctl: Control) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not adapter_cls.supports_auth:
        return {"skipped": "the client has no user/password parameter"}
    server = await ctl.aask("auth_start")
    out["token_ttl_s"] = server["token_ttl"]

    async def client() -> tuple[Adapter, Any]:
        adapter = adapter_cls()
        adapter.load()
        api = adapter if adapter.is_async else Inline(adapter)
        await api.connect(HOST, server["port"], user=server["user"], password=server["password"])
        return adapter, api

    try:
        _, api = await client()
        try:
            await api.put(b"/a/1", b"1")
            idle = server["token_ttl"] + 2
            await asyncio.sleep(idle)
            ok_s, errors = await put_until_ok(api, b"/a/2", 3.0)
            out["after_idle"] = {"ok": ok_s is not None, "idle_s": idle, "errors": errors}
        finally:
            await api.close()

        _, api = await client()
        try:
            await api.put(b"/a/3", b"1")
            await ctl.aask("auth_restart")
            ok_s, errors = await put_until_ok(api, b"/a/4", 15.0)
            out["after_restart"] = {
                "ok": ok_s is not None,
                "first_ok_s": None if ok_s is None else round(ok_s, 2),
                "errors": errors,
            }
        finally:
            await api.close()
    except Exception as exc:
        out["error"] = err_text(exc)
    finally:
        await ctl.aask("auth_stop")
    return out


async def scenario(adapter: Adapter, args: argparse.Namespace, ctl: Control, res: dict[str, Any]) -> None:
    api: Any = adapter if adapter.is_async else Inline(adapter)
    await asyncio.wait_for(api.connect(HOST, args.port), 2 * CALL_TIMEOUT)
    phases: list[tuple[str, Callable[[], Any]]] = [
        ("correctness", lambda: correctness(api, adapter)),
        ("latency", lambda: latency(api, args.n_putget, args.n_keepalive, args.n_watch)),
        ("restart", lambda: restart(api, adapter, ctl, args.restarts)),
    ]
    for name, phase in phases:
        t0 = now()
        try:
            res[name] = await asyncio.wait_for(phase(), 240)
        except Exception as exc:
            res[name] = {"error": err_text(exc), "traceback": traceback.format_exc()[-2000:]}
        res.setdefault("phase_s", {})[name] = round(now() - t0, 1)
    await api.close()
    if not args.no_auth:
        t0 = now()
        try:
            res["auth"] = await asyncio.wait_for(auth(type(adapter), ctl), 120)
        except Exception as exc:
            res["auth"] = {"error": err_text(exc)}
        res["phase_s"]["auth"] = round(now() - t0, 1)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("aetcd", "etcd3gw", "etcd3", "grpcio", "protobuf", "requests"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def child_main(args: argparse.Namespace) -> int:
    # stdout carries the control protocol only: anything a library prints goes to stderr.
    ctl = Control(os.dup(1))
    os.dup2(2, 1)
    res: dict[str, Any] = {
        "client": args.child,
        "python": sys.version.split()[0],
        "env": {PB_ENV: os.environ.get(PB_ENV)},
        "versions": versions(),
    }
    adapter = ADAPTERS[args.child]()
    t0 = now()
    try:
        adapter.load()
        res["import"] = {"ok": True, "s": round(now() - t0, 3)}
    except Exception as exc:
        lines = [ln for ln in traceback.format_exception_only(exc)[-1].strip().splitlines() if ln.strip()]
        res["import"] = {"ok": False, "error": err_text(exc), "message": "\n".join(lines[:6])[:800]}
    with contextlib.suppress(Exception):
        from google.protobuf.internal import api_implementation

        res["protobuf_implementation"] = api_implementation.Type()
    if res["import"]["ok"]:
        with contextlib.suppress(Exception):
            res["features"] = adapter.features()
        try:
            asyncio.run(asyncio.wait_for(scenario(adapter, args, ctl, res), 900))
        except Exception as exc:
            res["error"] = err_text(exc)
            res["traceback"] = traceback.format_exc()[-2000:]
    res["resource"] = {**proc_status(), "cpu_s": round(cpu_seconds(), 2)}
    Path(args.result).write_text(json.dumps(res, indent=1, default=str))
    sys.stderr.flush()
    os._exit(0)  # client threads (watchers, executors) must not keep the child alive


# ---------------------------------------------------------------------------------------------
# etcd servers (orchestrator side)
# ---------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    import socket

    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind((HOST, 0))
            ports.append(s.getsockname()[1])
        return ports


class LocalEtcd:
    """A bare etcd child on free loopback ports; used when weft's EtcdServer is not importable,
    and always for the auth server (it needs --auth-token-ttl, which EtcdServer does not take)."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.client_port, self.peer_port = free_ports(2)
        self.extra_args = extra_args
        self.binary = shutil.which("etcd") or "etcd"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    def start(self, timeout: float = 30.0) -> None:
        peer = f"http://{HOST}:{self.peer_port}"
        cmd = [
            self.binary,
            "--name=default",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            *self.extra_args,
        ]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.workdir}/etcd.log")
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(self.endpoint + "/health", timeout=1.0) as r,
            ):
                if json.loads(r.read()).get("health") == "true":
                    return
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"etcd not healthy within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        self.stop()

    def etcdctl(self, *args: str, stdin: str | None = None) -> str:
        cmd = ["etcdctl", f"--endpoints={self.endpoint}", *args]
        done = subprocess.run(
            cmd,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def enable_auth(self, user: str, password: str) -> None:
        self.etcdctl("user", "add", user, "--interactive=false", stdin=password + "\n")
        self.etcdctl("user", "grant-role", user, "root")
        self.etcdctl("auth", "enable")


def make_server(workdir: Path) -> tuple[Any, str]:
    """weft's EtcdServer when it imports and starts; otherwise the private LocalEtcd."""
    note = ""
    try:
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        from weft.testing.etcd import EtcdServer

        server = EtcdServer(None)
        try:
            server.start(30.0)
            return server, "weft.testing.etcd.EtcdServer"
        except Exception as exc:
            server.close()
            note = f" (EtcdServer failed to start: {err_text(exc)})"
    except Exception as exc:
        note = f" (EtcdServer not importable: {err_text(exc)})"
    server = LocalEtcd(workdir)
    server.start(30.0)
    return server, "private LocalEtcd" + note


def run_child(
    name: str, python: str, extra_env: dict[str, str], args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    server, launcher = make_server(workdir / "etcd")
    auth_server: LocalEtcd | None = None
    result_file = workdir / "result.json"
    env = {k: v for k, v in os.environ.items() if k != PB_ENV}
    env.update(extra_env)
    cmd = [python, str(Path(__file__).resolve()), "--child", name, "--port", str(server.client_port)]
    cmd += ["--result", str(result_file), "--n-putget", str(args.n_putget)]
    cmd += ["--n-keepalive", str(args.n_keepalive), "--n-watch", str(args.n_watch)]
    cmd += ["--restarts", str(args.restarts)]
    if args.no_auth:
        cmd.append("--no-auth")
    log_path = workdir / "child.log"
    ctl_log: list[dict[str, Any]] = []
    t_start = time.monotonic()
    timed_out = False

    def handle(cmd_name: str) -> dict[str, Any]:
        nonlocal auth_server
        t0 = now()
        if cmd_name == "stop":
            server.stop()
        elif cmd_name == "start":
            server.start(30.0)
        elif cmd_name == "auth_start":
            auth_server = LocalEtcd(workdir / "etcd-auth", (f"--auth-token-ttl={AUTH_TOKEN_TTL}",))
            auth_server.start(30.0)
            auth_server.enable_auth(AUTH_USER, AUTH_PASSWORD)
            return {
                "port": auth_server.client_port,
                "user": AUTH_USER,
                "password": AUTH_PASSWORD,
                "token_ttl": AUTH_TOKEN_TTL,
            }
        elif cmd_name == "auth_restart" and auth_server is not None:
            auth_server.restart(30.0)
        elif cmd_name == "auth_stop" and auth_server is not None:
            auth_server.close()
            auth_server = None
        else:
            raise ValueError(f"unknown command {cmd_name!r}")
        return {"s": now() - t0}

    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, text=True
            )
            assert proc.stdin is not None and proc.stdout is not None
            lines: queue.Queue[str | None] = queue.Queue()
            stdout = proc.stdout

            def reader() -> None:
                for line in stdout:
                    lines.put(line)
                lines.put(None)

            threading.Thread(target=reader, daemon=True).start()
            deadline = t_start + args.timeout
            while True:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    timed_out = True
                    break
                if line is None:
                    break
                if not line.startswith("CTL "):
                    continue
                request = json.loads(line[4:])
                try:
                    reply = {"ok": True, **handle(request["cmd"])}
                except Exception as exc:
                    reply = {"ok": False, "error": err_text(exc)}
                ctl_log.append({"cmd": request["cmd"], **{k: v for k, v in reply.items() if k != "password"}})
                proc.stdin.write(json.dumps(reply) + "\n")
                proc.stdin.flush()
            try:
                proc.wait(max(1.0, min(15.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                timed_out = True
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    finally:
        server.close()
        if auth_server is not None:
            auth_server.close()
    tail = log_path.read_text(errors="replace")[-1500:]
    if result_file.exists():
        res: dict[str, Any] = json.loads(result_file.read_text())
    else:
        res = {"client": name, "error": f"no result (rc {proc.returncode}, timed out {timed_out})"}
    res.update({"launcher": launcher, "control": ctl_log, "wall_s": round(time.monotonic() - t_start, 1)})
    res["interpreter"] = "the bench's interpreter" if python == sys.executable else "--python-etcd3"
    if timed_out:
        res["timed_out"] = True
    if "error" in res or timed_out:
        res["child_log_tail"] = tail
    return res


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

CHECKS = (
    ("put_get", "put/get"),
    ("prefix_get", "prefix get"),
    ("lease_keepalive", "lease kept"),
    ("lease_expiry", "lease expiry"),
    ("watch_put_delete", "watch PUT+DEL"),
    ("watch_no_sibling", "no sibling"),
    ("cas", "CAS"),
    ("create_if_absent", "create-if-absent"),
)


def _ok(d: Any) -> str:
    if not isinstance(d, dict):
        return "-"
    return "ok" if d.get("ok") else "**FAIL**"


def _num(d: Any, key: str, scale: float = 1.0, digits: int = 0) -> str:
    if not isinstance(d, dict) or d.get(key) is None:
        return "-"
    return f"{d[key] * scale:.{digits}f}"


def markdown(results: dict[str, dict[str, Any]]) -> str:
    head = ["client", "import"] + [label for _, label in CHECKS]
    head += ["put+get p50 us", "p99 us", "get p50 us", "keep-alive p50 us", "watch p50 us", "RSS MiB"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if "skipped" in r:
            rows.append(f"| {name} | skipped: {r['skipped']} |" + " |" * (len(head) - 2))
            continue
        imp = r.get("import", {})
        imp_cell = "ok" if imp.get("ok") else f"**fails**: {imp.get('error', r.get('error', '?'))[:60]}"
        corr, lat = r.get("correctness", {}), r.get("latency", {})
        cells = [name, imp_cell] + [_ok(corr.get(key)) if imp.get("ok") else "-" for key, _ in CHECKS]
        cells += [
            _num(lat.get("put_get"), "median_us"),
            _num(lat.get("put_get"), "p99_us"),
            _num(lat.get("get"), "median_us"),
            _num(lat.get("keepalive"), "median_us"),
            _num(lat.get("watch"), "median_us"),
            _num(r.get("resource"), "vmrss_mib", digits=1),
        ]
        rows.append("| " + " | ".join(cells) + " |")

    head2 = [
        "client",
        "put after restart",
        "open watch",
        "keep-alive after",
        "lease alive",
        "new watch",
        "CPU s in outage",
    ]
    rows2 = ["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    head3 = ["client", "TLS", "auth: put after idle > token TTL", "auth: put after etcd restart"]
    rows3 = ["| " + " | ".join(head3) + " |", "|" + "---|" * len(head3)]
    for name, r in results.items():
        if not r.get("import", {}).get("ok"):
            continue
        rs = r.get("restart", {})
        if "error" in rs:
            rows2.append(f"| {name} | error: {rs['error'][:80]} |" + " |" * (len(head2) - 2))
        else:
            put, ka = rs.get("put", {}), rs.get("keepalive", {})
            cells = [
                name,
                "ok after "
                + ", ".join("FAIL" if t is None else str(t) for t in rs.get("put_first_ok_s_all", []))
                + " s"
                if put.get("ok")
                else f"**FAIL** {put.get('errors')}",
                rs.get("watch", {}).get("verdict", "-"),
                f"ok after {ka['first_ok_s']} s" if ka.get("ok") else f"**FAIL** {ka.get('errors')}",
                _ok(rs.get("lease")) + f" ({rs.get('lease', {}).get('detail', '')})",
                _ok(rs.get("new_watch")),
                str(rs.get("cpu_s_during_outage", "-")),
            ]
            rows2.append("| " + " | ".join(cells) + " |")
        a = r.get("auth", {})

        def auth_cell(d: Any, after: bool) -> str:
            if not isinstance(d, dict):
                return "-"
            if d.get("ok"):
                return f"ok after {d['first_ok_s']} s" if after else "ok"
            return "**FAIL** " + "; ".join(d.get("errors", []))[:120]

        if "skipped" in a:
            auth1 = auth2 = "not supported"
        elif "error" in a:
            auth1, auth2 = f"**FAIL** {a['error'][:140]}", "-"
        else:
            auth1, auth2 = auth_cell(a.get("after_idle"), False), auth_cell(a.get("after_restart"), True)
        rows3.append(f"| {name} | {r.get('features', {}).get('tls', '-')} | {auth1} | {auth2} |")
    return "\n".join([*rows, "", *rows2, "", *rows3]) + "\n"


def etcd_version() -> str:
    etcd = shutil.which("etcd") or "etcd"
    try:
        out = subprocess.run(
            [etcd, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        return out.splitlines()[0].split(":", 1)[1].strip()
    except Exception as exc:
        return f"unknown ({err_text(exc)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", default=",".join(CLIENTS), help=f"comma-separated, of {', '.join(CLIENTS)}")
    ap.add_argument("--python-etcd3", metavar="PYTHON", help="interpreter of a venv with etcd3==0.12.0")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "etcd_clients.json", help="JSON output")
    ap.add_argument("--quick", action="store_true", help="100 put+get, 20 keep-alives, 50 watch events")
    ap.add_argument("--n-putget", type=int, default=1000)
    ap.add_argument("--n-keepalive", type=int, default=100)
    ap.add_argument("--n-watch", type=int, default=200)
    ap.add_argument("--restarts", type=int, default=3, help="etcd restarts per client (first: all checks)")
    ap.add_argument("--no-auth", action="store_true", help="leave out the auth-token checks")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per client")
    ap.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.quick:
        args.n_putget, args.n_keepalive, args.n_watch = 100, 20, 50
    names = [n.strip() for n in args.clients.split(",") if n.strip()]
    unknown = set(names) - set(CLIENTS)
    if unknown:
        ap.error(f"unknown clients {sorted(unknown)}")
    if shutil.which("etcd") is None:
        ap.error("etcd is not on the PATH (Debian: apt-get install etcd-server etcd-client)")

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-etcd-") as tmp:
        for name in names:
            print(f"== {name}", file=sys.stderr, flush=True)
            if name != "etcd3":
                results[name] = run_child(name, sys.executable, {}, args, Path(tmp) / name)
                continue
            if not args.python_etcd3:
                results[name] = {
                    "skipped": "no --python-etcd3: python-etcd3 needs a venv of its own (see bench/README.md)"
                }
                continue
            results[name] = run_child(name, args.python_etcd3, {}, args, Path(tmp) / name)
            if not results[name].get("import", {}).get("ok"):
                label = f"etcd3 ({PB_ENV}=python)"
                print(f"== {label}", file=sys.stderr, flush=True)
                results[label] = run_child(
                    name, args.python_etcd3, {PB_ENV: "python"}, args, Path(tmp) / "etcd3-py"
                )

    table = markdown(results)
    report = {
        "etcd": etcd_version(),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "settings": {
            "n_putget": args.n_putget,
            "n_keepalive": args.n_keepalive,
            "n_watch": args.n_watch,
            "call_timeout_s": CALL_TIMEOUT,
            "lease_ttl_s": LEASE_TTL,
            "restart_pause_s": RESTART_PAUSE,
            "restarts": args.restarts,
            "restart_keepalive_interval_s": KEEPALIVE_INTERVAL,
            "auth_token_ttl_s": AUTH_TOKEN_TTL,
        },
        "results": results,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    failed = [n for n, r in results.items() if "error" in r or r.get("timed_out")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
