"""Hostile clients, servers and metadata against the peer protocol.

Raw sockets speak the wire format (`weft.fabric.wire`) to a live agent: without the group
secret no byte of a registered region moves in either direction; stale, replayed and
unauthenticated handshakes are refused; an authenticated peer sending garbage (random headers,
lying lengths, oversized tables, out-of-bounds descriptors, truncated frames) gets exactly what a
reference model of the protocol predicts -- an ERROR frame with the right code for a well-formed
request the target refuses, a dropped connection for a malformed one -- and every byte of the
target's regions is accounted for afterwards. Clients must not trust an unauthenticated server,
and `add_peer` must turn any garbage into `MetadataError` or `AuthenticationError`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import secrets
import socket
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import SECRET
from tests.peerproc import digest, pattern
from weft import (
    AuthenticationError,
    MetadataError,
    ProtocolError,
    StalePeerError,
    WeftError,
)
from weft.api import metadata as md_api
from weft.fabric import wire
from weft.fabric.errors import ErrorCode

pytestmark = pytest.mark.integration

WRONG_SECRET = b"a-different-group-secret-9876543210"
KV, KV_SIZE, KV_SEED = "kv", 4096, 1
AUX, AUX_SIZE, AUX_SEED = "aux", 512, 2
KV_ID, AUX_ID = 1, 2  # the first two registrations of a fresh agent
SIZES = {KV_ID: KV_SIZE, AUX_ID: AUX_SIZE}
MAX_DESC = 8  # the fuzzed agent's max_descriptors
MAX_NOTIFY = 64  # and its max_notification_bytes
PROBE_ID = 0x5EC_0000_0000_0001
IO_TIMEOUT = 5.0
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)

FUZZ_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- a raw client ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    ftype: int
    flags: int
    count: int
    req_id: int
    body: bytes


def _dial(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def _frame(ftype: int, body: bytes = b"", req_id: int = 0, count: int = 0, flags: int = 0) -> bytes:
    return wire.header(ftype, req_id, len(body), count, flags) + body


def _recv_frame(sock: socket.socket) -> Frame:
    ftype, flags, count, req_id, length = wire.parse_header(wire.recv_exact(sock, wire.HEADER_SIZE))
    assert length <= 1 << 20, f"frame type {ftype} announces {length} bytes"
    return Frame(ftype, flags, count, req_id, bytes(wire.recv_exact(sock, length)))


def _hello(sock: socket.socket) -> dict[str, Any]:
    frame = _recv_frame(sock)
    assert frame.ftype == wire.HELLO, frame
    hello = json.loads(frame.body)
    assert isinstance(hello, dict)
    return hello


def _auth(
    hello: dict[str, Any], secret: bytes | None, *, name: str = "intruder", target: str | None = None
) -> dict[str, Any]:
    """An AUTH body as a real client builds it (with a proof when `secret` is given)."""
    instance, nonce = uuid.uuid4().hex, secrets.token_hex(16)
    target = hello["instance"] if target is None else target
    body: dict[str, Any] = {
        "name": name,
        "instance": instance,
        "generation": 1,
        "target": target,
        "nonce": nonce,
        "stream": 0,
    }
    if secret is not None:
        body["proof"] = wire.proof(secret, b"client", hello["nonce"], nonce, name, instance, target)
    return body


def _send_json(sock: socket.socket, ftype: int, obj: dict[str, Any]) -> None:
    sock.sendall(_frame(ftype, wire.json_body(obj)))


def _handshake(sock: socket.socket, secret: bytes | None, name: str = "fuzzer") -> None:
    hello = _hello(sock)
    assert hello["auth"] is (secret is not None)
    body = _auth(hello, secret, name=name)
    _send_json(sock, wire.AUTH, body)
    reply = _recv_frame(sock)
    assert reply.ftype == wire.WELCOME, reply
    if secret is not None:  # the agent proves the secret too
        want = wire.proof(
            secret, b"server", hello["nonce"], body["nonce"], hello["instance"], body["instance"]
        )
        assert wire.check_proof(want, json.loads(reply.body).get("proof"))


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the agent takes; it may hang up first (which is what these tests want)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def _drain_until_closed(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bytes:
    """Everything the agent sends until it closes the connection; fails if it keeps it open."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"the agent kept the connection open for {timeout} s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except ConnectionResetError:  # closed with our bytes unread: a reset, not a FIN
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _split(data: bytes) -> list[Frame]:
    """The agent's answer stream, frame by frame (it must consist of whole frames)."""
    frames, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= wire.HEADER_SIZE, f"partial header at the end: {data[pos:]!r}"
        ftype, flags, count, req_id, length = wire.parse_header(data[pos : pos + wire.HEADER_SIZE])
        pos += wire.HEADER_SIZE
        assert pos + length <= len(data), f"truncated frame type {ftype} from the agent"
        frames.append(Frame(ftype, flags, count, req_id, data[pos : pos + length]))
        pos += length
    return frames


def _exchange(sock: socket.socket, stream: bytes) -> list[Frame]:
    """Send `stream` then EOF (from a thread, so neither side blocks), collect every answer."""

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(stream)
            sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        return _split(_drain_until_closed(sock))
    finally:
        sender.join(IO_TIMEOUT)


def _table(*descs: tuple[int, int, int]) -> bytes:
    return b"".join(struct.pack("<IQQ", *d) for d in descs)


def _request(
    ftype: int,
    descs: list[tuple[int, int, int]],
    payload: bytes = b"",
    *,
    req_id: int = 1,
    notify: bytes | None = None,
) -> bytes:
    """A well-formed WRITE or READ frame (the descriptors themselves may be anything)."""
    prefix = b"" if notify is None else wire.NOTIFY_LEN.pack(len(notify)) + notify
    flags = 0 if notify is None else wire.FLAG_NOTIFY
    return _frame(ftype, prefix + _table(*descs) + payload, req_id, len(descs), flags)


