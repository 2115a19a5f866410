"""The agent's small HTTP endpoint: /healthz, /readyz, /metrics and /status.

Why not a web framework: four read-only GET routes for kubelet probes, Prometheus and people
do not justify a dependency, and the answers must come from the same event loop that runs
the membership (a loop that is stuck stops answering /healthz, which is the point). So this
is HTTP/1.1 on asyncio streams, one request per connection (``Connection: close``),
the request head bounded in size and read under a deadline; anything but GET or HEAD on a
known path gets 405, an unknown path 404. The accept loop is its own (not
`asyncio.start_server`'s): when descriptors run out it backs off and logs once per episode.

``/status`` answers JSON::

    {"name": str, "namespace": str, "group": str, "generation": int, "incarnation": int,
     "phase": "starting|joined|fenced|leaving|left", "state": "joining|active|draining",
     "ready": bool, "not_ready": null | {"reason": str, "message": str},
     "conditions": {"etcd": "connected" | "lost since <UTC time> (<s> s ago): <what fails>",
                    "etcd_lost_since": float | null},
     "fenced": bool, "leader": str | null, "is_leader": bool,
     "lease_ttl": int, "etcd_reachable": bool,
     "members": [{"name": str, "generation": int, "state": str, "node": str}],   # by name
     "events": [{"kind": str, "name": str, "generation": int, "reason": str, "at": float}]}

``events`` are the last 200 `MembershipEvent`, oldest first (``at`` is Unix time).
``ready`` means "can serve transfers" (`weft.engine.readiness`): /readyz answers 503 with the
same reason as ``not_ready.message``; etcd being away is reported in ``conditions`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from weft.engine import metrics as agent_metrics
from weft.engine import readiness
from weft.membership.member import Membership, Phase

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
ACCEPT_BACKOFF = 0.05
"""Seconds to wait after the first failed accept; doubled for each failure in a row."""
ACCEPT_BACKOFF_MAX = 1.0
READ_TIMEOUT = 5.0
STATUS_EVENTS = 200

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout"}
_REASONS |= {400: "Bad Request", 431: "Request Header Fields Too Large", 500: "Internal Server Error"}
_REASONS |= {503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Response:
    """What a route answers."""

    status: int
    body: bytes
    content_type: str = _TEXT


Route = Callable[[], Response]


class HttpServer:
    """A GET-only HTTP/1.1 server for a fixed set of routes.

    Args:
        routes: path -> function making the answer (called in the loop; must not block).
        max_request_bytes: largest request head (request line and headers) accepted.
        read_timeout: seconds a client has to send its request head.
    """

    def __init__(
        self,
        routes: Mapping[str, Route] | None = None,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.port = 0
        self.accept_errors = 0
        """Times accepting a connection failed (descriptors or memory ran out)."""

    async def start(self, host: str, port: int) -> int:
        """Listen on `host`:`port` (0: any free port) and serve. Returns the bound port.

        Raises:
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # one socket: for a name with both families ("localhost"), the IPv4 address first
        family, kind, proto, _, address = min(infos, key=lambda i: i[0] != socket.AF_INET)
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._accepting = loop.create_task(self._accept_loop(sock), name="weft-http-accept")
        return self.port

    async def close(self) -> None:
        """Stop listening and drop the connections being served."""
        accepting, self._accepting = self._accepting, None
        if accepting is None:
            return
        accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accepting
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for task in list(self._clients):
            task.cancel()
        for task in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _accept_loop(self, sock: socket.socket) -> None:
        """Accept and serve connections. When accepting fails (descriptors or memory run out)
        wait, doubling from `ACCEPT_BACKOFF` up to `ACCEPT_BACKOFF_MAX` s, and say so once
        per episode (the count is in `accept_errors`)."""
        loop = asyncio.get_running_loop()
        backoff = 0.0
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                self.accept_errors += 1
                if backoff == 0.0:
                    log.error("HTTP port %d cannot accept connections, backing off: %s", self.port, exc)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX) if backoff else ACCEPT_BACKOFF
                await asyncio.sleep(backoff)
                continue
            if backoff:
                log.info("HTTP port %d accepts connections again", self.port)
                backoff = 0.0
            self._serve(loop, conn)

    def _serve(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        """Serve one accepted connection in a task of its own."""

        async def serve() -> None:
            try:
                reader = asyncio.StreamReader(limit=self.max_request_bytes)
                protocol = asyncio.StreamReaderProtocol(reader)
                transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
            except OSError:
                conn.close()
                return
            await self._handle(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

        task = loop.create_task(serve())
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            response, head_only = await self._answer(reader)
            reason = _REASONS.get(response.status, "Unknown")
            head = (
                f"HTTP/1.1 {response.status} {reason}\r\n"
                f"Content-Type: {response.content_type}\r\n"
                f"Content-Length: {len(response.body)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n"
            )
            if response.status == 405:
                head += "Allow: GET, HEAD\r\n"
            writer.write(head.encode("latin-1") + b"\r\n" + (b"" if head_only else response.body))
            await asyncio.wait_for(writer.drain(), self.read_timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled: nothing to tell it
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
        except TimeoutError:
            return Response(408, b"request head not received in time\n"), False
        except (asyncio.LimitOverrunError, ValueError):
            return Response(431, b"request head too large\n"), False
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return Response(400, b"malformed request line\n"), False
        method, target = parts[0], parts[1]
        route = self.routes.get(target.split("?", 1)[0])
        if route is None:
            return Response(404, b"not found\n"), method == "HEAD"
        if method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n"), False
        try:
            return route(), method == "HEAD"
        except Exception:
            log.exception("HTTP route %s failed", target)
            return Response(500, b"internal error\n"), method == "HEAD"


def not_ready_reason(m: Membership) -> str | None:
    """Why the member cannot serve (None when it can), by the built-in checks alone."""
    return readiness.Readiness(m).reason()


def status(m: Membership, ready: readiness.Readiness | None = None) -> dict[str, Any]:
    """The /status object (see the module docstring); `ready` judges readiness (default: the
    built-in checks alone)."""
    events = list(m.events)[-STATUS_EVENTS:]
    ready = ready if ready is not None else readiness.Readiness(m)
    verdict = ready.verdict()
    etcd = ready.etcd()
    return {
        "name": m.config.name,
        "namespace": m.config.group.namespace,
        "group": m.config.group.group,
        "generation": m.generation,
        "incarnation": m.incarnation,
        "phase": m.phase.value,
        "state": m.state,
        "ready": verdict is None,
        "not_ready": None if verdict is None else {"reason": verdict.kind, "message": verdict.text},
        "conditions": {"etcd": etcd.describe(), "etcd_lost_since": etcd.lost_since},
        "fenced": m.phase is Phase.FENCED or (m.agent is not None and m.agent.fenced),
        "leader": m.leader,
        "is_leader": m.is_leader,
        "lease_ttl": m.lease_ttl,
        "etcd_reachable": m.etcd_reachable,
        "members": [
            {
                "name": name,
                "generation": member.generation,
                "state": member.record.state,
                "node": member.record.node,
            }
            for name, member in sorted(m.members.items())
        ],
        "events": [dataclasses.asdict(ev) for ev in events],
    }


def agent_routes(
    m: Membership,
    metrics: agent_metrics.AgentMetrics,
    extra: Callable[[], dict[str, Any]] | None = None,
    ready: readiness.Readiness | None = None,
) -> dict[str, Route]:
    """The routes of a node agent; `extra` adds fields to /status (the plan applied, experts
    held); `ready` judges /readyz (default: the membership's built-in checks alone)."""
    ready = ready if ready is not None else readiness.Readiness(m)

    def healthz() -> Response:
        return Response(200, b"ok\n")

    def readyz() -> Response:
        why = ready.reason()
        return Response(200, b"ready\n") if why is None else Response(503, f"not ready: {why}\n".encode())

    def metrics_route() -> Response:
        return Response(200, metrics.render(), agent_metrics.CONTENT_TYPE)

    def status_route() -> Response:
        doc = status(m, ready)
        if extra is not None:
            doc |= extra()
        body = json.dumps(doc, separators=(",", ":")).encode()
        return Response(200, body, "application/json")

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics_route, "/status": status_route}
