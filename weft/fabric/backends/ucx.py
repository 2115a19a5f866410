"""The `ucx` backend: bytes move through UCX (ucxx), shared memory and cross-memory attach on one host.

The only module that imports ucxx, and only when the backend loads (`load_ucxx`): `import ucxx`
edits `os.environ` (UCX_RNDV_THRESH, ...), so the environment is snapshotted before and restored
right after; UCX options are passed to the context instead (`UCX_OPTIONS`).

Connection: each agent runs a UCX listener (its address is this backend's `endpoint()`) and
connects to a peer's listener with endpoint error handling on. Nothing is served before a
challenge-response over active messages (AM): the target sends HELLO (nonce, its connection
id), the initiator answers AUTH (its name, instance, connection id and, with a group secret,
an HMAC over both nonces, both instances and both ids), the target answers WELCOME (its own
proof) or REJECT. With `MM_ERROR_HANDLING=y` UCX uses shared memory and cma even on
error-handling endpoints, and the listener's connection-manager socket makes a dead peer's
endpoint fail within milliseconds (its kernel closes the socket).

Requests: the Python bindings have no RMA, so the target takes part. A control AM carries
(request id, op, notification, descriptor table); the payload travels as one tag message per
descriptor, straight from and into registered memory. Tags are unique per worker:
``connection id (16 bits) | request id (24) | descriptor index (24)``, where the connection id is
the one the *receiving* worker chose. WRITE: control + sends at once; the target checks every
descriptor first, receives into its regions, delivers the notification, answers DONE; a bad
descriptor gets ERROR with a code and the payload is drained with 1-byte (truncating)
receives. READ: the initiator posts its receives first, the target sends and answers DONE (or
ERROR plus empty messages that complete the posted receives); the transfer ends when both
the answer and every receive are in.

Threads: one progress thread per backend owns the worker (every UCX call happens on it).
`post` queues the request and wakes it through an eventfd; it waits in `epoll` on the
worker's event fd when idle (`ucp_worker_arm`), so an idle agent costs no CPU.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import secrets
import select
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from weft.fabric import errors, wire
from weft.fabric.connection import resolve_descriptors
from weft.fabric.types import Backend, MemoryKind, Op

if TYPE_CHECKING:
    from weft.fabric.agent import Agent, Peer
    from weft.fabric.memory import DescList
    from weft.fabric.transfer import Transfer

log = logging.getLogger(__name__)

#: UCX options (no UCX_ prefix) given to the context: shared memory on error-handling
#: endpoints, and a 100 ms keepalive instead of 20 s.
UCX_OPTIONS: dict[str, str] = {"MM_ERROR_HANDLING": "y", "KEEPALIVE_INTERVAL": "100ms"}

_ucxx: tuple[Any, Any] | None = None
_import_lock = threading.Lock()


def load_ucxx() -> tuple[Any, Any]:
    """(ucxx._lib.libucxx, ucxx._lib.arr.Array); raises ImportError when ucxx is missing.

    `import ucxx` sets UCX_* variables in os.environ; they are undone at once (UCX reads
    them only when a context is created, and this backend passes its options explicitly).
    """
    global _ucxx  # noqa: PLW0603
    with _import_lock:
        if _ucxx is None:
            saved = dict(os.environ)
            try:
                from ucxx._lib import libucxx
                from ucxx._lib.arr import Array
            finally:
                _restore_env(saved)
            _ucxx = (libucxx, Array)
        return _ucxx


def _restore_env(saved: dict[str, str]) -> None:
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


# -- control messages (active messages) ---------------------------------------------------
# magic "WU" | u8 version | u8 type | u32 flags | u32 count (descriptors / error code) | u64 request
CTL = struct.Struct("<2sBBIIQ")
CTL_MAGIC = b"WU"
CTL_VERSION = 1
HELLO, AUTH, WELCOME, REJECT = 1, 2, 3, 4
WRITE, READ, DONE, ERROR = 10, 11, 12, 13

CONN_BITS, REQ_BITS, INDEX_BITS = 16, 24, 24
MAX_CONNS = 1 << CONN_BITS
REQ_MASK = (1 << REQ_BITS) - 1
MAX_INDEX = 1 << INDEX_BITS
MAX_INBOUND = 4096
HOUSEKEEPING_S = 0.05
#: with requests in flight, keep polling this long after the last event before sleeping in
#: epoll (an answer usually comes back within tens of microseconds; a wake-up costs more)
SPIN_S = 100e-6
REJECT_LINGER_S = 0.5


def _tag(conn_id: int, req_id: int, index: int) -> int:
    return (conn_id << (REQ_BITS + INDEX_BITS)) | ((req_id & REQ_MASK) << INDEX_BITS) | index


def _ctl(ftype: int, req_id: int = 0, count: int = 0, flags: int = 0) -> bytes:
    return CTL.pack(CTL_MAGIC, CTL_VERSION, ftype, flags, count, req_id)


@dataclass(frozen=True, slots=True)
class UcxPlan:
    op: Op
    peer: Peer
    table: bytes
    count: int
    total: int
    views: tuple[memoryview, ...]  # slices of the local region, one per descriptor
    arrays: tuple[Any, ...]  # ucxx Arrays over `views`, reused by every post


class _Op:
    """One posted request on the initiator."""

    __slots__ = ("conn", "keep", "notify", "plan", "req_id", "reqs", "transfer")

    def __init__(self, plan: UcxPlan, transfer: Transfer, notify: bytes | None) -> None:
        self.plan = plan
        self.transfer = transfer
        self.notify = notify
        self.conn: _Conn | None = None
        self.req_id = 0
        self.reqs: list[Any] = []
        self.keep: list[Any] = []


class _Serve:
    """A request this agent serves as the target (receives for WRITE, sends for READ)."""

    __slots__ = ("conn", "keep", "notify", "pos", "req_id", "reqs", "write")

    def __init__(
        self, conn: _Conn, req_id: int, write: bool, reqs: list[Any], keep: list[Any], notify: bytes | None
    ) -> None:
        self.conn = conn
        self.req_id = req_id
        self.write = write
        self.reqs = reqs
        self.keep = keep  # the Arrays and views the requests point into
        self.notify = notify
        self.pos = 0


class _Conn:
    """One UCX endpoint with its handshake state (outbound when `peer` is set)."""

    def __init__(self, ep: Any, cid: int, peer: Peer | None, deadline: float) -> None:
        self.ep = ep
        self.id = cid
        self.remote_id = -1
        self.peer = peer
        self.peer_name: str | None = peer.name if peer is not None else None
        self.ready = False
        self.closed = False
        self.close_at: float | None = None
        self.deadline = deadline
        self.nonce_s = ""
        self.nonce_c = ""
        self.am: Any = None
        self.ops: dict[int, _Op] = {}
        self.queued: list[_Op] = []
        self.ids = itertools.count(1)

    def next_req(self) -> int:
        while True:
            req = next(self.ids) & REQ_MASK
            if req and req not in self.ops:
                return req


class UcxBackend:
    kind = Backend.UCX

    def __init__(self, agent: Agent) -> None:
        self.L, self.Array = load_ucxx()
        self.agent = agent
        self._ctx: Any = self.L.UCXContext(dict(UCX_OPTIONS))
        self._worker: Any = self.L.UCXWorker(self._ctx)
        self._worker.init_blocking_progress_mode()
        self._conns: dict[int, _Conn] = {}  # by our connection id
        self._out: dict[str, _Conn] = {}  # by peer instance
        self._ids = itertools.count(1)
        self._jobs: collections.deque[tuple[str, Any]] = collections.deque()
        self._serving: list[_Serve] = []
        self._reading: list[_Op] = []  # READs answered DONE, receives still landing
        self._linger: list[tuple[list[Any], list[Any]]] = []  # requests of ended ops, buffers kept
        self._scratch = np.empty(1, np.uint8)
        self._scratch_arr: Any = self.Array(self._scratch)
        self._empty_arr: Any = self.Array(np.empty(0, np.uint8))
        self._closed = False
        self._stop = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._listener: Any = self.L.UCXListener.create(
            self._worker, 0, self._on_accept, deliver_endpoint=True
        )
        self.port = int(self._listener.port)
        self._thread = threading.Thread(target=self._run, name=f"weft-ucx {agent.name}", daemon=True)
        self._thread.start()

    # -- DataPath ------------------------------------------------------------------------
    def usable(self, peer: Peer, local: MemoryKind, remote: MemoryKind) -> bool:
        if local is not MemoryKind.DRAM or remote is not MemoryKind.DRAM:
            return False
        return "ucx" in peer.md.endpoints and not self._closed

    def plan(self, op: Op, local: DescList, peer: Peer, remote: DescList) -> UcxPlan:
        region = self.agent._local_region(local)
        if len(local) >= MAX_INDEX:
            raise errors.InvalidDescriptorError(f"the ucx backend moves at most {MAX_INDEX - 1} descriptors")
        base = region.view
        views = tuple(base[o : o + n] for o, n in local.pairs())
        arrays = tuple(self.Array(v) for v in views)
        table = wire.desc_table(remote.region_id, remote.offsets, remote.lengths)
        return UcxPlan(op, peer, table, len(remote), local.total, views, arrays)

    def post(self, plan: UcxPlan, transfer: Transfer, notify: bytes | None) -> None:
        if self._closed:
            raise errors.AgentClosedError(f"agent {self.agent.name!r} closed")
        plan.peer.check_alive()
        op = _Op(plan, transfer, notify)
        transfer._cancel_hook = lambda: self._submit("forget", op)
        self._submit("post", op)

    def endpoint(self) -> str | None:
        host = self.agent.config.advertise_host or self.agent.config.listen_host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop = True
        self._signal()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)
            if self._thread.is_alive():
                log.warning("agent %s: ucx progress thread did not stop", self.agent.name)
                return
        with contextlib.suppress(OSError):
            os.close(self._wake)

    # -- cross-thread --------------------------------------------------------------------
    def _submit(self, what: str, arg: Any) -> None:
        self._jobs.append((what, arg))
        self._signal()

    def _signal(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)

    # -- progress thread -----------------------------------------------------------------
    def _run(self) -> None:
        worker = self._worker
        poller = select.epoll()
        poller.register(worker.epoll_file_descriptor, select.EPOLLIN)
        poller.register(self._wake, select.EPOLLIN)
        next_house = last_busy = 0.0
        try:
            while not self._stop:
                busy = self._drain_jobs()
                busy |= bool(worker.progress())
                busy |= self._poll()
                now = time.monotonic()
                if now >= next_house:
                    self._housekeeping(now)
                    next_house = now + HOUSEKEEPING_S
                if busy:
                    last_busy = now
                    continue
                pending = bool(self._serving or self._reading or self._has_ops())
                if (pending and now - last_busy < SPIN_S) or self._jobs or not worker.arm():
                    continue
                poller.poll(HOUSEKEEPING_S if pending or self._linger else 1.0)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
        except Exception:  # a bug: fail everything rather than hang transfers
            log.exception("agent %s: ucx progress thread crashed", self.agent.name)
        finally:
            poller.close()
            self._shutdown()

    def _has_ops(self) -> bool:
        return any(c.ops or c.queued for c in self._conns.values())

    def _drain_jobs(self) -> bool:
        busy = False
        while self._jobs:
            what, arg = self._jobs.popleft()
            busy = True
            if what == "post":
                self._start(arg)
            elif what == "forget":
                self._forget(arg)
            elif what == "closed":
                conn = self._conns.get(arg)
                if conn is not None and not conn.closed:
                    self._fail_conn(conn, self._lost(conn, "ucx endpoint closed"), lost=True)
        return busy

    def _poll(self) -> bool:
        busy = False
        for conn in list(self._conns.values()):
            while not conn.closed and conn.am is not None and conn.am.completed:
                req, conn.am = conn.am, None
                try:
                    req.check_error()
                except Exception as exc:
                    self._fail_conn(conn, self._lost(conn, f"ucx receive failed: {exc}"), lost=True)
                    break
                busy = True
                try:
                    msg = req.recv_buffer
                    conn.am = conn.ep.am_recv()
                    self._on_message(conn, memoryview(msg).cast("B"))
                except errors.ProtocolError as exc:
                    self._protocol_error(conn, exc)
                except errors.WeftError:
                    raise
                except Exception as exc:  # UCX refused a call: the endpoint is gone
                    if not conn.closed:
                        self._fail_conn(conn, self._lost(conn, f"ucx call failed: {exc}"), lost=True)
        if self._serving:
            busy |= self._poll_serving()
        if self._reading:
            busy |= self._poll_reading()
        return busy

    def _poll_serving(self) -> bool:
        busy = False
        still: list[_Serve] = []
        for s in self._serving:
            reqs = s.reqs
            while s.pos < len(reqs) and reqs[s.pos].completed:
                s.pos += 1
            if s.pos < len(reqs):
                still.append(s)
                continue
            busy = True
            if s.conn.closed or any(_failed(r) for r in reqs):
                continue
            if s.notify is not None:  # the bytes are in place (WRITE) or sent (READ)
                self.agent._deliver(s.conn.peer_name or "?", s.notify)
            if s.write:
                self._send_ctl(s.conn, _ctl(DONE, s.req_id))
        self._serving = still
        return busy

    def _poll_reading(self) -> bool:
        busy = False
        still: list[_Op] = []
        for op in self._reading:
            if all(r.completed for r in op.reqs):
                busy = True
                bad = next((r for r in op.reqs if _failed(r)), None)
                if bad is None:
                    op.transfer._finish(None)
                elif op.conn is not None and not op.conn.closed:
                    self._fail_conn(op.conn, self._lost(op.conn, "ucx receive failed"), lost=True)
            else:
                still.append(op)
        self._reading = still
        return busy

    def _housekeeping(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.closed:
                continue
            if conn.close_at is not None:
                if now >= conn.close_at:
                    self._drop(conn)
                continue
            if not conn.ready and now > conn.deadline:
                if conn.peer is None:
                    self.agent._log_stranger(("ucx",), errors.ProtocolError("ucx handshake timed out"))
                    self._drop(conn)
                else:
                    exc = errors.PeerLostError(f"ucx handshake with {conn.peer.name!r} timed out")
                    self._fail_conn(conn, exc, lost=False)
                continue
            if conn.peer is not None and conn.peer.failure is not None:
                self._fail_conn(conn, conn.peer.failure, lost=False)
                continue
            for op in [*conn.ops.values(), *conn.queued]:
                if op.transfer.done():  # deadline passed or released: stop tracking it
                    self._forget(op)
        reading: list[_Op] = []
        for op in self._reading:
            if op.transfer.done():
                self._linger_op(op)
            else:
                reading.append(op)
        self._reading = reading
        self._linger = [(reqs, keep) for reqs, keep in self._linger if not all(r.completed for r in reqs)]

    def _linger_op(self, op: _Op) -> None:
        """Keep an ended op's requests (and the buffers they point into) until UCX is done with them."""
        if op.reqs:
            self._linger.append((op.reqs, [op.keep, op.plan]))

    # -- connections ---------------------------------------------------------------------
    def _new_id(self) -> int:
        for _ in range(MAX_CONNS):
            cid = next(self._ids) % MAX_CONNS
            if cid and cid not in self._conns:
                return cid
        raise errors.ProtocolError("no free ucx connection id")

    def _on_accept(self, ep: Any, *_args: Any) -> None:
        """Listener callback (progress thread): a new inbound endpoint; challenge it."""
        try:
            self._accept(ep)
        except Exception:
            log.exception("agent %s: accepting a ucx endpoint failed", self.agent.name)

    def _accept(self, ep: Any) -> None:
        if self._stop or sum(1 for c in self._conns.values() if c.peer is None) >= MAX_INBOUND:
            with contextlib.suppress(Exception):
                ep.close()
            return
        cid = self._new_id()
        conn = _Conn(ep, cid, None, time.monotonic() + self.agent.config.handshake_timeout)
        self._conns[cid] = conn
        self._watch(conn)
        conn.nonce_s = secrets.token_hex(16)
        hello = wire.json_body(
            {
                "v": CTL_VERSION,
                "name": self.agent.name,
                "instance": self.agent.instance,
                "nonce": conn.nonce_s,
                "auth": self.agent.config.secret is not None,
                "id": cid,
            }
        )
        self._send_ctl(conn, _ctl(HELLO) + hello)

    def _watch(self, conn: _Conn) -> None:
        conn.ep.set_close_callback(self._on_ep_closed, (conn.id,))
        conn.am = conn.ep.am_recv()

    def _on_ep_closed(self, cid: int, *_args: Any) -> None:
        self._submit("closed", cid)

    def _connect(self, peer: Peer) -> _Conn:
        address = peer.md.endpoints.get(Backend.UCX)
        if not address:
            raise errors.BackendUnavailableError(f"peer {peer.name!r} publishes no ucx endpoint")
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            ep = self.L.UCXEndpoint.create(self._worker, host, int(port), True)
        except Exception as exc:
            raise errors.PeerLostError(
                f"cannot connect to {peer.name!r} over ucx at {address}: {exc}"
            ) from exc
        conn = _Conn(ep, self._new_id(), peer, time.monotonic() + self.agent.config.connect_timeout)
        self._conns[conn.id] = conn
        self._out[peer.instance] = conn
        self._watch(conn)
        return conn

    def _drop(self, conn: _Conn) -> None:
        """Close the endpoint and forget the connection (pending requests are cancelled)."""
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.id, None)
        if conn.peer is not None and self._out.get(conn.peer.instance) is conn:
            del self._out[conn.peer.instance]
        with contextlib.suppress(Exception):
            if conn.ep.alive:  # closing an endpoint UCX already failed crashes ucxx 0.52
                conn.ep.close()

    def _fail_conn(self, conn: _Conn, exc: errors.WeftError, *, lost: bool) -> None:
        ready = conn.ready
        ops = [*conn.ops.values(), *conn.queued]
        conn.ops, conn.queued = {}, []
        self._drop(conn)
        for op in ops:
            self._linger_op(op)
            op.transfer._finish(exc)
        self._reading = [op for op in self._reading if op.conn is not conn]
        if conn.peer is not None:
            if lost and ready:
                self.agent._connection_failed(conn.peer, exc)
            log.debug("agent %s: ucx connection to %s closed: %s", self.agent.name, conn.peer.name, exc)

    def _lost(self, conn: _Conn, why: str) -> errors.WeftError:
        name = conn.peer_name or "?"
        return errors.PeerLostError(f"lost peer {name!r} ({why})")

    def _protocol_error(self, conn: _Conn, exc: errors.WeftError) -> None:
        if conn.peer is None:
            self.agent._log_stranger(("ucx", conn.peer_name or "unauthenticated"), exc)
            self._drop(conn)
        else:
            log.warning("agent %s: peer %s broke the ucx protocol (%s)", self.agent.name, conn.peer_name, exc)
            self._fail_conn(
                conn, errors.PeerLostError(f"peer {conn.peer_name!r} broke the protocol: {exc}"), lost=True
            )

    def _send_ctl(self, conn: _Conn, body: bytes) -> None:
        req = conn.ep.am_send(self.Array(body))
        self._linger.append(([req], [body]))

    # -- messages ------------------------------------------------------------------------
    def _on_message(self, conn: _Conn, msg: memoryview) -> None:
        if len(msg) < CTL.size:
            raise errors.ProtocolError("short ucx control message")
        magic, version, ftype, flags, count, req_id = CTL.unpack_from(msg)
        if magic != CTL_MAGIC or version != CTL_VERSION:
            raise errors.ProtocolError("bad ucx control message")
        body = msg[CTL.size :]
        if conn.peer is None:  # we are the target
            if not conn.ready:
                if ftype != AUTH:
                    raise errors.ProtocolError(f"expected AUTH, got message type {ftype}")
                self._on_auth(conn, wire.parse_json_body(bytes(body)))
            elif ftype in (WRITE, READ):
                self._serve(conn, ftype, flags, count, req_id, body)
            else:
                raise errors.ProtocolError(f"unexpected ucx message type {ftype}")
            return
        if not conn.ready:
            if ftype == HELLO:
                self._on_hello(conn, wire.parse_json_body(bytes(body)))
            elif ftype == WELCOME:
                self._on_welcome(conn, wire.parse_json_body(bytes(body)))
            elif ftype == REJECT:
                reason = wire.parse_json_body(bytes(body)).get("reason")
                exc = errors.AuthenticationError(f"peer {conn.peer_name!r} refused us over ucx: {reason}")
                self._fail_conn(conn, exc, lost=False)
            else:
                raise errors.ProtocolError(f"unexpected ucx message type {ftype} before WELCOME")
            return
        if ftype == DONE:
            self._answered(conn, req_id, None)
        elif ftype == ERROR:
            message = bytes(body[: wire.MAX_ERROR_BYTES]).decode(errors="replace")
            self._answered(conn, req_id, errors.error_from_code(count, message))
        else:
            raise errors.ProtocolError(f"unexpected ucx message type {ftype}")

    # handshake, initiator side
    def _on_hello(self, conn: _Conn, hello: dict[str, Any]) -> None:
        peer = conn.peer
        assert peer is not None
        if hello.get("name") != peer.name or hello.get("instance") != peer.instance:
            exc: errors.WeftError = errors.StalePeerError(
                f"the ucx endpoint of {peer.name!r} is now {hello.get('name')!r} "
                f"instance {hello.get('instance')!r}"
            )
            self._fail_conn(conn, exc, lost=False)
            return
        secret = self.agent.config.secret
        if bool(hello.get("auth")) != (secret is not None):
            exc = errors.AuthenticationError(
                f"peer {peer.name!r} {'requires' if hello.get('auth') else 'does not use'} a group secret "
                f"and this agent {'has one' if secret else 'has none'}"
            )
            self._fail_conn(conn, exc, lost=False)
            return
        rid, nonce_s = hello.get("id"), hello.get("nonce")
        if not isinstance(rid, int) or not 0 < rid < MAX_CONNS or not isinstance(nonce_s, str):
            raise errors.ProtocolError("malformed ucx HELLO")
        conn.remote_id, conn.nonce_s, conn.nonce_c = rid, nonce_s, secrets.token_hex(16)
        body: dict[str, Any] = {
            "name": self.agent.name,
            "instance": self.agent.instance,
            "target": peer.instance,
            "nonce": conn.nonce_c,
            "id": conn.id,
        }
        if secret is not None:
            body["proof"] = wire.proof(
                secret, b"ucx-client", *self._fields(conn, body["name"], body["instance"])
            )
        self._send_ctl(conn, _ctl(AUTH) + wire.json_body(body))

    def _fields(self, conn: _Conn, client: str, client_instance: str) -> tuple[str, ...]:
        target = conn.peer.instance if conn.peer is not None else self.agent.instance
        client_id, server_id = (
            (conn.id, conn.remote_id) if conn.peer is not None else (conn.remote_id, conn.id)
        )
        return (conn.nonce_s, conn.nonce_c, client, client_instance, target, str(client_id), str(server_id))

    def _on_welcome(self, conn: _Conn, body: dict[str, Any]) -> None:
        peer = conn.peer
        assert peer is not None
        secret = self.agent.config.secret
        if secret is not None:
            want = wire.proof(
                secret, b"ucx-server", conn.nonce_s, conn.nonce_c, peer.instance, self.agent.instance
            )
            if not wire.check_proof(want, body.get("proof")):
                exc = errors.AuthenticationError(
                    f"peer {peer.name!r} could not prove the group secret over ucx"
                )
                self._fail_conn(conn, exc, lost=False)
                return
        conn.ready = True
        queued, conn.queued = conn.queued, []
        for op in queued:
            self._issue(conn, op)

    # handshake, target side
    def _on_auth(self, conn: _Conn, body: dict[str, Any]) -> None:
        name, instance, nonce_c, rid = (
            body.get("name"),
            body.get("instance"),
            body.get("nonce"),
            body.get("id"),
        )
        if (
            not isinstance(name, str)
            or not isinstance(instance, str)
            or not isinstance(nonce_c, str)
            or not isinstance(rid, int)
            or not 0 < rid < MAX_CONNS
        ):
            self._reject(conn, "malformed handshake")
            raise errors.ProtocolError("malformed ucx AUTH")
        if body.get("target") != self.agent.instance:
            self._reject(conn, "stale metadata: this is a different instance")
            return
        conn.remote_id, conn.nonce_c, conn.peer_name = rid, nonce_c, name
        secret = self.agent.config.secret
        reply: dict[str, Any] = {}
        if secret is not None:
            want = wire.proof(secret, b"ucx-client", *self._fields(conn, name, instance))
            if not wire.check_proof(want, body.get("proof")):
                self.agent._log_stranger(
                    ("ucx", name), errors.AuthenticationError("failed the ucx handshake")
                )
                self._reject(conn, "authentication failed")
                return
            reply["proof"] = wire.proof(
                secret, b"ucx-server", conn.nonce_s, nonce_c, self.agent.instance, instance
            )
        conn.ready = True
        self._send_ctl(conn, _ctl(WELCOME) + wire.json_body(reply))

    def _reject(self, conn: _Conn, reason: str) -> None:
        with contextlib.suppress(Exception):
            self._send_ctl(conn, _ctl(REJECT) + wire.json_body({"reason": reason}))
        conn.close_at = time.monotonic() + REJECT_LINGER_S  # let the REJECT go out first

    # -- initiator -------------------------------------------------------------------------
    def _start(self, op: _Op) -> None:
        if op.transfer.done():
            return
        peer = op.plan.peer
        try:
            peer.check_alive()
            conn = self._out.get(peer.instance)
            if conn is None or conn.closed:
                conn = self._connect(peer)
        except errors.WeftError as exc:
            op.transfer._finish(exc)
            return
        if conn.ready:
            self._issue(conn, op)
        else:
            conn.queued.append(op)

    def _issue(self, conn: _Conn, op: _Op) -> None:
        if op.transfer.done():
            return
        plan = op.plan
        req_id = conn.next_req()
        op.conn, op.req_id = conn, req_id
        flags, prefix = 0, b""
        if op.notify is not None:
            flags, prefix = wire.FLAG_NOTIFY, wire.NOTIFY_LEN.pack(len(op.notify)) + op.notify
        ftype = WRITE if plan.op is Op.WRITE else READ
        body = _ctl(ftype, req_id, plan.count, flags) + prefix + plan.table
        ep, tag = conn.ep, self.L.UCXXTag
        conn.ops[req_id] = op
        try:
            if ftype == READ:  # receives first: eager data lands in place, not in a bounce buffer
                op.reqs = [ep.tag_recv(a, tag(_tag(conn.id, req_id, i))) for i, a in enumerate(plan.arrays)]
            op.keep = [body]
            op.reqs.append(ep.am_send(self.Array(body)))
            if ftype == WRITE:
                rid = conn.remote_id
                op.reqs.extend(ep.tag_send(a, tag(_tag(rid, req_id, i))) for i, a in enumerate(plan.arrays))
        except Exception as exc:
            self._fail_conn(conn, self._lost(conn, f"ucx post failed: {exc}"), lost=True)

    def _answered(self, conn: _Conn, req_id: int, error: errors.WeftError | None) -> None:
        op = conn.ops.pop(req_id, None)
        if op is None:  # ended early (deadline, release): a late answer
            return
        if error is not None or op.plan.op is Op.WRITE:
            self._linger_op(op)
            op.transfer._finish(error)
            return
        # READ: the answer may overtake the data; the transfer ends when every receive is in
        count = op.plan.count
        self._linger.append((op.reqs[count:], op.keep))
        op.reqs = op.reqs[:count]
        self._reading.append(op)

    def _forget(self, op: _Op) -> None:
        conn = op.conn
        if conn is not None and conn.ops.get(op.req_id) is op:
            del conn.ops[op.req_id]
            self._linger_op(op)
        elif conn is None:
            for c in self._out.values():
                if op in c.queued:
                    c.queued.remove(op)

    # -- target ------------------------------------------------------------------------------
    def _serve(self, conn: _Conn, ftype: int, flags: int, count: int, req_id: int, body: memoryview) -> None:
        cfg = self.agent.config
        if count == 0 or count > cfg.max_descriptors or count >= MAX_INDEX:
            raise errors.ProtocolError(f"descriptor count {count} out of range")
        notify = None
        pos = 0
        if flags & wire.FLAG_NOTIFY:
            if len(body) < 4:
                raise errors.ProtocolError("truncated notification")
            (nlen,) = wire.NOTIFY_LEN.unpack_from(body)
            if nlen > cfg.max_notification_bytes or 4 + nlen > len(body):
                raise errors.ProtocolError("bad notification length")
            notify = bytes(body[4 : 4 + nlen])
            pos = 4 + nlen
        if len(body) - pos != count * wire.DESC_DTYPE.itemsize:
            raise errors.ProtocolError("descriptor table does not match its count")
        table = np.frombuffer(body, wire.DESC_DTYPE, count, pos)
        views, code, message = self._resolve(table, write=ftype == WRITE)
        ep, tag = conn.ep, self.L.UCXXTag
        if ftype == WRITE:
            if views is None:  # consume the payload: 1-byte receives truncate each message
                drain = [ep.tag_recv(self._scratch_arr, tag(_tag(conn.id, req_id, i))) for i in range(count)]
                self._linger.append((drain, []))
                self._error(conn, req_id, code, message)
                return
            arrays = [self.Array(v) for v in views]
            reqs = [ep.tag_recv(a, tag(_tag(conn.id, req_id, i))) for i, a in enumerate(arrays)]
            self._serving.append(_Serve(conn, req_id, True, reqs, [arrays, views], notify))
            return
        if views is None:  # answer, then complete the initiator's posted receives with empty messages
            self._error(conn, req_id, code, message)
            rid = conn.remote_id
            fill = [ep.tag_send(self._empty_arr, tag(_tag(rid, req_id, i))) for i in range(count)]
            self._linger.append((fill, []))
            return
        arrays = [self.Array(v) for v in views]
        rid = conn.remote_id
        reqs = [ep.tag_send(a, tag(_tag(rid, req_id, i))) for i, a in enumerate(arrays)]
        self._send_ctl(conn, _ctl(DONE, req_id))
        self._serving.append(_Serve(conn, req_id, False, reqs, [arrays, views], notify))

    def _resolve(self, table: Any, write: bool) -> tuple[list[memoryview] | None, int, str]:
        """The tcp target's checks (`resolve_descriptors`), plus: host memory only."""
        spans, code, message = resolve_descriptors(self.agent, table, write)
        if spans is None:
            return None, code, message
        views = []
        for span in spans:
            if span.view is None:
                return None, errors.ErrorCode.BACKEND, f"region {span.region.label} is not host memory (ucx)"
            views.append(span.view)
        return views, 0, ""

    def _error(self, conn: _Conn, req_id: int, code: int, message: str) -> None:
        self._send_ctl(conn, _ctl(ERROR, req_id, code) + message.encode()[: wire.MAX_ERROR_BYTES])

    # -- shutdown ------------------------------------------------------------------------
    def _shutdown(self) -> None:
        exc = errors.AgentClosedError(f"agent {self.agent.name!r} closed")
        self._closed = True
        for conn in list(self._conns.values()):
            self._fail_conn(conn, exc, lost=False)
        while self._jobs:
            what, arg = self._jobs.popleft()
            if what == "post":
                arg.transfer._finish(exc)
        deadline = time.monotonic() + 0.2
        with contextlib.suppress(Exception):
            while time.monotonic() < deadline and self._worker.progress():
                pass
        self._serving, self._reading, self._linger = [], [], []
        self._conns, self._out = {}, {}
        self._listener = None
        self._scratch_arr = self._empty_arr = None
        self._worker = None
        self._ctx = None


def _failed(req: Any) -> bool:
    try:
        req.check_error()
    except Exception:
        return True
    return False