def _kv_peer(make_peer: Any, secret: bytes | None = SECRET, **config: Any) -> tuple[Any, bytes, int]:
    """A peer process holding region "kv" filled with a known pattern: (peer, metadata, port)."""
    peer = make_peer("b", backends=["tcp"], secret=secret, **config)
    md = peer.call("register", KV, KV_SIZE, KV_SEED)
    rec = md_api.decode_metadata(md, secret)
    assert [(r.name, r.id) for r in rec.regions] == [(KV, KV_ID)]
    return peer, md, rec.listen.port


PRISTINE_KV = digest(pattern(KV_SIZE, KV_SEED))


# -- 1. no secret, no data -----------------------------------------------------------------------
BAD_AUTH: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "no-proof": lambda hello: _auth(hello, None),
    "random-proof": lambda hello: {**_auth(hello, None), "proof": secrets.token_hex(32)},
    "empty-proof": lambda hello: {**_auth(hello, None), "proof": ""},
    "proof-not-a-string": lambda hello: {**_auth(hello, None), "proof": [1, 2]},
    "wrong-secret": lambda hello: _auth(hello, WRONG_SECRET),
    "server-role-proof": lambda hello: {
        **(body := _auth(hello, None)),
        "proof": wire.proof(WRONG_SECRET, b"server", hello["nonce"], body["nonce"], hello["instance"]),
    },
}


@pytest.mark.parametrize("case", sorted(BAD_AUTH))
def test_client_without_the_secret_gets_no_byte_of_a_region(make_peer, case):  # type: ignore[no-untyped-def]
    peer, _md, port = _kv_peer(make_peer)
    with _dial(port) as sock:
        hello = _hello(sock)
        assert hello["auth"] is True
        _send_json(sock, wire.AUTH, BAD_AUTH[case](hello))
        # whatever the answer, try to use the region anyway
        _send_quietly(sock, _request(wire.WRITE, [(KV_ID, 0, KV_SIZE)], b"\xaa" * KV_SIZE, req_id=1))
        _send_quietly(sock, _request(wire.READ, [(KV_ID, 0, KV_SIZE)], req_id=2))
        frames = _split(_drain_until_closed(sock))
    assert [f.ftype for f in frames] == [wire.REJECT]  # no WELCOME, no DONE, no READ_DATA
    assert "reason" in json.loads(frames[0].body)
    assert peer.call("digest", KV, 0, KV_SIZE) == PRISTINE_KV


SKIPPED_HANDSHAKE = {
    "write-first": [_request(wire.WRITE, [(KV_ID, 0, 64)], b"\xaa" * 64)],
    "read-first": [_request(wire.READ, [(KV_ID, 0, KV_SIZE)])],
    "oversized-write-first": [_request(wire.WRITE, [(KV_ID, 0, KV_SIZE)] * 17, b"\xaa" * KV_SIZE * 17)],
    "md-req-first": [_frame(wire.MD_REQ, req_id=3), _request(wire.READ, [(KV_ID, 0, KV_SIZE)])],
    "welcome-first": [_frame(wire.WELCOME, b"{}"), _request(wire.READ, [(KV_ID, 0, KV_SIZE)])],
}


@pytest.mark.parametrize("before_hello", [False, True], ids=["after-hello", "before-hello"])
@pytest.mark.parametrize("case", sorted(SKIPPED_HANDSHAKE))
def test_client_skipping_the_handshake_is_dropped(make_peer, case, before_hello):  # type: ignore[no-untyped-def]
    peer, _md, port = _kv_peer(make_peer)
    with _dial(port) as sock:
        if not before_hello:
            _hello(sock)
        for frame in SKIPPED_HANDSHAKE[case]:
            _send_quietly(sock, frame)
        frames = _split(_drain_until_closed(sock))
    assert [f.ftype for f in frames] == ([wire.HELLO] if before_hello else [])
    assert peer.call("digest", KV, 0, KV_SIZE) == PRISTINE_KV


def _try_transfers(a: Any, peer: Any, expected: type[WeftError]) -> None:
    """A WRITE and a READ to peer "b" both fail with `expected`; no byte moves either way."""
    remote = a.remote("b", KV)
    src = a.register(np.full(KV_SIZE, 0xAB, np.uint8))
    with pytest.raises(expected):
        a.write(src.descs(), "b", remote.descs()).wait(timeout=10)
    dst = a.register(np.zeros(KV_SIZE, np.uint8))
    with pytest.raises(expected):
        a.read(dst.descs(), "b", remote.descs()).wait(timeout=10)
    assert not dst.buffer.any()
    assert peer.call("digest", KV, 0, KV_SIZE) == PRISTINE_KV


def test_agent_with_the_wrong_secret_is_refused(make_agent, make_peer):  # type: ignore[no-untyped-def]
    peer, md, _port = _kv_peer(make_peer)
    a = make_agent("a", "tcp", secret=WRONG_SECRET)
    with pytest.raises(AuthenticationError):
        a.add_peer(md)  # the metadata MAC already gives it away
    # smuggle the record past the metadata check: the handshake must refuse on its own
    a.add_peer(md_api.encode_metadata(md_api.decode_metadata(md, SECRET), WRONG_SECRET))
    with pytest.raises(AuthenticationError):
        a.connect("b")
    _try_transfers(a, peer, AuthenticationError)


def test_agent_without_a_secret_is_refused(make_agent, make_peer):  # type: ignore[no-untyped-def]
    peer, md, _port = _kv_peer(make_peer)
    a = make_agent("a", "tcp")
    a.add_peer(md)  # without a secret the MAC is not checked
    with pytest.raises(AuthenticationError):
        a.connect("b")
    _try_transfers(a, peer, AuthenticationError)


