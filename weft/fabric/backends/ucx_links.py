"""The ucx backend's connections: endpoints, connection ids and the handshake over them.

`Links` owns every UCX endpoint of one backend, inbound (accepted by the listener) and
outbound (to a peer's published endpoint), and runs the group-secret handshake
(`weft.fabric.handshake`, ucx scheme) in control messages before anything is served. It
runs on the backend's progress thread only; what a connection's failure means for the
requests on it is the backend's business (`fail`), as is what to do once one is ready.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from weft.fabric import errors, handshake, wire
from weft.fabric.backends import ucx_proto as proto
from weft.fabric.types import Backend

if TYPE_CHECKING:
    from weft.fabric.backend import BackendHost
    from weft.fabric.peers import Peer

log = logging.getLogger(__name__)

#: What to do when a connection fails: (connection, error, lost: tell the agent the peer is lost).
FailConn = Callable[[proto.Conn, errors.WeftError, bool], None]


class Links:
    """Every UCX endpoint of one backend, by connection id and by peer instance.

    Args:
        lib: ucxx's libucxx module; array: its Array type.
        worker: the backend's UCX worker.
        host: the agent's side of the backend interface.
        fail: what a failed connection means for its requests.
        ready: called when an outbound connection finished its handshake.
        closed: called (from UCX's callback) with the id of an endpoint UCX closed.
    """

    def __init__(
        self,
        lib: Any,
        array: Any,
        worker: Any,
        host: BackendHost,
        fail: FailConn,
        ready: Callable[[proto.Conn], None],
        closed: Callable[[int], None],
    ) -> None:
        self.L, self.Array = lib, array
        self.worker = worker
        self.host = host
        self._fail = fail
        self._ready = ready
        self._closed = closed
        self.conns: dict[int, proto.Conn] = {}  # by our connection id
        self.out: dict[str, proto.Conn] = {}  # by peer instance
        self.linger: list[tuple[list[Any], list[Any]]] = []  # requests of ended ops, buffers kept
        self.stopping = False
        self._ids = itertools.count(1)

    def new_id(self) -> int:
        """A connection id no live connection uses (it goes into the tags peers send us)."""
        for _ in range(proto.MAX_CONNS):
            cid = next(self._ids) % proto.MAX_CONNS
            if cid and cid not in self.conns:
                return cid
        raise errors.ProtocolError("no free ucx connection id")

    def on_accept(self, ep: Any, *_args: Any) -> None:
        """Listener callback (progress thread): a new inbound endpoint; challenge it."""
        try:
            self._accept(ep)
        except Exception:
            log.exception("agent %s: accepting a ucx endpoint failed", self.host.name)

    def _accept(self, ep: Any) -> None:
        if self.stopping or sum(1 for c in self.conns.values() if c.peer is None) >= proto.MAX_INBOUND:
            with contextlib.suppress(Exception):
                ep.close()
            return
        cid = self.new_id()
        conn = proto.Conn(ep, cid, None, time.monotonic() + self.host.config.handshake_timeout)
        conn.server = handshake.Server(self.host.identity(), handshake.UCX, cid)
        self.conns[cid] = conn
        self._watch(conn)
        self.send_ctl(conn, proto.ctl(proto.HELLO) + wire.json_body(conn.server.hello()))

    def _watch(self, conn: proto.Conn) -> None:
        conn.ep.set_close_callback(self._on_ep_closed, (conn.id,))
        conn.am = conn.ep.am_recv()

    def _on_ep_closed(self, cid: int, *_args: Any) -> None:
        self._closed(cid)

    def connect(self, peer: Peer) -> proto.Conn:
        """Open an endpoint to `peer`'s published ucx listener; the handshake starts on its HELLO.

        Raises:
            BackendUnavailableError: the peer publishes no ucx endpoint. PeerLostError: UCX refused.
        """
        address = peer.md.endpoints.get(Backend.UCX)
        if not address:
            raise errors.BackendUnavailableError(f"peer {peer.name!r} publishes no ucx endpoint")
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            ep = self.L.UCXEndpoint.create(self.worker, host, int(port), True)
        except Exception as exc:
            raise errors.PeerLostError(
                f"cannot connect to {peer.name!r} over ucx at {address}: {exc}"
            ) from exc
        conn = proto.Conn(ep, self.new_id(), peer, time.monotonic() + self.host.config.connect_timeout)
        conn.client = handshake.Client(
            self.host.identity(),
            handshake.UCX,
            peer.name,
            peer.instance,
            f"the ucx endpoint of {peer.name!r}",
            conn.id,
        )
        self.conns[conn.id] = conn
        self.out[peer.instance] = conn
        self._watch(conn)
        return conn

    def drop(self, conn: proto.Conn) -> None:
        """Close the endpoint and forget the connection (pending requests are cancelled)."""
        if conn.closed:
            return
        conn.closed = True
        self.conns.pop(conn.id, None)
        if conn.peer is not None and self.out.get(conn.peer.instance) is conn:
            del self.out[conn.peer.instance]
        with contextlib.suppress(Exception):
            if conn.ep.alive:  # closing an endpoint UCX already failed crashes ucxx 0.52
                conn.ep.close()

    def send_ctl(self, conn: proto.Conn, body: bytes) -> None:
        """Send a control message; its buffer is kept until UCX is done with it."""
        req = conn.ep.am_send(self.Array(body))
        self.linger.append(([req], [body]))

    # -- handshake -----------------------------------------------------------------------
    def on_hello(self, conn: proto.Conn, hello: dict[str, Any]) -> None:
        """Initiator: answer the target's challenge (or fail the connection)."""
        client = conn.client
        assert client is not None
        try:
            body = client.answer(hello)
        except (errors.StalePeerError, errors.AuthenticationError) as exc:
            self._fail(conn, exc, False)
            return
        conn.remote_id = client.remote_id
        self.send_ctl(conn, proto.ctl(proto.AUTH) + wire.json_body(body))

    def on_welcome(self, conn: proto.Conn, body: dict[str, Any]) -> None:
        """Initiator: check the target's proof; the connection is ready after it."""
        assert conn.client is not None
        try:
            conn.client.check_welcome(body)
        except errors.AuthenticationError as exc:
            self._fail(conn, exc, False)
            return
        conn.ready = True
        self._ready(conn)

    def on_auth(self, conn: proto.Conn, body: dict[str, Any]) -> None:
        """Target: check the initiator's proof; answer WELCOME or REJECT.

        Raises:
            ProtocolError: a malformed AUTH (the connection is dropped).
        """
        server = conn.server
        assert server is not None
        try:
            reply = server.check(body)
        except handshake.Refused as refused:
            conn.peer_name = server.peer_name
            self._reject(conn, refused.reason)
            if isinstance(refused.error, errors.ProtocolError):
                raise refused.error from None
            if not refused.stale:
                self.host.refused(("ucx", server.peer_name), refused.error)
            return
        conn.remote_id, conn.peer_name = server.remote_id, server.peer_name
        conn.ready = True
        self.send_ctl(conn, proto.ctl(proto.WELCOME) + wire.json_body(reply))

    def _reject(self, conn: proto.Conn, reason: str) -> None:
        with contextlib.suppress(Exception):
            self.send_ctl(conn, proto.ctl(proto.REJECT) + wire.json_body({"reason": reason}))
        conn.close_at = time.monotonic() + proto.REJECT_LINGER_S  # let the REJECT go out first
