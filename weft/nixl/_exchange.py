"""NIXL's socket metadata exchange (``send_local_metadata(ip, port)`` and friends).

NIXL runs a listener thread on ``listen_port`` that accepts metadata pushed by peers, answers
fetches and drops invalidated peers; the calls that talk to it return at once and the user
polls ``check_remote_metadata``. The same here, with weft's metadata inside (signed with the
group secret when one is set, so a pushed record from outside the group is refused by
`Agent.add_peer`). Invalidations carry an HMAC of the name and a timestamp under the secret.
The wire is weft's own (one frame each way), not NIXL's: both ends run weft.

Frame: 1 byte op, 4 bytes big-endian length, payload. Ops: ``M`` metadata (push, or the
answer to a fetch), ``F`` fetch (payload: the wanted agent's name), ``I`` invalidate
(payload: name, 8-byte time, 32-byte MAC).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_HEAD = struct.Struct("!cI")
MAX_FRAME = 64 << 20
_MAC_WINDOW_S = 60.0
_IO_TIMEOUT_S = 10.0


class Hooks:
    """What the exchange needs of its agent."""

    def __init__(
        self,
        name: str,
        metadata: Callable[[], bytes],
        admit: Callable[[bytes], str],
        forget: Callable[[str], None],
        secret: bytes | None,
    ) -> None:
        self.name = name
        self.metadata = metadata
        self.admit = admit
        self.forget = forget
        self.secret = secret


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed mid-frame")
        got += k
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    op, length = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    if length > MAX_FRAME:
        raise ConnectionError(f"frame of {length} bytes is too large")
    return op, _recv_exact(sock, length)


def write_frame(sock: socket.socket, op: bytes, payload: bytes) -> None:
    sock.sendall(_HEAD.pack(op, len(payload)) + payload)


def _mac(secret: bytes | None, name: bytes, stamp: bytes) -> bytes:
    return hmac.new(secret or b"", b"weft-nixl-invalidate\0" + name + stamp, hashlib.sha256).digest()


def invalidation(secret: bytes | None, name: str) -> bytes:
    stamp = struct.pack("!d", time.time())
    return stamp + _mac(secret, name.encode(), stamp) + name.encode()


def check_invalidation(secret: bytes | None, payload: bytes) -> str | None:
    if len(payload) < 40:
        return None
    stamp, mac, name = payload[:8], payload[8:40], payload[40:]
    if not hmac.compare_digest(mac, _mac(secret, name, stamp)):
        return None
    if abs(time.time() - struct.unpack("!d", stamp)[0]) > _MAC_WINDOW_S:
        return None
    return name.decode(errors="replace")


class Exchange:
    """The listener (optional) and the worker that runs outgoing requests in the background."""

    def __init__(self, hooks: Hooks, listen: bool, host: str, port: int) -> None:
        self._hooks = hooks
        self._closed = threading.Event()
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.port = 0
        if listen:
            server = socket.create_server((host, port), reuse_port=False)
            server.settimeout(0.2)
            self._server = server
            self.port = server.getsockname()[1]
            threading.Thread(target=self._accept, name=f"nixl-listen-{hooks.name}", daemon=True).start()

    # -- outgoing -------------------------------------------------------------------------
    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` on the exchange's worker thread (calls return at once, as in NIXL)."""
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._work, name=f"nixl-comm-{self._hooks.name}", daemon=True
                )
                self._worker.start()
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception as exc:  # a peer that is not there must not end the worker
                log.warning("nixl agent %s: metadata exchange failed: %s", self._hooks.name, exc)

    def push(self, ip: str, port: int, payload: bytes, op: bytes = b"M") -> None:
        with socket.create_connection((ip, port), timeout=_IO_TIMEOUT_S) as sock:
            write_frame(sock, op, payload)

    def fetch(self, ip: str, port: int, name: str) -> None:
        with socket.create_connection((ip, port), timeout=_IO_TIMEOUT_S) as sock:
            write_frame(sock, b"F", name.encode())
            op, payload = read_frame(sock)
        if op == b"M" and payload:
            self._hooks.admit(payload)
        else:
            log.warning("nixl agent %s: %s:%d does not serve agent %r", self._hooks.name, ip, port, name)

    # -- incoming -------------------------------------------------------------------------
    def _accept(self) -> None:
        server = self._server
        assert server is not None
        while not self._closed.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(_IO_TIMEOUT_S)
                    self._serve(conn)
                except Exception as exc:  # one bad caller must not stop the listener
                    log.warning("nixl agent %s: metadata listener: %s", self._hooks.name, exc)

    def _serve(self, conn: socket.socket) -> None:
        op, payload = read_frame(conn)
        if op == b"M":
            self._hooks.admit(payload)
        elif op == b"F":
            mine = payload.decode(errors="replace") == self._hooks.name
            write_frame(conn, b"M", self._hooks.metadata() if mine else b"")
        elif op == b"I":
            name = check_invalidation(self._hooks.secret, payload)
            if name is None:
                log.warning("nixl agent %s: refused an unauthenticated invalidation", self._hooks.name)
            else:
                self._hooks.forget(name)

    def close(self) -> None:
        self._closed.set()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()
        self._jobs.put(None)