def test_agent_with_a_secret_refuses_an_open_peer(make_agent, make_peer):  # type: ignore[no-untyped-def]
    peer, md, _port = _kv_peer(make_peer, secret=None)
    a = make_agent("a", "tcp", secret=SECRET)
    with pytest.raises(AuthenticationError):
        a.add_peer(md)  # unsigned metadata
    a.add_peer(md_api.encode_metadata(md_api.decode_metadata(md), SECRET))
    with pytest.raises(AuthenticationError):  # no downgrade to an unauthenticated stream
        a.connect("b")
    _try_transfers(a, peer, AuthenticationError)


# -- 2. stale and replayed handshakes --------------------------------------------------------------
STALE_TARGETS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "other-instance": lambda hello: _auth(hello, SECRET, target=uuid.uuid4().hex),
    "no-target": lambda hello: {k: v for k, v in _auth(hello, SECRET).items() if k != "target"},
    "target-not-a-string": lambda hello: {**_auth(hello, SECRET), "target": 7},
    "right-target-proof-for-another": lambda hello: {
        **_auth(hello, SECRET, target=uuid.uuid4().hex),
        "target": hello["instance"],
    },
}


@pytest.mark.parametrize("case", sorted(STALE_TARGETS))
def test_auth_for_another_instance_is_refused(make_peer, case):  # type: ignore[no-untyped-def]
    peer, _md, port = _kv_peer(make_peer)
    with _dial(port) as sock:
        _send_json(sock, wire.AUTH, STALE_TARGETS[case](_hello(sock)))
        _send_quietly(sock, _request(wire.READ, [(KV_ID, 0, KV_SIZE)], req_id=2))
        _send_quietly(sock, _request(wire.WRITE, [(KV_ID, 0, 16)], b"\xaa" * 16, req_id=3))
        frames = _split(_drain_until_closed(sock))
    assert [f.ftype for f in frames] == [wire.REJECT]
    assert peer.call("digest", KV, 0, KV_SIZE) == PRISTINE_KV


def test_replayed_auth_is_refused(make_peer):  # type: ignore[no-untyped-def]
    peer, _md, port = _kv_peer(make_peer)
    with _dial(port) as first:
        body = _auth(_hello(first), SECRET)
        _send_json(first, wire.AUTH, body)
        assert _recv_frame(first).ftype == wire.WELCOME  # the genuine session works
    with _dial(port) as second:  # an eavesdropper replays it: the agent's nonce is new
        _hello(second)
        _send_json(second, wire.AUTH, body)
        _send_quietly(second, _request(wire.READ, [(KV_ID, 0, KV_SIZE)], req_id=2))
        frames = _split(_drain_until_closed(second))
    assert [f.ftype for f in frames] == [wire.REJECT]
    assert peer.call("digest", KV, 0, KV_SIZE) == PRISTINE_KV


def test_metadata_of_a_restarted_agent_is_stale(make_agent):  # type: ignore[no-untyped-def]
    old = make_agent("b", "tcp", secret=SECRET)
    old.register(np.zeros(KV_SIZE, np.uint8), name=KV)
    md, port = old.metadata(), old.port
    old.close()
    new = make_agent("b", "tcp", secret=SECRET, listen_port=port)  # same name, same address
    data = pattern(KV_SIZE, 5)
    new.register(data, name=KV)
    a = make_agent("a", "tcp", secret=SECRET)
    a.add_peer(md)
    with pytest.raises(StalePeerError):
        a.connect("b")
    src = a.register(np.full(KV_SIZE, 0xAB, np.uint8))
    with pytest.raises(StalePeerError):
        a.write(src.descs(), "b", a.remote("b", KV).descs()).wait(timeout=10)
    assert digest(data) == digest(pattern(KV_SIZE, 5))


def test_silent_client_is_dropped_after_the_handshake_timeout(make_agent):  # type: ignore[no-untyped-def]
    b = make_agent("b", "tcp", secret=SECRET, handshake_timeout=0.3)
    with _dial(b.port) as sock:
        started = time.monotonic()
        frames = _split(_drain_until_closed(sock, timeout=3.0))
        assert time.monotonic() - started < 2.0
    assert [f.ftype for f in frames] == [wire.HELLO]


def test_handshake_deadline_covers_the_whole_handshake(make_agent):  # type: ignore[no-untyped-def]
    timeout = 0.3
    b = make_agent("b", "tcp", secret=SECRET, handshake_timeout=timeout)
    with _dial(b.port) as sock:
        auth = _frame(wire.AUTH, wire.json_body(_auth(_hello(sock), SECRET)))
        started = time.monotonic()
        closed_after = None
        for i in range(len(auth) - 1):  # never complete it
            try:
                sock.send(auth[i : i + 1])
                sock.settimeout(0.1)
                if sock.recv(1) == b"":
                    closed_after = time.monotonic() - started
            except TimeoutError:
                pass
            except OSError:
                closed_after = time.monotonic() - started
            if closed_after is not None or time.monotonic() - started > 5 * timeout:
                break
    assert closed_after is not None, f"still open after {time.monotonic() - started:.1f} s"
    assert closed_after < timeout + 0.5


# -- clients do not trust a server that cannot prove the secret ------------------------------------
class FakeServer:
    """One-connection impostor at the address in a peer's metadata; records what the client sends."""

    def __init__(
        self, script: Callable[[socket.socket, FakeServer], None], rec: md_api.AgentMetadata
    ) -> None:
        self.script = script
        self.rec = rec  # whom it impersonates
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(IO_TIMEOUT)
        self.port = int(self.listener.getsockname()[1])
        self.auth: dict[str, Any] | None = None
        self.rest = bytearray()  # everything after the AUTH frame
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn, contextlib.suppress(OSError, ProtocolError, wire.ConnectionClosed):
            conn.settimeout(IO_TIMEOUT)
            self.script(conn, self)
            while chunk := conn.recv(1 << 16):
                self.rest += chunk

    def read_auth(self, conn: socket.socket) -> dict[str, Any]:
        frame = _recv_frame(conn)
        assert frame.ftype == wire.AUTH
        self.auth = json.loads(frame.body)
        return self.auth

    def close(self) -> None:
        self.listener.close()
        self.thread.join(IO_TIMEOUT)


