"""The fabric agent's config: one frozen object, every field documented.

It reads no environment: the node agent builds it from `weft.api.agent_settings.AgentSettings`
(`AgentConfig.from_settings`), the one reader of ``WEFT_*`` variables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from weft.fabric import errors
from weft.fabric.types import Backend

if TYPE_CHECKING:
    from weft.api.agent_settings import AgentSettings

DEFAULT_BACKENDS: tuple[Backend, ...] = (Backend.LOCAL, Backend.TCP)


@dataclasses.dataclass(frozen=True, slots=True)
class AgentConfig:
    """How an `Agent` moves data and who it lets in.

    Attributes:
        backends: data paths this agent may use, in order of preference ("local", "tcp",
            "ucx"). "local" needs both agents on one host and cross-memory attach permitted;
            "tcp" works everywhere. The control channel (handshake, notifications) is always
            a TCP connection.
        secret: the group secret. When set, every connection starts with a mutual HMAC
            challenge-response and metadata carries a MAC; without it the data path is open
            to anyone who can reach the port (the agent warns at start-up).
        listen_host: address the agent listens on for peers.
        listen_port: port to listen on (0: any free port).
        advertise_host: address published in metadata (default: listen_host).
        generation: this agent's generation; a newer one replaces an older one of the same
            name at its peers. Default: the start time in nanoseconds.
        transfer_timeout: default deadline of a transfer, in seconds.
        connect_timeout: deadline for connecting to a peer and finishing the handshake.
        handshake_timeout: how long an inbound connection may take to authenticate.
        inline_bytes: same-host transfers up to this size run in the posting thread; larger
            ones run on the agent's worker threads.
        local_workers: worker threads for same-host transfers.
        socket_buffer_bytes: SO_SNDBUF/SO_RCVBUF for data sockets (0: kernel default).
        max_descriptors: most descriptors one request may carry.
        max_notification_bytes: largest notification accepted.
        max_pending_notifications: notifications held per agent before back-pressure.
        max_pending_notification_bytes: bytes of notifications held per agent before
            back-pressure (at least max_notification_bytes).
        inbox_full_timeout: how long a stream waits for room in a full inbox before it
            refuses the notification (`InboxFullError` to the initiator) and moves on.
        max_unauthenticated: inbound connections that have not finished the handshake at
            once; more are closed on accept (and counted), so strangers cannot use up the
            agent's file descriptors and threads.
        max_staging_bytes: host memory this agent's inbound connections hold at once for
            copies to and from device memory; a request that cannot get its share within
            staging_timeout is refused (`LimitError`).
        staging_timeout: how long a request waits for staging memory before it is refused.
    """

    backends: tuple[Backend, ...] = DEFAULT_BACKENDS
    secret: bytes | None = dataclasses.field(default=None, repr=False)
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    advertise_host: str | None = None
    generation: int | None = None
    transfer_timeout: float = 60.0
    connect_timeout: float = 10.0
    handshake_timeout: float = 5.0
    inline_bytes: int = 1 << 20
    local_workers: int = 2
    socket_buffer_bytes: int = 0
    max_descriptors: int = 1 << 16
    max_notification_bytes: int = 1 << 20
    max_pending_notifications: int = 1 << 16
    max_pending_notification_bytes: int = 64 << 20
    inbox_full_timeout: float = 5.0
    max_unauthenticated: int = 256
    max_staging_bytes: int = 256 << 20
    staging_timeout: float = 5.0

    def __init__(
        self,
        backends: Iterable[str | Backend] = DEFAULT_BACKENDS,
        *,
        secret: bytes | str | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        advertise_host: str | None = None,
        generation: int | None = None,
        transfer_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 5.0,
        inline_bytes: int = 1 << 20,
        local_workers: int = 2,
        socket_buffer_bytes: int = 0,
        max_descriptors: int = 1 << 16,
        max_notification_bytes: int = 1 << 20,
        max_pending_notifications: int = 1 << 16,
        max_pending_notification_bytes: int = 64 << 20,
        inbox_full_timeout: float = 5.0,
        max_unauthenticated: int = 256,
        max_staging_bytes: int = 256 << 20,
        staging_timeout: float = 5.0,
    ) -> None:
        parsed = _parse_backends(backends)
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and len(secret) < 16:
            raise errors.ConfigError("secret must be at least 16 bytes")
        values: dict[str, Any] = {
            "backends": parsed,
            "secret": secret,
            "listen_host": listen_host,
            "listen_port": listen_port,
            "advertise_host": advertise_host,
            "generation": generation,
            "transfer_timeout": transfer_timeout,
            "connect_timeout": connect_timeout,
            "handshake_timeout": handshake_timeout,
            "inline_bytes": inline_bytes,
            "local_workers": local_workers,
            "socket_buffer_bytes": socket_buffer_bytes,
            "max_descriptors": max_descriptors,
            "max_notification_bytes": max_notification_bytes,
            "max_pending_notifications": max_pending_notifications,
            "max_pending_notification_bytes": max_pending_notification_bytes,
            "inbox_full_timeout": inbox_full_timeout,
            "max_unauthenticated": max_unauthenticated,
            "max_staging_bytes": max_staging_bytes,
            "staging_timeout": staging_timeout,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)
        self._check()

    def _check(self) -> None:
        positive = {
            "transfer_timeout": self.transfer_timeout,
            "connect_timeout": self.connect_timeout,
            "handshake_timeout": self.handshake_timeout,
            "local_workers": self.local_workers,
            "max_descriptors": self.max_descriptors,
            "max_notification_bytes": self.max_notification_bytes,
            "max_pending_notifications": self.max_pending_notifications,
            "inbox_full_timeout": self.inbox_full_timeout,
            "max_unauthenticated": self.max_unauthenticated,
            "max_staging_bytes": self.max_staging_bytes,
            "staging_timeout": self.staging_timeout,
        }
        for key, value in positive.items():
            if not value > 0:
                raise errors.ConfigError(f"{key} must be > 0, got {value!r}")
        if not 0 <= self.listen_port <= 65535:
            raise errors.ConfigError(f"listen_port out of range: {self.listen_port}")
        if self.inline_bytes < 0 or self.socket_buffer_bytes < 0:
            raise errors.ConfigError("inline_bytes and socket_buffer_bytes must be >= 0")
        if self.max_pending_notification_bytes < self.max_notification_bytes:
            raise errors.ConfigError("max_pending_notification_bytes must be >= max_notification_bytes")
        if self.generation is not None and self.generation < 0:
            raise errors.ConfigError("generation must be >= 0")

    def replace(self, **changes: Any) -> AgentConfig:
        """A copy with some fields changed."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        current.update(changes)
        backends = current.pop("backends")
        return AgentConfig(backends, **current)

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> AgentConfig:
        """The fabric's part of the agent's settings (which alone read the environment).

        Args:
            settings: the resolved `AgentSettings` (flags, ``WEFT_*`` variables, file).
        Returns:
            The config for the node agent's `Agent`.
        Raises:
            ConfigError: the join token cannot be read, or a fabric field is out of range.
        """
        limits = settings.limits
        return cls(
            settings.backends,
            secret=settings.join_token(),
            listen_host=settings.listen_host,
            listen_port=settings.listen_port,
            advertise_host=settings.advertise_host,
            max_unauthenticated=limits.max_unauthenticated,
            max_descriptors=limits.max_descriptors,
            max_staging_bytes=limits.max_staging_bytes,
            max_notification_bytes=limits.max_notification_bytes,
            max_pending_notifications=limits.max_pending_notifications,
            max_pending_notification_bytes=limits.max_pending_notification_bytes,
        )


def _parse_backends(backends: Iterable[str | Backend]) -> tuple[Backend, ...]:
    if isinstance(backends, str | bytes):
        raise errors.ConfigError("backends must be a list such as ['tcp'], not a string")
    out: list[Backend] = []
    for item in backends:
        try:
            backend = item if isinstance(item, Backend) else Backend(str(item).strip().lower())
        except ValueError:
            known = ", ".join(b.value for b in Backend)
            raise errors.ConfigError(f"unknown backend {item!r} (known: {known})") from None
        if backend not in out:
            out.append(backend)
    if not out:
        raise errors.ConfigError("at least one backend is needed")
    return tuple(out)
