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

Modules: this one holds the loader and `UcxBackend` (the `DataPath`, the progress loop, the
initiator side); `ucx_links` the endpoints and the handshake (`weft.fabric.handshake`, ucx
scheme); `ucx_target` the serving side; `ucx_proto` the control header, tags and records.
Only this module imports ucxx; the others get its classes from here.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any

from weft.fabric import errors, wire
from weft.fabric.backends import ucx_links, ucx_target
from weft.fabric.backends import ucx_proto as proto
from weft.fabric.backends.ucx_proto import UcxPlan
from weft.fabric.types import Backend, MemoryKind, Op

if TYPE_CHECKING:
    from weft.fabric.backend import BackendHost
    from weft.fabric.memory import DescList
    from weft.fabric.peers import Peer
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


class UcxBackend:
    kind = Backend.UCX

    def __init__(self, host: BackendHost) -> None:
        self.L, self.Array = load_ucxx()
        self.host = host
        self._ctx: Any = self.L.UCXContext(dict(UCX_OPTIONS))
        self._worker: Any = self.L.UCXWorker(self._ctx)
        self._worker.init_blocking_progress_mode()
        self._links = ucx_links.Links(
            self.L,
            self.Array,
            self._worker,
            host,
            lambda conn, exc, lost: self._fail_conn(conn, exc, lost=lost),
            self._ready,
            lambda cid: self._submit("closed", cid),
        )
        self._conns = self._links.conns  # by our connection id
        self._linger = self._links.linger  # requests of ended ops, buffers kept (never rebound)
        self._target = ucx_target.Target(host, self._links)
        self._jobs: collections.deque[tuple[str, Any]] = collections.deque()
        self._reading: list[proto.PostedOp] = []  # READs answered DONE, receives still landing
        self._closed = False
        self._stop = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._listener: Any = self.L.UCXListener.create(
            self._worker, 0, self._links.on_accept, deliver_endpoint=True
        )
        self.port = int(self._listener.port)
        self._thread = threading.Thread(target=self._run, name=f"weft-ucx {host.name}", daemon=True)
        self._thread.start()

    # -- DataPath ------------------------------------------------------------------------
    def usable(self, peer: Peer, local: MemoryKind, remote: MemoryKind) -> bool:
        if local is not MemoryKind.DRAM or remote is not MemoryKind.DRAM:
            return False
        return "ucx" in peer.md.endpoints and not self._closed

    def plan(self, op: Op, local: DescList, peer: Peer, remote: DescList) -> UcxPlan:
        region = self.host.local_region(local)
        if len(local) >= proto.MAX_INDEX:
            raise errors.InvalidDescriptorError(
                f"the ucx backend moves at most {proto.MAX_INDEX - 1} descriptors"
            )
        base = region.view
        views = tuple(base[o : o + n] for o, n in local.pairs())
        arrays = tuple(self.Array(v) for v in views)
        table = wire.desc_table(remote.region_id, remote.offsets, remote.lengths)
        return UcxPlan(op, peer, table, len(remote), local.total, views, arrays)

    def post(self, plan: UcxPlan, transfer: Transfer, notify: bytes | None) -> None:
        if self._closed:
            raise errors.AgentClosedError(f"agent {self.host.name!r} closed")
        plan.peer.check_alive()
        op = proto.PostedOp(plan, transfer, notify)
        transfer.on_cancel(lambda: self._submit("forget", op))
        self._submit("post", op)

    def endpoint(self) -> str | None:
        host = self.host.config.advertise_host or self.host.config.listen_host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop = True
        self._links.stopping = True
        self._signal()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)
            if self._thread.is_alive():
                log.warning("agent %s: ucx progress thread did not stop", self.host.name)
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
                    next_house = now + proto.HOUSEKEEPING_S
                if busy:
                    last_busy = now
                    continue
                pending = bool(self._target.serving or self._reading or self._has_ops())
                if (pending and now - last_busy < proto.SPIN_S) or self._jobs or not worker.arm():
                    continue
                poller.poll(proto.HOUSEKEEPING_S if pending or self._linger else 1.0)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
        except Exception:  # a bug: fail everything rather than hang transfers
            log.exception("agent %s: ucx progress thread crashed", self.host.name)
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
        if self._target.serving:
            busy |= self._target.poll()
        if self._reading:
            busy |= self._poll_reading()
        return busy

    def _poll_reading(self) -> bool:
        busy = False
        still: list[proto.PostedOp] = []
        for op in self._reading:
            if all(r.completed for r in op.reqs):
                busy = True
                bad = next((r for r in op.reqs if proto.failed(r)), None)
                if bad is None:
                    op.transfer.complete(None)
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
                    self._links.drop(conn)
                continue
            if not conn.ready and now > conn.deadline:
                if conn.peer is None:
                    self.host.refused(("ucx",), errors.ProtocolError("ucx handshake timed out"))
                    self._links.drop(conn)
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
        reading: list[proto.PostedOp] = []
        for op in self._reading:
            if op.transfer.done():
                self._linger_op(op)
            else:
                reading.append(op)
        self._reading = reading
        self._linger[:] = [(reqs, keep) for reqs, keep in self._linger if not all(r.completed for r in reqs)]

    def _linger_op(self, op: proto.PostedOp) -> None:
        """Keep an ended op's requests (and the buffers they point into) until UCX is done with them."""
        if op.reqs:
            self._linger.append((op.reqs, [op.keep, op.plan]))

    # -- connections ---------------------------------------------------------------------
    def _fail_conn(self, conn: proto.Conn, exc: errors.WeftError, *, lost: bool) -> None:
        ready = conn.ready
        ops = [*conn.ops.values(), *conn.queued]
        conn.ops, conn.queued = {}, []
        self._links.drop(conn)
        for op in ops:
            self._linger_op(op)
            op.transfer.complete(exc)
        self._reading = [op for op in self._reading if op.conn is not conn]
        if conn.peer is not None:
            if lost and ready:
                self.host.peer_failed(conn.peer, exc)
            log.debug("agent %s: ucx connection to %s closed: %s", self.host.name, conn.peer.name, exc)

    def _lost(self, conn: proto.Conn, why: str) -> errors.WeftError:
        name = conn.peer_name or "?"
        return errors.PeerLostError(f"lost peer {name!r} ({why})")

    def _protocol_error(self, conn: proto.Conn, exc: errors.WeftError) -> None:
        if conn.peer is None:
            self.host.refused(("ucx", conn.peer_name or "unauthenticated"), exc)
            self._links.drop(conn)
        else:
            log.warning("agent %s: peer %s broke the ucx protocol (%s)", self.host.name, conn.peer_name, exc)
            self._fail_conn(
                conn, errors.PeerLostError(f"peer {conn.peer_name!r} broke the protocol: {exc}"), lost=True
            )

    # -- messages ------------------------------------------------------------------------
    def _on_message(self, conn: proto.Conn, msg: memoryview) -> None:
        if len(msg) < proto.CTL.size:
            raise errors.ProtocolError("short ucx control message")
        magic, version, ftype, flags, count, req_id = proto.CTL.unpack_from(msg)
        if magic != proto.CTL_MAGIC or version != proto.CTL_VERSION:
            raise errors.ProtocolError("bad ucx control message")
        body = msg[proto.CTL.size :]
        if conn.peer is None:  # we are the target
            if not conn.ready:
                if ftype != proto.AUTH:
                    raise errors.ProtocolError(f"expected proto.AUTH, got message type {ftype}")
                self._links.on_auth(conn, wire.parse_json_body(bytes(body)))
            elif ftype in (proto.WRITE, proto.READ):
                self._target.serve(conn, ftype, flags, count, req_id, body)
            else:
                raise errors.ProtocolError(f"unexpected ucx message type {ftype}")
            return
        if not conn.ready:
            if ftype == proto.HELLO:
                self._links.on_hello(conn, wire.parse_json_body(bytes(body)))
            elif ftype == proto.WELCOME:
                self._links.on_welcome(conn, wire.parse_json_body(bytes(body)))
            elif ftype == proto.REJECT:
                assert conn.client is not None
                self._fail_conn(conn, conn.client.rejected(wire.parse_json_body(bytes(body))), lost=False)
            else:
                raise errors.ProtocolError(f"unexpected ucx message type {ftype} before proto.WELCOME")
            return
        if ftype == proto.DONE:
            self._answered(conn, req_id, None)
        elif ftype == proto.ERROR:
            message = bytes(body[: wire.MAX_ERROR_BYTES]).decode(errors="replace")
            self._answered(conn, req_id, errors.error_from_code(count, message))
        else:
            raise errors.ProtocolError(f"unexpected ucx message type {ftype}")

    # handshake, initiator side
    # -- initiator -------------------------------------------------------------------------
    def _start(self, op: proto.PostedOp) -> None:
        if op.transfer.done():
            return
        peer = op.plan.peer
        try:
            peer.check_alive()
            conn = self._links.out.get(peer.instance)
            if conn is None or conn.closed:
                conn = self._links.connect(peer)
        except errors.WeftError as exc:
            op.transfer.complete(exc)
            return
        if conn.ready:
            self._issue(conn, op)
        else:
            conn.queued.append(op)

    def _ready(self, conn: proto.Conn) -> None:
        """A connection finished its handshake: issue what was posted meanwhile."""
        queued, conn.queued = conn.queued, []
        for op in queued:
            self._issue(conn, op)

    def _issue(self, conn: proto.Conn, op: proto.PostedOp) -> None:
        if op.transfer.done():
            return
        plan = op.plan
        req_id = conn.next_req()
        op.conn, op.req_id = conn, req_id
        flags, prefix = 0, b""
        if op.notify is not None:
            flags, prefix = wire.FLAG_NOTIFY, wire.NOTIFY_LEN.pack(len(op.notify)) + op.notify
        ftype = proto.WRITE if plan.op is Op.WRITE else proto.READ
        body = proto.ctl(ftype, req_id, plan.count, flags) + prefix + plan.table
        ep, tag = conn.ep, self.L.UCXXTag
        conn.ops[req_id] = op
        try:
            if ftype == proto.READ:  # receives first: eager data lands in place, not in a bounce buffer
                op.reqs = [
                    ep.tag_recv(a, tag(proto.tag(conn.id, req_id, i))) for i, a in enumerate(plan.arrays)
                ]
            op.keep = [body]
            op.reqs.append(ep.am_send(self.Array(body)))
            if ftype == proto.WRITE:
                rid = conn.remote_id
                op.reqs.extend(
                    ep.tag_send(a, tag(proto.tag(rid, req_id, i))) for i, a in enumerate(plan.arrays)
                )
        except Exception as exc:
            self._fail_conn(conn, self._lost(conn, f"ucx post failed: {exc}"), lost=True)

    def _answered(self, conn: proto.Conn, req_id: int, error: errors.WeftError | None) -> None:
        op = conn.ops.pop(req_id, None)
        if op is None:  # ended early (deadline, release): a late answer
            return
        if error is not None or op.plan.op is Op.WRITE:
            self._linger_op(op)
            op.transfer.complete(error)
            return
        # READ: the answer may overtake the data; the transfer ends when every receive is in
        count = op.plan.count
        self._linger.append((op.reqs[count:], op.keep))
        op.reqs = op.reqs[:count]
        self._reading.append(op)

    def _forget(self, op: proto.PostedOp) -> None:
        conn = op.conn
        if conn is not None and conn.ops.get(op.req_id) is op:
            del conn.ops[op.req_id]
            self._linger_op(op)
        elif conn is None:
            for c in self._links.out.values():
                if op in c.queued:
                    c.queued.remove(op)

    # -- shutdown ------------------------------------------------------------------------
    def _shutdown(self) -> None:
        exc = errors.AgentClosedError(f"agent {self.host.name!r} closed")
        self._closed = True
        for conn in list(self._conns.values()):
            self._fail_conn(conn, exc, lost=False)
        while self._jobs:
            what, arg = self._jobs.popleft()
            if what == "post":
                arg.transfer.complete(exc)
        deadline = time.monotonic() + 0.2
        with contextlib.suppress(Exception):
            while time.monotonic() < deadline and self._worker.progress():
                pass
        self._target.clear()
        self._reading = []
        self._linger.clear()
        self._conns.clear()
        self._links.out.clear()
        self._listener = None
        self._links.worker = None
        self._worker = None
        self._ctx = None