def _hello_frame(rec: md_api.AgentMetadata, **fields: Any) -> bytes:
    hello = {"v": wire.VERSION, "name": rec.name, "instance": rec.instance, "nonce": "00" * 16, "auth": True}
    hello.update(fields)
    return _frame(wire.HELLO, wire.json_body(hello))


def _welcome(proof: Callable[[dict[str, Any]], Any]) -> Callable[[socket.socket, FakeServer], None]:
    def script(conn: socket.socket, server: FakeServer) -> None:
        conn.sendall(_hello_frame(server.rec))
        auth = server.read_auth(conn)
        conn.sendall(_frame(wire.WELCOME, wire.json_body({"proof": proof(auth)})))

    return script


def _just_send(frame: Callable[[md_api.AgentMetadata], bytes]) -> Callable[[socket.socket, FakeServer], None]:
    def script(conn: socket.socket, server: FakeServer) -> None:
        conn.sendall(frame(server.rec))

    return script


IMPOSTORS: dict[str, tuple[Callable[[socket.socket, FakeServer], None], type[WeftError]]] = {
    "no-auth-offered": (_just_send(lambda rec: _hello_frame(rec, auth=False)), AuthenticationError),
    "other-instance": (_just_send(lambda rec: _hello_frame(rec, instance=uuid.uuid4().hex)), StalePeerError),
    "garbage-hello": (_just_send(lambda rec: b"HTTP/1.1 400 Bad Request\r\n\r\n"), ProtocolError),
    "hello-not-an-object": (_just_send(lambda rec: _frame(wire.HELLO, b"[1, 2]")), ProtocolError),
    "oversized-hello": (
        _just_send(lambda rec: wire.header(wire.HELLO, length=wire.MAX_HANDSHAKE_BYTES + 1)),
        ProtocolError,
    ),
    "welcome-without-proof": (_welcome(lambda auth: None), AuthenticationError),
    "welcome-random-proof": (_welcome(lambda auth: secrets.token_hex(32)), AuthenticationError),
    "welcome-reflects-client-proof": (_welcome(lambda auth: auth["proof"]), AuthenticationError),
    "welcome-wrong-secret": (
        _welcome(
            lambda auth: wire.proof(
                WRONG_SECRET, b"server", "00" * 16, auth["nonce"], auth["target"], auth["instance"]
            )
        ),
        AuthenticationError,
    ),
}


def _impostor_setup(make_agent: Any, script: Callable[[socket.socket, FakeServer], None]) -> tuple[Any, Any]:
    """Agent "a" holding genuine, signed metadata of "b" whose address now hosts an impostor."""
    real = make_agent("b", "tcp", secret=SECRET)
    real.register(np.zeros(KV_SIZE, np.uint8), name=KV)
    rec = md_api.decode_metadata(real.metadata(), SECRET)
    server = FakeServer(script, rec)
    moved = rec.model_copy(update={"listen": md_api.ListenInfo(host="127.0.0.1", port=server.port)})
    a = make_agent("a", "tcp", secret=SECRET)
    a.add_peer(md_api.encode_metadata(moved, SECRET))
    return a, server


@pytest.mark.parametrize("case", sorted(IMPOSTORS))
def test_client_sends_nothing_to_an_unproven_server(make_agent, case):  # type: ignore[no-untyped-def]
    script, expected = IMPOSTORS[case]
    a, server = _impostor_setup(make_agent, script)
    try:
        src = a.register(pattern(KV_SIZE, 9))
        with pytest.raises(expected):
            a.write(src.descs(), "b", a.remote("b", KV).descs()).wait(timeout=10)
    finally:
        server.close()
    assert server.rest == b"", "the client sent frames to a server that never proved the secret"
    if server.auth is not None:  # its own proof, never the secret or the data
        assert set(server.auth) <= {"name", "instance", "generation", "target", "nonce", "stream", "proof"}


def test_deeply_nested_hello_is_a_protocol_error(make_agent):  # type: ignore[no-untyped-def]
    nested = _just_send(lambda rec: _frame(wire.HELLO, b"[" * 50_000))
    a, server = _impostor_setup(make_agent, nested)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the leaked socket, collected below
        try:
            a.connect("b")
            raised: type[BaseException] | None = None
        except Exception as exc:
            raised = type(exc)
            del exc
        gc.collect()
        server.close()
    assert raised is not None and issubclass(raised, WeftError), raised


def test_deeply_nested_auth_is_refused_like_any_bad_handshake(make_agent, caplog):  # type: ignore[no-untyped-def]
    b = make_agent("b", "tcp", secret=SECRET)
    with _dial(b.port) as sock:
        _hello(sock)
        _send_quietly(sock, _frame(wire.AUTH, b"[" * 50_000))
        assert _split(_drain_until_closed(sock)) == []
    with _dial(b.port) as sock:  # and the agent still serves the group
        _handshake(sock, SECRET)
    errors = [r for r in caplog.records if r.name.startswith("weft") and r.levelname == "ERROR"]
    assert errors == [], [r.getMessage() for r in errors]


# -- 3. an authenticated peer sending garbage ------------------------------------------------------
class _Eof(Exception):
    """The stream ended inside a frame."""


@dataclass
class Expected:
    answers: list[tuple[int, int, Any]] = field(default_factory=list)  # (type, request id, detail)
    notes: list[bytes] = field(default_factory=list)


