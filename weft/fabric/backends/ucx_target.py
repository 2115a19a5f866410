"""The ucx backend's target side: serve a peer's WRITE and READ against registered memory.

Every descriptor is checked against the agent's regions (`BackendHost.resolve`) before a
byte moves; a refused WRITE's payload is drained with 1-byte (truncating) receives and a
refused READ completes the initiator's posted receives with empty messages, so a bad
request costs the connection nothing. Runs on the backend's progress thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from weft.fabric import errors, wire
from weft.fabric.backends import ucx_proto as proto

if TYPE_CHECKING:
    from weft.fabric.backend import BackendHost
    from weft.fabric.backends.ucx_links import Links


class Target:
    """The requests one backend serves for its peers.

    Args:
        host: the agent's side of the backend interface.
        links: the backend's connections (control messages go out through them).
    """

    def __init__(self, host: BackendHost, links: Links) -> None:
        self._host = host
        self._links = links
        self.serving: list[proto.Serving] = []
        self._scratch = np.empty(1, np.uint8)
        self._scratch_arr: Any = links.Array(self._scratch)
        self._empty_arr: Any = links.Array(np.empty(0, np.uint8))

    def clear(self) -> None:
        """Forget every request and buffer (the worker is going away)."""
        self.serving = []
        self._scratch_arr = self._empty_arr = None

    def serve(
        self, conn: proto.Conn, ftype: int, flags: int, count: int, req_id: int, body: memoryview
    ) -> None:
        """Start serving a WRITE or READ control message from an authenticated connection.

        Raises:
            ProtocolError: a malformed message (the connection is failed).
        """
        cfg = self._host.config
        if count == 0 or count > cfg.max_descriptors or count >= proto.MAX_INDEX:
            if count:
                self._host.limit_hit("descriptors")
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
        views, code, message = self._resolve(table, write=ftype == proto.WRITE)
        ep, tag = conn.ep, self._links.L.UCXXTag
        if ftype == proto.WRITE:
            if views is None:  # consume the payload: 1-byte receives truncate each message
                drain = [
                    ep.tag_recv(self._scratch_arr, tag(proto.tag(conn.id, req_id, i))) for i in range(count)
                ]
                self._links.linger.append((drain, []))
                self._error(conn, req_id, code, message)
                return
            arrays = [self._links.Array(v) for v in views]
            reqs = [ep.tag_recv(a, tag(proto.tag(conn.id, req_id, i))) for i, a in enumerate(arrays)]
            self.serving.append(proto.Serving(conn, req_id, True, reqs, [arrays, views], notify))
            return
        if views is None:  # answer, then complete the initiator's posted receives with empty messages
            self._error(conn, req_id, code, message)
            rid = conn.remote_id
            fill = [ep.tag_send(self._empty_arr, tag(proto.tag(rid, req_id, i))) for i in range(count)]
            self._links.linger.append((fill, []))
            return
        arrays = [self._links.Array(v) for v in views]
        rid = conn.remote_id
        reqs = [ep.tag_send(a, tag(proto.tag(rid, req_id, i))) for i, a in enumerate(arrays)]
        self._links.send_ctl(conn, proto.ctl(proto.DONE, req_id))
        self.serving.append(proto.Serving(conn, req_id, False, reqs, [arrays, views], notify))

    def _resolve(self, table: Any, write: bool) -> tuple[list[memoryview] | None, int, str]:
        """The tcp target's checks (`BackendHost.resolve`), plus: host memory only."""
        spans, code, message = self._host.resolve(table, write)
        if spans is None:
            return None, code, message
        views = []
        for span in spans:
            if span.view is None:
                return None, errors.ErrorCode.BACKEND, f"region {span.region.label} is not host memory (ucx)"
            views.append(span.view)
        return views, 0, ""

    def _error(self, conn: proto.Conn, req_id: int, code: int, message: str) -> None:
        self._links.send_ctl(
            conn, proto.ctl(proto.ERROR, req_id, code) + message.encode()[: wire.MAX_ERROR_BYTES]
        )

    def poll(self) -> bool:
        """Finish the requests whose payload is all in (or out); True if any finished."""
        busy = False
        still: list[proto.Serving] = []
        for s in self.serving:
            reqs = s.reqs
            while s.pos < len(reqs) and reqs[s.pos].completed:
                s.pos += 1
            if s.pos < len(reqs):
                still.append(s)
                continue
            busy = True
            if s.conn.closed or any(proto.failed(r) for r in reqs):
                continue
            if s.notify is not None:  # the bytes are in place (WRITE) or sent (READ)
                self._host.deliver(s.conn.peer_name or "?", s.notify)
            if s.write:
                self._links.send_ctl(s.conn, proto.ctl(proto.DONE, s.req_id))
        self.serving = still
        return busy
