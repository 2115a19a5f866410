"""The data plane's branch of weft's one exception tree (the root is `weft.api.errors`).

Every failure a caller can see is a `WeftError`; subclasses name the cause so callers can
react to it (retry on `TransferTimeoutError`, re-plan on `PeerLostError`, fix their code on
`InvalidDescriptorError`). Errors that travel over the wire carry a numeric code so the
initiator raises the same class the target saw.
"""

from __future__ import annotations

import enum

from weft.api.errors import AuthenticationError, ConfigError, MetadataError, StorageError, WeftError

__all__ = [
    "AgentClosedError",
    "AuthenticationError",
    "BackendUnavailableError",
    "ConfigError",
    "DeviceUnavailableError",
    "ErrorCode",
    "FencedError",
    "InboxFullError",
    "InvalidBufferError",
    "InvalidDescriptorError",
    "LimitError",
    "MetadataError",
    "NotificationTimeoutError",
    "PeerFencedError",
    "PeerLostError",
    "ProtocolError",
    "RegistrationError",
    "RemoteError",
    "StalePeerError",
    "StorageError",
    "TransferCancelledError",
    "TransferError",
    "TransferTimeoutError",
    "UnknownPeerError",
    "UnknownRegionError",
    "WeftError",
    "error_from_code",
]


class DeviceUnavailableError(WeftError):
    """GPU memory was asked for where no usable GPU exists."""


class InvalidBufferError(WeftError, TypeError):
    """An object cannot be registered (no buffer protocol, not contiguous, empty...)."""


class RegistrationError(WeftError):
    """A registration is invalid: a duplicate name, a released region, a read-only target."""


class InvalidDescriptorError(WeftError, ValueError):
    """A descriptor list is malformed, out of bounds, or does not match its counterpart."""


class UnknownPeerError(WeftError, KeyError):
    """No peer of that name was added to this agent."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown peer"


class UnknownRegionError(WeftError, KeyError):
    """The peer (or this agent) has no registered region of that name or id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown region"


class ProtocolError(WeftError):
    """A peer sent a malformed or oversized frame; its connection is dropped."""


class BackendUnavailableError(WeftError):
    """No configured backend can move data between these two memory kinds for this peer."""


class AgentClosedError(WeftError):
    """The agent was closed; nothing can be posted any more."""


class TransferError(WeftError):
    """A transfer failed. Subclasses say why."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A transfer did not finish before its deadline, or a wait ran out."""


class TransferCancelledError(TransferError):
    """The transfer was released before it finished."""


class PeerLostError(TransferError):
    """The peer died or its connection dropped; the peer is invalidated."""


class StalePeerError(PeerLostError):
    """The peer was replaced by a newer generation (or the descriptor is from an old one)."""


class PeerFencedError(PeerLostError):
    """The target lost its group lease and fenced itself: it serves nothing until it rejoins."""


class FencedError(WeftError):
    """This agent lost its group lease: it starts and serves no transfer until it rejoins."""


class RemoteError(TransferError):
    """The target refused or failed the request; `code` says why."""

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class LimitError(TransferError):
    """The target refused a request over one of its bounds (staging memory for device
    copies, a full notification inbox); the connection stays usable and a retry later may pass."""


class InboxFullError(LimitError):
    """The target's notification inbox stayed full: the request's bytes are in place (WRITE)
    or were not sent (READ), but its notification was not delivered."""


class NotificationTimeoutError(WeftError, TimeoutError):
    """No matching notification arrived before the deadline."""


class ErrorCode(enum.IntEnum):
    """Codes carried by ERROR frames; each maps back to an exception class."""

    INTERNAL = 1
    UNKNOWN_REGION = 2
    OUT_OF_BOUNDS = 3
    READ_ONLY = 4
    STALE_TARGET = 5
    BACKEND = 6
    FENCED = 7
    LIMIT = 8
    INBOX_FULL = 9


_CODE_TO_CLASS: dict[ErrorCode, type[WeftError]] = {
    ErrorCode.UNKNOWN_REGION: UnknownRegionError,
    ErrorCode.OUT_OF_BOUNDS: InvalidDescriptorError,
    ErrorCode.READ_ONLY: RegistrationError,
    ErrorCode.STALE_TARGET: StalePeerError,
    ErrorCode.FENCED: PeerFencedError,
    ErrorCode.LIMIT: LimitError,
    ErrorCode.INBOX_FULL: InboxFullError,
}


def error_from_code(code: int, message: str) -> WeftError:
    """Rebuild, on the initiator, the error the target reported."""
    try:
        known = ErrorCode(code)
    except ValueError:
        return RemoteError(f"remote error {code}: {message}")
    cls = _CODE_TO_CLASS.get(known)
    if cls is None:
        return RemoteError(message, known)
    return cls(message)