class TargetModel:
    """What the protocol says a target does with a byte stream followed by EOF.

    Malformed frames end the conversation silently; well-formed requests the target refuses are
    answered with ERROR (any code of a refused descriptor) and the stream goes on. A WRITE whose
    payload is cut short has landed the bytes that did arrive, in descriptor order.
    """

    def __init__(self, regions: dict[int, np.ndarray], max_desc: int, max_notify: int) -> None:
        self.mem = {rid: bytearray(arr.tobytes()) for rid, arr in regions.items()}
        self.max_desc = max_desc
        self.max_notify = max_notify

    def refusals(self, descs: list[tuple[int, int, int]]) -> set[ErrorCode]:
        codes = set()
        for rid, off, n in descs:
            if rid not in self.mem:
                codes.add(ErrorCode.UNKNOWN_REGION)
            elif n == 0 or off + n > len(self.mem[rid]):
                codes.add(ErrorCode.OUT_OF_BOUNDS)
        return codes

    def run(self, stream: bytes) -> Expected:
        out = Expected()
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos
            if len(stream) - pos < n:
                raise _Eof
            pos += n
            return stream[pos - n : pos]

        with contextlib.suppress(_Eof):
            while True:
                magic, version, ftype, flags, count, req_id, length = wire.HEADER.unpack(
                    take(wire.HEADER_SIZE)
                )
                if magic != wire.MAGIC or version != wire.VERSION:
                    return out
                if ftype in (wire.WRITE, wire.READ):
                    if not 1 <= count <= self.max_desc:
                        return out
                    used, note = 0, None
                    if flags & wire.FLAG_NOTIFY:
                        (nlen,) = wire.NOTIFY_LEN.unpack(take(4))
                        if nlen > self.max_notify:
                            return out
                        note = take(nlen)
                        used = 4 + nlen
                    if used + count * 20 > length:
                        return out
                    table = take(count * 20)
                    descs = [struct.unpack_from("<IQQ", table, 20 * i) for i in range(count)]
                    payload = length - used - count * 20
                    total = sum(n for _r, _o, n in descs)
                    codes = self.refusals(descs)
                    if ftype == wire.WRITE:
                        if payload != total:
                            return out
                        if codes:
                            take(payload)  # drained, then refused
                            out.answers.append((wire.ERROR, req_id, codes))
                            continue
                        data = stream[pos : pos + payload]
                        pos += len(data)
                        arrived = len(data)
                        for rid, off, n in descs:  # scattered in order, as far as the bytes go
                            chunk, data = data[:n], data[n:]
                            self.mem[rid][off : off + len(chunk)] = chunk
                        if arrived < payload:
                            return out
                        if note is not None:
                            out.notes.append(note)
                        out.answers.append((wire.DONE, req_id, None))
                    else:
                        if payload != 0:
                            return out
                        if codes:
                            out.answers.append((wire.ERROR, req_id, codes))
                            continue
                        data = b"".join(bytes(self.mem[rid][off : off + n]) for rid, off, n in descs)
                        out.answers.append((wire.READ_DATA, req_id, data))
                        if note is not None:
                            out.notes.append(note)
                elif ftype == wire.NOTIFY:
                    if length > self.max_notify:
                        return out
                    out.notes.append(take(length))
                elif ftype == wire.MD_REQ:
                    if length:
                        return out
                    out.answers.append((wire.MD_RESP, req_id, None))
                else:  # BYE ends the conversation; any other type breaks the protocol
                    return out
        return out


def _check_answers(got: list[Frame], want: Expected, instance: str, secret: bytes | None) -> None:
    assert [(f.ftype, f.req_id) for f in got] == [(t, r) for t, r, _d in want.answers]
    for frame, (ftype, _req, detail) in zip(got, want.answers, strict=True):
        if ftype == wire.ERROR:
            assert ErrorCode(frame.count) in detail, (ErrorCode(frame.count), detail)
            assert 0 < len(frame.body) <= wire.MAX_ERROR_BYTES
        elif ftype == wire.READ_DATA:
            assert len(frame.body) == len(detail)
            assert digest(frame.body) == digest(detail), "READ_DATA carries the wrong bytes"
        elif ftype == wire.MD_RESP:
            assert md_api.decode_metadata(frame.body, secret).instance == instance
        else:
            assert frame.body == b""


def _payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _rarely(draw: st.DrawFn, odds: int = 10) -> bool:
    """True about once in `odds` draws (Hypothesis favours the ends of a range: avoid them)."""
    return draw(st.integers(0, odds - 1)) == odds // 2


@st.composite
def _valid_desc(draw: st.DrawFn) -> tuple[int, int, int]:
    rid = draw(st.sampled_from([KV_ID, AUX_ID]))
    off = draw(st.integers(0, SIZES[rid] - 1))
    return rid, off, draw(st.integers(1, min(SIZES[rid] - off, 512)))


@st.composite
def _any_desc(draw: st.DrawFn, bounded: bool) -> tuple[int, int, int]:
    rid = draw(st.one_of(st.sampled_from([KV_ID, AUX_ID, 0, 3, 2**32 - 1]), U32))
    size = SIZES.get(rid, KV_SIZE)
    off = draw(
        st.one_of(
            st.integers(0, size),
            st.integers(size - 32, size + 32),
            st.sampled_from([2**63, 2**64 - 1, 2**64 - 8]),
            U64,
        )
    )
    if bounded:  # a WRITE has to carry its payload
        n = draw(st.integers(0, 600))
    else:
        n = draw(st.one_of(st.integers(0, size + 1), st.sampled_from([2**63, 2**64 - 1]), U64))
    return rid, off, n


