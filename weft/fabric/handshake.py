"""The mutual group-secret handshake, written once for every transport that carries it.

Before a connection serves anything, each side proves it holds the group secret without
sending it: the target (server) sends HELLO with a fresh nonce, the initiator (client)
answers AUTH with its own nonce and an HMAC over both nonces and both instances, and the
target answers WELCOME with its own HMAC (or REJECT). A replayed AUTH fails on the fresh
nonce; a reflected proof fails on the role tag; metadata of an older incarnation fails on
the target instance.

This module holds the rule and the JSON bodies, not the framing: the tcp stream wraps the
bodies in `wire` frames, the ucx backend in its active-message control header. A `Scheme`
says what differs between transports (role tags, whether connection ids are bound into the
proof, whether the client's generation travels), so the bytes on each wire stay as they are.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from weft.fabric import errors, wire


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this side is: the fields a handshake sends and the secret its proofs use."""

    name: str
    instance: str
    generation: int
    secret: bytes | None


@dataclass(frozen=True, slots=True)
class Scheme:
    """How one transport runs the handshake.

    Attributes:
        version: the protocol version HELLO announces.
        client_role, server_role: the role tags the proofs are bound to.
        with_ids: each side announces a connection id (1 .. max_id - 1), bound into the proof.
        with_generation: AUTH carries the client's generation.
        label: appended to error messages (" over ucx").
    """

    version: int
    client_role: bytes
    server_role: bytes
    with_ids: bool = False
    with_generation: bool = False
    max_id: int = 1 << 16
    label: str = ""


#: The peer stream (`weft.fabric.connection`).
TCP = Scheme(wire.VERSION, b"client", b"server", with_generation=True)
#: The ucx backend's endpoints (connection ids are part of its message tags).
UCX = Scheme(1, b"ucx-client", b"ucx-server", with_ids=True, label=" over ucx")


