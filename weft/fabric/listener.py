"""The agent's TCP listener: accepts peers' streams and keeps the inbound connections.

Each accepted socket becomes an `Inbound` connection served on its own thread (handshake
first). The listener keeps the set of live ones: to tell them a region is gone, to answer
a peer that connected to us with a notification, to count what they served, and to close
them all when the agent closes or becomes a new incarnation.

The accept loop ends only when the agent closes. Running out of file descriptors, socket
buffers, memory or threads is an episode it rides out: it backs off (up to a second between
tries), logs one WARNING when the episode starts and one when it ends, and says so in
`Agent.health()` meanwhile. Strangers are bounded too: at most
`AgentConfig.max_unauthenticated` connections may be waiting to finish their handshake, and
connections over that are closed at once (counted in `LimitsHit.unauthenticated`), so a
flood of silent connections cannot use up the descriptors and threads legitimate peers need.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING

from weft.fabric import wire
from weft.fabric.connection import Inbound

if TYPE_CHECKING:
    from weft.fabric.backend import BackendHost

log = logging.getLogger(__name__)

#: Inbound connections at most; more are closed at once.
MAX_INBOUND = 4096
#: Errors of accept that mean "out of a resource": back off and try again.
SCARCE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Errors of accept that concern only the one connection: go on at once.
TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN})
BACKOFF_MIN = 0.01
BACKOFF_MAX = 1.0


class Listener:
    """Accepts peers' connections for one agent.

    Args:
        host: the agent's side of the backend interface (its settings give the address).
    Raises:
        OSError: the listen address is unusable.
    """

    def __init__(self, host: BackendHost) -> None:
        self.host = host
        cfg = host.config
        self._lock = threading.Lock()
        self._closed = False
        self._wake = threading.Event()  # set on close: ends a back-off wait
        self._trouble: tuple[str, float] | None = None  # (error, since) during an episode
        self._inbound: set[Inbound] = set()
        self._gone = {"served": 0, "served_bytes": 0, "refused": 0}  # of closed connections
        self._sock = socket.socket(socket.AF_INET6 if ":" in cfg.listen_host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((cfg.listen_host, cfg.listen_port))
        except OSError:
            self._sock.close()
            raise
        self._sock.listen(128)
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"weft-accept {host.name}", daemon=True
        )
        self._thread.start()

    def _accept_loop(self) -> None:
        delay = BACKOFF_MIN
        while not self._closed:
            try:
                sock, addr = self._sock.accept()
            except TimeoutError:  # only during an episode: is the cause gone?
                if _probe():
                    self._recovered()
                    delay = BACKOFF_MIN
                continue
            except OSError as exc:
                if self._closed:
                    return  # listener closed
                if exc.errno in TRANSIENT:
                    continue
                delay = self._back_off(exc, delay)
                continue
            if self._closed:
                sock.close()
                return
            if not self._admit(sock):
                continue
            conn = Inbound(self.host, sock, addr, self._conn_gone)
            with self._lock:
                self._inbound.add(conn)
            try:
                conn.start()
            except (RuntimeError, MemoryError) as exc:  # "can't start new thread"
                with self._lock:
                    self._inbound.discard(conn)
                sock.close()
                delay = self._back_off(exc, delay)
                continue
            self._recovered()
            delay = BACKOFF_MIN

    def _admit(self, sock: socket.socket) -> bool:
        """Keep a new connection, or close it at once when too many are open or unauthenticated."""
        with self._lock:
            crowded = len(self._inbound) >= MAX_INBOUND
            strangers = sum(1 for c in self._inbound if c.peer_name is None)
        if crowded or strangers >= self.host.config.max_unauthenticated:
            sock.close()
            self.host.limit_hit("unauthenticated")
            return False
        try:
            wire.tune(sock, self.host.config.socket_buffer_bytes)
        except OSError:
            sock.close()
            return False
        return True

    def _back_off(self, exc: BaseException, delay: float) -> float:
        """Start (or go on with) an episode of scarcity: log it once, wait, try again."""
        self.host.limit_hit("accept_failures")
        if self._trouble is None:
            self._trouble = (str(exc) or type(exc).__name__, time.monotonic())
            log.warning(
                "agent %s: data port cannot accept connections: %s; retrying with back-off",
                self.host.name,
                self._trouble[0],
            )
        # accept with a timeout from now on, so the loop can see the cause go even if no
        # connection is waiting
        with contextlib.suppress(OSError):
            self._sock.settimeout(BACKOFF_MAX)
        self._wake.wait(delay)
        return min(delay * 2, BACKOFF_MAX)

    def _recovered(self) -> None:
        trouble = self._trouble
        if trouble is None:
            return
        self._trouble = None
        with contextlib.suppress(OSError):
            self._sock.settimeout(None)
        log.warning(
            "agent %s: data port accepts connections again (after %.1f s of %s)",
            self.host.name,
            time.monotonic() - trouble[1],
            trouble[0],
        )

    def trouble(self) -> str | None:
        """Why the data port cannot accept connections now, or None."""
        trouble = self._trouble
        if trouble is None:
            return None
        return (
            f"data port cannot accept connections: {trouble[0]} (since {time.monotonic() - trouble[1]:.0f} s)"
        )

    def _conn_gone(self, conn: Inbound) -> None:
        with self._lock:
            self._inbound.discard(conn)
            self._gone["served"] += conn.served
            self._gone["served_bytes"] += conn.served_bytes
            self._gone["refused"] += conn.refused

    def connections(self) -> list[Inbound]:
        """The live inbound connections now."""
        with self._lock:
            return list(self._inbound)

    def find(self, peer: str) -> Inbound | None:
        """A live connection from `peer` (authenticated), if any."""
        return next((c for c in self.connections() if c.peer_name == peer), None)

    def broadcast(self, frame: bytes) -> None:
        """Send a frame to every inbound connection (a dead one is skipped)."""
        for conn in self.connections():
            with contextlib.suppress(OSError):
                conn.send([frame])

    def served(self) -> dict[str, int]:
        """Requests served and refused, bytes served: closed connections and live ones."""
        with self._lock:
            out = dict(self._gone)
            live = list(self._inbound)
        for conn in live:
            out["served"] += conn.served
            out["served_bytes"] += conn.served_bytes
            out["refused"] += conn.refused
        return out

    def busy(self) -> int:
        """Inbound connections serving a request now."""
        return sum(1 for conn in self.connections() if conn.busy)

    def close_connections(self) -> None:
        """Close every inbound connection (the listener keeps accepting)."""
        for conn in self.connections():
            conn.close()

    def close(self) -> None:
        """Stop accepting and close every inbound connection."""
        self._closed = True
        self._wake.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self.close_connections()
        self._thread.join(timeout=2.0)


def _probe() -> bool:
    """Can this process open a socket and start a thread now?"""
    try:
        probe = socket.socket()
    except OSError:
        return False
    probe.close()
    try:
        thread = threading.Thread(target=lambda: None, name="weft-probe", daemon=True)
        thread.start()
    except (RuntimeError, MemoryError):
        return False
    thread.join(timeout=1.0)
    return True