@st.composite
def _xfer_frame(draw: st.DrawFn) -> bytes:
    """WRITE/READ: usually well formed, sometimes lying about its count, flags or lengths."""
    ftype = draw(st.sampled_from([wire.WRITE, wire.READ]))
    write = ftype == wire.WRITE
    descs = draw(
        st.one_of(
            st.lists(_valid_desc(), min_size=1, max_size=4),
            st.lists(st.one_of(_valid_desc(), _any_desc(write)), min_size=1, max_size=MAX_DESC + 1),
        )
    )
    count = len(descs)
    if _rarely(draw):
        count = draw(st.one_of(st.sampled_from([0, MAX_DESC + 1, 2**32 - 1]), U32))
    notify = draw(st.none() | st.binary(max_size=MAX_NOTIFY + 8))
    flags = 0 if notify is None else wire.FLAG_NOTIFY
    if _rarely(draw):
        flags = draw(U32)
    prefix = b""
    if flags & wire.FLAG_NOTIFY:
        notify = notify or b""
        nlen = draw(U32) if _rarely(draw) else len(notify)
        prefix = wire.NOTIFY_LEN.pack(nlen) + notify
    total = sum(n for *_x, n in descs)
    if write:
        payload = _payload(draw(U32), min(total, 8192))
        declared = len(prefix) + 20 * len(descs) + total
    else:
        payload = draw(st.binary(min_size=1, max_size=32)) if _rarely(draw) else b""
        declared = len(prefix) + 20 * len(descs) + len(payload)
    if _rarely(draw):
        declared = draw(U64)
    elif _rarely(draw):
        declared = max(0, declared + draw(st.integers(-24, 24)))
    header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, ftype, flags, count, draw(U64), declared)
    return header + prefix + _table(*descs) + payload


@st.composite
def _notify_frame(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=MAX_NOTIFY + 8))
    length = len(body)
    if _rarely(draw, 4):
        length = draw(st.one_of(st.sampled_from([MAX_NOTIFY + 1, 2**32, 2**64 - 1]), U64))
    return wire.header(wire.NOTIFY, draw(U64), length) + body


@st.composite
def _odd_frame(draw: st.DrawFn) -> bytes:
    """Any header at all: bad magic or version, unexpected types, random flags/count/length."""
    magic = draw(st.one_of(st.just(wire.MAGIC), st.binary(min_size=2, max_size=2)))
    version = draw(st.one_of(st.just(wire.VERSION), st.integers(0, 255)))
    ftype = draw(
        st.one_of(
            st.sampled_from(
                [
                    wire.HELLO,
                    wire.AUTH,
                    wire.WELCOME,
                    wire.REJECT,
                    wire.DONE,
                    wire.ERROR,
                    wire.READ_DATA,
                    wire.MD_RESP,
                    wire.INVALIDATE,
                    wire.BYE,
                    wire.MD_REQ,
                ]
            ),
            st.integers(0, 255),
        )
    )
    body = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(len(body)), st.integers(0, 96), U64))
    return wire.HEADER.pack(magic, version, ftype, draw(U32), draw(U32), draw(U64), length) + body


FRAMES = st.one_of(  # a branch is picked with equal odds: WRITE/READ most of the time
    _xfer_frame(),
    _xfer_frame(),
    _xfer_frame(),
    _xfer_frame(),
    _xfer_frame(),
    _notify_frame(),
    st.builds(lambda req: wire.header(wire.MD_REQ, req), U64),
    _odd_frame(),
    st.binary(min_size=1, max_size=64),
)

# one stream in five is cut short somewhere (the rest end with EOF after a complete last frame)
CUTS = st.integers(0, 4).flatmap(lambda k: st.integers(0, 1 << 16) if k == 3 else st.none())

_GOOD_BYTES = _payload(1, 300)
_EXAMPLES: list[tuple[list[bytes], int | None]] = [
    # refused but well formed: ERROR with the code, the connection goes on
    ([_request(wire.WRITE, [(99, 0, 16)], b"\xee" * 16, notify=b"no")], None),
    ([_request(wire.WRITE, [(KV_ID, 0, 16), (KV_ID, KV_SIZE - 8, 16)], b"\xee" * 32)], None),
    ([_request(wire.WRITE, [(AUX_ID, 2**64 - 8, 16)], b"\xee" * 16)], None),
    ([_request(wire.READ, [(KV_ID, 0, 0)]), _request(wire.READ, [(KV_ID, 2**64 - 1, 2)], req_id=2)], None),
    ([_request(wire.READ, [(KV_ID, 0, 2**63)]), _request(wire.READ, [(2**32 - 1, 0, 1)], req_id=2)], None),
    # legitimate: a write, read back on the same connection, with notifications
    (
        [
            _request(wire.WRITE, [(KV_ID, 100, 300)], _GOOD_BYTES, notify=b"w"),
            _request(wire.READ, [(KV_ID, 50, 400), (AUX_ID, 0, 8)], req_id=2, notify=b"r"),
            _frame(wire.NOTIFY, b"hi"),
        ],
        None,
    ),
    # the limits, exactly: at the limit is served, one past it drops the connection
    ([_request(wire.READ, [(AUX_ID, i, 1) for i in range(MAX_DESC)], notify=b"n" * MAX_NOTIFY)], None),
    ([_frame(wire.NOTIFY, b"n" * MAX_NOTIFY), _frame(wire.NOTIFY, b"n" * (MAX_NOTIFY + 1))], None),
    ([_request(wire.READ, [(AUX_ID, i, 1) for i in range(MAX_DESC + 1)])], None),
    ([_request(wire.WRITE, [(AUX_ID, 0, 1)], b"x", notify=b"n" * (MAX_NOTIFY + 1))], None),
    # malformed: the connection is dropped, nothing is answered or written
    ([_frame(wire.WRITE, _table((KV_ID, 0, 8)) + b"\0" * 8, count=MAX_DESC + 1)], None),
    ([_frame(wire.READ, _table((KV_ID, 0, 8)), count=0)], None),
    ([wire.header(wire.NOTIFY, length=2**64 - 1) + b"x"], None),
    ([wire.header(wire.WRITE, length=2**32, count=1, flags=wire.FLAG_NOTIFY) + b"\xff\xff\xff\xff"], None),
    ([_request(wire.READ, [(KV_ID, 0, 8)], b"payload")], None),
    ([wire.header(wire.WRITE, length=19, count=1) + _table((KV_ID, 0, 8)) + b"\xee" * 8], None),
    ([wire.header(wire.WRITE, length=28 + 7, count=1) + _table((KV_ID, 0, 8)) + b"\xee" * 8], None),
    ([wire.header(wire.MD_REQ, length=4) + b"abcd"], None),
    ([_frame(wire.DONE), _request(wire.READ, [(KV_ID, 0, 8)])], None),
    ([b"GET / HTTP/1.1\r\n\r\n"], None),
    # truncated: a WRITE cut inside its payload lands the bytes that arrived, then the link drops
    ([_request(wire.WRITE, [(KV_ID, 10, 200), (AUX_ID, 0, 100)], _GOOD_BYTES[:300])], 28 + 40 + 250),
    ([_request(wire.READ, [(KV_ID, 0, 8)])], 30),
]


