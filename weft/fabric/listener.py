"""The agent's TCP listener: accepts peers' streams and keeps the inbound connections.

Each accepted socket becomes an `Inbound` connection served on its own thread (handshake
first). The listener keeps the set of live ones: to tell them a region is gone, to answer
a peer that connected to us with a notification, to count what they served, and to close
them all when the agent closes or becomes a new incarnation.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import TYPE_CHECKING

from weft.fabric import wire
from weft.fabric.connection import Inbound

if TYPE_CHECKING:
    from weft.fabric.backend import BackendHost

#: Inbound connections at most; more are closed at once.
MAX_INBOUND = 4096


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
        while True:
            try:
                sock, addr = self._sock.accept()
            except OSError:
                return  # listener closed
            if self._closed:
                sock.close()
                return
            with self._lock:
                crowded = len(self._inbound) >= MAX_INBOUND
            if crowded:
                sock.close()
                continue
            wire.tune(sock, self.host.config.socket_buffer_bytes)
            conn = Inbound(self.host, sock, addr, self._conn_gone)
            with self._lock:
                self._inbound.add(conn)
            conn.start()

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
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self.close_connections()
        self._thread.join(timeout=2.0)
