"""Peer connections: the authenticated TCP stream under every peer.

`Outbound` is this agent's connection to a peer it added: the poster writes its frame
itself when the socket is idle and a sender thread writes the backlog otherwise (posting
never blocks on the socket); a reader thread completes pending requests and delivers
notifications. `Inbound` serves a peer that connected to us: handshake first, then
READ/WRITE against registered regions only, bounds checked before any byte is touched.
Device memory moves through host staging of one bounded chunk per request, taken from the
agent's budget (`weft.fabric.limits.Staging`) before the payload is read or the answer is
sent, never sized by what a header claims; a request that gets none in time is refused with
`LimitError` and the stream serves on.

Either side seeing the stream end fails every pending request on it at once with
`PeerLostError`: a killed process's sockets are closed by its kernel, so this is the fast
death signal (well under 100 ms on one host).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from weft.fabric import errors, handshake, wire

if TYPE_CHECKING:
    from weft.fabric.backend import BackendHost
    from weft.fabric.peers import Peer
    from weft.fabric.regions import Span
    from weft.fabric.transfer import Transfer

log = logging.getLogger(__name__)
_DEBUG = logging.DEBUG


class Pending:
    """A request waiting for its answer on an outbound connection."""

    __slots__ = ("after", "on_bytes", "transfer", "views")

    def __init__(
        self,
        transfer: Transfer | None,
        views: Sequence[memoryview] | None = None,
        after: Callable[[], None] | None = None,
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> None:
        self.transfer = transfer
        self.views = views  # READ: where the answer's bytes go
        self.after = after  # run after the bytes landed (device copies, striping joins)
        self.on_bytes = on_bytes  # MD_REQ: receives the answer's body


class Outbound:
    """This agent's authenticated connection to one peer."""

    def __init__(self, host: BackendHost, peer: Peer, sock: socket.socket) -> None:
        self.host = host
        self.peer = peer
        self.sock = sock
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._plock = threading.Lock()
        # Frames wait in `_backlog`; whoever holds the sending rights (`_busy`) writes them.
        # A poster whose connection is idle writes its own frame without blocking
        # (MSG_DONTWAIT) and leaves any rest to the sender thread: no thread hand-off on the
        # common path, and never a caller stuck on a full socket.
        self._cv = threading.Condition(threading.Lock())
        self._backlog: collections.deque[Sequence[bytes | bytearray | memoryview]] = collections.deque()
        self._busy = False
        self._closed = False
        self._failed: errors.WeftError | None = None
        tag = f"{host.name}->{peer.name}"
        self._reader = threading.Thread(target=self._read_loop, name=f"weft-rx {tag}", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name=f"weft-tx {tag}", daemon=True)
        self._reader.start()
        self._sender.start()

    # -- requests ------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self._closed

    def next_id(self) -> int:
        return next(self._ids)

    def submit(
        self, req_id: int, pending: Pending | None, parts: Sequence[bytes | bytearray | memoryview]
    ) -> None:
        """Queue a frame; its answer completes `pending`. Raises the connection's error if closed."""
        if pending is not None:
            with self._plock:
                if self._closed:
                    raise self._failed or errors.PeerLostError(f"connection to {self.peer.name!r} closed")
                self._pending[req_id] = pending
            if pending.transfer is not None:
                pending.transfer.on_cancel(lambda: self.forget(req_id))
        elif self._closed:
            raise self._failed or errors.PeerLostError(f"connection to {self.peer.name!r} closed")
        with self._cv:
            if self._busy or self._backlog:
                self._backlog.append(parts)
                self._cv.notify()
                return
            self._busy = True
        try:
            rest = wire.send_gather(self.sock, parts, nowait=True)
        except OSError as exc:
            self.fail(errors.PeerLostError(f"lost peer {self.peer.name!r}: send failed: {exc}"))
            return
        with self._cv:
            if rest:
                self._backlog.appendleft(rest)
            self._busy = False
            if self._backlog:
                self._cv.notify()

    def forget(self, req_id: int) -> None:
        """Drop a request whose transfer ended early (timeout, release); late answers are drained."""
        with self._plock:
            self._pending.pop(req_id, None)

    def send_now(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Queue a frame that expects no answer (NOTIFY)."""
        self.submit(0, None, parts)

    # -- threads -------------------------------------------------------------------------
    def _send_loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while (self._busy or not self._backlog) and not self._closed:
                        self._cv.wait()
                    if self._closed:
                        return
                    parts = self._backlog.popleft()
                    self._busy = True
                wire.send_gather(self.sock, parts)
                with self._cv:
                    self._busy = False
        except OSError as exc:
            self.fail(errors.PeerLostError(f"lost peer {self.peer.name!r}: send failed: {exc}"))

    def _read_loop(self) -> None:
        sock = self.sock
        hdr = bytearray(wire.HEADER_SIZE)
        hview = memoryview(hdr)
        try:
            while True:
                wire.recv_into_exact(sock, hview)
                ftype, _flags, count, req_id, length = wire.parse_header(hdr)
                if ftype == wire.DONE:
                    self._complete(req_id, None)
                elif ftype == wire.READ_DATA:
                    self._read_data(req_id, length)
                elif ftype == wire.ERROR:
                    if length > wire.MAX_ERROR_BYTES:
                        raise errors.ProtocolError("oversized ERROR frame")
                    message = wire.recv_exact(sock, length).decode(errors="replace")
                    self._complete(req_id, errors.error_from_code(count, message))
                elif ftype == wire.NOTIFY:
                    if length > self.host.config.max_notification_bytes:
                        raise errors.ProtocolError(f"notification of {length} bytes is too large")
                    self.host.deliver(self.peer.name, bytes(wire.recv_exact(sock, length)))
                elif ftype == wire.MD_RESP:
                    if length > (16 << 20):
                        raise errors.ProtocolError("oversized metadata")
                    body = bytes(wire.recv_exact(sock, length))
                    p = self._pop(req_id)
                    if p is not None and p.on_bytes is not None:
                        p.on_bytes(body)
                elif ftype == wire.PONG:
                    if length:
                        raise errors.ProtocolError("PONG carries a body")
                    p = self._pop(req_id)
                    if p is not None and p.on_bytes is not None:
                        p.on_bytes(b"")
                elif ftype == wire.INVALIDATE:
                    self.peer.drop_region(count)
                elif ftype == wire.BYE:
                    self.fail(errors.PeerLostError(f"peer {self.peer.name!r} closed"))
                    return
                else:
                    raise errors.ProtocolError(f"unexpected frame type {ftype}")
        except errors.ProtocolError as exc:
            log.warning(
                "agent %s: peer %s broke the protocol (%s); disconnecting",
                self.host.name,
                self.peer.name,
                exc,
            )
            self.fail(errors.PeerLostError(f"peer {self.peer.name!r} broke the protocol: {exc}"))
        except (OSError, wire.ConnectionClosed) as exc:
            self.fail(errors.PeerLostError(f"lost peer {self.peer.name!r}: {exc or 'connection closed'}"))

    def _pop(self, req_id: int) -> Pending | None:
        with self._plock:
            return self._pending.pop(req_id, None)

    def _complete(self, req_id: int, error: errors.WeftError | None) -> None:
        p = self._pop(req_id)
        if p is None:
            return
        if error is None and p.after is not None:
            try:
                p.after()
            except errors.WeftError as exc:
                error = exc
        if p.transfer is not None:
            p.transfer.complete(error)

    def _read_data(self, req_id: int, length: int) -> None:
        with self._plock:
            p = self._pending.get(req_id)
        views = p.views if p is not None else None
        if views is None or sum(len(v) for v in views) != length:
            if p is not None:  # a READ_DATA that does not fit the request: the peer is broken
                raise errors.ProtocolError("READ_DATA length does not match the request")
            wire.drain(self.sock, length)  # the transfer timed out or was released
            return
        wire.recv_scatter(self.sock, views)
        self._complete(req_id, None)

    # -- shutdown ------------------------------------------------------------------------
    def fail(self, exc: errors.WeftError) -> None:
        """Close the connection and fail everything pending on it with `exc`."""
        with self._plock:
            if self._closed:
                return
            self._closed = True
            self._failed = exc
            pending, self._pending = self._pending, {}
        with self._cv:
            self._backlog.clear()
            self._cv.notify_all()
        _shutdown(self.sock)
        for p in pending.values():
            if p.transfer is not None:
                p.transfer.complete(exc)
        if log.isEnabledFor(_DEBUG):
            log.debug("agent %s: connection to %s closed: %s", self.host.name, self.peer.name, exc)
        self.host.peer_failed(self.peer, exc)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def connect(host: BackendHost, peer: Peer, timeout: float) -> Outbound:
    """Open and authenticate a connection to `peer` (client side of the handshake)."""
    md = peer.md
    try:
        sock = socket.create_connection((md.listen.host, md.listen.port), timeout=timeout)
    except OSError as exc:
        raise errors.PeerLostError(
            f"cannot connect to {peer.name!r} at {md.listen.host}:{md.listen.port}: {exc}"
        ) from exc
    try:
        sock.settimeout(timeout)
        wire.tune(sock, host.config.socket_buffer_bytes)
        deadline = time.monotonic() + timeout
        client = handshake.Client(
            host.identity(), handshake.TCP, peer.name, peer.instance, f"{md.listen.host}:{md.listen.port}"
        )
        payload = wire.json_body(client.answer(_recv_handshake(sock, wire.HELLO, deadline)))
        sock.sendall(wire.header(wire.AUTH, length=len(payload)) + payload)
        reply_type, reply = _recv_any_handshake(sock, deadline)
        if reply_type == wire.REJECT:
            raise client.rejected(reply)
        if reply_type != wire.WELCOME:
            raise errors.ProtocolError(f"unexpected handshake frame {reply_type}")
        client.check_welcome(reply)
        sock.settimeout(None)
    except (OSError, wire.ConnectionClosed) as exc:
        _shutdown(sock)
        raise errors.PeerLostError(f"handshake with {peer.name!r} failed: {exc}") from exc
    except errors.WeftError:
        _shutdown(sock)
        raise
    return Outbound(host, peer, sock)


def _recv_any_handshake(sock: socket.socket, deadline: float) -> tuple[int, dict[str, Any]]:
    """One handshake frame, all of it before `deadline`; TimeoutError otherwise."""
    ftype, _flags, _count, _req, length = wire.parse_header(wire.recv_exact(sock, wire.HEADER_SIZE, deadline))
    if length > wire.MAX_HANDSHAKE_BYTES:
        raise errors.ProtocolError("oversized handshake frame")
    return ftype, wire.parse_json_body(wire.recv_exact(sock, length, deadline))


def _recv_handshake(sock: socket.socket, expected: int, deadline: float) -> dict[str, Any]:
    ftype, body = _recv_any_handshake(sock, deadline)
    if ftype != expected:
        raise errors.ProtocolError(f"expected handshake frame {expected}, got {ftype}")
    return body


class Inbound:
    """A peer's connection to us. Serves its requests on one thread."""

    def __init__(
        self, host: BackendHost, sock: socket.socket, addr: Any, gone: Callable[[Inbound], None]
    ) -> None:
        self.host = host
        self._gone = gone
        self.sock = sock
        self.addr = addr
        self.peer_name: str | None = None
        self.peer_instance: str | None = None
        self.busy = False  # serving a request now (drain waits for this to clear)
        self.served = self.served_bytes = self.refused = 0  # written by this connection's thread only
        self._send_lock = threading.Lock()
        self._closed = False
        self.thread = threading.Thread(target=self._serve, name=f"weft-in {host.name}<-{addr}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def send(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        with self._send_lock:
            wire.send_gather(self.sock, parts)

    def close(self) -> None:
        self._closed = True
        _shutdown(self.sock)

    # -- serving -------------------------------------------------------------------------
    def _serve(self) -> None:
        host = self.host
        try:
            self._handshake()
            log.debug("agent %s: %s connected from %s", host.name, self.peer_name, self.addr)
            self._loop()
        except (errors.ProtocolError, errors.AuthenticationError) as exc:
            host.refused(self.addr, exc)
        except (OSError, wire.ConnectionClosed):
            pass
        except Exception:  # never let a peer crash the agent; say what happened
            log.exception("agent %s: error serving %s", host.name, self.addr)
        finally:
            self.close()
            self._gone(self)

    def _handshake(self) -> None:
        timeout = self.host.config.handshake_timeout
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        server = handshake.Server(self.host.identity(), handshake.TCP)
        hello = wire.json_body(server.hello())
        self.sock.sendall(wire.header(wire.HELLO, length=len(hello)) + hello)
        try:
            body = _recv_handshake(self.sock, wire.AUTH, deadline)
        except TimeoutError:
            raise errors.ProtocolError("handshake timed out") from None
        try:
            reply = wire.json_body(server.check(body))
        except handshake.Refused as refused:
            self._reject(refused.reason)
            raise refused.error from None
        self.sock.sendall(wire.header(wire.WELCOME, length=len(reply)) + reply)
        self.sock.settimeout(None)
        self.peer_name, self.peer_instance = server.peer_name, server.peer_instance

    def _reject(self, reason: str) -> None:
        body = wire.json_body({"reason": reason})
        with contextlib.suppress(OSError):
            self.sock.sendall(wire.header(wire.REJECT, length=len(body)) + body)

    def _loop(self) -> None:
        host = self.host
        sock = self.sock
        hdr = bytearray(wire.HEADER_SIZE)
        hview = memoryview(hdr)
        peer = self.peer_name
        assert peer is not None
        max_desc = host.config.max_descriptors
        max_notify = host.config.max_notification_bytes
        while True:
            wire.recv_into_exact(sock, hview)
            ftype, flags, count, req_id, length = wire.parse_header(hdr)
            if ftype in (wire.WRITE, wire.READ):
                if count == 0 or count > max_desc:
                    if count:
                        host.limit_hit("descriptors")
                    raise errors.ProtocolError(f"descriptor count {count} out of range")
                used = 0
                notify = None
                if flags & wire.FLAG_NOTIFY:
                    if length < 4:
                        raise errors.ProtocolError("frame shorter than its notification")
                    (nlen,) = wire.NOTIFY_LEN.unpack(wire.recv_exact(sock, 4))
                    if nlen > max_notify:
                        raise errors.ProtocolError(f"notification of {nlen} bytes is too large")
                    if 4 + nlen > length:
                        raise errors.ProtocolError("frame shorter than its notification")
                    notify = bytes(wire.recv_exact(sock, nlen))
                    used += 4 + nlen
                table_len = count * wire.DESC_DTYPE.itemsize
                if used + table_len > length:
                    raise errors.ProtocolError("frame shorter than its descriptor table")
                table = wire.parse_desc_table(wire.recv_exact(sock, table_len))
                used += table_len
                payload = length - used
                total = sum(table["length"].tolist())  # Python ints: no u64 wrap-around
                if ftype == wire.WRITE:
                    if payload != total:
                        raise errors.ProtocolError("WRITE payload does not match its descriptors")
                    self.busy = True
                    self._serve_write(req_id, table, notify, payload)
                    self.busy = False
                else:
                    if payload != 0:
                        raise errors.ProtocolError("READ frame carries a payload")
                    self.busy = True
                    self._serve_read(req_id, table, notify, total)
                    self.busy = False
            elif ftype == wire.NOTIFY:
                if length > max_notify:
                    raise errors.ProtocolError(f"notification of {length} bytes is too large")
                host.deliver(peer, bytes(wire.recv_exact(sock, length)))
            elif ftype == wire.PING:
                if length:
                    raise errors.ProtocolError("PING carries a body")
                if not host.fenced:  # a fenced agent is silent: peers drop it rather than wait
                    self.send([wire.header(wire.PONG, req_id)])
            elif ftype == wire.MD_REQ:
                if length:
                    raise errors.ProtocolError("MD_REQ carries a body")
                md = host.metadata()
                self.send([wire.header(wire.MD_RESP, req_id, len(md)), md])
            elif ftype == wire.BYE:
                return
            else:
                raise errors.ProtocolError(f"unexpected frame type {ftype}")

    def _error(self, req_id: int, code: int, message: str) -> None:
        body = message.encode()[: wire.MAX_ERROR_BYTES]
        self.send([wire.header(wire.ERROR, req_id, len(body), count=code), body])

    def _staging(self, spans: list[Span]) -> tuple[bytearray | None, str]:
        """Host staging for a request's device spans (None, "" when it has none), or (None, why)
        when the agent's staging budget had nothing free within `staging_timeout`."""
        device = max((span.length for span in spans if span.view is None), default=0)
        if not device:
            return None, ""
        staging = self.host.staging.acquire(device, self.host.config.staging_timeout)
        if staging is None:
            self.host.limit_hit("staging")
            return None, (
                f"{self.host.name!r} has no staging memory free for device copies "
                f"(max_staging_bytes={self.host.config.max_staging_bytes}); try again later"
            )
        return staging, ""

    def _serve_write(self, req_id: int, table: Any, notify: bytes | None, payload: int) -> None:
        spans, code, message = self.host.resolve(table, write=True)
        staging: bytearray | None = None
        if spans is not None:
            staging, why = self._staging(spans)
            if why:
                spans, code, message = None, errors.ErrorCode.LIMIT, why
        if spans is None:
            wire.drain(self.sock, payload)
            self.refused += 1  # before the answer: the initiator may read stats right after it
            self._error(req_id, code, message)
            return
        self.served += 1
        self.served_bytes += payload
        try:
            self._land(spans, staging)
        finally:
            if staging is not None:
                self.host.staging.release(len(staging))
        if notify is not None and not self.host.deliver(self.peer_name or "?", notify):
            self._error(
                req_id,
                errors.ErrorCode.INBOX_FULL,
                f"the bytes are in place, but {self.host.name!r}'s notification inbox stayed full",
            )
            return
        self.send([wire.header(wire.DONE, req_id)])

    def _land(self, spans: list[Span], staging: bytearray | None) -> None:
        """Receive a WRITE's payload into its spans; device spans stream through `staging`."""
        views: list[memoryview] = []
        for span in spans:
            if span.view is not None:
                views.append(span.view)
                continue
            if views:
                wire.recv_scatter(self.sock, views)
                views = []
            assert staging is not None
            buf = memoryview(staging)
            done = 0
            while done < span.length:
                n = min(len(buf), span.length - done)
                wire.recv_into_exact(self.sock, buf[:n])
                self.host.host_to_device(buf[:n], span.region, span.offset + done)
                done += n
        if views:
            wire.recv_scatter(self.sock, views)

    def _serve_read(self, req_id: int, table: Any, notify: bytes | None, total: int) -> None:
        spans, code, message = self.host.resolve(table, write=False)
        if spans is not None and notify is not None and not self.host.notify_room(len(notify)):
            spans, code = None, errors.ErrorCode.INBOX_FULL
            message = f"{self.host.name!r}'s notification inbox stayed full; nothing was sent"
        staging: bytearray | None = None
        if spans is not None:
            staging, why = self._staging(spans)
            if why:
                spans, code, message = None, errors.ErrorCode.LIMIT, why
        if spans is None:
            self.refused += 1
            self._error(req_id, code, message)
            return
        self.served += 1
        self.served_bytes += total
        try:
            self._ship(req_id, spans, total, staging)
        finally:
            if staging is not None:
                self.host.staging.release(len(staging))
        if notify is not None:
            self.host.deliver(self.peer_name or "?", notify, reserved=True)

    def _ship(self, req_id: int, spans: list[Span], total: int, staging: bytearray | None) -> None:
        """Send a READ's answer; device spans stream through `staging` (one frame, one lock)."""
        with self._send_lock:
            parts: list[bytes | memoryview] = [wire.header(wire.READ_DATA, req_id, total)]
            for span in spans:
                if span.view is not None:
                    parts.append(span.view)
                    continue
                assert staging is not None
                buf = memoryview(staging)
                done = 0
                while done < span.length:
                    if parts:  # what came before goes out before the staging is reused
                        wire.send_gather(self.sock, parts)
                        parts = []
                    n = min(len(buf), span.length - done)
                    self.host.device_to_host(span.region, span.offset + done, buf[:n])
                    wire.send_gather(self.sock, [buf[:n]])
                    done += n
            if parts:
                wire.send_gather(self.sock, parts)
