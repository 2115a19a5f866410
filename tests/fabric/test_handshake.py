"""The handshake written once: both halves against each other, and the proofs each wire carries."""

from __future__ import annotations

from typing import Any

import pytest

from weft.fabric import errors, handshake, wire

SECRET = b"0123456789abcdef0123456789abcdef"
CLIENT = handshake.Identity("a", "a" * 32, 7, SECRET)
SERVER = handshake.Identity("b", "b" * 32, 9, SECRET)


Body = dict[str, Any]


def _run(scheme: handshake.Scheme) -> tuple[handshake.Client, handshake.Server, Body, Body]:
    server = handshake.Server(SERVER, scheme, conn_id=5)
    client = handshake.Client(CLIENT, scheme, "b", SERVER.instance, "there", conn_id=3)
    auth = client.answer(server.hello())
    welcome = server.check(auth)
    client.check_welcome(welcome)
    return client, server, auth, welcome


def test_tcp_bodies_and_proofs_are_the_stream_format() -> None:
    _client, server, auth, welcome = _run(handshake.TCP)
    assert set(server.hello()) == {"v", "name", "instance", "nonce", "auth"}
    assert set(auth) == {"name", "instance", "generation", "target", "nonce", "proof"}
    assert auth["proof"] == wire.proof(
        SECRET, b"client", server.nonce_s, auth["nonce"], "a", CLIENT.instance, SERVER.instance
    )
    assert welcome == {
        "proof": wire.proof(
            SECRET, b"server", server.nonce_s, auth["nonce"], SERVER.instance, CLIENT.instance
        )
    }
    assert (server.peer_name, server.peer_instance) == ("a", CLIENT.instance)


def test_ucx_bodies_and_proofs_bind_both_connection_ids() -> None:
    client, server, auth, welcome = _run(handshake.UCX)
    assert server.hello()["id"] == 5 and auth["id"] == 3 and "generation" not in auth
    assert (client.remote_id, server.remote_id) == (5, 3)
    assert auth["proof"] == wire.proof(
        SECRET, b"ucx-client", server.nonce_s, auth["nonce"], "a", CLIENT.instance, SERVER.instance, "3", "5"
    )
    assert welcome["proof"] == wire.proof(
        SECRET, b"ucx-server", server.nonce_s, auth["nonce"], SERVER.instance, CLIENT.instance
    )


def test_without_a_secret_no_proofs_travel() -> None:
    me, them = handshake.Identity("a", "i1", 1, None), handshake.Identity("b", "i2", 1, None)
    server = handshake.Server(them, handshake.TCP)
    client = handshake.Client(me, handshake.TCP, "b", "i2", "there")
    auth = client.answer(server.hello())
    assert "proof" not in auth and server.check(auth) == {}


@pytest.mark.parametrize("scheme", [handshake.TCP, handshake.UCX], ids=["tcp", "ucx"])
def test_the_target_refuses(scheme: handshake.Scheme) -> None:
    server = handshake.Server(SERVER, scheme, conn_id=5)
    auth = handshake.Client(CLIENT, scheme, "b", SERVER.instance, "there", conn_id=3).answer(server.hello())
    with pytest.raises(handshake.Refused) as bad:
        server.check({**auth, "proof": "00" * 32})
    assert bad.value.reason == "authentication failed" and not bad.value.stale
    with pytest.raises(handshake.Refused) as stale:
        server.check({**auth, "target": "c" * 32})
    assert stale.value.stale and isinstance(stale.value.error, errors.AuthenticationError)
    with pytest.raises(handshake.Refused) as malformed:
        server.check({**auth, "nonce": 1})
    assert isinstance(malformed.value.error, errors.ProtocolError)


def test_the_initiator_refuses_the_wrong_target() -> None:
    server = handshake.Server(SERVER, handshake.TCP)
    hello = server.hello()
    client = handshake.Client(CLIENT, handshake.TCP, "b", "someone-else", "there")
    with pytest.raises(errors.StalePeerError):
        client.answer(hello)
    client = handshake.Client(CLIENT, handshake.TCP, "b", SERVER.instance, "there")
    client.answer(hello)
    with pytest.raises(errors.AuthenticationError):
        client.check_welcome({"proof": "00" * 32})