def _with_examples(fn: Any) -> Any:
    for frames, cut in _EXAMPLES:
        fn = example(frames=frames, cut=cut)(fn)
    return fn


@pytest.mark.parametrize("secret", [SECRET, None], ids=["secret", "open"])
def test_fuzzed_frames_against_a_live_agent(make_agent, make_peer, secret):  # type: ignore[no-untyped-def]
    peer = make_peer(
        "b", backends=["tcp"], secret=secret, max_descriptors=MAX_DESC, max_notification_bytes=MAX_NOTIFY
    )
    peer.call("register", KV, KV_SIZE, KV_SEED)
    md = peer.call("register", AUX, AUX_SIZE, AUX_SEED)
    rec = md_api.decode_metadata(md, secret)
    assert {r.name: r.id for r in rec.regions} == {KV: KV_ID, AUX: AUX_ID}
    pristine = {KV_ID: pattern(KV_SIZE, KV_SEED), AUX_ID: pattern(AUX_SIZE, AUX_SEED)}
    seen: set[int] = set()

    @settings(FUZZ_SETTINGS, max_examples=120)
    @given(frames=st.lists(FRAMES, min_size=1, max_size=4), cut=CUTS)
    @_with_examples
    def fuzz(frames: list[bytes], cut: int | None) -> None:
        peer.call("fill", KV, KV_SEED)
        peer.call("fill", AUX, AUX_SEED)
        stream = b"".join(frames) + wire.header(wire.MD_REQ, PROBE_ID)  # still in sync afterwards?
        if cut is not None:
            stream = stream[: cut % (len(stream) + 1)]
        model = TargetModel(pristine, MAX_DESC, MAX_NOTIFY)
        want = model.run(stream)
        with _dial(rec.listen.port) as sock:
            _handshake(sock, secret)
            got = _exchange(sock, stream)
        _check_answers(got, want, rec.instance, secret)
        seen.update(f.count if f.ftype == wire.ERROR else -f.ftype for f in got)
        notes = peer.call("notifications")
        assert notes == ({"fuzzer": want.notes} if want.notes else {})
        # every byte of both regions is what the model says: refused or malformed frames wrote nothing
        assert peer.call("digest", KV, 0, KV_SIZE) == digest(model.mem[KV_ID])
        assert peer.call("digest", AUX, 0, AUX_SIZE) == digest(model.mem[AUX_ID])

    fuzz()
    assert {ErrorCode.UNKNOWN_REGION, ErrorCode.OUT_OF_BOUNDS, -wire.READ_DATA, -wire.DONE} <= seen

    # the agent survived and still serves a genuine peer, byte for byte
    assert peer.proc.is_alive()
    peer.call("fill", KV, KV_SEED)
    peer.call("fill", AUX, AUX_SEED)
    a = make_agent("a", "tcp", secret=secret)
    a.add_peer(md)
    src = pattern(2000, 77)
    ra = a.register(src)
    remote = a.remote("b", KV)
    a.write(ra.descs(), "b", remote.descs([(1000, 2000)]), notify=b"legit").wait(timeout=10)
    assert peer.call("wait_notification", "a", b"legit", 10) == b"legit"
    expected = pristine[KV_ID].copy()
    expected[1000:3000] = src
    assert peer.call("digest", KV, 0, KV_SIZE) == digest(expected)
    back = a.register(np.zeros(KV_SIZE, np.uint8))
    a.read(back.descs(), "b", remote.descs()).wait(timeout=10)
    assert digest(back.buffer) == digest(expected)
    assert peer.call("digest", AUX, 0, AUX_SIZE) == digest(pristine[AUX_ID])


REFUSED = [
    (wire.WRITE, [(99, 0, 16)], ErrorCode.UNKNOWN_REGION),
    (wire.WRITE, [(KV_ID, KV_SIZE - 8, 16)], ErrorCode.OUT_OF_BOUNDS),
    (wire.WRITE, [(KV_ID, 0, 16), (KV_ID, 2**64 - 8, 16)], ErrorCode.OUT_OF_BOUNDS),  # offset wraps
    (wire.WRITE, [(KV_ID, 0, 16), (7, 0, 16)], ErrorCode.UNKNOWN_REGION),
    (wire.READ, [(KV_ID, 0, 0)], ErrorCode.OUT_OF_BOUNDS),
    (wire.READ, [(KV_ID, 2**64 - 1, 2)], ErrorCode.OUT_OF_BOUNDS),
    (wire.READ, [(KV_ID, 0, 2**63)], ErrorCode.OUT_OF_BOUNDS),
    (wire.READ, [(KV_ID, KV_SIZE, 1)], ErrorCode.OUT_OF_BOUNDS),
    (wire.READ, [(0, 0, 1)], ErrorCode.UNKNOWN_REGION),
    (wire.READ, [(2**32 - 1, 0, 1)], ErrorCode.UNKNOWN_REGION),
]