class Refused(errors.WeftError):
    """The target refuses an AUTH: send REJECT with `reason`, then treat `error` as the cause.

    Attributes:
        reason: what REJECT tells the client.
        error: ProtocolError (malformed) or AuthenticationError (stale target, bad proof).
        stale: the client addressed an older incarnation of this agent (not an attack).
    """

    def __init__(self, reason: str, error: errors.WeftError, *, stale: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.stale = stale


def _valid_id(value: Any, scheme: Scheme) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < scheme.max_id


def _client_proof(
    secret: bytes,
    scheme: Scheme,
    nonces: tuple[str, str],
    client: tuple[str, str],
    target: str,
    ids: tuple[int, int],
) -> str:
    """The client's proof: both nonces, its name and instance, the target instance (and both ids)."""
    fields: tuple[str, ...] = (*nonces, *client, target)
    if scheme.with_ids:
        fields = (*fields, str(ids[0]), str(ids[1]))
    return wire.proof(secret, scheme.client_role, *fields)


class Client:
    """The initiator's half: answer HELLO with AUTH, then check WELCOME.

    Args:
        me: this agent.
        scheme: the transport's scheme.
        peer_name, peer_instance: who we were told sits at the address.
        where: the address, for the error when someone else answers there.
        conn_id: this side's connection id (schemes with ids).
    """

    def __init__(
        self, me: Identity, scheme: Scheme, peer_name: str, peer_instance: str, where: str, conn_id: int = 0
    ) -> None:
        self.me = me
        self.scheme = scheme
        self.peer_name = peer_name
        self.peer_instance = peer_instance
        self.where = where
        self.conn_id = conn_id
        self.remote_id = -1
        self.nonce_s = ""
        self.nonce_c = secrets.token_hex(16)

    def answer(self, hello: dict[str, Any]) -> dict[str, Any]:
        """The AUTH body answering `hello`.

        Raises:
            StalePeerError: another agent (or incarnation) answers at the address.
            AuthenticationError: the two sides disagree on using a group secret.
            ProtocolError: a malformed HELLO.
        """
        scheme, me = self.scheme, self.me
        if hello.get("name") != self.peer_name or hello.get("instance") != self.peer_instance:
            raise errors.StalePeerError(
                f"{self.where} is now {hello.get('name')!r} instance {hello.get('instance')!r}, "
                f"not the {self.peer_name!r} we were given"
            )
        if bool(hello.get("auth")) != (me.secret is not None):
            uses = "requires" if hello.get("auth") else "does not use"
            raise errors.AuthenticationError(
                f"peer {self.peer_name!r} {uses} a group secret "
                f"and this agent {'has one' if me.secret else 'has none'}"
            )
        nonce_s = hello.get("nonce", "")
        if scheme.with_ids:
            if not _valid_id(hello.get("id"), scheme) or not isinstance(nonce_s, str):
                raise errors.ProtocolError(f"malformed HELLO{scheme.label}")
            self.remote_id = int(hello["id"])
        self.nonce_s = str(nonce_s)
        body: dict[str, Any] = {"name": me.name, "instance": me.instance}
        if scheme.with_generation:
            body["generation"] = me.generation
        body["target"] = self.peer_instance
        body["nonce"] = self.nonce_c
        if scheme.with_ids:
            body["id"] = self.conn_id
        if me.secret is not None:
            body["proof"] = _client_proof(
                me.secret,
                scheme,
                (self.nonce_s, self.nonce_c),
                (me.name, me.instance),
                self.peer_instance,
                (self.conn_id, self.remote_id),
            )
        return body

    def check_welcome(self, body: dict[str, Any]) -> None:
        """Raises AuthenticationError unless WELCOME proves the group secret (when there is one)."""
        secret = self.me.secret
        if secret is None:
            return
        want = wire.proof(
            secret, self.scheme.server_role, self.nonce_s, self.nonce_c, self.peer_instance, self.me.instance
        )
        if not wire.check_proof(want, body.get("proof")):
            raise errors.AuthenticationError(
                f"peer {self.peer_name!r} could not prove the group secret{self.scheme.label}"
            )

    def rejected(self, body: dict[str, Any]) -> errors.AuthenticationError:
        """The error for a REJECT answer."""
        return errors.AuthenticationError(
            f"peer {self.peer_name!r} refused us{self.scheme.label}: {body.get('reason')}"
        )


class Server:
    """The target's half: send HELLO, check AUTH, answer WELCOME.

    Args:
        me: this agent.
        scheme: the transport's scheme.
        conn_id: this side's connection id (schemes with ids).
    """

    def __init__(self, me: Identity, scheme: Scheme, conn_id: int = 0) -> None:
        self.me = me
        self.scheme = scheme
        self.conn_id = conn_id
        self.remote_id = -1
        self.nonce_s = secrets.token_hex(16)
        self.peer_name: str | None = None
        self.peer_instance: str | None = None

    def hello(self) -> dict[str, Any]:
        """The HELLO body (the challenge)."""
        body: dict[str, Any] = {
            "v": self.scheme.version,
            "name": self.me.name,
            "instance": self.me.instance,
            "nonce": self.nonce_s,
            "auth": self.me.secret is not None,
        }
        if self.scheme.with_ids:
            body["id"] = self.conn_id
        return body

    def check(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check AUTH; returns the WELCOME body. Sets `peer_name` (once well formed) and `peer_instance`.

        Raises:
            Refused: malformed, addressed to another incarnation, or without a valid proof.
        """
        scheme, me = self.scheme, self.me
        name, instance, nonce_c = body.get("name"), body.get("instance"), body.get("nonce")
        if (
            not isinstance(name, str)
            or not isinstance(instance, str)
            or not isinstance(nonce_c, str)
            or (scheme.with_ids and not _valid_id(body.get("id"), scheme))
        ):
            raise Refused("malformed handshake", errors.ProtocolError(f"malformed handshake{scheme.label}"))
        if body.get("target") != me.instance:
            raise Refused(
                "stale metadata: this is a different instance",
                errors.AuthenticationError(f"{name!r} addressed instance {body.get('target')!r}"),
                stale=True,
            )
        self.peer_name = name
        if scheme.with_ids:
            self.remote_id = int(body["id"])
        reply: dict[str, Any] = {}
        if me.secret is not None:
            want = _client_proof(
                me.secret,
                scheme,
                (self.nonce_s, nonce_c),
                (name, instance),
                me.instance,
                (self.remote_id, self.conn_id),
            )
            if not wire.check_proof(want, body.get("proof")):
                raise Refused(
                    "authentication failed",
                    errors.AuthenticationError(f"{name!r} failed the group-secret handshake{scheme.label}"),
                )
            reply["proof"] = wire.proof(
                me.secret, scheme.server_role, self.nonce_s, nonce_c, me.instance, instance
            )
        self.peer_instance = instance
        return reply