def test_refused_requests_get_an_error_and_the_connection_lives_on(make_peer):  # type: ignore[no-untyped-def]
    peer, _md, port = _kv_peer(make_peer)
    with _dial(port) as sock:
        _handshake(sock, SECRET)
        for req_id, (ftype, descs, code) in enumerate(REFUSED, 1):
            payload = b"\xee" * sum(n for *_x, n in descs) if ftype == wire.WRITE else b""
            sock.sendall(_request(ftype, descs, payload, req_id=req_id, notify=b"refused"))
            answer = _recv_frame(sock)
            assert (answer.ftype, answer.req_id, ErrorCode(answer.count)) == (wire.ERROR, req_id, code)
            assert answer.body  # says why
        sock.sendall(_request(wire.READ, [(KV_ID, 100, 200), (KV_ID, 4000, 96)], req_id=100))
        answer = _recv_frame(sock)
        assert (answer.ftype, answer.req_id) == (wire.READ_DATA, 100)
        kv = pattern(KV_SIZE, KV_SEED)
        assert answer.body == kv[100:300].tobytes() + kv[4000:].tobytes()
        sock.sendall(wire.header(wire.BYE))
        assert _split(_drain_until_closed(sock)) == []
    assert peer.call("digest", KV, 0, KV_SIZE) == PRISTINE_KV
    assert peer.call("notifications") == {}  # refused requests deliver no notification


def test_write_to_a_read_only_region_is_refused(make_agent):  # type: ignore[no-untyped-def]
    b = make_agent("b", "tcp", secret=SECRET)
    data = pattern(KV_SIZE, 3)
    reg = b.register(data, name="ro", readonly=True)
    with _dial(b.port) as sock:
        _handshake(sock, SECRET)
        sock.sendall(_request(wire.WRITE, [(reg.id, 0, 16)], b"\0" * 16, req_id=7))
        answer = _recv_frame(sock)
        assert (answer.ftype, answer.req_id, ErrorCode(answer.count)) == (
            wire.ERROR,
            7,
            ErrorCode.READ_ONLY,
        )
        sock.sendall(_request(wire.READ, [(reg.id, 0, 16)], req_id=8))
        answer = _recv_frame(sock)
        assert (answer.ftype, answer.body) == (wire.READ_DATA, data[:16].tobytes())
    assert digest(data) == digest(pattern(KV_SIZE, 3))


# -- 4. add_peer with garbage metadata ---------------------------------------------------------
def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _paths(value, (*prefix, i))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from(["", "DRAM", "tcp", "0" * 32, "127.0.0.1", "b"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


MD_PREFIX = struct.Struct("!6sBH")  # b"WEFTMD" | u8 format | u16 MAC length (weft.api.metadata)


def _signed(body: bytes, secret: bytes | None) -> bytes:
    """A metadata record around any body, with a valid MAC when `secret` is given."""
    mac = md_api._mac(secret, body) if secret is not None else b""
    return MD_PREFIX.pack(md_api.MAGIC, md_api.METADATA_FORMAT, len(mac)) + mac + body


@st.composite
def _mutated(draw: st.DrawFn, good: bytes) -> bytes:
    """Real metadata with bytes flipped, inserted, deleted or cut."""
    data = bytearray(good)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        match draw(st.sampled_from(["flip", "insert", "delete", "cut"])):
            case "flip":
                data[pos] ^= draw(st.integers(1, 255))
            case "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            case "delete":
                del data[pos : pos + draw(st.integers(1, 8))]
            case _:
                del data[pos:]
        if not data:
            data = bytearray(b"\0")
    return bytes(data)


@st.composite
def _edited_json(draw: st.DrawFn, good: bytes, secret: bytes | None) -> bytes:
    """Real metadata with one JSON value replaced or removed, correctly signed again."""
    mac_len = MD_PREFIX.unpack_from(good)[2]
    record = json.loads(good[MD_PREFIX.size + mac_len :])
    path = draw(st.sampled_from(list(_paths(record))[1:]))
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        parent[path[-1]] = draw(JSON_VALUES)
    else:
        del parent[path[-1]]
    return _signed(json.dumps(record).encode(), secret)


GARBAGE = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda tail: md_api.MAGIC + tail, st.binary(max_size=200)),
    st.builds(lambda body: MD_PREFIX.pack(md_api.MAGIC, 1, 0) + body, st.binary(max_size=200)),
)


@pytest.mark.parametrize("secret", [SECRET, None], ids=["secret", "open"])
def test_fuzzed_metadata_is_refused_cleanly(make_agent, secret):  # type: ignore[no-untyped-def]
    src = make_agent("src", "tcp", secret=secret)
    src.register(np.zeros(64, np.uint8), name="kv")
    src.register(np.zeros(8, np.uint8))
    good = src.metadata()
    dst = make_agent("dst", "tcp", secret=secret)

    @settings(FUZZ_SETTINGS, max_examples=150)
    @given(data=st.one_of(GARBAGE, _mutated(good), _edited_json(good, secret)))
    @example(data=b"")
    @example(data=_signed(b"[" * 100_000, secret))
    @example(data=_signed(b'{"name":' * 20_000, secret))
    @example(data=_signed(b"1e999999", secret))
    @example(data=good[: len(good) // 2])
    @example(data=good + b" ")
    @example(data="not bytes")  # type: ignore[arg-type]
    @example(data=None)  # type: ignore[arg-type]
    @example(data=12345)  # type: ignore[arg-type]
    def fuzz(data: bytes) -> None:
        try:
            name = dst.add_peer(data)
        except (MetadataError, AuthenticationError):
            return
        # accepted: only a record that decodes (and, with a secret, carries a valid MAC)
        assert name == md_api.decode_metadata(data, secret).name
        dst.remove_peer(name)

    fuzz()
    assert dst.add_peer(good) == "src"  # the agent is fine, and the genuine record still works
    assert dst.peers() == ["src"]


def test_byte_level_tampering_of_signed_metadata_is_always_detected(make_agent):  # type: ignore[no-untyped-def]
    src = make_agent("src", "tcp", secret=SECRET)
    src.register(np.zeros(64, np.uint8), name="kv")
    good = src.metadata()
    dst = make_agent("dst", "tcp", secret=SECRET)

    @settings(FUZZ_SETTINGS, max_examples=100)
    @given(data=_mutated(good))
    def fuzz(data: bytes) -> None:
        if data == good:
            return
        with pytest.raises((MetadataError, AuthenticationError)):
            dst.add_peer(data)

    fuzz()
    assert dst.peers() == []
